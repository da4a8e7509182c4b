//! The operator commands end to end, as someone on call runs them: the real amictl binary
//! against a local world (`amictl local up`) with real worker processes, and every claim checked
//! against what the test reads from AWS itself.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use serde_json::{Value, json};

use common::{amictl, command, config_from, exports, ok, text};

const PARAMETER: &str = "/golden/al2023/ami-id";

/// A local world that is taken down however the test ends.
struct World {
    dir: tempfile::TempDir,
    state: Value,
    world: Value,
}

impl World {
    fn up(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["local", "up"];
        args.extend_from_slice(extra);
        let out = ok(&amictl(dir.path(), &args), "local up");
        let state: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap())
                .unwrap();
        assert!(
            extra.contains(&"--no-workers")
                || state["missing_workers"]
                    .as_array()
                    .is_none_or(Vec::is_empty),
            "worker binaries are missing (build them: cargo build -p rollout --bins):\n{out}"
        );
        let world: Value = serde_json::from_str(
            &std::fs::read_to_string(state["world_file"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        Self { dir, state, world }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let started = Instant::now();
        let out = amictl(self.path(), args);
        // Shown with the test's output when it fails: which command was slow or wrong.
        eprintln!(
            "amictl {} ({:.1} s, {})",
            args.join(" "),
            started.elapsed().as_secs_f64(),
            out.status
        );
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = ok(&self.run(args), &args.join(" "));
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}):\n{out}"))
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "{args:?} should have failed:\n{}",
            text(&out.stdout)
        );
        text(&out.stderr)
    }

    async fn config(&self, stage: &str) -> SdkConfig {
        let env = exports(&ok(
            &self.run(&["local", "env", "--account", stage]),
            "local env",
        ));
        config_from(&env).await
    }

    fn queue_url(&self, stage: &str, worker: &str, which: &str) -> String {
        self.state["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["stage"] == stage)
            .unwrap()["queues"][worker][which]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn candidate(&self) -> String {
        self.world["amis"]["candidate"].as_str().unwrap().to_owned()
    }

    fn policy_file(&self) -> PathBuf {
        PathBuf::from(self.state["config_file"].as_str().unwrap())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = amictl(self.dir.path(), &["local", "down"]);
    }
}

/// Poll `check` until it returns `Some`, failing with `what` and the last value at the deadline.
fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not reached in {limit:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The messages `dlq list --json` shows for one stage's DLQ.
fn listed<'a>(list: &'a Value, stage: &str, dlq: &str) -> &'a [Value] {
    list.as_array()
        .unwrap()
        .iter()
        .find(|q| q["stage"] == stage && q["name"] == dlq)
        .unwrap_or_else(|| panic!("no {dlq} of {stage} in {list:#}"))["messages"]
        .as_array()
        .unwrap()
}

