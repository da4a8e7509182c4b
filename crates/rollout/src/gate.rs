//! Promotion gates: whether a stage's golden parameter may take an AMI. One judgement, used by
//! the share-worker (which promotes), `amictl plan` and `amictl status` (which show it).
//!
//! The first stage is promoted when the AMI is built. Stage N+1 is promoted to AMI X once stage N
//! has **passed** X, judged from AWS alone:
//! - stage N's golden parameter holds X;
//! - every group of stage N of the family is current on X (no instance left on another AMI),
//!   skipped (and reported), or its refresh mark for X has ended: none is pending;
//! - its failed and rolled-back marks for X are within stage N's `max_failed_groups` (plus the
//!   failures an operator accepted with `amictl resume --stage`);
//! - stage N's `bake_hours` have passed since it finished: the last launch of an instance running
//!   X there (or, if it launched none, stage N's promotion);
//! - stage N+1 is approved where it `requires_approval`, and not paused.
//!
//! The judgement is level-triggered and pure ([`judge`]); [`gates_of_stage`] reads its inputs
//! (the stage before's groups through the policy's role, the hub's records) and judges. A closed
//! gate says why in a [`GateState`]; an event claiming otherwise changes nothing.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use runtime::StepError;

use crate::aws::{AwsGroups, Groups, Parameters, Records, SsmParameters};
use crate::control::{self, Approval, Halt, Pause, Pauses, Promotion, Recall, Resume};
use crate::discovery::{AmiSource, Verdict};
use crate::mark::MarkState;
use crate::plan::{Judged, judge_all};
use crate::policy::{Policy, Stage};

/// A stage's gate for one AMI.
#[derive(Debug, Clone, PartialEq)]
pub enum GateState {
    /// The gate opened for the AMI: the record says when and why.
    Promoted(Promotion),
    /// Open now: the stage may be promoted, for `reason`.
    Open { reason: String },
    /// The stage before does not hold the AMI (`holds` what it holds instead, if anything).
    NotReached {
        stage: String,
        holds: Option<String>,
    },
    /// `pending` groups of `stage` (the stage before) are neither refreshed nor reported yet.
    WaitingFor { stage: String, pending: usize },
    /// `stage` (the stage before) failed more groups than it tolerates: it halted for the AMI.
    Halted {
        stage: String,
        failed: usize,
        tolerance: usize,
    },
    /// An operator halted `stage` (the stage before) for the AMI (`amictl halt`).
    HaltedBy { stage: String, halt: Halt },
    /// The stage before passed; it bakes until then.
    Baking { until: DateTime<Utc> },
    /// The stage `requires_approval` and nobody approved the AMI for it yet.
    NeedsApproval,
    /// The gate would open, but the stage (or every stage) is paused.
    Paused(Pause),
    /// An operator recalled the AMI: no stage is ever promoted to it again.
    Recalled(Recall),
}

impl GateState {
    pub fn is_open(&self) -> bool {
        matches!(self, GateState::Open { .. })
    }

    /// A short name for logs and JSON (`promoted`, `open`, `waiting`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            GateState::Promoted(_) => "promoted",
            GateState::Open { .. } => "open",
            GateState::NotReached { .. } => "not-reached",
            GateState::WaitingFor { .. } => "waiting",
            GateState::Halted { .. } | GateState::HaltedBy { .. } => "halted",
            GateState::Baking { .. } => "baking",
            GateState::NeedsApproval => "needs-approval",
            GateState::Paused(_) => "paused",
            GateState::Recalled(_) => "recalled",
        }
    }
}

