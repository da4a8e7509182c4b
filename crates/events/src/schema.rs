//! JSON Schemas of the detail types, generated from the Rust types (the types are the source of
//! truth; `schemas/` at the workspace root holds the checked-in copies, regenerated with
//! `cargo run -p events --example gen-schemas`).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use schemars::{JsonSchema, Schema, schema_for};

use crate::detail::{
    AmiBuilt, AmiShared, AsgRefreshFinished, AsgRefreshRequested, ParamUpdated, RolloutWindowOpened,
};

fn titled<T: JsonSchema>(name: &str) -> Schema {
    let mut schema = schema_for!(T);
    schema.insert(
        "$id".into(),
        format!("https://amiflow.dev/schemas/{name}.json").into(),
    );
    schema
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
            // Generated from our own types: a failure here is a bug caught by this crate's tests.
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

/// Validate a detail against its detail-type's schema. `None` for an unknown detail-type.
pub fn validate(detail_type: &str, detail: &serde_json::Value) -> Option<Vec<Violation>> {
    let validator = VALIDATORS.get(detail_type)?;
    Some(
        validator
            .iter_errors(detail)
            .map(|e| Violation {
                path: e.instance_path.to_string(),
                message: e.to_string(),
            })
            .collect(),
    )
}
