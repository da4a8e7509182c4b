//! Turning a queue message body into a typed event, or a [`Rejection`] that says why not.
//!
//! Every check that can fail on input happens here, before a step runs, so a worker never
//! crashes on what a queue delivers: the runtime sends a rejected message to the DLQ at once
//! with [`Rejection::kind`] and [`Rejection::message`] as its reason.

use serde_json::Value;

use crate::aws::{self, AwsEvent, AwsParseError};
use crate::detail::Detail;
use crate::envelope::Envelope;
use crate::{MAX_EVENT_BYTES, SCHEMA_VERSION, SOURCE, schema};

/// A message that parsed into something a worker can act on. Not boxed: one lives per message
/// in flight (at most a batch of ten), and steps match on it by reference.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Inbound {
    /// One of our events, schema-valid, with a consistent identity.
    Amiflow(Envelope<Detail>),
    /// An AWS service event in AWS's own shape.
    Aws(AwsEvent),
}

impl Inbound {
    /// A short label for logs: the detail-type.
    pub fn label(&self) -> &str {
        match self {
            Inbound::Amiflow(e) => e.detail.detail_type(),
            Inbound::Aws(AwsEvent::AmiStateChange(_)) => "EC2 AMI State Change",
            Inbound::Aws(AwsEvent::ImageBuilderStateChange(_)) => {
                "EC2 Image Builder Image State Change"
            }
            Inbound::Aws(AwsEvent::InstanceRefresh(_)) => "EC2 Auto Scaling Instance Refresh",
        }
    }
}

/// Why a message is poison. The string forms are the `amiflow-error-kind` attribute values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    TooLarge,
    InvalidJson,
    NotAnEvent,
    UnknownSource,
    UnknownDetailType,
    UnknownSchemaVersion,
    InvalidDetail,
}

impl RejectionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectionKind::TooLarge => "too-large",
            RejectionKind::InvalidJson => "invalid-json",
            RejectionKind::NotAnEvent => "not-an-event",
            RejectionKind::UnknownSource => "unknown-source",
            RejectionKind::UnknownDetailType => "unknown-detail-type",
            RejectionKind::UnknownSchemaVersion => "unknown-schema-version",
            RejectionKind::InvalidDetail => "invalid-detail",
        }
    }
}

/// A message that cannot be processed, ever: it goes to the DLQ with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct Rejection {
    pub kind: RejectionKind,
    pub message: String,
}

impl Rejection {
    fn new(kind: RejectionKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Parse a message body (an EventBridge event as delivered to SQS).
pub fn parse_message(body: &str) -> Result<Inbound, Rejection> {
    use RejectionKind::*;
    if body.len() > MAX_EVENT_BYTES {
        return Err(Rejection::new(
            TooLarge,
            format!(
                "body is {} bytes, over the {MAX_EVENT_BYTES}-byte event limit",
                body.len()
            ),
        ));
    }
    let value: Value = serde_json::from_str(body)
        .map_err(|e| Rejection::new(InvalidJson, format!("body is not JSON: {e}")))?;
    let envelope: Envelope<Value> = serde_json::from_value(value).map_err(|e| {
        Rejection::new(
            NotAnEvent,
            format!(
                "body is not an EventBridge event ({e}); expected detail-type, source and detail"
            ),
        )
    })?;
    let Envelope {
        version,
        id,
        detail_type,
        source,
        account,
        time,
        region,
        resources,
        detail,
    } = envelope;

    if source.starts_with("aws.") {
        return match aws::parse(&source, &detail_type, &account, &region, &resources, detail) {
            Ok(event) => Ok(Inbound::Aws(event)),
            Err(AwsParseError::UnknownDetailType) => Err(Rejection::new(
                UnknownDetailType,
                format!("detail-type {detail_type:?} from {source:?} is not one amiflow consumes"),
            )),
            Err(AwsParseError::Invalid(why)) => Err(Rejection::new(
                InvalidDetail,
                format!("{detail_type} detail is invalid: {why}"),
            )),
        };
    }
    if source != SOURCE {
        return Err(Rejection::new(
            UnknownSource,
            format!("source {source:?} is neither {SOURCE:?} nor an AWS service amiflow consumes"),
        ));
    }
    if !Detail::TYPES.contains(&detail_type.as_str()) {
        return Err(Rejection::new(
            UnknownDetailType,
            format!(
                "detail-type {detail_type:?} is not one of {}",
                Detail::TYPES.join(", ")
            ),
        ));
    }
    match detail.get("schema_version").and_then(Value::as_u64) {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(v) if v > 0 => {
            return Err(Rejection::new(
                UnknownSchemaVersion,
                format!(
                    "schema_version {v} is not supported (this build reads {SCHEMA_VERSION}); upgrade the worker"
                ),
            ));
        }
        _ => {
            return Err(Rejection::new(
                InvalidDetail,
                "/schema_version: missing or not a positive integer",
            ));
        }
    }
    // Fail closed: a detail-type this build cannot check is not accepted unchecked.
    let Some(violations) = schema::validate(&detail_type, &detail) else {
        return Err(Rejection::new(
            InvalidDetail,
            format!("{detail_type} has no schema validator in this build; refusing it unchecked"),
        ));
    };
    if !violations.is_empty() {
        let mut listed: Vec<String> = violations
            .iter()
            .filter(|v| !v.path.is_empty())
            .take(5)
            .map(ToString::to_string)
            .collect();
        if violations.iter().any(|v| v.path.is_empty()) {
            // A rule over the whole detail (a required field, or `anyOf` for the two window
            // shapes) is reported by the validator with the whole detail quoted; the type's own
            // checks say in words what is missing or inconsistent.
            match Detail::from_value(&detail_type, detail.clone()) {
                Err(e) => listed.push(format!("/: {e}")),
                Ok(_) => listed.extend(
                    violations
                        .iter()
                        .filter(|v| v.path.is_empty())
                        .take(2)
                        .map(ToString::to_string),
                ),
            }
        }
        return Err(Rejection::new(
            InvalidDetail,
            format!(
                "{detail_type} detail fails its schema: {}",
                listed.join("; ")
            ),
        ));
    }
    let detail = match Detail::from_value(&detail_type, detail) {
        Ok(Some(detail)) => detail,
        Ok(None) => {
            return Err(Rejection::new(
                UnknownDetailType,
                format!("detail-type {detail_type:?} is unknown"),
            ));
        }
        Err(e) => {
            return Err(Rejection::new(
                InvalidDetail,
                format!("{detail_type} detail: {e}"),
            ));
        }
    };
    if let Some(problem) = detail.identity_problem() {
        return Err(Rejection::new(
            InvalidDetail,
            format!("{detail_type}: {problem}"),
        ));
    }
    Ok(Inbound::Amiflow(Envelope {
        version,
        id,
        detail_type,
        source,
        account,
        time,
        region,
        resources,
        detail,
    }))
}
