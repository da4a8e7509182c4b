//! `amictl recall`: take a bad golden AMI out of the rollout, everywhere. Like a pause, a recall
//! is operator intent: amictl writes its record in the **hub's** Parameter Store
//! (`/amiflow/control/recall/<ami>`, signed with the caller's STS identity, a time and a reason)
//! and puts an `AmiRecalled` event on the hub's bus. From then on every worker refuses the AMI;
//! each stage's param-worker, woken by the event, reads the record and moves its golden parameter
//! back if it holds the AMI, and the plan and refresh workers move the groups back as in any
//! rollout. amictl itself changes no parameter and no group.
//!
//! `--dry-run` prints, per stage, the parameter change and every group that would move back with
//! its strategy, judged with the workers' own code (`amictl plan`'s preview), and writes nothing.

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use rollout::aws::{Parameters, SsmParameters};
use rollout::control::{self, Recall, Recalls, previous_golden};
use rollout::policy::RecalledImage;

use crate::control::{Hub, rollout_of};
use crate::exit::refuse;
use crate::output::Told;
use crate::plan::Action;
use crate::scope::{BUS, Scope, ScopeArgs};

/// Recall a bad golden AMI: refused everywhere from now on, every stage moved back.
#[derive(Debug, Args)]
#[command(
    after_help = "Every stage whose golden parameter holds the AMI goes back to the family's previous golden AMI that is not recalled (or to --to), with one new parameter version, and every group running the AMI moves back through the normal plan and refresh path: in the stage's next window, or at once with --now (an `amictl pause` still stops it). Refresh requests for the AMI end `recalled`, running refreshes to it are cancelled, and no stage is promoted to it again. A recall is never undone: roll out a newer AMI instead.\n\nExamples:\n  amictl recall ami-0123456789abcdef0 --reason \"CVE-2026-1234 in the kernel\" --dry-run\n  amictl recall ami-0123456789abcdef0 --reason \"CVE-2026-1234 in the kernel\" --now\n  amictl recall /golden/al2023/ami-id@ami-0123456789abcdef0 --to ami-0fedcba9876543210 --reason \"agent broken\"\n  amictl recall ami-0123456789abcdef0 --reason \"backdoored package\" --now --disable-image"
)]
pub struct RecallArgs {
    /// The AMI id, or the rollout (`<parameter name>@<ami id>`).
    #[arg(value_name = "AMI-ID|ROLLOUT-ID")]
    rollout: String,
    /// Why (an incident, a CVE); recorded with who you are and when.
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// The golden AMI to go back to; required when the family never had another one.
    #[arg(long, value_name = "AMI-ID")]
    to: Option<String>,
    /// Move the groups back at once instead of in each stage's next window.
    #[arg(long)]
    now: bool,
    /// Print what the recall would change in each stage, and change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: crate::output::OutputArgs,
    /// Also disable the AMI in the hub (`ec2:DisableImage`; or deprecate it, when the policy
    /// sets recalled_image = "deprecate") and remove its launch permissions: nothing new
    /// launches from it in any other account. A group still configured for it cannot launch
    /// instances until it has moved back, so use it when running the AMI is worse than not
    /// scaling. Given for an AMI already recalled, it only disables (or deprecates) the image.
    #[arg(long)]
    disable_image: bool,
}

/// What the recall changes in one stage.
struct StageChange {
    label: String,
    /// The parameter's value now.
    holds: Option<String>,
    /// The AMI it goes back to; `None` when it does not hold the recalled AMI.
    back_to: Option<String>,
}

