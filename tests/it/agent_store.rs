//! Agents from an HTTP source, pinned by digest, through the real node and
//! the dev control plane on loopback: one download however many runs wait
//! for a new version, a kept copy after a restart, a wrong pin refused for
//! good, and a failing server handed back to be tried again. Then agents
//! from a directory across restarts (a new sandbox and a new store on the
//! same compiled cache): an unchanged file is not hashed again, a file
//! rewritten under the same length and modification time is, and so is a
//! file changed in the last seconds; a damaged memo record is ignored; a
//! pin is checked against the remembered digest. And what a network
//! source may deliver, through `node-runtime serve`: a `.cwasm` (native
//! code) served under a `.wasm` name is refused and never run, also from a
//! download cache an older node filled, while the same `.cwasm` from the
//! agents directory runs; a redirect is not followed.

use crate::support;
use crate::support::scripted;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use node_runtime::agent_store::{
    AgentDigest, AgentSource, AgentStore, DigestMemo, HttpSource, HttpSourceSettings, ResolveCounts, ResolveError,
    SETTLE_TIME,
};
use node_runtime::control_plane::Capacity;
use node_runtime::dev_plane::{DevPlane, NewRun, PlaneOptions, Run, RunStatus};
use node_runtime::outbox::Outbox;
use node_runtime::sandbox::{
    BudgetRequest, CompileCounts, CompiledCacheSettings, EngineSettings, RunOutcome, Sandbox, SandboxConfig,
};
use node_runtime::worker::{NodeHandle, NodeSettings};
use support::*;

/// What the artifact server answers for one file name.
#[derive(Clone)]
enum Answer {
    Artifact(Arc<[u8]>),
    Status(StatusCode),
    /// 302 Found to this location.
    Redirect(String),
    /// No answer, ever.
    Stall,
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
        Some(Answer::Redirect(location)) => {
            (StatusCode::FOUND, [(axum::http::header::LOCATION, location)]).into_response()
        }
        Some(Answer::Stall) => std::future::pending().await,
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
    http_store_bounded(base, cache, max_bytes, 1 << 30, require_digest)
}

fn http_store_bounded(
    base: &str,
    cache: &Path,
    max_bytes: u64,
    cache_max_bytes: u64,
    require_digest: bool,
) -> AgentStore {
    let source = HttpSource::new(
        HttpSourceSettings {
            url_template: format!("{base}/agents/{{agent_id}}/{{version}}.wasm"),
            max_bytes,
            timeout: Duration::from_secs(10),
            cache_dir: cache.to_path_buf(),
            cache_max_bytes,
        },
        None,
    )
    .unwrap();
    AgentStore::with_sources(vec![AgentSource::Http(source)], require_digest)
}

fn start_node(plane: &DevPlane, store: AgentStore) -> NodeHandle {
    start_node_at(&plane.url(), store)
}

