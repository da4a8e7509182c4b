//! amiflow's extensions to the moto emulator (issue 4, part 1), end to end through the Rust SDK:
//! instance refresh (lifecycle, one active per group, cancel, rollback, failure injection, events),
//! group launches ($Latest, MixedInstancesPolicy kept, `resolve:ssm:` image ids), shared AMIs,
//! launch template version inheritance and describe (versions, filters, paging), SSM
//! `aws:ec2:image` validation, CloudFormation SSM re-resolution, and cross-account forwarding.
//!
//! Every test runs its own emulator (refresh step 300 ms) and asserts on the resulting state.
//! Progress is observed by polling with a deadline; nothing sleeps to synchronise.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use aws_sdk_autoscaling::types::{
    AutoScalingGroup, DesiredConfiguration, InstanceRefresh, LaunchTemplateOverrides,
    LaunchTemplateSpecification, MixedInstancesPolicy, RefreshPreferences, RefreshStrategy, Tag,
};
use aws_sdk_ec2::types::{
    CreateVolumePermission, CreateVolumePermissionModifications, Filter, InstanceType,
    LaunchPermission, LaunchPermissionModifications, LaunchTemplateTagSpecificationRequest,
    RequestLaunchTemplateData, ResourceType, SnapshotAttributeName,
};
use aws_sdk_ssm::types::ParameterType;
use e2e::{Local, eventually, queue_arn, sdk_config_in};

const WAIT: Duration = Duration::from_secs(60);
/// The emulator's refresh phase length (emulator::Options::default().refresh_step).
const STEP: Duration = Duration::from_millis(300);
const FAIL_TAG: &str = "amiflow:emulator-refresh-outcome";
const ACTIVE: [&str; 5] = [
    "Pending",
    "InProgress",
    "Baking",
    "Cancelling",
    "RollbackInProgress",
];
const DEFAULT_ACCOUNT: &str = "123456789012";
const IMAGE: &str = "aws:ec2:image";

// --- helpers --------------------------------------------------------------------------------------

struct Clients {
    ec2: aws_sdk_ec2::Client,
    asg: aws_sdk_autoscaling::Client,
    ssm: aws_sdk_ssm::Client,
    cfn: aws_sdk_cloudformation::Client,
}

impl Clients {
    fn new(config: &aws_config::SdkConfig) -> Self {
        Self {
            ec2: aws_sdk_ec2::Client::new(config),
            asg: aws_sdk_autoscaling::Client::new(config),
            ssm: aws_sdk_ssm::Client::new(config),
            cfn: aws_sdk_cloudformation::Client::new(config),
        }
    }

    async fn register(&self, name: &str) -> String {
        self.ec2
            .register_image()
            .name(name)
            .send()
            .await
            .unwrap()
            .image_id()
            .unwrap()
            .to_owned()
    }

    /// A launch template whose version 1 runs `ami` on t3.micro; returns its id.
    async fn template(&self, name: &str, ami: &str) -> String {
        self.ec2
            .create_launch_template()
            .launch_template_name(name)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(ami)
                    .instance_type(InstanceType::T3Micro)
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .launch_template()
            .unwrap()
            .launch_template_id()
            .unwrap()
            .to_owned()
    }

    /// A new version from `source` with only the ImageId changed; returns its number.
    async fn version_from(&self, lt: &str, source: &str, ami: &str) -> i64 {
        self.ec2
            .create_launch_template_version()
            .launch_template_id(lt)
            .source_version(source)
            .launch_template_data(RequestLaunchTemplateData::builder().image_id(ami).build())
            .send()
            .await
            .unwrap()
            .launch_template_version()
            .unwrap()
            .version_number()
            .unwrap()
    }

    async fn group_on(
        &self,
        name: &str,
        size: i32,
        lt: &str,
        version: &str,
        tags: &[(&str, &str)],
    ) {
        let mut req = self
            .asg
            .create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .min_size(0)
            .max_size(10)
            .desired_capacity(size)
            .availability_zones("us-east-1a")
            .launch_template(lt_spec(lt, version));
        for (k, v) in tags {
            req = req.tags(
                Tag::builder()
                    .key(*k)
                    .value(*v)
                    .propagate_at_launch(false)
                    .resource_id(name)
                    .resource_type("auto-scaling-group")
                    .build(),
            );
        }
        req.send().await.unwrap();
    }

    async fn group(&self, name: &str) -> AutoScalingGroup {
        self.asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .unwrap()
            .auto_scaling_groups()
            .first()
            .unwrap_or_else(|| panic!("group {name} exists"))
            .clone()
    }

    /// The group's members as EC2 and Auto Scaling report them.
    async fn members(&self, group: &str) -> BTreeMap<String, Member> {
        let g = self.group(group).await;
        let reported: BTreeMap<String, Option<String>> = g
            .instances()
            .iter()
            .map(|i| {
                (
                    i.instance_id().unwrap().to_owned(),
                    i.launch_template()
                        .and_then(|t| t.version())
                        .map(str::to_owned),
                )
            })
            .collect();
        if reported.is_empty() {
            return BTreeMap::new();
        }
        let mut out = BTreeMap::new();
        for (id, i) in self.instances(reported.keys().cloned().collect()).await {
            out.insert(
                id.clone(),
                Member {
                    image: i.image,
                    reported_version: reported[&id].clone(),
                    version_tag: i.tags.get("aws:ec2launchtemplate:version").cloned(),
                    instance_type: i.instance_type,
                    state: i.state,
                },
            );
        }
        out
    }

