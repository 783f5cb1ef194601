//! Edge and heterogeneous hardware: guests under the Pulley interpreter
//! keep every budget, and `.cwasm` files compiled for another machine with
//! `compile --target` are accepted there and refused here, by name.
//!
//! The "other machine" is whichever of x86_64 and aarch64 this host is not,
//! so the same tests hold on an ARM node (see the README for running them
//! under qemu-user).
//!
//! And precompiled code from the network, through `node-runtime serve`: a
//! `.cwasm` signed (`compile --sign`) by a key the node trusts
//! (`AgentStore.TrustedSigningKeys`) runs from the HTTP source; unsigned,
//! wrongly signed, signed by another key, or altered after signing, it is
//! refused before it is loaded or kept, each saying which.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use node_runtime::dev_plane::{DevPlane, NewRun, PlaneOptions, Run, RunStatus};

use node_runtime::sandbox::{
    BudgetRequest, EngineSettings, Execution, FailKind, RunFailure, RunOutcome, RunResult, Sandbox, SandboxConfig,
};
use support::*;

/// This host's architecture, as `compile --target` names it, and the
/// other one this build can compile for.
const HERE: &str = std::env::consts::ARCH;
const HOST_TRIPLE: &str = if cfg!(target_arch = "aarch64") {
    "aarch64-unknown-linux-gnu"
} else {
    "x86_64-unknown-linux-gnu"
};
const OTHER: &str = if cfg!(target_arch = "aarch64") {
    "x86_64"
} else {
    "aarch64"
};
const OTHER_TRIPLE: &str = if cfg!(target_arch = "aarch64") {
    "x86_64-unknown-linux-gnu"
} else {
    "aarch64-unknown-linux-gnu"
};

fn pulley_sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: 2,
            execution: Execution::Pulley,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .expect("a Pulley sandbox starts")
}

fn failure(result: &RunResult) -> &RunFailure {
    match &result.outcome {
        RunOutcome::Failed(failure) => failure,
        RunOutcome::Completed(result) => panic!("expected a failure, the run completed: {result:?}"),
    }
}

fn compile_for(target: &str, output: &Path) -> Output {
    let echo = agent_path("echo");
    node_runtime(&[
        "compile",
        echo.to_str().unwrap(),
        "--target",
        target,
        "-o",
        output.to_str().unwrap(),
    ])
}

