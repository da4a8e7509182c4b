//! The plan of a start: which launch template version the group moves to (one new version per
//! template and AMI), whether the refresh can roll back, what `$Default` needs first, and for a
//! stack-owned group, the stack update that lets CloudFormation re-resolve the AMI.
//!
//! Rollback (AWS user guide, "Undo changes with a manual or auto rollback") needs a desired
//! configuration and a group pinned to a version number; `$Latest`/`$Default` and `resolve:ssm:`
//! groups are refreshed without rollback unless the policy pins them, and the plan says so.
//!
//! A mixed-instances group also launches from each override's own template: every template on an
//! earlier golden AMI of the family gets its new version (the overrides' in the desired
//! configuration), one on any other AMI is left alone, and an override whose template cannot be
//! read fails the request with the reason.

use std::collections::{HashMap, HashSet};

use aws_sdk_autoscaling::types::{
    DesiredConfiguration, LaunchTemplateSpecification, MixedInstancesPolicy,
};
use events::{AsgRefreshRequested, Outcome, Strategy};
use runtime::{StepError, StepOutput};

use super::{RefreshContext, default_version, defer, finished};
use crate::aws::{
    Group, Groups, LaunchSource, Parameters, RefreshRequest, STACK_TAG, Stack, Stacks,
};
use crate::discovery::override_templates;
use crate::mark::deadline_text;
use crate::policy::{CloudFormationMode, Stage};

/// What the group's configuration calls for.
#[derive(Debug)]
pub(super) enum Decision {
    /// Move the group to the AMI with this plan.
    Start(Plan),
    /// The configuration already launches the AMI: only instances may lag, and this plan
    /// replaces them.
    AlreadyThere(Plan),
    /// Nothing to start: this is the answer (skipped, failed, or wait).
    Done(StepOutput),
}

/// The values the golden parameters held, as far as this process has read their histories.
///
/// An AMI once found in a parameter's history stays an earlier golden AMI of its family, so a
/// value seen answers every later start without a read; only an AMI not seen yet reads the history
/// again (`ssm:GetParameterHistory`, afresh: it may have been published since). A stage's starts
/// thus read each family's history about once per worker process rather than once per group.
#[derive(Debug, Default)]
pub(super) struct GoldenValues(std::sync::Mutex<HashMap<String, HashSet<String>>>);

impl GoldenValues {
    /// Whether `ami` was ever a value of the parameter `name`.
    pub(super) async fn held(
        &self,
        params: &impl Parameters,
        name: &str,
        ami: &str,
    ) -> Result<bool, StepError> {
        Ok(!self.held_of(params, name, &[ami]).await?.is_empty())
    }

