//! Instance refresh as the Rust SDK reads it: the whole `InstanceRefresh` (status history,
//! rising PercentageComplete, preferences and desired configuration, end time) and a group whose
//! MixedInstancesPolicy survives an update. What the shim does beyond that (rollback, cancel,
//! failures, events) is checked with boto3 in local/tests/test_autoscaling.py.

use std::time::Instant;

use aws_sdk_autoscaling::types::{
    LaunchTemplateOverrides, MixedInstancesPolicy, RefreshPreferences,
};

use crate::fixture::{
    STEP, emulator, facts, group_lt_version, launch_facts, lt_spec, status, statuses,
};

#[tokio::test]
async fn refresh_to_a_pinned_version_replaces_every_instance_and_repoints_the_group() {
    let (_local, c) = emulator().await;
    let (a, b) = (c.register("golden-a").await, c.register("golden-b").await);
    let lt = c.template("web", &a).await;
    c.group_on("web", 4, &lt, "1", &[]).await;
    let before = c.members("web").await;
    assert_eq!(before.len(), 4);
    assert_eq!(launch_facts(&before), facts(&a, "1", "1"));
    assert_eq!(c.version_from(&lt, "1", &b).await, 2);

    let sent = Instant::now();
    let id = c
        .start_refresh(
            "web",
            Some((&lt, "2")),
            Some(
                RefreshPreferences::builder()
                    .min_healthy_percentage(50)
                    .instance_warmup(0)
                    .skip_matching(true)
                    .auto_rollback(true)
                    .checkpoint_percentages(50)
                    .checkpoint_percentages(100)
                    .checkpoint_delay(60)
                    .build(),
            ),
        )
        .await;
    let first = c.refresh("web", &id).await;
    let first_within = sent.elapsed();
    if first_within < STEP {
        // Answered within one step of the start: the refresh cannot have left Pending yet.
        assert_eq!(status(&first), "Pending", "{first:?}");
    }
    let (mut seen, done) = c.until_done("web", &id).await;
    seen.insert(
        0,
        (status(&first), first.percentage_complete().unwrap_or(-1)),
    );
    seen.dedup();

    let order = statuses(&seen);
    assert!(
        order == ["Pending", "InProgress", "Successful"] || order == ["InProgress", "Successful"],
        "status history {seen:?}"
    );
    let progress: Vec<i32> = seen
        .iter()
        .filter(|(s, _)| s == "InProgress")
        .map(|(_, p)| *p)
        .collect();
    assert!(
        progress.windows(2).all(|w| w[0] < w[1]),
        "PercentageComplete must rise: {seen:?}"
    );
    // 4 instances, batches of 2 (MinHealthyPercentage 50), a checkpoint pause at 50%.
    assert!(progress.contains(&50), "{seen:?}");
    assert!(progress.len() >= 2, "{seen:?}");
    assert_eq!(status(&done), "Successful");
    assert_eq!(done.percentage_complete(), Some(100));
    assert_eq!(done.instances_to_update(), Some(0));
    assert!(done.end_time().is_some());
    let prefs = done.preferences().unwrap();
    assert_eq!(prefs.min_healthy_percentage(), Some(50));
    assert_eq!(prefs.skip_matching(), Some(true));
    assert_eq!(prefs.auto_rollback(), Some(true));
    assert_eq!(prefs.checkpoint_percentages(), &[50, 100]);
    assert_eq!(
        done.desired_configuration()
            .and_then(|d| d.launch_template())
            .and_then(|t| t.version()),
        Some("2")
    );

    // The group points at version 2; every instance is new, on AMI B, from version 2.
    assert_eq!(
        group_lt_version(&c.group("web").await).as_deref(),
        Some("2")
    );
    let after = c.members("web").await;
    assert_eq!(after.len(), 4);
    assert!(
        after.keys().all(|i| !before.contains_key(i)),
        "every instance replaced"
    );
    assert_eq!(launch_facts(&after), facts(&b, "2", "2"));
    assert!(after.values().all(|m| m.state == "running"));
    // Version 2 inherited the instance type from version 1, and launches used it.
    assert!(after.values().all(|m| m.instance_type == "t3.micro"));
    let old = c.instances(before.keys().cloned().collect()).await;
    assert!(
        old.values().all(|i| i.state == "terminated"),
        "old instances terminated: {old:?}"
    );
}

#[tokio::test]
async fn update_without_mixed_instances_policy_keeps_the_policy() {
    let (_local, c) = emulator().await;
    let a = c.register("golden-a").await;
    c.template("keep", &a).await;
    let policy = MixedInstancesPolicy::builder()
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplate::builder()
                .launch_template_specification(lt_spec("keep", "1"))
                .overrides(
                    LaunchTemplateOverrides::builder()
                        .instance_type("t3.small")
                        .build(),
                )
                .build(),
        )
        .build();
    c.asg
        .create_auto_scaling_group()
        .auto_scaling_group_name("keep")
        .min_size(0)
        .max_size(5)
        .desired_capacity(1)
        .availability_zones("us-east-1a")
        .mixed_instances_policy(policy)
        .send()
        .await
        .unwrap();
    let before = c.group("keep").await;
    let kept = before
        .mixed_instances_policy()
        .expect("the group has its policy")
        .clone();

    c.asg
        .update_auto_scaling_group()
        .auto_scaling_group_name("keep")
        .max_size(7)
        .desired_capacity(2)
        .send()
        .await
        .unwrap();
    let after = c.group("keep").await;
    assert_eq!(after.max_size(), Some(7));
    assert_eq!(after.mixed_instances_policy(), Some(&kept));
    assert_eq!(
        kept.launch_template()
            .and_then(|t| t.overrides().first())
            .and_then(|o| o.instance_type()),
        Some("t3.small")
    );
    let members = c.members("keep").await;
    assert_eq!(members.len(), 2);
    assert!(
        members
            .values()
            .all(|m| m.instance_type == "t3.small" && m.image == a),
        "{members:?}"
    );
}
