//! The local world of DESIGN.md section 7, described once for everything that runs it: `amictl
//! local up` and `amictl demo`, the end-to-end harness (`tests/src/world.rs`) and the rollout
//! benchmark. A worker added to [`WORKERS`] is started by all of them.
//!
//! - [`WORKERS`]: which worker binaries exist, the queue each consumes and where it runs;
//! - [`Launch`]: how one worker is started for one account (its role session, environment and
//!   log), kept whole so the same worker can be started again after a crash;
//! - [`provision_command`]: `local/world.py`, which builds the accounts, queues, AMIs and groups;
//! - [`Driver`]: the rollout as an operator (or EventBridge Scheduler) drives it, an `AmiBuilt` on
//!   the hub bus, then one window per stage, each waited for on the hub's audit queue.
//!
//! What the world contains (accounts, families, groups) belongs to `local/amiflow.toml` and
//! `local/world.py`; this crate only reads what world.py wrote.

mod drive;
mod launch;

use std::path::Path;

pub use drive::{Audit, Driver, Stage, WindowTimes, drain};
pub use launch::{Credentials, Launch, Setting, Timings, WORKERS, Worker, assume_role};

/// The region every account of the local world lives in.
pub const REGION: &str = "us-east-1";
/// moto accepts any key; these act in its default account (123456789012) until a role is assumed.
pub const BASE_KEY: &str = "testing";

/// Stages in rollout order; an unknown stage sorts last.
pub fn rollout_rank(stage: &str) -> usize {
    ["qa", "uat", "prod"]
        .iter()
        .position(|s| *s == stage)
        .unwrap_or(usize::MAX)
}

/// `local/world.py provision` against the emulator at `endpoint`, writing its state to `out`:
/// `python` is the venv's interpreter (`emulator::ensure_venv`), `extra` world.py's other flags
/// (`--no-messaging`, `--visibility-timeout N`). The caller's AWS settings are not passed on, so
/// a developer's profile cannot leak into the world.
pub fn provision_command(
    python: &Path,
    endpoint: &str,
    scale: &str,
    extra: &[&str],
    out: &Path,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(python);
    command
        .arg(emulator::project_root().join("local/world.py"))
        .args(["provision", "--endpoint", endpoint, "--region", REGION])
        .args(["--scale", scale])
        .args(extra)
        .arg("--out")
        .arg(out)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            command.env_remove(name);
        }
    }
    command
}
