//! `amictl rerun`: emit a root event again. Every step is idempotent on its key and judged from
//! AWS itself, so a rerun only does what is still missing: a `rerun window` plans every group of
//! the stage that is still stale; a `rerun ami` shares, publishes and plans whatever has not
//! happened yet for that AMI.

use anyhow::{Context, Result, anyhow, bail};
use chrono::Utc;
use clap::{Args, Subcommand};
use events::{AmiBuilt, Detail, RolloutWindowOpened};
use rollout::aws::Images;

use crate::inject::{put_event, report};
use crate::scope::{BUS, Scope, ScopeArgs};

/// Emit RolloutWindowOpened or AmiBuilt again (safe: every step is idempotent).
#[derive(Debug, Subcommand)]
#[command(
    after_help = "Examples:\n  amictl rerun window --stage prod               # open prod's window now, for its usual length\n  amictl rerun ami ami-0123456789abcdef0          # roll this golden AMI out again\n  amictl rerun ami ami-0123456789abcdef0 --targets uat,prod --dry-run"
)]
pub enum Rerun {
    /// Open a stage's maintenance window now: the plan-worker requests a refresh of every group
    /// still on an older golden AMI, and refreshes may start until the window closes.
    #[command(
        after_help = "Examples:\n  amictl rerun window --stage uat\n  amictl rerun window --account 333333333333 --hours 2"
    )]
    Window(WindowArgs),
    /// Emit AmiBuilt for an AMI of the hub, as the ingest-worker does when it is built: share it,
    /// publish it in each stage's golden parameter (never over a newer one), plan and refresh.
    #[command(
        after_help = "Examples:\n  amictl rerun ami ami-0123456789abcdef0\n  amictl rerun ami ami-0123456789abcdef0 --parameter /golden/al2023/ami-id --targets prod"
    )]
    Ami(AmiArgs),
}

#[derive(Debug, Args)]
pub struct WindowArgs {
    /// The stage (name, or its account id).
    #[arg(long, visible_alias = "account", value_name = "STAGE|ACCOUNT", add = crate::completion::stages())]
    stage: String,
    /// How long the window stays open, 1 to 24 (the workers refuse a longer window) [default: the
    /// stage's window.duration_hours].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(rollout::policy::MAX_WINDOW_HOURS)))]
    hours: Option<u32>,
    /// Print the event, send nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: crate::output::OutputArgs,
}

#[derive(Debug, Args)]
pub struct AmiArgs {
    /// The AMI, in the hub account.
    #[arg(value_name = "AMI-ID")]
    ami_id: String,
    /// The golden parameter it is published in [default: the policy's family whose name prefix
    /// (or `amiflow:family` tag) the AMI matches].
    #[arg(long, value_name = "NAME")]
    parameter: Option<String>,
    /// Only these stages or accounts (comma-separated) [default: every stage].
    #[arg(long, value_name = "STAGE,...", value_delimiter = ',')]
    targets: Vec<String>,
    /// Print the event, send nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: crate::output::OutputArgs,
}

pub async fn run(command: Rerun, scope: &ScopeArgs) -> Result<()> {
    match command {
        Rerun::Window(args) => window(args, scope).await,
        Rerun::Ami(args) => ami(args, scope).await,
    }
}

async fn window(args: WindowArgs, scope: &ScopeArgs) -> Result<()> {
    let scope = Scope::open(scope).await?;
    let account = scope.account(&args.stage)?;
    let stage = scope.stage_policy(account).ok_or_else(|| {
        anyhow!(
            "{} is the hub, not a stage: it has no window",
            account.label()
        )
    })?;
    let hours = args.hours.unwrap_or(stage.window.duration_hours).max(1);
    let opens = Utc::now();
    let closes = opens + chrono::Duration::hours(i64::from(hours));
    let detail: Detail = RolloutWindowOpened::new(&account.id, &stage.name, opens, closes).into();
    let detail = crate::inject::validate(detail.detail_type(), detail.to_value())?;
    let id = if args.dry_run {
        None
    } else {
        Some(put_event(account, BUS, &detail).await?)
    };
    report(&detail, account, BUS, id.as_deref(), args.output.json())
}

async fn ami(args: AmiArgs, scope: &ScopeArgs) -> Result<()> {
    let scope = Scope::open(scope).await?;
    let hub = scope.hub();
    if !args.ami_id.starts_with("ami-") {
        bail!(
            "{:?} is not an AMI id (ami- followed by 8 or 17 hex digits)",
            args.ami_id
        );
    }
    let images = rollout::aws::Ec2Images(aws_sdk_ec2::Client::new(&hub.config));
    let image = images
        .describe(&args.ami_id)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("reading {} in the hub {}", args.ami_id, hub.label()))?
        .ok_or_else(|| {
            anyhow!(
                "no AMI {} is visible in the hub {}",
                args.ami_id,
                hub.label()
            )
        })?;
    if image.state != "available" {
        bail!(
            "{} is {}, not available: only an available AMI can be rolled out",
            image.id,
            image.state
        );
    }
    let parameter = match &args.parameter {
        Some(p) => scope
            .policy
            .families
            .iter()
            .find(|f| &f.parameter_name == p)
            .map(|f| f.parameter_name.clone())
            .ok_or_else(|| {
                anyhow!(
                    "--parameter {p} is no golden parameter of the policy; use one of {}",
                    families(&scope)
                )
            })?,
        None => scope
            .policy
            .family_of(&image.name, image.family_tag.as_deref())
            .map(|f| f.parameter_name.clone())
            .ok_or_else(|| {
                anyhow!(
                    "{} ({}) matches no golden family of the policy ({}); pass --parameter",
                    image.id,
                    image.name,
                    families(&scope)
                )
            })?,
    };
    let created = image.created_at.unwrap_or_else(Utc::now);
    let mut built = AmiBuilt::new(
        &image.id,
        &scope.policy.region,
        &image.name,
        created,
        &parameter,
    );
    if !args.targets.is_empty() {
        let mut ids = Vec::new();
        for t in &args.targets {
            let account = scope.account(t)?;
            if scope.stage_policy(account).is_none() {
                bail!("--targets {t}: {} is not a stage", account.label());
            }
            ids.push(account.id.clone());
        }
        built.targets = Some(ids);
    }
    let detail: Detail = built.into();
    let detail = crate::inject::validate(detail.detail_type(), detail.to_value())?;
    let id = if args.dry_run {
        None
    } else {
        Some(put_event(hub, BUS, &detail).await?)
    };
    report(&detail, hub, BUS, id.as_deref(), args.output.json())
}

fn families(scope: &Scope) -> String {
    scope
        .policy
        .families
        .iter()
        .map(|f| format!("{} (names {}*)", f.parameter_name, f.name_prefix))
        .collect::<Vec<_>>()
        .join(", ")
}
