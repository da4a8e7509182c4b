//! How a started refresh ends: polled when its request comes back, closed by its Auto Scaling
//! instance-refresh event (best effort, and possibly ahead of the mark), or adopted when a refresh
//! of ours was started but never marked. Closing writes the outcome into the group's mark and
//! frees the refresh's slot.
//!
//! A refresh Auto Scaling calls successful is checked against the group before it is reported:
//! its launch template must still launch the AMI (someone may have set the `$Default` version by
//! hand meanwhile: "superseded", with what was changed) and its instances must run it. One that
//! failed, rolled back or was cancelled gets back the default versions its start moved
//! ([`default_version`]).

use events::{
    AsgRefreshFinished, AsgRefreshRequested, Detail, InstanceRefreshEvent, Outcome,
    RefreshEventKind, Strategy,
};
use runtime::{StepError, StepOutput};

use super::start::Plan;
use super::{Admission, RefreshContext, check_later, default_version, write_mark};
use crate::aws::{
    Group, Groups, LaunchSource, MarkPlace, Marks, Parameters, Refresh, Stacks, desired_version,
};
use crate::mark::{Mark, MarkState};

/// The outcome of an instance refresh that has ended; `None` while it runs.
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
pub(super) async fn poll(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    group: &Group,
    mark: &Mark,
) -> Result<StepOutput, StepError> {
    let refreshes = ctx.groups.refreshes(&group.name).await?;
    let Some(r) = refreshes.iter().find(|r| r.id == mark.refresh_id) else {
        ctx.admission.forget(&req.asg_name, &mark.refresh_id);
        return Ok(StepOutput::Emit(Vec::new()));
    };
    match outcome_of_status(&r.status) {
        None => Ok(check_later(ctx.settings, &r.id)),
        Some(outcome) => {
            let place = MarkPlace::of(group);
            close(
                req,
                mark,
                outcome,
                &r.reason,
                &ctx.marks(),
                place,
                ctx.admission,
            )
            .await
        }
    }
}

/// A running refresh of a stage an operator halted with `--cancel-running`: ask Auto Scaling to
/// cancel it (idempotent), then poll as usual. Its `Cancelled` end is closed like any other (its
/// mark says `cancelled`, a `$Default` group gets its default version back).
pub(super) async fn cancel(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    group: &Group,
    mark: &Mark,
    halt: &crate::control::Halt,
) -> Result<StepOutput, StepError> {
    let refreshes = ctx.groups.refreshes(&group.name).await?;
    if refreshes
        .iter()
        .any(|r| r.id == mark.refresh_id && r.is_active() && r.status != "Cancelling")
    {
        ctx.groups.cancel_refresh(&group.name).await?;
        tracing::warn!(group = %group.name, refresh = %mark.refresh_id, ami = %req.ami_id,
            by = %halt.decision.by, reason = %halt.decision.reason,
            "stage halted with --cancel-running: instance refresh cancelled");
        return Ok(check_later(ctx.settings, &mark.refresh_id));
    }
    poll(ctx, req, group, mark).await
}

/// How a superseded refresh's reason starts when the `$Default` version was set by hand; a later
/// window recognises the hand-made choice by it (see `hand_made_changes` in the policy).
pub(super) const DEFAULT_CHANGED_BY_HAND: &str =
    "superseded: the default version was changed by hand to ";

