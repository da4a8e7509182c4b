//! `amictl status`: compliance per account, computed from AWS itself (the golden parameters,
//! every group's effective AMI judged the way the plan-worker judges it, refreshes in flight and
//! ended, instances counted by the AMI each runs: golden, previous golden, older golden, other). Against the local world by default when one is
//! running; against AWS with `--config` (the rollout policy) and the standard credential chain,
//! assuming the policy's role in each stage account.

use anyhow::{Context, Result, bail};
use clap::Args;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use serde::Serialize;

use crate::compliance::{self, AccountCompliance, GroupState};
use crate::exit::Attention;
use crate::plan::{GatePreview, Preview, RunPreview};
use crate::scope::{Scope, ScopeArgs};

/// Show each stage's compliance with its golden parameters.
#[derive(Debug, Args)]
#[command(
    after_help = "Shows per stage: its golden parameters and groups by state, its maintenance window (open now until when, or when it opens next, from the policy's cron in UTC), each rollout at its gates, recalls, and every group that is not current with the reason.\n\nJSON (--output json): one document {version, generated_at, summary, stages}; summary counts groups by state and instances off golden, and its `attention` says what makes the exit code 3 (null when nothing).\n\nExit codes: 0 the report was made and nothing needs a person, 3 a stage is halted or a group's last refresh failed or rolled back (the tables say which and why), 2 a wrong argument, 1 an error.\n\nExamples:\n  amictl status                         # the local world (amictl local up)\n  amictl status --stage prod --json     # one stage, for scripts\n  amictl status --watch 30s             # again every 30 s until Ctrl-C\n  amictl status --config amiflow.toml   # real AWS: standard credentials, the policy's role per account"
)]
pub struct StatusArgs {
    /// Only this stage (a stage name from the policy, or an account id).
    #[arg(long, visible_alias = "account", value_name = "STAGE|ACCOUNT", add = crate::completion::stages())]
    stage: Option<String>,
    #[command(flatten)]
    output: crate::output::OutputArgs,
    /// List every group, not only those that are not current.
    #[arg(long)]
    all: bool,
    /// Show it again every INTERVAL (default 10s, at least 1s) until interrupted (Ctrl-C), as
    /// `watch` does; with --output json, one compact document per line. The exit code is the
    /// last report's.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "10s", value_parser = humantime::parse_duration)]
    watch: Option<std::time::Duration>,
}

/// The compliance of `stage` (a stage name or account id; every stage when `None`), and each
/// stage's gates, failures and pause: what `status` and `report` show.
pub async fn judge(
    scope: &Scope,
    stage: Option<&str>,
) -> Result<(Vec<AccountCompliance>, Preview)> {
    let mut reports = Vec::new();
    for account in scope.select(stage)? {
        let Some(policy_stage) = scope.stage_policy(account) else {
            if stage.is_some() {
                bail!(
                    "{} is the hub, not a stage: it has no golden parameters to comply with",
                    account.label()
                );
            }
            continue;
        };
        reports.push(compliance::account(&account.config, &scope.policy, policy_stage).await?);
    }
    let only = match stage {
        Some(one) => Some(scope.account(one)?.stage.clone()),
        None => None,
    };
    let gates = crate::plan::preview(scope, only.as_deref(), None).await?;
    Ok((reports, gates))
}

