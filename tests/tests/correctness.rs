//! States amiflow must not report wrongly, each in the local world with the real
//! worker binaries: an AMI older than the golden one is never published, `amictl status` counts
//! instances by the AMI they run and shows a skip reason whole, and a group is judged and moved by
//! every launch template it can launch from (mixed-instances overrides with their own template),
//! a refresh superseded by a hand-made change is reported so, then respected, a refresh
//! orphaned by a worker that stopped between starting it and marking the group is adopted, and a
//! stack-owned group keeps exactly its template's tags (its mark is kept in SSM).
//!
//! Each test makes the groups it needs with the SDK beside the seed world of local/world.py, so
//! the seed world and the exact-state checks of tests/rollout.rs and tests/chaos.rs stay as they
//! are.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials;
use serde_json::Value;

use chrono::{TimeZone, Utc};
use e2e::world::World;
use events::Detail;
use support::{PARAMETER, amis, parameter};

/// One world at a time: each runs an emulator and 13 worker processes.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// (detail-type, amiflow-error-kind, amiflow-error) of every message in `account`'s `queue` DLQ,
/// removed.
async fn dead_letters(world: &World, account: &str, queue: &str) -> Vec<(String, String, String)> {
    world
        .take_dead_letters(account, queue)
        .await
        .into_iter()
        .map(|d| {
            let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            let detail_type = body["detail-type"].as_str().unwrap_or_default().to_owned();
            (detail_type, d.kind, d.reason)
        })
        .collect()
}

/// An AMI registered in the hub as the golden build of `name`, created at `created` (the
/// emulator's creation-date tag).
async fn launch_permissions(world: &World, ami: &str) -> Vec<String> {
    let ec2 = aws_sdk_ec2::Client::new(world.config(&world.hub()));
    ec2.describe_image_attribute()
        .image_id(ami)
        .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
        .send()
        .await
        .unwrap()
        .launch_permissions()
        .iter()
        .filter_map(|p| p.user_id().map(str::to_owned))
        .collect()
}

/// Point 7: the share-worker refuses, before sharing anything, an AMI that some stage's golden
/// parameter already holds a later AMI than; the message is dead-lettered with that reason.
#[tokio::test]
async fn an_ami_older_than_the_golden_one_is_never_shared() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start("small", &[]).await;
    let hub = world.hub();
    let (candidate, _) = amis(&world);
    // Published everywhere: each later stage by its gate, at its window.
    let mut audit = support::Audit::default();
    support::publish(&world, &mut audit, Duration::from_secs(120)).await;
    support::open_windows(&world, &mut audit, Duration::from_secs(300)).await;
    let params_before: Vec<(String, i64)> = {
        let mut v = Vec::new();
        for account in world.accounts() {
            v.push(parameter(&world, &account).await);
        }
        v
    };

    // Built in mid-October, announced after November's golden AMI was published everywhere.
    let late = support::register_image(
        &world,
        &world.hub(),
        "golden-al2023-2026-10-15",
        "al2023",
        "2026-10-15T00:00:00.000Z",
    )
    .await;
    let built = support::built(
        &late,
        "golden-al2023-2026-10-15",
        Utc.with_ymd_and_hms(2026, 10, 15, 0, 0, 0).unwrap(),
    );
    world.put(&hub, &Detail::from(built)).await;

    let found = e2e::eventually(
        "the late AmiBuilt in the share-worker's DLQ",
        Duration::from_secs(60),
        || async {
            let found = dead_letters(&world, &hub, "share").await;
            (!found.is_empty()).then_some(found)
        },
    )
    .await;
    assert_eq!(found.len(), 1, "{found:?}");
    let (detail_type, kind, reason) = &found[0];
    assert_eq!(
        (detail_type.as_str(), kind.as_str()),
        ("AmiBuilt", "permanent")
    );
    assert!(
        reason.contains(&format!(
            "AMI {late} (created 2026-10-15T00:00:00+00:00) is older than the golden AMI of {PARAMETER}: qa (111111111111) holds {candidate} created 2026-11-01T00:00:00+00:00"
        )) && reason.contains("uat (222222222222)")
            && reason.contains("prod (333333333333)")
            && reason.ends_with("it would never be promoted there, so it is not shared"),
        "{reason}"
    );
    assert_eq!(
        launch_permissions(&world, &late).await,
        Vec::<String>::new(),
        "nothing was shared"
    );
    world
        .settle(Duration::from_secs(3), Duration::from_secs(60))
        .await;
    let mut params_after = Vec::new();
    for account in world.accounts() {
        params_after.push(parameter(&world, &account).await);
    }
    assert_eq!(params_after, params_before, "no parameter moved");
    assert_eq!(
        world.dead_letters().await,
        std::collections::BTreeMap::new(),
        "nothing else was refused"
    );
}

