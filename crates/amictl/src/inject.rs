//! `amictl inject`: build an amiflow event from a detail file and `--field`s, fill in what amiflow
//! derives (`schema_version`, `key`, `rollout_id`, `emitted_at`), validate it against the
//! checked-in schema and the rules every worker applies, and put it on an account's bus. Safe for
//! manual reruns: every step is idempotent on the detail's `key`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use clap::Args;
use clap::builder::PossibleValuesParser;
use events::Detail;
use rollout::aws::Images;
use serde_json::{Map, Value, json};

use crate::exit::refuse;
use crate::scope::{Account, BUS, Scope, ScopeArgs};

/// Validate an event against its schema and put it on an amiflow bus.
#[derive(Debug, Args)]
#[command(after_help = "\
Fields: NAME=TEXT sets a string, NAME:=JSON sets any JSON value (numbers, arrays, null).
schema_version, emitted_at, caused_by, key and rollout_id are filled in when absent.

Before anything is sent the event is checked as a worker checks it (the schema, a misspelt field
named with the closest one, the accounts of the installation) and as `amictl rerun ami` does
(the policy's golden parameter and region, the AMI available in the hub); --force skips the
latter, for drills of the dead-letter path.

Exit codes: 0 sent (or printed, with --dry-run), 2 the event was refused, 1 an error.

Examples:
  amictl inject AmiBuilt --schema                       # the fields and their rules
  amictl inject AmiBuilt -f ami_id=ami-0123456789abcdef0 -f region=us-east-1 \\
      -f image_name=golden-al2023-2026-12 -f created_at=2026-12-01T00:00:00Z \\
      -f parameter_name=/golden/al2023/ami-id --dry-run
  amictl inject RolloutWindowOpened --account prod -f account=333333333333 -f stage=prod \\
      -f closes_at=2026-12-05T06:00:00Z
  amictl inject ParamUpdated --detail detail.json       # or --detail - to read stdin")]
pub struct InjectArgs {
    /// The event's detail-type.
    #[arg(value_name = "EVENT-TYPE", value_parser = PossibleValuesParser::new(Detail::TYPES))]
    event_type: String,
    /// The detail as a JSON object, from a file or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    detail: Option<PathBuf>,
    /// Set one detail field (repeatable): NAME=TEXT for a string, NAME:=JSON for any value.
    #[arg(long = "field", short = 'f', value_name = "NAME=TEXT|NAME:=JSON")]
    fields: Vec<String>,
    /// The account (stage name or id) whose bus receives the event [default: the hub for
    /// AmiBuilt and AmiShared (it forwards them), else the detail's `account`].
    #[arg(long, value_name = "STAGE|ACCOUNT", add = crate::completion::stages())]
    account: Option<String>,
    /// The bus name or ARN.
    #[arg(long, value_name = "NAME|ARN", default_value = BUS)]
    bus: String,
    /// Print the event that would be sent, send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the detail-type's JSON Schema and exit.
    #[arg(long)]
    schema: bool,
    #[command(flatten)]
    output: crate::output::OutputArgs,
    /// Send even what the policy or AWS says a worker must refuse (an AMI that does not exist, a
    /// parameter or region outside the policy), for drills of the dead-letter path. The schema
    /// and the accounts are still checked.
    #[arg(long)]
    force: bool,
}

pub async fn run(args: InjectArgs, scope: &ScopeArgs) -> Result<()> {
    if args.schema {
        let schemas = events::schema::all();
        let schema = schemas
            .get(args.event_type.as_str())
            .ok_or_else(|| anyhow!("no schema for {}", args.event_type))?;
        print!("{}", events::schema::render(schema));
        return Ok(());
    }
    let mut detail = read_detail(args.detail.as_ref())?;
    for field in &args.fields {
        apply_field(&mut detail, field)?;
    }
    let detail = complete(&args.event_type, detail, chrono::Utc::now());
    let detail = validate(&args.event_type, Value::Object(detail))?;

    let scope = Scope::open(scope).await?;
    check_accounts(&scope, &detail)?;
    if !args.force {
        check_policy(&scope, &detail).await?;
    }
    let account = match &args.account {
        Some(which) => scope.account(which)?,
        None => default_account(&scope, &detail)?,
    };
    let outcome = if args.dry_run {
        None
    } else {
        Some(put_event(account, &args.bus, &detail).await?)
    };
    report(
        &detail,
        account,
        &args.bus,
        outcome.as_deref(),
        args.output.json(),
    )
}

/// Print what was (or, without an event id, would be) sent.
pub fn report(
    detail: &Detail,
    account: &Account,
    bus: &str,
    event_id: Option<&str>,
    as_json: bool,
) -> Result<()> {
    let meta = detail.meta();
    let Some(event_id) = event_id else {
        let event = json!({
            "account": account.id,
            "stage": account.stage,
            "entry": {
                "EventBusName": bus,
                "Source": events::SOURCE,
                "DetailType": detail.detail_type(),
                "Detail": detail.to_value(),
            },
        });
        if as_json {
            let summary = json!({"sent": false, "dry_run": true});
            println!("{:#}", crate::output::document(summary, &Ok(()), &event)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&event)?);
            eprintln!("dry run: nothing was sent");
        }
        return Ok(());
    };
    if as_json {
        let out = json!({
            "event_id": event_id,
            "detail_type": detail.detail_type(),
            "rollout_id": meta.rollout_id,
            "key": meta.key,
            "account": account.id,
            "bus": bus,
        });
        let summary = json!({"sent": true, "dry_run": false});
        println!("{:#}", crate::output::document(summary, &Ok(()), &out)?);
    } else {
        println!(
            "sent {} to bus {bus} in {}\n  event id:   {event_id}\n  rollout_id: {}\n  key:        {}",
            detail.detail_type(),
            account.label(),
            if meta.rollout_id.is_empty() {
                "(none: a window opening belongs to no rollout)"
            } else {
                &meta.rollout_id
            },
            meta.key
        );
    }
    Ok(())
}

