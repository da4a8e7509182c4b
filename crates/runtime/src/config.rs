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

/// The longest duration any setting may hold: a year is already far beyond any sensible delay,
/// and it keeps `Duration` arithmetic (doubling backoffs) far from overflow.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Read an optional number of seconds (fractions allowed), or `default` when unset. Negative,
/// non-finite and absurd values are refused with the variable named, never a panic.
pub fn seconds_var(name: &'static str, default: f64) -> Result<Duration, ConfigError> {
    seconds_from(name, std::env::var(name).ok(), default)
}

fn seconds_from(
    name: &'static str,
    raw: Option<String>,
    default: f64,
) -> Result<Duration, ConfigError> {
    let seconds = match raw.as_deref().map(str::trim) {
        None | Some("") => default,
        Some(v) => v.parse::<f64>().map_err(|e| ConfigError::Invalid {
            name,
            value: v.to_owned(),
            why: e.to_string(),
        })?,
    };
    if !seconds.is_finite() || !(0.0..=MAX_SECONDS).contains(&seconds) {
        return Err(ConfigError::Invalid {
            name,
            value: raw.unwrap_or_else(|| seconds.to_string()),
            why: format!("must be a number of seconds from 0 to {MAX_SECONDS}"),
        });
    }
    Ok(Duration::from_secs_f64(seconds))
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
    /// How often one message may be deferred (sent again with a delay) before it is given up to
    /// the DLQ: a deferral resets SQS's receive count, so without a bound a request that can never
    /// proceed would come back forever.
    pub max_deferrals: u32,
    /// Lambda mode: no record is started with less than this left before the invocation's
    /// deadline; `None` is a quarter of the time the batch arrived with.
    pub lambda_margin: Option<Duration>,
}

impl WorkerConfig {
    /// Read the common settings: `AMIFLOW_QUEUE_URL`, `AMIFLOW_BUS` (required);
    /// `AMIFLOW_DLQ_URL`, `AMIFLOW_CONCURRENCY` (10), `AMIFLOW_WAIT_SECONDS` (20),
    /// `AMIFLOW_RETRY_BASE_SECONDS` (5), `AMIFLOW_STOP_TIMEOUT_SECONDS` (25),
    /// `AMIFLOW_STEP_ATTEMPTS` (3), `AMIFLOW_PUBLISH_ATTEMPTS` (8), `AMIFLOW_MAX_DEFERRALS`
    /// (1000: a refresh polled every five minutes may run for three days),
    /// `AMIFLOW_LAMBDA_MARGIN_SECONDS` (unset: a quarter of the invocation's time).
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
            retry_base_delay: seconds_var("AMIFLOW_RETRY_BASE_SECONDS", 5.0)?,
            stop_timeout: seconds_var("AMIFLOW_STOP_TIMEOUT_SECONDS", 25.0)?,
            step_attempts: var_or("AMIFLOW_STEP_ATTEMPTS", 3)?,
            publish_attempts: var_or("AMIFLOW_PUBLISH_ATTEMPTS", 8)?,
            max_deferrals: at_least_one(
                "AMIFLOW_MAX_DEFERRALS",
                var_or("AMIFLOW_MAX_DEFERRALS", 1000)?,
            )?,
            lambda_margin: match std::env::var("AMIFLOW_LAMBDA_MARGIN_SECONDS") {
                Ok(v) if !v.trim().is_empty() => {
                    Some(seconds_var("AMIFLOW_LAMBDA_MARGIN_SECONDS", 0.0)?)
                }
                _ => None,
            },
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
            max_deferrals: 1000,
            lambda_margin: None,
        }
    }
}

fn at_least_one(name: &'static str, value: u32) -> Result<u32, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid {
            name,
            value: "0".into(),
            why: "must be at least 1".into(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seconds(value: &str) -> Result<Duration, ConfigError> {
        seconds_from("AMIFLOW_DEFER_SECONDS", Some(value.to_owned()), 1.0)
    }

    #[test]
    fn durations_are_validated_instead_of_panicking() {
        assert_eq!(seconds("2.5").unwrap(), Duration::from_millis(2500));
        assert_eq!(
            seconds_from("AMIFLOW_DEFER_SECONDS", None, 60.0).unwrap(),
            Duration::from_secs(60)
        );
        for value in ["-1", "NaN", "inf", "1e300"] {
            let err = seconds(value).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "environment variable AMIFLOW_DEFER_SECONDS={value:?} is invalid: must be a number of seconds from 0 to {MAX_SECONDS}"
                )
            );
        }
        let err = seconds("ten").unwrap_err().to_string();
        assert_eq!(
            err,
            "environment variable AMIFLOW_DEFER_SECONDS=\"ten\" is invalid: invalid float literal"
        );
    }

    #[test]
    fn zero_deferrals_are_refused() {
        let err = at_least_one("AMIFLOW_MAX_DEFERRALS", 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("AMIFLOW_MAX_DEFERRALS") && err.contains("at least 1"),
            "{err}"
        );
    }
}
