//! The sandbox as a library: every way a run can end, classified, with the
//! meters' readings, and the node still healthy afterwards.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use node_runtime::sandbox::precompiled;
use node_runtime::sandbox::{
    Agent, Allocator, AllocatorChoice, BudgetRequest, EngineSettings, FailKind, Metering, NodeLimits, RunFailure,
    RunOutcome, RunRequest, RunResult, Sandbox, SandboxConfig,
};
use support::*;

fn failure(result: &RunResult) -> &RunFailure {
    match &result.outcome {
        RunOutcome::Failed(failure) => failure,
        RunOutcome::Completed(result) => panic!("expected a failure, the run completed: {result:?}"),
    }
}

fn completed(result: &RunResult) -> &std::collections::BTreeMap<String, String> {
    match &result.outcome {
        RunOutcome::Completed(result) => result,
        RunOutcome::Failed(failure) => panic!("expected completion, the run failed: {failure:?}"),
    }
}

async fn run(name: &str, input: &[(&str, &str)], budget: BudgetRequest) -> RunResult {
    let sandbox = sandbox();
    let agent = load(&sandbox, name).await;
    sandbox.run(&agent, request(name, input, budget)).await
}

#[tokio::test]
async fn echo_completes_and_returns_its_input_and_context() {
    let sandbox = sandbox();
    let agent = load(&sandbox, "echo").await;
    let mut request = request("echo", &[("message", r#"{"invoice":42}"#)], BudgetRequest::default());
    request.context.metadata = map(&[("tenant", "acme")]);
    let result = sandbox.run(&agent, request).await;

    let result_map = completed(&result);
    assert_eq!(result_map["message"], r#"{"invoice":42}"#);
    assert_eq!(result_map["run_id"], "run-0001");
    assert_eq!(result_map["agent_id"], "echo");
    assert_eq!(result_map["agent_version"], "1.0.0");
    assert_eq!(result_map["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(result_map["metadata.tenant"], "acme");
    assert!(result.report.fuel_consumed > 0);
    assert!(result.report.peak_memory_bytes > 0);
    assert_eq!(result.report.log_lines, 1, "echo logs one line");
    assert_eq!(agent.kind(), "agent");
}

#[tokio::test]
async fn two_runs_of_the_same_agent_and_input_burn_the_same_fuel() {
    let sandbox = sandbox();
    let agent = load(&sandbox, "echo").await;
    let input = [("message", "same input")];
    let first = sandbox
        .run(&agent, request("echo", &input, BudgetRequest::default()))
        .await;
    let second = sandbox
        .run(&agent, request("echo", &input, BudgetRequest::default()))
        .await;
    completed(&first);
    assert_eq!(first.report.fuel_consumed, second.report.fuel_consumed);
}

#[tokio::test]
async fn spin_forever_with_a_fuel_budget_fails_budget_fuel() {
    let budget = BudgetRequest {
        fuel: Some(5_000_000),
        ..BudgetRequest::default()
    };
    let result = run("spin-forever", &[], budget).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::BudgetFuel);
    assert!(!failure.retryable);
    assert!(failure.message.contains("5000000"), "{}", failure.message);
    assert_eq!(result.report.fuel_consumed, 5_000_000);
}

#[tokio::test]
async fn spin_forever_with_only_a_timeout_fails_budget_deadline_on_time() {
    let budget = BudgetRequest {
        duration: Some(Duration::from_secs(1)),
        ..BudgetRequest::default()
    };
    let result = run("spin-forever", &[], budget).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::BudgetDeadline, "{failure:?}");
    assert!(result.report.wall_ms >= 1000, "{:?}", result.report);
    assert!(
        result.report.wall_ms <= 1100,
        "ended {} ms after start",
        result.report.wall_ms
    );
}

#[tokio::test]
async fn sleep_forever_fails_budget_deadline_on_time() {
    let budget = BudgetRequest {
        duration: Some(Duration::from_secs(1)),
        ..BudgetRequest::default()
    };
    let result = run("sleep-forever", &[], budget).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::BudgetDeadline, "{failure:?}");
    assert!(failure.message.contains("host call"), "{}", failure.message);
    assert!(result.report.wall_ms >= 1000, "{:?}", result.report);
    assert!(
        result.report.wall_ms <= 1100,
        "ended {} ms after start",
        result.report.wall_ms
    );
}

/// A run cut off while it waits in a host call is reported before its
/// call is unwound, from its meters as the guest entered that call: the
/// fuel it burned up to its sleep, whenever the deadline comes. A guest
/// stopped while computing ends in the call hook, with nothing to unwind.
#[tokio::test]
async fn a_run_cut_off_in_a_host_call_is_reported_before_it_is_unwound_with_exact_fuel() {
    let sandbox = sandbox();
    let sleeper = load(&sandbox, "sleep-forever").await;
    let mut fuel = Vec::new();
    for millis in [300, 700] {
        let budget = BudgetRequest {
            duration: Some(Duration::from_millis(millis)),
            ..BudgetRequest::default()
        };
        let reported = sandbox
            .run_reported(&sleeper, request("sleep-forever", &[], budget))
            .await;
        let call = reported.cut_off.expect("the call is left to unwind");
        let result = reported.result;
        let failure = failure(&result);
        assert_eq!(failure.kind, FailKind::BudgetDeadline, "{failure:?}");
        assert!(
            failure.message.contains("waiting in a host call"),
            "{}",
            failure.message
        );
        assert!(result.report.wall_ms >= millis, "{:?}", result.report);
        assert!(result.report.instantiate_us > 0, "{:?}", result.report);
        assert!(result.report.peak_memory_bytes > 0, "{:?}", result.report);
        fuel.push(result.report.fuel_consumed);
        call.unwind().await;
    }
    assert!(fuel[0] > 0, "the run computed before it slept: {fuel:?}");
    assert_eq!(fuel[0], fuel[1], "the same work before the same sleep");

    // A computing guest is parked by the call hook, read there, reported,
    // and unwound after: the unwinding gives its backtrace.
    let spinner = load(&sandbox, "spin-forever").await;
    let budget = BudgetRequest {
        duration: Some(Duration::from_millis(300)),
        ..BudgetRequest::default()
    };
    let reported = sandbox
        .run_reported(&spinner, request("spin-forever", &[], budget))
        .await;
    let call = reported.cut_off.expect("a computing guest is parked, left to unwind");
    let cut_off = failure(&reported.result);
    assert_eq!(cut_off.kind, FailKind::BudgetDeadline, "{cut_off:?}");
    assert!(!cut_off.message.contains("host call"), "{}", cut_off.message);
    assert!(!cut_off.details.contains("wasm backtrace"), "{}", cut_off.details);
    let report = &reported.result.report;
    assert!(report.fuel_consumed > 1_000_000, "it computed: {report:?}");
    assert!(report.instantiate_us > 0 && report.peak_memory_bytes > 0, "{report:?}");
    let backtrace = call.unwind().await.expect("a parked guest's backtrace");
    assert!(
        backtrace.contains("wasm backtrace") && backtrace.contains("spin_forever.wasm!run"),
        "{backtrace}"
    );
    // `run`, which waits for the unwinding, gives the backtrace in the details.
    let result = sandbox.run(&spinner, request("spin-forever", &[], budget)).await;
    let waited = failure(&result);
    assert_eq!(waited.kind, FailKind::BudgetDeadline, "{waited:?}");
    assert!(waited.details.contains("spin_forever.wasm!run"), "{}", waited.details);

    // Every slot is free again once the calls are unwound.
    let echo = load(&sandbox, "echo").await;
    completed(&sandbox.run(&echo, request("echo", &[], BudgetRequest::default())).await);
}

#[tokio::test]
async fn a_lease_already_past_its_deadline_fails_without_running() {
    let sandbox = sandbox();
    let agent = load(&sandbox, "echo").await;
    let mut request = request("echo", &[], BudgetRequest::default());
    request.deadline = Some(SystemTime::now() - Duration::from_secs(1));
    let result = sandbox.run(&agent, request).await;
    assert_eq!(failure(&result).kind, FailKind::BudgetDeadline);
    assert_eq!(result.report.fuel_consumed, 0, "nothing ran");
}

#[tokio::test]
async fn the_lease_deadline_cuts_a_run_shorter_than_its_duration_budget() {
    let sandbox = sandbox();
    let agent = load(&sandbox, "sleep-forever").await;
    let mut request = request("sleep-forever", &[], BudgetRequest::default());
    request.deadline = Some(SystemTime::now() + Duration::from_millis(300));
    let result = sandbox.run(&agent, request).await;
    assert_eq!(failure(&result).kind, FailKind::BudgetDeadline);
    assert!(result.report.wall_ms < 60_000);
}

#[tokio::test]
async fn memory_bomb_fails_budget_memory_and_its_peak_stays_under_the_limit() {
    let budget = BudgetRequest {
        memory_bytes: Some(32 * MIB),
        ..BudgetRequest::default()
    };
    let result = run("memory-bomb", &[], budget).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::BudgetMemory, "{failure:?}");
    assert!(failure.message.contains("32 MiB"), "{}", failure.message);
    assert!(result.report.peak_memory_bytes <= 32 * MIB, "{:?}", result.report);
    assert!(
        result.report.peak_memory_bytes > 16 * MIB,
        "it did grow: {:?}",
        result.report
    );
}

#[tokio::test]
async fn stack_overflow_fails_agent_trap_with_a_backtrace() {
    let result = run("stack-overflow", &[], BudgetRequest::default()).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::AgentTrap, "{failure:?}");
    assert!(failure.message.contains("stack overflow"), "{}", failure.message);
    assert!(failure.details.contains("wasm backtrace"), "{}", failure.details);
}

#[tokio::test]
async fn panic_fails_agent_trap_with_the_panic_message_and_a_backtrace() {
    let result = run("panic", &[], BudgetRequest::default()).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::AgentTrap, "{failure:?}");
    assert!(
        failure.message.contains("this agent always panics"),
        "the panic message is in the one-line message: {}",
        failure.message
    );
    assert!(failure.details.contains("wasm backtrace"), "{}", failure.details);
    // Each frame is its position in the file and its function's name; the
    // engine reads no DWARF (a trap is reported without symbolicating it),
    // though the sample carries line tables: no source lines here.
    let (backtrace, _) = failure
        .details
        .split_once("stderr:")
        .expect("stderr after the backtrace");
    assert!(backtrace.contains(" - panic.wasm!run"), "{backtrace}");
    let frames: Vec<&str> = backtrace
        .lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert!(
        frames.len() >= 5 && frames.iter().all(|line| line.contains(" - panic.wasm!")),
        "one line per frame, a position on each: {backtrace}"
    );
    assert!(!backtrace.contains(".rs:"), "{backtrace}");
}

