//! Each worker's [`runtime::Step`]: route the parsed event to its step function, refuse what
//! this worker must not handle (wrong detail-type, another account's event) with a reason. Each
//! step builds its AWS capabilities (SDK clients) once, from the worker's one SDK configuration,
//! when the worker starts; every message reuses them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use events::{AwsEvent, Detail, Inbound};
use runtime::{StepError, StepOutput};

use crate::aws::{
    AwsGroups, CfnStacks, Ec2Images, KmsKeys, Parameters, Records, SsmParameters, SsmRecords,
    TagBatch,
};
use crate::control::{PauseCache, Promotion, Recall, RecallCache, Recalls};
use crate::policy::{Policy, Stage};
use crate::refresh::{Admission, RefreshContext, RefreshSettings};

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

/// A recalled AMI is refused by every worker, whatever brought it (an AWS event, a replay, a DLQ
/// replay, `amictl inject` or `rerun`): logged with the recall, nothing changed, nothing emitted,
/// and no dead letter (a replay of it would only be refused again).
fn refuse_recalled(worker: &str, what: &str, recall: &Recall) -> StepOutput {
    tracing::warn!(worker, ami = %recall.ami, by = %recall.decision.by, reason = %recall.decision.reason,
        "refused: {what} of a recalled AMI ({})", recall.refusal());
    StepOutput::Emit(Vec::new())
}

