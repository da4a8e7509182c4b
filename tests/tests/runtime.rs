//! The worker runtime against the real emulator over real SQS and EventBridge: delete
//! only after emitted events are accepted, transient failures retried then redelivered, poison to
//! the DLQ in one receive with its reason, partial PutEvents failures retried, duplicates yield
//! the same keys, and a stop (in-process or SIGTERM) loses nothing.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_sqs::types::MessageAttributeValue;
use chrono::{TimeZone, Utc};
use e2e::{Local, attr, detail, eventually};
use events::{AmiBuilt, AmiShared, Detail, Inbound};
use runtime::{Step, StepError, StepOutput, Worker, WorkerConfig, WorkerStats};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(60);

fn built(ami: &str) -> AmiBuilt {
    AmiBuilt::new(
        ami,
        "us-east-1",
        "golden-al2023-2026-11",
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        "/golden/al2023/ami-id",
    )
}

/// The message body EventBridge would deliver for a detail.
fn body(detail: &Detail) -> String {
    serde_json::json!({
        "version": "0", "id": "e2e", "detail-type": detail.detail_type(), "source": "amiflow",
        "account": "123456789012", "time": "2026-11-07T02:00:00Z", "region": "us-east-1",
        "resources": [], "detail": detail.to_value(),
    })
    .to_string()
}

/// Shares every AmiBuilt with `targets`; fails transiently for its first `fail_first` calls.
struct ShareTo {
    targets: Vec<&'static str>,
    fail_first: usize,
    calls: AtomicUsize,
    delay: Duration,
}

impl ShareTo {
    fn new(targets: Vec<&'static str>) -> Self {
        Self {
            targets,
            fail_first: 0,
            calls: AtomicUsize::new(0),
            delay: Duration::ZERO,
        }
    }
}

impl Step for ShareTo {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if call < self.fail_first {
            return Err(StepError::Transient(format!(
                "ec2:ModifyImageAttribute: Throttling (call {call})"
            )));
        }
        let Inbound::Amiflow(e) = event else {
            return Ok(StepOutput::Emit(vec![]));
        };
        let Detail::AmiBuilt(b) = &e.detail else {
            return Ok(StepOutput::Emit(vec![]));
        };
        Ok(StepOutput::Emit(
            self.targets
                .iter()
                .map(|t| AmiShared::new(b, "111111111111", t, "uat").into())
                .collect(),
        ))
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    stats: Arc<WorkerStats>,
}

impl Running {
    /// Stop and wait; returns the worker's counters.
    async fn stop(self) -> Arc<WorkerStats> {
        let _ = self.stop.send(());
        self.handle.await.unwrap().unwrap();
        self.stats
    }
}

async fn start_worker<S: Step>(local: &Local, config: WorkerConfig, step: Arc<S>) -> Running {
    let worker = Worker::connect(local.sqs(), local.eventbridge(), config)
        .await
        .unwrap();
    let stats = worker.stats();
    let (stop, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(step, async {
        let _ = rx.await;
    }));
    Running {
        stop,
        handle,
        stats,
    }
}

