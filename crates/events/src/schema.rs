//! JSON Schemas of the detail types, generated from the Rust types (the types are the source of
//! truth; `schemas/` at the workspace root holds the checked-in copies, regenerated with
//! `cargo run -p events --example gen-schemas`).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use schemars::{JsonSchema, Schema, schema_for};

use crate::detail::{
    AmiBuilt, AmiRecalled, AmiShared, AsgRefreshFinished, AsgRefreshRequested, ParamUpdated,
    RolloutWindowOpened,
};

fn titled<T: JsonSchema>(name: &str) -> Schema {
    let mut schema = schema_for!(T);
    schema.insert(
        "$id".into(),
        format!("https://amiflow.dev/schemas/{name}.json").into(),
    );
    if let Some(map) = schema.as_object_mut() {
        let mut value = serde_json::Value::Object(std::mem::take(map));
        closed(&mut value);
        if let serde_json::Value::Object(closed) = value {
            *map = closed;
        }
    }
    schema
}

/// Refuse properties a type does not know: a misspelt field (`target` for `targets`) would
/// otherwise be dropped in silence and the event act on the default. serde's
/// `deny_unknown_fields` cannot be used (it does not work with the `#[serde(flatten)]` of the
/// common fields), so the schemas say it. Every object schema lists all of its properties in
/// its own `properties` (flattening merges them, and `anyOf` branches only add `required`), so
/// `additionalProperties` sees them all.
fn closed(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), false.into());
            }
            map.values_mut().for_each(closed);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(closed),
        _ => {}
    }
}

/// Every detail schema by detail-type, in a stable order.
pub fn all() -> BTreeMap<&'static str, Schema> {
    BTreeMap::from([
        ("AmiBuilt", titled::<AmiBuilt>("AmiBuilt")),
        ("AmiShared", titled::<AmiShared>("AmiShared")),
        ("ParamUpdated", titled::<ParamUpdated>("ParamUpdated")),
        (
            "RolloutWindowOpened",
            titled::<RolloutWindowOpened>("RolloutWindowOpened"),
        ),
        (
            "AsgRefreshRequested",
            titled::<AsgRefreshRequested>("AsgRefreshRequested"),
        ),
        (
            "AsgRefreshFinished",
            titled::<AsgRefreshFinished>("AsgRefreshFinished"),
        ),
        ("AmiRecalled", titled::<AmiRecalled>("AmiRecalled")),
    ])
}

/// The checked-in file name of a detail-type's schema.
pub fn file_name(detail_type: &str) -> String {
    format!("{detail_type}.json")
}

/// The schema as pretty JSON with a trailing newline, exactly as checked in. Keys are sorted
/// here rather than by the map type: another crate in the build may turn on serde_json's
/// `preserve_order`, and the checked-in files must not depend on which crates were built.
pub fn render(schema: &Schema) -> String {
    let mut text = serde_json::to_string_pretty(&sorted(schema.as_value())).unwrap_or_default();
    text.push('\n');
    text
}

fn sorted(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            serde_json::Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&map[k])))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(sorted).collect())
        }
        other => other.clone(),
    }
}

static VALIDATORS: LazyLock<BTreeMap<&'static str, jsonschema::Validator>> = LazyLock::new(|| {
    all()
        .into_iter()
        .filter_map(|(name, schema)| {
            // Generated from our own types: a failure here is a bug, caught by
            // `every_detail_type_has_a_validator`, and a detail-type without a validator is
            // refused by `parse_message` (fail closed), never let through unchecked.
            // Formats are checked too (draft 2020-12 makes them annotations by default), so a
            // bad timestamp is reported with its field's path rather than by serde without one.
            jsonschema::options()
                .should_validate_formats(true)
                .build(schema.as_value())
                .ok()
                .map(|v| (name, v))
        })
        .collect()
});

/// One way a detail fails its schema: where (a JSON pointer) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.message)
    }
}

/// Validate a detail against its detail-type's schema. `None` for an unknown detail-type, or one
/// whose schema did not compile: callers must refuse the detail then, not accept it unchecked.
/// A field the type does not know is reported at its own path (`/target: unknown field ...`).
pub fn validate(detail_type: &str, detail: &serde_json::Value) -> Option<Vec<Violation>> {
    let validator = VALIDATORS.get(detail_type)?;
    let mut violations = Vec::new();
    for e in validator.iter_errors(detail) {
        let path = e.instance_path.to_string();
        match &e.kind {
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected }
            | jsonschema::error::ValidationErrorKind::UnevaluatedProperties { unexpected } => {
                violations.extend(unexpected.iter().map(|field| Violation {
                    path: format!("{path}/{}", escape(field)),
                    message: format!(
                        "unknown field {field:?}: {detail_type} has no such field{}",
                        match closest_field(detail_type, field).filter(|_| path.is_empty()) {
                            Some(known) => format!("; did you mean {known:?}?"),
                            None => String::new(),
                        }
                    ),
                }));
            }
            _ => violations.push(Violation {
                path,
                message: shorten(&e.to_string(), &e.instance),
            }),
        }
    }
    Some(violations)
}

