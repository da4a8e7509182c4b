//! The receive → step → publish → delete loop (DESIGN.md section 5).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName,
};
use backon::{ExponentialBuilder, Retryable};
use events::{Detail, Inbound};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::WorkerConfig;
use crate::error::{StepError, describe};
use crate::publish::Publisher;

/// Message attribute naming why a message was dead-lettered (`invalid-json`, `permanent`, ...).
pub const ERROR_KIND_ATTR: &str = "amiflow-error-kind";
/// Message attribute with the reason in words.
pub const ERROR_ATTR: &str = "amiflow-error";
/// Message attribute with the URL of the queue the message came from (for replay).
pub const SOURCE_QUEUE_ATTR: &str = "amiflow-source-queue";
/// Message attribute with how many times the message had been received when it was given up.
pub const RECEIVE_COUNT_ATTR: &str = "amiflow-receive-count";
/// Message attribute counting how often a message has been deferred (re-sent with a delay). A
/// re-send is a new message to SQS, with a receive count of one, so this is what bounds a chain
/// of deferrals ([`WorkerConfig::max_deferrals`]).
pub const DEFERRALS_ATTR: &str = "amiflow-deferrals";
/// SQS allows at most this many message attributes.
const MAX_ATTRIBUTES: usize = 10;
/// SQS `DelaySeconds` and a sensible cap for redelivery backoff.
const MAX_DELAY: Duration = Duration::from_secs(900);

/// What a step decided.
#[derive(Debug)]
pub enum StepOutput {
    /// Done: publish these events (possibly none), then delete the message.
    Emit(Vec<Detail>),
    /// Not now (for example a concurrency limit): see the message again after `delay`.
    Defer { delay: Duration, reason: String },
}

/// One idempotent step over a parsed event. Steps know nothing about queues.
pub trait Step: Send + Sync + 'static {
    fn run(&self, event: &Inbound) -> impl Future<Output = Result<StepOutput, StepError>> + Send;
}

/// Counters of what a worker did, for tests, benchmarks and the stop log line.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub received: AtomicU64,
    pub succeeded: AtomicU64,
    pub deferred: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retried_later: AtomicU64,
    pub released: AtomicU64,
    pub emitted: AtomicU64,
    /// Messages whose batched delete SQS confirmed.
    pub deleted: AtomicU64,
}

