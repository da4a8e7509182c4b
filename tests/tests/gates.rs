//! Promotion gates end to end (issue 16): the real worker binaries in the local world. A stage's
//! golden parameter changes only when the hub's gate promotes it: after the stage before passed
//! the AMI (every group refreshed or reported, failures within tolerance, baked), with an approval
//! where the stage requires one, and never while it is paused. A replayed or forged event never
//! promotes a stage whose gate is closed.
//!
//! Operator records (approval, pause) are written here with `rollout::control`, exactly as
//! amictl writes them (`amictl approve` / `pause` / `resume` are tested with amictl).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use e2e::world::{World, expects_outcome};
use events::Detail;
use rollout::aws::{Records, SsmRecords};
use rollout::control::{self, Decision};
use serde_json::Value;
use support::{Audit, amis, observe, parameter, snapshot};

/// A pause reaches every worker within `AMIFLOW_CONTROL_SECONDS` (1 s here); a paused message
/// comes back every `AMIFLOW_PAUSE_RECHECK_SECONDS`.
const CONTROL_SECONDS: u64 = 1;

/// The local policy with `edit` applied, in a file of `dir`, and the workers' env to use it.
fn policy(dir: &tempfile::TempDir, edit: impl Fn(String) -> String) -> PathBuf {
    let text =
        std::fs::read_to_string(emulator::project_root().join("local/amiflow.toml")).unwrap();
    let path = dir.path().join("amiflow.toml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

async fn start(policy: &Path) -> World {
    let control = CONTROL_SECONDS.to_string();
    World::start(
        "small",
        &[
            ("AMIFLOW_CONFIG", policy.to_str().unwrap()),
            ("AMIFLOW_CONTROL_SECONDS", &control),
            ("AMIFLOW_PAUSE_RECHECK_SECONDS", "2"),
        ],
    )
    .await
}

fn hub_records(world: &World) -> SsmRecords {
    SsmRecords(aws_sdk_ssm::Client::new(world.config(&world.hub())))
}

fn decision(reason: &str) -> Decision {
    Decision {
        by: "arn:aws:sts::111111111111:assumed-role/ops/e2e".into(),
        at: Utc::now(),
        reason: reason.into(),
    }
}

/// The groups of `account` world.py expects an outcome for.
fn expected(world: &World, account: &str) -> std::collections::BTreeSet<String> {
    world
        .groups(account)
        .iter()
        .filter(|g| expects_outcome(g))
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect()
}

/// How many instance refreshes the groups of `account` have had, all told.
async fn refresh_count(world: &World, account: &str) -> usize {
    let mut n = 0;
    for g in world.groups(account) {
        n += observe(world, account, &g).await.refreshes.len();
    }
    n
}

/// The log of the hub's share-worker (the gate) so far.
fn gate_log(world: &World) -> String {
    let stage = world.stage(&world.hub());
    std::fs::read_to_string(world.dir.path().join(format!("share-worker-{stage}.log")))
        .unwrap_or_default()
}

/// Every group of `account` as it was in `before`.
async fn assert_untouched(world: &World, account: &str, before: &support::Snapshot) {
    assert_eq!(
        parameter(world, account).await,
        before.params[account],
        "{}: the parameter did not change",
        world.stage(account)
    );
    for g in world.groups(account) {
        let name = g["name"].as_str().unwrap().to_owned();
        assert_eq!(
            observe(world, account, &g).await,
            before.groups[&(account.to_owned(), name.clone())],
            "{}/{name}: nothing started",
            world.stage(account)
        );
    }
}

#[tokio::test]
async fn a_bad_ami_halts_qa_and_never_reaches_uat_or_prod() {
    let dir = tempfile::tempdir().unwrap();
    let world = start(&policy(&dir, |t| t)).await;
    let accounts = world.accounts();
    let (qa, uat, prod) = (&accounts[0], &accounts[1], &accounts[2]);
    let (candidate, _) = amis(&world);
    // Every qa group the candidate moves by launch template fails its refresh.
    let failing: Vec<String> = world
        .groups(qa)
        .iter()
        .filter(|g| g["expected"] == "refresh" && g["strategy"] == "launch-template")
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect();
    assert!(
        failing.len() > 3,
        "more than qa's 3 refreshes at once: {failing:?}"
    );
    support::emulate_refreshes(&world, qa, &failing, "fail").await;
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    support::publish(&world, &mut audit, Duration::from_secs(120)).await;

    // qa's window: the first failures halt it (max_failed_groups defaults to 0); waiting
    // requests end `halted`, running refreshes finish.
    let driver = world.driver();
    let outcome = driver
        .open_window(
            &driver.stages[0],
            &candidate,
            &expected(&world, qa),
            &mut audit,
            Duration::from_secs(300),
            |_| {},
        )
        .await;
    if let Err(e) = outcome {
        panic!("{e:#}\n{}", world.logs());
    }
    let mut ended: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in &failing {
        let said = audit.outcomes(qa, name, &candidate).unwrap();
        let (outcome, reason) = &said[0];
        if outcome == "halted" {
            assert!(
                reason.contains("more than the 0 it tolerates (max_failed_groups = 0)")
                    && reason.contains("`amictl resume --stage qa`"),
                "{name}: {reason}"
            );
        }
        ended.entry(outcome.clone()).or_default().push(name.clone());
    }
    let failed =
        ended.get("failed").map_or(0, Vec::len) + ended.get("rolled-back").map_or(0, Vec::len);
    let halted = ended.get("halted").map_or(0, Vec::len);
    assert!(
        (1..=3).contains(&failed),
        "at most the refreshes running at once fail: {ended:?}"
    );
    assert_eq!(
        failed + halted,
        failing.len(),
        "every other one halted: {ended:?}"
    );
    for name in ended.get("halted").into_iter().flatten() {
        let now = observe(
            &world,
            qa,
            &world
                .groups(qa)
                .into_iter()
                .find(|g| g["name"] == name.as_str())
                .unwrap(),
        )
        .await;
        assert!(
            now.refreshes.is_empty(),
            "{name}: a halted group never starts: {now:?}"
        );
    }

    // uat's and prod's windows open: their gates stay closed, nothing changes there.
    for stage in &driver.stages[1..] {
        driver.open(stage).await.unwrap();
    }
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    assert_untouched(&world, uat, &before).await;
    assert_untouched(&world, prod, &before).await;
    let log = gate_log(&world);
    assert!(
        log.contains("qa halted: ") && log.contains("gate closed: not promoted"),
        "the gate says why:\n{log}"
    );
}

/// An operator halts qa for the candidate while two of its refreshes run (the emulator holds
/// them in progress: tag value `hold`) with `--cancel-running` (the record `amictl halt` writes):
/// the running refreshes are cancelled and reported `cancelled`, the requests still waiting end
/// `halted` with who and why, no refresh starts after the halt, and uat is never promoted.
#[tokio::test]
async fn an_operator_halt_with_cancel_running_cancels_qas_refreshes_and_keeps_uat_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = policy(&dir, |t| t);
    let control = CONTROL_SECONDS.to_string();
    let world = World::start(
        "small",
        &[
            ("AMIFLOW_CONFIG", path.to_str().unwrap()),
            ("AMIFLOW_CONTROL_SECONDS", &control),
            ("AMIFLOW_PAUSE_RECHECK_SECONDS", "2"),
            ("AMIFLOW_POLL_SECONDS", "1"),
        ],
    )
    .await;
    let accounts = world.accounts();
    let (qa, uat, prod) = (&accounts[0], &accounts[1], &accounts[2]);
    let (candidate, _) = amis(&world);
    let held: Vec<Value> = world
        .groups(qa)
        .into_iter()
        .filter(|g| g["expected"] == "refresh" && g["strategy"] == "launch-template")
        .take(2)
        .collect();
    assert_eq!(held.len(), 2);
    let names: Vec<String> = held
        .iter()
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect();
    support::emulate_refreshes(&world, qa, &names, "hold").await;
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    support::publish(&world, &mut audit, Duration::from_secs(120)).await;
    let driver = world.driver();
    driver.open(&driver.stages[0]).await.unwrap();
    e2e::eventually(
        "both held groups' refreshes to run",
        Duration::from_secs(120),
        || async {
            let mut running = 0;
            for g in &held {
                let seen = observe(&world, qa, g).await;
                running += usize::from(seen.refreshes.iter().any(|r| r.1 == "InProgress"));
            }
            (running == held.len()).then_some(())
        },
    )
    .await;
    control::write(
        &hub_records(&world),
        &control::halt_path(&candidate, "qa"),
        &control::Halt {
            decision: decision("kernel panic on boot"),
            cancel_running: true,
        },
    )
    .await
    .unwrap();
    let halted_at = Utc::now();

    let done = driver
        .outcomes(
            &driver.stages[0],
            &candidate,
            &expected(&world, qa),
            &mut audit,
            Duration::from_secs(300),
            |_| {},
        )
        .await;
    if let Err(e) = done {
        panic!("{e:#}\n{}", world.logs());
    }
    for g in &held {
        let name = g["name"].as_str().unwrap();
        let said = audit.outcomes(qa, name, &candidate).unwrap();
        assert_eq!(said[0].0, "cancelled", "{name}: {said:?}");
        let now = observe(&world, qa, g).await;
        assert_eq!(
            now.instance_amis,
            before.groups[&(qa.to_owned(), name.to_owned())].instance_amis,
            "{name}: its instances were never replaced"
        );
        assert_eq!(now.refreshes.len(), 1, "{name}: started once: {now:?}");
        assert_eq!(now.refreshes[0].1, "Cancelled", "{name}: {now:?}");
    }
    let mut halted = 0;
    for (name, said) in expected(&world, qa)
        .iter()
        .map(|n| (n, audit.outcomes(qa, n, &candidate).unwrap()))
    {
        if said[0].0 == "halted" {
            halted += 1;
            assert!(
                said[0].1.contains("was halted for")
                    && said[0].1.contains("kernel panic on boot")
                    && said[0].1.contains("`amictl resume --stage qa`"),
                "{name}: {said:?}"
            );
        }
    }
    assert!(halted > 0, "the requests still waiting end halted");
    // No refresh of qa started after the halt (within the documented delay of it).
    let grace = chrono::Duration::seconds(2 * CONTROL_SECONDS as i64 + 1);
    for g in world.groups(qa) {
        for r in observe(&world, qa, &g).await.refreshes {
            assert!(
                r.2.is_none_or(|start| start <= halted_at + grace),
                "{}: a refresh started after the halt: {r:?}",
                g["name"]
            );
        }
    }

    // uat's and prod's windows: the gate stays closed, saying who halted qa and why.
    for stage in &driver.stages[1..] {
        driver.open(stage).await.unwrap();
    }
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    assert_untouched(&world, uat, &before).await;
    assert_untouched(&world, prod, &before).await;
    let log = gate_log(&world);
    assert!(
        log.contains("qa halted by arn:aws:sts::111111111111:assumed-role/ops/e2e")
            && log.contains("kernel panic on boot"),
        "the gate says why:\n{log}"
    );
    assert_eq!(world.dead_letters().await, BTreeMap::new(), "nothing lost");
}

#[tokio::test]
async fn a_good_ami_reaches_uat_after_qa_baked_and_prod_after_approval() {
    const BAKE_HOURS: f64 = 0.02; // 72 s
    let bake = Duration::from_secs_f64(BAKE_HOURS * 3600.0);
    let dir = tempfile::tempdir().unwrap();
    let path = policy(&dir, |t| {
        // qa is the first stage (its first `alarms`), prod the last.
        let t = t.replacen(
            "alarms = []",
            &format!("alarms = []\nbake_hours = {BAKE_HOURS}"),
            1,
        );
        let at = t.rfind("alarms = []").unwrap();
        format!(
            "{}alarms = []\nrequires_approval = true{}",
            &t[..at],
            &t[at + "alarms = []".len()..]
        )
    });
    let world = start(&path).await;
    let accounts = world.accounts();
    let (uat, prod) = (&accounts[1], &accounts[2]);
    let (candidate, _) = amis(&world);
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    let driver = world.driver();
    support::publish(&world, &mut audit, Duration::from_secs(120)).await;

    let qa_opened = Instant::now();
    support::open_window(&world, &driver, &driver.stages[0], &mut audit).await;
    let qa_done = Instant::now();

    // uat's window before qa has baked: not promoted. qa's last launch came after its window
    // opened, so the bake ends no earlier than qa_opened + bake.
    driver.open(&driver.stages[1]).await.unwrap();
    world
        .settle(Duration::from_secs(2), Duration::from_secs(60))
        .await;
    assert!(
        qa_opened.elapsed() < bake,
        "inconclusive: qa's bake was over before uat's gate was seen closed"
    );
    support::assert_not_promoted(&world, std::slice::from_ref(uat)).await;
    assert!(
        gate_log(&world).contains("baking until"),
        "{}",
        gate_log(&world)
    );

    // Once the bake is over (at most `bake` after qa's last launch), uat's next window promotes it.
    tokio::time::sleep((qa_done + bake).saturating_duration_since(Instant::now())).await;
    support::open_window(&world, &driver, &driver.stages[1], &mut audit).await;
    let promoted: control::Promotion = control::read(
        &hub_records(&world),
        &control::promotion_path(&candidate, "uat"),
    )
    .await
    .unwrap()
    .expect("uat's promotion is recorded in the hub");
    assert!(
        promoted
            .reason
            .starts_with(&format!("qa passed {candidate}: "))
            && promoted.reason.contains("baked 0.02 h"),
        "{}",
        promoted.reason
    );

    // prod's window without an approval: not promoted.
    driver.open(&driver.stages[2]).await.unwrap();
    world
        .settle(Duration::from_secs(2), Duration::from_secs(60))
        .await;
    support::assert_not_promoted(&world, std::slice::from_ref(prod)).await;
    assert!(
        gate_log(&world).contains("waiting for approval"),
        "{}",
        gate_log(&world)
    );
    // Approved (what `amictl approve` writes), prod's next window promotes it and it completes.
    control::write(
        &hub_records(&world),
        &control::approval_path(&candidate, "prod"),
        &decision("change 4711"),
    )
    .await
    .unwrap();
    support::open_window(&world, &driver, &driver.stages[2], &mut audit).await;
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    support::collect(&world, &mut audit).await;
    support::assert_final_state(&world, &before, &audit).await;
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "no dead letters"
    );
}

