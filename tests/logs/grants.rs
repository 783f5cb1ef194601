//! Sandbox grants, specified by what an agent can and cannot do: without
//! grants it opens no file, reads no variable and opens no socket; a
//! read-only directory reads but does not write; a read-write one writes
//! files the host sees; nothing escapes a directory with `..` or symlinks;
//! only granted variables are visible, with the node's values; a run's
//! metadata narrows grants and never widens them; grants are logged once
//! per agent; and `run-agent --dir/--env` grant the same from the command
//! line. The agent is `fs-env-probe`, which tries the operations it is
//! given (one per line of input_ref `ops`) and answers `ok...` or
//! `error: ...` for each.

use crate::capture_logs;
use crate::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use node_runtime::sandbox::{
    BudgetRequest, DirectoryGrant, EngineSettings, FailKind, Grants, ResultMap, RunOutcome, Sandbox, SandboxConfig,
    SandboxError,
};
use support::{agent_path, load, request};

const PROBE: &str = "fs-env-probe";
/// What a file outside every grant holds; seen by the agent only if it
/// escaped.
const SECRET: &str = "outside-the-grant-7d1f";

fn sandbox(grants: &[(&str, Grants)]) -> Sandbox {
    Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: 2,
            ..EngineSettings::default()
        },
        grants: grants
            .iter()
            .map(|(agent, grants)| (agent.to_string(), grants.clone()))
            .collect(),
        ..SandboxConfig::default()
    })
    .expect("the sandbox starts")
}

fn dir(host: &Path, guest: &str, read_only: bool) -> DirectoryGrant {
    DirectoryGrant {
        host_path: host.to_path_buf(),
        guest_path: guest.to_string(),
        read_only,
    }
}

/// Runs the probe as `agent_id` with `ops` and the run metadata given, and
/// returns its answers.
async fn probe(sandbox: &Sandbox, agent_id: &str, ops: &[&str], metadata: &[(&str, &str)]) -> ResultMap {
    let agent = load(sandbox, PROBE).await;
    let joined = ops.join("\n");
    let mut request = request(agent_id, &[("ops", &joined)], BudgetRequest::default());
    request.context.metadata = support::map(metadata);
    match sandbox.run(&agent, request).await.outcome {
        RunOutcome::Completed(result) => result,
        RunOutcome::Failed(failure) => panic!("the probe failed: {failure:?}"),
    }
}

fn answer<'a>(seen: &'a ResultMap, op: &str) -> &'a str {
    seen.get(op)
        .unwrap_or_else(|| panic!("no answer to `{op}` in {seen:#?}"))
}

fn assert_ok(seen: &ResultMap, op: &str, expected: &str) {
    let want = if expected.is_empty() {
        "ok".to_string()
    } else {
        format!("ok: {expected}")
    };
    assert_eq!(answer(seen, op), want, "`{op}` in {seen:#?}");
}

fn assert_refused(seen: &ResultMap, op: &str) {
    let got = answer(seen, op);
    assert!(
        got.starts_with("error: "),
        "`{op}` should have been refused, got {got:?}"
    );
    assert!(!got.contains(SECRET), "`{op}` leaked the secret: {got:?}");
}

/// A loopback TCP listener and UDP socket that report, without waiting,
/// whether anything reached them.
struct Targets {
    tcp: std::net::TcpListener,
    udp: std::net::UdpSocket,
}

impl Targets {
    fn bind() -> Targets {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tcp.set_nonblocking(true).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_nonblocking(true).unwrap();
        Targets { tcp, udp }
    }

    /// A connection the guest made would sit in the backlog, and a datagram
    /// it sent in the receive buffer, by the time its run returned.
    fn assert_untouched(&self) {
        match self.tcp.accept() {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the TCP listener saw a connection: {other:?}"),
        }
        let mut buffer = [0u8; 64];
        match self.udp.recv_from(&mut buffer) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the UDP socket received a datagram: {other:?}"),
        }
    }
}

