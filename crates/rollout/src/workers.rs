//! Each worker's [`runtime::Step`]: route the parsed event to its step function, refuse what
//! this worker must not handle (wrong detail-type, another account's event) with a reason, and
//! build the AWS capabilities from one SDK configuration.

use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use events::{AwsEvent, Detail, Inbound};
use runtime::{StepError, StepOutput};

use crate::aws::{AwsGroups, CfnStacks, Ec2Images, KmsKeys, SsmParameters};
use crate::policy::{Policy, Stage};
use crate::refresh::RefreshSettings;

fn refuse(worker: &str, event: &Inbound) -> StepError {
    StepError::Permanent(format!(
        "{worker} does not handle {} events; check the rule that routed it here",
        event.label()
    ))
}

/// An amiflow event this worker may act on: ours (not an AWS event) and put on a bus by an account
/// of the installation. EventBridge sets `account` to the account that put the event, so an
/// event from anywhere else (a bus policy opened too wide, a forged message) is refused by name.
fn trusted<'e>(
    worker: &str,
    policy: &Policy,
    event: &'e Inbound,
) -> Result<&'e events::Envelope<Detail>, StepError> {
    let Inbound::Amiflow(e) = event else {
        return Err(refuse(worker, event));
    };
    if e.account != policy.hub_account && policy.stage_for_account(&e.account).is_none() {
        return Err(StepError::Permanent(format!(
            "{} was put on the bus by account {:?}, which is neither the hub nor a stage of the rollout policy; check the bus policy",
            e.detail.detail_type(),
            e.account
        )));
    }
    Ok(e)
}

fn own_stage<'p>(policy: &'p Policy, account: &str, claimed: &str) -> Result<&'p Stage, StepError> {
    if claimed != account {
        return Err(StepError::Permanent(format!(
            "event for account {claimed} delivered to the worker of account {account}; check the bus rules"
        )));
    }
    policy.stage_for_account(account).ok_or_else(|| {
        StepError::Permanent(format!(
            "account {account} is not a stage in the rollout policy"
        ))
    })
}

/// Everything a worker needs to act in its own account.
pub struct Context {
    pub policy: Arc<Policy>,
    pub account: String,
    pub config: SdkConfig,
}

pub struct IngestStep(pub Context);

impl runtime::Step for IngestStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let images = Ec2Images(aws_sdk_ec2::Client::new(&self.0.config));
        match event {
            Inbound::Aws(AwsEvent::AmiStateChange(change)) => Ok(StepOutput::Emit(
                crate::ingest::ingest_ami(change, &images, &self.0.policy).await?,
            )),
            Inbound::Aws(AwsEvent::ImageBuilderStateChange(change)) => Ok(StepOutput::Emit(
                crate::ingest::ingest_image_builder(change, &images, &self.0.policy).await?,
            )),
            other => Err(refuse("ingest-worker", other)),
        }
    }
}

pub struct ShareStep(pub Context);

impl runtime::Step for ShareStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let e = trusted("share-worker", &self.0.policy, event)?;
        let Detail::AmiBuilt(built) = &e.detail else {
            return Err(refuse("share-worker", event));
        };
        if self.0.account != self.0.policy.hub_account {
            return Err(StepError::Permanent(format!(
                "share-worker runs in {}, not the hub {}",
                self.0.account, self.0.policy.hub_account
            )));
        }
        let images = Ec2Images(aws_sdk_ec2::Client::new(&self.0.config));
        let keys = KmsKeys(aws_sdk_kms::Client::new(&self.0.config));
        Ok(StepOutput::Emit(
            crate::share::share(built, &images, &keys, &self.0.policy).await?,
        ))
    }
}

pub struct ParamStep {
    pub ctx: Context,
    pub read_back_interval: Duration,
}

impl runtime::Step for ParamStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let e = trusted("param-worker", &self.ctx.policy, event)?;
        let Detail::AmiShared(shared) = &e.detail else {
            return Err(refuse("param-worker", event));
        };
        own_stage(&self.ctx.policy, &self.ctx.account, &shared.target_account)?;
        if self
            .ctx
            .policy
            .families
            .iter()
            .all(|f| f.parameter_name != shared.parameter_name)
        {
            return Err(StepError::Permanent(format!(
                "parameter {} is not a golden family in the rollout policy",
                shared.parameter_name
            )));
        }
        let images = Ec2Images(aws_sdk_ec2::Client::new(&self.ctx.config));
        let params = SsmParameters(aws_sdk_ssm::Client::new(&self.ctx.config));
        let keys = KmsKeys(aws_sdk_kms::Client::new(&self.ctx.config));
        Ok(StepOutput::Emit(
            crate::param::update_parameter(
                shared,
                &self.ctx.account,
                &images,
                &keys,
                &params,
                self.read_back_interval,
            )
            .await?,
        ))
    }
}

