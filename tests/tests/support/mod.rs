//! What the whole-rollout tests share (tests/rollout.rs, tests/chaos.rs): drive a rollout of the
//! candidate AMI through the local world stage by stage, read what AWS holds, and check that it
//! is the final state world.py intends, exactly.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use e2e::world::World;
use events::AmiBuilt;
use serde_json::Value;

pub mod make;
pub mod reads;

pub use reads::PARAMETER;

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
    /// (version number, image id) of each mixed-instances override's own launch template, by
    /// template id.
    pub override_versions: BTreeMap<String, Vec<(i64, String)>>,
    /// The version of its own template each such override names, by template id.
    pub override_specs: BTreeMap<String, String>,
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
    let instance_amis = BTreeSet::from_iter(reads::instance_amis(config, name).await);
    let lt_version = g
        .launch_template()
        .and_then(|lt| lt.version().map(str::to_owned))
        .or_else(|| {
            g.mixed_instances_policy()
                .and_then(|m| m.launch_template())
                .and_then(|lt| lt.launch_template_specification())
                .and_then(|s| s.version().map(str::to_owned))
        });
    let template_versions = |lt: String| {
        let ec2 = ec2.clone();
        async move {
            let out = ec2
                .describe_launch_template_versions()
                .launch_template_id(lt)
                .send()
                .await
                .unwrap();
            let mut versions = Vec::new();
            for v in out.launch_template_versions() {
                let image = v
                    .launch_template_data()
                    .and_then(|d| d.image_id())
                    .unwrap_or_default();
                versions.push((v.version_number().unwrap_or_default(), image.to_owned()));
            }
            versions.sort();
            versions
        }
    };
    let mut versions = Vec::new();
    if let Some(lt) = group["launch_template_id"].as_str() {
        versions = template_versions(lt.to_owned()).await;
    }
    let mut override_versions = BTreeMap::new();
    let mut override_specs = BTreeMap::new();
    let overrides = g
        .mixed_instances_policy()
        .and_then(|m| m.launch_template())
        .map(|lt| lt.overrides())
        .unwrap_or_default();
    for spec in overrides
        .iter()
        .filter_map(|o| o.launch_template_specification())
    {
        let lt = spec.launch_template_id().unwrap_or_default().to_owned();
        override_specs.insert(lt.clone(), spec.version().unwrap_or("$Default").to_owned());
        override_versions.insert(lt.clone(), template_versions(lt).await);
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
        override_versions,
        override_specs,
    }
}

/// The AMI of the numbered `version` among `versions` (as [`observe`] lists them).
fn image_of<'a>(versions: &'a [(i64, String)], version: &str) -> Option<&'a String> {
    let n: i64 = version.parse().ok()?;
    versions.iter().find(|(v, _)| *v == n).map(|(_, i)| i)
}

