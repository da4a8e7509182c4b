//! plan-worker (spoke): level-triggered reconciliation. Compares the golden parameters' current
//! values (desired) with every group's effective AMI (actual) and asks for one refresh per stale
//! group. Runs on `ParamUpdated` (unless the stage waits for its window) and on
//! `RolloutWindowOpened`, so a refresh that failed or was missed is retried next window without
//! anyone replaying events.

use chrono::{DateTime, Utc};
use events::{AsgRefreshRequested, Detail, Strategy};
use runtime::StepError;

use crate::aws::{Groups, Parameters};
use crate::discovery::{GroupAmi, Resolver, Verdict, verdict};
use crate::policy::{Policy, Stage};
use crate::refresh::{STACK_TAG, mark_of};

/// One group's standing, for logs and `amictl status`.
#[derive(Debug, Clone)]
pub struct Judged {
    pub group: GroupAmi,
    pub parameter: Option<String>,
    pub verdict: Verdict,
    /// Instances of a `Current` group still running another AMI (a `resolve:ssm:` template or a
    /// stack re-resolved the configuration, but nothing replaced the instances yet).
    pub lagging_instances: usize,
}

impl Judged {
    /// Stale by configuration, or current by configuration with instances left behind.
    pub fn needs_refresh(&self) -> bool {
        self.verdict == Verdict::Stale
            || (self.verdict == Verdict::Current && self.lagging_instances > 0)
    }
}

/// Judge every group of the account against every family.
pub async fn judge_all(
    groups: &impl Groups,
    params: &impl Parameters,
    policy: &Policy,
    stage: &Stage,
) -> Result<Vec<Judged>, StepError> {
    let mut families = Vec::new();
    for f in &policy.families {
        if let Some(current) = params.get(&f.parameter_name).await? {
            let history = params.history(&f.parameter_name).await?;
            families.push((f.parameter_name.clone(), current.value, history));
        }
    }
    let mut resolver = Resolver::default();
    let mut judged = Vec::new();
    for group in groups.list().await? {
        let g = resolver.resolve(groups, params, group).await?;
        let mut found = None;
        for (name, current, history) in &families {
            match verdict(&g, current, history, &stage.skip_tag) {
                Verdict::Untouched(_) => {}
                v => {
                    found = Some((name.clone(), v));
                    break;
                }
            }
        }
        let (parameter, verdict) = match found {
            Some((name, v)) => (Some(name), v),
            None => (None, verdict(&g, "", &[], &stage.skip_tag)),
        };
        judged.push(Judged {
            group: g,
            parameter,
            verdict,
            lagging_instances: 0,
        });
    }
    // One batched DescribeInstances for every group whose configuration is already current.
    let ids: Vec<String> = judged
        .iter()
        .filter(|j| j.parameter.is_some() && j.verdict == Verdict::Current)
        .flat_map(|j| j.group.group.instance_ids.iter().cloned())
        .collect();
    if !ids.is_empty() {
        let images = groups.instance_images(&ids).await?;
        for j in judged
            .iter_mut()
            .filter(|j| j.parameter.is_some() && j.verdict == Verdict::Current)
        {
            j.lagging_instances = j
                .group
                .group
                .instance_ids
                .iter()
                .filter(|id| {
                    images
                        .get(*id)
                        .is_some_and(|ami| Some(ami) != j.group.ami.as_ref())
                })
                .count();
        }
    }
    for j in &judged {
        tracing::debug!(group = %j.group.group.name, ami = ?j.group.ami, source = ?j.group.source,
            verdict = ?j.verdict, lagging = j.lagging_instances, "judged");
    }
    Ok(judged)
}

/// Emit one `AsgRefreshRequested` per stale group not already refreshing to the same AMI.
pub async fn plan(
    caused_by: &str,
    account: &str,
    deadline: Option<DateTime<Utc>>,
    groups: &impl Groups,
    params: &impl Parameters,
    policy: &Policy,
    stage: &Stage,
) -> Result<Vec<Detail>, StepError> {
    let mut requests = Vec::new();
    for j in judge_all(groups, params, policy, stage).await? {
        let Some(parameter) = &j.parameter else {
            continue;
        };
        if !j.needs_refresh() {
            if let Verdict::Skipped(reason) = &j.verdict {
                tracing::info!(group = %j.group.group.name, %reason, "group skipped");
            }
            continue;
        }
        let Some(target) = params.get(parameter).await?.map(|p| p.value) else {
            continue;
        };
        if mark_of(&j.group.group).is_some_and(|m| m.ami == target && m.state == "in-progress") {
            continue;
        }
        let strategy = if j.group.group.tags.contains_key(STACK_TAG) {
            Strategy::Cloudformation
        } else {
            Strategy::LaunchTemplate
        };
        requests.push(
            AsgRefreshRequested::new(
                caused_by,
                account,
                &j.group.group.name,
                parameter,
                &target,
                strategy,
                deadline,
            )
            .into(),
        );
    }
    Ok(requests)
}
