//! `amictl demo`: the README's first command. Starts the local world (`amictl local up`), injects
//! an `AmiBuilt` for the month's new golden AMI onto the hub bus, waits for every stage's golden
//! parameter, opens the maintenance windows stage by stage as EventBridge Scheduler would, shows
//! each stage's progress from the `AsgRefreshFinished` events forwarded to the hub, prints the
//! compliance table computed from AWS itself, and tears the world down (`--keep` leaves it up).
//!
//! The demo only emits events and reads state: every change is made by the worker processes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chrono::Utc;
use clap::Args;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use events::AmiBuilt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use local_world::{Audit, Driver, Stage};
use rollout::policy::Policy;

use crate::compliance::{self, AccountCompliance, GroupState};
use crate::local::{self, Scale, State, UpArgs};

/// Run a whole monthly rollout in a local AWS world and show the result.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  cargo run -p amictl -- demo          # the README's first command\n  amictl demo --keep && eval \"$(amictl local env)\"   # look around afterwards\n  amictl local down"
)]
pub struct DemoArgs {
    /// Leave the world running afterwards (stop it with `amictl local down`).
    #[arg(long)]
    keep: bool,
    /// Size of the world (`seed`: about 4,500 instances; takes minutes).
    #[arg(long, value_enum, default_value_t = Scale::Small)]
    scale: Scale,
    /// Seconds each phase of an emulated instance refresh lasts.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    refresh_step: f64,
    /// Give up on a stage whose groups have not all finished within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    stage_timeout: u64,
}

const PARAMETER: &str = "/golden/al2023/ami-id";

pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    ensure_workers_built()?;
    local::up(UpArgs::for_demo(args.scale, args.refresh_step)).await?;
    let outcome = tokio::select! {
        outcome = rollout_in_world(&args) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if args.keep {
        eprintln!(
            "amictl: the world is still up (--keep): `eval \"$(amictl local env)\"` to use it, `amictl local down` to stop it"
        );
    } else {
        local::down()?;
    }
    outcome?;
    println!("demo finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo run -p amictl` builds amictl only; the demo needs the worker binaries beside it. Under
/// cargo (which sets `CARGO`), build them the same way; otherwise say how.
fn ensure_workers_built() -> Result<()> {
    let exe = std::env::current_exe().context("locating the amictl executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent folder", exe.display()))?;
    let missing: Vec<&str> = local_world::WORKERS
        .iter()
        .map(|w| w.binary)
        .filter(|b| !dir.join(b).is_file())
        .collect();
    let cargo = std::env::var_os("CARGO");
    let manifest = emulator::project_root().join("Cargo.toml");
    match cargo {
        // Under cargo: always ask it, so the workers are as fresh as amictl (a no-op when they are).
        Some(cargo) if manifest.is_file() => {
            // cargo's own progress goes to standard error: a cold build takes minutes, and a
            // silent one looks hung.
            eprintln!(
                "amictl: building the worker binaries (cargo build -p rollout --bins; a few minutes the first time)"
            );
            let mut command = std::process::Command::new(cargo);
            command
                .args(["build", "-p", "rollout", "--bins", "--manifest-path"])
                .arg(&manifest);
            if dir.ends_with("release") {
                command.arg("--release");
            }
            let status = command.status().context("running cargo build")?;
            if !status.success() {
                bail!("building the worker binaries failed ({status}); see cargo's output above");
            }
            Ok(())
        }
        _ if missing.is_empty() => Ok(()),
        _ => bail!(
            "the worker binaries {} are not next to amictl in {}; build them with `cargo build -p rollout --bins` (or run the demo with `cargo run -p amictl -- demo`)",
            missing.join(", "),
            dir.display()
        ),
    }
}

async fn rollout_in_world(args: &DemoArgs) -> Result<()> {
    let state = local::current_state()?
        .ok_or_else(|| anyhow!("the local world did not record its state"))?;
    let policy = Policy::load(&state.config_file)
        .with_context(|| format!("reading {}", state.config_file.display()))?;
    let hub = state.hub_account.clone();
    let hub_config = local::account_config(&state, &hub).await?;
    let candidate = candidate_ami(&state)?;
    let audit_queue = state
        .accounts
        .iter()
        .find(|a| a.hub)
        .and_then(|a| a.queues.get("audit"))
        .map(|q| q.url.clone())
        .ok_or_else(|| anyhow!("the hub has no audit queue in the world state"))?;
    let mut stages = Vec::new();
    for account in &state.accounts {
        let policy_stage = policy.stage_for_account(&account.id).ok_or_else(|| {
            anyhow!(
                "account {} is not in {}",
                account.id,
                state.config_file.display()
            )
        })?;
        stages.push(Stage {
            account: account.id.clone(),
            name: account.stage.clone(),
            config: local::account_config(&state, &account.id).await?,
            window_hours: policy_stage.window.duration_hours,
        });
    }
    let driver = Driver {
        hub: hub_config.clone(),
        bus: state.bus.clone(),
        audit_queue,
        stages,
    };

    // 1. The month's AMI is built: inject what ingest would emit.
    let image = aws_sdk_ec2::Client::new(&hub_config)
        .describe_images()
        .image_ids(&candidate)
        .send()
        .await
        .context("describing the new golden AMI")?
        .images()
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the new golden AMI {candidate} is not in the hub"))?;
    let created = image
        .creation_date()
        .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
        .map(|d| d.to_utc())
        .unwrap_or_else(Utc::now);
    let built = AmiBuilt::new(
        &candidate,
        &state.region,
        image.name().unwrap_or("golden-al2023"),
        created,
        PARAMETER,
    );
    println!(
        "\ninjecting AmiBuilt {candidate} ({}) on the hub bus; rollout {}",
        built.image_name, built.meta.rollout_id
    );

    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>5} {bar:30} {pos}/{len} groups  {msg}")
        .expect("a valid progress template");
    // No bar while a stage waits: its groups to refresh are known only once it is promoted.
    let waiting =
        ProgressStyle::with_template("{prefix:>5} {msg}").expect("a valid progress template");
    let bars: BTreeMap<String, ProgressBar> = driver
        .stages
        .iter()
        .map(|stage| {
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(waiting.clone());
            bar.set_prefix(stage.name.clone());
            bar.set_message("waiting for the golden parameter");
            (stage.account.clone(), bar)
        })
        .collect();

    // 2. Shared with every stage, published in the first.
    let mut audit = Audit::default();
    driver
        .publish(built, &mut audit, Duration::from_secs(120), |stage| {
            bars[&stage.account]
                .set_message(format!("parameter {candidate}; waiting for the window"));
        })
        .await
        .with_context(|| {
            format!(
                "see the share and param worker logs in {}",
                state.logs_dir.display()
            )
        })?;

    // 3. The windows, stage by stage: each must finish before the next opens.
    for stage in &driver.stages {
        let policy_stage = policy
            .stage_for_account(&stage.account)
            .expect("checked above");
        let bar = &bars[&stage.account];
        // The gate decides at the window: print its state before (for the demo's family).
        let line = gate_line(&stage.name).await?;
        if bar.is_hidden() {
            eprintln!("amictl: {line}");
        } else {
            multi.println(&line).ok();
        }
        let within = Duration::from_secs(args.stage_timeout);
        let opened = std::time::Instant::now();
        bar.set_message("window open; the hub's gate decides");
        // A later stage is promoted by the hub's gate at its window: what it must refresh is
        // known once its parameter holds the candidate.
        let promoted = async {
            driver.open(stage).await?;
            driver.promoted(stage, &candidate, &mut audit, within).await
        }
        .await;
        let took = match promoted {
            Err(e) => Err(e),
            Ok(()) => {
                let before = compliance::account(&stage.config, &policy, policy_stage).await?;
                let expected: BTreeSet<String> = before
                    .groups
                    .iter()
                    .filter(|g| g.needs_refresh)
                    .map(|g| g.name.clone())
                    .collect();
                bar.set_length(expected.len() as u64);
                bar.set_style(style.clone());
                bar.set_message("promoted; refreshing");
                if bar.is_hidden() {
                    eprintln!(
                        "amictl: {}: promoted, {} groups to refresh or report",
                        stage.name,
                        expected.len()
                    );
                }
                driver
                    .outcomes(
                        stage,
                        &candidate,
                        &expected,
                        &mut audit,
                        within.saturating_sub(opened.elapsed()),
                        |done| bar.set_position(done as u64),
                    )
                    .await
                    .map(|()| (opened.elapsed(), expected.len()))
            }
        };
        match took {
            Ok((took, groups)) => {
                let took = format!("done in {:.0} s", took.as_secs_f64());
                bar.finish_with_message(took.clone());
                if bar.is_hidden() {
                    eprintln!("amictl: {}: {groups} groups finished, {took}", stage.name);
                }
            }
            Err(err) => {
                bar.abandon_with_message("timed out");
                return Err(err.context(format!(
                    "see `amictl local env` and the refresh-worker log in {}",
                    state.logs_dir.display()
                )));
            }
        }
    }
    drop(multi);
    println!();
    for stage in &driver.stages {
        println!("{}", gate_line(&stage.name).await?);
    }

    // 4. Compliance, from AWS itself.
    let mut reports = Vec::new();
    for stage in &driver.stages {
        let policy_stage = policy
            .stage_for_account(&stage.account)
            .expect("checked above");
        reports.push(compliance::account(&stage.config, &policy, policy_stage).await?);
    }
    // The first outcome each group reported for the candidate.
    let outcomes: BTreeMap<(String, String), (String, String)> = audit
        .finished
        .iter()
        .filter(|((_, _, ami), _)| *ami == candidate)
        .filter_map(|((account, group, _), said)| {
            said.first()
                .map(|o| ((account.clone(), group.clone()), o.clone()))
        })
        .collect();
    println!("\n{}", summary_table(&reports, &outcomes));
    println!("\n{}", reasons_table(&reports, &outcomes));
    Ok(())
}

