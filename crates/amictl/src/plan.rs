//! `amictl plan`: before a window, what it would do to every group of each stage, and each
//! stage's gate. Nothing here judges anything itself: groups are judged by the plan-worker's own
//! `rollout::plan::judge_all` and `group_plan` (refresh or not, with which strategy), what the
//! refresh-worker then does with a request by its own checks (`rollout::refresh::foresee`: a
//! launch configuration or a stack it cannot update is skipped, whether AWS can roll back), and
//! each gate by `rollout::gate`. `--ami` previews an AMI a stage does not hold yet, as if its
//! golden parameter held it (a read-only overlay of the parameter, nothing written).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use chrono::Utc;
use clap::Args;
use events::{Outcome, Strategy};
use rollout::aws::{AwsGroups, CfnStacks, MarkParameters, ParamValue, Parameters, SsmParameters};
use rollout::control::{Decision, Pause, Recalls};
use rollout::discovery::{Resolver, Verdict};
use rollout::gate::{self, GateState};
use rollout::plan::{GroupPlan, Judged, group_plan, judge_all_with};
use rollout::policy::{Policy, Stage};
use rollout::refresh::{Foreseen, foresee};
use runtime::StepError;
use serde::Serialize;

use crate::control::{Hub, StageRun};
use crate::exit::Attention;
use crate::scope::{Scope, ScopeArgs};

/// What each stage's next window would do, group by group, and whether its gate is open.
#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 the plan was made, 3 a stage is halted (the plan says which and why), 2 a wrong argument, 1 an error.\n\nExamples:\n  amictl plan                                   # every stage, its own golden AMI\n  amictl plan --stage prod --ami ami-0123456789abcdef0\n  amictl plan --json | jq '.stages[].groups[] | select(.action == \"skip\")'"
)]
pub struct PlanArgs {
    /// Only this stage (a stage name of the policy).
    #[arg(long, value_name = "STAGE", add = crate::completion::stages())]
    stage: Option<String>,
    /// Preview this AMI (or rollout id `<parameter>@<ami>`) instead of each stage's golden AMI.
    #[arg(long, value_name = "AMI-ID|ROLLOUT-ID")]
    ami: Option<String>,
    #[command(flatten)]
    output: crate::output::OutputArgs,
    /// List every group, current and untouched ones too.
    #[arg(long)]
    all: bool,
}

