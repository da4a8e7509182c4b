//! The refresh-worker's mark on a group: which AMI it last moved the group to, in which window,
//! with which instance refresh, and how that went. The mark lives in AWS, so every process (and
//! `amictl status`) reads the same truth, and it is a wire format: deployed groups carry it, so
//! its encodings here never change. Where a group's mark is kept is `aws::Marks`' choice: the
//! group's own tags, or, for a group a CloudFormation stack owns (whose tags are the stack's
//! template's, so any other tag is drift), an SSM parameter holding [`Record::parameter_value`].
//!
//! In tags:
//!
//! - [`REFRESH_TAG`]: `<ami>|<state>|<refresh id>|<deadline or ->|<parameter>`;
//! - [`STATE_TAG`]: the state alone, so refreshes in flight are found with a server-side tag
//!   filter instead of listing every group ever refreshed;
//! - [`REASON_TAG`]: why the last request for the mark's AMI was skipped. A reason longer than one
//!   tag value (256 characters) goes on in `amiflow:refresh-reason-2`, `-3`, ... (see
//!   [`REASON_TAGS`]): every part but the last is full, so a reader stops at the first part that is
//!   not, and a longer earlier reason's leftover parts are never read.

use std::fmt;

use chrono::{DateTime, Utc};
use events::Outcome;

use crate::aws::Group;

/// Tag marking a group's refresh: `<ami>|<state>|<refresh id>|<deadline or ->|<parameter>`.
pub const REFRESH_TAG: &str = "amiflow:refresh";
/// Tag holding just the mark's state (see [`MarkState`]).
pub const STATE_TAG: &str = "amiflow:refresh-state";
/// Tag holding why the last request for the mark's AMI was skipped, so `amictl status` can say it
/// without the event.
pub const REASON_TAG: &str = "amiflow:refresh-reason";
/// Auto Scaling tag values hold at most 256 characters.
const TAG_VALUE_MAX: usize = 256;
/// A standard SSM parameter's value holds at most 4,096 bytes.
const PARAMETER_VALUE_MAX: usize = 4096;
/// The tags a skip reason is written in, in order: 2,048 characters, more than any reason amiflow
/// gives (a stack name is at most 128), and 8 of the group's 50 tags.
pub const REASON_TAGS: [&str; 8] = [
    REASON_TAG,
    "amiflow:refresh-reason-2",
    "amiflow:refresh-reason-3",
    "amiflow:refresh-reason-4",
    "amiflow:refresh-reason-5",
    "amiflow:refresh-reason-6",
    "amiflow:refresh-reason-7",
    "amiflow:refresh-reason-8",
];

/// Where the marked refresh stands: running, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkState {
    InProgress,
    Succeeded,
    RolledBack,
    Cancelled,
    Failed,
    /// Not started: the request was skipped (a stack-owned group the policy or the stack's
    /// template keeps from being refreshed), with the reason in [`REASON_TAG`].
    Skipped,
}

impl MarkState {
    /// The state as the tags hold it.
    pub fn as_str(self) -> &'static str {
        match self {
            MarkState::InProgress => "in-progress",
            MarkState::Succeeded => "succeeded",
            MarkState::RolledBack => "rolled-back",
            MarkState::Cancelled => "cancelled",
            MarkState::Failed => "failed",
            MarkState::Skipped => "skipped",
        }
    }

    /// The state a tag value names; `None` for anything amiflow never writes.
    pub fn parse(value: &str) -> Option<Self> {
        [
            MarkState::InProgress,
            MarkState::Succeeded,
            MarkState::RolledBack,
            MarkState::Cancelled,
            MarkState::Failed,
            MarkState::Skipped,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
    }

    /// How the marked refresh ended; `None` while it runs.
    pub fn outcome(self) -> Option<Outcome> {
        Some(match self {
            MarkState::InProgress => return None,
            MarkState::Succeeded => Outcome::Succeeded,
            MarkState::RolledBack => Outcome::RolledBack,
            MarkState::Cancelled => Outcome::Cancelled,
            MarkState::Failed => Outcome::Failed,
            MarkState::Skipped => Outcome::Skipped,
        })
    }
}