impl fmt::Display for GateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GateState::Promoted(p) => write!(f, "promoted {} ({})", p.at.to_rfc3339(), p.reason),
            GateState::Open { reason } => write!(f, "open: {reason}"),
            GateState::NotReached { stage, holds } => match holds {
                Some(other) => write!(f, "waiting for {stage} to be promoted (it holds {other})"),
                None => write!(f, "waiting for {stage} to be promoted (it holds no AMI)"),
            },
            GateState::WaitingFor { stage, pending } => {
                write!(
                    f,
                    "waiting for {stage}: {pending} groups not refreshed or reported yet"
                )
            }
            GateState::Halted {
                stage,
                failed,
                tolerance,
            } => write!(
                f,
                "{stage} halted: {failed} groups failed or rolled back, it tolerates {tolerance}; fix the cause, then `amictl resume --stage {stage}`"
            ),
            GateState::HaltedBy { stage, halt } => write!(
                f,
                "{stage} halted by {} at {}: {}; `amictl resume --stage {stage}` when it may go on",
                halt.decision.by,
                halt.decision.at.to_rfc3339(),
                halt.decision.reason
            ),
            GateState::Baking { until } => write!(f, "baking until {}", until.to_rfc3339()),
            GateState::NeedsApproval => write!(f, "waiting for approval (`amictl approve`)"),
            GateState::Paused(p) => write!(
                f,
                "paused by {} at {}: {}",
                p.by,
                p.at.to_rfc3339(),
                p.reason
            ),
            GateState::Recalled(r) => write!(f, "closed for good: {}", r.refusal()),
        }
    }
}

/// The stage before, as read for one AMI of one family.
#[derive(Debug, Clone, Copy)]
pub struct Previous<'a> {
    pub stage: &'a Stage,
    /// Its golden parameter's value.
    pub golden: Option<&'a str>,
    /// Every group of its account, as the plan-worker judges them.
    pub judged: &'a [Judged],
    /// Its promotion to the AMI.
    pub promotion: Option<&'a Promotion>,
    /// An operator's resume of it for the AMI.
    pub resume: Option<&'a Resume>,
    /// An operator's halt of it for the AMI.
    pub halt: Option<&'a Halt>,
}

/// Everything a gate is judged from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub ami: &'a str,
    /// The family's golden parameter.
    pub parameter: &'a str,
    /// The stage whose gate it is.
    pub stage: &'a Stage,
    /// `None` for the first stage.
    pub previous: Option<Previous<'a>>,
    /// The stage's promotion to the AMI, if it was promoted.
    pub promotion: Option<&'a Promotion>,
    pub approval: Option<&'a Approval>,
    pub pauses: &'a Pauses,
    pub now: DateTime<Utc>,
}

/// How a stage stands with an AMI: its groups of the family counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// The stage's groups of the family.
    pub groups: usize,
    /// Current on the AMI, every instance on it.
    pub done: usize,
    /// Skipped, or ended without failing (cancelled, skipped) and reported.
    pub reported: usize,
    /// Failed or rolled back.
    pub failed: usize,
    /// Neither: stale with no ended mark for the AMI, or refreshing.
    pub pending: usize,
    /// The last launch of an instance running the AMI.
    pub finished_at: Option<DateTime<Utc>>,
}

/// Count how the groups of `judged` judged against `parameter` stand with `ami`.
pub fn tally(judged: &[Judged], parameter: &str, ami: &str) -> Tally {
    let mut t = Tally::default();
    for j in judged
        .iter()
        .filter(|j| j.parameter.as_deref() == Some(parameter))
    {
        t.groups += 1;
        if j.verdict == Verdict::Current
            && j.lagging_instances == 0
            && j.group.ami.as_deref() == Some(ami)
        {
            t.done += 1;
            t.finished_at = t.finished_at.max(j.last_launch);
            continue;
        }
        // Skipped by tag, or on a launch configuration: the refresh-worker reports it skipped
        // every window (a launch configuration cannot be updated), so it holds nothing up.
        if matches!(j.verdict, Verdict::Skipped(_))
            || matches!(j.group.source, AmiSource::LaunchConfiguration(_))
        {
            t.reported += 1;
            continue;
        }
        match j.mark.as_ref().filter(|m| m.ami == ami).map(|m| m.state) {
            Some(MarkState::Failed | MarkState::RolledBack) => t.failed += 1,
            Some(MarkState::Succeeded | MarkState::Cancelled | MarkState::Skipped) => {
                t.reported += 1
            }
            Some(MarkState::InProgress) | None => t.pending += 1,
        }
    }
    t
}

/// The failed groups `stage` tolerates among `groups`, plus those an operator accepted.
pub fn tolerance(stage: &Stage, groups: usize, resume: Option<&Resume>) -> usize {
    stage.max_failed_groups.allowed(groups) + resume.map_or(0, |r| r.accepted_failures)
}

