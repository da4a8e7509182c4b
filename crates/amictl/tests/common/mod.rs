//! What the amictl end-to-end tests share: the real binary run as an operator runs it, with a
//! private state folder (AMIFLOW_STATE_DIR) per test and no AWS settings of the developer's, and
//! AWS clients configured only from `amictl local env`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use aws_config::{BehaviorVersion, Region, SdkConfig};

pub fn amictl(state_dir: &Path, args: &[&str]) -> Output {
    command(state_dir, args).output().expect("amictl runs")
}

/// The amictl command line, for a test that needs more than its output (stdin, extra env).
pub fn command(state_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_amictl"));
    command
        .args(args)
        .env("AMIFLOW_STATE_DIR", state_dir)
        // Under `cargo test` CARGO is set; the demo would then run a nested cargo build.
        .env_remove("CARGO");
    for (name, _) in std::env::vars() {
        if name.starts_with("AWS_") {
            command.env_remove(name);
        }
    }
    command.env_remove("AMIFLOW_CONFIG");
    command
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `export NAME='value'` lines, as `eval "$(amictl local env)"` would read them.
pub fn exports(shell: &str) -> HashMap<String, String> {
    shell
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

pub async fn config_from(env: &HashMap<String, String>) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(&env["AWS_ENDPOINT_URL"])
        .region(Region::new(env["AWS_REGION"].clone()))
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            &env["AWS_ACCESS_KEY_ID"],
            &env["AWS_SECRET_ACCESS_KEY"],
            env.get("AWS_SESSION_TOKEN").cloned(),
            None,
            "amictl-local-env",
        ))
        .load()
        .await
}
