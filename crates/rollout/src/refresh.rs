//! refresh-worker (spoke): move one group to the new AMI without fighting its owner, then report
//! the outcome. The message is never held while a refresh runs: the group carries a tag
//! (`amiflow:refresh`) naming the AMI, window and refresh id, and the outcome arrives as an Auto
//! Scaling instance-refresh event (or is found by polling when a request is delivered again).
//!
//! Rollback (AWS user guide, "Undo changes with a manual or auto rollback") needs a desired
//! configuration and a group pinned to a version number; `$Latest`/`$Default` and `resolve:ssm:`
//! groups are refreshed without rollback unless the policy pins them, and the outcome says so.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use aws_sdk_autoscaling::types::{DesiredConfiguration, LaunchTemplateSpecification};
use chrono::{DateTime, Utc};
use events::{
    AsgRefreshFinished, AsgRefreshRequested, Detail, InstanceRefreshEvent, Outcome,
    RefreshEventKind, Strategy,
};
use runtime::{StepError, StepOutput};

use crate::aws::{Group, Groups, LaunchSource, Parameters, RefreshRequest, Stacks};
use crate::policy::{CloudFormationMode, Stage};

/// Tag marking a group's refresh: `<ami>|<state>|<refresh id>|<deadline or ->|<parameter>`.
pub const REFRESH_TAG: &str = "amiflow:refresh";
/// Tag holding just the mark's state, so the refreshes in flight are found with a server-side
/// tag filter instead of listing every group ever refreshed.
pub const STATE_TAG: &str = "amiflow:refresh-state";
/// Tag holding why the last request for the mark's AMI was skipped (Auto Scaling tag values hold
/// 256 characters), so `amictl status` can say it without the event.
pub const REASON_TAG: &str = "amiflow:refresh-reason";
/// Tag CloudFormation puts on the groups it owns.
pub const STACK_TAG: &str = "aws:cloudformation:stack-name";

/// A group's refresh mark, parsed from [`REFRESH_TAG`].
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub ami: String,
    /// `in-progress` or an outcome (`succeeded`, `rolled-back`, ...).
    pub state: String,
    pub refresh_id: String,
    pub deadline: String,
    pub parameter: String,
}

impl Mark {
    fn render(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.ami, self.state, self.refresh_id, self.deadline, self.parameter
        )
    }
}

pub fn mark_of(group: &Group) -> Option<Mark> {
    let value = group.tags.get(REFRESH_TAG)?;
    let parts: Vec<&str> = value.splitn(5, '|').collect();
    let [ami, state, refresh_id, deadline, parameter] = parts[..] else {
        return None;
    };
    Some(Mark {
        ami: ami.into(),
        state: state.into(),
        refresh_id: refresh_id.into(),
        deadline: deadline.into(),
        parameter: parameter.into(),
    })
}

