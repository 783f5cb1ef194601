//! Mutual TLS between `node-runtime serve` and a control plane that
//! requires client certificates, both real, on loopback, with
//! certificates made in the test: the good path over REST and gRPC, each
//! way a handshake is refused (with the log line that names the cause, and
//! no run executed), bad certificate files at start-up, client certificate
//! rotation while the node runs, secrets that never leak, and `dev
//! --tls-dir`, whose plane binds each node id to its certificate's CN.

use crate::certs;
use crate::otlp;
use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use certs::{TestCa, plane_tls};
use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, PlaneTls, RunStatus};
use support::*;

const NODE_BINARY: &str = env!("CARGO_BIN_EXE_node-runtime");

async fn start_plane(listen: &str, tls: PlaneTls) -> DevPlane {
    DevPlane::start(PlaneOptions {
        listen: listen.parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        tls: Some(tls),
        ..PlaneOptions::default()
    })
    .await
    .unwrap()
}

fn echo_run(message: &str) -> NewRun {
    NewRun {
        agent_id: "echo".to_string(),
        version: "1.0.0".to_string(),
        input_ref: BTreeMap::from([("message".to_string(), message.to_string())]),
        metadata: BTreeMap::new(),
        budgets: Budgets::default(),
    }
}

/// A `node-runtime serve` process and the file its log goes to.
struct ServedNode {
    child: tokio::process::Child,
    log: PathBuf,
    _agents: tempfile::TempDir,
}

impl ServedNode {
    /// SIGTERM, then waits (at most 30 s) for the drain and exit.
    async fn stop(&mut self) {
        let pid = self.child.id().expect("the node is running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the node exits after SIGTERM")
            .unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 40 s) for a log line containing `needle`.
    async fn wait_for_log(&self, needle: &str) -> String {
        let log = &self.log;
        eventually(
            Duration::from_secs(40),
            &format!("a node log line with {needle:?}"),
            || {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                text.lines().find(|line| line.contains(needle)).map(str::to_string)
            },
        )
        .await
    }
}

