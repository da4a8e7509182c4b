//! The whole rollout over qa, uat and prod in the local world (issue 5): the real worker binaries,
//! one process per worker and account, over real SQS and EventBridge in the emulator.
//!
//! One `AmiBuilt` for the candidate AMI goes onto the hub bus; the windows are then opened stage by
//! stage, as EventBridge Scheduler would. The test compares what AWS holds afterwards with what
//! local/world.py says each group should end as, then re-injects every event of the rollout plus an
//! older `AmiBuilt` and checks that nothing changes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use e2e::world::{World, expects_outcome};
use events::{AmiBuilt, Detail, RolloutWindowOpened};
use serde_json::Value;

const PARAMETER: &str = "/golden/al2023/ami-id";

/// (refresh id, status, start, end) of one instance refresh.
type RefreshSeen = (String, String, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// What AWS says about one group, enough to tell whether anything changed.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    /// Instance AMIs of the group's in-service instances.
    instance_amis: BTreeSet<String>,
    /// (version number, image id) of the group's launch template, if it has one.
    versions: Vec<(i64, String)>,
    /// (refresh id, status, start, end) of every instance refresh of the group.
    refreshes: Vec<RefreshSeen>,
    /// The launch template version or `$Latest`/`$Default` the group names.
    lt_version: Option<String>,
}

