//! A provisioned local world (local/world.py) with every worker binary running as its own
//! process in its account, for end-to-end rollout tests. Dropping it stops the workers (and the
//! emulator with the [`Local`] it owns).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use serde_json::Value;

use crate::Local;

/// Worker binaries per account: (binary, queue key in world.json, hub only).
pub const WORKERS: [(&str, &str, bool); 5] = [
    ("ingest-worker", "ingest", true),
    ("share-worker", "share", true),
    ("param-worker", "param", false),
    ("plan-worker", "plan", false),
    ("refresh-worker", "refresh", false),
];

pub struct World {
    pub local: Local,
    /// The state written by world.py.
    pub state: Value,
    pub dir: tempfile::TempDir,
    workers: tokio::sync::Mutex<Vec<Running>>,
    configs: BTreeMap<String, SdkConfig>,
    /// Access key id of each worker's own role session -> worker binary, so the emulator's call
    /// counter can tell workers apart.
    keys: std::sync::Mutex<BTreeMap<String, String>>,
}

/// Where cargo put the workspace's binaries: beside this executable, or beside the `deps/`
/// folder that holds a test executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Run local/world.py against `local`: golden AMIs, parameters and groups (and, unless `args` says
/// `--no-messaging`, buses, queues and rules); returns the state it wrote.
pub async fn provision(local: &Local, dir: &Path, scale: &str, args: &[&str]) -> Value {
    let out = dir.join("world.json");
    let root = emulator::project_root();
    let python = emulator::ensure_venv(&root).unwrap();
    let output = tokio::process::Command::new(&python)
        .arg(root.join("local/world.py"))
        .args([
            "provision",
            "--endpoint",
            &local.endpoint(),
            "--scale",
            scale,
        ])
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "world.py provision failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

/// Whether world.py expects a rollout to end `group` with an `AsgRefreshFinished` (refreshed,
/// skipped with a reason, or rolled back), rather than leave it alone.
pub fn expects_outcome(group: &Value) -> bool {
    matches!(
        group["expected"].as_str(),
        Some("refresh" | "skip" | "rolled-back")
    )
}

/// A worker of the world, with what it takes to start it again.
struct Running {
    account: String,
    binary: &'static str,
    queue_url: String,
    extra_env: Vec<(String, String)>,
    child: tokio::process::Child,
}

/// A worker process started by [`spawn_worker`].
pub struct WorkerProcess {
    pub child: tokio::process::Child,
    /// Access key id of the worker's own role session.
    pub access_key_id: String,
}

/// Start `binary` in `account` with a role session of its own (as in AWS, where each worker has
/// its own role), the local rollout policy, short test timings, `env` (its queue at least) and
/// `extra_env`; its log goes to `<log_dir>/<binary>-<account>.log`. Killed when dropped.
pub async fn spawn_worker(
    endpoint: &str,
    account: &str,
    binary: &str,
    env: &[(&str, &str)],
    log_dir: &Path,
    extra_env: &[(&str, &str)],
) -> WorkerProcess {
    let config = crate::sdk_config_in(endpoint, account).await;
    let provider: SharedCredentialsProvider = config.credentials_provider().unwrap();
    let creds = provider.provide_credentials().await.unwrap();
    let exe = bin_dir().join(binary);
    assert!(
        exe.exists(),
        "{} is missing: `cargo test --workspace` builds it (or `cargo build -p rollout`)",
        exe.display()
    );
    let policy = emulator::project_root().join("local/amiflow.toml");
    // Appended to, so a restarted worker's log follows its predecessor's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join(format!("{binary}-{account}.log")))
        .unwrap();
    let child = tokio::process::Command::new(exe)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", creds.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", creds.secret_access_key())
        .env(
            "AWS_SESSION_TOKEN",
            creds.session_token().unwrap_or_default(),
        )
        .env("AMIFLOW_BUS", "amiflow")
        .env("AMIFLOW_CONFIG", &policy)
        .env("AMIFLOW_WAIT_SECONDS", "1")
        .env("AMIFLOW_DEFER_SECONDS", "1")
        .env("AMIFLOW_READ_BACK_SECONDS", "0.2")
        .env("AMIFLOW_RETRY_BASE_SECONDS", "0.5")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .envs(extra_env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    WorkerProcess {
        child,
        access_key_id: creds.access_key_id().to_owned(),
    }
}

/// The last `lines` lines of every `*.log` in `dir`, for failure messages.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            out.push_str(&format!("== {}\n", path.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

impl World {
    /// Provision the world at `scale` and start every worker with `extra_env`.
    pub async fn start(scale: &str, extra_env: &[(&str, &str)]) -> World {
        let world = World::provisioned(scale, &[]).await;
        world.start_workers(extra_env).await;
        world
    }

    /// Provision the world at `scale` (with world.py's extra `args`) without starting any worker
    /// (see [`World::start_workers`]).
    pub async fn provisioned(scale: &str, args: &[&str]) -> World {
        let local = Local::start().await;
        let dir = tempfile::tempdir().unwrap();
        let state = provision(&local, dir.path(), scale, args).await;
        let mut world = World {
            local,
            state,
            dir,
            workers: tokio::sync::Mutex::new(Vec::new()),
            configs: BTreeMap::new(),
            keys: std::sync::Mutex::new(BTreeMap::new()),
        };
        for account in world.accounts() {
            let config = crate::sdk_config_in(&world.local.endpoint(), &account).await;
            world.configs.insert(account, config);
        }
        world
    }

    /// Account ids in stage order (qa, uat, prod).
    pub fn accounts(&self) -> Vec<String> {
        let order = ["qa", "uat", "prod"];
        let mut accounts: Vec<(usize, String)> = self.state["accounts"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(id, a)| {
                let stage = a["stage"].as_str().unwrap_or_default();
                let rank = order
                    .iter()
                    .position(|s| *s == stage)
                    .unwrap_or(order.len());
                (rank, id.clone())
            })
            .collect();
        accounts.sort();
        accounts.into_iter().map(|(_, id)| id).collect()
    }

    pub fn hub(&self) -> String {
        self.state["hub_account"].as_str().unwrap().to_owned()
    }

    pub fn account(&self, id: &str) -> &Value {
        &self.state["accounts"][id]
    }

    pub fn stage(&self, id: &str) -> String {
        self.account(id)["stage"].as_str().unwrap().to_owned()
    }

    /// The groups world.py built in `account`, with what a rollout is expected to do to each.
    pub fn groups(&self, account: &str) -> Vec<Value> {
        self.account(account)["groups"].as_array().unwrap().clone()
    }

    pub fn queue_url(&self, account: &str, worker: &str) -> String {
        self.account(account)["queues"][worker]["url"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn dlq_url(&self, account: &str, worker: &str) -> String {
        self.account(account)["queues"][worker]["dlq_url"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The worker binary whose role session uses `access_key_id`.
    pub fn worker_of_key(&self, access_key_id: &str) -> Option<String> {
        self.keys.lock().unwrap().get(access_key_id).cloned()
    }

    /// SDK configuration acting in `account`.
    pub fn config(&self, account: &str) -> &SdkConfig {
        &self.configs[account]
    }

    /// (account, queue key) of every worker queue in the world.
    pub fn worker_queues(&self) -> Vec<(String, &'static str)> {
        let hub = self.hub();
        self.accounts()
            .into_iter()
            .flat_map(|account| {
                WORKERS
                    .iter()
                    .filter(|(_, _, hub_only)| !hub_only || account == hub)
                    .map(|(_, queue, _)| (account.clone(), *queue))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Start every worker of every account, each with `extra_env` (`AWS_ENDPOINT_URL` there
    /// points the workers, and only them, somewhere else, such as a fault proxy).
    pub async fn start_workers(&self, extra_env: &[(&str, &str)]) {
        let hub = self.hub();
        let extra: Vec<(String, String)> = extra_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for account in self.accounts() {
            for (binary, queue, hub_only) in WORKERS {
                if hub_only && account != hub {
                    continue;
                }
                let queue_url = self.queue_url(&account, queue);
                let child = self.spawn(&account, binary, &queue_url, &extra).await;
                self.workers.lock().await.push(Running {
                    account: account.clone(),
                    binary,
                    queue_url,
                    extra_env: extra.clone(),
                    child,
                });
            }
        }
    }

    async fn spawn(
        &self,
        account: &str,
        binary: &'static str,
        queue_url: &str,
        extra: &[(String, String)],
    ) -> tokio::process::Child {
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let worker = spawn_worker(
            &self.local.endpoint(),
            account,
            binary,
            &[("AMIFLOW_QUEUE_URL", queue_url)],
            self.dir.path(),
            &extra,
        )
        .await;
        self.keys
            .lock()
            .unwrap()
            .insert(worker.access_key_id, binary.to_owned());
        worker.child
    }

    /// Workers that have exited (none should: bad input must not crash a worker), as
    /// "binary@account: status".
    pub async fn exited(&self) -> Vec<String> {
        let mut workers = self.workers.lock().await;
        workers
            .iter_mut()
            .filter_map(|w| {
                w.child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|status| format!("{}@{}: {status}", w.binary, w.account))
            })
            .collect()
    }

    /// How many worker processes the world runs.
    pub async fn worker_count(&self) -> usize {
        self.workers.lock().await.len()
    }

    /// Kill worker `index` with SIGKILL (no chance to release or finish anything) and start it
    /// again; returns "binary@account". The new process appends to the same log.
    pub async fn kill_and_restart(&self, index: usize) -> String {
        let mut workers = self.workers.lock().await;
        let running = &mut workers[index];
        running.child.kill().await.unwrap();
        let child = self
            .spawn(
                &running.account,
                running.binary,
                &running.queue_url,
                &running.extra_env,
            )
            .await;
        running.child = child;
        format!("{}@{}", running.binary, running.account)
    }

    /// Put one amiflow event on `account`'s amiflow bus, acting in that account.
    pub async fn put(&self, account: &str, detail: &events::Detail) {
        self.put_raw(account, detail.detail_type(), &detail.to_value())
            .await;
    }

    /// Put an event given as its detail-type and detail JSON (a replay of a captured event).
    pub async fn put_raw(&self, account: &str, detail_type: &str, detail: &Value) {
        let eb = aws_sdk_eventbridge::Client::new(self.config(account));
        let out = eb
            .put_events()
            .entries(
                aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                    .source("amiflow")
                    .detail_type(detail_type)
                    .detail(detail.to_string())
                    .event_bus_name("amiflow")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            out.failed_entry_count(),
            0,
            "PutEvents rejected {detail_type}"
        );
    }

    /// A queue in `account` that receives every amiflow event on its amiflow bus (a test's tap).
    pub async fn tap(&self, account: &str) -> String {
        let sqs = aws_sdk_sqs::Client::new(self.config(account));
        let url = sqs
            .create_queue()
            .queue_name("e2e-tap")
            .send()
            .await
            .unwrap()
            .queue_url()
            .unwrap()
            .to_owned();
        let arn = crate::queue_arn(&sqs, &url).await;
        let eb = aws_sdk_eventbridge::Client::new(self.config(account));
        eb.put_rule()
            .name("e2e-tap")
            .event_bus_name("amiflow")
            .event_pattern(r#"{"source":["amiflow"]}"#)
            .send()
            .await
            .unwrap();
        eb.put_targets()
            .rule("e2e-tap")
            .event_bus_name("amiflow")
            .targets(
                aws_sdk_eventbridge::types::Target::builder()
                    .id("tap")
                    .arn(arn)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        url
    }

    /// Receive and delete whatever is in `queue_url` of `account` now (bodies as JSON).
    pub async fn drain(&self, account: &str, queue_url: &str) -> Vec<Value> {
        let sqs = aws_sdk_sqs::Client::new(self.config(account));
        let mut out = Vec::new();
        loop {
            let got = sqs
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(0)
                .send()
                .await
                .unwrap();
            let messages = got.messages();
            if messages.is_empty() {
                return out;
            }
            for m in messages {
                out.push(serde_json::from_str(m.body().unwrap_or("null")).unwrap());
                sqs.delete_message()
                    .queue_url(queue_url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
    }

    /// Messages in `queue_url` of `account`: visible + in flight + delayed.
    pub async fn depth(&self, account: &str, queue_url: &str) -> u64 {
        crate::queue_depth(&aws_sdk_sqs::Client::new(self.config(account)), queue_url).await
    }

    /// Total messages in every worker queue of every account.
    pub async fn backlog(&self) -> u64 {
        let mut total = 0;
        for (account, queue) in self.worker_queues() {
            total += self.depth(&account, &self.queue_url(&account, queue)).await;
        }
        total
    }

    /// Messages in every worker DLQ, by "account/queue", leaving out the empty ones.
    pub async fn dead_letters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (account, queue) in self.worker_queues() {
            let n = self.depth(&account, &self.dlq_url(&account, queue)).await;
            if n > 0 {
                out.insert(format!("{account}/{queue}"), n);
            }
        }
        out
    }

    /// Wait until every worker queue stays empty for `quiet` (a worker mid-step holds its message
    /// in flight and a deferred one is delayed, so a quiet backlog means nothing is left to do).
    pub async fn settle(&self, quiet: Duration, within: Duration) {
        let deadline = Instant::now() + within;
        let mut empty_since: Option<Instant> = None;
        loop {
            if self.backlog().await == 0 {
                let since = *empty_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= quiet {
                    return;
                }
            } else {
                empty_since = None;
            }
            assert!(
                Instant::now() < deadline,
                "the world did not settle within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every worker's log so far, for failure messages.
    pub fn logs(&self) -> String {
        log_tails(self.dir.path(), 20)
    }
}
