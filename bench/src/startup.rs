//! Start-up cost per run: instantiate `echo` in a fresh store and run it,
//! with the pooling allocator and with on-demand allocation, against the
//! process-per-run model of the reference node and of a Wasm CLI host:
//!
//! - `wasmtime run` (wasmtime-cli 48.0.8, from `bench/setup`) of the same
//!   agent as a WASI command (`wasi-command-echo`), precompiled once with
//!   `wasmtime compile`, a fresh process per run (skipped, saying why, when
//!   the CLI is not installed);
//! - the same command built natively (`cargo build --release -p
//!   wasi-command-echo`), a fresh process per run doing the same work
//!   (read the run context as JSON on stdin, write the result on stdout);
//! - `/bin/echo`, a process that does no work at all.
//!
//! The in-process `wasi-command-echo` variant is the same component that
//! `wasmtime run` starts, run by the node.
//!
//! `cargo run -p bench -- startup [RUNS]`, after
//! `scripts/build-agents` and `bench/setup`. Prints median and p99 per
//! variant and the ratio of each to the native process per run. With
//! `BENCH_IN_PROCESS_ONLY=1`, only the pooled in-process run is measured
//! (for profiling it alone).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::{Spread, echo_request, wait_for_quiet_machine};
use node_runtime::sandbox::{AllocatorChoice, EngineSettings, RunOutcome, Sandbox, SandboxConfig};

const CONTEXT_JSON: &str = r#"{"run_id":"run-1","lease_id":"lease-1","agent_id":"echo","agent_version":"1.0.0","trace_id":"0123456789abcdef0123456789abcdef","input_ref":{"message":"hello"},"metadata":{}}"#;

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
    let agent = sandbox.load(wasm).await.expect("the agent loads");
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + runs / 10 {
        let started = Instant::now();
        let result = sandbox.run(&agent, echo_request()).await;
        let elapsed = started.elapsed();
        match &result.outcome {
            RunOutcome::Completed(result) => assert_eq!(result["message"], "hello"),
            other => panic!("unexpected outcome {other:?}"),
        }
        // The first tenth warms caches and the pool; it is not counted.
        if i >= runs / 10 {
            samples.push(elapsed);
        }
    }
    samples
}

/// A fresh process per run, the run context on its stdin; checks its
/// stdout carries the result.
fn process_per_run(program: &Path, args: &[&str], stdin: Option<&str>, runs: usize) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            let mut child = Command::new(program)
                .args(args)
                .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|err| panic!("{}: {err}", program.display()));
            if let Some(input) = stdin {
                child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
            }
            let output = child.wait_with_output().unwrap();
            let elapsed = started.elapsed();
            assert!(output.status.success(), "{}: {:?}", program.display(), output.status);
            assert!(String::from_utf8_lossy(&output.stdout).contains("hello"));
            elapsed
        })
        .collect()
}

fn read(path: &Path) -> Arc<[u8]> {
    std::fs::read(path)
        .unwrap_or_else(|err| panic!("{}: {err} (run scripts/build-agents)", path.display()))
        .into()
}

pub async fn main(args: Vec<String>) {
    let runs: usize = args
        .first()
        .map(|n| n.parse().expect("RUNS is a number"))
        .unwrap_or(2000);
    let target = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()));
    let echo = read(&target.join("agents/echo.wasm"));
    let command_path = target.join("agents/wasi-command-echo.wasm");
    let command = read(&command_path);
    // Process variants are slower: fewer runs keep the whole bench short.
    let process_runs = (runs / 4).max(20);

    let mut rows: Vec<(String, usize, Spread, f64)> = Vec::new();
    let mut measure = |name: &str, n: usize, load: f64, samples: Vec<Duration>| {
        rows.push((name.to_string(), n, Spread::of(samples), load));
    };

    let load = wait_for_quiet_machine("startup");
    measure(
        "in-process, pooling (echo)",
        runs,
        load,
        in_process(AllocatorChoice::Pooling, echo.clone(), runs).await,
    );
    if std::env::var_os("BENCH_IN_PROCESS_ONLY").is_some() {
        let (_, n, spread, load) = &rows[0];
        println!(
            "in-process, pooling (echo): {n} runs, median {:?}, p99 {:?}, load {load:.2}",
            spread.median, spread.p99
        );
        return;
    }
    let load = wait_for_quiet_machine("startup");
    measure(
        "in-process, on-demand (echo)",
        runs,
        load,
        in_process(AllocatorChoice::OnDemand, echo, runs).await,
    );
    let load = wait_for_quiet_machine("startup");
    measure(
        "in-process, pooling (command)",
        runs,
        load,
        in_process(AllocatorChoice::Pooling, command, runs).await,
    );

    let wasmtime = target.join("bench-tools/bin/wasmtime");
    if wasmtime.exists() {
        let cwasm = target.join("bench-scratch/wasi-command-echo.cwasm");
        std::fs::create_dir_all(cwasm.parent().unwrap()).unwrap();
        let status = Command::new(&wasmtime)
            .arg("compile")
            .arg(&command_path)
            .arg("-o")
            .arg(&cwasm)
            .status()
            .expect("wasmtime compile");
        assert!(status.success(), "wasmtime compile failed");
        let load = wait_for_quiet_machine("startup");
        let cwasm = cwasm.to_str().unwrap();
        measure(
            "wasmtime run (.cwasm)",
            process_runs,
            load,
            process_per_run(
                &wasmtime,
                &["run", "--allow-precompiled", cwasm],
                Some(CONTEXT_JSON),
                process_runs,
            ),
        );
    } else {
        println!(
            "skipped `wasmtime run`: {} is not installed (run bench/setup)",
            wasmtime.display()
        );
    }

    let native = target.join("release/wasi-command-echo");
    let baseline_name = if native.exists() {
        let load = wait_for_quiet_machine("startup");
        measure(
            "native process (same work)",
            process_runs,
            load,
            process_per_run(&native, &[], Some(CONTEXT_JSON), process_runs),
        );
        "native process (same work)"
    } else {
        println!(
            "skipped the native command: {} is not built (cargo build --release -p wasi-command-echo)",
            native.display()
        );
        "process per run (/bin/echo)"
    };
    let load = wait_for_quiet_machine("startup");
    measure(
        "process per run (/bin/echo)",
        process_runs,
        load,
        process_per_run(Path::new("/bin/echo"), &["{\"message\":\"hello\"}"], None, process_runs),
    );

    let baseline = rows
        .iter()
        .find(|(name, ..)| name == baseline_name)
        .map(|(_, _, spread, _)| spread.median.as_secs_f64())
        .unwrap();
    println!("instantiate + run echo, wall time per run; ratios against the {baseline_name}");
    println!(
        "{:<32} {:>6} {:>12} {:>12} {:>14} {:>6}",
        "variant", "runs", "median", "p99", "vs baseline", "load"
    );
    for (name, n, spread, load) in &rows {
        println!(
            "{:<32} {:>6} {:>9.1} us {:>9.1} us {:>13.4}x {:>6.2}",
            name,
            n,
            spread.median.as_secs_f64() * 1e6,
            spread.p99.as_secs_f64() * 1e6,
            spread.median.as_secs_f64() / baseline,
            load
        );
    }
    let pooled = rows[0].2.median.as_secs_f64();
    println!(
        "target: pooled p50 <= 50 us (measured {:.1} us) and >= 100x faster than a process per run (measured {:.0}x)",
        pooled * 1e6,
        baseline / pooled
    );
}
