//! Throughput through the whole lease path: the dev control plane and a
//! node in this process, talking gRPC and REST over loopback as they would
//! across machines (`Pull -> Ack -> run -> Complete`), running `echo`.
//!
//! `cargo run -p bench -- throughput [RUNS]`, after
//! `scripts/build-agents`. For each slot count (1, 8, 64), a fresh plane
//! and node:
//!
//! - saturation: RUNS runs submitted at once; runs per second from the
//!   first submission to the last outcome recorded at the plane;
//! - then, at slots 64, an open-loop load at half the measured saturation
//!   rate for a few seconds: p50/p99 from submission to the outcome being
//!   recorded at the plane.
//!
//! Outcomes are seen by polling the plane every millisecond, so latencies
//! are over-stated by up to about a millisecond. The plane keeps runs in
//! memory (no data dir), as `node-runtime dev` without `--data-dir` does.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::{Spread, wait_for_quiet_machine};
use node_runtime::agent_store::AgentStore;
use node_runtime::control_plane::Capacity;
use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, RunStatus};
use node_runtime::outbox::Outbox;
use node_runtime::sandbox::{EngineSettings, Sandbox, SandboxConfig};
use node_runtime::worker::{NodeHandle, NodeSettings};

const SLOTS: [u32; 3] = [1, 8, 64];
const OPEN_LOOP_SECONDS: u64 = 4;

/// A folder per agent with `1.0.0.wasm` linked to the built component.
fn agents_layout(target: &Path, scratch: &Path) -> PathBuf {
    let dir = scratch.join("agents");
    let folder = dir.join("echo");
    std::fs::create_dir_all(&folder).unwrap();
    let built = std::fs::canonicalize(target.join("agents/echo.wasm"))
        .expect("target/agents/echo.wasm (run scripts/build-agents)");
    let link = folder.join("1.0.0.wasm");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(built, link).unwrap();
    dir
}

struct Setup {
    plane: DevPlane,
    node: NodeHandle,
}

async fn start(slots: u32, agents: &Path, scratch: &Path) -> Setup {
    let plane = DevPlane::start(PlaneOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .expect("dev plane starts");
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: slots,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .expect("sandbox");
    let outbox_dir = scratch.join(format!("outbox-{slots}"));
    let _ = std::fs::remove_dir_all(&outbox_dir);
    std::fs::create_dir_all(&outbox_dir).unwrap();
    let settings = NodeSettings {
        node_id: format!("bench-node-{slots}"),
        control_plane_url: plane.url(),
        slots,
        max_leases: slots,
        heartbeat_interval: Duration::from_secs(1),
        capacity: Capacity {
            slots,
            cpu: "2".to_string(),
            memory: "4Gi".to_string(),
        },
        metadata: BTreeMap::new(),
        drain_timeout: Duration::from_secs(10),
    };
    let node = NodeHandle::builder(
        settings,
        Arc::new(sandbox),
        Arc::new(AgentStore::new(vec![agents.to_path_buf()])),
        Outbox::open(&outbox_dir).expect("outbox"),
    )
    .start()
    .expect("node starts");
    // Wait for registration, and warm the agent (compile) with one run.
    let setup = Setup { plane, node };
    let warm = submit(&setup.plane, 0).await;
    let mut pending = Outstanding::default();
    pending.add(warm);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "the warm-up run did not end");
        pending.collect(&setup.plane, &mut Vec::new());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    setup
}

async fn submit(plane: &DevPlane, i: usize) -> String {
    plane
        .submit(NewRun {
            agent_id: "echo".to_string(),
            version: "1.0.0".to_string(),
            input_ref: BTreeMap::from([("message".to_string(), format!("run {i}"))]),
            metadata: BTreeMap::new(),
            budgets: Budgets::default(),
        })
        .await
        .expect("submit")
        .run_id
}

/// Runs submitted and not yet ended, and how far into the plane's list of
/// ended runs this has read. Reading only what ended since the last look
/// keeps the bench's own polling off the plane's hot path (cloning every
/// outstanding run each millisecond once cost more than the runs did).
#[derive(Default)]
struct Outstanding {
    submitted: HashMap<String, Instant>,
    cursor: usize,
}

impl Outstanding {
    fn add(&mut self, run_id: String) {
        self.submitted.insert(run_id, Instant::now());
    }

    fn len(&self) -> usize {
        self.submitted.len()
    }

    fn is_empty(&self) -> bool {
        self.submitted.is_empty()
    }