    /// Which of `amis` were ever values of the parameter `name`: one read of its history when any
    /// of them was not seen there yet, none otherwise.
    pub(super) async fn held_of(
        &self,
        params: &impl Parameters,
        name: &str,
        amis: &[&str],
    ) -> Result<HashSet<String>, StepError> {
        let known = |seen: &HashMap<String, HashSet<String>>| -> HashSet<String> {
            let values = seen.get(name);
            amis.iter()
                .filter(|a| values.is_some_and(|v| v.contains(**a)))
                .map(|a| (*a).to_owned())
                .collect()
        };
        let held = known(&self.seen());
        if held.len() == amis.len() {
            return Ok(held);
        }
        let values = params.history(name).await?;
        let mut seen = self.seen();
        seen.entry(name.to_owned()).or_default().extend(values);
        Ok(known(&seen))
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a refresh will be started with.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub desired: Option<DesiredConfiguration>,
    /// Every template of the desired configuration is pinned to a number: AWS can roll back.
    pub rollback: bool,
    pub before_refresh: Vec<BeforeRefresh>,
    /// AMIs of templates the group launches from that are left alone (another family's): its
    /// instances may run them.
    pub left_alone: Vec<String>,
    /// The refresh moves the group to another launch template version, so instances already on
    /// it can be skipped (AWS's SkipMatching compares template and version, not the AMI).
    pub new_version: bool,
    pub how: String,
}

impl Plan {
    /// The refresh's preferences: auto rollback only with a desired configuration to return
    /// from, and the stage's pace (min and max healthy percentage), checkpoints, bake time and
    /// alarms.
    pub fn request(&self, stage: &Stage) -> RefreshRequest {
        RefreshRequest {
            desired: self.desired.clone(),
            auto_rollback: self.desired.is_some() && self.rollback,
            skip_matching: self.new_version,
            min_healthy_percentage: stage.min_healthy_percentage,
            max_healthy_percentage: stage.max_healthy_percentage,
            bake_time: stage.bake_time_seconds,
            checkpoints: stage.checkpoints.clone(),
            checkpoint_delay: stage.checkpoint_delay_seconds,
            alarms: stage.alarms.clone(),
        }
    }
}

#[derive(Debug)]
pub(super) enum BeforeRefresh {
    /// Make `version` the template's default; `before` is the default it replaces (put back if
    /// the refresh does not succeed: [`super::default_version`]).
    SetDefault {
        template: String,
        version: i64,
        before: i64,
        /// The version's description records this move: nothing else to write before it.
        recorded: bool,
    },
}

impl BeforeRefresh {
    pub async fn run(&self, groups: &impl Groups) -> Result<(), StepError> {
        match self {
            BeforeRefresh::SetDefault {
                template, version, ..
            } => groups.set_default_version(template, *version).await,
        }
    }
}

/// Decide how the request's group moves, by the request's strategy.
pub(super) async fn decide(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    group: &Group,
) -> Result<Decision, StepError> {
    match req.strategy {
        Strategy::Cloudformation => cloudformation(ctx, req, group).await,
        Strategy::LaunchTemplate => launch_template(ctx, req, group).await,
    }
}

async fn launch_template(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    group: &Group,
) -> Result<Decision, StepError> {
    let (groups, stage) = (ctx.groups, ctx.stage);
    let (template, spec, mixed) = match (&group.source, unmovable(group)) {
        (LaunchSource::Template { id, version, mixed }, None) => {
            (id.clone(), version.clone(), mixed.clone())
        }
        (_, why) => {
            return Ok(Decision::Done(finished(
                req,
                Outcome::Skipped,
                why.unwrap_or_default(),
            )));
        }
    };
    // The version the group launches now, and one of the template that already has the AMI (a
    // start moves to it rather than making another): read together, a start's latency holds a
    // slot. The second is wasted only where nothing moves (a group already there, `resolve:ssm`).
    let (current, existing) = tokio::join!(
        groups.template_version(&template, &spec),
        groups.version_with_image(&template, &req.ami_id)
    );
    let Some(current) = current? else {
        return Ok(Decision::Done(finished(
            req,
            Outcome::Failed,
            format!(
                "launch template {template} version {spec} no longer exists; fix the group's launch template"
            ),
        )));
    };
    let overrides = match &mixed {
        Some(policy) => match moved_overrides(ctx, req, policy).await? {
            Ok(moves) => moves,
            Err(done) => return Ok(Decision::Done(done)),
        },
        None => OverrideMoves::default(),
    };
    if current.image_id.starts_with("resolve:ssm:") && overrides.moved.is_empty() {
        // The template reads the parameter at launch: nothing to version, and AWS cannot roll back.
        return Ok(Decision::Start(Plan {
            how: format!(
                "template {template} resolves {} at launch; refreshed without rollback",
                current.image_id
            ),
            left_alone: overrides.left_alone,
            ..Plan::default()
        }));
    }
    let main_moves =
        current.image_id != req.ami_id && !current.image_id.starts_with("resolve:ssm:");
    // Only a group on an earlier golden AMI of the request's family is moved, whoever asked:
    // never another family's group, nor one on an AMI amiflow never published.
    if main_moves
        && !ctx
            .admission
            .golden
            .held(ctx.params, &req.parameter_name, &current.image_id)
            .await?
    {
        return Err(StepError::Permanent(format!(
            "group {} launches {} (launch template {template} version {spec}), which is no earlier golden AMI of {}: amiflow moves only the groups of a family; refused",
            req.asg_name, current.image_id, req.parameter_name
        )));
    }
    if !main_moves && overrides.moved.is_empty() {
        return Ok(Decision::AlreadyThere(Plan {
            how: "configuration already on the AMI".into(),
            left_alone: overrides.left_alone,
            ..Plan::default()
        }));
    }
    let pin = |spec: &str| pins(spec, stage);
    let window = deadline_text(req.deadline);
    // Exactly one new version per template and AMI: reuse one that already has the AMI.
    let version = if main_moves {
        let moves_default = (spec == "$Default" && !pin(&spec)).then_some(window.as_str());
        Some(
            new_version_from(
                groups,
                existing?,
                &template,
                current.number,
                &req.ami_id,
                moves_default,
            )
            .await?,
        )
    } else {
        None
    };
    let spec_for = |template: &str, v: String| {
        LaunchTemplateSpecification::builder()
            .launch_template_id(template)
            .version(v)
            .build()
    };
    let mut before_refresh = Vec::new();
    let mut how = Vec::new();
    // The main template's spec in the desired configuration, and whether it is a number.
    let main_spec = match version {
        Some(v) if pin(&spec) => {
            let v = v.number;
            how.push(format!("pinned to {template} version {v}"));
            v.to_string()
        }
        Some(NewVersion {
            number: v,
            recorded,
        }) => {
            if spec == "$Default" {
                before_refresh.push(BeforeRefresh::SetDefault {
                    template: template.clone(),
                    version: v,
                    before: current.number,
                    recorded,
                });
                how.push(format!("{template} default version set to {v}"));
            } else {
                how.push(format!("{template} version {v} is $Latest"));
            }
            spec.clone()
        }
        None => spec.clone(),
    };
    let mut all_pinned = main_spec.parse::<i64>().is_ok();
    let mut pinned_any = version.is_some() && pin(&spec);
    let mut override_specs = Vec::new();
    for m in &overrides.moved {
        let spec = if pin(&m.spec) {
            pinned_any = true;
            how.push(format!(
                "override {} pinned to {} version {}",
                m.instance_type, m.template, m.version
            ));
            m.version.to_string()
        } else {
            if m.spec == "$Default" {
                before_refresh.push(BeforeRefresh::SetDefault {
                    template: m.template.clone(),
                    version: m.version,
                    before: m.before,
                    recorded: m.recorded,
                });
            }
            how.push(format!(
                "override {} {} version {} is {}",
                m.instance_type, m.template, m.version, m.spec
            ));
            m.spec.clone()
        };
        override_specs.push((m.index, spec_for(&m.template, spec)));
    }
    if let Some(policy) = &mixed {
        all_pinned &= override_templates(policy).iter().enumerate().all(|(i, o)| {
            override_specs
                .iter()
                .find(|(index, _)| *index == i)
                .and_then(|(_, s)| s.version())
                .unwrap_or(&o.version)
                .parse::<i64>()
                .is_ok()
        });
    }
    // A desired configuration only when something is pinned to a new number; otherwise the group
    // already names `$Latest`/`$Default`, which now resolve to the new versions.
    let desired = pinned_any.then(|| match &mixed {
        Some(policy) => {
            let mut policy = (**policy).clone();
            if let Some(lt) = policy.launch_template.as_mut() {
                lt.launch_template_specification = Some(spec_for(&template, main_spec.clone()));
                let mut with_templates = 0;
                for o in lt.overrides.iter_mut().flatten() {
                    if o.launch_template_specification.is_none() {
                        continue;
                    }
                    if let Some((_, s)) = override_specs.iter().find(|(i, _)| *i == with_templates)
                    {
                        o.launch_template_specification = Some(s.clone());
                    }
                    with_templates += 1;
                }
            }
            DesiredConfiguration::builder()
                .mixed_instances_policy(policy)
                .build()
        }
        None => DesiredConfiguration::builder()
            .launch_template(spec_for(&template, main_spec.clone()))
            .build(),
    });
    let rollback = desired.is_some() && all_pinned;
    how.push(if rollback {
        "auto rollback on".into()
    } else {
        "refreshed without rollback".into()
    });
    Ok(Decision::Start(Plan {
        desired,
        rollback,
        before_refresh,
        left_alone: overrides.left_alone,
        new_version: true,
        how: how.join("; "),
    }))
}

/// The version of `template` holding `ami` (one made earlier for it, or a new one from
/// `source`), and whether its description records the default move about to be made.
#[derive(Clone, Copy)]
struct NewVersion {
    number: i64,
    recorded: bool,
}

/// The version of `template` holding `ami`: one made earlier for it, or a new one from `source`.
/// When it is about to become the default of a `$Default` template (`moves_default` names the
/// request's window), a new version's description records the default it replaces
/// ([`default_version::note`]), so that no other write is needed before the default moves.
async fn new_version(
    groups: &impl Groups,
    template: &str,
    source: i64,
    ami: &str,
    moves_default: Option<&str>,
) -> Result<NewVersion, StepError> {
    let existing = groups.version_with_image(template, ami).await?;
    new_version_from(groups, existing, template, source, ami, moves_default).await
}

/// [`new_version`], with the template's version that has the AMI (if any) already read.
async fn new_version_from(
    groups: &impl Groups,
    existing: Option<crate::aws::TemplateVersion>,
    template: &str,
    source: i64,
    ami: &str,
    moves_default: Option<&str>,
) -> Result<NewVersion, StepError> {
    let note = default_version::note(ami, moves_default, source);
    Ok(match existing {
        Some(v) => NewVersion {
            recorded: moves_default.is_some() && v.description == note,
            number: v.number,
        },
        None => NewVersion {
            number: groups.create_version(template, source, ami, &note).await?,
            recorded: moves_default.is_some(),
        },
    })
}

/// An override's template that moves to the AMI.
#[derive(Debug)]
struct OverrideMove {
    /// Its place among the overrides that name a template.
    index: usize,
    instance_type: String,
    template: String,
    /// The version as the group names it.
    spec: String,
    version: i64,
    /// The version the group's spec resolves to now (its default, for `$Default`).
    before: i64,
    /// The version's description records its default move ([`NewVersion`]).
    recorded: bool,
}

#[derive(Debug, Default)]
struct OverrideMoves {
    moved: Vec<OverrideMove>,
    left_alone: Vec<String>,
}

/// Each override with its own template: moved when it holds an earlier golden AMI of the
/// request's family (a new version made here), left alone on any other AMI, or the request's
/// answer (failed, with the reason) when its template cannot be read.
async fn moved_overrides(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    policy: &MixedInstancesPolicy,
) -> Result<Result<OverrideMoves, StepOutput>, StepError> {
    let templates = override_templates(policy);
    if templates.is_empty() {
        return Ok(Ok(OverrideMoves::default()));
    }
    let window = deadline_text(req.deadline);
    let mut moves = OverrideMoves::default();
    // Each override's template as it is now, then which of their AMIs are golden (one history
    // read at most, shared with the main template's check after this).
    let mut read = Vec::new();
    for (index, o) in templates.into_iter().enumerate() {
        let broken = |why: String| {
            finished(
                req,
                Outcome::Failed,
                format!(
                    "the mixed-instances override for {}: {why}; fix the group's MixedInstancesPolicy",
                    o.instance_type
                ),
            )
        };
        let Some(template) = o.template.clone() else {
            return Ok(Err(broken(
                "its launch template specification names no template".into(),
            )));
        };
        let Some(current) = ctx.groups.template_version(&template, &o.version).await? else {
            return Ok(Err(broken(format!(
                "launch template {template} version {} does not exist",
                o.version
            ))));
        };
        read.push((index, o, template, current));
    }
    // On the AMI already, or read at launch: nothing to judge or move.
    let judged = |image: &str| image != req.ami_id && !image.starts_with("resolve:ssm:");
    let images: Vec<&str> = read
        .iter()
        .map(|(.., current)| current.image_id.as_str())
        .filter(|i| judged(i))
        .collect();
    let golden = ctx
        .admission
        .golden
        .held_of(ctx.params, &req.parameter_name, &images)
        .await?;
    for (index, o, template, current) in read {
        let image = current.image_id;
        if !judged(&image) {
            continue;
        }
        if !golden.contains(&image) {
            tracing::info!(group = %req.asg_name, override_type = %o.instance_type, %template, %image,
                "override template runs an AMI of no golden family here; left alone");
            moves.left_alone.push(image);
            continue;
        }
        let moves_default =
            (o.version == "$Default" && !pins(&o.version, ctx.stage)).then_some(window.as_str());
        let version = new_version(
            ctx.groups,
            &template,
            current.number,
            &req.ami_id,
            moves_default,
        )
        .await?;
        moves.moved.push(OverrideMove {
            index,
            instance_type: o.instance_type,
            template,
            spec: o.version,
            version: version.number,
            recorded: version.recorded,
            before: current.number,
        });
    }
    Ok(Ok(moves))
}

async fn cloudformation(
    ctx: &RefreshContext<'_, impl Groups, impl Stacks, impl Parameters>,
    req: &AsgRefreshRequested,
    group: &Group,
) -> Result<Decision, StepError> {
    let (stacks, settings) = (ctx.stacks, ctx.settings);
    let (stack, key, resolved) =
        match stack_answer(stacks, ctx.stage, group, &req.parameter_name).await? {
            StackAnswer::Update {
                stack,
                key,
                resolved,
            } => (stack, key, resolved),
            StackAnswer::Busy(why) => return Ok(Decision::Done(defer(settings, why))),
            StackAnswer::Ends(outcome, why) => {
                return Ok(Decision::Done(finished(req, outcome, why)));
            }
        };
    let key = &key;
    let stack_name = group.tags.get(STACK_TAG).unwrap_or(&stack.name);
    if resolved.as_deref() != Some(req.ami_id.as_str()) {
        // Never change a stack's resources behind its back: let CloudFormation re-resolve.
        stacks.update_with_previous(&stack).await?;
        let after = stacks.describe(stack_name).await?;
        match after {
            Some(s) if s.status.ends_with("_IN_PROGRESS") => {
                return Ok(Decision::Done(defer(
                    settings,
                    format!("stack {stack_name} update to {} in progress", req.ami_id),
                )));
            }
            Some(s)
                if s.parameters
                    .iter()
                    .any(|(k, _, r)| k == key && r.as_deref() == Some(req.ami_id.as_str())) => {}
            Some(s) => {
                return Ok(Decision::Done(finished(
                    req,
                    Outcome::Failed,
                    format!(
                        "stack {stack_name} update ended {} without resolving {} to {}",
                        s.status, req.parameter_name, req.ami_id
                    ),
                )));
            }
            None => {
                return Ok(Decision::Done(finished(
                    req,
                    Outcome::Failed,
                    format!("stack {stack_name} disappeared during the update"),
                )));
            }
        }
    }
    // The stack owns the configuration: refresh without a desired configuration.
    Ok(Decision::AlreadyThere(Plan {
        how: format!("stack {stack_name} re-resolved {key}; instances refreshed"),
        ..Plan::default()
    }))
}

/// Whether a group naming its launch template version as `spec` is refreshed with a pinned
/// version number (which AWS can roll back to): a number, or any version when the stage pins
/// unpinned groups.
pub fn pins(spec: &str, stage: &Stage) -> bool {
    spec.parse::<i64>().is_ok() || stage.pin_unpinned_groups
}

/// Why a group cannot be moved through a launch template at all (`None`: it can).
pub fn unmovable(group: &Group) -> Option<String> {
    match &group.source {
        LaunchSource::LaunchConfiguration(name) => Some(format!(
            "uses launch configuration {name}: launch configurations cannot be updated; migrate the group to a launch template"
        )),
        LaunchSource::None => Some("the group has no launch template".into()),
        LaunchSource::Template { .. } => None,
    }
}

/// What a stack-owned group's stack allows, read without changing anything.
#[derive(Debug)]
pub enum StackAnswer {
    /// The stack takes the AMI through the SSM parameter type `key` (resolved to `resolved`):
    /// an update with the previous values re-resolves it.
    Update {
        stack: Stack,
        key: String,
        resolved: Option<String>,
    },
    /// The stack is busy (an operation in progress): ask again later.
    Busy(String),
    /// The request ends here, with this outcome and reason.
    Ends(Outcome, String),
}

/// The stack's answer for a request to move `group` to the AMI `parameter` holds.
pub async fn stack_answer(
    stacks: &impl Stacks,
    stage: &Stage,
    group: &Group,
    parameter: &str,
) -> Result<StackAnswer, StepError> {
    let Some(stack_name) = group.tags.get(STACK_TAG) else {
        return Ok(StackAnswer::Ends(
            Outcome::Failed,
            format!("strategy cloudformation, but the group has no {STACK_TAG} tag"),
        ));
    };
    if stage.cloudformation == CloudFormationMode::Skip {
        return Ok(StackAnswer::Ends(
            Outcome::Skipped,
            format!("owned by stack {stack_name}; the policy leaves stacks alone"),
        ));
    }
    let Some(stack) = stacks.describe(stack_name).await? else {
        return Ok(StackAnswer::Ends(
            Outcome::Failed,
            format!("stack {stack_name} no longer exists"),
        ));
    };
    if stack.status.ends_with("_IN_PROGRESS") {
        return Ok(StackAnswer::Busy(format!(
            "stack {stack_name} is {}",
            stack.status
        )));
    }
    let Some((key, _, resolved)) = stack
        .parameters
        .iter()
        .find(|(_, v, r)| v == parameter && r.is_some())
        .cloned()
    else {
        return Ok(StackAnswer::Ends(
            Outcome::Skipped,
            format!(
                "stack {stack_name} does not take the AMI through an AWS::SSM::Parameter::Value<AWS::EC2::Image::Id> parameter \
                 set to {parameter}; a {{{{resolve:ssm:...}}}} reference or a literal id is not re-resolved by a stack update. \
                 Change the template to use such a parameter"
            ),
        ));
    };
    Ok(StackAnswer::Update {
        stack,
        key,
        resolved,
    })
}
