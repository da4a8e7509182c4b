//! The emulator shim's own boto3 checks (local/tests), run with the project venv's python, so
//! `cargo test` covers them too. The suite starts its own launcher on a free port.

use std::process::Command;

#[test]
fn shim_boto3_suite_passes() {
    let root = emulator::project_root();
    let python = emulator::ensure_venv(&root).expect("the project venv installs");
    let out = Command::new(&python)
        .args(["-m", "pytest"])
        .arg(root.join("local/tests"))
        .args(["-q", "-p", "no:cacheprovider"])
        .current_dir(&root)
        .env_remove("AWS_ENDPOINT_URL")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pytest local/tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // pytest exits 5 when it collects nothing; also make sure something ran and passed.
    assert!(stdout.contains(" passed"), "no passing checks:\n{stdout}");
}