fn deadline_text(d: Option<DateTime<Utc>>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

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

/// Handle one `AsgRefreshRequested`.
// The AWS capabilities are separate trait objects so each unit test fakes only what it needs;
// bundling them with the settings into one struct would only move the list elsewhere.
#[allow(clippy::too_many_arguments)]
pub async fn request_refresh(
    req: &AsgRefreshRequested,
    now: DateTime<Utc>,
    groups: &impl Groups,
    stacks: &impl Stacks,
    params: &impl Parameters,
    stage: &Stage,
    settings: &RefreshSettings,
    admission: &Admission,
) -> Result<StepOutput, StepError> {
    let window = deadline_text(req.deadline);
    if let Some(done) = admission.closed_here(req, &window) {
        return Ok(done);
    }
    // Most requests can only wait for a slot (a window opens with every stale group at once):
    // they are answered before any other call, which would only be repeated next time.
    let limit = stage.max_concurrent_refreshes as usize;
    let slot = match admission.admit(&req.asg_name, limit, groups).await? {
        Admit::Full { taken, waiting } => {
            return Ok(spread_defer(settings, taken, limit, waiting));
        }
        Admit::InFlight => None,
        Admit::Slot(slot) => Some(slot),
    };
    // Independent reads go out together: a start's latency holds a slot.
    let (group, current) = tokio::join!(groups.get(&req.asg_name), params.get(&req.parameter_name));
    let Some(group) = group? else {
        return Ok(finished(
            req,
            Outcome::Skipped,
            format!("group {} no longer exists", req.asg_name),
        ));
    };
    // The mark on the group, or one this process started and has not written yet (a failed
    // tag write).
    let mark = mark_of(&group).filter(|m| m.ami == req.ami_id).or_else(|| {
        admission
            .running(&req.asg_name)
            .filter(|m| m.ami == req.ami_id)
    });
    if let Some(mark) = mark {
        if mark.state == "in-progress" {
            // Delivered again while ours runs: poll it (events are best effort).
            return poll(req, &group, &mark, groups, settings, admission).await;
        }
        // Ended (closed by another process, or by hand): it no longer holds a slot here.
        admission.forget(&req.asg_name, &mark.refresh_id);
        if mark.deadline == window {
            // This window already tried and ended: say so again, start nothing new.
            let outcome = outcome_named(&mark.state);
            let reason = match group.tags.get(REASON_TAG) {
                Some(why) if outcome == Outcome::Skipped => why.clone(),
                _ => format!(
                    "already ended {} in this window (refresh {})",
                    mark.state, mark.refresh_id
                ),
            };
            return Ok(finished(req, outcome, reason));
        }
    }
    // A request of an earlier rollout delivered late must not move the group back: act only on
    // the AMI the golden parameter holds now.
    if let Some(current) = current?
        && current.value != req.ami_id
    {
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
    // The group's refreshes (to recognise one of ours, or someone else's) are read while the
    // plan is made.
    let decide = async {
        match req.strategy {
            Strategy::Cloudformation => cloudformation(req, &group, stacks, stage, settings).await,
            Strategy::LaunchTemplate => launch_template(req, &group, groups, stage).await,
        }
    };
    let (decided, refreshes) = tokio::join!(decide, groups.refreshes(&req.asg_name));
    let plan = match (req.strategy, decided?) {
        (_, Ok(plan)) => plan,
        (Strategy::Cloudformation, Err(done)) => {
            return remember_skip(req, &window, done, groups).await;
        }
        (Strategy::LaunchTemplate, Err(done)) => return Ok(done),
    };
    if let Some(plan) = &plan
        && plan.already_there
    {
        let images = groups.instance_images(&group.instance_ids).await?;
        if images.values().all(|a| *a == req.ami_id) {
            return Ok(finished(
                req,
                Outcome::Succeeded,
                "already on the AMI: nothing to refresh",
            ));
        }
    }
    let plan = plan.unwrap_or_default();
    let refreshes = refreshes?;
    if let Some(adopted) = adopt(
        req, &group, &plan, &window, &refreshes, groups, settings, admission,
    )
    .await?
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
    if let Some(action) = &plan.before_refresh {
        action.run(groups).await?;
    }
    let request = RefreshRequest {
        desired: plan.desired.clone(),
        auto_rollback: plan.desired.is_some(),
        skip_matching: plan.new_version,
        min_healthy_percentage: stage.min_healthy_percentage,
        checkpoints: stage.checkpoints.clone(),
        checkpoint_delay: stage.checkpoint_delay_seconds,
        alarms: stage.alarms.clone(),
    };
    if settings.confirm_start
        && let Some((taken, waiting)) = admission.confirm(&req.asg_name, limit, groups).await?
    {
        return Ok(spread_defer(settings, taken, limit, waiting));
    }
    // The slot (held since the check above, or the group's own if it was counted in flight
    // already) passes to the running refresh.
    let id = groups.start_refresh(&req.asg_name, &request).await?;
    let mark = Mark {
        ami: req.ami_id.clone(),
        state: "in-progress".into(),
        refresh_id: id.clone(),
        deadline: window,
        parameter: req.parameter_name.clone(),
    };
    admission.started(&req.asg_name, &mark);
    drop(slot);
    groups
        .set_tags(
            &req.asg_name,
            &[(REFRESH_TAG, &mark.render()), (STATE_TAG, &mark.state)],
        )
        .await?;
    tracing::info!(group = %req.asg_name, refresh = %id, how = %plan.how, "instance refresh started");
    Ok(check_later(settings, &id))
}

/// A refresh of ours whose mark was never written: the worker stopped (a crash, a lost reply)
/// between starting it and tagging the group. It is recognised by its desired configuration, the
/// version made for this AMI, and taken over instead of being started a second time: marked if it
/// still runs, closed with its outcome if it has ended. (Unpinned groups have no desired
/// configuration to recognise; their refresh is found "started by someone else" and waited for,
/// after which the group is already on the AMI.)
#[allow(clippy::too_many_arguments)]
async fn adopt(
    req: &AsgRefreshRequested,
    group: &Group,
    plan: &Plan,
    window: &str,
    refreshes: &[crate::aws::Refresh],
    groups: &impl Groups,
    settings: &RefreshSettings,
    admission: &Admission,
) -> Result<Option<StepOutput>, StepError> {
    let Some(version) = plan.desired.as_ref().and_then(crate::aws::desired_version) else {
        return Ok(None);
    };
    if mark_of(group).is_some_and(|m| m.ami == req.ami_id) {
        // Marked for this AMI: an earlier window's attempt, which a new window may retry.
        return Ok(None);
    }
    let Some(ours) = refreshes
        .iter()
        .find(|r| r.desired_version.as_deref() == Some(version.as_str()))
    else {
        return Ok(None);
    };
    let mark = Mark {
        ami: req.ami_id.clone(),
        state: "in-progress".into(),
        refresh_id: ours.id.clone(),
        deadline: window.to_owned(),
        parameter: req.parameter_name.clone(),
    };
    tracing::info!(group = %req.asg_name, refresh = %ours.id, status = %ours.status, "found an unmarked refresh of ours; taking it over");
    if ours.is_active() {
        admission.started(&req.asg_name, &mark);
        groups
            .set_tags(
                &req.asg_name,
                &[(REFRESH_TAG, &mark.render()), (STATE_TAG, &mark.state)],
            )
            .await?;
        return Ok(Some(check_later(settings, &ours.id)));
    }
    match outcome_of_status(&ours.status) {
        Some(outcome) => Ok(Some(
            close(req, &mark, outcome, &ours.reason, groups, admission).await?,
        )),
        None => Ok(None),
    }
}

/// A stack-owned group is skipped for as long as its stack stays as it is: mark the group, with
/// the reason, so compliance reports it skipped (and why) rather than stale.
async fn remember_skip(
    req: &AsgRefreshRequested,
    window: &str,
    done: StepOutput,
    groups: &impl Groups,
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
        state: Outcome::Skipped.as_str().into(),
        refresh_id: "-".into(),
        deadline: window.to_owned(),
        parameter: req.parameter_name.clone(),
    };
    let reason: String = f.reason.chars().take(256).collect();
    groups
        .set_tags(
            &req.asg_name,
            &[
                (REFRESH_TAG, &mark.render()),
                (STATE_TAG, &mark.state),
                (REASON_TAG, &reason),
            ],
        )
        .await?;
    Ok(done)
}

/// What this process knows of its account's refreshes in flight, and the slots it hands out.
///
/// The groups in flight are those AWS showed marked in progress at the last read (at most
/// [`REREAD`] old), corrected by what this process did since: the refreshes it started (whose
/// mark may not be written yet) and those it closed. A request holds a slot from the check until
/// its refresh starts or it gives up, so two requests can never both take the last slot, and the
/// requests that can only wait (a window opens on every stale group at once) are answered without
/// any AWS call. The slots are counted in this process: run one refresh worker per account.
#[derive(Debug, Default)]
pub struct Admission {
    ledger: std::sync::Mutex<Ledger>,
    /// One read of AWS's marks at a time.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Ledger {
    /// When the last read of AWS's marks began, and the groups it found in progress.
    read: Option<(Instant, BTreeSet<String>)>,
    /// Refreshes started (or taken over) here and not yet closed here, by group.
    started: HashMap<String, Mark>,
    /// When refreshes seen to end here ended, by group: a read begun before does not count them.
    ended: HashMap<String, Instant>,
    /// Refreshes closed here (the mark written), by group, kept for [`CLOSED_KEPT`].
    closed: HashMap<String, Closed>,
    /// Groups holding a slot between the check and their start.
    reserved: BTreeSet<String>,
    /// Groups whose request was last told to wait, and when (kept until admitted, or an hour).
    waiting: HashMap<String, Instant>,
}

#[derive(Debug, Clone)]
struct Closed {
    at: Instant,
    mark: Mark,
    outcome: Outcome,
    reason: String,
}

/// How old the read of AWS's marks may be. Between reads only this process's own starts and
/// closes change the count, and it knows those; the read catches what others did.
const REREAD: Duration = Duration::from_secs(30);
/// How long a close made here answers the request that comes back to poll it.
const CLOSED_KEPT: Duration = Duration::from_secs(3600);

impl Ledger {
    /// Note that the group's request was told to wait; how many requests wait now.
    fn wait(&mut self, group: &str) -> usize {
        self.waiting.insert(group.to_owned(), Instant::now());
        self.waiting.retain(|_, at| at.elapsed() < CLOSED_KEPT);
        self.waiting.len()
    }

    fn in_flight(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = match &self.read {
            Some((read_at, names)) => names
                .iter()
                .filter(|g| self.ended.get(*g).is_none_or(|at| at < read_at))
                .cloned()
                .collect(),
            None => BTreeSet::new(),
        };
        names.extend(self.started.keys().cloned());
        names
    }
}

/// The answer of [`Admission::admit`].
enum Admit<'a> {
    /// The group's refresh is in flight already: its request comes back to poll it.
    InFlight,
    /// A free slot, held for the group until the guard is dropped or its refresh starts.
    Slot(Slot<'a>),
    /// Every slot is taken (by `taken` refreshes and requests about to start one), and `waiting`
    /// requests wait for one.
    Full { taken: usize, waiting: usize },
}

struct Slot<'a> {
    admission: &'a Admission,
    group: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.admission.ledger().reserved.remove(&self.group);
    }
}