/// `amictl status --json` for `stage`, run as an operator runs it against AWS: the rollout policy
/// and the hub's credentials, the emulator as the endpoint.
async fn amictl_status(world: &World, stage: &str) -> Value {
    let exe = e2e::world::bin_dir().join("amictl");
    assert!(
        exe.exists(),
        "{} is missing: `cargo build -p amictl` builds it",
        exe.display()
    );
    let creds = world
        .config(&world.hub())
        .credentials_provider()
        .unwrap()
        .provide_credentials()
        .await
        .unwrap();
    let policy = emulator::project_root().join("local/amiflow.toml");
    let out = tokio::process::Command::new(exe)
        .args(["status", "--json", "--stage", stage, "--config"])
        .arg(policy)
        .env("AMIFLOW_STATE_DIR", world.dir.path())
        .env("AWS_ENDPOINT_URL", world.local.endpoint())
        // A shell set for another region: amictl reads the policy's region (us-east-1), so the
        // groups below are still found (the emulator keeps each region apart, as AWS does).
        .env("AWS_REGION", "eu-west-1")
        .env("AWS_ACCESS_KEY_ID", creds.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", creds.secret_access_key())
        .env(
            "AWS_SESSION_TOKEN",
            creds.session_token().unwrap_or_default(),
        )
        .env_remove("AWS_PROFILE")
        .output()
        .await
        .unwrap();
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "amictl status printed no report ({e}; {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // Exit 3 exactly when a group's last refresh failed or rolled back, or a stage is halted.
    let failed = reports["stages"][0]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["state"] == "failed" || g["state"] == "rolled-back");
    let halted = reports["stages"][0]["runs"]
        .as_array()
        .is_some_and(|runs| runs.iter().any(|r| r["halted"] == true))
        || reports["stages"][0]["gates"]
            .as_array()
            .is_some_and(|gates| gates.iter().any(|g| g["state"] == "halted"));
    assert_eq!(
        out.status.code(),
        Some(if failed || halted { 3 } else { 0 }),
        "amictl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reports["stages"][0].clone()
}

/// A launch template named `name` with one version on `ami` in `account`; its id.
async fn template(world: &World, account: &str, name: &str, ami: &str) -> String {
    let ec2 = aws_sdk_ec2::Client::new(world.config(account));
    support::make::launch_template(&ec2, name, ami).await
}

/// Each instance's AMI in `account`, by instance id.
async fn instance_amis(world: &World, account: &str, ids: &[String]) -> BTreeMap<String, String> {
    let ec2 = aws_sdk_ec2::Client::new(world.config(account));
    let out = ec2
        .describe_instances()
        .set_instance_ids(Some(ids.to_vec()))
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap().to_owned(),
                i.image_id().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Point 5: `amictl status` counts instances by the AMI each runs, whatever its group's state: a
/// skipped group on the golden AMI has no instance off golden.
#[tokio::test]
async fn status_counts_instances_by_the_ami_they_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    // Status only reads AWS: no worker runs.
    let world = World::provisioned("small", &[]).await;
    let uat = "222222222222";
    let history: Vec<String> = world.state["amis"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let golden = history.last().unwrap().clone();
    let lt = template(&world, uat, "uat-golden-skipped", &golden).await;
    let asg = aws_sdk_autoscaling::Client::new(world.config(uat));
    asg.create_auto_scaling_group()
        .auto_scaling_group_name("uat-golden-skipped")
        .min_size(0)
        .max_size(4)
        .desired_capacity(2)
        .availability_zones("us-east-1a")
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(&lt)
                .version("1")
                .build(),
        )
        .tags(
            aws_sdk_autoscaling::types::Tag::builder()
                .key("amiflow:skip")
                .value("true")
                .resource_id("uat-golden-skipped")
                .resource_type("auto-scaling-group")
                .propagate_at_launch(false)
                .build(),
        )
        .send()
        .await
        .unwrap();

    let report = amictl_status(&world, "uat").await;
    let groups = report["groups"].as_array().unwrap();
    let ours = groups
        .iter()
        .find(|g| g["name"] == "uat-golden-skipped")
        .expect("status lists the group");
    assert_eq!(ours["state"], "skipped", "{ours:#}");
    assert_eq!(ours["instances"], 2, "{ours:#}");
    assert_eq!(ours["instances_off_golden"], 0, "{ours:#}");
    assert_eq!(
        ours["instances_by_ami"],
        serde_json::json!({"golden": 2, "previous_golden": 0, "older_golden": 0, "other": 0})
    );

    // Every group of the stage: the counts are what its instances run, read from EC2 here.
    let described = asg.describe_auto_scaling_groups().send().await.unwrap();
    let mut skipped_off_golden = 0;
    for g in described.auto_scaling_groups() {
        let name = g.auto_scaling_group_name().unwrap();
        let ids: Vec<String> = g
            .instances()
            .iter()
            .map(|i| i.instance_id().unwrap().to_owned())
            .collect();
        let amis = instance_amis(&world, uat, &ids).await;
        let reported = groups
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("status lists no {name}"));
        let count = |ami: &str| amis.values().filter(|a| *a == ami).count();
        let by_ami = &reported["instances_by_ami"];
        if reported["state"] == "untouched" {
            assert_eq!(by_ami["other"], ids.len(), "{name}: {reported:#}");
            assert_eq!(reported["instances_off_golden"], 0, "{name}");
            continue;
        }
        if reported["parameter"] != PARAMETER {
            // Another family's group, judged against its own parameter (one value, no history).
            let win = world.state["amis"]["other_family"].as_str().unwrap();
            assert_eq!(by_ami["golden"], count(win), "{name}: {reported:#}");
            continue;
        }
        let (previous, older) = (count(&history[1]), count(&history[0]));
        assert_eq!(
            (
                &by_ami["golden"],
                &by_ami["previous_golden"],
                &by_ami["older_golden"],
                &by_ami["other"]
            ),
            (
                &Value::from(count(&golden)),
                &Value::from(previous),
                &Value::from(older),
                &Value::from(ids.len() - count(&golden) - previous - older)
            ),
            "{name}: {reported:#} against {amis:?}"
        );
        assert_eq!(
            reported["instances_off_golden"],
            ids.len() - count(&golden),
            "{name}"
        );
        if reported["state"] == "skipped" {
            skipped_off_golden += ids.len() - count(&golden);
        }
    }
    // The seed world's skipped groups (skip tag, launch configuration) run last month's AMI.
    assert!(skipped_off_golden > 0, "{groups:#?}");
}