/// What is not on `ami` after a refresh reported successful, as its outcome; `None` when the
/// group's launch template and its instances are on it.
async fn verify(
    groups: &impl Groups,
    group: &str,
    ami: &str,
) -> Result<Option<(Outcome, String)>, StepError> {
    let Some(group) = groups.get(group).await? else {
        return Ok(None);
    };
    let LaunchSource::Template { id, version, mixed } = &group.source else {
        return Ok(None);
    };
    let resolved = groups.template_version(id, version).await?;
    if let Some(v) = &resolved
        && v.image_id != ami
        && !v.image_id.starts_with("resolve:ssm:")
    {
        let why = match version.as_str() {
            "$Default" => format!(
                "{DEFAULT_CHANGED_BY_HAND}{} during the refresh; {id} launches {}, not {ami}",
                v.number, v.image_id
            ),
            "$Latest" => format!(
                "superseded: version {} of {id} ({}) was made during the refresh; the group launches it, not {ami}",
                v.number, v.image_id
            ),
            _ => format!(
                "superseded: the group was pointed at {id} version {version} ({}) during the refresh, not {ami}",
                v.image_id
            ),
        };
        return Ok(Some((Outcome::Skipped, why)));
    }
    // Overrides with their own template launch their own AMI; the rest must run this one.
    if mixed
        .as_deref()
        .is_some_and(|m| !crate::discovery::override_templates(m).is_empty())
    {
        return Ok(None);
    }
    // An instance Auto Scaling says was launched from the version the group launches now (whose
    // image is `ami`) runs `ami`: only the others are read.
    let exact = resolved.filter(|v| v.image_id == ami).map(|v| v.number);
    let unknown: Vec<String> = group
        .instance_ids
        .iter()
        .filter(|i| exact.is_none_or(|n| !group.launched_from_version(i, id, n)))
        .cloned()
        .collect();
    let known = group.instance_ids.len() - unknown.len();
    let images = if unknown.is_empty() {
        Default::default()
    } else {
        groups.instance_images(&unknown).await?
    };
    let behind: std::collections::BTreeSet<&String> =
        images.values().filter(|a| *a != ami).collect();
    if behind.is_empty() {
        return Ok(None);
    }
    let count = images.values().filter(|a| *a != ami).count();
    Ok(Some((
        Outcome::Failed,
        format!(
            "the refresh ended successful, but {count} of {} instances still run {}",
            known + images.len(),
            behind.into_iter().cloned().collect::<Vec<_>>().join(", ")
        ),
    )))
}

