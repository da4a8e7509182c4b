//! Reading amiflow's dead-letter queues without consuming them. SQS has no "peek": a message is
//! read by receiving it, which hides it for the visibility timeout. So a scan receives with a
//! visibility long enough for the whole scan, remembers every receipt, and at the end makes every
//! message it did not move visible again at once. Should amictl die mid-scan, the messages come
//! back by themselves when the timeout ends; nothing is ever deleted by a scan.
//!
//! A scan raises each message's `ApproximateReceiveCount` in the DLQ. DLQs have no redrive
//! policy, so that is harmless; the count that matters, the receives at the source queue, is
//! kept by the worker in the `amiflow-receive-count` attribute.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Result;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, Message, MessageSystemAttributeName,
    QueueAttributeName,
};
use serde::Serialize;
use serde_json::Value;

use crate::scope::{Account, aws_error};

/// Queue names amiflow creates (local/world.py, deploy/): `amiflow-<worker>` with
/// `amiflow-<worker>-dlq`, and the EventBridge delivery DLQs `amiflow-*-undelivered`.
const PREFIX: &str = "amiflow-";

/// A dead-letter queue of one account.
#[derive(Debug, Clone, Serialize)]
pub struct Dlq {
    pub account: String,
    pub stage: String,
    pub name: String,
    pub url: String,
    pub arn: String,
    /// Visible plus in flight, as SQS approximates them.
    pub approximate_messages: u64,
    /// The queues whose redrive policy names this DLQ (where replayed messages may go).
    pub sources: Vec<String>,
}

pub fn is_dlq_name(name: &str) -> bool {
    name.starts_with(PREFIX) && (name.ends_with("-dlq") || name.ends_with("-undelivered"))
}

/// `param`, `amiflow-param` and `amiflow-param-dlq` all name the param-worker's DLQ.
pub fn normalize_dlq_name(name: &str) -> String {
    if is_dlq_name(name) {
        return name.to_owned();
    }
    let base = name.strip_prefix(PREFIX).unwrap_or(name);
    format!("{PREFIX}{base}-dlq")
}

/// Every amiflow DLQ of `account` (or only `only`, by any of its names).
pub async fn dlqs(account: &Account, only: Option<&str>) -> Result<Vec<Dlq>> {
    let sqs = Client::new(&account.config);
    let mut urls = Vec::new();
    let mut pages = sqs
        .list_queues()
        .queue_name_prefix(PREFIX)
        .max_results(1000)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            aws_error(&e).context(format!(
                "listing the queues of {} (sqs:ListQueues)",
                account.label()
            ))
        })?;
        urls.extend(page.queue_urls().iter().cloned());
    }
    let wanted = only.map(normalize_dlq_name);
    let mut out = Vec::new();
    for url in urls {
        let name = queue_name(&url).to_owned();
        if !is_dlq_name(&name) || wanted.as_ref().is_some_and(|w| *w != name) {
            continue;
        }
        out.push(describe_dlq(&sqs, account, name, url).await?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

async fn describe_dlq(sqs: &Client, account: &Account, name: String, url: String) -> Result<Dlq> {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .map_err(|e| aws_error(&e).context(format!("reading {name} in {}", account.label())))?;
    let attrs = attrs.attributes().cloned().unwrap_or_default();
    let number = |a: QueueAttributeName| {
        attrs
            .get(&a)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let approximate_messages = number(QueueAttributeName::ApproximateNumberOfMessages)
        + number(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
    let mut sources = Vec::new();
    let mut pages = sqs
        .list_dead_letter_source_queues()
        .queue_url(&url)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            aws_error(&e).context(format!(
                "finding the source queues of {name} (sqs:ListDeadLetterSourceQueues)"
            ))
        })?;
        sources.extend(page.queue_urls().iter().cloned());
    }
    Ok(Dlq {
        account: account.id.clone(),
        stage: account.stage.clone(),
        arn: attrs
            .get(&QueueAttributeName::QueueArn)
            .cloned()
            .unwrap_or_default(),
        name,
        url,
        approximate_messages,
        sources,
    })
}

pub fn queue_name(url: &str) -> &str {
    url.trim_end_matches('/').rsplit('/').next().unwrap_or(url)
}

/// Receive messages of `url` for a scan, hiding each for `hold`; `None` when the queue is empty
/// (a long poll of one second asks every SQS server, so an empty reply means empty).
pub async fn receive(sqs: &Client, url: &str, hold: Duration) -> Result<Option<Vec<Message>>> {
    let out = sqs
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .visibility_timeout(hold.as_secs().clamp(1, 43_200) as i32)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .message_attribute_names("All")
        .send()
        .await
        .map_err(|e| aws_error(&e).context(format!("receiving from {}", queue_name(url))))?;
    let messages = out.messages().to_vec();
    Ok((!messages.is_empty()).then_some(messages))
}

/// Make every held message visible again (batches of ten). Best effort: a message whose
/// receipt could not be released comes back when its visibility timeout ends.
pub async fn release(sqs: &Client, url: &str, receipts: &[String]) -> usize {
    let mut failed = 0;
    for chunk in receipts.chunks(10) {
        let entries: Vec<_> = chunk
            .iter()
            .enumerate()
            .filter_map(|(i, receipt)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .visibility_timeout(0)
                    .build()
                    .ok()
            })
            .collect();
        match sqs
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(out) => failed += out.failed().len(),
            Err(_) => failed += chunk.len(),
        }
    }
    failed
}