#[tokio::test]
async fn agent_error_fails_agent_error_and_keeps_its_retryable_flag() {
    let result = run("agent-error", &[], BudgetRequest::default()).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::AgentError);
    assert!(failure.retryable);
    assert!(
        failure.message.contains("downstream system unavailable"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn big_result_is_refused_and_memory_stays_bounded() {
    let budget = BudgetRequest {
        memory_bytes: Some(64 * MIB),
        ..BudgetRequest::default()
    };
    let result = run("big-result", &[], budget).await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::BudgetOutput, "{failure:?}");
    // 16 MiB is more than a returned value may carry out of the agent:
    // refused while it is copied, before the node could measure it.
    assert!(
        failure.message.contains("returned more than 2 MiB"),
        "{}",
        failure.message
    );
    assert!(
        failure.message.contains("over the node's cap of 1 MiB"),
        "{}",
        failure.message
    );
    assert!(result.report.peak_memory_bytes <= 64 * MIB);
    let result = run("big-result", &[("size", &(3 * MIB / 2).to_string())], budget).await;
    let measured = self::failure(&result);
    assert_eq!(measured.kind, FailKind::BudgetOutput, "{measured:?}");
    assert!(
        measured.message.contains("1.5 MiB, over the node's cap of 1 MiB"),
        "{}",
        measured.message
    );

    // A result under the cap completes.
    let result = run("big-result", &[("size", "1000")], BudgetRequest::default()).await;
    assert_eq!(completed(&result)["big"].len(), 1000);
}

#[tokio::test]
async fn big_result_beyond_the_memory_limit_fails_budget_memory() {
    let budget = BudgetRequest {
        memory_bytes: Some(8 * MIB),
        ..BudgetRequest::default()
    };
    let result = run("big-result", &[], budget).await;
    assert_eq!(failure(&result).kind, FailKind::BudgetMemory);
}

#[tokio::test]
async fn log_flood_is_capped_and_the_drops_are_counted() {
    let limits = NodeLimits::default();
    let sandbox = sandbox_with(limits.clone());
    let agent = load(&sandbox, "log-flood").await;
    let result = sandbox
        .run(
            &agent,
            request("log-flood", &[("lines", "5000")], BudgetRequest::default()),
        )
        .await;
    assert_eq!(completed(&result)["lines"], "5000");
    assert_eq!(result.report.log_lines, limits.log_lines);
    assert_eq!(
        result.report.log_lines + result.report.log_lines_dropped,
        5001,
        "5000 lines plus one huge line, each either passed on or counted as dropped"
    );
}

#[tokio::test]
async fn capabilities_answer_the_guest_budget_llm_and_denied_http() {
    let sandbox = sandbox();
    let agent = load(&sandbox, "capabilities-probe").await;
    let budget = BudgetRequest {
        fuel: Some(1_000_000_000),
        memory_bytes: Some(64 * MIB),
        duration: Some(Duration::from_secs(30)),
        tokens: Some(500),
    };
    let result = sandbox.run(&agent, request("capabilities-probe", &[], budget)).await;
    let seen = completed(&result);
    let fuel: u64 = seen["budget.fuel"].parse().unwrap();
    assert!(fuel > 0 && fuel < 1_000_000_000, "fuel counts down: {fuel}");
    let memory: u64 = seen["budget.memory_bytes"].parse().unwrap();
    assert!(memory > 0 && memory < 64 * MIB, "memory in use is subtracted: {memory}");
    let time_ms: u64 = seen["budget.time_ms"].parse().unwrap();
    assert!(time_ms > 0 && time_ms <= 30_000, "{time_ms}");
    assert_eq!(seen["budget.tokens"], "500");
    assert!(
        seen["llm"].contains("no LLM endpoint configured"),
        "llm: {}",
        seen["llm"]
    );
    assert!(seen["http"].to_lowercase().contains("denied"), "http: {}", seen["http"]);
    assert_eq!((result.report.http_requests, result.report.http_denied), (1, 1));
}

#[tokio::test]
async fn a_wasi_command_reads_its_context_on_stdin_and_answers_on_stdout() {
    let sandbox = sandbox();
    let agent = load(&sandbox, "wasi-command-echo").await;
    assert_eq!(agent.kind(), "command");
    let result = sandbox
        .run(
            &agent,
            request("wasi-command-echo", &[("message", "hi")], BudgetRequest::default()),
        )
        .await;
    let result_map = completed(&result);
    assert_eq!(result_map["message"], "hi");
    assert_eq!(result_map["run_id"], "run-0001");
    assert_eq!(
        result_map["lease_id"],
        "lease-run-0001-0123456789abcdef0123456789abcdef"
    );

    let result = sandbox
        .run(
            &agent,
            request("wasi-command-echo", &[("exit-code", "7")], BudgetRequest::default()),
        )
        .await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::AgentError);
    // WASI 0.2 carries only success or failure, not the code itself.
    assert!(
        failure.message.contains("exited with a failure status"),
        "{}",
        failure.message
    );
    assert!(
        failure.message.contains("asked to exit with 7"),
        "stderr is quoted: {}",
        failure.message
    );
}

