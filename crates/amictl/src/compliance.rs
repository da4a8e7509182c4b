//! Compliance of one account, computed from AWS itself: each golden parameter's value, and every
//! group judged the way the plan-worker judges it (`rollout::plan::judge_all`), plus what the
//! refresh-worker's mark says about a refresh in flight or one that ended badly (read through
//! `rollout::aws::Marks`: a group's tags, or a stack-owned group's SSM parameter).

use std::collections::HashMap;

use anyhow::{Context, Result};
use aws_config::SdkConfig;
use rollout::aws::{AwsGroups, LaunchSource, Marks, Parameters, SsmParameters};
use rollout::discovery::Verdict;
use rollout::mark::MarkState;
use rollout::policy::{Policy, Stage};
use serde::Serialize;

/// Where one group stands against its golden parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupState {
    /// Configuration and every instance on the parameter's AMI.
    Current,
    /// On an earlier golden AMI, nothing in flight.
    Stale,
    /// On an earlier golden AMI while the stage's window is open (refreshes of it run): waiting
    /// for one of the stage's refresh slots.
    Queued,
    /// An amiflow instance refresh to the current AMI is running.
    Refreshing,
    /// The last refresh to the current AMI failed.
    Failed,
    /// The last refresh to the current AMI was rolled back.
    RolledBack,
    /// Deliberately not refreshed (skip tag, launch configuration).
    Skipped,
    /// Not a group of any golden family.
    Untouched,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Current => "current",
            GroupState::Stale => "stale",
            GroupState::Queued => "queued",
            GroupState::Refreshing => "refreshing",
            GroupState::Failed => "failed",
            GroupState::RolledBack => "rolled-back",
            GroupState::Skipped => "skipped",
            GroupState::Untouched => "untouched",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub parameter: Option<String>,
    pub ami: Option<String>,
    pub state: GroupState,
    pub reason: String,
    pub instances: usize,
    /// Whether the plan-worker asks for a refresh of this group now.
    pub needs_refresh: bool,
    /// Instances not running the golden parameter's current AMI (0 for untouched groups),
    /// counted from the instances themselves whatever the group's state: a skipped group whose
    /// instances run the golden AMI has none.
    pub instances_off_golden: usize,
    /// The group's instances by the AMI each runs.
    pub instances_by_ami: InstanceCounts,
    /// Each instance (id) with the AMI it runs (`None` when it could not be read), as counted in
    /// `instances_by_ami`; for `amictl report`, not part of `status --json`.
    #[serde(skip)]
    pub instance_amis: Vec<(String, Option<String>)>,
    /// The refresh-worker's last mark on the group, whatever AMI it is for (the `state` above
    /// only reads a mark for the current golden AMI); for `amictl report`.
    #[serde(skip)]
    pub last_mark: Option<rollout::mark::Record>,
}

/// What an instance's AMI is to its group's golden parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AmiClass {
    /// The parameter's current AMI.
    Golden,
    /// The value the parameter held before the current one.
    PreviousGolden,
    /// Any earlier value of the parameter.
    OlderGolden,
    /// Anything else (see [`InstanceCounts::other`]).
    Other,
}

impl AmiClass {
    pub fn as_str(self) -> &'static str {
        match self {
            AmiClass::Golden => "golden",
            AmiClass::PreviousGolden => "previous-golden",
            AmiClass::OlderGolden => "older-golden",
            AmiClass::Other => "other",
        }
    }

    /// Judge `ami` against a parameter's `history` (oldest first, the current value last).
    pub fn of(ami: Option<&String>, history: &[String]) -> Self {
        let current = history.last();
        let previous = history.iter().rev().find(|h| Some(*h) != current);
        match ami {
            Some(a) if Some(a) == current => AmiClass::Golden,
            Some(a) if Some(a) == previous => AmiClass::PreviousGolden,
            Some(a) if history.contains(a) => AmiClass::OlderGolden,
            _ => AmiClass::Other,
        }
    }
}

/// Instances counted by the AMI they run, against their group's golden parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InstanceCounts {
    /// The parameter's current AMI.
    pub golden: usize,
    /// The value the parameter held before the current one.
    pub previous_golden: usize,
    /// Any earlier value of the parameter.
    pub older_golden: usize,
    /// Anything else: another family's AMI, an AMI never published, or an instance whose AMI
    /// could not be read (every instance of a group that is none of ours).
    pub other: usize,
}

