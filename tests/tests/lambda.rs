//! Lambda mode (deploy/): the worker handles an SQS batch as an event source mapping hands it,
//! built from the contract's fixtures around messages really received from the emulator, and
//! reports only what must come back (`ReportBatchItemFailures`). Poison goes to the DLQ with its
//! reason exactly as in long-polling mode; emitted events are published before success.

use std::path::Path;
use std::time::Duration;

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
    // Receive them as the event source mapping would, and hand them over in Lambda's shape.
    let sqs = local.sqs();
    let mut records = Vec::new();
    while records.len() < 3 {
        let got = sqs
            .receive_message()
            .queue_url(&queue)
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
