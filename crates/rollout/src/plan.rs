//! plan-worker (spoke): level-triggered reconciliation. Compares the golden parameters' current
//! values (desired) with every group's effective AMI (actual) and asks for one refresh per stale
//! group. Runs on `ParamUpdated` (unless the stage waits for its window) and on
//! `RolloutWindowOpened`, so a refresh that failed or was missed is retried next window without
//! anyone replaying events.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use events::{AsgRefreshRequested, Detail, Strategy};
use runtime::StepError;

use crate::aws::{Group, Groups, Instance, Marks, Parameters, STACK_TAG};
use crate::control::Recalls;
use crate::discovery::{GroupAmi, Resolver, Verdict, verdict};
use crate::mark::Mark;
use crate::policy::{Policy, Stage};

/// One group's standing, for logs and `amictl status`.
#[derive(Debug, Clone)]
pub struct Judged {
    pub group: GroupAmi,
    pub parameter: Option<String>,
    pub verdict: Verdict,
    /// Instances of a `Current` group still running another AMI (a `resolve:ssm:` template or a
    /// stack re-resolved the configuration, but nothing replaced the instances yet).
    pub lagging_instances: usize,
    /// When the last of the group's instances running its configured AMI was launched (read for
    /// `Current` groups only): a stage's bake counts from the last of these.
    pub last_launch: Option<DateTime<Utc>>,
    /// The refresh-worker's mark on a group of a family, wherever it is kept (tags, or SSM for a
    /// stack-owned group: one `GetParameter` each).
    pub mark: Option<Mark>,
}

impl Judged {
    /// Stale by configuration, current by configuration with instances left behind, or broken
    /// (the refresh-worker then reports why, each window, rather than the group passing quietly).
    pub fn needs_refresh(&self) -> bool {
        matches!(self.verdict, Verdict::Stale | Verdict::Broken(_))
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
    judge_all_with(&mut Resolver::default(), groups, params, policy, stage).await
}

/// [`judge_all`], reusing the groups `resolver` has listed and the template versions it has read
/// (it keeps those it reads now): judging an account a second time, as if a golden parameter held
/// another AMI, then costs no listing of the groups and no template read. Parameter values,
/// marks and instances are always read anew.
pub async fn judge_all_with(
    resolver: &mut Resolver,
    groups: &impl Groups,
    params: &impl Parameters,
    policy: &Policy,
    stage: &Stage,
) -> Result<Vec<Judged>, StepError> {
    resolver.forget_parameters();
    let mut families = Vec::new();
    for f in &policy.families {
        if let Some(current) = params.get(&f.parameter_name).await? {
            let history = params.history(&f.parameter_name).await?;
            families.push((f.parameter_name.clone(), current.value, history));
        }
    }
    let listed = resolver.groups(groups).await?;
    resolver.prefetch(groups, &listed).await?;
    let mut judged = Vec::new();
    for group in listed {
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
        let mark = match parameter {
            Some(_) => Marks::new(groups, params)
                .read(&g.group)
                .await?
                .map(|r| r.mark),
            None => None,
        };
        judged.push(Judged {
            group: g,
            parameter,
            verdict,
            lagging_instances: 0,
            last_launch: None,
            mark,
        });
    }
    // The instances of every group whose configuration is already current: those Auto Scaling
    // says run its template's AMI need no read unless the stage bakes (launch times).
    let current = |j: &Judged| j.parameter.is_some() && j.verdict == Verdict::Current;
    let instances = instances_of(
        groups,
        judged.iter().filter(|j| current(j)).map(|j| &j.group),
        stage.bake_hours > 0.0,
    )
    .await?;
    for j in judged.iter_mut().filter(|j| current(j)) {
        let (mut lagging, mut last_launch) = (0, None);
        for i in j
            .group
            .group
            .instance_ids
            .iter()
            .filter_map(|id| instances.get(id))
        {
            // An instance lags when it runs none of the AMIs the group's templates hold (an
            // override on another family's AMI launches that AMI legitimately).
            if j.group.template_amis().all(|t| t != Some(&i.image)) {
                lagging += 1;
            } else if j.group.ami.as_deref() == Some(i.image.as_str()) {
                last_launch = last_launch.max(i.launched_at);
            }
        }
        j.lagging_instances = lagging;
        j.last_launch = last_launch;
    }
    for j in &judged {
        tracing::debug!(group = %j.group.group.name, ami = ?j.group.ami, source = ?j.group.source,
            verdict = ?j.verdict, lagging = j.lagging_instances, "judged");
    }
    Ok(judged)
}

/// The AMI (and, where read, the launch time) of every instance of `of`. An instance whose AMI
/// Auto Scaling's record of its launch tells exactly ([`GroupAmi::launched_ami`]) is not read,
/// unless `launch_times` (a stage's bake counts from its last launch); the others are read in
/// batched `DescribeInstances` calls. Reading them all costs the emulator, and AWS's EC2 bucket,
/// one call per 200 instances of the account.
pub async fn instances_of<'a>(
    groups: &impl Groups,
    of: impl IntoIterator<Item = &'a GroupAmi>,
    launch_times: bool,
) -> Result<HashMap<String, Instance>, StepError> {
    let (mut known, mut read) = (HashMap::new(), Vec::new());
    for g in of {
        for id in &g.group.instance_ids {
            match g.launched_ami(id).filter(|_| !launch_times) {
                Some(ami) => {
                    known.insert(
                        id.clone(),
                        Instance {
                            image: ami.clone(),
                            launched_at: None,
                        },
                    );
                }
                None => read.push(id.clone()),
            }
        }
    }
    if !read.is_empty() {
        known.extend(groups.instances(&read).await?);
    }
    Ok(known)
}

