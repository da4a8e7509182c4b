//! What the whole-rollout tests share (tests/rollout.rs, tests/chaos.rs): drive a rollout of the
//! candidate AMI through the local world stage by stage, read what AWS holds, and check that it
//! is the final state world.py intends, exactly.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use e2e::world::{World, expects_outcome};
use events::{AmiBuilt, Detail, RolloutWindowOpened};
use serde_json::Value;

pub const PARAMETER: &str = "/golden/al2023/ami-id";

/// (refresh id, status, start, end) of one instance refresh.
pub type RefreshSeen = (String, String, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// What AWS says about one group, enough to tell whether anything changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Instance AMIs of the group's in-service instances.
    pub instance_amis: BTreeSet<String>,
    /// (version number, image id) of the group's launch template, if it has one.
    pub versions: Vec<(i64, String)>,
    /// (refresh id, status, start, end) of every instance refresh of the group.
    pub refreshes: Vec<RefreshSeen>,
    /// The launch template version or `$Latest`/`$Default` the group names.
    pub lt_version: Option<String>,
}

pub async fn observe(world: &World, account: &str, group: &Value) -> Observed {
    let config = world.config(account);
    let asg = aws_sdk_autoscaling::Client::new(config);
    let ec2 = aws_sdk_ec2::Client::new(config);
    let name = group["name"].as_str().unwrap();
    let described = asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .unwrap();
    let g = &described.auto_scaling_groups()[0];
    let ids: Vec<String> = g
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    let mut instance_amis = BTreeSet::new();
    if !ids.is_empty() {
        let out = ec2
            .describe_instances()
            .set_instance_ids(Some(ids))
            .send()
            .await
            .unwrap();
        for r in out.reservations() {
            for i in r.instances() {
                instance_amis.insert(i.image_id().unwrap_or_default().to_owned());
            }
        }
    }
    let lt_version = g
        .launch_template()
        .and_then(|lt| lt.version().map(str::to_owned))
        .or_else(|| {
            g.mixed_instances_policy()
                .and_then(|m| m.launch_template())
                .and_then(|lt| lt.launch_template_specification())
                .and_then(|s| s.version().map(str::to_owned))
        });
    let mut versions = Vec::new();
    if let Some(lt) = group["launch_template_id"].as_str() {
        let out = ec2
            .describe_launch_template_versions()
            .launch_template_id(lt)
            .send()
            .await
            .unwrap();
        for v in out.launch_template_versions() {
            let image = v
                .launch_template_data()
                .and_then(|d| d.image_id())
                .unwrap_or_default();
            versions.push((v.version_number().unwrap_or_default(), image.to_owned()));
        }
        versions.sort();
    }
    let out = asg
        .describe_instance_refreshes()
        .auto_scaling_group_name(name)
        .send()
        .await
        .unwrap();
    let to_chrono = |t: Option<&aws_smithy_types::DateTime>| {
        t.and_then(|t| Utc.timestamp_opt(t.secs(), t.subsec_nanos()).single())
    };
    let mut refreshes: Vec<_> = out
        .instance_refreshes()
        .iter()
        .map(|r| {
            (
                r.instance_refresh_id().unwrap_or_default().to_owned(),
                r.status()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                to_chrono(r.start_time()),
                to_chrono(r.end_time()),
            )
        })
        .collect();
    refreshes.sort();
    Observed {
        instance_amis,
        versions,
        refreshes,
        lt_version,
    }
}

/// (value, version) of `account`'s golden parameter.
pub async fn parameter(world: &World, account: &str) -> (String, i64) {
    let ssm = aws_sdk_ssm::Client::new(world.config(account));
    let p = ssm
        .get_parameter()
        .name(PARAMETER)
        .send()
        .await
        .unwrap()
        .parameter
        .unwrap();
    (p.value.unwrap_or_default(), p.version)
}

