//! AWS SDK configuration per account. The worker's own account uses the standard credential
//! chain; another account is reached by assuming `arn:aws:iam::<account>:role/<role name>`.
//! Assumed credentials are cached per account and refreshed by the SDK's identity cache before
//! they expire, so a long-running worker never calls STS per request.

use std::collections::HashMap;
use std::sync::Arc;

use aws_config::sts::AssumeRoleProvider;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use tokio::sync::Mutex;

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
    /// out which account it acts in.
    pub async fn from_env(role_name: Option<String>) -> anyhow::Result<Self> {
        let base = aws_config::defaults(BehaviorVersion::latest()).load().await;
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
                "account {account} is not this worker's ({}) and no role is configured to reach it; set AMIFLOW_ROLE_NAME",
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