    async fn instances(&self, ids: Vec<String>) -> BTreeMap<String, Ec2Instance> {
        let out = self
            .ec2
            .describe_instances()
            .set_instance_ids(Some(ids))
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap().to_owned(),
                    Ec2Instance {
                        image: i.image_id().unwrap_or_default().to_owned(),
                        instance_type: i
                            .instance_type()
                            .map(|t| t.as_str().to_owned())
                            .unwrap_or_default(),
                        state: i
                            .state()
                            .and_then(|s| s.name())
                            .map(|n| n.as_str().to_owned())
                            .unwrap_or_default(),
                        tags: i
                            .tags()
                            .iter()
                            .map(|t| {
                                (
                                    t.key().unwrap_or_default().to_owned(),
                                    t.value().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect(),
                    },
                )
            })
            .collect()
    }

    async fn start_refresh(
        &self,
        group: &str,
        desired: Option<(&str, &str)>,
        preferences: Option<RefreshPreferences>,
    ) -> String {
        self.asg
            .start_instance_refresh()
            .auto_scaling_group_name(group)
            .strategy(RefreshStrategy::Rolling)
            .set_desired_configuration(desired.map(|(lt, v)| {
                DesiredConfiguration::builder()
                    .launch_template(lt_spec(lt, v))
                    .build()
            }))
            .set_preferences(preferences)
            .send()
            .await
            .unwrap()
            .instance_refresh_id()
            .unwrap()
            .to_owned()
    }

    async fn refresh(&self, group: &str, id: &str) -> InstanceRefresh {
        let out = self
            .asg
            .describe_instance_refreshes()
            .auto_scaling_group_name(group)
            .instance_refresh_ids(id)
            .send()
            .await
            .unwrap();
        assert_eq!(out.instance_refreshes().len(), 1, "{out:?}");
        out.instance_refreshes()[0].clone()
    }

