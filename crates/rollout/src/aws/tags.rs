//! Tag writes to Auto Scaling groups, batched across the concurrent steps of a process.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_autoscaling::types::Tag;
use runtime::StepError;

/// The tag writes of concurrent steps, sent together. A write waits up to its linger for others;
/// those that arrived by then go out in one `CreateOrUpdateTags` call (it takes the tags of many
/// groups), so the marks and closes of a busy window cost a fraction of a call each out of the
/// account's shared Auto Scaling bucket. A prompt write (a refresh's start mark, which the
/// account's slots are counted from) waits `linger`; an unhurried one (a close, whose slot was
/// freed before the write) waits up to `unhurried` and goes out early with the next prompt write.
/// Each caller still waits until its own write is made or has failed. If a joint write fails (a
/// group deleted meanwhile), each write is tried alone, so one group's error is never another's.
#[derive(Debug)]
pub struct TagBatch {
    linger: Duration,
    unhurried: Duration,
    pending: std::sync::Mutex<Pending>,
}

/// The writes waiting, and when the flush already scheduled for them happens.
#[derive(Debug, Default)]
struct Pending {
    writes: Vec<PendingTags>,
    flush_at: Option<tokio::time::Instant>,
}

#[derive(Debug)]
struct PendingTags {
    tags: Vec<Tag>,
    done: tokio::sync::oneshot::Sender<Result<(), StepError>>,
}

/// At most this many tags per call (AWS documents no limit; a group holds at most 50 tags).
const TAGS_PER_CALL: usize = 50;

pub(super) async fn write_tags(
    client: &aws_sdk_autoscaling::Client,
    tags: Vec<Tag>,
) -> Result<(), StepError> {
    runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
    client
        .create_or_update_tags()
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(|e| StepError::from_sdk("autoscaling:CreateOrUpdateTags", &e))?;
    Ok(())
}

impl TagBatch {
    /// Prompt writes wait `linger` for others, unhurried ones up to `unhurried` (never less than
    /// `linger`).
    pub fn new(linger: Duration, unhurried: Duration) -> Arc<Self> {
        Arc::new(TagBatch {
            linger,
            unhurried: unhurried.max(linger),
            pending: std::sync::Mutex::new(Pending::default()),
        })
    }

    pub(super) async fn write(
        self: &Arc<Self>,
        client: &aws_sdk_autoscaling::Client,
        tags: Vec<Tag>,
        unhurried: bool,
    ) -> Result<(), StepError> {
        let (done, written) = tokio::sync::oneshot::channel();
        let at = tokio::time::Instant::now()
            + if unhurried {
                self.unhurried
            } else {
                self.linger
            };
        let schedule = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.writes.push(PendingTags { tags, done });
            let sooner = pending.flush_at.is_none_or(|t| at < t);
            if sooner {
                pending.flush_at = Some(at);
            }
            sooner
        };
        if schedule {
            // A task of its own, so a caller that gives up does not strand the others' writes. A
            // flush scheduled later than this one finds the writes gone and does nothing.
            let (batch, client) = (Arc::clone(self), client.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                batch.flush(at, &client).await;
            });
        }
        written.await.unwrap_or_else(|_| {
            Err(StepError::Transient(
                "autoscaling:CreateOrUpdateTags: the joint write was dropped".into(),
            ))
        })
    }

    /// Send the waiting writes, if the flush scheduled for them is the one due `at`.
    async fn flush(&self, at: tokio::time::Instant, client: &aws_sdk_autoscaling::Client) {
        let pending = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.flush_at != Some(at) {
                return;
            }
            pending.flush_at = None;
            std::mem::take(&mut pending.writes)
        };
        let mut calls: Vec<Vec<PendingTags>> = Vec::new();
        for p in pending {
            match calls.last_mut() {
                Some(call)
                    if call.iter().map(|c| c.tags.len()).sum::<usize>() + p.tags.len()
                        <= TAGS_PER_CALL =>
                {
                    call.push(p);
                }
                _ => calls.push(vec![p]),
            }
        }
        for call in calls {
            let all: Vec<Tag> = call.iter().flat_map(|p| p.tags.iter().cloned()).collect();
            match write_tags(client, all).await {
                Ok(()) => {
                    for p in call {
                        let _ = p.done.send(Ok(()));
                    }
                }
                Err(e) if call.len() == 1 => {
                    for p in call {
                        let _ = p.done.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, writes = call.len(), "joint tag write failed; writing each alone");
                    for p in call {
                        let alone = write_tags(client, p.tags.clone()).await;
                        let _ = p.done.send(alone);
                    }
                }
            }
        }
    }
}