pub async fn run(args: RecallArgs, scope: &ScopeArgs) -> Result<()> {
    let why = args.reason.trim();
    if why.is_empty() {
        refuse!(
            "--reason is empty: say why the AMI is recalled (an incident, a CVE); it is recorded with who you are and when"
        );
    }
    let scope = Scope::open(scope).await?;
    let (parameter, ami) = rollout_of(&scope, &args.rollout).await?;
    let hub = Hub::of(&scope);
    let path = control::recall_path(&ami);
    if let Some(earlier) = control::read::<Recall>(&hub.records, &path)
        .await
        .map_err(|e| anyhow!("{e}"))?
    {
        if args.disable_image {
            if args.dry_run {
                let mut told = Told::dry_run();
                told.say(format!(
                    "{ami} is already recalled; would {} it in the hub {}",
                    retire_verb(scope.policy.recalled_image),
                    scope.hub().label()
                ));
                return told.print(&args.output);
            }
            let mut told = Told::default();
            disable_image(&scope, &ami, &mut told).await?;
            return told.print(&args.output);
        }
        refuse!(
            "{ami} is already recalled ({path} in the hub), by {} at {}: {}; a recall is never repeated or undone (re-send its event with `amictl inject AmiRecalled` if a stage missed it)",
            earlier.decision.by,
            earlier.decision.at.to_rfc3339(),
            earlier.decision.reason
        );
    }
    let recalls = Recalls::read(&hub.records)
        .await
        .map_err(|e| anyhow!("{e}"))
        .context("reading the recalls in the hub")?;
    let to = match &args.to {
        Some(text) => {
            let (to_parameter, to) = rollout_of(&scope, text).await?;
            if to == ami {
                refuse!("--to {to} is the AMI being recalled: name the golden AMI to go back to");
            }
            if to_parameter != parameter {
                refuse!(
                    "--to {to} is of {to_parameter}, not {parameter}: name a golden AMI of the recalled AMI's family"
                );
            }
            if let Some(r) = recalls.of(&to) {
                refuse!(
                    "--to {to} is recalled itself ({}): name a golden AMI that is not recalled",
                    r.refusal()
                );
            }
            Some(to)
        }
        None => None,
    };
    let mut changes = Vec::new();
    for stage in &scope.policy.stages {
        let account = scope.account(&stage.account)?;
        let params = SsmParameters(aws_sdk_ssm::Client::new(&account.config));
        let read = |e: runtime::StepError| {
            anyhow!("{e}").context(format!("reading {parameter} in {}", account.label()))
        };
        let holds = params.get(&parameter).await.map_err(read)?.map(|p| p.value);
        let back_to = if holds.as_deref() == Some(ami.as_str()) {
            match &to {
                Some(to) => Some(to.clone()),
                None => {
                    let history = params.history(&parameter).await.map_err(read)?;
                    match previous_golden(&history, &ami, &recalls) {
                        Some(previous) => Some(previous),
                        None => refuse!(
                            "{ami} is the only golden AMI {parameter} ever had in {} (that is not recalled): there is nothing to go back to; name one with --to <ami>",
                            account.label()
                        ),
                    }
                }
            }
        } else {
            None
        };
        changes.push((
            stage,
            StageChange {
                label: account.label(),
                holds,
                back_to,
            },
        ));
    }

    if args.dry_run {
        let mut told = Told::dry_run();
        told.say(format!(
            "recall of {parameter}@{ami} (dry run: nothing is written)"
        ));
        for (stage, change) in &changes {
            let Some(back_to) = &change.back_to else {
                told.say(format!(
                    "{}: {parameter} holds {}: unchanged",
                    change.label,
                    change.holds.as_deref().unwrap_or("nothing")
                ));
                continue;
            };
            let account = scope.account(&stage.account)?;
            let judged = crate::plan::judge_stage(
                account.config.clone(),
                std::sync::Arc::new(scope.policy.clone()),
                (*stage).clone(),
                Some((parameter.clone(), back_to.clone())),
                recalls.clone(),
            )
            .await
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("judging the groups of {}", change.label))?;
            let moving: Vec<_> = judged
                .window
                .iter()
                .filter(|g| g.requested && g.parameter.as_deref() == Some(parameter.as_str()))
                .collect();
            let mut back = parameter_back(stage, &ami, back_to, args.now);
            back["groups"] = serde_json::to_value(&moving)?;
            told.change("parameter-back", &parameter, &back);
            told.say(format!(
                "{}: {parameter} {ami} -> {back_to} (one new version); {} groups move back{}",
                change.label,
                moving.len(),
                if args.now {
                    " at once"
                } else {
                    " in the stage's next window"
                }
            ));
            for g in moving {
                let strategy = g
                    .strategy
                    .map(|s| serde_json::to_value(s).unwrap_or_default())
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let what = match g.action {
                    Action::Refresh => String::new(),
                    _ => format!(" ({})", g.reason),
                };
                told.say(format!(
                    "  {:<40} {:<16} {} instances, from {}{what}",
                    g.group,
                    strategy,
                    g.instances,
                    g.from.as_deref().unwrap_or("?"),
                ));
            }
        }
        if args.disable_image {
            let verb = retire_verb(scope.policy.recalled_image);
            told.change(
                &format!("image-{verb}d"),
                &ami,
                &serde_json::json!({"account": scope.policy.hub_account}),
            );
            told.say(format!(
                "{ami} would be {verb}d in the hub {}, its launch permissions removed",
                scope.hub().label()
            ));
        }
        return told.print(&args.output);
    }

    let decision = hub.decision(why).await?;
    let recall = Recall {
        decision,
        ami: ami.clone(),
        parameter: parameter.clone(),
        to: to.clone(),
        now: args.now,
    };
    control::write(&hub.records, &path, &recall)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {path} in the hub {}", scope.hub().label()))?;
    let mut event = events::AmiRecalled::new(&ami, &parameter, why, &recall.decision.by);
    event.to_ami_id = to;
    event.now = args.now;
    crate::inject::put_event(scope.hub(), BUS, &events::Detail::from(event))
        .await
        .with_context(|| {
            format!(
                "the recall is recorded ({path}) and every worker refuses {ami}, but the stages were not told to move back: re-send it with `amictl inject AmiRecalled`"
            )
        })?;
    let mut told = Told::default();
    told.change("recalled", &path, &recall);
    told.say(format!(
        "recalled {parameter}@{ami} ({path} in the hub): by {}, {}",
        recall.decision.by, recall.decision.reason
    ));
    for (stage, change) in &changes {
        match &change.back_to {
            Some(back_to) => {
                told.change(
                    "parameter-back",
                    &parameter,
                    &parameter_back(stage, &ami, back_to, args.now),
                );
                told.say(format!(
                    "{}: {parameter} goes back {ami} -> {back_to}; its groups move back {}",
                    change.label,
                    if args.now {
                        "at once"
                    } else {
                        "in its next window"
                    }
                ))
            }
            None => told.say(format!(
                "{}: holds {}: unchanged",
                change.label,
                change.holds.as_deref().unwrap_or("nothing")
            )),
        }
    }
    if args.disable_image {
        disable_image(&scope, &ami, &mut told).await.with_context(|| {
            format!("the recall is recorded and sent; run `amictl recall {ami} --reason ... --disable-image` again to {} the image", retire_verb(scope.policy.recalled_image))
        })?;
    }
    told.print(&args.output)
}