#[tokio::test]
async fn pause_all_during_prods_window_stops_new_refreshes_and_resume_ends_as_if_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let world = start(&policy(&dir, |t| t)).await;
    let prod = world.accounts()[2].clone();
    let (candidate, _) = amis(&world);
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    let driver = world.driver();
    support::publish(&world, &mut audit, Duration::from_secs(120)).await;
    support::open_window(&world, &driver, &driver.stages[0], &mut audit).await;
    support::open_window(&world, &driver, &driver.stages[1], &mut audit).await;

    // prod's window; once its first refresh runs, every stage is paused.
    let stage = &driver.stages[2];
    driver.open(stage).await.unwrap();
    e2e::eventually("prod's first refresh", Duration::from_secs(120), || async {
        (refresh_count(&world, &prod).await > 0).then_some(())
    })
    .await;
    let records = hub_records(&world);
    control::write(
        &records,
        &control::pause_path(None),
        &decision("incident 42"),
    )
    .await
    .unwrap();
    // Within the documented delay (plus a step already past its check), no refresh starts.
    tokio::time::sleep(Duration::from_secs(2 * CONTROL_SECONDS + 2)).await;
    let paused_at = refresh_count(&world, &prod).await;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            refresh_count(&world, &prod).await,
            paused_at,
            "a refresh started while every stage was paused"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let missing = expected(&world, &prod)
        .into_iter()
        .filter(|g| audit.outcomes(&prod, g, &candidate).is_none())
        .count();
    assert!(missing > 0, "the pause came before prod was done");

    // Resumed (the record deleted): the deferred requests go on, and prod ends as an
    // uninterrupted rollout does, no group refreshed twice.
    records
        .remove_record(&control::pause_path(None))
        .await
        .unwrap();
    let done = driver
        .outcomes(
            stage,
            &candidate,
            &expected(&world, &prod),
            &mut audit,
            Duration::from_secs(300),
            |_| {},
        )
        .await;
    if let Err(e) = done {
        panic!("{e:#}\n{}", world.logs());
    }
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    support::collect(&world, &mut audit).await;
    support::assert_final_state(&world, &before, &audit).await;
    assert_eq!(world.dead_letters().await, BTreeMap::new(), "nothing lost");
}

