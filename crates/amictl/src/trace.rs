//! `amictl trace <rollout-id>`: the story of one rollout. The hub's bus sends every AmiBuilt,
//! AmiShared, ParamUpdated, AsgRefreshFinished and AmiRecalled it sees (its own and those the
//! spokes forward) to the audit log group; the trace reads that group's events of the rollout
//! (and, for a recalled AMI, each stage's parameter moving back, caused by the recall), adds the
//! rollout's messages still sitting in any DLQ (the steps that did not happen), and prints them
//! in order: when, in which account, which step, on what, with which result.

use std::collections::HashSet;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use comfy_table::Table;
use serde::Serialize;
use serde_json::Value;

use crate::exit::Attention;
use crate::queues;
use crate::scope::{Scope, ScopeArgs};

/// The hub's audit log group (local/world.py and deploy/hub.yaml create it).
pub const AUDIT_LOG_GROUP: &str = "/amiflow/audit";
/// DLQ messages read per queue when looking for the rollout's failures.
const DLQ_SCAN_LIMIT: usize = 1000;

/// Show which step of one rollout happened when, in which account, with which result.
#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 every step recorded happened and no group's last refresh failed, 3 messages of the rollout are in a DLQ or a group's last refresh failed or rolled back (the table says which), 2 a wrong argument, 1 an error (or nothing recorded for the rollout).\n\nExamples:\n  amictl trace /golden/al2023/ami-id@ami-0123456789abcdef0\n  amictl trace /golden/al2023/ami-id@ami-0123456789abcdef0 --json --config amiflow.toml"
)]
pub struct TraceArgs {
    /// The rollout: `<parameter name>@<ami id>`, as `amictl inject` and the workers' logs print it.
    #[arg(value_name = "ROLLOUT-ID")]
    rollout_id: String,
    /// The hub's audit log group.
    #[arg(long, value_name = "NAME", default_value = AUDIT_LOG_GROUP)]
    log_group: String,
    /// Do not look for the rollout's messages in the DLQs.
    #[arg(long)]
    no_dlq: bool,
    #[command(flatten)]
    output: crate::output::OutputArgs,
}

/// One thing that happened (or failed) in a rollout.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TraceStep {
    /// When the producer emitted it, or when it was dead-lettered.
    pub at: String,
    pub account: String,
    pub stage: String,
    pub step: String,
    pub subject: String,
    pub result: String,
    pub key: String,
}

#[derive(Debug, Serialize)]
pub struct Trace {
    pub rollout_id: String,
    pub steps: Vec<TraceStep>,
}

pub async fn run(args: TraceArgs, scope: &ScopeArgs) -> Result<()> {
    let Some((parameter, ami)) = args.rollout_id.rsplit_once('@') else {
        bail!(
            "{:?} is not a rollout id: expected <parameter name>@<ami id>, e.g. /golden/al2023/ami-id@ami-0123456789abcdef0",
            args.rollout_id
        );
    };
    if parameter.is_empty() || !ami.starts_with("ami-") {
        bail!(
            "{:?} is not a rollout id: expected <parameter name>@<ami id>",
            args.rollout_id
        );
    }
    let scope = Scope::open(scope).await?;
    let stage_of = |id: &str| {
        scope
            .accounts
            .iter()
            .find(|a| a.id == id)
            .map_or_else(|| "?".to_owned(), |a| a.stage.clone())
    };
    let mut audited = audit_events(
        &scope,
        &args.log_group,
        &format!("\"{}\"", args.rollout_id),
        None,
        |v| v["detail"]["rollout_id"].as_str() == Some(args.rollout_id.as_str()),
    )
    .await?;
    if audited
        .iter()
        .any(|v| v["detail-type"].as_str() == Some("AmiRecalled"))
    {
        // The moves back belong to the rollout of the AMI gone back to; the recall caused them.
        let recalled = events::keys::recalled(ami);
        audited.extend(
            audit_events(
                &scope,
                &args.log_group,
                &format!("\"{recalled}\""),
                None,
                |v| v["detail"]["caused_by"].as_str() == Some(recalled.as_str()),
            )
            .await?,
        );
    }
    let mut steps: Vec<TraceStep> = audited
        .iter()
        .filter_map(|event| step_of(event, &scope.hub().id))
        .map(|mut s| {
            s.stage = stage_of(&s.account);
            s
        })
        .collect();
    if !args.no_dlq {
        for account in &scope.accounts {
            let sqs = aws_sdk_sqs::Client::new(&account.config);
            for dlq in queues::dlqs(account, None).await? {
                if dlq.approximate_messages == 0 {
                    continue;
                }
                for dl in queues::peek(&sqs, &dlq.url, DLQ_SCAN_LIMIT)
                    .await?
                    .into_iter()
                    .filter(|d| d.rollout_id.as_deref() == Some(args.rollout_id.as_str()))
                {
                    steps.push(TraceStep {
                        at: dl.sent_at.clone(),
                        account: account.id.clone(),
                        stage: account.stage.clone(),
                        step: dl.detail_type.clone().unwrap_or_default(),
                        subject: dlq.name.clone(),
                        result: format!("dead-lettered ({}): {}", dl.kind, dl.reason),
                        key: dl.key.clone().unwrap_or_default(),
                    });
                }
            }
        }
    }
    // At-least-once: the same outcome may have been emitted twice.
    let mut unique = HashSet::new();
    steps.retain(|s| unique.insert((s.key.clone(), s.step.clone(), s.result.clone())));
    steps.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.key.cmp(&b.key)));
    if steps.is_empty() {
        bail!(
            "nothing recorded for rollout {} in the audit log group {} of the hub {}, nor in any DLQ; check the id (amictl status shows the current AMIs)",
            args.rollout_id,
            args.log_group,
            scope.hub().label()
        );
    }
    let trace = Trace {
        rollout_id: args.rollout_id.clone(),
        steps,
    };
    let verdict = verdict(&trace.steps);
    if args.output.json() {
        let summary =
            serde_json::json!({ "steps": trace.steps.len(), "text": summary(&trace.steps) });
        println!("{:#}", crate::output::document(summary, &verdict, &trace)?);
    } else {
        println!("rollout {}\n", trace.rollout_id);
        println!("{}", table(&trace.steps));
        println!("\n{}", summary(&trace.steps));
    }
    verdict
}

