//! `amictl report`: compliance evidence an auditor reads, written to one file. The same
//! judgement as `amictl status` (`status::judge`: `compliance::account` and the plan's gates),
//! laid out per stage and instance: the AMI each instance runs and what it is to its group's
//! golden parameter (`compliance::AmiClass`), the AMI's age, the refresh-worker's mark on each
//! group (the rollout, instance refresh and window of its last refresh), the reason for every
//! group left behind, and the window history amiflow recorded in AWS (the gates' promotions and
//! the operators' decisions in the hub, the audit log's golden parameter updates and refresh
//! outcomes). JSON and CSV for
//! tools; HTML (module `html`) for people: one self-contained file with inline CSS and SVG.

mod html;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, ValueEnum};
use rollout::aws::{Ec2Images, Images, Records};
use rollout::control::Promotion;
use serde::Serialize;
use serde_json::Value;

use crate::compliance::{AccountCompliance, AmiClass, GroupState, InstanceCounts};
use crate::plan::{GatePreview, Preview};
use crate::scope::{Scope, ScopeArgs};

/// The version of the report's JSON document (and of its CSV columns); raised when a field
/// changes meaning or goes away.
pub const VERSION: u32 = 1;

/// Where the gates' promotion records live in the hub (`rollout::control::promotion_path`).
const PROMOTIONS: &str = "/amiflow/gate";

/// Write the compliance evidence of every stage (or one) to a file: HTML, JSON or CSV.
#[derive(Debug, Args)]
#[command(
    after_help = "What it covers: the instances of the Auto Scaling groups in each stage account, judged as `amictl status` judges them (a group of no golden family is listed, its instances not charted); each AMI's age from its CreationDate; each group's last refresh from the refresh-worker's mark (rollout, instance refresh, window) and, for when it finished, the hub's audit log (/amiflow/audit); the window history as amiflow recorded it in AWS: each gate's promotion (when and why it opened: /amiflow/gate in the hub's Parameter Store), the operators' decisions the hub holds (/amiflow/control: pauses in force, approvals, halts, resumes, recalls; a lifted pause or halt leaves no record) and the audit log's golden parameter updates and refresh outcomes, from --since on; each stage's gates now, as `amictl plan` shows them. Instances outside Auto Scaling groups and refreshes started by hand are not in it.\n\nFormats: html is one self-contained file (inline CSS and SVG charts, no script, nothing fetched: it opens offline); json is one document with `version` and a `summary`; csv has one row per instance (a group without instances has one row with the instance columns empty), and a cell that a spreadsheet would take for a formula starts with '.\n\nExit codes: 0 the report was written and nothing needs a person, 3 it was written and shows what `amictl status` exits 3 for (a stage halted, a group whose last refresh failed or rolled back), 2 a wrong argument, 1 an error (nothing written).\n\nExamples:\n  amictl report --out compliance.html                      # the local world, every stage\n  amictl report --stage prod --since 30d --format csv --out prod.csv\n  amictl report --config amiflow.toml --format json --since 2026-11-01 --out evidence.json"
)]
pub struct ReportArgs {
    /// Only this stage (a stage name from the policy, or an account id).
    #[arg(long, visible_alias = "account", value_name = "STAGE|ACCOUNT", add = crate::completion::stages())]
    stage: Option<String>,
    /// The window history from then on: a date (2026-11-01), a time (RFC 3339) or a duration
    /// back from now (30d, 12h) [default: everything recorded].
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    since: Option<Since>,
    /// The file's format.
    #[arg(long, value_enum, default_value_t = Format::Html)]
    format: Format,
    /// The file to write [default: standard output].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One self-contained page for people: tables and charts, no script, nothing fetched.
    Html,
    /// One JSON document for tools.
    Json,
    /// One row per instance, for spreadsheets.
    Csv,
}

/// `--since`: a moment, or a duration back from when the report is made.
#[derive(Debug, Clone, Copy)]
pub enum Since {
    At(DateTime<Utc>),
    Ago(std::time::Duration),
}

impl Since {
    fn at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Since::At(t) => t,
            Since::Ago(d) => chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }
}

fn parse_since(text: &str) -> Result<Since, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(Since::At(t.to_utc()));
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(Since::At(d.and_time(chrono::NaiveTime::MIN).and_utc()));
    }
    humantime::parse_duration(text)
        .map(Since::Ago)
        .map_err(|_| {
            format!("{text:?} is no date (2026-11-01), RFC 3339 time or duration (30d, 12h)")
        })
}

