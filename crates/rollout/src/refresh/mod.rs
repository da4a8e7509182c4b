//! refresh-worker (spoke): move one group to the new AMI without fighting its owner, then report
//! the outcome. The message is never held while a refresh runs: the group carries a
//! [mark](crate::mark) naming the AMI, window and refresh id (in its tags, or for a stack-owned
//! group in an SSM parameter: `aws::Marks`), and the outcome arrives as an Auto Scaling
//! instance-refresh event (or is found by polling when a request is delivered again).
//!
//! [`request_refresh`] orchestrates one request: [`admission`] decides whether a slot is free,
//! [`start`] plans how the group moves (and whether it can roll back), and [`outcome`] polls,
//! closes or adopts the refresh.

mod admission;
mod default_version;
mod outcome;
mod start;

use std::time::Duration;

use chrono::{DateTime, Utc};
use events::{AsgRefreshFinished, AsgRefreshRequested, Detail, Outcome, Strategy};
use runtime::{StepError, StepOutput};

pub use admission::Admission;
use admission::{Admit, spread_defer};
pub use outcome::refresh_event;
use start::Decision;
pub use start::{StackAnswer, pins, stack_answer, unmovable};

use crate::aws::{Groups, MarkPlace, Marks, Parameters, Stacks};
use crate::discovery::{AmiSource, GroupAmi};
use crate::mark::{Mark, MarkState, Record, deadline_text};
use crate::policy::{HandMadeChanges, Stage};
use outcome::DEFAULT_CHANGED_BY_HAND;

/// Settings of the refresh worker beyond the stage policy.
#[derive(Debug, Clone)]
pub struct RefreshSettings {
    /// How long a deferred request waits (concurrency limit, busy stack, someone else's refresh).
    pub defer: Duration,
    /// How long a started refresh goes before its request comes back to poll it. Instance-refresh
    /// events are the fast path; the poll is the guarantee, so it can be slow (every poll costs two
    /// Auto Scaling calls out of the account's shared bucket).
    pub poll: Duration,
    /// Other processes may start refreshes in this account (Lambda runs two invocations at
    /// once): confirm every start against AWS's marks, read just before it, instead of trusting
    /// this process's ledger between reads.
    pub confirm_start: bool,
}

/// What a request is handled with: the account's AWS capabilities, its stage of the policy, the
/// worker's settings and this process's ledger of slots. Cheap to make per message; the
/// capabilities are separate types so each unit test fakes only what it needs.
pub struct RefreshContext<'a, G, S, P> {
    pub groups: &'a G,
    pub stacks: &'a S,
    pub params: &'a P,
    pub stage: &'a Stage,
    pub settings: &'a RefreshSettings,
    pub admission: &'a Admission,
    /// Failures of the request's AMI an operator accepted in this stage (`amictl resume --stage`):
    /// the stage halts only past these plus its `max_failed_groups`.
    pub accepted_failures: usize,
    /// An operator's halt of the stage for the request's AMI (`amictl halt`): nothing new starts,
    /// and with `cancel_running` a running refresh to the AMI is cancelled when it is polled.
    pub halt: Option<crate::control::Halt>,
    /// The recall of the request's AMI, if an operator recalled it: nothing starts, a running
    /// refresh to it is cancelled. Read from the worker's cache (`AMIFLOW_CONTROL_SECONDS` old
    /// at most): it answers the many deliveries that only wait or poll.
    pub recalled: Option<&'a crate::control::Recall>,
    /// The recall read again, past the cache, just before the request changes anything: a
    /// refresh never starts to an AMI recalled since the cache was read.
    pub recall_now: &'a dyn RecallCheck,
}

/// A fresh read of an AMI's recall record (one `GetParameter` in the hub).
///
/// Why it is read again before a start: a recall moves each stage's parameter back, and the
/// plan-worker then moves back every group it finds configured for the recalled AMI. A start
/// trusting a cache read from before the recall could change the group after that judgement,
/// leaving it on the recalled AMI with nothing asking it back until the stage's next window.
/// Read with the group (before any change), a recall recorded before the request's reads refuses
/// it. What is left is a recall recorded during the few calls between this read and the first
/// change (the plan of the start), whose parameter move and plan also complete within them.
pub trait RecallCheck: Sync {
    fn recall_of<'a>(
        &'a self,
        ami: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<crate::control::Recall>, StepError>>;
}

/// A known answer, for tests and for callers that have just read the record.
impl RecallCheck for Option<crate::control::Recall> {
    fn recall_of<'a>(
        &'a self,
        ami: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<crate::control::Recall>, StepError>> {
        let found = self.as_ref().filter(|r| r.ami == ami).cloned();
        Box::pin(async move { Ok(found) })
    }
}

impl<'a, G: Groups, S, P: Parameters> RefreshContext<'a, G, S, P> {
    /// The account's marks, each where its group keeps it.
    fn marks(&self) -> Marks<'a, G, P> {
        Marks::new(self.groups, self.params)
    }
}

fn finished(req: &AsgRefreshRequested, outcome: Outcome, reason: impl Into<String>) -> StepOutput {
    StepOutput::Emit(vec![AsgRefreshFinished::new(req, outcome, reason).into()])
}

/// The request comes back after `poll` to poll its refresh: Auto Scaling's instance-refresh
/// events are best effort (and one can arrive before the group's mark is written), so polling
/// is what guarantees an outcome; the event only makes it sooner.
fn check_later(settings: &RefreshSettings, refresh_id: &str) -> StepOutput {
    StepOutput::Defer {
        delay: settings.poll,
        reason: format!("refresh {refresh_id} is running; checking on it later"),
    }
}

fn defer(settings: &RefreshSettings, reason: String) -> StepOutput {
    StepOutput::Defer {
        delay: settings.defer,
        reason,
    }
}

/// Write `mark` (and a skip's `reason`) for the group, in one call, where it keeps its marks.
async fn write_mark(
    marks: &Marks<'_, impl Groups, impl Parameters>,
    place: MarkPlace,
    group: &str,
    mark: &Mark,
    reason: Option<&str>,
) -> Result<(), StepError> {
    let record = Record {
        mark: mark.clone(),
        reason: reason.map(str::to_owned),
    };
    marks.write(place, group, &record).await
}

/// What the refresh-worker will do with a request for a group, judged before the window from
/// the group, the stage and its stack with the worker's own checks ([`unmovable`],
/// [`stack_answer`], [`pins`]); free slots and the window's deadline aside. `amictl plan` shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Foreseen {
    /// A refresh starts; `rollback`: AWS can roll it back (every template pinned to a number).
    Start { rollback: bool },
    /// The request ends with this outcome and reason, nothing started.
    Ends(Outcome, String),
    /// The request waits (a stack operation in progress).
    Waits(String),
}

pub async fn foresee(
    stacks: &impl Stacks,
    stage: &Stage,
    group: &GroupAmi,
    strategy: Strategy,
    parameter: &str,
) -> Result<Foreseen, StepError> {
    match strategy {
        // The stack owns the configuration: refreshed without a desired configuration.
        Strategy::Cloudformation => Ok(
            match stack_answer(stacks, stage, &group.group, parameter).await? {
                StackAnswer::Update { .. } => Foreseen::Start { rollback: false },
                StackAnswer::Busy(why) => Foreseen::Waits(why),
                StackAnswer::Ends(outcome, why) => Foreseen::Ends(outcome, why),
            },
        ),
        Strategy::LaunchTemplate => {
            if let Some(why) = unmovable(&group.group) {
                return Ok(Foreseen::Ends(Outcome::Skipped, why));
            }
            let pinned = |source: &AmiSource| match source {
                AmiSource::Template { spec, .. } => pins(spec, stage),
                // Read at launch: nothing to pin, nothing AWS can return to.
                _ => false,
            };
            let rollback =
                pinned(&group.source) && group.overrides.iter().all(|o| pinned(&o.source));
            Ok(Foreseen::Start { rollback })
        }
    }
}

