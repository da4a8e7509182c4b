//! refresh-worker (spoke): move one group to the new AMI without fighting its owner, then report
//! the outcome. The message is never held while a refresh runs: the group carries a tag
//! (`amiflow:refresh`) naming the AMI, window and refresh id, and the outcome arrives as an Auto
//! Scaling instance-refresh event (or is found by polling when a request is delivered again).
//!
//! Rollback (AWS user guide, "Undo changes with a manual or auto rollback") needs a desired
//! configuration and a group pinned to a version number; `$Latest`/`$Default` and `resolve:ssm:`
//! groups are refreshed without rollback unless the policy pins them, and the outcome says so.

use std::time::Duration;

use aws_sdk_autoscaling::types::{DesiredConfiguration, LaunchTemplateSpecification};
use chrono::{DateTime, Utc};
use events::{
    AsgRefreshFinished, AsgRefreshRequested, Detail, InstanceRefreshEvent, Outcome,
    RefreshEventKind, Strategy,
};
use runtime::{StepError, StepOutput};

use crate::aws::{Group, Groups, LaunchSource, RefreshRequest, Stacks};
use crate::policy::{CloudFormationMode, Stage};

/// Tag marking a group's refresh: `<ami>|<state>|<refresh id>|<deadline or ->|<parameter>`.
pub const REFRESH_TAG: &str = "amiflow:refresh";
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
}

fn finished(req: &AsgRefreshRequested, outcome: Outcome, reason: impl Into<String>) -> StepOutput {
    StepOutput::Emit(vec![AsgRefreshFinished::new(req, outcome, reason).into()])
}

fn defer(settings: &RefreshSettings, reason: String) -> StepOutput {
    StepOutput::Defer {
        delay: settings.defer,
        reason,
    }
}

/// Handle one `AsgRefreshRequested`.
pub async fn request_refresh(
    req: &AsgRefreshRequested,
    now: DateTime<Utc>,
    groups: &impl Groups,
    stacks: &impl Stacks,
    stage: &Stage,
    settings: &RefreshSettings,
    admission: &tokio::sync::Mutex<()>,
) -> Result<StepOutput, StepError> {
    let Some(group) = groups.get(&req.asg_name).await? else {
        return Ok(finished(
            req,
            Outcome::Skipped,
            format!("group {} no longer exists", req.asg_name),
        ));
    };
    let window = deadline_text(req.deadline);
    if let Some(mark) = mark_of(&group).filter(|m| m.ami == req.ami_id) {
        if mark.state == "in-progress" {
            // Delivered again while ours runs: poll it (events are best effort).
            return poll(req, &group, &mark, groups).await;
        }
        if mark.deadline == window {
            // This window already tried and ended: say so again, start nothing new.
            let outcome = outcome_named(&mark.state);
            return Ok(finished(
                req,
                outcome,
                format!(
                    "already ended {} in this window (refresh {})",
                    mark.state, mark.refresh_id
                ),
            ));
        }
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
    let plan = match req.strategy {
        Strategy::Cloudformation => {
            match cloudformation(req, &group, stacks, stage, settings).await? {
                Ok(plan) => plan,
                Err(done) => return Ok(done),
            }
        }
        Strategy::LaunchTemplate => match launch_template(req, &group, groups, stage).await? {
            Ok(plan) => plan,
            Err(done) => return Ok(done),
        },
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

    // Admission: count refreshes in flight in this account and start ours under one lock, so
    // this process never exceeds the limit. (Run one refresh worker per account.)
    let _admitted = admission.lock().await;
    let in_flight = groups
        .with_tag(REFRESH_TAG)
        .await?
        .iter()
        .filter(|g| mark_of(g).is_some_and(|m| m.state == "in-progress"))
        .count();
    if in_flight >= stage.max_concurrent_refreshes as usize {
        return Ok(defer(
            settings,
            format!(
                "{in_flight} refreshes in flight; the limit is {}",
                stage.max_concurrent_refreshes
            ),
        ));
    }
    if let Some(active) = groups
        .refreshes(&req.asg_name)
        .await?
        .into_iter()
        .find(|r| r.is_active())
    {
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
    let id = groups.start_refresh(&req.asg_name, &request).await?;
    let mark = Mark {
        ami: req.ami_id.clone(),
        state: "in-progress".into(),
        refresh_id: id.clone(),
        deadline: window,
        parameter: req.parameter_name.clone(),
    };
    groups
        .set_tag(&req.asg_name, REFRESH_TAG, &mark.render())
        .await?;
    tracing::info!(group = %req.asg_name, refresh = %id, how = %plan.how, "instance refresh started");
    Ok(StepOutput::Emit(Vec::new()))
}

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
) -> Result<StepOutput, StepError> {
    let refreshes = groups.refreshes(&group.name).await?;
    let Some(r) = refreshes.iter().find(|r| r.id == mark.refresh_id) else {
        return Ok(StepOutput::Emit(Vec::new()));
    };
    match outcome_of_status(&r.status) {
        None => Ok(StepOutput::Emit(Vec::new())),
        Some(outcome) => close(req, mark, outcome, &r.reason, groups).await,
    }
}

async fn close(
    req: &AsgRefreshRequested,
    mark: &Mark,
    outcome: Outcome,
    reason: &str,
    groups: &impl Groups,
) -> Result<StepOutput, StepError> {
    let done = Mark {
        state: outcome.as_str().into(),
        ..mark.clone()
    };
    groups
        .set_tag(&req.asg_name, REFRESH_TAG, &done.render())
        .await?;
    let mut finished = AsgRefreshFinished::new(req, outcome, reason);
    finished.instance_refresh_id = Some(mark.refresh_id.clone());
    Ok(StepOutput::Emit(vec![Detail::from(finished)]))
}

/// Handle an Auto Scaling instance-refresh event: a terminal one for our refresh ends it.
pub async fn refresh_event(
    event: &InstanceRefreshEvent,
    account: &str,
    groups: &impl Groups,
) -> Result<StepOutput, StepError> {
    if !event.kind.is_terminal() {
        return Ok(StepOutput::Emit(Vec::new()));
    }
    let Some(group) = groups.get(&event.asg_name).await? else {
        return Ok(StepOutput::Emit(Vec::new()));
    };
    let Some(mark) = mark_of(&group)
        .filter(|m| m.refresh_id == event.instance_refresh_id && m.state == "in-progress")
    else {
        // Not ours, or already closed by a poll: nothing to say.
        return Ok(StepOutput::Emit(Vec::new()));
    };
    let outcome = match event.kind {
        RefreshEventKind::Succeeded => Outcome::Succeeded,
        RefreshEventKind::Cancelled => Outcome::Cancelled,
        RefreshEventKind::RollbackSucceeded => Outcome::RolledBack,
        _ => Outcome::Failed,
    };
    let reason = groups
        .refreshes(&group.name)
        .await?
        .into_iter()
        .find(|r| r.id == mark.refresh_id)
        .map(|r| r.reason)
        .unwrap_or_default();
    let deadline = DateTime::parse_from_rfc3339(&mark.deadline)
        .ok()
        .map(|d| d.to_utc());
    let req = AsgRefreshRequested::new(
        "",
        account,
        &group.name,
        &mark.parameter,
        &mark.ami,
        Strategy::LaunchTemplate,
        deadline,
    );
    close(&req, &mark, outcome, &reason, groups).await
}
