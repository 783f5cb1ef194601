//! Start-up cost per run: instantiate `echo` in a fresh store and run it,
//! with the pooling allocator and with on-demand allocation, against the
//! process-per-run model of the reference node (a fresh native process per
//! run doing the same trivial work).
//!
//! `cargo run --release -p bench --bin startup [-- RUNS]`, after
//! `scripts/build-agents`. Prints median and p99 per variant and the ratio
//! of each to the process-per-run baseline.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node_runtime::sandbox::{
    AllocatorChoice, BudgetRequest, EngineSettings, RunOutcome, RunRequest, Sandbox,
    SandboxConfig,
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

struct Summary {
    name: &'static str,
    median: Duration,
    p99: Duration,
}

fn summarise(name: &'static str, mut samples: Vec<Duration>) -> Summary {
    samples.sort();
    Summary {
        name,
        median: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
    }
}

async fn in_process(allocator: AllocatorChoice, wasm: Arc<[u8]>, runs: usize) -> Vec<Duration> {
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            allocator,
            max_concurrent_runs: 8,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .expect("sandbox");
    let agent = sandbox.load(wasm).await.expect("echo loads");
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + runs / 10 {
        let started = Instant::now();
        let result = sandbox
            .run(
                &agent,
                RunRequest {
                    budget: BudgetRequest::default(),
                    ..RunRequest::default()
                },
            )
            .await;
        let elapsed = started.elapsed();
        assert!(matches!(result.outcome, RunOutcome::Completed(_)));
        // The first tenth warms caches and the pool; it is not counted.
        if i >= runs / 10 {
            samples.push(elapsed);
        }
    }
    samples
}

fn process_per_run(runs: usize) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            let status = Command::new("/bin/echo")
                .arg("{\"message\":\"hello\"}")
                .stdout(Stdio::null())
                .status()
                .expect("/bin/echo runs");
            assert!(status.success());
            started.elapsed()
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("RUNS is a number"))
        .unwrap_or(2000);
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{target}/agents/echo.wasm");
    let wasm: Arc<[u8]> = std::fs::read(&path)
        .unwrap_or_else(|err| panic!("{path}: {err} (run scripts/build-agents)"))
        .into();

    let summaries = [
        summarise("in-process, pooling", in_process(AllocatorChoice::Pooling, wasm.clone(), runs).await),
        summarise("in-process, on-demand", in_process(AllocatorChoice::OnDemand, wasm, runs).await),
        summarise("process per run (/bin/echo)", process_per_run(runs)),
    ];
    let baseline = summaries[2].median.as_secs_f64();
    println!("{runs} runs each; instantiate + run echo, wall time per run");
    println!("{:<30} {:>12} {:>12} {:>18}", "variant", "median", "p99", "median vs process");
    for s in &summaries {
        println!(
            "{:<30} {:>9.1} us {:>9.1} us {:>17.3}x",
            s.name,
            s.median.as_secs_f64() * 1e6,
            s.p99.as_secs_f64() * 1e6,
            s.median.as_secs_f64() / baseline
        );
    }
}
