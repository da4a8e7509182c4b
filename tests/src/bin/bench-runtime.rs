//! Benchmark: the amiflow runtime with a no-op step against a raw SDK receive/delete-batch loop,
//! over the same number of messages, in one process against one emulator (the emulator is the
//! bottleneck, so only the ratio means anything). Also measures the probe worker's start-up time
//! and idle resident memory. Writes its section of BENCHMARKS.md.
//!
//! `cargo run --release -p e2e --bin bench-runtime [-- --messages N --rounds R]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use chrono::{TimeZone, Utc};
use events::{AmiBuilt, Detail, Inbound};
use runtime::{Step, StepError, StepOutput, Worker, WorkerConfig, WorkerStats};

struct Noop;

impl Step for Noop {
    async fn run(&self, _: &Inbound) -> Result<StepOutput, StepError> {
        Ok(StepOutput::Emit(Vec::new()))
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn fill(sqs: &aws_sdk_sqs::Client, queue: &str, n: usize) {
    let detail: Detail = AmiBuilt::new(
        "ami-0a1b2c3d4e5f60718",
        "us-east-1",
        "golden-al2023-2026-11",
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        "/golden/al2023/ami-id",
    )
    .into();
    let body = serde_json::json!({"version":"0","id":"b","detail-type":"AmiBuilt","source":"amiflow","account":"123456789012",
        "time":"2026-11-07T02:00:00Z","region":"us-east-1","resources":[],"detail":detail.to_value()})
    .to_string();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let entries: Vec<SendMessageBatchRequestEntry> = chunk
            .iter()
            .map(|i| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&body)
                    .build()
                    .unwrap()
            })
            .collect();
        sqs.send_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
    }
}

/// The baseline: receive 10, delete them in one batch, repeat until `n` are gone.
async fn raw_loop(sqs: &aws_sdk_sqs::Client, queue: &str, n: usize) -> Duration {
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let out = sqs
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        let entries: Vec<DeleteMessageBatchRequestEntry> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().unwrap())
                    .build()
                    .unwrap()
            })
            .collect();
        done += entries.len();
        sqs.delete_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
    }
    started.elapsed()
}

/// The runtime with a no-op step: time until it has finished `n` messages.
async fn runtime_loop(local: &e2e::Local, queue: &str, n: usize) -> Duration {
    let mut config = WorkerConfig::new("bench", queue, "amiflow");
    config.wait_time = Duration::from_secs(1);
    let worker = Worker::connect(local.sqs(), local.eventbridge(), config)
        .await
        .unwrap();
    let stats = worker.stats();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let handle = tokio::spawn(worker.run(Arc::new(Noop), async {
        let _ = rx.await;
    }));
    // Like the raw loop: the time until SQS confirmed the n-th delete; stopping is not counted
    // (a stopping worker lets its last long poll return, which would add up to the wait time).
    while (WorkerStats::get(&stats.deleted) as usize) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    elapsed
}

/// Add the emulator's call counts since the last reset, by action.
fn count_calls(port: u16, into: &mut BTreeMap<String, u64>) {
    let calls = e2e::http_json(port, "GET", "/amiflow-emulator/calls", None);
    for row in calls["calls"].as_array().into_iter().flatten() {
        *into
            .entry(row["action"].as_str().unwrap_or_default().to_owned())
            .or_default() += row["count"].as_u64().unwrap_or(0);
    }
}

