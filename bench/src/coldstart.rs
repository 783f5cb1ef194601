//! Cold start of a new agent version: the first run that has to compile
//! the component, the first run after a restart with the on-disk compiled
//! cache, and a warm run.
//!
//! `cargo run -p bench -- coldstart [ROUNDS]`, after
//! `scripts/build-agents`. Agents are resolved as a node resolves a
//! lease's agent: through an [`AgentStore`] over a directory
//! (`<dir>/<agent_id>/<version>.wasm`). Each round uses an empty cache
//! directory:
//!
//! 1. a sandbox with the compiled cache and a store resolve the agent
//!    (stamp, read, SHA-256, compile, write to the cache) and run it once;
//! 2. both are dropped and a new sandbox and a new store are opened on the
//!    same directories, as a restarted node would (building the engine is
//!    timed apart): resolve (the file's digest from the store's memo, the
//!    component from the cache, the file itself not read) and run once;
//! 3. the same agent runs again in that sandbox.
//!
//! The restart is in-process: the file system's page cache stays warm, as
//! it would on a node restarted by its supervisor.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bench::{Spread, wait_for_quiet_machine};
use node_runtime::agent_store::{AgentStore, SETTLE_TIME};
use node_runtime::sandbox::{
    CompiledCacheSettings, EngineSettings, FailKind, RunOutcome, RunRequest, Sandbox, SandboxConfig,
};
use sha2::{Digest, Sha256};

const AGENTS: [&str; 2] = ["echo", "invoice-classifier"];
const VERSION: &str = "1.0.0";

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

/// Resolves the agent and runs it once: what a node does with the first
/// lease for an agent version. Returns the time to resolve (stamp, hash,
/// compile or fetch from the cache, link) and the whole.
async fn first_run(sandbox: &Sandbox, store: &AgentStore, name: &str) -> (Duration, Duration) {
    let started = Instant::now();
    let agent = store.resolve(sandbox, name, VERSION).await.expect("agent resolves");
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

pub async fn main(args: Vec<String>) {
    let rounds: usize = args
        .first()
        .map(|n| n.parse().expect("ROUNDS is a number"))
        .unwrap_or(5);
    let target = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()));
    let scratch = target.join("bench-scratch/coldstart");

    // The agents directory a node would be given, laid out as the store
    // expects. The copies are made now and left to settle: an operator's
    // files are written long before a restart, and a file changed in the
    // last seconds (SETTLE_TIME) is hashed again at every resolution.
    let agents = scratch.join("agents");
    let _ = std::fs::remove_dir_all(&agents);
    for name in AGENTS {
        let built = target.join(format!("agents/{name}.wasm"));
        assert!(built.exists(), "{}: run scripts/build-agents", built.display());
        std::fs::create_dir_all(agents.join(name)).unwrap();
        std::fs::copy(&built, agents.join(name).join(format!("{VERSION}.wasm"))).unwrap();
    }
    std::thread::sleep(SETTLE_TIME + Duration::from_secs(1));

    println!("{rounds} rounds per agent, each with an empty compiled cache; times are resolve + one run");
    println!(
        "{:<20} {:<34} {:>12} {:>12} {:>6}",
        "agent", "step", "median", "p99", "load"
    );
    for name in AGENTS {
        let path = agents.join(name).join(format!("{VERSION}.wasm"));
        let load = wait_for_quiet_machine("coldstart");
        let (mut compile, mut engine, mut cached, mut cached_load, mut warm) = (vec![], vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            let cache = scratch.join(format!("{name}-{round}"));
            let _ = std::fs::remove_dir_all(&cache);
            {
                let fresh = sandbox(&cache);
                let store = AgentStore::new(vec![agents.clone()]);
                compile.push(first_run(&fresh, &store, name).await.1);
            }
            let started = Instant::now();
            let restarted = sandbox(&cache);
            let store = AgentStore::new(vec![agents.clone()]);
            engine.push(started.elapsed());
            let (loaded, whole) = first_run(&restarted, &store, name).await;
            cached_load.push(loaded);
            cached.push(whole);
            assert_eq!(
                restarted.compile_counts().cache_hits,
                1,
                "loaded from the on-disk cache"
            );
            assert_eq!(store.counts().hashed, 0, "the digest came from the memo");
            let agent = store.resolve(&restarted, name, VERSION).await.unwrap();
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
            ("new sandbox and store", engine),
            ("first run after restart, cached", cached),
            ("  of which resolve", cached_load),
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
