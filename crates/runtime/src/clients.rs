//! AWS SDK configuration per account. The worker's own account uses the standard credential
//! chain; another account is reached by assuming `arn:aws:iam::<account>:role/<role name>`.
//! Assumed credentials are cached per account and refreshed by the SDK's identity cache before
//! they expire, so a long-running worker never calls STS per request. Every call carries the
//! time limits of [`SdkTimeouts`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, ConfigLoader, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use tokio::sync::Mutex;

use crate::config::{ConfigError, seconds_var};

/// Time limits on every AWS call a worker makes. Without them a call whose connection hangs
/// never returns, and the visibility heartbeat keeps its message invisible forever; with them the
/// call fails as a timeout, which [`crate::StepError::from_sdk`] classifies as transient, so the
/// message is retried and then released for redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdkTimeouts {
    /// Establishing a connection.
    pub connect: Duration,
    /// One attempt (one HTTP request); above SQS's 20-second long poll.
    pub attempt: Duration,
    /// One operation, all its retries included.
    pub operation: Duration,
}

impl Default for SdkTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            attempt: Duration::from_secs(30),
            operation: Duration::from_secs(60),
        }
    }
}

impl SdkTimeouts {
    /// `AMIFLOW_SDK_CONNECT_TIMEOUT_SECONDS` (5), `AMIFLOW_SDK_ATTEMPT_TIMEOUT_SECONDS` (30, more
    /// than the 20 s an SQS long poll may wait), `AMIFLOW_SDK_OPERATION_TIMEOUT_SECONDS` (60, at
    /// least the attempt timeout).
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Self::checked(
            seconds_var(
                "AMIFLOW_SDK_CONNECT_TIMEOUT_SECONDS",
                defaults.connect.as_secs_f64(),
            )?,
            seconds_var(
                "AMIFLOW_SDK_ATTEMPT_TIMEOUT_SECONDS",
                defaults.attempt.as_secs_f64(),
            )?,
            seconds_var(
                "AMIFLOW_SDK_OPERATION_TIMEOUT_SECONDS",
                defaults.operation.as_secs_f64(),
            )?,
        )
    }

    fn checked(
        connect: Duration,
        attempt: Duration,
        operation: Duration,
    ) -> Result<Self, ConfigError> {
        let invalid = |name, value: Duration, why: &str| ConfigError::Invalid {
            name,
            value: value.as_secs_f64().to_string(),
            why: why.to_owned(),
        };
        if connect.is_zero() {
            return Err(invalid(
                "AMIFLOW_SDK_CONNECT_TIMEOUT_SECONDS",
                connect,
                "must be more than 0",
            ));
        }
        if attempt <= Duration::from_secs(20) {
            return Err(invalid(
                "AMIFLOW_SDK_ATTEMPT_TIMEOUT_SECONDS",
                attempt,
                "must be more than 20 seconds, the longest an SQS long poll waits",
            ));
        }
        if operation < attempt {
            return Err(invalid(
                "AMIFLOW_SDK_OPERATION_TIMEOUT_SECONDS",
                operation,
                "must be at least AMIFLOW_SDK_ATTEMPT_TIMEOUT_SECONDS",
            ));
        }
        Ok(Self {
            connect,
            attempt,
            operation,
        })
    }

    pub fn timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .operation_attempt_timeout(self.attempt)
            .operation_timeout(self.operation)
            .build()
    }

    /// The loader with these limits: what [`Clients::from_env`] loads every worker's config with.
    pub fn apply(&self, loader: ConfigLoader) -> ConfigLoader {
        loader.timeout_config(self.timeout_config())
    }
}

/// Builds and caches per-account SDK configuration.
#[derive(Clone)]
pub struct Clients {
    base: SdkConfig,
    own_account: String,
    role_name: Option<String>,
    cache: Arc<Mutex<HashMap<String, SdkConfig>>>,
}

impl Clients {
    /// Load the standard chain (environment, profiles, SSO, container/instance roles) and find
    /// out which account it acts in. Every call is bounded by [`SdkTimeouts::from_env`]; the
    /// configs of other accounts derive from this one and keep the limits.
    pub async fn from_env(role_name: Option<String>) -> anyhow::Result<Self> {
        let timeouts = SdkTimeouts::from_env()?;
        let base = timeouts
            .apply(aws_config::defaults(BehaviorVersion::latest()))
            .load()
            .await;
        Self::new(base, role_name).await
    }