    /// Poll a refresh (every 20 ms, deadline WAIT) until `until` holds, recording each distinct
    /// (Status, PercentageComplete) seen. Returns the history and the last description.
    async fn watch(
        &self,
        group: &str,
        id: &str,
        until: impl Fn(&InstanceRefresh) -> bool,
    ) -> (Vec<(String, i32)>, InstanceRefresh) {
        let deadline = Instant::now() + WAIT;
        let mut seen: Vec<(String, i32)> = Vec::new();
        loop {
            let item = self.refresh(group, id).await;
            let state = (status(&item), item.percentage_complete().unwrap_or(-1));
            if seen.last() != Some(&state) {
                seen.push(state);
            }
            if until(&item) {
                return (seen, item);
            }
            assert!(
                Instant::now() < deadline,
                "refresh {id} of {group} still going after {WAIT:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn until_done(&self, group: &str, id: &str) -> (Vec<(String, i32)>, InstanceRefresh) {
        self.watch(group, id, |r| !ACTIVE.contains(&status(r).as_str()))
            .await
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Member {
    image: String,
    reported_version: Option<String>,
    version_tag: Option<String>,
    instance_type: String,
    state: String,
}

#[derive(Debug, Clone)]
struct Ec2Instance {
    image: String,
    instance_type: String,
    state: String,
    tags: BTreeMap<String, String>,
}

fn lt_spec(lt: &str, version: &str) -> LaunchTemplateSpecification {
    let spec = LaunchTemplateSpecification::builder().version(version);
    if lt.starts_with("lt-") {
        spec.launch_template_id(lt).build()
    } else {
        spec.launch_template_name(lt).build()
    }
}

fn status(r: &InstanceRefresh) -> String {
    r.status()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default()
}

/// Distinct statuses in order of appearance.
fn statuses(seen: &[(String, i32)]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for (s, _) in seen {
        if out.last() != Some(&s.as_str()) {
            out.push(s);
        }
    }
    out
}

/// (image, reported version, EC2 version tag) of every member, deduplicated.
fn launch_facts(members: &BTreeMap<String, Member>) -> BTreeSet<(String, String, String)> {
    members
        .values()
        .map(|m| {
            (
                m.image.clone(),
                m.reported_version.clone().unwrap_or_default(),
                m.version_tag.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn facts(image: &str, reported: &str, tag: &str) -> BTreeSet<(String, String, String)> {
    BTreeSet::from([(image.to_owned(), reported.to_owned(), tag.to_owned())])
}

fn group_lt_version(g: &AutoScalingGroup) -> Option<String> {
    g.launch_template()
        .and_then(|t| t.version())
        .map(str::to_owned)
}

/// Error code of a failed SDK call (panics if the call succeeded).
fn code_of<T: std::fmt::Debug, E: ProvideErrorMetadata + std::fmt::Debug>(
    result: Result<T, E>,
) -> String {
    let err = result.expect_err("the call must fail");
    err.code()
        .unwrap_or_else(|| panic!("no error code in {err:?}"))
        .to_owned()
}

/// A queue in `config`'s account fed by a rule on `bus` with `pattern`; returns the queue URL.
async fn queue_for_rule(
    config: &aws_config::SdkConfig,
    bus: &str,
    rule: &str,
    pattern: &serde_json::Value,
) -> String {
    let sqs = aws_sdk_sqs::Client::new(config);
    let eb = aws_sdk_eventbridge::Client::new(config);
    let url = sqs
        .create_queue()
        .queue_name(format!("{rule}-q"))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let arn = queue_arn(&sqs, &url).await;
    eb.put_rule()
        .name(rule)
        .event_bus_name(bus)
        .event_pattern(pattern.to_string())
        .send()
        .await
        .unwrap();
    eb.put_targets()
        .rule(rule)
        .event_bus_name(bus)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("q")
                .arn(arn)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    url
}

/// Receive (and delete) event bodies from a queue in `config`'s account until `done` holds.
async fn events_until(
    config: &aws_config::SdkConfig,
    url: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let sqs = aws_sdk_sqs::Client::new(config);
    let deadline = Instant::now() + WAIT;
    let mut got: Vec<serde_json::Value> = Vec::new();
    while !done(&got) {
        assert!(
            Instant::now() < deadline,
            "events so far: {:?}",
            got.iter().map(|e| &e["detail-type"]).collect::<Vec<_>>()
        );
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        for m in out.messages() {
            sqs.delete_message()
                .queue_url(url)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
            got.push(serde_json::from_str(m.body().unwrap()).unwrap());
        }
    }
    got
}

fn unique_account(seed: u64) -> String {
    format!("{}", 210_000_000_000u64 + seed)
}

// --- instance refresh -----------------------------------------------------------------------------

#[tokio::test]
async fn refresh_to_a_pinned_version_replaces_every_instance_and_repoints_the_group() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
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
async fn one_active_refresh_per_group_and_cancel() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("golden-a").await, c.register("golden-b").await);
    let lt = c.template("busy", &a).await;
    c.version_from(&lt, "1", &b).await;
    c.group_on("busy", 6, &lt, "1", &[]).await;

    let none = c
        .asg
        .cancel_instance_refresh()
        .auto_scaling_group_name("busy")
        .send()
        .await;
    assert_eq!(code_of(none), "ActiveInstanceRefreshNotFound");

    let id = c.start_refresh("busy", Some((&lt, "2")), None).await;
    let second = c
        .asg
        .start_instance_refresh()
        .auto_scaling_group_name("busy")
        .desired_configuration(
            DesiredConfiguration::builder()
                .launch_template(lt_spec(&lt, "2"))
                .build(),
        )
        .send()
        .await;
    assert_eq!(code_of(second), "InstanceRefreshInProgress");

    let cancelled = c
        .asg
        .cancel_instance_refresh()
        .auto_scaling_group_name("busy")
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.instance_refresh_id(), Some(id.as_str()));
    let (seen, done) = c.until_done("busy", &id).await;
    assert_eq!(status(&done), "Cancelled", "{seen:?}");
    assert!(done.percentage_complete().unwrap_or(0) < 100, "{seen:?}");
    // Never applied: the group stays on version 1.
    assert_eq!(
        group_lt_version(&c.group("busy").await).as_deref(),
        Some("1")
    );

    let again = c
        .asg
        .cancel_instance_refresh()
        .auto_scaling_group_name("busy")
        .send()
        .await;
    assert_eq!(code_of(again), "ActiveInstanceRefreshNotFound");
    // Nothing is active any more: a new refresh is accepted and listed first.
    let next = c.start_refresh("busy", Some((&lt, "2")), None).await;
    let listed = c
        .asg
        .describe_instance_refreshes()
        .auto_scaling_group_name("busy")
        .send()
        .await
        .unwrap();
    let ids: Vec<&str> = listed
        .instance_refreshes()
        .iter()
        .filter_map(|r| r.instance_refresh_id())
        .collect();
    assert_eq!(ids, [next.as_str(), id.as_str()]);
}

#[tokio::test]
async fn failing_refresh_with_auto_rollback_ends_rollback_successful_and_changes_nothing() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("golden-a").await, c.register("golden-b").await);
    let lt = c.template("bad", &a).await;
    c.version_from(&lt, "1", &b).await;
    c.group_on("bad", 3, &lt, "1", &[(FAIL_TAG, "fail")]).await;

    let id = c
        .start_refresh(
            "bad",
            Some((&lt, "2")),
            Some(
                RefreshPreferences::builder()
                    .auto_rollback(true)
                    .min_healthy_percentage(66)
                    .build(),
            ),
        )
        .await;
    let (seen, done) = c.until_done("bad", &id).await;
    let order = statuses(&seen);
    assert_eq!(status(&done), "RollbackSuccessful", "{seen:?}");
    assert!(order.contains(&"InProgress"), "{seen:?}");
    assert_eq!(
        &order[order.len() - 2..],
        ["RollbackInProgress", "RollbackSuccessful"],
        "{seen:?}"
    );
    assert!(
        done.status_reason()
            .unwrap_or_default()
            .contains("health checks"),
        "{done:?}"
    );
    assert!(done.rollback_details().is_some(), "{done:?}");

    let g = c.group("bad").await;
    assert_eq!(group_lt_version(&g).as_deref(), Some("1"));
    let after = c.members("bad").await;
    assert_eq!(after.len(), 3);
    assert_eq!(launch_facts(&after), facts(&a, "1", "1"));
}

#[tokio::test]
async fn failing_refresh_without_auto_rollback_ends_failed() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("golden-a").await, c.register("golden-b").await);
    let lt = c.template("bad2", &a).await;
    c.version_from(&lt, "1", &b).await;
    c.group_on("bad2", 2, &lt, "1", &[(FAIL_TAG, "fail")]).await;

    let id = c.start_refresh("bad2", Some((&lt, "2")), None).await;
    let (seen, done) = c.until_done("bad2", &id).await;
    assert_eq!(status(&done), "Failed", "{seen:?}");
    assert!(!statuses(&seen).contains(&"RollbackInProgress"), "{seen:?}");
    assert!(done.rollback_details().is_none());
    assert!(
        done.status_reason()
            .unwrap_or_default()
            .contains("health checks"),
        "{done:?}"
    );
    assert_eq!(
        group_lt_version(&c.group("bad2").await).as_deref(),
        Some("1")
    );
    let after = c.members("bad2").await;
    assert_eq!(after.len(), 2);
    assert_eq!(launch_facts(&after), facts(&a, "1", "1"));
}

#[tokio::test]
async fn rollback_of_an_in_progress_refresh_restores_the_previous_version() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("golden-a").await, c.register("golden-b").await);
    let lt = c.template("roll", &a).await;
    c.version_from(&lt, "1", &b).await;
    c.group_on("roll", 6, &lt, "1", &[]).await;

    let id = c.start_refresh("roll", Some((&lt, "2")), None).await;
    let (_, mid) = c
        .watch("roll", &id, |r| {
            status(r) == "InProgress" && r.percentage_complete().unwrap_or(0) > 0
        })
        .await;
    assert!(mid.percentage_complete().unwrap() < 100, "{mid:?}");
    let rolled = c
        .asg
        .rollback_instance_refresh()
        .auto_scaling_group_name("roll")
        .send()
        .await
        .unwrap();
    assert_eq!(rolled.instance_refresh_id(), Some(id.as_str()));

    let (seen, done) = c.until_done("roll", &id).await;
    assert_eq!(status(&done), "RollbackSuccessful", "{seen:?}");
    let details = done.rollback_details().expect("rollback details");
    assert!(
        details.percentage_complete_on_rollback().unwrap_or(0)
            >= mid.percentage_complete().unwrap(),
        "{done:?}"
    );
    assert_eq!(
        group_lt_version(&c.group("roll").await).as_deref(),
        Some("1")
    );
    let after = c.members("roll").await;
    assert_eq!(after.len(), 6);
    assert_eq!(launch_facts(&after), facts(&a, "1", "1"));
}