pub async fn run(args: StatusArgs, scope: &ScopeArgs) -> Result<()> {
    let scope = Scope::open(scope).await?;
    let Some(every) = args.watch else {
        return once(&args, &scope, false).await;
    };
    if every < std::time::Duration::from_secs(1) {
        crate::exit::refuse!(
            "--watch {}: give at least 1s (each report reads every group of every stage)",
            humantime::format_duration(every)
        );
    }
    // One listener for the whole watch: an interrupt while a report is read is not lost.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let shown = once(&args, &scope, true).await;
        // A report that needs a person is still a report: go on; an error ends the watch.
        if let Err(e) = &shown
            && e.downcast_ref::<Attention>().is_none()
        {
            return shown;
        }
        tokio::select! {
            _ = &mut interrupted => return shown,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// One report; `watching`: the screen is cleared first (on a terminal), JSON is one line.
async fn once(args: &StatusArgs, scope: &Scope, watching: bool) -> Result<()> {
    use std::io::IsTerminal;
    let (reports, gates) = judge(scope, args.stage.as_deref()).await?;
    let recalls = rollout::control::Recalls::read(&crate::control::Hub::of(scope).records)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("reading the recalls in the hub")?;
    let now = chrono::Utc::now();
    let verdict = verdict(&reports, &gates);
    if args.output.json() {
        let stages: Vec<StageStatus> = reports
            .iter()
            .map(|r| StageStatus {
                compliance: r,
                window: scope
                    .policy
                    .stage_named(&r.stage)
                    .map(|s| WindowStatus::of(s, now)),
                gate: gates
                    .stages
                    .iter()
                    .find(|s| s.stage == r.stage)
                    .map(|s| GateStatus {
                        paused: s.paused.clone(),
                        runs: s.runs.clone(),
                        gates: s.gates.clone(),
                    }),
                recalled: still_on_recalled(r, &recalls),
            })
            .collect();
        let summary = serde_json::to_value(Summary::of(&reports))?;
        let document =
            crate::output::document(summary, &verdict, &serde_json::json!({ "stages": stages }))?;
        if watching {
            println!("{document}");
        } else {
            println!("{document:#}");
        }
    } else {
        if watching && std::io::stdout().is_terminal() {
            // Clear the screen and go home, as `watch` does.
            print!("\x1b[2J\x1b[H");
        }
        if watching {
            println!(
                "{} (every {}; Ctrl-C to stop)\n",
                now.format("%Y-%m-%d %H:%M:%S UTC"),
                humantime::format_duration(args.watch.unwrap_or_default())
            );
        }
        println!("{}", summary(&reports));
        println!("\n{}", windows_table(scope, &reports, now));
        println!("\n{}", gates_table(&gates));
        if !recalls.0.is_empty() {
            println!("\n{}", recalls_table(&reports, &recalls));
        }
        let details = groups_table(&reports, args.all);
        if details.row_count() > 0 {
            println!("\n{details}");
        }
    }
    verdict
}

/// `status --json`'s summary (`output::document` adds the verdict's `attention`).
#[derive(Serialize)]
struct Summary {
    stages: usize,
    groups: usize,
    groups_by_state: std::collections::BTreeMap<&'static str, usize>,
    instances_off_golden: usize,
}

impl Summary {
    fn of(reports: &[AccountCompliance]) -> Self {
        let mut groups_by_state = std::collections::BTreeMap::new();
        for g in reports.iter().flat_map(|r| &r.groups) {
            *groups_by_state.entry(g.state.as_str()).or_insert(0) += 1;
        }
        Summary {
            stages: reports.len(),
            groups: reports.iter().map(|r| r.groups.len()).sum(),
            groups_by_state,
            instances_off_golden: reports.iter().map(|r| r.instances_off_golden()).sum(),
        }
    }
}

/// A stage's maintenance window, from its cron (UTC): open now until when, or when it opens next.
#[derive(Serialize)]
struct WindowStatus {
    cron: String,
    duration_hours: u32,
    /// The window open now closes then (`None`: none is open).
    open_until: Option<chrono::DateTime<chrono::Utc>>,
    /// The next window opens then (`None`: its cron never fires again).
    next_opens_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl WindowStatus {
    fn of(stage: &rollout::policy::Stage, now: chrono::DateTime<chrono::Utc>) -> Self {
        let w = &stage.window;
        WindowStatus {
            cron: w.cron.clone(),
            duration_hours: w.duration_hours,
            open_until: w
                .open_since(now)
                .map(|opened| opened + chrono::Duration::hours(i64::from(w.duration_hours))),
            next_opens_at: w.next_opening(now),
        }
    }

    /// `open until …` or `opens … (in …)`, to the minute.
    fn describe(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        let minute = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M UTC").to_string();
        let within = |t: chrono::DateTime<chrono::Utc>| {
            let minutes = (t - now).num_minutes().max(1);
            humantime::format_duration(std::time::Duration::from_secs(minutes as u64 * 60))
                .to_string()
        };
        let next = match self.next_opens_at {
            Some(t) => format!("next opens {} (in {})", minute(t), within(t)),
            None => "never opens again (its cron's years are past)".into(),
        };
        match self.open_until {
            Some(t) => format!("open now, until {} (in {}); {next}", minute(t), within(t)),
            None => next,
        }
    }
}

/// Each stage's maintenance window: its cron, and open now or when it opens next.
fn windows_table(
    scope: &crate::scope::Scope,
    reports: &[AccountCompliance],
    now: chrono::DateTime<chrono::Utc>,
) -> Table {
    let mut table = crate::tables::for_people(&["stage", "window (UTC)", "when"], &[], 140);
    for r in reports {
        if let Some(stage) = scope.policy.stage_named(&r.stage) {
            let status = WindowStatus::of(stage, now);
            table.add_row([
                r.stage.clone(),
                format!("{}, {} h", status.cron, status.duration_hours),
                status.describe(now),
            ]);
        }
    }
    table
}

/// Exit 3 when something needs a person (what a cron job or a script gates on): a stage halted,
/// as `amictl plan`, or a group whose last refresh failed or rolled back.
pub fn verdict(reports: &[AccountCompliance], gates: &Preview) -> Result<()> {
    let halted = crate::plan::halted_verdict(gates);
    let failed = failed_groups(reports);
    match (halted, failed.is_empty()) {
        (Ok(()), true) => Ok(()),
        (Err(halted), true) => Err(halted),
        (halted, false) => {
            let failed = format!(
                "{} group(s) whose last refresh did not succeed: {}; `amictl trace` tells why",
                failed.len(),
                failed.join(", ")
            );
            Err(Attention(match halted {
                Ok(()) => failed,
                Err(halted) => format!("{halted:#}; {failed}"),
            })
            .into())
        }
    }
}

/// `stage/group (state)` of every group whose last refresh to its golden AMI failed or rolled back.
fn failed_groups(reports: &[AccountCompliance]) -> Vec<String> {
    reports
        .iter()
        .flat_map(|r| {
            r.groups
                .iter()
                .filter(|g| matches!(g.state, GroupState::Failed | GroupState::RolledBack))
                .map(|g| format!("{}/{} ({})", r.stage, g.name, g.state.as_str()))
        })
        .collect()
}

/// One stage in `status --json`: its compliance, and how its rollouts stand at the gates.
#[derive(Serialize)]
struct StageStatus<'a> {
    #[serde(flatten)]
    compliance: &'a AccountCompliance,
    /// Its maintenance window: open now until when, or when it opens next.
    window: Option<WindowStatus>,
    #[serde(flatten)]
    gate: Option<GateStatus>,
    /// Each recalled AMI some group of the stage still runs, with those groups (still to move
    /// back).
    recalled: Vec<StillOnRecalled>,
}

#[derive(Serialize)]
struct StillOnRecalled {
    ami: String,
    recall: rollout::control::Recall,
    groups: Vec<String>,
}

/// The groups of a stage whose configuration still launches a recalled AMI.
fn still_on_recalled(
    report: &AccountCompliance,
    recalls: &rollout::control::Recalls,
) -> Vec<StillOnRecalled> {
    recalls
        .0
        .values()
        .filter_map(|recall| {
            let groups: Vec<String> = report
                .groups
                .iter()
                .filter(|g| g.ami.as_deref() == Some(recall.ami.as_str()))
                .map(|g| g.name.clone())
                .collect();
            (!groups.is_empty()).then(|| StillOnRecalled {
                ami: recall.ami.clone(),
                recall: recall.clone(),
                groups,
            })
        })
        .collect()
}

/// Every recall (who, when, why) and, per stage, the groups still to move back.
fn recalls_table(reports: &[AccountCompliance], recalls: &rollout::control::Recalls) -> Table {
    let mut table = crate::tables::for_people(
        &["recalled", "by, when, why", "still to move back"],
        &["recalled"],
        140,
    );
    for recall in recalls.0.values() {
        let mut left = Vec::new();
        for r in reports {
            let groups: Vec<&str> = r
                .groups
                .iter()
                .filter(|g| g.ami.as_deref() == Some(recall.ami.as_str()))
                .map(|g| g.name.as_str())
                .collect();
            if !groups.is_empty() {
                left.push(format!(
                    "{}: {} groups ({})",
                    r.stage,
                    groups.len(),
                    groups.join(", ")
                ));
            }
        }
        table.add_row([
            format!("{}@{}", recall.parameter, recall.ami),
            format!(
                "{} at {}: {}",
                recall.decision.by,
                recall.decision.at.to_rfc3339(),
                recall.decision.reason
            ),
            if left.is_empty() {
                "none: every stage moved back".into()
            } else {
                left.join("\n")
            },
        ]);
    }
    table
}

#[derive(Serialize)]
struct GateStatus {
    /// The pause that stops the stage (who, when, why), if any.
    paused: Option<rollout::control::Pause>,
    /// Each family's AMI in the stage: failures against tolerance, halted or not.
    runs: Vec<RunPreview>,
    /// The stage's gate for the AMI the stage before holds: promoted or not, and why.
    gates: Vec<GatePreview>,
}

/// Per stage and rollout: the gate (promoted or not, why), paused or halted (who, when, why),
/// failures against tolerance.
fn gates_table(preview: &Preview) -> Table {
    let mut table = crate::tables::for_people(
        &[
            "stage",
            "rollout",
            "gate",
            "failed / tolerated",
            "halted or paused",
        ],
        &["rollout"],
        140,
    );
    for s in &preview.stages {
        let paused = s
            .paused
            .as_ref()
            .map(|p| format!("paused by {} at {}: {}", p.by, p.at.to_rfc3339(), p.reason));
        for g in &s.gates {
            let run = g
                .ami
                .as_ref()
                .and_then(|ami| {
                    s.runs
                        .iter()
                        .find(|r| r.parameter == g.parameter && r.ami == *ami)
                })
                .or_else(|| s.runs.iter().find(|r| r.parameter == g.parameter));
            let failures = run.map_or_else(
                || "-".to_owned(),
                |r| format!("{} / {} ({} pending)", r.failed, r.tolerated, r.pending),
            );
            let mut state = Vec::new();
            if let Some(r) = run.filter(|r| r.halted) {
                state.push(match &r.halted_by {
                    Some(h) => format!("halted for {} {}", r.ami, h.describe()),
                    None => format!("halted for {}", r.ami),
                });
            }
            if let Some(r) = run.and_then(|r| r.resumed.as_ref()) {
                state.push(format!(
                    "resumed by {} at {}: {}",
                    r.by,
                    r.at.to_rfc3339(),
                    r.reason
                ));
            }
            state.extend(paused.clone());
            table.add_row([
                s.stage.clone(),
                format!("{}@{}", g.parameter, g.ami.as_deref().unwrap_or("(none)")),
                g.detail.clone(),
                failures,
                if state.is_empty() {
                    "-".into()
                } else {
                    state.join("\n")
                },
            ]);
        }
    }
    table
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
        "queued",
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
            r.count(GroupState::Queued).to_string(),
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
    let mut table = crate::tables::for_people(
        &[
            "stage",
            "group",
            "state",
            "AMI",
            "off golden",
            "instances on golden/previous/older/other",
            "why",
        ],
        &["group", "state", "AMI"],
        140,
    );
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
                {
                    let n = &g.instances_by_ami;
                    format!(
                        "{}/{}/{}/{}",
                        n.golden, n.previous_golden, n.older_golden, n.other
                    )
                },
                g.reason.clone(),
            ]);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compliance::{GroupStatus, InstanceCounts, ParameterStatus};

    fn group(name: &str, state: GroupState, ami: &str, reason: &str) -> GroupStatus {
        GroupStatus {
            name: name.into(),
            parameter: Some("/golden/al2023/ami-id".into()),
            ami: Some(ami.into()),
            state,
            reason: reason.into(),
            instances: 3,
            needs_refresh: state == GroupState::Stale,
            instances_off_golden: 3,
            instances_by_ami: InstanceCounts {
                previous_golden: 2,
                older_golden: 1,
                ..InstanceCounts::default()
            },
            instance_amis: Vec::new(),
            last_mark: None,
        }
    }

    /// The groups table at 80, 120 and 200 columns: reasons wrap at word boundaries, no group
    /// name or AMI id is ever broken across lines.
    #[test]
    fn the_groups_table_breaks_no_id_at_any_width() {
        let reports = [AccountCompliance {
            account: "333333333333".into(),
            stage: "prod".into(),
            parameters: vec![ParameterStatus {
                name: "/golden/al2023/ami-id".into(),
                ami: Some("ami-0fedcba9876543210".into()),
                version: Some(7),
            }],
            groups: vec![
                group(
                    "prod-payments-api-blue-green-eu-west-1a",
                    GroupState::RolledBack,
                    "ami-0123456789abcdef0",
                    "rolled back: 2 of 6 instances failed their ELB health checks within the instance warmup; the refresh rolled the group back to launch template version 41",
                ),
                group(
                    "prod-web",
                    GroupState::Stale,
                    "ami-0a1b2c3d4e5f60718",
                    "waiting for the stage's next window",
                ),
            ],
            histories: Default::default(),
        }];
        let ids = [
            "prod-payments-api-blue-green-eu-west-1a",
            "ami-0123456789abcdef0",
            "ami-0a1b2c3d4e5f60718",
        ];
        for width in [80, 120, 200] {
            let mut table = groups_table(&reports, false);
            assert_eq!(
                crate::tables::broken_ids(&mut table, width, &ids),
                Vec::<String>::new(),
                "at {width} columns:\n{table}"
            );
            insta::assert_snapshot!(format!("groups_table_{width}"), table.to_string());
        }
    }
}