impl InstanceCounts {
    /// Count `amis` (one per instance) against a parameter's `history` (oldest first, the
    /// current value last).
    fn of<'a>(amis: impl IntoIterator<Item = Option<&'a String>>, history: &[String]) -> Self {
        let mut counts = InstanceCounts::default();
        for ami in amis {
            *match AmiClass::of(ami, history) {
                AmiClass::Golden => &mut counts.golden,
                AmiClass::PreviousGolden => &mut counts.previous_golden,
                AmiClass::OlderGolden => &mut counts.older_golden,
                AmiClass::Other => &mut counts.other,
            } += 1;
        }
        counts
    }

    /// The instances counted as `class`.
    pub fn of_class(&self, class: AmiClass) -> usize {
        match class {
            AmiClass::Golden => self.golden,
            AmiClass::PreviousGolden => self.previous_golden,
            AmiClass::OlderGolden => self.older_golden,
            AmiClass::Other => self.other,
        }
    }

    /// The sum of two counts.
    pub fn plus(self, other: InstanceCounts) -> Self {
        InstanceCounts {
            golden: self.golden + other.golden,
            previous_golden: self.previous_golden + other.previous_golden,
            older_golden: self.older_golden + other.older_golden,
            other: self.other + other.other,
        }
    }

    pub fn total(&self) -> usize {
        self.golden + self.previous_golden + self.older_golden + self.other
    }

    fn off_golden(&self) -> usize {
        self.previous_golden + self.older_golden + self.other
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ParameterStatus {
    pub name: String,
    pub ami: Option<String>,
    pub version: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccountCompliance {
    pub account: String,
    pub stage: String,
    pub parameters: Vec<ParameterStatus>,
    pub groups: Vec<GroupStatus>,
    /// Each golden parameter's history (oldest first, the current value last), which every
    /// instance was judged against; for `amictl report`.
    #[serde(skip)]
    pub histories: HashMap<String, Vec<String>>,
}

impl AccountCompliance {
    pub fn count(&self, state: GroupState) -> usize {
        self.groups.iter().filter(|g| g.state == state).count()
    }

    pub fn instances_off_golden(&self) -> usize {
        self.groups.iter().map(|g| g.instances_off_golden).sum()
    }
}

/// Judge every group of `stage`'s account, acting with `config` in that account.
pub async fn account(
    config: &SdkConfig,
    policy: &Policy,
    stage: &Stage,
) -> Result<AccountCompliance> {
    let groups = AwsGroups::new(config);
    let params = SsmParameters(aws_sdk_ssm::Client::new(config));
    let mut parameters = Vec::new();
    for family in &policy.families {
        let value = params
            .get(&family.parameter_name)
            .await
            .with_context(|| format!("reading {} in {}", family.parameter_name, stage.account))?;
        parameters.push(ParameterStatus {
            name: family.parameter_name.clone(),
            ami: value.as_ref().map(|v| v.value.clone()),
            version: value.map(|v| v.version),
        });
    }
    let judged = rollout::plan::judge_all(&groups, &params, policy, stage)
        .await
        .with_context(|| format!("reading the Auto Scaling groups of {}", stage.account))?;
    // Every instance's own AMI (one batched DescribeInstances) and every family's history: an
    // instance counts by what it runs, not by what its group's configuration says.
    let mut histories = HashMap::new();
    for family in &policy.families {
        let mut history = params
            .history(&family.parameter_name)
            .await
            .with_context(|| format!("reading the history of {}", family.parameter_name))?;
        // The current value last, even if the history read lags the value read.
        if let Some(current) = parameters
            .iter()
            .find(|p| p.name == family.parameter_name)
            .and_then(|p| p.ami.clone())
            && history.last() != Some(&current)
        {
            history.push(current);
        }
        histories.insert(family.parameter_name.clone(), history);
    }
    // Each instance's AMI: from Auto Scaling's record where it is exact, else read.
    let instance_amis: HashMap<String, String> =
        rollout::plan::instances_of(&groups, judged.iter().map(|j| &j.group), false)
            .await
            .with_context(|| format!("reading the instances of {}", stage.account))?
            .into_iter()
            .map(|(id, i)| (id, i.image))
            .collect();
    let marks = Marks::new(&groups, &params);
    let mut out = Vec::new();
    for j in judged {
        let target = j
            .parameter
            .as_ref()
            .and_then(|p| parameters.iter().find(|s| &s.name == p))
            .and_then(|s| s.ami.clone());
        let last_mark = marks
            .read(&j.group.group)
            .await
            .with_context(|| format!("reading the mark of {}", j.group.group.name))?;
        let record = last_mark
            .clone()
            .filter(|r| Some(&r.mark.ami) == target.as_ref());
        let mark = record.as_ref().map(|r| &r.mark);
        let instances = j.group.group.instance_ids.len();
        let (state, reason) = match &j.verdict {
            Verdict::Untouched(why) => (GroupState::Untouched, why.clone()),
            Verdict::Skipped(why) => (GroupState::Skipped, why.clone()),
            Verdict::Broken(why) => (GroupState::Failed, why.clone()),
            _ if !j.needs_refresh() => (GroupState::Current, String::new()),
            _ => match (&j.group.group.source, mark.map(|m| m.state)) {
                (_, Some(MarkState::InProgress)) => (
                    GroupState::Refreshing,
                    format!("instance refresh {}", mark.unwrap().refresh_id),
                ),
                (_, Some(MarkState::RolledBack)) => (
                    GroupState::RolledBack,
                    "the last refresh to this AMI was rolled back".into(),
                ),
                (_, Some(MarkState::Failed)) => (
                    GroupState::Failed,
                    "the last refresh to this AMI failed".into(),
                ),
                (_, Some(MarkState::Skipped)) => (
                    GroupState::Skipped,
                    record
                        .as_ref()
                        .and_then(|r| r.reason.clone())
                        .unwrap_or_else(|| "the refresh-worker skipped it".into()),
                ),
                (LaunchSource::LaunchConfiguration(name), _) => (
                    GroupState::Skipped,
                    format!(
                        "uses launch configuration {name}, which cannot be updated; migrate it to a launch template"
                    ),
                ),
                _ => (GroupState::Stale, "on an earlier golden AMI".into()),
            },
        };
        let no_history = Vec::new();
        let amis: Vec<(String, Option<String>)> = j
            .group
            .group
            .instance_ids
            .iter()
            .map(|id| (id.clone(), instance_amis.get(id).cloned()))
            .collect();
        let instances_by_ami = InstanceCounts::of(
            amis.iter().map(|(_, ami)| ami.as_ref()),
            j.parameter
                .as_ref()
                .and_then(|p| histories.get(p))
                .unwrap_or(&no_history),
        );
        let instances_off_golden = match state {
            GroupState::Untouched => 0,
            _ => instances_by_ami.off_golden(),
        };
        out.push(GroupStatus {
            name: j.group.group.name.clone(),
            parameter: j.parameter.clone(),
            ami: j.group.ami.clone(),
            state,
            reason,
            instances,
            needs_refresh: j.parameter.is_some() && j.needs_refresh(),
            instances_off_golden,
            instances_by_ami,
            instance_amis: amis,
            last_mark,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    queue(&mut out, &parameters, stage, chrono::Utc::now());
    Ok(AccountCompliance {
        account: stage.account.clone(),
        stage: stage.name.clone(),
        parameters,
        groups: out,
        histories,
    })
}

/// While a refresh of the stage runs to its window's end (its in-progress mark names the
/// deadline), the window is open: a stale group whose golden AMI is that refresh's waits for one
/// of the stage's refresh slots.
fn queue(
    groups: &mut [GroupStatus],
    parameters: &[ParameterStatus],
    stage: &Stage,
    now: chrono::DateTime<chrono::Utc>,
) {
    // The slots in use, and the window each golden AMI is being rolled out in: open until then.
    let mut in_use = 0;
    let mut open: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for m in groups
        .iter()
        .filter(|g| g.state == GroupState::Refreshing)
        .filter_map(|g| g.last_mark.as_ref().map(|r| &r.mark))
    {
        in_use += 1;
        if let Some(closes) = m.deadline_time().filter(|c| *c > now) {
            let at = open.entry(m.ami.clone()).or_insert(closes);
            *at = (*at).max(closes);
        }
    }
    let golden = |parameter: &str| {
        parameters
            .iter()
            .find(|p| p.name == parameter)
            .and_then(|p| p.ami.clone())
    };
    for g in groups.iter_mut().filter(|g| g.state == GroupState::Stale) {
        let Some(closes) = g
            .parameter
            .as_deref()
            .and_then(golden)
            .and_then(|ami| open.get(&ami).copied())
        else {
            continue;
        };
        g.state = GroupState::Queued;
        g.reason = format!(
            "waiting for one of the stage's {} refresh slots ({in_use} in use) in the window open until {}",
            stage.max_concurrent_refreshes,
            closes.to_rfc3339()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, state: GroupState, mark: Option<(&str, MarkState, &str)>) -> GroupStatus {
        GroupStatus {
            name: name.into(),
            parameter: Some("/golden/al2023/ami-id".into()),
            ami: Some("ami-09".into()),
            state,
            reason: "on an earlier golden AMI".into(),
            instances: 2,
            needs_refresh: true,
            instances_off_golden: 2,
            instances_by_ami: InstanceCounts::default(),
            instance_amis: Vec::new(),
            last_mark: mark.map(|(ami, state, deadline)| rollout::mark::Record {
                mark: rollout::mark::Mark {
                    ami: ami.into(),
                    state,
                    refresh_id: "r-1".into(),
                    deadline: deadline.into(),
                    parameter: "/golden/al2023/ami-id".into(),
                },
                reason: None,
            }),
        }
    }

    /// A stale group is queued while a refresh to its golden AMI runs in a window still open,
    /// with the slots in use; before the window, after it, or for another AMI it stays stale.
    #[test]
    fn a_stale_group_waits_for_a_slot_while_its_window_is_open() {
        let policy = Policy::parse(include_str!("../../../local/amiflow.toml")).unwrap();
        let stage = &policy.stages[0];
        let parameters = [ParameterStatus {
            name: "/golden/al2023/ami-id".into(),
            ami: Some("ami-10".into()),
            version: Some(3),
        }];
        let now = chrono::Utc::now();
        let closes = (now + chrono::Duration::hours(2)).to_rfc3339();
        let closed = (now - chrono::Duration::hours(2)).to_rfc3339();
        let groups = |deadline: &str, ami: &str| {
            vec![
                group(
                    "a",
                    GroupState::Refreshing,
                    Some((ami, MarkState::InProgress, deadline)),
                ),
                group("b", GroupState::Stale, None),
            ]
        };
        let mut open = groups(&closes, "ami-10");
        queue(&mut open, &parameters, stage, now);
        assert_eq!(open[1].state, GroupState::Queued);
        assert_eq!(
            open[1].reason,
            format!(
                "waiting for one of the stage's {} refresh slots (1 in use) in the window open until {}",
                stage.max_concurrent_refreshes,
                chrono::DateTime::parse_from_rfc3339(&closes)
                    .unwrap()
                    .to_utc()
                    .to_rfc3339()
            )
        );
        for (deadline, ami) in [(closed.as_str(), "ami-10"), (closes.as_str(), "ami-11")] {
            let mut not_open = groups(deadline, ami);
            queue(&mut not_open, &parameters, stage, now);
            assert_eq!(not_open[1].state, GroupState::Stale, "{deadline} {ami}");
        }
    }

    #[test]
    fn instances_count_by_the_ami_they_run() {
        let history: Vec<String> = ["ami-08", "ami-09", "ami-10", "ami-09", "ami-11"]
            .map(String::from)
            .to_vec();
        let amis = ["ami-11", "ami-11", "ami-10", "ami-09", "ami-08", "ami-win"].map(String::from);
        let counts = InstanceCounts::of(amis.iter().map(Some).chain([None]), &history);
        assert_eq!(
            counts,
            InstanceCounts {
                golden: 2,
                // ami-09 was set again after ami-10: ami-09 is the value before the current one.
                previous_golden: 1,
                older_golden: 2,
                other: 2,
            }
        );
        assert_eq!(counts.off_golden(), 5);
        // Without a family, every instance is another family's.
        assert_eq!(InstanceCounts::of(amis.iter().map(Some), &[]).other, 6);
    }
}