pub struct PlanStep(pub Context);

impl runtime::Step for PlanStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let e = trusted("plan-worker", &self.0.policy, event)?;
        let (claimed, deadline, key) = match &e.detail {
            Detail::ParamUpdated(p) => (p.account.as_str(), None, p.meta.key.as_str()),
            Detail::RolloutWindowOpened(w) => {
                (w.account.as_str(), Some(w.closes_at), w.meta.key.as_str())
            }
            _ => return Err(refuse("plan-worker", event)),
        };
        let stage = own_stage(&self.0.policy, &self.0.account, claimed)?;
        if let Some(closed) = deadline.filter(|d| *d <= chrono::Utc::now()) {
            // A window event delivered late (a replay, a backlog): its window is over.
            tracing::info!(stage = %stage.name, %closed, "window already closed; nothing to plan");
            return Ok(StepOutput::Emit(Vec::new()));
        }
        if matches!(e.detail, Detail::ParamUpdated(_)) && stage.refresh_waits_for_window {
            tracing::info!(stage = %stage.name, "parameter updated; refreshes wait for the stage's window");
            return Ok(StepOutput::Emit(Vec::new()));
        }
        let groups = AwsGroups::new(&self.0.config);
        let params = SsmParameters(aws_sdk_ssm::Client::new(&self.0.config));
        let requests = crate::plan::plan(
            key,
            &self.0.account,
            deadline,
            &groups,
            &params,
            &self.0.policy,
            stage,
        )
        .await?;
        Ok(StepOutput::Emit(requests))
    }
}

pub struct RefreshStep {
    pub ctx: Context,
    pub settings: RefreshSettings,
    pub admission: crate::refresh::Admission,
    pub tag_batch: Arc<crate::aws::TagBatch>,
}

impl runtime::Step for RefreshStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let groups = AwsGroups::new(&self.ctx.config).batching_tags(&self.tag_batch);
        match event {
            Inbound::Amiflow(_) => {
                let e = trusted("refresh-worker", &self.ctx.policy, event)?;
                let Detail::AsgRefreshRequested(req) = &e.detail else {
                    return Err(refuse("refresh-worker", event));
                };
                let stage = own_stage(&self.ctx.policy, &self.ctx.account, &req.account)?;
                let stacks = CfnStacks(aws_sdk_cloudformation::Client::new(&self.ctx.config));
                let params = SsmParameters(aws_sdk_ssm::Client::new(&self.ctx.config));
                crate::refresh::request_refresh(
                    req,
                    chrono::Utc::now(),
                    &groups,
                    &stacks,
                    &params,
                    stage,
                    &self.settings,
                    &self.admission,
                )
                .await
            }
            Inbound::Aws(AwsEvent::InstanceRefresh(r)) => {
                if !r.account.is_empty() && r.account != self.ctx.account {
                    return Err(StepError::Permanent(format!(
                        "instance-refresh event of account {} reached account {}",
                        r.account, self.ctx.account
                    )));
                }
                crate::refresh::refresh_event(r, &self.ctx.account, &groups, &self.admission).await
            }
            other => Err(refuse("refresh-worker", other)),
        }
    }
}

/// The common start of every worker binary: tracing, config, policy, credentials, own account.
pub async fn start(
    worker: &str,
) -> anyhow::Result<(runtime::WorkerConfig, Context, runtime::Worker)> {
    runtime::telemetry::init();
    let config = runtime::WorkerConfig::from_env(worker)?;
    let policy = Arc::new(Policy::from_env()?);
    let clients = runtime::Clients::from_env(policy.role_name.clone()).await?;
    let sdk = clients.base().clone();
    let ctx = Context {
        policy,
        account: clients.own_account().to_owned(),
        config: sdk.clone(),
    };
    let consumer = runtime::Worker::connect(
        aws_sdk_sqs::Client::new(&sdk),
        aws_sdk_eventbridge::Client::new(&sdk),
        config.clone(),
    )
    .await?;
    Ok((config, ctx, consumer))
}