#[tokio::test]
async fn without_grants_an_agent_opens_no_file_reads_no_variable_and_opens_no_socket() {
    // Another agent is granted a directory and a variable: none of it
    // reaches this one.
    let granted = tempfile::tempdir().unwrap();
    std::fs::write(granted.path().join("data.txt"), SECRET).unwrap();
    let sandbox = sandbox(&[(
        "someone-else",
        Grants {
            directories: vec![dir(granted.path(), "/data", false)],
            environment: vec!["PATH".into()],
            ..Grants::default()
        },
    )]);
    let targets = Targets::bind();
    let tcp = format!("tcp {}", targets.tcp.local_addr().unwrap());
    let udp = format!("udp {}", targets.udp.local_addr().unwrap());
    let refused = [
        "read /etc/passwd",
        "read /data/data.txt",
        "read data.txt",
        "list /",
        "list .",
        "list /data",
        "write /tmp/probe-was-here=x",
        "write probe-was-here=x",
        "mkdir /tmp/probe-dir",
        "env PATH",
        "env HOME",
        tcp.as_str(),
        udp.as_str(),
    ];
    let mut ops = refused.to_vec();
    ops.push("env-names");
    let seen = probe(&sandbox, PROBE, &ops, &[]).await;

    for op in refused {
        assert_refused(&seen, op);
    }
    assert_ok(&seen, "env-names", "");
    targets.assert_untouched();
    assert!(!Path::new("/tmp/probe-was-here").exists());
}

#[tokio::test]
async fn a_read_only_grant_reads_and_lists_but_never_writes() {
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("invoice.txt"), "INV-1001").unwrap();
    std::fs::create_dir(host.path().join("archive")).unwrap();
    let sandbox = sandbox(&[(
        PROBE,
        Grants {
            directories: vec![dir(host.path(), "/ref", true)],
            ..Grants::default()
        },
    )]);
    let seen = probe(
        &sandbox,
        PROBE,
        &[
            "read /ref/invoice.txt",
            "list /ref",
            "write /ref/invoice.txt=tampered",
            "write /ref/new.txt=x",
            "mkdir /ref/made",
            "remove /ref/invoice.txt",
            "write /ref/archive/new.txt=x",
        ],
        &[],
    )
    .await;

    assert_ok(&seen, "read /ref/invoice.txt", "INV-1001");
    assert_ok(&seen, "list /ref", "archive,invoice.txt");
    for op in [
        "write /ref/invoice.txt=tampered",
        "write /ref/new.txt=x",
        "mkdir /ref/made",
        "remove /ref/invoice.txt",
        "write /ref/archive/new.txt=x",
    ] {
        assert_refused(&seen, op);
    }
    assert_eq!(
        std::fs::read_to_string(host.path().join("invoice.txt")).unwrap(),
        "INV-1001"
    );
    assert!(!host.path().join("new.txt").exists());
    assert!(!host.path().join("made").exists());
    assert!(!host.path().join("archive/new.txt").exists());
}

#[tokio::test]
async fn a_read_write_grant_writes_files_the_host_sees() {
    let host = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&[(
        PROBE,
        Grants {
            directories: vec![dir(host.path(), "/out", false)],
            ..Grants::default()
        },
    )]);
    let seen = probe(
        &sandbox,
        PROBE,
        &[
            "mkdir /out/reports",
            "write /out/reports/summary.txt=3 invoices classified",
            "read /out/reports/summary.txt",
            "write /out/scratch.txt=x",
            "remove /out/scratch.txt",
        ],
        &[],
    )
    .await;

    for op in [
        "mkdir /out/reports",
        "write /out/reports/summary.txt=3 invoices classified",
        "remove /out/scratch.txt",
    ] {
        assert_ok(&seen, op, "");
    }
    assert_ok(&seen, "read /out/reports/summary.txt", "3 invoices classified");
    assert_eq!(
        std::fs::read_to_string(host.path().join("reports/summary.txt")).unwrap(),
        "3 invoices classified"
    );
    assert!(!host.path().join("scratch.txt").exists());
}

