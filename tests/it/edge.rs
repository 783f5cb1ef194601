//! Edge and heterogeneous hardware: guests under the Pulley interpreter
//! keep every budget, and `.cwasm` files compiled for another machine with
//! `compile --target` are accepted there and refused here, by name.
//!
//! The "other machine" is whichever of x86_64 and aarch64 this host is not,
//! so the same tests hold on an ARM node (see the README for running them
//! under qemu-user).

use crate::support;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

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
