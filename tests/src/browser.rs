//! Browser tests' runner: Node scripts in `tests/browser/` driving Debian's chromium through
//! playwright-core (no browser downloads), with the packages `tests/browser/setup.sh` installs
//! outside the clone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{ensure, Context};

/// The command that installs the Node packages, named in every error about them.
pub const SETUP_COMMAND: &str = "bash tests/browser/setup.sh";

/// `TRIBUTARY_NODE_DIR`, else `~/.cache/tributary-node`.
pub fn node_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TRIBUTARY_NODE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("HOME is not set (or set TRIBUTARY_NODE_DIR)")?;
    Ok(PathBuf::from(home).join(".cache/tributary-node"))
}

/// Runs `tests/browser/setup.sh` once per test process (parallel tests share one npm install).
fn setup() -> anyhow::Result<PathBuf> {
    static SETUP: Mutex<()> = Mutex::new(());
    let _once = SETUP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = node_dir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/setup.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("TRIBUTARY_NODE_DIR", &dir)
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    ensure!(
        out.status.success(),
        "`{SETUP_COMMAND}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(dir)
}

/// `node tests/browser/<script>` with `env`, after the setup; its stdout on success, and on
/// failure an error holding its stdout and stderr (a script reports with `fail()`).
pub fn run_script(script: &str, env: &[(&str, String)]) -> anyhow::Result<String> {
    let dir = setup()?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser").join(script);
    let mut cmd = Command::new("node");
    cmd.arg(&path).env("NODE_PATH", dir.join("node_modules"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().with_context(|| format!("run node {}", path.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "node {script} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}