#[tokio::test]
async fn no_path_escapes_a_granted_directory_by_dot_dot_or_symlink() {
    // outside/secret.txt sits next to the granted directory; the granted
    // directory holds symlinks pointing at it, absolute and relative.
    let root = tempfile::tempdir().unwrap();
    let outside = root.path().join("outside");
    let granted = root.path().join("granted");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(granted.join("sub")).unwrap();
    std::fs::write(outside.join("secret.txt"), SECRET).unwrap();
    std::fs::write(root.path().join("secret.txt"), SECRET).unwrap();
    std::fs::write(granted.join("inside.txt"), "inside").unwrap();
    let link = |target: &Path, name: &str| std::os::unix::fs::symlink(target, granted.join(name)).unwrap();
    link(&outside.join("secret.txt"), "absolute-file-link");
    link(Path::new("../outside/secret.txt"), "relative-file-link");
    link(&outside, "absolute-dir-link");
    link(Path::new("../outside"), "relative-dir-link");
    link(Path::new("/etc/passwd"), "passwd-link");
    link(Path::new("inside.txt"), "inner-link");

    let sandbox = sandbox(&[(
        PROBE,
        Grants {
            directories: vec![dir(&granted, "/data", false)],
            ..Grants::default()
        },
    )]);
    let escapes = [
        "read /data/../secret.txt",
        "read /data/../outside/secret.txt",
        "read /data/sub/../../secret.txt",
        "read /data/absolute-file-link",
        "read /data/relative-file-link",
        "read /data/absolute-dir-link/secret.txt",
        "read /data/relative-dir-link/secret.txt",
        "read /data/passwd-link",
        "list /data/..",
        "list /data/absolute-dir-link",
        "list /data/relative-dir-link",
        "write /data/../escaped.txt=x",
        "write /data/absolute-dir-link/escaped.txt=x",
        "write /data/relative-dir-link/escaped.txt=x",
        "write /data/absolute-file-link=overwritten",
    ];
    let mut ops = escapes.to_vec();
    ops.extend([
        "read /data/inside.txt",
        "read /data/inner-link",
        "read /data/sub/../inside.txt",
    ]);
    let seen = probe(&sandbox, PROBE, &ops, &[]).await;

    for op in escapes {
        assert_refused(&seen, op);
    }
    // Inside the grant, links and `..` work as usual.
    assert_ok(&seen, "read /data/inside.txt", "inside");
    assert_ok(&seen, "read /data/inner-link", "inside");
    assert_ok(&seen, "read /data/sub/../inside.txt", "inside");
    assert!(!root.path().join("escaped.txt").exists());
    assert!(!outside.join("escaped.txt").exists());
    assert_eq!(std::fs::read_to_string(outside.join("secret.txt")).unwrap(), SECRET);
}

#[tokio::test]
async fn only_granted_variables_are_visible_with_the_nodes_values() {
    // Variables cargo sets for every test process, so the node has them.
    let path = std::env::var("PATH").expect("PATH is set");
    let package = std::env::var("CARGO_PKG_NAME").expect("cargo sets CARGO_PKG_NAME");
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok());
    let unset = "NODE_RUNTIME_GRANTS_TEST_NEVER_SET";
    assert!(std::env::var(unset).is_err());
    let sandbox = sandbox(&[(
        PROBE,
        Grants {
            environment: vec!["PATH".into(), "CARGO_PKG_NAME".into(), unset.into()],
            ..Grants::default()
        },
    )]);
    let env_unset = format!("env {unset}");
    let seen = probe(
        &sandbox,
        PROBE,
        &[
            "env-names",
            "env PATH",
            "env CARGO_PKG_NAME",
            "env CARGO_MANIFEST_DIR",
            &env_unset,
        ],
        &[],
    )
    .await;

    assert_ok(&seen, "env-names", "CARGO_PKG_NAME,PATH");
    assert_ok(&seen, "env PATH", &path);
    assert_ok(&seen, "env CARGO_PKG_NAME", &package);
    assert_refused(&seen, "env CARGO_MANIFEST_DIR");
    assert_refused(&seen, &env_unset);
}