    /// Moves every run that has ended into `latencies`, as submission to
    /// outcome. Runs this did not submit (an earlier phase's) are skipped.
    fn collect(&mut self, plane: &DevPlane, latencies: &mut Vec<Duration>) {
        let now = Instant::now();
        let (ended, next) = plane.finished_since(self.cursor);
        self.cursor = next;
        for (run_id, status) in ended {
            let Some(submitted) = self.submitted.remove(&run_id) else {
                continue;
            };
            match status {
                RunStatus::Completed => latencies.push(now - submitted),
                _ => panic!("echo failed: {:?}", plane.run(&run_id).map(|run| run.error_info)),
            }
        }
    }
}

/// RUNS submitted at once; runs/s until the last outcome.
async fn saturate(setup: &Setup, runs: usize) -> (f64, Spread) {
    let started = Instant::now();
    let mut pending = Outstanding::default();
    for i in 0..runs {
        pending.add(submit(&setup.plane, i).await);
    }
    let mut latencies = Vec::with_capacity(runs);
    let deadline = Instant::now() + Duration::from_secs(600);
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "{} runs never ended", pending.len());
        tokio::time::sleep(Duration::from_millis(2)).await;
        pending.collect(&setup.plane, &mut latencies);
    }
    let rate = runs as f64 / started.elapsed().as_secs_f64();
    (rate, Spread::of(latencies))
}

/// Submits at `rate` runs/s for a few seconds; submission-to-outcome.
async fn open_loop(setup: &Setup, rate: f64) -> (usize, Spread) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * OPEN_LOOP_SECONDS as f64) as usize;
    let started = Instant::now();
    let mut pending = Outstanding::default();
    let mut latencies = Vec::with_capacity(total);
    let mut sent = 0;
    while sent < total || !pending.is_empty() {
        // Submit whatever is due by now (catching up after a late wake-up),
        // then look for outcomes.
        let due = ((started.elapsed().as_secs_f64() / interval.as_secs_f64()) as usize + 1).min(total);
        while sent < due {
            pending.add(submit(&setup.plane, sent).await);
            sent += 1;
        }
        pending.collect(&setup.plane, &mut latencies);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(started.elapsed() < Duration::from_secs(600), "open loop never ended");
    }
    (total, Spread::of(latencies))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub async fn main(args: Vec<String>) {
    let mut args = args.into_iter();
    let runs: usize = args
        .next()
        .map(|n| n.parse().expect("RUNS is a number"))
        .unwrap_or(5000);
    // Optional open-loop rates (runs/s) at slots 64 instead of the
    // saturation phases: latency against load.
    let rates: Vec<f64> = args
        .map(|rate| rate.parse().expect("RATE is a number of runs per second"))
        .collect();
    let target = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()));
    let scratch = target.join("bench-scratch/throughput");
    std::fs::create_dir_all(&scratch).unwrap();
    let agents = agents_layout(&target, &scratch);

    println!("echo through Pull -> Ack -> run -> Complete, plane and node in one process");
    println!(
        "{:<8} {:>8} {:>12} {:>14} {:>14} {:>6}",
        "slots", "runs", "runs/s", "p50 ms", "p99 ms", "load"
    );
    if !rates.is_empty() {
        let setup = start(64, &agents, &scratch).await;
        for rate in rates {
            let load = wait_for_quiet_machine("throughput");
            let (sent, spread) = open_loop(&setup, rate).await;
            println!(
                "{:<8} {:>8} {:>12.0} {:>14.1} {:>14.1} {:>6.2}   (open loop)",
                64,
                sent,
                rate,
                ms(spread.median),
                ms(spread.p99),
                load
            );
        }
        setup.node.shutdown().await;
        setup.plane.shutdown().await;
        return;
    }
    let mut at_64 = 0.0;
    for slots in SLOTS {
        let setup = start(slots, &agents, &scratch).await;
        let load = wait_for_quiet_machine("throughput");
        let (rate, spread) = saturate(&setup, runs).await;
        println!(
            "{:<8} {:>8} {:>12.0} {:>14.1} {:>14.1} {:>6.2}   (all submitted at once)",
            slots,
            runs,
            rate,
            ms(spread.median),
            ms(spread.p99),
            load
        );
        if slots == 64 {
            at_64 = rate;
            let load = wait_for_quiet_machine("throughput");
            let half = rate / 2.0;
            let (sent, spread) = open_loop(&setup, half).await;
            println!(
                "{:<8} {:>8} {:>12.0} {:>14.1} {:>14.1} {:>6.2}   (open loop at half the saturation rate)",
                slots,
                sent,
                half,
                ms(spread.median),
                ms(spread.p99),
                load
            );
        }
        setup.node.shutdown().await;
        setup.plane.shutdown().await;
    }
    println!(
        "target: >= 5000 runs/s at slots 64 (measured {:.0}, {:.2}x the target)",
        at_64,
        at_64 / 5000.0
    );
}