/// What `recall` says it changes (or, in a dry run, would change) in a stage: its parameter goes
/// back from `ami` to `back_to`.
fn parameter_back(
    stage: &rollout::policy::Stage,
    ami: &str,
    back_to: &str,
    now: bool,
) -> serde_json::Value {
    serde_json::json!({
        "stage": stage.name,
        "account": stage.account,
        "from": ami,
        "to": back_to,
        "now": now,
    })
}

fn retire_verb(how: RecalledImage) -> &'static str {
    match how {
        RecalledImage::Disable => "disable",
        RecalledImage::Deprecate => "deprecate",
    }
}

/// Disable (or deprecate, as the policy says) `ami` in the hub and tell what was done.
async fn disable_image(scope: &Scope, ami: &str, told: &mut Told) -> Result<()> {
    let hub = scope.hub();
    let ec2 = aws_sdk_ec2::Client::new(&hub.config);
    let place = format!("the hub {}", hub.label());
    let done = retire_image(
        &ec2,
        ami,
        scope.policy.recalled_image,
        chrono::Utc::now(),
        &place,
    )
    .await
    .with_context(|| format!("in {place}"))?;
    told.change(
        &format!("image-{}d", retire_verb(scope.policy.recalled_image)),
        ami,
        &serde_json::json!({"account": hub.id}),
    );
    told.say(done);
    Ok(())
}