/// The whole report: what every format renders.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub version: u32,
    pub generated_at: DateTime<Utc>,
    /// Where it was read: the local world, or the rollout policy's file.
    pub scope: String,
    /// The window history starts here (`None`: everything recorded).
    pub since: Option<DateTime<Utc>>,
    pub summary: Summary,
    pub stages: Vec<StageReport>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub stages: usize,
    pub groups: usize,
    /// Groups of a golden family not current on its golden AMI.
    pub groups_left_behind: usize,
    /// Instances of the groups of a golden family (what the charts count).
    pub instances: usize,
    pub instances_by_ami: InstanceCounts,
    /// Instances of groups of no golden family (listed, not charted).
    pub instances_of_other_groups: usize,
    /// The oldest AMI a charted instance runs, in whole days (`None` if no age is known).
    pub oldest_ami_age_days: Option<i64>,
    /// What needs a person, as `amictl status` says it (and exits 3 for); `None` when nothing.
    pub attention: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: String,
    pub account: String,
    pub parameters: Vec<ParameterReport>,
    pub groups_by_state: BTreeMap<&'static str, usize>,
    pub groups_left_behind: usize,
    /// Instances of the groups of a golden family, by what their AMI is to the group's golden
    /// parameter (the share chart).
    pub instances_by_ami: InstanceCounts,
    /// The same instances by their AMI's age (the age chart).
    pub instances_by_ami_age: Vec<AgeBucket>,
    /// The stage's gates now, as `amictl plan` shows them.
    pub gates: Vec<GatePreview>,
    pub groups: Vec<GroupReport>,
    /// What amiflow recorded of the stage's windows, oldest first.
    pub history: Vec<HistoryEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParameterReport {
    pub name: String,
    pub ami: Option<String>,
    pub version: Option<i64>,
    /// The value the parameter held before (the "previous golden" AMI).
    pub previous_ami: Option<String>,
    pub ami_created_at: Option<DateTime<Utc>>,
    pub ami_age_days: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub name: String,
    pub parameter: Option<String>,
    /// The AMI the group's configuration launches.
    pub ami: Option<String>,
    pub state: GroupState,
    /// Why it is not current (empty when it is).
    pub reason: String,
    /// A group of a golden family that is not current on its golden AMI.
    pub left_behind: bool,
    pub instances_by_ami: InstanceCounts,
    pub last_refresh: Option<LastRefresh>,
    pub instances: Vec<InstanceReport>,
}

/// A group's last refresh, as the refresh-worker marked it (or, with no mark, as the audit log
/// recorded its last outcome).
#[derive(Debug, Clone, Serialize)]
pub struct LastRefresh {
    /// `<parameter>@<ami>`, as `amictl trace` takes it.
    pub rollout_id: String,
    pub ami: String,
    /// `in-progress`, `succeeded`, `failed`, `rolled-back`, `cancelled`, `skipped`, ...
    pub outcome: String,
    pub instance_refresh_id: Option<String>,
    /// When the window of the request closed (or closes).
    pub window_closes_at: Option<String>,
    /// When the audit log recorded its outcome (`None`: still running, or before --since).
    pub finished_at: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceReport {
    pub id: String,
    pub ami: Option<String>,
    /// What the AMI is to the group's golden parameter.
    pub ami_is: AmiClass,
    pub ami_created_at: Option<DateTime<Utc>>,
    pub ami_age_days: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgeBucket {
    pub label: &'static str,
    pub instances: usize,
}

/// The AMI age buckets of the age chart: a monthly patch cycle's months.
const AGE_BUCKETS: [(&str, i64); 4] = [
    ("under 30 days", 30),
    ("30-59 days", 60),
    ("60-89 days", 90),
    ("90 days or more", i64::MAX),
];
const AGE_UNKNOWN: &str = "age unknown";

/// One thing amiflow recorded of a stage's windows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    pub at: String,
    /// `Promoted` (a gate opened), `ParamUpdated`, `AsgRefreshFinished`, or an operator's
    /// decision in force: `Paused`, `Approved`, `Halted`, `Resumed`, `Recalled`.
    pub step: String,
    pub rollout_id: String,
    pub subject: String,
    pub result: String,
}

pub async fn run(args: ReportArgs, scope: &ScopeArgs) -> Result<()> {
    let scope = Scope::open(scope).await?;
    let now = Utc::now();
    let since = args.since.map(|s| s.at(now));
    let (reports, gates) = crate::status::judge(&scope, args.stage.as_deref()).await?;
    let verdict = crate::status::verdict(&reports, &gates);
    let audit = audited(&scope, since).await?;
    let promotions = promotions(&scope, since).await?;
    let hub = crate::control::Hub::of(&scope);
    let stored = hub
        .records
        .list_records(rollout::control::CONTROL)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| {
            format!(
                "reading the operators' decisions in the hub {}",
                scope.hub().label()
            )
        })?;
    let decisions = decisions(&stored, since)?;
    let mut stages = Vec::new();
    for r in &reports {
        let account = scope.account(&r.account)?;
        let created = image_dates(&account.config, r).await?;
        stages.push(stage(
            r,
            &gates,
            &created,
            &audit,
            (&promotions, &decisions),
            now,
        ));
    }
    let attention = verdict.as_ref().err().map(|e| format!("{e:#}"));
    let report = Report::new(scope.origin.clone(), now, since, stages, attention);
    let text = match args.format {
        Format::Html => html::render(&report),
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
        Format::Csv => csv(&report),
    };
    match &args.out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            let s = &report.summary;
            eprintln!(
                "wrote {}: {} stage(s), {} group(s) ({} left behind), {} instance(s): {} on golden, {} previous, {} older, {} other",
                path.display(),
                s.stages,
                s.groups,
                s.groups_left_behind,
                s.instances,
                s.instances_by_ami.golden,
                s.instances_by_ami.previous_golden,
                s.instances_by_ami.older_golden,
                s.instances_by_ami.other
            );
        }
        None => print!("{text}"),
    }
    verdict
}

