//! Refresh preferences a stage sets, and a `$Default` group's default version after a refresh
//! that does not succeed, in the local world with the real worker binaries.
//!
//! The workers run a copy of local/amiflow.toml whose uat stage sets `min_healthy_percentage =
//! 100`, `max_healthy_percentage = 200` and `bake_time_seconds = 600`; the groups are made in the
//! test beside the seed world, and each is asked for its refresh directly (`AsgRefreshRequested`,
//! what the plan-worker sends when a window opens), so the seed world stays as it is.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_autoscaling::types::{LaunchTemplateSpecification, Tag};
use chrono::Utc;
use e2e::world::World;
use events::{AsgRefreshRequested, Detail, Strategy};
use support::{PARAMETER, amis};

/// The shim fails the refresh of a group with this tag (its replacements fail their health
/// checks), as `amictl demo` does to a uat group.
const FAIL_TAG: &str = "amiflow:emulator-refresh-outcome";

/// local/amiflow.toml with the uat stage's refresh preferences set.
fn policy_with_uat_preferences() -> String {
    let local =
        std::fs::read_to_string(emulator::project_root().join("local/amiflow.toml")).unwrap();
    let (before, uat) = local.split_once("name = \"uat\"").unwrap();
    let uat = uat.replacen(
        "min_healthy_percentage = 50",
        "min_healthy_percentage = 100\nmax_healthy_percentage = 200\nbake_time_seconds = 600",
        1,
    );
    assert!(
        uat.contains("bake_time_seconds"),
        "the uat stage sets min_healthy_percentage"
    );
    format!("{before}name = \"uat\"{uat}")
}

/// A launch template named `name` with one version on `ami` in `account`; its id.
async fn template(world: &World, account: &str, name: &str, ami: &str) -> String {
    let ec2 = aws_sdk_ec2::Client::new(world.config(account));
    support::make::launch_template(&ec2, name, ami).await
}