impl Admission {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_is_fresh(&self) -> bool {
        self.ledger()
            .read
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < REREAD)
    }

    /// Read AWS's in-progress marks if the last read is too old, or with `now` at once (one
    /// reader at a time).
    async fn reread(&self, groups: &impl Groups, now: bool) -> Result<(), StepError> {
        if !now && self.read_is_fresh() {
            return Ok(());
        }
        let _one = self.reading.lock().await;
        if !now && self.read_is_fresh() {
            return Ok(());
        }
        let began = Instant::now();
        let names = groups
            .with_tag_value(STATE_TAG, "in-progress")
            .await?
            .into_iter()
            .filter(|g| mark_of(g).is_some_and(|m| m.state == "in-progress"))
            .map(|g| g.name)
            .collect();
        let mut ledger = self.ledger();
        ledger.read = Some((began, names));
        ledger.closed.retain(|_, c| c.at.elapsed() < CLOSED_KEPT);
        // Ends before this read are in it.
        ledger.ended.retain(|_, at| *at >= began);
        Ok(())
    }

    async fn admit(
        &self,
        group: &str,
        limit: usize,
        groups: &impl Groups,
    ) -> Result<Admit<'_>, StepError> {
        self.reread(groups, false).await?;
        let mut ledger = self.ledger();
        let in_flight = ledger.in_flight();
        if in_flight.contains(group) {
            ledger.waiting.remove(group);
            return Ok(Admit::InFlight);
        }
        let taken = in_flight.len() + ledger.reserved.len();
        // A second request for a group already about to start waits too.
        if taken >= limit || ledger.reserved.contains(group) {
            let waiting = ledger.wait(group);
            return Ok(Admit::Full { taken, waiting });
        }
        ledger.waiting.remove(group);
        ledger.reserved.insert(group.to_owned());
        Ok(Admit::Slot(Slot {
            admission: self,
            group: group.to_owned(),
        }))
    }

    /// Just before a start, when other processes may start refreshes too: if a read of AWS's
    /// marks made now leaves no slot free, the slots taken by others than `group` and how many
    /// requests wait.
    async fn confirm(
        &self,
        group: &str,
        limit: usize,
        groups: &impl Groups,
    ) -> Result<Option<(usize, usize)>, StepError> {
        self.reread(groups, true).await?;
        let mut ledger = self.ledger();
        let taken = ledger.in_flight().iter().filter(|g| *g != group).count()
            + ledger.reserved.iter().filter(|g| *g != group).count();
        if taken < limit {
            return Ok(None);
        }
        let waiting = ledger.wait(group);
        Ok(Some((taken, waiting)))
    }

    /// A refresh of ours runs on the group (started or taken over here): it holds a slot until
    /// closed, whether or not its mark has been written yet.
    fn started(&self, group: &str, mark: &Mark) {
        let mut ledger = self.ledger();
        ledger.reserved.remove(group);
        ledger.closed.remove(group);
        ledger.ended.remove(group);
        ledger.started.insert(group.to_owned(), mark.clone());
    }

    /// The mark of a refresh started here that is still running.
    fn running(&self, group: &str) -> Option<Mark> {
        self.ledger().started.get(group).cloned()
    }

    /// The group's refresh `refresh_id` has ended, wherever it was closed.
    fn forget(&self, group: &str, refresh_id: &str) {
        let mut ledger = self.ledger();
        if ledger
            .started
            .get(group)
            .is_some_and(|m| m.refresh_id == refresh_id)
        {
            ledger.started.remove(group);
        }
    }

    /// The group's refresh has ended: it holds no slot from now on.
    fn ended(&self, group: &str) {
        let mut ledger = self.ledger();
        ledger.started.remove(group);
        ledger.ended.insert(group.to_owned(), Instant::now());
    }

    /// The group's refresh has ended and its mark says so.
    fn closed(&self, group: &str, mark: &Mark, outcome: Outcome, reason: &str) {
        let mut ledger = self.ledger();
        ledger.closed.insert(
            group.to_owned(),
            Closed {
                at: Instant::now(),
                mark: mark.clone(),
                outcome,
                reason: reason.to_owned(),
            },
        );
    }

    /// The outcome, if this process closed the request's refresh (its instance-refresh event
    /// came first): said again with no AWS call when the request comes back to poll.
    fn closed_here(&self, req: &AsgRefreshRequested, window: &str) -> Option<StepOutput> {
        let ledger = self.ledger();
        let c = ledger.closed.get(&req.asg_name)?;
        if c.mark.ami != req.ami_id || c.mark.deadline != window {
            return None;
        }
        let mut f = AsgRefreshFinished::new(req, c.outcome, c.reason.clone());
        f.instance_refresh_id = Some(c.mark.refresh_id.clone());
        Some(StepOutput::Emit(vec![Detail::from(f)]))
    }
}