#[tokio::test]
async fn a_wasi_command_with_too_much_stdout_fails_budget_output() {
    let sandbox = sandbox_with(NodeLimits {
        result_bytes: 64,
        ..NodeLimits::default()
    });
    let agent = load(&sandbox, "wasi-command-echo").await;
    let long = "x".repeat(200);
    let result = sandbox
        .run(
            &agent,
            request("wasi-command-echo", &[("message", &long)], BudgetRequest::default()),
        )
        .await;
    assert_eq!(failure(&result).kind, FailKind::BudgetOutput, "{:?}", result.outcome);
}

async fn invalid(bytes: Vec<u8>) -> String {
    match sandbox().load(Arc::from(bytes)).await {
        Ok(agent) => panic!("loaded {agent:?}"),
        Err(invalid) => invalid.to_string(),
    }
}

#[tokio::test]
async fn files_that_are_not_agents_are_refused_with_the_reason() {
    assert!(invalid(Vec::new()).await.contains("empty"));
    assert!(
        invalid(b"#!/bin/sh\necho hi\n".to_vec())
            .await
            .contains("not WebAssembly")
    );
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    assert!(invalid(core_module).await.contains("core WebAssembly module"));
    let echo = agent_bytes("echo");
    let truncated = echo[..echo.len() / 2].to_vec();
    assert!(invalid(truncated).await.contains("not a valid WebAssembly component"));
    let other = invalid(agent_bytes("other-world").to_vec()).await;
    assert!(other.contains("another world"), "{other}");
    assert!(other.contains("greet"), "the exports are listed: {other}");
}