#[tokio::test]
async fn run_metadata_narrows_grants_and_never_widens_them() {
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(rw.path().join("in.txt"), "rw").unwrap();
    std::fs::write(ro.path().join("in.txt"), "ro").unwrap();
    let sandbox = sandbox(&[(
        PROBE,
        Grants {
            directories: vec![dir(rw.path(), "/rw", false), dir(ro.path(), "/ro", true)],
            environment: vec!["PATH".into(), "CARGO_PKG_NAME".into()],
            ..Grants::default()
        },
    )]);

    // Downgrades and drops: /rw becomes read-only, /ro stays read-only
    // although named without `:ro`; names not granted add nothing.
    let seen = probe(
        &sandbox,
        PROBE,
        &[
            "read /rw/in.txt",
            "write /rw/out.txt=x",
            "read /ro/in.txt",
            "write /ro/out.txt=x",
            "read /etc/passwd",
            "list /tmp",
            "env-names",
        ],
        &[
            ("fs.allow", "/rw:ro, /ro, /etc, /tmp"),
            ("env.allow", "CARGO_PKG_NAME, CARGO_MANIFEST_DIR, HOME"),
        ],
    )
    .await;
    assert_ok(&seen, "read /rw/in.txt", "rw");
    assert_refused(&seen, "write /rw/out.txt=x");
    assert_ok(&seen, "read /ro/in.txt", "ro");
    assert_refused(&seen, "write /ro/out.txt=x");
    assert_refused(&seen, "read /etc/passwd");
    assert_refused(&seen, "list /tmp");
    assert_ok(&seen, "env-names", "CARGO_PKG_NAME");
    assert!(!rw.path().join("out.txt").exists());
    assert!(!ro.path().join("out.txt").exists());

    // A directory not named is not there at all; empty lists grant nothing.
    let seen = probe(
        &sandbox,
        PROBE,
        &["read /rw/in.txt", "read /ro/in.txt", "env-names"],
        &[("fs.allow", "/ro"), ("env.allow", "")],
    )
    .await;
    assert_refused(&seen, "read /rw/in.txt");
    assert_ok(&seen, "read /ro/in.txt", "ro");
    assert_ok(&seen, "env-names", "");

    // Without the keys, the run has everything the agent was granted.
    let seen = probe(&sandbox, PROBE, &["write /rw/out.txt=x", "env-names"], &[]).await;
    assert_ok(&seen, "write /rw/out.txt=x", "");
    assert_ok(&seen, "env-names", "CARGO_PKG_NAME,PATH");
}

// The subscriber is the process's global one (`capture_logs`): a
// thread-scoped one misses events whose callsites other tests, running in
// parallel, registered first. The agent ids are this test's own, so other
// tests' lines do not count.
#[tokio::test]
async fn grants_are_logged_once_per_agent_at_its_first_run_without_values() {
    let captured = capture_logs();

    let host = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&[(
        "logged-agent",
        Grants {
            directories: vec![dir(host.path(), "/data", true)],
            environment: vec!["PATH".into()],
            http_hosts: vec!["api.example.com:443".into()],
        },
    )]);
    for _ in 0..3 {
        probe(&sandbox, "logged-agent", &["env-names"], &[]).await;
    }
    probe(&sandbox, "another-logged-agent", &["env-names"], &[]).await;

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines = |agent: &str| {
        let needle = format!("sandbox grants for agent `{agent}`");
        log.lines()
            .filter(|line| line.contains(&needle))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let logged = lines("logged-agent");
    assert_eq!(logged.len(), 1, "captured log:\n{log}");
    let line = &logged[0];
    for granted in [
        "/data (read-only)",
        "environment: PATH",
        "outbound HTTP: api.example.com:443",
        "sockets: none",
    ] {
        assert!(line.contains(granted), "{granted:?} in {line}");
    }
    assert!(
        !line.contains(&std::env::var("PATH").unwrap()),
        "a value was logged: {line}"
    );
    let other = lines("another-logged-agent");
    assert_eq!(other.len(), 1, "captured log:\n{log}");
    assert!(
        other[0].contains("directories: none; environment: none; outbound HTTP: none"),
        "{}",
        other[0]
    );
}

