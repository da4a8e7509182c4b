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
            let results = out.entries();
            if out.failed_entry_count() == 0 && results.len() == current.len() {
                if let Ok(mut p) = pending.lock() {
                    p.clear();
                }
                return Ok(());
            }
            // Results are positional: keep exactly the entries whose result carries an error, or
            // that have no result at all (a reply shorter than the request accepted nothing that
            // it does not list; only an event id says an entry was accepted).
            let mut failed = Vec::new();
            let mut first_error = String::new();
            let sent = current.len();
            for (i, entry) in current.into_iter().enumerate() {
                let why = match results.get(i) {
                    Some(r) if r.error_code().is_none() && r.event_id().is_some() => continue,
                    Some(r) => match r.error_code() {
                        Some(code) => format!("{code}: {}", r.error_message().unwrap_or_default()),
                        None => "an entry's result has neither an event id nor an error".into(),
                    },
                    None => format!(
                        "the reply lists {} results for {sent} entries sent",
                        results.len()
                    ),
                };
                if first_error.is_empty() {
                    first_error = why;
                }
                failed.push(entry);
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
    use aws_sdk_eventbridge::operation::put_events::PutEventsOutput;
    use aws_sdk_eventbridge::types::PutEventsResultEntry;
    use aws_smithy_mocks::{RuleMode, mock, mock_client};

    fn details(n: usize) -> Vec<Detail> {
        let created = chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let built = events::AmiBuilt::new(
            "ami-0a1b2c3d4e5f60718",
            "us-east-1",
            "golden-al2023-2026-11",
            created,
            "/p",
        );
        (0..n)
            .map(|i| {
                events::AmiShared::new(&built, "111111111111", &format!("{:012}", i), "qa").into()
            })
            .collect()
    }

    fn ok(n: usize) -> PutEventsOutput {
        let entries = (0..n)
            .map(|i| {
                PutEventsResultEntry::builder()
                    .event_id(i.to_string())
                    .build()
            })
            .collect();
        PutEventsOutput::builder()
            .failed_entry_count(0)
            .set_entries(Some(entries))
            .build()
    }

    #[tokio::test]
    async fn only_rejected_entries_are_sent_again() {
        let partial = mock!(aws_sdk_eventbridge::Client::put_events)
            .match_requests(|r| r.entries().len() == 3)
            .then_output(|| {
                PutEventsOutput::builder()
                    .failed_entry_count(1)
                    .entries(PutEventsResultEntry::builder().event_id("a").build())
                    .entries(
                        PutEventsResultEntry::builder()
                            .error_code("InternalFailure")
                            .error_message("try again")
                            .build(),
                    )
                    .entries(PutEventsResultEntry::builder().event_id("c").build())
                    .build()
            });
        // The retry must carry exactly the rejected entry (the second one).
        let retry = mock!(aws_sdk_eventbridge::Client::put_events)
            .match_requests(|r| {
                r.entries().len() == 1
                    && r.entries()[0]
                        .detail()
                        .is_some_and(|d| d.contains("000000000001"))
            })
            .then_output(|| ok(1));
        let client = mock_client!(
            aws_sdk_eventbridge,
            RuleMode::Sequential,
            [&partial, &retry]
        );
        Publisher::new(client, "amiflow", 3)
            .publish(&details(3))
            .await
            .unwrap();
        assert_eq!((partial.num_calls(), retry.num_calls()), (1, 1));
    }

    #[tokio::test]
    async fn a_reply_listing_fewer_results_than_entries_sent_is_not_success() {
        // FailedEntryCount 0, but only two results for three entries: the third was not
        // accepted, whatever the count says, and is sent again.
        let short = mock!(aws_sdk_eventbridge::Client::put_events)
            .match_requests(|r| r.entries().len() == 3)
            .then_output(|| ok(2));
        let retry = mock!(aws_sdk_eventbridge::Client::put_events)
            .match_requests(|r| {
                r.entries().len() == 1
                    && r.entries()[0]
                        .detail()
                        .is_some_and(|d| d.contains("000000000002"))
            })
            .then_output(|| ok(1));
        let client = mock_client!(aws_sdk_eventbridge, RuleMode::Sequential, [&short, &retry]);
        Publisher::new(client, "amiflow", 3)
            .publish(&details(3))
            .await
            .unwrap();
        assert_eq!((short.num_calls(), retry.num_calls()), (1, 1));

        // Never more than that: after the attempts it is a transient failure naming the cause.
        let always_short = mock!(aws_sdk_eventbridge::Client::put_events).then_output(|| ok(0));
        let client = mock_client!(aws_sdk_eventbridge, RuleMode::MatchAny, [&always_short]);
        let err = Publisher::new(client, "amiflow", 2)
            .publish(&details(1))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "transient: events:PutEvents rejected 1 entries (first: the reply lists 0 results for 1 entries sent)"
        );
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn eleven_events_take_two_calls() {
        let first = mock!(aws_sdk_eventbridge::Client::put_events)
            .match_requests(|r| r.entries().len() == 10)
            .then_output(|| ok(10));
        let second = mock!(aws_sdk_eventbridge::Client::put_events)
            .match_requests(|r| r.entries().len() == 1)
            .then_output(|| ok(1));
        let client = mock_client!(aws_sdk_eventbridge, RuleMode::Sequential, [&first, &second]);
        Publisher::new(client, "amiflow", 1)
            .publish(&details(11))
            .await
            .unwrap();
        assert_eq!((first.num_calls(), second.num_calls()), (1, 1));
    }

    #[tokio::test]
    async fn entries_still_rejected_after_the_attempts_are_a_transient_failure() {
        let always = mock!(aws_sdk_eventbridge::Client::put_events).then_output(|| {
            PutEventsOutput::builder()
                .failed_entry_count(1)
                .entries(
                    PutEventsResultEntry::builder()
                        .error_code("ThrottlingException")
                        .build(),
                )
                .build()
        });
        let client = mock_client!(aws_sdk_eventbridge, RuleMode::MatchAny, [&always]);
        let err = Publisher::new(client, "amiflow", 2)
            .publish(&details(1))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert_eq!(always.num_calls(), 2);
    }

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
