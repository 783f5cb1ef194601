//! The node's memory under hostile agents:
//!
//! - the whole hostile-agent set (`hostile_set/`), in one sandbox, in one
//!   process: after a warm-up pass, three more passes leave resident
//!   memory within 50 MiB of where it was, and `echo` still completes;
//! - the host-memory bomb in every slot of a `node-runtime serve` at once:
//!   the node's peak resident memory stays within its slots times the
//!   per-run limit plus the documented per-run constant, and it runs
//!   `echo` afterwards.
//!
//! Its own test binary, so no other test shares the process it measures;
//! its two tests take turns ([`ONE_AT_A_TIME`]): the second one's plane and
//! clients allocate in this process too, and run beside the first they
//! moved its resident memory by tens of MiB either way.

mod hostile_set;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hostile_set::{CASES, Env};
use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, RunStatus};
use support::*;

/// Held by each test for its whole run.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_set_leaves_the_node_healthy_and_its_memory_flat() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::start(Duration::from_millis(300)).await;
    let started = Instant::now();
    for (name, case) in CASES {
        eprintln!("warm-up: {name}");
        case(&env).await;
    }
    let before = resident_bytes();
    for pass in 1..=3 {
        for (name, case) in CASES {
            eprintln!("pass {pass}: {name}");
            case(&env).await;
        }
    }
    let after = resident_bytes();
    env.echo_completes().await;
    eprintln!(
        "{} cases x 4 passes in {:?}; resident memory {} MiB before, {} MiB after",
        CASES.len(),
        started.elapsed(),
        before / MIB,
        after / MIB
    );
    assert!(
        after < before + 50 * MIB,
        "resident memory grew from {} MiB after the warm-up to {} MiB after three passes",
        before / MIB,
        after / MIB
    );
}

/// `VmHWM` (peak) and `VmRSS` (now) of process `pid`, in bytes.
fn process_memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node's /proc status");
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {status}"));
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// The README's bound: per slot, the run's memory limit plus this much the
/// host may hold besides (see "The sandbox", what a run can make the host
/// hold).
const PER_RUN_CONSTANT: u64 = 12 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_memory_bomb_in_every_slot_at_once_stays_within_the_slots_limits() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const SLOTS: u64 = 4;
    const LIMIT: u64 = 32 * MIB;
    let plane = DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(100),
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let agents = agents_layout();
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "NodeRuntime": {
            "NodeId": "bomb-node",
            "ControlPlaneUrl": plane.url(),
            "MaxConcurrentLeases": SLOTS,
            "HeartbeatIntervalSeconds": 1,
            "Capacity": { "Slots": SLOTS },
            "AgentsDirectory": agents.path().to_str().unwrap(),
            "DataDirectory": dir.path().join("data").to_str().unwrap(),
        },
        "AgentRuntime": { "MaxDurationSeconds": 20 },
        "Sandbox": { "MaxMemoryBytes": LIMIT },
    });
    let config_path = dir.path().join("appsettings.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut node = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime serve starts");
    let pid = node.id().expect("running");

    let submit = |agent: &str, input: &[(&str, &str)]| {
        let run = NewRun {
            agent_id: agent.to_string(),
            version: "1.0.0".to_string(),
            input_ref: input.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            metadata: BTreeMap::new(),
            budgets: Budgets::default(),
        };
        let plane = &plane;
        async move { plane.submit(run).await.unwrap().run_id }
    };
    let ended = |run_id: String| {
        let plane = &plane;
        async move {
            eventually(Duration::from_secs(60), "the run to end", || {
                plane
                    .run(&run_id)
                    .filter(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
            })
            .await
        }
    };

    // At rest, with the agent compiled and every slot used once.
    let mut warm = Vec::new();
    for _ in 0..SLOTS {
        warm.push(submit("hostile", &[("attack", "random-bytes"), ("bytes", "16")]).await);
    }
    for run_id in warm {
        assert_eq!(ended(run_id).await.status, RunStatus::Completed);
    }
    let (_, at_rest) = process_memory(pid);

    // Each bomb in every slot at once (submitted together, leased
    // together): large header values, hundreds of tiny ones per map, maps
    // moved into responses.
    let bombs: [&[(&str, &str)]; 3] = [
        &[("attack", "http-fields")],
        &[("attack", "http-fields"), ("tiny", "1")],
        &[("attack", "out-responses")],
    ];
    for bomb in bombs {
        let mut runs = Vec::new();
        for _ in 0..SLOTS {
            runs.push(submit("hostile", bomb).await);
        }
        for run_id in runs {
            let run = ended(run_id).await;
            assert_eq!(run.status, RunStatus::Failed, "{bomb:?}: {run:?}");
            let info = run.error_info.as_ref().expect("errorInfo");
            let details: serde_json::Value = serde_json::from_str(&info.error_details).unwrap();
            assert_eq!(details["kind"], "budget.memory", "{bomb:?}: {details}");
            assert!(
                details["report"]["peak_host_bytes"].as_u64().unwrap() > LIMIT / 2,
                "{details}"
            );
        }
    }
    let (peak, _) = process_memory(pid);
    let bound = at_rest + SLOTS * (LIMIT + PER_RUN_CONSTANT);
    eprintln!(
        "node resident memory: {} MiB at rest, peak {} MiB with {SLOTS} of each bomb, bound {} MiB",
        at_rest / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak <= bound,
        "peak {} MiB over the bound of {} MiB",
        peak / MIB,
        bound / MIB
    );

    let echo = submit("echo", &[("message", "still here")]).await;
    let run = ended(echo).await;
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert!(node.try_wait().unwrap().is_none(), "the node is alive");
    let _ = node.kill().await;
}