/// The longest value a violation's message quotes whole.
const MAX_QUOTED: usize = 120;

/// `message` with a long quoted `instance` (a 1,001-item array) named by its size instead, so the
/// reason stays readable in a dead letter and a terminal.
fn shorten(message: &str, instance: &serde_json::Value) -> String {
    use serde_json::Value;
    let quoted = instance.to_string();
    if quoted.len() <= MAX_QUOTED {
        return message.to_owned();
    }
    let size = match instance {
        Value::Array(items) => format!("an array of {} items", items.len()),
        Value::Object(fields) => format!("an object of {} fields", fields.len()),
        Value::String(text) => format!("a string of {} characters", text.chars().count()),
        _ => format!("a value of {} characters", quoted.len()),
    };
    message.replacen(&quoted, &size, 1)
}

/// The detail field of `detail_type` closest to a misspelt `field`, if one is close enough to be
/// what was meant (Jaro-Winkler similarity of at least 0.8, as clap's own suggestions).
pub fn closest_field(detail_type: &str, field: &str) -> Option<String> {
    let schemas = all();
    let properties = schemas
        .get(detail_type)?
        .as_value()
        .get("properties")?
        .as_object()?
        .keys()
        .map(|known| (strsim::jaro_winkler(field, known), known.clone()))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    properties.map(|(_, known)| known)
}

/// A property name as a JSON pointer token (RFC 6901).
fn escape(field: &str) -> String {
    field.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Detail;

    /// A violation quoting a huge value names its size instead of repeating it.
    #[test]
    fn a_huge_value_is_named_by_its_size_in_the_violation() {
        let mut detail = Detail::from(crate::AmiBuilt::new(
            "ami-0123456789abcdef0",
            "us-east-1",
            "golden-al2023-2026-12",
            chrono::Utc::now(),
            "/golden/al2023/ami-id",
        ))
        .to_value();
        detail["targets"] = serde_json::json!(vec!["111111111111"; 1001]);
        let violations = validate("AmiBuilt", &detail).unwrap();
        let huge = violations
            .iter()
            .find(|v| v.path == "/targets")
            .unwrap_or_else(|| panic!("{violations:?}"));
        assert!(
            huge.message
                .starts_with("an array of 1001 items has more than"),
            "{huge}"
        );
        assert!(huge.message.len() < 80, "{huge}");
    }

    /// A group name AWS could not have (empty, too long, a control character) is refused at
    /// `/asg_name`; one with the odd characters AWS allows (spaces, `*`, `/`, a tab) is not.
    #[test]
    fn a_group_name_is_what_aws_allows() {
        let request = |name: &str| {
            Detail::from(crate::AsgRefreshRequested::new(
                "",
                "111111111111",
                name,
                "/golden/al2023/ami-id",
                "ami-0123456789abcdef0",
                crate::Strategy::LaunchTemplate,
                None,
            ))
            .to_value()
        };
        let long = "g".repeat(256);
        for bad in [
            "",
            long.as_str(),
            "web\u{1}",
            "web\u{0}prod",
            "web\u{1b}[31m",
        ] {
            let violations = validate("AsgRefreshRequested", &request(bad)).unwrap();
            assert!(
                violations.iter().any(|v| v.path == "/asg_name"),
                "{bad:?}: {violations:?}"
            );
        }
        for odd in [
            "web prod",
            "web*",
            "../etc/web",
            "web\tprod",
            "é-web",
            &"g".repeat(255),
        ] {
            assert_eq!(
                validate("AsgRefreshRequested", &request(odd)).unwrap(),
                [],
                "{odd:?}"
            );
        }
    }

    #[test]
    fn every_detail_type_has_a_validator() {
        for detail_type in Detail::TYPES {
            assert!(
                VALIDATORS.contains_key(detail_type),
                "{detail_type} has no schema validator: its schema does not compile"
            );
        }
        assert_eq!(VALIDATORS.len(), Detail::TYPES.len());
        assert_eq!(validate("NoSuchType", &serde_json::json!({})), None);
    }

    #[test]
    fn every_detail_schema_is_closed() {
        for (name, schema) in all() {
            assert_eq!(
                schema.as_value()["additionalProperties"],
                serde_json::Value::Bool(false),
                "{name}"
            );
        }
    }
}
