//! Lambda mode (deploy/): the worker handles an SQS batch as an event source mapping hands it,
//! built from the contract's fixtures around messages really received from the emulator, and
//! reports only what must come back (`ReportBatchItemFailures`). Poison goes to the DLQ with its
//! reason exactly as in long-polling mode; emitted events are published before success.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use e2e::Local;
use events::{AmiShared, Detail, Inbound};
use runtime::{Step, StepError, StepOutput, Worker, WorkerConfig};

const FAILING_AMI: &str = "ami-0fa11fa11fa11fa11";

/// Shares every AmiBuilt with one account; `FAILING_AMI` fails transiently every time.
struct Share;

impl Step for Share {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        let Inbound::Amiflow(e) = event else {
            return Ok(StepOutput::Emit(vec![]));
        };
        let Detail::AmiBuilt(b) = &e.detail else {
            return Ok(StepOutput::Emit(vec![]));
        };
        if b.ami_id == FAILING_AMI {
            return Err(StepError::Transient(
                "ec2:ModifyImageAttribute: Throttling".into(),
            ));
        }
        Ok(StepOutput::Emit(vec![
            AmiShared::new(b, "111111111111", "222222222222", "uat").into(),
        ]))
    }
}

fn fixture(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/events/fixtures");
    std::fs::read_to_string(root.join(path)).unwrap()
}

/// Receive `n` messages as the event source mapping would, in Lambda's record shape.
async fn receive_records(local: &Local, queue: &str, n: usize) -> Vec<serde_json::Value> {
    let sqs = local.sqs();
    let mut records = Vec::new();
    while records.len() < n {
        let got = sqs
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(10)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        for m in got.messages() {
            let count = m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .cloned()
                .unwrap_or_else(|| "1".into());
            records.push(serde_json::json!({
                "messageId": m.message_id(), "receiptHandle": m.receipt_handle(), "body": m.body(),
                "attributes": {"ApproximateReceiveCount": count, "SentTimestamp": "1796130000000"},
                "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:lambda-share",
                "awsRegion": "us-east-1",
            }));
        }
    }
    records
}

#[tokio::test]
async fn a_batch_reports_only_the_records_that_must_come_back() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("lambda-share", 30).await;
    let capture = local.bus_with_capture("amiflow").await;
    let valid = fixture("valid/ami-built.json");
    let failing = valid.replace("ami-0a1b2c3d4e5f60718", FAILING_AMI);
    let poison = fixture("invalid/invalid-json--truncated.json");
    for body in [&valid, &failing, &poison] {
        local.send(&queue, body).await;
    }
    let records = receive_records(&local, &queue, 3).await;
    let id_of = |body: &str| {
        records
            .iter()
            .find(|r| r["body"] == body)
            .and_then(|r| r["messageId"].as_str())
            .unwrap()
            .to_owned()
    };
    let failing_id = id_of(&failing);
    let event: SqsEvent =
        serde_json::from_value(serde_json::json!({ "Records": records })).unwrap();

    let mut config = WorkerConfig::new("share-worker", &queue, "amiflow");
    config.retry_base_delay = Duration::from_millis(50);
    let worker = Worker::connect(local.sqs(), local.eventbridge(), config)
        .await
        .unwrap();
    let response = worker.handle_batch(&Share, event).await;

    let failed: Vec<&str> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(
        failed,
        vec![failing_id.as_str()],
        "only the transient failure comes back"
    );
    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(
        json["batchItemFailures"][0]["itemIdentifier"],
        failing_id.as_str()
    );

    // The poison is in the DLQ, with its reason and its original body.
    let dead = local.collect(&dlq, 1, Duration::from_secs(10)).await;
    assert_eq!(dead[0].body(), Some(poison.as_str()));
    assert_eq!(
        e2e::attr(&dead[0], runtime::ERROR_KIND_ATTR).as_deref(),
        Some("invalid-json")
    );
    assert!(e2e::attr(&dead[0], runtime::ERROR_ATTR).is_some_and(|r| !r.is_empty()));
    // The valid record's event was published before it counted as done.
    let emitted = local.collect(&capture, 1, Duration::from_secs(10)).await;
    assert_eq!(
        e2e::detail(&emitted[0])["key"],
        "shared:ami-0a1b2c3d4e5f60718:222222222222"
    );
    // The failing record comes back for another try, with its receive count grown; the others
    // are the event source mapping's to delete and stay in flight until then.
    let again = local.collect(&queue, 1, Duration::from_secs(40)).await;
    assert_eq!(again[0].body(), Some(failing.as_str()));
    assert!(e2e::receive_count(&again[0]) >= 2);
}

/// Shares like [`Share`], but each record's work lasts until `until`.
struct SlowShare {
    until: Instant,
    calls: AtomicUsize,
}

impl Step for SlowShare {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // Work that outlasts the point after which no record may start: the step stands for
        // a slow AWS call, and the time it takes is what the test is about.
        tokio::time::sleep_until(self.until.into()).await;
        Share.run(event).await
    }
}

