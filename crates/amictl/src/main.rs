//! `amictl`, amiflow's operator CLI. Each command group lives in its own module and gets its
//! arguments from here; `main` only parses, dispatches and turns an error into a message and a
//! non-zero exit. Errors are `anyhow` chains whose last line says what to do next.

mod completion;
mod compliance;
mod control;
mod demo;
mod dlq;
mod exit;
mod inject;
mod local;
mod output;
mod plan;
mod procs;
mod queues;
mod recall;
mod report;
mod rerun;
mod scope;
mod status;
mod tables;
mod trace;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "amictl",
    version,
    about = "Operate amiflow: run it locally against an emulated AWS, inspect and drive rollouts",
    long_about = "Operate amiflow: run it locally against an emulated AWS, inspect and drive rollouts.\n\nEvery command that reads or changes AWS acts on the local world (amictl local up) unless --config names the rollout policy; then it acts in the policy's region (or --region; never AWS_REGION) with the standard AWS credential chain (--profile, AWS_PROFILE, SSO, environment) and assumes the policy's role_name in the other accounts. These flags go before or after the command.",
    after_help = "Examples:\n  amictl demo                                   # a whole rollout, locally\n  amictl local up && eval \"$(amictl local env)\"\n  amictl status --stage prod\n  amictl report --out compliance.html\n  amictl plan --stage prod\n  amictl pause --all --reason \"incident 42\"\n  amictl recall ami-0123456789abcdef0 --reason \"CVE-2026-1234\" --dry-run\n  amictl dlq list\n  amictl trace /golden/al2023/ami-id@ami-0123456789abcdef0\n  amictl completions bash > /etc/bash_completion.d/amictl"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where every command acts (global: before or after the subcommand).
    #[command(flatten)]
    scope: scope::ScopeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole rollout in a local AWS world and print the compliance table (the README's
    /// first command).
    Demo(demo::DemoArgs),
    #[command(subcommand)]
    Local(local::Local),
    /// Validate an event against its schema and put it on an amiflow bus (manual reruns).
    Inject(inject::InjectArgs),
    /// Inspect and replay the dead-letter queues.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Emit RolloutWindowOpened or AmiBuilt again (safe: every step is idempotent).
    #[command(subcommand)]
    Rerun(rerun::Rerun),
    /// Compliance per stage, read from AWS: golden parameters, groups current / stale /
    /// refreshing / failed / skipped, instances not on the golden AMI.
    Status(status::StatusArgs),
    /// Compliance evidence for auditors in one file (HTML with charts, JSON or CSV): every
    /// instance's AMI, its age, each group's last refresh and why it was left behind, the window
    /// history.
    Report(report::ReportArgs),
    /// The story of one rollout: which step happened when, in which account, with which result.
    Trace(trace::TraceArgs),
    /// What each stage's next window would do to every group, and each stage's gate.
    Plan(plan::PlanArgs),
    /// Stop a stage (or every stage): no worker changes anything there until `amictl resume`.
    Pause(control::PauseArgs),
    /// Lift a pause, or let a halted stage go on with the failures it has.
    Resume(control::ResumeArgs),
    /// Approve an AMI for a stage that requires approval (`requires_approval` in the policy).
    Approve(control::ApproveArgs),
    /// Halt a stage for an AMI: no new refresh there, the next stage not promoted.
    Halt(control::HaltArgs),
    /// Recall a bad golden AMI: refused everywhere, every stage and group moved back.
    Recall(recall::RecallArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// The script asks amictl (found on PATH) at each TAB, so `--stage` completes the stages of
    /// the policy the command acts on: its --config, AMIFLOW_CONFIG, or the local world's.
    #[command(
        after_help = "Examples:\n  amictl completions bash > ~/.local/share/bash-completion/completions/amictl\n  amictl completions zsh > \"${fpath[1]}/_amictl\"\n  source <(amictl completions bash)              # this shell only"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // A TAB in a shell whose completion script `amictl completions` printed: answer, exit.
    completion::answer(Cli::command);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Local(command) => local::run(command).await,
        Command::Inject(args) => inject::run(args, &cli.scope).await,
        Command::Dlq(command) => dlq::run(command, &cli.scope).await,
        Command::Rerun(command) => rerun::run(command, &cli.scope).await,
        Command::Status(args) => status::run(args, &cli.scope).await,
        Command::Report(args) => report::run(args, &cli.scope).await,
        Command::Trace(args) => trace::run(args, &cli.scope).await,
        Command::Plan(args) => plan::run(args, &cli.scope).await,
        Command::Pause(args) => control::pause(args, &cli.scope).await,
        Command::Resume(args) => control::resume(args, &cli.scope).await,
        Command::Approve(args) => control::approve(args, &cli.scope).await,
        Command::Halt(args) => control::halt(args, &cli.scope).await,
        Command::Recall(args) => recall::run(args, &cli.scope).await,
        Command::Completions { shell } => {
            completion::registration(shell, &mut std::io::stdout()).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("amictl: {err:#}");
            exit::code(&err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command's help, as an operator reads it: a change to any of them shows up in review.
    #[test]
    fn help_texts() {
        let mut root = Cli::command().term_width(100);
        root.build();
        let mut pages = vec![("amictl".to_owned(), root.clone())];
        let mut stack: Vec<(String, clap::Command)> = vec![("amictl".to_owned(), root)];
        while let Some((path, command)) = stack.pop() {
            for sub in command.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                pages.push((name.clone(), sub.clone()));
                stack.push((name, sub.clone()));
            }
        }
        pages.sort_by(|a, b| a.0.cmp(&b.0));
        let mut text = String::new();
        for (path, mut command) in pages {
            if path.split(' ').any(|word| word == "help") {
                continue;
            }
            text.push_str(&format!("===== {path} --help\n"));
            text.push_str(&command.render_long_help().to_string());
            text.push('\n');
        }
        insta::assert_snapshot!("help", text);
    }

    #[test]
    fn completion_offers_every_command_and_the_registration_calls_amictl() {
        let offered: Vec<String> = clap_complete::engine::complete(
            &mut Cli::command(),
            vec!["amictl".into(), "".into()],
            1,
            None,
        )
        .unwrap()
        .iter()
        .map(|c| c.get_value().to_string_lossy().into_owned())
        .collect();
        for command in [
            "inject",
            "dlq",
            "rerun",
            "trace",
            "status",
            "local",
            "plan",
            "pause",
            "resume",
            "approve",
            "halt",
            "recall",
            "report",
            "demo",
            "completions",
        ] {
            assert!(
                offered.iter().any(|o| o == command),
                "{command} not offered: {offered:?}"
            );
        }
        let mut script = Vec::new();
        completion::registration(clap_complete::Shell::Bash, &mut script).unwrap();
        let script = String::from_utf8(script).unwrap();
        assert!(
            script.contains("COMPLETE=\"bash\"") && script.contains("amictl"),
            "{script}"
        );
    }
}
