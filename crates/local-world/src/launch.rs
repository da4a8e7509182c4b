//! The worker binaries and how one of them starts in one account of the local world.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::BASE_KEY;

/// A worker binary and the queue it consumes (its key in world.json's `queues`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker {
    pub binary: &'static str,
    pub queue: &'static str,
    /// Runs in the hub only; otherwise in every stage account (the hub is also qa).
    pub hub_only: bool,
}

impl Worker {
    const fn hub(binary: &'static str, queue: &'static str) -> Self {
        Self {
            binary,
            queue,
            hub_only: true,
        }
    }

    const fn every_stage(binary: &'static str, queue: &'static str) -> Self {
        Self {
            binary,
            queue,
            hub_only: false,
        }
    }

    /// Whether this worker runs in an account (`hub`: the account is the hub).
    pub fn serves(&self, hub: bool) -> bool {
        hub || !self.hub_only
    }
}

/// Which worker binaries run where (DESIGN.md section 2): the hub consumes AMI builds and shares
/// them; every stage account publishes, plans and refreshes.
pub const WORKERS: &[Worker] = &[
    Worker::hub("ingest-worker", "ingest"),
    Worker::hub("share-worker", "share"),
    Worker::every_stage("param-worker", "param"),
    Worker::every_stage("plan-worker", "plan"),
    Worker::every_stage("refresh-worker", "refresh"),
];

/// Credentials of one role session.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
}

/// Longest role session AWS allows (with a raised MaxSessionDuration): a local world left up for
/// an afternoon keeps working, and a worker started again hours later reuses its session.
const SESSION_SECONDS: i32 = 12 * 3600;

/// An error and its causes, each once, joined by ": " (their `Display`, never `Debug`).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Credentials acting in `account`, the way a worker gets them in AWS: sts:AssumeRole into
/// `role_name` there, from the emulator's base keys.
pub async fn assume_role(
    endpoint: &str,
    region: &str,
    account: &str,
    role_name: &str,
    session: &str,
) -> Result<Credentials> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new(region.to_owned()))
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            BASE_KEY,
            BASE_KEY,
            None,
            None,
            "local-world",
        ))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await;
    let arn = format!("arn:aws:iam::{account}:role/{role_name}");
    let out = aws_sdk_sts::Client::new(&config)
        .assume_role()
        .role_arn(&arn)
        .role_session_name(session)
        .duration_seconds(SESSION_SECONDS)
        .send()
        .await
        .map_err(|e| match e {
            // No answer at all: say so in words, not with the connector's Debug dump.
            aws_sdk_sts::error::SdkError::DispatchFailure(_)
            | aws_sdk_sts::error::SdkError::TimeoutError(_) => anyhow!(
                "the local world's emulator at {endpoint} does not answer ({}); if it stopped, run `amictl local down`, then `amictl local up`",
                causes(&e)
            ),
            e => anyhow!(
                "sts:AssumeRole into {arn} failed: {}",
                aws_sdk_sts::error::DisplayErrorContext(e)
            ),
        })?;
    let creds = out
        .credentials()
        .ok_or_else(|| anyhow!("sts:AssumeRole into {arn} returned no credentials"))?;
    Ok(Credentials {
        access_key_id: creds.access_key_id().to_owned(),
        secret_access_key: creds.secret_access_key().to_owned(),
        session_token: creds.session_token().to_owned(),
    })
}

/// How quickly the workers of a world poll, defer and retry.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// SQS long-poll wait.
    pub wait_seconds: f64,
    /// How long a refresh request waits when the account's concurrency limit is reached.
    pub defer_seconds: f64,
    /// First redelivery delay of a step that failed transiently.
    pub retry_base_seconds: f64,
    /// How long the refresh-worker waits before reading back what it wrote (its default if unset).
    pub read_back_seconds: Option<f64>,
}

impl Timings {
    /// The end-to-end tests' timings: everything as quick as the emulator allows.
    pub const TESTS: Timings = Timings {
        wait_seconds: 1.0,
        defer_seconds: 1.0,
        retry_base_seconds: 0.5,
        read_back_seconds: Some(0.2),
    };
}

/// Everything one worker of one account needs to start: kept whole (amictl records it in its
/// state file), so a worker that crashed starts again exactly as it first did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub binary: PathBuf,
    /// The worker's whole AWS and amiflow environment; nothing of the caller's `AWS_*` or
    /// `AMIFLOW_*` is inherited.
    pub env: BTreeMap<String, String>,
    /// stdout and stderr, appended to (a restarted worker's log follows its predecessor's).
    pub log: PathBuf,
}

/// The world-wide part of a worker's environment.
#[derive(Debug, Clone)]
pub struct Setting<'a> {
    pub endpoint: &'a str,
    pub region: &'a str,
    pub role_name: &'a str,
    pub bus: &'a str,
    /// The rollout policy (`local/amiflow.toml`).
    pub config: &'a Path,
    pub timings: Timings,
}

