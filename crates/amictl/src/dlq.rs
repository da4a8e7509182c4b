//! `amictl dlq list` and `amictl dlq replay`: what failed, why, and putting it back once the
//! cause is fixed. Listing never consumes (see [`crate::queues`]); replaying sends each chosen
//! message, body and attributes unchanged, to the queue it failed in and deletes it from the DLQ
//! only after that send succeeded. Interrupted, a replay stops between two messages and releases
//! the rest; running the same command again resumes it, since what was moved is no longer there.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;
use clap::{Args, Subcommand};
use comfy_table::{ColumnConstraint, ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use governor::{Quota, RateLimiter};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::exit::Attention;
use crate::queues::{self, DeadLetter, Dlq, age, queue_name};
use crate::scope::{Scope, ScopeArgs, aws_error};

/// Inspect and replay the dead-letter queues of every amiflow account.
#[derive(Debug, Subcommand)]
#[command(
    after_help = "Examples:\n  amictl dlq list                                   # every DLQ of every account\n  amictl dlq replay --detail-type AmiShared --dry-run\n  amictl dlq replay --account prod --queue param --rollout /golden/al2023/ami-id@ami-0123456789abcdef0"
)]
pub enum DlqCommand {
    /// Per DLQ, its message count and per message its detail-type, rollout, age, receive count
    /// and failure reason. Consumes nothing: every message is visible again afterwards.
    #[command(
        after_help = "Examples:\n  amictl dlq list\n  amictl dlq list --account prod --queue param --json\n  amictl dlq list --config amiflow.toml              # real AWS"
    )]
    List(ListArgs),
    /// Move dead-lettered messages back to the queue they failed in (body and attributes kept),
    /// choosing them by detail-type, rollout, reason and age. Deletes a message from the DLQ only
    /// after it was sent. Only messages already dead-lettered when the replay began are moved,
    /// so one that fails again is not replayed in a loop. Interrupted (ctrl-c), it stops between
    /// two messages; run it again to resume.
    ///
    /// With no filter, no --max and no --dry-run it asks SQS to move everything
    /// (StartMessageMoveTask) where SQS offers that, and moves one by one where it does not.
    #[command(
        after_help = "Exit codes: 0 moved (or, with --dry-run, shown) and none came back within --wait, 3 a replayed message failed again within --wait (the output says why), 2 a wrong argument, 1 an error or an interrupt.\n\nExamples:\n  amictl dlq replay --dry-run                                    # what would move, moves nothing\n  amictl dlq replay --detail-type AmiShared --reason 'not visible'\n  amictl dlq replay --account uat --queue refresh --older-than 1h --max 100 --rate 5"
    )]
    Replay(ReplayArgs),
}

#[derive(Debug, Clone, Args)]
pub struct Which {
    /// Only this account (stage name or account id).
    #[arg(long, value_name = "STAGE|ACCOUNT", add = crate::completion::stages())]
    account: Option<String>,
    /// Only this DLQ: `param`, `amiflow-param` or `amiflow-param-dlq` all name one.
    #[arg(long, value_name = "NAME", conflicts_with = "all")]
    queue: Option<String>,
    /// Every DLQ of the chosen accounts (the default).
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    which: Which,
    /// Messages read per DLQ at most (a DLQ may hold thousands).
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    output: crate::output::OutputArgs,
}

#[derive(Debug, Clone, Default, Args)]
pub struct Filters {
    /// Only messages of this detail-type (repeatable): amiflow's own, or an AWS event its rules
    /// route (quote those with spaces).
    #[arg(long = "detail-type", value_name = "TYPE", value_parser = detail_type_parser())]
    detail_types: Vec<String>,
    /// Only messages of this rollout (`<parameter>@<ami id>`).
    #[arg(long, value_name = "ROLLOUT-ID")]
    rollout: Option<String>,
    /// Only messages whose failure kind or reason contains this text (any case).
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    /// Only messages dead-lettered longer ago than this (`90s`, `30m`, `2h`, `1d`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Only messages dead-lettered more recently than this.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    newer_than: Option<Duration>,
}

/// A detail-type a DLQ can hold: a typo is refused with the closest one, not matched to nothing.
fn detail_type_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        events::Detail::TYPES
            .into_iter()
            .chain(events::AWS_DETAIL_TYPES),
    )
}

