//! Agents from an HTTP source, pinned by digest, through the real node and
//! the dev control plane on loopback: one download however many runs wait
//! for a new version, a kept copy after a restart, a wrong pin refused for
//! good, and a failing server handed back to be tried again.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use node_runtime::agent_store::{AgentDigest, AgentSource, AgentStore, HttpSource, HttpSourceSettings};
use node_runtime::control_plane::Capacity;
use node_runtime::dev_plane::{DevPlane, NewRun, PlaneOptions, Run, RunStatus};
use node_runtime::outbox::Outbox;
use node_runtime::sandbox::{EngineSettings, Sandbox, SandboxConfig};
use node_runtime::worker::{NodeHandle, NodeSettings};
use support::*;

/// What the artifact server answers for one file name.
#[derive(Clone)]
enum Answer {
    Artifact(Arc<[u8]>),
    Status(StatusCode),
}

#[derive(Default)]
struct Artifacts {
    files: Mutex<BTreeMap<String, Answer>>,
    requests: Mutex<BTreeMap<String, usize>>,
    total: AtomicUsize,
}

impl Artifacts {
    fn requests_for(&self, path: &str) -> usize {
        self.requests.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

async fn serve_artifact(
    State(artifacts): State<Arc<Artifacts>>,
    UrlPath((agent, file)): UrlPath<(String, String)>,
) -> axum::response::Response {
    let path = format!("{agent}/{file}");
    artifacts.total.fetch_add(1, Ordering::SeqCst);
    *artifacts.requests.lock().unwrap().entry(path.clone()).or_default() += 1;
    // Slow enough that every waiting run asks while the first download
    // is still in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = artifacts.files.lock().unwrap().get(&path).cloned();
    match answer {
        Some(Answer::Artifact(bytes)) => bytes.to_vec().into_response(),
        Some(Answer::Status(status)) => status.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn start_artifact_server() -> (String, Arc<Artifacts>) {
    let artifacts = Arc::new(Artifacts::default());
    let app = axum::Router::new()
        .route("/agents/{agent}/{file}", axum::routing::get(serve_artifact))
        .with_state(artifacts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, artifacts)
}

fn echo_bytes() -> Arc<[u8]> {
    Arc::from(std::fs::read(target_dir().join("agents").join("echo.wasm")).expect("built echo agent"))
}

fn http_store(base: &str, cache: &Path, max_bytes: u64, require_digest: bool) -> AgentStore {
    let source = HttpSource::new(
        HttpSourceSettings {
            url_template: format!("{base}/agents/{{agent_id}}/{{version}}.wasm"),
            max_bytes,
            timeout: Duration::from_secs(10),
            cache_dir: cache.to_path_buf(),
        },
        reqwest::Client::new(),
    );
    AgentStore::with_sources(vec![AgentSource::Http(source)], require_digest)
}

fn start_node(plane: &DevPlane, store: AgentStore) -> NodeHandle {
    let slots = 8;
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings { max_concurrent_runs: slots, ..EngineSettings::default() },
        ..SandboxConfig::default()
    })
    .unwrap();
    let outbox_dir = tempfile::tempdir().unwrap();
    NodeHandle::start(
        NodeSettings {
            node_id: "store-node".to_string(),
            control_plane_url: plane.url(),
            slots,
            max_leases: slots,
            heartbeat_interval: Duration::from_millis(300),
            capacity: Capacity { slots, cpu: "2".into(), memory: "1Gi".into() },
            metadata: BTreeMap::new(),
            drain_timeout: Duration::from_secs(5),
        },
        Arc::new(sandbox),
        Arc::new(store),
        Outbox::open(outbox_dir.path()).unwrap(),
    )
    .unwrap()
}

async fn start_plane() -> DevPlane {
    DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(100),
        ..PlaneOptions::default()
    })
    .await
    .unwrap()
}

fn run_of(version: &str, digest: Option<String>) -> NewRun {
    NewRun {
        agent_id: "echo".to_string(),
        version: version.to_string(),
        input_ref: BTreeMap::from([("message".to_string(), "hello".to_string())]),
        metadata: digest.map(|d| ("agent.digest".to_string(), d)).into_iter().collect(),
        budgets: Default::default(),
    }
}