/// How far ahead of this worker's clock a window's `opens_at` may be (clocks differ a little).
const CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// A window event within the policy's bounds: it has opened (its `opens_at` is not ahead of this
/// worker's clock by more than [`CLOCK_SKEW`]) and it lasts at most
/// [`MAX_WINDOW_HOURS`](crate::policy::MAX_WINDOW_HOURS) from its opening (or from now, for a
/// window that names only its end). A window years long, forged or mistyped, would let refreshes
/// start at any time; a window of the future is not open.
pub fn check_window(
    window: &events::RolloutWindowOpened,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StepError> {
    if let Some(opens) = window.opens_at
        && opens > now + CLOCK_SKEW
    {
        return Err(StepError::Permanent(format!(
            "the window of {} opens at {}, in the future: a window event is sent when its window opens; refused",
            window.stage,
            opens.to_rfc3339()
        )));
    }
    let opened = window.opens_at.map_or(now, |o| o.min(now));
    let longest = chrono::Duration::hours(i64::from(crate::policy::MAX_WINDOW_HOURS));
    if window.closes_at > opened + longest {
        return Err(StepError::Permanent(format!(
            "the window of {} closes at {}, more than {} hours after it opened ({}): no window lasts longer (window.duration_hours is at most {}); refused",
            window.stage,
            window.closes_at.to_rfc3339(),
            crate::policy::MAX_WINDOW_HOURS,
            opened.to_rfc3339(),
            crate::policy::MAX_WINDOW_HOURS
        )));
    }
    Ok(())
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
    /// The same credentials, reaching other accounts through the policy's role (the share-worker
    /// reads each target's golden parameter).
    pub clients: runtime::Clients,
    /// The hub's records: pauses, promotions.
    pub control: Control,
}

/// The hub's gate records as a worker reads them: its pauses at most every
/// `AMIFLOW_CONTROL_SECONDS` (10 s: the documented delay within which a pause stops every
/// worker), and a message of a paused stage deferred for `AMIFLOW_PAUSE_RECHECK_SECONDS` (60 s)
/// at a time. A deferral counts against `AMIFLOW_MAX_DEFERRALS` (1,000): a pause longer than
/// their product (about 16 hours with the defaults) sends the waiting messages to the DLQ, from
/// where `amictl dlq redrive` brings them back.
pub struct Control {
    hub: tokio::sync::OnceCell<SsmRecords>,
    pauses: PauseCache,
    /// The recalls, read as the pauses are (at most every `AMIFLOW_CONTROL_SECONDS`).
    recalls: RecallCache,
    recheck: Duration,
    max_age: Duration,
    /// The operators' decisions on stages (resumes, halts), read at most every `max_age`.
    decisions: tokio::sync::Mutex<Option<(std::time::Instant, StageDecisions)>>,
}

/// The resumes' accepted failures and the halts, by record name.
#[derive(Default)]
struct StageDecisions {
    resumes: HashMap<String, usize>,
    halts: HashMap<String, crate::control::Halt>,
}

/// What operators decided for one AMI in one stage.
#[derive(Debug, Clone, Default)]
pub struct StageDecision {
    /// The failures accepted by `amictl resume --stage`.
    pub accepted_failures: usize,
    /// `amictl halt`, if the stage is halted for the AMI.
    pub halt: Option<crate::control::Halt>,
}

impl Control {
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self::new(
            runtime::config::seconds_var("AMIFLOW_CONTROL_SECONDS", 10.0)?,
            runtime::config::seconds_var("AMIFLOW_PAUSE_RECHECK_SECONDS", 60.0)?,
        ))
    }

    pub fn new(max_age: Duration, recheck: Duration) -> Self {
        Control {
            hub: tokio::sync::OnceCell::new(),
            pauses: PauseCache::new(max_age),
            recalls: RecallCache::new(max_age),
            recheck,
            max_age,
            decisions: tokio::sync::Mutex::default(),
        }
    }

    /// What operators decided for `ami` in `stage`: the failures accepted (`amictl resume
    /// --stage`) and a halt (`amictl halt`). Every stage's are read in two listings at most every
    /// `AMIFLOW_CONTROL_SECONDS`, as the pauses are: a halt stops new refreshes within that delay.
    pub async fn decision(
        &self,
        ctx: &Context,
        ami: &str,
        stage: &str,
    ) -> Result<StageDecision, StepError> {
        let mut last = self.decisions.lock().await;
        if last
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= self.max_age)
        {
            let records = self.records(ctx).await?;
            let resumes_root = crate::control::resume_path("", "");
            let (resumes, halts) = tokio::join!(
                records.list_records(resumes_root.trim_end_matches('/')),
                records.list_records(crate::control::HALTS)
            );
            let mut found = StageDecisions::default();
            // One written by hand is ignored here, refused by name where it is read alone.
            for stored in resumes? {
                if let Ok(r) = serde_json::from_str::<crate::control::Resume>(&stored.value) {
                    found.resumes.insert(stored.name, r.accepted_failures);
                }
            }
            for stored in halts? {
                if let Ok(h) = serde_json::from_str::<crate::control::Halt>(&stored.value) {
                    found.halts.insert(stored.name, h);
                }
            }
            *last = Some((std::time::Instant::now(), found));
        }
        let found = last.as_ref().map(|(_, found)| found);
        Ok(StageDecision {
            accepted_failures: found
                .and_then(|f| {
                    f.resumes
                        .get(&crate::control::resume_path(ami, stage))
                        .copied()
                })
                .unwrap_or(0),
            halt: found.and_then(|f| f.halts.get(&crate::control::halt_path(ami, stage)).cloned()),
        })
    }

    /// The hub's Parameter Store: its own in the hub, else through the policy's role.
    async fn records(&self, ctx: &Context) -> Result<&SsmRecords, StepError> {
        self.hub
            .get_or_try_init(|| async {
                let config = ctx
                    .clients
                    .for_account(&ctx.policy.hub_account)
                    .await
                    .map_err(|e| {
                        StepError::Transient(format!(
                            "cannot read the hub's records in {}: {e:#}",
                            ctx.policy.hub_account
                        ))
                    })?;
                Ok(SsmRecords(aws_sdk_ssm::Client::new(&config)))
            })
            .await
    }

    /// Every recall, at most `AMIFLOW_CONTROL_SECONDS` old.
    pub async fn recalls(&self, ctx: &Context) -> Result<Recalls, StepError> {
        self.recalls.get(self.records(ctx).await?).await
    }

    /// The recall of `ami`, if an operator recalled it.
    pub async fn recalled(&self, ctx: &Context, ami: &str) -> Result<Option<Recall>, StepError> {
        Ok(self.recalls(ctx).await?.of(ami).cloned())
    }

    /// The recall of `ami`, read now (one `GetParameter` in the hub), past the cache: what a
    /// worker confirms just before it changes something for the AMI.
    pub async fn recalled_now(
        &self,
        ctx: &Context,
        ami: &str,
    ) -> Result<Option<Recall>, StepError> {
        let records = self.records(ctx).await?;
        crate::control::read(records, &crate::control::recall_path(ami)).await
    }

    /// `Some(deferral)` while `stage` is paused: the message waits, neither lost nor acted on.
    pub async fn hold_if_paused(
        &self,
        ctx: &Context,
        stage: &Stage,
    ) -> Result<Option<StepOutput>, StepError> {
        let pauses = self.pauses.get(self.records(ctx).await?).await?;
        Ok(pauses.of(&stage.name).map(|p| {
            tracing::info!(stage = %stage.name, by = %p.by, reason = %p.reason, "stage paused; message deferred");
            StepOutput::Defer {
                delay: self.recheck,
                reason: format!(
                    "stage {} is paused by {} since {}: {}",
                    stage.name,
                    p.by,
                    p.at.to_rfc3339(),
                    p.reason
                ),
            }
        }))
    }
}

