//! `amictl local` and `amictl demo` as an operator runs them: the real binary, a private state
//! folder (AMIFLOW_STATE_DIR) per test, and AWS clients configured only from `amictl local env`.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{amictl, command, config_from, exports, ok, text};

fn running(pid: u64) -> bool {
    // A zombie (exited, not yet reaped by its new parent) is not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// SIGKILL `pid` and wait (polling) until it is gone.
fn kill_9(pid: u64) {
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_gone(&[pid], Duration::from_secs(10), "SIGKILL");
}

/// Poll until none of `pids` runs; a process in its last moments of exit has no command line yet
/// is not a zombie, so this allows it `within`.
fn wait_gone(pids: &[u64], within: Duration, after: &str) {
    let deadline = std::time::Instant::now() + within;
    for pid in pids {
        while running(*pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} still runs after {after}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn port_open(port: u64) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port as u16)),
        Duration::from_millis(300),
    )
    .is_ok()
}

#[tokio::test]
async fn local_world_serves_any_client_and_down_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let up = ok(&amictl(dir.path(), &["local", "up"]), "local up");
    assert!(up.contains("11 started"), "every worker started:\n{up}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap())
            .unwrap();
    let port = state["emulator"]["port"].as_u64().unwrap();
    let mut pids = vec![state["emulator"]["pid"].as_u64().unwrap()];
    pids.extend(
        state["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["pid"].as_u64().unwrap()),
    );
    assert_eq!(pids.len(), 12);
    assert!(pids.iter().all(|p| running(*p)));

    for stage in ["qa", "uat", "prod"] {
        let env = exports(&ok(
            &amictl(dir.path(), &["local", "env", "--account", stage]),
            "local env",
        ));
        let config = config_from(&env).await;
        let groups = aws_sdk_autoscaling::Client::new(&config)
            .describe_auto_scaling_groups()
            .send()
            .await
            .unwrap();
        let names: Vec<&str> = groups
            .auto_scaling_groups()
            .iter()
            .filter_map(|g| g.auto_scaling_group_name())
            .collect();
        assert!(
            names.len() >= 10 && names.iter().all(|n| n.starts_with(stage)),
            "{stage}: {names:?}"
        );
        let parameter = aws_sdk_ssm::Client::new(&config)
            .get_parameter()
            .name("/golden/al2023/ami-id")
            .send()
            .await
            .unwrap();
        let value = parameter
            .parameter()
            .and_then(|p| p.value())
            .unwrap_or_default()
            .to_owned();
        assert!(value.starts_with("ami-"), "{stage}: {parameter:?}");

        // `status --json` agrees with what the test reads from AWS itself.
        let status: serde_json::Value = serde_json::from_str(&ok(
            &amictl(dir.path(), &["status", "--stage", stage, "--json"]),
            "status --json",
        ))
        .unwrap();
        let report = &status["stages"][0];
        assert_eq!(report["stage"], stage);
        assert_eq!(report["groups"].as_array().unwrap().len(), names.len());
        let golden = report["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "/golden/al2023/ami-id")
            .unwrap();
        assert_eq!(golden["ami"], value.as_str());
        let by_state = |s: &str| {
            report["groups"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|g| g["state"] == s)
                .count()
        };
        // Before any rollout every golden group is on the parameter's AMI or an older one.
        assert_eq!(
            by_state("refreshing") + by_state("failed") + by_state("rolled-back"),
            0
        );
        assert!(
            by_state("current") >= 1 && by_state("stale") >= 1,
            "{report:#}"
        );
        // The summary counts what the stage lists; nothing needs a person before a rollout.
        assert_eq!(status["version"], 1);
        assert_eq!(status["summary"]["groups"], names.len());
        assert_eq!(
            status["summary"]["groups_by_state"]["stale"],
            by_state("stale")
        );
        assert!(status["summary"]["attention"].is_null(), "{status:#}");
        // The stage's window from the policy's cron (local/amiflow.toml: the Nth Saturday of
        // each month at 02:00 UTC): it opens next on a Saturday at 02:00, after now.
        let window = &report["window"];
        assert_eq!(window["duration_hours"], 4, "{window:#}");
        let next: chrono::DateTime<chrono::Utc> =
            window["next_opens_at"].as_str().unwrap().parse().unwrap();
        assert!(next > chrono::Utc::now(), "{window:#}");
        assert_eq!(
            next.format("%a %H:%M").to_string(),
            "Sat 02:00",
            "{window:#}"
        );
    }
    let table = ok(&amictl(dir.path(), &["status"]), "status");
    assert!(
        table.contains("SAT#2") && table.contains("next opens"),
        "each stage's window and when it opens: {table}"
    );
    assert!(
        table.contains("instances off golden") && table.contains("uat"),
        "{table}"
    );
    // --watch: a report every interval until interrupted, one JSON document per line; Ctrl-C
    // (SIGINT) ends it with the last report's exit code (0: nothing needs a person yet).
    let mut watch = command(
        dir.path(),
        &["status", "--stage", "qa", "--watch", "1s", "-o", "json"],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("amictl runs");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    let mut times = Vec::new();
    for _ in 0..2 {
        let line = lines.next().expect("a report per interval").unwrap();
        let report: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(report["version"], 1, "{line}");
        assert_eq!(report["stages"][0]["stage"], "qa", "{line}");
        times.push(report["generated_at"].as_str().unwrap().to_owned());
    }
    assert!(
        times[0] < times[1],
        "two reports, one after the other: {times:?}"
    );
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &watch.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let ended = watch.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(0), "{}", text(&ended.stderr));
    let short = amictl(dir.path(), &["status", "--watch", "100ms"]);
    assert_eq!(short.status.code(), Some(2));
    assert!(
        text(&short.stderr).contains("--watch 100ms: give at least 1s"),
        "{}",
        text(&short.stderr)
    );

    let wrong = amictl(dir.path(), &["status", "--stage", "staging"]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stderr).contains("no account or stage `staging`")
            && text(&wrong.stderr).contains("prod"),
        "{}",
        text(&wrong.stderr)
    );
    let hub = config_from(&exports(&ok(
        &amictl(dir.path(), &["local", "env", "--account", "qa"]),
        "local env",
    )))
    .await;
    let sent = aws_sdk_eventbridge::Client::new(&hub)
        .put_events()
        .entries(
            aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                .source("e2e.outside-client")
                .detail_type("Hello")
                .detail("{}")
                .event_bus_name("amiflow")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(sent.failed_entry_count(), 0);

    // With no --config, `--stage <TAB>` offers the running world's stages.
    assert_eq!(
        bash_complete(dir.path(), &["amictl", "pause", "--stage", ""], None),
        ["qa", "uat", "prod"]
    );

    let down = ok(&amictl(dir.path(), &["local", "down"]), "local down");
    assert!(down.contains("stopped 11 workers"), "{down}");
    wait_gone(&pids, Duration::from_secs(5), "local down");
    assert!(!port_open(port), "port {port} still open after local down");
    assert!(!dir.path().join("state.json").exists());
    let again = ok(&amictl(dir.path(), &["local", "down"]), "second local down");
    assert!(again.contains("nothing to stop"), "{again}");
    let env = amictl(dir.path(), &["local", "env"]);
    assert!(!env.status.success());
    assert!(
        text(&env.stderr).contains("amictl local up"),
        "{}",
        text(&env.stderr)
    );
}

/// What bash offers at the end of `line` (its last word the one being completed), through the
/// script `amictl completions bash` prints, with the built amictl first on PATH.
fn bash_complete(state_dir: &std::path::Path, line: &[&str], config: Option<&str>) -> Vec<String> {
    let words: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
    let script = format!(
        r#"source <(amictl completions bash)
COMP_WORDS=({})
COMP_CWORD={}
COMP_TYPE=9
_clap_complete_amictl amictl "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
        words.join(" "),
        line.len() - 1
    );
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_amictl"))
        .parent()
        .unwrap();
    let mut bash = Command::new("bash");
    bash.arg("-c")
        .arg(script)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("AMIFLOW_STATE_DIR", state_dir)
        .env_remove("AMIFLOW_CONFIG");
    if let Some(config) = config {
        bash.env("AMIFLOW_CONFIG", config);
    }
    let out = bash.output().expect("bash runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `--stage <TAB>` completes the policy's stage names (from --config, or AMIFLOW_CONFIG), those
/// matching what was typed, and nothing (not file names) when no policy is in sight.
#[test]
fn bash_completes_stage_names_from_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../local/amiflow.toml");
    assert_eq!(
        bash_complete(
            dir.path(),
            &["amictl", "status", "--config", policy, "--stage", ""],
            None
        ),
        ["qa", "uat", "prod"]
    );
    assert_eq!(
        bash_complete(
            dir.path(),
            &["amictl", "plan", "--stage", "u"],
            Some(policy)
        ),
        ["uat"]
    );
    assert_eq!(
        bash_complete(dir.path(), &["amictl", "halt", "x", "--stage", ""], None),
        Vec::<String>::new()
    );
    // Commands complete too.
    assert!(
        bash_complete(dir.path(), &["amictl", "rec"], None) == ["recall"],
        "amictl rec<TAB>"
    );
}

#[test]
fn local_up_on_a_port_in_use_says_so_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = amictl(
        dir.path(),
        &["local", "up", "--no-workers", "--port", &port],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("port {port} is already in use")) && err.contains("--port"),
        "{err}"
    );
    assert!(!dir.path().join("state.json").exists());
}

#[test]
fn a_stale_state_file_from_a_killed_run_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let up = ok(
        &amictl(dir.path(), &["local", "up", "--no-workers"]),
        "local up",
    );
    assert!(up.contains("none (--no-workers)"), "{up}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap())
            .unwrap();
    let pid = state["emulator"]["pid"].as_u64().unwrap();
    // An emulator that does not answer where the state says (here: a closed port) is named, in
    // words, with no SDK dump.
    let path = dir.path().join("state.json");
    let recorded = std::fs::read_to_string(&path).unwrap();
    let mut elsewhere = state.clone();
    elsewhere["endpoint"] = "http://127.0.0.1:9".into();
    std::fs::write(&path, elsewhere.to_string()).unwrap();
    let out = amictl(dir.path(), &["status"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("the local world's emulator at http://127.0.0.1:9 does not answer (")
            && err.contains("Connection refused")
            && !err.contains("DispatchFailure"),
        "{err}"
    );
    std::fs::write(&path, recorded).unwrap();
    // A killed run: the emulator dies, the state file stays.
    kill_9(pid);
    let env = amictl(dir.path(), &["local", "env"]);
    assert!(!env.status.success());
    assert!(
        text(&env.stderr).contains("amictl local down"),
        "{}",
        text(&env.stderr)
    );
    // Every command that acts on the world says the same, in words, with no SDK dump.
    for args in [&["status"][..], &["dlq", "list"], &["plan"]] {
        let out = amictl(dir.path(), args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("is not running (emulator pid")
                && err.contains("run `amictl local down` to clean up, then `amictl local up`")
                && !err.contains("DispatchFailure"),
            "{args:?}: {err}"
        );
    }
    let down = ok(&amictl(dir.path(), &["local", "down"]), "local down");
    assert!(down.contains("no longer running"), "{down}");
    assert!(!dir.path().join("state.json").exists());
}

#[test]
fn demo_rolls_out_every_stage_and_prints_the_compliance_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&amictl(dir.path(), &["demo"]), "amictl demo");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| {
            ["qa", "uat", "prod"]
                .iter()
                .any(|s| l.starts_with(&format!("│ {s} ")))
        })
        .collect();
    assert!(out.contains("golden parameter"), "{out}");
    // One summary row per stage, and the uat group whose refresh the emulator fails.
    for stage in ["qa ", "uat ", "prod "] {
        assert!(
            rows.iter().any(|r| r.starts_with(&format!("│ {stage}"))),
            "no row for {stage}:\n{out}"
        );
    }
    assert!(out.contains("rolled-back"), "{out}");
    assert!(out.contains("launch configuration"), "{out}");
    assert!(
        !dir.path().join("state.json").exists(),
        "the demo tears its world down"
    );
}