fn keys(messages: &[aws_sdk_sqs::types::Message]) -> Vec<String> {
    let mut keys: Vec<String> = messages
        .iter()
        .map(|m| detail(m)["key"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn deletes_a_message_only_after_every_emitted_event_is_accepted() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("share", 30).await;
    let capture = local.bus_with_capture("amiflow").await;
    // Every PutEvents rejects one entry for now: the step can never fully publish.
    local.faults(&serde_json::json!({"put_events_partial_failures": 1000}));
    let mut config = WorkerConfig::new("share-worker", &queue, "amiflow");
    config.publish_attempts = 2;
    config.step_attempts = 1;
    config.retry_base_delay = Duration::from_secs(1);
    let step = Arc::new(ShareTo::new(vec!["222222222222", "333333333333"]));
    let worker = start_worker(&local, config, step.clone()).await;
    local
        .send(&queue, &body(&built("ami-0a1b2c3d4e5f60718").into()))
        .await;

    // The step ran, but the message stays (in flight or waiting for redelivery), never deleted.
    eventually("a failed publish", WAIT, || async {
        (WorkerStats::get(&worker.stats.retried_later) >= 1).then_some(())
    })
    .await;
    assert_eq!(
        local.depth(&queue).await,
        1,
        "the message must not be deleted before its events are accepted"
    );

    // AWS recovers: the redelivered message publishes fully and only then disappears.
    local.faults(&serde_json::json!({"put_events_partial_failures": 0}));
    eventually("the queue to drain", WAIT, || async {
        (local.depth(&queue).await == 0).then_some(())
    })
    .await;
    worker.stop().await;
    let captured = keys(&local.collect(&capture, 100, Duration::from_secs(3)).await);
    let distinct: BTreeSet<&String> = captured.iter().collect();
    assert!(
        distinct.contains(&"shared:ami-0a1b2c3d4e5f60718:222222222222".to_owned()),
        "{captured:?}"
    );
    assert!(
        distinct.contains(&"shared:ami-0a1b2c3d4e5f60718:333333333333".to_owned()),
        "{captured:?}"
    );
    assert_eq!(local.depth(&dlq).await, 0);
}

#[tokio::test]
async fn partial_put_events_failures_are_retried_until_every_entry_is_accepted() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("share", 30).await;
    let capture = local.bus_with_capture("amiflow").await;
    local.faults(&serde_json::json!({"put_events_partial_failures": 3}));
    let targets = vec![
        "222222222222",
        "333333333333",
        "444444444444",
        "555555555555",
    ];
    let worker = start_worker(
        &local,
        WorkerConfig::new("share-worker", &queue, "amiflow"),
        Arc::new(ShareTo::new(targets.clone())),
    )
    .await;
    local
        .send(&queue, &body(&built("ami-0a1b2c3d4e5f60718").into()))
        .await;
    let captured = keys(&local.collect(&capture, targets.len(), WAIT).await);
    eventually("the message to be deleted", WAIT, || async {
        (local.depth(&queue).await == 0).then_some(())
    })
    .await;
    let stats = worker.stop().await;
    let expected: Vec<String> = targets
        .iter()
        .map(|t| format!("shared:ami-0a1b2c3d4e5f60718:{t}"))
        .collect();
    assert_eq!(
        captured, expected,
        "every entry accepted exactly once, the rejected ones by retry"
    );
    let faults = local.faults(&serde_json::json!({}));
    assert_eq!(
        faults["injected_put_events_failures"], 3,
        "the emulator really rejected entries: {faults}"
    );
    assert_eq!(local.depth(&dlq).await, 0);
    // Rejected entries are retried inside the delivery: the message was never left for redelivery.
    assert_eq!(WorkerStats::get(&stats.retried_later), 0);
    assert_eq!(WorkerStats::get(&stats.succeeded), 1);
}

#[tokio::test]
async fn transient_failures_are_retried_then_redelivered_then_dead_lettered() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("share", 30).await;
    local.bus_with_capture("amiflow").await;
    let mut config = WorkerConfig::new("share-worker", &queue, "amiflow");
    config.step_attempts = 2;
    config.retry_base_delay = Duration::ZERO;
    let step = Arc::new(ShareTo {
        fail_first: usize::MAX,
        ..ShareTo::new(vec!["222222222222"])
    });
    let worker = start_worker(&local, config, step.clone()).await;
    let mut sent = aws_sdk_sqs::types::Message::builder().build();
    sent.body = Some(body(&built("ami-0a1b2c3d4e5f60718").into()));
    local.send(&queue, sent.body().unwrap()).await;

    let dead = local.collect(&dlq, 1, WAIT).await;
    let stats = worker.stop().await;
    assert_eq!(dead.len(), 1);
    let dead = &dead[0];
    // Five deliveries (maxReceiveCount), each retried inside the delivery: the receive count grew
    // to the limit before the runtime gave up with the last error as the reason.
    assert_eq!(attr(dead, "amiflow-receive-count").as_deref(), Some("5"));
    assert_eq!(
        attr(dead, "amiflow-error-kind").as_deref(),
        Some("transient-exhausted")
    );
    assert!(attr(dead, "amiflow-error").unwrap().contains("Throttling"));
    assert_eq!(
        step.calls.load(Ordering::SeqCst),
        10,
        "2 attempts in each of 5 deliveries"
    );
    assert_eq!(WorkerStats::get(&stats.retried_later), 4);
    assert_eq!(dead.body(), sent.body(), "the original body is intact");
    assert_eq!(local.depth(&queue).await, 0);
}

