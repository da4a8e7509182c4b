//! Worker configuration from environment variables. A missing required variable fails at start
//! and names the variable; nothing that identifies an account, queue or region has a default.

use std::time::Duration;

/// A configuration problem, naming the variable to set.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is not set: {1}")]
    Missing(&'static str, &'static str),
    #[error("environment variable {name}={value:?} is invalid: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: String,
    },
}

/// Read a required variable; `what` says what it is for, so the error tells how to fix it.
pub fn required_var(name: &'static str, what: &'static str) -> Result<String, ConfigError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ConfigError::Missing(name, what)),
    }
}

/// Read an optional variable parsed with `FromStr`, or `default` when unset.
pub fn var_or<T: std::str::FromStr>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid {
                name,
                value: v,
                why: e.to_string(),
            })
        }
        _ => Ok(default),
    }
}

/// What every worker needs to run.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The worker's name in logs (`share-worker`, ...).
    pub worker: String,
    /// The queue this worker consumes.
    pub queue_url: String,
    /// The DLQ for poison; `None` means "read it from the queue's RedrivePolicy at start".
    pub dlq_url: Option<String>,
    /// The EventBridge bus emitted events go to.
    pub bus_name: String,
    /// Messages processed at once.
    pub concurrency: usize,
    /// Long-poll wait per receive (0..=20 s).
    pub wait_time: Duration,
    /// Delay before a transiently failed message is seen again: doubles with each receive.
    pub retry_base_delay: Duration,
    /// How long a stopping worker waits for in-flight steps before releasing their messages.
    pub stop_timeout: Duration,
    /// Attempts of a step inside one delivery before the message is left for redelivery.
    pub step_attempts: usize,
    /// `PutEvents` attempts for entries EventBridge rejected, before the step counts as failed.
    pub publish_attempts: usize,
}

impl WorkerConfig {
    /// Read the common settings: `AMIFLOW_QUEUE_URL`, `AMIFLOW_BUS` (required);
    /// `AMIFLOW_DLQ_URL`, `AMIFLOW_CONCURRENCY` (10), `AMIFLOW_WAIT_SECONDS` (20),
    /// `AMIFLOW_RETRY_BASE_SECONDS` (5), `AMIFLOW_STOP_TIMEOUT_SECONDS` (25),
    /// `AMIFLOW_STEP_ATTEMPTS` (3), `AMIFLOW_PUBLISH_ATTEMPTS` (8).
    pub fn from_env(worker: &str) -> Result<Self, ConfigError> {
        let wait: u64 = var_or("AMIFLOW_WAIT_SECONDS", 20)?;
        if wait > 20 {
            return Err(ConfigError::Invalid {
                name: "AMIFLOW_WAIT_SECONDS",
                value: wait.to_string(),
                why: "SQS long polling waits at most 20 seconds".into(),
            });
        }
        let concurrency: usize = var_or("AMIFLOW_CONCURRENCY", 10)?;
        if concurrency == 0 {
            return Err(ConfigError::Invalid {
                name: "AMIFLOW_CONCURRENCY",
                value: "0".into(),
                why: "at least one message must be processed at a time".into(),
            });
        }
        Ok(Self {
            worker: worker.to_owned(),
            queue_url: required_var(
                "AMIFLOW_QUEUE_URL",
                "the URL of the SQS queue this worker consumes",
            )?,
            dlq_url: std::env::var("AMIFLOW_DLQ_URL")
                .ok()
                .filter(|v| !v.is_empty()),
            bus_name: required_var(
                "AMIFLOW_BUS",
                "the EventBridge bus name (or ARN) events are emitted to",
            )?,
            concurrency,
            wait_time: Duration::from_secs(wait),
            retry_base_delay: Duration::from_secs_f64(var_or("AMIFLOW_RETRY_BASE_SECONDS", 5.0)?),
            stop_timeout: Duration::from_secs_f64(var_or("AMIFLOW_STOP_TIMEOUT_SECONDS", 25.0)?),
            step_attempts: var_or("AMIFLOW_STEP_ATTEMPTS", 3)?,
            publish_attempts: var_or("AMIFLOW_PUBLISH_ATTEMPTS", 8)?,
        })
    }

    /// Settings for tests and tools that build a worker in code.
    pub fn new(worker: &str, queue_url: &str, bus_name: &str) -> Self {
        Self {
            worker: worker.to_owned(),
            queue_url: queue_url.to_owned(),
            dlq_url: None,
            bus_name: bus_name.to_owned(),
            concurrency: 10,
            wait_time: Duration::from_secs(1),
            retry_base_delay: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(10),
            step_attempts: 3,
            publish_attempts: 8,
        }
    }
}
