//! Agents in an OCI registry: a real registry (Debian's `docker-registry`,
//! installed by `scripts/install-test-services`) on loopback, `node-runtime
//! push` and `pull` through the binary, and `node-runtime serve` configured
//! with only the OCI source running what was pushed, pinned by digest.
//! And what the OCI source refuses, never running it: a layer of another
//! media type (before its blob is fetched), a manifest without exactly
//! one layer, and a `.cwasm` (native code) pushed as `application/wasm`; `pull`
//! does not save that `.cwasm` either.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use node_runtime::agent_store::AgentDigest;
use node_runtime::dev_plane::{DevPlane, NewRun, PlaneOptions, Run, RunStatus};
use support::*;

/// A registry on a free loopback port, storing under `dir`; killed on drop.
struct Registry {
    address: String,
    _process: tokio::process::Child,
}

async fn start_registry(dir: &Path) -> Registry {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {address}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let process = tokio::process::Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("docker-registry runs (scripts/install-test-services installs it)");
    let http = reqwest::Client::new();
    eventually_async(Duration::from_secs(30), "the registry to listen", || async {
        let answer = http.get(format!("http://{address}/v2/")).send().await.ok()?;
        answer.status().is_success().then_some(())
    })
    .await;
    Registry {
        address,
        _process: process,
    }
}

async fn node_runtime(args: &[&str]) -> Output {
    let command = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("NODE_RUNTIME_REGISTRY_USERNAME")
        .env_remove("NODE_RUNTIME_REGISTRY_PASSWORD")
        .output();
    tokio::time::timeout(Duration::from_secs(120), command)
        .await
        .expect("the command ends")
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_pull_gives_back_the_same_bytes_and_prints_the_pin() {
    node_runtime::support::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry(dir.path()).await;
    let echo = agent_path("echo");
    let digest = AgentDigest::of(&std::fs::read(&echo).unwrap()).to_string();
    let reference = format!("{}/agents/echo:1.0.0", registry.address);

    let pushed = node_runtime(&["push", echo.to_str().unwrap(), &reference, "--insecure"]).await;
    assert!(pushed.status.success(), "{}", text(&pushed));
    assert!(
        text(&pushed).contains(&format!("agent.digest {digest}")),
        "{}",
        text(&pushed)
    );

    let copy = dir.path().join("copy.wasm");
    let pulled = node_runtime(&["pull", &reference, "-o", copy.to_str().unwrap(), "--insecure"]).await;
    assert!(pulled.status.success(), "{}", text(&pulled));
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&echo).unwrap());

    // What is not a component never reaches the registry.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not webassembly").unwrap();
    let refused_ref = format!("{}/agents/junk:1.0.0", registry.address);
    let refused = node_runtime(&["push", junk.to_str().unwrap(), &refused_ref, "--insecure"]).await;
    assert_eq!(
        refused.status.code(),
        Some(5),
        "agent.invalid's exit code: {}",
        text(&refused)
    );
    assert!(
        text(&refused).contains("not a WebAssembly component"),
        "{}",
        text(&refused)
    );
    let absent = node_runtime(&["pull", &refused_ref, "-o", copy.to_str().unwrap(), "--insecure"]).await;
    assert!(!absent.status.success(), "nothing was pushed: {}", text(&absent));

    let bad = node_runtime(&["push", echo.to_str().unwrap(), "http://not a reference", "--insecure"]).await;
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("REGISTRY/REPOSITORY:TAG"), "{}", text(&bad));
}

/// A dev plane and a `serve` node whose only agent source is `registry`
/// (plain HTTP), with an empty agents directory; the node is killed when
/// this is dropped.
struct OciNode {
    plane: DevPlane,
    data: tempfile::TempDir,
    _agents: tempfile::TempDir,
    _node: tokio::process::Child,
}

async fn start_oci_node(registry: &Registry, node_id: &str) -> OciNode {
    let plane = DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(100),
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let agents = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let template = format!("{}/agents/{{agent_id}}:{{version}}", registry.address);
    let node = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .env("NodeRuntime__NodeId", node_id)
        .env("NodeRuntime__ControlPlaneUrl", plane.url())
        .env("NodeRuntime__AgentsDirectory", agents.path())
        .env("NodeRuntime__DataDirectory", data.path())
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("AgentStore__Sources", "oci")
        .env("AgentStore__OciReferenceTemplate", &template)
        .env("AgentStore__OciInsecure", "true")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    OciNode {
        plane,
        data,
        _agents: agents,
        _node: node,
    }
}