impl Report {
    fn new(
        scope: String,
        generated_at: DateTime<Utc>,
        since: Option<DateTime<Utc>>,
        stages: Vec<StageReport>,
        attention: Option<String>,
    ) -> Self {
        let mut summary = Summary {
            stages: stages.len(),
            attention,
            ..Summary::default()
        };
        for s in &stages {
            summary.groups += s.groups.len();
            summary.groups_left_behind += s.groups_left_behind;
            summary.instances += s.instances_by_ami.total();
            summary.instances_by_ami = summary.instances_by_ami.plus(s.instances_by_ami);
            for g in &s.groups {
                if g.state == GroupState::Untouched {
                    summary.instances_of_other_groups += g.instances.len();
                } else {
                    summary.oldest_ami_age_days = g
                        .instances
                        .iter()
                        .filter_map(|i| i.ami_age_days)
                        .chain(summary.oldest_ami_age_days)
                        .max();
                }
            }
        }
        Report {
            version: VERSION,
            generated_at,
            scope,
            since,
            summary,
            stages,
        }
    }
}

/// Whole days from `created` to `now`.
fn age_days(created: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<i64> {
    created.map(|c| (now - c).num_days().max(0))
}

/// One stage's report from its compliance, the gates, the AMIs' creation dates, and what the
/// hub recorded (audit events and promotions, every stage's).
fn stage(
    r: &AccountCompliance,
    gates: &Preview,
    created: &HashMap<String, Option<DateTime<Utc>>>,
    audit: &[(Value, crate::trace::TraceStep)],
    (promotions, decisions): (&[Promotion], &[Decided]),
    now: DateTime<Utc>,
) -> StageReport {
    let created_at = |ami: Option<&String>| ami.and_then(|a| created.get(a).copied().flatten());
    let no_history = Vec::new();
    let parameters = r
        .parameters
        .iter()
        .map(|p| {
            let history = r.histories.get(&p.name).unwrap_or(&no_history);
            let at = created_at(p.ami.as_ref());
            ParameterReport {
                name: p.name.clone(),
                ami: p.ami.clone(),
                version: p.version,
                previous_ami: history
                    .iter()
                    .rev()
                    .find(|h| Some(*h) != history.last())
                    .cloned(),
                ami_created_at: at,
                ami_age_days: age_days(at, now),
            }
        })
        .collect();
    // This stage's audited steps, oldest first.
    let audited: Vec<&(Value, crate::trace::TraceStep)> = audit
        .iter()
        .filter(|(_, step)| step.account == r.account)
        .collect();
    let mut groups_by_state = BTreeMap::new();
    let mut instances_by_ami = InstanceCounts::default();
    let mut ages = vec![0; AGE_BUCKETS.len() + 1];
    let groups: Vec<GroupReport> = r
        .groups
        .iter()
        .map(|g| {
            *groups_by_state.entry(g.state.as_str()).or_insert(0) += 1;
            let history = g
                .parameter
                .as_ref()
                .and_then(|p| r.histories.get(p))
                .unwrap_or(&no_history);
            let instances: Vec<InstanceReport> = g
                .instance_amis
                .iter()
                .map(|(id, ami)| {
                    let at = created_at(ami.as_ref());
                    InstanceReport {
                        id: id.clone(),
                        ami: ami.clone(),
                        ami_is: AmiClass::of(ami.as_ref(), history),
                        ami_created_at: at,
                        ami_age_days: age_days(at, now),
                    }
                })
                .collect();
            if g.state != GroupState::Untouched {
                instances_by_ami = instances_by_ami.plus(g.instances_by_ami);
                for i in &instances {
                    let bucket = i.ami_age_days.map_or(AGE_BUCKETS.len(), |days| {
                        AGE_BUCKETS
                            .iter()
                            .position(|(_, below)| days < *below)
                            .unwrap_or(AGE_BUCKETS.len() - 1)
                    });
                    ages[bucket] += 1;
                }
            }
            GroupReport {
                name: g.name.clone(),
                parameter: g.parameter.clone(),
                ami: g.ami.clone(),
                state: g.state,
                reason: g.reason.clone(),
                left_behind: left_behind(g.state),
                instances_by_ami: g.instances_by_ami,
                last_refresh: last_refresh(g, &audited),
                instances,
            }
        })
        .collect();
    let mut history: Vec<HistoryEntry> = promotions
        .iter()
        .filter(|p| p.stage == r.stage)
        .map(|p| HistoryEntry {
            at: p.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            step: "Promoted".into(),
            rollout_id: events::keys::rollout_id(&p.parameter, &p.ami),
            subject: p.parameter.clone(),
            result: format!("gate opened for {}: {}", p.ami, p.reason),
        })
        .chain(audited.iter().map(|(event, step)| {
            HistoryEntry {
                at: step.at.clone(),
                step: step.step.clone(),
                rollout_id: event["detail"]["rollout_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                subject: step.subject.clone(),
                result: step.result.clone(),
            }
        }))
        .chain(
            decisions
                .iter()
                .filter(|d| d.stage.as_ref().is_none_or(|s| *s == r.stage))
                .map(|d| d.entry.clone()),
        )
        .collect();
    // At-least-once: the same outcome may have been recorded twice.
    history.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.subject.cmp(&b.subject)));
    history.dedup();
    StageReport {
        stage: r.stage.clone(),
        account: r.account.clone(),
        parameters,
        groups_left_behind: groups.iter().filter(|g| g.left_behind).count(),
        groups_by_state,
        instances_by_ami,
        instances_by_ami_age: AGE_BUCKETS
            .iter()
            .map(|(label, _)| *label)
            .chain([AGE_UNKNOWN])
            .zip(ages)
            .map(|(label, instances)| AgeBucket { label, instances })
            .collect(),
        gates: gates
            .stages
            .iter()
            .filter(|s| s.stage == r.stage)
            .flat_map(|s| s.gates.clone())
            .collect(),
        groups,
        history,
    }
}