/// Deferred requests come back spread over one to three `defer` periods, so they do not all ask
/// again at the same moment; when many wait, proportionally later (up to five times), so that
/// about two per slot come back per `defer` period instead of all of them. Each return costs a
/// receive and a re-send, and hundreds of waiting requests would otherwise spend more on asking
/// again than the refreshes themselves cost.
fn spread_defer(
    settings: &RefreshSettings,
    in_flight: usize,
    limit: usize,
    waiting: usize,
) -> StepOutput {
    let crowd = (waiting as f64 / (2.0 * limit.max(1) as f64)).clamp(1.0, MAX_CROWD);
    let mut spread = settings.clone();
    spread.defer = settings
        .defer
        .mul_f64(crowd * (1.0 + 2.0 * fastrand::f64()));
    defer(
        &spread,
        format!("{in_flight} refreshes in flight; the limit is {limit}; {waiting} requests wait"),
    )
}

/// The most a crowd of waiting requests stretches their deferral.
const MAX_CROWD: f64 = 5.0;

/// What a refresh will be started with.
#[derive(Debug, Default)]
struct Plan {
    desired: Option<DesiredConfiguration>,
    before_refresh: Option<BeforeRefresh>,
    /// The group's configuration already launches the AMI (only instances may lag).
    already_there: bool,
    /// The refresh moves the group to another launch template version, so instances already on
    /// it can be skipped (AWS's SkipMatching compares template and version, not the AMI).
    new_version: bool,
    how: String,
}

