//! `amictl local`: the local AWS world of DESIGN.md section 7. `up` starts the emulator detached,
//! has `local/world.py` provision a hub and three stage accounts in it, starts every built worker
//! binary once per account it serves (as `local_world` describes them), and records all of it in a
//! state file, each worker with the `Launch` it was started from; `up` on a world that runs starts
//! again, from those records, only the workers that died; `env` turns that file into shell
//! exports for outside clients; `down` stops what the file lists and removes it.
//!
//! Never leaves a half-started world: a failure or ctrl-c during `up` stops whatever it had
//! started before the error is reported, and a state file whose processes are all gone (a killed
//! run) is cleaned up by the next `up` or `down`.

use std::collections::BTreeMap;
use std::fs::{File, TryLockError};
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::procs::{self, Tracked};

use local_world::{BASE_KEY, REGION, Setting, Timings, WORKERS};

/// Seed scale builds about 4,500 instances; this only guards against a provisioner that hangs.
const PROVISION_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// A worker finishes in-flight steps on SIGTERM (runtime default stop timeout 25 s).
const WORKER_GRACE: Duration = Duration::from_secs(30);
const EMULATOR_GRACE: Duration = Duration::from_secs(10);
/// How long a just-started worker must stay up to count as started (config errors exit at once).
const WORKER_SETTLE: Duration = Duration::from_millis(1500);

/// Run amiflow on this machine against an emulated AWS (moto plus amiflow's shim): a hub and
/// three stage accounts, their buses, queues, golden AMIs and Auto Scaling groups, and the workers.
#[derive(Debug, Subcommand)]
#[command(
    after_help = "Example:\n  amictl local up\n  eval \"$(amictl local env)\"\n  aws sqs list-queues --queue-name-prefix amiflow   # any AWS client now talks to the emulator\n  amictl local down"
)]
pub enum Local {
    /// Start the emulator, provision the world and start every built worker; on a running world,
    /// start again only its workers that died.
    ///
    /// The emulator and the workers keep running after this command returns; their logs go to
    /// .amiflow/logs/ and everything is recorded in .amiflow/local/state.json (set
    /// AMIFLOW_STATE_DIR to keep a second world's state elsewhere).
    ///
    /// A worker that crashed (or was killed) is brought back by running `amictl local up` again:
    /// it starts with the environment recorded for it in the state file, and the emulator, the
    /// world and the other workers are left as they are (the other options are ignored then). The
    /// messages the dead worker held in flight return to its queue after the queue's visibility
    /// timeout (10 s in the local world), so the rollout resumes within seconds.
    #[command(
        after_help = "Examples:\n  amictl local up                      # small world on a free port, all built workers\n  amictl local up --scale seed         # ~1,000 / 1,500 / 2,000 instances in qa / uat / prod\n  amictl local up --port 4566 --no-workers\n  kill -9 <pid of a worker> && amictl local up   # starts that worker again, nothing else"
    )]
    Up(UpArgs),
    /// Print shell exports that point AWS clients (SDKs, the AWS CLI, boto3) at the local world.
    ///
    /// The default keys act in the emulator's default account; assume the `amiflow` role
    /// (AMIFLOW_ROLE_NAME) in AMIFLOW_HUB_ACCOUNT, AMIFLOW_QA_ACCOUNT, ... to act in a stage, or
    /// pass --account to get that role's credentials directly.
    #[command(
        after_help = "Examples:\n  eval \"$(amictl local env)\"\n  eval \"$(amictl local env --account prod)\" && aws autoscaling describe-auto-scaling-groups"
    )]
    Env(EnvArgs),
    /// Stop every process `local up` started and remove its state; safe to run twice.
    #[command(after_help = "Example:\n  amictl local down")]
    Down,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Size of the world: `small` has one group of each kind per stage (the demo); `seed` matches
    /// the seed story, about 1,000 / 1,500 / 2,000 instances in qa / uat / prod.
    #[arg(long, value_enum, default_value_t = Scale::Small)]
    scale: Scale,
    /// Loopback port for the emulator [default: a free port chosen by the OS]
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// Provision the world but start no worker (drive it by hand or from a test).
    #[arg(long)]
    no_workers: bool,
    /// Seconds each phase of an emulated instance refresh lasts.
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    refresh_step: f64,
    /// First redelivery delay of a step that failed transiently (doubling on each receive, as
    /// in production); a message that fails this way five times is dead-lettered.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    retry_base_seconds: f64,
}