fn run_of(agent: &str, version: &str, digest: Option<&str>) -> NewRun {
    NewRun {
        agent_id: agent.to_string(),
        version: version.to_string(),
        input_ref: BTreeMap::from([("message".to_string(), "from the registry".to_string())]),
        metadata: digest
            .map(|d| ("agent.digest".to_string(), d.to_string()))
            .into_iter()
            .collect(),
        budgets: Default::default(),
    }
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
async fn a_node_with_only_the_oci_source_runs_what_was_pushed_and_honours_the_pin() {
    node_runtime::support::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry(dir.path()).await;
    let echo = agent_path("echo");
    let digest = AgentDigest::of(&std::fs::read(&echo).unwrap()).to_string();
    let wrong = AgentDigest::of(b"another artifact").to_string();
    let reference = format!("{}/agents/echo:1.0.0", registry.address);
    let pushed = node_runtime(&["push", echo.to_str().unwrap(), &reference, "--insecure"]).await;
    assert!(pushed.status.success(), "{}", text(&pushed));

    let OciNode { plane, data, .. } = &start_oci_node(&registry, "oci-node").await;

    let mut ids = Vec::new();
    for run in [
        run_of("echo", "1.0.0", Some(&digest)),
        run_of("echo", "1.0.0", Some(&wrong)),
        run_of("echo", "7.0.0", None),
    ] {
        ids.push(plane.submit(run).await.unwrap().run_id);
    }
    let runs: Vec<Run> = eventually(Duration::from_secs(90), "the three runs to end", || {
        let runs: Vec<Run> = ids.iter().filter_map(|id| plane.run(id)).collect();
        runs.iter()
            .all(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
            .then_some(runs)
    })
    .await;

    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    assert_eq!(runs[0].result.as_ref().unwrap()["message"], "from the registry");
    let (kind, message, retryable) = failure(&runs[1]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false), "{message}");
    assert!(
        message.contains(&digest) && message.contains(&wrong),
        "names both digests: {message}"
    );
    let (kind, message, retryable) = failure(&runs[2]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false), "{message}");
    assert!(
        message.contains(&format!("{}/agents/echo:7.0.0", registry.address)),
        "{message}"
    );
    let kept = data.path().join("agents").join("oci").join("echo").join("1.0.0.wasm");
    assert_eq!(
        std::fs::read(kept).unwrap(),
        std::fs::read(&echo).unwrap(),
        "the pulled copy is kept"
    );
}

/// Pushes `layers` (with the Wasm config of the oci-wasm layout, as `push`
/// writes it) under `reference`, bypassing `node-runtime push`'s checks,
/// as a registry's other users can.
async fn push_raw(reference: &str, layers: Vec<oci_client::client::ImageLayer>) {
    let echo = std::fs::read(agent_path("echo")).unwrap();
    let (config, _) = oci_wasm::WasmConfig::from_raw_component(echo, None).unwrap();
    let client = node_runtime::agent_store::oci_source::registry_client(true);
    let config = oci_wasm::ToConfig::to_config(&config).unwrap();
    let mut manifest = oci_client::manifest::OciImageManifest::build(&layers, &config, None);
    manifest.media_type = Some(oci_wasm::WASM_MANIFEST_MEDIA_TYPE.to_string());
    let reference: oci_client::Reference = reference.parse().unwrap();
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    client
        .as_ref()
        .push(&reference, &layers, config, &auth, Some(manifest))
        .await
        .unwrap();
}