#[derive(Debug)]
enum BeforeRefresh {
    SetDefault { template: String, version: i64 },
}

impl BeforeRefresh {
    async fn run(&self, groups: &impl Groups) -> Result<(), StepError> {
        match self {
            BeforeRefresh::SetDefault { template, version } => {
                groups.set_default_version(template, *version).await
            }
        }
    }
}

type Decided = Result<Option<Plan>, StepOutput>;

async fn launch_template(
    req: &AsgRefreshRequested,
    group: &Group,
    groups: &impl Groups,
    stage: &Stage,
) -> Result<Decided, StepError> {
    let (template, spec, mixed) = match &group.source {
        LaunchSource::LaunchConfiguration(name) => {
            return Ok(Err(finished(
                req,
                Outcome::Skipped,
                format!(
                    "uses launch configuration {name}: launch configurations cannot be updated; migrate the group to a launch template"
                ),
            )));
        }
        LaunchSource::None => {
            return Ok(Err(finished(
                req,
                Outcome::Skipped,
                "the group has no launch template",
            )));
        }
        LaunchSource::Template { id, version, mixed } => {
            (id.clone(), version.clone(), mixed.clone())
        }
    };
    let Some(current) = groups.template_version(&template, &spec).await? else {
        return Ok(Err(finished(
            req,
            Outcome::Failed,
            format!(
                "launch template {template} version {spec} no longer exists; fix the group's launch template"
            ),
        )));
    };
    if current.image_id.starts_with("resolve:ssm:") {
        // The template reads the parameter at launch: nothing to version, and AWS cannot roll back.
        return Ok(Ok(Some(Plan {
            how: format!(
                "template {template} resolves {} at launch; refreshed without rollback",
                current.image_id
            ),
            ..Plan::default()
        })));
    }
    if current.image_id == req.ami_id {
        return Ok(Ok(Some(Plan {
            already_there: true,
            how: "configuration already on the AMI".into(),
            ..Plan::default()
        })));
    }
    // Exactly one new version per template and AMI: reuse one that already has the AMI.
    let version = match groups.version_with_image(&template, &req.ami_id).await? {
        Some(v) => v,
        None => {
            groups
                .create_version(&template, current.number, &req.ami_id)
                .await?
        }
    };
    let pinned = spec.parse::<i64>().is_ok();
    let spec_for = |v: i64| {
        LaunchTemplateSpecification::builder()
            .launch_template_id(template.clone())
            .version(v.to_string())
            .build()
    };
    let desired = || match &mixed {
        Some(policy) => {
            let mut policy = (**policy).clone();
            if let Some(lt) = policy.launch_template.as_mut() {
                lt.launch_template_specification = Some(spec_for(version));
            }
            DesiredConfiguration::builder()
                .mixed_instances_policy(policy)
                .build()
        }
        None => DesiredConfiguration::builder()
            .launch_template(spec_for(version))
            .build(),
    };
    let plan = if pinned || stage.pin_unpinned_groups {
        Plan {
            desired: Some(desired()),
            new_version: true,
            how: format!("pinned to {template} version {version}, auto rollback on"),
            ..Plan::default()
        }
    } else if spec == "$Default" {
        Plan {
            before_refresh: Some(BeforeRefresh::SetDefault {
                template: template.clone(),
                version,
            }),
            new_version: true,
            how: format!(
                "{template} default version set to {version}; $Default group refreshed without rollback"
            ),
            ..Plan::default()
        }
    } else {
        Plan {
            new_version: true,
            how: format!("{template} version {version} is $Latest; refreshed without rollback"),
            ..Plan::default()
        }
    };
    Ok(Ok(Some(plan)))
}

