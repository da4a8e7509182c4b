//! The amiflow worker runtime: everything between an SQS queue and a step function.
//!
//! A worker binary builds a [`Worker`] from [`WorkerConfig`], hands it a [`Step`] and a shutdown
//! future, and the runtime does the rest: long-poll receive in batches of ten with bounded
//! concurrency, poison detection (via [`events::parse_message`]) straight to the DLQ with a
//! reason, a visibility heartbeat for long steps, publishing emitted events to EventBridge
//! (retrying only the entries that failed), batch delete only after every emitted event was
//! accepted, transient failures retried with jittered backoff and then left for redelivery, and
//! a graceful stop that finishes or releases every message in flight.
//!
//! The runtime knows nothing about AMIs or groups; steps know nothing about queues.

pub mod clients;
pub mod config;
mod consumer;
pub mod error;
pub mod limits;
pub mod publish;
pub mod shutdown;
pub mod telemetry;

pub use clients::{Clients, SdkTimeouts};
pub use config::{ConfigError, WorkerConfig};
pub use consumer::{
    DEFERRALS_ATTR, DEFERRED_TOO_OFTEN, ERROR_ATTR, ERROR_KIND_ATTR, RECEIVE_COUNT_ATTR,
    SOURCE_QUEUE_ATTR, Step, StepOutput, Worker, WorkerStats,
};
pub use error::{ErrorClass, StepError, classify};
pub use publish::Publisher;