async fn close(
    req: &AsgRefreshRequested,
    mark: &Mark,
    outcome: Outcome,
    reason: &str,
    marks: &Marks<'_, impl Groups, impl Parameters>,
    place: MarkPlace,
    admission: &Admission,
) -> Result<StepOutput, StepError> {
    let groups = marks.groups();
    let (outcome, reason) = match outcome {
        Outcome::Succeeded => verify(groups, &req.asg_name, &mark.ami)
            .await?
            .unwrap_or((outcome, reason.to_owned())),
        // A refresh that did not succeed leaves no default version moved for it.
        _ => match default_version::restore(groups, &req.asg_name, mark, outcome).await? {
            Some(restored) if reason.is_empty() => (outcome, restored),
            Some(restored) => (
                outcome,
                format!("{}; {restored}", reason.trim_end_matches('.')),
            ),
            None => (outcome, reason.to_owned()),
        },
    };
    let reason = reason.as_str();
    let done = mark.ended(outcome);
    // The refresh has ended: its slot is free now, before the tag write below (if that fails,
    // the event or poll is retried and writes it).
    admission.ended(&req.asg_name, &done);
    let skipped = (outcome == Outcome::Skipped).then_some(reason);
    write_mark(marks, place, &req.asg_name, &done, skipped).await?;
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
    params: &impl Parameters,
    admission: &Admission,
) -> Result<StepOutput, StepError> {
    let marks = Marks::new(groups, params);
    if !event.kind.is_terminal() {
        return Ok(StepOutput::Emit(Vec::new()));
    }
    let ours = |m: &Mark| m.refresh_id == event.instance_refresh_id && m.is_running();
    // Started here: the mark is known without reading the group.
    let (mark, place) = match admission.running(&event.asg_name).filter(|(m, _)| ours(m)) {
        Some(running) => running,
        None => {
            let Some(group) = groups.get(&event.asg_name).await? else {
                return Ok(StepOutput::Emit(Vec::new()));
            };
            let Some(record) = marks.read(&group).await?.filter(|r| ours(&r.mark)) else {
                // Not ours, or already closed by a poll: nothing to say.
                return Ok(StepOutput::Emit(Vec::new()));
            };
            (record.mark, MarkPlace::of(&group))
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
    let req = AsgRefreshRequested::new(
        "",
        account,
        &event.asg_name,
        &mark.parameter,
        &mark.ami,
        Strategy::LaunchTemplate,
        mark.deadline_time(),
    );
    close(&req, &mark, outcome, &reason, &marks, place, admission).await
}

/// A refresh of ours whose mark was never written: the worker stopped (a crash, a lost reply)
/// between starting it and tagging the group. It is recognised by its desired configuration, the
/// version made for this AMI, and taken over instead of being started a second time: marked if it
/// still runs, closed with its outcome if it has ended. (Unpinned groups have no desired
/// configuration to recognise; their refresh is found "started by someone else" and waited for,
/// after which the group is already on the AMI.)
pub(super) async fn adopt(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    group: &Group,
    marked: Option<&Mark>,
    plan: &Plan,
    window: &str,
    refreshes: &[Refresh],
) -> Result<Option<StepOutput>, StepError> {
    let Some(version) = plan.desired.as_ref().and_then(desired_version) else {
        return Ok(None);
    };
    if marked.is_some_and(|m| m.ami == req.ami_id) {
        // Marked for this AMI: an earlier window's attempt, which a new window may retry.
        return Ok(None);
    }
    let Some(ours) = refreshes
        .iter()
        .find(|r| r.desired_version.as_deref() == Some(version.as_str()))
    else {
        return Ok(None);
    };
    take_over(ctx, req, MarkPlace::of(group), ours, window).await
}

/// The unpinned form of [`adopt`]: a `$Latest`/`$Default` group whose configuration already
/// launches the AMI (the version made for it is the latest, or the default) and that carries no
/// mark for it. Its refresh has no desired configuration to recognise it by, so the group's newest
/// refresh is taken over when no mark names it: the process that made the version and started the
/// refresh stopped before marking. Without this the request would find the group "already on the
/// AMI", report no refresh, and leave the previous rollout's mark on the group.
pub(super) async fn adopt_unmarked(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    group: &Group,
    marked: Option<&Mark>,
    window: &str,
    refreshes: &[Refresh],
) -> Result<Option<StepOutput>, StepError> {
    if marked.is_some_and(|m| m.ami == req.ami_id) {
        return Ok(None);
    }
    let Some(newest) = refreshes
        .first()
        .filter(|r| r.desired_version.is_none() && marked.is_none_or(|m| m.refresh_id != r.id))
    else {
        return Ok(None);
    };
    take_over(ctx, req, MarkPlace::of(group), newest, window).await
}

/// Mark `ours` as this request's refresh: still running, it is polled from now on; ended, it is
/// closed with its outcome (and the outcome names it).
async fn take_over(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    place: MarkPlace,
    ours: &Refresh,
    window: &str,
) -> Result<Option<StepOutput>, StepError> {
    let mark = Mark {
        ami: req.ami_id.clone(),
        state: MarkState::InProgress,
        refresh_id: ours.id.clone(),
        deadline: window.to_owned(),
        parameter: req.parameter_name.clone(),
    };
    tracing::info!(group = %req.asg_name, refresh = %ours.id, status = %ours.status, "found an unmarked refresh of ours; taking it over");
    if ours.is_active() {
        ctx.admission.started(&req.asg_name, place, &mark);
        write_mark(&ctx.marks(), place, &req.asg_name, &mark, None).await?;
        return Ok(Some(check_later(ctx.settings, &ours.id)));
    }
    match outcome_of_status(&ours.status) {
        Some(outcome) => Ok(Some(
            close(
                req,
                &mark,
                outcome,
                &ours.reason,
                &ctx.marks(),
                place,
                ctx.admission,
            )
            .await?,
        )),
        None => Ok(None),
    }
}