#[tokio::test]
async fn a_component_is_compiled_once_per_content() {
    let sandbox = sandbox();
    let first = load(&sandbox, "echo").await;
    let second = load(&sandbox, "echo").await;
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(first.digest().len(), 64);
}

#[tokio::test]
async fn a_precompiled_cwasm_runs_and_a_damaged_one_is_refused() {
    let sandbox = sandbox();
    let cwasm = sandbox.precompile(&agent_bytes("echo")).expect("precompiles");
    let agent = sandbox.load(Arc::from(cwasm.clone())).await.expect("loads the .cwasm");
    let result = sandbox
        .run(
            &agent,
            request("echo", &[("message", "from cwasm")], BudgetRequest::default()),
        )
        .await;
    assert_eq!(completed(&result)["message"], "from cwasm");

    let mut damaged = cwasm.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    assert!(invalid(damaged).await.contains("damaged"));

    let mut truncated = cwasm;
    truncated.drain(100..200);
    assert!(invalid(truncated).await.contains("damaged"));
}

#[tokio::test]
async fn a_cwasm_from_another_engine_configuration_is_refused() {
    // An engine without fuel or epochs compiles code that cannot be
    // metered: the node must refuse it even though its digest is intact.
    let foreign = wasmtime::Engine::new(wasmtime::Config::new().wasm_component_model(true)).unwrap();
    let component = wasmtime::component::Component::new(&foreign, &*agent_bytes("echo")).unwrap();
    let sealed = precompiled::seal(component.serialize().unwrap());
    let message = invalid(sealed).await;
    assert!(message.contains("different engine"), "{message}");

    // A bare wasmtime artifact, without node-runtime's trailer.
    let bare = component.serialize().unwrap();
    assert!(invalid(bare).await.contains("integrity trailer"));
}