fn start_node_at(control_plane_url: &str, store: AgentStore) -> NodeHandle {
    let slots = 8;
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: slots,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .unwrap();
    let outbox_dir = tempfile::tempdir().unwrap();
    NodeHandle::builder(
        NodeSettings {
            node_id: "store-node".to_string(),
            control_plane_url: control_plane_url.to_string(),
            slots,
            max_leases: slots,
            heartbeat_interval: Duration::from_millis(300),
            capacity: Capacity {
                slots,
                cpu: "2".into(),
                memory: "1Gi".into(),
            },
            metadata: BTreeMap::new(),
            drain_timeout: Duration::from_secs(5),
        },
        Arc::new(sandbox),
        Arc::new(store),
        Outbox::open(outbox_dir.path()).unwrap(),
    )
    .start()
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
    let info = run
        .error_info
        .as_ref()
        .unwrap_or_else(|| panic!("expected a failure: {run:?}"));
    let details: serde_json::Value = serde_json::from_str(&info.error_details).unwrap();
    (
        details["kind"].as_str().unwrap().to_string(),
        info.error_message.clone(),
        info.retryable,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_runs_of_a_new_version_download_it_once_and_a_restart_reuses_the_copy() {
    node_runtime::support::tls::install_crypto_provider();
    let (base, artifacts) = start_artifact_server().await;
    let bytes = echo_bytes();
    artifacts
        .files
        .lock()
        .unwrap()
        .insert("echo/2.0.0.wasm".into(), Answer::Artifact(bytes.clone()));
    let cache = tempfile::tempdir().unwrap();
    let plane = start_plane().await;
    let node = start_node(&plane, http_store(&base, cache.path(), 64 << 20, false));
    let pin = AgentDigest::of(&bytes).to_string();

    let runs = submit_and_wait(&plane, (0..20).map(|_| run_of("2.0.0", Some(pin.clone()))).collect()).await;
    for run in &runs {
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        assert_eq!(run.result.as_ref().unwrap()["message"], "hello", "{run:?}");
    }
    assert_eq!(
        artifacts.requests_for("echo/2.0.0.wasm"),
        1,
        "one download for twenty runs"
    );
    let kept = cache.path().join("echo").join("2.0.0.wasm");
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        bytes.to_vec(),
        "the copy on disk is the artifact"
    );
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
    node_runtime::support::tls::install_crypto_provider();
    let (base, artifacts) = start_artifact_server().await;
    let bytes = echo_bytes();
    artifacts
        .files
        .lock()
        .unwrap()
        .insert("echo/3.0.0.wasm".into(), Answer::Artifact(bytes.clone()));
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
    assert!(
        message.contains(&wrong) && message.contains(&actual),
        "names both digests: {message}"
    );

    let (kind, message, retryable) = failure(&runs[1]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false));
    assert!(
        message.contains("agent.digest") && message.contains("AgentStore.RequireDigest"),
        "{message}"
    );

    let (kind, message, retryable) = failure(&runs[2]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false));
    assert!(message.contains("md5:abc") && message.contains("sha256:"), "{message}");

    let (kind, message, retryable) = failure(&runs[3]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false));
    assert!(
        message.contains(&format!("{base}/agents/echo/9.9.9.wasm")),
        "names the URL tried: {message}"
    );

    assert_eq!(
        runs[4].status,
        RunStatus::Completed,
        "the right pin runs: {:?}",
        runs[4]
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_oversized_download_is_handed_back_and_leaves_nothing_behind() {
    node_runtime::support::tls::install_crypto_provider();
    let (base, artifacts) = start_artifact_server().await;
    let bytes = echo_bytes();
    artifacts.files.lock().unwrap().insert(
        "echo/4.0.0.wasm".into(),
        Answer::Status(StatusCode::SERVICE_UNAVAILABLE),
    );
    artifacts
        .files
        .lock()
        .unwrap()
        .insert("echo/5.0.0.wasm".into(), Answer::Artifact(bytes.clone()));
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

    let leftovers: Vec<_> = files_under(cache.path());
    assert!(leftovers.is_empty(), "no partial artifact on disk: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_outlasting_the_lease_deadline_fails_budget_deadline_and_shutdown_does_not_wait_for_it() {
    node_runtime::support::tls::install_crypto_provider();
    let (base, artifacts) = start_artifact_server().await;
    artifacts
        .files
        .lock()
        .unwrap()
        .insert("echo/1.0.0.wasm".into(), Answer::Stall);
    let cache = tempfile::tempdir().unwrap();
    // The download itself may take two minutes: only the lease's deadline
    // (2 s for the first lease) and the node's drain timeout (5 s) stop it.
    let source = HttpSource::new(
        HttpSourceSettings {
            url_template: format!("{base}/agents/{{agent_id}}/{{version}}.wasm"),
            max_bytes: 1 << 30,
            timeout: Duration::from_secs(120),
            cache_dir: cache.path().to_path_buf(),
            cache_max_bytes: 1 << 30,
        },
        None,
    )
    .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (url, recorded) = scripted::serve(vec![
        scripted::lease("lease-soon", "echo", now_ms + 2_000),
        scripted::lease("lease-later", "echo", now_ms + 600_000),
    ])
    .await;
    let node = start_node_at(&url, AgentStore::with_sources(vec![AgentSource::Http(source)], false));

    let soon = eventually(Duration::from_secs(30), "the first lease to fail", || {
        let recorded = recorded.lock().unwrap();
        recorded
            .fails
            .iter()
            .find(|fail| fail.lease_id == "lease-soon")
            .cloned()
    })
    .await;
    let details: serde_json::Value = serde_json::from_str(&soon.error_details).unwrap();
    assert_eq!(details["kind"], "budget.deadline", "{soon:?}");
    assert!(
        soon.error_message
            .contains("deadline passed while its agent was being fetched"),
        "{}",
        soon.error_message
    );
    assert!(recorded.lock().unwrap().completes.is_empty());

    tokio::time::timeout(Duration::from_secs(30), node.shutdown())
        .await
        .expect("shutdown waits for the drain timeout, not for the download");
    let later = recorded
        .lock()
        .unwrap()
        .fails
        .iter()
        .find(|fail| fail.lease_id == "lease-later")
        .cloned()
        .expect("the second lease is handed back");
    assert!(later.retryable, "{later:?}");
    assert!(
        later.error_message.contains("fetched or compiled"),
        "{}",
        later.error_message
    );
    assert!(artifacts.requests_for("echo/1.0.0.wasm") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_download_cache_keeps_within_its_bound_evicting_the_oldest_download() {
    node_runtime::support::tls::install_crypto_provider();
    let (base, artifacts) = start_artifact_server().await;
    let bytes = echo_bytes();
    for version in ["1.0.0", "2.0.0"] {
        let served = Answer::Artifact(bytes.clone());
        artifacts
            .files
            .lock()
            .unwrap()
            .insert(format!("echo/{version}.wasm"), served);
    }
    let cache = tempfile::tempdir().unwrap();
    let plane = start_plane().await;
    // Room for one download and a half.
    let bound = bytes.len() as u64 * 3 / 2;
    let node = start_node(&plane, http_store_bounded(&base, cache.path(), 1 << 30, bound, false));
    let kept = |version: &str| cache.path().join("echo").join(format!("{version}.wasm")).exists();

    let runs = submit_and_wait(&plane, vec![run_of("1.0.0", None)]).await;
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    assert!(kept("1.0.0"));
    let runs = submit_and_wait(&plane, vec![run_of("2.0.0", None)]).await;
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    assert!(kept("2.0.0") && !kept("1.0.0"), "the older download was evicted");
    let on_disk: u64 = files_under(cache.path())
        .iter()
        .map(|path| std::fs::metadata(path).unwrap().len())
        .sum();
    assert!(on_disk <= bound, "{on_disk} bytes kept, bound {bound}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_the_disk_cannot_keep_runs_from_memory() {
    node_runtime::support::tls::install_crypto_provider();
    let (base, artifacts) = start_artifact_server().await;
    let served = Answer::Artifact(echo_bytes());
    artifacts.files.lock().unwrap().insert("echo/1.0.0.wasm".into(), served);
    // The cache directory lies under a file: nothing can be written there.
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("a-file"), "").unwrap();
    let cache = work.path().join("a-file").join("cache");
    let plane = start_plane().await;
    let node = start_node(&plane, http_store(&base, &cache, 1 << 30, false));

    let runs = submit_and_wait(&plane, vec![run_of("1.0.0", None)]).await;
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    let runs = submit_and_wait(&plane, vec![run_of("1.0.0", None)]).await;
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    assert_eq!(
        artifacts.requests_for("echo/1.0.0.wasm"),
        2,
        "nothing was kept: each lease downloads the version"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_caches_does_not_fail_the_run() {
    // A real ENOSPC: `serve` in its own mount namespace with a 1 MiB tmpfs
    // over its download cache, too small for echo's 2.5 MB, and one of
    // 64 KiB over its compiled cache, too small for echo compiled.
    let probe = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"])
        .output();
    if !probe.as_ref().is_ok_and(|output| output.status.success()) {
        eprintln!(
            "skipped: cannot mount a tmpfs in a new mount namespace here (needs root and \
             unshare -m): {probe:?}"
        );
        return;
    }
    node_runtime::support::tls::install_crypto_provider();
    let [agents, data] = [(); 2].map(|_| tempfile::tempdir().unwrap());
    let (base, artifacts) = start_artifact_server().await;
    let served = Answer::Artifact(echo_bytes());
    artifacts.files.lock().unwrap().insert("echo/1.0.0.wasm".into(), served);
    let downloads = data.path().join("agents").join("http");
    let compiled = data.path().join("compiled");
    std::fs::create_dir_all(&downloads).unwrap();
    std::fs::create_dir_all(&compiled).unwrap();
    let plane = start_plane().await;
    let mut node = tokio::process::Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m tmpfs \"$0\" && mount -t tmpfs -o size=64k tmpfs \"$1\" \
             && shift && exec \"$@\"",
        ])
        .arg(&downloads)
        .arg(&compiled)
        .arg(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .env("NodeRuntime__NodeId", "full-disk-node")
        .env("NodeRuntime__ControlPlaneUrl", plane.url())
        .env("NodeRuntime__AgentsDirectory", agents.path())
        .env("NodeRuntime__DataDirectory", data.path())
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("AgentStore__Sources", "http")
        .env(
            "AgentStore__HttpUrlTemplate",
            format!("{base}/agents/{{agent_id}}/{{version}}.wasm"),
        )
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime serve starts under unshare");

    let runs = submit_and_wait(&plane, vec![run_of("1.0.0", None)]).await;
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    assert_eq!(runs[0].result.as_ref().unwrap()["message"], "hello");
    node.kill().await.unwrap();
    let mut log = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut node.stderr.take().unwrap(), &mut log)
        .await
        .unwrap();
    assert!(
        log.contains("could not keep the downloaded agent") && log.contains("No space left on device"),
        "the download met a full disk: {log}"
    );
    assert!(
        log.contains("could not keep the compiled component"),
        "the compiled entry met a full disk: {log}"
    );
}

fn cached_sandbox(cache: &Path) -> Sandbox {
    Sandbox::new(SandboxConfig {
        compiled_cache: Some(CompiledCacheSettings {
            dir: cache.to_path_buf(),
            max_bytes: 1 << 30,
        }),
        ..SandboxConfig::default()
    })
    .unwrap()
}

/// Writes `bytes` as the agent `echo` version 1.0.0 (`.wasm` or `.cwasm`)
/// in the agents directory `dir`.
fn place_echo(dir: &Path, extension: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join("echo").join(format!("1.0.0.{extension}"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Waits until a file written now has settled: before that, the store
/// trusts no stamp of it.
async fn let_settle() {
    tokio::time::sleep(SETTLE_TIME + Duration::from_millis(200)).await;
}

/// Resolves echo in `store` (pinned to `pin`, if any) and runs it.
async fn resolve_and_run(sandbox: &Sandbox, store: &AgentStore, pin: Option<AgentDigest>) -> Result<(), ResolveError> {
    let agent = store.resolve_pinned(sandbox, "echo", "1.0.0", pin).await?;
    let result = sandbox
        .run(&agent, request("echo", &[("message", "hi")], BudgetRequest::default()))
        .await;
    match result.outcome {
        RunOutcome::Completed(map) => assert_eq!(map["message"], "hi"),
        other => panic!("echo should complete: {other:?}"),
    }
    Ok(())
}

fn resolved(in_memory: u64, remembered: u64, hashed: u64) -> ResolveCounts {
    ResolveCounts {
        in_memory,
        remembered,
        hashed,
    }
}

fn compiled(compiled: u64, cache_hits: u64, cache_rejected: u64) -> CompileCounts {
    CompileCounts {
        compiled,
        cache_hits,
        cache_rejected,
    }
}

/// A node that ran echo once from `agents`, with its compiled cache in
/// `cache`, and stopped.
async fn ran_once(agents: &Path, cache: &Path) {
    let sandbox = cached_sandbox(cache);
    let store = AgentStore::new(vec![agents.to_path_buf()]);
    resolve_and_run(&sandbox, &store, None).await.unwrap();
    assert_eq!(store.counts(), resolved(0, 0, 1), "the first run hashes the file");
}

fn digest_mismatch(result: Result<(), ResolveError>) -> (AgentDigest, AgentDigest) {
    match result {
        Err(ResolveError::DigestMismatch { expected, actual, .. }) => (expected, actual),
        other => panic!("expected a digest mismatch: {other:?}"),
    }
}

#[tokio::test]
async fn an_unchanged_file_is_not_hashed_again_after_a_restart() {
    let (agents, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let echo = echo_bytes();
    place_echo(agents.path(), "wasm", &echo);
    let_settle().await;
    ran_once(agents.path(), cache.path()).await;

    let sandbox = cached_sandbox(cache.path());
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    resolve_and_run(&sandbox, &store, Some(AgentDigest::of(&echo)))
        .await
        .unwrap();
    assert_eq!(
        store.counts(),
        resolved(0, 1, 0),
        "the digest came from the memo, the file was not hashed"
    );
    assert_eq!(
        sandbox.compile_counts(),
        compiled(0, 1, 0),
        "the component came from the compiled cache"
    );
    resolve_and_run(&sandbox, &store, None).await.unwrap();
    assert_eq!(store.counts(), resolved(1, 1, 0), "then from memory");
}

#[tokio::test]
async fn a_file_rewritten_in_place_with_its_length_and_mtime_restored_is_hashed_again() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let (agents, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let echo = echo_bytes();
    let path = place_echo(agents.path(), "wasm", &echo);
    let_settle().await;
    let sandbox = cached_sandbox(cache.path());
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    resolve_and_run(&sandbox, &store, None).await.unwrap();
    let before = std::fs::metadata(&path).unwrap();

    // Other bytes of the same length, written into the same inode, and
    // the modification time set back: only the change time tells.
    let mut other = echo.to_vec();
    let middle = other.len() / 2;
    other[middle] ^= 0xff;
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all(&other).unwrap();
    file.set_modified(before.modified().unwrap()).unwrap();
    drop(file);
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (after.ino(), after.len(), after.modified().unwrap()),
        (before.ino(), before.len(), before.modified().unwrap()),
        "same inode, length and mtime"
    );

    let pin = Some(AgentDigest::of(&echo));
    let changed = AgentDigest::of(&other);
    // At once (the change is too recent for any stamp to count), then
    // once the new stamp has settled (it differs from the one recorded
    // only by its change time), then after a restart (through the memo).
    assert_eq!(digest_mismatch(resolve_and_run(&sandbox, &store, pin).await).1, changed);
    let_settle().await;
    assert_eq!(digest_mismatch(resolve_and_run(&sandbox, &store, pin).await).1, changed);
    assert_eq!(store.counts(), resolved(0, 0, 3), "hashed each time");
    let restarted = AgentStore::new(vec![agents.path().to_path_buf()]);
    assert_eq!(
        digest_mismatch(resolve_and_run(&cached_sandbox(cache.path()), &restarted, pin).await).1,
        changed
    );
    assert_eq!(
        restarted.counts(),
        resolved(0, 0, 1),
        "the memo's record is for the old file"
    );

    // The same again by replacing the file (a new inode) instead.
    let replacement = agents.path().join("echo").join("replacement");
    std::fs::write(&replacement, &echo[..]).unwrap();
    std::fs::File::options()
        .append(true)
        .open(&replacement)
        .unwrap()
        .set_modified(after.modified().unwrap())
        .unwrap();
    std::fs::rename(&replacement, &path).unwrap();
    let_settle().await;
    resolve_and_run(&sandbox, &store, pin).await.unwrap();
    assert_eq!(store.counts(), resolved(0, 0, 4), "the replaced file is hashed");
}

#[tokio::test]
async fn a_file_changed_in_the_last_seconds_is_hashed_once_then_again_once_settled() {
    let (agents, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let echo = echo_bytes();
    let path = place_echo(agents.path(), "wasm", &echo);
    let sandbox = cached_sandbox(cache.path());
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    let record = DigestMemo::in_cache_dir(cache.path()).record_path(&path);

    resolve_and_run(&sandbox, &store, None).await.unwrap();
    assert!(
        !record.exists(),
        "nothing is remembered on disk of a file that just changed"
    );
    resolve_and_run(&sandbox, &store, None).await.unwrap();
    resolve_and_run(&sandbox, &store, Some(AgentDigest::of(&echo)))
        .await
        .unwrap();
    assert_eq!(store.counts(), resolved(2, 0, 1), "a burst of leases hashes it once");
    // A pin naming other bytes is checked against a fresh hash.
    let other = AgentDigest::of(b"another agent");
    assert_eq!(
        digest_mismatch(resolve_and_run(&sandbox, &store, Some(other)).await).0,
        other
    );
    assert_eq!(store.counts(), resolved(2, 0, 2));
    assert_eq!(
        sandbox.compile_counts(),
        compiled(1, 0, 0),
        "the sandbox compiled it once"
    );

    let_settle().await;
    resolve_and_run(&sandbox, &store, None).await.unwrap();
    assert_eq!(store.counts(), resolved(2, 0, 3), "hashed again once settled");
    assert!(record.exists(), "and remembered");
    resolve_and_run(&sandbox, &store, None).await.unwrap();
    assert_eq!(store.counts(), resolved(3, 0, 3));
}

#[tokio::test]
async fn a_damaged_memo_record_is_ignored_and_rewritten() {
    let (agents, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let echo = echo_bytes();
    let path = place_echo(agents.path(), "wasm", &echo);
    let_settle().await;
    ran_once(agents.path(), cache.path()).await;
    let record = DigestMemo::in_cache_dir(cache.path()).record_path(&path);
    let mut bytes = std::fs::read(&record).unwrap();
    // A bit of the recorded digest: read as it is, it would be another
    // agent's digest (and fail the pin).
    bytes[80] ^= 0x01;
    std::fs::write(&record, &bytes).unwrap();

    let sandbox = cached_sandbox(cache.path());
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    resolve_and_run(&sandbox, &store, Some(AgentDigest::of(&echo)))
        .await
        .unwrap();
    assert_eq!(
        store.counts(),
        resolved(0, 0, 1),
        "the damaged record was ignored: the file was hashed"
    );
    assert_eq!(
        sandbox.compile_counts(),
        compiled(0, 1, 0),
        "and found compiled under its true digest"
    );

    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    resolve_and_run(&cached_sandbox(cache.path()), &store, None)
        .await
        .unwrap();
    assert_eq!(store.counts(), resolved(0, 1, 0), "the record was written again");
}

#[tokio::test]
async fn a_wrong_pin_is_caught_through_the_memo() {
    let (agents, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let echo = echo_bytes();
    place_echo(agents.path(), "wasm", &echo);
    let_settle().await;
    ran_once(agents.path(), cache.path()).await;

    let sandbox = cached_sandbox(cache.path());
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    let wrong = AgentDigest::of(b"another agent");
    let (expected, actual) = digest_mismatch(resolve_and_run(&sandbox, &store, Some(wrong)).await);
    assert_eq!((expected, actual), (wrong, AgentDigest::of(&echo)));
    assert_eq!(store.counts(), resolved(0, 0, 0), "refused on the remembered digest");
    assert_eq!(sandbox.compile_counts(), compiled(0, 0, 0), "before loading anything");
    resolve_and_run(&sandbox, &store, Some(AgentDigest::of(&echo)))
        .await
        .unwrap();
    assert_eq!(store.counts(), resolved(0, 1, 0));
}

#[tokio::test]
async fn without_its_compiled_entry_a_remembered_file_is_read_and_hashed() {
    let (agents, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    place_echo(agents.path(), "wasm", &echo_bytes());
    let_settle().await;
    ran_once(agents.path(), cache.path()).await;
    for entry in std::fs::read_dir(cache.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_str().unwrap().starts_with("engine-") {
            std::fs::remove_dir_all(path).unwrap();
        }
    }

    let sandbox = cached_sandbox(cache.path());
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    resolve_and_run(&sandbox, &store, None).await.unwrap();
    assert_eq!(
        store.counts(),
        resolved(0, 0, 1),
        "new compiled code is keyed by a digest computed now"
    );
    assert_eq!(sandbox.compile_counts(), compiled(1, 0, 0));
}

#[tokio::test]
async fn a_precompiled_agent_restarts_from_its_file_and_stays_pinned() {
    let (agents, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cwasm = cached_sandbox(cache.path()).precompile(&echo_bytes()).unwrap();
    place_echo(agents.path(), "cwasm", &cwasm);
    let pin = Some(AgentDigest::of(&cwasm));
    let_settle().await;
    {
        let sandbox = cached_sandbox(cache.path());
        let store = AgentStore::new(vec![agents.path().to_path_buf()]);
        resolve_and_run(&sandbox, &store, pin).await.unwrap();
        assert_eq!(store.counts(), resolved(0, 0, 1));
    }

    // A .cwasm is not copied into the compiled cache: it is read and
    // checked again, its digest checked against the pin.
    let sandbox = cached_sandbox(cache.path());
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    resolve_and_run(&sandbox, &store, pin).await.unwrap();
    assert_eq!(store.counts(), resolved(0, 0, 1));
    assert_eq!(
        sandbox.compile_counts(),
        compiled(0, 0, 0),
        "nothing compiled, nothing cached"
    );
    let wrong = AgentDigest::of(b"another agent");
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    let (_, actual) = digest_mismatch(resolve_and_run(&cached_sandbox(cache.path()), &store, Some(wrong)).await);
    assert_eq!(Some(actual), pin);
}

/// `node-runtime compile` of the built echo agent: the `.cwasm` a
/// developer (or an attacker) makes with the released binary.
fn echo_cwasm(dir: &Path) -> Vec<u8> {
    let output = dir.join("echo.cwasm");
    let echo = agent_path("echo");
    let compiled = node_runtime(&["compile", echo.to_str().unwrap(), "-o", output.to_str().unwrap()]);
    assert!(
        compiled.status.success(),
        "{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    std::fs::read(&output).unwrap()
}

/// `node-runtime serve` against `plane`, trying the agents directory
/// `agents`, then the HTTP source at `base`; its data (and download
/// cache) under `data`. Killed on drop.
fn spawn_serve(plane: &DevPlane, agents: &Path, data: &Path, base: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .env("NodeRuntime__NodeId", "http-source-node")
        .env("NodeRuntime__ControlPlaneUrl", plane.url())
        .env("NodeRuntime__AgentsDirectory", agents)
        .env("NodeRuntime__DataDirectory", data)
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("AgentStore__Sources", "directory, http")
        .env(
            "AgentStore__HttpUrlTemplate",
            format!("{base}/agents/{{agent_id}}/{{version}}.wasm"),
        )
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime serve starts")
}

/// The fuel the failed run's report says it used: none, when it never ran.
fn fuel_of_failure(run: &Run) -> u64 {
    let info = run
        .error_info
        .as_ref()
        .unwrap_or_else(|| panic!("expected a failure: {run:?}"));
    let details: serde_json::Value = serde_json::from_str(&info.error_details).unwrap();
    details["report"]["fuel_consumed"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cwasm_from_the_http_source_is_refused_and_never_run_but_runs_from_the_agents_directory() {
    node_runtime::support::tls::install_crypto_provider();
    let [work, agents, data] = [(); 3].map(|_| tempfile::tempdir().unwrap());
    let cwasm = echo_cwasm(work.path());
    let (base, artifacts) = start_artifact_server().await;
    // 6.0.0: native code served under a .wasm name.
    let served = Answer::Artifact(Arc::from(cwasm.clone()));
    artifacts.files.lock().unwrap().insert("echo/6.0.0.wasm".into(), served);
    // 7.0.0: the same, already in the download cache (an older node
    // downloaded it); the server has nothing.
    let stale = data.path().join("agents").join("http").join("echo").join("7.0.0.wasm");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, &cwasm).unwrap();
    // 8.0.0: the same bytes from the operator's agents directory.
    std::fs::create_dir_all(agents.path().join("echo")).unwrap();
    std::fs::write(agents.path().join("echo").join("8.0.0.cwasm"), &cwasm).unwrap();

    let plane = start_plane().await;
    let _node = spawn_serve(&plane, agents.path(), data.path(), &base);
    let runs = ["6.0.0", "7.0.0", "8.0.0"].map(|version| run_of(version, None));
    let runs = submit_and_wait(&plane, runs.to_vec()).await;

    for (run, version) in runs[..2].iter().zip(["6.0.0", "7.0.0"]) {
        let (kind, message, retryable) = failure(run);
        assert_eq!(
            (kind.as_str(), retryable),
            ("agent.invalid", false),
            "{version}: {message}"
        );
        let url = format!("{base}/agents/echo/{version}.wasm");
        assert!(message.contains(&url), "{version}: names the URL: {message}");
        assert!(message.contains("not a WebAssembly component"), "{version}: {message}");
        assert!(
            message.contains("AgentsDirectory"),
            "{version}: where native code may come from: {message}"
        );
        assert_eq!(fuel_of_failure(run), 0, "{version}: never ran");
    }
    let refused_download = data.path().join("agents").join("http").join("echo").join("6.0.0.wasm");
    assert!(!refused_download.exists(), "the refused download is not kept");
    assert_eq!(
        artifacts.requests_for("echo/7.0.0.wasm"),
        0,
        "7.0.0 came from the download cache"
    );

    assert_eq!(
        runs[2].status,
        RunStatus::Completed,
        "the operator's .cwasm runs: {:?}",
        runs[2]
    );
    assert_eq!(runs[2].result.as_ref().unwrap()["message"], "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_the_http_source_is_not_followed() {
    node_runtime::support::tls::install_crypto_provider();
    let (agents, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (base, artifacts) = start_artifact_server().await;
    let elsewhere = format!("{base}/agents/moved/echo.wasm");
    artifacts
        .files
        .lock()
        .unwrap()
        .insert("echo/1.0.0.wasm".into(), Answer::Redirect(elsewhere.clone()));
    // What the redirect points at would run.
    artifacts
        .files
        .lock()
        .unwrap()
        .insert("moved/echo.wasm".into(), Answer::Artifact(echo_bytes()));

    let plane = start_plane().await;
    let _node = spawn_serve(&plane, agents.path(), data.path(), &base);
    let runs = submit_and_wait(&plane, vec![run_of("1.0.0", None)]).await;

    let (kind, message, retryable) = failure(&runs[0]);
    assert_eq!(
        (kind.as_str(), retryable),
        ("node.unavailable", true),
        "handed back: {message}"
    );
    assert!(
        message.contains(&format!("{base}/agents/echo/1.0.0.wasm")),
        "names the URL: {message}"
    );
    assert!(message.contains(&elsewhere), "names the Location: {message}");
    assert!(
        message.contains("AgentStore.HttpUrlTemplate"),
        "says the fix: {message}"
    );
    assert_eq!(
        artifacts.requests_for("moved/echo.wasm"),
        0,
        "the redirect was not followed"
    );
    assert!(
        files_under(&data.path().join("agents")).is_empty(),
        "nothing downloaded"
    );
}
