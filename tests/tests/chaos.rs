//! amiflow under what production does to it: the whole rollout of tests/rollout.rs, with
//! the real worker binaries over real SQS and EventBridge in the emulator, while
//!
//! 1. every event is delivered twice and old events of earlier rollouts arrive late;
//! 2. workers are killed with SIGKILL at random points, several times, and restarted;
//! 3. a fifth of all AWS calls fail through the fault proxy (throttling, 5xx, dropped connections);
//! 4. a catalogue of bad input is delivered alongside the rollout;
//! 5. events from accounts and sources outside the configuration arrive;
//! 6. half the replies of `CreateLaunchTemplateVersion` are lost after the version was made.
//!
//! Each ends in exactly the final state of a clean run (support::assert_final_state: parameters,
//! group AMIs, one launch template version and one refresh per group, no parameter regression)
//! with empty DLQs, or, in 4 and 5, with exactly the bad input in them, each with its reason.
//! Random choices print their seed; `AMIFLOW_CHAOS_SEED=<seed>` replays them.
//!
//! In 3 the fault proxy refuses calls before they reach the emulator, as AWS does when it throttles
//! or fails a request. In 6 it loses replies *after* the change: the refresh-worker's retry carries
//! the same `ClientToken` (the emulator honours it), so EC2 hands back the version the lost call
//! made, and the exact check's one new version per group still holds.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_ec2::types::{LaunchPermission, LaunchPermissionModifications, PermissionGroup};
use aws_sdk_sqs::types::MessageAttributeValue;
use chrono::Utc;
use e2e::proxy::{FaultPlan, FaultProxy};
use e2e::world::{DeadLetter, World};
use events::{AsgRefreshRequested, Detail, ParamUpdated, RolloutWindowOpened, Strategy};
use serde_json::{Value, json};
use support::{Audit, PARAMETER, amis, snapshot};

/// One world at a time: each runs an emulator and 13 worker processes, and two at once on two
/// cores would measure the machine rather than amiflow.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Everything in every worker DLQ, removed.
async fn dead_letters(world: &World) -> Vec<DeadLetter> {
    let mut out = Vec::new();
    for (account, queue) in world.worker_queues() {
        out.extend(world.take_dead_letters(&account, queue).await);
    }
    out
}

/// An EventBridge event as SQS delivers it.
fn envelope(account: &str, source: &str, detail_type: &str, detail: Value) -> String {
    json!({
        "version": "0", "id": uuid_like(detail_type), "detail-type": detail_type,
        "source": source, "account": account, "time": Utc::now().to_rfc3339(),
        "region": "us-east-1", "resources": [], "detail": detail,
    })
    .to_string()
}

/// The detail of a one-hour window of `stage` in `account`, opening now.
fn window_now(account: &str, stage: &str) -> Value {
    Detail::from(RolloutWindowOpened::new(
        account,
        stage,
        Utc::now(),
        Utc::now() + chrono::Duration::hours(1),
    ))
    .to_value()
}

fn uuid_like(seed: &str) -> String {
    format!("e2e-{}-{}", seed.len(), Utc::now().timestamp_micros())
}

/// Send `body` straight into `account`'s `queue` (what a mis-routed rule or anyone with
/// `sqs:SendMessage` could deliver), tagged with the catalogue case it belongs to.
async fn deliver(world: &World, account: &str, queue: &str, case: &str, body: &str) {
    aws_sdk_sqs::Client::new(world.config(account))
        .send_message()
        .queue_url(world.queue_url(account, queue))
        .message_body(body)
        .message_attributes(
            "e2e-case",
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(case)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("{case}: SQS refused the message: {e:?}"));
}

/// Wait until the DLQs hold `n` messages in all.
async fn wait_dead_letters(world: &World, n: u64, within: Duration) {
    e2e::eventually(&format!("{n} dead letters"), within, || async {
        let total: u64 = world.dead_letters().await.values().sum();
        (total >= n).then_some(())
    })
    .await;
}