/// Defers every event at once, counting its calls.
struct AlwaysDefer {
    calls: AtomicUsize,
}

impl Step for AlwaysDefer {
    async fn run(&self, _event: &Inbound) -> Result<StepOutput, StepError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(StepOutput::Defer {
            delay: Duration::ZERO,
            reason: format!("refresh still running (call {call})"),
        })
    }
}

#[tokio::test]
async fn a_message_deferred_too_often_is_dead_lettered_with_the_count_and_last_reason() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("refresh", 30).await;
    local.bus_with_capture("amiflow").await;
    let mut config = WorkerConfig::new("refresh-worker", &queue, "amiflow");
    config.max_deferrals = 3;
    let step = Arc::new(AlwaysDefer {
        calls: AtomicUsize::new(0),
    });
    let worker = start_worker(&local, config, step.clone()).await;
    let sent = body(&built("ami-0a1b2c3d4e5f60718").into());
    // An incoming counter is the runtime's own: a sender cannot lengthen the chain by resetting
    // it, and the value here is overridden from the first deferral on.
    local
        .sqs()
        .send_message()
        .queue_url(&queue)
        .message_body(&sent)
        .message_attributes(
            runtime::DEFERRALS_ATTR,
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value("0")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    let dead = local.collect(&dlq, 1, WAIT).await;
    eventually("the last copy to be deleted", WAIT, || async {
        (local.depth(&queue).await == 0).then_some(())
    })
    .await;
    let stats = worker.stop().await;
    assert_eq!(dead.len(), 1);
    let dead = &dead[0];
    assert_eq!(
        attr(dead, "amiflow-error-kind").as_deref(),
        Some("deferred-too-often")
    );
    assert_eq!(
        attr(dead, "amiflow-error").as_deref(),
        Some(
            "deferred 3 times, the most AMIFLOW_MAX_DEFERRALS=3 allows; last deferral: refresh still running (call 3)"
        )
    );
    assert_eq!(attr(dead, runtime::DEFERRALS_ATTR).as_deref(), Some("3"));
    assert_eq!(
        dead.body(),
        Some(sent.as_str()),
        "the original body is intact"
    );
    assert_eq!(
        WorkerStats::get(&stats.deferred),
        3,
        "exactly three re-sends"
    );
    assert_eq!(
        step.calls.load(Ordering::SeqCst),
        4,
        "the original and its three re-sent copies"
    );
    assert_eq!(WorkerStats::get(&stats.dead_lettered), 1);
}

#[tokio::test]
async fn a_step_that_recovers_succeeds_on_redelivery() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("share", 30).await;
    let capture = local.bus_with_capture("amiflow").await;
    let mut config = WorkerConfig::new("share-worker", &queue, "amiflow");
    config.step_attempts = 2;
    config.retry_base_delay = Duration::ZERO;
    let step = Arc::new(ShareTo {
        fail_first: 3,
        ..ShareTo::new(vec!["222222222222"])
    });
    let worker = start_worker(&local, config, step.clone()).await;
    local
        .send(&queue, &body(&built("ami-0a1b2c3d4e5f60718").into()))
        .await;
    let captured = local.collect(&capture, 1, WAIT).await;
    eventually("the message to be deleted", WAIT, || async {
        (local.depth(&queue).await == 0).then_some(())
    })
    .await;
    let stats = worker.stop().await;
    assert_eq!(
        keys(&captured),
        vec!["shared:ami-0a1b2c3d4e5f60718:222222222222"]
    );
    assert_eq!(
        step.calls.load(Ordering::SeqCst),
        4,
        "failed twice in delivery 1, once in delivery 2, then succeeded"
    );
    assert_eq!(WorkerStats::get(&stats.retried_later), 1);
    assert_eq!(local.depth(&dlq).await, 0);
}