#[tokio::test]
async fn refresh_events_reach_the_default_bus_in_aws_shape() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("golden-a").await, c.register("golden-b").await);
    let lt = c.template("evt", &a).await;
    c.version_from(&lt, "1", &b).await;
    c.group_on("evt", 2, &lt, "1", &[]).await;
    let arn = c
        .group("evt")
        .await
        .auto_scaling_group_arn()
        .unwrap()
        .to_owned();
    let queue = queue_for_rule(
        &local.config,
        "default",
        "as-events",
        &serde_json::json!({"source": ["aws.autoscaling"]}),
    )
    .await;

    let id = c.start_refresh("evt", Some((&lt, "2")), None).await;
    let succeeded = "EC2 Auto Scaling Instance Refresh Succeeded";
    let got = events_until(&local.config, &queue, |evs| {
        evs.iter()
            .any(|e| e["detail-type"] == succeeded && e["detail"]["InstanceRefreshId"] == *id)
    })
    .await;
    let mine: Vec<&serde_json::Value> = got
        .iter()
        .filter(|e| e["detail"]["InstanceRefreshId"] == *id)
        .collect();
    let kinds: Vec<&str> = mine
        .iter()
        .map(|e| e["detail-type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "EC2 Auto Scaling Instance Refresh Started",
            "EC2 Auto Scaling Instance Refresh Succeeded"
        ]
    );
    for e in mine {
        assert_eq!(e["source"], "aws.autoscaling");
        assert_eq!(e["account"], DEFAULT_ACCOUNT, "{e}");
        assert_eq!(e["region"], "us-east-1");
        assert_eq!(e["resources"], serde_json::json!([arn]), "{e}");
        assert_eq!(
            e["detail"],
            serde_json::json!({"InstanceRefreshId": id, "AutoScalingGroupName": "evt"})
        );
    }
    assert_eq!(status(&c.refresh("evt", &id).await), "Successful");
}

#[tokio::test]
async fn latest_group_refreshed_without_desired_configuration_runs_the_latest_ami() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("golden-a").await, c.register("golden-b").await);
    let lt = c.template("batch", &a).await;
    c.group_on("batch", 3, &lt, "$Latest", &[]).await;
    assert_eq!(
        launch_facts(&c.members("batch").await),
        facts(&a, "$Latest", "1")
    );
    c.version_from(&lt, "1", &b).await;

    let id = c
        .start_refresh(
            "batch",
            None,
            Some(
                RefreshPreferences::builder()
                    .min_healthy_percentage(50)
                    .build(),
            ),
        )
        .await;
    let (seen, done) = c.until_done("batch", &id).await;
    assert_eq!(status(&done), "Successful", "{seen:?}");
    assert!(done.desired_configuration().is_none());
    assert_eq!(
        group_lt_version(&c.group("batch").await).as_deref(),
        Some("$Latest")
    );
    let after = c.members("batch").await;
    assert_eq!(after.len(), 3);
    assert_eq!(launch_facts(&after), facts(&b, "$Latest", "2"));
}

#[tokio::test]
async fn update_without_mixed_instances_policy_keeps_the_policy() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
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

#[tokio::test]
async fn resolve_ssm_launch_template_launches_the_parameter_ami() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("golden-a").await, c.register("golden-b").await);
    put_image_param(&c.ssm, "/golden/web", &a, false)
        .await
        .unwrap();
    c.template("ssm", "resolve:ssm:/golden/web").await;
    c.group_on("ssm", 1, "ssm", "1", &[]).await;
    let first = c.members("ssm").await;
    assert_eq!(
        first.values().map(|m| m.image.as_str()).collect::<Vec<_>>(),
        [a.as_str()]
    );

    put_image_param(&c.ssm, "/golden/web", &b, true)
        .await
        .unwrap();
    c.asg
        .set_desired_capacity()
        .auto_scaling_group_name("ssm")
        .desired_capacity(2)
        .send()
        .await
        .unwrap();
    let members = c.members("ssm").await;
    let images: BTreeSet<&str> = members.values().map(|m| m.image.as_str()).collect();
    assert_eq!(members.len(), 2);
    assert_eq!(images, BTreeSet::from([a.as_str(), b.as_str()]));

    // A refresh of the group's own configuration re-resolves the parameter for every instance.
    let id = c.start_refresh("ssm", None, None).await;
    let (seen, done) = c.until_done("ssm", &id).await;
    assert_eq!(status(&done), "Successful", "{seen:?}");
    let members = c.members("ssm").await;
    assert_eq!(members.len(), 2);
    assert!(members.values().all(|m| m.image == b), "{members:?}");
}

// --- shared AMIs ----------------------------------------------------------------------------------