/// The node's configuration file: a fast heartbeat, the sample agents,
/// and the given `MTls` and `AgentRuntime` sections.
fn write_config(
    dir: &Path,
    url: &str,
    agents: &Path,
    mtls: serde_json::Value,
    agent_runtime: serde_json::Value,
) -> PathBuf {
    let config = serde_json::json!({
        "NodeRuntime": {
            "NodeId": "tls-node",
            "ControlPlaneUrl": url,
            "HeartbeatIntervalSeconds": 1,
            "MaxConcurrentLeases": 2,
            "Capacity": {"Slots": 2},
            "AgentsDirectory": agents,
            "DataDirectory": dir.join("data"),
        },
        "MTls": mtls,
        "AgentRuntime": agent_runtime,
    });
    let path = dir.join("appsettings.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

fn start_node(dir: &Path, config: &Path, env: &[(&str, &str)]) -> ServedNode {
    let log = dir.join("node.log");
    let agents = agents_layout();
    let mut command = tokio::process::Command::new(NODE_BINARY);
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .env("NodeRuntime__AgentsDirectory", agents.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    ServedNode {
        child: command.spawn().expect("node-runtime serve starts"),
        log,
        _agents: agents,
    }
}

fn mtls(ca: &Path, cert: &Path, key: &Path) -> serde_json::Value {
    serde_json::json!({
        "Enabled": true,
        "ClientCertificatePath": cert,
        "ClientKeyPath": key,
        "ServerCaCertificatePath": ca,
        "ExpectedServerCertificateSubject": "control-plane",
    })
}

/// One CA for everything, a plane requiring its client certificates, and
/// a node presenting `node_cn`.
struct Setup {
    dir: tempfile::TempDir,
    ca: TestCa,
    ca_path: PathBuf,
    server: certs::Leaf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("test CA");
        let ca_path = ca.write(dir.path(), "ca-cert.pem");
        let server = ca.server("control-plane");
        Setup {
            dir,
            ca,
            ca_path,
            server,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_good_client_certificate_registers_pulls_and_completes_runs_over_tls() {
    let setup = Setup::new();
    let plane = start_plane("127.0.0.1:0", plane_tls(&setup.server, &setup.ca, &["node-a"])).await;
    assert!(plane.url().starts_with("https://127.0.0.1:"), "{}", plane.url());
    let (cert, key) = setup.ca.client("node-a").write(setup.dir.path(), "node");
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        mtls(&setup.ca_path, &cert, &key),
        serde_json::json!({}),
    );
    let node = start_node(setup.dir.path(), &config, &[]);

    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(plane.submit(echo_run(&format!("invoice {i}"))).await.unwrap().run_id);
    }
    eventually(Duration::from_secs(60), "three runs to complete", || {
        ids.iter()
            .all(|id| plane.run(id).is_some_and(|run| run.status == RunStatus::Completed))
            .then_some(())
    })
    .await;
    for (i, id) in ids.iter().enumerate() {
        let run = plane.run(id).unwrap();
        assert_eq!(run.node_id.as_deref(), Some("tls-node"), "{run:?}");
        assert_eq!(run.result.as_ref().unwrap()["message"], format!("invoice {i}"));
        assert_eq!(run.outcomes, 1);
    }
    // REST: registered and heartbeating over TLS (the plane speaks nothing else).
    let nodes = plane.nodes();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].node_id, "tls-node");
    // Both links presented the certificate: at least the REST connection
    // and the gRPC channel, every one as node-a.
    let subjects = plane.client_subjects();
    assert!(subjects.len() >= 2, "{subjects:?}");
    assert!(subjects.iter().all(|subject| subject == "node-a"), "{subjects:?}");
    assert!(node.log().contains("client certificate loaded"), "{}", node.log());
}

/// Starts a node against a plane that must refuse it, waits for the log
/// line naming `cause`, and checks that the plane has no node and ran
/// nothing.
async fn refused(plane: &DevPlane, node: &ServedNode, cause: &str) {
    let run = plane.submit(echo_run("must not run")).await.unwrap();
    let line = node.wait_for_log(cause).await;
    assert!(line.contains("WARN"), "a warning: {line}");
    // Give a wrongly accepted node every chance to show up: two more
    // failed attempts logged.
    let attempts = |log: &str| log.lines().filter(|line| line.contains(cause)).count();
    let seen = attempts(&node.log());
    eventually(Duration::from_secs(40), "two more refused attempts", || {
        (attempts(&node.log()) >= seen + 2).then_some(())
    })
    .await;
    assert!(plane.nodes().is_empty(), "no node registered: {:?}", plane.nodes());
    let run = plane.run(&run.run_id).unwrap();
    assert_eq!(run.status, RunStatus::Pending, "nothing ran: {run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_client_certificate_is_refused_and_says_a_certificate_is_required() {
    let setup = Setup::new();
    let plane = start_plane("127.0.0.1:0", plane_tls(&setup.server, &setup.ca, &[])).await;
    // MTls off: ordinary verification, with the test CA as the system's roots.
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        serde_json::json!({"Enabled": false}),
        serde_json::json!({}),
    );
    let node = start_node(
        setup.dir.path(),
        &config,
        &[("SSL_CERT_FILE", setup.ca_path.to_str().unwrap())],
    );
    refused(&plane, &node, "requires a client certificate and none was sent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let setup = Setup::new();
    let plane = start_plane("127.0.0.1:0", plane_tls(&setup.server, &setup.ca, &[])).await;
    let stranger = TestCa::new("another CA");
    let (cert, key) = stranger.client("node-a").write(setup.dir.path(), "node");
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        mtls(&setup.ca_path, &cert, &key),
        serde_json::json!({}),
    );
    let node = start_node(setup.dir.path(), &config, &[]);
    refused(&plane, &node, "issued by a CA it does not trust").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_a_ca_other_than_the_configured_one_is_refused() {
    let setup = Setup::new();
    let other = TestCa::new("another CA");
    let plane = start_plane("127.0.0.1:0", plane_tls(&other.server("control-plane"), &setup.ca, &[])).await;
    let (cert, key) = setup.ca.client("node-a").write(setup.dir.path(), "node");
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        mtls(&setup.ca_path, &cert, &key),
        serde_json::json!({}),
    );
    let node = start_node(setup.dir.path(), &config, &[]);
    refused(&plane, &node, "certificate is not issued by a trusted CA").await;
    assert!(
        plane.client_subjects().is_empty(),
        "the node never completed a handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_the_trusted_ca_for_another_host_is_refused() {
    // The right CA, the right CN, but issued for another host than the one
    // ControlPlaneUrl names (127.0.0.1): a certificate stolen from another
    // service of the same CA must not pass.
    let setup = Setup::new();
    let elsewhere = setup.ca.server_for("control-plane", &["billing.internal.example"]);
    let plane = start_plane("127.0.0.1:0", plane_tls(&elsewhere, &setup.ca, &[])).await;
    let (cert, key) = setup.ca.client("node-a").write(setup.dir.path(), "node");
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        mtls(&setup.ca_path, &cert, &key),
        serde_json::json!({}),
    );
    let node = start_node(setup.dir.path(), &config, &[]);
    refused(&plane, &node, "does not name the host of NodeRuntime.ControlPlaneUrl").await;
    assert!(
        plane.client_subjects().is_empty(),
        "the node never completed a handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cn_other_than_the_expected_subject_is_refused() {
    let setup = Setup::new();
    let plane = start_plane("127.0.0.1:0", plane_tls(&setup.ca.server("impostor"), &setup.ca, &[])).await;
    let (cert, key) = setup.ca.client("node-a").write(setup.dir.path(), "node");
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        mtls(&setup.ca_path, &cert, &key),
        serde_json::json!({}),
    );
    let node = start_node(setup.dir.path(), &config, &[]);
    refused(&plane, &node, "but MTls.ExpectedServerCertificateSubject is").await;
    let line = node.wait_for_log("but MTls.ExpectedServerCertificateSubject is").await;
    assert!(
        line.contains("impostor") && line.contains("control-plane"),
        "names both CNs: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_refused() {
    let setup = Setup::new();
    let plane = start_plane(
        "127.0.0.1:0",
        plane_tls(&setup.ca.expired_server("control-plane"), &setup.ca, &[]),
    )
    .await;
    let (cert, key) = setup.ca.client("node-a").write(setup.dir.path(), "node");
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        mtls(&setup.ca_path, &cert, &key),
        serde_json::json!({}),
    );
    let node = start_node(setup.dir.path(), &config, &[]);
    refused(&plane, &node, "the control plane's certificate has expired").await;
}

/// `serve` and `config check` with `mtls`: exit code 2 and `key` named.
async fn refused_at_start(dir: &Path, mtls: serde_json::Value, key: &str, why: &str) {
    let config = write_config(
        dir,
        "https://127.0.0.1:9",
        Path::new("agents"),
        mtls,
        serde_json::json!({}),
    );
    for args in [vec!["serve", "--config"], vec!["config", "check", "--config"]] {
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(NODE_BINARY)
                .args(&args)
                .arg(&config)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("refused at once")
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(key), "{args:?} names {key}: {stderr}");
        assert!(stderr.contains(why), "{args:?} says {why:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_non_pem_certificate_file_stops_start_up_naming_the_key() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    let (cert, key) = setup.ca.client("node-a").write(dir, "node");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let missing = dir.join("missing.pem");

    refused_at_start(
        dir,
        mtls(&setup.ca_path, &missing, &key),
        "MTls.ClientCertificatePath",
        "missing.pem",
    )
    .await;
    refused_at_start(
        dir,
        mtls(&setup.ca_path, &cert, &missing),
        "MTls.ClientKeyPath",
        "missing.pem",
    )
    .await;
    refused_at_start(
        dir,
        mtls(&setup.ca_path, &garbage, &key),
        "MTls.ClientCertificatePath",
        "not a PEM certificate",
    )
    .await;
    refused_at_start(
        dir,
        mtls(&setup.ca_path, &cert, &garbage),
        "MTls.ClientKeyPath",
        "not a PEM private key",
    )
    .await;
    refused_at_start(
        dir,
        mtls(&garbage, &cert, &key),
        "MTls.ServerCaCertificatePath",
        "not a PEM certificate",
    )
    .await;
    // The certificate of one pair with the key of another.
    let (_, other_key) = setup.ca.client("node-b").write(dir, "other");
    refused_at_start(
        dir,
        mtls(&setup.ca_path, &cert, &other_key),
        "MTls.ClientKeyPath",
        "do not belong together",
    )
    .await;
}

/// A TLS plane's port is free when `shutdown` returns: a plane started on
/// it next (a restart in the same process) finds it unused. A process
/// another test of this binary spawns holds a copy of every open socket
/// from its fork to its exec, so now and then a start finds the port held
/// for that moment and tries again; a plane that kept its socket past
/// `shutdown` would find it held at nearly every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_plane_frees_its_port_before_shutdown_returns() {
    let setup = Setup::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut held = 0;
    for restart in 0..100 {
        let start = || {
            DevPlane::start(PlaneOptions {
                listen: listen.parse().unwrap(),
                tls: Some(plane_tls(&setup.server, &setup.ca, &[])),
                ..PlaneOptions::default()
            })
        };
        let plane = match start().await {
            Ok(plane) => plane,
            Err(first) => {
                held += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                start()
                    .await
                    .unwrap_or_else(|err| panic!("start {restart} on {listen}: {first}; again 50 ms later: {err}"))
            }
        };
        plane.shutdown().await;
    }
    assert!(held <= 5, "{held} of 100 restarts found the port still held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_is_presented_from_the_next_reconnect_on() {
    let setup = Setup::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let plane = start_plane(&listen, plane_tls(&setup.server, &setup.ca, &["node-a"])).await;
    // The certificate about to be replaced is close to its end: warned at start.
    let (cert, key) = setup.ca.client_expiring_in("node-a", 3).write(setup.dir.path(), "node");
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        mtls(&setup.ca_path, &cert, &key),
        serde_json::json!({}),
    );
    let node = start_node(setup.dir.path(), &config, &[]);
    let warning = node.wait_for_log("the client certificate CN=node-a").await;
    assert!(
        warning.contains("WARN") && warning.contains("expires in 2 days"),
        "{warning}"
    );
    let first = plane.submit(echo_run("before rotation")).await.unwrap();
    eventually(Duration::from_secs(60), "the first run to complete", || {
        plane
            .run(&first.run_id)
            .is_some_and(|run| run.status == RunStatus::Completed)
            .then_some(())
    })
    .await;

    // Rotate the files in place while the node runs, then make it
    // reconnect: a plane on the same port that accepts only the new CN.
    setup.ca.client("node-b").write(setup.dir.path(), "node");
    plane.shutdown().await;
    let plane = start_plane(&listen, plane_tls(&setup.server, &setup.ca, &["node-b"])).await;
    let second = plane.submit(echo_run("after rotation")).await.unwrap();
    eventually(Duration::from_secs(60), "the second run to complete", || {
        plane
            .run(&second.run_id)
            .is_some_and(|run| run.status == RunStatus::Completed)
            .then_some(())
    })
    .await;
    assert_eq!(plane.run(&second.run_id).unwrap().node_id.as_deref(), Some("tls-node"));
    let subjects = plane.client_subjects();
    assert!(
        !subjects.is_empty() && subjects.iter().all(|subject| subject == "node-b"),
        "{subjects:?}"
    );
    node.wait_for_log("client certificate files changed; using the new certificate")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_appear_nowhere_in_logs_telemetry_config_check_or_what_guests_see() {
    const API_KEY: &str = "sk-test-7c1f0e9a5b3d4e2f8a6b";
    let (collector, received) = otlp::start().await;
    let setup = Setup::new();
    let plane = start_plane("127.0.0.1:0", plane_tls(&setup.server, &setup.ca, &[])).await;
    let client = setup.ca.client("node-a");
    let (cert, key) = client.write(setup.dir.path(), "node");
    let model = node_runtime::dev_plane::stubs::start_stub_model().await.unwrap();
    let agent_runtime = serde_json::json!({
        "DefaultModel": node_runtime::dev_plane::stubs::STUB_MODEL,
        "OpenAI": {"Endpoint": model, "ApiKey": API_KEY},
    });
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        mtls(&setup.ca_path, &cert, &key),
        agent_runtime,
    );
    // Everything the node exports goes to a collector too.
    let mut settings: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    settings["OpenTelemetry"] = serde_json::json!({
        "OtlpExporter": {"Endpoint": collector, "Protocol": "grpc"},
        "Traces": {"Enabled": true, "SamplingRatio": 1.0},
        "Metrics": {"Enabled": true, "ExportIntervalMilliseconds": 300},
    });
    std::fs::write(&config, serde_json::to_string_pretty(&settings).unwrap()).unwrap();
    let mut node = start_node(setup.dir.path(), &config, &[("RUST_LOG", "debug")]);

    // Guests: echo returns its context; the classifier calls the model
    // with the key; hostile reads the environment.
    let runs = [
        echo_run("show me everything"),
        NewRun {
            agent_id: "invoice-classifier".to_string(),
            input_ref: BTreeMap::from([(
                "message".to_string(),
                r#"{"vendor": "Paper & Pens Ltd", "number": "INV-1", "amount": 1.0}"#.to_string(),
            )]),
            ..echo_run("")
        },
        NewRun {
            agent_id: "hostile".to_string(),
            input_ref: BTreeMap::from([("attack".to_string(), "env".to_string())]),
            ..echo_run("")
        },
    ];
    let mut ids = Vec::new();
    for run in runs {
        ids.push(plane.submit(run).await.unwrap().run_id);
    }
    eventually(Duration::from_secs(90), "the three runs to end", || {
        ids.iter()
            .all(|id| {
                plane
                    .run(id)
                    .is_some_and(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
            })
            .then_some(())
    })
    .await;
    let classified = plane.run(&ids[1]).unwrap();
    assert_eq!(
        classified.status,
        RunStatus::Completed,
        "the model was called with the key: {classified:?}"
    );
    assert!(
        classified.costs.as_ref().is_some_and(|costs| costs.tokens_in > 0),
        "{classified:?}"
    );
    let guest_visible = serde_json::to_string(&plane.runs()).unwrap();

    let check = tokio::process::Command::new(NODE_BINARY)
        .args(["config", "check", "--config"])
        .arg(&config)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let check_output = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check_output.contains("***"),
        "the key shows as redacted: {check_output}"
    );

    // The drain flushes the exporters.
    node.stop().await;
    let exported = {
        let received = received.lock().unwrap();
        assert!(
            !received.spans().is_empty() && !received.log_records().is_empty() && !received.metrics().is_empty(),
            "the collector received spans, log records and metrics"
        );
        format!("{:?}{:?}{:?}", received.traces, received.logs, received.metrics)
    };
    let log = node.log();
    assert!(log.contains("DEBUG"), "debug logging was on: {log}");
    let key_body = client.key_body();
    for (name, text) in [
        ("the node's log", &log),
        ("what the node exported over OTLP", &exported),
        ("config check", &check_output),
        ("the runs' results", &guest_visible),
    ] {
        assert!(!text.contains(API_KEY), "{name} holds the API key");
        assert!(!text.contains(&key_body), "{name} holds the client key");
        // No line of the key either, in case it were printed wrapped.
        for line in client.key_pem.lines().filter(|line| !line.starts_with("-----")) {
            assert!(!text.contains(line), "{name} holds a line of the client key");
        }
    }
}

/// `node-runtime dev` with `args` as its own process; returns it, its log
/// file and the URL it announced.
async fn start_dev(dir: &Path, args: &[&str]) -> (tokio::process::Child, String) {
    let log = dir.join("dev.log");
    let child = tokio::process::Command::new(NODE_BINARY)
        .arg("dev")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime dev starts");
    let url = eventually(Duration::from_secs(40), "dev to announce its URL", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix("dev control plane listening on "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
    })
    .await;
    (child, url)
}

/// A REST client presenting the node certificate of a `--tls-dir`.
fn tls_dir_client(url: &str, dir: &Path) -> reqwest::Client {
    use node_runtime::dev_plane::tls_dir::DevCertificates;
    let certificates = DevCertificates {
        dir: dir.to_path_buf(),
        generated: Vec::new(),
    };
    let tls = node_runtime::control_plane::ControlPlaneTls::configure(url, &node_tls_options(&certificates)).unwrap();
    node_runtime::control_plane::registration::http_client_with(Duration::from_secs(10), &tls).unwrap()
}

/// Submits an echo run over HTTPS and waits for it to end; returns the run.
async fn echo_through(url: &str, client: &reqwest::Client) -> serde_json::Value {
    let submitted: serde_json::Value = client
        .post(format!("{url}/v1/runs"))
        .json(&serde_json::json!({"agentId": "echo", "version": "1.0.0", "inputRef": {"message": "over TLS"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["runId"].as_str().expect("a run id").to_string();
    eventually_async(Duration::from_secs(60), "the run to end", || async {
        let run: serde_json::Value = client
            .get(format!("{url}/v1/runs/{id}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        matches!(run["status"].as_str(), Some("completed" | "failed")).then_some(run)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_a_tls_dir_generates_the_files_and_its_node_uses_them() {
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("certs");
    let (_dev, url) = start_dev(dir.path(), &["--tls-dir", tls_dir.to_str().unwrap()]).await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    for name in [
        "ca-cert.pem",
        "ca-key.pem",
        "server-cert.pem",
        "server-key.pem",
        "node-cert.pem",
        "node-key.pem",
    ] {
        assert!(tls_dir.join(name).is_file(), "{name} generated");
    }
    // Without a client certificate the plane refuses even REST.
    node_runtime::support::tls::install_crypto_provider();
    let anonymous = reqwest::Client::builder()
        .http1_only()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(tls_dir.join("ca-cert.pem")).unwrap()).unwrap()])
        .build()
        .unwrap();
    let refused = anonymous.get(format!("{url}/v1/runs")).send().await.unwrap_err();
    let why = node_runtime::control_plane::tls::describe(&refused);
    // Under TLS 1.3 the server refuses after the client's side of the
    // handshake: its alert names the cause, unless the connection's close
    // wins the race (seen under load), which refuses just the same.
    assert!(
        why.contains("CertificateRequired") || why.contains("connection was not ready"),
        "refused for want of a certificate: {why}"
    );

    let client = tls_dir_client(&url, &tls_dir);
    let run = echo_through(&url, &client).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["nodeId"], "dev-node-1", "{run}");
    assert_eq!(run["result"]["message"], "over TLS", "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_plane_only_with_a_tls_dir_serves_a_node_configured_with_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("certs");
    let (_dev, url) = start_dev(dir.path(), &["--plane-only", "--tls-dir", tls_dir.to_str().unwrap()]).await;
    let config = write_config(
        dir.path(),
        &url,
        Path::new("agents"),
        mtls(
            &tls_dir.join("ca-cert.pem"),
            &tls_dir.join("node-cert.pem"),
            &tls_dir.join("node-key.pem"),
        ),
        serde_json::json!({}),
    );
    // The plane binds node ids to certificates: node-cert.pem is dev-node-1's.
    let _node = start_node(dir.path(), &config, &[("NodeRuntime__NodeId", "dev-node-1")]);
    let run = echo_through(&url, &tls_dir_client(&url, &tls_dir)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["nodeId"], "dev-node-1", "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_a_tls_dir_binds_each_node_id_to_its_certificate_cn() {
    use node_runtime::control_plane::{ControlPlaneTls, LeaseClient, LeaseClientError};
    use node_runtime::dev_plane::tls_dir::DevCertificates;
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("certs");
    let (_dev, url) = start_dev(dir.path(), &["--plane-only", "--tls-dir", tls_dir.to_str().unwrap()]).await;
    let client = tls_dir_client(&url, &tls_dir);
    let register = |node_id: &'static str| {
        client
            .post(format!("{url}/v1/nodes:register"))
            .json(&serde_json::json!({"nodeId": node_id, "capacity": {"slots": 1}}))
            .send()
    };
    let heartbeat = |node_id: &'static str| {
        client
            .post(format!("{url}/v1/nodes/{node_id}:heartbeat"))
            .json(&serde_json::json!({"status": {"state": "active", "activeRuns": 0, "availableSlots": 1}}))
            .send()
    };

    // node-cert.pem's CN is the embedded node's id: that id, and only it.
    assert_eq!(register("dev-node-1").await.unwrap().status(), 201);
    assert_eq!(heartbeat("dev-node-1").await.unwrap().status(), 200);
    let refused = register("other-node").await.unwrap();
    assert_eq!(refused.status(), 403);
    let error: serde_json::Value = refused.json().await.unwrap();
    let message = error["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("\"other-node\"") && message.contains("CN \"dev-node-1\""),
        "names both: {message}"
    );
    assert_eq!(heartbeat("other-node").await.unwrap().status(), 403);

    // gRPC alike, for every call that names a node.
    let certificates = DevCertificates {
        dir: tls_dir.clone(),
        generated: Vec::new(),
    };
    let tls = ControlPlaneTls::configure(&url, &node_tls_options(&certificates)).unwrap();
    let leases = LeaseClient::connect_lazy_with(&url, Duration::from_secs(10), &tls).unwrap();
    let ack = |node_id: &str| node_runtime::proto::AckRequest {
        lease_id: "lease-unknown".to_string(),
        node_id: node_id.to_string(),
        ack_timestamp_unix_ms: 1,
    };
    let (success, _) = leases.ack(ack("dev-node-1")).await.expect("its own id is served");
    assert!(!success, "an unknown lease");
    let denied = |result: Result<_, LeaseClientError>, call: &str| match result {
        Err(LeaseClientError::Call { status, .. }) => {
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{call}: {status:?}");
            assert!(status.message().contains("other-node"), "{call}: {status:?}");
        }
        Err(other) => panic!("{call}: {other}"),
        Ok(_) => panic!("{call} as another node was accepted"),
    };
    denied(leases.ack(ack("other-node")).await.map(|_| ()), "Ack");
    denied(
        leases
            .complete(node_runtime::proto::CompleteRequest {
                lease_id: "lease-unknown".to_string(),
                run_id: "run".to_string(),
                node_id: "other-node".to_string(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "Complete",
    );
    denied(
        leases
            .fail(node_runtime::proto::FailRequest {
                lease_id: "lease-unknown".to_string(),
                run_id: "run".to_string(),
                node_id: "other-node".to_string(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "Fail",
    );
    denied(
        tokio::time::timeout(Duration::from_secs(10), leases.pull("other-node", 1))
            .await
            .expect("refused at once")
            .map(|_| ()),
        "Pull",
    );

    // A node configured with another id is refused, and its log says why.
    let config = write_config(
        dir.path(),
        &url,
        Path::new("agents"),
        mtls(
            &tls_dir.join("ca-cert.pem"),
            &tls_dir.join("node-cert.pem"),
            &tls_dir.join("node-key.pem"),
        ),
        serde_json::json!({}),
    );
    let node = start_node(dir.path(), &config, &[]);
    let line = node
        .wait_for_log("does not match this connection's client certificate")
        .await;
    assert!(line.contains("tls-node") && line.contains("403"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_a_tls_dir_holding_its_own_node_certificate_runs_its_node_under_that_cn() {
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("certs");
    std::fs::create_dir(&tls_dir).unwrap();
    let ca = TestCa::new("team CA");
    ca.write(&tls_dir, "ca-cert.pem");
    ca.server("control-plane").write(&tls_dir, "server");
    ca.client("laptop-node").write(&tls_dir, "node");
    let (_dev, url) = start_dev(dir.path(), &["--tls-dir", tls_dir.to_str().unwrap()]).await;
    let run = echo_through(&url, &tls_dir_client(&url, &tls_dir)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["nodeId"], "laptop-node", "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_channel_presents_the_client_certificate_and_names_a_refusal() {
    use node_runtime::control_plane::{ControlPlaneTls, LeaseClient, TlsOptions};
    use node_runtime::proto::AckRequest;
    let setup = Setup::new();
    let plane = start_plane("127.0.0.1:0", plane_tls(&setup.server, &setup.ca, &[])).await;
    let options = |cert: PathBuf, key: PathBuf| TlsOptions {
        enabled: true,
        client_certificate_path: Some(cert),
        client_key_path: Some(key),
        server_ca_certificate_path: Some(setup.ca_path.clone()),
        expected_server_certificate_subject: Some("control-plane".to_string()),
        validate_certificate_chain: true,
    };
    let ack = AckRequest {
        lease_id: "lease-unknown".to_string(),
        node_id: "grpc-node".to_string(),
        ack_timestamp_unix_ms: 1,
    };

    let (cert, key) = setup.ca.client("grpc-node").write(setup.dir.path(), "good");
    let tls = ControlPlaneTls::configure(&plane.url(), &options(cert, key)).unwrap();
    let client = LeaseClient::connect_lazy_with(&plane.url(), Duration::from_secs(10), &tls).unwrap();
    let (success, _message) = client.ack(ack.clone()).await.expect("gRPC over mTLS answers");
    assert!(!success, "an unknown lease is not acknowledged");
    assert_eq!(plane.client_subjects(), ["grpc-node"]);

    let stranger = TestCa::new("another CA");
    let (cert, key) = stranger.client("grpc-node").write(setup.dir.path(), "stranger");
    let tls = ControlPlaneTls::configure(&plane.url(), &options(cert, key)).unwrap();
    let client = LeaseClient::connect_lazy_with(&plane.url(), Duration::from_secs(10), &tls).unwrap();
    let refused = client.ack(ack).await.expect_err("refused");
    let text = refused.to_string();
    assert!(text.contains("Ack failed"), "{text}");
    // With TLS 1.3 the plane refuses the certificate after the client's
    // side of the handshake is done; over HTTP/2 the alert then races the
    // connection's close, so the cause is named only when the alert wins
    // (the REST link, which registers first, names it every time).
    if text.contains("UnknownCA") {
        assert!(text.contains("issued by a CA it does not trust"), "{text}");
    }
    assert_eq!(plane.client_subjects(), ["grpc-node"], "the stranger never got in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_certificate_chain_false_accepts_a_server_certificate_from_another_issuer_and_warns() {
    let setup = Setup::new();
    let other = TestCa::new("another CA");
    let plane = start_plane("127.0.0.1:0", plane_tls(&other.server("control-plane"), &setup.ca, &[])).await;
    let (cert, key) = setup.ca.client("node-a").write(setup.dir.path(), "node");
    let mut unchecked = mtls(&setup.ca_path, &cert, &key);
    unchecked["ValidateCertificateChain"] = serde_json::json!(false);
    let config = write_config(
        setup.dir.path(),
        &plane.url(),
        Path::new("agents"),
        unchecked,
        serde_json::json!({}),
    );
    let node = start_node(setup.dir.path(), &config, &[]);
    let run = plane.submit(echo_run("unchecked chain")).await.unwrap();
    eventually(Duration::from_secs(60), "the run to complete", || {
        plane
            .run(&run.run_id)
            .is_some_and(|run| run.status == RunStatus::Completed)
            .then_some(())
    })
    .await;
    let warning = node.wait_for_log("MTls.ValidateCertificateChain is false").await;
    assert!(warning.contains("WARN"), "{warning}");
}

/// The embedded dev node's TLS: the node certificate, and only the CA
/// trusted (what `node-runtime dev --tls-dir` configures).
fn node_tls_options(
    certificates: &node_runtime::dev_plane::tls_dir::DevCertificates,
) -> node_runtime::control_plane::TlsOptions {
    use node_runtime::dev_plane::tls_dir::{CA_CERT, NODE_CERT, NODE_KEY};
    node_runtime::control_plane::TlsOptions {
        enabled: true,
        client_certificate_path: Some(certificates.path(NODE_CERT)),
        client_key_path: Some(certificates.path(NODE_KEY)),
        server_ca_certificate_path: Some(certificates.path(CA_CERT)),
        expected_server_certificate_subject: None,
        validate_certificate_chain: true,
    }
}
