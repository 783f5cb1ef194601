//! What running guests under the Pulley interpreter costs against
//! Cranelift's native code (`Sandbox.Engine`, `run-agent --engine`): the
//! CPU-bound `prime-sieve` and a whole `echo` run (instantiation included),
//! both metered as the node meters them (fuel + epochs), plus the time to
//! compile each agent for each engine.
//!
//! `cargo run -p bench -- engines [RUNS [LIMIT]]`, after
//! `scripts/build-agents`. The engines alternate run by run so that load
//! from elsewhere on the machine falls on both alike; 2 warm-up runs each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::{Spread, agent_wasm, sieve_run, wait_for_quiet_machine};
use node_runtime::sandbox::{
    Agent, EngineSettings, Execution, RunContext, RunOutcome, RunRequest, Sandbox, SandboxConfig,
};

struct Variant {
    execution: Execution,
    sandbox: Sandbox,
    sieve: Arc<Agent>,
    echo: Arc<Agent>,
    compile: [Duration; 2],
    sieve_times: Vec<Duration>,
    echo_times: Vec<Duration>,
}

async fn echo_run(sandbox: &Sandbox, agent: &Agent) -> Duration {
    let request = RunRequest {
        context: RunContext {
            input_ref: [("message".to_string(), "hello".to_string())].into(),
            ..RunContext::default()
        },
        ..RunRequest::default()
    };
    let started = Instant::now();
    let result = sandbox.run(agent, request).await;
    let elapsed = started.elapsed();
    match result.outcome {
        RunOutcome::Completed(map) => assert_eq!(map["message"], "hello"),
        other => panic!("echo did not complete: {other:?}"),
    }
    elapsed
}

async fn timed_load(sandbox: &Sandbox, wasm: Arc<[u8]>) -> (Arc<Agent>, Duration) {
    let started = Instant::now();
    let agent = sandbox.load(wasm).await.expect("the agent loads");
    (agent, started.elapsed())
}

pub async fn main(args: Vec<String>) {
    let mut args = args.into_iter();
    let runs: usize = args.next().map(|n| n.parse().expect("RUNS is a number")).unwrap_or(20);
    let limit: u64 = args
        .next()
        .map(|n| n.parse().expect("LIMIT is a number"))
        .unwrap_or(2_000_000);
    let (sieve_wasm, echo_wasm) = (agent_wasm("prime-sieve"), agent_wasm("echo"));

    let load = wait_for_quiet_machine("engines");
    let mut variants = Vec::new();
    for execution in [Execution::Cranelift, Execution::Pulley] {
        let sandbox = Sandbox::new(SandboxConfig {
            engine: EngineSettings {
                execution,
                max_concurrent_runs: 2,
                ..EngineSettings::default()
            },
            ..SandboxConfig::default()
        })
        .expect("sandbox");
        assert_eq!(sandbox.execution(), execution, "this host runs both engines");
        let (sieve, sieve_compile) = timed_load(&sandbox, sieve_wasm.clone()).await;
        let (echo, echo_compile) = timed_load(&sandbox, echo_wasm.clone()).await;
        for _ in 0..2 {
            sieve_run(&sandbox, &sieve, limit).await;
            echo_run(&sandbox, &echo).await;
        }
        variants.push(Variant {
            execution,
            sandbox,
            sieve,
            echo,
            compile: [sieve_compile, echo_compile],
            sieve_times: Vec::with_capacity(runs),
            echo_times: Vec::with_capacity(runs),
        });
    }
    let mut answer = None;
    for _ in 0..runs {
        for variant in &mut variants {
            let (time, primes) = sieve_run(&variant.sandbox, &variant.sieve, limit).await;
            variant.sieve_times.push(time);
            assert_eq!(
                answer.get_or_insert_with(|| primes.clone()),
                &primes,
                "both engines agree"
            );
            variant.echo_times.push(echo_run(&variant.sandbox, &variant.echo).await);
        }
    }
    let load_after = bench::load_average();

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("prime-sieve below {limit} and echo, {runs} runs each, interleaved; load {load:.2} -> {load_after:.2}");
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>14} {:>16} {:>16}",
        "engine", "sieve median", "sieve p99", "echo median", "echo p99", "compile sieve", "compile echo"
    );
    let spreads: Vec<Measured> = variants
        .into_iter()
        .map(|v| {
            (
                v.execution,
                Spread::of(v.sieve_times),
                Spread::of(v.echo_times),
                v.compile,
            )
        })
        .collect();
    for (execution, sieve, echo, compile) in &spreads {
        println!(
            "{:<10} {:>11.2} ms {:>11.2} ms {:>11.3} ms {:>11.3} ms {:>13.1} ms {:>13.1} ms",
            execution.as_str(),
            ms(sieve.median),
            ms(sieve.p99),
            ms(echo.median),
            ms(echo.p99),
            ms(compile[0]),
            ms(compile[1]),
        );
    }
    let ratio = |pick: fn(&Measured) -> Duration| pick(&spreads[1]).as_secs_f64() / pick(&spreads[0]).as_secs_f64();
    println!(
        "pulley / cranelift: sieve {:.1}x, echo {:.1}x (medians)",
        ratio(|s| s.1.median),
        ratio(|s| s.2.median)
    );
}

/// One engine's readings: the sieve's and echo's spreads, and the two
/// compile times.
type Measured = (Execution, Spread, Spread, [Duration; 2]);