/// Add a second, identical target to every rule of every bus of every account: from now on
/// EventBridge delivers every event twice (and forwards every cross-account event twice).
async fn deliver_everything_twice(world: &World) -> usize {
    let mut added = 0;
    for account in world.accounts() {
        let eb = aws_sdk_eventbridge::Client::new(world.config(&account));
        for bus in ["amiflow", "default"] {
            let rules = eb.list_rules().event_bus_name(bus).send().await.unwrap();
            for rule in rules.rules() {
                let name = rule.name().unwrap_or_default();
                let targets = eb
                    .list_targets_by_rule()
                    .rule(name)
                    .event_bus_name(bus)
                    .send()
                    .await
                    .unwrap();
                let twins: Vec<_> = targets
                    .targets()
                    .iter()
                    .map(|t| {
                        let mut twin = t.clone();
                        twin.id = format!("{}-again", t.id);
                        twin
                    })
                    .collect();
                if twins.is_empty() {
                    continue;
                }
                added += twins.len();
                let out = eb
                    .put_targets()
                    .rule(name)
                    .event_bus_name(bus)
                    .set_targets(Some(twins))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(out.failed_entry_count(), 0, "{account}/{bus}/{name}");
            }
        }
    }
    added
}

/// The first group of `account` that a rollout refreshes.
fn refreshed_group(world: &World, account: &str) -> String {
    let groups = world.groups(account);
    groups
        .iter()
        .find(|g| g["expected"] == "refresh" && g["kind"] == "pinned")
        .or_else(|| groups.iter().find(|g| g["expected"] == "refresh"))
        .and_then(|g| g["name"].as_str().map(str::to_owned))
        .expect("world.py builds refreshable groups in every stage")
}

#[tokio::test]
async fn every_event_delivered_twice_and_old_events_arriving_late_change_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::provisioned("small", &[]).await;
    let twins = deliver_everything_twice(&world).await;
    assert!(twins >= 10, "every rule got a twin target ({twins})");
    world.start_workers(&[]).await;
    let (candidate, older) = amis(&world);
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    support::publish(&world, &mut audit, Duration::from_secs(120)).await;

    // Late events of an earlier rollout, after the candidate was published: its AmiBuilt, a
    // ParamUpdated for its AMI, last month's window, and a refresh request for its AMI whose
    // window is still open.
    let hub = world.hub();
    let earlier = support::built(
        &older,
        "golden-al2023-2026-09",
        chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 9, 1, 0, 0, 0).unwrap(),
    );
    world.put(&hub, &Detail::from(earlier)).await;
    let mut stale_requests = Vec::new();
    for account in world.accounts() {
        let stage = world.stage(&account);
        let old_param = ParamUpdated::new("replay", &account, PARAMETER, &older, None, 1);
        world.put(&account, &Detail::from(old_param)).await;
        let opened = Utc::now() - chrono::Duration::days(30);
        let old_window = RolloutWindowOpened::new(
            &account,
            &stage,
            opened,
            opened + chrono::Duration::hours(4),
        );
        world.put(&account, &Detail::from(old_window)).await;
        let group = refreshed_group(&world, &account);
        let old_request = AsgRefreshRequested::new(
            "replay",
            &account,
            &group,
            PARAMETER,
            &older,
            Strategy::LaunchTemplate,
            Some(Utc::now() + chrono::Duration::hours(4)),
        );
        world.put(&account, &Detail::from(old_request)).await;
        stale_requests.push((account, group));
    }

    support::open_windows(&world, &mut audit, Duration::from_secs(300)).await;
    world
        .settle(Duration::from_secs(5), Duration::from_secs(180))
        .await;
    support::collect(&world, &mut audit).await;
    support::assert_final_state(&world, &before, &audit).await;
    // Duplicates and late events are not poison, except the earlier rollout's AmiBuilt (delivered
    // twice): the share-worker refuses an AMI older than the golden one, by name.
    let refused = dead_letters(&world).await;
    assert_eq!(refused.len(), 2, "{refused:#?}");
    for letter in &refused {
        assert_eq!(
            (letter.queue.as_str(), letter.kind.as_str()),
            ("qa/share", "permanent"),
            "{letter:?}"
        );
        assert!(
            letter.body.contains(&older)
                && letter.reason.contains(&format!(
                    "AMI {older} (created 2026-09-01T00:00:00+00:00) is older than the golden AMI"
                )),
            "{letter:?}"
        );
    }

    // The duplicates really happened: each account's ParamUpdated reached the hub more than once.
    for account in world.accounts() {
        let seen = audit
            .params
            .iter()
            .filter(|d| d["account"] == account.as_str() && d["ami_id"] == candidate.as_str())
            .count();
        assert!(seen >= 2, "{account}: ParamUpdated seen {seen} times");
    }
    // The late refresh requests for the earlier AMI were refused by name, not acted on.
    for (account, group) in stale_requests {
        let said = audit
            .outcomes(&account, &group, &older)
            .unwrap_or_else(|| panic!("{account}/{group}: no outcome for the late request"));
        assert!(
            said.iter()
                .all(|(o, r)| o == "skipped" && r.starts_with("superseded")),
            "{account}/{group}: {said:?}"
        );
    }
}