/// (value, version) of `account`'s golden parameter.
pub async fn parameter(world: &World, account: &str) -> (String, i64) {
    reads::golden_parameter(world.config(account)).await
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

pub use local_world::Audit;

/// Read what the hub's audit queue holds now into `audit`.
pub async fn collect(world: &World, audit: &mut Audit) {
    world.driver().collect(audit).await.unwrap();
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

/// Put the candidate's `AmiBuilt` on the hub bus and wait until the first stage reported
/// publishing it (local_world::Driver, which amictl demo and bench-rollout drive too); the later
/// stages' parameters must not have moved: only their gate promotes them, at their window.
pub async fn publish(world: &World, audit: &mut Audit, within: Duration) {
    let published = world
        .driver()
        .publish(candidate_built(world), audit, within, |_| {})
        .await;
    if let Err(e) = published {
        panic!("{e:#}\n{}", world.logs());
    }
    assert_not_promoted(world, &world.accounts()[1..]).await;
}

/// None of `accounts` holds the candidate yet (their stage was not promoted).
pub async fn assert_not_promoted(world: &World, accounts: &[String]) {
    let candidate = amis(world).0;
    for account in accounts {
        let (value, _) = parameter(world, account).await;
        assert_ne!(
            value,
            candidate,
            "{}: its parameter took the candidate before its window and gate",
            world.stage(account)
        );
    }
}

/// Open each stage's window in turn, as EventBridge Scheduler would, and wait until every group
/// world.py expects an outcome for has one for the candidate before opening the next.
pub async fn open_windows(world: &World, audit: &mut Audit, per_stage: Duration) {
    let candidate = amis(world).0;
    let driver = world.driver();
    for (i, stage) in driver.stages.iter().enumerate() {
        if i > 0 {
            assert_not_promoted(world, std::slice::from_ref(&stage.account)).await;
        }
        let opened = world
            .open_window(&driver, stage, &candidate, audit, per_stage)
            .await;
        if let Err(e) = opened {
            panic!(
                "{e:#}\nseen: {:#?}\nDLQs: {:?}\n{}",
                audit.finished,
                world.dead_letters().await,
                world.logs()
            );
        }
    }
}

/// The first stage's window, until every group world.py expects an outcome for there has one:
/// the second stage's gate then opens at its window (the policy has no bake).
pub async fn pass_first_stage(world: &World) {
    let driver = world.driver();
    let stage = &driver.stages[0];
    let expected: BTreeSet<String> = world
        .groups(&stage.account)
        .iter()
        .filter(|g| e2e::world::expects_outcome(g))
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect();
    driver.open(stage).await.unwrap();
    let done = driver
        .outcomes(
            stage,
            &amis(world).0,
            &expected,
            &mut Audit::default(),
            Duration::from_secs(300),
            |_| {},
        )
        .await;
    if let Err(e) = done {
        panic!("{e:#}\n{}", world.logs());
    }
}

/// The second stage (uat) promoted to the candidate and its window over: the first stage passes,
/// then uat's window opens and every group there ends.
pub async fn promote_second_stage(world: &World) {
    pass_first_stage(world).await;
    let driver = world.driver();
    open_window(world, &driver, &driver.stages[1], &mut Audit::default()).await;
}

/// Open one stage's window and wait until its gate promoted it and every group world.py expects an
/// outcome for has one for the candidate.
pub async fn open_window(
    world: &World,
    driver: &local_world::Driver,
    stage: &local_world::Stage,
    audit: &mut Audit,
) {
    let candidate = amis(world).0;
    let opened = world
        .open_window(driver, stage, &candidate, audit, Duration::from_secs(300))
        .await;
    if let Err(e) = opened {
        panic!(
            "{e:#}\nseen: {:#?}\nDLQs: {:?}\n{}",
            audit.finished,
            world.dead_letters().await,
            world.logs()
        );
    }
}

/// Check that AWS holds exactly what a clean rollout of the candidate leaves, against `before`:
/// every parameter on the candidate with one new version, every group as world.py intends (one
/// new launch template version and one refresh per refreshed group, skipped and other groups
/// untouched), the concurrency limit kept, and every account's `ParamUpdated` seen by the hub.
/// Returns what AWS holds now. DLQs are for the caller to check (some scenarios fill them).
pub async fn assert_final_state(world: &World, before: &Snapshot, audit: &Audit) -> Snapshot {
    let candidate = amis(world).0;
    let earlier: Vec<String> = world.state["amis"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
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
                    // An override's own template moves when it held an earlier golden AMI
                    // (one new version, with the candidate), and is left alone otherwise.
                    for (lt, was_versions) in &was.override_versions {
                        let now_versions = &now.override_versions[lt];
                        if was_versions.iter().any(|(_, i)| earlier.contains(i)) {
                            assert_eq!(
                                now_versions.len(),
                                was_versions.len() + 1,
                                "{label}: override template {lt} got one new version"
                            );
                            assert_eq!(
                                now_versions.last().map(|(_, i)| i),
                                Some(&candidate),
                                "{label}: override template {lt}"
                            );
                        } else {
                            assert_eq!(
                                now_versions, was_versions,
                                "{label}: override template {lt} left alone"
                            );
                        }
                    }
                    // Each override world.py made with a template of its own, exactly: one
                    // to move names a new version of its template holding the candidate; one
                    // to leave alone still names the version it did, and its template is as it
                    // was. No other override has a template of its own.
                    let declared = g["overrides"].as_array().cloned().unwrap_or_default();
                    assert_eq!(
                        declared
                            .iter()
                            .map(|o| o["launch_template_id"].as_str().unwrap().to_owned())
                            .collect::<BTreeSet<_>>(),
                        now.override_specs.keys().cloned().collect::<BTreeSet<_>>(),
                        "{label}: the overrides with their own template"
                    );
                    for o in &declared {
                        let lt = o["launch_template_id"].as_str().unwrap();
                        let had = o["ami_id"].as_str().unwrap();
                        let names = &now.override_specs[lt];
                        let image = image_of(&now.override_versions[lt], names);
                        assert_eq!(
                            image_of(&was.override_versions[lt], &was.override_specs[lt]),
                            Some(&had.to_owned()),
                            "{label}: override template {lt} held {had} before"
                        );
                        match o["expected"].as_str().unwrap() {
                            "moved" => {
                                assert_ne!(names, &was.override_specs[lt], "{label}: {lt}");
                                assert_eq!(image, Some(&candidate), "{label}: override {lt}");
                            }
                            "left-alone" => {
                                assert_eq!(names, &was.override_specs[lt], "{label}: {lt}");
                                assert_eq!(image.map(String::as_str), Some(had), "{label}: {lt}");
                            }
                            other => panic!("world.py override expectation {other:?} unknown"),
                        }
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
    assert_eq!(
        audit.published(&candidate),
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
    publish(world, audit, Duration::from_secs(120)).await;
    open_windows(world, audit, Duration::from_secs(300)).await;
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    collect(world, audit).await;
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

/// The emulator fails (and auto rolls back) the refresh of a group with this tag set to `fail`,
/// and keeps it in progress until cancelled when it says `hold`.
pub const EMULATED_REFRESH_TAG: &str = "amiflow:emulator-refresh-outcome";

/// Tag `groups` of `account` so the emulator's refreshes of them `fail` (and roll back) or `hold`
/// (stay in progress until cancelled).
pub async fn emulate_refreshes(world: &World, account: &str, groups: &[String], how: &str) {
    let asg = aws_sdk_autoscaling::Client::new(world.config(account));
    for name in groups {
        asg.create_or_update_tags()
            .tags(
                aws_sdk_autoscaling::types::Tag::builder()
                    .resource_id(name)
                    .resource_type("auto-scaling-group")
                    .key(EMULATED_REFRESH_TAG)
                    .value(how)
                    .propagate_at_launch(false)
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }
}

/// An image's tag specification: `tags` as given.
pub fn image_tags(tags: &[(&str, &str)]) -> aws_sdk_ec2::types::TagSpecification {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let mut spec = TagSpecification::builder().resource_type(ResourceType::Image);
    for (k, v) in tags {
        spec = spec.tags(Tag::builder().key(*k).value(*v).build());
    }
    spec.build()
}

/// The tags world.py gives a golden AMI: its name, its family and (the emulator dates an AMI
/// by its `amiflow:emulator-creation-date` tag) when it was made.
pub fn golden_tags(
    name: &str,
    family: &str,
    created: &str,
) -> aws_sdk_ec2::types::TagSpecification {
    image_tags(&[
        ("Name", name),
        ("amiflow:family", family),
        ("amiflow:emulator-creation-date", created),
    ])
}

/// Register an AMI named `name` in `account` with `tags`; its id.
pub async fn register_tagged(
    world: &World,
    account: &str,
    name: &str,
    tags: aws_sdk_ec2::types::TagSpecification,
) -> String {
    make::image(
        &aws_sdk_ec2::Client::new(world.config(account)),
        name,
        Some(tags),
    )
    .await
}

/// Register a golden AMI named `name` in `account`, of `family`, made at `created`; its id.
pub async fn register_image(
    world: &World,
    account: &str,
    name: &str,
    family: &str,
    created: &str,
) -> String {
    register_tagged(world, account, name, golden_tags(name, family, created)).await
}