fn images(config: &SdkConfig) -> Ec2Images {
    Ec2Images(aws_sdk_ec2::Client::new(config))
}

fn keys(config: &SdkConfig) -> KmsKeys {
    KmsKeys(aws_sdk_kms::Client::new(config))
}

fn parameters(config: &SdkConfig) -> SsmParameters {
    SsmParameters(aws_sdk_ssm::Client::new(config))
}

pub struct IngestStep {
    ctx: Context,
    images: Ec2Images,
}

impl IngestStep {
    pub fn new(ctx: Context) -> Self {
        IngestStep {
            images: images(&ctx.config),
            ctx,
        }
    }
}

impl runtime::Step for IngestStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let (images, policy) = (&self.images, &self.ctx.policy);
        let built = match event {
            Inbound::Aws(AwsEvent::AmiStateChange(change)) => {
                crate::ingest::ingest_ami(change, images, policy).await?
            }
            Inbound::Aws(AwsEvent::ImageBuilderStateChange(change)) => {
                crate::ingest::ingest_image_builder(change, images, policy).await?
            }
            other => return Err(refuse("ingest-worker", other)),
        };
        let mut emitted = Vec::new();
        for detail in built {
            if let Detail::AmiBuilt(b) = &detail
                && let Some(recall) = self.ctx.control.recalled(&self.ctx, &b.ami_id).await?
            {
                refuse_recalled("ingest-worker", "AmiBuilt", &recall);
                continue;
            }
            emitted.push(detail);
        }
        Ok(StepOutput::Emit(emitted))
    }
}

pub struct ShareStep {
    ctx: Context,
    images: Ec2Images,
    keys: KmsKeys,
    goldens: crate::share::AccountGoldens,
    records: SsmRecords,
    /// Every stage account's groups and parameters, reached on the first window.
    stages: tokio::sync::OnceCell<crate::gate::AccountStages>,
}

impl ShareStep {
    pub fn new(ctx: Context) -> Self {
        ShareStep {
            images: images(&ctx.config),
            keys: keys(&ctx.config),
            goldens: crate::share::AccountGoldens::new(ctx.clients.clone()),
            records: SsmRecords(aws_sdk_ssm::Client::new(&ctx.config)),
            stages: tokio::sync::OnceCell::new(),
            ctx,
        }
    }
}