fn read_detail(source: Option<&PathBuf>) -> Result<Map<String, Value>> {
    let Some(path) = source else {
        return Ok(Map::new());
    };
    let (text, name) = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the detail from standard input")?;
        (text, "standard input".to_owned())
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the detail file {}", path.display()))?;
        (text, path.display().to_string())
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => bail!(
            "the detail in {name} must be a JSON object, not {}",
            kind(&other)
        ),
        Err(e) => bail!("the detail in {name} is not JSON: {e}"),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `NAME=TEXT` or `NAME:=JSON`.
fn apply_field(detail: &mut Map<String, Value>, field: &str) -> Result<()> {
    let Some((name, value)) = field.split_once('=') else {
        bail!(
            "--field {field:?} is not NAME=TEXT or NAME:=JSON, e.g. -f ami_id=ami-0123456789abcdef0 or -f parameter_version:=3"
        );
    };
    let (name, value) = match name.strip_suffix(':') {
        Some(name) => (
            name,
            serde_json::from_str(value).with_context(|| {
                format!("--field {name}:={value}: the value after := must be JSON (quote strings: {name}:='\"text\"', or use {name}=text)")
            })?,
        ),
        None => (name, Value::String(value.to_owned())),
    };
    if name.is_empty() {
        bail!("--field {field:?} has no field name before the =");
    }
    detail.insert(name.to_owned(), value);
    Ok(())
}

/// Fill in what amiflow derives for a root event, leaving everything given alone.
pub fn complete(
    detail_type: &str,
    mut detail: Map<String, Value>,
    now: chrono::DateTime<chrono::Utc>,
) -> Map<String, Value> {
    detail
        .entry("schema_version")
        .or_insert(json!(events::SCHEMA_VERSION));
    detail.entry("emitted_at").or_insert(json!(
        now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    ));
    detail.entry("caused_by").or_insert(json!(""));
    if detail.contains_key("key") && detail.contains_key("rollout_id") {
        return detail;
    }
    // Derive them from the business fields, as the producer would, when those fields parse.
    let mut probe = detail.clone();
    probe.entry("key").or_insert(json!("-"));
    probe.entry("rollout_id").or_insert(json!(""));
    if let Ok(Some(parsed)) = Detail::from_value(detail_type, Value::Object(probe)) {
        let key = match &parsed {
            Detail::RolloutWindowOpened(d) => Some(events::keys::window(
                &d.account,
                &d.stage,
                &now.format("%Y-%m-%d").to_string(),
            )),
            other => other.expected_key(),
        };
        if let Some(key) = key {
            detail.entry("key").or_insert(json!(key));
        }
        let rollout = parsed.expected_rollout_id().unwrap_or_default();
        detail.entry("rollout_id").or_insert(json!(rollout));
    }
    detail
}

/// Check a detail exactly as a worker will: the schema (every violation with its JSON path),
/// then the envelope rules and the identity of `key` and `rollout_id`.
pub fn validate(detail_type: &str, detail: Value) -> Result<Detail> {
    let mut violations = events::schema::validate(detail_type, &detail).unwrap_or_default();
    // `key` and `rollout_id` are derived from the other fields once those are valid: while they
    // are not, a missing key is only noise.
    let derived_only = |v: &events::schema::Violation| {
        v.path.is_empty()
            && (v.message == "\"key\" is a required property"
                || v.message == "\"rollout_id\" is a required property")
    };
    if violations.iter().any(|v| !derived_only(v)) {
        violations.retain(|v| !derived_only(v));
    }
    if !violations.is_empty() {
        let lines: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
        refuse!(
            "the {detail_type} detail is invalid ({} problem{}):\n{}\nsee the rules with `amictl inject {detail_type} --schema`",
            violations.len(),
            if violations.len() == 1 { "" } else { "s" },
            lines.join("\n")
        );
    }
    let envelope = json!({
        "version": "0",
        "id": "amictl-inject",
        "detail-type": detail_type,
        "source": events::SOURCE,
        "account": "000000000000",
        "time": chrono::Utc::now().to_rfc3339(),
        "region": "",
        "resources": [],
        "detail": detail,
    });
    match events::parse_message(&envelope.to_string()) {
        Ok(events::Inbound::Amiflow(event)) => Ok(event.detail),
        Ok(_) => bail!("{detail_type} is not an amiflow event"),
        Err(rejection) => refuse!("a worker would reject this event: {}", rejection.message),
    }
}

/// Account ids in the detail must belong to this installation: an event for an account amiflow
/// does not run in would sit in no queue, or worse, in the wrong one.
fn check_accounts(scope: &Scope, detail: &Detail) -> Result<()> {
    let value = detail.to_value();
    for field in ["account", "target_account", "source_account"] {
        if let Some(id) = value.get(field).and_then(Value::as_str) {
            scope.require_known_account(id, &format!("/{field}"))?;
        }
    }
    if let Some(targets) = value.get("targets").and_then(Value::as_array) {
        for id in targets.iter().filter_map(Value::as_str) {
            scope.require_known_account(id, "/targets")?;
        }
    }
    Ok(())
}

/// What `amictl rerun ami` checks, for any event: its golden parameter is one of the policy's,
/// its region the policy's, and its AMI visible and available in the hub. A worker refuses
/// anything else (dead-lettered, or dropped with a log line), so it is refused here, before
/// anything is sent; `--force` sends it anyway.
async fn check_policy(scope: &Scope, detail: &Detail) -> Result<()> {
    let value = detail.to_value();
    let text = |field: &str| value.get(field).and_then(Value::as_str);
    const DRILL: &str = "(--force sends it anyway, for a drill)";
    if let Some(parameter) = text("parameter_name")
        && !scope
            .policy
            .families
            .iter()
            .any(|f| f.parameter_name == parameter)
    {
        refuse!(
            "/parameter_name {parameter} is no golden parameter of {}; use one of {} {DRILL}",
            scope.origin,
            scope
                .policy
                .families
                .iter()
                .map(|f| f.parameter_name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(region) = text("region")
        && region != scope.policy.region
    {
        refuse!(
            "/region {region} is not the policy's region {}: amiflow shares and rolls out in {} only {DRILL}",
            scope.policy.region,
            scope.policy.region
        );
    }
    if let Some(ami) = text("ami_id") {
        let hub = scope.hub();
        let images = rollout::aws::Ec2Images(aws_sdk_ec2::Client::new(&hub.config));
        let image = images
            .describe(ami)
            .await
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading {ami} in the hub {}", hub.label()))?;
        match image {
            None => refuse!(
                "/ami_id {ami}: no such AMI is visible in the hub {} {DRILL}",
                hub.label()
            ),
            Some(image) if image.state != "available" => {
                refuse!("/ami_id {ami} is {}, not available {DRILL}", image.state)
            }
            Some(image) => {
                // What share and param would refuse: not the hub's, another family's, untrusted.
                if let Some(parameter) = text("parameter_name") {
                    let policy = &scope.policy;
                    let why = policy.refuse_image(&image, parameter).or_else(|| {
                        policy
                            .family_of(&image.name, image.family_tag.as_deref())
                            .and_then(|f| f.untrusted(&image))
                    });
                    if let Some(why) = why {
                        refuse!("/ami_id {why} {DRILL}");
                    }
                }
            }
        }
    }
    Ok(())
}

fn default_account<'s>(scope: &'s Scope, detail: &Detail) -> Result<&'s Account> {
    match detail {
        Detail::AmiBuilt(_) | Detail::AmiShared(_) => Ok(scope.hub()),
        other => match other.to_value().get("account").and_then(Value::as_str) {
            Some(id) => scope.account(id),
            None => Ok(scope.hub()),
        },
    }
}

/// Put one event on `bus` in `account`; the event id EventBridge gave it.
pub async fn put_event(account: &Account, bus: &str, detail: &Detail) -> Result<String> {
    put_with(&account.config, &account.label(), bus, detail).await
}

/// [`put_event`] with any SDK configuration; `whose` names the account in errors.
pub async fn put_with(
    config: &aws_config::SdkConfig,
    whose: &str,
    bus: &str,
    detail: &Detail,
) -> Result<String> {
    let out = aws_sdk_eventbridge::Client::new(config)
        .put_events()
        .entries(
            PutEventsRequestEntry::builder()
                .source(events::SOURCE)
                .detail_type(detail.detail_type())
                .detail(detail.to_value().to_string())
                .event_bus_name(bus)
                .build(),
        )
        .send()
        .await
        .map_err(|e| crate::scope::aws_error(&e))
        .with_context(|| {
            format!(
                "putting {} on bus {bus} in {whose} (events:PutEvents)",
                detail.detail_type()
            )
        })?;
    let entry = out.entries().first();
    match entry.and_then(|e| e.event_id()) {
        Some(id) if out.failed_entry_count() == 0 => Ok(id.to_owned()),
        _ => bail!(
            "EventBridge rejected the {} event on bus {bus} in {whose}: {} {}",
            detail.detail_type(),
            entry
                .and_then(|e| e.error_code())
                .unwrap_or("(no error code)"),
            entry.and_then(|e| e.error_message()).unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built() -> Map<String, Value> {
        let mut detail = Map::new();
        for f in [
            "ami_id=ami-0123456789abcdef0",
            "region=us-east-1",
            "image_name=golden-al2023-2026-12",
            "created_at=2026-12-01T00:00:00Z",
            "parameter_name=/golden/al2023/ami-id",
        ] {
            apply_field(&mut detail, f).unwrap();
        }
        detail
    }

    #[test]
    fn a_root_event_gets_its_derived_identity() {
        let now = "2026-12-01T10:00:00Z".parse().unwrap();
        let detail = complete("AmiBuilt", built(), now);
        assert_eq!(detail["key"], "built:ami-0123456789abcdef0");
        assert_eq!(
            detail["rollout_id"],
            "/golden/al2023/ami-id@ami-0123456789abcdef0"
        );
        assert_eq!(detail["schema_version"], 1);
        let parsed = validate("AmiBuilt", Value::Object(detail)).unwrap();
        assert_eq!(parsed.detail_type(), "AmiBuilt");
    }

    #[test]
    fn a_window_key_carries_the_day_it_was_injected() {
        let now = "2026-12-05T02:00:00Z".parse().unwrap();
        let mut detail = Map::new();
        for f in [
            "account=333333333333",
            "stage=prod",
            "closes_at=2026-12-05T06:00:00Z",
        ] {
            apply_field(&mut detail, f).unwrap();
        }
        let detail = complete("RolloutWindowOpened", detail, now);
        assert_eq!(detail["key"], "window:333333333333:prod:2026-12-05");
        validate("RolloutWindowOpened", Value::Object(detail)).unwrap();
    }

    #[test]
    fn every_violation_is_named_with_its_path() {
        let mut detail = built();
        apply_field(&mut detail, "ami_id=ami-XYZ").unwrap();
        detail.remove("region");
        let detail = complete("AmiBuilt", detail, chrono::Utc::now());
        let err = validate("AmiBuilt", Value::Object(detail))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/ami_id"), "{err}");
        assert!(err.contains("\"region\" is a required property"), "{err}");
    }

    #[test]
    fn a_key_that_does_not_match_the_fields_is_refused() {
        let mut detail = built();
        apply_field(&mut detail, "key=built:ami-00000000").unwrap();
        let detail = complete("AmiBuilt", detail, chrono::Utc::now());
        let err = validate("AmiBuilt", Value::Object(detail))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match the event's fields"), "{err}");
    }

    #[test]
    fn json_fields_and_bad_fields() {
        let mut detail = Map::new();
        apply_field(&mut detail, "parameter_version:=3").unwrap();
        apply_field(&mut detail, "targets:=[\"222222222222\"]").unwrap();
        assert_eq!(detail["parameter_version"], 3);
        assert_eq!(detail["targets"][0], "222222222222");
        let err = apply_field(&mut detail, "ami_id").unwrap_err().to_string();
        assert!(err.contains("NAME=TEXT"), "{err}");
        let err = apply_field(&mut detail, "n:=not json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be JSON"), "{err}");
    }
}