/// What the plan-worker does with one judged group when its window opens.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupPlan {
    /// Of no golden family: never planned.
    NotOurs,
    /// Ours, left alone (skip tag), with the reason.
    Skipped(String),
    /// Configuration and instances already on the golden AMI.
    Current,
    /// An amiflow refresh to the golden AMI is running: no new request.
    Refreshing { refresh_id: String },
    /// One `AsgRefreshRequested` with this strategy.
    Request(Strategy),
}

/// How a stale group is moved: through its stack when CloudFormation owns it (never change a
/// stack's resources behind its back), else through its launch template.
pub fn strategy(group: &Group) -> Strategy {
    if group.tags.contains_key(STACK_TAG) {
        Strategy::Cloudformation
    } else {
        Strategy::LaunchTemplate
    }
}

/// The plan of one judged group whose parameter holds `target`: the plan-worker's decision, and
/// what `amictl plan` shows before a window.
pub fn group_plan(j: &Judged, target: &str) -> GroupPlan {
    if j.parameter.is_none() {
        return GroupPlan::NotOurs;
    }
    if !j.needs_refresh() {
        return match &j.verdict {
            Verdict::Skipped(reason) => GroupPlan::Skipped(reason.clone()),
            _ => GroupPlan::Current,
        };
    }
    match j
        .mark
        .as_ref()
        .filter(|m| m.ami == target && m.is_running())
    {
        Some(m) => GroupPlan::Refreshing {
            refresh_id: m.refresh_id.clone(),
        },
        None => GroupPlan::Request(strategy(&j.group.group)),
    }
}