/// Point 5: a skip reason longer than one tag value (the refresh-worker's reason for a stack that
/// takes the AMI through `{{resolve:ssm:...}}` is) is kept whole, and `amictl status` shows the
/// same words as the `AsgRefreshFinished` that reported it.
#[tokio::test]
async fn a_long_skip_reason_reads_whole_in_status() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start("small", &[]).await;
    let uat = "222222222222";
    let (candidate, _) = amis(&world);
    let group = world
        .groups(uat)
        .into_iter()
        .find(|g| g["kind"] == "cfn-resolve")
        .expect("world.py builds a cfn-resolve group in uat");
    let name = group["name"].as_str().unwrap().to_owned();
    support::publish(
        &world,
        &mut support::Audit::default(),
        Duration::from_secs(120),
    )
    .await;
    // qa passes; uat's window then promotes it (the gate) and plans.
    support::pass_first_stage(&world).await;
    open_window(&world, uat, "uat", Utc::now()).await;
    let audit = tokio::sync::Mutex::new(support::Audit::default());
    let said = e2e::eventually(
        &format!("an outcome for {name}"),
        Duration::from_secs(120),
        || async {
            let mut audit = audit.lock().await;
            support::collect(&world, &mut audit).await;
            audit.outcomes(uat, &name, &candidate).cloned()
        },
    )
    .await;
    let (outcome, reason) = &said[0];
    assert_eq!(outcome, "skipped", "{said:?}");
    assert!(
        reason.chars().count() > 256,
        "a reason longer than one tag: {reason}"
    );
    assert!(
        reason.ends_with("Change the template to use such a parameter"),
        "{reason}"
    );

    let report = amictl_status(&world, "uat").await;
    let reported = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name.as_str())
        .unwrap_or_else(|| panic!("status lists no {name}"))
        .clone();
    assert_eq!(reported["state"], "skipped", "{reported:#}");
    assert_eq!(reported["reason"], reason.as_str(), "{reported:#}");
}