#[tokio::test]
async fn poison_lands_in_the_dlq_within_one_receive_with_reason_and_original_body() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("share", 30).await;
    let capture = local.bus_with_capture("amiflow").await;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/events/fixtures/invalid");
    let mut sent = Vec::new();
    for entry in std::fs::read_dir(fixtures).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let body = std::fs::read_to_string(&path).unwrap();
        let trace = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(&name)
            .build()
            .unwrap();
        local
            .sqs()
            .send_message()
            .queue_url(&queue)
            .message_body(&body)
            .message_attributes("trace", trace)
            .send()
            .await
            .unwrap();
        sent.push((name, body));
    }
    // A good message among the poison is processed normally.
    local
        .send(&queue, &body(&built("ami-0a1b2c3d4e5f60718").into()))
        .await;
    let worker = start_worker(
        &local,
        WorkerConfig::new("share-worker", &queue, "amiflow"),
        Arc::new(ShareTo::new(vec!["222222222222"])),
    )
    .await;

    let dead = local.collect(&dlq, sent.len(), WAIT).await;
    let good = local.collect(&capture, 1, WAIT).await;
    worker.stop().await;
    assert_eq!(dead.len(), sent.len());
    for (name, body) in &sent {
        let m = dead
            .iter()
            .find(|m| attr(m, "trace").as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{name} not in the DLQ"));
        let expected_kind = name.split("--").next().unwrap();
        assert_eq!(
            attr(m, "amiflow-error-kind").as_deref(),
            Some(expected_kind),
            "{name}"
        );
        assert!(
            attr(m, "amiflow-error").is_some_and(|r| r.len() > 10),
            "{name} has a readable reason"
        );
        assert_eq!(
            attr(m, "amiflow-receive-count").as_deref(),
            Some("1"),
            "{name} was dead-lettered on its first receive"
        );
        assert_eq!(
            attr(m, "amiflow-source-queue").as_deref(),
            Some(queue.as_str())
        );
        assert_eq!(m.body(), Some(body.as_str()), "{name} body intact");
    }
    assert_eq!(
        keys(&good),
        vec!["shared:ami-0a1b2c3d4e5f60718:222222222222"]
    );
    assert_eq!(local.depth(&queue).await, 0);
}

#[tokio::test]
async fn sqs_itself_refuses_bodies_over_one_mib() {
    // The runtime rejects bodies over events::MAX_EVENT_BYTES as `too-large` (unit-tested in the
    // events crate), but such a body cannot reach a worker through SQS at all: the queue refuses
    // it at send time, in the emulator as in AWS. This pins that assumption.
    let local = Local::start().await;
    let (queue, _dlq) = local.queue_with_dlq("share", 30).await;
    let huge = "x".repeat(events::MAX_EVENT_BYTES + 1);
    let refused = local
        .sqs()
        .send_message()
        .queue_url(&queue)
        .message_body(huge)
        .send()
        .await;
    assert!(refused.is_err(), "SQS accepted a body over 1 MiB");
}