/// A group of two instances launching `template` at `version`, with `tags`.
async fn group(
    world: &World,
    account: &str,
    name: &str,
    template: &str,
    version: &str,
    tags: &[(&str, &str)],
) {
    let mut create = aws_sdk_autoscaling::Client::new(world.config(account))
        .create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .min_size(0)
        .max_size(4)
        .desired_capacity(2)
        .availability_zones("us-east-1a")
        .launch_template(
            LaunchTemplateSpecification::builder()
                .launch_template_id(template)
                .version(version)
                .build(),
        );
    for (k, v) in tags {
        create = create.tags(
            Tag::builder()
                .key(*k)
                .value(*v)
                .resource_id(name)
                .resource_type("auto-scaling-group")
                .propagate_at_launch(false)
                .build(),
        );
    }
    create.send().await.unwrap();
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

#[tokio::test]
async fn a_stages_refresh_preferences_are_sent_and_a_failed_default_refresh_puts_the_default_back()
{
    let world = World::provisioned("small", &[]).await;
    let policy = world.dir.path().join("amiflow-uat-preferences.toml");
    std::fs::write(&policy, policy_with_uat_preferences()).unwrap();
    world
        .start_workers(&[("AMIFLOW_CONFIG", policy.to_str().unwrap())])
        .await;
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
    // uat holds the candidate (promoted by its gate at a first window) before the groups are made:
    // the refresh-worker acts only on the AMI its stage's golden parameter holds.
    support::promote_second_stage(&world).await;

    // A pinned group, and a `$Default` group whose refresh the emulator fails.
    let pinned_lt = template(&world, uat, "uat-prefs", &golden).await;
    group(&world, uat, "uat-prefs", &pinned_lt, "1", &[]).await;
    let default_lt = template(&world, uat, "uat-default-fails", &golden).await;
    group(
        &world,
        uat,
        "uat-default-fails",
        &default_lt,
        "$Default",
        &[(FAIL_TAG, "fail")],
    )
    .await;
    assert_eq!(default_version(&world, uat, &default_lt).await, 1);

    let deadline = Utc::now() + chrono::Duration::hours(4);
    for name in ["uat-prefs", "uat-default-fails"] {
        let request = AsgRefreshRequested::new(
            &format!("e2e-preferences-{name}"),
            uat,
            name,
            PARAMETER,
            &candidate,
            Strategy::LaunchTemplate,
            Some(deadline),
        );
        world.put(uat, &Detail::from(request)).await;
    }
    // The `$Default` group's template gets the candidate as version 2, made the default.
    e2e::eventually(
        "the refresh-worker to make version 2 the default",
        Duration::from_secs(120),
        || async { (default_version(&world, uat, &default_lt).await == 2).then_some(()) },
    )
    .await;

    // The first outcome reported for each group (a poll may say it again).
    let audit_url = world.queue_url(&hub, "audit");
    let seen: std::sync::Mutex<BTreeMap<String, serde_json::Value>> = Default::default();
    let finished = e2e::eventually("both refreshes' outcomes", Duration::from_secs(180), || {
        let (world, hub, audit_url, seen) = (&world, &hub, &audit_url, &seen);
        async move {
            let bodies = world.drain(hub, audit_url).await;
            let mut seen = seen.lock().unwrap();
            for body in bodies {
                let name = body["detail"]["asg_name"].as_str().unwrap_or_default();
                // uat's own groups report from the window that promoted uat: not this test's.
                if body["detail-type"] == "AsgRefreshFinished"
                    && ["uat-prefs", "uat-default-fails"].contains(&name)
                {
                    seen.entry(name.to_owned())
                        .or_insert(body["detail"].clone());
                }
            }
            (seen.len() == 2).then(|| seen.clone())
        }
    })
    .await;

    // The failed `$Default` refresh: its default version is back where it was, and the outcome
    // says so.
    let failed = &finished["uat-default-fails"];
    let reason = failed["reason"].as_str().unwrap();
    assert_eq!(failed["outcome"], "failed", "{failed:#}");
    assert!(
        reason.contains("health checks")
            && reason.ends_with(&format!(
                "; the default version of {default_lt} was set back to 1 (from 2)"
            )),
        "{reason}"
    );
    assert_eq!(default_version(&world, uat, &default_lt).await, 1);
    let asg = aws_sdk_autoscaling::Client::new(world.config(uat));
    let images = support::reads::instance_amis(world.config(uat), "uat-default-fails").await;
    assert_eq!(
        images,
        vec![golden.clone(), golden.clone()],
        "still on the golden AMI"
    );

    // The pinned group's refresh carried exactly the stage's preferences, and succeeded.
    assert_eq!(
        (
            failed["outcome"].as_str(),
            finished["uat-prefs"]["outcome"].as_str()
        ),
        (Some("failed"), Some("succeeded")),
        "{:#}",
        finished["uat-prefs"]
    );
    let refreshes = asg
        .describe_instance_refreshes()
        .auto_scaling_group_name("uat-prefs")
        .send()
        .await
        .unwrap();
    let [refresh] = refreshes.instance_refreshes() else {
        panic!("one refresh: {refreshes:?}");
    };
    let prefs = refresh.preferences().unwrap();
    assert_eq!(
        (
            prefs.min_healthy_percentage(),
            prefs.max_healthy_percentage(),
            prefs.bake_time(),
            prefs.auto_rollback(),
        ),
        (Some(100), Some(200), Some(600), Some(true))
    );
    assert_eq!(
        Some(refresh.instance_refresh_id().unwrap()),
        finished["uat-prefs"]["instance_refresh_id"].as_str()
    );
    let images = support::reads::instance_amis(world.config(uat), "uat-prefs").await;
    assert_eq!(images, vec![candidate.clone(), candidate.clone()]);
    // The `$Default` group's refresh had them too (and no rollback: AWS cannot roll back a
    // `$Default` group).
    let refreshes = asg
        .describe_instance_refreshes()
        .auto_scaling_group_name("uat-default-fails")
        .send()
        .await
        .unwrap();
    let prefs = refreshes.instance_refreshes()[0].preferences().unwrap();
    assert_eq!(
        (
            prefs.max_healthy_percentage(),
            prefs.bake_time(),
            prefs.auto_rollback()
        ),
        (Some(200), Some(600), Some(false))
    );
    world
        .settle(Duration::from_secs(3), Duration::from_secs(60))
        .await;
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "nothing was refused"
    );
}