/// The image of every version of launch template `id` in `account`, oldest first.
async fn template_images(world: &World, account: &str, id: &str) -> Vec<String> {
    let ec2 = aws_sdk_ec2::Client::new(world.config(account));
    let out = ec2
        .describe_launch_template_versions()
        .launch_template_id(id)
        .send()
        .await
        .unwrap();
    let mut versions: Vec<(i64, String)> = out
        .launch_template_versions()
        .iter()
        .map(|v| {
            (
                v.version_number().unwrap_or_default(),
                v.launch_template_data()
                    .and_then(|d| d.image_id())
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    versions.sort();
    versions.into_iter().map(|(_, image)| image).collect()
}

/// A two-instance group `name` on `main` (pinned to version 1) whose first, highest-priority
/// override (t3.small) launches from `over` version 1: every instance launches from `over`.
async fn group_with_override(world: &World, account: &str, name: &str, main: &str, over: &str) {
    use aws_sdk_autoscaling::types::{
        LaunchTemplate, LaunchTemplateOverrides, LaunchTemplateSpecification, MixedInstancesPolicy,
    };
    let spec = |id: &str| {
        LaunchTemplateSpecification::builder()
            .launch_template_id(id)
            .version("1")
            .build()
    };
    aws_sdk_autoscaling::Client::new(world.config(account))
        .create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .min_size(0)
        .max_size(4)
        .desired_capacity(2)
        .availability_zones("us-east-1a")
        .mixed_instances_policy(
            MixedInstancesPolicy::builder()
                .launch_template(
                    LaunchTemplate::builder()
                        .launch_template_specification(spec(main))
                        .overrides(
                            LaunchTemplateOverrides::builder()
                                .instance_type("t3.small")
                                .launch_template_specification(spec(over))
                                .build(),
                        )
                        .overrides(
                            LaunchTemplateOverrides::builder()
                                .instance_type("t3.micro")
                                .build(),
                        )
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
}

async fn group_instance_amis(world: &World, account: &str, name: &str) -> Vec<String> {
    let asg = aws_sdk_autoscaling::Client::new(world.config(account));
    let out = asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .unwrap();
    let ids: Vec<String> = out.auto_scaling_groups()[0]
        .instances()
        .iter()
        .map(|i| i.instance_id().unwrap().to_owned())
        .collect();
    instance_amis(world, account, &ids)
        .await
        .into_values()
        .collect()
}

/// Point 1: mixed-instances groups whose override launches from a second template. A rollout
/// moves every template on an earlier golden AMI (main and override), leaves a template on
/// another family's AMI or already on the new AMI alone, reports an override whose template is
/// gone as failed with the reason, and status calls a group current only when no template it can
/// launch from holds an earlier golden AMI.
#[tokio::test]
async fn a_group_is_judged_and_moved_by_every_launch_template_it_can_launch_from() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start("small", &[]).await;
    let uat = "222222222222";
    let (candidate, _) = amis(&world);
    let golden = world.state["amis"]["current"].as_str().unwrap().to_owned();
    let win = world.state["amis"]["other_family"]
        .as_str()
        .unwrap()
        .to_owned();
    support::publish(
        &world,
        &mut support::Audit::default(),
        Duration::from_secs(120),
    )
    .await;
    // uat holds the candidate (promoted by its gate at a first window) before the groups are made.
    support::promote_second_stage(&world).await;

    // (group, main template's AMI, override template's AMI)
    let cases = [
        ("uat-over-old", &golden, &golden),
        ("uat-over-win", &golden, &win),
        ("uat-over-new", &golden, &candidate),
        ("uat-over-gone", &golden, &golden),
    ];
    let mut templates = BTreeMap::new();
    for (name, main, over) in cases {
        let main_id = template(&world, uat, &format!("{name}-main"), main).await;
        let over_id = template(&world, uat, &format!("{name}-override"), over).await;
        group_with_override(&world, uat, name, &main_id, &over_id).await;
        templates.insert(name, (main_id, over_id));
    }
    // The override's template deleted after the group was made.
    aws_sdk_ec2::Client::new(world.config(uat))
        .delete_launch_template()
        .launch_template_id(&templates["uat-over-gone"].1)
        .send()
        .await
        .unwrap();
    assert_eq!(
        group_instance_amis(&world, uat, "uat-over-win").await,
        [win.clone(), win.clone()],
        "instances launch from the override's template"
    );

    // Before the window: the override on the new AMI does not make a group current, nor does a
    // main template on an AMI make an override on an earlier one invisible.
    let before = amictl_status(&world, "uat").await;
    let state_of = |report: &Value, name: &str| {
        report["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("status lists no {name}"))
            .clone()
    };
    for name in ["uat-over-old", "uat-over-win", "uat-over-new"] {
        assert_eq!(state_of(&before, name)["state"], "stale", "{name}");
    }
    let gone = state_of(&before, "uat-over-gone");
    assert_eq!(gone["state"], "failed", "{gone:#}");
    assert!(
        gone["reason"]
            .as_str()
            .unwrap()
            .starts_with("the mixed-instances override for t3.small: launch template"),
        "{gone:#}"
    );

    // The next window (a minute later: another deadline than the first).
    open_window(
        &world,
        uat,
        "uat",
        Utc::now() + chrono::Duration::minutes(1),
    )
    .await;
    let audit = tokio::sync::Mutex::new(support::Audit::default());
    let outcomes = e2e::eventually(
        "an outcome for every group with overrides",
        Duration::from_secs(240),
        || async {
            let mut audit = audit.lock().await;
            support::collect(&world, &mut audit).await;
            let mut found = BTreeMap::new();
            for (name, _, _) in cases {
                found.insert(name, audit.outcomes(uat, name, &candidate)?.clone());
            }
            Some(found)
        },
    )
    .await;
    let first = |name: &str| outcomes[name][0].clone();
    for name in ["uat-over-old", "uat-over-win", "uat-over-new"] {
        assert_eq!(first(name).0, "succeeded", "{name}: {:?}", outcomes[name]);
    }
    let (outcome, reason) = first("uat-over-gone");
    assert_eq!(outcome, "failed");
    assert_eq!(
        reason,
        format!(
            "the mixed-instances override for t3.small: launch template {} version 1 does not exist; fix the group's MixedInstancesPolicy",
            templates["uat-over-gone"].1
        )
    );

    // Every template on the earlier golden AMI got exactly one new version; the others none.
    let images = |name: &'static str, which: usize| {
        let (main, over) = &templates[name];
        let id = if which == 0 {
            main.clone()
        } else {
            over.clone()
        };
        let world = &world;
        async move { template_images(world, uat, &id).await }
    };
    let moved = vec![golden.clone(), candidate.clone()];
    assert_eq!(images("uat-over-old", 0).await, moved);
    assert_eq!(images("uat-over-old", 1).await, moved, "the override moved");
    assert_eq!(images("uat-over-win", 0).await, moved);
    assert_eq!(
        images("uat-over-win", 1).await,
        std::slice::from_ref(&win),
        "left alone"
    );
    assert_eq!(images("uat-over-new", 0).await, moved);
    assert_eq!(
        images("uat-over-new", 1).await,
        std::slice::from_ref(&candidate),
        "already there"
    );
    assert_eq!(
        images("uat-over-gone", 0).await,
        std::slice::from_ref(&golden),
        "nothing moved"
    );
    // The instances run what their template now says.
    assert_eq!(
        group_instance_amis(&world, uat, "uat-over-old").await,
        [candidate.clone(), candidate.clone()]
    );
    assert_eq!(
        group_instance_amis(&world, uat, "uat-over-win").await,
        [win.clone(), win.clone()]
    );

    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let after = amictl_status(&world, "uat").await;
    for name in ["uat-over-old", "uat-over-win", "uat-over-new"] {
        assert_eq!(state_of(&after, name)["state"], "current", "{name}");
    }
    assert_eq!(state_of(&after, "uat-over-gone")["state"], "failed");
}

async fn default_version(world: &World, account: &str, template: &str) -> i64 {
    aws_sdk_ec2::Client::new(world.config(account))
        .describe_launch_templates()
        .launch_template_ids(template)
        .send()
        .await
        .unwrap()
        .launch_templates()[0]
        .default_version_number()
        .unwrap()
}

/// Open `account`'s window of `stage`, opening `opens`.
async fn open_window(world: &World, account: &str, stage: &str, opens: chrono::DateTime<Utc>) {
    world
        .put(
            account,
            &Detail::from(events::RolloutWindowOpened::new(
                account,
                stage,
                opens,
                opens + chrono::Duration::hours(4),
            )),
        )
        .await;
}

/// Point 2: a `$Default` group whose default version is set back by hand while amiflow refreshes
/// it. The refresh is not reported succeeded but superseded, with what was changed; the next
/// window respects the hand-made choice (the policy's default) and says so.
#[tokio::test]
async fn a_default_version_changed_by_hand_during_a_refresh_is_reported_and_respected() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start("small", &[]).await;
    let uat = "222222222222";
    let (candidate, _) = amis(&world);
    let golden = world.state["amis"]["current"].as_str().unwrap().to_owned();
    support::publish(
        &world,
        &mut support::Audit::default(),
        Duration::from_secs(120),
    )
    .await;
    // qa passes; uat's window then promotes it (the gate) and plans.
    support::pass_first_stage(&world).await;
    let name = "uat-by-hand";
    let lt = template(&world, uat, name, &golden).await;
    aws_sdk_autoscaling::Client::new(world.config(uat))
        .create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .min_size(0)
        .max_size(4)
        .desired_capacity(2)
        .availability_zones("us-east-1a")
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(&lt)
                .version("$Default")
                .build(),
        )
        .send()
        .await
        .unwrap();

    open_window(&world, uat, "uat", Utc::now()).await;
    // The refresh-worker makes version 2 (the candidate) the default; the operator sets 1 again.
    e2e::eventually(
        "the refresh-worker to make version 2 the default",
        Duration::from_secs(120),
        || async { (default_version(&world, uat, &lt).await == 2).then_some(()) },
    )
    .await;
    aws_sdk_ec2::Client::new(world.config(uat))
        .modify_launch_template()
        .launch_template_id(&lt)
        .default_version("1")
        .send()
        .await
        .unwrap();

    let audit = tokio::sync::Mutex::new(support::Audit::default());
    // Every outcome reported for the group, once `done` holds for them.
    let outcomes = |done: fn(&[(String, String)]) -> bool| {
        let (audit, world, candidate) = (&audit, &world, &candidate);
        async move {
            let mut audit = audit.lock().await;
            support::collect(world, &mut audit).await;
            audit
                .outcomes(uat, name, candidate)
                .filter(|o| done(o))
                .cloned()
        }
    };
    let said = e2e::eventually("the refresh's outcome", Duration::from_secs(120), || {
        outcomes(|o| !o.is_empty())
    })
    .await;
    // The request's poll may repeat it in the same window; every report says the same.
    assert!(said.iter().all(|o| *o == said[0]), "{said:?}");
    assert_eq!(
        said[0],
        (
            "skipped".to_owned(),
            format!(
                "superseded: the default version was changed by hand to 1 during the refresh; {lt} launches {golden}, not {candidate}"
            )
        )
    );
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let report = amictl_status(&world, "uat").await;
    let reported = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .unwrap()
        .clone();
    assert_eq!(
        (&reported["state"], &reported["reason"]),
        (&Value::from("skipped"), &Value::from(said[0].1.clone())),
        "{reported:#}"
    );

    // The next window: the hand-made choice stands, reported.
    open_window(
        &world,
        uat,
        "uat",
        Utc::now() + chrono::Duration::minutes(1),
    )
    .await;
    let first = said[0].1.clone();
    let said = e2e::eventually(
        "the next window's outcome",
        Duration::from_secs(120),
        || outcomes(|o| o.iter().any(|(_, r)| r.starts_with("respecting"))),
    )
    .await;
    let next: Vec<&(String, String)> = said.iter().filter(|(_, r)| *r != first).collect();
    assert!(
        next.iter().all(|(o, r)| o == "skipped"
            && r.starts_with(&format!("respecting a hand-made change ({first}"))),
        "{said:?}"
    );
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    assert_eq!(
        default_version(&world, uat, &lt).await,
        1,
        "left as set by hand"
    );
}

/// Point 4: the refresh-worker starts a refresh of a `$Latest` group and cannot write its mark (the
/// tag write is refused), then dies (SIGKILL). Its successor, asked again, adopts the orphaned
/// refresh instead of finding the group "already on the AMI": the outcome names the refresh, and
/// the group's mark names this rollout's AMI and that refresh.
#[tokio::test]
async fn a_refresh_orphaned_between_its_start_and_its_mark_is_adopted_by_the_next_worker() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start("small", &[]).await;
    let uat = "222222222222";
    let hub = world.hub();
    let (candidate, _) = amis(&world);
    let golden = world.state["amis"]["current"].as_str().unwrap().to_owned();
    support::publish(
        &world,
        &mut support::Audit::default(),
        Duration::from_secs(120),
    )
    .await;
    // uat holds the candidate (promoted by its gate at a window) before the group is made.
    support::promote_second_stage(&world).await;
    let name = "uat-orphan";
    let lt = template(&world, uat, name, &golden).await;
    let asg = aws_sdk_autoscaling::Client::new(world.config(uat));
    asg.create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .min_size(0)
        .max_size(4)
        .desired_capacity(2)
        .availability_zones("us-east-1a")
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(&lt)
                .version("$Latest")
                .build(),
        )
        .send()
        .await
        .unwrap();

    // Every tag write in uat is refused from now on: the refresh starts, its mark never lands.
    world.local.faults(&serde_json::json!({"deny": [
        {"account": uat, "action": "autoscaling:CreateOrUpdateTags", "times": 1000}
    ]}));
    let deadline = Utc::now() + chrono::Duration::hours(4);
    let request = events::AsgRefreshRequested::new(
        "e2e-orphan",
        uat,
        name,
        PARAMETER,
        &candidate,
        events::Strategy::LaunchTemplate,
        Some(deadline),
    );
    world.put(uat, &Detail::from(request.clone())).await;
    let refreshes = || {
        let asg = asg.clone();
        async move {
            asg.describe_instance_refreshes()
                .auto_scaling_group_name(name)
                .send()
                .await
                .unwrap()
                .instance_refreshes()
                .iter()
                .map(|r| r.instance_refresh_id().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let orphan = e2e::eventually("the refresh to start", Duration::from_secs(60), || async {
        refreshes().await.first().cloned()
    })
    .await;
    // The refused mark sends the request to the DLQ; then the worker dies.
    e2e::eventually(
        "the unmarked request in the refresh DLQ",
        Duration::from_secs(60),
        || async { (world.depth(uat, &world.dlq_url(uat, "refresh")).await > 0).then_some(()) },
    )
    .await;
    let tags = |group: &str| {
        let asg = asg.clone();
        let group = group.to_owned();
        async move {
            asg.describe_auto_scaling_groups()
                .auto_scaling_group_names(group)
                .send()
                .await
                .unwrap()
                .auto_scaling_groups()[0]
                .tags()
                .iter()
                .map(|t| {
                    (
                        t.key().unwrap().to_owned(),
                        t.value().unwrap_or_default().to_owned(),
                    )
                })
                .collect::<BTreeMap<_, _>>()
        }
    };
    assert!(!tags(name).await.contains_key("amiflow:refresh"), "no mark");
    let mut killed = None;
    for i in 0..world.worker_count().await {
        // The uat refresh-worker is the eighth process (qa: five, then uat's param, plan, refresh).
        if i == 7 {
            killed = Some(world.kill_and_restart(i).await);
        }
    }
    assert_eq!(killed.as_deref(), Some("refresh-worker@222222222222"));
    world.local.faults(&serde_json::json!({"deny": []}));

    // Asked again (the next window's plan would ask the same): the new worker adopts the refresh.
    let audit_url = world.queue_url(&hub, "audit");
    world.put(uat, &Detail::from(request)).await;
    let finished = e2e::eventually(
        "the adopted refresh's outcome",
        Duration::from_secs(120),
        || async {
            world.drain(&hub, &audit_url).await.into_iter().find(|b| {
                b["detail-type"] == "AsgRefreshFinished" && b["detail"]["asg_name"] == name
            })
        },
    )
    .await;
    let d = &finished["detail"];
    assert_eq!(
        (d["outcome"].as_str(), d["instance_refresh_id"].as_str()),
        (Some("succeeded"), Some(orphan.as_str())),
        "{d:#}"
    );
    assert_eq!(
        refreshes().await,
        std::slice::from_ref(&orphan),
        "no second refresh"
    );
    let marked = tags(name).await;
    assert_eq!(
        marked.get("amiflow:refresh").map(String::as_str),
        Some(&*format!(
            "{candidate}|succeeded|{orphan}|{}|{PARAMETER}",
            deadline.format("%Y-%m-%dT%H:%M:%SZ")
        )),
        "{marked:?}"
    );
}

/// A CloudFormation stack in `account` that owns launch template `{group}-lt` and group `group`
/// (two instances), and declares `tags` on the group. The AMI comes through an
/// `AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>` parameter (amiflow refreshes the group by a
/// stack update), or through a `{{resolve:ssm:...}}` reference (amiflow skips it).
async fn stack_with_tags(
    world: &World,
    account: &str,
    stack: &str,
    group: &str,
    ssm_typed: bool,
    tags: &[(&str, &str)],
) {
    let mut parameters = serde_json::json!({"Capacity": {"Type": "Number", "Default": "2"}});
    let image = if ssm_typed {
        parameters["ImageId"] = serde_json::json!({
            "Type": "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>",
            "Default": PARAMETER,
        });
        serde_json::json!({"Ref": "ImageId"})
    } else {
        serde_json::json!(format!("{{{{resolve:ssm:{PARAMETER}}}}}"))
    };
    let tags: Vec<Value> = tags
        .iter()
        .map(|(k, v)| serde_json::json!({"Key": k, "Value": v, "PropagateAtLaunch": true}))
        .collect();
    let template = serde_json::json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        "Parameters": parameters,
        "Resources": {
            "LaunchTemplate": {
                "Type": "AWS::EC2::LaunchTemplate",
                "Properties": {
                    "LaunchTemplateName": format!("{group}-lt"),
                    "LaunchTemplateData": {"ImageId": image, "InstanceType": "t3.micro"},
                },
            },
            "Group": {
                "Type": "AWS::AutoScaling::AutoScalingGroup",
                "Properties": {
                    "AutoScalingGroupName": group,
                    "LaunchTemplate": {
                        "LaunchTemplateId": {"Ref": "LaunchTemplate"},
                        "Version": {"Fn::GetAtt": ["LaunchTemplate", "LatestVersionNumber"]},
                    },
                    "MinSize": "0",
                    "MaxSize": "10",
                    "DesiredCapacity": {"Ref": "Capacity"},
                    "AvailabilityZones": ["us-east-1a"],
                    "Tags": tags,
                },
            },
        },
    });
    aws_sdk_cloudformation::Client::new(world.config(account))
        .create_stack()
        .stack_name(stack)
        .template_body(template.to_string())
        .send()
        .await
        .unwrap();
    stack_status_becomes(world, account, stack, "CREATE_COMPLETE").await;
}

async fn stack_status_becomes(world: &World, account: &str, stack: &str, want: &str) {
    let cfn = aws_sdk_cloudformation::Client::new(world.config(account));
    e2e::eventually(
        &format!("stack {stack} {want}"),
        Duration::from_secs(60),
        || async {
            let out = cfn
                .describe_stacks()
                .stack_name(stack)
                .send()
                .await
                .unwrap();
            let status = out.stacks()[0].stack_status().unwrap().as_str().to_owned();
            assert!(
                status == want || status.ends_with("_IN_PROGRESS"),
                "stack {stack} is {status}, not {want}"
            );
            (status == want).then_some(())
        },
    )
    .await;
}

/// What a drift detection compares for a group's tags: the tags the stack's template declares on
/// it (read back from CloudFormation), and the group's tags but those AWS itself puts on every
/// stack resource (`aws:cloudformation:*`, never drift).
async fn declared_and_actual_tags(
    world: &World,
    account: &str,
    stack: &str,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let cfn = aws_sdk_cloudformation::Client::new(world.config(account));
    let body = cfn
        .get_template()
        .stack_name(stack)
        .send()
        .await
        .unwrap()
        .template_body()
        .unwrap()
        .to_owned();
    let template: Value = serde_json::from_str(&body).unwrap();
    let declared = template["Resources"]["Group"]["Properties"]["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["Key"].as_str().unwrap().to_owned(),
                t["Value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The stack's resource is the group read below.
    let resource = cfn
        .describe_stack_resource()
        .stack_name(stack)
        .logical_resource_id("Group")
        .send()
        .await
        .unwrap();
    let group = resource
        .stack_resource_detail()
        .unwrap()
        .physical_resource_id()
        .unwrap()
        .to_owned();
    let described = aws_sdk_autoscaling::Client::new(world.config(account))
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(&group)
        .send()
        .await
        .unwrap();
    let actual = described.auto_scaling_groups()[0]
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
        .filter(|(k, _)| !k.starts_with("aws:cloudformation:"))
        .collect();
    (declared, actual)
}

/// The refresh-worker's mark on a stack-owned group, as its SSM parameter holds it.
async fn mark_parameter(world: &World, account: &str, name: &str) -> Value {
    let out = aws_sdk_ssm::Client::new(world.config(account))
        .get_parameter()
        .name(name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("no mark parameter {name}: {e:?}"));
    serde_json::from_str(out.parameter().unwrap().value().unwrap()).unwrap()
}

/// Point 6: a group a CloudFormation stack owns, whose template declares its tags, keeps exactly
/// those tags through a rollout that refreshes it, or skips it: amiflow keeps its mark in an SSM
/// parameter of the account instead (drift detection reports any other tag on the group as a
/// change made outside the stack), status reads the state and reason from there, and the stack's
/// next update goes through as if amiflow had never been there.
///
/// moto 5.2.5 has no DetectStackDrift, so the test compares what drift detection compares for
/// tags: the template's declared tags with the group's own, `aws:cloudformation:*` aside.
#[tokio::test]
async fn stack_owned_groups_keep_exactly_their_templates_tags() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start("small", &[]).await;
    let uat = "222222222222";
    let (candidate, _) = amis(&world);
    // An underscore and a dot: the parameter name escapes what SSM names cannot hold verbatim.
    let (moved, skipped) = ("uat-drift_app.v1", "uat-drift-resolve");
    let tags = [("team", "payments"), ("cost-centre", "cc-42")];
    stack_with_tags(&world, uat, "drift-app", moved, true, &tags).await;
    stack_with_tags(&world, uat, "drift-resolve", skipped, false, &tags).await;
    for stack in ["drift-app", "drift-resolve"] {
        let (declared, actual) = declared_and_actual_tags(&world, uat, stack).await;
        assert_eq!(declared.len(), 2, "{declared:?}");
        assert_eq!(actual, declared, "{stack}: as created");
    }

    // The candidate is built and qa passes it; uat's window then promotes uat through its gate.
    support::publish(
        &world,
        &mut support::Audit::default(),
        Duration::from_secs(120),
    )
    .await;
    support::pass_first_stage(&world).await;
    open_window(&world, uat, "uat", Utc::now()).await;
    let audit = tokio::sync::Mutex::new(support::Audit::default());
    let outcomes = e2e::eventually(
        "outcomes for both stack-owned groups",
        Duration::from_secs(240),
        || async {
            let mut audit = audit.lock().await;
            support::collect(&world, &mut audit).await;
            let moved = audit.outcomes(uat, moved, &candidate)?.clone();
            let skipped = audit.outcomes(uat, skipped, &candidate)?.clone();
            Some((moved, skipped))
        },
    )
    .await;
    let (said_moved, said_skipped) = (&outcomes.0[0], &outcomes.1[0]);
    assert_eq!(said_moved.0, "succeeded", "{outcomes:?}");
    assert_eq!(said_skipped.0, "skipped", "{outcomes:?}");
    assert!(said_skipped.1.contains("resolve:ssm"), "{said_skipped:?}");
    assert_eq!(
        group_instance_amis(&world, uat, moved).await,
        [candidate.clone(), candidate.clone()],
        "the stack-owned group was refreshed"
    );
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;

    // No drift: each group's tags are exactly its template's.
    for stack in ["drift-app", "drift-resolve"] {
        let (declared, actual) = declared_and_actual_tags(&world, uat, stack).await;
        assert_eq!(actual, declared, "{stack}: after the rollout");
    }
    // Nor on the world's own stack-owned groups, which the rollout refreshed or skipped too.
    for g in world.groups(uat) {
        if g["strategy"] == "cloudformation" {
            let name = g["name"].as_str().unwrap();
            let described = aws_sdk_autoscaling::Client::new(world.config(uat))
                .describe_auto_scaling_groups()
                .auto_scaling_group_names(name)
                .send()
                .await
                .unwrap();
            let keys: Vec<&str> = described.auto_scaling_groups()[0]
                .tags()
                .iter()
                .filter_map(|t| t.key())
                .filter(|k| k.starts_with("amiflow:"))
                .collect();
            assert!(keys.is_empty(), "{name}: {keys:?}");
        }
    }

    // The marks are in the account's SSM parameters, where a restarted worker reads them.
    let mark = mark_parameter(&world, uat, "/amiflow/marks/uat-drift_5Fapp.v1").await;
    assert_eq!(
        (mark["group"].as_str(), mark["state"].as_str()),
        (Some(moved), Some("succeeded")),
        "{mark}"
    );
    assert!(
        mark["refresh"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{candidate}|succeeded|")),
        "{mark}"
    );
    let mark = mark_parameter(&world, uat, &format!("/amiflow/marks/{skipped}")).await;
    assert_eq!(
        (
            mark["group"].as_str(),
            mark["state"].as_str(),
            mark["reason"].as_str()
        ),
        (
            Some(skipped),
            Some("skipped"),
            Some(said_skipped.1.as_str())
        ),
        "{mark}"
    );

    // Status reads them: the refreshed group is current, the skipped one skipped with its reason.
    let report = amictl_status(&world, "uat").await;
    let state_of = |name: &str| {
        report["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("status lists no {name}"))
            .clone()
    };
    assert_eq!(state_of(moved)["state"], "current", "{:#}", state_of(moved));
    let reported = state_of(skipped);
    assert_eq!(
        (reported["state"].as_str(), reported["reason"].as_str()),
        (Some("skipped"), Some(said_skipped.1.as_str())),
        "{reported:#}"
    );

    // The stack's next update (its owner scales it) is undisturbed, and still no drift.
    aws_sdk_cloudformation::Client::new(world.config(uat))
        .update_stack()
        .stack_name("drift-app")
        .use_previous_template(true)
        .parameters(
            aws_sdk_cloudformation::types::Parameter::builder()
                .parameter_key("Capacity")
                .parameter_value("3")
                .build(),
        )
        .parameters(
            aws_sdk_cloudformation::types::Parameter::builder()
                .parameter_key("ImageId")
                .use_previous_value(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    stack_status_becomes(&world, uat, "drift-app", "UPDATE_COMPLETE").await;
    let described = aws_sdk_autoscaling::Client::new(world.config(uat))
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(moved)
        .send()
        .await
        .unwrap();
    assert_eq!(
        described.auto_scaling_groups()[0].desired_capacity(),
        Some(3)
    );
    let (declared, actual) = declared_and_actual_tags(&world, uat, "drift-app").await;
    assert_eq!(actual, declared, "after the stack's own update");
}
