//! What an agent costs per language: the invoice classifier written in
//! Rust, Python (componentize-py) and JavaScript (componentize-js), each
//! compiled once, then instantiated in a fresh store and run many times.
//!
//! `cargo run -p bench -- languages [RUNS]`, after
//! `scripts/build-agents`. No LLM is configured, so each run instantiates
//! the agent, reads its invoice and ends at its first `llm.chat` call
//! (`not-configured`): the per-run cost of the language's runtime, without
//! a model's latency. Prints the component's size, its compile time, and
//! per run the median and p99 of instantiation and of the whole run, peak
//! linear memory and fuel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use node_runtime::sandbox::{EngineSettings, RunContext, RunOutcome, RunRequest, Sandbox, SandboxConfig};

const AGENTS: [&str; 3] = ["invoice-classifier", "invoice-classifier-py", "invoice-classifier-js"];

fn percentile<T: Copy + Ord>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn request() -> RunRequest {
    RunRequest {
        context: RunContext {
            input_ref: [(
                "message".to_string(),
                r#"{"vendor": "City Water", "number": "INV-1", "amount": 3.0}"#.to_string(),
            )]
            .into(),
            ..RunContext::default()
        },
        ..RunRequest::default()
    }
}

pub async fn main(args: Vec<String>) {
    let runs: usize = args
        .first()
        .map(|n| n.parse().expect("RUNS is a number"))
        .unwrap_or(200);
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: 8,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .expect("sandbox");

    println!("{runs} runs each after a tenth more to warm up; pooling allocator");
    println!(
        "{:<24} {:>10} {:>9} {:>22} {:>22} {:>10} {:>11}",
        "agent", "size", "compile", "instantiate med / p99", "run med / p99", "peak mem", "fuel"
    );
    for name in AGENTS {
        let path = format!("{target}/agents/{name}.wasm");
        let wasm: Arc<[u8]> = std::fs::read(&path)
            .unwrap_or_else(|err| panic!("{path}: {err} (run scripts/build-agents)"))
            .into();
        let size = wasm.len();
        let started = Instant::now();
        let agent = sandbox.load(wasm).await.unwrap_or_else(|err| panic!("{name}: {err}"));
        let compile = started.elapsed();

        let mut instantiate = Vec::with_capacity(runs);
        let mut wall = Vec::with_capacity(runs);
        let (mut peak, mut fuel) = (0, 0);
        for i in 0..runs + runs / 10 {
            let started = Instant::now();
            let result = sandbox.run(&agent, request()).await;
            let elapsed: Duration = started.elapsed();
            // It must have got as far as asking the model.
            match &result.outcome {
                RunOutcome::Failed(failure) if failure.message.contains("configured") => {}
                other => panic!("{name}: unexpected outcome {other:?}"),
            }
            if i >= runs / 10 {
                instantiate.push(result.report.instantiate_us);
                wall.push(elapsed.as_micros() as u64);
                peak = peak.max(result.report.peak_memory_bytes);
                fuel = result.report.fuel_consumed;
            }
        }
        instantiate.sort();
        wall.sort();
        println!(
            "{:<24} {:>7.1} MB {:>7.1} s {:>9} / {:>7} us {:>9} / {:>7} us {:>6.1} MiB {:>11}",
            name,
            size as f64 / 1e6,
            compile.as_secs_f64(),
            percentile(&instantiate, 0.5),
            percentile(&instantiate, 0.99),
            percentile(&wall, 0.5),
            percentile(&wall, 0.99),
            peak as f64 / (1 << 20) as f64,
            fuel,
        );
    }
}