impl runtime::Step for ShareStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let e = trusted("share-worker", &self.ctx.policy, event)?;
        if self.ctx.account != self.ctx.policy.hub_account {
            return Err(StepError::Permanent(format!(
                "share-worker runs in {}, not the hub {}",
                self.ctx.account, self.ctx.policy.hub_account
            )));
        }
        let now = chrono::Utc::now();
        match &e.detail {
            Detail::AmiBuilt(built) => {
                if let Some(recall) = self.ctx.control.recalled(&self.ctx, &built.ami_id).await? {
                    return Ok(refuse_recalled("share-worker", "AmiBuilt", &recall));
                }
                Ok(StepOutput::Emit(
                    crate::share::share(
                        built,
                        &self.images,
                        &self.keys,
                        &self.goldens,
                        &self.records,
                        &self.ctx.policy,
                        now,
                    )
                    .await?,
                ))
            }
            Detail::RolloutWindowOpened(window) => {
                check_window(window, chrono::Utc::now())?;
                let stages = self
                    .stages
                    .get_or_try_init(|| {
                        crate::gate::AccountStages::connect(&self.ctx.clients, &self.ctx.policy)
                    })
                    .await
                    .map_err(|e| {
                        StepError::Transient(format!("cannot reach the stage accounts: {e:#}"))
                    })?;
                // Fresh: a promotion is a change, judged on what the hub says now.
                let pauses = crate::control::Pauses::read(&self.records).await?;
                Ok(StepOutput::Emit(
                    crate::share::promote_at_window(
                        window,
                        &self.images,
                        stages,
                        &self.records,
                        &pauses,
                        &self.ctx.policy,
                        now,
                    )
                    .await?,
                ))
            }
            _ => Err(refuse("share-worker", event)),
        }
    }
}

pub struct ParamStep {
    ctx: Context,
    read_back_interval: Duration,
    images: Ec2Images,
    params: SsmParameters,
    keys: KmsKeys,
}

impl ParamStep {
    /// `read_back_interval`: how long to wait between reads of a written parameter.
    pub fn new(ctx: Context, read_back_interval: Duration) -> Self {
        ParamStep {
            images: images(&ctx.config),
            params: parameters(&ctx.config),
            keys: keys(&ctx.config),
            ctx,
            read_back_interval,
        }
    }
}

impl runtime::Step for ParamStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let e = trusted("param-worker", &self.ctx.policy, event)?;
        let shared = match &e.detail {
            Detail::AmiShared(shared) => shared,
            Detail::AmiRecalled(recalled) => return self.recall(e, recalled).await,
            _ => return Err(refuse("param-worker", event)),
        };
        let stage = own_stage(&self.ctx.policy, &self.ctx.account, &shared.target_account)?;
        // Read now, not from the cache: a parameter written after a recall's move back would
        // hold the recalled AMI again.
        if let Some(recall) = self
            .ctx
            .control
            .recalled_now(&self.ctx, &shared.ami_id)
            .await?
        {
            return Ok(refuse_recalled("param-worker", "AmiShared", &recall));
        }
        // Only the hub promotes, and only what its gate recorded: anything else is a forgery.
        if e.account != self.ctx.policy.hub_account {
            return Err(StepError::Permanent(format!(
                "AmiShared for {} in {} was put on the bus by account {}, not the hub {}: only the hub's gate promotes a stage; refused",
                shared.ami_id, stage.name, e.account, self.ctx.policy.hub_account
            )));
        }
        let records = self.ctx.control.records(&self.ctx).await?;
        let path = crate::control::promotion_path(&shared.ami_id, &stage.name);
        let promoted: Option<Promotion> = crate::control::read(records, &path).await?;
        if promoted.is_none_or(|p| p.parameter != shared.parameter_name) {
            return Err(StepError::Permanent(format!(
                "AmiShared for {} in {}: the hub has no promotion record {path} for {}; a stage is promoted only by its gate; refused",
                shared.ami_id, stage.name, shared.parameter_name
            )));
        }
        if let Some(wait) = self.ctx.control.hold_if_paused(&self.ctx, stage).await? {
            return Ok(wait);
        }
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
        Ok(StepOutput::Emit(
            crate::param::update_parameter(
                shared,
                &self.ctx.account,
                &self.ctx.policy,
                &self.images,
                &self.keys,
                &self.params,
                self.read_back_interval,
            )
            .await?,
        ))
    }
}

