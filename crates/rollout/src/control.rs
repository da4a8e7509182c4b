//! The records that gate a rollout, kept in the **hub's** SSM Parameter Store under `/amiflow/`,
//! one JSON document per String parameter, so an operator reads them in the console, a restarted
//! worker finds them, and Parameter Store's history says who wrote each version and when.
//!
//! | record | path | written by |
//! |---|---|---|
//! | [`Promotion`] | `/amiflow/gate/<ami>/<stage>` | the share-worker, when the stage's gate opens for the AMI |
//! | [`Pause`] | `/amiflow/control/pause/<stage>` or `/amiflow/control/pause/all` | `amictl pause` (`resume` deletes it) |
//! | [`Approval`] | `/amiflow/control/approval/<ami>/<stage>` | `amictl approve` |
//! | [`Resume`] | `/amiflow/control/resume/<ami>/<stage>` | `amictl resume --stage` of a halted stage |
//! | [`Halt`] | `/amiflow/control/halt/<ami>/<stage>` | `amictl halt` (`resume --stage` deletes it) |
//! | [`Recall`] | `/amiflow/control/recall/<ami>` | `amictl recall` (never deleted: a recalled AMI stays recalled) |
//!
//! Operator intent (pause, approval, resume, recall) is the one thing amictl writes: it is not rollout
//! state but a decision, and the worker that acts on it judges it like any other AWS state.
//! Everything else (parameters, versions, refreshes, promotions) only workers write.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use runtime::StepError;
use serde::{Deserialize, Serialize};

use crate::aws::Records;

/// The root of every record amiflow keeps in Parameter Store.
pub const ROOT: &str = "/amiflow";
/// Where pauses live: one record per paused stage, or [`ALL`] for every stage.
/// Where the operators' decisions live (pauses, approvals, halts, resumes, recalls).
pub const CONTROL: &str = "/amiflow/control";
pub const PAUSES: &str = "/amiflow/control/pause";
/// The pause that stops every stage.
pub const ALL: &str = "all";
/// Where recalls live: one record per recalled AMI.
pub const RECALLS: &str = "/amiflow/control/recall";

/// A stage's gate opened for an AMI: the stage's golden parameter may name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    pub ami: String,
    pub stage: String,
    /// The family's golden parameter.
    pub parameter: String,
    pub at: DateTime<Utc>,
    /// Why the gate opened ("first stage", "qa passed: 12 groups, 0 failed, baked 2 h", ...).
    pub reason: String,
}

/// An operator's decision: who, when, why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The caller identity that made it (the STS ARN amictl ran as).
    pub by: String,
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// A stage (or every stage) paused: nothing changes there until it is resumed.
pub type Pause = Decision;
/// An operator approved promoting an AMI to a stage that `requires_approval`.
pub type Approval = Decision;
/// An operator resumed a halted stage for an AMI: failures up to then are accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    #[serde(flatten)]
    pub decision: Decision,
    /// The failed groups the stage had when it was resumed: the stage halts again only past
    /// these plus its tolerance.
    pub accepted_failures: usize,
}

/// An operator halted a stage for an AMI (`amictl halt`): no refresh to the AMI starts there, the
/// stage's waiting requests end `halted`, and the next stage is not promoted, whatever its
/// failures; with `cancel_running`, its running refreshes to the AMI are cancelled too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Halt {
    #[serde(flatten)]
    pub decision: Decision,
    pub cancel_running: bool,
}

impl Halt {
    /// "by <who> at <when> (cancelling its running refreshes): <why>", as amictl shows it.
    pub fn describe(&self) -> String {
        format!(
            "by {} at {}{}: {}",
            self.decision.by,
            self.decision.at.to_rfc3339(),
            if self.cancel_running {
                " (cancelling its running refreshes)"
            } else {
                ""
            },
            self.decision.reason
        )
    }
}

/// An operator recalled a golden AMI: it is refused everywhere from then on, and every stage whose
/// golden parameter holds it goes back to `to` (or, absent, its previous golden AMI that is not
/// recalled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    #[serde(flatten)]
    pub decision: Decision,
    pub ami: String,
    /// The family's golden parameter.
    pub parameter: String,
    /// The AMI the operator named to go back to (`--to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Move the groups back at once (`--now`), not in each stage's next window.
    #[serde(default)]
    pub now: bool,
}