#[tokio::test]
async fn a_replay_or_a_forged_promotion_never_moves_prod() {
    let dir = tempfile::tempdir().unwrap();
    let world = start(&policy(&dir, |t| t)).await;
    let accounts = world.accounts();
    let (hub, uat, prod) = (world.hub(), accounts[1].clone(), accounts[2].clone());
    let (candidate, _) = amis(&world);
    let mut taps = BTreeMap::new();
    for account in &accounts {
        taps.insert(account.clone(), world.tap(account).await);
    }
    let before = snapshot(&world).await;
    let mut audit = Audit::default();
    let driver = world.driver();
    support::publish(&world, &mut audit, Duration::from_secs(120)).await;
    support::open_window(&world, &driver, &driver.stages[0], &mut audit).await;

    // Every event so far again, and prod's window: uat was never promoted, so prod's gate is
    // closed (uat does not hold the candidate).
    for account in &accounts {
        for body in world.drain(account, &taps[account]).await {
            let detail_type = body["detail-type"].as_str().unwrap().to_owned();
            world.put_raw(account, &detail_type, &body["detail"]).await;
        }
    }
    driver.open(&driver.stages[2]).await.unwrap();
    // A forged promotion of prod: an AmiShared put by a stage account, and one put by the hub
    // with no promotion record behind it.
    let built = support::candidate_built(&world);
    let forged = events::AmiShared::new(&built, &hub, &prod, "prod");
    world.put(&prod, &Detail::from(forged.clone())).await;
    world.put(&hub, &Detail::from(forged)).await;
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;

    assert_untouched(&world, &prod, &before).await;
    assert_ne!(
        parameter(&world, &uat).await.0,
        candidate,
        "uat's window never opened"
    );
    let letters = world.take_dead_letters(&prod, "param").await;
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains(&format!(
            "was put on the bus by account {prod}, not the hub {hub}"
        ))),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains(&format!(
            "the hub has no promotion record /amiflow/gate/{candidate}/prod"
        ))),
        "{reasons:?}"
    );
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "replays are not poison"
    );
}