impl WorkerStats {
    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A connected worker: its queue, DLQ and bus resolved, ready to [`Worker::run`].
pub struct Worker {
    inner: Arc<Inner>,
    stats: Arc<WorkerStats>,
}

struct Inner {
    sqs: aws_sdk_sqs::Client,
    publisher: Publisher,
    config: WorkerConfig,
    dlq_url: String,
    visibility: Duration,
    max_receive_count: u32,
    keys: KeyLocks,
}

/// One lock per `detail.key` among the messages in flight: EventBridge and SQS may deliver the
/// same event twice at once, and two copies of a step racing on the same key could both see
/// "not done yet" and both act (two parameter versions for one AMI). Serialised, the second
/// copy finds the first one's work in AWS and does nothing. (Copies in different processes are
/// still judged from AWS's state, as every step is.)
#[derive(Default)]
struct KeyLocks(std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyLocks {
    async fn lock(&self, key: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if key.is_empty() {
            return None;
        }
        let lock = {
            let mut locks = self.0.lock().unwrap_or_else(|p| p.into_inner());
            // Forget the locks nobody holds or waits for.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(key.to_owned()).or_default().clone()
        };
        Some(lock.lock_owned().await)
    }
}

/// What became of one message.
enum Disposition {
    Delete,
    Keep,
}

impl Worker {
    /// Read the queue's visibility timeout and redrive policy, so poison goes to the same DLQ that
    /// SQS itself would use.
    pub async fn connect(
        sqs: aws_sdk_sqs::Client,
        eventbridge: aws_sdk_eventbridge::Client,
        config: WorkerConfig,
    ) -> anyhow::Result<Self> {
        let attrs = sqs
            .get_queue_attributes()
            .queue_url(&config.queue_url)
            .attribute_names(QueueAttributeName::VisibilityTimeout)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot read queue {}: {}", config.queue_url, describe(&e))
            })?;
        let attrs = attrs.attributes().cloned().unwrap_or_default();
        let visibility = attrs
            .get(&QueueAttributeName::VisibilityTimeout)
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(30), Duration::from_secs);
        let redrive: Option<serde_json::Value> = attrs
            .get(&QueueAttributeName::RedrivePolicy)
            .and_then(|v| serde_json::from_str(v).ok());
        let max_receive_count = redrive
            .as_ref()
            .and_then(|r| r.get("maxReceiveCount"))
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .map_or(5, |n| n as u32);
        let dlq_url = match (
            &config.dlq_url,
            redrive
                .as_ref()
                .and_then(|r| r["deadLetterTargetArn"].as_str()),
        ) {
            (Some(url), _) => url.clone(),
            (None, Some(arn)) => {
                // arn:aws:sqs:<region>:<account>:<name>
                let parts: Vec<&str> = arn.split(':').collect();
                let (account, name) = (
                    parts.get(4).copied().unwrap_or(""),
                    parts.get(5).copied().unwrap_or(""),
                );
                sqs.get_queue_url()
                    .queue_name(name)
                    .queue_owner_aws_account_id(account)
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot find the DLQ {arn} of {}: {}",
                            config.queue_url,
                            describe(&e)
                        )
                    })?
                    .queue_url()
                    .unwrap_or_default()
                    .to_owned()
            }
            (None, None) => anyhow::bail!(
                "queue {} has no RedrivePolicy and AMIFLOW_DLQ_URL is not set: poison would have nowhere to go",
                config.queue_url
            ),
        };
        let publisher = Publisher::new(
            eventbridge,
            config.bus_name.clone(),
            config.publish_attempts,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                sqs,
                publisher,
                config,
                dlq_url,
                visibility,
                max_receive_count,
                keys: KeyLocks::default(),
            }),
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    pub fn dlq_url(&self) -> &str {
        &self.inner.dlq_url
    }

    /// Consume until `shutdown` resolves, then finish (or, after the stop timeout, release)
    /// everything in flight and return.
    pub async fn run<S: Step>(
        self,
        step: Arc<S>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let inner = self.inner;
        let stats = self.stats;
        let config = &inner.config;
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let (release_tx, release_rx) = watch::channel(false);
        let (delete_tx, delete_rx) =
            mpsc::channel::<String>(config.concurrency * 2 + MAX_ATTRIBUTES);
        let deleter = tokio::spawn(delete_batches(inner.clone(), stats.clone(), delete_rx));
        let mut tasks = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut receive_failures = 0u32;
        tracing::info!(worker = %config.worker, queue = %config.queue_url, dlq = %inner.dlq_url, "worker started");

        loop {
            while tasks.try_join_next().is_some() {}
            let free = permits.available_permits();
            if free == 0 {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    _ = tasks.join_next() => continue,
                }
            }
            let batch = config.concurrency.min(10);
            if free < batch {
                // Steps that finish together (the common case) should lead to one full receive,
                // not one receive per finished step: give the others a moment to finish.
                let _ = tokio::time::timeout(TOP_UP_WAIT, async {
                    while permits.available_permits() < batch && tasks.join_next().await.is_some() {
                    }
                })
                .await;
            }
            let free = permits.available_permits().max(1);
            let receiving = receive(&inner, free.min(10));
            let mut receiving = std::pin::pin!(receiving);
            let received = tokio::select! {
                biased;
                r = &mut receiving => r,
                _ = &mut shutdown => {
                    // Dropping a long poll in flight does not cancel it at SQS: what it takes
                    // would stay invisible for the whole visibility timeout. Let it return (at
                    // most the wait time) and hand back whatever it got.
                    if let Ok(messages) = receiving.await {
                        for m in &messages {
                            release_now(&inner, m.receipt_handle().unwrap_or_default()).await;
                        }
                        WorkerStats::bump(&stats.released, messages.len() as u64);
                    }
                    break;
                }
            };
            match received {
                Ok(messages) => {
                    receive_failures = 0;
                    WorkerStats::bump(&stats.received, messages.len() as u64);
                    for message in messages {
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            break;
                        };
                        let (inner, step, stats) = (inner.clone(), step.clone(), stats.clone());
                        let (delete_tx, release_rx) = (delete_tx.clone(), release_rx.clone());
                        tasks.spawn(async move {
                            let receipt = message.receipt_handle().unwrap_or_default().to_owned();
                            if let Disposition::Delete =
                                process(&inner, &*step, &stats, message, release_rx).await
                            {
                                let _ = delete_tx.send(receipt).await;
                            }
                            drop(permit);
                        });
                    }
                }
                Err(why) => {
                    receive_failures += 1;
                    let pause = Duration::from_millis(200 * 2u64.pow(receive_failures.min(6)));
                    tracing::warn!(worker = %config.worker, error = %why, pause_ms = pause.as_millis() as u64, "receive failed");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }

        let in_flight = tasks.len();
        tracing::info!(worker = %config.worker, in_flight, "stopping: no new receives");
        let drained = tokio::time::timeout(config.stop_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            // Out of time: every remaining step is cancelled and its message made visible again,
            // so another worker takes it over at once. Steps are idempotent, so a cut step is safe.
            let _ = release_tx.send(true);
            while tasks.join_next().await.is_some() {}
        }
        drop(delete_tx);
        let _ = deleter.await;
        tracing::info!(
            worker = %config.worker,
            received = WorkerStats::get(&stats.received),
            succeeded = WorkerStats::get(&stats.succeeded),
            dead_lettered = WorkerStats::get(&stats.dead_lettered),
            released = WorkerStats::get(&stats.released),
            "worker stopped"
        );
        Ok(())
    }
}