#[tokio::test]
async fn a_granted_directory_is_checked_at_start_and_again_at_each_run() {
    let missing = tempfile::tempdir().unwrap().path().join("gone");
    let err = Sandbox::new(SandboxConfig {
        grants: BTreeMap::from([(
            PROBE.to_string(),
            Grants {
                directories: vec![dir(&missing, "/data", true)],
                ..Grants::default()
            },
        )]),
        ..SandboxConfig::default()
    })
    .err()
    .expect("a missing directory is refused");
    assert!(matches!(err, SandboxError::Grant { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(PROBE) && message.contains(&missing.display().to_string()),
        "{message}"
    );

    // Removed after start-up: the run is handed back, naming the directory.
    let host = tempfile::tempdir().unwrap();
    let path = host.path().to_path_buf();
    let sandbox = sandbox(&[(
        PROBE,
        Grants {
            directories: vec![dir(&path, "/data", true)],
            ..Grants::default()
        },
    )]);
    drop(host);
    let agent = load(&sandbox, PROBE).await;
    let result = sandbox
        .run(
            &agent,
            request(PROBE, &[("ops", "env-names")], BudgetRequest::default()),
        )
        .await;
    let failure = result.outcome.failure().expect("the run cannot start").clone();
    assert_eq!(failure.kind, FailKind::NodeUnavailable);
    assert!(failure.retryable);
    assert!(
        failure.message.contains("/data") && failure.message.contains(&path.display().to_string()),
        "{}",
        failure.message
    );
}

// The binary, as a developer drives it.

fn run_agent(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let probe = agent_path(PROBE);
    Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("run-agent")
        .arg(&probe)
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .output()
        .expect("the node-runtime binary runs")
}

#[test]
fn run_agent_dir_and_env_flags_grant_exactly_what_they_name() {
    let ro = tempfile::tempdir().unwrap();
    let rw = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("in.txt"), "from the host").unwrap();
    let ro_flag = format!("{}::/ref:ro", ro.path().display());
    let rw_flag = format!("{}::/out:rw", rw.path().display());
    let ops = [
        "read /ref/in.txt",
        "write /ref/new.txt=x",
        "write /out/result.txt=written by the agent",
        "env GRANTS_TEST_TENANT",
        "env GRANTS_TEST_NOT_GRANTED",
        "env-names",
    ]
    .join("\n");
    let ops_ref = format!("ops={ops}");
    let output = run_agent(
        &[
            "--json",
            "--input-ref",
            &ops_ref,
            "--dir",
            &ro_flag,
            "--dir",
            &rw_flag,
            "--env",
            "GRANTS_TEST_TENANT",
        ],
        &[("GRANTS_TEST_TENANT", "acme"), ("GRANTS_TEST_NOT_GRANTED", SECRET)],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    let result = &json["result"];
    assert_eq!(result["read /ref/in.txt"], "ok: from the host");
    assert!(
        result["write /ref/new.txt=x"].as_str().unwrap().starts_with("error: "),
        "{result}"
    );
    assert_eq!(result["write /out/result.txt=written by the agent"], "ok");
    assert_eq!(result["env GRANTS_TEST_TENANT"], "ok: acme");
    assert!(
        result["env GRANTS_TEST_NOT_GRANTED"]
            .as_str()
            .unwrap()
            .starts_with("error: "),
        "{result}"
    );
    assert_eq!(result["env-names"], "ok: GRANTS_TEST_TENANT");
    assert!(!stdout.contains(SECRET));
    assert_eq!(
        std::fs::read_to_string(rw.path().join("result.txt")).unwrap(),
        "written by the agent"
    );
    assert!(!ro.path().join("new.txt").exists());

    let logged: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sandbox grants for agent `fs-env-probe`"))
        .collect();
    assert_eq!(logged.len(), 1, "{stderr}");
    assert!(
        logged[0].contains("/ref (read-only)") && logged[0].contains("/out (read-write)"),
        "{}",
        logged[0]
    );
    assert!(
        logged[0].contains("environment: GRANTS_TEST_TENANT") && !logged[0].contains("acme"),
        "{}",
        logged[0]
    );
}

#[test]
fn run_agent_dir_is_read_only_unless_rw_is_asked_for() {
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("in.txt"), "from the host").unwrap();
    let flag = format!("{}::/data", host.path().display());
    let ops_ref = "ops=read /data/in.txt\nwrite /data/new.txt=x";
    let output = run_agent(&["--json", "--input-ref", ops_ref, "--dir", &flag], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["result"]["read /data/in.txt"], "ok: from the host");
    assert!(
        json["result"]["write /data/new.txt=x"]
            .as_str()
            .unwrap()
            .starts_with("error: "),
        "{json}"
    );
    assert!(
        !host.path().join("new.txt").exists(),
        "a plain --dir let the agent write"
    );
    assert!(stderr.contains("/data (read-only)"), "{stderr}");

    let help = Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(["run-agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("HOST::GUEST[:rw]") && help.contains("read-write with `:rw`"),
        "{help}"
    );
}

#[test]
fn run_agent_without_flags_grants_nothing() {
    let output = run_agent(
        &["--json", "--input-ref", "ops=read /etc/passwd\nenv-names\nlist /"],
        &[("GRANTS_TEST_TENANT", "acme")],
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        json["result"]["read /etc/passwd"]
            .as_str()
            .unwrap()
            .starts_with("error: ")
    );
    assert!(json["result"]["list /"].as_str().unwrap().starts_with("error: "));
    assert_eq!(json["result"]["env-names"], "ok");
}

#[test]
fn bad_dir_and_env_flags_are_usage_errors_that_name_the_flag_and_the_fix() {
    let host = tempfile::tempdir().unwrap();
    let host_dir = host.path().display().to_string();
    let file = host.path().join("file.txt");
    std::fs::write(&file, "x").unwrap();
    let missing = host.path().join("missing");
    std::fs::create_dir(host.path().join("inner")).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--dir".into(), host_dir.clone()], "no `::`"),
        (vec!["--dir".into(), "::/data".into()], "names no host directory"),
        (
            vec!["--dir".into(), format!("{host_dir}::data")],
            "not an absolute path",
        ),
        (
            vec!["--dir".into(), format!("{host_dir}::/data/../etc")],
            "guest path `/data/../etc`",
        ),
        (
            vec!["--dir".into(), format!("{host_dir}::/data:rwx")],
            "not an absolute path",
        ),
        (
            vec![
                "--dir".into(),
                format!("{host_dir}::/data:rw"),
                "--dir".into(),
                format!("{host_dir}/inner::/inner"),
            ],
            "lies inside",
        ),
        (
            vec!["--dir".into(), format!("{}::/data", missing.display())],
            "does not exist",
        ),
        (
            vec!["--dir".into(), format!("{}::/data", file.display())],
            "is not a directory",
        ),
        (vec!["--env".into(), "TOKEN=abc".into()], "name only"),
        (vec!["--env".into(), "".into()], "name only"),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = run_agent(&args, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        let flag = args[0];
        assert!(stderr.contains(flag), "{args:?}: the flag is not named in {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}: the agent ran");
    }
}

#[test]
fn run_agent_never_passes_the_llm_key_variable() {
    let output = run_agent(
        &[
            "--llm-endpoint",
            "http://127.0.0.1:9",
            "--llm-key-env",
            "GRANTS_TEST_LLM_KEY",
            "--env",
            "GRANTS_TEST_LLM_KEY",
            "--input-ref",
            "ops=env GRANTS_TEST_LLM_KEY",
        ],
        &[("GRANTS_TEST_LLM_KEY", SECRET)],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--env GRANTS_TEST_LLM_KEY") && stderr.contains("never given"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty() && !stderr.contains(SECRET), "{stderr}");
}

// From the configuration file.

#[tokio::test]
async fn grants_in_the_configuration_reach_the_agents_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("inbox")).unwrap();
    std::fs::write(dir.path().join("inbox/invoice.txt"), "INV-7").unwrap();
    let json = r#"{"Sandbox": {
        "AllowedHosts": {"fs-env-probe": ["old.example.com"]},
        "Grants": {"fs-env-probe": {
            "Directories": [{"HostPath": "inbox", "GuestPath": "/inbox"}],
            "Environment": ["CARGO_PKG_NAME"],
            "AllowedHosts": ["api.example.com:443"]
        }}
    }}"#;
    let config = node_runtime::config::NodeConfig::from_json_str(json, dir.path(), Vec::new()).unwrap();
    let sandbox = Sandbox::new(node_runtime::app::sandbox_config(&config)).expect("the sandbox starts");
    let hosts: Vec<String> = sandbox.allowed_hosts(PROBE).iter().map(ToString::to_string).collect();
    assert_eq!(hosts, ["api.example.com:443", "old.example.com"]);

    let seen = probe(
        &sandbox,
        PROBE,
        &["read /inbox/invoice.txt", "write /inbox/x.txt=x", "env-names"],
        &[],
    )
    .await;
    assert_ok(&seen, "read /inbox/invoice.txt", "INV-7");
    assert_refused(&seen, "write /inbox/x.txt=x");
    assert_ok(&seen, "env-names", "CARGO_PKG_NAME");
}