async fn cloudformation(
    req: &AsgRefreshRequested,
    group: &Group,
    stacks: &impl Stacks,
    stage: &Stage,
    settings: &RefreshSettings,
) -> Result<Decided, StepError> {
    let Some(stack_name) = group.tags.get(STACK_TAG) else {
        return Ok(Err(finished(
            req,
            Outcome::Failed,
            format!("strategy cloudformation, but the group has no {STACK_TAG} tag"),
        )));
    };
    if stage.cloudformation == CloudFormationMode::Skip {
        return Ok(Err(finished(
            req,
            Outcome::Skipped,
            format!("owned by stack {stack_name}; the policy leaves stacks alone"),
        )));
    }
    let Some(stack) = stacks.describe(stack_name).await? else {
        return Ok(Err(finished(
            req,
            Outcome::Failed,
            format!("stack {stack_name} no longer exists"),
        )));
    };
    if stack.status.ends_with("_IN_PROGRESS") {
        return Ok(Err(defer(
            settings,
            format!("stack {stack_name} is {}", stack.status),
        )));
    }
    let Some((key, _, resolved)) = stack
        .parameters
        .iter()
        .find(|(_, v, r)| v == &req.parameter_name && r.is_some())
    else {
        return Ok(Err(finished(
            req,
            Outcome::Skipped,
            format!(
                "stack {stack_name} does not take the AMI through an AWS::SSM::Parameter::Value<AWS::EC2::Image::Id> parameter \
                 set to {}; a {{{{resolve:ssm:...}}}} reference or a literal id is not re-resolved by a stack update. \
                 Change the template to use such a parameter",
                req.parameter_name
            ),
        )));
    };
    if resolved.as_deref() != Some(req.ami_id.as_str()) {
        // Never change a stack's resources behind its back: let CloudFormation re-resolve.
        stacks.update_with_previous(&stack).await?;
        let after = stacks.describe(stack_name).await?;
        match after {
            Some(s) if s.status.ends_with("_IN_PROGRESS") => {
                return Ok(Err(defer(
                    settings,
                    format!("stack {stack_name} update to {} in progress", req.ami_id),
                )));
            }
            Some(s)
                if s.parameters
                    .iter()
                    .any(|(k, _, r)| k == key && r.as_deref() == Some(req.ami_id.as_str())) => {}
            Some(s) => {
                return Ok(Err(finished(
                    req,
                    Outcome::Failed,
                    format!(
                        "stack {stack_name} update ended {} without resolving {} to {}",
                        s.status, req.parameter_name, req.ami_id
                    ),
                )));
            }
            None => {
                return Ok(Err(finished(
                    req,
                    Outcome::Failed,
                    format!("stack {stack_name} disappeared during the update"),
                )));
            }
        }
    }
    // The stack owns the configuration: refresh without a desired configuration.
    Ok(Ok(Some(Plan {
        already_there: true,
        how: format!("stack {stack_name} re-resolved {key}; instances refreshed"),
        ..Plan::default()
    })))
}

fn outcome_named(state: &str) -> Outcome {
    match state {
        "succeeded" => Outcome::Succeeded,
        "rolled-back" => Outcome::RolledBack,
        "cancelled" => Outcome::Cancelled,
        "skipped" => Outcome::Skipped,
        _ => Outcome::Failed,
    }
}

fn outcome_of_status(status: &str) -> Option<Outcome> {
    Some(match status {
        "Successful" => Outcome::Succeeded,
        "Failed" | "RollbackFailed" => Outcome::Failed,
        "Cancelled" => Outcome::Cancelled,
        "RollbackSuccessful" => Outcome::RolledBack,
        _ => return None,
    })
}

/// A request delivered again while our refresh runs: finish it if it has ended.
async fn poll(
    req: &AsgRefreshRequested,
    group: &Group,
    mark: &Mark,
    groups: &impl Groups,
    settings: &RefreshSettings,
    admission: &Admission,
) -> Result<StepOutput, StepError> {
    let refreshes = groups.refreshes(&group.name).await?;
    let Some(r) = refreshes.iter().find(|r| r.id == mark.refresh_id) else {
        admission.forget(&req.asg_name, &mark.refresh_id);
        return Ok(StepOutput::Emit(Vec::new()));
    };
    match outcome_of_status(&r.status) {
        None => Ok(check_later(settings, &r.id)),
        Some(outcome) => close(req, mark, outcome, &r.reason, groups, admission).await,
    }
}

async fn close(
    req: &AsgRefreshRequested,
    mark: &Mark,
    outcome: Outcome,
    reason: &str,
    groups: &impl Groups,
    admission: &Admission,
) -> Result<StepOutput, StepError> {
    let done = Mark {
        state: outcome.as_str().into(),
        ..mark.clone()
    };
    // The refresh has ended: its slot is free now, before the tag write below (if that fails,
    // the event or poll is retried and writes it).
    admission.ended(&req.asg_name);
    groups
        .set_tags(
            &req.asg_name,
            &[(REFRESH_TAG, &done.render()), (STATE_TAG, &done.state)],
        )
        .await?;
    admission.closed(&req.asg_name, &done, outcome, reason);
    let mut finished = AsgRefreshFinished::new(req, outcome, reason);
    finished.instance_refresh_id = Some(mark.refresh_id.clone());
    Ok(StepOutput::Emit(vec![Detail::from(finished)]))
}