/// How long the loop waits for more free slots before receiving fewer than a full batch.
const TOP_UP_WAIT: Duration = Duration::from_millis(20);

async fn receive(inner: &Inner, max: usize) -> Result<Vec<Message>, String> {
    let out = inner
        .sqs
        .receive_message()
        .queue_url(&inner.config.queue_url)
        .max_number_of_messages(max as i32)
        .wait_time_seconds(inner.config.wait_time.as_secs() as i32)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .message_attribute_names("All")
        .send()
        .await
        .map_err(|e| describe(&e))?;
    Ok(out.messages.unwrap_or_default())
}

/// The `amiflow-deferrals` a message carries (0 without one; an unreadable value counts as 0,
/// which only lengthens the chain by the bound once).
fn deferral_count(message: &Message) -> u32 {
    message
        .message_attributes()
        .and_then(|a| a.get(DEFERRALS_ATTR))
        .and_then(|v| v.string_value())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The `amiflow-error-kind` of a message given up after [`WorkerConfig::max_deferrals`].
pub const DEFERRED_TOO_OFTEN: &str = "deferred-too-often";

fn receive_count(message: &Message) -> u32 {
    message
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

async fn process<S: Step>(
    inner: &Inner,
    step: &S,
    stats: &WorkerStats,
    message: Message,
    release: watch::Receiver<bool>,
) -> Disposition {
    let started = Instant::now();
    let body = message.body().unwrap_or_default();
    let worker = inner.config.worker.as_str();
    let inbound = match events::parse_message(body) {
        Ok(inbound) => inbound,
        Err(rejection) => {
            tracing::warn!(worker, message_id = message.message_id().unwrap_or_default(), kind = rejection.kind.as_str(), reason = %rejection.message, "poison message");
            return dead_letter(
                inner,
                stats,
                &message,
                rejection.kind.as_str(),
                &rejection.message,
            )
            .await;
        }
    };
    let (rollout_id, key, account) = identity(&inbound);
    // Every line written while this message is handled (by the step too: "instance refresh
    // started", "group skipped", ...) carries the message's identity in `span`, so one rollout's
    // logs are found by filtering on `span.rollout_id`.
    let span = tracing::info_span!(
        "message",
        worker,
        rollout_id = %rollout_id,
        key = %key,
        account = %account,
        detail_type = inbound.label()
    );
    handle(inner, step, stats, &message, release, &inbound, started)
        .instrument(span)
        .await
}

/// What [`process`] does with a message that parsed, inside the message's span.
async fn handle<S: Step>(
    inner: &Inner,
    step: &S,
    stats: &WorkerStats,
    message: &Message,
    mut release: watch::Receiver<bool>,
    inbound: &Inbound,
    started: Instant,
) -> Disposition {
    let worker = inner.config.worker.as_str();
    let (rollout_id, key, account) = identity(inbound);
    let receipt = message.receipt_handle().unwrap_or_default();

    let work = async {
        let _serial = inner.keys.lock(&key).await;
        let attempts = inner.config.step_attempts.max(1);
        let backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(attempts - 1);
        let output = (|| step.run(inbound))
            .retry(backoff)
            .when(StepError::is_retryable)
            .notify(|e, wait| tracing::debug!(worker, error = %e, wait_ms = wait.as_millis() as u64, "step failed transiently; retrying"))
            .await?;
        if let StepOutput::Emit(details) = &output {
            inner.publisher.publish(details).await?;
        }
        Ok::<StepOutput, StepError>(output)
    };
    let result = tokio::select! {
        r = with_heartbeat(inner, receipt, work) => r,
        () = async {
            // A closed channel means the worker is gone without asking for a release: never fire.
            if release.wait_for(|r| *r).await.is_err() { std::future::pending::<()>().await }
        } => {
            WorkerStats::bump(&stats.released, 1);
            release_now(inner, receipt).await;
            tracing::info!(worker, %rollout_id, %key, %account, "released in-flight message on stop");
            return Disposition::Keep;
        }
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    let detail_type = inbound.label();
    match result {
        Ok(StepOutput::Emit(details)) => {
            WorkerStats::bump(&stats.succeeded, 1);
            WorkerStats::bump(&stats.emitted, details.len() as u64);
            // One line per event emitted, each field a plain value a log query can match.
            for d in &details {
                tracing::info!(worker, emitted_type = d.detail_type(), emitted_key = %d.meta().key, "emitted");
            }
            tracing::info!(worker, %rollout_id, %key, %account, detail_type, duration_ms, outcome = "done", emitted = details.len(), "step finished");
            Disposition::Delete
        }
        Ok(StepOutput::Defer { delay, reason }) => {
            let deferrals = deferral_count(message);
            let max = inner.config.max_deferrals;
            if deferrals >= max {
                tracing::warn!(worker, %rollout_id, %key, %account, detail_type, duration_ms, outcome = "failed", deferrals, %reason, "deferred too often");
                let why = format!(
                    "deferred {deferrals} times, the most AMIFLOW_MAX_DEFERRALS={max} allows; last deferral: {reason}"
                );
                return dead_letter(inner, stats, message, DEFERRED_TOO_OFTEN, &why).await;
            }
            let attributes = message.message_attributes();
            if attributes.map_or(0, HashMap::len) >= MAX_ATTRIBUTES
                && !attributes.is_some_and(|a| a.contains_key(DEFERRALS_ATTR))
            {
                // No room for the counter: re-sent without it, the chain could never end.
                let why = format!(
                    "cannot count its deferrals: it carries SQS's maximum of {MAX_ATTRIBUTES} message attributes; last deferral: {reason}"
                );
                return dead_letter(inner, stats, message, DEFERRED_TOO_OFTEN, &why).await;
            }
            tracing::info!(worker, %rollout_id, %key, %account, detail_type, duration_ms, outcome = "deferred", delay_s = delay.as_secs(), deferrals = deferrals + 1, %reason, "step deferred");
            match send_copy(
                inner,
                message,
                &inner.config.queue_url,
                delay.min(MAX_DELAY),
                &[(DEFERRALS_ATTR, (deferrals + 1).to_string())],
            )
            .await
            {
                Ok(()) => {
                    WorkerStats::bump(&stats.deferred, 1);
                    Disposition::Delete
                }
                Err(why) => {
                    tracing::warn!(worker, %key, error = %why, "could not re-queue deferred message; it will be redelivered");
                    Disposition::Keep
                }
            }
        }
        Err(StepError::Permanent(reason)) => {
            tracing::warn!(worker, %rollout_id, %key, %account, detail_type, duration_ms, outcome = "failed", %reason, "step failed permanently");
            dead_letter(inner, stats, message, "permanent", &reason).await
        }
        Err(StepError::Transient(reason)) => {
            let count = receive_count(message);
            if count >= inner.max_receive_count {
                tracing::warn!(worker, %rollout_id, %key, %account, detail_type, duration_ms, outcome = "failed", receive_count = count, %reason, "transient failures exhausted");
                return dead_letter(inner, stats, message, "transient-exhausted", &reason).await;
            }
            WorkerStats::bump(&stats.retried_later, 1);
            let delay = inner
                .config
                .retry_base_delay
                .saturating_mul(2u32.saturating_pow(count - 1))
                .min(MAX_DELAY);
            tracing::info!(worker, %rollout_id, %key, %account, detail_type, duration_ms, outcome = "retry-later", receive_count = count, delay_s = delay.as_secs(), %reason, "step failed transiently; leaving for redelivery");
            change_visibility(inner, receipt, delay).await;
            Disposition::Keep
        }
    }
}

fn identity(inbound: &Inbound) -> (String, String, String) {
    match inbound {
        Inbound::Amiflow(event) => {
            let meta = event.detail.meta();
            (
                meta.rollout_id.clone(),
                meta.key.clone(),
                event.account.clone(),
            )
        }
        Inbound::Aws(aws) => {
            let account = match aws {
                events::AwsEvent::AmiStateChange(e) => e.account.clone(),
                events::AwsEvent::ImageBuilderStateChange(e) => e.account.clone(),
                events::AwsEvent::InstanceRefresh(e) => e.account.clone(),
            };
            (String::new(), String::new(), account)
        }
    }
}

/// Run `work` while extending the message's visibility every half timeout, so a long step is
/// never redelivered to another worker while it still runs.
async fn with_heartbeat<T>(inner: &Inner, receipt: &str, work: impl Future<Output = T>) -> T {
    let period = (inner.visibility / 2).max(Duration::from_secs(1));
    let beat = async {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            ticker.tick().await;
            change_visibility(inner, receipt, inner.visibility).await;
        }
    };
    tokio::select! {
        r = work => r,
        _ = beat => unreachable!("the heartbeat loop never ends"),
    }
}

async fn change_visibility(inner: &Inner, receipt: &str, timeout: Duration) {
    let result = inner
        .sqs
        .change_message_visibility()
        .queue_url(&inner.config.queue_url)
        .receipt_handle(receipt)
        .visibility_timeout(timeout.as_secs().min(43_200) as i32)
        .send()
        .await;
    if let Err(e) = result {
        tracing::warn!(worker = %inner.config.worker, error = %describe(&e), "ChangeMessageVisibility failed");
    }
}

async fn release_now(inner: &Inner, receipt: &str) {
    change_visibility(inner, receipt, Duration::ZERO).await;
}

/// Send the original body and attributes to the DLQ with the reason, then let the caller delete
/// the original. If the DLQ send fails the message stays where it is: nothing is lost, and after
/// `maxReceiveCount` receives SQS's own redrive moves it.
async fn dead_letter(
    inner: &Inner,
    stats: &WorkerStats,
    message: &Message,
    kind: &str,
    reason: &str,
) -> Disposition {
    let reason: String = reason.chars().take(4000).collect();
    let extra = [
        (ERROR_KIND_ATTR, kind.to_owned()),
        (ERROR_ATTR, reason.clone()),
        (SOURCE_QUEUE_ATTR, inner.config.queue_url.clone()),
        (RECEIVE_COUNT_ATTR, receive_count(message).to_string()),
    ];
    match send_copy(inner, message, &inner.dlq_url, Duration::ZERO, &extra).await {
        Ok(()) => {
            WorkerStats::bump(&stats.dead_lettered, 1);
            Disposition::Delete
        }
        Err(why) => {
            tracing::error!(worker = %inner.config.worker, kind, %reason, error = %why, "could not send to the DLQ; leaving the message for SQS redrive");
            Disposition::Keep
        }
    }
}

/// Send `message`'s body and attributes to `queue_url`, with `extra` attributes added (replacing
/// an incoming value of the same name) where SQS's limit of ten leaves room: no original
/// attribute is ever dropped to make room.
async fn send_copy(
    inner: &Inner,
    message: &Message,
    queue_url: &str,
    delay: Duration,
    extra: &[(&str, String)],
) -> Result<(), String> {
    let mut attributes: HashMap<String, MessageAttributeValue> =
        message.message_attributes().cloned().unwrap_or_default();
    for (name, value) in extra {
        if attributes.len() >= MAX_ATTRIBUTES && !attributes.contains_key(*name) {
            break;
        }
        let value = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(if value.is_empty() {
                "-"
            } else {
                value.as_str()
            })
            .build()
            .map_err(|e| e.to_string())?;
        attributes.insert((*name).to_owned(), value);
    }
    inner
        .sqs
        .send_message()
        .queue_url(queue_url)
        .message_body(message.body().unwrap_or_default())
        .set_message_attributes(if attributes.is_empty() {
            None
        } else {
            Some(attributes)
        })
        .delay_seconds(delay.as_secs() as i32)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// Delete finished messages in batches of up to ten. A failed delete only means the message is
/// delivered again, which every step tolerates.
async fn delete_batches(
    inner: Arc<Inner>,
    stats: Arc<WorkerStats>,
    mut rx: mpsc::Receiver<String>,
) {
    let mut pending: Vec<String> = Vec::with_capacity(10);
    loop {
        let next = if pending.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    flush(&inner, &stats, &mut pending).await;
                    continue;
                }
            }
        };
        match next {
            Some(receipt) => {
                pending.push(receipt);
                if pending.len() == 10 {
                    flush(&inner, &stats, &mut pending).await;
                }
            }
            None => {
                flush(&inner, &stats, &mut pending).await;
                return;
            }
        }
    }
}

