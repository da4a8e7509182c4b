//! `amictl pause`, `resume`, `approve` and `halt`: the operator's decisions, the one thing amictl writes
//! (DESIGN: operator intent is not rollout state). Each is a record in the **hub's** Parameter
//! Store (`rollout::control`), signed with the caller's STS identity, a time and a reason; the
//! workers read them before any change they make. Whether a stage is halted, or ready for an
//! approval, is `rollout::gate`'s judgement, read here exactly as the share-worker reads it.

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow};
use chrono::Utc;
use clap::{ArgGroup, Args};
use rollout::aws::{AwsGroups, Images, Parameters, SsmParameters, SsmRecords};
use rollout::control::{self, Approval, Decision, Halt, Pause, Pauses, Resume};
use rollout::gate::{self, GateState, Stages};
use rollout::plan::{Judged, judge_all};
use rollout::policy::Stage;

use crate::exit::{Usage, refuse};
use crate::output::Told;
use crate::scope::{Scope, ScopeArgs};

/// Stop a stage, or every stage: nothing changes there until `amictl resume`.
#[derive(Debug, Args)]
#[command(
    group(ArgGroup::new("which").required(true).args(["stage", "all"])),
    after_help = "Workers read pauses at most AMIFLOW_CONTROL_SECONDS late (default 10 s): a refresh already running finishes, nothing new starts.\n\nExamples:\n  amictl pause --stage prod --reason \"change freeze until Monday\"\n  amictl pause --all --reason \"incident 42: bad AMI suspected\""
)]
pub struct PauseArgs {
    /// The stage to pause (a stage name of the policy).
    #[arg(long, value_name = "STAGE", add = crate::completion::stages())]
    stage: Option<String>,
    /// Pause every stage.
    #[arg(long)]
    all: bool,
    /// Why, for the record (who and when are recorded from your AWS identity).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    #[command(flatten)]
    output: crate::output::OutputArgs,
}

/// Lift a pause; or let a stage that halted for an AMI go on, accepting the failures it has.
#[derive(Debug, Args)]
#[command(
    group(ArgGroup::new("which").required(true).args(["stage", "all"])),
    after_help = "A stage halts for an AMI when more of its groups failed or rolled back than its max_failed_groups allows. `resume --stage` of a halted stage accepts the failures it has now (recorded with who, when and why): it halts again only if more fail.\n\nExamples:\n  amictl resume --all\n  amictl resume --stage qa --reason \"health check fixed in the AMI's user data\""
)]
pub struct ResumeArgs {
    /// The stage to resume (a stage name of the policy).
    #[arg(long, value_name = "STAGE", add = crate::completion::stages())]
    stage: Option<String>,
    /// Lift the pause of every stage (`amictl pause --all`).
    #[arg(long)]
    all: bool,
    /// Why (required to resume a halted stage).
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    #[command(flatten)]
    output: crate::output::OutputArgs,
}

/// Approve an AMI for a stage that requires approval.
#[derive(Debug, Args)]
#[command(
    after_help = "The stage is promoted once the stage before has passed the AMI (refreshed or reported every group, within its failure tolerance, baked) and the approval exists.\n\nExamples:\n  amictl approve /golden/al2023/ami-id@ami-0123456789abcdef0 --stage prod --reason \"CAB-1234\"\n  amictl approve ami-0123456789abcdef0 --stage prod --reason \"qa and uat signed off\""
)]
pub struct ApproveArgs {
    /// The rollout (`<parameter name>@<ami id>`, as `amictl trace` takes it) or the AMI id.
    #[arg(value_name = "ROLLOUT-ID|AMI-ID")]
    rollout: String,
    /// The stage to approve the AMI for.
    #[arg(long, value_name = "STAGE", add = crate::completion::stages())]
    stage: String,
    /// Why (a change ticket, who signed off).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    #[command(flatten)]
    output: crate::output::OutputArgs,
}