fn per_message(calls: &BTreeMap<String, u64>, messages: usize) -> String {
    calls
        .iter()
        .map(|(action, n)| format!("{action} {:.2}", *n as f64 / messages as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Start a worker (`command`), time until it logs "worker started", then sample its idle RSS.
fn worker_startup(
    mut command: std::process::Command,
    endpoint: &str,
    queue: &str,
) -> (Duration, u64) {
    use std::io::{BufRead, BufReader};
    let what = format!("{:?}", command.get_program());
    let started = Instant::now();
    let mut child = command
        .envs(e2e::worker_env(endpoint))
        .env("AMIFLOW_QUEUE_URL", queue)
        .env("AMIFLOW_BUS", "amiflow")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{what}: {e} (build the probe with `cargo build --release -p e2e --bins`)")
        });
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut said = Vec::new();
    let startup = loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("worker started") => break started.elapsed(),
            Some(Ok(line)) => said.push(line),
            Some(Err(_)) => {}
            None => panic!("{what} exited before starting:\n{}", said.join("\n")),
        }
    };
    // Idle: one empty long poll in progress. Sample RSS a few times over a second, keep the max.
    let mut rss = 0;
    for _ in 0..10 {
        rss = rss.max(rss_kib(child.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    (startup, rss)
}

#[tokio::main]
async fn main() {
    let n = arg("--messages", 400);
    let rounds = arg("--rounds", 3);
    let local = e2e::Local::start().await;
    let sqs = local.sqs();
    let (queue, _dlq) = local.queue_with_dlq("bench", 30).await;
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    let port = local.emulator.port();
    let (mut raw_calls, mut our_calls) = (BTreeMap::new(), BTreeMap::new());
    for round in 0..rounds {
        fill(&sqs, &queue, n).await;
        e2e::http_json(port, "POST", "/amiflow-emulator/calls", None);
        let r = raw_loop(&sqs, &queue, n).await;
        count_calls(port, &mut raw_calls);
        fill(&sqs, &queue, n).await;
        e2e::http_json(port, "POST", "/amiflow-emulator/calls", None);
        let o = runtime_loop(&local, &queue, n).await;
        count_calls(port, &mut our_calls);
        println!(
            "round {round}: raw {:.1} msg/s, runtime {:.1} msg/s",
            n as f64 / r.as_secs_f64(),
            n as f64 / o.as_secs_f64()
        );
        raw.push(n as f64 / r.as_secs_f64());
        ours.push(n as f64 / o.as_secs_f64());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (raw_rate, our_rate) = (mean(&raw), mean(&ours));
    let probe = std::env::current_exe()
        .unwrap()
        .with_file_name("probe-worker");
    let (startup, rss) =
        worker_startup(std::process::Command::new(probe), &local.endpoint(), &queue);
    // The same no-op loop in Python with boto3, from the project's own virtual environment.
    let root = emulator::project_root();
    let python = emulator::ensure_venv(&root).expect("the project's Python environment");
    let mut boto = std::process::Command::new(python);
    boto.arg(root.join("local/bench/idle_worker.py"));
    let (py_startup, py_rss) = worker_startup(boto, &local.endpoint(), &queue);
    let body = format!(
        "## Runtime throughput (`just bench-runtime`)\n\n\
         {n} messages per run, {rounds} rounds, one emulator, same process; release build; measured {date}.\n\n\
         | loop | messages/s |\n|---|---|\n\
         | raw SDK receive (10) + delete-batch | {raw_rate:.1} |\n\
         | amiflow runtime, no-op step | {our_rate:.1} |\n\
         | **ratio runtime / raw** | **{ratio:.2}** (target ≥ 0.95) |\n\n\
         API calls per message (counted by the emulator): raw loop {raw_per}; runtime {our_per}.\n\n\
         | idle worker, same no-op loop | amiflow runtime (Rust) | boto3 (`local/bench/idle_worker.py`) | ratio |\n|---|---|---|---|\n\
         | start-up to first receive | {startup_ms} ms | {py_startup_ms} ms | {startup_ratio:.2} |\n\
         | idle resident memory | {rss_mib:.1} MiB | {py_rss_mib:.1} MiB | {rss_ratio:.2} |\n\n\
         The emulator (moto, Python) is the bottleneck at roughly 10 ms of server CPU per call, so\n\
         absolute rates say little; the ratio is the result.\n",
        date = Utc::now().format("%Y-%m-%d"),
        ratio = our_rate / raw_rate,
        raw_per = per_message(&raw_calls, n * rounds),
        our_per = per_message(&our_calls, n * rounds),
        startup_ms = startup.as_millis(),
        rss_mib = rss as f64 / 1024.0,
        py_startup_ms = py_startup.as_millis(),
        py_rss_mib = py_rss as f64 / 1024.0,
        startup_ratio = startup.as_secs_f64() / py_startup.as_secs_f64().max(f64::EPSILON),
        rss_ratio = rss as f64 / (py_rss as f64).max(1.0),
    );
    e2e::write_benchmark_section("bench-runtime", &body);
}