/// A group of a golden family that is not current on its golden AMI.
fn left_behind(state: GroupState) -> bool {
    !matches!(state, GroupState::Current | GroupState::Untouched)
}

/// The group's last refresh: its mark, with when the audit log recorded the mark's outcome; a
/// group without a mark, its last audited outcome.
fn last_refresh(
    g: &crate::compliance::GroupStatus,
    audited: &[&(Value, crate::trace::TraceStep)],
) -> Option<LastRefresh> {
    let finished = |rollout: Option<&str>| {
        audited
            .iter()
            .rev()
            .filter(|(event, step)| {
                step.step == "AsgRefreshFinished"
                    && event["detail"]["asg_name"].as_str() == Some(g.name.as_str())
                    && rollout.is_none_or(|r| event["detail"]["rollout_id"].as_str() == Some(r))
            })
            .map(|(event, step)| (event, step))
            .next()
    };
    let dash = |s: &str| (s != "-" && !s.is_empty()).then(|| s.to_owned());
    if let Some(record) = &g.last_mark {
        let m = &record.mark;
        let rollout_id = events::keys::rollout_id(&m.parameter, &m.ami);
        return Some(LastRefresh {
            finished_at: (!m.is_running())
                .then(|| finished(Some(&rollout_id)).map(|(_, step)| step.at.clone()))
                .flatten(),
            rollout_id,
            ami: m.ami.clone(),
            outcome: m.state.as_str().to_owned(),
            instance_refresh_id: dash(&m.refresh_id),
            window_closes_at: dash(&m.deadline),
            reason: record.reason.clone(),
        });
    }
    let (event, step) = finished(None)?;
    let d = &event["detail"];
    let s = |name: &str| d[name].as_str().map(str::to_owned);
    Some(LastRefresh {
        rollout_id: s("rollout_id").unwrap_or_default(),
        ami: s("ami_id").unwrap_or_default(),
        outcome: s("outcome").unwrap_or_default(),
        instance_refresh_id: s("instance_refresh_id"),
        window_closes_at: None,
        finished_at: Some(step.at.clone()),
        reason: s("reason").filter(|r| !r.is_empty()),
    })
}

/// The audit log's golden parameter updates and refresh outcomes (every stage's), each with the
/// trace step it reads as.
async fn audited(
    scope: &Scope,
    since: Option<DateTime<Utc>>,
) -> Result<Vec<(Value, crate::trace::TraceStep)>> {
    let mut out = Vec::new();
    for detail_type in ["ParamUpdated", "AsgRefreshFinished"] {
        let events = crate::trace::audit_events(
            scope,
            crate::trace::AUDIT_LOG_GROUP,
            &format!("\"{detail_type}\""),
            since,
            |v| v["detail-type"].as_str() == Some(detail_type),
        )
        .await?;
        for event in events {
            if let Some(step) = crate::trace::step_of(&event, &scope.hub().id) {
                out.push((event, step));
            }
        }
    }
    out.sort_by(|a, b| a.1.at.cmp(&b.1.at));
    Ok(out)
}

/// Every gate's promotion record in the hub (from `since` on).
/// A record of the hub as amiflow writes it, or an error naming it (someone wrote it by hand).
fn typed<T: serde::de::DeserializeOwned>(
    record: &rollout::aws::StoredRecord,
    what: &str,
) -> Result<T> {
    serde_json::from_str(&record.value).with_context(|| {
        format!(
            "the {what} record {} is not what amiflow writes",
            record.name
        )
    })
}

/// An operator's decision, for the history of `stage` (`None`: every stage's).
#[derive(Debug, Clone, PartialEq)]
struct Decided {
    stage: Option<String>,
    entry: HistoryEntry,
}

