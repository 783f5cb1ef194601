//! The whole hostile-agent set (`hostile_set/`), in one sandbox, in one
//! process: after a warm-up pass, three more passes leave resident memory
//! within 50 MiB of where it was, and `echo` still completes.
//!
//! Its own test binary, so no other test shares the process it measures.

mod hostile_set;
mod support;

use std::time::{Duration, Instant};

use hostile_set::{CASES, Env};
use support::MIB;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_set_leaves_the_node_healthy_and_its_memory_flat() {
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