/// The outcome that stands for each group, by (account, group): its last (steps are in time
/// order), so a group refreshed in a later window, or a re-injected event, counts once.
fn last_outcomes(steps: &[TraceStep]) -> std::collections::BTreeMap<(&str, &str), &str> {
    let mut last = std::collections::BTreeMap::new();
    for s in steps
        .iter()
        .filter(|s| s.step == "AsgRefreshFinished" && !s.result.starts_with("dead-lettered"))
    {
        last.insert((s.account.as_str(), s.subject.as_str()), s.result.as_str());
    }
    last
}

/// Exit 3 when the rollout has steps that did not happen or did not succeed: messages still in a
/// DLQ, or groups whose last outcome is `failed` or `rolled-back` (a later success in another
/// window counts, not the failure before it).
fn verdict(steps: &[TraceStep]) -> Result<()> {
    let dead = steps
        .iter()
        .filter(|s| s.result.starts_with("dead-lettered"))
        .count();
    let failed: Vec<String> = last_outcomes(steps)
        .iter()
        .filter(|(_, result)| result.starts_with("failed") || result.starts_with("rolled-back"))
        .map(|((account, group), result)| {
            format!(
                "{group} in {account} ({})",
                result.split(':').next().unwrap_or(result)
            )
        })
        .collect();
    if dead == 0 && failed.is_empty() {
        return Ok(());
    }
    let mut problems = Vec::new();
    if dead > 0 {
        problems.push(format!(
            "{dead} message(s) dead-lettered (`amictl dlq list` says why; `amictl dlq replay` once the cause is fixed)"
        ));
    }
    if !failed.is_empty() {
        problems.push(format!(
            "{} group(s) whose last refresh did not succeed: {}",
            failed.len(),
            failed.join(", ")
        ));
    }
    Err(Attention(format!("the rollout is not whole: {}", problems.join("; "))).into())
}

/// Every audit event matching `pattern` that `keep` accepts, as EventBridge wrote it to the log
/// group (from `since` on, when given).
pub async fn audit_events(
    scope: &Scope,
    group: &str,
    pattern: &str,
    since: Option<chrono::DateTime<chrono::Utc>>,
    keep: impl Fn(&Value) -> bool,
) -> Result<Vec<Value>> {
    let hub = scope.hub();
    let logs = aws_sdk_cloudwatchlogs::Client::new(&hub.config);
    let mut out = Vec::new();
    let mut pages = logs
        .filter_log_events()
        .log_group_name(group)
        // A quoted term matches the exact text; the detail is checked again below.
        .filter_pattern(pattern)
        .set_start_time(since.map(|t| t.timestamp_millis()))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page
            .map_err(|e| {
                let code = aws_sdk_cloudwatchlogs::error::ProvideErrorMetadata::code(&e);
                if code == Some("ResourceNotFoundException") {
                    anyhow!(
                        "the hub {} has no audit log group {group}: deploy/hub.yaml creates it (and `amictl local up` in the local world)",
                        hub.label()
                    )
                } else {
                    crate::scope::aws_error(&e)
                }
            })
            .with_context(|| format!("reading {group} in {} (logs:FilterLogEvents)", hub.label()))?;
        for event in page.events() {
            let Some(message) = event.message() else {
                continue;
            };
            if let Ok(value) = serde_json::from_str::<Value>(message)
                && keep(&value)
            {
                out.push(value);
            }
        }
    }
    Ok(out)
}