/// The most refreshes of one account that ran at the same time (from AWS's own start/end times).
pub fn max_overlap(observed: &[Observed]) -> usize {
    let mut points: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for o in observed {
        for (_, _, start, end) in &o.refreshes {
            if let (Some(s), Some(e)) = (start, end) {
                points.push((*s, 1));
                points.push((*e, -1));
            }
        }
    }
    // An end and a start at the same instant do not overlap: ends sort first.
    points.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in points {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// The world's candidate AMI and the one golden before last.
pub fn amis(world: &World) -> (String, String) {
    let amis = &world.state["amis"];
    (
        amis["candidate"].as_str().unwrap().to_owned(),
        amis["history"][1].as_str().unwrap().to_owned(),
    )
}

pub fn built(ami: &str, image_name: &str, created: DateTime<Utc>) -> AmiBuilt {
    AmiBuilt::new(ami, "us-east-1", image_name, created, PARAMETER)
}

/// The candidate's `AmiBuilt`.
pub fn candidate_built(world: &World) -> AmiBuilt {
    built(
        &amis(world).0,
        "golden-al2023-2026-11",
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
    )
}

/// What the hub's audit queue said: `AsgRefreshFinished` by (account, group, AMI) and every
/// `ParamUpdated`.
#[derive(Debug, Default)]
pub struct Audit {
    pub finished: BTreeMap<(String, String, String), Vec<(String, String)>>,
    pub params: Vec<Value>,
}

impl Audit {
    pub async fn collect(&mut self, world: &World) {
        let hub = world.hub();
        let url = world.queue_url(&hub, "audit");
        for body in world.drain(&hub, &url).await {
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
}

/// What AWS holds before a rollout.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub groups: BTreeMap<(String, String), Observed>,
    pub params: BTreeMap<String, (String, i64)>,
}

pub async fn snapshot(world: &World) -> Snapshot {
    let mut groups = BTreeMap::new();
    let mut params = BTreeMap::new();
    for account in world.accounts() {
        params.insert(account.clone(), parameter(world, &account).await);
        for g in world.groups(&account) {
            let name = g["name"].as_str().unwrap().to_owned();
            groups.insert((account.clone(), name), observe(world, &account, &g).await);
        }
    }
    Snapshot { groups, params }
}

/// Put the candidate's `AmiBuilt` on the hub bus and wait until every account's golden parameter
/// holds it.
pub async fn publish(world: &World, within: Duration) {
    let candidate = amis(world).0;
    world
        .put(&world.hub(), &Detail::from(candidate_built(world)))
        .await;
    for account in world.accounts() {
        e2e::eventually(
            &format!("{account}'s golden parameter to hold {candidate}"),
            within,
            || async { (parameter(world, &account).await.0 == candidate).then_some(()) },
        )
        .await;
    }
}

/// Open each stage's window in turn, as EventBridge Scheduler would, and wait until every group
/// world.py expects an outcome for has one for the candidate before opening the next.
pub async fn open_windows(world: &World, audit: &mut Audit, per_stage: Duration) {
    let candidate = amis(world).0;
    for account in world.accounts() {
        let stage = world.stage(&account);
        let opens = Utc::now();
        let window =
            RolloutWindowOpened::new(&account, &stage, opens, opens + chrono::Duration::hours(4));
        world.put(&account, &Detail::from(window)).await;
        let expected: Vec<String> = world
            .groups(&account)
            .iter()
            .filter(|g| expects_outcome(g))
            .map(|g| g["name"].as_str().unwrap().to_owned())
            .collect();
        let deadline = Instant::now() + per_stage;
        loop {
            audit.collect(world).await;
            let missing: Vec<&String> = expected
                .iter()
                .filter(|n| audit.outcomes(&account, n, &candidate).is_none())
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "stage {stage}: no AsgRefreshFinished for {missing:?}\nseen: {:#?}\nDLQs: {:?}\n{}",
                audit.finished,
                world.dead_letters().await,
                world.logs()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Check that AWS holds exactly what a clean rollout of the candidate leaves, against `before`:
/// every parameter on the candidate with one new version, every group as world.py intends (one
/// new launch template version and one refresh per refreshed group, skipped and other groups
/// untouched), the concurrency limit kept, and every account's `ParamUpdated` seen by the hub.
/// Returns what AWS holds now. DLQs are for the caller to check (some scenarios fill them).
pub async fn assert_final_state(world: &World, before: &Snapshot, audit: &Audit) -> Snapshot {
    let candidate = amis(world).0;
    let mut after = BTreeMap::new();
    let mut params = BTreeMap::new();
    for account in world.accounts() {
        let (value, version) = parameter(world, &account).await;
        assert_eq!(value, candidate, "{account}: parameter");
        assert_eq!(
            version,
            before.params[&account].1 + 1,
            "{account}: exactly one new parameter version"
        );
        params.insert(account.clone(), (value, version));
        let stage = world.stage(&account);
        let mut observed_here = Vec::new();
        for g in world.groups(&account) {
            let name = g["name"].as_str().unwrap().to_owned();
            let kind = g["kind"].as_str().unwrap();
            let was = &before.groups[&(account.clone(), name.clone())];
            let now = observe(world, &account, &g).await;
            let seen = audit.outcomes(&account, &name, &candidate);
            let label = format!("{stage}/{name} ({kind})");
            // Duplicates may report an outcome more than once; every report must agree.
            let all_say = |want: &str| {
                let seen = seen.unwrap_or_else(|| panic!("{label}: no outcome reported"));
                assert!(
                    seen.iter().all(|(o, _)| o == want),
                    "{label}: every report says {want}: {seen:?}"
                );
            };
            match g["expected"].as_str().unwrap() {
                "refresh" => {
                    assert_eq!(
                        now.instance_amis,
                        BTreeSet::from([candidate.clone()]),
                        "{label}: every instance runs the candidate"
                    );
                    assert_eq!(
                        now.refreshes.len(),
                        1,
                        "{label}: exactly one refresh: {now:?}"
                    );
                    assert_eq!(now.refreshes[0].1, "Successful", "{label}");
                    let with_candidate =
                        now.versions.iter().filter(|(_, i)| *i == candidate).count();
                    if kind == "ssm-resolve" {
                        // The template reads the parameter at launch: no version to add.
                        assert_eq!(now.versions, was.versions, "{label}: template unchanged");
                    } else {
                        assert_eq!(
                            with_candidate, 1,
                            "{label}: exactly one version with the AMI: {now:?}"
                        );
                        assert_eq!(
                            now.versions.len(),
                            was.versions.len() + 1,
                            "{label}: one new version"
                        );
                    }
                    all_say("succeeded");
                }
                "rolled-back" => {
                    assert_eq!(
                        now.instance_amis, was.instance_amis,
                        "{label}: rolled back to where it was"
                    );
                    assert_eq!(
                        now.lt_version, was.lt_version,
                        "{label}: group points where it did"
                    );
                    assert_eq!(now.refreshes.len(), 1, "{label}: {now:?}");
                    assert_eq!(now.refreshes[0].1, "RollbackSuccessful", "{label}");
                    all_say("rolled-back");
                }
                "skip" => {
                    assert_eq!(now, *was, "{label}: skipped groups are untouched");
                    all_say("skipped");
                    let hint = if kind == "launch-config" {
                        "launch configuration"
                    } else {
                        "resolve:ssm"
                    };
                    for (_, reason) in seen.unwrap() {
                        assert!(
                            reason.contains(hint),
                            "{label}: reason {reason:?} names {hint:?}"
                        );
                    }
                }
                "untouched" => {
                    assert_eq!(now, *was, "{label}: left alone");
                    assert!(seen.is_none(), "{label}: no request was made: {seen:?}");
                }
                other => panic!("world.py expectation {other:?} unknown to this test"),
            }
            observed_here.push(now.clone());
            after.insert((account.clone(), name), now);
        }
        let limit = if stage == "prod" { 2 } else { 3 };
        let most = max_overlap(&observed_here);
        assert!(
            most <= limit && most >= 1,
            "{stage}: {most} refreshes ran at once; local/amiflow.toml allows {limit}"
        );
    }
    let published: BTreeSet<String> = audit
        .params
        .iter()
        .filter(|d| d["ami_id"] == candidate.as_str())
        .map(|d| d["account"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        published,
        world.accounts().into_iter().collect(),
        "every account reported ParamUpdated to the hub"
    );
    Snapshot {
        groups: after,
        params,
    }
}

/// A rollout from `AmiBuilt` to the last stage's outcomes, then a quiet world; the final state is
/// checked against `before`.
pub async fn rollout(world: &World, before: &Snapshot, audit: &mut Audit) -> Snapshot {
    publish(world, Duration::from_secs(120)).await;
    open_windows(world, audit, Duration::from_secs(300)).await;
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    audit.collect(world).await;
    assert_final_state(world, before, audit).await
}

/// The seed for a scenario's random choices: `AMIFLOW_CHAOS_SEED` replays a run, else the clock.
/// Printed either way, so a failure can be replayed.
pub fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("AMIFLOW_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{scenario}: seed {seed} (AMIFLOW_CHAOS_SEED={seed} replays it)");
    seed
}
