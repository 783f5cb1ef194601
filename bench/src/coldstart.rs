//! Cold start of a new agent version: the first run that has to compile
//! the component, the first run after a restart with the on-disk compiled
//! cache, and a warm run.
//!
//! `cargo run -p bench --bin coldstart [-- ROUNDS]`, after
//! `scripts/build-agents`. Each round uses an empty cache directory:
//!
//! 1. a sandbox with the compiled cache reads the `.wasm`, loads it
//!    (SHA-256, compile, write to the cache) and runs it once;
//! 2. that sandbox is dropped and a new one opened on the same directory,
//!    as a restarted node would (building the engine is timed apart): read,
//!    load (from the cache) and run once;
//! 3. the same agent runs again in that sandbox.
//!
//! The restart is in-process: the file system's page cache stays warm, as
//! it would on a node restarted by its supervisor.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::{Spread, wait_for_quiet_machine};
use sha2::{Digest, Sha256};
use node_runtime::sandbox::{
    CompiledCacheSettings, EngineSettings, FailKind, RunOutcome, RunRequest, Sandbox, SandboxConfig,
};

const AGENTS: [&str; 2] = ["echo", "invoice-classifier"];

fn sandbox(cache: &Path) -> Sandbox {
    Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: 8,
            ..EngineSettings::default()
        },
        compiled_cache: Some(CompiledCacheSettings {
            dir: cache.to_path_buf(),
            max_bytes: 1 << 30,
        }),
        ..SandboxConfig::default()
    })
    .expect("sandbox")
}

/// Reads the component, loads it and runs it once: what a node does with
/// the first lease for an agent version. Returns the time to read and
/// load (hash, compile or fetch from the cache, link) and the whole.
async fn first_run(sandbox: &Sandbox, path: &Path) -> (Duration, Duration) {
    let started = Instant::now();
    let bytes: Arc<[u8]> = std::fs::read(path).expect("agent file").into();
    let agent = sandbox.load(bytes).await.expect("agent loads");
    let loaded = started.elapsed();
    let result = sandbox.run(&agent, RunRequest::default()).await;
    let elapsed = started.elapsed();
    ended(&result.outcome);
    (loaded, elapsed)
}

/// echo completes; the invoice classifier, given no input, returns its
/// own error: both ran to the end of their `run`.
fn ended(outcome: &RunOutcome) {
    match outcome {
        RunOutcome::Completed(_) => {}
        RunOutcome::Failed(failure) if failure.kind == FailKind::AgentError => {}
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("ROUNDS is a number"))
        .unwrap_or(5);
    let target =
        PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()));
    let scratch = target.join("bench-scratch/coldstart");

    println!(
        "{rounds} rounds per agent, each with an empty compiled cache; times are read + load + one run"
    );
    println!(
        "{:<20} {:<34} {:>12} {:>12} {:>6}",
        "agent", "step", "median", "p99", "load"
    );
    for name in AGENTS {
        let path = target.join(format!("agents/{name}.wasm"));
        assert!(
            path.exists(),
            "{}: run scripts/build-agents",
            path.display()
        );
        let load = wait_for_quiet_machine("coldstart");
        let (mut compile, mut engine, mut cached, mut cached_load, mut warm) =
            (vec![], vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            let cache = scratch.join(format!("{name}-{round}"));
            let _ = std::fs::remove_dir_all(&cache);
            {
                let fresh = sandbox(&cache);
                compile.push(first_run(&fresh, &path).await.1);
            }
            let started = Instant::now();
            let restarted = sandbox(&cache);
            engine.push(started.elapsed());
            let (loaded, whole) = first_run(&restarted, &path).await;
            cached_load.push(loaded);
            cached.push(whole);
            assert_eq!(
                restarted.compile_counts().cache_hits,
                1,
                "loaded from the on-disk cache"
            );
            let agent = restarted
                .load(std::fs::read(&path).unwrap().into())
                .await
                .unwrap();
            let started = Instant::now();
            let result = restarted.run(&agent, RunRequest::default()).await;
            warm.push(started.elapsed());
            ended(&result.outcome);
            let _ = std::fs::remove_dir_all(&cache);
        }
        // One of the steps of a cached load, alone: hashing the component.
        let mut hashing = vec![];
        let bytes = std::fs::read(&path).unwrap();
        for _ in 0..rounds {
            let started = Instant::now();
            std::hint::black_box(Sha256::digest(&bytes));
            hashing.push(started.elapsed());
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        for (step, samples) in [
            ("first run, compiling", compile),
            ("new sandbox (engine, pool)", engine),
            ("first run after restart, cached", cached),
            ("  of which read + load", cached_load),
            ("warm run", warm),
            ("(SHA-256 of the .wasm alone)", hashing),
        ] {
            let spread = Spread::of(samples);
            println!(
                "{:<20} {:<34} {:>9.2} ms {:>9.2} ms {:>6.2}",
                name,
                step,
                ms(spread.median),
                ms(spread.p99),
                load
            );
        }
    }
    println!("target: a restarted node's first run of a known agent under 5 ms");
}