/// A trace step from an audit event (`None` for a detail-type the trace does not know).
pub fn step_of(event: &Value, hub: &str) -> Option<TraceStep> {
    let detail_type = event["detail-type"].as_str()?;
    let d = &event["detail"];
    let s = |name: &str| d[name].as_str().unwrap_or_default().to_owned();
    let (account, subject, result) = match detail_type {
        "AmiBuilt" => (
            hub.to_owned(),
            format!("{} ({})", s("ami_id"), s("image_name")),
            format!("built {}", s("created_at")),
        ),
        "AmiShared" => (
            s("target_account"),
            s("ami_id"),
            format!("shared from {}", s("source_account")),
        ),
        "ParamUpdated" => (
            s("account"),
            s("parameter_name"),
            format!(
                "{}= {} (version {}, was {})",
                if s("caused_by").starts_with("recalled:") {
                    "moved back "
                } else {
                    ""
                },
                s("ami_id"),
                d["parameter_version"],
                d["previous_ami_id"].as_str().unwrap_or("nothing")
            ),
        ),
        "AmiRecalled" => (
            hub.to_owned(),
            s("ami_id"),
            format!(
                "recalled by {}: {} (back to {}{})",
                s("recalled_by"),
                s("reason"),
                d["to_ami_id"]
                    .as_str()
                    .unwrap_or("each stage's previous golden AMI"),
                if d["now"].as_bool() == Some(true) {
                    ", at once"
                } else {
                    ", in each stage's window"
                }
            ),
        ),
        "AsgRefreshRequested" => (
            s("account"),
            s("asg_name"),
            format!("requested ({})", s("strategy")),
        ),
        "AsgRefreshFinished" => (
            s("account"),
            s("asg_name"),
            match s("reason") {
                r if r.is_empty() => s("outcome"),
                r => format!("{}: {r}", s("outcome")),
            },
        ),
        _ => return None,
    };
    Some(TraceStep {
        at: s("emitted_at"),
        account,
        stage: String::new(),
        step: detail_type.to_owned(),
        subject,
        result,
        key: s("key"),
    })
}

pub fn table(steps: &[TraceStep]) -> Table {
    let mut t = crate::tables::for_people(
        &["time", "stage", "account", "step", "on", "result"],
        &["time", "account", "on"],
        160,
    );
    for s in steps {
        t.add_row([
            short_time(&s.at),
            s.stage.clone(),
            s.account.clone(),
            s.step.clone(),
            s.subject.clone(),
            s.result.clone(),
        ]);
    }
    t
}

/// `2026-12-01 10:00:01.234`: RFC 3339 to the millisecond, for reading.
pub fn short_time(at: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(at).map_or_else(
        |_| at.to_owned(),
        |t| t.to_utc().format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
    )
}

