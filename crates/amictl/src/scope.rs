//! Where an operator command acts: the running local world (its state file), or real AWS through
//! the standard credential chain (environment, profiles, SSO) with the rollout policy naming the
//! accounts and the role assumed in each. Every command that talks to AWS takes [`ScopeArgs`], so
//! `--local` and `--config` mean the same everywhere.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use aws_config::SdkConfig;
use clap::Args;
use rollout::policy::Policy;

use crate::exit::refuse;
use crate::local;

/// The bus every amiflow account has (DESIGN.md section 2).
pub const BUS: &str = "amiflow";

/// The help heading of the flags saying where a command acts (global: before or after it).
const SCOPE: &str = "Where it acts (before or after the command)";

#[derive(Debug, Clone, Args)]
pub struct ScopeArgs {
    /// Act on the local world started by `amictl local up` (the default when --config is not
    /// given).
    #[arg(long, global = true, conflicts_with = "config", help_heading = SCOPE)]
    pub local: bool,
    /// The rollout policy TOML: act on real AWS in the policy's region through the standard
    /// credential chain (--profile, AWS_PROFILE, SSO, environment), assuming the policy's
    /// `role_name` in every other account.
    #[arg(
        long,
        global = true,
        help_heading = SCOPE,
        value_name = "FILE",
        env = "AMIFLOW_CONFIG",
        hide_env_values = true
    )]
    pub config: Option<PathBuf>,
    /// The AWS region, with --config [default: the policy's `region`; AWS_REGION is not used,
    /// so that a shell set for another region cannot show an empty installation].
    #[arg(long, global = true, value_name = "REGION", help_heading = SCOPE)]
    pub region: Option<String>,
    /// The AWS profile of the base credentials, with --config [default: AWS_PROFILE, then the
    /// standard chain].
    #[arg(long, global = true, value_name = "NAME", help_heading = SCOPE)]
    pub profile: Option<String>,
}

/// One account amiflow runs in, with credentials acting there.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: String,
    /// The stage name, or `hub` for a hub that is no stage.
    pub stage: String,
    pub hub: bool,
    pub config: SdkConfig,
}

impl Account {
    pub fn label(&self) -> String {
        format!("{} ({})", self.stage, self.id)
    }
}

/// The accounts of one amiflow installation, hub first when it is no stage, then stages in
/// rollout order.
#[derive(Debug)]
pub struct Scope {
    pub policy: Policy,
    pub accounts: Vec<Account>,
    /// `local` or the policy file, for messages.
    pub origin: String,
}

impl Scope {
    pub async fn open(args: &ScopeArgs) -> Result<Self> {
        match &args.config {
            Some(path) if !args.local => Self::aws(path, args).await,
            _ => {
                if let Some(flag) = [("--region", &args.region), ("--profile", &args.profile)]
                    .iter()
                    .find_map(|(flag, value)| value.as_ref().map(|_| flag))
                {
                    refuse!(
                        "{flag} applies to AWS, named by --config FILE (or AMIFLOW_CONFIG); the local world has its own region and credentials: drop {flag}, or add --config"
                    );
                }
                Self::local().await
            }
        }
    }

    async fn local() -> Result<Self> {
        let state = local::current_state()?.ok_or_else(|| {
            anyhow!(
                "no local world is running; start one with `amictl local up`, or give the rollout policy with --config FILE to act on AWS"
            )
        })?;
        let policy = Policy::load(&state.config_file)
            .with_context(|| format!("reading {}", state.config_file.display()))?;
        let mut accounts = Vec::new();
        if !policy
            .stages
            .iter()
            .any(|s| s.account == policy.hub_account)
        {
            accounts.push(Account {
                id: policy.hub_account.clone(),
                stage: "hub".into(),
                hub: true,
                config: local::account_config(&state, &policy.hub_account).await?,
            });
        }
        for stage in &policy.stages {
            accounts.push(Account {
                id: stage.account.clone(),
                stage: stage.name.clone(),
                hub: stage.account == policy.hub_account,
                config: local::account_config(&state, &stage.account).await?,
            });
        }
        Ok(Self {
            policy,
            accounts,
            origin: "the local world".into(),
        })
    }