impl Recall {
    /// Why a step refuses the recalled AMI, for its log and outcome.
    pub fn refusal(&self) -> String {
        format!(
            "{} was recalled by {} at {}: {}",
            self.ami,
            self.decision.by,
            self.decision.at.to_rfc3339(),
            self.decision.reason
        )
    }
}

/// Where halts live: `<HALTS>/<ami>/<stage>`.
pub const HALTS: &str = "/amiflow/control/halt";

pub fn halt_path(ami: &str, stage: &str) -> String {
    format!("{HALTS}/{ami}/{stage}")
}

pub fn recall_path(ami: &str) -> String {
    format!("{RECALLS}/{ami}")
}

pub fn promotion_path(ami: &str, stage: &str) -> String {
    format!("{ROOT}/gate/{ami}/{stage}")
}

/// `None` is the pause of every stage.
pub fn pause_path(stage: Option<&str>) -> String {
    format!("{PAUSES}/{}", stage.unwrap_or(ALL))
}

pub fn approval_path(ami: &str, stage: &str) -> String {
    format!("{ROOT}/control/approval/{ami}/{stage}")
}

pub fn resume_path(ami: &str, stage: &str) -> String {
    format!("{ROOT}/control/resume/{ami}/{stage}")
}

/// Where lifted pauses and halts are kept for the record (`amictl resume` deletes the pause or
/// halt itself, which workers read): no worker reads them.
pub const LIFTED: &str = "/amiflow/control/lifted";

/// The record of a lifted pause: one per pause, named by when it was made, so lifting it again
/// (or a retry) writes the same record.
pub fn lifted_pause_path(stage: Option<&str>, paused: &Decision) -> String {
    format!(
        "{LIFTED}/pause/{}/{}",
        stage.unwrap_or(ALL),
        paused.at.timestamp_millis()
    )
}

/// The record of a lifted halt, one per halt.
pub fn lifted_halt_path(ami: &str, stage: &str, halted: &Halt) -> String {
    format!(
        "{LIFTED}/halt/{ami}/{stage}/{}",
        halted.decision.at.timestamp_millis()
    )
}

/// A pause or halt an operator lifted: what it was, and who lifted it, when and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lifted<T> {
    pub was: T,
    pub lifted: Decision,
}

/// Read a record; one that does not parse is an error naming it (someone wrote it by hand).
pub async fn read<T: for<'de> Deserialize<'de>>(
    records: &impl Records,
    name: &str,
) -> Result<Option<T>, StepError> {
    let Some(text) = records.read_record(name).await? else {
        return Ok(None);
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        StepError::Permanent(format!(
            "the record {name} is not what amiflow writes ({e}); fix or delete it"
        ))
    })
}

pub async fn write<T: Serialize>(
    records: &impl Records,
    name: &str,
    record: &T,
) -> Result<(), StepError> {
    let text = serde_json::to_string(record)
        .map_err(|e| StepError::Permanent(format!("encoding {name}: {e}")))?;
    records.write_record(name, &text).await
}

/// The pauses in force: every stage's, read in one call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pauses {
    pub all: Option<Pause>,
    pub stages: Vec<(String, Pause)>,
}

impl Pauses {
    pub async fn read(records: &impl Records) -> Result<Pauses, StepError> {
        let mut pauses = Pauses::default();
        for stored in records.list_records(PAUSES).await? {
            let name = stored
                .name
                .strip_prefix(PAUSES)
                .unwrap_or(&stored.name)
                .trim_start_matches('/');
            let pause: Pause = serde_json::from_str(&stored.value).map_err(|e| {
                StepError::Permanent(format!(
                    "the pause record {} is not what amiflow writes ({e}); fix or delete it",
                    stored.name
                ))
            })?;
            if name == ALL {
                pauses.all = Some(pause);
            } else {
                pauses.stages.push((name.to_owned(), pause));
            }
        }
        Ok(pauses)
    }

    /// The pause that stops `stage`, if any (the pause of every stage first).
    pub fn of(&self, stage: &str) -> Option<&Pause> {
        self.all.as_ref().or_else(|| {
            self.stages
                .iter()
                .find(|(name, _)| name == stage)
                .map(|(_, p)| p)
        })
    }
}