impl From<Outcome> for MarkState {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Succeeded => MarkState::Succeeded,
            Outcome::RolledBack => MarkState::RolledBack,
            Outcome::Cancelled => MarkState::Cancelled,
            Outcome::Failed => MarkState::Failed,
            Outcome::Skipped => MarkState::Skipped,
            // A halted request starts nothing and writes no mark; were one written, it would be
            // a request that did not start, as a skip is.
            Outcome::Halted => MarkState::Skipped,
            // A recalled request starts nothing; a running refresh to a recalled AMI is
            // cancelled, and its mark says so.
            Outcome::Recalled => MarkState::Cancelled,
        }
    }
}

impl fmt::Display for MarkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A group's refresh mark, parsed from [`REFRESH_TAG`].
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub ami: String,
    pub state: MarkState,
    /// The instance refresh's id (`-` for a skip, which started none).
    pub refresh_id: String,
    /// The request's window, as [`deadline_text`] writes it.
    pub deadline: String,
    pub parameter: String,
}

impl Mark {
    pub fn is_running(&self) -> bool {
        self.state == MarkState::InProgress
    }

    /// The same refresh, now ended with `outcome`.
    pub fn ended(&self, outcome: Outcome) -> Mark {
        Mark {
            state: outcome.into(),
            ..self.clone()
        }
    }

    /// The end of the mark's window, if it has one.
    pub fn deadline_time(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.deadline)
            .ok()
            .map(|d| d.to_utc())
    }

    fn render(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.ami, self.state, self.refresh_id, self.deadline, self.parameter
        )
    }

    /// The tags that write this mark, in the order they are written, with `reason` for a skip,
    /// split over [`REASON_TAGS`] (cut only beyond all of them).
    pub fn tags(&self, reason: Option<&str>) -> Vec<(&'static str, String)> {
        let mut tags = vec![
            (REFRESH_TAG, self.render()),
            (STATE_TAG, self.state.as_str().to_owned()),
        ];
        if let Some(reason) = reason {
            let chars: Vec<char> = reason.chars().collect();
            let parts: Vec<String> = chars
                .chunks(TAG_VALUE_MAX)
                .take(REASON_TAGS.len())
                .map(|part| part.iter().collect())
                .collect();
            let full = parts
                .last()
                .is_none_or(|p| p.chars().count() == TAG_VALUE_MAX);
            let n = parts.len();
            tags.extend(REASON_TAGS.iter().copied().zip(parts));
            // A reason that fills its last part exactly: an empty part after it ends it, so a
            // longer earlier reason's next part is not read as its continuation.
            if full && n < REASON_TAGS.len() {
                tags.push((REASON_TAGS[n], String::new()));
            }
        }
        tags
    }
}

/// A group's mark with the reason of a skip, as a store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub mark: Mark,
    /// Why the request for the mark's AMI was skipped (only meaningful for a skip).
    pub reason: Option<String>,
}