/// What the window does to one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// An instance refresh starts.
    Refresh,
    /// Left as it is, for `reason` (by the plan-worker, or by the refresh-worker if `requested`).
    Skip,
    /// The refresh-worker reports it failed without starting anything (`reason`).
    Fail,
    /// The request waits (a stack operation in progress).
    Wait,
    /// An amiflow refresh to the AMI is running already.
    Refreshing,
    /// Already on the AMI.
    Current,
    /// Of no golden family.
    Untouched,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupPreview {
    pub group: String,
    pub parameter: Option<String>,
    /// The AMI the window moves it to.
    pub ami: Option<String>,
    /// The AMI its configuration launches now.
    pub from: Option<String>,
    pub action: Action,
    /// The plan-worker asks for a refresh (an AsgRefreshFinished follows, whatever it says).
    pub requested: bool,
    pub strategy: Option<Strategy>,
    pub instances: usize,
    /// Whether AWS can roll the refresh back (a pinned version; not `$Latest`, `$Default`,
    /// `resolve:ssm:` or a stack).
    pub auto_rollback: Option<bool>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatePreview {
    pub parameter: String,
    /// The AMI the gate is for (the stage before's golden AMI, or `--ami`).
    pub ami: Option<String>,
    /// What the stage's golden parameter holds.
    pub holds: Option<String>,
    /// `promoted`, `open`, `not-reached`, `waiting`, `halted`, `baking`, `needs-approval`,
    /// `paused`.
    pub state: &'static str,
    pub detail: String,
}

/// How a stage stands with the AMI its golden parameter holds (one per family).
#[derive(Debug, Clone, Serialize)]
pub struct RunPreview {
    pub parameter: String,
    pub ami: String,
    /// The stage's groups of the family.
    pub groups: usize,
    pub refreshed: usize,
    pub reported: usize,
    pub failed: usize,
    pub pending: usize,
    /// Failed groups the stage tolerates (its max_failed_groups plus those accepted on resume).
    pub tolerated: usize,
    /// More failed than tolerated, or halted by an operator: the stage starts no refresh for
    /// the AMI.
    pub halted: bool,
    /// The operator's halt (`amictl halt`), if any.
    pub halted_by: Option<rollout::control::Halt>,
    /// The operator's resume that accepted earlier failures.
    pub resumed: Option<Decision>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StagePreview {
    pub stage: String,
    pub account: String,
    /// The pause that stops the stage's window, if any.
    pub paused: Option<Pause>,
    /// Each family's AMI in the stage, its failures against its tolerance.
    pub runs: Vec<RunPreview>,
    pub gates: Vec<GatePreview>,
    pub groups: Vec<GroupPreview>,
}

#[derive(Debug, Serialize)]
pub struct Preview {
    pub stages: Vec<StagePreview>,
}

/// A stage's golden parameter as if it held `ami`: what its window would see once promoted.
#[derive(Clone)]
struct AsIf {
    inner: SsmParameters,
    parameter: String,
    ami: String,
}

impl Parameters for AsIf {
    async fn get(&self, name: &str) -> Result<Option<ParamValue>, StepError> {
        let real = self.inner.get(name).await?;
        if name != self.parameter {
            return Ok(real);
        }
        Ok(Some(ParamValue {
            value: self.ami.clone(),
            version: real.as_ref().map_or(1, |p| p.version + 1),
            data_type: "aws:ec2:image".into(),
        }))
    }

    async fn put_image(&self, name: &str, _ami: &str) -> Result<i64, StepError> {
        Err(StepError::Permanent(format!(
            "amictl plan never writes ({name})"
        )))
    }

    async fn history(&self, name: &str) -> Result<Vec<String>, StepError> {
        let mut history = self.inner.history(name).await?;
        if name == self.parameter && history.last() != Some(&self.ami) {
            history.push(self.ami.clone());
        }
        Ok(history)
    }
}

/// Marks are read as they are; the overlay never writes one.
impl MarkParameters for AsIf {
    async fn mark_value(&self, group: &str) -> Result<Option<String>, StepError> {
        self.inner.mark_value(group).await
    }

    async fn put_mark_value(&self, group: &str, _value: &str) -> Result<(), StepError> {
        Err(StepError::Permanent(format!(
            "amictl plan never writes ({group}'s mark)"
        )))
    }

    async fn mark_values(&self) -> Result<Vec<String>, StepError> {
        self.inner.mark_values().await
    }
}

/// One stage's groups: judged as they are (for the gates), and as the window will see them.
pub struct Judgement {
    pub real: Vec<Judged>,
    pub window: Vec<GroupPreview>,
}

/// `candidate`: judge the window as if the golden parameter held that AMI (`--ami`, and
/// `amictl recall --dry-run` with the AMI a stage goes back to).
pub async fn judge_stage(
    config: aws_config::SdkConfig,
    policy: Arc<Policy>,
    stage: Stage,
    candidate: Option<(String, String)>,
    recalls: Recalls,
) -> Result<Judgement, StepError> {
    let groups = AwsGroups::new(&config);
    let params = SsmParameters(aws_sdk_ssm::Client::new(&config));
    let stacks = CfnStacks(aws_sdk_cloudformation::Client::new(&config));
    // One resolver: the as-if judgement below reads no template version twice.
    let mut resolver = Resolver::default();
    let real = judge_all_with(&mut resolver, &groups, &params, &policy, &stage).await?;
    let window = match candidate {
        Some((parameter, ami)) => {
            let as_if = AsIf {
                inner: params.clone(),
                parameter,
                ami,
            };
            let judged = judge_all_with(&mut resolver, &groups, &as_if, &policy, &stage).await?;
            previews(&judged, &as_if, &stacks, &stage, &recalls).await?
        }
        None => previews(&real, &params, &stacks, &stage, &recalls).await?,
    };
    Ok(Judgement { real, window })
}

/// What the window does to each judged group: the plan-worker's decision, then the
/// refresh-worker's for a requested one.
async fn previews(
    judged: &[Judged],
    params: &impl Parameters,
    stacks: &CfnStacks,
    stage: &Stage,
    recalls: &Recalls,
) -> Result<Vec<GroupPreview>, StepError> {
    let mut targets: HashMap<String, Option<String>> = HashMap::new();
    let mut out = Vec::new();
    for j in judged {
        let target = match &j.parameter {
            Some(p) => {
                if !targets.contains_key(p) {
                    targets.insert(p.clone(), params.get(p).await?.map(|v| v.value));
                }
                targets[p].clone()
            }
            None => None,
        };
        let mut preview = GroupPreview {
            group: j.group.group.name.clone(),
            parameter: j.parameter.clone(),
            ami: target.clone(),
            from: j.group.ami.clone(),
            action: Action::Untouched,
            requested: false,
            strategy: None,
            instances: j.group.group.instance_ids.len(),
            auto_rollback: None,
            reason: String::new(),
        };
        let plan = match &target {
            Some(t) => group_plan(j, t),
            None => GroupPlan::NotOurs,
        };
        // The plan-worker moves nothing to a recalled AMI (the parameter goes back first).
        if let (Some(recall), GroupPlan::Request(_)) =
            (target.as_deref().and_then(|t| recalls.of(t)), &plan)
        {
            preview.action = Action::Wait;
            preview.reason = format!(
                "the golden parameter holds a recalled AMI; it moves when the parameter goes back ({})",
                recall.refusal()
            );
            out.push(preview);
            continue;
        }
        match plan {
            GroupPlan::NotOurs => {
                if let Verdict::Untouched(why) = &j.verdict {
                    preview.reason = why.clone();
                }
            }
            GroupPlan::Skipped(why) => {
                preview.action = Action::Skip;
                preview.reason = why;
            }
            GroupPlan::Current => preview.action = Action::Current,
            GroupPlan::Refreshing { refresh_id } => {
                preview.action = Action::Refreshing;
                preview.reason = format!("instance refresh {refresh_id} is running");
            }
            GroupPlan::Request(strategy) => {
                preview.requested = true;
                preview.strategy = Some(strategy);
                let parameter = j.parameter.as_deref().unwrap_or_default();
                match foresee(stacks, stage, &j.group, strategy, parameter).await? {
                    Foreseen::Start { rollback } => {
                        preview.action = Action::Refresh;
                        preview.auto_rollback = Some(rollback);
                        preview.reason = match (&j.verdict, j.lagging_instances) {
                            (Verdict::Broken(why), _) => why.clone(),
                            (Verdict::Current, n) if n > 0 => {
                                format!("{n} instances still run an earlier AMI")
                            }
                            _ => match j.group.ami.as_deref().and_then(|a| recalls.of(a)) {
                                Some(_) => "moves back from a recalled AMI".into(),
                                None => "on an earlier golden AMI".into(),
                            },
                        };
                    }
                    Foreseen::Ends(Outcome::Skipped, why) => {
                        preview.action = Action::Skip;
                        preview.reason = why;
                    }
                    Foreseen::Ends(_, why) => {
                        preview.action = Action::Fail;
                        preview.reason = why;
                    }
                    Foreseen::Waits(why) => {
                        preview.action = Action::Wait;
                        preview.reason = why;
                    }
                }
            }
        }
        out.push(preview);
    }
    out.sort_by(|a, b| a.group.cmp(&b.group));
    Ok(out)
}

pub async fn run(args: PlanArgs, scope: &ScopeArgs) -> Result<()> {
    let scope = Scope::open(scope).await?;
    let only = match &args.stage {
        Some(name) => Some(crate::control::stage(&scope, name)?.name.clone()),
        None => None,
    };
    let candidate = match &args.ami {
        Some(text) => Some(crate::control::rollout_of(&scope, text).await?),
        None => None,
    };
    let preview = preview(&scope, only.as_deref(), candidate).await?;
    let verdict = halted_verdict(&preview);
    if args.output.json() {
        // Groups by what the window does to them, over the stages shown.
        let mut actions = std::collections::BTreeMap::new();
        for g in preview.stages.iter().flat_map(|s| &s.groups) {
            let action = serde_json::to_value(g.action)?;
            *actions
                .entry(action.as_str().unwrap_or_default().to_owned())
                .or_insert(0) += 1;
        }
        let summary =
            serde_json::json!({ "stages": preview.stages.len(), "groups_by_action": actions });
        println!(
            "{:#}",
            crate::output::document(summary, &verdict, &preview)?
        );
    } else {
        print!("{}", render(&preview, args.all));
    }
    verdict
}

/// Exit 3 when a stage shown halted, by its own run or by the gate of the stage after it.
pub fn halted_verdict(preview: &Preview) -> Result<()> {
    let mut halted: Vec<String> = Vec::new();
    for s in &preview.stages {
        for r in s.runs.iter().filter(|r| r.halted) {
            halted.push(format!("{} for {}", s.stage, r.ami));
        }
        for g in s.gates.iter().filter(|g| g.state == "halted") {
            halted.push(g.detail.clone());
        }
    }
    halted.dedup();
    if halted.is_empty() {
        return Ok(());
    }
    Err(Attention(format!(
        "halted: {}; fix the cause, then `amictl resume --stage STAGE --reason ...`",
        halted.join("; ")
    ))
    .into())
}

/// The preview of `only` (or every stage), for `candidate` (or each stage's golden AMI).
pub async fn preview(
    scope: &Scope,
    only: Option<&str>,
    candidate: Option<(String, String)>,
) -> Result<Preview> {
    let policy = Arc::new(scope.policy.clone());
    let wanted: Vec<&Stage> = policy
        .stages
        .iter()
        .filter(|s| only.is_none_or(|o| s.name == o))
        .collect();
    // The stages to read: the wanted ones and the stage before each (its groups open the gate).
    let mut read: Vec<&Stage> = Vec::new();
    for s in &wanted {
        if let Some(prev) = policy.stage_before(&s.name)
            && !read.iter().any(|r| r.name == prev.name)
        {
            read.push(prev);
        }
        if !read.iter().any(|r| r.name == s.name) {
            read.push(s);
        }
    }
    let hub = Hub::of(scope);
    let recalls = Recalls::read(&hub.records)
        .await
        .map_err(|e| anyhow!("{e}"))
        .context("reading the recalls in the hub")?;
    let mut tasks = tokio::task::JoinSet::new();
    for stage in read {
        let account = scope.account(&stage.account)?;
        let (config, policy, stage, candidate, recalls) = (
            account.config.clone(),
            policy.clone(),
            stage.clone(),
            candidate.clone(),
            recalls.clone(),
        );
        tasks.spawn(async move {
            let name = stage.name.clone();
            (
                name,
                judge_stage(config, policy, stage, candidate, recalls).await,
            )
        });
    }
    let mut judged: HashMap<String, Judgement> = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (name, result) = done.map_err(|e| anyhow!("a stage's reads stopped: {e}"))?;
        judged.insert(
            name.clone(),
            result
                .map_err(|e| anyhow!("{e}"))
                .map_err(|e| e.context(format!("reading the groups of {name}")))?,
        );
    }
    let pauses = hub.pauses().await?;
    let now = Utc::now();
    let mut stages = Vec::new();
    for stage in wanted {
        let own = &judged[&stage.name];
        let account = scope.account(&stage.account)?;
        let params = SsmParameters(aws_sdk_ssm::Client::new(&account.config));
        let prev = policy.stage_before(&stage.name);
        let prev_params = prev
            .map(|p| scope.account(&p.account))
            .transpose()?
            .map(|a| SsmParameters(aws_sdk_ssm::Client::new(&a.config)));
        let mut gates = Vec::new();
        let mut runs = Vec::new();
        for family in &policy.families {
            let parameter = &family.parameter_name;
            let holds = params
                .get(parameter)
                .await
                .map_err(|e| anyhow!("{e}"))?
                .map(|p| p.value);
            // The stage's own run: halted for the AMI it holds?
            if let Some(ami) = &holds {
                let run = crate::control::run_of(&hub, stage, &own.real, parameter, ami).await?;
                runs.push(run_preview(&run));
            }
            let prev_golden = match &prev_params {
                Some(p) => p
                    .get(parameter)
                    .await
                    .map_err(|e| anyhow!("{e}"))?
                    .map(|p| p.value),
                None => None,
            };
            let ami = match &candidate {
                Some((p, ami)) if p == parameter => Some(ami.clone()),
                Some(_) => continue,
                None if prev.is_some() => prev_golden.clone(),
                None => holds.clone(),
            };
            let state = match &ami {
                Some(ami) => gate::judge_ami(
                    &hub.records,
                    &pauses,
                    stage,
                    parameter,
                    ami,
                    prev.map(|p| (p, prev_golden.as_deref(), judged[&p.name].real.as_slice())),
                    now,
                )
                .await
                .map_err(|e| anyhow!("{e}"))?,
                None => GateState::NotReached {
                    stage: prev.map_or_else(|| stage.name.clone(), |p| p.name.clone()),
                    holds: None,
                },
            };
            gates.push(GatePreview {
                parameter: parameter.clone(),
                ami,
                holds,
                state: state.kind(),
                detail: state.to_string(),
            });
        }
        stages.push(StagePreview {
            stage: stage.name.clone(),
            account: stage.account.clone(),
            paused: pauses.of(&stage.name).cloned(),
            runs,
            gates,
            groups: own.window.clone(),
        });
    }
    Ok(Preview { stages })
}

fn run_preview(run: &StageRun) -> RunPreview {
    RunPreview {
        parameter: run.parameter.clone(),
        ami: run.ami.clone(),
        groups: run.tally.groups,
        refreshed: run.tally.done,
        reported: run.tally.reported,
        failed: run.tally.failed,
        pending: run.tally.pending,
        tolerated: run.tolerated,
        halted: run.halted(),
        halted_by: run.halt.clone(),
        resumed: run.resume.as_ref().map(|r| r.decision.clone()),
    }
}

fn render(preview: &Preview, all: bool) -> String {
    let mut out = String::new();
    for s in &preview.stages {
        out.push_str(&format!("{} ({})\n", s.stage, s.account));
        if let Some(p) = &s.paused {
            out.push_str(&format!(
                "  PAUSED by {} at {}: {}; the window changes nothing until `amictl resume`\n",
                p.by,
                p.at.to_rfc3339(),
                p.reason
            ));
        }
        for h in s.runs.iter().filter(|r| r.halted) {
            out.push_str(&format!(
                "  HALTED for {} ({}): {} groups failed or rolled back, {} tolerated; no refresh starts\n",
                h.ami, h.parameter, h.failed, h.tolerated
            ));
        }
        for g in &s.gates {
            out.push_str(&format!(
                "  gate {} -> {}: {}\n",
                g.parameter,
                g.ami.as_deref().unwrap_or("(no AMI)"),
                g.detail
            ));
        }
        let mut table = crate::tables::for_people(
            &[
                "group",
                "action",
                "strategy",
                "instances",
                "auto rollback",
                "from -> to",
                "why",
            ],
            &["group", "from -> to"],
            140,
        );
        for g in s
            .groups
            .iter()
            .filter(|g| all || !matches!(g.action, Action::Current | Action::Untouched))
        {
            table.add_row([
                g.group.clone(),
                serde_json::to_value(g.action)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                match g.strategy {
                    Some(Strategy::LaunchTemplate) => "launch template".into(),
                    Some(Strategy::Cloudformation) => "CloudFormation".into(),
                    None => "-".into(),
                },
                g.instances.to_string(),
                match g.auto_rollback {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
                format!(
                    "{} -> {}",
                    g.from.as_deref().unwrap_or("-"),
                    g.ami.as_deref().unwrap_or("-")
                ),
                g.reason.clone(),
            ]);
        }
        let count = |a: Action| s.groups.iter().filter(|g| g.action == a).count();
        out.push_str(&format!(
            "  window: {} refresh, {} skip, {} fail, {} refreshing, {} current\n",
            count(Action::Refresh),
            count(Action::Skip),
            count(Action::Fail),
            count(Action::Refreshing),
            count(Action::Current)
        ));
        if table.row_count() > 0 {
            out.push_str(&format!("{table}\n"));
        }
        out.push('\n');
    }
    out
}
