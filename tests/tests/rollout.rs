//! The whole rollout over qa, uat and prod in the local world: the real worker binaries,
//! one process per worker and account, over real SQS and EventBridge in the emulator.
//!
//! One `AmiBuilt` for the candidate AMI goes onto the hub bus; the windows are then opened stage by
//! stage, as EventBridge Scheduler would. The test compares what AWS holds afterwards with what
//! local/world.py says each group should end as, then re-injects every event of the rollout plus an
//! older `AmiBuilt` and checks that nothing changes (the older AMI is refused by the share-worker). (tests/chaos.rs runs the same rollout under
//! duplicates, crashes, faults and hostile input.)

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use e2e::world::World;
use events::Detail;
use support::{Audit, amis, built, observe, parameter, snapshot};

#[tokio::test]
async fn a_rollout_moves_every_eligible_group_once_and_a_replay_changes_nothing() {
    let world = World::start("small", &[]).await;
    let hub = world.hub();
    let accounts = world.accounts();
    let (_, older) = amis(&world);
    let mut taps = BTreeMap::new();
    for account in &accounts {
        taps.insert(account.clone(), world.tap(account).await);
    }
    let before = snapshot(&world).await;

    // The AMI is built, shared and published; the windows open stage by stage.
    let mut audit = Audit::default();
    let after = support::rollout(&world, &before, &mut audit).await;
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "no dead letters"
    );

    // Every line a worker wrote while handling a message names the message's rollout, key,
    // account and worker (its span); only lines about the process itself or a whole batch do not.
    const PROCESS_LINES: [&str; 8] = [
        "worker started",
        "receive failed",
        "stopping: no new receives",
        "worker stopped",
        "poison message",
        "delete failed; the message will be delivered again",
        "DeleteMessageBatch failed; the messages will be delivered again",
        "joint tag write failed; writing each alone",
    ];
    let lines = world.log_lines();
    let mut in_span = 0;
    for (log, line) in &lines {
        let message = line["message"].as_str().unwrap_or_default();
        if PROCESS_LINES.contains(&message) {
            continue;
        }
        let span = &line["span"];
        for field in ["worker", "rollout_id", "key", "account", "detail_type"] {
            assert!(
                span[field].is_string(),
                "{log}: a line without the message's {field}: {line}"
            );
        }
        in_span += 1;
    }
    assert!(
        in_span > 50,
        "the workers logged their steps ({in_span} lines)"
    );
    // Structured values, not strings holding lists: a step's line counts what it emitted, and
    // each emitted event has a line of its own with its type and key.
    for (log, line) in lines
        .iter()
        .filter(|(_, l)| l["message"] == "step finished")
    {
        assert!(line["emitted"].is_u64(), "{log}: {line}");
    }
    let emitted: Vec<_> = lines
        .iter()
        .filter(|(_, l)| l["message"] == "emitted")
        .collect();
    assert!(
        emitted.len() > 20
            && emitted
                .iter()
                .all(|(_, l)| l["emitted_type"].is_string() && l["emitted_key"].is_string()),
        "{emitted:?}"
    );

    // Every event of the rollout again, plus an older AMI built late: nothing may change.
    let mut replayed = 0;
    // An AmiShared put by a stage account (as a replay there puts it) is a forged promotion: its
    // param-worker refuses it permanently, naming the account (only the hub promotes).
    let mut forged = BTreeMap::new();
    for account in &accounts {
        for body in world.drain(account, &taps[account]).await {
            let detail_type = body["detail-type"].as_str().unwrap().to_owned();
            if detail_type == "AmiShared" && *account != hub {
                *forged.entry(format!("{account}/param")).or_insert(0) += 1;
            }
            world.put_raw(account, &detail_type, &body["detail"]).await;
            replayed += 1;
        }
    }
    assert!(replayed > 20, "the tap saw the rollout ({replayed} events)");
    let late = built(
        &older,
        "golden-al2023-2026-09",
        Utc.with_ymd_and_hms(2026, 9, 1, 0, 0, 0).unwrap(),
    );
    world.put(&hub, &Detail::from(late)).await;
    // The replayed events flow through every worker; wait until their echoes are done too.
    world
        .settle(Duration::from_secs(5), Duration::from_secs(120))
        .await;
    for account in &accounts {
        assert_eq!(
            parameter(&world, account).await,
            after.params[account],
            "{account}: the parameter neither regressed nor got a new version"
        );
        for g in world.groups(account) {
            let name = g["name"].as_str().unwrap().to_owned();
            let now = observe(&world, account, &g).await;
            assert_eq!(
                now,
                after.groups[&(account.clone(), name.clone())],
                "{account}/{name}: unchanged by the replay"
            );
        }
    }
    // Replays are not poison; the older AMI built late is refused by the share-worker (it would
    // never be promoted), and the AmiShared replayed by a stage account are refused as forged:
    // those are the only dead letters.
    assert!(
        !forged.is_empty(),
        "the stage accounts' taps saw their AmiShared"
    );
    for (queue, n) in &forged {
        let account = queue.split('/').next().unwrap();
        let letters = world.take_dead_letters(account, "param").await;
        assert_eq!(letters.len(), *n, "{queue}: {letters:?}");
        for l in &letters {
            assert!(
                l.reason.contains(&format!(
                    "was put on the bus by account {account}, not the hub {hub}"
                )),
                "{queue}: {}",
                l.reason
            );
        }
    }
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::from([(format!("{hub}/share"), 1)]),
        "replays are not poison"
    );
}