impl ParamStep {
    /// A recall: only the hub's, only what its record says (the event is a wake-up call, not a
    /// proof), honouring a pause like any other change.
    async fn recall(
        &self,
        e: &events::Envelope<Detail>,
        recalled: &events::AmiRecalled,
    ) -> Result<StepOutput, StepError> {
        let policy = &self.ctx.policy;
        let stage = policy.stage_for_account(&self.ctx.account).ok_or_else(|| {
            StepError::Permanent(format!(
                "account {} is not a stage in the rollout policy",
                self.ctx.account
            ))
        })?;
        if e.account != policy.hub_account {
            return Err(StepError::Permanent(format!(
                "AmiRecalled for {} was put on the bus by account {}, not the hub {}: only the hub recalls an AMI; refused",
                recalled.ami_id, e.account, policy.hub_account
            )));
        }
        // Read fresh, not from the cache: the recall is seconds old.
        let records = self.ctx.control.records(&self.ctx).await?;
        let path = crate::control::recall_path(&recalled.ami_id);
        let recall: Option<Recall> = crate::control::read(records, &path).await?;
        let Some(recall) = recall.filter(|r| r.parameter == recalled.parameter_name) else {
            return Err(StepError::Permanent(format!(
                "AmiRecalled for {} ({}): the hub has no recall record {path} for that parameter; a recall is made with `amictl recall`; refused",
                recalled.ami_id, recalled.parameter_name
            )));
        };
        if policy
            .families
            .iter()
            .all(|f| f.parameter_name != recall.parameter)
        {
            return Err(StepError::Permanent(format!(
                "parameter {} is not a golden family in the rollout policy",
                recall.parameter
            )));
        }
        if let Some(wait) = self.ctx.control.hold_if_paused(&self.ctx, stage).await? {
            return Ok(wait);
        }
        let recalls = crate::control::Recalls::read(records).await?;
        let closes_at = recall.now.then(|| {
            chrono::Utc::now() + chrono::Duration::hours(i64::from(stage.window.duration_hours))
        });
        Ok(StepOutput::Emit(
            crate::param::recall_parameter(
                recalled,
                &recall,
                &recalls,
                &self.ctx.account,
                &self.images,
                &self.params,
                self.read_back_interval,
                closes_at,
            )
            .await?,
        ))
    }
}

pub struct PlanStep {
    ctx: Context,
    groups: AwsGroups,
    params: SsmParameters,
    /// The golden parameters of the stages before this one, through the policy's role.
    previous: tokio::sync::Mutex<HashMap<String, SsmParameters>>,
}

impl PlanStep {
    pub fn new(ctx: Context) -> Self {
        PlanStep {
            groups: AwsGroups::new(&ctx.config),
            params: parameters(&ctx.config),
            previous: tokio::sync::Mutex::default(),
            ctx,
        }
    }

    /// A golden AMI an earlier stage holds and this stage has not held yet: it is on its way
    /// here through the gates (the hub may promote it at this very window, and the promotion's
    /// `ParamUpdated` plans then); planning now would move groups to the AMI being replaced, and
    /// move them twice. `None` when none is (the first stage, or this stage holds what the ones
    /// before hold, or held it and moved on).
    async fn promotion_pending(&self, stage: &Stage) -> Result<Option<String>, StepError> {
        let earlier = self
            .ctx
            .policy
            .stages
            .iter()
            .take_while(|s| s.name != stage.name);
        for before in earlier {
            let theirs = {
                let mut reached = self.previous.lock().await;
                if !reached.contains_key(&before.account) {
                    let config = self
                        .ctx
                        .clients
                        .for_account(&before.account)
                        .await
                        .map_err(|e| {
                            StepError::Transient(format!(
                                "cannot read the golden parameters of {} ({}): {e:#}",
                                before.name, before.account
                            ))
                        })?;
                    reached.insert(before.account.clone(), parameters(&config));
                }
                reached[&before.account].clone()
            };
            for family in &self.ctx.policy.families {
                let name = &family.parameter_name;
                let Some(ahead) = theirs.get(name).await?.map(|p| p.value) else {
                    continue;
                };
                let ours = self.params.get(name).await?.map(|p| p.value);
                if ours.as_ref() == Some(&ahead)
                    || (ours.is_some() && self.params.history(name).await?.contains(&ahead))
                {
                    continue;
                }
                return Ok(Some(format!(
                    "{} holds {ahead} for {name}, which {} has not held yet",
                    before.name, stage.name
                )));
            }
        }
        Ok(None)
    }
}