/// The registry's file for the blob with SHA-256 `digest` (`sha256:<hex>`).
fn blob_file(dir: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    dir.join("data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_not_in_the_wasm_layout_or_holding_a_cwasm_is_refused_and_never_run() {
    node_runtime::support::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry(dir.path()).await;
    let echo = std::fs::read(agent_path("echo")).unwrap();
    let reference = |version: &str| format!("{}/agents/echo:{version}", registry.address);

    // 2.0.0: a runnable component, but in a layer of another media type.
    // Its blob is deleted from the registry below: the node must not need it.
    let tar = "application/vnd.oci.image.layer.v1.tar";
    let tar_layer = oci_client::client::ImageLayer::new(echo.clone(), tar.to_string(), None);
    push_raw(&reference("2.0.0"), vec![tar_layer]).await;
    // 3.0.0: native code, pushed as `application/wasm`.
    let cwasm_file = dir.path().join("echo.cwasm");
    let echo_path = agent_path("echo");
    let compiled = node_runtime(&[
        "compile",
        echo_path.to_str().unwrap(),
        "-o",
        cwasm_file.to_str().unwrap(),
    ])
    .await;
    assert!(compiled.status.success(), "{}", text(&compiled));
    let cwasm = std::fs::read(&cwasm_file).unwrap();
    let wasm_layer =
        |data: Vec<u8>| oci_client::client::ImageLayer::new(data, oci_wasm::WASM_LAYER_MEDIA_TYPE.to_string(), None);
    push_raw(&reference("3.0.0"), vec![wasm_layer(cwasm.clone())]).await;
    // 4.0.0: a manifest with two layers.
    let header_only = wasm_layer(b"\0asm\x0d\0\x01\0".to_vec());
    push_raw(&reference("4.0.0"), vec![header_only, wasm_layer(echo.clone())]).await;
    // 5.0.0: a manifest with none.
    push_raw(&reference("5.0.0"), vec![]).await;
    // Deleted last: a push of the same bytes would upload it again.
    let blob = blob_file(dir.path(), &AgentDigest::of(&echo).to_string());
    std::fs::remove_file(&blob).unwrap_or_else(|err| panic!("the layer's blob at {}: {err}", blob.display()));

    let OciNode { plane, data, .. } = &start_oci_node(&registry, "oci-refusing-node").await;

    let mut ids = Vec::new();
    for version in ["2.0.0", "3.0.0", "4.0.0", "5.0.0"] {
        ids.push(plane.submit(run_of("echo", version, None)).await.unwrap().run_id);
    }
    let runs: Vec<Run> = eventually(Duration::from_secs(90), "the four runs to end", || {
        let runs: Vec<Run> = ids.iter().filter_map(|id| plane.run(id)).collect();
        runs.iter()
            .all(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
            .then_some(runs)
    })
    .await;

    let (kind, message, retryable) = failure(&runs[0]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false), "{message}");
    assert!(message.contains(&reference("2.0.0")), "names the reference: {message}");
    assert!(
        message.contains(tar) && message.contains("application/wasm"),
        "names both media types: {message}"
    );

    let (kind, message, retryable) = failure(&runs[1]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false), "{message}");
    assert!(message.contains(&reference("3.0.0")), "names the reference: {message}");
    assert!(message.contains("not a WebAssembly component"), "{message}");
    assert!(
        message.contains("AgentsDirectory"),
        "says where native code may come from: {message}"
    );
    let info = runs[1].error_info.as_ref().unwrap();
    let details: serde_json::Value = serde_json::from_str(&info.error_details).unwrap();
    assert_eq!(details["report"]["fuel_consumed"], 0, "never ran: {details}");

    let (kind, message, retryable) = failure(&runs[2]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false), "{message}");
    assert!(
        message.contains(&reference("4.0.0")) && message.contains("2 layers"),
        "{message}"
    );
    let (kind, message, retryable) = failure(&runs[3]);
    assert_eq!((kind.as_str(), retryable), ("agent.invalid", false), "{message}");
    assert!(
        message.contains(&reference("5.0.0")) && message.contains("0 layers"),
        "{message}"
    );

    let kept = files_under(&data.path().join("agents"));
    assert!(
        kept.is_empty(),
        "nothing refused is kept in the download cache: {kept:?}"
    );

    // `pull` does not save native code either.
    let copy = dir.path().join("copy.wasm");
    let pulled = node_runtime(&["pull", &reference("3.0.0"), "-o", copy.to_str().unwrap(), "--insecure"]).await;
    assert_eq!(
        pulled.status.code(),
        Some(5),
        "agent.invalid's exit code: {}",
        text(&pulled)
    );
    assert!(
        text(&pulled).contains("not a WebAssembly component"),
        "{}",
        text(&pulled)
    );
    assert!(!copy.exists(), "nothing saved");
}