#[tokio::test]
async fn shared_ami_is_visible_and_launchable_only_in_the_account_it_is_shared_with() {
    let local = Local::start().await;
    let endpoint = local.endpoint();
    let (acct_a, acct_b, acct_c) = (unique_account(1), unique_account(2), unique_account(3));
    let ca = Clients::new(&sdk_config_in(&endpoint, &acct_a).await);
    let cb = Clients::new(&sdk_config_in(&endpoint, &acct_b).await);
    let cc = Clients::new(&sdk_config_in(&endpoint, &acct_c).await);

    let ami = ca.register("golden-shared").await;
    let image = ca
        .ec2
        .describe_images()
        .image_ids(&ami)
        .send()
        .await
        .unwrap()
        .images()[0]
        .clone();
    assert_eq!(image.owner_id(), Some(acct_a.as_str()));
    let snapshot = image.block_device_mappings()[0]
        .ebs()
        .and_then(|e| e.snapshot_id())
        .expect("the AMI has a snapshot")
        .to_owned();
    // Not shared yet: B cannot see it.
    let hidden = cb.ec2.describe_images().image_ids(&ami).send().await;
    assert_eq!(code_of(hidden), "InvalidAMIID.NotFound");

    ca.ec2
        .modify_image_attribute()
        .image_id(&ami)
        .launch_permission(
            LaunchPermissionModifications::builder()
                .add(LaunchPermission::builder().user_id(&acct_b).build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    ca.ec2
        .modify_snapshot_attribute()
        .snapshot_id(&snapshot)
        .attribute(SnapshotAttributeName::CreateVolumePermission)
        .create_volume_permission(
            CreateVolumePermissionModifications::builder()
                .add(CreateVolumePermission::builder().user_id(&acct_b).build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let perms = ca
        .ec2
        .describe_snapshot_attribute()
        .snapshot_id(&snapshot)
        .attribute(SnapshotAttributeName::CreateVolumePermission)
        .send()
        .await
        .unwrap();
    let users: Vec<&str> = perms
        .create_volume_permissions()
        .iter()
        .filter_map(|p| p.user_id())
        .collect();
    assert_eq!(users, [acct_b.as_str()]);

    // B sees it by id and as an image it may execute.
    let by_id = cb
        .ec2
        .describe_images()
        .image_ids(&ami)
        .send()
        .await
        .unwrap();
    let seen: Vec<(&str, &str)> = by_id
        .images()
        .iter()
        .map(|i| (i.image_id().unwrap(), i.owner_id().unwrap()))
        .collect();
    assert_eq!(seen, [(ami.as_str(), acct_a.as_str())]);
    let executable = cb
        .ec2
        .describe_images()
        .executable_users("self")
        .send()
        .await
        .unwrap();
    assert!(
        executable
            .images()
            .iter()
            .any(|i| i.image_id() == Some(ami.as_str())),
        "B's executable images must include {ami}"
    );

    // C was granted nothing.
    let c_by_id = cc.ec2.describe_images().image_ids(&ami).send().await;
    assert_eq!(code_of(c_by_id), "InvalidAMIID.NotFound");
    let c_exec = cc
        .ec2
        .describe_images()
        .executable_users("self")
        .send()
        .await
        .unwrap();
    assert!(
        c_exec
            .images()
            .iter()
            .all(|i| i.image_id() != Some(ami.as_str()))
    );
    let c_run = cc
        .ec2
        .run_instances()
        .image_id(&ami)
        .min_count(1)
        .max_count(1)
        .send()
        .await;
    assert!(c_run.is_err(), "C must not launch an AMI it cannot see");

    // B launches it.
    let run = cb
        .ec2
        .run_instances()
        .image_id(&ami)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let instance_id = run.instances()[0].instance_id().unwrap().to_owned();
    let described = cb.instances(vec![instance_id.clone()]).await;
    assert_eq!(described[&instance_id].image, ami);
    assert_eq!(described[&instance_id].state, "running");
}

// --- launch templates -----------------------------------------------------------------------------

#[tokio::test]
async fn launch_template_version_inherits_everything_but_the_override_from_its_source() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("img-a").await, c.register("img-b").await);
    let sg = c
        .ec2
        .create_security_group()
        .group_name("web")
        .description("web")
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_owned();
    // "#!/bin/sh\necho hi\n"
    let user_data = "IyEvYmluL3NoCmVjaG8gaGkK";
    let lt = c
        .ec2
        .create_launch_template()
        .launch_template_name("inherit")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(&a)
                .instance_type(InstanceType::T3Small)
                .key_name("ops")
                .user_data(user_data)
                .security_group_ids(&sg)
                .tag_specifications(
                    LaunchTemplateTagSpecificationRequest::builder()
                        .resource_type(ResourceType::Instance)
                        .tags(
                            aws_sdk_ec2::types::Tag::builder()
                                .key("app")
                                .value("web")
                                .build(),
                        )
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap()
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_owned();
    assert_eq!(c.version_from(&lt, "1", &b).await, 2);

    let data = |n: &'static str| {
        let ec2 = c.ec2.clone();
        let lt = lt.clone();
        async move {
            ec2.describe_launch_template_versions()
                .launch_template_id(lt)
                .versions(n)
                .send()
                .await
                .unwrap()
                .launch_template_versions()[0]
                .launch_template_data()
                .unwrap()
                .clone()
        }
    };
    let (v1, v2) = (data("1").await, data("2").await);
    assert_eq!(v2.image_id(), Some(b.as_str()));
    assert_eq!(
        v2.instance_type().map(InstanceType::as_str),
        Some("t3.small")
    );
    assert_eq!(v2.key_name(), Some("ops"));
    assert_eq!(v2.user_data(), Some(user_data));
    assert_eq!(v2.security_group_ids(), [sg.as_str()]);
    let tags: Vec<(&str, &str)> = v2
        .tag_specifications()
        .iter()
        .flat_map(|s| s.tags())
        .map(|t| (t.key().unwrap(), t.value().unwrap()))
        .collect();
    assert_eq!(tags, [("app", "web")]);
    // Everything else is the source's too, and the source is untouched.
    let mut expected = v1.clone();
    expected.image_id = Some(b.clone());
    assert_eq!(v2, expected);
    assert_eq!(v1.image_id(), Some(a.as_str()));

    // Instances launched from version 2 get the inherited data.
    let run = c
        .ec2
        .run_instances()
        .launch_template(
            aws_sdk_ec2::types::LaunchTemplateSpecification::builder()
                .launch_template_id(&lt)
                .version("2")
                .build(),
        )
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let i = &run.instances()[0];
    assert_eq!(i.image_id(), Some(b.as_str()));
    assert_eq!(i.key_name(), Some("ops"));
    assert_eq!(i.instance_type().map(|t| t.as_str()), Some("t3.small"));
}

#[tokio::test]
async fn describe_launch_template_versions_honours_versions_filters_and_pages() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("img-a").await, c.register("img-b").await);
    let lt = c.template("paged", &a).await;
    // Versions 2..=20 alternate: even numbers run B, odd ones A.
    for n in 2..=20i64 {
        let ami = if n % 2 == 0 { &b } else { &a };
        assert_eq!(c.version_from(&lt, &(n - 1).to_string(), ami).await, n);
    }
    c.ec2
        .modify_launch_template()
        .launch_template_id(&lt)
        .default_version("5")
        .send()
        .await
        .unwrap();

    let numbers = |versions: &[aws_sdk_ec2::types::LaunchTemplateVersion]| -> Vec<i64> {
        versions.iter().filter_map(|v| v.version_number()).collect()
    };
    let describe = || {
        c.ec2
            .describe_launch_template_versions()
            .launch_template_id(&lt)
    };

    // Versions: numbers, $Latest, $Default.
    let picked = describe().versions("3").versions("1").send().await.unwrap();
    let mut got = numbers(picked.launch_template_versions());
    got.sort_unstable();
    assert_eq!(got, [1, 3]);
    let latest = describe().versions("$Latest").send().await.unwrap();
    assert_eq!(numbers(latest.launch_template_versions()), [20]);
    let default = describe().versions("$Default").send().await.unwrap();
    assert_eq!(numbers(default.launch_template_versions()), [5]);
    assert_eq!(
        default.launch_template_versions()[0].default_version(),
        Some(true)
    );
    let mixed = describe()
        .versions("$Latest")
        .versions("$Default")
        .versions("7")
        .send()
        .await
        .unwrap();
    let mut got = numbers(mixed.launch_template_versions());
    got.sort_unstable();
    assert_eq!(got, [5, 7, 20]);

    // The image-id filter.
    let by_image = describe()
        .filters(Filter::builder().name("image-id").values(&b).build())
        .send()
        .await
        .unwrap();
    let mut got = numbers(by_image.launch_template_versions());
    got.sort_unstable();
    assert_eq!(got, (2..=20).step_by(2).collect::<Vec<i64>>());
    assert!(
        by_image
            .launch_template_versions()
            .iter()
            .all(|v| v.launch_template_data().and_then(|d| d.image_id()) == Some(b.as_str()))
    );

    // More than 15 versions, over pages of 7: all of them, once each.
    let mut pages = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = describe()
            .max_results(7)
            .set_next_token(token.clone())
            .send()
            .await
            .unwrap();
        pages.push(numbers(page.launch_template_versions()));
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
        assert!(pages.len() < 10, "paging does not end: {pages:?}");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [7, 7, 6],
        "{pages:?}"
    );
    let all: Vec<i64> = pages.concat();
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        distinct.len(),
        "duplicates across pages: {pages:?}"
    );
    assert_eq!(distinct, (1..=20).collect::<BTreeSet<i64>>());
    // Without MaxResults nothing is cut at 15 either.
    let everything = describe().send().await.unwrap();
    assert_eq!(everything.launch_template_versions().len(), 20);
    assert!(everything.next_token().is_none());
}