#[test]
fn config_check_refuses_a_granted_directory_that_does_not_exist_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("appsettings.json");
    std::fs::write(
        &file,
        r#"{"Sandbox": {"Grants": {"echo": {"Directories": [{"HostPath": "nowhere", "GuestPath": "/data"}]}}}}"#,
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .expect("the node-runtime binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for expected in [
        "Sandbox.Grants.echo.Directories.0.HostPath",
        "\"nowhere\"",
        &dir.path().join("nowhere").display().to_string(),
        &file.display().to_string(),
        "no such directory; create it, or fix the path",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
    }
}

#[test]
fn config_check_refuses_a_grant_on_the_node_s_own_directories_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("compiled")).unwrap();
    std::fs::create_dir(dir.path().join("agents")).unwrap();
    std::fs::create_dir(dir.path().join("shared")).unwrap();
    let file = dir.path().join("appsettings.json");
    let check = |host_path: &str, read_only: bool| {
        let json = format!(
            r#"{{"NodeRuntime": {{"DataDirectory": "data", "AgentsDirectory": "agents"}},
                "Sandbox": {{"Grants": {{"echo": {{"Directories": [
                    {{"HostPath": "{host_path}", "GuestPath": "/cache", "ReadOnly": {read_only}}}
                ]}}}}}}}}"#
        );
        std::fs::write(&file, json).unwrap();
        Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .args(["config", "check", "--config"])
            .arg(&file)
            .output()
            .expect("the node-runtime binary runs")
    };
    // The compiled cache, where the node trusts `.cwasm` files by name.
    for (host_path, read_only, node_key) in [
        ("data/compiled", false, "NodeRuntime.DataDirectory"),
        ("data", true, "NodeRuntime.DataDirectory"),
        ("agents", false, "NodeRuntime.AgentsDirectory"),
    ] {
        let output = check(host_path, read_only);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{host_path}: {stderr}");
        for expected in [
            "Sandbox.Grants.echo.Directories.0.HostPath",
            &dir.path().join(host_path).display().to_string(),
            node_key,
            &file.display().to_string(),
            "Grant a directory that neither contains nor lies inside",
        ] {
            assert!(stderr.contains(expected), "{expected:?} in {stderr}");
        }
    }
    let output = check("shared", false);
    assert_eq!(
        output.status.code(),
        Some(0),
        "a directory beside them is granted: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