#[tokio::test]
async fn a_cwasm_with_epoch_checks_from_an_older_node_is_refused_with_the_command_to_rebuild() {
    // Nodes before issue 22 compiled fuel and epoch checks into every
    // guest; this one enforces deadlines through fuel, and never advances
    // an epoch that such code would wait for.
    let older = Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            metering: Metering::FuelAndEpochs,
            allocator: AllocatorChoice::OnDemand,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .expect("an engine as older nodes built it");
    let cwasm = older.precompile(&agent_bytes("echo")).expect("precompiles");
    let message = invalid(cwasm).await;
    assert!(message.contains("older node-runtime"), "{message}");
    assert!(message.contains("epoch"), "{message}");
    assert!(message.contains("`node-runtime compile`"), "{message}");
}

#[tokio::test]
async fn when_the_pool_cannot_be_reserved_the_engine_falls_back_to_on_demand() {
    let huge = EngineSettings {
        max_concurrent_runs: 1_000_000,
        ..EngineSettings::default()
    };
    let sandbox = Sandbox::new(SandboxConfig {
        engine: huge.clone(),
        ..SandboxConfig::default()
    })
    .expect("auto falls back");
    assert!(
        matches!(sandbox.allocator(), Allocator::OnDemand { reason } if reason.contains("pool")),
        "{:?}",
        sandbox.allocator()
    );
    let agent = load(&sandbox, "echo").await;
    completed(
        &sandbox
            .run(&agent, request("echo", &[], BudgetRequest::default()))
            .await,
    );

    let pooling_only = Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            allocator: AllocatorChoice::Pooling,
            ..huge
        },
        ..SandboxConfig::default()
    });
    assert!(pooling_only.is_err(), "pooling-only does not fall back");
    assert!(matches!(support::sandbox().allocator(), Allocator::Pooling { .. }));
}