/// Emit one `AsgRefreshRequested` per stale group not already refreshing to the same AMI, and
/// none to a recalled AMI (`recalls`).
#[allow(clippy::too_many_arguments)]
pub async fn plan(
    caused_by: &str,
    account: &str,
    deadline: Option<DateTime<Utc>>,
    groups: &impl Groups,
    params: &impl Parameters,
    policy: &Policy,
    stage: &Stage,
    recalls: &Recalls,
) -> Result<Vec<Detail>, StepError> {
    let judged = judge_all(groups, params, policy, stage).await?;
    // Each family's groups in the stage: a percentage failure tolerance is taken of these.
    let mut family_groups: HashMap<&str, u32> = HashMap::new();
    for parameter in judged.iter().filter_map(|j| j.parameter.as_deref()) {
        *family_groups.entry(parameter).or_default() += 1;
    }
    let mut requests = Vec::new();
    for j in &judged {
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
        // Until the param-worker moves the parameter back, nothing moves to a recalled AMI.
        if let Some(recall) = recalls.of(&target) {
            tracing::warn!(group = %j.group.group.name, parameter = %parameter, "refused: a refresh to a recalled AMI ({})", recall.refusal());
            continue;
        }
        let GroupPlan::Request(strategy) = group_plan(j, &target) else {
            continue;
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
            .with_family_groups(family_groups[parameter.as_str()])
            .into(),
        );
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Decision, Recall};
    use crate::fake::FakeAws;
    use std::collections::BTreeMap;

    const PARAMETER: &str = "/golden/al2023/ami-id";
    const OLD: &str = "ami-0000000000000000a";
    const NEW: &str = "ami-0000000000000000b";

    /// The plan-worker's requests for the fake account, with no window deadline.
    async fn plan_in(
        aws: &FakeAws,
        policy: &Policy,
        stage: &Stage,
        recalls: &Recalls,
    ) -> Vec<Detail> {
        plan("k", "111111111111", None, aws, aws, policy, stage, recalls)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_says_how_many_groups_its_family_has_in_the_stage() {
        let policy = Policy::parse(include_str!("../../../local/amiflow.toml")).unwrap();
        let stage = policy.stage_named("qa").unwrap();
        let aws = FakeAws::default();
        aws.template("lt-old", &[OLD], 1);
        aws.group("on-old", "lt-old", "1", OLD, 1);
        aws.template("lt-new", &[NEW], 1);
        aws.group("on-new", "lt-new", "1", NEW, 1);
        // Not of the family: an AMI the parameter never held.
        aws.template("lt-other", &["ami-00000000000000ccc"], 1);
        aws.group("other", "lt-other", "1", "ami-00000000000000ccc", 1);
        aws.golden(PARAMETER, NEW, &[OLD]);
        let out = plan_in(&aws, &policy, stage, &Recalls::default()).await;
        let asked: Vec<(String, Option<u32>)> = out
            .into_iter()
            .map(|d| match d {
                Detail::AsgRefreshRequested(r) => (r.asg_name, r.family_groups),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(asked, [("on-old".into(), Some(2))]);
    }

    #[tokio::test]
    async fn a_second_judgement_with_one_resolver_lists_and_reads_no_template_but_every_parameter_anew()
     {
        let policy = Policy::parse(include_str!("../../../local/amiflow.toml")).unwrap();
        let stage = policy.stage_named("qa").unwrap();
        let aws = FakeAws::default();
        aws.template("lt-old", &[OLD], 1);
        aws.group("on-old", "lt-old", "1", OLD, 1);
        let resolved = format!("resolve:ssm:{PARAMETER}");
        aws.template("lt-ssm", &[resolved.as_str()], 1);
        aws.group("reads-ssm", "lt-ssm", "1", NEW, 1);
        let holding = |value: &str, earlier: &str| aws.golden(PARAMETER, value, &[earlier]);
        let amis = |judged: &[Judged]| -> Vec<(String, Option<String>, Verdict)> {
            let mut v: Vec<_> = judged
                .iter()
                .map(|j| {
                    (
                        j.group.group.name.clone(),
                        j.group.ami.clone(),
                        j.verdict.clone(),
                    )
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        holding(NEW, OLD);
        let mut resolver = Resolver::default();
        let real = judge_all_with(&mut resolver, &aws, &aws, &policy, stage)
            .await
            .unwrap();
        assert_eq!(
            amis(&real),
            [
                ("on-old".into(), Some(OLD.into()), Verdict::Stale),
                ("reads-ssm".into(), Some(NEW.into()), Verdict::Current),
            ]
        );
        // Every template gone: the second judgement still knows them, from the first one's reads,
        // and reads the parameter again (the resolve:ssm: group follows it).
        aws.templates.lock().unwrap().clear();
        holding(OLD, NEW);
        let again = judge_all_with(&mut resolver, &aws, &aws, &policy, stage)
            .await
            .unwrap();
        assert_eq!(
            amis(&again),
            [
                ("on-old".into(), Some(OLD.into()), Verdict::Current),
                ("reads-ssm".into(), Some(OLD.into()), Verdict::Current),
            ]
        );
        // The groups were listed once, for both judgements.
        assert_eq!(aws.listings.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    /// An instance Auto Scaling says was launched from the group's pinned version runs that
    /// version's AMI: not read. One launched as `$Latest`, from another version, or on a
    /// `resolve:ssm:` version is read, and so is every instance of a stage that bakes.
    #[tokio::test]
    async fn instances_launched_from_the_pinned_version_are_known_without_a_read() {
        let mut policy = Policy::parse(include_str!("../../../local/amiflow.toml")).unwrap();
        let aws = FakeAws::default();
        aws.golden(PARAMETER, NEW, &[OLD]);
        aws.template("lt-pinned", &[OLD, NEW], 1);
        aws.group("pinned", "lt-pinned", "2", NEW, 3);
        aws.launched_from("pinned", "lt-pinned", "2");
        // Launched from version 1 (OLD), though the group is on 2 now: left behind, and read.
        aws.group("behind", "lt-pinned", "2", OLD, 2);
        aws.launched_from("behind", "lt-pinned", "1");
        aws.group("latest", "lt-pinned", "$Latest", NEW, 4);
        aws.launched_from("latest", "lt-pinned", "$Latest");
        let resolved = format!("resolve:ssm:{PARAMETER}");
        aws.template("lt-ssm", &[resolved.as_str()], 1);
        aws.group("reads-ssm", "lt-ssm", "1", OLD, 5);
        aws.launched_from("reads-ssm", "lt-ssm", "1");
        let reads = || {
            aws.instance_reads
                .swap(0, std::sync::atomic::Ordering::Relaxed)
        };

        let stage = policy.stage_named("qa").unwrap().clone();
        let judged = judge_all(&aws, &aws, &policy, &stage).await.unwrap();
        assert_eq!(
            reads(),
            2 + 4 + 5,
            "every instance but the pinned group's is read"
        );
        let lagging: BTreeMap<_, _> = judged
            .iter()
            .map(|j| (j.group.group.name.as_str(), j.lagging_instances))
            .collect();
        assert_eq!(
            lagging,
            BTreeMap::from([
                ("behind", 2),
                ("latest", 0),
                ("pinned", 0),
                ("reads-ssm", 5)
            ])
        );
        assert!(judged.iter().all(|j| j.last_launch.is_none()));

        // A stage that bakes reads every instance, for the last launch.
        policy.stages[0].bake_hours = 1.0;
        let baking = policy.stages[0].clone();
        let launched = chrono::Utc::now();
        aws.instance_launched
            .lock()
            .unwrap()
            .insert("i-pinned-0".into(), launched);
        let judged = judge_all(&aws, &aws, &policy, &baking).await.unwrap();
        assert_eq!(reads(), 3 + 2 + 4 + 5);
        let pinned = judged
            .iter()
            .find(|j| j.group.group.name == "pinned")
            .unwrap();
        assert_eq!(pinned.last_launch, Some(launched));
    }

    #[tokio::test]
    async fn nothing_is_planned_to_a_recalled_ami_and_groups_on_it_move_back() {
        let policy = Policy::parse(include_str!("../../../local/amiflow.toml")).unwrap();
        let stage = policy.stage_named("qa").unwrap();
        let aws = FakeAws::default();
        aws.template("lt-old", &[OLD], 1);
        aws.group("on-old", "lt-old", "1", OLD, 1);
        aws.template("lt-new", &[NEW], 1);
        aws.group("on-new", "lt-new", "1", NEW, 1);
        let holding = |value: &str, earlier: &str| aws.golden(PARAMETER, value, &[earlier]);
        let mut recalls = Recalls::default();
        recalls.0.insert(
            NEW.into(),
            Recall {
                decision: Decision {
                    by: "ops".into(),
                    at: chrono::Utc::now(),
                    reason: "kernel regression".into(),
                },
                ami: NEW.into(),
                parameter: PARAMETER.into(),
                to: None,
                now: false,
            },
        );
        let requested = |details: Vec<Detail>| -> Vec<(String, String)> {
            details
                .into_iter()
                .map(|d| match d {
                    Detail::AsgRefreshRequested(r) => (r.asg_name, r.ami_id),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        // The parameter holds the recalled AMI (it has not gone back yet): nothing moves to it.
        holding(NEW, OLD);
        let out = plan_in(&aws, &policy, stage, &recalls).await;
        assert_eq!(requested(out), []);
        let out = plan_in(&aws, &policy, stage, &Recalls::default()).await;
        assert_eq!(requested(out), [("on-old".into(), NEW.into())]);
        // Gone back: the group on the recalled AMI is an earlier value of the parameter, stale.
        holding(OLD, NEW);
        let out = plan_in(&aws, &policy, stage, &recalls).await;
        assert_eq!(requested(out), [("on-new".into(), OLD.into())]);
    }
}
