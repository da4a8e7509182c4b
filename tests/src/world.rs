//! A provisioned local world (local/world.py) with every worker binary running as its own
//! process in its account, for end-to-end rollout tests. Dropping it stops the workers (and the
//! emulator with the [`Local`] it owns).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use local_world::{Launch, Setting, Timings, WORKERS, Worker};
use serde_json::Value;

use crate::Local;

/// A message found in a worker DLQ, with why the worker gave it up.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `<stage>/<worker queue>`.
    pub queue: String,
    pub body: String,
    /// `amiflow-error-kind`.
    pub kind: String,
    /// `amiflow-error`.
    pub reason: String,
    /// The `e2e-case` attribute a test put on the message it delivered, if any.
    pub case: Option<String>,
}

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
    let python = emulator::ensure_venv(&emulator::project_root()).unwrap();
    let output = local_world::provision_command(&python, &local.endpoint(), scale, args, &out)
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
    launch: Launch,
    child: tokio::process::Child,
}

/// How the tests start `worker` in `account` (stage `stage`) of the emulator at `endpoint`,
/// consuming `queue_url`: a role session of its own (as in AWS, where each worker has its own
/// role), the local rollout policy and the tests' quick timings; its log goes to `log_dir`.
pub async fn launch(
    endpoint: &str,
    account: &str,
    stage: &str,
    worker: &Worker,
    (queue_url, dlq_url): (&str, &str),
    log_dir: &Path,
) -> Launch {
    let creds = local_world::assume_role(
        endpoint,
        local_world::REGION,
        account,
        "amiflow",
        worker.binary,
    )
    .await
    .unwrap();
    let setting = Setting {
        endpoint,
        region: local_world::REGION,
        role_name: "amiflow",
        bus: "amiflow",
        config: &emulator::project_root().join("local/amiflow.toml"),
        timings: Timings::TESTS,
    };
    Launch::new(
        &setting,
        worker,
        stage,
        &creds,
        queue_url,
        dlq_url,
        &bin_dir(),
        log_dir,
    )
}

/// Start a worker as `launch` says (the path `amictl local up` takes too); killed when dropped.
pub fn spawn(launch: &Launch) -> tokio::process::Child {
    let command = launch.command().unwrap_or_else(|e| {
        panic!("{e:#} (`cargo test --workspace` builds the workers, or `cargo build -p rollout`)")
    });
    tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", launch.binary.display()))
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
        let mut accounts: Vec<(usize, String)> = self.state["accounts"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(id, a)| {
                let stage = a["stage"].as_str().unwrap_or_default();
                (local_world::rollout_rank(stage), id.clone())
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
                    .filter(|w| w.serves(account == hub))
                    .map(|w| (account.clone(), w.queue))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Start every worker of every account, each with `extra_env` (`AWS_ENDPOINT_URL` there
    /// points the workers, and only them, somewhere else, such as a fault proxy).
    pub async fn start_workers(&self, extra_env: &[(&str, &str)]) {
        let hub = self.hub();
        for account in self.accounts() {
            for worker in WORKERS.iter().filter(|w| w.serves(account == hub)) {
                let queues = (
                    self.queue_url(&account, worker.queue),
                    self.dlq_url(&account, worker.queue),
                );
                let launch = launch(
                    &self.local.endpoint(),
                    &account,
                    &self.stage(&account),
                    worker,
                    (&queues.0, &queues.1),
                    self.dir.path(),
                )
                .await
                .with_env(extra_env);
                self.keys
                    .lock()
                    .unwrap()
                    .insert(launch.access_key_id().to_owned(), worker.binary.to_owned());
                let child = spawn(&launch);
                self.workers.lock().await.push(Running {
                    account: account.clone(),
                    launch,
                    child,
                });
            }
        }
    }

    /// Open `stage`'s window through `driver` and wait until every group world.py expects an
    /// outcome for (see [`expects_outcome`]) has one for `ami`; returns how long it took.
    pub async fn open_window(
        &self,
        driver: &local_world::Driver,
        stage: &local_world::Stage,
        ami: &str,
        audit: &mut local_world::Audit,
        within: Duration,
    ) -> anyhow::Result<local_world::WindowTimes> {
        let expected: std::collections::BTreeSet<String> = self
            .groups(&stage.account)
            .iter()
            .filter(|g| expects_outcome(g))
            .filter_map(|g| g["name"].as_str().map(str::to_owned))
            .collect();
        driver
            .open_window(stage, ami, &expected, audit, within, |_| {})
            .await
    }

    /// The rollout driver of this world (local_world::Driver), acting in each account as itself.
    pub fn driver(&self) -> local_world::Driver {
        let hub = self.hub();
        local_world::Driver {
            hub: self.config(&hub).clone(),
            bus: "amiflow".into(),
            audit_queue: self.queue_url(&hub, "audit"),
            stages: self
                .accounts()
                .into_iter()
                .map(|account| local_world::Stage {
                    name: self.stage(&account),
                    config: self.config(&account).clone(),
                    account,
                    window_hours: 4,
                })
                .collect(),
        }
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
                    .map(|status| format!("{}@{}: {status}", w.launch.name(), w.account))
            })
            .collect()
    }

    /// How many worker processes the world runs.
    pub async fn worker_count(&self) -> usize {
        self.workers.lock().await.len()
    }

    /// Kill worker `index` with SIGKILL (no chance to release or finish anything) and start it
    /// again from the same launch, as `amictl local up` does; returns "binary@account". The new
    /// process appends to the same log.
    pub async fn kill_and_restart(&self, index: usize) -> String {
        let mut workers = self.workers.lock().await;
        let running = &mut workers[index];
        running.child.kill().await.unwrap();
        running.child = spawn(&running.launch);
        format!("{}@{}", running.launch.name(), running.account)
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
        local_world::drain(self.config(account), queue_url)
            .await
            .unwrap()
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

    /// Every message now in the DLQ of `account`'s `queue` worker, received and deleted.
    pub async fn take_dead_letters(&self, account: &str, queue: &str) -> Vec<DeadLetter> {
        let sqs = aws_sdk_sqs::Client::new(self.config(account));
        let url = self.dlq_url(account, queue);
        let mut out = Vec::new();
        loop {
            let got = sqs
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .message_attribute_names("All")
                .send()
                .await
                .unwrap();
            if got.messages().is_empty() {
                return out;
            }
            for m in got.messages() {
                out.push(DeadLetter {
                    queue: format!("{}/{queue}", self.stage(account)),
                    body: m.body().unwrap_or_default().to_owned(),
                    kind: crate::attr(m, runtime::ERROR_KIND_ATTR).unwrap_or_default(),
                    reason: crate::attr(m, runtime::ERROR_ATTR).unwrap_or_default(),
                    case: crate::attr(m, "e2e-case"),
                });
                sqs.delete_message()
                    .queue_url(&url)
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .send()
                    .await
                    .unwrap();
            }
        }
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

    /// Every JSON line every worker has logged so far, with the log's file name.
    pub fn log_lines(&self) -> Vec<(String, serde_json::Value)> {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                for line in text.lines() {
                    let value = serde_json::from_str(line).unwrap_or_else(|e| {
                        panic!("{name}: a log line that is not JSON ({e}): {line}")
                    });
                    lines.push((name.clone(), value));
                }
            }
        }
        lines
    }
}