impl UpArgs {
    /// What `amictl demo` starts: workers on, a free port.
    pub fn for_demo(scale: Scale, refresh_step: f64) -> Self {
        Self {
            scale,
            port: None,
            no_workers: false,
            refresh_step,
            retry_base_seconds: 5.0,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Scale {
    Small,
    Seed,
}

impl Scale {
    fn as_str(self) -> &'static str {
        match self {
            Scale::Small => "small",
            Scale::Seed => "seed",
        }
    }
}

#[derive(Debug, Args)]
pub struct EnvArgs {
    /// Export credentials of the `amiflow` role in this account (a stage name such as `prod`, or
    /// an account id) instead of the emulator's default keys.
    #[arg(long, value_name = "STAGE|ACCOUNT", add = crate::completion::stages())]
    account: Option<String>,
}

pub async fn run(command: Local) -> Result<()> {
    match command {
        Local::Up(args) => up(args).await,
        Local::Env(args) => env(args).await,
        Local::Down => down(),
    }
}

// ---------------------------------------------------------------------------------------------
// Where things live

struct Paths {
    root: PathBuf,
    /// Holds state.json, world.json and the lock of `up`.
    dir: PathBuf,
    logs: PathBuf,
    /// Whether AMIFLOW_STATE_DIR moved `dir` (then `env` exports it, so later commands agree).
    overridden: bool,
}

impl Paths {
    fn resolve() -> Result<Self> {
        let root = emulator::project_root();
        let project_state = emulator::state_dir(&root);
        Ok(
            match std::env::var_os("AMIFLOW_STATE_DIR").filter(|v| !v.is_empty()) {
                Some(dir) => {
                    let dir = std::path::absolute(PathBuf::from(dir))
                        .context("resolving AMIFLOW_STATE_DIR")?;
                    Self {
                        root,
                        logs: dir.join("logs"),
                        dir,
                        overridden: true,
                    }
                }
                None => Self {
                    root,
                    dir: project_state.join("local"),
                    logs: project_state.join("logs"),
                    overridden: false,
                },
            },
        )
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn world(&self) -> PathBuf {
        self.dir.join("world.json")
    }

    fn lock(&self) -> PathBuf {
        self.dir.join("up.lock")
    }
}

// ---------------------------------------------------------------------------------------------
// The state file: what `env` and `down` (and later commands) read

/// `state.json`. Written as soon as the emulator runs (so even an interrupted `up` can be cleaned
/// up), then again with the world and again with the workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub endpoint: String,
    pub region: String,
    pub scale: String,
    pub hub_account: String,
    pub role_name: String,
    pub bus: String,
    /// Stage accounts in rollout order (qa, uat, prod); empty until provisioned.
    #[serde(default)]
    pub accounts: Vec<AccountState>,
    pub emulator: EmulatorState,
    #[serde(default)]
    pub workers: Vec<WorkerState>,
    /// Worker binaries not found next to amictl, so not started.
    #[serde(default)]
    pub missing_workers: Vec<String>,
    pub world_file: PathBuf,
    pub config_file: PathBuf,
    pub logs_dir: PathBuf,
    #[serde(default)]
    pub provision_seconds: Option<f64>,
    /// Unix seconds.
    pub started_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountState {
    pub id: String,
    pub stage: String,
    pub hub: bool,
    pub bus_arn: String,
    /// By worker (`share`, `param`, ...).
    pub queues: BTreeMap<String, QueueState>,
    pub groups: usize,
    pub instances: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueState {
    pub url: String,
    pub dlq_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmulatorState {
    pub pid: u32,
    pub port: u16,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerState {
    pub name: String,
    pub stage: String,
    pub account: String,
    pub pid: u32,
    /// How it was started (binary, environment, log): `up` on a running world starts a worker
    /// that died again from exactly this.
    #[serde(flatten)]
    pub launch: local_world::Launch,
}

impl WorkerState {
    fn tracked(&self) -> Tracked {
        Tracked {
            label: format!("{} ({})", self.name, self.stage),
            pid: self.pid,
            cmdline_contains: self.name.clone(),
        }
    }
}

impl State {
    fn emulator_proc(&self) -> Tracked {
        Tracked {
            label: format!("emulator (port {})", self.emulator.port),
            pid: self.emulator.pid,
            // The launcher is `<venv python> local/launcher.py`; a reused pid will not match.
            cmdline_contains: "launcher.py".into(),
        }
    }

    fn worker_procs(&self) -> Vec<Tracked> {
        self.workers.iter().map(WorkerState::tracked).collect()
    }

    fn all_procs(&self) -> Vec<Tracked> {
        let mut all = self.worker_procs();
        all.push(self.emulator_proc());
        all
    }

    fn account(&self, stage_or_id: &str) -> Option<&AccountState> {
        self.accounts
            .iter()
            .find(|a| a.id == stage_or_id || a.stage == stage_or_id)
    }
}

/// The state of the running local world, if there is one.
/// The running local world's state (`None` when none was started); an error that says how to
/// recover when its emulator has stopped, rather than an SDK error from its first call.
pub fn current_state() -> Result<Option<State>> {
    let paths = Paths::resolve()?;
    let Some(state) = read_state(&paths)? else {
        return Ok(None);
    };
    ensure_running(&paths, &state)?;
    Ok(Some(state))
}

fn ensure_running(paths: &Paths, state: &State) -> Result<()> {
    let emulator = state.emulator_proc();
    if !procs::is_running(emulator.pid, &emulator.cmdline_contains) {
        bail!(
            "the local world recorded in {} is not running (emulator pid {} is gone); run `amictl local down` to clean up, then `amictl local up`",
            paths.state().display(),
            state.emulator.pid
        );
    }
    Ok(())
}

/// An SDK configuration acting in `account` of the local world, through sts:AssumeRole as the
/// workers do.
pub async fn account_config(state: &State, account: &str) -> Result<aws_config::SdkConfig> {
    let creds = local_world::assume_role(
        &state.endpoint,
        &state.region,
        account,
        &state.role_name,
        "amictl",
    )
    .await?;
    Ok(aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&state.endpoint)
        .region(aws_config::Region::new(state.region.clone()))
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            creds.access_key_id,
            creds.secret_access_key,
            Some(creds.session_token),
            None,
            "amictl-local",
        ))
        .load()
        .await)
}

fn read_state(paths: &Paths) -> Result<Option<State>> {
    let path = paths.state();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_str(&text).map(Some).with_context(|| {
        format!(
            "{} is not a state file this amictl understands; if no local world is running, delete it (rm {})",
            path.display(),
            path.display()
        )
    })
}

fn write_state(paths: &Paths, state: &State) -> Result<()> {
    let path = paths.state();
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(state)? + "\n";
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// Remove state.json and world.json (and the folder, when nothing else is left in it). Logs stay:
/// they are what explains a run after it ended.
fn remove_state(paths: &Paths) -> Result<()> {
    for path in [paths.state(), paths.world()] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    // The lock file goes too, unless an `up` holds it right now.
    if let Ok(lock) = File::open(paths.lock())
        && lock.try_lock().is_ok()
    {
        let _ = std::fs::remove_file(paths.lock());
    }
    let _ = std::fs::remove_dir(&paths.dir);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// up

pub(crate) async fn up(args: UpArgs) -> Result<()> {
    if !(args.refresh_step > 0.0 && args.refresh_step.is_finite()) {
        bail!("--refresh-step must be a positive number of seconds");
    }
    if !(args.retry_base_seconds > 0.0 && args.retry_base_seconds <= 3600.0) {
        bail!("--retry-base-seconds must be more than 0 and at most 3600");
    }
    let paths = Paths::resolve()?;
    for dir in [&paths.dir, &paths.logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let lock = File::create(paths.lock())
        .with_context(|| format!("creating {}", paths.lock().display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => bail!(
            "another `amictl local up` is starting a world in {}; wait for it to finish, or stop it with `amictl local down`",
            paths.dir.display()
        ),
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", paths.lock().display()));
        }
    }
    if let Some(state) = running_world(&paths)? {
        return revive(&paths, state).await;
    }
    if let Some(port) = args.port.filter(|p| *p != 0) {
        ensure_port_free(port)?;
    }
    let script = paths.root.join("local/world.py");
    if !script.is_file() {
        bail!(
            "{} not found: amictl looks for the amiflow checkout at {}; set AMIFLOW_HOME to it",
            script.display(),
            paths.root.display()
        );
    }

    let mut launch = Started::default();
    let outcome = tokio::select! {
        outcome = bring_up(&paths, &args, &mut launch) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(summary) => {
            print!("{summary}");
            Ok(())
        }
        Err(err) => {
            if !launch.procs.is_empty() {
                eprintln!("amictl: local up failed; stopping what it started...");
            }
            launch.stop();
            remove_state(&paths)?;
            Err(err)
        }
    }
}

/// What an `up` in progress has started, so a failure can stop it.
#[derive(Debug, Default)]
struct Started {
    procs: Vec<Tracked>,
}

impl Started {
    fn stop(&self) {
        // Workers first: they may still need the emulator to release their messages.
        let (emulator, workers): (Vec<_>, Vec<_>) = self
            .procs
            .iter()
            .cloned()
            .partition(|p| p.cmdline_contains == "launcher.py");
        procs::stop(&workers, WORKER_GRACE);
        procs::stop(&emulator, EMULATOR_GRACE);
    }
}

/// The world recorded in the state file, if its emulator still runs. A state file whose
/// processes are all gone is left over from a killed run: it is removed. Workers that outlived
/// their emulator cannot be brought back (their world is gone): those must be stopped first.
fn running_world(paths: &Paths) -> Result<Option<State>> {
    let Some(state) = read_state(paths)? else {
        return Ok(None);
    };
    let emulator = state.emulator_proc();
    if procs::is_running(emulator.pid, &emulator.cmdline_contains) {
        return Ok(Some(state));
    }
    let alive: Vec<Tracked> = state
        .all_procs()
        .into_iter()
        .filter(|p| procs::is_running(p.pid, &p.cmdline_contains))
        .collect();
    if !alive.is_empty() {
        let pids: Vec<String> = alive.iter().map(|p| p.pid.to_string()).collect();
        bail!(
            "the emulator of the local world at {} is gone but some of its workers run (pid {}); run `amictl local down` first",
            state.endpoint,
            pids.join(", ")
        );
    }
    eprintln!(
        "amictl: removing the state of an earlier local world that is no longer running ({})",
        paths.state().display()
    );
    remove_state(paths)?;
    Ok(None)
}

fn ensure_port_free(port: u16) -> Result<()> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AddrInUse => Err(port_in_use(port)),
        Err(e) => Err(e).with_context(|| format!("checking that port {port} is free")),
    }
}

fn port_in_use(port: u16) -> anyhow::Error {
    anyhow!(
        "port {port} is already in use; choose another with `--port N`, or omit --port to let the OS pick a free one"
    )
}

async fn bring_up(paths: &Paths, args: &UpArgs, launch: &mut Started) -> Result<String> {
    let started = Instant::now();

    // 1. The emulator, detached: it outlives this command.
    let emulator_log = paths.logs.join("emulator.log");
    eprintln!(
        "amictl: starting the local AWS emulator (log: {})",
        emulator_log.display()
    );
    let options = emulator::Options {
        refresh_step: Duration::from_secs_f64(args.refresh_step),
        tied_to_parent: false,
        log_file: Some(emulator_log.clone()),
        port: args.port.unwrap_or(0),
    };
    let start = tokio::task::spawn_blocking(move || {
        emulator::Emulator::start_with(&options).map(|e| (e.port(), e.detach()))
    })
    .await
    .context("the emulator start task panicked")?;
    let (port, pid) = match start {
        Ok(started) => started,
        Err(err) => {
            // Lost a race for the port between our check and the bind.
            let log = std::fs::read_to_string(&emulator_log).unwrap_or_default();
            if let Some(port) = args.port
                && log.contains("Address already in use")
            {
                return Err(port_in_use(port));
            }
            return Err(anyhow!(err).context("could not start the local AWS emulator"));
        }
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut state = State {
        endpoint: endpoint.clone(),
        region: REGION.into(),
        scale: args.scale.as_str().into(),
        hub_account: String::new(),
        role_name: String::new(),
        bus: String::new(),
        accounts: Vec::new(),
        emulator: EmulatorState {
            pid,
            port,
            log: emulator_log,
        },
        workers: Vec::new(),
        missing_workers: Vec::new(),
        world_file: paths.world(),
        config_file: paths.root.join("local/amiflow.toml"),
        logs_dir: paths.logs.clone(),
        provision_seconds: None,
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    launch.procs.push(state.emulator_proc());
    write_state(paths, &state)?;

    // 2. The world.
    let world = provision(paths, &endpoint, args.scale).await?;
    state.hub_account = world.hub_account.clone();
    state.role_name = world.role_name.clone();
    state.provision_seconds = world.timings.get("provision_seconds").copied();
    state.accounts = world.account_states();
    state.bus = state
        .accounts
        .first()
        .map(|a| bus_name(&a.bus_arn).to_owned())
        .unwrap_or_default();
    write_state(paths, &state)?;

    // 3. The workers.
    if !args.no_workers {
        // A deferred refresh (concurrency limit reached) retries after about two refresh phases,
        // not the production minute: the emulated refreshes are that much faster.
        let timings = Timings {
            wait_seconds: 5.0,
            defer_seconds: (2.0 * args.refresh_step).clamp(1.0, 60.0),
            retry_base_seconds: args.retry_base_seconds,
            read_back_seconds: None,
        };
        start_workers(paths, &mut state, launch, timings).await?;
    }

    Ok(summary(paths, &state, started.elapsed(), args.no_workers))
}

fn bus_name(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// `world.json` as written by local/world.py (only the parts amictl uses).
#[derive(Debug, Deserialize)]
struct World {
    role_name: String,
    hub_account: String,
    accounts: BTreeMap<String, WorldAccount>,
    #[serde(default)]
    timings: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
struct WorldAccount {
    stage: String,
    hub: bool,
    bus_arn: String,
    queues: BTreeMap<String, QueueState>,
    #[serde(default)]
    groups: Vec<WorldGroup>,
}

#[derive(Debug, Deserialize)]
struct WorldGroup {
    instances: u64,
}

impl World {
    fn account_states(&self) -> Vec<AccountState> {
        let mut accounts: Vec<AccountState> = self
            .accounts
            .iter()
            .map(|(id, a)| AccountState {
                id: id.clone(),
                stage: a.stage.clone(),
                hub: a.hub,
                bus_arn: a.bus_arn.clone(),
                queues: a.queues.clone(),
                groups: a.groups.len(),
                instances: a.groups.iter().map(|g| g.instances).sum(),
            })
            .collect();
        // Rollout order, not account-id order.
        accounts.sort_by_key(|a| (local_world::rollout_rank(&a.stage), a.id.clone()));
        accounts
    }
}

async fn provision(paths: &Paths, endpoint: &str, scale: Scale) -> Result<World> {
    let python = tokio::task::spawn_blocking({
        let root = paths.root.clone();
        move || emulator::ensure_venv(&root)
    })
    .await
    .context("the venv task panicked")??;
    let log_path = paths.logs.join("provision.log");
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    eprintln!(
        "amictl: provisioning the {} world: hub and stage accounts, buses, queues, golden AMIs, Auto Scaling groups",
        scale.as_str()
    );
    let mut command =
        local_world::provision_command(&python, endpoint, scale.as_str(), &[], &paths.world());
    command.stdout(log.try_clone()?).stderr(log);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let status = match tokio::time::timeout(PROVISION_DEADLINE, child.wait()).await {
        Ok(status) => status.context("waiting for local/world.py")?,
        Err(_) => bail!(
            "provisioning did not finish within {} minutes; see {}",
            PROVISION_DEADLINE.as_secs() / 60,
            log_path.display()
        ),
    };
    if !status.success() {
        bail!(
            "provisioning the local world failed ({status}):\n{}\nfull log: {}",
            tail(&log_path, 15),
            log_path.display()
        );
    }
    let text = std::fs::read_to_string(paths.world())
        .with_context(|| format!("reading {}", paths.world().display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not the world local/world.py should write",
            paths.world().display()
        )
    })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The folder amictl was run from: the worker binaries are built beside it.
fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the amictl executable")?;
    Ok(exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent folder", exe.display()))?
        .to_path_buf())
}

async fn start_workers(
    paths: &Paths,
    state: &mut State,
    launch: &mut Started,
    timings: Timings,
) -> Result<()> {
    let bin_dir = bin_dir()?;
    let (present, missing): (Vec<&local_world::Worker>, Vec<_>) = WORKERS
        .iter()
        .partition(|w| bin_dir.join(w.binary).is_file());
    state.missing_workers = missing.iter().map(|w| w.binary.to_owned()).collect();
    if present.is_empty() {
        write_state(paths, state)?;
        return Ok(());
    }

    let mut workers = Vec::new();
    for account in &state.accounts {
        let creds = local_world::assume_role(
            &state.endpoint,
            &state.region,
            &account.id,
            &state.role_name,
            "amiflow-local-worker",
        )
        .await?;
        let setting = Setting {
            endpoint: &state.endpoint,
            region: &state.region,
            role_name: &state.role_name,
            bus: bus_name(&account.bus_arn),
            config: &state.config_file,
            timings,
        };
        for worker in present.iter().filter(|w| w.serves(account.hub)) {
            let queue = account.queues.get(worker.queue).ok_or_else(|| {
                anyhow!(
                    "{} has no `{}` queue for account {}; local/world.py and amictl disagree on the world",
                    paths.world().display(),
                    worker.queue,
                    account.id
                )
            })?;
            let plan = local_world::Launch::new(
                &setting,
                worker,
                &account.stage,
                &creds,
                &queue.url,
                &queue.dlq_url,
                &bin_dir,
                &paths.logs,
            );
            // A fresh world starts fresh logs (a restart appends to them).
            File::create(&plan.log).with_context(|| format!("creating {}", plan.log.display()))?;
            workers.push(WorkerState {
                name: worker.binary.to_owned(),
                stage: account.stage.clone(),
                account: account.id.clone(),
                pid: 0,
                launch: plan,
            });
        }
    }
    let children = spawn_all(&mut workers, launch)?;
    state.workers = workers;
    write_state(paths, state)?;
    settle(children).await
}

/// Start every worker of `workers` (recording its pid there), tracked by `launch` so a failure
/// stops them again.
fn spawn_all<'a>(
    workers: impl IntoIterator<Item = &'a mut WorkerState>,
    launch: &mut Started,
) -> Result<Vec<(Child, WorkerState)>> {
    let mut children = Vec::new();
    for worker in workers {
        let child = worker
            .launch
            .command()?
            .spawn()
            .with_context(|| format!("starting {}", worker.launch.binary.display()))?;
        worker.pid = child.id();
        launch.procs.push(worker.tracked());
        children.push((child, worker.clone()));
    }
    Ok(children)
}

/// A worker with a bad configuration exits at once, naming the setting; report it rather than
/// claim a world whose workers are dead.
async fn settle(mut children: Vec<(Child, WorkerState)>) -> Result<()> {
    tokio::time::sleep(WORKER_SETTLE).await;
    for (child, worker) in &mut children {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} for {} ({}) exited right after starting ({status}):\n{}\nfull log: {}",
                worker.name,
                worker.stage,
                worker.account,
                tail(&worker.launch.log, 15),
                worker.launch.log.display()
            );
        }
    }
    // Dropping a std Child neither kills nor waits: the workers run on, and whoever inherits
    // them (init) reaps them after this command exits.
    Ok(())
}

/// `up` on a world that is running: start again, each as it was first started, the workers that
/// are not running; the emulator, the world and the live workers are left alone.
async fn revive(paths: &Paths, mut state: State) -> Result<()> {
    if state.accounts.is_empty() {
        bail!(
            "the local world in {} was never fully provisioned (an interrupted `amictl local up`); run `amictl local down`, then `amictl local up`",
            paths.state().display()
        );
    }
    let mut launch = Started::default();
    let mut dead: Vec<&mut WorkerState> = state
        .workers
        .iter_mut()
        .filter(|w| !procs::is_running(w.pid, &w.name))
        .collect();
    let names: Vec<String> = dead
        .iter()
        .map(|w| format!("{} ({})", w.name, w.stage))
        .collect();
    if dead.is_empty() {
        println!(
            "the local world at {} is already up and its {} workers are running; nothing to start (`amictl local down` stops it)",
            state.endpoint,
            state.workers.len()
        );
        return Ok(());
    }
    let outcome = async {
        let children = spawn_all(dead.iter_mut().map(|w| &mut **w), &mut launch)?;
        let pids: Vec<String> = children
            .iter()
            .map(|(c, w)| format!("{} ({}) pid {}", w.name, w.stage, c.id()))
            .collect();
        settle(children).await.map(|()| pids)
    }
    .await;
    match outcome {
        Ok(pids) => {
            write_state(paths, &state)?;
            println!(
                "the local world at {} is already up; started again {} worker{} that {} not running: {}",
                state.endpoint,
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                if names.len() == 1 { "was" } else { "were" },
                pids.join(", ")
            );
            println!(
                "  their in-flight messages return to their queues within the queues' visibility timeout"
            );
            Ok(())
        }
        Err(err) => {
            // Leave the world as it was: what this run started is stopped again.
            launch.stop();
            Err(err)
        }
    }
}

fn summary(paths: &Paths, state: &State, elapsed: Duration, no_workers: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let provision = state
        .provision_seconds
        .map(|s| format!("provisioning {s:.1} s, "))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "local world up in {:.1} s ({provision}scale {})",
        elapsed.as_secs_f64(),
        state.scale
    );
    let _ = writeln!(
        out,
        "  endpoint  {} (region {}, emulator pid {})",
        state.endpoint, state.region, state.emulator.pid
    );
    let accounts: Vec<String> = state
        .accounts
        .iter()
        .map(|a| format!("{} {}{}", a.stage, a.id, if a.hub { " (hub)" } else { "" }))
        .collect();
    let _ = writeln!(out, "  accounts  {}", accounts.join(", "));
    let groups: usize = state.accounts.iter().map(|a| a.groups).sum();
    let instances: u64 = state.accounts.iter().map(|a| a.instances).sum();
    let _ = writeln!(
        out,
        "  world     {groups} Auto Scaling groups, {instances} instances"
    );
    if no_workers {
        let _ = writeln!(out, "  workers   none (--no-workers)");
    } else {
        let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for w in &state.workers {
            by_name.entry(&w.name).or_default().push(&w.stage);
        }
        let started: Vec<String> = WORKERS
            .iter()
            .filter_map(|w| {
                by_name
                    .get(w.binary)
                    .map(|stages| format!("{} ({})", w.binary, stages.join(", ")))
            })
            .collect();
        let _ = writeln!(
            out,
            "  workers   {} started{}{}",
            state.workers.len(),
            if started.is_empty() { "" } else { ": " },
            started.join(", ")
        );
        if !state.missing_workers.is_empty() {
            let _ = writeln!(
                out,
                "  missing   {} (not built next to amictl; `cargo build --workspace`, then `amictl local down && amictl local up`)",
                state.missing_workers.join(", ")
            );
        }
    }
    let _ = writeln!(out, "  logs      {}", state.logs_dir.display());
    let _ = writeln!(out, "  state     {}", paths.state().display());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Point AWS clients at it:  eval \"$(amictl local env)\""
    );
    let _ = writeln!(out, "Stop it:                  amictl local down");
    out
}

// ---------------------------------------------------------------------------------------------
// env

async fn env(args: EnvArgs) -> Result<()> {
    let paths = Paths::resolve()?;
    let state = read_state(&paths)?.ok_or_else(|| {
        anyhow!(
            "no local world is running (no state file at {}); start one with `amictl local up`",
            paths.state().display()
        )
    })?;
    ensure_running(&paths, &state)?;
    if state.accounts.is_empty() {
        bail!(
            "the local world in {} is still being provisioned; wait for `amictl local up` to finish",
            paths.state().display()
        );
    }
    let mut exports: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: &str| exports.push((k.to_owned(), v.to_owned()));
    put("AWS_ENDPOINT_URL", &state.endpoint);
    let token = match &args.account {
        None => {
            put("AWS_ACCESS_KEY_ID", BASE_KEY);
            put("AWS_SECRET_ACCESS_KEY", BASE_KEY);
            None
        }
        Some(wanted) => {
            let account = state.account(wanted).ok_or_else(|| {
                let known: Vec<String> = state
                    .accounts
                    .iter()
                    .map(|a| format!("{} ({})", a.stage, a.id))
                    .collect();
                anyhow!(
                    "no account `{wanted}` in the local world; use one of {}",
                    known.join(", ")
                )
            })?;
            let creds = local_world::assume_role(
                &state.endpoint,
                &state.region,
                &account.id,
                &state.role_name,
                "amictl-local-env",
            )
            .await?;
            put("AWS_ACCESS_KEY_ID", &creds.access_key_id);
            put("AWS_SECRET_ACCESS_KEY", &creds.secret_access_key);
            Some(creds.session_token)
        }
    };
    if let Some(token) = &token {
        put("AWS_SESSION_TOKEN", token);
    }
    put("AWS_REGION", &state.region);
    // boto3 and the AWS CLI read AWS_DEFAULT_REGION.
    put("AWS_DEFAULT_REGION", &state.region);
    put("AMIFLOW_HUB_ACCOUNT", &state.hub_account);
    for account in &state.accounts {
        put(
            &format!("AMIFLOW_{}_ACCOUNT", account.stage.to_uppercase()),
            &account.id,
        );
    }
    put("AMIFLOW_ROLE_NAME", &state.role_name);
    put("AMIFLOW_BUS", &state.bus);
    put("AMIFLOW_LOCAL_STATE", &paths.state().to_string_lossy());
    put("AMIFLOW_LOCAL_WORLD", &state.world_file.to_string_lossy());
    if paths.overridden {
        put("AMIFLOW_STATE_DIR", &paths.dir.to_string_lossy());
    }

    println!(
        "# amiflow local world at {} (undo: amictl local down)",
        state.endpoint
    );
    // A profile or an old session token in the caller's shell would win over or spoil these keys.
    if token.is_some() {
        println!("unset AWS_PROFILE");
    } else {
        println!("unset AWS_PROFILE AWS_SESSION_TOKEN");
    }
    for (name, value) in exports {
        println!("export {name}={}", shell_quote(&value));
    }
    Ok(())
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------------
// down

pub(crate) fn down() -> Result<()> {
    let paths = Paths::resolve()?;
    let Some(state) = read_state(&paths)? else {
        println!(
            "no local world is running (no state file at {}); nothing to stop",
            paths.state().display()
        );
        return Ok(());
    };
    let workers = procs::stop(&state.worker_procs(), WORKER_GRACE);
    let emulator = procs::stop(&[state.emulator_proc()], EMULATOR_GRACE);
    let port_closed = wait_port_closed(state.emulator.port, Duration::from_secs(5));
    remove_state(&paths)?;

    let stopped = workers.terminated.len() + workers.killed.len();
    if stopped == 0 && emulator.gone.len() == 1 {
        println!(
            "the local world recorded in {} was no longer running; removed its state",
            paths.state().display()
        );
    } else {
        println!(
            "stopped {stopped} worker{} and the emulator at {}; state removed (logs kept in {})",
            if stopped == 1 { "" } else { "s" },
            state.endpoint,
            state.logs_dir.display()
        );
    }
    let killed: Vec<String> = workers
        .killed
        .iter()
        .chain(&emulator.killed)
        .map(|p| format!("{} pid {}", p.label, p.pid))
        .collect();
    if !killed.is_empty() {
        println!(
            "  killed after the grace period: {} (see their logs)",
            killed.join(", ")
        );
    }
    if !port_closed {
        bail!(
            "port {} still accepts connections after the emulator stopped; another process holds it (see `ss -ltnp 'sport = :{}'`)",
            state.emulator.port,
            state.emulator.port
        );
    }
    Ok(())
}

fn wait_port_closed(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let open = TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(200),
        )
        .is_ok();
        if !open {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("http://x:1"), "'http://x:1'");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn accounts_are_in_rollout_order() {
        let world: World = serde_json::from_value(serde_json::json!({
            "role_name": "amiflow", "hub_account": "111111111111",
            "accounts": {
                "333333333333": {"stage": "prod", "hub": false, "bus_arn": "arn:aws:events:us-east-1:333333333333:event-bus/amiflow", "queues": {}},
                "111111111111": {"stage": "qa", "hub": true, "bus_arn": "arn:aws:events:us-east-1:111111111111:event-bus/amiflow", "queues": {}, "groups": [{"instances": 2}, {"instances": 3}]},
                "022222222222": {"stage": "uat", "hub": false, "bus_arn": "arn:aws:events:us-east-1:022222222222:event-bus/amiflow", "queues": {}}
            }
        }))
        .unwrap();
        let accounts = world.account_states();
        let stages: Vec<_> = accounts.iter().map(|a| a.stage.as_str()).collect();
        assert_eq!(stages, ["qa", "uat", "prod"]);
        assert_eq!(accounts[0].instances, 5);
        assert_eq!(bus_name(&accounts[0].bus_arn), "amiflow");
    }
}