#[tokio::test]
async fn workers_killed_with_sigkill_at_random_points_leave_no_trace() {
    let _one = ONE_AT_A_TIME.lock().await;
    // A short visibility timeout, so a killed worker's messages come back within seconds.
    let world = World::provisioned("small", &["--visibility-timeout", "6"]).await;
    world.start_workers(&[]).await;
    let seed = support::seed("sigkill");
    let mut rng = fastrand::Rng::with_seed(seed);
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    let workers = world.worker_count().await;
    let kills = 12;
    let mut killed = Vec::new();
    let chaos = async {
        for n in 1..=kills {
            // The chaos schedule itself, not a wait for anything.
            tokio::time::sleep(Duration::from_millis(rng.u64(800..4000))).await;
            let who = world.kill_and_restart(rng.usize(..workers)).await;
            eprintln!("sigkill {n}/{kills}: {who}");
            killed.push(who);
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = support::rollout(&world, &before, &mut audit) => {}
        _ = chaos => unreachable!("the chaos schedule never ends by itself"),
    }
    assert!(
        !killed.is_empty(),
        "seed {seed}: the rollout ended before the first kill"
    );
    eprintln!("seed {seed}: {} kills during the rollout", killed.len());
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "seed {seed}: nothing dead-lettered"
    );
}

#[tokio::test]
async fn a_fifth_of_aws_calls_failing_through_the_fault_proxy_changes_nothing_but_time() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::provisioned("small", &[]).await;
    let seed = support::seed("faults");
    // Clean while the workers start: a worker that cannot reach AWS at start-up exits and is
    // restarted by its platform, which is not what this scenario is about.
    let proxy = FaultProxy::start(&world.local.endpoint(), FaultPlan::default()).await;
    world
        .start_workers(&[("AWS_ENDPOINT_URL", &proxy.endpoint())])
        .await;
    let workers = world.worker_count().await;
    e2e::eventually(
        "every worker polling its queue through the proxy",
        Duration::from_secs(60),
        || async {
            let polling: BTreeSet<String> = proxy
                .records()
                .into_iter()
                .filter(|r| r.2 == "ReceiveMessage")
                .map(|r| r.3)
                .collect();
            (polling.len() >= workers).then_some(())
        },
    )
    .await;
    proxy.set_plan(FaultPlan::chaos(seed, 0.20));
    let at_start = proxy.total();
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    support::rollout(&world, &before, &mut audit).await;
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "seed {seed}: nothing dead-lettered"
    );
    let total = proxy.total();
    let calls = total.calls - at_start.calls;
    let failed = total.failed() - at_start.failed();
    let share = failed as f64 / calls as f64;
    eprintln!(
        "seed {seed}: {calls} calls, {failed} failed ({:.1}%): {} throttled, {} 5xx, {} dropped, {} slow",
        share * 100.0,
        total.throttled - at_start.throttled,
        total.server_errors - at_start.server_errors,
        total.resets - at_start.resets,
        total.slowed - at_start.slowed
    );
    assert!(
        calls > 500 && (0.15..=0.25).contains(&share),
        "seed {seed}: about a fifth of {calls} calls failed ({share:.3})"
    );
    // Every kind of call was hit, the changes included.
    let stats = proxy.stats();
    for (service, action) in [
        ("ec2", "CreateLaunchTemplateVersion"),
        ("autoscaling", "StartInstanceRefresh"),
        ("ssm", "PutParameter"),
        ("events", "PutEvents"),
        ("sqs", "DeleteMessageBatch"),
    ] {
        let s = &stats[&(service.to_owned(), action.to_owned())];
        assert!(s.forwarded > 0, "{service}:{action}: {s:?}");
    }
    assert!(
        stats.values().map(|s| s.failed()).sum::<u64>() > 0
            && stats
                .iter()
                .filter(|((s, _), _)| s == "ec2" || s == "autoscaling")
                .any(|(_, s)| s.failed() > 0),
        "the rollout's own AWS calls were faulted"
    );
}