/// Handle one `AsgRefreshRequested`.
pub async fn request_refresh(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    now: DateTime<Utc>,
) -> Result<StepOutput, StepError> {
    let RefreshContext {
        groups,
        params,
        stage,
        settings,
        admission,
        ..
    } = *ctx;
    let window = deadline_text(req.deadline);
    if let Some(done) = admission.closed_here(req, &window) {
        return Ok(done);
    }
    if let Some(recall) = ctx.recalled {
        return recalled(ctx, req, recall).await;
    }
    // Most requests can only wait for a slot (a window opens with every stale group at once):
    // they are answered before any other call, which would only be repeated next time.
    let limit = stage.max_concurrent_refreshes as usize;
    let marks = ctx.marks();
    let slot = match admission.admit(&req.asg_name, limit, &marks).await? {
        Admit::Full { taken, waiting } => {
            return Ok(spread_defer(settings, taken, limit, waiting));
        }
        Admit::InFlight => None,
        Admit::Slot(slot) => Some(slot),
    };
    // Independent reads go out together: a start's latency holds a slot. A request given a slot
    // is about to start, so its fresh read of the AMI's recall goes with them (a recall recorded
    // after it is still seen before the first change, see `RecallCheck`).
    let starting = slot.is_some();
    let early_recall = async {
        if starting {
            Some(ctx.recall_now.recall_of(&req.ami_id).await)
        } else {
            None
        }
    };
    let (group, current, recall_read) = tokio::join!(
        groups.get(&req.asg_name),
        params.get(&req.parameter_name),
        early_recall
    );
    let Some(group) = group? else {
        return Ok(finished(
            req,
            Outcome::Skipped,
            format!("group {} no longer exists", req.asg_name),
        ));
    };
    // The group's mark, or one this process started and has not written yet (a failed write).
    let record = marks.read(&group).await?;
    let marked = record.as_ref().map(|r| &r.mark);
    let reason = record.as_ref().and_then(|r| r.reason.clone());
    let mark = marked.filter(|m| m.ami == req.ami_id).cloned().or_else(|| {
        admission
            .running(&req.asg_name)
            .map(|(m, _)| m)
            .filter(|m| m.ami == req.ami_id)
    });
    if let Some(mark) = mark {
        let Some(outcome) = mark.state.outcome() else {
            if let Some(halt) = ctx.halt.as_ref().filter(|h| h.cancel_running) {
                return outcome::cancel(ctx, req, &group, &mark, halt).await;
            }
            // Delivered again while ours runs: poll it (events are best effort).
            return outcome::poll(ctx, req, &group, &mark).await;
        };
        // Ended (closed by another process, or by hand): it no longer holds a slot here.
        admission.forget(&req.asg_name, &mark.refresh_id);
        if mark.deadline == window {
            // This window already tried and ended: say so again, start nothing new.
            let reason = match reason {
                Some(why) if outcome == Outcome::Skipped => why,
                _ => format!(
                    "already ended {} in this window (refresh {})",
                    mark.state, mark.refresh_id
                ),
            };
            return Ok(finished(req, outcome, reason));
        }
        // An earlier window's refresh to this AMI was superseded by a hand-made change.
        if let Some(why) = reason
            .filter(|why| outcome == Outcome::Skipped && why.starts_with(DEFAULT_CHANGED_BY_HAND))
        {
            match stage.hand_made_changes {
                HandMadeChanges::Respect => {
                    return Ok(finished(
                        req,
                        Outcome::Skipped,
                        format!(
                            "respecting a hand-made change ({why}); the stage's hand_made_changes = \"respect\" leaves it until the next golden AMI"
                        ),
                    ));
                }
                HandMadeChanges::Override => tracing::warn!(group = %req.asg_name, %why,
                    "hand_made_changes = \"override\": moving the group again, undoing a hand-made change"),
            }
        }
    }
    // A request of an earlier rollout delivered late must not move the group back: act only on
    // the AMI the golden parameter holds now. A parameter that does not exist here holds no AMI
    // to move to: the request was not made by a plan of this account.
    let Some(current) = current? else {
        return Err(StepError::Permanent(format!(
            "AsgRefreshRequested for {} names {}, which does not exist in this account: there is no golden AMI to move to; refused",
            req.asg_name, req.parameter_name
        )));
    };
    if current.value != req.ami_id {
        return Ok(finished(
            req,
            Outcome::Skipped,
            format!(
                "superseded: {} now holds {}, not {}; nothing started",
                req.parameter_name, current.value, req.ami_id
            ),
        ));
    }
    if req.deadline.is_some_and(|d| now >= d) {
        return Ok(finished(
            req,
            Outcome::Skipped,
            format!("the maintenance window closed at {window} before the refresh could start"),
        ));
    }
    if group
        .tags
        .get(&stage.skip_tag)
        .is_some_and(|v| v != "false")
    {
        return Ok(finished(
            req,
            Outcome::Skipped,
            format!("tagged {}", stage.skip_tag),
        ));
    }
    if let Some(halted) = halted(ctx, req).await? {
        return Ok(halted);
    }
    // Nothing has changed yet: confirm the AMI is not recalled since the cache was read.
    let recall = match recall_read {
        Some(read) => read?,
        None => ctx.recall_now.recall_of(&req.ami_id).await?,
    };
    if let Some(recall) = recall {
        return recalled(ctx, req, &recall).await;
    }
    // The group's refreshes (to recognise one of ours, or someone else's) are read while the
    // plan is made.
    let (decided, refreshes) = tokio::join!(
        start::decide(ctx, req, &group),
        groups.refreshes(&req.asg_name)
    );
    let (decided, refreshes) = (decided?, refreshes?);
    let plan = match decided {
        Decision::Start(plan) => plan,
        Decision::AlreadyThere(plan) => {
            if let Some(adopted) =
                outcome::adopt_unmarked(ctx, req, &group, marked, &window, &refreshes).await?
            {
                return Ok(adopted);
            }
            let images = groups.instance_images(&group.instance_ids).await?;
            // Instances of an override left alone (another family's AMI) run that AMI.
            if images
                .values()
                .all(|a| *a == req.ami_id || plan.left_alone.contains(a))
            {
                return Ok(finished(
                    req,
                    Outcome::Succeeded,
                    "already on the AMI: nothing to refresh",
                ));
            }
            plan
        }
        Decision::Done(done) if req.strategy == Strategy::Cloudformation => {
            return remember_skip(req, &window, done, &marks, MarkPlace::of(&group)).await;
        }
        Decision::Done(done) => return Ok(done),
    };
    if let Some(adopted) =
        outcome::adopt(ctx, req, &group, marked, &plan, &window, &refreshes).await?
    {
        return Ok(adopted);
    }
    if let Some(active) = refreshes.into_iter().find(|r| r.is_active()) {
        return Ok(defer(
            settings,
            format!(
                "refresh {} started by someone else is {}",
                active.id, active.status
            ),
        ));
    }
    default_version::move_defaults(
        groups,
        &req.asg_name,
        &req.ami_id,
        &window,
        &plan.before_refresh,
    )
    .await?;
    let request = plan.request(stage);
    if settings.confirm_start
        && let Some((taken, waiting)) = admission.confirm(&req.asg_name, limit, &marks).await?
    {
        return Ok(spread_defer(settings, taken, limit, waiting));
    }
    // The slot (held since the check above, or the group's own if it was counted in flight
    // already) passes to the running refresh.
    let id = groups.start_refresh(&req.asg_name, &request).await?;
    let mark = Mark {
        ami: req.ami_id.clone(),
        state: MarkState::InProgress,
        refresh_id: id.clone(),
        deadline: window,
        parameter: req.parameter_name.clone(),
    };
    let place = MarkPlace::of(&group);
    admission.started(&req.asg_name, place, &mark);
    drop(slot);
    write_mark(&marks, place, &req.asg_name, &mark, None).await?;
    tracing::info!(group = %req.asg_name, refresh = %id, how = %plan.how, "instance refresh started");
    Ok(check_later(settings, &id))
}

/// A request for a recalled AMI: a refresh of ours to it still running is cancelled (its poll
/// then closes it `cancelled`, and puts back any default version it moved); otherwise the request
/// ends `recalled`, nothing started. Waiting and deferred requests end here on their next
/// delivery, whatever slot they waited for.
async fn recalled(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    recall: &crate::control::Recall,
) -> Result<StepOutput, StepError> {
    let refused = || {
        finished(
            req,
            Outcome::Recalled,
            format!("not started: {}", recall.refusal()),
        )
    };
    let Some(group) = ctx.groups.get(&req.asg_name).await? else {
        return Ok(refused());
    };
    let marked = ctx
        .marks()
        .read(&group)
        .await?
        .map(|r| r.mark)
        .or_else(|| ctx.admission.running(&req.asg_name).map(|(m, _)| m));
    let running = marked
        .clone()
        .filter(|m| m.ami == req.ami_id && m.is_running());
    let Some(mark) = running else {
        // A refresh running with no mark of another AMI's naming it may be one another process
        // started for this request and has not marked yet: its mark decides, next delivery.
        let refreshes = ctx.groups.refreshes(&req.asg_name).await?;
        if let Some(active) = refreshes
            .iter()
            .find(|r| r.is_active() && marked.as_ref().is_none_or(|m| m.refresh_id != r.id))
        {
            return Ok(defer(
                ctx.settings,
                format!(
                    "{} is recalled; refresh {} is {} on the group with no mark yet: waiting for its mark to say whose it is",
                    req.ami_id, active.id, active.status
                ),
            ));
        }
        tracing::warn!(group = %req.asg_name, ami = %req.ami_id, "refused: a refresh to a recalled AMI ({})", recall.refusal());
        return Ok(refused());
    };
    let refreshes = ctx.groups.refreshes(&req.asg_name).await?;
    if refreshes
        .iter()
        .any(|r| r.id == mark.refresh_id && r.is_active() && r.status != "Cancelling")
    {
        ctx.groups.cancel_refresh(&req.asg_name).await?;
        tracing::warn!(group = %req.asg_name, refresh = %mark.refresh_id, ami = %req.ami_id, "refresh to a recalled AMI cancelled ({})", recall.refusal());
        return Ok(check_later(ctx.settings, &mark.refresh_id));
    }
    outcome::poll(ctx, req, &group, &mark).await
}

/// The stage's fleet failure tolerance: past `max_failed_groups` failed or rolled-back groups for
/// the AMI (plus those accepted by a resume), no new refresh starts, and the request ends
/// `halted` with the count, the tolerance and the way on. A percentage is taken of the family's
/// groups in the stage, as the plan-worker counted them when it asked (as the gate, which keeps
/// the next stage closed, counts them), never of more than the account holds: a request made by
/// hand, without the count, or claiming more, counts the account's. An operator's halt
/// (`amictl halt`) ends it `halted` whatever the count.
async fn halted(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
) -> Result<Option<StepOutput>, StepError> {
    if let Some(halt) = &ctx.halt {
        let stage = &ctx.stage.name;
        let d = &halt.decision;
        tracing::warn!(group = %req.asg_name, ami = %req.ami_id, %stage, by = %d.by, reason = %d.reason, "stage halted by an operator: refresh not started");
        return Ok(Some(finished(
            req,
            Outcome::Halted,
            format!(
                "not started: stage {stage} was halted for {} by {} at {}: {}; `amictl resume --stage {stage}` lets it go on",
                req.ami_id,
                d.by,
                d.at.to_rfc3339(),
                d.reason
            ),
        )));
    }
    let failed = ctx.admission.failures(&req.ami_id, &ctx.marks()).await?;
    if failed == 0 {
        return Ok(None);
    }
    let tolerance = &ctx.stage.max_failed_groups;
    let groups = match tolerance {
        crate::policy::FailureTolerance::Percent(_) => {
            let account = ctx.admission.group_count(ctx.groups).await?;
            req.family_groups
                .map_or(account, |family| account.min(family as usize))
        }
        crate::policy::FailureTolerance::Groups(_) => 0,
    };
    let allowed = tolerance.allowed(groups) + ctx.accepted_failures;
    if failed <= allowed {
        return Ok(None);
    }
    let stage = &ctx.stage.name;
    tracing::warn!(group = %req.asg_name, ami = %req.ami_id, %stage, failed, allowed, "stage halted: refresh not started");
    Ok(Some(finished(
        req,
        Outcome::Halted,
        format!(
            "not started: stage {stage} has {failed} failed or rolled-back groups for {}, more than the {allowed} it tolerates (max_failed_groups = {tolerance}{}); fix the cause, then `amictl resume --stage {stage}`",
            req.ami_id,
            match ctx.accepted_failures {
                0 => String::new(),
                n => format!(", {n} accepted by a resume"),
            }
        ),
    )))
}