impl Filters {
    pub fn is_everything(&self) -> bool {
        self.detail_types.is_empty()
            && self.rollout.is_none()
            && self.reason.is_none()
            && self.older_than.is_none()
            && self.newer_than.is_none()
    }

    pub fn matches(&self, d: &DeadLetter) -> bool {
        let age = Duration::from_secs(d.age_seconds);
        (self.detail_types.is_empty()
            || d.detail_type
                .as_ref()
                .is_some_and(|t| self.detail_types.contains(t)))
            && self
                .rollout
                .as_ref()
                .is_none_or(|r| d.rollout_id.as_ref() == Some(r))
            && self.reason.as_ref().is_none_or(|text| {
                let text = text.to_lowercase();
                d.reason.to_lowercase().contains(&text) || d.kind.to_lowercase().contains(&text)
            })
            && self.older_than.is_none_or(|min| age >= min)
            && self.newer_than.is_none_or(|max| age <= max)
    }
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    which: Which,
    #[command(flatten)]
    filters: Filters,
    /// Move at most this many messages in all.
    #[arg(long, value_name = "N")]
    max: Option<usize>,
    /// Messages sent per second at most (SQS allows thousands; the workers behind the queue are
    /// the limit).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    rate: u32,
    /// Send every chosen message to this queue URL instead of the one it failed in.
    #[arg(long, value_name = "QUEUE-URL")]
    to: Option<String>,
    /// Show what would move; move nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: crate::output::OutputArgs,
    /// After moving, watch the DLQs this long for replayed messages that fail again at once
    /// (exit 3 when one does, with its new reason); `0s` to return as soon as they are sent.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

pub async fn run(command: DlqCommand, scope: &ScopeArgs) -> Result<()> {
    match command {
        DlqCommand::List(args) => list(args, scope).await,
        DlqCommand::Replay(args) => replay(args, scope).await,
    }
}

async fn chosen_dlqs(scope: &Scope, which: &Which) -> Result<Vec<(Client, Dlq)>> {
    let mut out = Vec::new();
    for account in scope.select(which.account.as_deref())? {
        let sqs = Client::new(&account.config);
        for dlq in queues::dlqs(account, which.queue.as_deref()).await? {
            out.push((sqs.clone(), dlq));
        }
    }
    if out.is_empty()
        && let Some(name) = &which.queue
    {
        bail!(
            "no DLQ named {} in {}; `amictl dlq list` shows the DLQs there",
            queues::normalize_dlq_name(name),
            match &which.account {
                Some(a) => a.clone(),
                None => scope.known(),
            }
        );
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// list

#[derive(Debug, Serialize)]
pub struct ListedQueue {
    #[serde(flatten)]
    pub dlq: Dlq,
    /// Messages read (at most --limit).
    pub shown: usize,
    pub messages: Vec<DeadLetter>,
}

async fn list(args: ListArgs, scope: &ScopeArgs) -> Result<()> {
    let scope = Scope::open(scope).await?;
    let mut listed = Vec::new();
    for (sqs, dlq) in chosen_dlqs(&scope, &args.which).await? {
        // An empty DLQ costs no receive (and no one-second long poll).
        let messages = if dlq.approximate_messages == 0 {
            Vec::new()
        } else {
            queues::peek(&sqs, &dlq.url, args.limit).await?
        };
        listed.push(ListedQueue {
            shown: messages.len(),
            messages,
            dlq,
        });
    }
    if args.output.json() {
        let summary = serde_json::json!({
            "queues": listed.len(),
            "messages": listed.iter().map(|q| q.dlq.approximate_messages).sum::<u64>(),
            "shown": listed.iter().map(|q| q.shown).sum::<usize>(),
        });
        let body = serde_json::json!({ "queues": listed });
        println!("{:#}", crate::output::document(summary, &Ok(()), &body)?);
        return Ok(());
    }
    println!("{}", queues_table(&listed));
    let messages = messages_table(&listed);
    if messages.row_count() > 0 {
        println!("\n{messages}");
    }
    for q in listed
        .iter()
        .filter(|q| (q.shown as u64) < q.dlq.approximate_messages)
    {
        println!(
            "{} in {}: showing {} of about {}; raise --limit to read more",
            q.dlq.name, q.dlq.stage, q.shown, q.dlq.approximate_messages
        );
    }
    Ok(())
}

fn table() -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    if table.width().is_none() {
        table.set_width(160);
    }
    table
}

pub fn queues_table(listed: &[ListedQueue]) -> Table {
    let mut t = table();
    t.set_header(["stage", "account", "DLQ", "messages", "replays to"]);
    for q in listed {
        t.add_row([
            q.dlq.stage.clone(),
            q.dlq.account.clone(),
            q.dlq.name.clone(),
            q.dlq.approximate_messages.to_string(),
            q.dlq
                .sources
                .iter()
                .map(|s| queue_name(s).to_owned())
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    t
}

pub fn messages_table(listed: &[ListedQueue]) -> Table {
    let mut t = table();
    t.set_header([
        "stage",
        "DLQ",
        "detail-type",
        "rollout",
        "age",
        "receives",
        "kind",
        "reason",
    ]);
    for q in listed {
        for m in &q.messages {
            t.add_row([
                q.dlq.stage.clone(),
                q.dlq.name.clone(),
                m.detail_type
                    .clone()
                    .unwrap_or_else(|| "(not an event)".into()),
                m.rollout_id.clone().unwrap_or_else(|| "-".into()),
                age(m.age_seconds),
                m.receives.to_string(),
                m.kind.clone(),
                shorten(&m.reason, 200),
            ]);
        }
    }
    // Rollout ids are copied into --rollout: never break one across lines.
    if let Some(column) = t.column_mut(3) {
        column.set_constraint(ColumnConstraint::ContentWidth);
    }
    t
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max).collect();
    short.push('…');
    short
}

// ------------------------------------------------------------------------------------------
// replay

/// What a replay did to one DLQ.
#[derive(Debug, Default, Serialize)]
pub struct QueueReplay {
    pub account: String,
    pub stage: String,
    pub dlq: String,
    /// `StartMessageMoveTask` or `one by one`.
    pub method: String,
    pub matched: usize,
    pub moved: usize,
    /// Matching messages not moved: a dry run, --max reached, or an interrupt.
    pub not_moved: usize,
    /// Messages that did not match the filters (left in place).
    pub left: usize,
    /// Messages that entered the DLQ after the replay began (left for the next one: a message
    /// that fails again must not be replayed in a loop).
    pub arrived_during: usize,
    /// Matching messages that could not be moved, with why.
    pub skipped: Vec<Skipped>,
    /// Sent but not deleted from the DLQ: delivered twice (at-least-once).
    pub sent_not_deleted: usize,
    pub messages: Vec<Replayed>,
    /// Replayed messages that came back to this DLQ within `--wait`.
    pub failed_again: Vec<FailedAgain>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub message_id: String,
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct Replayed {
    pub message_id: String,
    pub detail_type: Option<String>,
    pub rollout_id: Option<String>,
    pub kind: String,
    pub destination: String,
    pub moved: bool,
    #[serde(skip)]
    pub fingerprint: String,
}

/// A replayed message back in its DLQ within `--wait`: it failed again.
#[derive(Debug, Serialize)]
pub struct FailedAgain {
    pub message_id: String,
    pub detail_type: Option<String>,
    pub kind: String,
    pub reason: String,
}

struct Plan<'a> {
    args: &'a ReplayArgs,
    limiter: RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        governor::clock::DefaultClock,
    >,
    interrupted: Arc<AtomicBool>,
    /// Moved so far, over all DLQs (for --max).
    moved: usize,
    /// When the replay began (ms since the epoch): only messages dead-lettered before are moved.
    started_ms: u64,
}

impl Plan<'_> {
    fn budget_left(&self) -> bool {
        self.args.max.is_none_or(|max| self.moved < max)
    }
    fn stopped(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }
}

async fn replay(args: ReplayArgs, scope: &ScopeArgs) -> Result<()> {
    let scope = Scope::open(scope).await?;
    let chosen = chosen_dlqs(&scope, &args.which).await?;
    if let (Some(to), Some((sqs, _))) = (&args.to, chosen.first()) {
        sqs.get_queue_attributes()
            .queue_url(to)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| aws_error(&e))
            .with_context(|| format!("--to {to}: no such queue here (or no access to it)"))?;
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::SeqCst);
                eprintln!("\ninterrupted: finishing the message in hand, then releasing the rest");
            }
        });
    }
    let rate = NonZeroU32::new(args.rate).unwrap_or(NonZeroU32::MIN);
    let mut plan = Plan {
        args: &args,
        limiter: RateLimiter::direct(Quota::per_second(rate)),
        interrupted,
        moved: 0,
        started_ms: queues::now_ms(),
    };
    let mut reports = Vec::new();
    for (sqs, dlq) in &chosen {
        if plan.stopped() || !plan.budget_left() {
            break;
        }
        if dlq.approximate_messages == 0 {
            continue;
        }
        let report = if move_task_applies(&args, dlq) {
            match move_everything(&sqs.clone(), dlq, &mut plan).await {
                Ok(report) => report,
                Err(why) => {
                    eprintln!(
                        "{} in {}: StartMessageMoveTask is not available ({why:#}); moving one message at a time",
                        dlq.name, dlq.stage
                    );
                    replay_queue(sqs, dlq, &mut plan).await
                }
            }
        } else {
            replay_queue(sqs, dlq, &mut plan).await
        };
        reports.push(report);
    }
    if !args.dry_run && !args.wait.is_zero() && plan.moved > 0 && !plan.stopped() {
        watch_failing_again(&chosen, &mut reports, plan.started_ms, args.wait).await?;
    }
    let verdict = failed_again(&reports, args.wait);
    if args.output.json() {
        let sum = |f: fn(&QueueReplay) -> usize| reports.iter().map(f).sum::<usize>();
        let summary = serde_json::json!({
            "queues": reports.len(),
            "matched": sum(|r| r.matched),
            "moved": sum(|r| r.moved),
            "failed_again": sum(|r| r.failed_again.len()),
        });
        let body = serde_json::json!({ "queues": reports });
        println!("{:#}", crate::output::document(summary, &verdict, &body)?);
    } else {
        print_replay(&reports, args.dry_run);
    }
    if plan.stopped() {
        bail!(
            "interrupted after moving {} message(s); run the same command again to resume (moved messages are no longer in the DLQ)",
            plan.moved
        );
    }
    if let Some(r) = reports.iter().find(|r| r.error.is_some()) {
        bail!(
            "replay of {} in {} stopped: {}",
            r.dlq,
            r.stage,
            r.error.as_deref().unwrap_or_default()
        );
    }
    verdict
}

