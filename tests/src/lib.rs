//! Shared harness for amiflow's end-to-end tests: a private emulator per test, SDK clients
//! pointed at it, and helpers to build queues, buses and rules and to poll with a deadline.
//!
//! Every helper polls until a condition holds or a deadline passes; none sleeps to synchronise.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use emulator::Emulator;

pub mod proxy;
pub mod world;

/// A private emulator and clients acting in its default account.
pub struct Local {
    pub emulator: Emulator,
    pub config: SdkConfig,
}

impl Local {
    pub async fn start() -> Local {
        let emulator = tokio::task::spawn_blocking(Emulator::start)
            .await
            .unwrap()
            .expect("emulator starts");
        let config = sdk_config(&emulator.endpoint()).await;
        Local { emulator, config }
    }

    pub fn endpoint(&self) -> String {
        self.emulator.endpoint()
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.config)
    }

    pub fn eventbridge(&self) -> aws_sdk_eventbridge::Client {
        aws_sdk_eventbridge::Client::new(&self.config)
    }

    /// A queue with a DLQ (maxReceiveCount 5, as DESIGN.md section 2 asks); returns (url, dlq_url).
    pub async fn queue_with_dlq(&self, name: &str, visibility_seconds: u32) -> (String, String) {
        let sqs = self.sqs();
        let dlq = sqs
            .create_queue()
            .queue_name(format!("{name}-dlq"))
            .send()
            .await
            .unwrap();
        let dlq_url = dlq.queue_url().unwrap().to_owned();
        let dlq_arn = queue_arn(&sqs, &dlq_url).await;
        let redrive =
            serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 5}).to_string();
        let queue = sqs
            .create_queue()
            .queue_name(name)
            .attributes(QueueAttributeName::RedrivePolicy, redrive)
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                visibility_seconds.to_string(),
            )
            .send()
            .await
            .unwrap();
        (queue.queue_url().unwrap().to_owned(), dlq_url)
    }

    /// A bus whose every `source = amiflow` event is copied to a new capture queue; returns the
    /// capture queue's URL.
    pub async fn bus_with_capture(&self, bus: &str) -> String {
        let (eb, sqs) = (self.eventbridge(), self.sqs());
        eb.create_event_bus().name(bus).send().await.unwrap();
        let capture = sqs
            .create_queue()
            .queue_name(format!("{bus}-capture"))
            .send()
            .await
            .unwrap();
        let capture_url = capture.queue_url().unwrap().to_owned();
        let capture_arn = queue_arn(&sqs, &capture_url).await;
        eb.put_rule()
            .name(format!("{bus}-capture"))
            .event_bus_name(bus)
            .event_pattern(r#"{"source":["amiflow"]}"#)
            .send()
            .await
            .unwrap();
        eb.put_targets()
            .rule(format!("{bus}-capture"))
            .event_bus_name(bus)
            .targets(
                aws_sdk_eventbridge::types::Target::builder()
                    .id("capture")
                    .arn(capture_arn)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        capture_url
    }

    pub async fn send(&self, queue_url: &str, body: &str) -> String {
        let out = self
            .sqs()
            .send_message()
            .queue_url(queue_url)
            .message_body(body)
            .send()
            .await
            .unwrap();
        out.message_id().unwrap().to_owned()
    }

    /// Receive (and delete) until `n` messages arrived or `within` passed; returns what arrived.
    pub async fn collect(&self, queue_url: &str, n: usize, within: Duration) -> Vec<Message> {
        let sqs = self.sqs();
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            let out = sqs
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .message_attribute_names("All")
                .send()
                .await
                .unwrap();
            for m in out.messages.unwrap_or_default() {
                sqs.delete_message()
                    .queue_url(queue_url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
                got.push(m);
            }
        }
        got
    }

    /// Visible + in-flight + delayed messages of a queue.
    pub async fn depth(&self, queue_url: &str) -> u64 {
        queue_depth(&self.sqs(), queue_url).await
    }

    /// POST a fault request to the emulator's control endpoint (see local/amiflow_shim/faults.py).
    pub fn faults(&self, request: &serde_json::Value) -> serde_json::Value {
        http_json(
            self.emulator.port(),
            "POST",
            "/amiflow-emulator/faults",
            Some(request),
        )
    }
}

/// Clients for an emulator endpoint with static test credentials (account 123456789012).
pub async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "testing", "testing", None, None, "e2e",
        ))
        .load()
        .await
}

pub async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> String {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap();
    out.attributes().unwrap()[&QueueAttributeName::QueueArn].clone()
}

/// Visible + in-flight + delayed messages of a queue.
pub async fn queue_depth(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> u64 {
    let out = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .unwrap();
    let attrs = out.attributes().cloned().unwrap_or_default();
    [
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        QueueAttributeName::ApproximateNumberOfMessagesDelayed,
    ]
    .iter()
    .map(|k| {
        attrs
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    })
    .sum()
}

/// Poll `check` every 100 ms until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A string message attribute of a received message.
pub fn attr(message: &Message, name: &str) -> Option<String> {
    message
        .message_attributes()?
        .get(name)?
        .string_value()
        .map(str::to_owned)
}

pub fn receive_count(message: &Message) -> u32 {
    message
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The `detail` of an EventBridge event body.
pub fn detail(message: &Message) -> serde_json::Value {
    let body: serde_json::Value = serde_json::from_str(message.body().unwrap()).unwrap();
    body["detail"].clone()
}

/// Minimal HTTP/1.0 JSON call to the emulator's own control endpoints.
pub fn http_json(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> serde_json::Value {
    use std::io::{Read, Write};
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("{}");
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// Environment for a worker process pointed at an emulator.
pub fn worker_env(endpoint: &str) -> HashMap<&'static str, String> {
    HashMap::from([
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
    ])
}

/// An `SdkConfig` acting in `account` on an emulator: sts:AssumeRole into
/// `arn:aws:iam::<account>:role/amiflow` (the emulator accepts any role), then static credentials
/// with the session token it returned. Plain test keys act in 123456789012.
pub async fn sdk_config_in(endpoint: &str, account: &str) -> SdkConfig {
    let base = sdk_config(endpoint).await;
    let assumed = aws_sdk_sts::Client::new(&base)
        .assume_role()
        .role_arn(format!("arn:aws:iam::{account}:role/amiflow"))
        .role_session_name("e2e")
        .send()
        .await
        .unwrap_or_else(|e| panic!("assuming a role in {account}: {e:?}"));
    let creds = assumed
        .credentials()
        .expect("AssumeRole returns credentials");
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            creds.access_key_id(),
            creds.secret_access_key(),
            Some(creds.session_token().to_owned()),
            None,
            "e2e-assumed",
        ))
        .load()
        .await
}

/// Replace (or append) the section `name` of BENCHMARKS.md, between `<!-- name:start -->` and
/// `<!-- name:end -->`, so each benchmark command rewrites only its own results.
pub fn write_benchmark_section(name: &str, body: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nEach section is written by the command it names; ratios compare with a baseline measured in the same run.\n".into()
    });
    let (start, end) = (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    );
    let section = format!("{start}\n{body}{end}");
    let text = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) => format!("{}{}{}", &text[..a], section, &text[b + end.len()..]),
        _ => format!("{}\n\n{}\n", text.trim_end(), section),
    };
    std::fs::write(&path, text).unwrap();
    println!("wrote the {name} section of {}", path.display());
}