#[tokio::test]
async fn replies_lost_after_a_new_template_version_was_made_leave_one_version_per_group() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::provisioned("small", &[]).await;
    let seed = support::seed("lost-replies");
    let proxy = FaultProxy::start(
        &world.local.endpoint(),
        FaultPlan::losing_replies_of(seed, "CreateLaunchTemplateVersion", 0.5),
    )
    .await;
    world
        .start_workers(&[("AWS_ENDPOINT_URL", &proxy.endpoint())])
        .await;
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    // The exact final state: among the rest, one new launch template version per group.
    support::rollout(&world, &before, &mut audit).await;
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "seed {seed}: nothing dead-lettered"
    );
    let made = &proxy.stats()[&("ec2".to_owned(), "CreateLaunchTemplateVersion".to_owned())];
    eprintln!("seed {seed}: CreateLaunchTemplateVersion {made:?}");
    assert!(
        made.lost_replies > 0 && made.forwarded > made.lost_replies,
        "seed {seed}: replies were lost and the calls retried: {made:?}"
    );
}

/// A case of the bad-input catalogue: where it goes, what it is, and what the DLQ must say.
struct Case {
    name: &'static str,
    queue: &'static str,
    body: String,
    kind: &'static str,
    reason: &'static str,
}

async fn catalogue(world: &World) -> Vec<Case> {
    let hub = world.hub();
    let qa = world.accounts()[0].clone();
    let (candidate, _) = amis(world);
    let good_built = support::candidate_built(world);
    let built_value = Detail::from(good_built.clone()).to_value();
    let with = |field: &str, value: Value| {
        let mut d = built_value.clone();
        d[field] = value;
        d
    };
    let window = window_now(&qa, "qa");
    let other_family = world.state["amis"]["other_family"]
        .as_str()
        .unwrap()
        .to_owned();
    let window_of = |opens: chrono::DateTime<Utc>, closes| {
        envelope(
            &qa,
            "amiflow",
            "RolloutWindowOpened",
            Detail::from(RolloutWindowOpened::new(&qa, "qa", opens, closes)).to_value(),
        )
    };
    let built_of = |ami: &str, name: &str| {
        envelope(
            &hub,
            "amiflow",
            "AmiBuilt",
            Detail::from(support::built(ami, name, good_built.created_at)).to_value(),
        )
    };
    // The family's AMIs the hub must never roll out: its own made public, and one of a stage
    // account shared with the hub (uat's: in this layout the hub is also the qa stage).
    let uat = world.accounts()[1].clone();
    let (public, foreign) = ("golden-al2023-2026-12-02", "golden-al2023-2026-12-03");
    let public_ami =
        support::register_image(world, &hub, public, "al2023", "2026-12-02T00:00:00.000Z").await;
    let foreign_ami =
        support::register_image(world, &uat, foreign, "al2023", "2026-12-03T00:00:00.000Z").await;
    for (account, ami, permission) in [
        (
            &hub,
            &public_ami,
            LaunchPermission::builder()
                .group(PermissionGroup::All)
                .build(),
        ),
        (
            &uat,
            &foreign_ami,
            LaunchPermission::builder().user_id(&hub).build(),
        ),
    ] {
        aws_sdk_ec2::Client::new(world.config(account))
            .modify_image_attribute()
            .image_id(ami)
            .launch_permission(
                LaunchPermissionModifications::builder()
                    .add(permission)
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }
    let now = Utc::now();
    let odd_group = |name: &str| {
        envelope(
            &qa,
            "amiflow",
            "AsgRefreshRequested",
            Detail::from(AsgRefreshRequested::new(
                "",
                &qa,
                name,
                PARAMETER,
                &candidate,
                Strategy::LaunchTemplate,
                None,
            ))
            .to_value(),
        )
    };
    vec![
        Case {
            name: "an-extra-field",
            queue: "share",
            body: envelope(&hub, "amiflow", "AmiBuilt", with("target", json!([qa]))),
            kind: "invalid-detail",
            reason: "target",
        },
        Case {
            name: "empty-targets",
            queue: "share",
            body: envelope(&hub, "amiflow", "AmiBuilt", with("targets", json!([]))),
            kind: "permanent",
            reason: "targets is empty",
        },
        Case {
            name: "duplicate-targets",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("targets", json!([qa, qa])),
            ),
            kind: "permanent",
            reason: "more than once",
        },
        Case {
            name: "huge-targets",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("targets", json!(vec![qa.clone(); 1001])),
            ),
            kind: "invalid-detail",
            reason: "/targets: an array of 1001 items has more than 1000 items",
        },
        Case {
            name: "schema-version-as-a-string",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("schema_version", json!("1")),
            ),
            kind: "invalid-detail",
            reason: "/schema_version",
        },
        Case {
            name: "schema-version-as-a-float",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("schema_version", json!(1.0)),
            ),
            kind: "invalid-detail",
            reason: "schema_version",
        },
        Case {
            name: "schema-version-0",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("schema_version", json!(0)),
            ),
            kind: "invalid-detail",
            reason: "/schema_version",
        },
        Case {
            name: "a-window-years-long",
            queue: "plan",
            body: window_of(now, now + chrono::Duration::days(5 * 365)),
            kind: "permanent",
            reason: "more than 24 hours after it opened",
        },
        Case {
            name: "a-window-of-the-future",
            queue: "plan",
            body: window_of(
                now + chrono::Duration::days(30),
                now + chrono::Duration::days(30) + chrono::Duration::hours(4),
            ),
            kind: "permanent",
            reason: "in the future: a window event is sent when its window opens",
        },
        Case {
            name: "a-public-ami",
            queue: "share",
            body: built_of(&public_ami, public),
            kind: "permanent",
            reason: "is public (anyone may launch it)",
        },
        Case {
            name: "an-ami-of-a-stage-account",
            queue: "share",
            body: built_of(&foreign_ami, foreign),
            kind: "permanent",
            reason: "not by the hub",
        },
        Case {
            name: "malformed-json",
            queue: "share",
            body: r#"{"detail-type": "AmiBuilt", "source": "amiflow", "detail": {"#.into(),
            kind: "invalid-json",
            reason: "not JSON",
        },
        Case {
            name: "not-an-event",
            queue: "plan",
            body: r#"[1, 2, 3]"#.into(),
            kind: "not-an-event",
            reason: "expected detail-type, source and detail",
        },
        Case {
            name: "wrong-types",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("created_at", json!(20261101)),
            ),
            kind: "invalid-detail",
            reason: "/created_at",
        },
        Case {
            name: "unknown-detail-type",
            queue: "param",
            body: envelope(&hub, "amiflow", "AmiDeleted", built_value.clone()),
            kind: "unknown-detail-type",
            reason: "AmiDeleted",
        },
        Case {
            name: "unknown-schema-version",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("schema_version", json!(99)),
            ),
            kind: "unknown-schema-version",
            reason: "schema_version 99",
        },
        Case {
            name: "huge-body",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("image_name", json!("x".repeat(200 * 1024))),
            ),
            kind: "invalid-detail",
            reason: "/image_name",
        },
        Case {
            name: "ami-id-of-the-wrong-shape",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("ami_id", json!("ami-XYZ")),
            ),
            kind: "invalid-detail",
            reason: "/ami_id",
        },
        Case {
            name: "ami-id-not-an-ami",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                with("ami_id", json!(candidate.replace("ami-", "snap-"))),
            ),
            kind: "invalid-detail",
            reason: "/ami_id",
        },
        Case {
            name: "unknown-account-in-the-detail",
            queue: "plan",
            body: envelope(
                &qa,
                "amiflow",
                "RolloutWindowOpened",
                window_now("999999999999", "qa"),
            ),
            kind: "permanent",
            reason: "event for account 999999999999 delivered to the worker of account",
        },
        // Group names AWS could not have: refused by the schema before any Auto Scaling call.
        Case {
            name: "an-empty-group-name",
            queue: "refresh",
            body: odd_group(""),
            kind: "invalid-detail",
            reason: "/asg_name",
        },
        Case {
            name: "a-group-name-too-long",
            queue: "refresh",
            body: odd_group(&"g".repeat(256)),
            kind: "invalid-detail",
            reason: "/asg_name",
        },
        Case {
            name: "a-group-name-with-a-control-character",
            queue: "refresh",
            body: odd_group("qa-web\u{1b}[2J"),
            kind: "invalid-detail",
            reason: "/asg_name",
        },
        Case {
            name: "another-stages-event",
            queue: "refresh",
            body: envelope(
                &qa,
                "amiflow",
                "AsgRefreshRequested",
                Detail::from(AsgRefreshRequested::new(
                    "",
                    &world.accounts()[2],
                    "prod-web",
                    PARAMETER,
                    &candidate,
                    Strategy::LaunchTemplate,
                    None,
                ))
                .to_value(),
            ),
            kind: "permanent",
            reason: "delivered to the worker of account",
        },
        Case {
            // The hub's own Windows golden AMI offered as the Amazon Linux family's.
            name: "an-ami-of-another-family",
            queue: "share",
            body: envelope(
                &hub,
                "amiflow",
                "AmiBuilt",
                Detail::from(support::built(
                    &other_family,
                    &good_built.image_name,
                    good_built.created_at,
                ))
                .to_value(),
            ),
            kind: "permanent",
            reason: "is of the family of /golden/win2022/ami-id, not of /golden/al2023/ami-id; refused",
        },
        Case {
            name: "another-source",
            queue: "share",
            body: envelope(&hub, "amiflow.tools", "AmiBuilt", built_value.clone()),
            kind: "unknown-source",
            reason: "amiflow.tools",
        },
        Case {
            name: "an-aws-source-with-our-detail-type",
            queue: "share",
            body: envelope(&hub, "aws.ec2", "AmiBuilt", built_value.clone()),
            kind: "unknown-detail-type",
            reason: "aws.ec2",
        },
        Case {
            name: "the-wrong-worker",
            queue: "refresh",
            body: envelope(&qa, "amiflow", "RolloutWindowOpened", window.clone()),
            kind: "permanent",
            reason: "refresh-worker does not handle RolloutWindowOpened",
        },
    ]
}