async fn submit_and_wait(plane: &DevPlane, runs: Vec<NewRun>) -> Vec<Run> {
    let mut ids = Vec::new();
    for run in runs {
        ids.push(plane.submit(run).await.unwrap().run_id);
    }
    eventually(Duration::from_secs(60), "the runs to end", || {
        let runs: Vec<Run> = ids.iter().filter_map(|id| plane.run(id)).collect();
        runs.iter()
            .all(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
            .then_some(runs)
    })
    .await
}

fn failure(run: &Run) -> (String, String, bool) {
    let info = run.error_info.as_ref().unwrap_or_else(|| panic!("expected a failure: {run:?}"));
    let details: serde_json::Value = serde_json::from_str(&info.error_details).unwrap();
    (details["kind"].as_str().unwrap().to_string(), info.error_message.clone(), info.retryable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_runs_of_a_new_version_download_it_once_and_a_restart_reuses_the_copy() {
    node_runtime::control_plane::install_crypto_provider();
    let (base, artifacts) = start_artifact_server().await;
    let bytes = echo_bytes();
    artifacts.files.lock().unwrap().insert("echo/2.0.0.wasm".into(), Answer::Artifact(bytes.clone()));
    let cache = tempfile::tempdir().unwrap();
    let plane = start_plane().await;
    let node = start_node(&plane, http_store(&base, cache.path(), 64 << 20, false));
    let pin = AgentDigest::of(&bytes).to_string();

    let runs = submit_and_wait(&plane, (0..20).map(|_| run_of("2.0.0", Some(pin.clone()))).collect()).await;
    for run in &runs {
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        assert_eq!(run.result.as_ref().unwrap()["message"], "hello", "{run:?}");
    }
    assert_eq!(artifacts.requests_for("echo/2.0.0.wasm"), 1, "one download for twenty runs");
    let kept = cache.path().join("echo").join("2.0.0.wasm");
    assert_eq!(std::fs::read(&kept).unwrap(), bytes.to_vec(), "the copy on disk is the artifact");
    node.shutdown().await;

    // A new process (a new store) with the same cache does not download.
    let node = start_node(&plane, http_store(&base, cache.path(), 64 << 20, false));
    let runs = submit_and_wait(&plane, vec![run_of("2.0.0", None)]).await;
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    assert_eq!(artifacts.requests_for("echo/2.0.0.wasm"), 1, "the kept copy is used");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_pin_and_a_missing_version_fail_for_good() {
    node_runtime::control_plane::install_crypto_provider();
    let (base, artifacts) = start_artifact_server().await;
    let bytes = echo_bytes();
    artifacts.files.lock().unwrap().insert("echo/3.0.0.wasm".into(), Answer::Artifact(bytes.clone()));
    let cache = tempfile::tempdir().unwrap();
    let plane = start_plane().await;
    let node = start_node(&plane, http_store(&base, cache.path(), 64 << 20, true));
    let actual = AgentDigest::of(&bytes).to_string();
    let wrong = AgentDigest::of(b"something else").to_string();

    let runs = submit_and_wait(
        &plane,
        vec![
            run_of("3.0.0", Some(wrong.clone())),
            run_of("3.0.0", None),
            run_of("3.0.0", Some("md5:abc".to_string())),
            run_of("9.9.9", Some(actual.clone())),
            run_of("3.0.0", Some(actual.clone())),
        ],
    )
    .await;

    let (kind, message, retryable) = failure(&runs[0]);
    assert_eq!(kind, "agent.invalid");
    assert!(!retryable, "a wrong pin is final");
    assert!(message.contains(&wrong) && message.contains(&actual), "names both digests: {message}");

    let (kind, message, retryable) = failure(&runs[1]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false));
    assert!(message.contains("agent.digest") && message.contains("AgentStore.RequireDigest"), "{message}");

    let (kind, message, retryable) = failure(&runs[2]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false));
    assert!(message.contains("md5:abc") && message.contains("sha256:"), "{message}");

    let (kind, message, retryable) = failure(&runs[3]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false));
    assert!(message.contains(&format!("{base}/agents/echo/9.9.9.wasm")), "names the URL tried: {message}");

    assert_eq!(runs[4].status, RunStatus::Completed, "the right pin runs: {:?}", runs[4]);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_oversized_download_is_handed_back_and_leaves_nothing_behind() {
    node_runtime::control_plane::install_crypto_provider();
    let (base, artifacts) = start_artifact_server().await;
    let bytes = echo_bytes();
    artifacts
        .files
        .lock()
        .unwrap()
        .insert("echo/4.0.0.wasm".into(), Answer::Status(StatusCode::SERVICE_UNAVAILABLE));
    artifacts.files.lock().unwrap().insert("echo/5.0.0.wasm".into(), Answer::Artifact(bytes.clone()));
    let cache = tempfile::tempdir().unwrap();
    let plane = start_plane().await;
    // Smaller than echo: its download must be cut off.
    let limit = bytes.len() as u64 / 2;
    let node = start_node(&plane, http_store(&base, cache.path(), limit, false));

    let runs = submit_and_wait(&plane, vec![run_of("4.0.0", None), run_of("5.0.0", None)]).await;
    let (kind, message, retryable) = failure(&runs[0]);
    assert_eq!((kind.as_str(), retryable), ("node.unavailable", true), "{message}");
    assert!(message.contains("503"), "{message}");
    let (kind, message, retryable) = failure(&runs[1]);
    assert_eq!((kind.as_str(), retryable), ("node.unavailable", true), "{message}");
    assert!(message.contains("AgentStore.MaxDownloadBytes"), "{message}");
    node.shutdown().await;

    let leftovers: Vec<_> = walk(cache.path());
    assert!(leftovers.is_empty(), "no partial artifact on disk: {leftovers:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