/// The pauses, read at most once per `max_age`: the documented delay within which a pause stops
/// every worker (`AMIFLOW_CONTROL_SECONDS`). Shared by the messages a worker handles at once.
pub struct PauseCache {
    max_age: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Pauses)>>,
}

impl PauseCache {
    pub fn new(max_age: Duration) -> Self {
        PauseCache {
            max_age,
            last: tokio::sync::Mutex::default(),
        }
    }

    pub async fn get(&self, records: &impl Records) -> Result<Pauses, StepError> {
        let mut last = self.last.lock().await;
        if let Some((at, pauses)) = last.as_ref()
            && at.elapsed() < self.max_age
        {
            return Ok(pauses.clone());
        }
        let pauses = Pauses::read(records).await?;
        *last = Some((Instant::now(), pauses.clone()));
        Ok(pauses)
    }
}

/// Every recall, by AMI, read in one call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recalls(pub std::collections::BTreeMap<String, Recall>);

impl Recalls {
    pub async fn read(records: &impl Records) -> Result<Recalls, StepError> {
        let mut found = std::collections::BTreeMap::new();
        for stored in records.list_records(RECALLS).await? {
            let recall: Recall = serde_json::from_str(&stored.value).map_err(|e| {
                StepError::Permanent(format!(
                    "the recall record {} is not what amiflow writes ({e}); fix it",
                    stored.name
                ))
            })?;
            found.insert(recall.ami.clone(), recall);
        }
        Ok(Recalls(found))
    }

    pub fn of(&self, ami: &str) -> Option<&Recall> {
        self.0.get(ami)
    }

    pub fn contains(&self, ami: &str) -> bool {
        self.0.contains_key(ami)
    }
}

/// The golden AMI a stage goes back to when `recalled` is recalled: the newest value of the
/// parameter's `history` (oldest first) before the recalled AMI's last time in it that is neither
/// it nor recalled itself. `None`: the family never had another golden AMI there.
pub fn previous_golden(history: &[String], recalled: &str, recalls: &Recalls) -> Option<String> {
    let last = history.iter().rposition(|h| h == recalled)?;
    history[..last]
        .iter()
        .rev()
        .find(|h| *h != recalled && !recalls.contains(h))
        .cloned()
}

/// The recalls, read at most once per `max_age` (the same documented delay as the pauses,
/// `AMIFLOW_CONTROL_SECONDS`): one cached read for every message a worker handles meanwhile.
pub struct RecallCache {
    max_age: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Recalls)>>,
}

impl RecallCache {
    pub fn new(max_age: Duration) -> Self {
        RecallCache {
            max_age,
            last: tokio::sync::Mutex::default(),
        }
    }