#[tokio::test]
async fn every_bad_input_is_dead_lettered_with_its_reason_and_the_rollout_is_undisturbed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start("small", &[]).await;
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    let cases = catalogue(&world).await;

    // Bad input at the edge: SQS and EventBridge refuse what is over their size limits, so no
    // worker ever sees it.
    let hub = world.hub();
    let too_big = "x".repeat(events::MAX_EVENT_BYTES + 1);
    let refused = aws_sdk_sqs::Client::new(world.config(&hub))
        .send_message()
        .queue_url(world.queue_url(&hub, "share"))
        .message_body(&too_big)
        .send()
        .await;
    assert!(refused.is_err(), "SQS refuses a body over 1 MiB");

    // The rest of the catalogue arrives while the rollout runs.
    for case in &cases {
        let account = match case.queue {
            "share" => hub.clone(),
            _ => world.accounts()[0].clone(),
        };
        deliver(&world, &account, case.queue, case.name, &case.body).await;
    }
    let after = support::rollout(&world, &before, &mut audit).await;
    wait_dead_letters(&world, cases.len() as u64, Duration::from_secs(60)).await;
    let found = dead_letters(&world).await;
    let by_case: BTreeMap<String, &DeadLetter> = found
        .iter()
        .filter_map(|d| d.case.clone().map(|c| (c, d)))
        .collect();
    for case in &cases {
        let d = by_case
            .get(case.name)
            .unwrap_or_else(|| panic!("{}: not dead-lettered; DLQs hold {found:#?}", case.name));
        assert_eq!(d.kind, case.kind, "{}: {d:?}", case.name);
        assert!(
            d.reason.contains(case.reason),
            "{}: reason {:?} should mention {:?}",
            case.name,
            d.reason,
            case.reason
        );
        assert!(!d.reason.is_empty(), "{}: a reason is given", case.name);
        assert_eq!(d.body, case.body, "{}: the body is kept as sent", case.name);
        assert_eq!(
            d.queue.split('/').nth(1),
            Some(case.queue),
            "{}: in its own queue's DLQ",
            case.name
        );
    }
    assert_eq!(
        found.len(),
        cases.len(),
        "nothing but the catalogue was dead-lettered: {found:#?}"
    );
    assert_eq!(
        world.exited().await,
        Vec::<String>::new(),
        "no worker crashed"
    );
    // Still the final state of a clean run after the catalogue went through.
    for account in world.accounts() {
        assert_eq!(
            support::parameter(&world, &account).await,
            after.params[&account]
        );
    }
}

