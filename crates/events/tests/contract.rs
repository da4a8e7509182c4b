//! The contract's promises: checked-in schemas equal the generated ones, every fixture parses (or
//! is rejected with the reason its file name states), and what our constructors build is valid.

use std::path::{Path, PathBuf};

use chrono::{TimeZone, Utc};
use events::{
    AmiBuilt, AmiShared, AsgRefreshFinished, AsgRefreshRequested, AwsEvent, Detail, Inbound,
    Outcome, ParamUpdated, RefreshEventKind, RolloutWindowOpened, Strategy, parse_message,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn fixtures(kind: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(root().join("fixtures").join(kind))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no {kind} fixtures found");
    out
}

#[test]
fn checked_in_schemas_match_the_types() {
    let dir = root().join("../../schemas");
    for (detail_type, schema) in events::schema::all() {
        let path = dir.join(events::schema::file_name(detail_type));
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == events::schema::render(&schema),
            "{} drifted from the Rust types; run `cargo run -p events --example gen-schemas` and commit",
            path.display()
        );
    }
}

#[test]
fn valid_fixtures_parse_and_match_the_checked_in_schemas() {
    for (name, body) in fixtures("valid") {
        let inbound = parse_message(&body).unwrap_or_else(|r| panic!("{name} rejected: {r}"));
        if let Inbound::Amiflow(event) = inbound {
            let schema_path = root()
                .join("../../schemas")
                .join(events::schema::file_name(&event.detail_type));
            let schema: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
            let raw: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                jsonschema::is_valid(&schema, &raw["detail"]),
                "{name} fails its checked-in schema"
            );
            // Round trip: what we serialize parses back to the same detail.
            let again = Detail::from_value(&event.detail_type, event.detail.to_value())
                .unwrap()
                .unwrap();
            assert_eq!(again, event.detail, "{name} does not round-trip");
        }
    }
}

#[test]
fn invalid_fixtures_are_rejected_with_the_named_reason() {
    for (name, body) in fixtures("invalid") {
        let expected = name.split("--").next().unwrap();
        match parse_message(&body) {
            Ok(parsed) => panic!("{name} was accepted as {}", parsed.label()),
            Err(rejection) => {
                assert_eq!(rejection.kind.as_str(), expected, "{name}: {rejection}");
                assert!(!rejection.message.is_empty());
            }
        }
    }
}

#[test]
fn a_schema_violation_names_the_json_path() {
    let body =
        std::fs::read_to_string(root().join("fixtures/invalid/invalid-detail--bad-account.json"))
            .unwrap();
    let rejection = parse_message(&body).unwrap_err();
    assert!(rejection.message.contains("/target_account"), "{rejection}");
}

#[test]
fn oversized_bodies_are_rejected_before_parsing() {
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(events::MAX_EVENT_BYTES));
    assert_eq!(parse_message(&body).unwrap_err().kind.as_str(), "too-large");
}

#[test]
fn aws_samples_parse_into_typed_events() {
    let refresh = std::fs::read_to_string(
        root().join("fixtures/valid/aws-autoscaling-instance-refresh-started.json"),
    )
    .unwrap();
    match parse_message(&refresh).unwrap() {
        Inbound::Aws(AwsEvent::InstanceRefresh(e)) => {
            assert_eq!(e.kind, RefreshEventKind::Started);
            assert_eq!(e.asg_name, "my-asg");
            assert!(!e.kind.is_terminal());
        }
        other => panic!("unexpected {other:?}"),
    }
    let ami = std::fs::read_to_string(root().join("fixtures/valid/aws-ec2-ami-state-change.json"))
        .unwrap();
    assert!(
        matches!(parse_message(&ami).unwrap(), Inbound::Aws(AwsEvent::AmiStateChange(a)) if a.image_id == "ami-0abcdef1234567890" && a.state == "available")
    );
    let ib = std::fs::read_to_string(
        root().join("fixtures/valid/aws-imagebuilder-image-state-change.json"),
    )
    .unwrap();
    assert!(
        matches!(parse_message(&ib).unwrap(), Inbound::Aws(AwsEvent::ImageBuilderStateChange(i)) if i.status == "AVAILABLE" && i.image_arn.contains(":image/"))
    );
}

#[test]
fn constructors_build_valid_consistent_chains() {
    let created = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let built = AmiBuilt::new(
        "ami-0a1b2c3d4e5f60718",
        "us-east-1",
        "golden-al2023-2026-11",
        created,
        "/golden/al2023/ami-id",
    );
    let shared = AmiShared::new(&built, "111111111111", "222222222222", "uat");
    let param = ParamUpdated::new(
        &shared.meta.key,
        "222222222222",
        "/golden/al2023/ami-id",
        &built.ami_id,
        None,
        4,
    );
    let request = AsgRefreshRequested::new(
        &param.meta.key,
        "222222222222",
        "uat-web",
        "/golden/al2023/ami-id",
        &built.ami_id,
        Strategy::LaunchTemplate,
        None,
    );
    let finished = AsgRefreshFinished::new(&request, Outcome::Succeeded, "");
    let window = RolloutWindowOpened::new("333333333333", "prod", created, created);
    assert_eq!(shared.meta.caused_by, built.meta.key);
    assert_eq!(finished.meta.caused_by, request.meta.key);
    assert_eq!(finished.meta.rollout_id, built.meta.rollout_id);
    let details: Vec<Detail> = vec![
        built.into(),
        shared.into(),
        param.into(),
        request.into(),
        finished.into(),
        window.into(),
    ];
    for detail in details {
        let violations =
            events::schema::validate(detail.detail_type(), &detail.to_value()).unwrap();
        assert!(
            violations.is_empty(),
            "{}: {violations:?}",
            detail.detail_type()
        );
        assert_eq!(detail.identity_problem(), None, "{}", detail.detail_type());
    }
}