/// Halt a stage for an AMI now, whatever its failures: nothing new starts there.
#[derive(Debug, Args)]
#[command(
    after_help = "A stage also halts by itself when more of its groups fail than its max_failed_groups allows. Halted, its refresh-worker starts no refresh to the AMI (waiting requests end `halted`, within AMIFLOW_CONTROL_SECONDS, default 10 s) and the next stage is not promoted. Running refreshes finish, unless --cancel-running: then each is cancelled when its request next polls it (AMIFLOW_POLL_SECONDS), and a `$Default` group gets its default version back. `amictl resume --stage` lets the stage go on.\n\nExamples:\n  amictl halt ami-0123456789abcdef0 --stage qa --reason \"502s on the first groups\"\n  amictl halt /golden/al2023/ami-id@ami-0123456789abcdef0 --stage uat --cancel-running --reason \"kernel panic on boot\""
)]
pub struct HaltArgs {
    /// The rollout (`<parameter name>@<ami id>`) or the AMI id.
    #[arg(value_name = "ROLLOUT-ID|AMI-ID")]
    rollout: String,
    /// The stage to halt (it must hold the AMI).
    #[arg(long, value_name = "STAGE", add = crate::completion::stages())]
    stage: String,
    /// Also cancel the stage's running refreshes to the AMI.
    #[arg(long)]
    cancel_running: bool,
    /// Why, for the record (who and when are recorded from your AWS identity).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    #[command(flatten)]
    output: crate::output::OutputArgs,
}

/// The hub's records, with the caller's identity for signing decisions.
pub struct Hub {
    pub records: SsmRecords,
    sts: aws_sdk_sts::Client,
    /// The caller's ARN, asked of STS once however many decisions a command signs.
    me: tokio::sync::OnceCell<String>,
}

impl Hub {
    pub fn of(scope: &Scope) -> Self {
        let config = &scope.hub().config;
        Hub {
            records: SsmRecords(aws_sdk_ssm::Client::new(config)),
            sts: aws_sdk_sts::Client::new(config),
            me: tokio::sync::OnceCell::new(),
        }
    }

    /// A decision signed by the caller: their STS ARN, now, and the reason.
    pub async fn decision(&self, reason: &str) -> Result<Decision> {
        let me = self
            .me
            .get_or_try_init(|| async {
                let me = self
                    .sts
                    .get_caller_identity()
                    .send()
                    .await
                    .map_err(|e| anyhow!("{}", runtime::error::describe(&e)))
                    .context(
                        "finding out who you are (sts:GetCallerIdentity), to sign the decision",
                    )?;
                anyhow::Ok(me.arn().unwrap_or("unknown").to_owned())
            })
            .await?;
        Ok(Decision {
            by: me.clone(),
            at: Utc::now(),
            reason: reason.to_owned(),
        })
    }

    pub async fn pauses(&self) -> Result<Pauses> {
        Pauses::read(&self.records)
            .await
            .map_err(|e| anyhow!("{e}"))
            .context("reading the pauses in the hub")
    }
}

/// Each stage account's groups and parameters through the scope's credentials.
pub struct ScopeStages(HashMap<String, (AwsGroups, SsmParameters)>);

impl ScopeStages {
    pub fn of(scope: &Scope) -> Self {
        ScopeStages(
            scope
                .accounts
                .iter()
                .filter(|a| scope.stage_policy(a).is_some())
                .map(|a| {
                    (
                        a.id.clone(),
                        (
                            AwsGroups::new(&a.config),
                            SsmParameters(aws_sdk_ssm::Client::new(&a.config)),
                        ),
                    )
                })
                .collect(),
        )
    }
}

impl Stages for ScopeStages {
    type Groups = AwsGroups;
    type Params = SsmParameters;
    fn of(&self, account: &str) -> Result<(&AwsGroups, &SsmParameters), runtime::StepError> {
        self.0.get(account).map(|(g, p)| (g, p)).ok_or_else(|| {
            runtime::StepError::Permanent(format!(
                "account {account} is not a stage of the rollout policy"
            ))
        })
    }
}

/// The stage named `name`; refused with the stage names when there is none.
pub fn stage<'a>(scope: &'a Scope, name: &str) -> Result<&'a Stage> {
    scope.policy.stage_named(name).ok_or_else(|| {
        anyhow::Error::new(Usage(format!(
            "no stage `{name}` in {}; use one of {}",
            scope.origin,
            stage_names(scope)
        )))
    })
}