    pub async fn new(base: SdkConfig, role_name: Option<String>) -> anyhow::Result<Self> {
        let identity = aws_sdk_sts::Client::new(&base).get_caller_identity().send().await.map_err(|e| {
            anyhow::anyhow!(
                "could not find the AWS account of these credentials (sts:GetCallerIdentity): {}",
                crate::error::describe(&e)
            )
        })?;
        let own_account = identity.account().unwrap_or_default().to_owned();
        Ok(Self {
            base,
            own_account,
            role_name,
            cache: Arc::default(),
        })
    }

    /// The account the base credentials act in.
    pub fn own_account(&self) -> &str {
        &self.own_account
    }

    /// The base configuration (own account).
    pub fn base(&self) -> &SdkConfig {
        &self.base
    }

    /// Configuration acting in `account`: the base one for our own account, else an assumed role.
    pub async fn for_account(&self, account: &str) -> anyhow::Result<SdkConfig> {
        if account == self.own_account {
            return Ok(self.base.clone());
        }
        let Some(role_name) = &self.role_name else {
            anyhow::bail!(
                "account {account} is not this worker's ({}) and no role is configured to reach it; set role_name in the rollout policy",
                self.own_account
            );
        };
        let mut cache = self.cache.lock().await;
        if let Some(config) = cache.get(account) {
            return Ok(config.clone());
        }
        let provider =
            AssumeRoleProvider::builder(format!("arn:aws:iam::{account}:role/{role_name}"))
                .session_name(format!("amiflow-{}", self.own_account))
                .configure(&self.base)
                .build()
                .await;
        let config = self
            .base
            .to_builder()
            .credentials_provider(SharedCredentialsProvider::new(provider))
            .build();
        cache.insert(account.to_owned(), config.clone());
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StepError;
    use aws_config::Region;
    use aws_credential_types::Credentials;

    fn limits(attempt_ms: u64, operation_ms: u64) -> SdkTimeouts {
        SdkTimeouts {
            connect: Duration::from_secs(1),
            attempt: Duration::from_millis(attempt_ms),
            operation: Duration::from_millis(operation_ms),
        }
    }

    async fn config_for(endpoint: &str, timeouts: SdkTimeouts) -> SdkConfig {
        let loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("AKID", "SECRET", None, None, "test"))
            .endpoint_url(endpoint);
        timeouts.apply(loader).load().await
    }

    #[tokio::test]
    async fn a_call_that_hangs_fails_within_the_operation_timeout_as_transient() {
        // Accepts connections and never answers: what a stuck endpoint or proxy looks like.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let _server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let timeouts = limits(700, 1500);
        let sqs = aws_sdk_sqs::Client::new(&config_for(&endpoint, timeouts).await);
        let started = std::time::Instant::now();
        let call = sqs
            .receive_message()
            .queue_url(format!("{endpoint}/123456789012/q"))
            .send();
        // Without the limits the call would wait forever; the test must fail, not hang.
        let err = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the call hung past its operation timeout")
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= timeouts.operation && took < timeouts.operation + Duration::from_secs(2),
            "failed after {took:?}, not at the 1.5 s operation timeout"
        );
        match StepError::from_sdk("sqs:ReceiveMessage", &err) {
            StepError::Transient(reason) => assert!(
                reason.starts_with("sqs:ReceiveMessage: request has timed out")
                    && reason.contains("1.5s"),
                "{reason}"
            ),
            other => panic!("a hung call must be transient, got {other:?}"),
        }
    }

    #[test]
    fn limits_are_checked_against_the_long_poll_and_each_other() {
        assert_eq!(
            SdkTimeouts::checked(
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(60)
            )
            .unwrap(),
            SdkTimeouts::default()
        );
        let err = SdkTimeouts::checked(
            Duration::from_secs(5),
            Duration::from_secs(20),
            Duration::from_secs(60),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("environment variable AMIFLOW_SDK_ATTEMPT_TIMEOUT_SECONDS=\"20\" is invalid: must be more than 20 seconds"),
            "{err}"
        );
        let err = SdkTimeouts::checked(
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(29),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("AMIFLOW_SDK_OPERATION_TIMEOUT_SECONDS") && err.contains("at least"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn assumed_role_configs_keep_the_limits() {
        let timeouts = SdkTimeouts::default();
        let base = config_for("http://127.0.0.1:9", timeouts).await;
        let clients = Clients {
            base,
            own_account: "111111111111".into(),
            role_name: Some("amiflow".into()),
            cache: Arc::default(),
        };
        let other = clients.for_account("222222222222").await.unwrap();
        assert_eq!(other.timeout_config(), Some(&timeouts.timeout_config()));
        assert_eq!(
            clients
                .for_account("111111111111")
                .await
                .unwrap()
                .timeout_config(),
            Some(&timeouts.timeout_config())
        );
    }
}