/// A stack-owned group is skipped for as long as its stack stays as it is: mark the group, with
/// the reason, so compliance reports it skipped (and why) rather than stale. The mark goes where
/// the stack does not see it (`place`: an SSM parameter, see `aws::Marks`).
async fn remember_skip(
    req: &AsgRefreshRequested,
    window: &str,
    done: StepOutput,
    marks: &Marks<'_, impl Groups, impl Parameters>,
    place: MarkPlace,
) -> Result<StepOutput, StepError> {
    let StepOutput::Emit(details) = &done else {
        return Ok(done);
    };
    let Some(Detail::AsgRefreshFinished(f)) = details.first() else {
        return Ok(done);
    };
    if f.outcome != Outcome::Skipped {
        return Ok(done);
    }
    let mark = Mark {
        ami: req.ami_id.clone(),
        state: MarkState::Skipped,
        refresh_id: "-".into(),
        deadline: window.to_owned(),
        parameter: req.parameter_name.clone(),
    };
    write_mark(marks, place, &req.asg_name, &mark, Some(&f.reason)).await?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::{STACK_TAG, Stack};
    use crate::fake::FakeAws;
    use crate::mark::{REFRESH_TAG, STATE_TAG, mark_of, skip_reason};
    use crate::policy::Policy;
    use events::{InstanceRefreshEvent, RefreshEventKind};

    const NEW: &str = "ami-0000000000000000b";

    /// An account whose golden parameter holds `NEW`, after `OLD`.
    fn fake() -> FakeAws {
        let aws = FakeAws::default();
        aws.golden("/golden/al2023/ami-id", NEW, &[OLD]);
        aws
    }
    const OLD: &str = "ami-0000000000000000a";

    fn stage() -> Stage {
        let policy = Policy::parse(include_str!("../../../../local/amiflow.toml")).unwrap();
        policy.stage_named("qa").unwrap().clone()
    }

    pub(super) fn settings() -> RefreshSettings {
        RefreshSettings {
            defer: Duration::from_secs(7),
            poll: Duration::from_secs(35),
            confirm_start: false,
        }
    }

    fn request(group: &str, strategy: Strategy) -> AsgRefreshRequested {
        AsgRefreshRequested::new(
            "param:111111111111:/golden/al2023/ami-id:ami-0000000000000000b",
            "111111111111",
            group,
            "/golden/al2023/ami-id",
            NEW,
            strategy,
            Some(Utc::now() + chrono::Duration::hours(4)),
        )
    }

    /// One delivery, as to a freshly started worker (nothing remembered).
    async fn run(aws: &FakeAws, req: &AsgRefreshRequested) -> StepOutput {
        run_in(aws, req, &Admission::default()).await
    }

    /// One delivery to a worker that remembers `admission`.
    async fn run_in(aws: &FakeAws, req: &AsgRefreshRequested, admission: &Admission) -> StepOutput {
        let (stage, settings) = (stage(), settings());
        let ctx = context(aws, &stage, &settings, admission);
        request_refresh(&ctx, req, Utc::now()).await.unwrap()
    }

    /// The context of a worker of `stage` in the account `aws` fakes, no operator decision read.
    fn context<'a>(
        aws: &'a FakeAws,
        stage: &'a Stage,
        settings: &'a RefreshSettings,
        admission: &'a Admission,
    ) -> RefreshContext<'a, FakeAws, FakeAws, FakeAws> {
        RefreshContext {
            groups: aws,
            stacks: aws,
            params: aws,
            stage,
            settings,
            admission,
            accepted_failures: 0,
            halt: None,
            recalled: None,
            recall_now: &None,
        }
    }

    #[tokio::test]
    async fn past_the_stage_tolerance_a_request_ends_halted_and_starts_nothing() {
        let aws = fake();
        for g in ["failed-one", "next"] {
            aws.template(&format!("lt-{g}"), &[OLD], 1);
            aws.group(g, &format!("lt-{g}"), "1", OLD, 1);
        }
        let failed = Mark {
            ami: NEW.into(),
            state: MarkState::RolledBack,
            refresh_id: "ir-0".into(),
            deadline: "-".into(),
            parameter: "/golden/al2023/ami-id".into(),
        };
        for (k, v) in failed.tags(None) {
            aws.groups
                .lock()
                .unwrap()
                .get_mut("failed-one")
                .unwrap()
                .tags
                .insert(k.into(), v);
        }
        let req = request("next", Strategy::LaunchTemplate);
        let (said, reason) = outcome(&run(&aws, &req).await);
        assert_eq!(said, Outcome::Halted);
        assert_eq!(
            reason,
            format!(
                "not started: stage qa has 1 failed or rolled-back groups for {NEW}, more than the 0 it tolerates (max_failed_groups = 0); fix the cause, then `amictl resume --stage qa`"
            )
        );
        assert!(aws.started.lock().unwrap().is_empty(), "nothing started");
        assert!(
            !aws.changes().iter().any(|c| c.contains(" next ")
                || c.starts_with("set_tag next")
                || c.starts_with("create_version lt-next")),
            "no mark, no version: {:?}",
            aws.changes()
        );
        // Resumed with that failure accepted: the request starts its refresh.
        let (stage, settings, admission) = (stage(), settings(), Admission::default());
        let ctx = RefreshContext {
            accepted_failures: 1,
            ..context(&aws, &stage, &settings, &admission)
        };
        request_refresh(&ctx, &req, Utc::now()).await.unwrap();
        assert_eq!(aws.started.lock().unwrap()[0].0, "next");
    }

    #[tokio::test]
    async fn a_percentage_tolerance_is_taken_of_the_familys_groups_never_more_than_the_account() {
        let aws = fake();
        // Ten groups in the account; two failed for NEW.
        for i in 0..10 {
            let g = format!("g{i}");
            aws.template(&format!("lt-{g}"), &[OLD], 1);
            aws.group(&g, &format!("lt-{g}"), "1", OLD, 1);
        }
        let failed = Mark {
            ami: NEW.into(),
            state: MarkState::Failed,
            refresh_id: "ir-0".into(),
            deadline: "-".into(),
            parameter: "/golden/al2023/ami-id".into(),
        };
        for g in ["g0", "g1"] {
            for (k, v) in failed.tags(None) {
                aws.groups
                    .lock()
                    .unwrap()
                    .get_mut(g)
                    .unwrap()
                    .tags
                    .insert(k.into(), v);
            }
        }
        let mut stage = stage();
        stage.max_failed_groups = crate::policy::FailureTolerance::Percent(50.0);
        stage.max_concurrent_refreshes = 10;
        let settings = settings();
        let decide = |req: AsgRefreshRequested| {
            let (aws, stage, settings) = (&aws, &stage, &settings);
            async move {
                let admission = Admission::default();
                let ctx = context(aws, stage, settings, &admission);
                request_refresh(&ctx, &req, Utc::now()).await.unwrap()
            }
        };
        // The family is four of the ten: 50% of 4 is 2, and 2 failed: within it.
        decide(request("g2", Strategy::LaunchTemplate).with_family_groups(4)).await;
        assert_eq!(aws.started.lock().unwrap().last().unwrap().0, "g2");
        // The family is three: 50% of 3 is 1, and 2 failed: halted, counted of the family.
        let (said, reason) =
            outcome(&decide(request("g3", Strategy::LaunchTemplate).with_family_groups(3)).await);
        assert_eq!(said, Outcome::Halted);
        assert!(
            reason.contains("more than the 1 it tolerates (max_failed_groups = 50%)"),
            "{reason}"
        );
        // A request claiming a family larger than the account counts the account's ten: 5
        // tolerated, so the claim buys no more than the account gives.
        decide(request("g4", Strategy::LaunchTemplate).with_family_groups(1000)).await;
        assert_eq!(aws.started.lock().unwrap().last().unwrap().0, "g4");
        let (said, _) =
            outcome(&decide(request("g5", Strategy::LaunchTemplate).with_family_groups(2)).await);
        assert_eq!(said, Outcome::Halted, "50% of 2 is 1, and 2 failed");
    }

    fn recall_of_new() -> crate::control::Recall {
        crate::control::Recall {
            decision: crate::control::Decision {
                by: "arn:aws:sts::111111111111:assumed-role/ops/alice".into(),
                at: "2026-12-05T02:00:00Z".parse().unwrap(),
                reason: "kernel regression".into(),
            },
            ami: NEW.into(),
            parameter: "/golden/al2023/ami-id".into(),
            to: None,
            now: false,
        }
    }

    async fn run_recalled(
        aws: &FakeAws,
        req: &AsgRefreshRequested,
        admission: &Admission,
    ) -> StepOutput {
        let recall = recall_of_new();
        let ctx = RefreshContext {
            groups: aws,
            stacks: aws,
            params: aws,
            stage: &stage(),
            settings: &settings(),
            admission,
            accepted_failures: 0,
            halt: None,
            recalled: Some(&recall),
            recall_now: &None,
        };
        request_refresh(&ctx, req, Utc::now()).await.unwrap()
    }

    #[tokio::test]
    async fn a_request_for_a_recalled_ami_ends_recalled_and_a_running_refresh_is_cancelled() {
        let (aws, _) = one_group_beyond_the_limit();
        let admission = Admission::default();
        // g0's refresh to the AMI runs when it is recalled.
        let running = request("g0", Strategy::LaunchTemplate);
        run_in(&aws, &running, &admission).await;
        assert_eq!(aws.started.lock().unwrap().len(), 1);

        // A waiting request: ends `recalled`, nothing started, no version made.
        let before = aws.changes();
        let (said, reason) = outcome(
            &run_recalled(&aws, &request("g1", Strategy::LaunchTemplate), &admission).await,
        );
        assert_eq!(said, Outcome::Recalled);
        assert_eq!(
            reason,
            format!(
                "not started: {NEW} was recalled by arn:aws:sts::111111111111:assumed-role/ops/alice at 2026-12-05T02:00:00+00:00: kernel regression"
            )
        );
        assert_eq!(aws.changes(), before, "nothing changed for g1");

        // The running one's poll cancels it, once; the poll after it ends closes it cancelled.
        let StepOutput::Defer { .. } = run_recalled(&aws, &running, &admission).await else {
            panic!("a cancelled refresh is polled again");
        };
        run_recalled(&aws, &running, &admission).await;
        let cancels = aws
            .changes()
            .iter()
            .filter(|c| c.starts_with("cancel_refresh"))
            .count();
        assert_eq!(cancels, 1, "{:?}", aws.changes());
        aws.refreshes.lock().unwrap().get_mut("g0").unwrap()[0].status = "Cancelled".into();
        let (said, _) = outcome(&run_recalled(&aws, &running, &admission).await);
        assert_eq!(said, Outcome::Cancelled);
        let group = aws.groups.lock().unwrap()["g0"].clone();
        assert_eq!(mark_of(&group).unwrap().state, MarkState::Cancelled);
        assert_eq!(aws.started.lock().unwrap().len(), 1, "nothing else started");
    }

    /// Whoever asks, a request is refused (a permanent error, dead-lettered with the reason)
    /// when its parameter does not exist here, or its group is on no earlier golden AMI of the
    /// family: nothing is made, nothing started.
    #[tokio::test]
    async fn a_request_for_a_missing_parameter_or_a_group_of_another_family_is_refused() {
        let aws = FakeAws::default();
        aws.template("lt-web", &[OLD], 1);
        aws.group("web", "lt-web", "1", OLD, 1);
        let (stage, settings, admission) = (stage(), settings(), Admission::default());
        let ctx = context(&aws, &stage, &settings, &admission);
        let req = request("web", Strategy::LaunchTemplate);
        let Err(StepError::Permanent(why)) = request_refresh(&ctx, &req, Utc::now()).await else {
            panic!("a request naming a parameter that does not exist is refused");
        };
        assert_eq!(
            why,
            "AsgRefreshRequested for web names /golden/al2023/ami-id, which does not exist in this account: there is no golden AMI to move to; refused"
        );
        // The parameter exists, but the group runs another family's AMI.
        const WINDOWS: &str = "ami-0000000000000000f";
        aws.golden("/golden/al2023/ami-id", NEW, &[OLD]);
        aws.template("lt-win", &[WINDOWS], 1);
        aws.group("win", "lt-win", "1", WINDOWS, 1);
        let req = request("win", Strategy::LaunchTemplate);
        let Err(StepError::Permanent(why)) = request_refresh(&ctx, &req, Utc::now()).await else {
            panic!("a request for a group of another family is refused");
        };
        assert!(
            why.starts_with(&format!(
                "group win launches {WINDOWS} (launch template lt-win version 1), which is no earlier golden AMI of /golden/al2023/ami-id"
            )),
            "{why}"
        );
        assert!(
            !aws.changes()
                .iter()
                .any(|c| c.starts_with("create_version")),
            "{:?}",
            aws.changes()
        );
        assert!(aws.started.lock().unwrap().is_empty(), "nothing started");
    }

    /// The family check reads the parameter's history once per worker process for the AMIs it
    /// has seen, and afresh for one it has not: an AMI published since is found, another family's
    /// AMI is still refused.
    #[tokio::test]
    async fn a_stage_reads_its_golden_history_once_and_again_only_for_an_ami_not_seen() {
        let reads = |aws: &FakeAws| aws.history_reads.load(std::sync::atomic::Ordering::Relaxed);
        let (aws, limit) = one_group_beyond_the_limit();
        let (stage, settings, admission) = (stage(), settings(), Admission::default());
        let ctx = context(&aws, &stage, &settings, &admission);
        for i in 0..limit - 2 {
            let req = request(&format!("g{i}"), Strategy::LaunchTemplate);
            let out = request_refresh(&ctx, &req, Utc::now()).await.unwrap();
            assert!(polls_later(&out), "g{i} starts: {out:?}");
        }
        assert_eq!(aws.started.lock().unwrap().len(), limit - 2);
        assert_eq!(reads(&aws), 1, "one history read for {} starts", limit - 2);
        // An AMI published after the history was read (a rollout's AMI before NEW): not seen, so
        // the history is read again, and the group moves.
        const BETWEEN: &str = "ami-0000000000000000c";
        aws.golden("/golden/al2023/ami-id", NEW, &[OLD, BETWEEN]);
        aws.template("lt-late", &[BETWEEN], 1);
        aws.group("late", "lt-late", "1", BETWEEN, 1);
        let out = request_refresh(&ctx, &request("late", Strategy::LaunchTemplate), Utc::now())
            .await
            .unwrap();
        assert!(polls_later(&out), "late starts: {out:?}");
        assert_eq!(reads(&aws), 2);
        // Another family's AMI is never in the history: read again, and refused.
        const WINDOWS: &str = "ami-0000000000000000f";
        aws.template("lt-win", &[WINDOWS], 1);
        aws.group("win", "lt-win", "1", WINDOWS, 1);
        let req = request("win", Strategy::LaunchTemplate);
        let Err(StepError::Permanent(why)) = request_refresh(&ctx, &req, Utc::now()).await else {
            panic!("a group of another family is refused, the cache notwithstanding");
        };
        assert!(why.contains("which is no earlier golden AMI of"), "{why}");
        assert_eq!(reads(&aws), 3);
        assert_eq!(
            aws.started.lock().unwrap().len(),
            limit - 1,
            "win not started"
        );
    }

    /// The fresh read of a recall is made once per start, with the group's reads, and never by
    /// a delivery that only polls a running refresh or waits for a slot.
    #[tokio::test]
    async fn only_a_start_reads_the_recall_afresh() {
        struct Counting(std::sync::atomic::AtomicUsize);
        impl RecallCheck for Counting {
            fn recall_of<'a>(
                &'a self,
                _ami: &'a str,
            ) -> futures::future::BoxFuture<'a, Result<Option<crate::control::Recall>, StepError>>
            {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Box::pin(async { Ok(None) })
            }
        }
        let (aws, limit) = one_group_beyond_the_limit();
        let (stage, settings, admission) = (stage(), settings(), Admission::default());
        let counting = Counting(0.into());
        let ctx = RefreshContext {
            recall_now: &counting,
            ..context(&aws, &stage, &settings, &admission)
        };
        let fresh = || counting.0.load(std::sync::atomic::Ordering::Relaxed);
        for i in 0..limit {
            let req = request(&format!("g{i}"), Strategy::LaunchTemplate);
            request_refresh(&ctx, &req, Utc::now()).await.unwrap();
        }
        assert_eq!(aws.started.lock().unwrap().len(), limit);
        assert_eq!(fresh(), limit, "one fresh read per start");
        // g0 polled while it runs, and the group beyond the limit told to wait: no read.
        let poll = request_refresh(&ctx, &request("g0", Strategy::LaunchTemplate), Utc::now())
            .await
            .unwrap();
        assert!(polls_later(&poll), "{poll:?}");
        let last = format!("g{limit}");
        let wait = request_refresh(&ctx, &request(&last, Strategy::LaunchTemplate), Utc::now())
            .await
            .unwrap();
        assert!(matches!(&wait, StepOutput::Defer { .. }), "{wait:?}");
        assert_eq!(
            aws.started.lock().unwrap().len(),
            limit,
            "nothing else started"
        );
        assert_eq!(fresh(), limit, "no read for a poll or a wait");
    }

    #[tokio::test]
    async fn a_recalled_request_waits_for_the_mark_of_a_refresh_another_process_just_started() {
        let (aws, _) = one_group_beyond_the_limit();
        // Another process started g0's refresh and has not written its mark yet.
        let running = request("g0", Strategy::LaunchTemplate);
        run_in(&aws, &running, &Admission::default()).await;
        let marked = aws.groups.lock().unwrap()["g0"].tags.clone();
        aws.groups
            .lock()
            .unwrap()
            .get_mut("g0")
            .unwrap()
            .tags
            .remove(crate::mark::REFRESH_TAG);
        let StepOutput::Defer { reason, .. } =
            run_recalled(&aws, &running, &Admission::default()).await
        else {
            panic!("a request for a recalled AMI is not refused while an unmarked refresh runs");
        };
        assert!(
            reason.ends_with("with no mark yet: waiting for its mark to say whose it is"),
            "{reason}"
        );
        // Its mark written, the refresh is ours and cancelled: nothing claims it never started.
        aws.groups.lock().unwrap().get_mut("g0").unwrap().tags = marked;
        let StepOutput::Defer { .. } = run_recalled(&aws, &running, &Admission::default()).await
        else {
            panic!("the cancelled refresh is polled again");
        };
        assert!(
            aws.changes()
                .iter()
                .any(|c| c.starts_with("cancel_refresh g0")),
            "{:?}",
            aws.changes()
        );
    }

    #[tokio::test]
    async fn a_recall_the_cache_has_not_seen_yet_refuses_the_start_before_any_change() {
        let (aws, _) = one_group_beyond_the_limit();
        let (stage, settings, admission) = (stage(), settings(), Admission::default());
        let recalled_since = Some(recall_of_new());
        let ctx = RefreshContext {
            recall_now: &recalled_since,
            ..context(&aws, &stage, &settings, &admission)
        };
        let before = aws.changes();
        let (said, reason) = outcome(
            &request_refresh(&ctx, &request("g0", Strategy::LaunchTemplate), Utc::now())
                .await
                .unwrap(),
        );
        assert_eq!(said, Outcome::Recalled);
        assert!(
            reason.starts_with(&format!("not started: {NEW} was recalled by ")),
            "{reason}"
        );
        assert_eq!(aws.changes(), before, "no version, no default, no mark");
        assert!(aws.started.lock().unwrap().is_empty(), "nothing started");
    }

    /// Groups `g0` ..= `g{limit}`, one more than the stage's concurrency limit, each with a
    /// template of its own on the old AMI.
    fn one_group_beyond_the_limit() -> (FakeAws, usize) {
        let aws = fake();
        let limit = stage().max_concurrent_refreshes as usize;
        for i in 0..=limit {
            aws.template(&format!("lt-{i}"), &[OLD], 1);
            aws.group(&format!("g{i}"), &format!("lt-{i}"), "1", OLD, 1);
        }
        (aws, limit)
    }

    /// The request's refresh runs: it comes back to poll it.
    fn polls_later(out: &StepOutput) -> bool {
        matches!(out, StepOutput::Defer { reason, .. } if reason.contains("running"))
    }

    /// A worker that has started the refreshes of `g0` .. `g{limit - 1}`: every slot is taken.
    async fn fill_slots(aws: &FakeAws, limit: usize) -> Admission {
        let admission = Admission::default();
        for i in 0..limit {
            run_in(
                aws,
                &request(&format!("g{i}"), Strategy::LaunchTemplate),
                &admission,
            )
            .await;
        }
        admission
    }

    fn outcome(out: &StepOutput) -> (Outcome, String) {
        match out {
            StepOutput::Emit(details) => match details.as_slice() {
                [Detail::AsgRefreshFinished(f)] => (f.outcome, f.reason.clone()),
                other => panic!("expected one AsgRefreshFinished, got {other:?}"),
            },
            StepOutput::Defer { reason, .. } => panic!("deferred: {reason}"),
        }
    }

    #[tokio::test]
    async fn pinned_group_gets_one_new_version_and_one_refresh_however_often_asked() {
        let aws = fake();
        aws.template("lt-1", &[OLD, OLD], 1);
        aws.group("web", "lt-1", "2", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        // Started: the request comes back later to poll the refresh.
        assert!(polls_later(&run(&aws, &req).await));
        // Delivered twice more while the refresh runs: nothing new is created or started.
        run(&aws, &req).await;
        run(&aws, &req).await;
        let changes = aws.changes();
        assert_eq!(
            changes
                .iter()
                .filter(|c| c.starts_with("create_version"))
                .count(),
            1,
            "{changes:?}"
        );
        assert_eq!(
            changes
                .iter()
                .filter(|c| c.starts_with("start_refresh"))
                .count(),
            1
        );
        let (_, started) = &aws.started.lock().unwrap()[0];
        assert!(started.desired.is_some() && started.auto_rollback && started.skip_matching);
        assert_eq!(
            started.min_healthy_percentage,
            stage().min_healthy_percentage
        );
    }

    #[tokio::test]
    async fn without_any_instance_refresh_event_the_request_polls_its_refresh_to_an_outcome() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        let StepOutput::Defer { delay, .. } = run(&aws, &req).await else {
            panic!("a started refresh is checked on later");
        };
        assert_eq!(delay, settings().poll);
        // Still running when the request comes back: later again.
        assert!(matches!(run(&aws, &req).await, StepOutput::Defer { .. }));
        aws.succeed("web");
        let (o, _) = outcome(&run(&aws, &req).await);
        assert_eq!(o, Outcome::Succeeded);
        assert_eq!(
            mark_of(&aws.groups.lock().unwrap()["web"]).unwrap().state,
            MarkState::Succeeded
        );
    }

    /// One delivery to a freshly started worker that read `halt` for the request's AMI and stage.
    async fn run_halted(
        aws: &FakeAws,
        req: &AsgRefreshRequested,
        halt: &crate::control::Halt,
    ) -> StepOutput {
        let (stage, settings, admission) = (stage(), settings(), Admission::default());
        let ctx = RefreshContext {
            halt: Some(halt.clone()),
            ..context(aws, &stage, &settings, &admission)
        };
        request_refresh(&ctx, req, Utc::now()).await.unwrap()
    }

    fn operator_halt(cancel_running: bool) -> crate::control::Halt {
        crate::control::Halt {
            decision: crate::control::Decision {
                by: "arn:aws:sts::111111111111:assumed-role/ops/alice".into(),
                at: "2026-12-05T02:00:00Z".parse().unwrap(),
                reason: "502s after the first groups".into(),
            },
            cancel_running,
        }
    }

    #[tokio::test]
    async fn an_operator_halt_ends_a_new_request_halted_with_who_and_why() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        let (said, reason) = outcome(&run_halted(&aws, &req, &operator_halt(false)).await);
        assert_eq!(said, Outcome::Halted);
        assert_eq!(
            reason,
            format!(
                "not started: stage qa was halted for {NEW} by arn:aws:sts::111111111111:assumed-role/ops/alice at 2026-12-05T02:00:00+00:00: 502s after the first groups; `amictl resume --stage qa` lets it go on"
            )
        );
        assert!(aws.started.lock().unwrap().is_empty(), "nothing started");
        assert!(
            !aws.changes()
                .iter()
                .any(|c| c.contains("lt-1") || c.contains("web")),
            "no version, no mark: {:?}",
            aws.changes()
        );
    }

    #[tokio::test]
    async fn a_halt_with_cancel_running_cancels_the_running_refresh_and_closes_it_cancelled() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        assert!(matches!(run(&aws, &req).await, StepOutput::Defer { .. }));
        aws.refreshes.lock().unwrap().get_mut("web").unwrap()[0].status = "InProgress".into();
        // A halt without --cancel-running lets it run: its poll only looks.
        assert!(matches!(
            run_halted(&aws, &req, &operator_halt(false)).await,
            StepOutput::Defer { .. }
        ));
        assert!(
            !aws.changes()
                .iter()
                .any(|c| c.starts_with("cancel_refresh"))
        );
        // With it, the poll cancels (once, however often it comes back).
        assert!(matches!(
            run_halted(&aws, &req, &operator_halt(true)).await,
            StepOutput::Defer { .. }
        ));
        assert!(matches!(
            run_halted(&aws, &req, &operator_halt(true)).await,
            StepOutput::Defer { .. }
        ));
        let cancels: Vec<String> = aws
            .changes()
            .into_iter()
            .filter(|c| c.starts_with("cancel_refresh"))
            .collect();
        assert_eq!(cancels, vec!["cancel_refresh web".to_owned()]);
        // Auto Scaling finishes cancelling: the next poll closes it, the mark says so.
        aws.refreshes.lock().unwrap().get_mut("web").unwrap()[0].status = "Cancelled".into();
        let (o, _) = outcome(&run_halted(&aws, &req, &operator_halt(true)).await);
        assert_eq!(o, Outcome::Cancelled);
        assert_eq!(
            mark_of(&aws.groups.lock().unwrap()["web"]).unwrap().state,
            MarkState::Cancelled
        );
        assert_eq!(aws.started.lock().unwrap().len(), 1, "never started again");
    }

    #[tokio::test]
    async fn a_refresh_started_but_never_marked_is_taken_over_not_started_again() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        run(&aws, &req).await;
        let forget_mark = || {
            let mut groups = aws.groups.lock().unwrap();
            let tags = &mut groups.get_mut("web").unwrap().tags;
            tags.remove(REFRESH_TAG);
            tags.remove(STATE_TAG);
        };
        let marked = |aws: &FakeAws| mark_of(&aws.groups.lock().unwrap()["web"]);
        let first = marked(&aws).unwrap();
        // The worker died between StartInstanceRefresh and tagging the group.
        forget_mark();
        assert!(matches!(run(&aws, &req).await, StepOutput::Defer { .. }));
        assert_eq!(
            marked(&aws),
            Some(first.clone()),
            "the running refresh is marked again"
        );
        // The same, after the refresh had already rolled back: its outcome is reported.
        forget_mark();
        aws.refreshes.lock().unwrap().get_mut("web").unwrap()[0].status =
            "RollbackSuccessful".into();
        let (o, _) = outcome(&run(&aws, &req).await);
        assert_eq!(o, Outcome::RolledBack);
        assert_eq!(marked(&aws).unwrap().state, MarkState::RolledBack);
        let starts = aws
            .changes()
            .iter()
            .filter(|c| c.starts_with("start_refresh"))
            .count();
        assert_eq!(starts, 1, "{:?}", aws.changes());
        assert_eq!(marked(&aws).unwrap().refresh_id, first.refresh_id);
    }

    #[tokio::test]
    async fn a_late_request_for_an_ami_the_parameter_no_longer_holds_changes_nothing() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        // The parameter moved on (to OLD here: a request of an earlier rollout arrives late).
        aws.put_image("/golden/al2023/ami-id", OLD).await.unwrap();
        let before = aws.changes();
        let (o, reason) = outcome(&run(&aws, &request("web", Strategy::LaunchTemplate)).await);
        assert_eq!(o, Outcome::Skipped);
        assert!(reason.starts_with("superseded"), "{reason}");
        assert_eq!(aws.changes(), before, "nothing created, started or tagged");
    }

    #[tokio::test]
    async fn an_existing_version_with_the_ami_is_reused() {
        let aws = fake();
        aws.template("lt-1", &[OLD, NEW], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        run(&aws, &request("web", Strategy::LaunchTemplate)).await;
        assert!(
            !aws.changes()
                .iter()
                .any(|c| c.starts_with("create_version")),
            "{:?}",
            aws.changes()
        );
    }

    #[tokio::test]
    async fn a_group_whose_launch_template_was_deleted_fails_with_the_fix() {
        let aws = fake();
        aws.group("web", "lt-gone", "3", OLD, 2);
        let (o, reason) = outcome(&run(&aws, &request("web", Strategy::LaunchTemplate)).await);
        assert_eq!(o, Outcome::Failed);
        assert!(
            reason.contains("lt-gone") && reason.contains("no longer exists"),
            "{reason}"
        );
        assert!(aws.changes().is_empty());
    }

    #[tokio::test]
    async fn a_deleted_group_is_skipped() {
        let aws = fake();
        let (o, reason) = outcome(&run(&aws, &request("gone", Strategy::LaunchTemplate)).await);
        assert_eq!(o, Outcome::Skipped);
        assert!(reason.contains("no longer exists"), "{reason}");
    }

    #[tokio::test]
    async fn a_request_after_the_window_closed_is_skipped_without_changes() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        let mut req = request("web", Strategy::LaunchTemplate);
        req.deadline = Some(Utc::now() - chrono::Duration::minutes(1));
        let (o, reason) = outcome(&run(&aws, &req).await);
        assert_eq!(o, Outcome::Skipped);
        assert!(reason.contains("window closed"), "{reason}");
        assert!(aws.changes().is_empty());
    }

    #[tokio::test]
    async fn over_the_concurrency_limit_the_request_is_deferred() {
        let (aws, limit) = one_group_beyond_the_limit();
        for i in 0..limit {
            run(&aws, &request(&format!("g{i}"), Strategy::LaunchTemplate)).await;
        }
        match run(
            &aws,
            &request(&format!("g{limit}"), Strategy::LaunchTemplate),
        )
        .await
        {
            StepOutput::Defer { delay, reason } => {
                assert!(
                    (Duration::from_secs(7)..=Duration::from_secs(21)).contains(&delay),
                    "spread over one to three defer periods: {delay:?}"
                );
                assert!(
                    reason.contains(&format!("the limit is {limit}")),
                    "{reason}"
                );
            }
            other => panic!("not deferred: {other:?}"),
        }
        assert_eq!(aws.started.lock().unwrap().len(), limit);
    }

    /// A refresh holds its slot until it is closed, its success check included: a request waiting
    /// for the slot still waits while the ended refresh's instances are read, and starts after.
    #[tokio::test]
    async fn a_slot_is_held_until_the_close_has_checked_the_refresh() {
        let (aws, limit) = one_group_beyond_the_limit();
        let admission = fill_slots(&aws, limit).await;
        let next = request(&format!("g{limit}"), Strategy::LaunchTemplate);
        let full = |out: &StepOutput| matches!(out, StepOutput::Defer { reason, .. } if reason.contains(&format!("the limit is {limit}")));
        let out = run_in(&aws, &next, &admission).await;
        assert!(full(&out), "every slot is taken: {out:?}");
        aws.succeed("g0");
        let event = InstanceRefreshEvent {
            account: "111111111111".into(),
            region: "us-east-1".into(),
            kind: RefreshEventKind::Succeeded,
            instance_refresh_id: mark_of(&aws.groups.lock().unwrap()["g0"])
                .unwrap()
                .refresh_id,
            asg_name: "g0".into(),
        };
        // g0's success check reads its instances, and is held there until g{limit} was handled.
        let check = std::sync::Arc::new(tokio::sync::Notify::new());
        *aws.hold_instance_reads.lock().unwrap() = Some(check.clone());
        let (closed, during) = tokio::join!(
            refresh_event(&event, "111111111111", &aws, &aws, &admission),
            async {
                let out = run_in(&aws, &next, &admission).await;
                check.notify_one();
                out
            }
        );
        assert!(
            full(&during),
            "g{limit} waits during g0's check: {during:?}"
        );
        assert_eq!(aws.started.lock().unwrap().len(), limit);
        assert_eq!(outcome(&closed.unwrap()).0, Outcome::Succeeded);
        *aws.hold_instance_reads.lock().unwrap() = None;
        assert!(polls_later(&run_in(&aws, &next, &admission).await));
        assert_eq!(
            aws.started.lock().unwrap().len(),
            limit + 1,
            "g{limit} starts after the close"
        );
    }

    #[tokio::test]
    async fn requests_waiting_for_a_slot_cost_no_aws_call_but_in_flight_ones_still_poll() {
        let (aws, limit) = one_group_beyond_the_limit();
        let admission = Admission::default();
        let ask = |name: String| {
            let (aws, admission) = (&aws, &admission);
            async move { run_in(aws, &request(&name, Strategy::LaunchTemplate), admission).await }
        };
        for i in 0..limit {
            ask(format!("g{i}")).await;
        }
        // Full: the next group's request is deferred (and reads the in-flight groups once).
        assert!(matches!(
            ask(format!("g{limit}")).await,
            StepOutput::Defer { .. }
        ));
        let reads = || aws.group_reads.load(std::sync::atomic::Ordering::Relaxed);
        let calls = reads();
        assert!(matches!(
            ask(format!("g{limit}")).await,
            StepOutput::Defer { .. }
        ));
        assert_eq!(reads(), calls, "a waiting request asks AWS nothing");
        // A group in flight is still looked at: its request polls the refresh.
        ask("g0".into()).await;
        assert!(reads() > calls);
    }

    #[tokio::test]
    async fn a_refresh_started_here_holds_its_slot_even_if_its_mark_was_never_written() {
        let (aws, limit) = one_group_beyond_the_limit();
        let admission = fill_slots(&aws, limit).await;
        // The tag writes were lost: AWS shows nothing in flight.
        for g in aws.groups.lock().unwrap().values_mut() {
            g.tags.remove(REFRESH_TAG);
            g.tags.remove(STATE_TAG);
        }
        let req = request(&format!("g{limit}"), Strategy::LaunchTemplate);
        let out = run_in(&aws, &req, &admission).await;
        assert!(
            matches!(&out, StepOutput::Defer { reason, .. } if reason.contains("the limit is")),
            "{out:?}"
        );
        assert_eq!(aws.started.lock().unwrap().len(), limit);
    }

    #[tokio::test]
    async fn with_other_processes_admitting_too_each_start_is_confirmed_against_aws() {
        // This process starts one refresh; another process then fills the account (marks this
        // process's last read has not seen); then this process is asked for one more group.
        async fn starts_after_another_process_fills_the_account(confirm_start: bool) -> usize {
            let (aws, limit) = one_group_beyond_the_limit();
            let admission = Admission::default();
            let settings = RefreshSettings {
                confirm_start,
                ..settings()
            };
            let ask = |name: String| {
                let (aws, admission, settings) = (&aws, &admission, &settings);
                async move {
                    let req = request(&name, Strategy::LaunchTemplate);
                    let stage = stage();
                    let ctx = context(aws, &stage, settings, admission);
                    request_refresh(&ctx, &req, Utc::now()).await.unwrap()
                }
            };
            ask("g0".into()).await;
            for i in 1..limit {
                run(&aws, &request(&format!("g{i}"), Strategy::LaunchTemplate)).await;
            }
            let last = ask(format!("g{limit}")).await;
            if confirm_start {
                assert!(
                    matches!(&last, StepOutput::Defer { reason, .. } if reason.contains("the limit is")),
                    "{last:?}"
                );
            }
            aws.started.lock().unwrap().len()
        }
        let limit = stage().max_concurrent_refreshes as usize;
        assert_eq!(
            starts_after_another_process_fills_the_account(true).await,
            limit
        );
        // Trusting the ledger between reads is right only for the account's one worker.
        assert_eq!(
            starts_after_another_process_fills_the_account(false).await,
            limit + 1
        );
    }

    #[tokio::test]
    async fn the_event_of_a_refresh_started_here_closes_it_and_the_poll_after_costs_no_call() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        let admission = Admission::default();
        let req = request("web", Strategy::LaunchTemplate);
        assert!(matches!(
            run_in(&aws, &req, &admission).await,
            StepOutput::Defer { .. }
        ));
        let id = mark_of(&aws.groups.lock().unwrap()["web"])
            .unwrap()
            .refresh_id;
        aws.succeed("web");
        let reads = || aws.group_reads.load(std::sync::atomic::Ordering::Relaxed);
        let before = reads();
        let event = InstanceRefreshEvent {
            account: "111111111111".into(),
            region: "us-east-1".into(),
            kind: RefreshEventKind::Succeeded,
            instance_refresh_id: id.clone(),
            asg_name: "web".into(),
        };
        let (o, _) = outcome(
            &refresh_event(&event, "111111111111", &aws, &aws, &admission)
                .await
                .unwrap(),
        );
        assert_eq!(o, Outcome::Succeeded);
        assert_eq!(
            mark_of(&aws.groups.lock().unwrap()["web"]).unwrap().state,
            MarkState::Succeeded,
            "the close is written to the group"
        );
        let changes = aws.changes();
        let StepOutput::Emit(details) = run_in(&aws, &req, &admission).await else {
            panic!("the poll after the close says the outcome");
        };
        let [Detail::AsgRefreshFinished(f)] = details.as_slice() else {
            panic!("{details:?}");
        };
        assert_eq!(
            (f.outcome, f.instance_refresh_id.as_deref()),
            (Outcome::Succeeded, Some(id.as_str()))
        );
        // The event reads the group once, to check that it really is on the AMI;
        // the poll after it reads nothing.
        assert_eq!(
            reads(),
            before + 1,
            "the event read the group once to verify, the poll not at all"
        );
        assert_eq!(aws.changes(), changes, "and the poll changed nothing");
    }

    #[tokio::test]
    async fn a_resolve_ssm_group_is_refreshed_without_skip_matching_or_rollback() {
        let aws = fake();
        aws.template("lt-1", &["resolve:ssm:/golden/al2023/ami-id"], 1);
        aws.group("web", "lt-1", "$Default", OLD, 2);
        run(&aws, &request("web", Strategy::LaunchTemplate)).await;
        let (_, started) = &aws.started.lock().unwrap()[0];
        assert!(started.desired.is_none() && !started.auto_rollback && !started.skip_matching);
        assert!(
            !aws.changes()
                .iter()
                .any(|c| c.starts_with("create_version"))
        );
    }

    /// Group `web` owned by stack `app` in `status` with `parameters`.
    fn stack_owned(status: &str, parameters: Vec<(String, String, Option<String>)>) -> FakeAws {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        aws.groups
            .lock()
            .unwrap()
            .get_mut("web")
            .unwrap()
            .tags
            .insert(STACK_TAG.into(), "app".into());
        aws.stacks.lock().unwrap().insert(
            "app".into(),
            Stack {
                name: "app".into(),
                status: status.into(),
                parameters,
            },
        );
        aws
    }

    /// A stack-owned group's refresh is marked in its SSM parameter, never in its tags (they are
    /// the stack template's): a restarted worker counts it in flight from there and closes it
    /// there when its event arrives.
    #[tokio::test]
    async fn a_stack_owned_groups_refresh_is_marked_in_ssm_and_counted_and_closed_from_there() {
        let parameter = (
            "ImageId".into(),
            "/golden/al2023/ami-id".into(),
            Some(NEW.into()),
        );
        let aws = stack_owned("UPDATE_COMPLETE", vec![parameter]);
        // The stack re-resolved the AMI already: its template launches NEW, its instances run OLD.
        aws.template("lt-1", &[NEW], 1);
        let req = request("web", Strategy::Cloudformation);
        assert!(matches!(run(&aws, &req).await, StepOutput::Defer { .. }));
        let tags_of_web = || aws.groups.lock().unwrap()["web"].tags.clone();
        assert_eq!(
            tags_of_web().keys().collect::<Vec<_>>(),
            [STACK_TAG],
            "nothing but the stack's tags"
        );
        let marks = Marks::new(&aws, &aws);
        let group = aws.groups.lock().unwrap()["web"].clone();
        let running = marks.read(&group).await.unwrap().unwrap().mark;
        assert_eq!(
            (running.ami.as_str(), running.state),
            (NEW, MarkState::InProgress)
        );
        // A restarted worker: its one slot is taken by the refresh its parameter shows.
        let restarted = Admission::default();
        assert!(matches!(
            restarted.admit("other", 1, &marks).await.unwrap(),
            admission::Admit::Full { taken: 1, .. }
        ));
        aws.succeed("web");
        let event = InstanceRefreshEvent {
            account: "111111111111".into(),
            region: "us-east-1".into(),
            kind: RefreshEventKind::Succeeded,
            instance_refresh_id: running.refresh_id.clone(),
            asg_name: "web".into(),
        };
        let (o, _) = outcome(
            &refresh_event(&event, "111111111111", &aws, &aws, &restarted)
                .await
                .unwrap(),
        );
        assert_eq!(o, Outcome::Succeeded);
        let closed = marks.read(&group).await.unwrap().unwrap().mark;
        assert_eq!(
            (closed.state, closed.refresh_id.as_str()),
            (MarkState::Succeeded, running.refresh_id.as_str())
        );
        assert_eq!(tags_of_web().len(), 1, "{:?}", tags_of_web());
        assert!(marks.running().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_stack_being_updated_is_waited_for_not_touched() {
        let parameter = (
            "ImageId".into(),
            "/golden/al2023/ami-id".into(),
            Some(OLD.into()),
        );
        let aws = stack_owned("UPDATE_IN_PROGRESS", vec![parameter]);
        match run(&aws, &request("web", Strategy::Cloudformation)).await {
            StepOutput::Defer { reason, .. } => {
                assert!(reason.contains("app is UPDATE_IN_PROGRESS"), "{reason}")
            }
            other => panic!("not deferred: {other:?}"),
        }
        assert!(aws.changes().is_empty(), "{:?}", aws.changes());
    }

    #[tokio::test]
    async fn a_stack_without_an_ssm_typed_parameter_is_skipped_with_the_fix() {
        let aws = stack_owned("CREATE_COMPLETE", vec![]);
        let (o, reason) = outcome(&run(&aws, &request("web", Strategy::Cloudformation)).await);
        assert_eq!(o, Outcome::Skipped);
        assert!(
            reason.contains("AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"),
            "{reason}"
        );
        // Nothing of the stack's changes, nor of its group's tags (they are the template's: any
        // other is drift); the group is marked skipped, with the reason, in its SSM parameter.
        let changes = aws.changes();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(
            changes[0].starts_with("put_parameter /amiflow/marks/web {"),
            "{changes:?}"
        );
        let group = aws.groups.lock().unwrap()["web"].clone();
        assert!(
            group.tags.keys().all(|k| !k.starts_with("amiflow:")),
            "{:?}",
            group.tags
        );
        let record = Marks::new(&aws, &aws).read(&group).await.unwrap().unwrap();
        let mark = &record.mark;
        assert_eq!((mark.ami.as_str(), mark.state), (NEW, MarkState::Skipped));
        // Asked again in the same window: the same reason, nothing new.
        let (o, again) = outcome(&run(&aws, &request("web", Strategy::Cloudformation)).await);
        assert_eq!(aws.changes(), changes);
        // The whole reason, though it is longer than one tag value.
        let whole = record.reason.unwrap();
        assert!(whole.len() > 256, "{whole}");
        assert!(
            whole.starts_with("stack app does not take the AMI"),
            "{whole}"
        );
        assert!(
            whole.ends_with("Change the template to use such a parameter"),
            "{whole}"
        );
        assert_eq!((o, again.as_str()), (Outcome::Skipped, whole.as_str()));
    }

    /// A mixed-instances group on `lt-main` version 1 whose t3.small override launches from
    /// `override_template` version 1; the golden parameter holds NEW after OLD.
    fn mixed_with_override(aws: &FakeAws, override_template: Option<&str>) {
        mixed_with_override_at(aws, override_template, "1");
    }

    /// A group launching lt-main version 1, whose t3.small override launches `override_template`
    /// at `override_version`.
    fn mixed_with_override_at(
        aws: &FakeAws,
        override_template: Option<&str>,
        override_version: &str,
    ) {
        use aws_sdk_autoscaling::types::{
            LaunchTemplate, LaunchTemplateOverrides, LaunchTemplateSpecification,
            MixedInstancesPolicy,
        };
        let spec = |t: Option<&str>, version: &str| {
            LaunchTemplateSpecification::builder()
                .set_launch_template_id(t.map(Into::into))
                .version(version)
                .build()
        };
        let policy = MixedInstancesPolicy::builder()
            .launch_template(
                LaunchTemplate::builder()
                    .launch_template_specification(spec(Some("lt-main"), "1"))
                    .overrides(
                        LaunchTemplateOverrides::builder()
                            .instance_type("t3.small")
                            .launch_template_specification(spec(
                                override_template,
                                override_version,
                            ))
                            .build(),
                    )
                    .overrides(
                        LaunchTemplateOverrides::builder()
                            .instance_type("t3.micro")
                            .build(),
                    )
                    .build(),
            )
            .build();
        aws.template("lt-main", &[OLD], 1);
        aws.group("web", "lt-main", "1", OLD, 2);
        if let Some(g) = aws.groups.lock().unwrap().get_mut("web") {
            g.source = crate::aws::LaunchSource::Template {
                id: "lt-main".into(),
                version: "1".into(),
                mixed: Some(Box::new(policy)),
            };
        }
        aws.golden("/golden/al2023/ami-id", NEW, &[OLD]);
    }

    /// The (template, version) of the main template and of each override of a started refresh's
    /// desired configuration.
    fn desired_templates(aws: &FakeAws) -> Vec<(String, String)> {
        let (_, started) = &aws.started.lock().unwrap()[0];
        let lt = started
            .desired
            .as_ref()
            .and_then(|d| d.mixed_instances_policy())
            .and_then(|m| m.launch_template())
            .expect("a mixed desired configuration")
            .clone();
        let spec = |s: &aws_sdk_autoscaling::types::LaunchTemplateSpecification| {
            (
                s.launch_template_id().unwrap_or("-").to_owned(),
                s.version().unwrap_or("-").to_owned(),
            )
        };
        std::iter::once(spec(lt.launch_template_specification().unwrap()))
            .chain(
                lt.overrides()
                    .iter()
                    .filter_map(|o| o.launch_template_specification().map(spec)),
            )
            .collect()
    }

    #[tokio::test]
    async fn an_override_template_on_an_earlier_golden_ami_moves_with_the_main_one() {
        let aws = fake();
        mixed_with_override(&aws, Some("lt-over"));
        aws.template("lt-over", &[OLD], 1);
        run(&aws, &request("web", Strategy::LaunchTemplate)).await;
        let changes = aws.changes();
        assert_eq!(
            changes
                .iter()
                .filter(|c| c.starts_with("create_version"))
                .collect::<Vec<_>>(),
            // Overrides first: one that cannot be read stops the request before anything is made.
            [
                &format!("create_version lt-over from 1 {NEW}"),
                &format!("create_version lt-main from 1 {NEW}")
            ],
            "{changes:?}"
        );
        assert_eq!(
            desired_templates(&aws),
            [
                ("lt-main".to_owned(), "2".to_owned()),
                ("lt-over".to_owned(), "2".to_owned())
            ]
        );
        assert!(aws.started.lock().unwrap()[0].1.auto_rollback);
        assert_eq!(
            aws.history_reads.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the override's and the main template's AMIs are judged from one read of the history"
        );
    }

    #[tokio::test]
    async fn a_default_override_whose_refresh_fails_gets_its_default_version_back() {
        let aws = fake();
        mixed_with_override_at(&aws, Some("lt-over"), "$Default");
        aws.template("lt-over", &[OLD], 1);
        let req = request("web", Strategy::LaunchTemplate);
        run(&aws, &req).await;
        assert_eq!(default_of(&aws, "lt-over"), 2);
        assert_eq!(
            aws.templates.lock().unwrap()["lt-over"][1].description,
            format!(
                "amiflow: {NEW} | window {} | default was 1",
                deadline_text(req.deadline)
            )
        );
        // The pinned main template's version records no move.
        assert_eq!(
            aws.templates.lock().unwrap()["lt-main"][1].description,
            format!("amiflow: {NEW}")
        );
        end_refresh(&aws, "web", "Failed", "launch failed");
        let (o, reason) = outcome(&run(&aws, &req).await);
        assert_eq!(
            (o, reason.as_str()),
            (
                Outcome::Failed,
                "launch failed; the default version of lt-over was set back to 1 (from 2)"
            )
        );
        assert_eq!(default_of(&aws, "lt-over"), 1);
    }

    #[tokio::test]
    async fn a_main_template_on_the_ami_does_not_hide_an_override_on_an_earlier_one() {
        let aws = fake();
        mixed_with_override(&aws, Some("lt-over"));
        aws.template("lt-main", &[NEW], 1);
        aws.template("lt-over", &[OLD], 1);
        run(&aws, &request("web", Strategy::LaunchTemplate)).await;
        assert_eq!(
            desired_templates(&aws),
            [
                ("lt-main".to_owned(), "1".to_owned()),
                ("lt-over".to_owned(), "2".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn an_override_template_on_another_ami_is_left_alone() {
        let aws = fake();
        mixed_with_override(&aws, Some("lt-win"));
        aws.template("lt-win", &["ami-00000000000000win"], 1);
        run(&aws, &request("web", Strategy::LaunchTemplate)).await;
        assert!(
            !aws.changes().iter().any(|c| c.contains("lt-win")),
            "{:?}",
            aws.changes()
        );
        assert_eq!(
            desired_templates(&aws),
            [
                ("lt-main".to_owned(), "2".to_owned()),
                ("lt-win".to_owned(), "1".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn an_override_whose_template_cannot_be_read_fails_the_request_with_the_reason() {
        for (template, why) in [
            (
                Some("lt-gone"),
                "launch template lt-gone version 1 does not exist",
            ),
            (None, "its launch template specification names no template"),
        ] {
            let aws = fake();
            mixed_with_override(&aws, template);
            let (o, reason) = outcome(&run(&aws, &request("web", Strategy::LaunchTemplate)).await);
            assert_eq!(
                (o, reason),
                (
                    Outcome::Failed,
                    format!(
                        "the mixed-instances override for t3.small: {why}; fix the group's MixedInstancesPolicy"
                    )
                )
            );
            assert!(aws.changes().is_empty(), "{:?}", aws.changes());
        }
    }

    /// A `$Default` group whose default version is set back by hand while its refresh runs.
    fn default_group_changed_by_hand(aws: &FakeAws) {
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "$Default", OLD, 2);
    }

    #[tokio::test]
    async fn a_successful_refresh_is_checked_against_the_group_before_it_is_reported() {
        let aws = fake();
        default_group_changed_by_hand(&aws);
        let req = request("web", Strategy::LaunchTemplate);
        assert!(matches!(run(&aws, &req).await, StepOutput::Defer { .. }));
        // amiflow made version 2 (NEW) the default; someone sets 1 again during the refresh.
        for v in aws.templates.lock().unwrap().get_mut("lt-1").unwrap() {
            v.is_default = v.number == 1;
        }
        aws.succeed("web");
        let (o, reason) = outcome(&run(&aws, &req).await);
        assert_eq!(
            (o, reason.as_str()),
            (
                Outcome::Skipped,
                &*format!(
                    "superseded: the default version was changed by hand to 1 during the refresh; lt-1 launches {OLD}, not {NEW}"
                )
            )
        );
        let group = aws.groups.lock().unwrap()["web"].clone();
        assert_eq!(mark_of(&group).unwrap().state, MarkState::Skipped);
        assert_eq!(skip_reason(&group).as_deref(), Some(reason.as_str()));

        // The next window respects the hand-made choice and says so; nothing is made or started.
        let changes = aws.changes();
        let mut next = request("web", Strategy::LaunchTemplate);
        next.deadline = Some(Utc::now() + chrono::Duration::days(7));
        let (o, said) = outcome(&run(&aws, &next).await);
        assert_eq!(o, Outcome::Skipped);
        assert!(
            said.starts_with("respecting a hand-made change (superseded: the default version was changed by hand to 1")
                && said.ends_with("hand_made_changes = \"respect\" leaves it until the next golden AMI"),
            "{said}"
        );
        assert_eq!(aws.changes(), changes);
    }

    #[tokio::test]
    async fn a_stage_that_overrides_hand_made_changes_moves_the_group_again() {
        let aws = fake();
        default_group_changed_by_hand(&aws);
        let req = request("web", Strategy::LaunchTemplate);
        run(&aws, &req).await;
        for v in aws.templates.lock().unwrap().get_mut("lt-1").unwrap() {
            v.is_default = v.number == 1;
        }
        aws.succeed("web");
        outcome(&run(&aws, &req).await);
        let mut stage = stage();
        stage.hand_made_changes = crate::policy::HandMadeChanges::Override;
        let mut next = request("web", Strategy::LaunchTemplate);
        next.deadline = Some(Utc::now() + chrono::Duration::days(7));
        let admission = Admission::default();
        let settings = settings();
        let ctx = context(&aws, &stage, &settings, &admission);
        assert!(matches!(
            request_refresh(&ctx, &next, Utc::now()).await.unwrap(),
            StepOutput::Defer { .. }
        ));
        let changes = aws.changes();
        // The hand-made default (1) is undone: version 2 is made the default a second time.
        assert_eq!(
            changes
                .iter()
                .filter(|c| *c == "set_default_version lt-1 2")
                .count(),
            2,
            "{changes:?}"
        );
        assert_eq!(
            changes
                .iter()
                .filter(|c| c.starts_with("start_refresh"))
                .count(),
            2,
            "{changes:?}"
        );
    }

    #[tokio::test]
    async fn instances_left_behind_by_a_successful_refresh_fail_it_with_the_count() {
        let aws = fake();
        for g in ["web", "next"] {
            aws.template(&format!("lt-{g}"), &[OLD], 1);
            aws.group(g, &format!("lt-{g}"), "1", OLD, 2);
        }
        let admission = Admission::default();
        let req = request("web", Strategy::LaunchTemplate);
        run_in(&aws, &req, &admission).await;
        aws.succeed("web");
        aws.instance_amis
            .lock()
            .unwrap()
            .insert("i-web-1".into(), OLD.into());
        let (o, reason) = outcome(&run_in(&aws, &req, &admission).await);
        assert_eq!(
            (o, reason),
            (
                Outcome::Failed,
                format!("the refresh ended successful, but 1 of 2 instances still run {OLD}")
            )
        );
        // The failure the check found counts against qa's tolerance (0) from its close.
        let next = request("next", Strategy::LaunchTemplate);
        assert_eq!(
            outcome(&run_in(&aws, &next, &admission).await).0,
            Outcome::Halted
        );
        assert_eq!(aws.started.lock().unwrap().len(), 1, "only web started");
    }

    /// After a success, instances Auto Scaling says were launched from the group's new version
    /// are not read; the others are, and one of them left behind still fails the refresh.
    #[tokio::test]
    async fn after_a_success_only_instances_not_launched_from_the_new_version_are_read() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 3);
        let req = request("web", Strategy::LaunchTemplate);
        run(&aws, &req).await;
        aws.succeed("web");
        aws.launched_from("web", "lt-1", "2");
        aws.groups
            .lock()
            .unwrap()
            .get_mut("web")
            .unwrap()
            .launched_from
            .get_mut("i-web-2")
            .unwrap()
            .version = "1".into();
        aws.instance_amis
            .lock()
            .unwrap()
            .insert("i-web-2".into(), OLD.into());
        aws.instance_reads
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let (o, reason) = outcome(&run(&aws, &req).await);
        assert_eq!(
            (o, reason),
            (
                Outcome::Failed,
                format!("the refresh ended successful, but 1 of 3 instances still run {OLD}")
            )
        );
        assert_eq!(
            aws.instance_reads
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "only the instance launched from version 1 is read"
        );
    }

    /// The default version of `template` in the fake.
    fn default_of(aws: &FakeAws, template: &str) -> i64 {
        aws.templates.lock().unwrap()[template]
            .iter()
            .find(|v| v.is_default)
            .unwrap()
            .number
    }

    /// End the group's newest refresh as AWS would report it.
    fn end_refresh(aws: &FakeAws, group: &str, status: &str, reason: &str) {
        let mut refreshes = aws.refreshes.lock().unwrap();
        let newest = &mut refreshes.get_mut(group).unwrap()[0];
        newest.status = status.into();
        newest.reason = reason.into();
    }

    #[tokio::test]
    async fn a_default_groups_refresh_that_does_not_succeed_gets_its_default_version_back() {
        for (status, outcome_said) in [
            ("RollbackSuccessful", Outcome::RolledBack),
            ("Failed", Outcome::Failed),
            ("Cancelled", Outcome::Cancelled),
        ] {
            let aws = fake();
            aws.template("lt-1", &[OLD], 1);
            aws.group("web", "lt-1", "$Default", OLD, 2);
            let req = request("web", Strategy::LaunchTemplate);
            assert!(matches!(run(&aws, &req).await, StepOutput::Defer { .. }));
            assert_eq!(default_of(&aws, "lt-1"), 2);
            // What was moved is in AWS before the default moves (a worker that dies in between
            // still knows what to put back): in the description of the version made for it, so
            // moving the default costs no other write.
            let changes = aws.changes();
            let made = changes
                .iter()
                .position(|c| c == &format!("create_version lt-1 from 1 {NEW}"))
                .expect("a version is made");
            let moved = changes
                .iter()
                .position(|c| c == "set_default_version lt-1 2")
                .expect("the default is moved");
            assert!(made < moved, "{changes:?}");
            let window = deadline_text(req.deadline);
            assert_eq!(
                aws.templates.lock().unwrap()["lt-1"][1].description,
                format!("amiflow: {NEW} | window {window} | default was 1")
            );
            assert!(
                !changes
                    .iter()
                    .any(|c| c.starts_with("set_tag web amiflow:restore-default")),
                "{changes:?}"
            );

            end_refresh(
                &aws,
                "web",
                status,
                "the replacements failed their health checks",
            );
            // Polled by a worker that did not start it (nothing remembered in memory).
            let (o, reason) = outcome(&run(&aws, &req).await);
            assert_eq!(
                (o, reason.as_str()),
                (
                    outcome_said,
                    "the replacements failed their health checks; the default version of lt-1 was set back to 1 (from 2)"
                ),
                "{status}"
            );
            assert_eq!(default_of(&aws, "lt-1"), 1, "{status}");
            assert_eq!(
                mark_of(&aws.groups.lock().unwrap()["web"]).unwrap().state,
                MarkState::from(outcome_said)
            );
        }
    }

    #[tokio::test]
    async fn a_default_changed_by_hand_during_a_failed_refresh_is_left_as_set() {
        let aws = fake();
        aws.template("lt-1", &[OLD, OLD], 1);
        aws.group("web", "lt-1", "$Default", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        run(&aws, &req).await;
        assert_eq!(default_of(&aws, "lt-1"), 3);
        // Someone picks version 2 while the refresh runs; then it rolls back.
        for v in aws.templates.lock().unwrap().get_mut("lt-1").unwrap() {
            v.is_default = v.number == 2;
        }
        end_refresh(&aws, "web", "RollbackSuccessful", "alarm");
        let before = aws.changes();
        let (o, reason) = outcome(&run(&aws, &req).await);
        assert_eq!(
            (o, reason.as_str()),
            (
                Outcome::RolledBack,
                "alarm; the default version of lt-1 was left at 2: changed by hand during the refresh (amiflow had set 3, it was 1 before)"
            )
        );
        assert_eq!(default_of(&aws, "lt-1"), 2, "the hand-made default stands");
        assert!(
            !aws.changes()[before.len()..]
                .iter()
                .any(|c| c.starts_with("set_default_version")),
            "{:?}",
            aws.changes()
        );
    }

    #[tokio::test]
    async fn a_start_asked_again_keeps_the_first_attempts_record_of_the_default() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "$Default", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        run(&aws, &req).await;
        // The first attempt moved the default, then its refresh never started (a lost reply).
        aws.refreshes.lock().unwrap().clear();
        {
            let mut groups = aws.groups.lock().unwrap();
            let tags = &mut groups.get_mut("web").unwrap().tags;
            tags.remove(REFRESH_TAG);
            tags.remove(STATE_TAG);
        }
        assert!(matches!(run(&aws, &req).await, StepOutput::Defer { .. }));
        assert_eq!(
            aws.templates.lock().unwrap()["lt-1"][1].description,
            format!(
                "amiflow: {NEW} | window {} | default was 1",
                deadline_text(req.deadline)
            ),
            "the default before the first attempt, not the one it set"
        );
        end_refresh(&aws, "web", "Failed", "launch failed");
        let (o, reason) = outcome(&run(&aws, &req).await);
        assert_eq!(o, Outcome::Failed);
        assert!(reason.ends_with("set back to 1 (from 2)"), "{reason}");
        assert_eq!(default_of(&aws, "lt-1"), 1);
    }

    #[tokio::test]
    async fn a_version_made_in_another_window_moves_the_default_with_the_record_on_the_group() {
        let aws = fake();
        // Version 2 already holds the AMI (made in an earlier window, whose refresh failed and
        // put the default back): its description cannot record this move.
        aws.template("lt-1", &[OLD, NEW], 1);
        aws.group("web", "lt-1", "$Default", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        assert!(matches!(run(&aws, &req).await, StepOutput::Defer { .. }));
        let changes = aws.changes();
        assert!(
            !changes.iter().any(|c| c.starts_with("create_version")),
            "{changes:?}"
        );
        let recorded = changes
            .iter()
            .position(|c| c.starts_with("set_tag web amiflow:restore-default="))
            .expect("the move is recorded on the group");
        let moved = changes
            .iter()
            .position(|c| c == "set_default_version lt-1 2")
            .expect("the default is moved");
        assert!(recorded < moved, "{changes:?}");
        assert_eq!(
            aws.groups.lock().unwrap()["web"].tags["amiflow:restore-default"],
            format!("{NEW}|{}|lt-1:1:2", deadline_text(req.deadline))
        );
        end_refresh(&aws, "web", "Failed", "launch failed");
        let (o, reason) = outcome(&run(&aws, &req).await);
        assert_eq!(
            (o, reason.as_str()),
            (
                Outcome::Failed,
                "launch failed; the default version of lt-1 was set back to 1 (from 2)"
            )
        );
        assert_eq!(default_of(&aws, "lt-1"), 1);
    }

    #[tokio::test]
    async fn the_instance_refresh_event_restores_the_default_too_and_a_success_keeps_it() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.template("lt-2", &[OLD], 1);
        aws.group("bad", "lt-1", "$Default", OLD, 2);
        aws.group("good", "lt-2", "$Default", OLD, 2);
        let admission = Admission::default();
        for g in ["bad", "good"] {
            run_in(&aws, &request(g, Strategy::LaunchTemplate), &admission).await;
        }
        end_refresh(&aws, "bad", "RollbackSuccessful", "health checks");
        aws.succeed("good");
        let event = |group: &str, kind| InstanceRefreshEvent {
            account: "111111111111".into(),
            region: "us-east-1".into(),
            kind,
            instance_refresh_id: aws.refreshes.lock().unwrap()[group][0].id.clone(),
            asg_name: group.into(),
        };
        let (o, reason) = outcome(
            &refresh_event(
                &event("bad", RefreshEventKind::RollbackSucceeded),
                "111111111111",
                &aws,
                &aws,
                &admission,
            )
            .await
            .unwrap(),
        );
        assert_eq!(
            (o, reason.as_str()),
            (
                Outcome::RolledBack,
                "health checks; the default version of lt-1 was set back to 1 (from 2)"
            )
        );
        let (o, _) = outcome(
            &refresh_event(
                &event("good", RefreshEventKind::Succeeded),
                "111111111111",
                &aws,
                &aws,
                &admission,
            )
            .await
            .unwrap(),
        );
        assert_eq!(o, Outcome::Succeeded);
        assert_eq!((default_of(&aws, "lt-1"), default_of(&aws, "lt-2")), (1, 2));
    }

    #[tokio::test]
    async fn a_pinned_groups_failed_refresh_moves_no_default_version() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        run(&aws, &req).await;
        end_refresh(&aws, "web", "RollbackSuccessful", "health checks");
        let (o, reason) = outcome(&run(&aws, &req).await);
        assert_eq!((o, reason.as_str()), (Outcome::RolledBack, "health checks"));
        assert!(
            !aws.changes().iter().any(|c| c.contains("default")),
            "{:?}",
            aws.changes()
        );
    }

    #[tokio::test]
    async fn the_stages_max_healthy_percentage_and_bake_time_go_with_the_refresh() {
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        let mut stage = stage();
        stage.min_healthy_percentage = 100;
        stage.max_healthy_percentage = Some(200);
        stage.bake_time_seconds = Some(900);
        let admission = Admission::default();
        let settings = settings();
        let ctx = context(&aws, &stage, &settings, &admission);
        request_refresh(&ctx, &request("web", Strategy::LaunchTemplate), Utc::now())
            .await
            .unwrap();
        let (_, started) = aws.started.lock().unwrap()[0].clone();
        assert_eq!(
            (
                started.min_healthy_percentage,
                started.max_healthy_percentage,
                started.bake_time
            ),
            (100, Some(200), Some(900))
        );
        // The local policy's stages set neither: AWS's defaults, as before.
        let aws = fake();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        run(&aws, &request("web", Strategy::LaunchTemplate)).await;
        let (_, started) = &aws.started.lock().unwrap()[0];
        assert_eq!(
            (started.max_healthy_percentage, started.bake_time),
            (None, None)
        );
    }
}
