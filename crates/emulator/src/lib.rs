//! The local AWS emulator: the pinned moto server with amiflow's shim (`local/`), installed into
//! a project-local virtual environment on first use and started on a free loopback port.
//!
//! Used by the end-to-end tests (one emulator per test, dropped at the end, so no test depends on
//! another's state or on a fixed port) and by `amictl local up`. This crate starts processes and
//! files; it never talks AWS itself.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Why the emulator could not be installed or started; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error(
        "python3 was not found on PATH ({0}); install Python 3.9 or newer with venv support (Debian: apt-get install python3 python3-venv)"
    )]
    NoPython(String),
    #[error(
        "creating the virtual environment {path} failed: {output}\nInstall venv support (Debian: apt-get install python3-venv), then retry"
    )]
    Venv { path: PathBuf, output: String },
    #[error(
        "pip could not install the emulator (local/requirements.txt): {output}\nCheck that PyPI is reachable (or set PIP_INDEX_URL), then retry; the install resumes where it stopped"
    )]
    Pip { output: String },
    #[error("the emulator did not start: {0}")]
    Start(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmulatorError {
    let what = what.into();
    move |e| EmulatorError::Io(what, e)
}

/// The project's root: `AMIFLOW_HOME` if set, else the workspace this crate was built in.
pub fn project_root() -> PathBuf {
    match std::env::var_os("AMIFLOW_HOME") {
        Some(home) => PathBuf::from(home),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()
            .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")),
    }
}

/// Where the project keeps its local state (venv, logs, world state).
pub fn state_dir(root: &Path) -> PathBuf {
    root.join(".amiflow")
}

/// Make sure the virtual environment holds exactly `local/requirements.txt`; return its python.
///
/// Idempotent and safe when several test binaries call it at once: an exclusive file lock
/// serializes installers, and a stamp holding the installed requirements makes later calls free.
pub fn ensure_venv(root: &Path) -> Result<PathBuf, EmulatorError> {
    let dir = state_dir(root);
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let requirements_path = root.join("local/requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_path)
        .map_err(io(format!("reading {}", requirements_path.display())))?;
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(".amiflow-requirements");
    let installed = |stamp: &Path| {
        std::fs::read_to_string(stamp).is_ok_and(|s| s == requirements) && python.exists()
    };
    if installed(&stamp) {
        return Ok(python);
    }
    let lock_path = dir.join("venv.lock");
    let lock = File::create(&lock_path).map_err(io(format!("creating {}", lock_path.display())))?;
    lock.lock()
        .map_err(io(format!("locking {}", lock_path.display())))?;
    // Another process may have finished the install while we waited for the lock.
    if installed(&stamp) {
        return Ok(python);
    }
    if !python.exists() {
        let system_python = std::env::var("AMIFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(&system_python)
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .map_err(|e| EmulatorError::NoPython(format!("{system_python}: {e}")))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&venv);
            return Err(EmulatorError::Venv {
                path: venv,
                output: tail(&out.stderr),
            });
        }
    }
    eprintln!(
        "amiflow: installing the local AWS emulator into {} (first run only)...",
        venv.display()
    );
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-r",
        ])
        .arg(&requirements_path)
        .output()
        .map_err(io("running pip"))?;
    if !out.status.success() {
        return Err(EmulatorError::Pip {
            output: tail(&out.stderr),
        });
    }
    std::fs::write(&stamp, &requirements).map_err(io(format!("writing {}", stamp.display())))?;
    Ok(python)
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// How to start an emulator.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds each instance-refresh phase lasts (short in tests).
    pub refresh_step: Duration,
    /// Stop the emulator when this process dies (tests); `false` leaves it running (`local up`).
    pub tied_to_parent: bool,
    /// Where the emulator's own log goes; `None` discards it.
    pub log_file: Option<PathBuf>,
    /// Port to bind; 0 lets the OS pick a free one.
    pub port: u16,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            refresh_step: Duration::from_millis(300),
            tied_to_parent: true,
            log_file: None,
            port: 0,
        }
    }
}

/// A running emulator; dropping it stops the server.
#[derive(Debug)]
pub struct Emulator {
    child: Option<Child>,
    // Held open so the launcher notices (EOF) when this process dies, however it dies.
    _stdin: Option<ChildStdin>,
    port: u16,
    pid: u32,
}

impl Emulator {
    /// Install if needed and start with default options (what tests want).
    pub fn start() -> Result<Self, EmulatorError> {
        Self::start_with(&Options::default())
    }

    pub fn start_with(options: &Options) -> Result<Self, EmulatorError> {
        let root = project_root();
        let python = ensure_venv(&root)?;
        let stderr = match &options.log_file {
            Some(path) => {
                Stdio::from(File::create(path).map_err(io(format!("creating {}", path.display())))?)
            }
            None => Stdio::null(),
        };
        let mut command = Command::new(&python);
        command
            .arg(root.join("local/launcher.py"))
            .args(["--host", "127.0.0.1", "--port", &options.port.to_string()])
            .env(
                "AMIFLOW_REFRESH_STEP_SECONDS",
                options.refresh_step.as_secs_f64().to_string(),
            )
            .stdout(Stdio::piped())
            .stderr(stderr);
        if options.tied_to_parent {
            command.arg("--exit-on-stdin-eof").stdin(Stdio::piped());
        } else {
            command.stdin(Stdio::null());
        }
        let mut child = command
            .spawn()
            .map_err(io(format!("starting {}", python.display())))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| EmulatorError::Start("no stdout".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut emulator = Emulator {
            child: Some(child),
            _stdin: stdin,
            port: 0,
            pid: 0,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| EmulatorError::Start("no ready line within 120 s".into()))?;
        let ready = parse_ready(&line).ok_or_else(|| {
            let hint = match &options.log_file {
                Some(path) => format!("see {}", path.display()),
                None => "rerun with a log file to see why".into(),
            };
            EmulatorError::Start(format!(
                "launcher said {:?} instead of its ready line; {hint}",
                line.trim()
            ))
        })?;
        emulator.port = ready.0;
        emulator.pid = ready.1;
        wait_until_answering(emulator.port, Duration::from_secs(30))?;
        Ok(emulator)
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Leave the server running after this handle is gone (for `amictl local up`).
    pub fn detach(mut self) -> u32 {
        self.child.take();
        self.pid
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parse_ready(line: &str) -> Option<(u16, u32)> {
    // {"event": "ready", "port": N, "pid": P} — parsed by hand to keep this crate dependency-free.
    let field = |name: &str| -> Option<u64> {
        let start = line.find(&format!("\"{name}\""))? + name.len() + 2;
        let rest = line[start..].trim_start().strip_prefix(':')?.trim_start();
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    if !line.contains("\"ready\"") {
        return None;
    }
    Some((
        u16::try_from(field("port")?).ok()?,
        u32::try_from(field("pid")?).ok()?,
    ))
}

/// Poll (with a deadline) until the server answers an HTTP request.
fn wait_until_answering(port: u16, within: Duration) -> Result<(), EmulatorError> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            if stream
                .write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .is_ok()
            {
                let mut head = [0u8; 12];
                if stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/") {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(EmulatorError::Start(format!(
                "port {port} did not answer within {within:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_is_parsed() {
        assert_eq!(
            parse_ready(r#"{"event": "ready", "port": 40123, "pid": 77}"#),
            Some((40123, 77))
        );
        assert_eq!(parse_ready("Traceback (most recent call last):"), None);
    }
}