/// Judge a stage's gate for an AMI.
pub fn judge(inputs: &Inputs<'_>) -> GateState {
    if let Some(p) = inputs.promotion {
        return GateState::Promoted(p.clone());
    }
    let Some(prev) = inputs.previous else {
        // The first stage is promoted when the AMI is built (the policy refuses an approval there).
        return match inputs.pauses.of(&inputs.stage.name) {
            Some(p) => GateState::Paused(p.clone()),
            None => GateState::Open {
                reason: "the first stage is promoted when the AMI is built".into(),
            },
        };
    };
    if prev.golden != Some(inputs.ami) {
        return GateState::NotReached {
            stage: prev.stage.name.clone(),
            holds: prev.golden.map(str::to_owned),
        };
    }
    if let Some(halt) = prev.halt {
        return GateState::HaltedBy {
            stage: prev.stage.name.clone(),
            halt: halt.clone(),
        };
    }
    let t = tally(prev.judged, inputs.parameter, inputs.ami);
    let tolerated = tolerance(prev.stage, t.groups, prev.resume);
    if t.failed > tolerated {
        return GateState::Halted {
            stage: prev.stage.name.clone(),
            failed: t.failed,
            tolerance: tolerated,
        };
    }
    if t.pending > 0 {
        return GateState::WaitingFor {
            stage: prev.stage.name.clone(),
            pending: t.pending,
        };
    }
    let finished = t.finished_at.or(prev.promotion.map(|p| p.at));
    let bake = chrono::Duration::milliseconds((prev.stage.bake_hours * 3_600_000.0) as i64);
    if let Some(until) = finished.map(|f| f + bake)
        && inputs.now < until
    {
        return GateState::Baking { until };
    }
    if inputs.stage.requires_approval && inputs.approval.is_none() {
        return GateState::NeedsApproval;
    }
    if let Some(p) = inputs.pauses.of(&inputs.stage.name) {
        return GateState::Paused(p.clone());
    }
    let mut reason = format!(
        "{} passed {}: {} groups ({} refreshed, {} reported, {} failed of {} tolerated)",
        prev.stage.name, inputs.ami, t.groups, t.done, t.reported, t.failed, tolerated
    );
    if prev.stage.bake_hours > 0.0 {
        reason.push_str(&format!(", baked {} h", prev.stage.bake_hours));
    }
    if let Some(a) = inputs.approval {
        reason.push_str(&format!(", approved by {} ({})", a.by, a.reason));
    }
    GateState::Open { reason }
}

/// A stage's gate for the AMI it would be promoted to next, in one family.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    pub stage: String,
    pub parameter: String,
    /// The candidate: the AMI the stage before holds (the first stage's own), if any.
    pub ami: Option<String>,
    /// What the stage's own golden parameter holds.
    pub holds: Option<String>,
    /// The stage holds the candidate already, or moved past it (its parameter held it before):
    /// there is nothing to promote.
    pub reached: bool,
    pub state: GateState,
}

/// Each stage account's groups and parameters, reachable from where the gate is judged.
pub trait Stages: Send + Sync {
    type Groups: Groups;
    type Params: Parameters;
    fn of(&self, account: &str) -> Result<(&Self::Groups, &Self::Params), StepError>;
}

/// [`Stages`] through the policy's role in each stage account (the base credentials for the
/// worker's own), built once.
pub struct AccountStages(HashMap<String, (AwsGroups, SsmParameters)>);

impl AccountStages {
    pub async fn connect(clients: &runtime::Clients, policy: &Policy) -> anyhow::Result<Self> {
        let mut reached = HashMap::new();
        for stage in &policy.stages {
            let config = clients.for_account(&stage.account).await?;
            reached.insert(
                stage.account.clone(),
                (
                    AwsGroups::new(&config),
                    SsmParameters(aws_sdk_ssm::Client::new(&config)),
                ),
            );
        }
        Ok(AccountStages(reached))
    }
}

impl Stages for AccountStages {
    type Groups = AwsGroups;
    type Params = SsmParameters;
    fn of(&self, account: &str) -> Result<(&AwsGroups, &SsmParameters), StepError> {
        self.0.get(account).map(|(g, p)| (g, p)).ok_or_else(|| {
            StepError::Permanent(format!(
                "account {account} is not a stage of the rollout policy"
            ))
        })
    }
}

