//! Benchmark: a whole rollout in the local world at the seed story's size (about 1,000 / 1,500 /
//! 2,000 instances in qa / uat / prod), every worker binary a process of its own. Reports the
//! world's provisioning time, the rollout's wall time next to the time the emulator itself spent
//! serving the rollout's API calls (counted by the shim's call counter, `amiflow_shim.calls`), and
//! the API calls per refreshed group, by worker; then recalls the new AMI (`amictl recall --now`,
//! as an operator runs it) and measures the move back of every refreshed group the same way.
//! Writes its section of BENCHMARKS.md.
//!
//! `just bench-rollout` = `cargo build -p rollout --bins && cargo run -p e2e --bin bench-rollout
//! [-- --scale seed|small --concurrency N]`. Debug builds on purpose: the emulator, not the
//! workers, is the bottleneck, and a release build of aws-sdk-ec2 alone takes longer than the run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use e2e::proxy::{CallRecord, FaultPlan, FaultProxy, aws_bucket};
use e2e::world::{World, expects_outcome};
use events::AmiBuilt;
use local_world::Audit;

const PARAMETER: &str = "/golden/al2023/ami-id";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

/// The rollout's calls against AWS's buckets: per bucket, the share throttled and the busiest
/// 20 s of any one caller as a share of what the bucket allows in 20 s.
/// The least time AWS's buckets need for the calls the workers made: per caller and bucket,
/// (accepted calls - bucket size) / refill, added up over the callers of one bucket kind (the
/// stages run one after the other, so their callers hardly overlap), the slowest bucket kind.
fn rate_floor(records: &[CallRecord]) -> (f64, String) {
    let mut accepted: BTreeMap<(&str, &str), (u32, u32, u64)> = BTreeMap::new();
    for (_, service, action, caller, throttled) in records {
        if let Some((bucket, size, refill)) = aws_bucket(service, action)
            && !*throttled
        {
            accepted
                .entry((bucket, caller.as_str()))
                .or_insert((size, refill, 0))
                .2 += 1;
        }
    }
    let mut per_bucket: BTreeMap<&str, f64> = BTreeMap::new();
    for ((bucket, _), (size, refill, n)) in &accepted {
        *per_bucket.entry(bucket).or_default() +=
            (*n as f64 - f64::from(*size)).max(0.0) / f64::from(*refill);
    }
    per_bucket.into_iter().map(|(b, s)| (s, b.to_owned())).fold(
        (0.0, String::from("none")),
        |a, b| if b.0 > a.0 { b } else { a },
    )
}

/// CPU seconds the emulator has spent: on the workers' calls since the counter was reset (the
/// harness's own calls excluded), and in the whole process since it started.
fn emulator_cpu(world: &World, port: u16) -> (f64, f64) {
    let calls = e2e::http_json(port, "GET", "/amiflow-emulator/calls", None);
    let process = calls["process_cpu_seconds"].as_f64().unwrap_or(0.0);
    let served = calls["calls"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| {
                    world
                        .worker_of_key(r["key"].as_str().unwrap_or_default())
                        .is_some()
                })
                .map(|r| r["cpu_seconds"].as_f64().unwrap_or(0.0))
                .sum()
        })
        .unwrap_or(0.0);
    (served, process)
}

/// Each stage account's emulated refresh seconds so far (`/amiflow-emulator/refreshes`).
fn refresh_seconds(port: u16) -> BTreeMap<String, f64> {
    let refreshes = e2e::http_json(port, "GET", "/amiflow-emulator/refreshes", None);
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for r in refreshes["refreshes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        if let (Some(account), Some(seconds)) = (r["account"].as_str(), r["seconds"].as_f64()) {
            *out.entry(account.to_owned()).or_default() += seconds;
        }
    }
    out
}

