//! What every benchmark binary shares: percentiles over samples, the wait
//! for a quiet machine before measuring (the machine is shared, so each
//! result is printed with the load average it was measured under), and
//! the CPU-bound `prime-sieve` run that `metering` and `engines` time, and
//! the request the `echo` benchmarks send.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use node_runtime::sandbox::{
    Agent, BudgetRequest, EngineSettings, Metering, RunContext, RunOutcome, RunRequest, Sandbox, SandboxConfig,
};

/// The `p` quantile (0..=1) of sorted samples, nearest rank.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Median and p99 of some durations.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: Duration,
    pub p99: Duration,
}

impl Spread {
    pub fn of(mut samples: Vec<Duration>) -> Spread {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        Spread {
            median: percentile(&samples, 0.5),
            p99: percentile(&samples, 0.99),
        }
    }
}

/// The 1-minute load average, from /proc/loadavg.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Waits until the 1-minute load average is under `BENCH_MAX_LOAD`
/// (default 1.5), for at most `BENCH_LOAD_WAIT_SECS` (default 300), and
/// returns the load average measurement starts under. It measures anyway
/// after the wait, saying so: the number printed next to each result tells
/// the reader how much to trust it.
pub fn wait_for_quiet_machine(what: &str) -> f64 {
    let env = |name: &str, default: f64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let max_load = env("BENCH_MAX_LOAD", 1.5);
    let limit = Duration::from_secs_f64(env("BENCH_LOAD_WAIT_SECS", 300.0));
    let started = Instant::now();
    loop {
        let load = load_average();
        if load < max_load {
            return load;
        }
        if started.elapsed() >= limit {
            eprintln!(
                "{what}: load average still {load:.2} (>= {max_load}) after {:.0} s; measuring anyway",
                limit.as_secs_f64()
            );
            return load;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// A sample agent built by `scripts/build-agents`.
pub fn agent_wasm(name: &str) -> Arc<[u8]> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{target}/agents/{name}.wasm");
    std::fs::read(&path)
        .unwrap_or_else(|err| panic!("{path}: {err} (run scripts/build-agents)"))
        .into()
}

/// The run request the `echo` benchmarks send: input `message=hello`.
pub fn echo_request() -> RunRequest {
    RunRequest {
        context: RunContext {
            run_id: "run-1".to_string(),
            lease_id: "lease-1".to_string(),
            agent_id: "echo".to_string(),
            agent_version: "1.0.0".to_string(),
            trace_id: "0123456789abcdef0123456789abcdef".to_string(),
            input_ref: BTreeMap::from([("message".to_string(), "hello".to_string())]),
            ..RunContext::default()
        },
        budget: BudgetRequest::default(),
        ..RunRequest::default()
    }
}

/// One run of `prime-sieve` below `limit`: its wall time, and the number
/// of primes it found (every variant must agree).
pub async fn sieve_run(sandbox: &Sandbox, agent: &Agent, limit: u64) -> (Duration, String) {
    let input = [("limit".to_string(), limit.to_string())];
    let (elapsed, result) = timed_run(sandbox, agent, &input).await;
    (elapsed, result["primes"].clone())
}

/// One run of `agent` with `input`, which must complete: its wall time and
/// its result.
pub async fn timed_run(
    sandbox: &Sandbox,
    agent: &Agent,
    input: &[(String, String)],
) -> (Duration, BTreeMap<String, String>) {
    let request = RunRequest {
        context: RunContext {
            input_ref: input.iter().cloned().collect(),
            ..RunContext::default()
        },
        budget: BudgetRequest::default(),
        ..RunRequest::default()
    };
    let started = Instant::now();
    let result = sandbox.run(agent, request).await;
    let elapsed = started.elapsed();
    match result.outcome {
        RunOutcome::Completed(map) => (elapsed, map),
        other => panic!("the run did not complete: {other:?}"),
    }
}

/// A sandbox whose guests are metered as `metering`, for two runs at once.
pub fn metered_sandbox(metering: Metering) -> Sandbox {
    Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            metering,
            max_concurrent_runs: 2,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .expect("sandbox")
}