async fn flush(inner: &Inner, stats: &WorkerStats, pending: &mut Vec<String>) {
    if pending.is_empty() {
        return;
    }
    let entries: Vec<DeleteMessageBatchRequestEntry> = pending
        .drain(..)
        .enumerate()
        // Entry ids only need to be distinct within the call.
        .filter_map(|(i, receipt)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .build()
                .ok()
        })
        .collect();
    match inner
        .sqs
        .delete_message_batch()
        .queue_url(&inner.config.queue_url)
        .set_entries(Some(entries))
        .send()
        .await
    {
        Ok(out) => {
            WorkerStats::bump(&stats.deleted, out.successful().len() as u64);
            for failed in out.failed() {
                tracing::warn!(worker = %inner.config.worker, code = failed.code(), message = failed.message().unwrap_or_default(), "delete failed; the message will be delivered again");
            }
        }
        Err(e) => {
            tracing::warn!(worker = %inner.config.worker, error = %describe(&e), "DeleteMessageBatch failed; the messages will be delivered again")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lambda mode: the same worker behind an SQS event source mapping (deploy/).

/// A Lambda SQS record as the SDK's message type, so both modes share [`process`].
fn from_lambda(record: &SqsMessage) -> Message {
    let mut message = Message::builder()
        .set_message_id(record.message_id.clone())
        .set_receipt_handle(record.receipt_handle.clone())
        .set_body(record.body.clone());
    for (name, value) in &record.attributes {
        message = message.attributes(MessageSystemAttributeName::from(name.as_str()), value);
    }
    for (name, attr) in &record.message_attributes {
        let mut value = MessageAttributeValue::builder()
            .data_type(attr.data_type.clone().unwrap_or_else(|| "String".into()))
            .set_string_value(attr.string_value.clone());
        if let Some(binary) = &attr.binary_value {
            value = value.binary_value(aws_smithy_types::Blob::new(binary.to_vec()));
        }
        if let Ok(value) = value.build() {
            message = message.message_attributes(name, value);
        }
    }
    message.build()
}

/// The `Instant` of a Lambda deadline given in milliseconds since the Unix epoch.
fn instant_of(deadline_ms: u64) -> Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

impl Worker {
    /// Handle one batch from an SQS event source mapping with `ReportBatchItemFailures`: every
    /// record goes through exactly what the long-polling loop does (poison to the DLQ with its
    /// reason, transient failures retried, deferrals re-sent with a delay), at most
    /// `concurrency` at a time, and a record is reported as failed only when it must come back
    /// (what the loop would leave undeleted). The event source mapping deletes the others.
    pub async fn handle_batch<S: Step>(&self, step: &S, event: SqsEvent) -> SqsBatchResponse {
        self.handle_batch_within(step, event, None).await
    }

    /// [`Worker::handle_batch`] for an invocation that Lambda ends at `deadline`: a record is
    /// started only while more than the margin is left ([`WorkerConfig::lambda_margin`], by
    /// default a quarter of the time the batch arrived with), so a record is not cut off
    /// halfway. The records not started are released at once and reported as failures: they come
    /// back, carrying no failure and not dead-lettered.
    pub async fn handle_batch_within<S: Step>(
        &self,
        step: &S,
        event: SqsEvent,
        deadline: Option<Instant>,
    ) -> SqsBatchResponse {
        // Lambda ends the invocation itself; nothing ever asks for a release.
        let (_keep_open, release) = watch::channel(false);
        let cutoff = deadline.map(|deadline| {
            let left = deadline.saturating_duration_since(Instant::now());
            let margin = self.inner.config.lambda_margin.unwrap_or(left / 4);
            deadline.checked_sub(margin).unwrap_or_else(Instant::now)
        });
        let permits = Semaphore::new(self.inner.config.concurrency);
        WorkerStats::bump(&self.stats.received, event.records.len() as u64);
        let outcomes = futures::future::join_all(event.records.iter().map(|record| {
            let (release, permits) = (release.clone(), &permits);
            async move {
                let id = record.message_id.clone().unwrap_or_default();
                let Ok(_permit) = permits.acquire().await else {
                    return (id, Disposition::Keep);
                };
                if cutoff.is_some_and(|cutoff| Instant::now() >= cutoff) {
                    WorkerStats::bump(&self.stats.released, 1);
                    let receipt = record.receipt_handle.as_deref().unwrap_or_default();
                    release_now(&self.inner, receipt).await;
                    tracing::info!(worker = %self.inner.config.worker, message_id = %id, "not started: too close to the invocation's deadline; released");
                    return (id, Disposition::Keep);
                }
                let message = from_lambda(record);
                let disposition = process(&self.inner, step, &self.stats, message, release).await;
                (id, disposition)
            }
        }))
        .await;
        let mut response = SqsBatchResponse::default();
        for (id, disposition) in outcomes {
            if let Disposition::Keep = disposition {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = id;
                response.batch_item_failures.push(failure);
            }
        }
        response
    }

    /// Serve the Lambda runtime API until the execution environment is shut down.
    pub async fn run_lambda<S: Step>(self, step: Arc<S>) -> anyhow::Result<()> {
        let worker = Arc::new(self);
        tracing::info!(worker = %worker.inner.config.worker, queue = %worker.inner.config.queue_url, "worker started in Lambda mode");
        lambda_runtime::run(lambda_runtime::service_fn(
            move |event: lambda_runtime::LambdaEvent<SqsEvent>| {
                let (worker, step) = (worker.clone(), step.clone());
                async move {
                    let deadline = instant_of(event.context.deadline);
                    Ok::<_, lambda_runtime::Error>(
                        worker
                            .handle_batch_within(&*step, event.payload, Some(deadline))
                            .await,
                    )
                }
            },
        ))
        .await
        .map_err(|e| anyhow::anyhow!("the Lambda runtime stopped: {e}"))
    }

    /// Long-polling service or Lambda function, as the environment says: the Lambda runtime sets
    /// `AWS_LAMBDA_RUNTIME_API` in every execution environment.
    pub async fn serve<S: Step>(
        self,
        step: Arc<S>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
            self.run_lambda(step).await
        } else {
            self.run(step, shutdown).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_of_one_key_run_one_after_the_other_and_other_keys_do_not_wait() {
        let locks = KeyLocks::default();
        let first = locks.lock("param:a").await.unwrap();
        // Another key, and AWS events (no key), go ahead at once.
        let other = locks.lock("param:b").await;
        assert!(other.is_some());
        assert!(locks.lock("").await.is_none());
        // The same key waits until the first copy is done.
        let second = locks.lock("param:a");
        tokio::pin!(second);
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "a second copy of param:a waits"
        );
        drop(first);
        assert!(second.await.is_some());
        drop(other);
        // Locks nobody holds are forgotten.
        let _again = locks.lock("param:c").await;
        assert_eq!(locks.0.lock().unwrap().len(), 1);
    }
}
