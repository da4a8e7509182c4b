//! `amictl status`: compliance per account, computed from AWS itself (the golden parameters,
//! every group's effective AMI judged the way the plan-worker judges it, refreshes in flight and
//! ended, instances not on the golden AMI). Against the local world by default when one is
//! running; against AWS with `--config` (the rollout policy) and the standard credential chain,
//! assuming the policy's role in each stage account.

use anyhow::{Result, bail};
use clap::Args;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

use crate::compliance::{self, AccountCompliance, GroupState};
use crate::scope::{Scope, ScopeArgs};

/// Show each stage's compliance with its golden parameters.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  amictl status                         # the local world (amictl local up)\n  amictl status --stage prod --json     # one stage, for scripts\n  amictl status --config amiflow.toml   # real AWS: standard credentials, the policy's role per account"
)]
pub struct StatusArgs {
    /// Only this stage (a stage name from the policy, or an account id).
    #[arg(long, visible_alias = "account", value_name = "STAGE|ACCOUNT")]
    stage: Option<String>,
    /// Print JSON (one object per account) instead of tables.
    #[arg(long)]
    json: bool,
    /// List every group, not only those that are not current.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    scope: ScopeArgs,
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let scope = Scope::open(&args.scope).await?;
    let mut reports = Vec::new();
    for account in scope.select(args.stage.as_deref())? {
        let Some(stage) = scope.stage_policy(account) else {
            if args.stage.is_some() {
                bail!(
                    "{} is the hub, not a stage: it has no golden parameters to comply with",
                    account.label()
                );
            }
            continue;
        };
        reports.push(compliance::account(&account.config, &scope.policy, stage).await?);
    }
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
