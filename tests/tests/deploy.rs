//! Deploy: the hub stack and two spoke stacks are created from `deploy/hub.yaml` and
//! `deploy/spoke.yaml` through CloudFormation in the local world, and a rollout runs on what those
//! stacks created: their buses, rules, queues, DLQs and Scheduler windows. The worker binaries
//! run as long-polling processes on the stacks' queues (`WorkerRuntime=service`).
//!
//! The hub account is also the qa stage (its spoke stack reuses the hub's bus); uat is a spoke of
//! its own, reached by the hub's per-spoke forwarding rule and forwarding its outcomes back. The
//! windows open by firing each stack's schedule, so the plan-worker reads the event shape the
//! Scheduler really sends. In uat the refresh-worker's first `ec2:CreateLaunchTemplateVersion`
//! is refused as AWS refuses a role without that permission: that request must land in the DLQ
//! with the action in its reason, and replaying it once the "role is fixed" finishes the group.
//!
//! Emulator gaps and how this test handles them (also listed in deploy/README.md):
//! - Lambda functions cannot run in moto (no container runtime), and moto's SQS would hand each
//!   message to an event source mapping inside `SendMessage`, hiding it from any other consumer.
//!   The stacks are created with `WorkerRuntime=service` (no functions, mappings or function log
//!   groups) and the workers run as processes; the Lambda-mode handler is tested in `lambda.rs`.
//! - EventBridge Scheduler never fires in moto. The shim creates `AWS::Scheduler::Schedule` and
//!   fires it on request (`/amiflow-emulator/scheduler/fire`), rendering the target input as the
//!   Scheduler does; the test fires each window at "now" instead of waiting for the cron.
//! - IAM is not enforced, so a missing permission is injected (`faults` `deny`), answering with
//!   EC2's own `UnauthorizedOperation`; bus and queue policies are stored, not enforced.
//! - CloudFormation in moto lacked `Fn::ForEach`, `AWS::IAM::RolePolicy`,
//!   `AWS::SQS::QueuePolicy`, `AWS::Scheduler::Schedule`, a bus's `Policy`, `Ref` of a bus and the
//!   `!Condition` short form: all fixed in `local/amiflow_shim/cloudformation_deploy.py`.
//! - Groups, AMIs and golden parameters are the applications' side, not amiflow's templates:
//!   `local/world.py --no-messaging` builds them as in every other end-to-end test.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_sdk_cloudformation::types::{Capability, Parameter, StackStatus};
use aws_sdk_sqs::types::MessageSystemAttributeName;
use chrono::{SecondsFormat, TimeZone, Utc};
use e2e::world::{expects_outcome, launch, log_tails, provision, spawn};
use e2e::{Local, attr, eventually, http_json, queue_depth, sdk_config_in};
use events::{AmiBuilt, Detail};
use local_world::{Audit, WORKERS};
use serde_json::Value;
use support::PARAMETER;
use support::reads::{golden_parameter, instance_amis};

const HUB: &str = "111111111111";
const UAT: &str = "222222222222";
const DENIED: &str = "ec2:CreateLaunchTemplateVersion";

