//! The amiflow event contract: the EventBridge envelope, our seven detail types with their common
//! identity fields, idempotency keys, JSON Schemas generated from the types, and parsers for the
//! AWS events amiflow consumes (EC2 AMI state changes, Image Builder image state changes, Auto
//! Scaling instance-refresh events).
//!
//! This crate is pure data: serde, schemars and schema validation, no AWS SDK, no async runtime,
//! no I/O. Every worker, `amictl` and the tests share it, so an event means the same thing
//! everywhere. Identity lives in `detail` (`rollout_id`, `key`), never in the envelope: replays,
//! bus forwarding and DLQ redrives all change the envelope.

mod aws;
mod detail;
mod envelope;
pub mod keys;
mod parse;
pub mod schema;

pub use aws::{
    AWS_DETAIL_TYPES, AmiStateChange, AwsEvent, ImageBuilderStateChange, InstanceRefreshEvent,
    RefreshEventKind,
};
pub use detail::{
    AmiBuilt, AmiRecalled, AmiShared, AsgRefreshFinished, AsgRefreshRequested, Detail, Meta,
    Outcome, ParamUpdated, RolloutWindowOpened, Strategy,
};
pub use envelope::Envelope;
pub use parse::{Inbound, Rejection, RejectionKind, parse_message};

/// `source` of every event amiflow emits.
pub const SOURCE: &str = "amiflow";

/// The `schema_version` this build writes. Readers accept any version with the same major.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest message body a worker accepts: EventBridge's and SQS's own limit (1 MiB). Anything
/// larger cannot be an event we emitted, so it is poison.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