/// The operators' decisions the hub holds under `/amiflow/control` (from `since` on): pauses in
/// force, approvals, halts, resumes of halted stages, recalls, and the pauses and halts lifted
/// (`amictl resume` keeps each under `lifted/` as it deletes it).
fn decisions(
    stored: &[rollout::aws::StoredRecord],
    since: Option<DateTime<Utc>>,
) -> Result<Vec<Decided>> {
    use rollout::control::{Decision, Halt, Lifted, Recall, Resume};
    let reason_suffix = |reason: &str| {
        if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        }
    };
    let mut out = Vec::new();
    for record in stored {
        let parts: Vec<&str> = record
            .name
            .trim_start_matches(rollout::control::CONTROL)
            .trim_start_matches('/')
            .split('/')
            .collect();
        // (stage, step, subject, rollout id, decision, result)
        let (stage, step, subject, rollout_id, decision, result) = match parts.as_slice() {
            ["pause", stage] => {
                let d: Decision = typed(record, "pause")?;
                let all = *stage == rollout::control::ALL;
                let result = format!(
                    "{} by {}: {}",
                    if all {
                        "every stage paused".to_owned()
                    } else {
                        format!("{stage} paused")
                    },
                    d.by,
                    d.reason
                );
                let subject = if all { "every stage" } else { stage };
                (
                    (!all).then_some(*stage),
                    "Paused",
                    subject,
                    String::new(),
                    d,
                    result,
                )
            }
            ["approval", ami, stage] => {
                let d: Decision = typed(record, "approval")?;
                let result = format!("{ami} approved for {stage} by {}: {}", d.by, d.reason);
                (Some(*stage), "Approved", *ami, String::new(), d, result)
            }
            ["halt", ami, stage] => {
                let h: Halt = typed(record, "halt")?;
                let result = format!("{stage} halted for {ami} {}", h.describe());
                (
                    Some(*stage),
                    "Halted",
                    *ami,
                    String::new(),
                    h.decision,
                    result,
                )
            }
            ["resume", ami, stage] => {
                let r: Resume = typed(record, "resume")?;
                let result = format!(
                    "{stage} resumed for {ami} by {}, accepting {} failed group(s): {}",
                    r.decision.by, r.accepted_failures, r.decision.reason
                );
                (
                    Some(*stage),
                    "Resumed",
                    *ami,
                    String::new(),
                    r.decision,
                    result,
                )
            }
            ["lifted", "pause", stage, _] => {
                let l: Lifted<Decision> = typed(record, "lifted pause")?;
                let all = *stage == rollout::control::ALL;
                let result = format!(
                    "{} (by {} at {}: {}) lifted by {}{}",
                    if all {
                        "the pause of every stage".to_owned()
                    } else {
                        format!("{stage}'s pause")
                    },
                    l.was.by,
                    l.was.at.to_rfc3339(),
                    l.was.reason,
                    l.lifted.by,
                    reason_suffix(&l.lifted.reason)
                );
                let subject = if all { "every stage" } else { stage };
                (
                    (!all).then_some(*stage),
                    "Pause lifted",
                    subject,
                    String::new(),
                    l.lifted,
                    result,
                )
            }
            ["lifted", "halt", ami, stage, _] => {
                let l: Lifted<Halt> = typed(record, "lifted halt")?;
                let result = format!(
                    "{stage}'s halt for {ami} ({}) lifted by {}{}",
                    l.was.describe(),
                    l.lifted.by,
                    reason_suffix(&l.lifted.reason)
                );
                (
                    Some(*stage),
                    "Halt lifted",
                    *ami,
                    String::new(),
                    l.lifted,
                    result,
                )
            }
            ["recall", ami] => {
                let r: Recall = typed(record, "recall")?;
                let id = events::keys::rollout_id(&r.parameter, ami);
                (None, "Recalled", *ami, id, r.decision.clone(), r.refusal())
            }
            _ => continue,
        };
        if since.is_some_and(|s| decision.at < s) {
            continue;
        }
        out.push(Decided {
            stage: stage.map(str::to_owned),
            entry: HistoryEntry {
                at: decision
                    .at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                step: step.into(),
                rollout_id,
                subject: subject.to_owned(),
                result,
            },
        });
    }
    Ok(out)
}

async fn promotions(scope: &Scope, since: Option<DateTime<Utc>>) -> Result<Vec<Promotion>> {
    let hub = crate::control::Hub::of(scope);
    let stored = hub
        .records
        .list_records(PROMOTIONS)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("reading the promotions in the hub {}", scope.hub().label()))?;
    let mut out = Vec::new();
    for record in stored {
        let promotion: Promotion = serde_json::from_str(&record.value).with_context(|| {
            format!(
                "the promotion record {} is not what amiflow writes",
                record.name
            )
        })?;
        if since.is_none_or(|s| promotion.at >= s) {
            out.push(promotion);
        }
    }
    Ok(out)
}

/// The creation date of every AMI the stage's instances run and its parameters hold, read in the
/// stage account (`None` for an AMI it cannot see).
async fn image_dates(
    config: &aws_config::SdkConfig,
    r: &AccountCompliance,
) -> Result<HashMap<String, Option<DateTime<Utc>>>> {
    let images = Ec2Images(aws_sdk_ec2::Client::new(config));
    let mut out = HashMap::new();
    let amis = r.parameters.iter().filter_map(|p| p.ami.clone()).chain(
        r.groups
            .iter()
            .flat_map(|g| g.instance_amis.iter().filter_map(|(_, ami)| ami.clone())),
    );
    for ami in amis {
        if out.contains_key(&ami) {
            continue;
        }
        let image = images
            .describe(&ami)
            .await
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading {ami} in {} (ec2:DescribeImages)", r.account))?;
        out.insert(ami, image.and_then(|i| i.created_at));
    }
    Ok(out)
}

/// The CSV columns, in order.
const CSV_COLUMNS: [&str; 19] = [
    "stage",
    "account",
    "group",
    "group_state",
    "left_behind",
    "reason",
    "parameter",
    "golden_ami",
    "previous_golden_ami",
    "instance_id",
    "instance_ami",
    "ami_is",
    "ami_created_at",
    "ami_age_days",
    "last_rollout_id",
    "last_refresh_outcome",
    "last_instance_refresh_id",
    "last_refresh_finished_at",
    "report_version",
];