impl runtime::Step for PlanStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let e = trusted("plan-worker", &self.ctx.policy, event)?;
        let (claimed, deadline, key) = match &e.detail {
            Detail::ParamUpdated(p) => (p.account.as_str(), p.closes_at, p.meta.key.as_str()),
            Detail::RolloutWindowOpened(w) => {
                check_window(w, chrono::Utc::now())?;
                (w.account.as_str(), Some(w.closes_at), w.meta.key.as_str())
            }
            _ => return Err(refuse("plan-worker", event)),
        };
        let stage = own_stage(&self.ctx.policy, &self.ctx.account, claimed)?;
        let recalls = self.ctx.control.recalls(&self.ctx).await?;
        if let Detail::ParamUpdated(p) = &e.detail
            && let Some(recall) = recalls.of(&p.ami_id)
        {
            return Ok(refuse_recalled("plan-worker", "ParamUpdated", recall));
        }
        if let Some(closed) = deadline.filter(|d| *d <= chrono::Utc::now()) {
            // A window event delivered late (a replay, a backlog): its window is over.
            tracing::info!(stage = %stage.name, %closed, "window already closed; nothing to plan");
            return Ok(StepOutput::Emit(Vec::new()));
        }
        // A parameter promoted at a window (it carries the window's end) plans in that window.
        if matches!(&e.detail, Detail::ParamUpdated(p) if p.closes_at.is_none())
            && stage.refresh_waits_for_window
        {
            tracing::info!(stage = %stage.name, "parameter updated; refreshes wait for the stage's window");
            return Ok(StepOutput::Emit(Vec::new()));
        }
        if let Some(wait) = self.ctx.control.hold_if_paused(&self.ctx, stage).await? {
            return Ok(wait);
        }
        if matches!(e.detail, Detail::RolloutWindowOpened(_))
            && let Some(why) = self.promotion_pending(stage).await?
        {
            tracing::info!(stage = %stage.name, %why, "window opened with a promotion pending at the hub's gate; its ParamUpdated plans if the gate opens");
            return Ok(StepOutput::Emit(Vec::new()));
        }
        let requests = crate::plan::plan(
            key,
            &self.ctx.account,
            deadline,
            &self.groups,
            &self.params,
            &self.ctx.policy,
            stage,
            &recalls,
        )
        .await?;
        Ok(StepOutput::Emit(requests))
    }
}

pub struct RefreshStep {
    ctx: Context,
    settings: RefreshSettings,
    /// This process's ledger of the account's slots, kept across messages.
    admission: Admission,
    /// Its tag writes go out together with those of the other messages in flight (`tag_batch`).
    groups: AwsGroups,
    stacks: CfnStacks,
    params: SsmParameters,
}

impl RefreshStep {
    /// `tag_batch` joins the tag writes of every message this process handles at once.
    pub fn new(ctx: Context, settings: RefreshSettings, tag_batch: &Arc<TagBatch>) -> Self {
        RefreshStep {
            settings,
            admission: Admission::default(),
            groups: AwsGroups::new(&ctx.config).batching_tags(tag_batch),
            stacks: CfnStacks(aws_sdk_cloudformation::Client::new(&ctx.config)),
            params: parameters(&ctx.config),
            ctx,
        }
    }
}

