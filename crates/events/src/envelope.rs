use serde::{Deserialize, Serialize};

/// The EventBridge envelope as delivered to an SQS target.
///
/// Not an identity: a replay, a bus-to-bus forward or a DLQ redrive gives the same event another
/// `id` and `time`, and the emulator even rewrites `account`. Use `detail.key` for identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<D> {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub id: String,
    #[serde(rename = "detail-type")]
    pub detail_type: String,
    pub source: String,
    #[serde(default)]
    pub account: String,
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub resources: Vec<String>,
    pub detail: D,
}