#[tokio::test]
async fn events_from_accounts_and_sources_outside_the_configuration_are_refused_and_reported() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start("small", &[]).await;
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    let hub = world.hub();
    let qa = world.accounts()[0].clone();
    let foreign = "999999999999";
    let (candidate, _) = amis(&world);
    let built = Detail::from(support::candidate_built(&world)).to_value();
    let window = window_now(&qa, "qa");
    // Forged from inside: refresh requests put by a stage account (uat), for a qa group, that
    // pass the envelope's checks but not the policy's.
    let uat = world.accounts()[1].clone();
    let qa_groups = world.groups(&qa);
    let group_of = |kind: &str| {
        qa_groups
            .iter()
            .find(|g| g["kind"] == kind)
            .unwrap_or_else(|| panic!("a qa group of kind {kind}"))["name"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let forged_request = |group: &str, parameter: &str, ami: &str| {
        envelope(
            &uat,
            "amiflow",
            "AsgRefreshRequested",
            Detail::from(AsgRefreshRequested::new(
                "forged",
                &qa,
                group,
                parameter,
                ami,
                Strategy::LaunchTemplate,
                None,
            ))
            .to_value(),
        )
    };
    let golden_now = before.params[&qa].0.clone();
    // (case, account, queue, body, what the reason must say)
    let cases: Vec<(&str, String, &str, String, &str)> = vec![
        (
            "refresh-request-from-a-stage-for-a-parameter-outside-the-policy",
            qa.clone(),
            "refresh",
            forged_request(&group_of("pinned"), "/golden/nope/ami-id", &golden_now),
            "names /golden/nope/ami-id, which is no golden family of the rollout policy",
        ),
        (
            "refresh-request-from-a-stage-for-a-group-of-another-family",
            qa.clone(),
            "refresh",
            forged_request(&group_of("other-family"), PARAMETER, &golden_now),
            "which is no earlier golden AMI of /golden/al2023/ami-id",
        ),
        (
            "amiflow-event-put-by-a-foreign-account",
            hub.clone(),
            "share",
            envelope(foreign, "amiflow", "AmiBuilt", built.clone()),
            "account \"999999999999\", which is neither the hub nor a stage",
        ),
        (
            "window-put-by-a-foreign-account",
            qa.clone(),
            "plan",
            envelope(foreign, "amiflow", "RolloutWindowOpened", window.clone()),
            "neither the hub nor a stage",
        ),
        (
            "ami-built-in-a-foreign-account",
            hub.clone(),
            "ingest",
            envelope(
                foreign,
                "aws.ec2",
                "EC2 AMI State Change",
                json!({"ImageId": candidate, "State": "available", "ErrorMessage": ""}),
            ),
            foreign,
        ),
        (
            "instance-refresh-of-a-foreign-account",
            qa.clone(),
            "refresh",
            envelope(
                foreign,
                "aws.autoscaling",
                "EC2 Auto Scaling Instance Refresh Succeeded",
                json!({"InstanceRefreshId": "ir-1", "AutoScalingGroupName": "qa-web"}),
            ),
            foreign,
        ),
        (
            "a-source-nobody-configured",
            qa.clone(),
            "plan",
            envelope(&qa, "com.example.scheduler", "RolloutWindowOpened", window),
            "com.example.scheduler",
        ),
    ];
    for (case, account, queue, body, _) in &cases {
        deliver(&world, account, queue, case, body).await;
    }
    // And through EventBridge itself: a foreign account putting an amiflow event on the hub bus.
    let foreign_config = e2e::sdk_config_in(&world.local.endpoint(), foreign).await;
    let put = aws_sdk_eventbridge::Client::new(&foreign_config)
        .put_events()
        .entries(
            aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                .event_bus_name(world.account(&hub)["bus_arn"].as_str().unwrap())
                .source("amiflow")
                .detail_type("AmiBuilt")
                .detail(built.to_string())
                .build(),
        )
        .send()
        .await;
    // Refused at the edge. In AWS the hub bus's policy (world.py and deploy/hub.yaml allow the
    // installation's accounts only) refuses it with AccessDenied; the emulator looks the bus up
    // in the caller's own account and answers ResourceNotFoundException. Either way no worker
    // sees it; the forged deliveries above are what gets past a bus policy opened too wide.
    let refused_at_the_edge = match &put {
        Ok(out) => out.failed_entry_count() == 1,
        Err(e) => e.as_service_error().is_some(),
    };
    assert!(
        refused_at_the_edge,
        "a foreign account's PutEvents: {put:?}"
    );

    support::rollout(&world, &before, &mut audit).await;
    wait_dead_letters(&world, cases.len() as u64, Duration::from_secs(60)).await;
    let found = dead_letters(&world).await;
    for (case, _, queue, _, says) in &cases {
        let d = found
            .iter()
            .find(|d| d.case.as_deref() == Some(*case))
            .unwrap_or_else(|| panic!("{case}: not dead-lettered: {found:#?}"));
        assert!(
            d.reason.contains(says),
            "{case}: reason {:?} should say {says:?}",
            d.reason
        );
        assert_eq!(d.queue.split('/').nth(1), Some(*queue), "{case}");
    }
    assert_eq!(found.len(), cases.len(), "{found:#?}");
    // Reported: each refusal is a warning in its worker's log, with the reason.
    let logs = std::fs::read_dir(world.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    let warned = logs
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") && l.contains(foreign))
        .count();
    assert!(
        warned >= 4,
        "the foreign-account refusals are logged as warnings ({warned})"
    );
    assert_eq!(
        world.exited().await,
        Vec::<String>::new(),
        "no worker crashed"
    );
}