#[tokio::test]
async fn the_same_message_delivered_twice_yields_the_same_keys() {
    let local = Local::start().await;
    let (queue, _dlq) = local.queue_with_dlq("share", 30).await;
    let capture = local.bus_with_capture("amiflow").await;
    let event = body(&built("ami-0a1b2c3d4e5f60718").into());
    local.send(&queue, &event).await;
    local.send(&queue, &event).await;
    let worker = start_worker(
        &local,
        WorkerConfig::new("share-worker", &queue, "amiflow"),
        Arc::new(ShareTo::new(vec!["222222222222", "333333333333"])),
    )
    .await;
    let captured = local.collect(&capture, 4, WAIT).await;
    worker.stop().await;
    let keys = keys(&captured);
    assert_eq!(keys.len(), 4);
    assert_eq!(keys[0], keys[1]);
    assert_eq!(keys[2], keys[3]);
    let caused: BTreeSet<String> = captured
        .iter()
        .map(|m| detail(m)["caused_by"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        caused,
        BTreeSet::from(["built:ami-0a1b2c3d4e5f60718".to_owned()])
    );
}

#[tokio::test]
async fn a_long_step_keeps_its_message_invisible_with_a_heartbeat() {
    let local = Local::start().await;
    // Visibility 2 s, step 5 s: without the heartbeat the message would reappear and run twice.
    let (queue, _dlq) = local.queue_with_dlq("share", 2).await;
    let capture = local.bus_with_capture("amiflow").await;
    let step = Arc::new(ShareTo {
        delay: Duration::from_secs(5),
        ..ShareTo::new(vec!["222222222222"])
    });
    let worker = start_worker(
        &local,
        WorkerConfig::new("share-worker", &queue, "amiflow"),
        step.clone(),
    )
    .await;
    local
        .send(&queue, &body(&built("ami-0a1b2c3d4e5f60718").into()))
        .await;
    let captured = local.collect(&capture, 1, WAIT).await;
    eventually("the message to be deleted", WAIT, || async {
        (local.depth(&queue).await == 0).then_some(())
    })
    .await;
    worker.stop().await;
    assert_eq!(captured.len(), 1);
    assert_eq!(
        step.calls.load(Ordering::SeqCst),
        1,
        "the step ran once: its message never became visible again"
    );
}

#[tokio::test]
async fn stopping_mid_batch_finishes_or_releases_every_message() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("share", 120).await;
    let capture = local.bus_with_capture("amiflow").await;
    for i in 0..10 {
        local
            .send(
                &queue,
                &body(&built(&format!("ami-0000000000000{i:04x}")).into()),
            )
            .await;
    }
    // Steps take 30 s but the stop timeout is 1 s: every in-flight message must be released
    // (visible again at once, not after the 120 s visibility timeout).
    let mut config = WorkerConfig::new("share-worker", &queue, "amiflow");
    config.stop_timeout = Duration::from_secs(1);
    let slow = Arc::new(ShareTo {
        delay: Duration::from_secs(30),
        ..ShareTo::new(vec!["222222222222"])
    });
    let worker = start_worker(&local, config.clone(), slow.clone()).await;
    eventually("all ten in flight", WAIT, || async {
        (slow.calls.load(Ordering::SeqCst) == 10).then_some(())
    })
    .await;
    let stats = worker.stop().await;
    assert_eq!(WorkerStats::get(&stats.released), 10);

    // A fresh worker picks every released message up straight away and finishes them.
    let worker = start_worker(&local, config, Arc::new(ShareTo::new(vec!["222222222222"]))).await;
    let captured = local.collect(&capture, 10, Duration::from_secs(30)).await;
    eventually("the queue to drain", WAIT, || async {
        (local.depth(&queue).await == 0).then_some(())
    })
    .await;
    worker.stop().await;
    assert_eq!(
        keys(&captured).into_iter().collect::<BTreeSet<_>>().len(),
        10
    );
    assert_eq!(local.depth(&dlq).await, 0);
}

#[tokio::test]
async fn sigterm_to_a_worker_process_with_a_batch_in_flight_loses_nothing() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("share", 120).await;
    let capture = local.bus_with_capture("amiflow").await;
    for i in 0..10 {
        local
            .send(
                &queue,
                &body(&built(&format!("ami-0000000000000{i:04x}")).into()),
            )
            .await;
    }
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_probe-worker"))
        .envs(e2e::worker_env(&local.endpoint()))
        .env("AMIFLOW_QUEUE_URL", &queue)
        .env("AMIFLOW_BUS", "amiflow")
        .env("AMIFLOW_WAIT_SECONDS", "1")
        .env("PROBE_STEP_MILLIS", "2000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the whole batch is in flight (received, invisible), then SIGTERM.
    eventually("the batch in flight", WAIT, || async {
        let out = local
            .sqs()
            .get_queue_attributes()
            .queue_url(&queue)
            .attribute_names(
                aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            )
            .send()
            .await
            .unwrap();
        let in_flight = out
            .attributes()
            .unwrap()
            .values()
            .next()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        (in_flight == 10).then_some(())
    })
    .await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("worker exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "graceful exit, got {status}");
    // The in-flight steps finished within the stop timeout: all emitted, all deleted.
    let captured = local.collect(&capture, 10, Duration::from_secs(10)).await;
    assert_eq!(
        keys(&captured).into_iter().collect::<BTreeSet<_>>().len(),
        10
    );
    assert_eq!(local.depth(&queue).await, 0);
    assert_eq!(local.depth(&dlq).await, 0);
}
