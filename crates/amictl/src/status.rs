//! `amictl status`: compliance per account, computed from AWS itself (the golden parameters,
//! every group's effective AMI judged the way the plan-worker judges it, refreshes in flight and
//! ended, instances not on the golden AMI). Against the local world by default when one is
//! running; against AWS with `--config` (the rollout policy) and the standard credential chain,
//! assuming the policy's role in each stage account.

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use rollout::policy::Policy;

use crate::compliance::{self, AccountCompliance, GroupState};
use crate::local;

/// Show each stage's compliance with its golden parameters.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  amictl status                         # the local world (amictl local up)\n  amictl status --stage prod --json     # one stage, for scripts\n  amictl status --config amiflow.toml   # real AWS: standard credentials, the policy's role per account"
)]
pub struct StatusArgs {
    /// Only this stage (a stage name from the policy, or an account id).
    #[arg(long, value_name = "STAGE|ACCOUNT")]
    stage: Option<String>,
    /// Print JSON (one object per account) instead of tables.
    #[arg(long)]
    json: bool,
    /// The rollout policy TOML. Without it, the running local world is used.
    #[arg(long, value_name = "FILE", env = "AMIFLOW_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// List every group, not only those that are not current.
    #[arg(long)]
    all: bool,
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let reports = match &args.config {
        Some(path) => from_aws(path, args.stage.as_deref()).await?,
        None => from_local(args.stage.as_deref()).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    println!("{}", summary(&reports));
    let details = groups_table(&reports, args.all);
    if details.row_count() > 0 {
        println!("\n{details}");
    }
    Ok(())
}

fn chosen<'p>(policy: &'p Policy, stage: Option<&str>) -> Result<Vec<&'p rollout::policy::Stage>> {
    let stages: Vec<_> = policy
        .stages
        .iter()
        .filter(|s| stage.is_none_or(|w| w == s.name || w == s.account))
        .collect();
    if stages.is_empty() {
        let known: Vec<String> = policy
            .stages
            .iter()
            .map(|s| format!("{} ({})", s.name, s.account))
            .collect();
        bail!(
            "no stage `{}` in the rollout policy; use one of {}",
            stage.unwrap_or_default(),
            known.join(", ")
        );
    }
    Ok(stages)
}

async fn from_local(stage: Option<&str>) -> Result<Vec<AccountCompliance>> {
    let state = local::current_state()?.ok_or_else(|| {
        anyhow!("no local world is running; start one with `amictl local up`, or give the rollout policy with --config to read AWS")
    })?;
    let policy = Policy::load(&state.config_file)
        .with_context(|| format!("reading {}", state.config_file.display()))?;
    let mut out = Vec::new();
    for s in chosen(&policy, stage)? {
        let config = local::account_config(&state, &s.account).await?;
        out.push(compliance::account(&config, &policy, s).await?);
    }
    Ok(out)
}

async fn from_aws(path: &std::path::Path, stage: Option<&str>) -> Result<Vec<AccountCompliance>> {
    let policy = Policy::load(path).with_context(|| format!("reading {}", path.display()))?;
    let clients = runtime::Clients::from_env(policy.role_name.clone()).await?;
    let mut out = Vec::new();
    for s in chosen(&policy, stage)? {
        let config = clients
            .for_account(&s.account)
            .await
            .with_context(|| format!("acting in {} ({})", s.name, s.account))?;
        out.push(compliance::account(&config, &policy, s).await?);
    }
    Ok(out)
}

fn summary(reports: &[AccountCompliance]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "stage",
        "account",
        "golden parameters",
        "groups",
        "current",
        "stale",
        "refreshing",
        "failed",
        "rolled back",
        "skipped",
        "not golden",
        "instances off golden",
    ]);
    for r in reports {
        let parameters: Vec<String> = r
            .parameters
            .iter()
            .map(|p| format!("{} = {}", p.name, p.ami.as_deref().unwrap_or("(none)")))
            .collect();
        table.add_row([
            r.stage.clone(),
            r.account.clone(),
            parameters.join("\n"),
            r.groups.len().to_string(),
            r.count(GroupState::Current).to_string(),
            r.count(GroupState::Stale).to_string(),
            r.count(GroupState::Refreshing).to_string(),
            r.count(GroupState::Failed).to_string(),
            r.count(GroupState::RolledBack).to_string(),
            r.count(GroupState::Skipped).to_string(),
            r.count(GroupState::Untouched).to_string(),
            r.instances_off_golden().to_string(),
        ]);
    }
    table
}

fn groups_table(reports: &[AccountCompliance], all: bool) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(["stage", "group", "state", "AMI", "off golden", "why"]);
    if table.width().is_none() {
        table.set_width(140);
    }
    for r in reports {
        for g in r
            .groups
            .iter()
            .filter(|g| all || g.state != GroupState::Current)
        {
            table.add_row([
                r.stage.clone(),
                g.name.clone(),
                g.state.as_str().into(),
                g.ami.clone().unwrap_or_else(|| "-".into()),
                format!("{}/{}", g.instances_off_golden, g.instances),
                g.reason.clone(),
            ]);
        }
    }
    table
}
