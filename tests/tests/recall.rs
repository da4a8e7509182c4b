//! Recalling a bad golden AMI end to end: the real worker binaries in the local world. A recalled
//! AMI goes back everywhere it reached (each stage's golden parameter to the previous golden AMI,
//! one new version; every group it moved, moved back through the plan and refresh workers),
//! nothing brings it back (the gate, a replay of its events, a re-injected `AmiBuilt`), and a
//! newer good AMI rolls out as any other.
//!
//! The recall is written here with `rollout::control` and put on the hub's bus as `AmiRecalled`,
//! exactly what `amictl recall` writes and sends (amictl's own checks are tested with amictl).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use e2e::world::World;
use events::{AmiRecalled, Detail};
use rollout::aws::SsmRecords;
use rollout::control::{self, Decision, Recall};
use support::{Audit, PARAMETER, amis, observe, snapshot};

/// A recall reaches every worker within `AMIFLOW_CONTROL_SECONDS` (1 s here).
async fn start() -> World {
    World::start("small", &[("AMIFLOW_CONTROL_SECONDS", "1")]).await
}

fn hub_records(world: &World) -> SsmRecords {
    SsmRecords(aws_sdk_ssm::Client::new(world.config(&world.hub())))
}

const OPERATOR: &str = "arn:aws:sts::111111111111:assumed-role/ops/e2e";

/// Recall `ami` as `amictl recall` does: the record in the hub, then `AmiRecalled` on its bus.
async fn recall(world: &World, ami: &str, now: bool) {
    let record = Recall {
        decision: Decision {
            by: OPERATOR.into(),
            at: Utc::now(),
            reason: "kernel regression".into(),
        },
        ami: ami.into(),
        parameter: PARAMETER.into(),
        to: None,
        now,
    };
    control::write(&hub_records(world), &control::recall_path(ami), &record)
        .await
        .unwrap();
    let mut event = AmiRecalled::new(ami, PARAMETER, "kernel regression", OPERATOR);
    event.now = now;
    world.put(&world.hub(), &Detail::from(event)).await;
}