/// The gate of `stage` in every family: the candidate AMI (the stage before's golden AMI) and
/// its state. One read of the stage before's groups for all families, five record reads per
/// family.
pub async fn gates_of_stage(
    stages: &impl Stages,
    records: &impl Records,
    pauses: &Pauses,
    policy: &Policy,
    stage: &Stage,
    now: DateTime<Utc>,
) -> Result<Vec<Gate>, StepError> {
    let (_, own) = stages.of(&stage.account)?;
    let previous = policy.stage_before(&stage.name);
    let judged = match previous {
        Some(prev) => {
            let (groups, params) = stages.of(&prev.account)?;
            Some((prev, judge_all(groups, params, policy, prev).await?, params))
        }
        None => None,
    };
    let mut gates = Vec::new();
    for family in &policy.families {
        let parameter = family.parameter_name.as_str();
        let holds = own.get(parameter).await?.map(|p| p.value);
        let history = match &holds {
            Some(_) => own.history(parameter).await?,
            None => Vec::new(),
        };
        let (ami, golden) = match &judged {
            Some((_, _, params)) => {
                let golden = params.get(parameter).await?.map(|p| p.value);
                (golden.clone(), golden)
            }
            None => (holds.clone(), None),
        };
        let Some(ami) = ami else {
            gates.push(Gate {
                stage: stage.name.clone(),
                parameter: parameter.to_owned(),
                ami: None,
                holds,
                reached: true,
                state: GateState::NotReached {
                    stage: previous.map_or_else(|| stage.name.clone(), |p| p.name.clone()),
                    holds: None,
                },
            });
            continue;
        };
        let state = judge_ami(
            records,
            pauses,
            stage,
            parameter,
            &ami,
            judged
                .as_ref()
                .map(|(prev, judged, _)| (*prev, golden.as_deref(), judged.as_slice())),
            now,
        )
        .await?;
        gates.push(Gate {
            stage: stage.name.clone(),
            parameter: parameter.to_owned(),
            reached: holds.as_ref() == Some(&ami) || history.contains(&ami),
            ami: Some(ami),
            holds,
            state,
        });
    }
    Ok(gates)
}

