//! AWS's own "an AMI is ready" events, through the real ingest-worker and the rest of the world:
//! an EC2 AMI State Change and an Image Builder Image State Change (which carries no AMI id; the
//! AMI is found by the `Ec2ImageBuilderArn` tag Image Builder puts on its output) each end with
//! the golden parameter of the first stage on the new AMI, and every later stage still on the AMI
//! it had (the promotion gates let nothing past a stage that has not passed). An AMI of no golden
//! family changes nothing.
//!
//! The events are delivered to the hub's ingest queue as EventBridge would deliver them from the
//! default-bus rules (the emulator does not let a client put `aws.*` events on a bus).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::Tag;
use e2e::world::World;
use serde_json::json;

async fn new_ami(world: &World, name: &str, tags: &[(&str, &str)]) -> String {
    support::register_tagged(world, &world.hub(), name, support::image_tags(tags)).await
}

/// EC2's "AMI State Change" to available for `ami`, as the default bus's rule delivers it.
fn ami_available(hub: &str, ami: &str, n: u32) -> serde_json::Value {
    json!({"version": "0", "id": format!("7f0b2b1e-1111-2222-3333-44445555{n:04}"),
           "detail-type": "EC2 AMI State Change", "source": "aws.ec2", "account": hub,
           "time": "2026-12-01T10:00:00Z", "region": "us-east-1",
           "resources": [format!("arn:aws:ec2:us-east-1::image/{ami}")],
           "detail": {"RequestId": format!("5e3a1c7d-aaaa-bbbb-cccc-ddddeeee{n:04}"), "ImageId": ami,
                      "State": "available", "ErrorMessage": ""}})
}

/// Image Builder's "Image State Change" to AVAILABLE for the image build `arn`.
fn image_available(hub: &str, arn: &str, n: u32) -> serde_json::Value {
    json!({"version": "0", "id": format!("a1b2c3d4-5678-90ab-cdef-00000000{n:04}"),
           "detail-type": "EC2 Image Builder Image State Change", "source": "aws.imagebuilder",
           "account": hub, "time": "2026-12-01T11:00:00Z", "region": "us-east-1",
           "resources": [arn],
           "detail": {"previous-state": {"status": "TESTING"}, "state": {"status": "AVAILABLE"}}})
}

async fn deliver(world: &World, event: serde_json::Value) {
    let hub = world.hub();
    let sqs = aws_sdk_sqs::Client::new(world.config(&hub));
    sqs.send_message()
        .queue_url(world.queue_url(&hub, "ingest"))
        .message_body(event.to_string())
        .send()
        .await
        .unwrap();
}

/// The first stage's golden parameter takes `ami`; the later stages' parameters still hold what
/// they held before (`before`, by account).
async fn first_stage_only(world: &World, ami: &str, before: &BTreeMap<String, String>) {
    let accounts = world.accounts();
    let first = &accounts[0];
    e2e::eventually(
        &format!("{first}'s golden parameter to hold {ami}"),
        Duration::from_secs(90),
        || async { (support::parameter(world, first).await.0 == ami).then_some(()) },
    )
    .await;
    for account in &accounts[1..] {
        assert_eq!(
            support::parameter(world, account).await.0,
            before[account],
            "{}: its parameter moved before its stage was promoted\n{}",
            world.stage(account),
            world.logs()
        );
    }
}

#[tokio::test]
async fn ami_state_change_and_image_builder_events_publish_the_new_golden_ami() {
    let world = World::start("small", &[]).await;
    let hub = world.hub();
    let mut before = BTreeMap::new();
    for account in world.accounts() {
        before.insert(
            account.clone(),
            support::parameter(&world, &account).await.0,
        );
    }

    // 1. EC2 AMI State Change: a golden AMI by name.
    let by_name = new_ami(&world, "golden-al2023-2026-12", &[]).await;
    deliver(&world, ami_available(&hub, &by_name, 1)).await;
    first_stage_only(&world, &by_name, &before).await;

    // 2. An AMI of no golden family: ignored, nothing moves, nothing dead-lettered.
    let other = new_ami(&world, "team-experiment-42", &[]).await;
    deliver(&world, ami_available(&hub, &other, 2)).await;

    // 3. Image Builder: the event names the image build; the AMI is found by its tag.
    let arn = format!("arn:aws:imagebuilder:us-east-1:{hub}:image/golden-al2023/2026.12.2/1");
    let built = new_ami(
        &world,
        "golden-al2023-2026-12-b",
        &[
            ("Ec2ImageBuilderArn", &arn),
            ("CreatedBy", "EC2 Image Builder"),
        ],
    )
    .await;
    deliver(&world, image_available(&hub, &arn, 1)).await;
    first_stage_only(&world, &built, &before).await;

    world
        .settle(Duration::from_secs(2), Duration::from_secs(60))
        .await;
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "{}",
        world.logs()
    );
    let accounts = world.accounts();
    assert_eq!(
        support::parameter(&world, &accounts[0]).await.0,
        built,
        "the experiment AMI never got in"
    );
    for account in &accounts[1..] {
        assert_eq!(
            support::parameter(&world, account).await.0,
            before[account],
            "{}: a later stage moved without its gate",
            world.stage(account)
        );
    }
}