pub fn summary(steps: &[TraceStep]) -> String {
    let recorded = |s: &&TraceStep| !s.result.starts_with("dead-lettered");
    // Each account once, however often its event was delivered or re-injected.
    let accounts = |step: &str, moved_back: bool| {
        steps
            .iter()
            .filter(recorded)
            .filter(|s| s.step == step && s.result.starts_with("moved back") == moved_back)
            .map(|s| s.account.as_str())
            .collect::<HashSet<_>>()
            .len()
    };
    let last = last_outcomes(steps);
    let outcome = |o: &str| last.values().filter(|r| r.starts_with(o)).count();
    let dead = steps.iter().filter(|s| !recorded(s)).count();
    let built = if steps.iter().any(|s| s.step == "AmiBuilt" && !recorded(&s)) {
        "refused (its AmiBuilt is in a DLQ, with the reason)"
    } else if steps.iter().filter(recorded).any(|s| s.step == "AmiBuilt") {
        "yes"
    } else {
        "not recorded"
    };
    let recall = match steps.iter().any(|s| s.step == "AmiRecalled") {
        false => String::new(),
        true => format!(
            "; recalled: {} request(s) refused, {} parameter(s) moved back",
            outcome("recalled"),
            accounts("ParamUpdated", true)
        ),
    };
    format!(
        "built {built}, shared with {} account(s), parameter updated in {}, groups: {} succeeded, {} failed, {} rolled back, {} skipped; {} message(s) dead-lettered{recall}",
        accounts("AmiShared", false),
        accounts("ParamUpdated", false),
        outcome("succeeded"),
        outcome("failed"),
        outcome("rolled-back"),
        outcome("skipped"),
        dead
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(at: &str, step: &str, subject: &str, result: &str) -> TraceStep {
        TraceStep {
            at: at.into(),
            account: "333333333333".into(),
            stage: "prod".into(),
            step: step.into(),
            subject: subject.into(),
            result: result.into(),
            key: String::new(),
        }
    }

    /// The trace table at 80, 120 and 200 columns: results wrap at word boundaries, no time,
    /// account or group name is ever broken across lines.
    #[test]
    fn the_trace_table_breaks_no_id_at_any_width() {
        let steps = vec![
            step(
                "2026-12-01T10:00:01.234Z",
                "AsgRefreshFinished",
                "prod-payments-api-blue-green-eu-west-1a",
                "rolled-back: 2 of 6 instances failed their ELB health checks within the instance warmup; the refresh rolled the group back",
            ),
            step(
                "2026-12-01T10:00:02.000Z",
                "ParamUpdated",
                "/golden/al2023/ami-id",
                "= ami-0123456789abcdef0 (version 7)",
            ),
        ];
        let ids = [
            "2026-12-01 10:00:01.234",
            "333333333333",
            "prod-payments-api-blue-green-eu-west-1a",
            "/golden/al2023/ami-id",
        ];
        for width in [80, 120, 200] {
            let mut t = table(&steps);
            assert_eq!(
                crate::tables::broken_ids(&mut t, width, &ids),
                Vec::<String>::new(),
                "at {width} columns:\n{t}"
            );
            insta::assert_snapshot!(format!("trace_table_{width}"), t.to_string());
        }
    }

    #[test]
    fn the_verdict_is_each_groups_last_outcome_and_whats_left_in_a_dlq() {
        // Rolled back in one window, succeeded in the next: whole.
        let mut steps = vec![
            step(
                "1",
                "AsgRefreshFinished",
                "web",
                "rolled-back: health checks",
            ),
            step("2", "AsgRefreshFinished", "web", "succeeded"),
            step("2", "AsgRefreshFinished", "api", "skipped: tagged"),
        ];
        assert!(verdict(&steps).is_ok());
        // A group whose last refresh failed, and a message in a DLQ: exit 3, saying both.
        steps.push(step(
            "3",
            "AsgRefreshFinished",
            "api",
            "failed: 2 instances left",
        ));
        steps.push(step(
            "4",
            "AmiShared",
            "amiflow-param-dlq",
            "dead-lettered (transient-exhausted): x",
        ));
        let err = verdict(&steps).unwrap_err();
        assert!(err.downcast_ref::<Attention>().is_some(), "{err:#}");
        assert_eq!(
            err.to_string(),
            "the rollout is not whole: 1 message(s) dead-lettered (`amictl dlq list` says why; `amictl dlq replay` once the cause is fixed); 1 group(s) whose last refresh did not succeed: api in 333333333333 (failed)"
        );
    }

    #[test]
    fn audit_events_become_steps() {
        let events = [
            json!({"detail-type": "AmiBuilt", "detail": {"ami_id": "ami-0123456789abcdef0", "image_name": "golden-al2023-2026-12", "created_at": "2026-12-01T00:00:00Z", "emitted_at": "2026-12-01T10:00:00.000Z", "key": "built:ami-0123456789abcdef0"}}),
            json!({"detail-type": "AmiShared", "detail": {"ami_id": "ami-0123456789abcdef0", "source_account": "111111111111", "target_account": "333333333333", "emitted_at": "2026-12-01T10:00:01.000Z", "key": "shared:ami-0123456789abcdef0:333333333333"}}),
            json!({"detail-type": "ParamUpdated", "detail": {"account": "333333333333", "parameter_name": "/golden/al2023/ami-id", "ami_id": "ami-0123456789abcdef0", "previous_ami_id": "ami-0fedcba9876543210", "parameter_version": 4, "emitted_at": "2026-12-01T10:00:02.000Z", "key": "param:333333333333:/golden/al2023/ami-id:ami-0123456789abcdef0"}}),
            json!({"detail-type": "AsgRefreshFinished", "detail": {"account": "333333333333", "asg_name": "prod-web", "outcome": "skipped", "reason": "the stack hard-codes ImageId", "emitted_at": "2026-12-01T10:05:00.000Z", "key": "finished:333333333333:prod-web:ami-0123456789abcdef0"}}),
            json!({"detail-type": "Something Else", "detail": {}}),
        ];
        let steps: Vec<TraceStep> = events
            .iter()
            .filter_map(|e| step_of(e, "111111111111"))
            .map(|mut s| {
                s.stage = if s.account == "111111111111" {
                    "qa"
                } else {
                    "prod"
                }
                .into();
                s
            })
            .collect();
        assert_eq!(steps.len(), 4);
        insta::assert_snapshot!("trace_table", table(&steps).to_string());
        insta::assert_snapshot!("trace_summary", summary(&steps));
    }

    /// A group refreshed again in a later window, or an event delivered twice, counts once; an
    /// AmiBuilt the share-worker refused (an AMI that does not exist) is not "built".
    #[test]
    fn the_summary_counts_each_group_and_account_once_and_says_when_the_build_was_refused() {
        let mut shared = step(
            "2",
            "AmiShared",
            "ami-0123456789abcdef0",
            "shared from 111111111111",
        );
        shared.account = "333333333333".into();
        let steps = vec![
            step("1", "AmiBuilt", "ami-0123456789abcdef0", "built 2026-12-01"),
            shared.clone(),
            shared,
            step(
                "3",
                "AsgRefreshFinished",
                "web",
                "skipped: the window closed",
            ),
            step("4", "AsgRefreshFinished", "web", "succeeded"),
            step("4", "AsgRefreshFinished", "api", "succeeded"),
        ];
        assert_eq!(
            summary(&steps),
            "built yes, shared with 1 account(s), parameter updated in 0, groups: 2 succeeded, 0 failed, 0 rolled back, 0 skipped; 0 message(s) dead-lettered"
        );
        let refused = vec![
            step("1", "AmiBuilt", "ami-0123456789abcdef0", "built 2026-12-01"),
            step(
                "2",
                "AmiBuilt",
                "amiflow-share-dlq",
                "dead-lettered (permanent): AMI ami-0123456789abcdef0 does not exist in the hub account",
            ),
        ];
        assert!(
            summary(&refused).starts_with(
                "built refused (its AmiBuilt is in a DLQ, with the reason), shared with 0 account(s)"
            ),
            "{}",
            summary(&refused)
        );
    }

    #[test]
    fn a_recall_and_the_moves_back_it_caused_are_steps() {
        let events = [
            json!({"detail-type": "AmiRecalled", "detail": {"ami_id": "ami-0123456789abcdef0", "reason": "CVE-2026-1234", "recalled_by": "arn:aws:sts::111111111111:assumed-role/ops/alice", "now": true, "emitted_at": "2026-12-02T09:00:00.000Z", "key": "recalled:ami-0123456789abcdef0"}}),
            json!({"detail-type": "ParamUpdated", "detail": {"account": "333333333333", "parameter_name": "/golden/al2023/ami-id", "ami_id": "ami-0fedcba9876543210", "previous_ami_id": "ami-0123456789abcdef0", "parameter_version": 5, "emitted_at": "2026-12-02T09:00:02.000Z", "key": "param:333333333333:/golden/al2023/ami-id:ami-0fedcba9876543210", "caused_by": "recalled:ami-0123456789abcdef0"}}),
            json!({"detail-type": "AsgRefreshFinished", "detail": {"account": "333333333333", "asg_name": "prod-web", "outcome": "recalled", "reason": "not started", "emitted_at": "2026-12-02T09:00:03.000Z", "key": "finished:333333333333:prod-web:ami-0123456789abcdef0"}}),
        ];
        let steps: Vec<TraceStep> = events
            .iter()
            .filter_map(|e| step_of(e, "111111111111"))
            .collect();
        assert_eq!(
            steps[0].result,
            "recalled by arn:aws:sts::111111111111:assumed-role/ops/alice: CVE-2026-1234 (back to each stage's previous golden AMI, at once)"
        );
        assert_eq!(
            steps[1].result,
            "moved back = ami-0fedcba9876543210 (version 5, was ami-0123456789abcdef0)"
        );
        assert!(
            summary(&steps)
                .ends_with("; recalled: 1 request(s) refused, 1 parameter(s) moved back"),
            "{}",
            summary(&steps)
        );
    }
}
