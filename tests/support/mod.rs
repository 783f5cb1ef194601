//! What the end-to-end tests share: where the sample agents are, and a
//! sandbox and run request built the way the node builds them.

#![allow(dead_code)]

pub mod scripted;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use node_runtime::sandbox::{
    Agent, BudgetRequest, EngineSettings, NodeLimits, RunContext, RunRequest, Sandbox, SandboxConfig,
};

/// The workspace's target directory, where `scripts/build-agents` puts the
/// sample agents.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// Path of a sample agent built by `scripts/build-agents`.
pub fn agent_path(name: &str) -> PathBuf {
    let path = target_dir().join("agents").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "sample agent {} is missing: run scripts/build-agents (scripts/test does)",
        path.display()
    );
    path
}

pub fn agent_bytes(name: &str) -> Arc<[u8]> {
    Arc::from(std::fs::read(agent_path(name)).expect("reading a sample agent"))
}

pub fn sandbox() -> Sandbox {
    sandbox_with(NodeLimits::default())
}

pub fn sandbox_with(limits: NodeLimits) -> Sandbox {
    Sandbox::new(SandboxConfig {
        limits,
        engine: EngineSettings {
            max_concurrent_runs: 4,
            ..EngineSettings::default()
        },
        llm: None,
        ..SandboxConfig::default()
    })
    .expect("the sandbox starts")
}

pub async fn load(sandbox: &Sandbox, name: &str) -> Arc<Agent> {
    sandbox
        .load(agent_bytes(name))
        .await
        .unwrap_or_else(|err| panic!("loading {name}: {err}"))
}

pub fn context(agent_id: &str, input_ref: &[(&str, &str)]) -> RunContext {
    RunContext {
        run_id: "run-0001".into(),
        lease_id: "lease-run-0001-0123456789abcdef0123456789abcdef".into(),
        agent_id: agent_id.into(),
        agent_version: "1.0.0".into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        input_ref: map(input_ref),
        metadata: BTreeMap::new(),
    }
}

pub fn request(agent_id: &str, input_ref: &[(&str, &str)], budget: BudgetRequest) -> RunRequest {
    RunRequest {
        context: context(agent_id, input_ref),
        budget,
        deadline: None,
    }
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub const MIB: u64 = 1 << 20;

/// A directory laid out as a node's agents directory
/// (`<dir>/<agent_id>/1.0.0.wasm`), linking to every built sample agent.
pub fn agents_layout() -> tempfile::TempDir {
    let layout = tempfile::tempdir().expect("temporary directory");
    let built = target_dir().join("agents");
    for entry in std::fs::read_dir(&built).expect("built sample agents: run scripts/build-agents") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "wasm") {
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let folder = layout.path().join(&name);
            std::fs::create_dir_all(&folder).unwrap();
            std::os::unix::fs::symlink(std::fs::canonicalize(&path).unwrap(), folder.join("1.0.0.wasm")).unwrap();
        }
    }
    layout
}

/// Every file below `dir` (none when it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T>(limit: std::time::Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Like [`eventually`], for checks that are themselves async.
pub async fn eventually_async<T, F, Fut>(limit: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A port free on 127.0.0.1 a moment ago, for a server the test starts
/// (in another process, or one that must bind a known port, or again on
/// the same port after a restart).
///
/// The port is below the kernel's range of ephemeral ports: an outgoing
/// connection of another test never takes it as its source port while the
/// server is down, which a port the kernel handed out with `:0` allows (a
/// restart then fails with "address in use").
pub fn free_port() -> u16 {
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let below = 10_000u16..ephemeral_low.max(10_001);
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(below.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `node-runtime dev --plane-only` with `--data-dir`, as its own process,
/// so a test can kill it and start it again on the same port.
pub fn spawn_plane_process(port: u16, data_dir: &std::path::Path, lease_ttl: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args([
            "dev",
            "--plane-only",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--lease-ttl",
            lease_ttl,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime dev --plane-only starts")
}

/// The `node-runtime` binary with `args`, logging warnings only.
pub fn node_runtime(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the node-runtime binary runs")
}

/// `run-agent AGENT --json` with `extra` flags: the exit code and the one
/// JSON object it printed.
pub fn run_agent_json(agent: &std::path::Path, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["run-agent", agent.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let output = node_runtime(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|err| {
        panic!(
            "stdout is not one JSON object ({err}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().expect("exited"), json)
}

/// The last `count` lines of `text`, for a failure message that must stay
/// short enough to be read in a CI excerpt.
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}
