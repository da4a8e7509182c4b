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