/// One row per instance (a group without instances: one row, the instance columns empty).
pub fn csv(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&CSV_COLUMNS.join(","));
    out.push_str("\r\n");
    for s in &report.stages {
        for g in &s.groups {
            let parameter = g
                .parameter
                .as_ref()
                .and_then(|p| s.parameters.iter().find(|sp| &sp.name == p));
            let last = g.last_refresh.as_ref();
            let opt = |v: Option<&String>| v.cloned().unwrap_or_default();
            let group_cells = [
                s.stage.clone(),
                s.account.clone(),
                g.name.clone(),
                g.state.as_str().to_owned(),
                g.left_behind.to_string(),
                g.reason.clone(),
                opt(g.parameter.as_ref()),
                opt(parameter.and_then(|p| p.ami.as_ref())),
                opt(parameter.and_then(|p| p.previous_ami.as_ref())),
            ];
            let refresh_cells = [
                opt(last.map(|l| &l.rollout_id)),
                opt(last.map(|l| &l.outcome)),
                opt(last.and_then(|l| l.instance_refresh_id.as_ref())),
                opt(last.and_then(|l| l.finished_at.as_ref())),
                report.version.to_string(),
            ];
            let instance_rows: Vec<[String; 5]> = if g.instances.is_empty() {
                vec![Default::default()]
            } else {
                g.instances
                    .iter()
                    .map(|i| {
                        [
                            i.id.clone(),
                            opt(i.ami.as_ref()),
                            i.ami_is.as_str().to_owned(),
                            i.ami_created_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                            i.ami_age_days.map(|d| d.to_string()).unwrap_or_default(),
                        ]
                    })
                    .collect()
            };
            for instance_cells in instance_rows {
                let row: Vec<String> = group_cells
                    .iter()
                    .chain(&instance_cells)
                    .chain(&refresh_cells)
                    .map(|c| csv_cell(c))
                    .collect();
                out.push_str(&row.join(","));
                out.push_str("\r\n");
            }
        }
    }
    out
}