#[tokio::test]
async fn echo_runs_under_pulley_and_returns_its_input() {
    let sandbox = pulley_sandbox();
    assert_eq!(sandbox.execution(), Execution::Pulley);
    assert!(sandbox.target().0.starts_with("pulley"), "{:?}", sandbox.target());
    let agent = load(&sandbox, "echo").await;
    let result = sandbox
        .run(
            &agent,
            request("echo", &[("message", r#"{"invoice":42}"#)], BudgetRequest::default()),
        )
        .await;
    match &result.outcome {
        RunOutcome::Completed(map) => {
            assert_eq!(map["message"], r#"{"invoice":42}"#);
            assert_eq!(map["agent_id"], "echo");
        }
        RunOutcome::Failed(failure) => panic!("echo failed under Pulley: {failure:?}"),
    }
    assert!(result.report.fuel_consumed > 0, "fuel is metered: {:?}", result.report);
}

#[tokio::test]
async fn a_cpu_burning_agent_under_pulley_runs_out_of_fuel() {
    let sandbox = pulley_sandbox();
    let agent = load(&sandbox, "spin-forever").await;
    let budget = BudgetRequest {
        fuel: Some(5_000_000),
        ..BudgetRequest::default()
    };
    let result = sandbox.run(&agent, request("spin-forever", &[], budget)).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::BudgetFuel, "{failure:?}");
    assert!(failure.message.contains("5000000"), "{}", failure.message);
    assert_eq!(result.report.fuel_consumed, 5_000_000);
}

#[tokio::test]
async fn a_cpu_burning_agent_under_pulley_is_stopped_at_its_deadline_by_the_epoch() {
    let sandbox = pulley_sandbox();
    let agent = load(&sandbox, "spin-forever").await;
    // Fuel enough for many seconds of interpretation: if epochs did not
    // interrupt Pulley code, this run would end `budget.fuel` instead.
    let budget = BudgetRequest {
        duration: Some(Duration::from_secs(1)),
        fuel: Some(2_000_000_000),
        ..BudgetRequest::default()
    };
    let result = sandbox.run(&agent, request("spin-forever", &[], budget)).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::BudgetDeadline, "{failure:?}");
    // The outer timeout's verdict says "host call"; the epoch's does not.
    assert!(!failure.message.contains("host call"), "{}", failure.message);
}

#[tokio::test]
async fn a_pulley_node_and_a_cranelift_node_each_refuse_the_others_cwasm_by_name() {
    let pulley = pulley_sandbox();
    let cranelift = sandbox();
    let pulley_target = pulley.target().1;
    let for_pulley = cranelift
        .precompile_for(&agent_bytes("echo"), &pulley_target)
        .expect("compiles");
    let native = cranelift.precompile(&agent_bytes("echo")).expect("compiles");

    let refused = cranelift
        .load(Arc::from(for_pulley.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains(&format!("compiled for {pulley_target}")), "{refused}");
    assert!(refused.contains(&format!("native {HERE} code")), "{refused}");

    let refused = pulley.load(Arc::from(native)).await.unwrap_err().to_string();
    assert!(refused.contains(&format!("compiled for {HERE}")), "{refused}");
    assert!(refused.contains(&format!("--target {pulley_target}")), "{refused}");

    let agent = pulley
        .load(Arc::from(for_pulley))
        .await
        .expect("the Pulley node loads it");
    let result = pulley
        .run(&agent, request("echo", &[("message", "hi")], BudgetRequest::default()))
        .await;
    assert!(
        matches!(&result.outcome, RunOutcome::Completed(map) if map["message"] == "hi"),
        "{:?}",
        result.outcome
    );
}

#[test]
fn compile_for_the_other_architecture_gives_a_cwasm_this_node_refuses_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let cwasm = dir.path().join("echo.cwasm");
    let output = compile_for(OTHER_TRIPLE, &cwasm);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains(&format!("for {OTHER_TRIPLE}")),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    let (code, json) = run_agent_json(&cwasm, &["--input", "1"]);
    assert_eq!(code, 5, "{json}");
    assert_eq!(json["kind"], "agent.invalid");
    let message = json["message"].as_str().unwrap();
    assert!(message.contains(&format!("compiled for {OTHER}")), "{message}");
    assert!(message.contains(&format!("runs native {HERE} code")), "{message}");
    assert!(message.contains(&format!("--target {HOST_TRIPLE}")), "{message}");
}

#[test]
fn compile_for_this_architecture_by_name_gives_a_cwasm_this_node_runs() {
    // The portable code of `--target` (no CPU extensions assumed) under the
    // node's own settings: fuel, epochs and all must match for it to load.
    let dir = tempfile::tempdir().unwrap();
    let cwasm = dir.path().join("echo.cwasm");
    let output = compile_for(HOST_TRIPLE, &cwasm);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (code, json) = run_agent_json(&cwasm, &["--input", r#"{"portable": true}"#]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["result"]["message"], r#"{"portable": true}"#);
    assert!(json["report"]["fuel_consumed"].as_u64().unwrap() > 0, "{json}");
}

#[test]
fn compile_for_pulley64_gives_a_cwasm_a_pulley_node_runs_and_a_cranelift_node_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cwasm = dir.path().join("echo.pulley.cwasm");
    let output = compile_for("pulley64", &cwasm);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let (code, json) = run_agent_json(&cwasm, &["--engine", "pulley", "--input", r#"{"edge": true}"#]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["result"]["message"], r#"{"edge": true}"#);

    let (code, json) = run_agent_json(&cwasm, &[]);
    assert_eq!(code, 5, "{json}");
    let message = json["message"].as_str().unwrap();
    assert!(message.contains("compiled for pulley64"), "{message}");
    assert!(message.contains("--engine pulley"), "{message}");
}

#[test]
fn compile_for_an_unsupported_target_is_a_usage_error_listing_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    for target in ["riscv64gc-unknown-linux-gnu", "not-a-triple"] {
        let cwasm = dir.path().join("echo.cwasm");
        let output = compile_for(target, &cwasm);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{target}: {stderr}");
        assert!(
            stderr.contains(&format!("--target: cannot compile for target `{target}`")),
            "{stderr}"
        );
        assert!(
            stderr.contains("x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu, pulley64, pulley32"),
            "{stderr}"
        );
        assert!(!cwasm.exists(), "nothing is written");
    }
}

#[test]
fn run_agent_refuses_an_unknown_engine() {
    let output = node_runtime(&["run-agent", agent_path("echo").to_str().unwrap(), "--engine", "winch"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("use cranelift or pulley"));
}

/// `node-runtime keygen -o DIR/NAME.pem`: the private key's path, and the
/// public key's (`.pub`).
fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let output = node_runtime(&["keygen", "-o", private.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let public = dir.join(format!("{name}.pem.pub"));
    assert!(public.is_file(), "keygen writes the public key beside the private one");
    (private, public)
}

/// `compile echo` to `output`, signed with `key` when there is one.
fn compile_echo(output: &Path, key: Option<&Path>) -> Vec<u8> {
    let echo = agent_path("echo");
    let mut args = vec!["compile", echo.to_str().unwrap(), "-o", output.to_str().unwrap()];
    if let Some(key) = key {
        args.extend(["--sign", key.to_str().unwrap()]);
    }
    let compiled = node_runtime(&args);
    assert!(
        compiled.status.success(),
        "{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    if key.is_some() {
        assert!(
            String::from_utf8_lossy(&compiled.stdout).contains("signed by ed25519:"),
            "{}",
            String::from_utf8_lossy(&compiled.stdout)
        );
    }
    std::fs::read(output).unwrap()
}

/// Serves `files` (`echo/1.0.0.wasm` -> bytes) under `/agents/`; 404 for
/// anything else.
async fn serve_files(files: BTreeMap<String, Vec<u8>>) -> String {
    use axum::extract::{Path as UrlPath, State};
    use axum::response::IntoResponse;
    let app = axum::Router::new()
        .route(
            "/agents/{agent}/{file}",
            axum::routing::get(
                |State(files): State<Arc<BTreeMap<String, Vec<u8>>>>,
                 UrlPath((agent, file)): UrlPath<(String, String)>| async move {
                    match files.get(&format!("{agent}/{file}")) {
                        Some(bytes) => bytes.clone().into_response(),
                        None => axum::http::StatusCode::NOT_FOUND.into_response(),
                    }
                },
            ),
        )
        .with_state(Arc::new(files));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// `node-runtime serve` against `plane`, taking agents from the HTTP source
/// at `base` only, trusting the public keys `keys`.
fn spawn_serve_trusting(plane: &DevPlane, data: &Path, base: &str, keys: &[&Path]) -> tokio::process::Child {
    let keys: Vec<&str> = keys.iter().map(|key| key.to_str().unwrap()).collect();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .env("NodeRuntime__NodeId", "edge-node")
        .env("NodeRuntime__ControlPlaneUrl", plane.url())
        .env("NodeRuntime__DataDirectory", data)
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("AgentStore__Sources", "http")
        .env(
            "AgentStore__HttpUrlTemplate",
            format!("{base}/agents/{{agent_id}}/{{version}}.wasm"),
        )
        .env("AgentStore__TrustedSigningKeys", keys.join(","))
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime serve starts")
}

async fn submit_and_wait(plane: &DevPlane, versions: &[&str]) -> Vec<Run> {
    let mut ids = Vec::new();
    for version in versions {
        let run = NewRun {
            agent_id: "echo".to_string(),
            version: version.to_string(),
            input_ref: BTreeMap::from([("message".to_string(), "signed".to_string())]),
            metadata: BTreeMap::new(),
            budgets: Default::default(),
        };
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_cwasm_from_the_http_source_runs_and_unsigned_wrongly_signed_foreign_or_altered_ones_are_refused() {
    node_runtime::support::tls::install_crypto_provider();
    let [work, data] = [(); 2].map(|_| tempfile::tempdir().unwrap());
    let (trusted, trusted_public) = keygen(work.path(), "trusted");
    let (other, _) = keygen(work.path(), "other");

    let signed = compile_echo(&work.path().join("signed.cwasm"), Some(&trusted));
    let unsigned = compile_echo(&work.path().join("unsigned.cwasm"), None);
    let by_other = compile_echo(&work.path().join("other.cwasm"), Some(&other));
    // The signature's last byte (before the 16-byte magic) flipped.
    let mut wrongly_signed = signed.clone();
    let at = wrongly_signed.len() - 17;
    wrongly_signed[at] ^= 1;
    // A byte of the code flipped after signing.
    let mut altered = signed.clone();
    altered[signed.len() / 2] ^= 1;

    let versions = [
        ("1.0.0", signed, None),
        ("2.0.0", unsigned, Some("without a signature")),
        ("3.0.0", by_other, Some("which this node does not trust")),
        ("4.0.0", wrongly_signed, Some("does not verify")),
        ("5.0.0", altered, Some("altered after signing")),
        ("6.0.0", agent_bytes("echo").to_vec(), None),
    ];
    let files = versions
        .iter()
        .map(|(version, bytes, _)| (format!("echo/{version}.wasm"), bytes.clone()))
        .collect();
    let base = serve_files(files).await;

    let plane = DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(100),
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let _node = spawn_serve_trusting(&plane, data.path(), &base, &[&trusted_public]);
    let names: Vec<&str> = versions.iter().map(|(version, _, _)| *version).collect();
    let runs = submit_and_wait(&plane, &names).await;

    let kept = data.path().join("agents").join("http").join("echo");
    for (run, (version, _, refused)) in runs.iter().zip(&versions) {
        match refused {
            None => {
                assert_eq!(run.status, RunStatus::Completed, "{version}: {run:?}");
                assert_eq!(run.result.as_ref().unwrap()["message"], "signed", "{version}");
            }
            Some(why) => {
                let info = run
                    .error_info
                    .as_ref()
                    .unwrap_or_else(|| panic!("{version}: expected a failure: {run:?}"));
                let details: serde_json::Value = serde_json::from_str(&info.error_details).unwrap();
                let message = &info.error_message;
                assert_eq!(details["kind"], "agent.invalid", "{version}: {message}");
                assert!(!info.retryable, "{version}: {message}");
                assert!(message.contains(why), "{version}: says why ({why}): {message}");
                assert!(
                    message.contains(&format!("{base}/agents/echo/{version}.wasm")),
                    "{version}: names the URL: {message}"
                );
                assert_eq!(
                    details["report"]["fuel_consumed"].as_u64(),
                    Some(0),
                    "{version}: never ran"
                );
                assert!(
                    !kept.join(format!("{version}.wasm")).exists(),
                    "{version}: a refused download is not kept"
                );
            }
        }
    }
    assert!(kept.join("1.0.0.wasm").is_file(), "the signed download is kept");
}

#[test]
fn a_trusted_key_file_that_is_missing_or_not_a_public_key_stops_the_configuration_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let (private, public) = keygen(work.path(), "signer");
    let config = work.path().join("appsettings.json");
    std::fs::write(&config, "{}").unwrap();
    let check = |keys: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .args(["config", "check", "--config", config.to_str().unwrap()])
            .env("AgentStore__TrustedSigningKeys", keys)
            .output()
            .unwrap()
    };

    let output = check(public.to_str().unwrap());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let listed = printed["AgentStore"]["TrustedSigningKeys"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(listed.starts_with(public.to_str().unwrap()), "{listed}");
    assert!(listed.contains("(ed25519:"), "names the key: {listed}");

    let missing = work.path().join("missing.pub");
    for (keys, why) in [
        (missing.to_str().unwrap(), "cannot read it"),
        (private.to_str().unwrap(), "not a PEM public key"),
    ] {
        let output = check(keys);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("AgentStore.TrustedSigningKeys"),
            "names the key: {stderr}"
        );
        assert!(stderr.contains(keys), "names the file: {stderr}");
        assert!(stderr.contains(why), "{stderr}");
        assert!(stderr.contains("node-runtime keygen"), "says how to make one: {stderr}");
    }
}

#[test]
fn compile_sign_with_a_key_that_cannot_sign_is_a_usage_error_before_compiling() {
    let work = tempfile::tempdir().unwrap();
    let (_, public) = keygen(work.path(), "signer");
    let output_path = work.path().join("echo.cwasm");
    let echo = agent_path("echo");
    let output = node_runtime(&[
        "compile",
        echo.to_str().unwrap(),
        "-o",
        output_path.to_str().unwrap(),
        "--sign",
        public.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--sign"), "{stderr}");
    assert!(stderr.contains("PKCS#8"), "{stderr}");
    assert!(!output_path.exists(), "nothing is written");
}

#[test]
fn keygen_never_replaces_a_key() {
    let work = tempfile::tempdir().unwrap();
    let (private, _) = keygen(work.path(), "signer");
    let before = std::fs::read(&private).unwrap();
    let output = node_runtime(&["keygen", "-o", private.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("never replaces"));
    assert_eq!(std::fs::read(&private).unwrap(), before);
}

/// A signed `.cwasm` from the operator's own file runs like an unsigned
/// one: the operator's files are trusted as they are.
#[test]
fn a_signed_cwasm_given_to_run_agent_runs() {
    let work = tempfile::tempdir().unwrap();
    let (key, _) = keygen(work.path(), "signer");
    let cwasm = work.path().join("echo.cwasm");
    compile_echo(&cwasm, Some(&key));
    let (code, json) = run_agent_json(&cwasm, &["--input", r#"{"local": true}"#]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["result"]["message"], r#"{"local": true}"#);
}