/// One line from a stage's gate for the demo's family, as `amictl plan` judges it.
async fn gate_line(stage: &str) -> Result<String> {
    let scope = crate::scope::Scope::open(&crate::scope::ScopeArgs {
        local: true,
        config: None,
        region: None,
        profile: None,
    })
    .await?;
    let preview = crate::plan::preview(&scope, Some(stage), None).await?;
    let mut line = format!("gate {stage}:");
    for s in &preview.stages {
        for g in s.gates.iter().filter(|g| g.parameter == PARAMETER) {
            line.push_str(&format!(
                " {} -> {}",
                g.ami.as_deref().unwrap_or("(no AMI)"),
                g.detail
            ));
        }
        for r in s.runs.iter().filter(|r| r.parameter == PARAMETER) {
            line.push_str(&format!(
                "; {} failed of {} tolerated{}",
                r.failed,
                r.tolerated,
                if r.halted { ", HALTED" } else { "" }
            ));
        }
    }
    Ok(line)
}

fn candidate_ami(state: &State) -> Result<String> {
    let text = std::fs::read_to_string(&state.world_file)
        .with_context(|| format!("reading {}", state.world_file.display()))?;
    let world: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", state.world_file.display()))?;
    world["amis"]["candidate"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{} names no candidate AMI", state.world_file.display()))
}

fn summary_table(
    reports: &[AccountCompliance],
    outcomes: &BTreeMap<(String, String), (String, String)>,
) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "stage",
        "account",
        "golden parameter",
        "groups",
        "current",
        "refreshed now",
        "skipped",
        "rolled back",
        "failed",
        "stale",
        "not golden",
        "instances off golden",
    ]);
    for r in reports {
        let refreshed = outcomes
            .iter()
            .filter(|((a, _), (o, _))| *a == r.account && o == "succeeded")
            .count();
        let parameter = r
            .parameters
            .iter()
            .find(|p| p.name == PARAMETER)
            .and_then(|p| p.ami.clone())
            .unwrap_or_else(|| "(none)".into());
        table.add_row([
            r.stage.clone(),
            r.account.clone(),
            parameter,
            r.groups.len().to_string(),
            r.count(GroupState::Current).to_string(),
            refreshed.to_string(),
            r.count(GroupState::Skipped).to_string(),
            r.count(GroupState::RolledBack).to_string(),
            r.count(GroupState::Failed).to_string(),
            (r.count(GroupState::Stale)
                + r.count(GroupState::Queued)
                + r.count(GroupState::Refreshing))
            .to_string(),
            r.count(GroupState::Untouched).to_string(),
            r.instances_off_golden().to_string(),
        ]);
    }
    table
}

/// Every group that is not current, with the reason: the refresh-worker's outcome where it gave
/// one, else the judgement of the group.
fn reasons_table(
    reports: &[AccountCompliance],
    outcomes: &BTreeMap<(String, String), (String, String)>,
) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(["stage", "group", "state", "why"]);
    if table.width().is_none() {
        // Not a terminal: wrap the reasons at a width that reads well in a log.
        table.set_width(140);
    }
    for r in reports {
        for g in r.groups.iter().filter(|g| g.state != GroupState::Current) {
            let why = outcomes
                .get(&(r.account.clone(), g.name.clone()))
                .filter(|(_, reason)| !reason.is_empty())
                .map(|(outcome, reason)| format!("{outcome}: {reason}"))
                .unwrap_or_else(|| g.reason.clone());
            table.add_row([
                r.stage.clone(),
                g.name.clone(),
                g.state.as_str().into(),
                why,
            ]);
        }
    }
    table
}