    async fn aws(path: &std::path::Path, args: &ScopeArgs) -> Result<Self> {
        let policy = Policy::load(path).with_context(|| format!("reading {}", path.display()))?;
        let region = args.region.clone().unwrap_or_else(|| policy.region.clone());
        let mut loader = runtime::SdkTimeouts::from_env()?
            .apply(aws_config::defaults(aws_config::BehaviorVersion::latest()))
            .region(aws_config::Region::new(region.clone()));
        if let Some(profile) = &args.profile {
            loader = loader.profile_name(profile);
        }
        let base = loader.load().await;
        let clients = runtime::Clients::new(base, policy.role_name.clone())
            .await
            .map_err(|e| unusable(e, &region, args.profile.as_deref()))?;
        let mut ids: Vec<(String, String)> = Vec::new();
        if !policy
            .stages
            .iter()
            .any(|s| s.account == policy.hub_account)
        {
            ids.push((policy.hub_account.clone(), "hub".into()));
        }
        ids.extend(
            policy
                .stages
                .iter()
                .map(|s| (s.account.clone(), s.name.clone())),
        );
        let mut accounts = Vec::new();
        for (id, stage) in ids {
            // Assuming the role is lazy: a missing role shows up on the first call, named there.
            let config = clients.for_account(&id).await.with_context(|| {
                format!(
                    "acting in {stage} ({id}) from account {}",
                    clients.own_account()
                )
            })?;
            accounts.push(Account {
                hub: id == policy.hub_account,
                id,
                stage,
                config,
            });
        }
        Ok(Self {
            policy,
            accounts,
            origin: path.display().to_string(),
        })
    }

    /// The account with this stage name or id; the error lists the known ones.
    pub fn account(&self, stage_or_id: &str) -> Result<&Account> {
        self.accounts
            .iter()
            .find(|a| a.id == stage_or_id || a.stage == stage_or_id)
            .ok_or_else(|| {
                anyhow!(
                    "no account or stage `{stage_or_id}` in {}; use one of {}",
                    self.origin,
                    self.known()
                )
            })
    }

    /// The accounts `--account` selects: that one, or all.
    pub fn select(&self, stage_or_id: Option<&str>) -> Result<Vec<&Account>> {
        match stage_or_id {
            Some(one) => Ok(vec![self.account(one)?]),
            None => Ok(self.accounts.iter().collect()),
        }
    }

    pub fn hub(&self) -> &Account {
        // `open` always adds the hub: as a stage or on its own.
        self.accounts
            .iter()
            .find(|a| a.hub)
            .unwrap_or(&self.accounts[0])
    }

    pub fn known(&self) -> String {
        self.accounts
            .iter()
            .map(Account::label)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The stage policy of an account (`None` for a hub that is no stage).
    pub fn stage_policy(&self, account: &Account) -> Option<&rollout::policy::Stage> {
        self.policy.stages.iter().find(|s| s.account == account.id)
    }

    /// Refuse an account id that is not part of this installation.
    pub fn require_known_account(&self, id: &str, field: &str) -> Result<()> {
        if self.accounts.iter().any(|a| a.id == id) {
            return Ok(());
        }
        bail!(
            "{field} {id} is not an account of {}; use one of {}",
            self.origin,
            self.known()
        )
    }
}

/// Why the base credentials could not be used, told apart: an unknown profile, no credentials,
/// an endpoint that cannot be reached (DNS, network, a proxy), or what AWS replied.
fn unusable(err: anyhow::Error, region: &str, profile: Option<&str>) -> anyhow::Error {
    let text = format!("{err:#}");
    let profile = profile
        .map(str::to_owned)
        .or_else(|| std::env::var("AWS_PROFILE").ok());
    if let Some(name) = profile.filter(|_| {
        text.contains("ProfileNotDefined")
            || text.contains("profile not defined")
            || text.contains("was not defined")
            || text.contains("could not find source profile")
    }) {
        return anyhow::Error::new(crate::exit::Usage(format!(
            "AWS profile `{name}` is not in ~/.aws/config or ~/.aws/credentials: name one of `aws configure list-profiles`, or run `aws configure sso --profile {name}`"
        )));
    }
    if text.contains("no providers in chain provided credentials")
        || text.contains("CredentialsNotLoaded")
        || text.contains("the credential provider was not enabled")
    {
        return anyhow!(
            "no usable AWS credentials: set AWS_PROFILE or --profile (run `aws sso login` first for an SSO profile) or the AWS_ACCESS_KEY_ID variables, or use --local ({text})"
        );
    }
    if text.contains("dispatch failure") || text.contains("io error") || text.contains("timeout") {
        return anyhow!(
            "could not reach AWS STS in {region} (DNS, network or proxy; AWS_ENDPOINT_URL if set): {text}"
        );
    }
    err.context(format!("AWS refused these credentials in {region}"))
}

/// An AWS SDK error for people: `Code: message`, or what happened when there is no AWS error
/// code (an HTTP status, a reply that did not parse, a connection that failed).
pub fn aws_error<E>(
    e: &aws_sdk_sqs::error::SdkError<E, aws_sdk_sqs::config::http::HttpResponse>,
) -> anyhow::Error
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    match aws_sdk_sqs::error::ProvideErrorMetadata::code(e) {
        Some(_) => anyhow!("{}", runtime::error::describe(e)),
        // No AWS error code: say what did happen (HTTP status, a reply that did not parse).
        None => anyhow!("{}", aws_sdk_sqs::error::DisplayErrorContext(e)),
    }
}
