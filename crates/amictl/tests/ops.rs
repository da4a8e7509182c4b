//! The operator commands end to end, as someone on call runs them: the real amictl binary
//! against a local world (`amictl local up`) with real worker processes, and every claim checked
//! against what the test reads from AWS itself.

mod common;
// The reads the e2e tests judge a rollout by (one copy for both suites).
#[path = "../../../tests/tests/support/reads.rs"]
mod reads;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use serde_json::{Value, json};

use common::{amictl, command, config_from, exports, ok, text};
use reads::{PARAMETER, golden_parameter, instance_amis};

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

    /// The JSON a command printed: with exit 0, or 3 (`status` and `plan` answered, and the
    /// answer needs a person: a halted stage, a failed group; the JSON says which).
    fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "{args:?} failed ({}):\n{}",
            out.status,
            text(&out.stderr)
        );
        let printed = text(&out.stdout);
        serde_json::from_str(&printed)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}):\n{printed}"))
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

    /// `rerun ami` to qa alone, then wait until qa's golden parameter holds `ami`.
    fn publish_in_qa(&self, ami: &str) {
        ok(
            &self.run(&["rerun", "ami", ami, "--targets", "qa"]),
            "rerun ami",
        );
        wait_for("qa's golden parameter", Duration::from_secs(60), || {
            let status = self.json(&["status", "--stage", "qa", "--json"]);
            let holds = &status["stages"][0]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == PARAMETER)
                .unwrap()["ami"];
            (*holds == ami)
                .then_some(())
                .ok_or(format!("holds {holds}"))
        });
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
    assert_eq!(list["version"], 1, "{list:#}");
    list["queues"]
        .as_array()
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
    // The hub's gate promoted both stages (the records the share-worker writes at their
    // windows): without them a param-worker refuses an AmiShared as a forged promotion.
    let records = rollout::aws::SsmRecords(aws_sdk_ssm::Client::new(&hub));
    for stage in ["uat", "prod"] {
        rollout::control::write(
            &records,
            &rollout::control::promotion_path(&candidate, stage),
            &rollout::control::Promotion {
                ami: candidate.clone(),
                stage: stage.into(),
                parameter: PARAMETER.into(),
                at: chrono::Utc::now(),
                reason: "e2e: promoted by the test".into(),
            },
        )
        .await
        .unwrap();
    }
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
    assert_eq!(
        (&sent["version"], &sent["summary"]["sent"]),
        (&Value::from(1), &Value::from(true)),
        "{sent:#}"
    );
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
    // The rollout's trace shows the dead letter and exits 3: a script sees the rollout is not
    // whole.
    let out = w.run(&["trace", &rollout]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).starts_with("amictl: the rollout is not whole: ")
            && text(&out.stderr).contains(" message(s) dead-lettered (`amictl dlq list` says why"),
        "{}",
        text(&out.stderr)
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
        r["queues"]
            .as_array()
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
        while golden_parameter(config).await.0 != candidate {
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
        let status = w.json(&["status", "--stage", "prod", "--output", "json"]);
        let busy = status["stages"][0]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| ["stale", "queued", "refreshing"].contains(&g["state"].as_str().unwrap()))
            .count();
        if busy == 0 {
            Ok(status)
        } else {
            Err(format!("{busy} groups stale or refreshing"))
        }
    });
    // `status --json` against what the test reads from AWS.
    let report = &status["stages"][0];
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
            _ => assert!(
                !["stale", "queued"].contains(&reported["state"].as_str().unwrap()),
                "{name}: {reported:#}"
            ),
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
            // `-o json` is `--output json`, of which `--json` is the alias.
            let trace = w.json(&["trace", &rollout, "-o", "json"]);
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
    // The JSON carries the summary `trace` prints, and the verdict of its exit code.
    assert_eq!(trace["version"], 1);
    assert_eq!(trace["summary"]["steps"], steps.len());
    assert!(
        trace["summary"]["text"]
            .as_str()
            .unwrap()
            .contains(", shared with 2 account(s), parameter updated in 2, groups: "),
        "{:#}",
        trace["summary"]
    );
    assert!(
        trace["summary"]
            .get("attention")
            .is_some_and(|a| a.is_null() || a.is_string()),
        "{:#}",
        trace["summary"]
    );
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
    let out = w.run(&[
        "dlq",
        "replay",
        "--account",
        "prod",
        "--queue",
        "param",
        "--reason",
        "invalid-json",
        "--wait",
        "60s",
        "--json",
    ]);
    // The replay saw it fail again at once, and exits 3 saying why (a script can tell).
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(
            "1 replayed message(s) failed again within 1m: (not an event) in prod amiflow-param-dlq: invalid-json: "
        ),
        "{}",
        text(&out.stderr)
    );
    let decoy_back: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sum(&decoy_back, "moved"), 1);
    assert!(
        decoy_back["summary"]["attention"]
            .as_str()
            .is_some_and(|a| a.starts_with("1 replayed message(s) failed again")),
        "{:#}",
        decoy_back["summary"]
    );
    assert_eq!(decoy_back["summary"]["failed_again"], 1);
    let again = decoy_back["queues"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["failed_again"].as_array().unwrap().clone())
        .collect::<Vec<_>>();
    assert_eq!(again.len(), 1, "{decoy_back:#}");
    assert_eq!(again[0]["kind"], "invalid-json", "{decoy_back:#}");
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

    // inject checks what `rerun ami` checks before sending: the policy's parameter and region,
    // an AMI available in the hub; each refused with exit 2, and --force sends it for a drill.
    let built = |ami: &str, region: &str, parameter: &str| {
        vec![
            "inject".to_owned(),
            "AmiBuilt".to_owned(),
            "-f".to_owned(),
            format!("ami_id={ami}"),
            "-f".to_owned(),
            format!("region={region}"),
            "-f".to_owned(),
            "image_name=golden-al2023-2026-12".to_owned(),
            "-f".to_owned(),
            "created_at=2026-12-01T00:00:00Z".to_owned(),
            "-f".to_owned(),
            format!("parameter_name={parameter}"),
            "--dry-run".to_owned(),
        ]
    };
    let refused_inject = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = w.run(&args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    let err = refused_inject(built(&candidate, "us-east-1", "/golden/nope/ami-id"));
    assert!(
        err.contains("/parameter_name /golden/nope/ami-id is no golden parameter of")
            && err.contains(PARAMETER)
            && err.contains("--force"),
        "{err}"
    );
    let err = refused_inject(built(&candidate, "eu-west-1", PARAMETER));
    assert!(
        err.contains("/region eu-west-1 is not the policy's region us-east-1"),
        "{err}"
    );
    let err = refused_inject(built(&candidate, "us-east-1", "/golden/win2022/ami-id"));
    assert!(
        err.contains(&format!(
            "/ami_id AMI {candidate} (golden-al2023-2026-11) is of the family of {PARAMETER}, not of /golden/win2022/ami-id; refused"
        )),
        "{err}"
    );
    let err = refused_inject(built("ami-0000000000000dead", "us-east-1", PARAMETER));
    assert!(
        err.contains("/ami_id ami-0000000000000dead: no such AMI is visible in the hub"),
        "{err}"
    );
    let mut forced = built("ami-0000000000000dead", "us-east-1", PARAMETER);
    forced.push("--force".to_owned());
    let forced: Vec<&str> = forced.iter().map(String::as_str).collect();
    let out = ok(&w.run(&forced), "inject --force");
    let event: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        event["entry"]["Detail"]["ami_id"], "ami-0000000000000dead",
        "{event:#}"
    );
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
    // A misspelt field is refused by name, not dropped (here `target` for `targets`).
    let out = amictl(
        dir.path(),
        &[
            "inject",
            "AmiBuilt",
            "-f",
            "ami_id=ami-0123456789abcdef0",
            "-f",
            "region=us-east-1",
            "-f",
            "image_name=golden-al2023-2026-12",
            "-f",
            "created_at=2026-12-01T00:00:00Z",
            "-f",
            "parameter_name=/golden/al2023/ami-id",
            "-f",
            "target=222222222222",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("/target: unknown field \"target\"")
            && err.contains("did you mean \"targets\"?"),
        "{err}"
    );
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
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("no usable AWS credentials") && err.contains("AWS_PROFILE"),
        "{err}"
    );
    // The same, flags before the subcommand (they are global), with a profile no file defines:
    // the profile is named, not "no credentials".
    std::fs::write(
        dir.path().join("config"),
        "[profile ops]\nregion = us-east-1\n",
    )
    .unwrap();
    let unreachable = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = command(dir.path(), args);
        c.env("HOME", dir.path())
            .env("AWS_CONFIG_FILE", dir.path().join("config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let config = policy.to_str().unwrap();
    let out = unreachable(
        &["--config", config, "--profile", "opps", "dlq", "list"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("AWS profile `opps` is not in") && err.contains("list-profiles"),
        "{err}"
    );
    // Credentials that work but an endpoint nobody answers at: said so, with the region used,
    // which is the policy's (us-east-1), not AWS_REGION's.
    let out = unreachable(
        &["--config", config, "status"],
        &[
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("could not reach AWS STS in us-east-1"),
        "{err}"
    );
    let out = unreachable(
        &["status", "--config", config, "--region", "ap-south-2"],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ],
    );
    assert!(
        text(&out.stderr).contains("could not reach AWS STS in ap-south-2"),
        "{}",
        text(&out.stderr)
    );
    // --region and --profile belong to AWS: refused on the local world, saying so.
    let out = amictl(dir.path(), &["--profile", "ops", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--profile applies to AWS, named by --config FILE"),
        "{}",
        text(&out.stderr)
    );
    // --output takes table or json; --json is its alias, so both at once is a mistake.
    let out = amictl(dir.path(), &["status", "--output", "yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("[possible values: table, json]"),
        "{}",
        text(&out.stderr)
    );
    let out = amictl(dir.path(), &["status", "--json", "-o", "table"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("'--json' cannot be used with '--output <FORMAT>'"),
        "{}",
        text(&out.stderr)
    );
    // A misspelt detail-type is refused with the closest one, not matched to nothing.
    let out = amictl(
        dir.path(),
        &["dlq", "replay", "--detail-type", "AmiShard", "--dry-run"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("invalid value 'AmiShard'") && err.contains("'AmiShared'"),
        "{err}"
    );
}

/// A hub record (`rollout::control`) as the workers read it: the JSON text, or `None`.
async fn record(hub: &SdkConfig, name: &str) -> Option<Value> {
    match aws_sdk_ssm::Client::new(hub)
        .get_parameter()
        .name(name)
        .send()
        .await
    {
        Ok(out) => Some(serde_json::from_str(out.parameter().unwrap().value().unwrap()).unwrap()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_parameter_not_found()) =>
        {
            None
        }
        Err(e) => panic!("reading {name}: {e:?}"),
    }
}

/// The usage-error exit code and message of a command that must be refused.
fn refused(out: &std::process::Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected a usage refusal (exit 2):\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_approve_are_signed_records_in_the_hub_and_bad_ones_are_refused() {
    let w = World::up(&["--no-workers"]);
    let hub = w.config("qa").await;
    let uat = w.config("uat").await;
    let candidate = w.candidate();

    // Pause prod: a record in the hub with who, when and why; plan and status say so.
    let before = chrono::Utc::now();
    let out = ok(
        &w.run(&["pause", "--stage", "prod", "--reason", "change freeze"]),
        "pause",
    );
    assert!(out.contains("paused prod"), "{out}");
    let pause = record(&hub, "/amiflow/control/pause/prod")
        .await
        .expect("the pause is a record in the hub");
    assert_eq!(pause["reason"], "change freeze");
    assert!(
        pause["by"].as_str().unwrap().starts_with("arn:aws:"),
        "signed with the caller's ARN: {pause}"
    );
    let at: chrono::DateTime<chrono::Utc> = pause["at"].as_str().unwrap().parse().unwrap();
    assert!(at >= before - chrono::Duration::seconds(1), "{pause}");
    let plan = w.json(&["plan", "--stage", "prod", "--json"]);
    assert_eq!(plan["stages"][0]["paused"]["reason"], "change freeze");
    assert_eq!(plan["stages"][0]["paused"]["by"], pause["by"]);
    let status = w.json(&["status", "--stage", "prod", "--json"]);
    assert_eq!(status["stages"][0]["paused"]["reason"], "change freeze");
    assert!(
        status["stages"][0]["paused"].get("at").is_some(),
        "{:#}",
        status["stages"][0]
    );
    let status = w.json(&["status", "--stage", "uat", "--json"]);
    assert!(
        status["stages"][0]["paused"].is_null(),
        "{:#}",
        status["stages"][0]
    );

    // Bad input: each refused with what to do, exit code 2.
    let err = refused(&w.run(&["pause", "--stage", "staging", "--reason", "x"]));
    assert!(
        err.contains("no stage `staging`") && err.contains("qa, uat, prod"),
        "{err}"
    );
    let err = refused(&w.run(&["pause", "--stage", "prod", "--all", "--reason", "x"]));
    assert!(err.contains("cannot be used with"), "{err}");
    let err = refused(&w.run(&["pause", "--reason", "x"]));
    assert!(err.contains("--stage") && err.contains("--all"), "{err}");
    let err = refused(&w.run(&["pause", "--all", "--reason", "  "]));
    assert!(err.contains("--reason is empty: say why"), "{err}");
    let err = refused(&w.run(&["resume", "--stage", "uat"]));
    assert!(
        err.contains("uat is neither paused nor halted: nothing to resume"),
        "{err}"
    );
    let err = refused(&w.run(&["resume", "--all"]));
    assert!(
        err.contains("no pause of every stage to lift; paused one by one: prod"),
        "{err}"
    );

    // Resume prod: the record is gone.
    let out = ok(&w.run(&["resume", "--stage", "prod"]), "resume");
    assert!(
        out.contains("resumed prod") && out.contains("change freeze"),
        "{out}"
    );
    assert_eq!(record(&hub, "/amiflow/control/pause/prod").await, None);
    // What was lifted, by whom, is kept for the report's history.
    let lifted = record(
        &hub,
        &format!(
            "/amiflow/control/lifted/pause/prod/{}",
            at.timestamp_millis()
        ),
    )
    .await
    .expect("the lifted pause is kept in the hub");
    assert_eq!(lifted["was"]["reason"], "change freeze");
    assert!(
        lifted["lifted"]["by"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:"),
        "{lifted}"
    );
    let plan = w.json(&["plan", "--stage", "prod", "--json"]);
    assert!(plan["stages"][0]["paused"].is_null(), "{plan:#}");

    // Pause every stage, then a stage-only resume is refused naming the pause of every stage.
    ok(
        &w.run(&["pause", "--all", "--reason", "incident 42"]),
        "pause --all",
    );
    let err = refused(&w.run(&["resume", "--stage", "qa"]));
    assert!(
        err.contains("qa is paused by the pause of every stage")
            && err.contains("incident 42")
            && err.contains("amictl resume --all"),
        "{err}"
    );
    // As JSON: one document whose changes are the record kept of the lifted pause, then the
    // pause deleted, each with its record.
    let lifted = w.json(&["resume", "--all", "-o", "json"]);
    assert_eq!(
        (
            &lifted["version"],
            &lifted["summary"]["changes"],
            &lifted["summary"]["dry_run"]
        ),
        (&Value::from(1), &Value::from(2), &Value::from(false)),
        "{lifted:#}"
    );
    assert_eq!(lifted["changes"][0]["change"], "lifted-recorded");
    assert!(
        lifted["changes"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/amiflow/control/lifted/pause/all/"),
        "{lifted:#}"
    );
    assert_eq!(
        lifted["changes"][0]["record"]["was"]["reason"],
        "incident 42"
    );
    assert_eq!(lifted["changes"][1]["change"], "pause-lifted");
    assert_eq!(lifted["changes"][1]["path"], "/amiflow/control/pause/all");
    assert_eq!(lifted["changes"][1]["record"]["reason"], "incident 42");
    assert!(
        lifted["messages"][0]
            .as_str()
            .unwrap()
            .starts_with("resumed every stage"),
        "{lifted:#}"
    );
    assert_eq!(record(&hub, "/amiflow/control/pause/all").await, None);

    // Approvals: the local policy has no stage that requires one.
    let err = refused(&w.run(&["approve", &candidate, "--stage", "prod", "--reason", "x"]));
    assert!(
        err.contains("prod does not require approval (requires_approval is false")
            && err.contains("no stage requires approval"),
        "{err}"
    );
    // A policy where prod does, used through the standard credential chain as against AWS.
    let original = std::fs::read_to_string(w.policy_file()).unwrap();
    let at = original.find("name = \"prod\"").unwrap();
    let policy = w.path().join("approval.toml");
    std::fs::write(
        &policy,
        format!(
            "{}name = \"prod\"\nrequires_approval = true{}",
            &original[..at],
            &original[at + "name = \"prod\"".len()..]
        ),
    )
    .unwrap();
    let base_env = exports(&ok(&w.run(&["local", "env"]), "local env"));
    let approve = |args: &[&str]| {
        let mut all = vec!["approve"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", policy.to_str().unwrap()]);
        let mut c = command(w.path(), &all);
        c.envs(base_env.iter().filter(|(k, _)| k.starts_with("AWS_")));
        let out = c.output().unwrap();
        eprintln!("amictl {} ({})", all.join(" "), out.status);
        out
    };
    let rollout = format!("{PARAMETER}@{candidate}");
    let err = refused(&approve(&[
        "ami-0000000000000dead",
        "--stage",
        "prod",
        "--reason",
        "x",
    ]));
    assert!(
        err.contains("no AMI ami-0000000000000dead in the hub qa (111111111111)"),
        "{err}"
    );
    let err = refused(&approve(&[
        "/golden/nope@ami-1",
        "--stage",
        "prod",
        "--reason",
        "x",
    ]));
    assert!(
        err.contains("/golden/nope in /golden/nope@ami-1 is no golden parameter")
            || err.contains("is neither a rollout id"),
        "{err}"
    );
    let err = refused(&approve(&[
        &format!("/golden/nope@{candidate}"),
        "--stage",
        "prod",
        "--reason",
        "x",
    ]));
    assert!(
        err.contains("/golden/nope in /golden/nope@ami-")
            && err.contains("is no golden parameter")
            && err.contains("/golden/al2023/ami-id"),
        "{err}"
    );
    let err = refused(&approve(&[&rollout, "--stage", "uat", "--reason", "x"]));
    assert!(
        err.contains("uat does not require approval") && err.contains("stages that do: prod"),
        "{err}"
    );
    let err = refused(&approve(&[&rollout, "--stage", "prod", "--reason", ""]));
    assert!(err.contains("--reason is empty"), "{err}");
    let out = approve(&[&rollout, "--stage", "prod"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "no --reason: {}",
        text(&out.stderr)
    );
    // Out of order: uat does not even hold the AMI.
    let uat_holds = reads::golden_parameter(&uat).await.0;
    let err = refused(&approve(&[
        &rollout, "--stage", "prod", "--reason", "CAB-1",
    ]));
    assert!(
        err.contains(&format!(
            "{candidate} cannot be approved for prod yet: uat has not passed it (waiting for uat to be promoted (it holds {uat_holds}))"
        )),
        "{err}"
    );
    assert_eq!(
        record(&hub, &format!("/amiflow/control/approval/{candidate}/prod")).await,
        None
    );

    // uat holds the AMI and one of its groups rolled back (written here as the workers would):
    // uat halted, so prod cannot be approved, and plan exits 3 saying why.
    // (The AMI is shared first: an aws:ec2:image value the account cannot launch is refused.)
    share(&hub, &candidate, &["222222222222"]).await;
    aws_sdk_ssm::Client::new(&uat)
        .put_parameter()
        .name(PARAMETER)
        .value(&candidate)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .data_type("aws:ec2:image")
        .overwrite(true)
        .send()
        .await
        .unwrap();
    assert_eq!(reads::golden_parameter(&uat).await.0, candidate);
    // uat tolerates one failed group (local/amiflow.toml): two rolled back halt it.
    let mut rolled_back = Vec::new();
    for kind in ["pinned", "latest"] {
        let failed_group = w.world["accounts"]["222222222222"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["kind"] == kind)
            .unwrap()["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let tag = |key: &str, value: &str| {
            aws_sdk_autoscaling::types::Tag::builder()
                .resource_id(&failed_group)
                .resource_type("auto-scaling-group")
                .key(key)
                .value(value)
                .propagate_at_launch(false)
                .build()
        };
        aws_sdk_autoscaling::Client::new(&uat)
            .create_or_update_tags()
            .tags(tag(
                "amiflow:refresh",
                &format!("{candidate}|rolled-back|ir-test|-|{PARAMETER}"),
            ))
            .tags(tag("amiflow:refresh-state", "rolled-back"))
            .send()
            .await
            .unwrap();
        rolled_back.push(failed_group);
    }
    let err = refused(&approve(&[
        &rollout, "--stage", "prod", "--reason", "CAB-1",
    ]));
    assert!(
        err.contains(&format!(
            "{candidate} cannot be approved for prod: uat halted: 2 groups failed or rolled back, it tolerates 1"
        )),
        "{err}"
    );
    let out = w.run(&["plan", "--stage", "uat", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &plan["stages"][0]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["parameter"] == PARAMETER)
        .unwrap()
        .clone();
    assert_eq!(
        (
            run["failed"].as_u64(),
            run["tolerated"].as_u64(),
            run["halted"].as_bool()
        ),
        (Some(2), Some(1), Some(true)),
        "{run:#}"
    );
    assert!(
        text(&out.stderr).contains(&format!("halted: uat for {candidate}")),
        "{}",
        text(&out.stderr)
    );

    // Resume uat: its failure is accepted, recorded with who and why; plan exits 0 again.
    let err = refused(&w.run(&["resume", "--stage", "uat"]));
    assert!(
        err.contains("uat is halted for") && err.contains("say why with --reason"),
        "{err}"
    );
    let out = ok(
        &w.run(&["resume", "--stage", "uat", "--reason", "health check fixed"]),
        "resume a halted stage",
    );
    assert!(out.contains("2 failed groups accepted"), "{out}");
    let resume = record(&hub, &format!("/amiflow/control/resume/{candidate}/uat"))
        .await
        .expect("the resume is a record in the hub");
    assert_eq!(resume["accepted_failures"], 2);
    assert_eq!(resume["reason"], "health check fixed");
    assert!(
        resume["by"].as_str().unwrap().starts_with("arn:aws:"),
        "{resume}"
    );
    let plan = w.json(&["plan", "--stage", "uat", "--json"]);
    let run = plan["stages"][0]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["parameter"] == PARAMETER)
        .unwrap()
        .clone();
    assert_eq!(
        (run["tolerated"].as_u64(), run["halted"].as_bool()),
        (Some(3), Some(false)),
        "{run:#}"
    );
    // Not halted any more, but uat's other groups have not moved: still out of order.
    let err = refused(&approve(&[
        &rollout, "--stage", "prod", "--reason", "CAB-1",
    ]));
    assert!(
        err.contains("uat has not passed it (waiting for uat:"),
        "{err}"
    );

    // An operator halts uat for the AMI at once, whatever its failures, cancelling its running
    // refreshes: a record in the hub with who, when and why; plan and status exit 3 and say so;
    // resume lifts it.
    let err = refused(&w.run(&[
        "halt",
        &rollout,
        "--stage",
        "prod",
        "--reason",
        "kernel panic",
    ]));
    assert!(
        err.contains(&format!("prod does not hold {candidate}")),
        "{err}"
    );
    let halt = |extra: &[&str]| {
        let mut args = vec![
            "halt",
            rollout.as_str(),
            "--stage",
            "uat",
            "--reason",
            "kernel panic on boot",
        ];
        args.extend_from_slice(extra);
        w.run(&args)
    };
    let out = ok(&halt(&["--cancel-running"]), "halt uat");
    assert!(out.contains(&format!("halted uat for {rollout}")), "{out}");
    let path = format!("/amiflow/control/halt/{candidate}/uat");
    let recorded = record(&hub, &path)
        .await
        .expect("the halt is a record in the hub");
    assert_eq!(recorded["cancel_running"], true);
    assert_eq!(recorded["reason"], "kernel panic on boot");
    assert!(
        recorded["by"].as_str().unwrap().starts_with("arn:aws:"),
        "{recorded}"
    );
    let again = ok(&halt(&[]), "halt again");
    assert!(
        again.contains("uat is already halted for") && again.contains("cancelling its running"),
        "{again}"
    );
    // As JSON, a halt already in force changes nothing and says so.
    let again: Value =
        serde_json::from_str(&ok(&halt(&["--output", "json"]), "halt -o json")).unwrap();
    assert_eq!(again["summary"]["changes"], 0, "{again:#}");
    assert!(
        again["messages"][0]
            .as_str()
            .unwrap()
            .starts_with("uat is already halted for"),
        "{again:#}"
    );
    assert_eq!(
        record(&hub, &path).await,
        Some(recorded.clone()),
        "unchanged"
    );
    let out = w.run(&["status", "--stage", "uat", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["stages"][0]["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["halted_by"]["reason"] == "kernel panic on boot"),
        "{status:#}"
    );
    // The JSON carries the verdict the exit code stands for.
    assert_eq!(status["version"], 1);
    let attention = status["summary"]["attention"].as_str().unwrap_or_default();
    assert!(
        attention.contains("uat") && attention.contains("halted"),
        "{:#}",
        status["summary"]
    );
    let out = w.run(&["plan", "--stage", "uat", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["version"], 1);
    assert!(
        plan["summary"]["attention"]
            .as_str()
            .is_some_and(|a| a.contains("halted: uat")),
        "{:#}",
        plan["summary"]
    );
    let run = plan["stages"][0]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["parameter"] == PARAMETER)
        .unwrap()
        .clone();
    assert_eq!(run["halted"], true, "{run:#}");
    assert_eq!(
        run["halted_by"]["reason"], "kernel panic on boot",
        "{run:#}"
    );
    let out = ok(
        &w.run(&["resume", "--stage", "uat", "--reason", "new AMI fixes it"]),
        "resume a halted stage",
    );
    assert!(out.contains("lifted the halt of uat for"), "{out}");
    assert_eq!(record(&hub, &path).await, None, "the halt is gone");
    let out = w.run(&["plan", "--stage", "uat", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // No stage halted, but two groups rolled back: `status` still exits 3, naming them (a cron
    // job gates on it); qa, with none, exits 0.
    let out = w.run(&["status", "--stage", "uat"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("2 group(s) whose last refresh did not succeed")
            && rolled_back
                .iter()
                .all(|g| err.contains(&format!("uat/{g} (rolled-back)"))),
        "{err}"
    );
    let out = w.run(&["status", "--stage", "qa"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// What `amictl plan` predicts for a window is what the window does, group by group: refreshed
/// (with the strategy and rollback it said), skipped with the reason it gave (by the plan-worker
/// or the refresh-worker), or left alone because it is current.
#[tokio::test(flavor = "multi_thread")]
async fn plan_predicts_what_the_window_does_to_every_group() {
    let w = World::up(&[]);
    let qa = w.config("qa").await;
    let candidate = w.candidate();
    let rollout = format!("{PARAMETER}@{candidate}");
    w.publish_in_qa(&candidate);
    // The preview, before the window.
    let started = Instant::now();
    let plan = w.json(&["plan", "--stage", "qa", "--json"]);
    eprintln!("plan took {:.1} s", started.elapsed().as_secs_f64());
    let groups = plan["stages"][0]["groups"].as_array().unwrap().clone();
    let world = w.world["accounts"]["111111111111"]["groups"]
        .as_array()
        .unwrap()
        .clone();
    let predicted = |name: &str| {
        groups
            .iter()
            .find(|g| g["group"] == name)
            .unwrap_or_else(|| panic!("plan lists no {name}: {plan:#}"))
            .clone()
    };
    // The world's own expectations agree with the preview (a pinned version is the only one AWS
    // can roll back to: the pinned kind, and the override kinds, whose versions are pinned).
    for g in &world {
        let p = predicted(g["name"].as_str().unwrap());
        assert_eq!(p["instances"], g["instances"], "{p:#}");
        match g["expected"].as_str().unwrap() {
            "refresh" => {
                assert_eq!(p["action"], "refresh", "{p:#}");
                assert_eq!(p["strategy"], g["strategy"], "{p:#}");
                let rollback = matches!(
                    g["kind"].as_str(),
                    Some("pinned" | "override-old" | "override-other")
                );
                if g["kind"] != "mixed" {
                    assert_eq!(p["auto_rollback"], rollback, "{p:#}");
                }
            }
            "skip" => {
                assert_eq!(
                    (&p["action"], &p["requested"]),
                    (&json!("skip"), &json!(true)),
                    "{p:#}"
                );
                assert_eq!(p["strategy"], g["strategy"], "{p:#}");
            }
            _ => assert!(!p["requested"].as_bool().unwrap(), "{p:#}"),
        }
    }
    let kinds: BTreeSet<&str> = groups
        .iter()
        .map(|g| g["action"].as_str().unwrap())
        .collect();
    assert!(
        ["refresh", "skip", "current"]
            .iter()
            .all(|k| kinds.contains(k)),
        "a stale, a skipped and a current group: {kinds:?}"
    );
    let requested: BTreeSet<String> = groups
        .iter()
        .filter(|g| g["requested"] == true)
        .map(|g| g["group"].as_str().unwrap().to_owned())
        .collect();

    // The window.
    ok(
        &w.run(&["rerun", "window", "--stage", "qa"]),
        "rerun window",
    );
    let finished = |steps: &[Value], name: &str| -> Vec<String> {
        steps
            .iter()
            .filter(|s| {
                s["step"] == "AsgRefreshFinished" && s["stage"] == "qa" && s["subject"] == name
            })
            .map(|s| s["result"].as_str().unwrap().to_owned())
            .collect()
    };
    let trace = wait_for(
        "every requested group's outcome",
        Duration::from_secs(240),
        || {
            let out = w.run(&["trace", &rollout, "--json", "--no-dlq"]);
            let trace: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            let steps = trace["steps"].as_array().unwrap();
            match requested.iter().find(|g| finished(steps, g).is_empty()) {
                None => Ok(trace),
                Some(g) => Err(format!("no outcome for {g} yet")),
            }
        },
    );
    let steps = trace["steps"].as_array().unwrap();
    let status = w.json(&["status", "--stage", "qa", "--json", "--all"]);
    let state = |name: &str| {
        status["stages"][0]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .unwrap()["state"]
            .clone()
    };
    for p in &groups {
        let name = p["group"].as_str().unwrap();
        let outcomes = finished(steps, name);
        match (
            p["action"].as_str().unwrap(),
            p["requested"].as_bool().unwrap(),
        ) {
            ("refresh", true) => {
                assert_eq!(outcomes.len(), 1, "{name} refreshed once: {outcomes:?}");
                assert!(outcomes[0].starts_with("succeeded"), "{name}: {outcomes:?}");
                assert_eq!(state(name), "current", "{name}");
                let amis = instance_amis(&qa, name).await;
                assert!(amis.iter().all(|a| *a == candidate), "{name}: {amis:?}");
            }
            ("skip", true) => assert_eq!(
                outcomes,
                vec![format!("skipped: {}", p["reason"].as_str().unwrap())],
                "{name}: the refresh-worker skipped it for the reason plan gave"
            ),
            ("skip", false) => {
                assert!(outcomes.is_empty(), "{name}: {outcomes:?}");
                assert_eq!(state(name), "skipped", "{name}");
            }
            ("current", false) => {
                assert!(outcomes.is_empty(), "{name}: {outcomes:?}");
                assert_eq!(state(name), "current", "{name}");
            }
            ("untouched", false) => assert!(outcomes.is_empty(), "{name}: {outcomes:?}"),
            other => panic!("{name}: plan predicted {other:?} before a fresh window: {p:#}"),
        }
    }
    // Afterwards, the plan has nothing left to refresh.
    let after = w.json(&["plan", "--stage", "qa", "--json"]);
    assert!(
        after["stages"][0]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["action"] != "refresh"),
        "{after:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn recall_is_a_signed_record_previewed_per_stage_and_bad_recalls_are_refused() {
    let w = World::up(&["--no-workers"]);
    let hub = w.config("qa").await;
    let candidate = w.candidate();
    let history: Vec<String> = w.world["amis"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let (current, before) = (&history[2], &history[1]);

    // Bad input, each refused with what to do (exit 2), nothing written.
    let err = refused(&w.run(&["recall", "ami-0123456789abcdef0", "--reason", "x"]));
    assert!(
        err.contains("no AMI ami-0123456789abcdef0 in the hub"),
        "{err}"
    );
    let experiment = aws_sdk_ec2::Client::new(&hub)
        .register_image()
        .name("team-experiment-42")
        .root_device_name("/dev/xvda")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    let err = refused(&w.run(&["recall", &experiment, "--reason", "x"]));
    assert!(err.contains("belongs to no golden family"), "{err}");
    let other = w.world["amis"]["other_family"].as_str().unwrap();
    let err = refused(&w.run(&["recall", other, "--reason", "bad agent"]));
    assert!(
        err.contains(&format!("{other} is the only golden AMI"))
            && err.contains("nothing to go back to; name one with --to <ami>"),
        "{err}"
    );
    let err = refused(&w.run(&["recall", current, "--to", current, "--reason", "x"]));
    assert!(err.contains("is the AMI being recalled"), "{err}");
    let err = refused(&w.run(&["recall", current, "--reason", " "]));
    assert!(err.contains("--reason is empty"), "{err}");
    assert_eq!(
        record(&hub, &format!("/amiflow/control/recall/{current}")).await,
        None
    );

    // The dry run: per stage, the parameter going back and the groups moving back with their
    // strategy; nothing written.
    let out = ok(
        &w.run(&[
            "recall",
            current,
            "--reason",
            "kernel regression",
            "--dry-run",
        ]),
        "recall --dry-run",
    );
    for stage in ["qa", "uat", "prod"] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{stage} ("))
                && l.contains(&format!("{current} -> {before} (one new version)"))
                && l.contains("groups move back")),
            "{stage}:\n{out}"
        );
    }
    assert!(
        out.contains("launch-template") && out.contains("cloudformation"),
        "{out}"
    );
    // The same dry run as JSON: each stage's parameter change with the groups that move back,
    // as many as the table lists.
    let dry = w.json(&[
        "recall",
        current,
        "--reason",
        "kernel regression",
        "--dry-run",
        "-o",
        "json",
    ]);
    assert_eq!(dry["summary"]["dry_run"], true, "{dry:#}");
    let changes = dry["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 3, "{dry:#}");
    for (change, stage) in changes.iter().zip(["qa", "uat", "prod"]) {
        let listed = out
            .lines()
            .find(|l| l.starts_with(&format!("{stage} (")))
            .and_then(|l| l.split("; ").nth(1))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap();
        assert_eq!(
            (
                &change["change"],
                &change["record"]["stage"],
                &change["record"]["from"],
                &change["record"]["to"],
                change["record"]["groups"].as_array().unwrap().len()
            ),
            (
                &Value::from("parameter-back"),
                &Value::from(stage),
                &Value::from(current.as_str()),
                &Value::from(before.as_str()),
                listed
            ),
            "{dry:#}"
        );
    }
    assert_eq!(
        record(&hub, &format!("/amiflow/control/recall/{current}")).await,
        None
    );

    // The recall of an AMI no stage holds: a signed record; a second one is refused.
    let out = ok(
        &w.run(&["recall", &candidate, "--reason", "CVE-2026-1234"]),
        "recall",
    );
    assert!(
        out.contains(&format!("recalled /golden/al2023/ami-id@{candidate}")),
        "{out}"
    );
    assert!(out.contains("qa (") && out.contains("unchanged"), "{out}");
    let recall = record(&hub, &format!("/amiflow/control/recall/{candidate}"))
        .await
        .expect("the recall is a record in the hub");
    assert_eq!(
        (recall["reason"].as_str(), recall["parameter"].as_str()),
        (Some("CVE-2026-1234"), Some(PARAMETER))
    );
    assert!(
        recall["by"].as_str().unwrap().starts_with("arn:aws:"),
        "{recall}"
    );
    let err = refused(&w.run(&["recall", &candidate, "--reason", "again"]));
    assert!(
        err.contains(&format!("{candidate} is already recalled")) && err.contains("CVE-2026-1234"),
        "{err}"
    );
    // --disable-image on the recalled AMI (shared with uat meanwhile): the dry run changes
    // nothing; then the image is disabled in the hub and uat's launch permission removed; again,
    // nothing more to do.
    let ec2 = aws_sdk_ec2::Client::new(&hub);
    ec2.modify_image_attribute()
        .image_id(&candidate)
        .launch_permission(
            aws_sdk_ec2::types::LaunchPermissionModifications::builder()
                .add(
                    aws_sdk_ec2::types::LaunchPermission::builder()
                        .user_id("222222222222")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let image_state = || async {
        ec2.describe_images()
            .image_ids(&candidate)
            .send()
            .await
            .unwrap()
            .images()[0]
            .state()
            .map(|s| s.as_str().to_owned())
    };
    let disable = |extra: &[&str]| {
        let mut args = vec![
            "recall",
            candidate.as_str(),
            "--reason",
            "again",
            "--disable-image",
        ];
        args.extend_from_slice(extra);
        ok(&w.run(&args), "recall --disable-image")
    };
    let out = disable(&["--dry-run"]);
    assert!(out.contains("would disable it in the hub"), "{out}");
    assert_eq!(image_state().await.as_deref(), Some("available"));
    let out = disable(&[]);
    assert!(
        out.contains(&format!("disabled {candidate} in the hub"))
            && out.contains("launch permissions removed from 222222222222"),
        "{out}"
    );
    assert_eq!(image_state().await.as_deref(), Some("disabled"));
    let granted = ec2
        .describe_image_attribute()
        .image_id(&candidate)
        .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
        .send()
        .await
        .unwrap();
    assert!(granted.launch_permissions().is_empty(), "{granted:?}");
    let out = disable(&[]);
    assert!(out.contains("is already disabled"), "{out}");
    // A recalled AMI cannot be where another recall goes back to.
    let err = refused(&w.run(&["recall", current, "--to", &candidate, "--reason", "x"]));
    assert!(err.contains("is recalled itself"), "{err}");
    // status shows it, and that no group runs it.
    let out = ok(&w.run(&["status"]), "status");
    assert!(
        out.contains(&candidate) && out.contains("none: every stage moved back"),
        "{out}"
    );
}

/// The browser the report is rendered with: `AMIFLOW_CHROMIUM`, or Debian's Chromium, which the
/// project installs on first use (`local/install-chromium`, as `crates/emulator` installs moto).
fn chromium() -> PathBuf {
    if let Ok(path) = std::env::var("AMIFLOW_CHROMIUM") {
        return path.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../local/install-chromium");
    let out = std::process::Command::new("sh")
        .arg(&script)
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    PathBuf::from("/usr/bin/chromium")
}

/// The DOM headless Chromium builds from the page at `path`, with a fresh profile and nothing
/// that would reach a network (the page needs none).
fn rendered(path: &Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", path.display()))
        .output()
        .expect("chromium runs");
    let dom = text(&out.stdout);
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium rendered nothing ({}):\n{}",
        out.status,
        text(&out.stderr)
    );
    dom
}

/// The part of `dom` from `start` to the first `end` after it.
fn between<'a>(dom: &'a str, start: &str, end: &str) -> &'a str {
    let from = dom
        .find(start)
        .unwrap_or_else(|| panic!("the page has no {start}"));
    let rest = &dom[from..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

/// The number an element with `data-figure="<name>"` shows.
fn figure(scope: &str, name: &str) -> u64 {
    let needle = format!("data-figure=\"{name}\">");
    let at = scope
        .find(&needle)
        .unwrap_or_else(|| panic!("no figure {name} in {scope}"));
    let shown = scope[at + needle.len()..].split('<').next().unwrap();
    shown
        .parse()
        .unwrap_or_else(|_| panic!("figure {name} shows {shown:?}"))
}

/// Text as Chromium serialises a text node.
fn dom_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\u{a0}', "&nbsp;")
}

/// A group name that is markup.
const HOSTILE: &str = "qa-<script>alert(\"a&b\")</script>";

#[tokio::test(flavor = "multi_thread")]
async fn the_html_report_rendered_by_chromium_shows_what_status_says() {
    let w = World::up(&[]);
    let candidate = w.candidate();
    let rollout = format!("{PARAMETER}@{candidate}");
    // A window in qa, to the end: something refreshed, something left behind with its reason.
    w.publish_in_qa(&candidate);
    ok(
        &w.run(&["rerun", "window", "--stage", "qa"]),
        "rerun window",
    );
    // The world is at rest once no group of qa is stale or refreshing (the next stage is only
    // promoted in its own window): `status` and `report` then read the same AWS.
    wait_for("qa's window to end", Duration::from_secs(240), || {
        let status = w.json(&["status", "--json"]);
        let busy: Vec<String> = status["stages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["stage"] == "qa")
            .flat_map(|s| s["groups"].as_array().unwrap().clone())
            .filter(|g| ["stale", "queued", "refreshing"].contains(&g["state"].as_str().unwrap()))
            .map(|g| format!("{} ({})", g["name"], g["state"]))
            .collect();
        if busy.is_empty() {
            Ok(())
        } else {
            Err(busy.join(", "))
        }
    });
    // A group whose name is markup (Auto Scaling takes almost any character): the page shows it
    // as text and the browser builds no element from it.
    let qa = aws_sdk_autoscaling::Client::new(&w.config("qa").await);
    let groups = qa.describe_auto_scaling_groups().send().await.unwrap();
    let model = groups
        .auto_scaling_groups()
        .iter()
        .find(|g| g.launch_template().is_some())
        .expect("a group of qa with a launch template");
    qa.create_auto_scaling_group()
        .auto_scaling_group_name(HOSTILE)
        // By name alone: the emulator refuses a specification with both the id and the name.
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .set_launch_template_name(
                    model
                        .launch_template()
                        .and_then(|t| t.launch_template_name())
                        .map(str::to_owned),
                )
                .version("$Latest")
                .build(),
        )
        .set_vpc_zone_identifier(model.vpc_zone_identifier().map(str::to_owned))
        .min_size(0)
        .max_size(1)
        .desired_capacity(0)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}", aws_sdk_autoscaling::error::DisplayErrorContext(e)));
    let status = w.json(&["status", "--json"]);
    let status_code = w.run(&["status"]).status.code();

    let page = w.path().join("compliance.html");
    let out = w.run(&[
        "report",
        "--format",
        "html",
        "--out",
        page.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        status_code,
        "report exits as status does:\n{}",
        text(&out.stderr)
    );
    // Nothing outside the file: no script, style sheet, image or link (the SVG namespace is a
    // name, not a fetch).
    let written = std::fs::read_to_string(&page)
        .unwrap()
        .replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for outside in ["<script", "http://", "https://", "href=", "src=", "url("] {
        assert!(!written.contains(outside), "the page holds {outside}");
    }
    let dom = rendered(&page);
    assert!(!dom.contains("<script"), "no script in the rendered page");
    assert!(
        dom.contains(&format!("<td class=\"id\">{}</td>", dom_text(HOSTILE))),
        "the group named with markup is listed as text"
    );

    // Every stage's figures, its chart and its instance rows, against `status --json`.
    let mut totals = [0u64; 4];
    for (index, stage) in status["stages"].as_array().unwrap().iter().enumerate() {
        let name = stage["stage"].as_str().unwrap();
        let groups = stage["groups"].as_array().unwrap();
        let charted: Vec<&Value> = groups
            .iter()
            .filter(|g| g["state"] != "untouched")
            .collect();
        let sum = |class: &str| -> u64 {
            charted
                .iter()
                .map(|g| g["instances_by_ami"][class].as_u64().unwrap())
                .sum()
        };
        let expected = [
            ("golden", sum("golden")),
            ("previous-golden", sum("previous_golden")),
            ("older-golden", sum("older_golden")),
            ("other", sum("other")),
        ];
        let left_behind: Vec<&Value> = charted
            .iter()
            .copied()
            .filter(|g| g["state"] != "current")
            .collect();
        let row = between(&dom, &format!("<tr data-stage=\"{name}\">"), "</tr>");
        assert_eq!(figure(row, "groups"), groups.len() as u64, "{name}: {row}");
        assert_eq!(
            figure(row, "groups-left-behind"),
            left_behind.len() as u64,
            "{name}: {row}"
        );
        assert_eq!(
            figure(row, "instances"),
            expected.iter().map(|(_, n)| n).sum::<u64>(),
            "{name}: {row}"
        );
        let chart = between(
            between(&dom, "<svg id=\"chart-share\"", "</svg>"),
            &format!("<g data-stage=\"{name}\""),
            "</g>",
        );
        let section = between(
            &dom,
            &format!("<section class=\"stage\" id=\"stage-{index}\" data-stage=\"{name}\">"),
            "</section>",
        );
        for (i, (class, n)) in expected.iter().enumerate() {
            assert_eq!(figure(row, class), *n, "{name} {class}: {row}");
            let segment = format!("data-key=\"{class}\" data-count=\"{n}\"");
            assert!(
                if *n == 0 {
                    !chart.contains(&format!("data-key=\"{class}\""))
                } else {
                    chart.contains(&segment)
                },
                "{name}: the chart's {class} segment is not {n}: {chart}"
            );
            assert_eq!(
                section
                    .matches(&format!("<tr data-ami-is=\"{class}\">"))
                    .count() as u64,
                *n + if *class == "other" {
                    groups
                        .iter()
                        .filter(|g| g["state"] == "untouched")
                        .map(|g| g["instances"].as_u64().unwrap())
                        .sum::<u64>()
                } else {
                    0
                },
                "{name}: instance rows on {class}"
            );
            totals[i] += n;
        }
        // Every group left behind is there with its state and its reason.
        for g in &left_behind {
            let listed = between(
                section,
                &format!(
                    "<tr><td class=\"id\">{}</td>",
                    dom_text(g["name"].as_str().unwrap())
                ),
                "</tr>",
            );
            assert!(
                listed.contains(&format!(">{}<", g["state"].as_str().unwrap()))
                    && listed.contains(&dom_text(g["reason"].as_str().unwrap())),
                "{name}: {g:#} is listed as {listed}"
            );
        }
        if name == "qa" {
            assert!(expected[0].1 > 0, "qa has instances on the new golden AMI");
            assert!(
                section.contains(&rollout),
                "qa's groups name the rollout that refreshed them"
            );
            assert!(
                figure(section, "history-entries") > 0
                    && section.contains("AsgRefreshFinished")
                    && section.contains("ParamUpdated"),
                "qa's window history: {section}"
            );
        }
    }
    let all = between(&dom, "<tr data-stage=\"*\">", "</tr>");
    for (i, class) in ["golden", "previous-golden", "older-golden", "other"]
        .iter()
        .enumerate()
    {
        assert_eq!(figure(all, class), totals[i], "all stages {class}: {all}");
    }

    // The JSON and the CSV say the same.
    let json = w.json(&["report", "--format", "json"]);
    assert_eq!(json["version"], 1);
    assert_eq!(
        json["summary"]["instances_by_ami"],
        json!({
            "golden": totals[0],
            "previous_golden": totals[1],
            "older_golden": totals[2],
            "other": totals[3],
        }),
        "{:#}",
        json["summary"]
    );
    let csv = w.path().join("compliance.csv");
    let out = w.run(&["report", "--format", "csv", "--out", csv.to_str().unwrap()]);
    assert_eq!(out.status.code(), status_code, "{}", text(&out.stderr));
    let rows = std::fs::read_to_string(&csv).unwrap().lines().count() - 1;
    let expected_rows: u64 = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["groups"].as_array().unwrap().clone())
        .map(|g| g["instances"].as_u64().unwrap().max(1))
        .sum();
    assert_eq!(rows as u64, expected_rows, "one CSV row per instance");
}