#[tokio::test]
async fn records_not_started_before_the_deadline_margin_come_back_without_a_failure() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("lambda-share", 30).await;
    let capture = local.bus_with_capture("amiflow").await;
    let valid = fixture("valid/ami-built.json");
    let amis = [
        "ami-0000000000000000a",
        "ami-0000000000000000b",
        "ami-0000000000000000c",
        "ami-0000000000000000d",
        "ami-0000000000000000e",
    ];
    let bodies: Vec<String> = amis
        .iter()
        .map(|ami| valid.replace("ami-0a1b2c3d4e5f60718", ami))
        .collect();
    for body in &bodies {
        local.send(&queue, body).await;
    }
    let mut records = receive_records(&local, &queue, bodies.len()).await;
    // The batch in the order it was sent, so "the first records" are known.
    records.sort_by_key(|r| bodies.iter().position(|b| r["body"] == b.as_str()));
    let ids: Vec<String> = records
        .iter()
        .map(|r| r["messageId"].as_str().unwrap().to_owned())
        .collect();
    let event: SqsEvent =
        serde_json::from_value(serde_json::json!({ "Records": records })).unwrap();

    // Two records at a time; the invocation ends in 4 s and none may start in its last 2 s. The
    // first two start at once and work until past that point, so the other three never start.
    let mut config = WorkerConfig::new("share-worker", &queue, "amiflow");
    config.concurrency = 2;
    config.lambda_margin = Some(Duration::from_secs(2));
    let worker = Worker::connect(local.sqs(), local.eventbridge(), config)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(4);
    let step = SlowShare {
        until: deadline - Duration::from_millis(1500),
        calls: AtomicUsize::new(0),
    };
    let response = worker
        .handle_batch_within(&step, event, Some(deadline))
        .await;

    let failed: Vec<&str> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(
        failed,
        ids[2..].iter().map(String::as_str).collect::<Vec<_>>(),
        "exactly the unstarted records come back"
    );
    assert_eq!(step.calls.load(Ordering::SeqCst), 2);
    let stats = worker.stats();
    assert_eq!(runtime::WorkerStats::get(&stats.released), 3);
    assert_eq!(runtime::WorkerStats::get(&stats.succeeded), 2);
    let emitted = local.collect(&capture, 2, Duration::from_secs(10)).await;
    let mut keys: Vec<String> = emitted
        .iter()
        .map(|m| e2e::detail(m)["key"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "shared:ami-0000000000000000a:222222222222",
            "shared:ami-0000000000000000b:222222222222"
        ]
    );
    // Released at once, well before the 30 s visibility timeout, with no failure attached.
    let again = local.collect(&queue, 3, Duration::from_secs(10)).await;
    let mut returned: Vec<&str> = again.iter().filter_map(|m| m.body()).collect();
    returned.sort();
    assert_eq!(
        returned,
        bodies[2..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(
        again
            .iter()
            .all(|m| e2e::attr(m, runtime::ERROR_KIND_ATTR).is_none())
    );
    assert_eq!(local.depth(&dlq).await, 0, "nothing was dead-lettered");
}

/// Defers every event.
struct Defer;

impl Step for Defer {
    async fn run(&self, _event: &Inbound) -> Result<StepOutput, StepError> {
        Ok(StepOutput::Defer {
            delay: Duration::ZERO,
            reason: "refresh still running".into(),
        })
    }
}

#[tokio::test]
async fn a_record_deferred_too_often_is_dead_lettered_as_in_the_loop() {
    let local = Local::start().await;
    let (queue, dlq) = local.queue_with_dlq("lambda-share", 30).await;
    let valid = fixture("valid/ami-built.json");
    let fresh = valid.replace("ami-0a1b2c3d4e5f60718", "ami-0000000000000000f");
    local.send(&queue, &valid).await;
    local.send(&queue, &fresh).await;
    let mut records = receive_records(&local, &queue, 2).await;
    // The event source mapping hands over message attributes: one record has been deferred as
    // often as allowed already, the other never.
    for record in &mut records {
        if record["body"] == valid.as_str() {
            record["messageAttributes"] = serde_json::json!({
                runtime::DEFERRALS_ATTR: {
                    "stringValue": "3", "dataType": "String",
                    "stringListValues": [], "binaryListValues": [],
                },
            });
        }
    }
    let event: SqsEvent =
        serde_json::from_value(serde_json::json!({ "Records": records })).unwrap();
    let mut config = WorkerConfig::new("refresh-worker", &queue, "amiflow");
    config.max_deferrals = 3;
    let worker = Worker::connect(local.sqs(), local.eventbridge(), config)
        .await
        .unwrap();
    let response = worker.handle_batch(&Defer, event).await;
    assert!(response.batch_item_failures.is_empty(), "both were handled");
    let dead = local.collect(&dlq, 1, Duration::from_secs(10)).await;
    assert_eq!(dead[0].body(), Some(valid.as_str()));
    assert_eq!(
        e2e::attr(&dead[0], runtime::ERROR_KIND_ATTR).as_deref(),
        Some(runtime::DEFERRED_TOO_OFTEN)
    );
    assert_eq!(
        e2e::attr(&dead[0], runtime::ERROR_ATTR).as_deref(),
        Some(
            "deferred 3 times, the most AMIFLOW_MAX_DEFERRALS=3 allows; last deferral: refresh still running"
        )
    );
    // The other one was re-sent with its first count.
    let again = local.collect(&queue, 1, Duration::from_secs(10)).await;
    assert_eq!(again[0].body(), Some(fresh.as_str()));
    assert_eq!(
        e2e::attr(&again[0], runtime::DEFERRALS_ATTR).as_deref(),
        Some("1")
    );
}