impl runtime::Step for RefreshStep {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        match event {
            Inbound::Amiflow(_) => {
                let e = trusted("refresh-worker", &self.ctx.policy, event)?;
                let Detail::AsgRefreshRequested(req) = &e.detail else {
                    return Err(refuse("refresh-worker", event));
                };
                let stage = own_stage(&self.ctx.policy, &self.ctx.account, &req.account)?;
                // Only a golden family of the policy is rolled out, whoever asks.
                if self
                    .ctx
                    .policy
                    .families
                    .iter()
                    .all(|f| f.parameter_name != req.parameter_name)
                {
                    return Err(StepError::Permanent(format!(
                        "AsgRefreshRequested for {} names {}, which is no golden family of the rollout policy; refused",
                        req.asg_name, req.parameter_name
                    )));
                }
                // Running refreshes go on in AWS and their outcome events still close them; no
                // request is acted on while the stage is paused.
                if let Some(wait) = self.ctx.control.hold_if_paused(&self.ctx, stage).await? {
                    return Ok(wait);
                }
                let decided = self
                    .ctx
                    .control
                    .decision(&self.ctx, &req.ami_id, &stage.name)
                    .await?;
                let recalled = self.ctx.control.recalled(&self.ctx, &req.ami_id).await?;
                let ctx = RefreshContext {
                    groups: &self.groups,
                    stacks: &self.stacks,
                    params: &self.params,
                    stage,
                    settings: &self.settings,
                    admission: &self.admission,
                    accepted_failures: decided.accepted_failures,
                    halt: decided.halt,
                    recalled: recalled.as_ref(),
                    recall_now: &HubRecall(&self.ctx),
                };
                crate::refresh::request_refresh(&ctx, req, chrono::Utc::now()).await
            }
            Inbound::Aws(AwsEvent::InstanceRefresh(r)) => {
                if !r.account.is_empty() && r.account != self.ctx.account {
                    return Err(StepError::Permanent(format!(
                        "instance-refresh event of account {} reached account {}",
                        r.account, self.ctx.account
                    )));
                }
                crate::refresh::refresh_event(
                    r,
                    &self.ctx.account,
                    &self.groups,
                    &self.params,
                    &self.admission,
                )
                .await
            }
            other => Err(refuse("refresh-worker", other)),
        }
    }
}

/// The refresh-worker's fresh read of a recall, in the hub.
struct HubRecall<'a>(&'a Context);

impl crate::refresh::RecallCheck for HubRecall<'_> {
    fn recall_of<'a>(
        &'a self,
        ami: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<Recall>, StepError>> {
        Box::pin(self.0.control.recalled_now(self.0, ami))
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
        clients,
        control: Control::from_env()?,
    };
    let consumer = runtime::Worker::connect(
        aws_sdk_sqs::Client::new(&sdk),
        aws_sdk_eventbridge::Client::new(&sdk),
        config.clone(),
    )
    .await?;
    Ok((config, ctx, consumer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone, Utc};
    use events::RolloutWindowOpened;

    fn refusal(window: &RolloutWindowOpened, now: chrono::DateTime<Utc>) -> String {
        match check_window(window, now) {
            Err(StepError::Permanent(why)) => why,
            other => panic!("a window out of bounds is refused for good: {other:?}"),
        }
    }

    /// A window that opened (within the clock skew) and lasts at most a day is taken; one of the
    /// future, or one longer than a day however it says so, is refused with the reason.
    #[test]
    fn a_window_of_the_future_or_longer_than_a_day_is_refused() {
        let now = Utc.with_ymd_and_hms(2026, 12, 5, 2, 0, 0).unwrap();
        let window = |opens: chrono::DateTime<Utc>, closes| {
            RolloutWindowOpened::new("222222222222", "uat", opens, closes)
        };
        check_window(&window(now, now + Duration::hours(24)), now).unwrap();
        check_window(
            &window(now + Duration::minutes(4), now + Duration::hours(4)),
            now,
        )
        .unwrap();
        check_window(
            &window(now - Duration::hours(3), now + Duration::hours(1)),
            now,
        )
        .unwrap();

        assert_eq!(
            refusal(&window(now, now + Duration::days(5 * 365)), now),
            "the window of uat closes at 2031-12-04T02:00:00+00:00, more than 24 hours after it opened (2026-12-05T02:00:00+00:00): no window lasts longer (window.duration_hours is at most 24); refused"
        );
        assert_eq!(
            refusal(
                &window(
                    now + Duration::days(30),
                    now + Duration::days(30) + Duration::hours(4)
                ),
                now
            ),
            "the window of uat opens at 2027-01-04T02:00:00+00:00, in the future: a window event is sent when its window opens; refused"
        );
        // A window that names only its end is counted from now.
        let mut end_only = window(now, now + Duration::hours(25));
        end_only.opens_at = None;
        assert!(
            refusal(&end_only, now)
                .contains("more than 24 hours after it opened (2026-12-05T02:00:00+00:00)")
        );
        end_only.closes_at = now + Duration::hours(2);
        check_window(&end_only, now).unwrap();
    }
}