/// Exit 3 when a replayed message failed again within `wait`, naming the first and its reason.
fn failed_again(reports: &[QueueReplay], wait: Duration) -> Result<()> {
    let again: Vec<(&QueueReplay, &FailedAgain)> = reports
        .iter()
        .flat_map(|r| r.failed_again.iter().map(move |f| (r, f)))
        .collect();
    if let Some((r, first)) = again.first() {
        return Err(Attention(format!(
            "{} replayed message(s) failed again within {}: {} in {} {}: {}: {}; fix the cause (`amictl dlq list` shows every reason), then replay again",
            again.len(),
            humantime::format_duration(wait),
            first.detail_type.as_deref().unwrap_or("(not an event)"),
            r.stage,
            r.dlq,
            first.kind,
            first.reason
        ))
        .into());
    }
    Ok(())
}

/// Watch each DLQ messages were moved from, for up to `wait`, for those messages coming back
/// (dead-lettered after the replay began, with the fingerprint of one moved; after a whole-queue
/// move task, whose messages are not known one by one, any message dead-lettered since). Stops
/// early once every moved message is back.
async fn watch_failing_again(
    chosen: &[(Client, Dlq)],
    reports: &mut [QueueReplay],
    started_ms: u64,
    wait: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let mut all_back = true;
        for report in reports.iter_mut().filter(|r| r.moved > 0) {
            let Some((sqs, dlq)) = chosen
                .iter()
                .find(|(_, d)| d.name == report.dlq && d.account == report.account)
            else {
                continue;
            };
            let moved: HashSet<&str> = report
                .messages
                .iter()
                .filter(|m| m.moved)
                .map(|m| m.fingerprint.as_str())
                .collect();
            let whole_queue = report.method == "StartMessageMoveTask";
            let back: Vec<FailedAgain> = queues::peek(sqs, &dlq.url, 1000)
                .await?
                .into_iter()
                .filter(|d| {
                    d.sent_ms >= started_ms
                        && (whole_queue || moved.contains(d.fingerprint.as_str()))
                })
                .map(|d| FailedAgain {
                    message_id: d.message_id,
                    detail_type: d.detail_type,
                    kind: d.kind,
                    reason: d.reason,
                })
                .collect();
            all_back &= !whole_queue && back.len() >= moved.len();
            report.failed_again = back;
        }
        if all_back || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
    }
}