fn stage_names(scope: &Scope) -> String {
    scope
        .policy
        .stages
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn reason(text: &str) -> Result<&str> {
    let text = text.trim();
    if text.is_empty() {
        refuse!(
            "--reason is empty: say why (a ticket, an incident, who signed off); it is recorded with who you are and when"
        );
    }
    Ok(text)
}

/// How a stage stands with the AMI its golden parameter holds, in one family.
pub struct StageRun {
    pub parameter: String,
    pub ami: String,
    pub tally: gate::Tally,
    pub tolerated: usize,
    pub resume: Option<Resume>,
    /// An operator's halt of the stage for the AMI.
    pub halt: Option<Halt>,
}

impl StageRun {
    /// The stage halted for the AMI: more failures than it tolerates, or an operator halted it.
    pub fn halted(&self) -> bool {
        self.tally.failed > self.tolerated || self.halt.is_some()
    }
}

/// How `stage` stands with `ami` of `parameter`: its judged groups counted by the gate's own
/// tally, against its tolerance and the failures an operator accepted.
pub async fn run_of(
    hub: &Hub,
    stage: &Stage,
    judged: &[Judged],
    parameter: &str,
    ami: &str,
) -> Result<StageRun> {
    let resume: Option<Resume> =
        control::read(&hub.records, &control::resume_path(ami, &stage.name))
            .await
            .map_err(|e| anyhow!("{e}"))?;
    let halt: Option<Halt> = control::read(&hub.records, &control::halt_path(ami, &stage.name))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let tally = gate::tally(judged, parameter, ami);
    let tolerated = gate::tolerance(stage, tally.groups, resume.as_ref());
    Ok(StageRun {
        parameter: parameter.to_owned(),
        ami: ami.to_owned(),
        tally,
        tolerated,
        resume,
        halt,
    })
}

/// Every family's run in `stage`, for the AMI its golden parameter holds.
pub async fn runs_of(
    stages: &ScopeStages,
    hub: &Hub,
    scope: &Scope,
    stage: &Stage,
) -> Result<Vec<StageRun>> {
    let (groups, params) = stages.of(&stage.account).map_err(|e| anyhow!("{e}"))?;
    let judged = judge_all(groups, params, &scope.policy, stage)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("judging the groups of {}", stage.name))?;
    let mut runs = Vec::new();
    for family in &scope.policy.families {
        let parameter = &family.parameter_name;
        if let Some(ami) = params
            .get(parameter)
            .await
            .map_err(|e| anyhow!("{e}"))?
            .map(|p| p.value)
        {
            runs.push(run_of(hub, stage, &judged, parameter, &ami).await?);
        }
    }
    Ok(runs)
}

pub async fn pause(args: PauseArgs, scope: &ScopeArgs) -> Result<()> {
    let why = reason(&args.reason)?.to_owned();
    let scope = Scope::open(scope).await?;
    let name = match &args.stage {
        Some(name) => Some(stage(&scope, name)?.name.clone()),
        None => None,
    };
    let hub = Hub::of(&scope);
    let path = control::pause_path(name.as_deref());
    let pause: Pause = hub.decision(&why).await?;
    control::write(&hub.records, &path, &pause)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {path} in the hub {}", scope.hub().label()))?;
    let mut told = Told::default();
    told.change("paused", &path, &pause);
    told.say(format!(
        "paused {} ({path} in the hub): by {}, {}",
        name.as_deref().unwrap_or("every stage"),
        pause.by,
        pause.reason
    ));
    told.print(&args.output)
}

