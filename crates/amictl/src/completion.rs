//! Shell completion that asks `amictl` itself at each TAB (clap_complete's engine): the script
//! `amictl completions <shell>` prints runs `COMPLETE=<shell> amictl -- <the line so far>`, so
//! `--stage` completes the stage names of the policy the command would act on, not file names.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::path::PathBuf;

use clap_complete::Shell;
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};
use clap_complete::env::{Bash, Elvish, EnvCompleter, Fish, Powershell, Zsh};
use rollout::policy::Policy;

/// The environment variable the registration scripts set to ask for completions.
const VAR: &str = "COMPLETE";

/// Answer a completion request and exit, when the shell's script is the caller.
pub fn answer(command: fn() -> clap::Command) {
    clap_complete::CompleteEnv::with_factory(command)
        .var(VAR)
        .complete();
}

/// The completer of every `--stage`: the policy's stage names, each with its account.
pub fn stages() -> ArgValueCompleter {
    ArgValueCompleter::new(stage_candidates)
}

fn stage_candidates(current: &OsStr) -> Vec<CompletionCandidate> {
    let current = current.to_string_lossy();
    let Some(policy) = policy() else {
        return Vec::new();
    };
    policy
        .stages
        .iter()
        .filter(|s| s.name.starts_with(current.as_ref()))
        .map(|s| {
            CompletionCandidate::new(&s.name).help(Some(format!("account {}", s.account).into()))
        })
        .collect()
}

/// The policy of the command line being completed: its `--config`, else AMIFLOW_CONFIG, else
/// the running local world's. None when there is none (nothing is offered then).
fn policy() -> Option<Policy> {
    let args: Vec<String> = std::env::args().collect();
    let named = args.iter().enumerate().find_map(|(i, a)| match a.as_str() {
        "--config" => args.get(i + 1).cloned(),
        _ => a.strip_prefix("--config=").map(str::to_owned),
    });
    let path = named
        .or_else(|| std::env::var("AMIFLOW_CONFIG").ok())
        .map(PathBuf::from)
        .or_else(|| {
            crate::local::current_state()
                .ok()
                .flatten()
                .map(|s| s.config_file)
        })?;
    Policy::load(&path).ok()
}

/// Write the script that registers amictl's completion with `shell`.
pub fn registration(shell: Shell, out: &mut dyn Write) -> io::Result<()> {
    let completer: &dyn EnvCompleter = match shell {
        Shell::Bash => &Bash,
        Shell::Elvish => &Elvish,
        Shell::Fish => &Fish,
        Shell::PowerShell => &Powershell,
        Shell::Zsh => &Zsh,
        other => {
            return Err(io::Error::other(format!(
                "no completion for {other}; use bash, zsh, fish, elvish or powershell"
            )));
        }
    };
    completer.write_registration(VAR, "amictl", "amictl", "amictl", out)
}