/// SQS can move a whole DLQ back by itself when nothing is filtered and the destination is the
/// DLQ's one source queue.
fn move_task_applies(args: &ReplayArgs, dlq: &Dlq) -> bool {
    args.filters.is_everything()
        && !args.dry_run
        && args.max.is_none()
        && args.to.is_none()
        && dlq.sources.len() == 1
        && dlq.approximate_messages > 0
}

async fn move_everything(sqs: &Client, dlq: &Dlq, plan: &mut Plan<'_>) -> Result<QueueReplay> {
    let source = &dlq.sources[0];
    let source_arn = sqs
        .get_queue_attributes()
        .queue_url(source)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| aws_error(&e))?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    let task = sqs
        .start_message_move_task()
        .source_arn(&dlq.arn)
        .destination_arn(&source_arn)
        .max_number_of_messages_per_second(plan.args.rate as i32)
        .send()
        .await
        .map_err(|e| aws_error(&e))?;
    let handle = task.task_handle().unwrap_or_default().to_owned();
    let bar = progress(dlq, dlq.approximate_messages);
    let mut report = QueueReplay {
        account: dlq.account.clone(),
        stage: dlq.stage.clone(),
        dlq: dlq.name.clone(),
        method: "StartMessageMoveTask".into(),
        ..QueueReplay::default()
    };
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if plan.stopped() {
            let _ = sqs
                .cancel_message_move_task()
                .task_handle(&handle)
                .send()
                .await;
        }
        let tasks = sqs
            .list_message_move_tasks()
            .source_arn(&dlq.arn)
            .max_results(1)
            .send()
            .await
            .map_err(|e| aws_error(&e))?;
        let Some(t) = tasks.results().first() else {
            break;
        };
        let moved = t.approximate_number_of_messages_moved() as u64;
        bar.set_position(moved);
        report.moved = moved as usize;
        match t.status() {
            Some("RUNNING") | Some("CANCELLING") => continue,
            Some("FAILED") => {
                report.error = Some(t.failure_reason().unwrap_or("failed").to_owned());
                break;
            }
            _ => break,
        }
    }
    bar.finish_and_clear();
    report.matched = report.moved;
    plan.moved += report.moved;
    Ok(report)
}

