//! The worker binaries refuse a bad configuration at start, naming what is wrong, before they
//! touch AWS (DESIGN.md section 5, STYLE.md "config names its source"). Also what makes
//! `cargo test --workspace` build these binaries for the end-to-end tests in `tests/`.

use std::process::{Command, Output};

const WORKERS: [&str; 5] = [
    env!("CARGO_BIN_EXE_ingest-worker"),
    env!("CARGO_BIN_EXE_share-worker"),
    env!("CARGO_BIN_EXE_param-worker"),
    env!("CARGO_BIN_EXE_plan-worker"),
    env!("CARGO_BIN_EXE_refresh-worker"),
];

fn run(exe: &str, vars: &[(&str, &str)]) -> Output {
    let mut command = Command::new(exe);
    for (name, _) in std::env::vars() {
        if name.starts_with("AMIFLOW_") || name.starts_with("AWS_") {
            command.env_remove(name);
        }
    }
    // Nothing may reach a real AWS: point the SDK at a closed loopback port.
    command
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .envs(vars.iter().copied());
    command.output().expect("the worker binary runs")
}

fn refused(out: &Output, names: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started anyway:\n{stderr}");
    assert!(
        stderr.contains(names),
        "stderr does not name {names:?}:\n{stderr}"
    );
}

#[test]
fn every_worker_names_a_missing_queue_url() {
    for exe in WORKERS {
        refused(
            &run(exe, &[("AMIFLOW_BUS", "amiflow")]),
            "AMIFLOW_QUEUE_URL",
        );
    }
}

#[test]
fn every_worker_names_a_missing_bus_and_policy() {
    let queue = (
        "AMIFLOW_QUEUE_URL",
        "http://127.0.0.1:9/123456789012/amiflow-plan",
    );
    for exe in WORKERS {
        refused(&run(exe, &[queue]), "AMIFLOW_BUS");
        refused(
            &run(exe, &[queue, ("AMIFLOW_BUS", "amiflow")]),
            "AMIFLOW_CONFIG",
        );
    }
}

#[test]
fn a_long_poll_beyond_what_sqs_allows_is_refused() {
    let out = run(
        WORKERS[3],
        &[
            (
                "AMIFLOW_QUEUE_URL",
                "http://127.0.0.1:9/123456789012/amiflow-plan",
            ),
            ("AMIFLOW_BUS", "amiflow"),
            ("AMIFLOW_WAIT_SECONDS", "30"),
        ],
    );
    refused(&out, "AMIFLOW_WAIT_SECONDS");
}

#[test]
fn a_negative_or_unreadable_duration_is_refused_with_the_variable_named() {
    for (exe, name, value) in [
        (WORKERS[4], "AMIFLOW_DEFER_SECONDS", "-5"),
        (WORKERS[4], "AMIFLOW_POLL_SECONDS", "NaN"),
        (WORKERS[2], "AMIFLOW_READ_BACK_SECONDS", "-1"),
    ] {
        let out = run(exe, &[(name, value)]);
        refused(
            &out,
            &format!(
                "environment variable {name}={value:?} is invalid: must be a number of seconds"
            ),
        );
    }
}

#[test]
fn an_unknown_admission_mode_is_refused_with_the_choices() {
    let out = run(WORKERS[4], &[("AMIFLOW_ADMISSION", "cluster")]);
    refused(&out, "AMIFLOW_ADMISSION");
    refused(&out, "`process`");
    refused(&out, "`account`");
}

#[test]
fn an_invalid_policy_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("amiflow.toml");
    let good = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../local/amiflow.toml"),
    )
    .unwrap();
    let bad = good.replacen(
        "max_concurrent_refreshes = 3",
        "max_concurrent_refreshes = 0",
        1,
    );
    assert_ne!(
        good, bad,
        "local/amiflow.toml changed shape; update this test"
    );
    std::fs::write(&path, bad).unwrap();
    let out = run(
        WORKERS[4],
        &[
            (
                "AMIFLOW_QUEUE_URL",
                "http://127.0.0.1:9/123456789012/amiflow-refresh",
            ),
            ("AMIFLOW_BUS", "amiflow"),
            ("AMIFLOW_CONFIG", path.to_str().unwrap()),
        ],
    );
    refused(&out, "max_concurrent_refreshes must be at least 1");
    refused(&out, &path.display().to_string());
}