/// Runs `agent` (named `name`) on a task of its own, within `duration`.
fn run_in_background(
    sandbox: &Arc<Sandbox>,
    agent: Arc<Agent>,
    name: &'static str,
    duration: Duration,
) -> tokio::task::JoinHandle<RunResult> {
    let sandbox = sandbox.clone();
    tokio::spawn(async move {
        let budget = BudgetRequest {
            duration: Some(duration),
            ..BudgetRequest::default()
        };
        sandbox.run(&agent, request(name, &[], budget)).await
    })
}

/// A pooling sandbox with room for one instance at a time.
fn one_slot_pool() -> Sandbox {
    Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            allocator: AllocatorChoice::Pooling,
            max_concurrent_runs: 1,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .expect("a one-slot pool")
}

#[tokio::test]
async fn a_run_finds_nothing_an_earlier_run_left_in_memory() {
    // One pooled slot, so the second run reuses the first one's memory
    // (reset between runs, by rewriting dirty pages where the kernel can
    // list them, else by discarding them).
    let sandbox = one_slot_pool();
    let hostile = load(&sandbox, "hostile").await;
    for round in 0..3 {
        let result = sandbox
            .run(
                &hostile,
                request("hostile", &[("attack", "residue")], BudgetRequest::default()),
            )
            .await;
        let seen = completed(&result);
        assert_eq!(seen["residue.static"], "0", "round {round}: {seen:?}");
        assert_eq!(seen["residue.heap"], "0", "round {round}: {seen:?}");
        assert_eq!(
            seen["residue.heap.same_run"], "4096",
            "the probe finds residue when there is some"
        );
    }
}