async fn observe(world: &World, account: &str, group: &Value) -> Observed {
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

async fn parameter(world: &World, account: &str) -> (String, i64) {
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
fn max_overlap(observed: &[Observed]) -> usize {
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

/// Outcomes of `AsgRefreshFinished` seen on the hub's audit queue, by (account, group).
type Outcomes = BTreeMap<(String, String), Vec<(String, String)>>;

async fn collect_audit(world: &World, outcomes: &mut Outcomes, params: &mut Vec<Value>) {
    let hub = world.hub();
    let url = world.queue_url(&hub, "audit");
    for body in world.drain(&hub, &url).await {
        let d = &body["detail"];
        match body["detail-type"].as_str() {
            Some("AsgRefreshFinished") => outcomes
                .entry((
                    d["account"].as_str().unwrap_or_default().to_owned(),
                    d["asg_name"].as_str().unwrap_or_default().to_owned(),
                ))
                .or_default()
                .push((
                    d["outcome"].as_str().unwrap_or_default().to_owned(),
                    d["reason"].as_str().unwrap_or_default().to_owned(),
                )),
            Some("ParamUpdated") => params.push(d.clone()),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_rollout_moves_every_eligible_group_once_and_a_replay_changes_nothing() {
    let world = World::start("small", &[]).await;
    let hub = world.hub();
    let accounts = world.accounts();
    let candidate = world.state["amis"]["candidate"]
        .as_str()
        .unwrap()
        .to_owned();
    let older = world.state["amis"]["history"][1]
        .as_str()
        .unwrap()
        .to_owned();
    let mut taps = BTreeMap::new();
    for account in &accounts {
        taps.insert(account.clone(), world.tap(account).await);
    }
    let mut before = BTreeMap::new();
    let mut params_before = BTreeMap::new();
    for account in &accounts {
        params_before.insert(account.clone(), parameter(&world, account).await);
        for g in world.groups(account) {
            let name = g["name"].as_str().unwrap().to_owned();
            before.insert((account.clone(), name), observe(&world, account, &g).await);
        }
    }

    // 1. The AMI is built: share, publish. Every stage waits for its window to refresh.
    let built = AmiBuilt::new(
        &candidate,
        "us-east-1",
        "golden-al2023-2026-11",
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        PARAMETER,
    );
    world.put(&hub, &Detail::from(built)).await;
    for account in &accounts {
        e2e::eventually(
            &format!("{account}'s golden parameter to hold {candidate}"),
            Duration::from_secs(90),
            || async { (parameter(&world, account).await.0 == candidate).then_some(()) },
        )
        .await;
    }

    // 2. The windows open stage by stage; each stage ends before the next opens.
    let mut outcomes = Outcomes::new();
    let mut param_events = Vec::new();
    for account in &accounts {
        let stage = world.stage(account);
        let opens = Utc::now();
        let window =
            RolloutWindowOpened::new(account, &stage, opens, opens + chrono::Duration::hours(4));
        world.put(account, &Detail::from(window)).await;
        let expected: Vec<String> = world
            .groups(account)
            .iter()
            .filter(|g| expects_outcome(g))
            .map(|g| g["name"].as_str().unwrap().to_owned())
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        loop {
            collect_audit(&world, &mut outcomes, &mut param_events).await;
            let missing: Vec<&String> = expected
                .iter()
                .filter(|n| !outcomes.contains_key(&(account.clone(), (*n).clone())))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stage {stage}: no AsgRefreshFinished for {missing:?}\nseen: {outcomes:#?}\nDLQs: {:?}\n{}",
                world.dead_letters().await,
                world.logs()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    world
        .settle(Duration::from_secs(3), Duration::from_secs(60))
        .await;
    collect_audit(&world, &mut outcomes, &mut param_events).await;

    // 3. What AWS holds now, group by group, against world.py's intent.
    let mut after = BTreeMap::new();
    for account in &accounts {
        let (value, _) = parameter(&world, account).await;
        assert_eq!(value, candidate, "{account}: parameter");
        let stage = world.stage(account);
        let mut observed_here = Vec::new();
        for g in world.groups(account) {
            let name = g["name"].as_str().unwrap().to_owned();
            let kind = g["kind"].as_str().unwrap();
            let was = &before[&(account.clone(), name.clone())];
            let now = observe(&world, account, &g).await;
            let seen = outcomes.get(&(account.clone(), name.clone()));
            let label = format!("{stage}/{name} ({kind})");
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
                    let outcome = &seen.unwrap()[0];
                    assert_eq!(outcome.0, "succeeded", "{label}: {outcome:?}");
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
                    assert_eq!(seen.unwrap()[0].0, "rolled-back", "{label}: {seen:?}");
                }
                "skip" => {
                    assert_eq!(now, *was, "{label}: skipped groups are untouched");
                    let (outcome, reason) = &seen.unwrap()[0];
                    assert_eq!(outcome, "skipped", "{label}");
                    let hint = if kind == "launch-config" {
                        "launch configuration"
                    } else {
                        "resolve:ssm"
                    };
                    assert!(
                        reason.contains(hint),
                        "{label}: reason {reason:?} names {hint:?}"
                    );
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
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "no dead letters"
    );
    let published: BTreeSet<String> = param_events
        .iter()
        .filter(|d| d["ami_id"] == candidate.as_str())
        .map(|d| d["account"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        published,
        accounts.iter().cloned().collect(),
        "every account reported ParamUpdated to the hub"
    );
    let params_after: BTreeMap<String, (String, i64)> = {
        let mut m = BTreeMap::new();
        for account in &accounts {
            m.insert(account.clone(), parameter(&world, account).await);
        }
        m
    };
    for account in &accounts {
        assert_eq!(
            params_after[account].1,
            params_before[account].1 + 1,
            "{account}: one new parameter version"
        );
    }

    // 4. Every event of the rollout again, plus an older AMI built late: nothing may change.
    let mut replayed = 0;
    for account in &accounts {
        for body in world.drain(account, &taps[account]).await {
            let detail_type = body["detail-type"].as_str().unwrap().to_owned();
            world.put_raw(account, &detail_type, &body["detail"]).await;
            replayed += 1;
        }
    }
    assert!(replayed > 20, "the tap saw the rollout ({replayed} events)");
    let late = AmiBuilt::new(
        &older,
        "us-east-1",
        "golden-al2023-2026-09",
        Utc.with_ymd_and_hms(2026, 9, 1, 0, 0, 0).unwrap(),
        PARAMETER,
    );
    world.put(&hub, &Detail::from(late)).await;
    // The replayed events flow through every worker; wait until their echoes are done too.
    world
        .settle(Duration::from_secs(5), Duration::from_secs(120))
        .await;
    for account in &accounts {
        assert_eq!(
            parameter(&world, account).await,
            params_after[account],
            "{account}: the parameter neither regressed nor got a new version"
        );
        for g in world.groups(account) {
            let name = g["name"].as_str().unwrap().to_owned();
            let now = observe(&world, account, &g).await;
            assert_eq!(
                now,
                after[&(account.clone(), name.clone())],
                "{account}/{name}: unchanged by the replay"
            );
        }
    }
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "replays are not poison"
    );
}