/// `amictl <args> --config <policy>` run as an operator runs it against AWS (the standard
/// credentials, the policy's role per account), and how long it took.
fn operator(world: &World, policy: &std::path::Path, args: &[&str]) -> (std::process::Output, f64) {
    let amictl = e2e::world::bin_dir().join("amictl");
    assert!(
        amictl.exists(),
        "{} is missing: build it first (`cargo build -p rollout -p amictl --bins`, as `just bench-rollout` does)",
        amictl.display()
    );
    let started = Instant::now();
    let out = std::process::Command::new(&amictl)
        .args(args)
        .arg("--config")
        .arg(policy)
        .env("AWS_ENDPOINT_URL", world.local.endpoint())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("amictl runs");
    (out, started.elapsed().as_secs_f64())
}

/// `amictl recall <ami> --now` as an operator runs it, and how long it took.
fn recall_now(world: &World, policy: &std::path::Path, ami: &str) -> f64 {
    let (out, took) = operator(
        world,
        policy,
        &["recall", ami, "--now", "--reason", "bench: the move back"],
    );
    assert!(
        out.status.success(),
        "amictl recall failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// One phase of the rollout and the least time each resource allows it.
struct Phase {
    name: String,
    wall: f64,
    /// CPU time the emulator's threads spent serving the workers' calls in the phase.
    served: f64,
    /// CPU time of the whole emulator process in the phase: the calls, and the emulated
    /// refreshes replacing instances in the background.
    emulator: f64,
    /// What AWS's request buckets need for the phase's calls.
    rate: f64,
    /// The emulated refreshes' durations over `max_concurrent_refreshes`.
    refresh: f64,
}

impl Phase {
    fn floor(&self) -> f64 {
        self.emulator.max(self.rate).max(self.refresh)
    }
}

fn throttling(records: &[CallRecord]) -> String {
    const WINDOW: f64 = 20.0;
    let mut per_bucket: BTreeMap<&str, (u32, u32, u64, u64)> = BTreeMap::new();
    let mut accepted_at: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for (at, service, action, caller, throttled) in records {
        let Some((bucket, size, refill)) = aws_bucket(service, action) else {
            continue;
        };
        let e = per_bucket.entry(bucket).or_insert((size, refill, 0, 0));
        e.2 += 1;
        if *throttled {
            e.3 += 1;
        } else {
            accepted_at
                .entry((bucket, caller.as_str()))
                .or_default()
                .push(at.as_secs_f64());
        }
    }
    let mut out = String::from(
        "\nThe workers' calls through the fault proxy enforcing AWS's request-token buckets (per caller):\n\n\
         | bucket (AWS size + refill) | calls | throttled | busiest 20 s of one caller, of AWS's allowance |\n|---|---|---|---|\n",
    );
    let (mut all, mut all_throttled) = (0u64, 0u64);
    for (bucket, (size, refill, calls, throttled)) in &per_bucket {
        let allowance = f64::from(*size) + f64::from(*refill) * WINDOW;
        let busiest = accepted_at
            .iter()
            .filter(|((b, _), _)| b == bucket)
            .map(|(_, times)| {
                let mut most = 0usize;
                let mut start = 0usize;
                for (end, t) in times.iter().enumerate() {
                    while times[start] < t - WINDOW {
                        start += 1;
                    }
                    most = most.max(end + 1 - start);
                }
                most as f64 / allowance
            })
            .fold(0.0f64, f64::max);
        all += calls;
        all_throttled += throttled;
        out.push_str(&format!(
            "| {bucket} ({size} + {refill}/s) | {calls} | {throttled} ({:.2}%) | {:.0}% |\n",
            *throttled as f64 * 100.0 / (*calls).max(1) as f64,
            busiest * 100.0
        ));
    }
    out.push_str(&format!(
        "\n**{:.2}%** of the rollout's rate-limited calls were throttled (target ≤ 2%). `just bench-throttle`\n\
         measures the same at 90% and more of the allowed rate.\n",
        all_throttled as f64 * 100.0 / all.max(1) as f64
    ));
    out
}

/// How long `amictl plan --ami <candidate> --json` takes over the whole world, run as an operator
/// runs it against AWS (`--config`, the standard credentials, the policy's role per account).
fn plan_seconds(world: &World, policy: &std::path::Path, candidate: &str) -> f64 {
    let (out, took) = operator(world, policy, &["plan", "--ami", candidate, "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "amictl plan printed no plan ({e}, {}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let planned: usize = plan["stages"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|s| s["groups"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0);
    let groups: usize = world.accounts().iter().map(|a| world.groups(a).len()).sum();
    assert_eq!(planned, groups, "amictl plan judged every group");
    took
}

#[tokio::main]
async fn main() {
    let scale = arg("--scale", "seed");
    let concurrency: u32 = arg("--concurrency", "10").parse().expect("--concurrency N");
    // The local policy with a production-like concurrency: seed-scale stages have 100-200 groups.
    let policy_text = std::fs::read_to_string(emulator::project_root().join("local/amiflow.toml"))
        .expect("local/amiflow.toml");
    let policy_text: String = policy_text
        .lines()
        .map(|l| {
            if l.starts_with("max_concurrent_refreshes") {
                format!("max_concurrent_refreshes = {concurrency}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("amiflow.toml");
    std::fs::write(&policy, policy_text).unwrap();

    let started = Instant::now();
    // A deferred refresh retries after about one emulated refresh (production: 60 s against
    // refreshes of many minutes); the tests' 1 s would measure a retry storm instead.
    let world = World::provisioned(&scale, &[]).await;
    // The workers reach the emulator through the fault proxy enforcing AWS's request-token
    // buckets, so the run also says how often AWS would have throttled them.
    let proxy = FaultProxy::start(&world.local.endpoint(), FaultPlan::aws_limits()).await;
    world
        .start_workers(&[
            ("AMIFLOW_CONFIG", policy.to_str().unwrap()),
            ("AMIFLOW_DEFER_SECONDS", "2"),
            ("AWS_ENDPOINT_URL", &proxy.endpoint()),
        ])
        .await;
    let up_seconds = started.elapsed().as_secs_f64();
    let provision_seconds = world.state["timings"]["provision_seconds"]
        .as_f64()
        .unwrap_or_default();
    let accounts = world.accounts();
    let groups: usize = accounts.iter().map(|a| world.groups(a).len()).sum();
    let instances: u64 = accounts
        .iter()
        .flat_map(|a| world.groups(a))
        .map(|g| g["instances"].as_u64().unwrap_or(0))
        .sum();
    println!("world up in {up_seconds:.1} s ({groups} groups, {instances} instances)");
    let candidate = world.state["amis"]["candidate"]
        .as_str()
        .unwrap()
        .to_owned();
    let plan_seconds = plan_seconds(&world, &policy, &candidate);
    println!("amictl plan --ami {candidate}: {plan_seconds:.1} s");

    // Count only the rollout.
    let port = world.local.emulator.port();
    e2e::http_json(port, "POST", "/amiflow-emulator/calls", None);
    let (_, process_at_start) = emulator_cpu(&world, port);
    let records_before = proxy.records().len();
    let rollout_started = Instant::now();
    let built = AmiBuilt::new(
        &candidate,
        "us-east-1",
        "golden-al2023-2026-11",
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        PARAMETER,
    );
    let driver = world.driver();
    let mut audit = Audit::default();
    driver
        .publish(built, &mut audit, Duration::from_secs(300), |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", world.logs()));
    let published = rollout_started.elapsed().as_secs_f64();
    let mut stage_seconds = Vec::new();
    let (served, process) = emulator_cpu(&world, port);
    let mut phases = vec![Phase {
        name: "AmiBuilt to the first stage's golden parameter".into(),
        wall: published,
        served,
        emulator: process - process_at_start,
        rate: rate_floor(&proxy.records()[records_before..]).0,
        refresh: 0.0,
    }];
    let mut cpu_so_far = (served, process);
    let mut records_so_far = proxy.records().len();
    for stage in &driver.stages {
        let times = world
            .open_window(
                &driver,
                stage,
                &candidate,
                &mut audit,
                Duration::from_secs(3600),
            )
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", world.logs()));
        let took = times.done.as_secs_f64();
        let promoted = times.promoted.as_secs_f64();
        let expected = world
            .groups(&stage.account)
            .iter()
            .filter(|g| expects_outcome(g))
            .count();
        let (cpu, records) = (emulator_cpu(&world, port), proxy.records());
        phases.push(Phase {
            name: format!("{} window", stage.name),
            wall: took,
            served: cpu.0 - cpu_so_far.0,
            emulator: cpu.1 - cpu_so_far.1,
            rate: rate_floor(&records[records_so_far..]).0,
            refresh: 0.0,
        });
        (cpu_so_far, records_so_far) = (cpu, records.len());
        println!(
            "{}: promoted {promoted:.1} s after its window opened, {expected} groups finished in {took:.1} s",
            stage.name
        );
        stage_seconds.push((stage.name.clone(), expected, took, promoted));
    }
    // The first outcome each group reported for the candidate.
    let outcomes: Vec<&str> = audit
        .finished
        .iter()
        .filter(|((_, _, ami), _)| *ami == candidate)
        .filter_map(|(_, said)| said.first().map(|(o, _)| o.as_str()))
        .collect();
    let wall = rollout_started.elapsed().as_secs_f64();
    // How long the emulated refreshes ran, per stage account.
    let refreshes = e2e::http_json(port, "GET", "/amiflow-emulator/refreshes", None);
    for r in refreshes["refreshes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let (Some(account), Some(seconds)) = (r["account"].as_str(), r["seconds"].as_f64()) else {
            continue;
        };
        if let Some(i) = accounts.iter().position(|a| a == account) {
            phases[i + 1].refresh += seconds / f64::from(concurrency);
        }
    }
    let (rate_seconds, rate_bucket) = rate_floor(&proxy.records()[records_before..]);
    let calls = e2e::http_json(port, "GET", "/amiflow-emulator/calls", None);
    let rows = calls["calls"].as_array().cloned().unwrap_or_default();
    let refreshed = outcomes.iter().filter(|o| **o == "succeeded").count();
    let rolled_back = outcomes.iter().filter(|o| **o == "rolled-back").count();

    // The worker that consumes the refresh queue: the one whose AWS calls scale with the groups.
    let refresh_worker = local_world::WORKERS
        .iter()
        .find(|w| w.queue == "refresh")
        .map(|w| w.binary)
        .expect("a refresh worker");
    // Calls by worker (caller key), split into messaging (SQS, EventBridge) and AWS work.
    let messaging = |s: &str| s == "sqs" || s == "events";
    let mut by_worker: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new(); // (describe, change, messaging)
    let mut by_action: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut messaging_by_action: BTreeMap<String, u64> = BTreeMap::new();
    let (mut total, mut server_seconds, mut waited) = (0u64, 0.0f64, 0.0f64);
    for row in &rows {
        let count = row["count"].as_u64().unwrap_or(0);
        let service = row["service"].as_str().unwrap_or_default();
        let action = row["action"].as_str().unwrap_or_default();
        let worker = world
            .worker_of_key(row["key"].as_str().unwrap_or_default())
            .unwrap_or_else(|| "harness".into());
        // The harness's calls (publishing, watching the audit queue) measure the rollout; they
        // are not part of its floor.
        if worker != "harness" {
            total += count;
            // CPU time of the serving thread: what the emulator spent, without long-poll waits.
            server_seconds += row["cpu_seconds"].as_f64().unwrap_or(0.0);
            waited += row["seconds"].as_f64().unwrap_or(0.0);
        }
        let entry = by_worker.entry(worker.clone()).or_default();
        if messaging(service) {
            entry.2 += count;
        } else if action.starts_with("Describe")
            || action.starts_with("Get")
            || action.starts_with("List")
        {
            entry.0 += count;
        } else {
            entry.1 += count;
        }
        if worker != "harness" && messaging(service) {
            *messaging_by_action
                .entry(format!("{service}:{action}"))
                .or_default() += count;
        }
        if worker == refresh_worker && !messaging(service) {
            *by_action
                .entry((service.to_owned(), action.to_owned()))
                .or_default() += count;
        }
    }
    let per_group = |n: u64| n as f64 / refreshed.max(1) as f64;
    let mut body = format!(
        "## Rollout at {scale} scale (`just bench-rollout`)\n\n\
         {groups} groups, {instances} instances in qa / uat / prod; every worker its own process (debug\n\
         build), reaching the emulator through the fault proxy enforcing AWS's request-token buckets;\n\
         `max_concurrent_refreshes = {concurrency}`; deferred refreshes retry after 2 to 6 s (up to five\n\
         times later while many wait), running ones are polled every 10 s; emulated refresh phase\n\
         0.3 s; measured {date}.\n\n\
         | phase | seconds |\n|---|---|\n\
         | provision the world (`local/world.py`, also what `amictl local up --scale {scale}` runs) | {provision_seconds:.1} |\n\
         | `amictl plan --ami <the new AMI>`: every stage's gate and every group's plan, judged as the workers judge | {plan_seconds:.1} |\n\
         | AmiBuilt to the first stage's golden parameter published | {published:.1} |\n",
        date = Utc::now().format("%Y-%m-%d"),
    );
    for (i, (stage, n, took, promoted)) in stage_seconds.iter().enumerate() {
        if i > 0 {
            // The stage before passed (every group reported) when this window opened.
            body.push_str(&format!(
                "| {stage} window: the stage before passed to {stage} promoted (the hub's gate, then its parameter published) | {promoted:.1} |\n"
            ));
        }
        body.push_str(&format!(
            "| {stage} window: {n} groups refreshed or reported | {took:.1} |\n"
        ));
    }
    body.push_str(&format!(
        "| **whole rollout, wall time** | **{wall:.1}** |\n\
         | emulator floor: CPU time the server spent on the workers' {total} API calls | {server_seconds:.1} |\n\
         | rate floor: what AWS's request buckets need for the calls made (slowest: {rate_bucket}) | {rate_seconds:.1} |\n\n\
         The emulator floor is the sum of each call's serving-thread CPU time (the calls' wall time in\n\
         the server, {waited:.0} s, is mostly long polls waiting). In AWS the workers also wait for\n\
         request tokens: the rate floor is the least time AWS's buckets allow for the calls made.\n\n\
         Each phase has a floor of its own, the largest of: the emulator's CPU time in the phase (the\n\
         whole process: serving the calls, and emulating the refreshes they started, which replaces\n\
         instances in the background; moto's Python threads share one interpreter lock, so this\n\
         is time it needs), what AWS's buckets need for the phase's calls, and the emulated\n\
         refreshes' run time divided by `max_concurrent_refreshes` (no rollout can refresh faster).\n\
         The phases run one after the other, so the rollout's floor is their sum:\n\n\
         | phase | wall | emulator CPU serving calls | emulator CPU, whole process | AWS rate floor | refresh floor | floor | wall / floor |\n|---|---|---|---|---|---|---|---|\n\
         {phase_rows}\
         | **whole rollout** | **{wall:.1}** | | | | | **{floor:.1}** | **{ratio:.2}** (target ≤ 1.5) |\n\n\
         {refreshed} groups refreshed, {rolled_back} rolled back. API calls by worker (counted by the\n\
         emulator, per caller key; messaging = SQS and EventBridge):\n\n\
         | worker | describe / get | change | messaging | AWS calls per refreshed group |\n|---|---|---|---|---|\n",
        phase_rows = phases
            .iter()
            .map(|p| format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
                p.name,
                p.wall,
                p.served,
                p.emulator,
                p.rate,
                p.refresh,
                p.floor(),
                p.wall / p.floor().max(f64::EPSILON)
            ))
            .collect::<String>(),
        floor = phases.iter().map(Phase::floor).sum::<f64>(),
        ratio = wall / phases.iter().map(Phase::floor).sum::<f64>().max(f64::EPSILON),
    ));
    for (worker, (describe, change, msg)) in &by_worker {
        body.push_str(&format!(
            "| {worker} | {describe} | {change} | {msg} | {:.2} |\n",
            per_group(describe + change)
        ));
    }
    let listed: Vec<String> = messaging_by_action
        .iter()
        .map(|(a, n)| format!("{a} {n}"))
        .collect();
    body.push_str(&format!(
        "\nThe workers' messaging calls by action: {}.\n",
        listed.join(", ")
    ));
    body.push_str("\nrefresh-worker AWS calls by action:\n\n| action | calls | per refreshed group |\n|---|---|---|\n");
    for ((service, action), n) in &by_action {
        body.push_str(&format!(
            "| {service}:{action} | {n} | {:.2} |\n",
            per_group(*n)
        ));
    }
    let changes: u64 = by_action
        .iter()
        .filter(|((_, a), _)| {
            !(a.starts_with("Describe") || a.starts_with("Get") || a.starts_with("List"))
        })
        .map(|(_, n)| n)
        .sum();
    body.push_str(&format!(
        "\nChanges per refreshed group beyond discovery (target ≤ 3): **{:.2}**. Describe calls include\n\
         the polls of running refreshes and the re-checks of deferred requests.\n",
        per_group(changes)
    ));
    body.push_str(
        "\nStack-owned groups keep the refresh-worker's marks in SSM (`/amiflow/marks/<group>`), not in\n\
         tags (a tag the stack's template does not declare is drift): a refreshed stack-owned group costs\n\
         2 `ssm:PutParameter` (its in-progress mark and its close, each alone where tags share one batched\n\
         `CreateOrUpdateTags`), a skipped one 1, and every delivery of its request 1 `ssm:GetParameter`\n\
         for its mark; every judgement of a stage (`plan::judge_all`: the plan-worker at each window, the\n\
         share-worker's gate, `amictl status` and `plan`) 1 more per stack-owned group of a family. Each\n\
         read of the account's in-flight marks (at most every 30 s per process, and before every start\n\
         under `AMIFLOW_ADMISSION=account`) adds 1 `ssm:GetParametersByPath` per 10 marks kept (1 when\n\
         none), and, since the promotion gates, 2 more tag-filtered `DescribeAutoScalingGroups` (the\n\
         failed and rolled-back marks a stage's failure tolerance counts). The operators' decisions\n\
         (pauses, resumes, halts, in the hub) cost each worker process one `ssm:GetParametersByPath`\n\
         per kind at most every `AMIFLOW_CONTROL_SECONDS` (10 s), however many groups it handles.\n",
    );
    body.push_str(&throttling(&proxy.records()[records_before..]));
    body.push_str(
        &move_back(
            &world,
            &driver,
            &policy,
            &candidate,
            &mut audit,
            &proxy,
            concurrency,
        )
        .await,
    );
    println!("{body}");
    e2e::write_benchmark_section(&format!("bench-rollout-{scale}"), &body);
}

/// Recall the new AMI at once (`amictl recall --now`); every group the rollout refreshed moves
/// back to the AMI the stages held before, in every stage at the same time. Measured like a
/// window; the section of BENCHMARKS.md that says how it went.
async fn move_back(
    world: &World,
    driver: &local_world::Driver,
    policy: &std::path::Path,
    candidate: &str,
    audit: &mut Audit,
    proxy: &FaultProxy,
    concurrency: u32,
) -> String {
    let port = world.local.emulator.port();
    let previous = world.state["amis"]["current"].as_str().unwrap().to_owned();
    let moved: BTreeMap<String, BTreeSet<String>> = driver
        .stages
        .iter()
        .map(|stage| {
            let groups = audit
                .finished
                .iter()
                .filter(|((account, _, ami), said)| {
                    *account == stage.account
                        && *ami == candidate
                        && said.first().is_some_and(|(o, _)| o == "succeeded")
                })
                .map(|((_, group, _), _)| group.clone())
                .collect();
            (stage.account.clone(), groups)
        })
        .collect();
    let groups: usize = moved.values().map(BTreeSet::len).sum();
    e2e::http_json(port, "POST", "/amiflow-emulator/calls", None);
    let (_, process_before) = emulator_cpu(world, port);
    let refresh_before = refresh_seconds(port);
    let records_before = proxy.records().len();
    let started = Instant::now();
    let recall_seconds = recall_now(world, policy, candidate);
    for stage in &driver.stages {
        driver
            .outcomes(
                stage,
                &previous,
                &moved[&stage.account],
                audit,
                Duration::from_secs(3600),
                |_| {},
            )
            .await
            .unwrap_or_else(|e| panic!("the move back: {e:#}\n{}", world.logs()));
    }
    let wall = started.elapsed().as_secs_f64();
    let (served, process) = emulator_cpu(world, port);
    let refresh = refresh_seconds(port)
        .into_iter()
        .map(|(account, s)| {
            (s - refresh_before.get(&account).copied().unwrap_or(0.0)) / f64::from(concurrency)
        })
        .fold(0.0f64, f64::max);
    let back = Phase {
        name: "move back".into(),
        wall,
        served,
        emulator: process - process_before,
        rate: rate_floor(&proxy.records()[records_before..]).0,
        refresh,
    };
    let succeeded = moved
        .iter()
        .flat_map(|(account, names)| names.iter().map(move |g| (account, g)))
        .filter_map(|(account, g)| audit.outcomes(account, g, &previous))
        .filter(|said| said.first().is_some_and(|(o, _)| o == "succeeded"))
        .count();
    let mut changes = 0u64;
    for row in e2e::http_json(port, "GET", "/amiflow-emulator/calls", None)["calls"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let (service, action) = (
            row["service"].as_str().unwrap_or_default(),
            row["action"].as_str().unwrap_or_default(),
        );
        if world
            .worker_of_key(row["key"].as_str().unwrap_or_default())
            .is_some()
            && service != "sqs"
            && service != "events"
            && !["Describe", "Get", "List"]
                .iter()
                .any(|p| action.starts_with(p))
        {
            changes += row["count"].as_u64().unwrap_or(0);
        }
    }
    println!(
        "{}: {succeeded} of {groups} groups on {previous} again in {wall:.1} s (floor {:.1} s)",
        back.name,
        back.floor()
    );
    format!(
        "\n### The move back (`amictl recall <the new AMI> --now`)\n\n\
         After the rollout the new AMI is recalled as an operator recalls it (`amictl recall --now`:\n\
         {recall_seconds:.1} s to record it and put `AmiRecalled` on the hub's bus). Every stage's parameter\n\
         goes back to the AMI it held before and every group the rollout refreshed moves back through\n\
         the plan and refresh path, all stages at once (the floor as above; the stages overlap, so the\n\
         refresh floor is the busiest stage's).\n\n\
         | phase | wall | emulator CPU serving calls | emulator CPU, whole process | AWS rate floor | refresh floor | floor | wall / floor |\n\
         |---|---|---|---|---|---|---|---|\n\
         | recall to every refreshed group back ({succeeded} of {groups} succeeded) | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | **{:.2}** (target ≤ 1.5) |\n\n\
         Changes the workers made in the move back: {changes}, {:.2} per group moved back. No refresh to a\n\
         recalled AMI starts once the recall is recorded: the refresh-worker reads the AMI's recall\n\
         record afresh before a request's first change (`refresh::RecallCheck`), so after `amictl recall`\n\
         returns only a request already past that read can still start one, not one a pause delay later.\n",
        back.wall,
        back.served,
        back.emulator,
        back.rate,
        back.refresh,
        back.floor(),
        back.wall / back.floor().max(0.001),
        changes as f64 / succeeded.max(1) as f64,
    )
}