fn ids(messages: &[Value]) -> BTreeSet<String> {
    messages
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn visible_messages(sqs: &aws_sdk_sqs::Client, url: &str) -> (u64, u64) {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    let attrs = attrs.attributes().unwrap();
    let n = |a| attrs[&a].parse::<u64>().unwrap();
    (
        n(QueueAttributeName::ApproximateNumberOfMessages),
        n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

async fn parameter(config: &SdkConfig) -> String {
    aws_sdk_ssm::Client::new(config)
        .get_parameter()
        .name(PARAMETER)
        .send()
        .await
        .unwrap()
        .parameter()
        .and_then(|p| p.value())
        .unwrap_or_default()
        .to_owned()
}

/// The AMI of every instance of `group`, read from Auto Scaling and EC2.
async fn instance_amis(config: &SdkConfig, group: &str) -> Vec<String> {
    let groups = aws_sdk_autoscaling::Client::new(config)
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .unwrap();
    let ids: Vec<String> = groups.auto_scaling_groups()[0]
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let reservations = aws_sdk_ec2::Client::new(config)
        .describe_instances()
        .set_instance_ids(Some(ids))
        .send()
        .await
        .unwrap();
    reservations
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.image_id().map(str::to_owned))
        .collect()
}

/// Let the stage accounts launch the AMI: what the share-worker would have done.
async fn share(hub: &SdkConfig, ami: &str, accounts: &[&str]) {
    let ec2 = aws_sdk_ec2::Client::new(hub);
    let mut permission = aws_sdk_ec2::types::LaunchPermissionModifications::builder();
    for a in accounts {
        permission = permission.add(
            aws_sdk_ec2::types::LaunchPermission::builder()
                .user_id(*a)
                .build(),
        );
    }
    ec2.modify_image_attribute()
        .image_id(ami)
        .launch_permission(permission.build())
        .send()
        .await
        .unwrap();
    let image = ec2.describe_images().image_ids(ami).send().await.unwrap();
    for snapshot in image.images()[0]
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
    {
        ec2.modify_snapshot_attribute()
            .snapshot_id(snapshot)
            .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
            .operation_type(aws_sdk_ec2::types::OperationType::Add)
            .set_user_ids(Some(accounts.iter().map(|a| (*a).to_owned()).collect()))
            .send()
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poisoned_rollout_is_listed_replayed_by_filter_and_then_completes() {
    let w = World::up(&["--retry-base-seconds", "0.2", "--refresh-step", "0.5"]);
    let candidate = w.candidate();
    let rollout = format!("{PARAMETER}@{candidate}");
    let hub = w.config("qa").await;
    let prod = w.config("prod").await;
    let uat = w.config("uat").await;

    // Poison: AmiShared for an AMI that was never shared with uat and prod. Their param-workers
    // cannot see it, retry, and dead-letter it after five receives.
    let shared = |stage: &str, account: &str| {
        json!({
            "ami_id": candidate, "region": "us-east-1", "source_account": "111111111111",
            "target_account": account, "stage": stage, "parameter_name": PARAMETER,
            "created_at": "2026-11-01T00:00:00Z",
        })
    };
    let file = w.path().join("uat-shared.json");
    std::fs::write(&file, shared("uat", "222222222222").to_string()).unwrap();
    let sent = w.json(&[
        "inject",
        "AmiShared",
        "--detail",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(sent["rollout_id"], rollout.as_str());
    assert!(sent["event_id"].as_str().is_some_and(|id| !id.is_empty()));
    let mut stdin_inject = command(
        w.path(),
        &["inject", "AmiShared", "--detail", "-", "--json"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    stdin_inject
        .stdin
        .take()
        .unwrap()
        .write_all(shared("prod", "333333333333").to_string().as_bytes())
        .unwrap();
    let out = stdin_inject.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sent: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sent["key"], format!("shared:{candidate}:333333333333"));

    // A message that is no event at all, with an attribute of its own, straight into prod's queue.
    let prod_sqs = aws_sdk_sqs::Client::new(&prod);
    prod_sqs
        .send_message()
        .queue_url(w.queue_url("prod", "param", "url"))
        .message_body("{not json")
        .message_attributes(
            "trace-id",
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value("decoy-1")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    let list = wait_for(
        "three messages dead-lettered",
        Duration::from_secs(120),
        || {
            let list = w.json(&["dlq", "list", "--json"]);
            let (u, p) = (
                listed(&list, "uat", "amiflow-param-dlq").len(),
                listed(&list, "prod", "amiflow-param-dlq").len(),
            );
            if u == 1 && p == 2 {
                Ok(list)
            } else {
                Err(format!("uat {u}, prod {p}"))
            }
        },
    );
    let uat_letter = &listed(&list, "uat", "amiflow-param-dlq")[0];
    assert_eq!(uat_letter["detail_type"], "AmiShared");
    assert_eq!(uat_letter["rollout_id"], rollout.as_str());
    assert_eq!(uat_letter["kind"], "transient-exhausted");
    assert_eq!(uat_letter["receives"], 5);
    assert!(
        uat_letter["reason"]
            .as_str()
            .unwrap()
            .contains("not visible from account 222222222222"),
        "{uat_letter:#}"
    );
    let prod_letters = listed(&list, "prod", "amiflow-param-dlq");
    let decoy = prod_letters
        .iter()
        .find(|m| m["detail_type"].is_null())
        .unwrap();
    assert_eq!(decoy["kind"], "invalid-json");
    assert_eq!(decoy["attributes"]["trace-id"], "decoy-1");
    let decoy_id = decoy["message_id"].as_str().unwrap().to_owned();

    // Listing consumed nothing: the messages are visible to anyone, and a second list (this
    // time through the standard credential chain and the policy, as against real AWS) sees the
    // same ones.
    let prod_dlq = w.queue_url("prod", "param", "dlq_url");
    assert_eq!(visible_messages(&prod_sqs, &prod_dlq).await, (2, 0));
    let base_env = exports(&ok(&w.run(&["local", "env"]), "local env"));
    let mut chain = command(
        w.path(),
        &[
            "dlq",
            "list",
            "--json",
            "--config",
            w.policy_file().to_str().unwrap(),
        ],
    );
    chain.envs(base_env.iter().filter(|(k, _)| k.starts_with("AWS_")));
    let again: Value =
        serde_json::from_str(&ok(&chain.output().unwrap(), "dlq list --config")).unwrap();
    assert_eq!(
        ids(listed(&again, "prod", "amiflow-param-dlq")),
        ids(prod_letters)
    );
    assert_eq!(
        ids(listed(&again, "uat", "amiflow-param-dlq")),
        ids(listed(&list, "uat", "amiflow-param-dlq"))
    );
    let table = ok(&w.run(&["dlq", "list", "--account", "prod"]), "dlq list");
    assert!(
        table.contains("transient-exhausted") && table.contains("invalid-json"),
        "{table}"
    );

    // Fix the cause, then look before moving: a dry run moves nothing.
    share(&hub, &candidate, &["222222222222", "333333333333"]).await;
    let dry = w.json(&[
        "dlq",
        "replay",
        "--detail-type",
        "AmiShared",
        "--dry-run",
        "--json",
    ]);
    let sum = |r: &Value, field: &str| {
        r.as_array()
            .unwrap()
            .iter()
            .map(|q| q[field].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(
        (
            sum(&dry, "matched"),
            sum(&dry, "moved"),
            sum(&dry, "not_moved")
        ),
        (2, 0, 2)
    );
    assert_eq!(visible_messages(&prod_sqs, &prod_dlq).await, (2, 0));
    let after_dry = w.json(&["dlq", "list", "--json"]);
    assert_eq!(
        ids(listed(&after_dry, "prod", "amiflow-param-dlq")),
        ids(prod_letters)
    );

    // Replay only this rollout's AmiShared: the decoy stays.
    let moved = w.json(&[
        "dlq",
        "replay",
        "--detail-type",
        "AmiShared",
        "--rollout",
        &rollout,
        "--json",
    ]);
    assert_eq!((sum(&moved, "matched"), sum(&moved, "moved")), (2, 2));
    let left = w.json(&[
        "dlq",
        "list",
        "--account",
        "prod",
        "--queue",
        "param",
        "--json",
    ]);
    assert_eq!(
        ids(listed(&left, "prod", "amiflow-param-dlq")),
        BTreeSet::from([decoy_id.clone()])
    );

    // The replayed events now succeed: both stages publish the AMI.
    for (stage, config) in [("uat", &uat), ("prod", &prod)] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while parameter(config).await != candidate {
            assert!(
                Instant::now() < deadline,
                "{stage}'s parameter never became {candidate}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // Open prod's window now and see the rollout complete there.
    let window = w.json(&["rerun", "window", "--stage", "prod", "--json"]);
    assert!(
        window["key"]
            .as_str()
            .unwrap()
            .starts_with("window:333333333333:prod:")
    );
    let status = wait_for("prod's rollout to finish", Duration::from_secs(180), || {
        let status = w.json(&["status", "--stage", "prod", "--json"]);
        let busy = status[0]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["state"] == "stale" || g["state"] == "refreshing")
            .count();
        if busy == 0 {
            Ok(status)
        } else {
            Err(format!("{busy} groups stale or refreshing"))
        }
    });
    // `status --json` against what the test reads from AWS.
    let report = &status[0];
    let golden = report["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == PARAMETER)
        .unwrap();
    assert_eq!(golden["ami"], candidate.as_str());
    let prod_groups = w.world["accounts"]["333333333333"]["groups"]
        .as_array()
        .unwrap();
    let mut refreshed = Vec::new();
    for g in prod_groups {
        let name = g["name"].as_str().unwrap();
        let reported = report["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("status lists no {name}"));
        let amis = instance_amis(&prod, name).await;
        let off_golden = amis.iter().filter(|a| **a != candidate).count() as u64;
        match g["expected"].as_str().unwrap() {
            "refresh" => {
                assert_eq!(reported["state"], "current", "{name}: {reported:#}");
                assert!(!amis.is_empty() && off_golden == 0, "{name}: {amis:?}");
                assert_eq!(reported["instances_off_golden"], off_golden, "{name}");
                refreshed.push(name.to_owned());
            }
            "skip" => {
                assert_eq!(reported["state"], "skipped", "{name}: {reported:#}");
                assert_eq!(reported["instances_off_golden"], off_golden, "{name}");
            }
            _ => assert_ne!(reported["state"], "stale", "{name}: {reported:#}"),
        }
    }
    assert!(refreshed.len() >= 5, "{refreshed:?}");

    // The trace tells the same story, with nothing left in a DLQ. Outcomes reach the hub's
    // audit log through two buses, a moment after the groups changed: poll for them.
    let has = |steps: &[Value], step: &str, stage: &str, on: &str, result: &str| {
        steps.iter().any(|s| {
            s["step"] == step
                && s["stage"] == stage
                && s["subject"].as_str().unwrap().contains(on)
                && s["result"].as_str().unwrap().starts_with(result)
        })
    };
    let trace = wait_for(
        "every outcome in the trace",
        Duration::from_secs(60),
        || {
            let trace = w.json(&["trace", &rollout, "--json"]);
            let steps = trace["steps"].as_array().unwrap();
            match refreshed
                .iter()
                .find(|name| !has(steps, "AsgRefreshFinished", "prod", name, "succeeded"))
            {
                None => Ok(trace),
                Some(missing) => Err(format!("no success of {missing} yet")),
            }
        },
    );
    let steps = trace["steps"].as_array().unwrap();
    assert!(
        has(steps, "AmiShared", "uat", &candidate, "shared"),
        "{trace:#}"
    );
    assert!(
        has(steps, "ParamUpdated", "uat", PARAMETER, "="),
        "{trace:#}"
    );
    assert!(
        has(steps, "ParamUpdated", "prod", PARAMETER, "="),
        "{trace:#}"
    );
    assert!(
        !steps
            .iter()
            .any(|s| s["result"].as_str().unwrap().starts_with("dead-lettered")),
        "{trace:#}"
    );

    // Attributes survive a replay: the decoy goes back, fails again, and returns with its own
    // attribute next to amiflow's.
    let decoy_back = w.json(&[
        "dlq",
        "replay",
        "--account",
        "prod",
        "--queue",
        "param",
        "--reason",
        "invalid-json",
        "--json",
    ]);
    assert_eq!(sum(&decoy_back, "moved"), 1);
    let returned = wait_for("the decoy back in the DLQ", Duration::from_secs(60), || {
        let list = w.json(&[
            "dlq",
            "list",
            "--account",
            "prod",
            "--queue",
            "param",
            "--json",
        ]);
        match listed(&list, "prod", "amiflow-param-dlq") {
            [one] if one["message_id"] != decoy_id.as_str() => Ok(one.clone()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(returned["attributes"]["trace-id"], "decoy-1");
    assert_eq!(returned["kind"], "invalid-json");

    // Operator mistakes get a clear message naming what was wrong.
    let err = w.fails(&["dlq", "list", "--queue", "nope"]);
    assert!(err.contains("no DLQ named amiflow-nope-dlq"), "{err}");
    let err = w.fails(&["dlq", "replay", "--account", "staging"]);
    assert!(
        err.contains("`staging`") && err.contains("prod (333333333333)"),
        "{err}"
    );
    let missing = format!(
        "{}/333333333333/no-such-queue",
        w.state["endpoint"].as_str().unwrap()
    );
    let err = w.fails(&["dlq", "replay", "--account", "prod", "--to", &missing]);
    assert!(err.contains("no such queue"), "{err}");
    let err = w.fails(&[
        "inject",
        "AmiShared",
        "-f",
        &format!("ami_id={candidate}"),
        "-f",
        "region=us-east-1",
        "-f",
        "source_account=111111111111",
        "-f",
        "target_account=444444444444",
        "-f",
        "stage=prod",
        "-f",
        &format!("parameter_name={PARAMETER}"),
        "-f",
        "created_at=2026-11-01T00:00:00Z",
    ]);
    assert!(
        err.contains("/target_account 444444444444 is not an account"),
        "{err}"
    );
    let err = w.fails(&["trace", "/golden/al2023/ami-id@ami-00000000"]);
    assert!(err.contains("nothing recorded"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_replay_of_a_large_dlq_loses_nothing_and_resumes() {
    const MESSAGES: usize = 300;
    let w = World::up(&["--no-workers"]);
    let qa = w.config("qa").await;
    let sqs = aws_sdk_sqs::Client::new(&qa);
    let dlq = w.queue_url("qa", "audit", "dlq_url");
    let target = sqs
        .create_queue()
        .queue_name("replay-target")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(10) {
        let entries = chunk
            .iter()
            .map(|n| {
                SendMessageBatchRequestEntry::builder()
                    .id(n.to_string())
                    .message_body(format!("{{\"n\": {n}}}"))
                    .message_attributes(
                        "n",
                        MessageAttributeValue::builder()
                            .data_type("Number")
                            .string_value(n.to_string())
                            .build()
                            .unwrap(),
                    )
                    .build()
                    .unwrap()
            })
            .collect();
        let sent = sqs
            .send_message_batch()
            .queue_url(&dlq)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
        assert!(sent.failed().is_empty());
    }
    let args = [
        "dlq",
        "replay",
        "--account",
        "qa",
        "--queue",
        "audit",
        "--to",
        &target,
        "--rate",
        "40",
    ];
    let child = command(w.path(), &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while visible_messages(&sqs, &target).await.0 < 40 {
        assert!(Instant::now() < deadline, "the replay never got going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "an interrupted replay must not report success"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("interrupted") && err.contains("run the same command again"),
        "{err}"
    );
    let moved = visible_messages(&sqs, &target).await.0 as usize;
    let (visible, hidden) = visible_messages(&sqs, &dlq).await;
    assert!(
        moved < MESSAGES,
        "the interrupt came too late to test anything"
    );
    assert_eq!(hidden, 0, "the interrupted replay released what it held");
    assert_eq!(
        moved + visible as usize,
        MESSAGES,
        "nothing lost, nothing doubled"
    );

    // Resume: the same command moves the rest.
    ok(&w.run(&args), "the resumed replay");
    assert_eq!(visible_messages(&sqs, &dlq).await, (0, 0));
    let mut seen = BTreeSet::new();
    loop {
        let got = sqs
            .receive_message()
            .queue_url(&target)
            .max_number_of_messages(10)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        if got.messages().is_empty() {
            break;
        }
        for m in got.messages() {
            let n: usize = m.message_attributes().unwrap()["n"]
                .string_value()
                .unwrap()
                .parse()
                .unwrap();
            assert!(seen.insert(n), "message {n} delivered twice");
            assert_eq!(m.body().unwrap(), format!("{{\"n\": {n}}}"));
            sqs.delete_message()
                .queue_url(&target)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    assert_eq!(seen, (0..MESSAGES).collect::<BTreeSet<_>>());
}

#[test]
fn bad_input_is_refused_with_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    // Validation happens before any AWS call: no world needed to learn the event is wrong.
    let out = amictl(
        dir.path(),
        &[
            "inject",
            "AmiBuilt",
            "-f",
            "ami_id=ami-XYZ",
            "-f",
            "region=us-east-1",
            "-f",
            "image_name=golden-al2023-2026-12",
            "-f",
            "created_at=2026-12-01T00:00:00Z",
            "-f",
            "parameter_name=/golden/al2023/ami-id",
        ],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("/ami_id") && err.contains("ami-XYZ"), "{err}");
    let out = amictl(dir.path(), &["inject", "AmiBuilt", "-f", "ami_id"]);
    assert!(
        text(&out.stderr).contains("NAME=TEXT"),
        "{}",
        text(&out.stderr)
    );
    let out = amictl(dir.path(), &["inject", "AmiBuit"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("AmiBuilt"),
        "{}",
        text(&out.stderr)
    );
    let out = amictl(dir.path(), &["dlq", "list"]);
    assert!(
        text(&out.stderr).contains("no local world is running"),
        "{}",
        text(&out.stderr)
    );

    // Against AWS without any credentials: say so, and how to get some.
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../local/amiflow.toml");
    let out = command(
        dir.path(),
        &["dlq", "list", "--config", policy.to_str().unwrap()],
    )
    .env("HOME", dir.path())
    .env("AWS_REGION", "us-east-1")
    .env("AWS_CONFIG_FILE", dir.path().join("none"))
    .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
    .env("AWS_EC2_METADATA_DISABLED", "true")
    // Nothing may reach real AWS, even by mistake.
    .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("no usable AWS credentials") && err.contains("AWS_PROFILE"),
        "{err}"
    );
}