/// Take `ami` out of use in its account: its launch permissions removed (AWS makes a disabled
/// AMI private; removing them here says which accounts lost it, and holds in the emulator too),
/// then `DisableImage`, or `EnableImageDeprecation` from the next whole minute after `now` (AWS
/// takes no time in the past). Idempotent: an AMI already disabled, or deprecated by then, is
/// left as it is. What was done, in a sentence.
async fn retire_image(
    ec2: &aws_sdk_ec2::Client,
    ami: &str,
    how: RecalledImage,
    now: chrono::DateTime<chrono::Utc>,
    place: &str,
) -> Result<String> {
    let image = ec2
        .describe_images()
        .image_ids(ami)
        .send()
        .await
        .map_err(|e| anyhow!("{}", runtime::error::describe(&e)))
        .with_context(|| format!("reading {ami}"))?
        .images()
        .first()
        .cloned();
    let Some(image) = image else {
        bail!(
            "{ami} is not visible in {place}: nothing to {}",
            retire_verb(how)
        );
    };
    // The next whole minute at least a minute ahead: what AWS rounds a deprecation time to.
    let at = {
        let ahead = now + chrono::Duration::seconds(60);
        let minute = ahead.timestamp().div_euclid(60) * 60;
        let rounded = chrono::DateTime::from_timestamp(minute, 0).unwrap_or(ahead);
        if rounded < ahead {
            rounded + chrono::Duration::seconds(60)
        } else {
            rounded
        }
    };
    let deprecated = image
        .deprecation_time()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.to_utc());
    match how {
        RecalledImage::Disable
            if image.state() == Some(&aws_sdk_ec2::types::ImageState::Disabled) =>
        {
            return Ok(format!("{ami} is already disabled in {place}"));
        }
        RecalledImage::Deprecate if deprecated.is_some_and(|t| t <= at) => {
            return Ok(format!(
                "{ami} is already deprecated in {place}, since {}",
                deprecated.unwrap_or(at).to_rfc3339()
            ));
        }
        _ => {}
    }
    let granted = ec2
        .describe_image_attribute()
        .image_id(ami)
        .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
        .send()
        .await
        .map_err(|e| anyhow!("{}", runtime::error::describe(&e)))
        .with_context(|| format!("reading the launch permissions of {ami}"))?
        .launch_permissions()
        .to_vec();
    if !granted.is_empty() {
        ec2.modify_image_attribute()
            .image_id(ami)
            .launch_permission(
                aws_sdk_ec2::types::LaunchPermissionModifications::builder()
                    .set_remove(Some(granted.clone()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| anyhow!("{}", runtime::error::describe(&e)))
            .with_context(|| format!("removing the launch permissions of {ami}"))?;
    }
    let accounts: Vec<&str> = granted
        .iter()
        .filter_map(|p| {
            p.user_id()
                .or(p.organization_arn())
                .or(p.organizational_unit_arn())
        })
        .collect();
    let removed = if accounts.is_empty() {
        "no account (it was shared with none)".to_owned()
    } else {
        accounts.join(", ")
    };
    match how {
        RecalledImage::Disable => {
            ec2.disable_image()
                .image_id(ami)
                .send()
                .await
                .map_err(|e| anyhow!("{}", runtime::error::describe(&e)))
                .with_context(|| format!("disabling {ami}"))?;
            Ok(format!(
                "disabled {ami} in {place}: nothing new launches from it; launch permissions removed from {removed}"
            ))
        }
        RecalledImage::Deprecate => {
            ec2.enable_image_deprecation()
                .image_id(ami)
                .deprecate_at(aws_sdk_ec2::primitives::DateTime::from_secs(at.timestamp()))
                .send()
                .await
                .map_err(|e| anyhow!("{}", runtime::error::describe(&e)))
                .with_context(|| format!("deprecating {ami}"))?;
            Ok(format!(
                "deprecated {ami} in {place} from {} (the policy's recalled_image = \"deprecate\"): it leaves listings and launches only by its id there; launch permissions removed from {removed}",
                at.to_rfc3339()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::operation::{
        describe_image_attribute::DescribeImageAttributeOutput,
        describe_images::DescribeImagesOutput, disable_image::DisableImageOutput,
        enable_image_deprecation::EnableImageDeprecationOutput,
        modify_image_attribute::ModifyImageAttributeOutput,
    };
    use aws_sdk_ec2::primitives::DateTime;
    use aws_sdk_ec2::types::{Image, ImageState, LaunchPermission};
    use aws_smithy_mocks::{RuleMode, mock, mock_client};
    use chrono::TimeZone;

    const AMI: &str = "ami-0123456789abcdef0";

    fn image(deprecated: Option<&'static str>) -> DescribeImagesOutput {
        DescribeImagesOutput::builder()
            .images(
                Image::builder()
                    .image_id(AMI)
                    .state(ImageState::Available)
                    .set_deprecation_time(deprecated.map(str::to_owned))
                    .build(),
            )
            .build()
    }

    /// By policy a recalled AMI is deprecated, not disabled: from the next whole minute a minute
    /// ahead (AWS takes no time in the past), its launch permissions removed first; once
    /// deprecated, nothing more is done.
    #[tokio::test]
    async fn a_policy_of_deprecation_deprecates_the_image_and_removes_its_permissions() {
        let now = chrono::Utc
            .with_ymd_and_hms(2026, 12, 5, 10, 0, 30)
            .unwrap();
        let describe = mock!(aws_sdk_ec2::Client::describe_images).then_output(|| image(None));
        let granted = mock!(aws_sdk_ec2::Client::describe_image_attribute).then_output(|| {
            DescribeImageAttributeOutput::builder()
                .launch_permissions(LaunchPermission::builder().user_id("222222222222").build())
                .build()
        });
        let removed = mock!(aws_sdk_ec2::Client::modify_image_attribute)
            .match_requests(|r| {
                r.launch_permission()
                    .and_then(|p| p.remove().first())
                    .and_then(|p| p.user_id())
                    == Some("222222222222")
            })
            .then_output(|| ModifyImageAttributeOutput::builder().build());
        let deprecate = mock!(aws_sdk_ec2::Client::enable_image_deprecation)
            .match_requests(move |r| {
                r.image_id() == Some(AMI)
                    && r.deprecate_at() == Some(&DateTime::from_secs(now.timestamp() + 90))
            })
            .then_output(|| {
                EnableImageDeprecationOutput::builder()
                    .r#return(true)
                    .build()
            });
        let disable = mock!(aws_sdk_ec2::Client::disable_image)
            .then_output(|| DisableImageOutput::builder().build());
        let ec2 = mock_client!(
            aws_sdk_ec2,
            RuleMode::MatchAny,
            [&describe, &granted, &removed, &deprecate, &disable]
        );
        let done = retire_image(&ec2, AMI, RecalledImage::Deprecate, now, "the hub")
            .await
            .unwrap();
        assert_eq!(
            done,
            format!(
                "deprecated {AMI} in the hub from 2026-12-05T10:02:00+00:00 (the policy's recalled_image = \"deprecate\"): it leaves listings and launches only by its id there; launch permissions removed from 222222222222"
            )
        );
        assert_eq!(
            (
                removed.num_calls(),
                deprecate.num_calls(),
                disable.num_calls()
            ),
            (1, 1, 0)
        );

        let already = mock!(aws_sdk_ec2::Client::describe_images)
            .then_output(|| image(Some("2026-12-05T10:01:00Z")));
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&already]);
        let done = retire_image(&ec2, AMI, RecalledImage::Deprecate, now, "the hub")
            .await
            .unwrap();
        assert_eq!(
            done,
            format!("{AMI} is already deprecated in the hub, since 2026-12-05T10:01:00+00:00")
        );
    }
}
