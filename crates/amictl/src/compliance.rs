//! Compliance of one account, computed from AWS itself: each golden parameter's value, and every
//! group judged the way the plan-worker judges it (`rollout::plan::judge_all`), plus what the
//! refresh-worker's `amiflow:refresh` mark says about a refresh in flight or one that ended badly.

use anyhow::{Context, Result};
use aws_config::SdkConfig;
use rollout::aws::{AwsGroups, LaunchSource, Parameters, SsmParameters};
use rollout::discovery::Verdict;
use rollout::policy::{Policy, Stage};
use rollout::refresh::mark_of;
use serde::Serialize;

/// Where one group stands against its golden parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupState {
    /// Configuration and every instance on the parameter's AMI.
    Current,
    /// On an earlier golden AMI, nothing in flight.
    Stale,
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
    /// Instances not running the golden parameter's current AMI (0 for untouched groups).
    pub instances_off_golden: usize,
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
    let mut out = Vec::new();
    for j in judged {
        let target = j
            .parameter
            .as_ref()
            .and_then(|p| parameters.iter().find(|s| &s.name == p))
            .and_then(|s| s.ami.clone());
        let mark = mark_of(&j.group.group).filter(|m| Some(&m.ami) == target.as_ref());
        let instances = j.group.group.instance_ids.len();
        let (state, reason) = match &j.verdict {
            Verdict::Untouched(why) => (GroupState::Untouched, why.clone()),
            Verdict::Skipped(why) => (GroupState::Skipped, why.clone()),
            _ if !j.needs_refresh() => (GroupState::Current, String::new()),
            _ => match (
                &j.group.group.source,
                mark.as_ref().map(|m| m.state.as_str()),
            ) {
                (_, Some("in-progress")) => (
                    GroupState::Refreshing,
                    format!("instance refresh {}", mark.as_ref().unwrap().refresh_id),
                ),
                (_, Some("rolled-back")) => (
                    GroupState::RolledBack,
                    "the last refresh to this AMI was rolled back".into(),
                ),
                (_, Some("failed")) => (
                    GroupState::Failed,
                    "the last refresh to this AMI failed".into(),
                ),
                (_, Some("skipped")) => (
                    GroupState::Skipped,
                    j.group
                        .group
                        .tags
                        .get(rollout::refresh::REASON_TAG)
                        .cloned()
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
        let instances_off_golden = match state {
            GroupState::Untouched => 0,
            GroupState::Current => j.lagging_instances,
            _ if j.verdict == Verdict::Current => j.lagging_instances,
            _ => instances,
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
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(AccountCompliance {
        account: stage.account.clone(),
        stage: stage.name.clone(),
        parameters,
        groups: out,
    })
}
