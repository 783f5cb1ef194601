//! Chaos, bounded in count and time, on loopback: the control plane is
//! killed and restarted under load, and every run still ends with exactly
//! one outcome, counted by the plane's own records.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use node_runtime::agent_store::AgentStore;
use node_runtime::control_plane::Capacity;
use node_runtime::outbox::Outbox;
use node_runtime::sandbox::{EngineSettings, Sandbox, SandboxConfig};
use node_runtime::worker::{NodeHandle, NodeSettings};
use support::*;

/// `node-runtime dev --plane-only` as its own process, so it can be killed.
fn spawn_plane(port: u16, data_dir: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(["dev", "--plane-only", "--listen", &format!("127.0.0.1:{port}"), "--lease-ttl", "8s"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime dev --plane-only starts")
}

async fn get_json(http: &reqwest::Client, url: String) -> Option<serde_json::Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

async fn wait_for_plane(http: &reqwest::Client, url: &str) {
    for _ in 0..300 {
        if get_json(http, format!("{url}/v1/nodes")).await.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the plane at {url} did not come up within 15 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_runs_through_five_plane_restarts_each_end_exactly_once() {
    node_runtime::control_plane::install_crypto_provider();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let plane_data = tempfile::tempdir().unwrap();
    let node_data = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mut plane = spawn_plane(port, plane_data.path());
    wait_for_plane(&http, &url).await;

    let agents = agents_layout();
    let slots = 4;
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings { max_concurrent_runs: slots, ..EngineSettings::default() },
        ..SandboxConfig::default()
    })
    .unwrap();
    let node = NodeHandle::start(
        NodeSettings {
            node_id: "chaos-node".into(),
            control_plane_url: url.clone(),
            slots,
            max_leases: slots,
            heartbeat_interval: Duration::from_millis(500),
            capacity: Capacity { slots, cpu: "2".into(), memory: "1Gi".into() },
            metadata: BTreeMap::new(),
            drain_timeout: Duration::from_secs(5),
        },
        Arc::new(sandbox),
        Arc::new(AgentStore::new(vec![agents.path().to_path_buf()])),
        Outbox::open(node_data.path()).unwrap(),
    )
    .unwrap();

    const RUNS: usize = 1000;
    for i in 0..RUNS {
        let body = serde_json::json!({"agentId": "echo", "version": "1.0.0", "inputRef": {"message": format!("run {i}")}});
        let answer: serde_json::Value =
            http.post(format!("{url}/v1/runs")).json(&body).send().await.unwrap().json().await.unwrap();
        assert!(answer["runId"].is_string(), "{answer}");
    }

    for restart in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        plane.kill().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        plane = spawn_plane(port, plane_data.path());
        wait_for_plane(&http, &url).await;
        eprintln!("plane restart {} done", restart + 1);
    }

    let runs = eventually_async(Duration::from_secs(240), "every run to end", || async {
        let runs = get_json(&http, format!("{url}/v1/runs")).await?;
        let runs = runs.as_array()?.clone();
        let ended = runs.len() == RUNS && runs.iter().all(|run| run["status"] == "completed" || run["status"] == "failed");
        ended.then_some(runs)
    })
    .await;
    for run in &runs {
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(run["outcomes"], 1, "exactly one outcome: {run}");
    }
    let stats = node.stats();
    let fresh_leases = stats.leases_received.load(Ordering::SeqCst) - stats.duplicate_leases.load(Ordering::SeqCst);
    assert!(
        stats.runs_started.load(Ordering::SeqCst) <= fresh_leases,
        "no lease ran twice on this node"
    );
    node.shutdown().await;
    plane.kill().await.unwrap();
}

/// Like `support::eventually`, for checks that are themselves async.
async fn eventually_async<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