fn progress(dlq: &Dlq, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} {}", dlq.stage, dlq.name));
    bar
}

/// Where a dead-lettered message goes back to: `--to`, else the source queue the worker recorded
/// (only if it really is a source of this DLQ), else the DLQ's one source queue.
fn destination(dl: &DeadLetter, dlq: &Dlq, to: Option<&str>) -> Result<String, String> {
    if let Some(to) = to {
        return Ok(to.to_owned());
    }
    if let Some(recorded) = &dl.source_queue {
        return dlq
            .sources
            .iter()
            .find(|s| queue_name(s) == queue_name(recorded))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "its {} {recorded} is not a source queue of {}; choose one with --to",
                    runtime::SOURCE_QUEUE_ATTR,
                    dlq.name
                )
            });
    }
    match dlq.sources.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "{} is no queue's DLQ and the message does not say where it came from; choose with --to",
            dlq.name
        )),
        many => Err(format!(
            "{} is the DLQ of {} queues and the message does not say which; choose with --to",
            dlq.name,
            many.len()
        )),
    }
}

async fn replay_queue(sqs: &Client, dlq: &Dlq, plan: &mut Plan<'_>) -> QueueReplay {
    let mut report = QueueReplay {
        account: dlq.account.clone(),
        stage: dlq.stage.clone(),
        dlq: dlq.name.clone(),
        method: "one by one".into(),
        ..QueueReplay::default()
    };
    let rate = u64::from(plan.args.rate);
    // Long enough to send every message of the queue at the rate limit, twice over.
    let hold = Duration::from_secs((dlq.approximate_messages * 2 / rate + 120).min(43_200));
    let bar = progress(dlq, dlq.approximate_messages);
    let mut held: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    'receive: loop {
        if plan.stopped() || !plan.budget_left() {
            break;
        }
        let batch = match queues::receive(sqs, &dlq.url, hold).await {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(e) => {
                report.error = Some(format!("{e:#}"));
                break;
            }
        };
        let mut fresh = 0;
        for message in batch {
            let receipt = message.receipt_handle().unwrap_or_default().to_owned();
            if !seen.insert(message.message_id().unwrap_or_default().to_owned()) {
                // Back after its visibility ended: already judged; leave it alone.
                continue;
            }
            fresh += 1;
            bar.inc(1);
            let dl = DeadLetter::from_message(&message, queues::now_ms());
            if dl.sent_ms > plan.started_ms {
                // Dead-lettered after we began, perhaps by replaying it: not this replay's.
                report.arrived_during += 1;
                held.push(receipt);
                continue;
            }
            if !plan.args.filters.matches(&dl) {
                report.left += 1;
                held.push(receipt);
                continue;
            }
            report.matched += 1;
            let dest = match destination(&dl, dlq, plan.args.to.as_deref()) {
                Ok(dest) => dest,
                Err(why) => {
                    report.skipped.push(Skipped {
                        message_id: dl.message_id.clone(),
                        why,
                    });
                    held.push(receipt);
                    continue;
                }
            };
            let mut row = Replayed {
                message_id: dl.message_id.clone(),
                detail_type: dl.detail_type.clone(),
                rollout_id: dl.rollout_id.clone(),
                kind: dl.kind.clone(),
                destination: queue_name(&dest).to_owned(),
                moved: false,
                fingerprint: dl.fingerprint.clone(),
            };
            if plan.args.dry_run || plan.stopped() || !plan.budget_left() {
                report.not_moved += 1;
                report.messages.push(row);
                held.push(receipt);
                continue;
            }
            plan.limiter.until_ready().await;
            let sent = sqs
                .send_message()
                .queue_url(&dest)
                .message_body(message.body().unwrap_or_default())
                .set_message_attributes(message.message_attributes().cloned())
                .send()
                .await;
            if let Err(e) = sent {
                report.error = Some(format!(
                    "sending to {} failed: {}",
                    queue_name(&dest),
                    runtime::error::describe(&e)
                ));
                report.not_moved += 1;
                report.messages.push(row);
                held.push(receipt);
                break 'receive;
            }
            if let Err(e) = sqs
                .delete_message()
                .queue_url(&dlq.url)
                .receipt_handle(&receipt)
                .send()
                .await
            {
                bar.suspend(|| {
                    eprintln!(
                        "warning: message {} was sent back but could not be deleted from {} ({}); it will be delivered twice",
                        dl.message_id,
                        dlq.name,
                        runtime::error::describe(&e)
                    );
                });
                report.sent_not_deleted += 1;
            }
            row.moved = true;
            report.moved += 1;
            plan.moved += 1;
            report.messages.push(row);
        }
        if fresh == 0 {
            break;
        }
    }
    bar.finish_and_clear();
    let unreleased = queues::release(sqs, &dlq.url, &held).await;
    if unreleased > 0 {
        eprintln!(
            "warning: {unreleased} message(s) of {} could not be made visible again; they reappear within {} s",
            dlq.name,
            hold.as_secs()
        );
    }
    report
}

