//! `amictl`, amiflow's operator CLI. Each command group lives in its own module and gets its
//! arguments from here; `main` only parses, dispatches and turns an error into a message and a
//! non-zero exit. Errors are `anyhow` chains whose last line says what to do next.

mod compliance;
mod demo;
mod local;
mod procs;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "amictl",
    version,
    about = "Operate amiflow: run it locally against an emulated AWS, inspect and drive rollouts",
    after_help = "Example:\n  amictl demo                                   # a whole rollout, locally\n  amictl local up && eval \"$(amictl local env)\"\n  amictl local down"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole rollout in a local AWS world and print the compliance table (the README's
    /// first command).
    Demo(demo::DemoArgs),
    #[command(subcommand)]
    Local(local::Local),
    /// Compliance per stage, read from AWS: golden parameters, groups current / stale /
    /// refreshing / failed / skipped, instances not on the golden AMI.
    Status(status::StatusArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Local(command) => local::run(command).await,
        Command::Status(args) => status::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("amictl: {err:#}");
            ExitCode::FAILURE
        }
    }
}