/// Handle an Auto Scaling instance-refresh event: a terminal one for our refresh ends it.
pub async fn refresh_event(
    event: &InstanceRefreshEvent,
    account: &str,
    groups: &impl Groups,
    admission: &Admission,
) -> Result<StepOutput, StepError> {
    if !event.kind.is_terminal() {
        return Ok(StepOutput::Emit(Vec::new()));
    }
    let ours = |m: &Mark| m.refresh_id == event.instance_refresh_id && m.state == "in-progress";
    // Started here: the mark is known without reading the group.
    let mark = match admission.running(&event.asg_name).filter(ours) {
        Some(mark) => mark,
        None => {
            let Some(group) = groups.get(&event.asg_name).await? else {
                return Ok(StepOutput::Emit(Vec::new()));
            };
            let Some(mark) = mark_of(&group).filter(ours) else {
                // Not ours, or already closed by a poll: nothing to say.
                return Ok(StepOutput::Emit(Vec::new()));
            };
            mark
        }
    };
    let outcome = match event.kind {
        RefreshEventKind::Succeeded => Outcome::Succeeded,
        RefreshEventKind::Cancelled => Outcome::Cancelled,
        RefreshEventKind::RollbackSucceeded => Outcome::RolledBack,
        _ => Outcome::Failed,
    };
    // Only an unhappy end has a reason worth a call (Auto Scaling calls share one bucket).
    let reason = if outcome == Outcome::Succeeded {
        String::new()
    } else {
        groups
            .refreshes(&event.asg_name)
            .await?
            .into_iter()
            .find(|r| r.id == mark.refresh_id)
            .map(|r| r.reason)
            .unwrap_or_default()
    };
    let deadline = DateTime::parse_from_rfc3339(&mark.deadline)
        .ok()
        .map(|d| d.to_utc());
    let req = AsgRefreshRequested::new(
        "",
        account,
        &event.asg_name,
        &mark.parameter,
        &mark.ami,
        Strategy::LaunchTemplate,
        deadline,
    );
    close(&req, &mark, outcome, &reason, groups, admission).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::Stack;
    use crate::fake::FakeAws;
    use crate::policy::Policy;

    const NEW: &str = "ami-0000000000000000b";
    const OLD: &str = "ami-0000000000000000a";

    fn stage() -> Stage {
        let policy = Policy::parse(include_str!("../../../local/amiflow.toml")).unwrap();
        policy.stage_named("qa").unwrap().clone()
    }

    fn settings() -> RefreshSettings {
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
        request_refresh(
            req,
            Utc::now(),
            aws,
            aws,
            aws,
            &stage(),
            &settings(),
            admission,
        )
        .await
        .unwrap()
    }

    /// Groups `g0` ..= `g{limit}`, one more than the stage's concurrency limit, each with a
    /// template of its own on the old AMI.
    fn one_group_beyond_the_limit() -> (FakeAws, usize) {
        let aws = FakeAws::default();
        let limit = stage().max_concurrent_refreshes as usize;
        for i in 0..=limit {
            aws.template(&format!("lt-{i}"), &[OLD], 1);
            aws.group(&format!("g{i}"), &format!("lt-{i}"), "1", OLD, 1);
        }
        (aws, limit)
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
        let aws = FakeAws::default();
        aws.template("lt-1", &[OLD, OLD], 1);
        aws.group("web", "lt-1", "2", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        // Started: the request comes back later to poll the refresh.
        assert!(
            matches!(run(&aws, &req).await, StepOutput::Defer { reason, .. } if reason.contains("running"))
        );
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
        let aws = FakeAws::default();
        aws.template("lt-1", &[OLD], 1);
        aws.group("web", "lt-1", "1", OLD, 2);
        let req = request("web", Strategy::LaunchTemplate);
        let StepOutput::Defer { delay, .. } = run(&aws, &req).await else {
            panic!("a started refresh is checked on later");
        };
        assert_eq!(delay, settings().poll);
        // Still running when the request comes back: later again.
        assert!(matches!(run(&aws, &req).await, StepOutput::Defer { .. }));
        aws.refreshes.lock().unwrap().get_mut("web").unwrap()[0].status = "Successful".into();
        let (o, _) = outcome(&run(&aws, &req).await);
        assert_eq!(o, Outcome::Succeeded);
        assert_eq!(
            mark_of(&aws.groups.lock().unwrap()["web"]).unwrap().state,
            "succeeded"
        );
    }

    #[tokio::test]
    async fn a_refresh_started_but_never_marked_is_taken_over_not_started_again() {
        let aws = FakeAws::default();
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
        assert_eq!(marked(&aws).unwrap().state, "rolled-back");
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
        let aws = FakeAws::default();
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
        let aws = FakeAws::default();
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
        let aws = FakeAws::default();
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
        let aws = FakeAws::default();
        let (o, reason) = outcome(&run(&aws, &request("gone", Strategy::LaunchTemplate)).await);
        assert_eq!(o, Outcome::Skipped);
        assert!(reason.contains("no longer exists"), "{reason}");
    }

    #[tokio::test]
    async fn a_request_after_the_window_closed_is_skipped_without_changes() {
        let aws = FakeAws::default();
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
    async fn a_slot_is_held_from_the_check_until_the_refresh_starts_or_the_request_gives_up() {
        let aws = FakeAws::default();
        let admission = Admission::default();
        let Admit::Slot(first) = admission.admit("a", 1, &aws).await.unwrap() else {
            panic!("the only slot is free");
        };
        assert!(
            matches!(
                admission.admit("b", 1, &aws).await.unwrap(),
                Admit::Full { taken: 1, .. }
            ),
            "the slot is taken before any refresh starts"
        );
        drop(first);
        assert!(matches!(
            admission.admit("b", 1, &aws).await.unwrap(),
            Admit::Slot(_)
        ));
    }

    #[tokio::test]
    async fn the_more_requests_wait_the_later_each_comes_back() {
        let aws = FakeAws::default();
        let admission = Admission::default();
        let held = admission.admit("running", 1, &aws).await.unwrap();
        let delay_of = |waiting: usize| {
            let StepOutput::Defer { delay, .. } = spread_defer(&settings(), 1, 1, waiting) else {
                unreachable!()
            };
            delay
        };
        // A few waiting: one to three deferral periods (7 s here).
        assert!((Duration::from_secs(7)..=Duration::from_secs(21)).contains(&delay_of(2)));
        // Six per slot: three times that; a crowd: at most five times.
        assert!((Duration::from_secs(21)..=Duration::from_secs(63)).contains(&delay_of(6)));
        assert!((Duration::from_secs(35)..=Duration::from_secs(105)).contains(&delay_of(500)));
        // The ledger counts the distinct groups told to wait, and forgets one once admitted.
        for g in ["a", "b", "b", "c"] {
            admission.admit(g, 1, &aws).await.unwrap();
        }
        let Admit::Full { waiting, .. } = admission.admit("d", 1, &aws).await.unwrap() else {
            panic!("full");
        };
        assert_eq!(waiting, 4);
        drop(held);
        assert!(matches!(
            admission.admit("a", 1, &aws).await.unwrap(),
            Admit::Slot(_)
        ));
        let Admit::Full { waiting, .. } = admission.admit("a2", 0, &aws).await.unwrap() else {
            panic!("full");
        };
        assert_eq!(waiting, 4, "b, c, d and a2; a was admitted");
    }

    #[tokio::test]
    async fn a_refresh_started_here_holds_its_slot_even_if_its_mark_was_never_written() {
        let (aws, limit) = one_group_beyond_the_limit();
        let admission = Admission::default();
        for i in 0..limit {
            run_in(
                &aws,
                &request(&format!("g{i}"), Strategy::LaunchTemplate),
                &admission,
            )
            .await;
        }
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
                    request_refresh(
                        &req,
                        Utc::now(),
                        aws,
                        aws,
                        aws,
                        &stage(),
                        settings,
                        admission,
                    )
                    .await
                    .unwrap()
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
        let aws = FakeAws::default();
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
        aws.refreshes.lock().unwrap().get_mut("web").unwrap()[0].status = "Successful".into();
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
            &refresh_event(&event, "111111111111", &aws, &admission)
                .await
                .unwrap(),
        );
        assert_eq!(o, Outcome::Succeeded);
        assert_eq!(
            mark_of(&aws.groups.lock().unwrap()["web"]).unwrap().state,
            "succeeded",
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
        assert_eq!(
            reads(),
            before,
            "neither the event nor the poll read the group"
        );
        assert_eq!(aws.changes(), changes, "and the poll changed nothing");
    }

    #[tokio::test]
    async fn a_resolve_ssm_group_is_refreshed_without_skip_matching_or_rollback() {
        let aws = FakeAws::default();
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
        let aws = FakeAws::default();
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
        // Nothing of the stack's changes; the group is marked skipped, with the reason.
        let changes = aws.changes();
        assert!(
            changes
                .iter()
                .all(|c| c.starts_with("set_tag web amiflow:refresh")),
            "{changes:?}"
        );
        let group = aws.groups.lock().unwrap()["web"].clone();
        let mark = mark_of(&group).unwrap();
        assert_eq!((mark.ami.as_str(), mark.state.as_str()), (NEW, "skipped"));
        assert!(group.tags[REASON_TAG].starts_with("stack app does not take the AMI"));
        // Asked again in the same window: the same reason, nothing new.
        let (o, again) = outcome(&run(&aws, &request("web", Strategy::Cloudformation)).await);
        assert_eq!(
            (o, again.as_str()),
            (Outcome::Skipped, &group.tags[REASON_TAG][..])
        );
    }
}
