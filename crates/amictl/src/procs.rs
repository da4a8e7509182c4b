//! Processes amictl started and left running: is one still ours, stop it with a deadline.
//!
//! Signals go through `kill(1)` because the workspace forbids `unsafe` (no libc calls), and
//! liveness is read from `/proc`, so this is Linux-only, like the local world itself.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A process amictl recorded: its pid and a string its command line must contain, so a pid the
/// kernel has since reused for something else is never signalled.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub label: String,
    pub pid: u32,
    pub cmdline_contains: String,
}

/// Alive, not a zombie, and still running the program we started under that pid.
pub fn is_running(pid: u32, cmdline_contains: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the last ')' (the command name may itself contain parentheses).
    // A zombie has exited; it only waits for its parent (or init) to reap it.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z' | 'X') | None) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).contains(cmdline_contains))
        .unwrap_or(false)
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// How a stop went.
#[derive(Debug, Default)]
pub struct Stopped {
    /// Exited after SIGTERM.
    pub terminated: Vec<Tracked>,
    /// Still there at the deadline, so SIGKILLed.
    pub killed: Vec<Tracked>,
    /// Already gone (or the pid now belongs to another program) before we signalled.
    pub gone: Vec<Tracked>,
}

/// SIGTERM every running process of `procs`, wait up to `grace` for all of them to exit, then
/// SIGKILL the leftovers and wait for those too.
pub fn stop(procs: &[Tracked], grace: Duration) -> Stopped {
    let mut out = Stopped::default();
    let mut running = Vec::new();
    for p in procs {
        if is_running(p.pid, &p.cmdline_contains) {
            signal(p.pid, "TERM");
            running.push(p.clone());
        } else {
            out.gone.push(p.clone());
        }
    }
    let still = wait_gone(running.clone(), grace);
    for p in &still {
        signal(p.pid, "KILL");
    }
    let unkillable = wait_gone(still.clone(), Duration::from_secs(5));
    for p in running {
        if still.iter().any(|s| s.pid == p.pid) {
            out.killed.push(p);
        } else {
            out.terminated.push(p);
        }
    }
    // SIGKILL cannot be ignored; a process still there is stuck in the kernel (D state).
    for p in unkillable {
        eprintln!(
            "amictl: {} (pid {}) did not exit even after SIGKILL",
            p.label, p.pid
        );
    }
    out
}

/// Poll `/proc` until every process is gone or `within` passes; returns those still running.
fn wait_gone(mut procs: Vec<Tracked>, within: Duration) -> Vec<Tracked> {
    let deadline = Instant::now() + within;
    loop {
        procs.retain(|p| is_running(p.pid, &p.cmdline_contains));
        if procs.is_empty() || Instant::now() >= deadline {
            return procs;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_running_only_under_its_own_command_line() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        // Until the child has exec'd, /proc shows the parent's command line: poll for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_running(pid, "sleep") {
            assert!(
                Instant::now() < deadline,
                "sleep never showed up as running"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_running(pid, "share-worker"), "a reused pid is not ours");
        let stopped = stop(
            &[Tracked {
                label: "sleep".into(),
                pid,
                cmdline_contains: "sleep".into(),
            }],
            Duration::from_secs(5),
        );
        assert_eq!(stopped.terminated.len(), 1);
        // Exited but not yet reaped: a zombie counts as gone.
        assert!(!is_running(pid, "sleep"));
        child.wait().unwrap();
        assert!(!is_running(pid, "sleep"));
    }
}
