//! A rollout driven window by window, as an operator or EventBridge Scheduler drives it: the
//! build's `AmiBuilt` on the hub bus (which promotes the first stage), then each stage's
//! `RolloutWindowOpened` once the stage before it has an outcome for every group it had to move;
//! the hub's gate promotes each later stage at its window. Progress is read where the workers
//! report it: the hub's audit queue, which receives every account's `ParamUpdated` and
//! `AsgRefreshFinished`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_config::SdkConfig;
use chrono::Utc;
use events::{AmiBuilt, Detail, RolloutWindowOpened};
use serde_json::Value;

/// How often the audit queue is read while waiting.
const POLL: Duration = Duration::from_millis(300);

/// One stage account of the rollout and clients acting in it.
#[derive(Debug, Clone)]
pub struct Stage {
    pub account: String,
    /// `qa`, `uat`, `prod`.
    pub name: String,
    pub config: SdkConfig,
    /// How long its window stays open.
    pub window_hours: u32,
}

/// What the hub's audit queue said so far.
#[derive(Debug, Default, Clone)]
pub struct Audit {
    /// `AsgRefreshFinished` by (account, group, AMI): every (outcome, reason) reported, in order
    /// (a duplicate delivery reports twice).
    pub finished: BTreeMap<(String, String, String), Vec<(String, String)>>,
    /// The detail of every `ParamUpdated`.
    pub params: Vec<Value>,
}

impl Audit {
    /// Record one event body from the audit queue.
    pub fn record(&mut self, body: &Value) {
        let d = &body["detail"];
        let text = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
        match body["detail-type"].as_str() {
            Some("AsgRefreshFinished") => self
                .finished
                .entry((text("account"), text("asg_name"), text("ami_id")))
                .or_default()
                .push((text("outcome"), text("reason"))),
            Some("ParamUpdated") => self.params.push(d.clone()),
            _ => {}
        }
    }

    /// The outcomes reported for `group` of `account` moving to `ami`.
    pub fn outcomes(
        &self,
        account: &str,
        group: &str,
        ami: &str,
    ) -> Option<&Vec<(String, String)>> {
        self.finished
            .get(&(account.to_owned(), group.to_owned(), ami.to_owned()))
    }