    pub async fn get(&self, records: &impl Records) -> Result<Recalls, StepError> {
        let mut last = self.last.lock().await;
        if let Some((at, recalls)) = last.as_ref()
            && at.elapsed() < self.max_age
        {
            return Ok(recalls.clone());
        }
        let recalls = Recalls::read(records).await?;
        *last = Some((Instant::now(), recalls.clone()));
        Ok(recalls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeAws;

    fn decision(reason: &str) -> Decision {
        Decision {
            by: "arn:aws:sts::111111111111:assumed-role/ops/alice".into(),
            at: "2026-12-05T02:00:00Z".parse().unwrap(),
            reason: reason.into(),
        }
    }

    #[tokio::test]
    async fn a_pause_of_every_stage_stops_each_stage_and_a_stage_pause_only_its_own() {
        let aws = FakeAws::default();
        write(&aws, &pause_path(Some("prod")), &decision("change freeze"))
            .await
            .unwrap();
        let pauses = Pauses::read(&aws).await.unwrap();
        assert_eq!(pauses.of("prod").unwrap().reason, "change freeze");
        assert_eq!(pauses.of("qa"), None);

        write(&aws, &pause_path(None), &decision("incident 42"))
            .await
            .unwrap();
        let pauses = Pauses::read(&aws).await.unwrap();
        assert_eq!(pauses.of("qa").unwrap().reason, "incident 42");
        assert_eq!(pauses.of("prod").unwrap().reason, "incident 42");
    }

    #[tokio::test]
    async fn a_record_written_by_hand_is_refused_by_name() {
        let aws = FakeAws::default();
        aws.records
            .lock()
            .unwrap()
            .insert(pause_path(Some("qa")), "yes please".into());
        let Err(StepError::Permanent(reason)) = Pauses::read(&aws).await else {
            panic!("a record amiflow did not write must be refused");
        };
        assert!(reason.contains("/amiflow/control/pause/qa"), "{reason}");
    }

    #[tokio::test]
    async fn the_pause_cache_reads_once_within_its_age() {
        let aws = FakeAws::default();
        let cache = PauseCache::new(Duration::from_secs(60));
        assert_eq!(cache.get(&aws).await.unwrap(), Pauses::default());
        write(&aws, &pause_path(None), &decision("late"))
            .await
            .unwrap();
        // Within its age the cache answers what it read: the documented delay.
        assert_eq!(cache.get(&aws).await.unwrap(), Pauses::default());
        let fresh = PauseCache::new(Duration::ZERO);
        assert_eq!(fresh.get(&aws).await.unwrap().all.unwrap().reason, "late");
    }

    #[tokio::test]
    async fn a_resume_keeps_its_accepted_failures_next_to_the_decision() {
        let aws = FakeAws::default();
        let resume = Resume {
            decision: decision("health check fixed"),
            accepted_failures: 3,
        };
        let path = resume_path("ami-1", "qa");
        write(&aws, &path, &resume).await.unwrap();
        let text = aws.records.lock().unwrap().get(&path).cloned().unwrap();
        assert!(text.contains("\"accepted_failures\":3"), "{text}");
        assert_eq!(read::<Resume>(&aws, &path).await.unwrap(), Some(resume));
    }

    fn recall(ami: &str) -> Recall {
        Recall {
            decision: decision("kernel regression"),
            ami: ami.into(),
            parameter: "/golden/al2023/ami-id".into(),
            to: None,
            now: false,
        }
    }

    #[test]
    fn the_previous_golden_ami_skips_the_recalled_ones() {
        let history: Vec<String> = ["ami-a", "ami-b", "ami-c", "ami-d"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let none = Recalls::default();
        assert_eq!(
            previous_golden(&history, "ami-d", &none).as_deref(),
            Some("ami-c")
        );
        // c was recalled before: d goes back to b.
        let mut recalls = Recalls::default();
        recalls.0.insert("ami-c".into(), recall("ami-c"));
        recalls.0.insert("ami-d".into(), recall("ami-d"));
        assert_eq!(
            previous_golden(&history, "ami-d", &recalls).as_deref(),
            Some("ami-b")
        );
        // Back to b once (a, b, c, b): recalling c again finds b, not c itself.
        let back: Vec<String> = ["ami-a", "ami-b", "ami-c", "ami-b", "ami-c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            previous_golden(&back, "ami-c", &none).as_deref(),
            Some("ami-b")
        );
        // The only golden AMI the family had, or one it never had: nothing to go back to.
        assert_eq!(previous_golden(&history[..1], "ami-a", &none), None);
        assert_eq!(previous_golden(&history, "ami-z", &none), None);
    }

    #[tokio::test]
    async fn recalls_are_read_in_one_list_and_cached_within_their_age() {
        let aws = FakeAws::default();
        let cache = RecallCache::new(Duration::from_secs(60));
        assert!(!cache.get(&aws).await.unwrap().contains("ami-b"));
        write(&aws, &recall_path("ami-b"), &recall("ami-b"))
            .await
            .unwrap();
        assert!(
            !cache.get(&aws).await.unwrap().contains("ami-b"),
            "within its age the cache answers what it read"
        );
        let fresh = RecallCache::new(Duration::ZERO).get(&aws).await.unwrap();
        let found = fresh.of("ami-b").unwrap();
        assert_eq!(found, &recall("ami-b"));
        assert!(
            found.refusal().starts_with(
                "ami-b was recalled by arn:aws:sts::111111111111:assumed-role/ops/alice at 2026-12-05T02:00:00+00:00: kernel regression"
            ),
            "{}",
            found.refusal()
        );
    }
}