/// Tag writes of concurrent steps share calls, and one group's failure is not another's.
#[cfg(test)]
mod tag_batch_tests {
    use super::*;
    use crate::aws::{AwsGroups, Groups};
    use aws_sdk_autoscaling::operation::create_or_update_tags::CreateOrUpdateTagsOutput;
    use aws_smithy_mocks::{RuleMode, mock, mock_client};
    use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use std::collections::BTreeSet;

    fn batched(autoscaling: aws_sdk_autoscaling::Client) -> AwsGroups {
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, []);
        AwsGroups {
            autoscaling,
            ec2,
            tag_batch: None,
        }
        .batching_tags(&TagBatch::new(
            Duration::from_millis(50),
            Duration::from_secs(10),
        ))
    }

    fn groups_of(tags: &[Tag]) -> BTreeSet<String> {
        tags.iter()
            .filter_map(|t| t.resource_id().map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn writes_made_together_go_out_in_one_call() {
        let joint = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()).len() == 3)
            .then_output(|| CreateOrUpdateTagsOutput::builder().build());
        let autoscaling = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, [&joint]);
        let groups = batched(autoscaling);
        let (a, b, c) = tokio::join!(
            groups.set_tags("a", &[("k", "1"), ("l", "1")]),
            groups.set_tags("b", &[("k", "2")]),
            groups.set_tags("c", &[("k", "3")]),
        );
        a.unwrap();
        b.unwrap();
        c.unwrap();
        assert_eq!(joint.num_calls(), 1);
    }

    /// A close waits for a start mark made within its longer linger and goes out with it, well
    /// before its own linger ends; a close alone goes out when its linger ends, not before.
    #[tokio::test]
    async fn an_unhurried_write_goes_out_with_the_next_prompt_one_or_alone_when_its_time_is_up() {
        let joint = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()) == BTreeSet::from(["a".into(), "b".into()]))
            .then_output(|| CreateOrUpdateTagsOutput::builder().build());
        let alone = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()) == BTreeSet::from(["c".into()]))
            .then_output(|| CreateOrUpdateTagsOutput::builder().build());
        let autoscaling = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, [&joint, &alone]);
        let unhurried = Duration::from_secs(60);
        let batch = TagBatch::new(Duration::from_millis(50), unhurried);
        let groups = Arc::new(
            AwsGroups {
                autoscaling: autoscaling.clone(),
                ec2: mock_client!(aws_sdk_ec2, RuleMode::MatchAny, []),
                tag_batch: None,
            }
            .batching_tags(&batch),
        );
        let start = std::time::Instant::now();
        let close = tokio::spawn({
            let groups = Arc::clone(&groups);
            async move { groups.set_tags_unhurried("a", &[("k", "1")]).await }
        });
        // The start mark comes once the close waits in the batch.
        while batch.pending.lock().unwrap().writes.is_empty() {
            tokio::task::yield_now().await;
        }
        groups.set_tags("b", &[("k", "2")]).await.unwrap();
        close.await.unwrap().unwrap();
        assert_eq!(joint.num_calls(), 1);
        assert!(start.elapsed() < unhurried, "{:?}", start.elapsed());

        let lone = Duration::from_millis(300);
        let batch = TagBatch::new(Duration::from_millis(50), lone);
        let groups = AwsGroups {
            autoscaling,
            ec2: mock_client!(aws_sdk_ec2, RuleMode::MatchAny, []),
            tag_batch: None,
        }
        .batching_tags(&batch);
        let start = std::time::Instant::now();
        groups.set_tags_unhurried("c", &[("k", "3")]).await.unwrap();
        assert_eq!(alone.num_calls(), 1);
        assert!(start.elapsed() >= lone, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_joint_write_that_fails_is_made_again_one_group_at_a_time() {
        let refused = || {
            HttpResponse::new(
                StatusCode::try_from(400).unwrap(),
                SdkBody::from(
                    "<ErrorResponse><Error><Type>Sender</Type><Code>ValidationError</Code><Message>AutoScalingGroup name not found - gone</Message></Error><RequestId>1</RequestId></ErrorResponse>",
                ),
            )
        };
        let joint = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()).len() == 2)
            .then_http_response(refused);
        let gone = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()).contains("gone"))
            .then_http_response(refused);
        let alone = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()).contains("web"))
            .then_output(|| CreateOrUpdateTagsOutput::builder().build());
        let autoscaling = mock_client!(
            aws_sdk_autoscaling,
            RuleMode::MatchAny,
            [&joint, &gone, &alone]
        );
        let groups = batched(autoscaling);
        let (web, gone_result) = tokio::join!(
            groups.set_tags("web", &[("k", "1")]),
            groups.set_tags("gone", &[("k", "2")]),
        );
        web.unwrap();
        let err = gone_result.unwrap_err();
        assert!(err.reason().contains("not found - gone"), "{err:?}");
        assert_eq!(
            (joint.num_calls(), gone.num_calls(), alone.num_calls()),
            (1, 1, 1)
        );
    }
}