/// Receive every message of a DLQ (up to `limit`), hiding them for `hold`, without deleting any.
/// The caller must [`release`] the receipts it is given back.
pub async fn scan(sqs: &Client, url: &str, limit: usize, hold: Duration) -> Result<Vec<Message>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(batch) = receive(sqs, url, hold).await? else {
            break;
        };
        let mut fresh = 0;
        for message in batch {
            if seen.insert(message.message_id().unwrap_or_default().to_owned()) {
                fresh += 1;
                out.push(message);
            }
        }
        if fresh == 0 {
            break;
        }
    }
    Ok(out)
}

/// Read up to `limit` messages and make them all visible again, whatever happened.
pub async fn peek(sqs: &Client, url: &str, limit: usize) -> Result<Vec<DeadLetter>> {
    let hold = Duration::from_secs(60 + (limit as u64 / 10));
    let scanned = scan(sqs, url, limit, hold).await;
    let messages = match &scanned {
        Ok(messages) => messages.as_slice(),
        Err(_) => &[],
    };
    let receipts: Vec<String> = messages
        .iter()
        .filter_map(|m| m.receipt_handle().map(str::to_owned))
        .collect();
    let unreleased = release(sqs, url, &receipts).await;
    if unreleased > 0 {
        eprintln!(
            "warning: {unreleased} message(s) of {} could not be made visible again; they reappear within {} s",
            queue_name(url),
            hold.as_secs()
        );
    }
    let now = now_ms();
    Ok(scanned?
        .iter()
        .map(|m| DeadLetter::from_message(m, now))
        .collect())
}

/// What `dlq list` shows of one dead-lettered message.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub message_id: String,
    /// `None` when the body is not an event.
    pub detail_type: Option<String>,
    pub rollout_id: Option<String>,
    pub key: Option<String>,
    /// When the message entered the DLQ (RFC 3339) and how long ago, in seconds.
    pub sent_at: String,
    #[serde(skip)]
    pub sent_ms: u64,
    pub age_seconds: u64,
    /// Receives at the source queue before it was dead-lettered.
    pub receives: u64,
    /// `permanent`, `transient-exhausted`, a poison kind (`invalid-json`, ...), or `redrive` when
    /// SQS moved it after maxReceiveCount without a reason from amiflow.
    pub kind: String,
    pub reason: String,
    pub source_queue: Option<String>,
    pub body_bytes: usize,
    /// Every message attribute, as kept for a replay.
    pub attributes: BTreeMap<String, String>,
    /// What makes the message the same one when it comes back to a DLQ: its event's `key`, or
    /// its body's hash when it is no event.
    #[serde(skip)]
    pub fingerprint: String,
}

impl DeadLetter {
    pub fn from_message(message: &Message, now_ms: u64) -> Self {
        let body = message.body().unwrap_or_default();
        let event: Option<Value> = serde_json::from_str(body).ok();
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let detail_type = event.as_ref().and_then(|e| text(e.get("detail-type")));
        let detail = event.as_ref().and_then(|e| e.get("detail"));
        let attributes: BTreeMap<String, String> = message
            .message_attributes()
            .map(|attrs| {
                attrs
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.string_value()
                                .map(str::to_owned)
                                .unwrap_or_else(|| format!("({})", v.data_type())),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let system = message.attributes();
        let system_number = |name: MessageSystemAttributeName| {
            system
                .and_then(|s| s.get(&name))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let sent_ms = system_number(MessageSystemAttributeName::SentTimestamp).unwrap_or(now_ms);
        let (kind, reason) = match (
            attributes.get(runtime::ERROR_KIND_ATTR),
            attributes.get(runtime::ERROR_ATTR),
        ) {
            (Some(kind), Some(reason)) => (kind.clone(), reason.clone()),
            (kind, reason) => (
                kind.cloned().unwrap_or_else(|| "redrive".into()),
                reason.cloned().unwrap_or_else(|| {
                    "moved by SQS after maxReceiveCount receives without a reason from amiflow (the worker crashed, timed out, or could not reach the DLQ); see the worker's log".into()
                }),
            ),
        };
        let key = detail.and_then(|d| text(d.get("key")));
        let fingerprint = key.clone().unwrap_or_else(|| {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            body.hash(&mut hasher);
            format!("body:{:016x}", hasher.finish())
        });
        DeadLetter {
            fingerprint,
            message_id: message.message_id().unwrap_or_default().to_owned(),
            detail_type,
            rollout_id: detail
                .and_then(|d| text(d.get("rollout_id")))
                .filter(|r| !r.is_empty()),
            key,
            sent_at: chrono::DateTime::from_timestamp_millis(sent_ms as i64)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            sent_ms,
            age_seconds: now_ms.saturating_sub(sent_ms) / 1000,
            receives: attributes
                .get(runtime::RECEIVE_COUNT_ATTR)
                .and_then(|v| v.parse().ok())
                .or_else(|| system_number(MessageSystemAttributeName::ApproximateReceiveCount))
                .unwrap_or(0),
            kind,
            reason,
            source_queue: attributes.get(runtime::SOURCE_QUEUE_ATTR).cloned(),
            body_bytes: body.len(),
            attributes,
        }
    }
}

pub fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

/// `3m`, `2h 5m`, `4d`: an age for people.
pub fn age(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}