pub fn replay_table(reports: &[QueueReplay], dry_run: bool) -> Table {
    let mut t = table();
    t.set_header([
        "stage",
        "DLQ",
        "method",
        "matched",
        if dry_run { "would move" } else { "moved" },
        "left in DLQ",
    ]);
    for r in reports {
        t.add_row([
            r.stage.clone(),
            r.dlq.clone(),
            r.method.clone(),
            r.matched.to_string(),
            if dry_run {
                r.not_moved.to_string()
            } else {
                r.moved.to_string()
            },
            (r.left + r.not_moved + r.skipped.len() + r.arrived_during).to_string(),
        ]);
    }
    t
}

fn print_replay(reports: &[QueueReplay], dry_run: bool) {
    println!("{}", replay_table(reports, dry_run));
    let mut rows = table();
    rows.set_header(["stage", "detail-type", "rollout", "kind", "to", "moved"]);
    for r in reports {
        for m in &r.messages {
            rows.add_row([
                r.stage.clone(),
                m.detail_type
                    .clone()
                    .unwrap_or_else(|| "(not an event)".into()),
                m.rollout_id.clone().unwrap_or_else(|| "-".into()),
                m.kind.clone(),
                m.destination.clone(),
                if m.moved { "yes" } else { "no" }.into(),
            ]);
        }
    }
    if rows.row_count() > 0 {
        println!("\n{rows}");
    }
    for r in reports {
        for s in &r.skipped {
            println!(
                "{} {}: message {} not moved: {}",
                r.stage, r.dlq, s.message_id, s.why
            );
        }
    }
    for r in reports {
        for f in &r.failed_again {
            println!(
                "{} {}: {} failed again at once ({}): {}",
                r.stage,
                r.dlq,
                f.detail_type.as_deref().unwrap_or("(not an event)"),
                f.kind,
                f.reason
            );
        }
    }
    if dry_run {
        println!("\ndry run: nothing was moved");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn letter(detail_type: Option<&str>, rollout: Option<&str>, age: u64) -> DeadLetter {
        DeadLetter {
            message_id: "m-1".into(),
            detail_type: detail_type.map(Into::into),
            rollout_id: rollout.map(Into::into),
            key: None,
            sent_at: "2026-12-01T10:00:00Z".into(),
            sent_ms: 0,
            age_seconds: age,
            receives: 5,
            kind: "transient-exhausted".into(),
            reason: "AMI ami-0123456789abcdef0 is not visible from account 333333333333".into(),
            source_queue: Some("http://localhost/333333333333/amiflow-param".into()),
            body_bytes: 100,
            attributes: BTreeMap::new(),
            fingerprint: "body:0".into(),
        }
    }

    fn dlq(sources: &[&str]) -> Dlq {
        Dlq {
            account: "333333333333".into(),
            stage: "prod".into(),
            name: "amiflow-param-dlq".into(),
            url: "http://localhost/333333333333/amiflow-param-dlq".into(),
            arn: "arn:aws:sqs:us-east-1:333333333333:amiflow-param-dlq".into(),
            approximate_messages: 2,
            sources: sources.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// `dlq replay` with no filter, where SQS has StartMessageMoveTask (the emulator does not):
    /// one task from the DLQ to its source at the replay's rate, followed until it completes.
    #[tokio::test]
    async fn an_unfiltered_replay_asks_sqs_to_move_everything() {
        use aws_sdk_sqs::operation::get_queue_attributes::GetQueueAttributesOutput;
        use aws_sdk_sqs::operation::list_message_move_tasks::ListMessageMoveTasksOutput;
        use aws_sdk_sqs::operation::start_message_move_task::StartMessageMoveTaskOutput;
        use aws_sdk_sqs::types::ListMessageMoveTasksResultEntry;
        use aws_smithy_mocks::{RuleMode, mock, mock_client};

        let source_arn = "arn:aws:sqs:us-east-1:333333333333:amiflow-param";
        let arn = mock!(aws_sdk_sqs::Client::get_queue_attributes).then_output(move || {
            GetQueueAttributesOutput::builder()
                .attributes(QueueAttributeName::QueueArn, source_arn)
                .build()
        });
        let start = mock!(aws_sdk_sqs::Client::start_message_move_task)
            .match_requests(move |r| {
                r.source_arn() == Some("arn:aws:sqs:us-east-1:333333333333:amiflow-param-dlq")
                    && r.destination_arn() == Some(source_arn)
                    && r.max_number_of_messages_per_second() == Some(7)
            })
            .then_output(|| {
                StartMessageMoveTaskOutput::builder()
                    .task_handle("task-1")
                    .build()
            });
        let done = mock!(aws_sdk_sqs::Client::list_message_move_tasks).then_output(|| {
            ListMessageMoveTasksOutput::builder()
                .results(
                    ListMessageMoveTasksResultEntry::builder()
                        .status("COMPLETED")
                        .approximate_number_of_messages_moved(2)
                        .build(),
                )
                .build()
        });
        let sqs = mock_client!(aws_sdk_sqs, RuleMode::MatchAny, [&arn, &start, &done]);
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ReplayArgs,
        }
        let cli = <Cli as clap::Parser>::parse_from(["replay", "--rate", "7"]);
        let q = dlq(&["http://localhost/333333333333/amiflow-param"]);
        assert!(move_task_applies(&cli.args, &q));
        let mut plan = Plan {
            args: &cli.args,
            limiter: RateLimiter::direct(Quota::per_second(NonZeroU32::MIN)),
            interrupted: Arc::new(AtomicBool::new(false)),
            moved: 0,
            started_ms: 0,
        };
        let report = move_everything(&sqs, &q, &mut plan).await.unwrap();
        assert_eq!(
            (report.method.as_str(), report.moved),
            ("StartMessageMoveTask", 2)
        );
        assert_eq!((start.num_calls(), plan.moved), (1, 2));
        // Any filter, a dry run or --max needs the one-by-one path.
        let filtered = <Cli as clap::Parser>::parse_from(["replay", "--detail-type", "AmiShared"]);
        assert!(!move_task_applies(&filtered.args, &q));
        let dry = <Cli as clap::Parser>::parse_from(["replay", "--dry-run"]);
        assert!(!move_task_applies(&dry.args, &q));
    }

    #[test]
    fn filters_combine() {
        let d = letter(Some("AmiShared"), Some("/p@ami-0123456789abcdef0"), 3600);
        assert!(Filters::default().matches(&d));
        let f = Filters {
            detail_types: vec!["AmiShared".into()],
            reason: Some("NOT VISIBLE".into()),
            older_than: Some(Duration::from_secs(600)),
            ..Filters::default()
        };
        assert!(f.matches(&d));
        let newer = Filters {
            newer_than: Some(Duration::from_secs(600)),
            ..Filters::default()
        };
        assert!(!newer.matches(&d));
        let other = Filters {
            rollout: Some("/p@ami-00000000".into()),
            ..Filters::default()
        };
        assert!(!other.matches(&d));
        let typed = Filters {
            detail_types: vec!["ParamUpdated".into()],
            ..Filters::default()
        };
        assert!(!typed.matches(&letter(None, None, 0)));
    }

    #[test]
    fn the_destination_must_be_a_real_source_of_the_dlq() {
        let d = letter(Some("AmiShared"), None, 0);
        let q = dlq(&["http://127.0.0.1:9/333333333333/amiflow-param"]);
        assert_eq!(
            destination(&d, &q, None).unwrap(),
            "http://127.0.0.1:9/333333333333/amiflow-param"
        );
        let mut forged = d;
        forged.source_queue = Some("http://localhost/333333333333/amiflow-refresh".into());
        let err = destination(&forged, &q, None).unwrap_err();
        assert!(err.contains("not a source queue"), "{err}");
        assert_eq!(destination(&forged, &q, Some("u")).unwrap(), "u");
        forged.source_queue = None;
        let err = destination(&forged, &dlq(&["a", "b"]), None).unwrap_err();
        assert!(err.contains("DLQ of 2 queues"), "{err}");
    }

    #[test]
    fn tables_for_people() {
        let listed = vec![ListedQueue {
            dlq: dlq(&["http://localhost/333333333333/amiflow-param"]),
            shown: 2,
            messages: vec![
                letter(
                    Some("AmiShared"),
                    Some("/golden/al2023/ami-id@ami-0123456789abcdef0"),
                    4000,
                ),
                DeadLetter {
                    kind: "invalid-json".into(),
                    reason: "body is not JSON: expected value at line 1 column 1".into(),
                    ..letter(None, None, 42)
                },
            ],
        }];
        insta::assert_snapshot!("dlq_list_queues", queues_table(&listed).to_string());
        insta::assert_snapshot!("dlq_list_messages", messages_table(&listed).to_string());
        let reports = vec![QueueReplay {
            account: "333333333333".into(),
            stage: "prod".into(),
            dlq: "amiflow-param-dlq".into(),
            method: "one by one".into(),
            matched: 1,
            not_moved: 1,
            left: 1,
            ..QueueReplay::default()
        }];
        insta::assert_snapshot!(
            "dlq_replay_dry_run",
            replay_table(&reports, true).to_string()
        );
    }
}