impl Launch {
    /// `worker` in the account whose role session is `creds`, consuming `queue_url` (dead letters
    /// to `dlq_url`); its binary is in `bin_dir`, its log `<log_dir>/<binary>-<stage>.log`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        world: &Setting<'_>,
        worker: &Worker,
        stage: &str,
        creds: &Credentials,
        queue_url: &str,
        dlq_url: &str,
        bin_dir: &Path,
        log_dir: &Path,
    ) -> Launch {
        let mut env = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            env.insert(k.to_owned(), v);
        };
        put("AWS_ENDPOINT_URL", world.endpoint.to_owned());
        put("AWS_REGION", world.region.to_owned());
        put("AWS_ACCESS_KEY_ID", creds.access_key_id.clone());
        put("AWS_SECRET_ACCESS_KEY", creds.secret_access_key.clone());
        put("AWS_SESSION_TOKEN", creds.session_token.clone());
        put("AMIFLOW_QUEUE_URL", queue_url.to_owned());
        put("AMIFLOW_DLQ_URL", dlq_url.to_owned());
        put("AMIFLOW_BUS", world.bus.to_owned());
        put(
            "AMIFLOW_CONFIG",
            world.config.to_string_lossy().into_owned(),
        );
        let t = world.timings;
        put("AMIFLOW_WAIT_SECONDS", t.wait_seconds.to_string());
        put("AMIFLOW_DEFER_SECONDS", t.defer_seconds.to_string());
        put(
            "AMIFLOW_RETRY_BASE_SECONDS",
            t.retry_base_seconds.to_string(),
        );
        if let Some(read_back) = t.read_back_seconds {
            put("AMIFLOW_READ_BACK_SECONDS", read_back.to_string());
        }
        put(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        Launch {
            binary: bin_dir.join(worker.binary),
            env,
            log: log_dir.join(format!("{}-{stage}.log", worker.binary)),
        }
    }

    /// The same launch with some variables replaced (`AWS_ENDPOINT_URL` pointing at a fault
    /// proxy, another `AMIFLOW_CONFIG`).
    pub fn with_env(mut self, extra: &[(&str, &str)]) -> Launch {
        for (k, v) in extra {
            self.env.insert((*k).to_owned(), (*v).to_owned());
        }
        self
    }

    /// The worker's binary name (`refresh-worker`), which its command line contains.
    pub fn name(&self) -> String {
        self.binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The access key id of the worker's role session (how the emulator's call counter tells
    /// workers apart).
    pub fn access_key_id(&self) -> &str {
        self.env
            .get("AWS_ACCESS_KEY_ID")
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// The command that starts the worker, its output appended to its log.
    pub fn command(&self) -> Result<Command> {
        if !self.binary.is_file() {
            anyhow::bail!(
                "{} is missing: build the workers (`cargo build -p rollout --bins`)",
                self.binary.display()
            );
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut command = Command::new(&self.binary);
        // A developer's AWS_PROFILE or AMIFLOW_* must not leak into a local worker and point it
        // at a real account.
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("AWS_") || text.starts_with("AMIFLOW_") {
                command.env_remove(&name);
            }
        }
        command
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_workers_run_in_the_hub_only() {
        let hub: Vec<_> = WORKERS
            .iter()
            .filter(|w| !w.serves(false))
            .map(|w| w.binary)
            .collect();
        assert_eq!(hub, ["ingest-worker", "share-worker"]);
        assert!(WORKERS.iter().all(|w| w.serves(true)));
    }

    #[test]
    fn a_launch_carries_the_whole_environment_and_extra_settings_win() {
        let creds = Credentials {
            access_key_id: "AKIA1".into(),
            secret_access_key: "secret".into(),
            session_token: "token".into(),
        };
        let world = Setting {
            endpoint: "http://127.0.0.1:1",
            region: "us-east-1",
            role_name: "amiflow",
            bus: "amiflow",
            config: Path::new("/x/amiflow.toml"),
            timings: Timings::TESTS,
        };
        let launch = Launch::new(
            &world,
            &WORKERS[4],
            "prod",
            &creds,
            "q",
            "dlq",
            Path::new("/bin"),
            Path::new("/logs"),
        )
        .with_env(&[("AWS_ENDPOINT_URL", "http://proxy")]);
        assert_eq!(launch.name(), "refresh-worker");
        assert_eq!(launch.log, Path::new("/logs/refresh-worker-prod.log"));
        assert_eq!(launch.env["AWS_ENDPOINT_URL"], "http://proxy");
        assert_eq!(launch.env["AMIFLOW_DLQ_URL"], "dlq");
        assert_eq!(launch.env["AMIFLOW_READ_BACK_SECONDS"], "0.2");
        assert_eq!(launch.access_key_id(), "AKIA1");
    }
}