/// A family that trusts only its Image Builder image (and AMIs approved by tag): an AMI made by
/// hand is dead-lettered with the reason and the way to trust it, nothing moves; tagged
/// approved, the same event publishes it; an AMI of the trusted build needs no approval.
#[tokio::test]
async fn a_family_that_trusts_only_its_builds_refuses_an_ami_made_by_hand_until_approved() {
    let world = World::provisioned("small", &[]).await;
    let hub = world.hub();
    let trusted = format!("arn:aws:imagebuilder:us-east-1:{hub}:image/golden-al2023/");
    let policy_text = std::fs::read_to_string(emulator::project_root().join("local/amiflow.toml"))
        .unwrap()
        .replacen(
            "name_prefix = \"golden-al2023-\"",
            &format!(
                "name_prefix = \"golden-al2023-\"\ntrusted_builds = [\"{trusted}\"]\napproval_tag = \"amiflow:approved\""
            ),
            1,
        );
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("amiflow.toml");
    std::fs::write(&policy, policy_text).unwrap();
    world
        .start_workers(&[("AMIFLOW_CONFIG", policy.to_str().unwrap())])
        .await;
    let mut before = BTreeMap::new();
    for account in world.accounts() {
        before.insert(
            account.clone(),
            support::parameter(&world, &account).await.0,
        );
    }

    // 1. Made by hand: refused, with the way to trust it.
    let by_hand = new_ami(&world, "golden-al2023-2026-12", &[]).await;
    let state_change = ami_available(&hub, &by_hand, 3);
    deliver(&world, state_change.clone()).await;
    let refused = e2e::eventually(
        "the hand-made AMI's event in the ingest DLQ",
        Duration::from_secs(60),
        || async {
            let taken = world.take_dead_letters(&hub, "ingest").await;
            (!taken.is_empty()).then_some(taken)
        },
    )
    .await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].kind, "permanent");
    assert_eq!(
        refused[0].reason,
        format!(
            "AMI {by_hand} (golden-al2023-2026-12) of /golden/al2023/ami-id was not made by Image Builder and is not approved: build it with a trusted build ({trusted}) or tag it amiflow:approved=true to approve it, then replay this message (amictl dlq replay); refused"
        )
    );
    for account in world.accounts() {
        assert_eq!(
            support::parameter(&world, &account).await.0,
            before[&account],
            "{}: nothing moves for an untrusted AMI",
            world.stage(&account)
        );
    }

    // 2. Approved by tag: the same event goes through.
    aws_sdk_ec2::Client::new(world.config(&hub))
        .create_tags()
        .resources(&by_hand)
        .tags(Tag::builder().key("amiflow:approved").value("true").build())
        .send()
        .await
        .unwrap();
    deliver(&world, state_change).await;
    first_stage_only(&world, &by_hand, &before).await;

    // 3. Made by the trusted build: no approval needed.
    let arn = format!("{trusted}2026.12.2/1");
    let built = new_ami(
        &world,
        "golden-al2023-2026-12-b",
        &[("Ec2ImageBuilderArn", &arn)],
    )
    .await;
    deliver(&world, image_available(&hub, &arn, 2)).await;
    first_stage_only(&world, &built, &before).await;
    world
        .settle(Duration::from_secs(2), Duration::from_secs(60))
        .await;
    assert_eq!(
        world.dead_letters().await,
        BTreeMap::new(),
        "{}",
        world.logs()
    );
}
