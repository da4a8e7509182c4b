//! Emitting events to EventBridge. `PutEvents` takes at most 10 entries and 1 MiB per call, and
//! can answer 200 while rejecting some entries (`FailedEntryCount`): only those entries are sent
//! again, with jittered backoff, until every one is accepted or the attempts run out.

use std::time::Duration;

use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use backon::{ExponentialBuilder, Retryable};
use events::Detail;

use crate::error::StepError;

/// Entries per `PutEvents` call (an AWS limit).
pub const MAX_ENTRIES: usize = 10;
/// Bytes per `PutEvents` call (an AWS limit).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Sends details to one bus.
#[derive(Clone)]
pub struct Publisher {
    client: aws_sdk_eventbridge::Client,
    bus: String,
    backoff: ExponentialBuilder,
}

impl Publisher {
    /// `attempts` bounds the sends of entries that EventBridge rejected inside a 200 reply.
    pub fn new(
        client: aws_sdk_eventbridge::Client,
        bus: impl Into<String>,
        attempts: usize,
    ) -> Self {
        let backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(attempts.saturating_sub(1));
        Self {
            client,
            bus: bus.into(),
            backoff,
        }
    }

    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// Publish every detail; `Ok` only when EventBridge accepted all of them.
    pub async fn publish(&self, details: &[Detail]) -> Result<(), StepError> {
        let entries: Vec<(usize, PutEventsRequestEntry)> = details
            .iter()
            .map(|d| {
                let detail = d.to_value().to_string();
                (
                    entry_size(d.detail_type(), &detail),
                    PutEventsRequestEntry::builder()
                        .source(events::SOURCE)
                        .detail_type(d.detail_type())
                        .detail(detail)
                        .event_bus_name(&self.bus)
                        .build(),
                )
            })
            .collect();
        for (size, _) in &entries {
            if *size > MAX_REQUEST_BYTES {
                return Err(StepError::Permanent(format!(
                    "an emitted event is {size} bytes, over PutEvents' {MAX_REQUEST_BYTES}-byte limit"
                )));
            }
        }
        for batch in batches(entries) {
            self.put_all(batch).await?;
        }
        Ok(())
    }

    async fn put_all(&self, batch: Vec<PutEventsRequestEntry>) -> Result<(), StepError> {
        let pending = std::sync::Mutex::new(batch);
        let attempt = || async {
            let current = pending.lock().map(|p| p.clone()).unwrap_or_default();
            if current.is_empty() {
                return Ok(());
            }
            let out = self
                .client
                .put_events()
                .set_entries(Some(current.clone()))
                .send()
                .await
                .map_err(|e| StepError::from_sdk("events:PutEvents", &e))?;
            if out.failed_entry_count() == 0 {
                if let Ok(mut p) = pending.lock() {
                    p.clear();
                }
                return Ok(());
            }
            // Results are positional: keep exactly the entries whose result carries an error.
            let mut failed = Vec::new();
            let mut first_error = String::new();
            for (entry, result) in current.into_iter().zip(out.entries()) {
                if let Some(code) = result.error_code() {
                    if first_error.is_empty() {
                        first_error =
                            format!("{code}: {}", result.error_message().unwrap_or_default());
                    }
                    failed.push(entry);
                }
            }
            let count = failed.len();
            if let Ok(mut p) = pending.lock() {
                *p = failed;
            }
            tracing::debug!(failed = count, error = %first_error, "PutEvents rejected some entries; retrying those");
            Err(StepError::Transient(format!(
                "events:PutEvents rejected {count} entries (first: {first_error})"
            )))
        };
        attempt
            .retry(self.backoff)
            .when(StepError::is_retryable)
            .await
    }
}

/// Size of one entry as AWS counts it: the `Time` field (14 bytes) plus the UTF-8 bytes of
/// `Source`, `DetailType` and `Detail`.
fn entry_size(detail_type: &str, detail: &str) -> usize {
    14 + events::SOURCE.len() + detail_type.len() + detail.len()
}

/// Split into calls of at most [`MAX_ENTRIES`] entries and [`MAX_REQUEST_BYTES`] bytes.
fn batches(entries: Vec<(usize, PutEventsRequestEntry)>) -> Vec<Vec<PutEventsRequestEntry>> {
    let mut out: Vec<Vec<PutEventsRequestEntry>> = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for (size, entry) in entries {
        if current.len() == MAX_ENTRIES || (bytes + size > MAX_REQUEST_BYTES && !current.is_empty())
        {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(entry);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> (usize, PutEventsRequestEntry) {
        (
            n,
            PutEventsRequestEntry::builder()
                .detail(n.to_string())
                .build(),
        )
    }

    #[test]
    fn batches_respect_entry_and_byte_limits() {
        let sizes: Vec<usize> = batches((0..25).map(|_| entry(10)).collect())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, vec![10, 10, 5]);
        let big = MAX_REQUEST_BYTES / 2 + 1;
        let sizes: Vec<usize> = batches(vec![entry(big), entry(big), entry(10)])
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, vec![1, 2]);
        assert!(batches(Vec::new()).is_empty());
    }
}