#[test]
fn local_up_on_a_running_world_starts_again_only_the_worker_that_was_killed() {
    let dir = tempfile::tempdir().unwrap();
    ok(&amictl(dir.path(), &["local", "up"]), "local up");
    let read_state = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap())
            .unwrap()
    };
    let before = read_state();
    let world_before = std::fs::read_to_string(before["world_file"].as_str().unwrap()).unwrap();
    let pid_of = |state: &serde_json::Value, name: &str, stage: &str| {
        state["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name && w["stage"] == stage)
            .map(|w| w["pid"].as_u64().unwrap())
            .unwrap()
    };
    let victim = pid_of(&before, "refresh-worker", "uat");
    kill_9(victim);

    let again = ok(&amictl(dir.path(), &["local", "up"]), "local up again");
    assert!(
        again.contains("started again 1 worker") && again.contains("refresh-worker (uat)"),
        "{again}"
    );
    let after = read_state();
    // The emulator and the world are untouched; every other worker keeps its process.
    assert_eq!(after["emulator"], before["emulator"]);
    assert_eq!(after["endpoint"], before["endpoint"]);
    assert_eq!(
        std::fs::read_to_string(after["world_file"].as_str().unwrap()).unwrap(),
        world_before,
        "the world was not provisioned again"
    );
    let workers = |s: &serde_json::Value| s["workers"].as_array().unwrap().clone();
    assert_eq!(workers(&after).len(), workers(&before).len());
    for (was, now) in workers(&before).iter().zip(workers(&after).iter()) {
        assert_eq!((&was["name"], &was["stage"]), (&now["name"], &now["stage"]));
        assert_eq!(
            was["env"], now["env"],
            "started with the recorded environment"
        );
        let pid = now["pid"].as_u64().unwrap();
        if was["pid"].as_u64() == Some(victim) {
            assert_ne!(pid, victim);
        } else {
            assert_eq!(now["pid"], was["pid"], "{} ({})", now["name"], now["stage"]);
        }
        assert!(running(pid), "{} ({}) runs", now["name"], now["stage"]);
    }
    let revived = pid_of(&after, "refresh-worker", "uat");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{revived}/cmdline"))
            .unwrap()
            .split('\0')
            .next()
            .unwrap(),
        before["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["pid"].as_u64() == Some(victim))
            .unwrap()["binary"]
            .as_str()
            .unwrap()
    );
    // The world still answers, as it did before: the uat parameter is where it was.
    let uat = exports(&ok(
        &amictl(dir.path(), &["local", "env", "--account", "uat"]),
        "local env",
    ));
    assert_eq!(
        uat["AWS_ENDPOINT_URL"],
        before["endpoint"].as_str().unwrap()
    );

    // Nothing dead: a third `up` starts nothing.
    let third = ok(
        &amictl(dir.path(), &["local", "up"]),
        "local up a third time",
    );
    assert!(third.contains("nothing to start"), "{third}");
    assert_eq!(read_state()["workers"], after["workers"]);
    let down = ok(&amictl(dir.path(), &["local", "down"]), "local down");
    assert!(down.contains("stopped 11 workers"), "{down}");
}