// --- SSM aws:ec2:image ----------------------------------------------------------------------------

async fn put_image_param(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    value: &str,
    overwrite: bool,
) -> Result<
    i64,
    aws_sdk_ssm::error::SdkError<aws_sdk_ssm::operation::put_parameter::PutParameterError>,
> {
    ssm.put_parameter()
        .name(name)
        .value(value)
        .r#type(ParameterType::String)
        .data_type(IMAGE)
        .overwrite(overwrite)
        .send()
        .await
        .map(|o| o.version())
}

async fn param(ssm: &aws_sdk_ssm::Client, name: &str) -> (String, i64) {
    let p = ssm
        .get_parameter()
        .name(name)
        .send()
        .await
        .unwrap()
        .parameter()
        .unwrap()
        .clone();
    (p.value().unwrap().to_owned(), p.version())
}

async fn history(ssm: &aws_sdk_ssm::Client, name: &str) -> Vec<String> {
    ssm.get_parameter_history()
        .name(name)
        .send()
        .await
        .unwrap()
        .parameters()
        .iter()
        .filter_map(|p| p.value().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn ssm_image_parameters_are_validated_against_visible_amis() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("golden-a").await, c.register("golden-b").await);
    let name = "/golden/al2023/ami-id";
    assert_eq!(put_image_param(&c.ssm, name, &a, false).await.unwrap(), 1);

    // Malformed: rejected at once, nothing written.
    for bad in ["not-an-ami", "ami-123", "ami-0123456789ABCDEF0"] {
        let result = put_image_param(&c.ssm, name, bad, true).await;
        assert_eq!(code_of(result), "ValidationException", "{bad}");
    }
    assert_eq!(param(&c.ssm, name).await, (a.clone(), 1));

    // Well shaped but invisible (no such AMI; another account's AMI not shared): accepted, then
    // discarded, so the previous value stays.
    let other = Clients::new(&sdk_config_in(&local.endpoint(), &unique_account(7)).await);
    let foreign = other.register("not-shared").await;
    for invisible in ["ami-0123456789abcdef0", foreign.as_str()] {
        put_image_param(&c.ssm, name, invisible, true)
            .await
            .unwrap_or_else(|e| panic!("{invisible} is accepted: {e:?}"));
        assert_eq!(param(&c.ssm, name).await, (a.clone(), 1), "{invisible}");
    }
    assert_eq!(history(&c.ssm, name).await, std::slice::from_ref(&a));

    // Visible: written, and the history grows.
    assert_eq!(put_image_param(&c.ssm, name, &b, true).await.unwrap(), 2);
    assert_eq!(param(&c.ssm, name).await, (b.clone(), 2));
    assert_eq!(history(&c.ssm, name).await, [a, b]);
}