/// Read the hub's records for `ami` and judge `stage`'s gate, given the stage before as read.
pub async fn judge_ami(
    records: &impl Records,
    pauses: &Pauses,
    stage: &Stage,
    parameter: &str,
    ami: &str,
    previous: Option<(&Stage, Option<&str>, &[Judged])>,
    now: DateTime<Utc>,
) -> Result<GateState, StepError> {
    // A recall closes the gate before anything else: even a stage promoted to the AMI before it
    // was recalled is never sent it again.
    if let Some(recall) = control::read::<Recall>(records, &control::recall_path(ami)).await? {
        return Ok(GateState::Recalled(recall));
    }
    let promotion: Option<Promotion> =
        control::read(records, &control::promotion_path(ami, &stage.name)).await?;
    if let Some(p) = promotion {
        return Ok(GateState::Promoted(p));
    }
    let approval: Option<Approval> =
        control::read(records, &control::approval_path(ami, &stage.name)).await?;
    let (prev_promotion, resume, halt) = match previous {
        Some((prev, _, _)) => (
            control::read::<Promotion>(records, &control::promotion_path(ami, &prev.name)).await?,
            control::read::<Resume>(records, &control::resume_path(ami, &prev.name)).await?,
            control::read::<Halt>(records, &control::halt_path(ami, &prev.name)).await?,
        ),
        None => (None, None, None),
    };
    Ok(judge(&Inputs {
        ami,
        parameter,
        stage,
        previous: previous.map(|(prev, golden, judged)| Previous {
            stage: prev,
            golden,
            judged,
            promotion: prev_promotion.as_ref(),
            resume: resume.as_ref(),
            halt: halt.as_ref(),
        }),
        promotion: None,
        approval: approval.as_ref(),
        pauses,
        now,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Decision;
    use crate::fake::FakeAws;
    use crate::mark::{Mark, deadline_text};

    const PARAMETER: &str = "/golden/al2023/ami-id";
    const OLD: &str = "ami-0000000000000000a";
    const NEW: &str = "ami-0000000000000000b";
    const QA: &str = "111111111111";
    const UAT: &str = "222222222222";
    const PROD: &str = "333333333333";

    fn policy(extra_qa: &str, extra_prod: &str) -> Policy {
        let text = include_str!("../../../local/amiflow.toml")
            .replacen(
                "max_concurrent_refreshes = 3",
                &format!("max_concurrent_refreshes = 3\n{extra_qa}"),
                1,
            )
            .replacen(
                "max_concurrent_refreshes = 2",
                &format!("max_concurrent_refreshes = 2\n{extra_prod}"),
                1,
            );
        Policy::parse(&text).unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    struct World(HashMap<String, FakeAws>, FakeAws);

    impl Stages for World {
        type Groups = FakeAws;
        type Params = FakeAws;
        fn of(&self, account: &str) -> Result<(&FakeAws, &FakeAws), StepError> {
            let a = &self.0[account];
            Ok((a, a))
        }
    }

    fn set(aws: &FakeAws, value: &str) {
        aws.golden(PARAMETER, value, &[OLD]);
    }

    /// qa holds NEW; `n` groups there, each on one template version per AMI.
    fn world(n: usize) -> World {
        let accounts: HashMap<String, FakeAws> = [QA, UAT, PROD]
            .into_iter()
            .map(|a| (a.to_owned(), FakeAws::default()))
            .collect();
        let qa = &accounts[QA];
        set(qa, NEW);
        for i in 0..n {
            let (name, lt) = (format!("web-{i}"), format!("lt-{i}"));
            qa.template(&lt, &[OLD, NEW], 1);
            qa.group(&name, &lt, "1", OLD, 2);
        }
        set(&accounts[UAT], OLD);
        set(&accounts[PROD], OLD);
        World(accounts, FakeAws::default())
    }

    fn refreshed(w: &World, group: usize, launched: &str) {
        let qa = &w.0[QA];
        let name = format!("web-{group}");
        let mut groups = qa.groups.lock().unwrap();
        let g = groups.get_mut(&name).unwrap();
        if let crate::aws::LaunchSource::Template { version, .. } = &mut g.source {
            *version = "2".into();
        }
        for id in &g.instance_ids {
            qa.instance_amis
                .lock()
                .unwrap()
                .insert(id.clone(), NEW.into());
            qa.instance_launched
                .lock()
                .unwrap()
                .insert(id.clone(), at(launched));
        }
    }

    fn marked(w: &World, group: usize, state: MarkState) {
        let mark = Mark {
            ami: NEW.into(),
            state,
            refresh_id: "ir-1".into(),
            deadline: deadline_text(None),
            parameter: PARAMETER.into(),
        };
        let qa = &w.0[QA];
        let mut groups = qa.groups.lock().unwrap();
        let g = groups.get_mut(&format!("web-{group}")).unwrap();
        for (k, v) in mark.tags(None) {
            g.tags.insert(k.to_owned(), v);
        }
    }

    fn decision(reason: &str) -> Decision {
        Decision {
            by: "arn:aws:sts::111111111111:assumed-role/ops/alice".into(),
            at: at("2026-12-05T02:00:00Z"),
            reason: reason.into(),
        }
    }

    async fn uat_gate(w: &World, policy: &Policy, now: &str) -> Gate {
        let pauses = Pauses::read(&w.1).await.unwrap();
        let uat = policy.stage_named("uat").unwrap();
        let gates = gates_of_stage(w, &w.1, &pauses, policy, uat, at(now))
            .await
            .unwrap();
        gates
            .into_iter()
            .find(|g| g.parameter == PARAMETER)
            .unwrap()
    }

    #[tokio::test]
    async fn uat_waits_for_every_qa_group_then_bakes_then_opens() {
        let policy = policy("bake_hours = 1.0", "");
        let w = world(3);
        let gate = uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await;
        assert_eq!(gate.ami.as_deref(), Some(NEW));
        assert_eq!(gate.holds.as_deref(), Some(OLD));
        assert!(!gate.reached);
        assert_eq!(
            gate.state,
            GateState::WaitingFor {
                stage: "qa".into(),
                pending: 3
            }
        );
        refreshed(&w, 0, "2026-12-05T09:00:00Z");
        marked(&w, 1, MarkState::InProgress);
        refreshed(&w, 2, "2026-12-05T09:30:00Z");
        let gate = uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await;
        assert_eq!(
            gate.state,
            GateState::WaitingFor {
                stage: "qa".into(),
                pending: 1
            },
            "a refresh in progress is pending"
        );
        refreshed(&w, 1, "2026-12-05T09:45:00Z");
        marked(&w, 1, MarkState::Succeeded);
        // The last launch was 09:45: baking for an hour from then.
        let gate = uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await;
        assert_eq!(
            gate.state,
            GateState::Baking {
                until: at("2026-12-05T10:45:00Z")
            }
        );
        let gate = uat_gate(&w, &policy, "2026-12-05T10:45:00Z").await;
        let GateState::Open { reason } = &gate.state else {
            panic!("baked: {:?}", gate.state);
        };
        assert_eq!(
            reason,
            "qa passed ami-0000000000000000b: 3 groups (3 refreshed, 0 reported, 0 failed of 0 tolerated), baked 1 h"
        );
    }

    #[tokio::test]
    async fn a_recalled_ami_closes_the_gate_even_after_the_stage_was_promoted() {
        let policy = policy("", "");
        let w = world(1);
        refreshed(&w, 0, "2026-12-05T09:00:00Z");
        let promotion = Promotion {
            ami: NEW.into(),
            stage: "uat".into(),
            parameter: PARAMETER.into(),
            at: at("2026-12-05T09:30:00Z"),
            reason: "qa passed".into(),
        };
        control::write(&w.1, &control::promotion_path(NEW, "uat"), &promotion)
            .await
            .unwrap();
        assert!(matches!(
            uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await.state,
            GateState::Promoted(_)
        ));
        let recall = Recall {
            decision: decision("kernel regression"),
            ami: NEW.into(),
            parameter: PARAMETER.into(),
            to: None,
            now: false,
        };
        control::write(&w.1, &control::recall_path(NEW), &recall)
            .await
            .unwrap();
        let gate = uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await;
        assert_eq!(gate.state, GateState::Recalled(recall));
        assert_eq!(gate.state.kind(), "recalled");
        assert!(!gate.state.is_open());
    }

    #[tokio::test]
    async fn failures_past_the_tolerance_halt_and_a_resume_accepts_them() {
        let policy = policy("max_failed_groups = \"50%\"", "");
        let w = world(4);
        refreshed(&w, 0, "2026-12-05T09:00:00Z");
        refreshed(&w, 1, "2026-12-05T09:00:00Z");
        marked(&w, 2, MarkState::RolledBack);
        let gate = uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await;
        // 1 failed of 2 tolerated (50% of 4): only the pending group holds the gate.
        assert_eq!(
            gate.state,
            GateState::WaitingFor {
                stage: "qa".into(),
                pending: 1
            }
        );
        marked(&w, 3, MarkState::Failed);
        let gate = uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await;
        assert!(gate.state.is_open(), "{:?}", gate.state);

        let strict = self::policy("max_failed_groups = 1", "");
        let gate = uat_gate(&w, &strict, "2026-12-05T10:00:00Z").await;
        assert_eq!(
            gate.state,
            GateState::Halted {
                stage: "qa".into(),
                failed: 2,
                tolerance: 1
            }
        );
        assert!(
            gate.state
                .to_string()
                .contains("`amictl resume --stage qa`"),
            "{}",
            gate.state
        );
        control::write(
            &w.1,
            &control::resume_path(NEW, "qa"),
            &Resume {
                decision: decision("health check fixed"),
                accepted_failures: 1,
            },
        )
        .await
        .unwrap();
        let gate = uat_gate(&w, &strict, "2026-12-05T10:00:00Z").await;
        assert!(gate.state.is_open(), "{:?}", gate.state);
    }

    #[tokio::test]
    async fn an_operator_halt_of_the_stage_before_closes_the_gate_until_it_is_lifted() {
        let policy = policy("", "");
        let w = world(2);
        refreshed(&w, 0, "2026-12-05T09:00:00Z");
        refreshed(&w, 1, "2026-12-05T09:00:00Z");
        assert!(
            uat_gate(&w, &policy, "2026-12-05T10:00:00Z")
                .await
                .state
                .is_open()
        );
        let halt = Halt {
            decision: decision("customer reports 502s"),
            cancel_running: true,
        };
        control::write(&w.1, &control::halt_path(NEW, "qa"), &halt)
            .await
            .unwrap();
        let gate = uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await;
        assert_eq!(
            gate.state,
            GateState::HaltedBy {
                stage: "qa".into(),
                halt
            }
        );
        assert_eq!(gate.state.kind(), "halted");
        let said = gate.state.to_string();
        assert!(
            said.contains("customer reports 502s") && said.contains("`amictl resume --stage qa`"),
            "{said}"
        );
        // A halt of another AMI, or of another stage, does not close this gate.
        w.1.records
            .lock()
            .unwrap()
            .remove(&control::halt_path(NEW, "qa"));
        control::write(
            &w.1,
            &control::halt_path("ami-0000000000000000f", "qa"),
            &Halt {
                decision: decision("other"),
                cancel_running: false,
            },
        )
        .await
        .unwrap();
        assert!(
            uat_gate(&w, &policy, "2026-12-05T10:00:00Z")
                .await
                .state
                .is_open()
        );
    }

    #[tokio::test]
    async fn approval_pause_and_promotion_records_decide_in_that_order() {
        let policy = policy("", "");
        let w = world(1);
        refreshed(&w, 0, "2026-12-05T09:00:00Z");
        let mut approving = policy.clone();
        approving.stages[1].requires_approval = true;
        let gate = uat_gate(&w, &approving, "2026-12-05T10:00:00Z").await;
        assert_eq!(gate.state, GateState::NeedsApproval);
        control::write(
            &w.1,
            &control::approval_path(NEW, "uat"),
            &decision("change 4711"),
        )
        .await
        .unwrap();
        let gate = uat_gate(&w, &approving, "2026-12-05T10:00:00Z").await;
        let GateState::Open { reason } = &gate.state else {
            panic!("approved: {:?}", gate.state);
        };
        assert!(
            reason.ends_with(
                "approved by arn:aws:sts::111111111111:assumed-role/ops/alice (change 4711)"
            ),
            "{reason}"
        );

        control::write(&w.1, &control::pause_path(None), &decision("incident 42"))
            .await
            .unwrap();
        let gate = uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await;
        assert_eq!(gate.state, GateState::Paused(decision("incident 42")));

        let promotion = Promotion {
            ami: NEW.into(),
            stage: "uat".into(),
            parameter: PARAMETER.into(),
            at: at("2026-12-05T10:00:00Z"),
            reason: "qa passed".into(),
        };
        control::write(&w.1, &control::promotion_path(NEW, "uat"), &promotion)
            .await
            .unwrap();
        let gate = uat_gate(&w, &policy, "2026-12-05T10:00:00Z").await;
        assert_eq!(gate.state, GateState::Promoted(promotion));
    }

    #[tokio::test]
    async fn a_stage_before_that_holds_another_ami_keeps_the_gate_closed() {
        let policy = policy("", "");
        let w = world(1);
        // prod's candidate is what uat holds: OLD, which prod holds already.
        let pauses = Pauses::default();
        let prod = policy.stage_named("prod").unwrap();
        let gates = gates_of_stage(&w, &w.1, &pauses, &policy, prod, at("2026-12-05T10:00:00Z"))
            .await
            .unwrap();
        let gate = gates.iter().find(|g| g.parameter == PARAMETER).unwrap();
        assert_eq!(gate.ami.as_deref(), Some(OLD));
        assert!(
            gate.reached,
            "prod holds what uat holds: nothing to promote"
        );
        // Judged for NEW directly (a forged or replayed claim): uat does not hold it.
        let uat = policy.stage_named("uat").unwrap();
        let (groups, params) = w.of(UAT).unwrap();
        let judged = judge_all(groups, params, &policy, uat).await.unwrap();
        let state = judge_ami(
            &w.1,
            &pauses,
            prod,
            PARAMETER,
            NEW,
            Some((uat, Some(OLD), &judged)),
            at("2026-12-05T10:00:00Z"),
        )
        .await
        .unwrap();
        assert_eq!(
            state,
            GateState::NotReached {
                stage: "uat".into(),
                holds: Some(OLD.into())
            }
        );
    }

    #[tokio::test]
    async fn with_nothing_launched_the_bake_counts_from_the_stage_promotion() {
        let policy = policy("bake_hours = 2.0", "");
        let w = world(0);
        control::write(
            &w.1,
            &control::promotion_path(NEW, "qa"),
            &Promotion {
                ami: NEW.into(),
                stage: "qa".into(),
                parameter: PARAMETER.into(),
                at: at("2026-12-05T08:00:00Z"),
                reason: "built".into(),
            },
        )
        .await
        .unwrap();
        let gate = uat_gate(&w, &policy, "2026-12-05T09:00:00Z").await;
        assert_eq!(
            gate.state,
            GateState::Baking {
                until: at("2026-12-05T10:00:00Z")
            }
        );
    }
}