/// A CSV cell (RFC 4180): quoted when it holds a comma, a quote or a line break. Group names and
/// reasons are anyone's text: one that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`,
/// a tab or a carriage return first) starts with `'` (OWASP's advice for CSV injection).
fn csv_cell(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::compliance::AmiClass;
    use serde_json::json;

    pub const GOLDEN: &str = "ami-0123456789abcdef0";
    pub const PREVIOUS: &str = "ami-0fedcba9876543210";
    pub const OLDER: &str = "ami-0aaaaaaaaaaaaaaaa";

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn instance(id: &str, ami: &str, is: AmiClass, age: i64) -> InstanceReport {
        InstanceReport {
            id: id.into(),
            ami: Some(ami.into()),
            ami_is: is,
            ami_created_at: Some(at("2026-12-05T00:00:00Z") - chrono::Duration::days(age)),
            ami_age_days: Some(age),
        }
    }

    /// A fixed report: prod with a current group, a group left behind whose name and reason are
    /// hostile text, and a group of no family.
    pub fn fixture() -> Report {
        let counts = |golden, previous_golden, older_golden, other| InstanceCounts {
            golden,
            previous_golden,
            older_golden,
            other,
        };
        let groups = vec![
            GroupReport {
                name: "prod-web".into(),
                parameter: Some("/golden/al2023/ami-id".into()),
                ami: Some(GOLDEN.into()),
                state: GroupState::Current,
                reason: String::new(),
                left_behind: false,
                instances_by_ami: counts(2, 0, 0, 0),
                last_refresh: Some(LastRefresh {
                    rollout_id: format!("/golden/al2023/ami-id@{GOLDEN}"),
                    ami: GOLDEN.into(),
                    outcome: "succeeded".into(),
                    instance_refresh_id: Some("r-1".into()),
                    window_closes_at: Some("2026-12-04T06:00:00Z".into()),
                    finished_at: Some("2026-12-04T03:10:00.000Z".into()),
                    reason: None,
                }),
                instances: vec![
                    instance("i-1", GOLDEN, AmiClass::Golden, 3),
                    instance("i-2", GOLDEN, AmiClass::Golden, 3),
                ],
            },
            GroupReport {
                name: "<script>alert(1)</script>".into(),
                parameter: Some("/golden/al2023/ami-id".into()),
                ami: Some(PREVIOUS.into()),
                state: GroupState::Skipped,
                reason: "the stack \"payments\" hard-codes ImageId, <b>fix</b> & retry".into(),
                left_behind: true,
                instances_by_ami: counts(0, 1, 1, 0),
                last_refresh: None,
                instances: vec![
                    instance("i-3", PREVIOUS, AmiClass::PreviousGolden, 34),
                    instance("i-4", OLDER, AmiClass::OlderGolden, 95),
                ],
            },
            GroupReport {
                name: "=HYPERLINK(\"x\")".into(),
                parameter: None,
                ami: None,
                state: GroupState::Untouched,
                reason: "not a group of any golden family".into(),
                left_behind: false,
                instances_by_ami: counts(0, 0, 0, 1),
                last_refresh: None,
                instances: vec![InstanceReport {
                    id: "i-5".into(),
                    ami: None,
                    ami_is: AmiClass::Other,
                    ami_created_at: None,
                    ami_age_days: None,
                }],
            },
        ];
        let stage = StageReport {
            stage: "prod".into(),
            account: "333333333333".into(),
            parameters: vec![ParameterReport {
                name: "/golden/al2023/ami-id".into(),
                ami: Some(GOLDEN.into()),
                version: Some(3),
                previous_ami: Some(PREVIOUS.into()),
                ami_created_at: Some(at("2026-12-02T00:00:00Z")),
                ami_age_days: Some(3),
            }],
            groups_by_state: [("current", 1), ("skipped", 1), ("untouched", 1)].into(),
            groups_left_behind: 1,
            instances_by_ami: counts(2, 1, 1, 0),
            instances_by_ami_age: vec![
                AgeBucket {
                    label: AGE_BUCKETS[0].0,
                    instances: 2,
                },
                AgeBucket {
                    label: AGE_BUCKETS[1].0,
                    instances: 1,
                },
                AgeBucket {
                    label: AGE_BUCKETS[2].0,
                    instances: 0,
                },
                AgeBucket {
                    label: AGE_BUCKETS[3].0,
                    instances: 1,
                },
                AgeBucket {
                    label: AGE_UNKNOWN,
                    instances: 0,
                },
            ],
            gates: vec![],
            groups,
            history: vec![
                HistoryEntry {
                    at: "2026-12-04T03:00:00.000Z".into(),
                    step: "Promoted".into(),
                    rollout_id: format!("/golden/al2023/ami-id@{GOLDEN}"),
                    subject: "/golden/al2023/ami-id".into(),
                    result: format!("gate opened for {GOLDEN}: uat passed <all> groups"),
                },
                HistoryEntry {
                    at: "2026-12-04T03:10:00.000Z".into(),
                    step: "AsgRefreshFinished".into(),
                    rollout_id: format!("/golden/al2023/ami-id@{GOLDEN}"),
                    subject: "prod-web".into(),
                    result: "succeeded".into(),
                },
            ],
        };
        Report::new(
            "the local world".into(),
            at("2026-12-05T08:00:00Z"),
            Some(at("2026-11-05T00:00:00Z")),
            vec![stage],
            None,
        )
    }

    /// Every decision record the hub holds becomes a history entry of its stage (a pause of
    /// every stage and a recall: of every stage), from --since on.
    #[test]
    fn the_operators_decisions_are_history() {
        let decision = |at: &str, reason: &str| json!({"by": "arn:aws:sts::111111111111:assumed-role/ops/alice", "at": at, "reason": reason});
        let stored = |name: &str, value: Value| rollout::aws::StoredRecord {
            name: format!("/amiflow/control/{name}"),
            value: value.to_string(),
            written_by: None,
        };
        let mut halt = decision("2026-12-04T02:30:00Z", "502s");
        halt["cancel_running"] = json!(true);
        let mut resume = decision("2026-12-04T04:00:00Z", "fixed");
        resume["accepted_failures"] = json!(2);
        let mut recall = decision("2026-12-04T05:00:00Z", "CVE-2026-1234");
        recall["ami"] = json!(GOLDEN);
        recall["parameter"] = json!("/golden/al2023/ami-id");
        let records = [
            stored(
                "pause/uat",
                decision("2026-12-04T01:00:00Z", "change freeze"),
            ),
            stored(
                "pause/all",
                decision("2026-11-01T01:00:00Z", "before --since"),
            ),
            stored(
                &format!("approval/{GOLDEN}/prod"),
                decision("2026-12-04T03:00:00Z", "CAB-1234"),
            ),
            stored(&format!("halt/{GOLDEN}/qa"), halt),
            stored(&format!("resume/{GOLDEN}/qa"), resume),
            stored(&format!("recall/{GOLDEN}"), recall),
        ];
        let found = decisions(&records, Some(at("2026-11-05T00:00:00Z"))).unwrap();
        let got: Vec<(Option<&str>, &str, &str)> = found
            .iter()
            .map(|d| {
                (
                    d.stage.as_deref(),
                    d.entry.step.as_str(),
                    d.entry.result.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    Some("uat"),
                    "Paused",
                    "uat paused by arn:aws:sts::111111111111:assumed-role/ops/alice: change freeze"
                ),
                (
                    Some("prod"),
                    "Approved",
                    &*format!(
                        "{GOLDEN} approved for prod by arn:aws:sts::111111111111:assumed-role/ops/alice: CAB-1234"
                    )
                ),
                (
                    Some("qa"),
                    "Halted",
                    &*format!(
                        "qa halted for {GOLDEN} by arn:aws:sts::111111111111:assumed-role/ops/alice at 2026-12-04T02:30:00+00:00 (cancelling its running refreshes): 502s"
                    )
                ),
                (
                    Some("qa"),
                    "Resumed",
                    &*format!(
                        "qa resumed for {GOLDEN} by arn:aws:sts::111111111111:assumed-role/ops/alice, accepting 2 failed group(s): fixed"
                    )
                ),
                (
                    None,
                    "Recalled",
                    &*format!(
                        "{GOLDEN} was recalled by arn:aws:sts::111111111111:assumed-role/ops/alice at 2026-12-04T05:00:00+00:00: CVE-2026-1234"
                    )
                ),
            ]
        );
        assert_eq!(
            found[4].entry.rollout_id,
            format!("/golden/al2023/ami-id@{GOLDEN}")
        );
        let hand_made = [stored("pause/uat", json!("paused"))];
        let err = decisions(&hand_made, None).unwrap_err();
        assert!(
            format!("{err:#}")
                .contains("the pause record /amiflow/control/pause/uat is not what amiflow writes"),
            "{err:#}"
        );
    }

    /// A pause or halt `amictl resume` lifted is history too: what it was, who lifted it and why.
    #[test]
    fn lifted_pauses_and_halts_are_history() {
        let decision = |at: &str, reason: &str| json!({"by": "arn:aws:sts::111111111111:assumed-role/ops/alice", "at": at, "reason": reason});
        let stored = |name: &str, value: Value| rollout::aws::StoredRecord {
            name: format!("/amiflow/control/lifted/{name}"),
            value: value.to_string(),
            written_by: None,
        };
        let mut halt = decision("2026-12-04T02:30:00Z", "502s");
        halt["cancel_running"] = json!(false);
        let records = [
            stored(
                "pause/all/1764810000000",
                json!({"was": decision("2026-12-04T01:00:00Z", "incident 42"), "lifted": decision("2026-12-04T01:30:00Z", "")}),
            ),
            stored(
                &format!("halt/{GOLDEN}/qa/1764815400000"),
                json!({"was": halt, "lifted": decision("2026-12-04T04:00:00Z", "fixed")}),
            ),
        ];
        let found = decisions(&records, None).unwrap();
        let got: Vec<(Option<&str>, &str, &str, &str)> = found
            .iter()
            .map(|d| {
                (
                    d.stage.as_deref(),
                    d.entry.step.as_str(),
                    d.entry.at.as_str(),
                    d.entry.result.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    None,
                    "Pause lifted",
                    "2026-12-04T01:30:00.000Z",
                    "the pause of every stage (by arn:aws:sts::111111111111:assumed-role/ops/alice at 2026-12-04T01:00:00+00:00: incident 42) lifted by arn:aws:sts::111111111111:assumed-role/ops/alice"
                ),
                (
                    Some("qa"),
                    "Halt lifted",
                    "2026-12-04T04:00:00.000Z",
                    &*format!(
                        "qa's halt for {GOLDEN} (by arn:aws:sts::111111111111:assumed-role/ops/alice at 2026-12-04T02:30:00+00:00: 502s) lifted by arn:aws:sts::111111111111:assumed-role/ops/alice: fixed"
                    )
                ),
            ]
        );
    }

    #[test]
    fn the_summary_adds_up_the_stages() {
        let s = fixture().summary;
        assert_eq!(
            (s.stages, s.groups, s.groups_left_behind, s.instances),
            (1, 3, 1, 4)
        );
        assert_eq!(s.instances_by_ami.previous_golden, 1);
        assert_eq!(s.instances_of_other_groups, 1);
        assert_eq!(s.oldest_ami_age_days, Some(95));
    }

    #[test]
    fn the_json_has_a_version_a_summary_and_every_instance() {
        let json: Value = serde_json::to_value(fixture()).unwrap();
        assert_eq!(json["version"], VERSION);
        assert_eq!(json["summary"]["instances_by_ami"]["golden"], 2);
        let group = &json["stages"][0]["groups"][1];
        assert_eq!(group["name"], "<script>alert(1)</script>");
        assert_eq!(group["left_behind"], true);
        assert_eq!(group["instances"][1]["ami_is"], "older-golden");
        assert_eq!(group["instances"][1]["ami_age_days"], 95);
        assert_eq!(json["stages"][0]["instances_by_ami_age"][3]["instances"], 1);
    }

    #[test]
    fn the_csv_has_one_row_per_instance_quoted_and_defused() {
        let text = csv(&fixture());
        let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1 + 5, "{text}");
        assert_eq!(lines[0], CSV_COLUMNS.join(","));
        assert!(
            lines[3].starts_with(
                "prod,333333333333,<script>alert(1)</script>,skipped,true,\"the stack \"\"payments\"\" hard-codes ImageId, <b>fix</b> & retry\",/golden/al2023/ami-id,"
            ),
            "{}",
            lines[3]
        );
        assert!(lines[4].contains(",i-4,ami-0aaaaaaaaaaaaaaaa,older-golden,"));
        // A name a spreadsheet would run as a formula is text.
        assert!(
            lines[5].starts_with("prod,333333333333,\"'=HYPERLINK(\"\"x\"\")\",untouched,false,"),
            "{}",
            lines[5]
        );
        insta::assert_snapshot!("report_csv", text);
    }

    #[test]
    fn a_csv_cell_is_quoted_only_when_it_must_be() {
        assert_eq!(csv_cell("prod-web"), "prod-web");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(csv_cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_cell("-1+1"), "'-1+1");
    }

    #[test]
    fn since_is_a_date_a_time_or_a_duration_back() {
        let now = at("2026-12-05T08:00:00Z");
        assert_eq!(
            parse_since("2026-11-01").unwrap().at(now),
            at("2026-11-01T00:00:00Z")
        );
        assert_eq!(
            parse_since("2026-11-01T10:00:00+01:00").unwrap().at(now),
            at("2026-11-01T09:00:00Z")
        );
        assert_eq!(
            parse_since("30d").unwrap().at(now),
            at("2026-11-05T08:00:00Z")
        );
        assert!(parse_since("last tuesday").is_err());
    }

    #[test]
    fn an_instance_is_judged_against_its_groups_parameter_history() {
        let history: Vec<String> = [OLDER, PREVIOUS, GOLDEN].map(String::from).to_vec();
        let of = |ami: &str| AmiClass::of(Some(&ami.to_owned()), &history);
        assert_eq!(of(GOLDEN), AmiClass::Golden);
        assert_eq!(of(PREVIOUS), AmiClass::PreviousGolden);
        assert_eq!(of(OLDER), AmiClass::OlderGolden);
        assert_eq!(of("ami-0bbbbbbbbbbbbbbbb"), AmiClass::Other);
        assert_eq!(AmiClass::of(None, &history), AmiClass::Other);
    }
}
