//! The whole rollout over qa, uat and prod in the local world (issue 5): the real worker binaries,
//! one process per worker and account, over real SQS and EventBridge in the emulator.
//!
//! One `AmiBuilt` for the candidate AMI goes onto the hub bus; the windows are then opened stage by
//! stage, as EventBridge Scheduler would. The test compares what AWS holds afterwards with what
//! local/world.py says each group should end as, then re-injects every event of the rollout plus an
//! older `AmiBuilt` and checks that nothing changes. (tests/chaos.rs runs the same rollout under
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

    // Every event of the rollout again, plus an older AMI built late: nothing may change.
    let mut replayed = 0;
    for account in &accounts {
        for body in world.drain(account, &taps[account]).await {
            let detail_type = body["detail-type"].as_str().unwrap().to_owned();
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
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "replays are not poison"
    );
}
