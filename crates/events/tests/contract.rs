//! The contract's promises: checked-in schemas equal the generated ones, every fixture parses (or
//! is rejected with the reason its file name states), and what our constructors build is valid.

use std::path::{Path, PathBuf};

use chrono::{TimeZone, Utc};
use events::{
    AmiBuilt, AmiRecalled, AmiShared, AsgRefreshFinished, AsgRefreshRequested, AwsEvent, Detail,
    Inbound, Outcome, ParamUpdated, RefreshEventKind, RolloutWindowOpened, Strategy, parse_message,
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
fn an_unknown_field_is_refused_by_name() {
    let body = std::fs::read_to_string(
        root().join("fixtures/invalid/invalid-detail--unknown-field-target.json"),
    )
    .unwrap();
    let rejection = parse_message(&body).unwrap_err();
    assert_eq!(
        rejection.message,
        "AmiBuilt detail fails its schema: /target: unknown field \"target\": AmiBuilt has no such field; did you mean \"targets\"?"
    );
    // Both wire shapes of a window are closed.
    let body = std::fs::read_to_string(
        root().join("fixtures/invalid/invalid-detail--window-unknown-field.json"),
    )
    .unwrap();
    let rejection = parse_message(&body).unwrap_err();
    assert!(
        rejection
            .message
            .contains("/window_hour: unknown field \"window_hour\""),
        "{rejection}"
    );
    let closes_at = serde_json::json!({
        "version": "0", "id": "x", "detail-type": "RolloutWindowOpened", "source": "amiflow",
        "account": "222222222222", "time": "2026-11-14T02:00:00Z", "region": "us-east-1",
        "resources": [], "detail": {
            "schema_version": 1, "rollout_id": "", "caused_by": "",
            "key": "window:222222222222:uat:2026-11-14", "emitted_at": "2026-11-14T02:00:00Z",
            "account": "222222222222", "stage": "uat", "closes_at": "2026-11-14T06:00:00Z",
            "close_at": "2026-11-14T08:00:00Z",
        },
    });
    let rejection = parse_message(&closes_at.to_string()).unwrap_err();
    assert!(
        rejection.message.contains("/close_at: unknown field"),
        "{rejection}"
    );
}

#[test]
fn a_schema_version_that_is_not_a_positive_integer_is_invalid() {
    for name in ["string", "float", "zero"] {
        let body = std::fs::read_to_string(root().join(format!(
            "fixtures/invalid/invalid-detail--schema-version-{name}.json"
        )))
        .unwrap();
        let rejection = parse_message(&body).unwrap_err();
        assert_eq!(
            rejection.message, "/schema_version: missing or not a positive integer",
            "{name}"
        );
    }
}

#[test]
fn aws_events_keep_the_fields_amiflow_does_not_read() {
    // AWS's own events carry many fields no parser reads; closing the detail schemas must not
    // touch them. An extra field in an AWS detail is still accepted.
    let ami = std::fs::read_to_string(root().join("fixtures/valid/aws-ec2-ami-state-change.json"))
        .unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&ami).unwrap();
    value["detail"]["SomethingAwsAddedLater"] = serde_json::json!({"nested": true});
    assert!(matches!(
        parse_message(&value.to_string()).unwrap(),
        Inbound::Aws(AwsEvent::AmiStateChange(_))
    ));
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
    let mut recalled = AmiRecalled::new(
        &built.ami_id,
        "/golden/al2023/ami-id",
        "kernel regression",
        "arn:aws:sts::111111111111:assumed-role/ops/alice",
    );
    recalled.to_ami_id = Some("ami-0f0e0d0c0b0a09080".into());
    assert_eq!(recalled.meta.rollout_id, built.meta.rollout_id);
    assert_eq!(recalled.meta.key, "recalled:ami-0a1b2c3d4e5f60718");
    let refused = AsgRefreshFinished::new(&request, Outcome::Recalled, "recalled");
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
        recalled.into(),
        refused.into(),
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

fn window_of(body: &str) -> Result<RolloutWindowOpened, events::Rejection> {
    match parse_message(body)? {
        Inbound::Amiflow(e) => match e.detail {
            Detail::RolloutWindowOpened(w) => Ok(w),
            other => panic!("not a window: {other:?}"),
        },
        other => panic!("not ours: {other:?}"),
    }
}

fn scheduler_window(change: impl FnOnce(&mut serde_json::Value)) -> String {
    let body = std::fs::read_to_string(
        root().join("fixtures/valid/rollout-window-opened-by-scheduler.json"),
    )
    .unwrap();
    let mut event: serde_json::Value = serde_json::from_str(&body).unwrap();
    change(&mut event["detail"]);
    event.to_string()
}

#[test]
fn a_scheduler_window_gets_its_end_and_a_dated_key() {
    let window = window_of(&scheduler_window(|_| {})).unwrap();
    let opens = Utc.with_ymd_and_hms(2026, 11, 14, 2, 0, 0).unwrap();
    assert_eq!(window.opens_at, Some(opens));
    assert_eq!(window.closes_at, opens + chrono::Duration::hours(4));
    // The Scheduler's key ends in the full scheduled time; consumers see the window's day.
    assert_eq!(window.meta.key, "window:222222222222:uat:2026-11-14");
    // Serialized again, it is the closes_at shape and parses back to the same window.
    let again = Detail::from_value(
        "RolloutWindowOpened",
        Detail::from(window.clone()).to_value(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(again, Detail::from(window));
}

#[test]
fn a_closes_at_window_is_taken_as_given() {
    let opens = Utc.with_ymd_and_hms(2026, 11, 21, 2, 0, 0).unwrap();
    let closes = opens + chrono::Duration::hours(6);
    let built = RolloutWindowOpened::new("333333333333", "prod", opens, closes);
    assert_eq!(built.meta.key, "window:333333333333:prod:2026-11-21");
    let body =
        std::fs::read_to_string(root().join("fixtures/valid/rollout-window-opened.json")).unwrap();
    let window = window_of(&body).unwrap();
    assert_eq!(
        window.closes_at,
        Utc.with_ymd_and_hms(2026, 11, 21, 6, 0, 0).unwrap()
    );
    assert_eq!(window.opens_at, None);
    // Both shapes at once must agree.
    let both = scheduler_window(|d| d["closes_at"] = "2026-11-14T06:00:00Z".into());
    assert_eq!(
        window_of(&both).unwrap().closes_at,
        Utc.with_ymd_and_hms(2026, 11, 14, 6, 0, 0).unwrap()
    );
}

#[test]
fn bad_windows_are_rejected_with_a_reason() {
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "no end",
            scheduler_window(|d| {
                d.as_object_mut().unwrap().remove("window_hours");
            }),
            "closes_at, or opens_at and window_hours",
        ),
        (
            "negative hours",
            scheduler_window(|d| d["window_hours"] = (-4).into()),
            "/window_hours",
        ),
        (
            "huge hours",
            scheduler_window(|d| d["window_hours"] = 100_000.into()),
            "/window_hours",
        ),
        (
            "zero hours",
            scheduler_window(|d| d["window_hours"] = 0.into()),
            "/window_hours",
        ),
        (
            "bad timestamp",
            scheduler_window(|d| d["opens_at"] = "next saturday".into()),
            "opens_at",
        ),
        (
            "hours without a start",
            scheduler_window(|d| {
                d.as_object_mut().unwrap().remove("opens_at");
                d["key"] = "window:222222222222:uat:2026-11-14".into();
            }),
            "window_hours needs opens_at",
        ),
        (
            "ends before it opens",
            scheduler_window(|d| {
                d.as_object_mut().unwrap().remove("window_hours");
                d["closes_at"] = "2026-11-14T01:00:00Z".into();
            }),
            "is not after opens_at",
        ),
        (
            "two ends that disagree",
            scheduler_window(|d| d["closes_at"] = "2026-11-14T09:00:00Z".into()),
            "disagrees with opens_at + window_hours",
        ),
        (
            "key of another day",
            scheduler_window(|d| d["key"] = "window:222222222222:uat:2026-11-15".into()),
            "another day than opens_at",
        ),
        (
            "key without a date",
            scheduler_window(|d| d["key"] = "window:222222222222:uat:soon".into()),
            "<YYYY-MM-DD>",
        ),
    ];
    for (case, body, says) in cases {
        let rejection = window_of(&body).expect_err(case);
        assert_eq!(
            rejection.kind.as_str(),
            "invalid-detail",
            "{case}: {rejection}"
        );
        assert!(
            rejection.message.contains(says),
            "{case}: {:?} should say {says:?}",
            rejection.message
        );
    }
}