// --- CloudFormation -------------------------------------------------------------------------------

const SSM_TYPED: &str = r#"
Parameters:
  ImageId:
    Type: AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>
    Default: /golden/web
  InstanceType:
    Type: String
    Default: t3.micro
Resources:
  LT:
    Type: AWS::EC2::LaunchTemplate
    Properties:
      LaunchTemplateData:
        ImageId: !Ref ImageId
        InstanceType: !Ref InstanceType
  Group:
    Type: AWS::AutoScaling::AutoScalingGroup
    Properties:
      MinSize: "1"
      MaxSize: "3"
      DesiredCapacity: "1"
      AvailabilityZones: [us-east-1a]
      LaunchTemplate:
        LaunchTemplateId: !Ref LT
        Version: !GetAtt LT.LatestVersionNumber
"#;

const DYNAMIC: &str = r#"
Parameters:
  InstanceType:
    Type: String
    Default: t3.micro
Resources:
  LT:
    Type: AWS::EC2::LaunchTemplate
    Properties:
      LaunchTemplateData:
        ImageId: "{{resolve:ssm:/golden/dyn}}"
        InstanceType: !Ref InstanceType
  Group:
    Type: AWS::AutoScaling::AutoScalingGroup
    Properties:
      MinSize: "1"
      MaxSize: "1"
      AvailabilityZones: [us-east-1a]
      LaunchTemplate:
        LaunchTemplateId: !Ref LT
        Version: !GetAtt LT.LatestVersionNumber
"#;

async fn stack_status(cfn: &aws_sdk_cloudformation::Client, stack: &str, want: &str) {
    eventually(&format!("stack {stack} {want}"), WAIT, || async {
        let out = cfn
            .describe_stacks()
            .stack_name(stack)
            .send()
            .await
            .unwrap();
        let status = out.stacks()[0]
            .stack_status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        assert!(
            !status.ends_with("FAILED") && !status.ends_with("ROLLBACK_COMPLETE"),
            "stack {stack}: {status}"
        );
        (status == want).then_some(())
    })
    .await;
}