/// A mark kept in an SSM parameter: the group it belongs to (the parameter's name may not say it
/// verbatim), [`REFRESH_TAG`]'s value, the state alone and the whole reason (a parameter holds
/// 4 KB, so the reason is not split).
#[derive(serde::Serialize, serde::Deserialize)]
struct ParameterMark {
    group: String,
    refresh: String,
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl Record {
    /// The record in a group's tags ([`mark_of`] and [`skip_reason`]).
    pub fn of_tags(group: &Group) -> Option<Record> {
        Some(Record {
            mark: mark_of(group)?,
            reason: skip_reason(group),
        })
    }

    /// The value of the SSM parameter that keeps `group`'s record:
    /// `{"group": .., "refresh": "<REFRESH_TAG value>", "state": .., "reason": ..}`.
    /// The reason is kept to what the tags keep (cut only beyond [`REASON_TAGS`]), and shortened
    /// further only if the value would pass a standard parameter's 4 KB.
    pub fn parameter_value(&self, group: &str) -> String {
        let mut reason: Option<Vec<char>> = self
            .reason
            .as_ref()
            .map(|r| r.chars().take(REASON_TAGS.len() * TAG_VALUE_MAX).collect());
        loop {
            let kept = ParameterMark {
                group: group.to_owned(),
                refresh: self.mark.render(),
                state: self.mark.state.as_str().to_owned(),
                reason: reason.as_ref().map(|r| r.iter().collect()),
            };
            let value = serde_json::to_string(&kept).expect("a mark serialises");
            match &mut reason {
                Some(r) if value.len() > PARAMETER_VALUE_MAX && !r.is_empty() => {
                    r.truncate(r.len().saturating_sub(64));
                }
                _ => return value,
            }
        }
    }

    /// The group and record a parameter value holds; `None` for anything amiflow never writes
    /// (the state alone must agree with the mark's, as the tags do).
    pub fn of_parameter_value(value: &str) -> Option<(String, Record)> {
        let kept: ParameterMark = serde_json::from_str(value).ok()?;
        let mark = parse_mark(&kept.refresh)?;
        if MarkState::parse(&kept.state)? != mark.state {
            return None;
        }
        Some((
            kept.group,
            Record {
                mark,
                reason: kept.reason,
            },
        ))
    }
}

/// The group's mark, if its tags carry one amiflow wrote.
pub fn mark_of(group: &Group) -> Option<Mark> {
    parse_mark(group.tags.get(REFRESH_TAG)?)
}

/// A mark from [`REFRESH_TAG`]'s encoding.
fn parse_mark(value: &str) -> Option<Mark> {
    let parts: Vec<&str> = value.splitn(5, '|').collect();
    let [ami, state, refresh_id, deadline, parameter] = parts[..] else {
        return None;
    };
    Some(Mark {
        ami: ami.into(),
        state: MarkState::parse(state)?,
        refresh_id: refresh_id.into(),
        deadline: deadline.into(),
        parameter: parameter.into(),
    })
}

/// Why the request for the group's marked AMI was skipped, as the refresh-worker wrote it in the
/// group's tags: the parts of [`REASON_TAGS`] up to the first one that is not full.
pub fn skip_reason(group: &Group) -> Option<String> {
    let mut reason = group.tags.get(REASON_TAG)?.clone();
    let mut last = reason.chars().count();
    for tag in &REASON_TAGS[1..] {
        if last != TAG_VALUE_MAX {
            break;
        }
        let Some(part) = group.tags.get(*tag) else {
            break;
        };
        last = part.chars().count();
        reason.push_str(part);
    }
    Some(reason)
}

/// A request's window as a mark holds it: its end to the second, or `-` for none.
pub fn deadline_text(d: Option<DateTime<Utc>>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::LaunchSource;

    fn group_tagged(tags: &[(&'static str, String)]) -> Group {
        Group {
            name: "web".into(),
            source: LaunchSource::None,
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            instance_ids: Vec::new(),
            launched_from: Default::default(),
        }
    }

    /// The wire format deployed groups carry: read and written the same way.
    #[test]
    fn the_tags_keep_their_wire_format_and_read_back() {
        let mark = Mark {
            ami: "ami-0000000000000000b".into(),
            state: MarkState::RolledBack,
            refresh_id: "ir-1".into(),
            deadline: deadline_text(Some(
                DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
                    .unwrap()
                    .to_utc(),
            )),
            parameter: "/golden/al2023/ami-id".into(),
        };
        let tags = mark.tags(None);
        assert_eq!(
            tags,
            vec![
                (
                    "amiflow:refresh",
                    "ami-0000000000000000b|rolled-back|ir-1|2026-12-01T10:00:00Z|/golden/al2023/ami-id"
                        .to_owned()
                ),
                ("amiflow:refresh-state", "rolled-back".to_owned()),
            ]
        );
        assert_eq!(mark_of(&group_tagged(&tags)), Some(mark.clone()));
        assert_eq!(
            mark.deadline_time().map(|d| d.to_rfc3339()),
            Some("2026-12-01T10:00:00+00:00".into())
        );
        assert_eq!(deadline_text(None), "-");
    }

    #[test]
    fn every_state_reads_back_and_ended_states_are_their_outcome() {
        for outcome in [
            Outcome::Succeeded,
            Outcome::RolledBack,
            Outcome::Cancelled,
            Outcome::Failed,
            Outcome::Skipped,
        ] {
            let state = MarkState::from(outcome);
            assert_eq!(MarkState::parse(state.as_str()), Some(state));
            assert_eq!(state.outcome(), Some(outcome));
            // The tag says what the event says.
            assert_eq!(state.as_str(), outcome.as_str());
        }
        assert_eq!(MarkState::parse("in-progress"), Some(MarkState::InProgress));
        assert_eq!(MarkState::InProgress.outcome(), None);
        assert_eq!(MarkState::parse("done"), None);
    }

    #[test]
    fn a_long_skip_reason_is_kept_whole_over_numbered_tags() {
        let mark = Mark {
            ami: "ami-0000000000000000b".into(),
            state: MarkState::Skipped,
            refresh_id: "-".into(),
            deadline: "-".into(),
            parameter: "/golden/al2023/ami-id".into(),
        };
        // Words, so a cut mid-word would show; more than two tag values.
        let long: String = (0..70).map(|i| format!("word{i:03} ")).collect();
        assert_eq!(long.len(), 560);
        let tags = mark.tags(Some(&long));
        let names: Vec<&str> = tags[2..].iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "amiflow:refresh-reason",
                "amiflow:refresh-reason-2",
                "amiflow:refresh-reason-3"
            ]
        );
        assert!(tags[2..].iter().all(|(_, v)| v.chars().count() <= 256));
        assert_eq!(
            skip_reason(&group_tagged(&tags)).as_deref(),
            Some(&long[..])
        );

        // A shorter reason written over it: the earlier parts left on the group are not read.
        let mut group = group_tagged(&tags);
        for (k, v) in mark.tags(Some("owned by stack app; the policy leaves stacks alone")) {
            group.tags.insert(k.to_owned(), v);
        }
        assert_eq!(
            skip_reason(&group).as_deref(),
            Some("owned by stack app; the policy leaves stacks alone")
        );
        // One that fills its part exactly is ended by an empty part.
        let exact = "y".repeat(256);
        let written = mark.tags(Some(&exact));
        assert_eq!(written[3], ("amiflow:refresh-reason-2", String::new()));
        let mut group = group_tagged(&tags);
        for (k, v) in written {
            group.tags.insert(k.to_owned(), v);
        }
        assert_eq!(skip_reason(&group), Some(exact));
        // A reason written before the parts existed (one tag) reads as it was.
        let old = group_tagged(&[(REASON_TAG, "the policy leaves stacks alone".to_owned())]);
        assert_eq!(
            skip_reason(&old).as_deref(),
            Some("the policy leaves stacks alone")
        );
    }

    /// The parameter a stack-owned group's mark is kept in: the same mark, the state alone, the
    /// whole reason, and the group it belongs to.
    #[test]
    fn a_record_reads_back_from_its_parameter_value() {
        let record = Record {
            mark: Mark {
                ami: "ami-0000000000000000b".into(),
                state: MarkState::Skipped,
                refresh_id: "-".into(),
                deadline: "2026-12-01T10:00:00Z".into(),
                parameter: "/golden/al2023/ami-id".into(),
            },
            reason: Some("x".repeat(600)),
        };
        let value = record.parameter_value("app web");
        let json: serde_json::Value = serde_json::from_str(&value).unwrap();
        assert_eq!(
            (json["group"].as_str(), json["state"].as_str()),
            (Some("app web"), Some("skipped"))
        );
        assert_eq!(
            json["refresh"],
            "ami-0000000000000000b|skipped|-|2026-12-01T10:00:00Z|/golden/al2023/ami-id"
        );
        assert_eq!(
            Record::of_parameter_value(&value),
            Some(("app web".to_owned(), record.clone()))
        );
        // A state that disagrees with the mark's, or no mark at all: not amiflow's.
        let mut forged = json.clone();
        forged["state"] = "in-progress".into();
        assert_eq!(Record::of_parameter_value(&forged.to_string()), None);
        assert_eq!(Record::of_parameter_value("ami-0000000000000000b"), None);
        // A reason of many-byte characters is cut to fit a standard parameter's 4 KB.
        let wide = Record {
            reason: Some("\u{1F600}".repeat(2000)),
            ..record
        };
        let value = wide.parameter_value("web");
        assert!(value.len() <= 4096, "{}", value.len());
        let (_, back) = Record::of_parameter_value(&value).unwrap();
        assert!(back.reason.unwrap().chars().count() > 500);
    }

    #[test]
    fn a_malformed_mark_is_no_mark() {
        let short = [(REFRESH_TAG, "ami-0000000000000000b|in-progress".to_owned())];
        assert_eq!(mark_of(&group_tagged(&short)), None);
        assert_eq!(mark_of(&group_tagged(&[])), None);
    }
}