pub async fn resume(args: ResumeArgs, scope: &ScopeArgs) -> Result<()> {
    let why = args.reason.as_deref().map(reason).transpose()?;
    let scope = Scope::open(scope).await?;
    let hub = Hub::of(&scope);
    let pauses = hub.pauses().await?;
    let Some(name) = &args.stage else {
        let Some(all) = &pauses.all else {
            let paused: Vec<String> = pauses.stages.iter().map(|(s, _)| s.clone()).collect();
            if paused.is_empty() {
                refuse!("nothing is paused: there is no pause of every stage to lift");
            }
            refuse!(
                "there is no pause of every stage to lift; paused one by one: {}: lift each with `amictl resume --stage NAME`",
                paused.join(", ")
            );
        };
        let path = control::pause_path(None);
        let mut told = Told::default();
        keep_lifted(
            &hub,
            &mut told,
            &control::lifted_pause_path(None, all),
            all,
            why,
        )
        .await?;
        remove(&hub, &scope, &path).await?;
        told.change("pause-lifted", &path, all);
        told.say(format!(
            "resumed every stage (the pause by {} at {}: {})",
            all.by,
            all.at.to_rfc3339(),
            all.reason
        ));
        return told.print(&args.output);
    };
    let stage = stage(&scope, name)?;
    let own = pauses
        .stages
        .iter()
        .find(|(s, _)| *s == stage.name)
        .map(|(_, p)| p.clone());
    let stages = ScopeStages::of(&scope);
    let runs = runs_of(&stages, &hub, &scope, stage).await?;
    let halted: Vec<&StageRun> = runs.iter().filter(|r| r.halted()).collect();
    if own.is_none() && halted.is_empty() {
        if let Some(all) = &pauses.all {
            refuse!(
                "{} is paused by the pause of every stage (by {} at {}: {}); lift it with `amictl resume --all`",
                stage.name,
                all.by,
                all.at.to_rfc3339(),
                all.reason
            );
        }
        refuse!(
            "{} is neither paused nor halted: nothing to resume (`amictl status --stage {}` shows how it stands)",
            stage.name,
            stage.name
        );
    }
    if !halted.is_empty() && why.is_none() {
        refuse!(
            "{} is halted for {}: resuming accepts its failures, so say why with --reason",
            stage.name,
            halted
                .iter()
                .map(|r| r.ami.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut told = Told::default();
    if let Some(pause) = own {
        let path = control::pause_path(Some(&stage.name));
        let lifted = control::lifted_pause_path(Some(&stage.name), &pause);
        keep_lifted(&hub, &mut told, &lifted, &pause, why).await?;
        remove(&hub, &scope, &path).await?;
        told.change("pause-lifted", &path, &pause);
        told.say(format!(
            "resumed {} (the pause by {} at {}: {})",
            stage.name,
            pause.by,
            pause.at.to_rfc3339(),
            pause.reason
        ));
    }
    for run in halted {
        if let Some(halt) = &run.halt {
            let path = control::halt_path(&run.ami, &stage.name);
            let lifted = control::lifted_halt_path(&run.ami, &stage.name, halt);
            keep_lifted(&hub, &mut told, &lifted, halt, why).await?;
            remove(&hub, &scope, &path).await?;
            told.change("halt-lifted", &path, halt);
            told.say(format!(
                "lifted the halt of {} for {} ({})",
                stage.name,
                run.ami,
                halt.describe()
            ));
        }
        let resume = Resume {
            decision: hub.decision(why.unwrap_or_default()).await?,
            accepted_failures: run.tally.failed,
        };
        let path = control::resume_path(&run.ami, &stage.name);
        control::write(&hub.records, &path, &resume)
            .await
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("writing {path} in the hub"))?;
        told.change("resumed", &path, &resume);
        told.say(format!(
            "resumed {} for {} ({}): {} failed groups accepted, by {}: {}",
            stage.name,
            run.ami,
            run.parameter,
            resume.accepted_failures,
            resume.decision.by,
            resume.decision.reason
        ));
    }
    if let Some(all) = &pauses.all {
        told.say(format!(
            "note: every stage is still paused (by {}: {}); `amictl resume --all` lifts that",
            all.by, all.reason
        ));
    }
    told.print(&args.output)
}

/// Keep, before a pause or halt is deleted, the record of it and of its lifting, for the
/// report's history (the workers read only the pause or halt itself).
async fn keep_lifted<T: serde::Serialize + Clone>(
    hub: &Hub,
    told: &mut Told,
    path: &str,
    was: &T,
    why: Option<&str>,
) -> Result<()> {
    let lifted = control::Lifted {
        was: was.clone(),
        lifted: hub.decision(why.unwrap_or("")).await?,
    };
    control::write(&hub.records, path, &lifted)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {path} in the hub"))?;
    told.change("lifted-recorded", path, &lifted);
    Ok(())
}

async fn remove(hub: &Hub, scope: &Scope, path: &str) -> Result<()> {
    use rollout::aws::Records;
    hub.records
        .remove_record(path)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("deleting {path} in the hub {}", scope.hub().label()))
}

/// A rollout id or an AMI id: the golden parameter and the AMI, checked against the hub.
pub async fn rollout_of(scope: &Scope, text: &str) -> Result<(String, String)> {
    let (parameter, ami) = match text.rsplit_once('@') {
        Some((parameter, ami)) => (Some(parameter), ami),
        None => (None, text),
    };
    let hex = ami.strip_prefix("ami-").unwrap_or_default();
    if !(matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_hexdigit())) {
        refuse!(
            "{text:?} is neither a rollout id (<parameter name>@<ami id>, e.g. /golden/al2023/ami-id@ami-0123456789abcdef0) nor an AMI id (ami- and 8 or 17 hex digits)"
        );
    }
    let families = || {
        scope
            .policy
            .families
            .iter()
            .map(|f| f.parameter_name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(p) = parameter
        && !scope.policy.families.iter().any(|f| f.parameter_name == p)
    {
        refuse!(
            "{p} in {text} is no golden parameter of {}; use one of {}",
            scope.origin,
            families()
        );
    }
    let hub = scope.hub();
    let images = rollout::aws::Ec2Images(aws_sdk_ec2::Client::new(&hub.config));
    let Some(image) = images
        .describe(ami)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("reading {ami} in the hub {}", hub.label()))?
    else {
        refuse!(
            "no AMI {ami} in the hub {}: check the id (`amictl status` shows each stage's golden AMI)",
            hub.label()
        );
    };
    let parameter = match parameter {
        Some(p) => p.to_owned(),
        None => match scope
            .policy
            .family_of(&image.name, image.family_tag.as_deref())
        {
            Some(f) => f.parameter_name.clone(),
            None => refuse!(
                "{ami} ({}) belongs to no golden family of {} ({}); give the rollout id <parameter>@{ami}",
                image.name,
                scope.origin,
                families()
            ),
        },
    };
    Ok((parameter, image.id))
}

pub async fn approve(args: ApproveArgs, scope: &ScopeArgs) -> Result<()> {
    let why = reason(&args.reason)?.to_owned();
    let scope = Scope::open(scope).await?;
    let stage = stage(&scope, &args.stage)?;
    if !stage.requires_approval {
        let needing: Vec<&str> = scope
            .policy
            .stages
            .iter()
            .filter(|s| s.requires_approval)
            .map(|s| s.name.as_str())
            .collect();
        refuse!(
            "{} does not require approval (requires_approval is false in {}): it is promoted when the stage before passes{}",
            stage.name,
            scope.origin,
            if needing.is_empty() {
                String::from("; no stage requires approval")
            } else {
                format!("; stages that do: {}", needing.join(", "))
            }
        );
    }
    let (parameter, ami) = rollout_of(&scope, &args.rollout).await?;
    let hub = Hub::of(&scope);
    let path = control::approval_path(&ami, &stage.name);
    if let Some(earlier) = control::read::<Approval>(&hub.records, &path)
        .await
        .map_err(|e| anyhow!("{e}"))?
    {
        let mut told = Told::default();
        told.say(format!(
            "{ami} is already approved for {} by {} at {}: {}",
            stage.name,
            earlier.by,
            earlier.at.to_rfc3339(),
            earlier.reason
        ));
        return told.print(&args.output);
    }
    let pauses = hub.pauses().await?;
    let stages = ScopeStages::of(&scope);
    let previous = scope.policy.stage_before(&stage.name);
    let prev_read = match previous {
        Some(prev) => {
            let (groups, params) = stages.of(&prev.account).map_err(|e| anyhow!("{e}"))?;
            let judged = judge_all(groups, params, &scope.policy, prev)
                .await
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("judging the groups of {}", prev.name))?;
            let golden = params
                .get(&parameter)
                .await
                .map_err(|e| anyhow!("{e}"))?
                .map(|p| p.value);
            Some((prev, golden, judged))
        }
        None => None,
    };
    let state = gate::judge_ami(
        &hub.records,
        &pauses,
        stage,
        &parameter,
        &ami,
        prev_read
            .as_ref()
            .map(|(prev, golden, judged)| (*prev, golden.as_deref(), judged.as_slice())),
        Utc::now(),
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    match &state {
        GateState::Promoted(p) => refuse!(
            "{} is already promoted to {ami} ({} at {}): nothing to approve",
            stage.name,
            p.reason,
            p.at.to_rfc3339()
        ),
        GateState::Halted { .. } | GateState::HaltedBy { .. } => {
            refuse!("{ami} cannot be approved for {}: {state}", stage.name)
        }
        GateState::NotReached { stage: prev, .. } | GateState::WaitingFor { stage: prev, .. } => {
            refuse!(
                "{ami} cannot be approved for {} yet: {prev} has not passed it ({state}); approve once `amictl plan --stage {}` shows the stage waiting for approval",
                stage.name,
                stage.name
            )
        }
        _ => {}
    }
    let approval: Approval = hub.decision(&why).await?;
    control::write(&hub.records, &path, &approval)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {path} in the hub {}", scope.hub().label()))?;
    let mut told = Told::default();
    told.change("approved", &path, &approval);
    told.say(format!(
        "approved {parameter}@{ami} for {} ({path} in the hub): by {}, {}",
        stage.name, approval.by, approval.reason
    ));
    if let GateState::Baking { until } = state {
        told.say(format!(
            "{} is promoted once the stage before has baked, at {}",
            stage.name,
            until.to_rfc3339()
        ));
    }
    told.print(&args.output)
}

pub async fn halt(args: HaltArgs, scope: &ScopeArgs) -> Result<()> {
    let why = reason(&args.reason)?.to_owned();
    let scope = Scope::open(scope).await?;
    let stage = stage(&scope, &args.stage)?;
    let (parameter, ami) = rollout_of(&scope, &args.rollout).await?;
    let stages = ScopeStages::of(&scope);
    let (_, params) = stages.of(&stage.account).map_err(|e| anyhow!("{e}"))?;
    let holds = params
        .get(&parameter)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("reading {parameter} in {}", stage.name))?
        .map(|p| p.value);
    if holds.as_deref() != Some(ami.as_str()) {
        refuse!(
            "{} does not hold {ami}: its {parameter} is {}, so no refresh to {ami} runs there; halt the stage that holds it (`amictl status` shows each stage's golden AMI), or `amictl pause --stage {}` to stop everything there",
            stage.name,
            holds.as_deref().unwrap_or("not set"),
            stage.name
        );
    }
    let hub = Hub::of(&scope);
    let path = control::halt_path(&ami, &stage.name);
    let earlier: Option<Halt> = control::read(&hub.records, &path)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(earlier) = &earlier
        && (earlier.cancel_running || !args.cancel_running)
    {
        let mut told = Told::default();
        told.say(format!(
            "{} is already halted for {ami} {}",
            stage.name,
            earlier.describe()
        ));
        return told.print(&args.output);
    }
    let halt = Halt {
        decision: hub.decision(&why).await?,
        cancel_running: args.cancel_running,
    };
    control::write(&hub.records, &path, &halt)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {path} in the hub {}", scope.hub().label()))?;
    let mut told = Told::default();
    told.change("halted", &path, &halt);
    told.say(format!(
        "halted {} for {parameter}@{ami} ({path} in the hub): by {}, {}",
        stage.name, halt.decision.by, halt.decision.reason
    ));
    told.say(format!(
        "no refresh to {ami} starts in {} from within AMIFLOW_CONTROL_SECONDS (default 10 s); {}; the next stage is not promoted. `amictl resume --stage {} --reason ...` lets it go on",
        stage.name,
        if halt.cancel_running {
            "running refreshes are cancelled when their requests next poll them (AMIFLOW_POLL_SECONDS)"
        } else {
            "running refreshes finish (`--cancel-running` cancels them)"
        },
        stage.name
    ));
    told.print(&args.output)
}