#[tokio::test]
async fn a_run_the_node_has_no_room_to_instantiate_is_handed_back_not_failed_for_good() {
    // A pool of one instance, held by a sleeping run: the next run cannot
    // be instantiated here, through no fault of its agent.
    let sandbox = Arc::new(one_slot_pool());
    let sleeper = load(&sandbox, "sleep-forever").await;
    let echo = load(&sandbox, "echo").await;
    let sleeping = run_in_background(&sandbox, sleeper, "sleep-forever", Duration::from_secs(3));
    // Bounded: the sleeper holds the slot for 3 s; it is in its host call
    // well before that.
    let mut result = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let attempt = sandbox.run(&echo, request("echo", &[], BudgetRequest::default())).await;
        if matches!(attempt.outcome, RunOutcome::Failed(_)) {
            result = Some(attempt);
            break;
        }
    }
    let result = result.expect("echo found no free instance while the sleeper held the only one");
    let refused = failure(&result);
    assert_eq!(refused.kind, FailKind::NodeUnavailable, "{refused:?}");
    assert!(refused.retryable, "{refused:?}");
    assert!(refused.message.contains("could not instantiate"), "{}", refused.message);
    assert_eq!(failure(&sleeping.await.unwrap()).kind, FailKind::BudgetDeadline);
    completed(&sandbox.run(&echo, request("echo", &[], BudgetRequest::default())).await);
}

#[tokio::test(flavor = "current_thread")]
async fn a_cpu_bound_agent_does_not_starve_other_runs() {
    // One thread for the whole runtime: echo can only finish while
    // spin-forever runs if spin-forever yields.
    let sandbox = Arc::new(sandbox());
    let spin = load(&sandbox, "spin-forever").await;
    let echo = load(&sandbox, "echo").await;
    // Long enough that echo finishes first even on a loaded machine.
    let spinning = run_in_background(&sandbox, spin, "spin-forever", Duration::from_secs(4));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let result = sandbox.run(&echo, RunRequest::default()).await;
    completed(&result);
    assert!(
        !spinning.is_finished(),
        "echo finished while spin-forever was still running"
    );
    assert_eq!(failure(&spinning.await.unwrap()).kind, FailKind::BudgetDeadline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compilation_whose_caller_stopped_waiting_finishes_and_serves_the_next_load() {
    // A caller that gives up (its lease's deadline passed) cannot cancel a
    // compilation; the next load must wait for that one, not start
    // another beside it.
    let sandbox = sandbox();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(1),
        sandbox.load(agent_bytes("invoice-classifier")),
    )
    .await;
    assert!(abandoned.is_err(), "a compilation takes longer than 1 ms");
    let agent = load(&sandbox, "invoice-classifier").await;
    assert_eq!(agent.kind(), "agent");
    assert_eq!(sandbox.compile_counts().compiled, 1, "compiled once");
}

/// A guest looping on synchronous host calls (a megabyte of random bytes
/// at a time) barely advances its fuel, so fuel alone would not make it
/// yield: it would hold a runtime thread, and every task queued behind it,
/// until its own deadline. With two such guests on a two-thread runtime,
/// a run waiting in a host call must still be stopped at its earlier
/// deadline while they run on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_looping_on_host_calls_leave_the_runtime_to_other_runs() {
    let sandbox = Arc::new(sandbox());
    let hostile = load(&sandbox, "hostile").await;
    let sleeper = load(&sandbox, "sleep-forever").await;
    let seconds = |s| BudgetRequest {
        duration: Some(Duration::from_secs(s)),
        ..BudgetRequest::default()
    };
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let (sandbox, hostile) = (sandbox.clone(), hostile.clone());
            tokio::spawn(async move {
                sandbox
                    .run(&hostile, request("hostile", &[("attack", "random-loop")], seconds(10)))
                    .await
            })
        })
        .collect();
    // The hogs take both threads first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe = {
        let sandbox = sandbox.clone();
        tokio::spawn(async move { sandbox.run(&sleeper, request("sleep-forever", &[], seconds(1))).await })
    }
    .await
    .unwrap();
    assert_eq!(failure(&probe).kind, FailKind::BudgetDeadline, "{probe:?}");
    let running = hogs.iter().filter(|hog| !hog.is_finished()).count();
    assert_eq!(
        running, 2,
        "the waiting run ended only after the host-call loops did: {:?}",
        probe.report
    );
    for hog in hogs {
        let result = hog.await.unwrap();
        assert_eq!(failure(&result).kind, FailKind::BudgetDeadline, "{result:?}");
    }
}