async fn stack_resources(
    cfn: &aws_sdk_cloudformation::Client,
    stack: &str,
) -> BTreeMap<String, String> {
    cfn.list_stack_resources()
        .stack_name(stack)
        .send()
        .await
        .unwrap()
        .stack_resource_summaries()
        .iter()
        .map(|r| {
            (
                r.logical_resource_id().unwrap().to_owned(),
                r.physical_resource_id().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn keep(key: &str) -> aws_sdk_cloudformation::types::Parameter {
    aws_sdk_cloudformation::types::Parameter::builder()
        .parameter_key(key)
        .use_previous_value(true)
        .build()
}

async fn lt_images(ec2: &aws_sdk_ec2::Client, lt: &str) -> Vec<(i64, String)> {
    let mut out: Vec<(i64, String)> = ec2
        .describe_launch_template_versions()
        .launch_template_id(lt)
        .send()
        .await
        .unwrap()
        .launch_template_versions()
        .iter()
        .map(|v| {
            (
                v.version_number().unwrap(),
                v.launch_template_data()
                    .and_then(|d| d.image_id())
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn stack_update_with_previous_values_re_resolves_the_ssm_typed_parameter() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("web-1").await, c.register("web-2").await);
    put_image_param(&c.ssm, "/golden/web", &a, false)
        .await
        .unwrap();

    c.cfn
        .create_stack()
        .stack_name("web")
        .template_body(SSM_TYPED)
        .send()
        .await
        .unwrap();
    stack_status(&c.cfn, "web", "CREATE_COMPLETE").await;
    let res = stack_resources(&c.cfn, "web").await;
    let (lt, group) = (res["LT"].clone(), res["Group"].clone());
    let g = c.group(&group).await;
    let tags: BTreeMap<&str, &str> = g
        .tags()
        .iter()
        .map(|t| (t.key().unwrap(), t.value().unwrap()))
        .collect();
    assert_eq!(tags.get("aws:cloudformation:stack-name"), Some(&"web"));
    assert_eq!(tags.get("aws:cloudformation:logical-id"), Some(&"Group"));
    assert_eq!(lt_images(&c.ec2, &lt).await, [(1, a.clone())]);
    assert_eq!(launch_facts(&c.members(&group).await), facts(&a, "1", "1"));

    let update = || {
        c.cfn
            .update_stack()
            .stack_name("web")
            .use_previous_template(true)
            .parameters(keep("ImageId"))
            .parameters(keep("InstanceType"))
    };
    // Nothing changed in Parameter Store: nothing to do.
    let nothing = update().send().await;
    let err = nothing.expect_err("no updates");
    assert_eq!(err.code(), Some("ValidationError"));
    assert!(
        err.message()
            .unwrap_or_default()
            .contains("No updates are to be performed"),
        "{err:?}"
    );

    put_image_param(&c.ssm, "/golden/web", &b, true)
        .await
        .unwrap();
    update().send().await.unwrap();
    stack_status(&c.cfn, "web", "UPDATE_COMPLETE").await;

    assert_eq!(
        stack_resources(&c.cfn, "web").await,
        res,
        "updated in place"
    );
    assert_eq!(
        lt_images(&c.ec2, &lt).await,
        [(1, a.clone()), (2, b.clone())]
    );
    let v2 = c
        .ec2
        .describe_launch_template_versions()
        .launch_template_id(&lt)
        .versions("$Latest")
        .send()
        .await
        .unwrap();
    let data = v2.launch_template_versions()[0]
        .launch_template_data()
        .unwrap();
    assert_eq!(data.image_id(), Some(b.as_str()));
    assert_eq!(
        data.instance_type().map(InstanceType::as_str),
        Some("t3.micro")
    );
    let g = c.group(&group).await;
    assert_eq!(group_lt_version(&g).as_deref(), Some("2"));
    let stack = c
        .cfn
        .describe_stacks()
        .stack_name("web")
        .send()
        .await
        .unwrap();
    let image_param = stack.stacks()[0]
        .parameters()
        .iter()
        .find(|p| p.parameter_key() == Some("ImageId"))
        .unwrap()
        .clone();
    assert_eq!(image_param.parameter_value(), Some("/golden/web"));
    assert_eq!(image_param.resolved_value(), Some(b.as_str()));

    // New capacity comes from the new AMI.
    c.asg
        .set_desired_capacity()
        .auto_scaling_group_name(&group)
        .desired_capacity(2)
        .send()
        .await
        .unwrap();
    let members = c.members(&group).await;
    let images: BTreeSet<&str> = members.values().map(|m| m.image.as_str()).collect();
    assert_eq!(images, BTreeSet::from([a.as_str(), b.as_str()]));
}

#[tokio::test]
async fn stack_with_a_dynamic_ssm_reference_is_not_re_resolved_by_an_update() {
    let local = Local::start().await;
    let c = Clients::new(&local.config);
    let (a, b) = (c.register("dyn-1").await, c.register("dyn-2").await);
    put_image_param(&c.ssm, "/golden/dyn", &a, false)
        .await
        .unwrap();
    c.cfn
        .create_stack()
        .stack_name("dyn")
        .template_body(DYNAMIC)
        .send()
        .await
        .unwrap();
    stack_status(&c.cfn, "dyn", "CREATE_COMPLETE").await;
    let res = stack_resources(&c.cfn, "dyn").await;
    let (lt, group) = (res["LT"].clone(), res["Group"].clone());
    assert_eq!(lt_images(&c.ec2, &lt).await, [(1, a.clone())]);

    put_image_param(&c.ssm, "/golden/dyn", &b, true)
        .await
        .unwrap();
    let result = c
        .cfn
        .update_stack()
        .stack_name("dyn")
        .use_previous_template(true)
        .parameters(keep("InstanceType"))
        .send()
        .await;
    let err = result.expect_err("a dynamic reference alone is not re-resolved");
    assert!(
        err.message()
            .unwrap_or_default()
            .contains("No updates are to be performed"),
        "{err:?}"
    );
    assert_eq!(lt_images(&c.ec2, &lt).await, [(1, a.clone())]);
    assert_eq!(
        group_lt_version(&c.group(&group).await).as_deref(),
        Some("1")
    );
    assert_eq!(launch_facts(&c.members(&group).await), facts(&a, "1", "1"));
}

// --- EventBridge ----------------------------------------------------------------------------------

#[tokio::test]
async fn event_forwarded_to_another_accounts_bus_keeps_account_and_detail() {
    let local = Local::start().await;
    let endpoint = local.endpoint();
    let (hub, spoke) = (unique_account(11), unique_account(12));
    let hub_config = sdk_config_in(&endpoint, &hub).await;
    let spoke_config = sdk_config_in(&endpoint, &spoke).await;
    let hub_eb = aws_sdk_eventbridge::Client::new(&hub_config);
    let spoke_eb = aws_sdk_eventbridge::Client::new(&spoke_config);

    let spoke_bus = spoke_eb
        .create_event_bus()
        .name("amiflow")
        .send()
        .await
        .unwrap()
        .event_bus_arn()
        .unwrap()
        .to_owned();
    spoke_eb
        .put_permission()
        .event_bus_name("amiflow")
        .action("events:PutEvents")
        .principal(&hub)
        .statement_id("hub")
        .send()
        .await
        .unwrap();
    // The spoke's rule only matches events whose envelope still names the hub.
    let queue = queue_for_rule(
        &spoke_config,
        "amiflow",
        "from-hub",
        &serde_json::json!({"source": ["amiflow"], "account": [hub]}),
    )
    .await;

    hub_eb
        .create_event_bus()
        .name("amiflow")
        .send()
        .await
        .unwrap();
    hub_eb
        .put_rule()
        .name("to-spoke")
        .event_bus_name("amiflow")
        .event_pattern(r#"{"source":["amiflow"],"detail-type":["AmiShared"]}"#)
        .send()
        .await
        .unwrap();
    hub_eb
        .put_targets()
        .rule("to-spoke")
        .event_bus_name("amiflow")
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("spoke")
                .arn(&spoke_bus)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    let detail = serde_json::json!({
        "schema_version": 1, "ami_id": "ami-0123456789abcdef0", "target_account": spoke,
        "nested": {"list": [1, 2, 3], "flag": true, "text": "ünïcode"},
    });
    let sent = hub_eb
        .put_events()
        .entries(
            aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                .source("amiflow")
                .detail_type("AmiShared")
                .detail(detail.to_string())
                .event_bus_name("amiflow")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(sent.failed_entry_count(), 0);

    let got = events_until(&spoke_config, &queue, |evs| !evs.is_empty()).await;
    let body = &got[0];
    assert_eq!(body["account"], serde_json::json!(hub), "{body}");
    assert_eq!(body["detail"], detail);
    assert_eq!(body["detail-type"], "AmiShared");
    assert_eq!(body["source"], "amiflow");
}