async fn create_stack(
    config: &SdkConfig,
    name: &str,
    template: &str,
    parameters: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let cfn = aws_sdk_cloudformation::Client::new(config);
    let body =
        std::fs::read_to_string(emulator::project_root().join("deploy").join(template)).unwrap();
    cfn.create_stack()
        .stack_name(name)
        .template_body(body)
        .set_parameters(Some(
            parameters
                .iter()
                .map(|(k, v)| {
                    Parameter::builder()
                        .parameter_key(*k)
                        .parameter_value(*v)
                        .build()
                })
                .collect(),
        ))
        .capabilities(Capability::CapabilityNamedIam)
        .capabilities(Capability::CapabilityAutoExpand)
        .send()
        .await
        .unwrap_or_else(|e| panic!("creating {name} from {template}: {e:?}"));
    let stack = eventually(
        &format!("{name} to be created"),
        Duration::from_secs(60),
        || async {
            let out = cfn.describe_stacks().stack_name(name).send().await.unwrap();
            let stack = out.stacks()[0].clone();
            match stack.stack_status() {
                Some(StackStatus::CreateComplete) => Some(stack),
                Some(StackStatus::CreateInProgress) => None,
                other => panic!("{name}: {other:?} {:?}", stack.stack_status_reason()),
            }
        },
    )
    .await;
    stack
        .outputs()
        .iter()
        .map(|o| {
            (
                o.output_key().unwrap_or_default().to_owned(),
                o.output_value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The outputs of the hub stack, and of each spoke stack by its account.
struct Stacks {
    hub: BTreeMap<String, String>,
    spokes: BTreeMap<String, BTreeMap<String, String>>,
}

impl Stacks {
    /// (account, queue URL, DLQ URL) of every worker queue the stacks created.
    fn worker_queues(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for worker in ["Ingest", "Share", "Audit"] {
            out.push((
                HUB.to_owned(),
                self.hub[&format!("{worker}QueueUrl")].clone(),
                self.hub[&format!("{worker}DeadLetterQueueUrl")].clone(),
            ));
        }
        for (account, o) in &self.spokes {
            for worker in ["Param", "Plan", "Refresh"] {
                out.push((
                    account.clone(),
                    o[&format!("{worker}QueueUrl")].clone(),
                    o[&format!("{worker}DeadLetterQueueUrl")].clone(),
                ));
            }
        }
        out
    }
}

/// Record what the hub's audit queue holds now.
async fn collect(seen: &mut Audit, hub: &SdkConfig, audit: &str) {
    for body in local_world::drain(hub, audit).await.unwrap() {
        seen.record(&body);
    }
}

/// Open `account`'s window by firing its stack's schedule at `now`, as the Scheduler would.
fn open_window(local: &Local, account: &str, schedule: &str) -> Value {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let reply = http_json(
        local.emulator.port(),
        "POST",
        "/amiflow-emulator/scheduler/fire",
        Some(&serde_json::json!({"account": account, "name": schedule, "scheduled_time": now})),
    );
    assert_eq!(
        reply["entries"][0]["EventId"].as_str().map(str::is_empty),
        Some(false),
        "the window event was put on the bus: {reply}"
    );
    reply["detail"].clone()
}

#[tokio::test]
async fn the_deploy_stacks_carry_a_rollout_and_a_missing_permission_dead_letters_with_its_action() {
    let local = Local::start().await;
    let dir = tempfile::tempdir().unwrap();
    let world = provision(&local, dir.path(), "small", &["--no-messaging"]).await;
    let endpoint = local.endpoint();
    let mut configs = BTreeMap::new();
    for account in [HUB, UAT] {
        configs.insert(account, sdk_config_in(&endpoint, account).await);
    }
    let stage_of = |account: &str| world["accounts"][account]["stage"].as_str().unwrap();

    // 1. The stacks, in the documented order: hub, then the spokes (the hub is also qa).
    let hub = create_stack(
        &configs[HUB],
        "amiflow-hub",
        "hub.yaml",
        &[("SpokeAccountIds", UAT), ("WorkerRuntime", "service")],
    )
    .await;
    let mut spokes = BTreeMap::new();
    let stage_accounts = format!("{HUB},{UAT}");
    for (account, cron) in [
        (HUB, "cron(0 2 ? * SAT#1 *)"),
        (UAT, "cron(0 2 ? * SAT#2 *)"),
    ] {
        // WindowDurationHours equals the stage's window.duration_hours in local/amiflow.toml.
        let outputs = create_stack(
            &configs[account],
            "amiflow-spoke",
            "spoke.yaml",
            &[
                ("HubAccountId", HUB),
                ("StageAccountIds", &stage_accounts),
                ("Stage", stage_of(account)),
                ("WindowCron", cron),
                ("WindowDurationHours", "4"),
                ("WorkerRuntime", "service"),
            ],
        )
        .await;
        spokes.insert(account.to_owned(), outputs);
    }
    assert_eq!(
        spokes[HUB]["BusArn"], hub["BusArn"],
        "the hub's spoke stack uses the hub's bus"
    );
    let stacks = Stacks { hub, spokes };

    // 2. The workers, each on the queue its stack created.
    let mut workers = Vec::new();
    for (account, outputs) in &stacks.spokes {
        for worker in WORKERS.iter().filter(|w| w.serves(account == HUB)) {
            // The stacks name a worker's outputs after its queue: `RefreshQueueUrl`, ...
            let mut name = worker.queue.to_owned();
            name[..1].make_ascii_uppercase();
            let outputs = if worker.hub_only {
                &stacks.hub
            } else {
                outputs
            };
            let (queue, dlq) = (
                &outputs[&format!("{name}QueueUrl")],
                &outputs[&format!("{name}DeadLetterQueueUrl")],
            );
            let launch = launch(
                &endpoint,
                account,
                stage_of(account),
                worker,
                (queue, dlq),
                dir.path(),
            )
            .await;
            workers.push(spawn(&launch));
        }
    }
    let logs = || log_tails(dir.path(), 15);

    // 3. The AMI is built: the hub's share rule, its forwarding rule to uat, the spokes' param
    //    rules. Only the deployed stages are targets (the policy also lists prod).
    let candidate = world["amis"]["candidate"].as_str().unwrap().to_owned();
    let mut built = AmiBuilt::new(
        &candidate,
        "us-east-1",
        "golden-al2023-2026-11",
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        PARAMETER,
    );
    built.targets = Some(vec![HUB.to_owned(), UAT.to_owned()]);
    let detail = Detail::from(built);
    let put = aws_sdk_eventbridge::Client::new(&configs[HUB])
        .put_events()
        .entries(
            aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                .source("amiflow")
                .detail_type(detail.detail_type())
                .detail(detail.to_value().to_string())
                .event_bus_name(&stacks.hub["BusArn"])
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(put.failed_entry_count(), 0);
    // Only the first stage is promoted when the AMI is built; uat by the hub's gate at its window.
    eventually(
        &format!("{HUB}'s golden parameter to hold {candidate}"),
        Duration::from_secs(90),
        || async { (golden_parameter(&configs[HUB]).await.0 == candidate).then_some(()) },
    )
    .await;
    assert_ne!(
        golden_parameter(&configs[UAT]).await.0,
        candidate,
        "uat's parameter changed before its window and gate"
    );

    // 4. uat's refresh-worker role "lacks" ec2:CreateLaunchTemplateVersion, once.
    let faults = local.faults(&serde_json::json!({
        "deny": [{"account": UAT, "action": DENIED, "times": 1}]
    }));
    let denied_before = faults["denied"].as_u64().unwrap();

    // 5. The windows open stage by stage, from each stack's schedule.
    let audit = stacks.hub["AuditQueueUrl"].clone();
    let mut seen = Audit::default();
    let mut replayed = false;
    for account in [HUB, UAT] {
        let spoke = &stacks.spokes[account];
        let window = open_window(&local, account, &spoke["WindowScheduleName"]);
        assert!(
            window.get("closes_at").is_none() && window["window_hours"] == 4,
            "the Scheduler sends opens_at and window_hours: {window}"
        );
        let expected: Vec<String> = world["accounts"][account]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| expects_outcome(g))
            .map(|g| g["name"].as_str().unwrap().to_owned())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            collect(&mut seen, &configs[HUB], &audit).await;
            if account == UAT && !replayed {
                replayed = replay_the_refused_request(&configs[UAT], spoke).await;
            }
            let missing: Vec<&String> = expected
                .iter()
                .filter(|n| seen.outcomes(account, n, &candidate).is_none())
                .collect();
            if missing.is_empty() && (account != UAT || replayed) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no AsgRefreshFinished for {missing:?} (refused request replayed: {replayed})\nseen: {:#?}\n{}",
                stage_of(account),
                seen.finished,
                logs()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let faults = local.faults(&serde_json::json!({}));
    assert_eq!(
        faults["denied"].as_u64().unwrap(),
        denied_before + 1,
        "the emulator refused exactly one call: {faults}"
    );

    // 6. Nothing left in flight, then the end state AWS holds.
    let settle_by = Instant::now() + Duration::from_secs(60);
    let mut quiet_since: Option<Instant> = None;
    loop {
        let mut backlog = 0;
        for (account, queue, _) in stacks.worker_queues() {
            if !queue.ends_with("/amiflow-audit") {
                backlog +=
                    queue_depth(&aws_sdk_sqs::Client::new(&configs[&*account]), &queue).await;
            }
        }
        if backlog == 0 {
            if quiet_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(3) {
                break;
            }
        } else {
            quiet_since = None;
        }
        assert!(
            Instant::now() < settle_by,
            "the queues did not drain\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    collect(&mut seen, &configs[HUB], &audit).await;
    for account in [HUB, UAT] {
        let config = &configs[account];
        assert_eq!(
            golden_parameter(config).await.0,
            candidate,
            "{account}: parameter"
        );
        for g in world["accounts"][account]["groups"].as_array().unwrap() {
            let name = g["name"].as_str().unwrap();
            let label = format!("{}/{name} ({})", stage_of(account), g["kind"]);
            let said = seen.outcomes(account, name, &candidate);
            let amis = BTreeSet::from_iter(instance_amis(config, name).await);
            match g["expected"].as_str().unwrap() {
                "refresh" => {
                    assert_eq!(amis, BTreeSet::from([candidate.clone()]), "{label}");
                    assert_eq!(said.unwrap()[0].0, "succeeded", "{label}: {said:?}");
                }
                "rolled-back" => {
                    assert!(!amis.contains(&candidate), "{label}: rolled back: {amis:?}");
                    assert_eq!(said.unwrap()[0].0, "rolled-back", "{label}: {said:?}");
                }
                "skip" => {
                    assert_eq!(said.unwrap()[0].0, "skipped", "{label}: {said:?}");
                    assert!(!amis.contains(&candidate), "{label}: untouched: {amis:?}");
                }
                "untouched" => {
                    assert!(said.is_none(), "{label}: no request: {said:?}");
                    let was = g["ami_id"].as_str().unwrap().to_owned();
                    assert_eq!(amis, BTreeSet::from([was]), "{label}");
                }
                other => panic!("world.py expectation {other:?} unknown to this test"),
            }
        }
    }
    assert_eq!(
        seen.published(&candidate),
        BTreeSet::from([HUB.to_owned(), UAT.to_owned()]),
        "ParamUpdated of both stages reached the hub's audit queue (uat's through its forwarding rule)"
    );
    let mut dead = BTreeMap::new();
    let undelivered = [
        (HUB.to_owned(), stacks.hub["UndeliveredQueueUrl"].clone()),
        (
            HUB.to_owned(),
            stacks.spokes[HUB]["UndeliveredQueueUrl"].clone(),
        ),
        (
            UAT.to_owned(),
            stacks.spokes[UAT]["UndeliveredQueueUrl"].clone(),
        ),
    ];
    let dlqs = stacks.worker_queues().into_iter().map(|(a, _, d)| (a, d));
    for (account, url) in dlqs.chain(undelivered) {
        let n = queue_depth(&aws_sdk_sqs::Client::new(&configs[&*account]), &url).await;
        if n > 0 {
            dead.insert(url, n);
        }
    }
    assert_eq!(dead, BTreeMap::new(), "no dead letters\n{}", logs());
}

/// If uat's refresh DLQ holds the refused request: check its reason, send it back to the queue
/// (what `amictl dlq replay` does once the role has the permission), and say so.
async fn replay_the_refused_request(config: &SdkConfig, spoke: &BTreeMap<String, String>) -> bool {
    let sqs = aws_sdk_sqs::Client::new(config);
    let got = sqs
        .receive_message()
        .queue_url(&spoke["RefreshDeadLetterQueueUrl"])
        .max_number_of_messages(10)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .unwrap();
    let Some(m) = got.messages().first() else {
        return false;
    };
    assert_eq!(got.messages().len(), 1, "one refused request");
    assert_eq!(
        attr(m, "amiflow-error-kind").as_deref(),
        Some("permanent"),
        "a missing permission is permanent, not retried"
    );
    let reason = attr(m, "amiflow-error").unwrap_or_default();
    assert!(
        reason.starts_with(&format!("{DENIED}: UnauthorizedOperation")) && reason.contains(DENIED),
        "the reason names the action and AWS's refusal: {reason:?}"
    );
    assert_eq!(
        attr(m, "amiflow-receive-count").as_deref(),
        Some("1"),
        "dead-lettered on the first receive"
    );
    let body: Value = serde_json::from_str(m.body().unwrap()).unwrap();
    assert_eq!(body["detail-type"], "AsgRefreshRequested");
    sqs.send_message()
        .queue_url(&spoke["RefreshQueueUrl"])
        .message_body(m.body().unwrap())
        .send()
        .await
        .unwrap();
    sqs.delete_message()
        .queue_url(&spoke["RefreshDeadLetterQueueUrl"])
        .receipt_handle(m.receipt_handle().unwrap())
        .send()
        .await
        .unwrap();
    true
}
