//! How a command prints its answer: `--output table|json` (`-o`) on every command that answers,
//! `--json` kept as its alias, as the AWS CLI and kubectl do.

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// Tables and sentences, for people.
    #[default]
    Table,
    /// JSON on standard output, for scripts (`| jq`); messages stay on standard error.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// How to print the answer.
    #[arg(long, short = 'o', value_enum, value_name = "FORMAT", default_value_t = Format::Table)]
    output: Format,
    /// The same as --output json.
    #[arg(long, conflicts_with = "output")]
    json: bool,
}

impl OutputArgs {
    pub fn json(&self) -> bool {
        self.json || self.output == Format::Json
    }
}

/// The version of every command's JSON document; raised when a field changes meaning or goes.
pub const JSON_VERSION: u32 = 1;

/// What a command's JSON carries besides its answer: the document's version, when it was made,
/// and a summary whose `attention` is the reason the command exits 3 (null when it does not),
/// so a script reads the verdict from the JSON as from the exit code.
#[derive(Debug, serde::Serialize)]
struct Document<'a, B: serde::Serialize> {
    version: u32,
    generated_at: chrono::DateTime<chrono::Utc>,
    summary: serde_json::Value,
    #[serde(flatten)]
    body: &'a B,
}

/// `body` (an object) as one JSON document with `version`, `generated_at` and `summary` (given
/// fields plus the verdict's `attention`); print it with `{:#}` (pretty) or `{}` (one line).
pub fn document<B: serde::Serialize>(
    mut summary: serde_json::Value,
    verdict: &anyhow::Result<()>,
    body: &B,
) -> anyhow::Result<serde_json::Value> {
    summary["attention"] = match verdict {
        Ok(()) => serde_json::Value::Null,
        Err(e) => format!("{e:#}").into(),
    };
    Ok(serde_json::to_value(Document {
        version: JSON_VERSION,
        generated_at: chrono::Utc::now(),
        summary,
        body,
    })?)
}

/// What a command that writes (or, in a dry run, would write) told its caller: sentences for
/// people, and for `--output json` one document whose `changes` are each record written or
/// deleted (`change`, the record's `path`, the `record` itself) with the same sentences as
/// `messages`; `summary` counts the changes and says whether it was a dry run.
#[derive(Debug, Default)]
pub struct Told {
    dry_run: bool,
    lines: Vec<String>,
    changes: Vec<serde_json::Value>,
}

impl Told {
    pub fn dry_run() -> Self {
        Told {
            dry_run: true,
            ..Told::default()
        }
    }

    pub fn say(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    /// A change made (in a dry run: one that would be), with the record it is about.
    pub fn change(&mut self, change: &str, path: &str, record: &impl serde::Serialize) {
        self.changes.push(serde_json::json!({
            "change": change,
            "path": path,
            "record": record,
        }));
    }

    pub fn print(self, output: &OutputArgs) -> anyhow::Result<()> {
        if output.json() {
            let doc = document(
                serde_json::json!({"changes": self.changes.len(), "dry_run": self.dry_run}),
                &Ok(()),
                &serde_json::json!({"changes": self.changes, "messages": self.lines}),
            )?;
            println!("{doc:#}");
        } else {
            for line in self.lines {
                println!("{line}");
            }
        }
        Ok(())
    }
}