/// Every worker's log lines that name `what`, with the worker's log, for a failure message.
fn lines_naming(world: &World, what: &str) -> String {
    world
        .log_lines()
        .into_iter()
        .filter(|(_, line)| line.to_string().contains(what))
        .map(|(log, line)| format!("{log}: {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The groups of `account` world.py expects the candidate to move.
fn refreshed(world: &World, account: &str) -> BTreeSet<String> {
    world
        .groups(account)
        .iter()
        .filter(|g| g["expected"] == "refresh")
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect()
}

fn log_of(world: &World, worker: &str, account: &str) -> String {
    let stage = world.stage(account);
    std::fs::read_to_string(world.dir.path().join(format!("{worker}-{stage}.log")))
        .unwrap_or_default()
}

/// Each group's configured AMI as the workers judge it (launch template version, overrides,
/// `resolve:ssm:` and `$Latest`/`$Default` resolved), by name.
async fn configured(world: &World, account: &str) -> BTreeMap<String, Option<String>> {
    let config = world.config(account);
    let policy =
        rollout::policy::Policy::load(&emulator::project_root().join("local/amiflow.toml"))
            .unwrap();
    let stage = policy.stage_for_account(account).unwrap().clone();
    let groups = rollout::aws::AwsGroups::new(config);
    let params = rollout::aws::SsmParameters(aws_sdk_ssm::Client::new(config));
    rollout::plan::judge_all(&groups, &params, &policy, &stage)
        .await
        .unwrap()
        .into_iter()
        .map(|j| (j.group.group.name.clone(), j.group.ami.clone()))
        .collect()
}

#[tokio::test]
async fn a_recall_moves_qa_and_uat_back_and_nothing_rolls_the_ami_out_again() {
    let world = start().await;
    let accounts = world.accounts();
    let (hub, qa, uat, prod) = (
        world.hub(),
        accounts[0].clone(),
        accounts[1].clone(),
        accounts[2].clone(),
    );
    let (candidate, _) = amis(&world);
    let mut taps = BTreeMap::new();
    for account in &accounts {
        taps.insert(account.clone(), world.tap(account).await);
    }
    let before = snapshot(&world).await;
    let previous = before.params[&qa].0.clone();
    assert_eq!(before.params[&uat].0, previous);

    // The candidate through qa and uat.
    let mut audit = Audit::default();
    let driver = world.driver();
    support::publish(&world, &mut audit, Duration::from_secs(120)).await;
    support::open_window(&world, &driver, &driver.stages[0], &mut audit).await;
    support::open_window(&world, &driver, &driver.stages[1], &mut audit).await;
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let rolled = snapshot(&world).await;
    for account in [&qa, &uat] {
        assert_eq!(rolled.params[account].0, candidate, "{account}");
    }

    // Recalled, at once: qa and uat go back to the previous golden AMI, every group it moved
    // moves back.
    recall(&world, &candidate, true).await;
    for stage in &driver.stages[..2] {
        let moved_back = driver
            .outcomes(
                stage,
                &previous,
                &refreshed(&world, &stage.account),
                &mut audit,
                Duration::from_secs(300),
                |_| {},
            )
            .await;
        if let Err(e) = moved_back {
            panic!(
                "{e:#}\nDLQs: {:?}\n{}",
                world.dead_letters().await,
                world.logs()
            );
        }
    }
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let back = snapshot(&world).await;
    for account in [&qa, &uat] {
        let stage = world.stage(account);
        assert_eq!(
            back.params[account],
            (previous.clone(), rolled.params[account].1 + 1),
            "{stage}: the previous golden AMI again, exactly one new parameter version"
        );
        let configured = configured(&world, account).await;
        for name in refreshed(&world, account) {
            let label = format!("{stage}/{name}");
            let (was, now) = (
                &rolled.groups[&(account.clone(), name.clone())],
                &back.groups[&(account.clone(), name.clone())],
            );
            assert_eq!(
                now.instance_amis,
                BTreeSet::from([previous.clone()]),
                "{label}: every instance runs the previous AMI"
            );
            assert_eq!(
                configured[&name].as_deref(),
                Some(previous.as_str()),
                "{label}: its configuration launches the previous AMI"
            );
            assert_eq!(
                now.refreshes.len(),
                was.refreshes.len() + 1,
                "{label}: moved back with exactly one refresh: {now:?}"
            );
            assert!(
                now.refreshes.iter().all(|r| r.1 == "Successful"),
                "{label}: {now:?}"
            );
            let said = audit.outcomes(account, &name, &previous).unwrap();
            assert!(
                said.iter().all(|(o, _)| o == "succeeded"),
                "{label}: {said:?}"
            );
        }
    }
    // prod was never promoted: nothing there changed.
    assert_eq!(back.params[&prod], before.params[&prod], "prod's parameter");
    for ((account, name), was) in &before.groups {
        if *account == prod {
            assert_eq!(
                back.groups[&(account.clone(), name.clone())],
                *was,
                "prod/{name}"
            );
        }
    }

    // The rollout never resumes: every stage's window opens again. qa and uat stay as they are;
    // prod's gate never offers the recalled AMI (its window may still move a group that was
    // behind before the rollout to its own golden AMI, as any window does).
    for stage in &driver.stages {
        driver.open(stage).await.unwrap();
    }
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let windows = snapshot(&world).await;
    assert_eq!(windows.params, back.params, "no parameter changed");
    for ((account, name), was) in &back.groups {
        let now = &windows.groups[&(account.clone(), name.clone())];
        if *account == prod {
            assert!(
                !now.instance_amis.contains(&candidate)
                    && !now.versions.iter().any(|(_, image)| *image == candidate),
                "prod/{name} never saw the recalled AMI: {now:?}"
            );
        } else {
            assert_eq!(now, was, "{}/{name}: nothing moved", world.stage(account));
        }
    }
    let back = windows;

    // Every event of the recalled rollout is delivered again (each from the account that put it:
    // a spoke's copy of the hub's AmiShared or AmiRecalled would be a forgery, not a replay) and
    // its AmiBuilt is injected again. Nothing changes anywhere.
    let rollout_id = events::keys::rollout_id(PARAMETER, &candidate);
    let mut replayed = BTreeMap::<String, usize>::new();
    for account in &accounts {
        for body in world.drain(account, &taps[account]).await {
            let detail_type = body["detail-type"].as_str().unwrap().to_owned();
            let from_hub = matches!(
                detail_type.as_str(),
                "AmiBuilt" | "AmiShared" | "AmiRecalled"
            );
            if body["detail"]["rollout_id"] != rollout_id.as_str() || (from_hub && *account != hub)
            {
                continue;
            }
            world.put_raw(account, &detail_type, &body["detail"]).await;
            *replayed.entry(detail_type).or_default() += 1;
        }
    }
    for kind in [
        "AmiBuilt",
        "AmiShared",
        "ParamUpdated",
        "AsgRefreshRequested",
        "AmiRecalled",
    ] {
        assert!(replayed.contains_key(kind), "{kind} replayed: {replayed:?}");
    }
    world
        .put(&hub, &Detail::from(support::candidate_built(&world)))
        .await;
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let after = snapshot(&world).await;
    assert_eq!(after.params, back.params, "no parameter changed");
    for (key, was) in &back.groups {
        assert_eq!(
            after.groups[key], *was,
            "{key:?}: no new version, no new refresh"
        );
    }
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "a recalled AMI is refused, not dead-lettered"
    );
    assert!(
        log_of(&world, "share-worker", &hub).contains("refused: AmiBuilt of a recalled AMI"),
        "{}",
        log_of(&world, "share-worker", &hub)
    );
    assert!(
        log_of(&world, "param-worker", &uat).contains("refused: AmiShared of a recalled AMI"),
        "{}",
        log_of(&world, "param-worker", &uat)
    );
    support::collect(&world, &mut audit).await;
    let refused: Vec<_> = audit
        .finished
        .iter()
        .filter(|((_, _, ami), said)| {
            *ami == candidate && said.iter().any(|(o, _)| o == "recalled")
        })
        .collect();
    assert!(
        !refused.is_empty(),
        "replayed requests for the recalled AMI end `recalled`"
    );
}

/// A golden AMI baked in the hub as world.py bakes them: from an instance, with its family and
/// creation date tagged.
async fn bake(world: &World, name: &str, created: &str) -> String {
    let ec2 = aws_sdk_ec2::Client::new(world.config(&world.hub()));
    let (_, current) = amis(world);
    let instance = ec2
        .run_instances()
        .image_id(current)
        .min_count(1)
        .max_count(1)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned();
    let image = ec2
        .create_image()
        .instance_id(&instance)
        .name(name)
        .tag_specifications(support::golden_tags(name, "al2023", created))
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    ec2.terminate_instances()
        .instance_ids(instance)
        .send()
        .await
        .unwrap();
    image
}

#[tokio::test]
async fn a_recall_before_any_stage_only_blocks_and_a_newer_ami_then_rolls_out() {
    let world = start().await;
    let accounts = world.accounts();
    let (hub, qa, uat) = (world.hub(), accounts[0].clone(), accounts[1].clone());
    let (candidate, _) = amis(&world);
    let before = snapshot(&world).await;

    // Recalled before it was built into any stage: recorded, nothing moves; its AmiBuilt then
    // is refused by the share-worker (no promotion, no AmiShared, no dead letter).
    recall(&world, &candidate, false).await;
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    world
        .put(&hub, &Detail::from(support::candidate_built(&world)))
        .await;
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let now = snapshot(&world).await;
    assert_eq!(now.params, before.params, "no parameter changed");
    for (key, was) in &before.groups {
        assert_eq!(now.groups[key], *was, "{key:?}");
    }
    assert_eq!(
        control::read::<control::Promotion>(
            &hub_records(&world),
            &control::promotion_path(&candidate, "qa")
        )
        .await
        .unwrap(),
        None,
        "the first stage is not promoted to a recalled AMI"
    );
    assert!(
        log_of(&world, "share-worker", &hub).contains("refused: AmiBuilt of a recalled AMI"),
        "{}",
        world.logs()
    );
    assert_eq!(world.dead_letters().await, BTreeMap::new());

    // A recall put on the bus by a stage account is a forgery: dead-lettered with the reason.
    world
        .put(
            &uat,
            &Detail::from(AmiRecalled::new(
                &before.params[&uat].0,
                PARAMETER,
                "forged",
                OPERATOR,
            )),
        )
        .await;
    world
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let letters = world.take_dead_letters(&uat, "param").await;
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains(&format!(
            "was put on the bus by account {uat}, not the hub {hub}: only the hub recalls an AMI"
        )),
        "{reasons:?}"
    );
    assert_eq!(support::parameter(&world, &uat).await, before.params[&uat]);

    // A newer good AMI rolls out in qa as any other.
    let created = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let newer = bake(&world, "golden-al2023-2026-12", "2026-12-01T00:00:00.000Z").await;
    let mut audit = Audit::default();
    let driver = world.driver();
    let published = driver
        .publish(
            support::built(&newer, "golden-al2023-2026-12", created),
            &mut audit,
            Duration::from_secs(120),
            |_| {},
        )
        .await;
    if let Err(e) = published {
        panic!("{e:#}\n{}", world.logs());
    }
    let opened = world
        .open_window(
            &driver,
            &driver.stages[0],
            &newer,
            &mut audit,
            Duration::from_secs(300),
        )
        .await;
    if let Err(e) = opened {
        panic!("{e:#}\n{}", world.logs());
    }
    assert_eq!(
        support::parameter(&world, &qa).await,
        (newer.clone(), before.params[&qa].1 + 1)
    );
    for name in refreshed(&world, &qa) {
        let g = world
            .groups(&qa)
            .into_iter()
            .find(|g| g["name"] == name.as_str())
            .unwrap();
        assert_eq!(
            observe(&world, &qa, &g).await.instance_amis,
            BTreeSet::from([newer.clone()]),
            "qa/{name}"
        );
        let said = audit.outcomes(&qa, &name, &newer).unwrap();
        assert!(
            said.iter().all(|(o, _)| o == "succeeded"),
            "qa/{name}: {said:?}"
        );
    }
}

/// A recall while qa's refreshes run: the running one is cancelled, the waiting ones end
/// `recalled` having changed nothing, and every group ends on the previous AMI, none refreshed twice.
#[tokio::test]
async fn a_recall_during_qas_window_ends_with_every_group_on_the_previous_ami() {
    let world = start().await;
    let accounts = world.accounts();
    let qa = accounts[0].clone();
    let (candidate, _) = amis(&world);
    let before = snapshot(&world).await;
    let previous = before.params[&qa].0.clone();
    // One pinned group's refresh stays in progress (the emulator holds it) until it is cancelled:
    // the recall finds it running, whatever the timing.
    let held = world
        .groups(&qa)
        .into_iter()
        .find(|g| {
            g["expected"] == "refresh"
                && g["strategy"] == "launch-template"
                && g["kind"] == "pinned"
        })
        .expect("a pinned qa group the candidate moves");
    let held_name = held["name"].as_str().unwrap().to_owned();
    support::emulate_refreshes(&world, &qa, std::slice::from_ref(&held_name), "hold").await;
    let mut audit = Audit::default();
    let driver = world.driver();
    support::publish(&world, &mut audit, Duration::from_secs(120)).await;

    // qa's window; once the held refresh runs (more groups wait for one of its 3 slots), the
    // candidate is recalled.
    driver.open(&driver.stages[0]).await.unwrap();
    e2e::eventually(
        "the held refresh to run",
        Duration::from_secs(120),
        || async {
            let seen = observe(&world, &qa, &held).await;
            seen.refreshes
                .iter()
                .any(|r| r.1 == "InProgress")
                .then_some(())
        },
    )
    .await;
    recall(&world, &candidate, true).await;
    // Where `amictl recall` returns: the record is in the hub and the event on its bus.
    let recalled_at = Utc::now();
    let moving = refreshed(&world, &qa);
    let ended = driver
        .outcomes(
            &driver.stages[0],
            &candidate,
            &moving,
            &mut audit,
            Duration::from_secs(300),
            |_| {},
        )
        .await;
    if let Err(e) = ended {
        panic!("{e:#}\n{}", world.logs());
    }
    world
        .settle(Duration::from_secs(3), Duration::from_secs(180))
        .await;
    support::collect(&world, &mut audit).await;

    let now = snapshot(&world).await;
    assert_eq!(
        now.params[&qa],
        (previous.clone(), before.params[&qa].1 + 2),
        "qa: the candidate, then the previous AMI again: one version for the recall"
    );
    let configured = configured(&world, &qa).await;
    let mut never_started = 0;
    for name in &moving {
        let label = format!("qa/{name}");
        let (was, group) = (
            &before.groups[&(qa.clone(), name.clone())],
            &now.groups[&(qa.clone(), name.clone())],
        );
        assert_eq!(
            group.instance_amis,
            BTreeSet::from([previous.clone()]),
            "{label}: every instance on the previous AMI"
        );
        assert_eq!(
            configured[name].as_deref(),
            Some(previous.as_str()),
            "{label}: configured for the previous AMI"
        );
        // At most one refresh to the candidate and one back: none refreshed twice.
        assert!(group.refreshes.len() <= 2, "{label}: {group:?}");
        let said = audit.outcomes(&qa, name, &candidate).unwrap();
        if said.iter().all(|(o, _)| o == "recalled") {
            never_started += 1;
            // Nothing was made for the candidate: no template version holds it.
            assert!(
                !group
                    .versions
                    .iter()
                    .chain(group.override_versions.values().flatten())
                    .any(|(_, ami)| *ami == candidate),
                "{label}: a request that never started made no version for the candidate: {group:?}\n{}",
                lines_naming(&world, name)
            );
            if was.instance_amis == BTreeSet::from([previous.clone()]) {
                assert_eq!(
                    group,
                    was,
                    "{label}: on the previous AMI already, a request that never started changed nothing; its log lines:\n{}",
                    lines_naming(&world, name)
                );
            } else {
                // Behind the previous golden AMI too (world.py makes such groups): the plan of
                // the parameter's move back moved it there, with one refresh.
                assert_eq!(
                    group.refreshes.len(),
                    1,
                    "{label}: one refresh, to the previous AMI: {group:?}"
                );
            }
        }
    }
    assert!(
        never_started > 0,
        "the recall came while requests waited: {:?}",
        audit.finished
    );
    // No refresh to the candidate starts once the recall is recorded, but one already past its
    // request's fresh read of the recall (`refresh::RecallCheck`): every group's refresh to it
    // (its first refresh since the snapshot) started before the recall, or within 3 s of it, one
    // start's calls through a loaded emulator; the documented pause delay is 10 s
    // (`AMIFLOW_CONTROL_SECONDS`).
    for name in &moving {
        // Only an outcome of a refresh that ran says one started (`recalled` and `skipped`
        // requests started none).
        let said = audit.outcomes(&qa, name, &candidate).unwrap();
        if !said
            .iter()
            .any(|(o, _)| ["succeeded", "cancelled", "failed", "rolled-back"].contains(&o.as_str()))
        {
            continue;
        }
        let (was, group) = (
            &before.groups[&(qa.clone(), name.clone())],
            &now.groups[&(qa.clone(), name.clone())],
        );
        let first = group
            .refreshes
            .iter()
            .filter(|r| !was.refreshes.iter().any(|w| w.0 == r.0))
            .filter_map(|r| r.2)
            .min()
            .unwrap_or_else(|| panic!("qa/{name}: {said:?} but no refresh seen: {group:?}"));
        assert!(
            first <= recalled_at + chrono::Duration::seconds(3),
            "qa/{name}: a refresh to the recalled AMI started at {first}, {} ms after the recall",
            (first - recalled_at).num_milliseconds()
        );
    }
    // The refresh running when the recall came was cancelled, and reported so.
    let said = audit.outcomes(&qa, &held_name, &candidate).unwrap();
    assert_eq!(said[0].0, "cancelled", "{held_name}: {said:?}");
    let seen = &now.groups[&(qa.clone(), held_name.clone())];
    assert!(
        seen.refreshes.iter().any(|r| r.1 == "Cancelled"),
        "{held_name}: {seen:?}"
    );
    // The stages after qa never changed.
    for account in &accounts[1..] {
        assert_eq!(now.params[account], before.params[account]);
        for g in world.groups(account) {
            let name = g["name"].as_str().unwrap().to_owned();
            assert_eq!(
                now.groups[&(account.clone(), name.clone())],
                before.groups[&(account.clone(), name)],
            );
        }
    }
    assert_eq!(world.dead_letters().await, BTreeMap::new());
}