    /// The accounts that reported publishing `ami`.
    pub fn published(&self, ami: &str) -> BTreeSet<String> {
        self.params
            .iter()
            .filter(|d| d["ami_id"] == ami)
            .map(|d| d["account"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// Every message in `queue_url` of the account `config` acts in, now: received, deleted, and
/// returned as JSON bodies.
pub async fn drain(config: &SdkConfig, queue_url: &str) -> Result<Vec<Value>> {
    let sqs = aws_sdk_sqs::Client::new(config);
    let mut out = Vec::new();
    loop {
        let got = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(0)
            .send()
            .await
            .with_context(|| format!("receiving from {queue_url}"))?;
        if got.messages().is_empty() {
            return Ok(out);
        }
        for m in got.messages() {
            out.push(
                serde_json::from_str(m.body().unwrap_or("null"))
                    .with_context(|| format!("a message in {queue_url} that is not JSON"))?,
            );
            if let Some(receipt) = m.receipt_handle() {
                sqs.delete_message()
                    .queue_url(queue_url)
                    .receipt_handle(receipt)
                    .send()
                    .await
                    .with_context(|| format!("deleting from {queue_url}"))?;
            }
        }
    }
}

/// How long a window took, from the moment it opened.
#[derive(Debug, Clone, Copy)]
pub struct WindowTimes {
    /// Until the stage reported holding the AMI: for a later stage, the hub's gate judging that
    /// the stage before passed and promoting this one, then its param-worker publishing it.
    pub promoted: Duration,
    /// Until every expected group had an outcome.
    pub done: Duration,
}

/// Drives a rollout in a world whose hub bus is `bus` and whose hub audit queue is `audit_queue`.
#[derive(Debug, Clone)]
pub struct Driver {
    pub hub: SdkConfig,
    pub bus: String,
    pub audit_queue: String,
    /// In rollout order.
    pub stages: Vec<Stage>,
}

impl Driver {
    /// Put one amiflow event on the amiflow bus of the account `config` acts in.
    pub async fn put(&self, config: &SdkConfig, detail: &Detail) -> Result<()> {
        let out = aws_sdk_eventbridge::Client::new(config)
            .put_events()
            .entries(
                aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                    .source(events::SOURCE)
                    .detail_type(detail.detail_type())
                    .detail(detail.to_value().to_string())
                    .event_bus_name(&self.bus)
                    .build(),
            )
            .send()
            .await
            .with_context(|| format!("putting {} on bus {}", detail.detail_type(), self.bus))?;
        if out.failed_entry_count() > 0 {
            bail!(
                "EventBridge rejected {} on bus {}: {:?}",
                detail.detail_type(),
                self.bus,
                out.entries()
            );
        }
        Ok(())
    }

    /// Read (and delete) everything in the hub's audit queue now.
    pub async fn collect(&self, audit: &mut Audit) -> Result<()> {
        let bodies = drain(&self.hub, &self.audit_queue)
            .await
            .context("reading the hub's audit queue")?;
        for body in &bodies {
            audit.record(body);
        }
        Ok(())
    }

    /// Put `built` on the hub bus and wait until the first stage reported publishing its AMI
    /// (`ParamUpdated`; the later stages are promoted by the gate at their windows), calling
    /// `published` once for it.
    pub async fn publish(
        &self,
        built: AmiBuilt,
        audit: &mut Audit,
        within: Duration,
        mut published: impl FnMut(&Stage),
    ) -> Result<()> {
        let ami = built.ami_id.clone();
        self.put(&self.hub, &Detail::from(built)).await?;
        let Some(first) = self.stages.first() else {
            return Ok(());
        };
        self.wait_for(
            audit,
            within,
            |audit| audit.published(&ami).contains(&first.account),
            |_| {
                format!(
                    "no ParamUpdated for {ami} from {:?} within {within:?}",
                    [&first.name]
                )
            },
        )
        .await?;
        published(first);
        Ok(())
    }

    /// Collect the audit every `POLL` until `done` says the wait is over, or fail with what
    /// `timed_out` says once `within` has passed.
    async fn wait_for(
        &self,
        audit: &mut Audit,
        within: Duration,
        mut done: impl FnMut(&Audit) -> bool,
        timed_out: impl FnOnce(&Audit) -> String,
    ) -> Result<()> {
        let began = Instant::now();
        loop {
            self.collect(audit).await?;
            if done(audit) {
                return Ok(());
            }
            if began.elapsed() >= within {
                bail!("{}", timed_out(audit));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Open `stage`'s window now and wait until the stage holds `ami` (a later stage is promoted
    /// by the hub's gate at its window) and each of `expected` (group names) has an outcome for
    /// it, calling `progress` with the number that have; returns how long each took.
    pub async fn open_window(
        &self,
        stage: &Stage,
        ami: &str,
        expected: &BTreeSet<String>,
        audit: &mut Audit,
        within: Duration,
        progress: impl FnMut(usize),
    ) -> Result<WindowTimes> {
        let opened = Instant::now();
        self.open(stage).await?;
        self.promoted(stage, ami, audit, within).await?;
        let promoted = opened.elapsed();
        let left = within.saturating_sub(promoted);
        self.outcomes(stage, ami, expected, audit, left, progress)
            .await?;
        Ok(WindowTimes {
            promoted,
            done: opened.elapsed(),
        })
    }

    /// Put `stage`'s `RolloutWindowOpened` on its bus, opening now.
    pub async fn open(&self, stage: &Stage) -> Result<()> {
        let opens = Utc::now();
        let window = RolloutWindowOpened::new(
            &stage.account,
            &stage.name,
            opens,
            opens + chrono::Duration::hours(i64::from(stage.window_hours)),
        );
        self.put(&stage.config, &Detail::from(window)).await
    }

    /// Wait until `stage` reported holding `ami` (`ParamUpdated`).
    pub async fn promoted(
        &self,
        stage: &Stage,
        ami: &str,
        audit: &mut Audit,
        within: Duration,
    ) -> Result<()> {
        self.wait_for(
            audit,
            within,
            |audit| audit.published(ami).contains(&stage.account),
            |_| {
                format!(
                    "stage {} was not promoted to {ami} within {within:?} (no ParamUpdated): its gate stayed closed (amictl status says why)",
                    stage.name
                )
            },
        )
        .await
    }

    /// Wait until each of `expected` (group names of `stage`) has an outcome for `ami`, calling
    /// `progress` with the number that have.
    pub async fn outcomes(
        &self,
        stage: &Stage,
        ami: &str,
        expected: &BTreeSet<String>,
        audit: &mut Audit,
        within: Duration,
        mut progress: impl FnMut(usize),
    ) -> Result<()> {
        let missing = |audit: &Audit| -> Vec<&String> {
            expected
                .iter()
                .filter(|g| audit.outcomes(&stage.account, g, ami).is_none())
                .collect()
        };
        self.wait_for(
            audit,
            within,
            |audit| {
                let left = missing(audit).len();
                progress(expected.len() - left);
                left == 0
            },
            |audit| {
                let missing = missing(audit);
                format!(
                    "stage {}: {} of {} groups have no AsgRefreshFinished for {ami} after {within:?}: {missing:?}",
                    stage.name,
                    missing.len(),
                    expected.len()
                )
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_keeps_every_report_by_group_and_ami() {
        let mut audit = Audit::default();
        let finished = |outcome: &str| {
            serde_json::json!({"detail-type": "AsgRefreshFinished", "detail": {
                "account": "2", "asg_name": "web", "ami_id": "ami-1", "outcome": outcome, "reason": ""}})
        };
        audit.record(&finished("succeeded"));
        audit.record(&finished("succeeded"));
        audit.record(&serde_json::json!({"detail-type": "ParamUpdated", "detail": {"account": "2", "ami_id": "ami-1"}}));
        audit.record(&serde_json::json!({"detail-type": "AmiShared", "detail": {}}));
        assert_eq!(audit.outcomes("2", "web", "ami-1").map(Vec::len), Some(2));
        assert_eq!(audit.outcomes("2", "web", "ami-0"), None);
        assert_eq!(audit.published("ami-1"), BTreeSet::from(["2".to_owned()]));
        assert!(audit.published("ami-0").is_empty());
    }
}
