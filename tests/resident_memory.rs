//! The node survives misbehaving agents without growing: after 100 runs of
//! them in one process, `echo` still completes and resident memory is
//! within 50 MiB of where it was after the first 10 runs.
//!
//! Its own test binary, so no other test shares the process it measures.

mod support;

use std::time::Duration;

use node_runtime::sandbox::{BudgetRequest, RunOutcome};
use support::*;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn a_hundred_misbehaving_runs_leave_the_node_healthy_and_its_memory_flat() {
    let sandbox = sandbox();
    let misbehaving = [
        (
            "spin-forever",
            vec![],
            BudgetRequest {
                fuel: Some(20_000_000),
                ..Default::default()
            },
        ),
        (
            "memory-bomb",
            vec![],
            BudgetRequest {
                memory_bytes: Some(32 * MIB),
                ..Default::default()
            },
        ),
        ("stack-overflow", vec![], BudgetRequest::default()),
        ("panic", vec![], BudgetRequest::default()),
        ("agent-error", vec![], BudgetRequest::default()),
        (
            "big-result",
            vec![],
            BudgetRequest {
                memory_bytes: Some(64 * MIB),
                ..Default::default()
            },
        ),
        ("log-flood", vec![("lines", "3000")], BudgetRequest::default()),
        (
            "sleep-forever",
            vec![],
            BudgetRequest {
                duration: Some(Duration::from_millis(20)),
                ..Default::default()
            },
        ),
    ];
    let mut agents = Vec::new();
    for (name, input, budget) in &misbehaving {
        agents.push((load(&sandbox, name).await, *name, input.clone(), *budget));
    }

    let mut after_ten = 0;
    for i in 0..100 {
        let (agent, name, input, budget) = &agents[i % agents.len()];
        let result = sandbox.run(agent, request(name, input, *budget)).await;
        assert!(
            matches!(result.outcome, RunOutcome::Failed(_)) || *name == "log-flood",
            "{name} should fail: {:?}",
            result.outcome
        );
        if i == 9 {
            after_ten = resident_bytes();
        }
    }
    let after_hundred = resident_bytes();

    let echo = load(&sandbox, "echo").await;
    let result = sandbox
        .run(
            &echo,
            request("echo", &[("message", "still here")], BudgetRequest::default()),
        )
        .await;
    assert!(
        matches!(result.outcome, RunOutcome::Completed(_)),
        "{:?}",
        result.outcome
    );
    assert!(
        after_hundred < after_ten + 50 * MIB,
        "resident memory grew from {} MiB after 10 runs to {} MiB after 100",
        after_ten / MIB,
        after_hundred / MIB
    );
}
