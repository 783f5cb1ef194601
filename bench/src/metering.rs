//! What metering costs a guest: two fixed workloads run in sandboxes that
//! meter differently, against one built with `Metering::Off` (a
//! bench-only setting), in the same process.
//!
//! `cargo run -p bench -- metering [RUNS [LIMIT [INVOICES]]]`, after
//! `scripts/build-agents`. The workloads, kept fixed so that records stay
//! comparable:
//!
//! - `prime-sieve` below LIMIT (default 2,000,000): a tight CPU-bound loop,
//!   the worst case for a check at every loop header.
//! - `invoice-batch` of INVOICES (default 2,000): the computing half of the
//!   invoice classifier (JSON rendered and parsed, strings normalised and
//!   searched, prompts built, answers checked), with no host call: what
//!   agents people write spend their CPU on.
//!
//! The variants: `fuel` (the node's mode: fuel, with a yield to the async
//! runtime every `fuel_per_yield` units, where the deadline is checked),
//! `fuel + epochs` (the node's mode before issue 22: a second check at
//! every loop header), `epochs only` (an engine without fuel), and
//! `metering off`. Each variant compiles the component itself (their code
//! differs), runs it a few times to warm up, then RUNS times; the variants
//! alternate run by run so that load from elsewhere on the machine falls
//! on all alike.

use std::time::Duration;

use bench::{Spread, agent_wasm, metered_sandbox, timed_run, wait_for_quiet_machine};
use node_runtime::sandbox::{Metering, Sandbox};

/// The node's mode first, the baseline last.
const VARIANTS: [(&str, Metering); 4] = [
    ("fuel (node)", Metering::Fuel),
    ("fuel + epochs", Metering::FuelAndEpochs),
    ("epochs only", Metering::EpochsOnly),
    ("metering off", Metering::Off),
];

/// One workload: a sample agent and the input that sizes it.
struct Workload {
    agent: &'static str,
    input: Vec<(String, String)>,
    /// The target for the node's mode, as a ratio to `metering off`.
    target: f64,
}

pub async fn main(args: Vec<String>) {
    let mut args = args.into_iter();
    let mut number = |name: &str, default: u64| -> u64 {
        args.next()
            .map(|n| n.parse().unwrap_or_else(|_| panic!("{name} is a number")))
            .unwrap_or(default)
    };
    let runs = number("RUNS", 30) as usize;
    let limit = number("LIMIT", 2_000_000);
    let invoices = number("INVOICES", 2_000);
    let workloads = [
        Workload {
            agent: "prime-sieve",
            input: vec![("limit".into(), limit.to_string())],
            target: 1.3,
        },
        Workload {
            agent: "invoice-batch",
            input: vec![("invoices".into(), invoices.to_string())],
            target: 1.05,
        },
    ];
    let sandboxes: Vec<(&str, Sandbox)> = VARIANTS
        .iter()
        .map(|&(name, metering)| (name, metered_sandbox(metering)))
        .collect();
    for workload in &workloads {
        measure(workload, &sandboxes, runs).await;
    }
}

async fn measure(workload: &Workload, sandboxes: &[(&str, Sandbox)], runs: usize) {
    let wasm = agent_wasm(workload.agent);
    let mut variants = Vec::new();
    for (name, sandbox) in sandboxes {
        let agent = sandbox.load(wasm.clone()).await.expect("the agent loads");
        for _ in 0..3 {
            timed_run(sandbox, &agent, &workload.input).await;
        }
        variants.push((*name, sandbox, agent, Vec::with_capacity(runs)));
    }
    let load = wait_for_quiet_machine("metering");
    let mut answer = None;
    for _ in 0..runs {
        for (_, sandbox, agent, samples) in &mut variants {
            let (time, result) = timed_run(sandbox, agent, &workload.input).await;
            samples.push(time);
            assert_eq!(
                answer.get_or_insert_with(|| result.clone()),
                &result,
                "every variant computes the same answer"
            );
        }
    }
    let load_after = bench::load_average();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let input: Vec<String> = workload.input.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "\n{} {}, {runs} runs each, interleaved; load {load:.2} -> {load_after:.2}",
        workload.agent,
        input.join(" ")
    );
    println!(
        "{:<16} {:>12} {:>12} {:>16}",
        "variant", "median", "p99", "median vs off"
    );
    let spreads: Vec<(&str, Spread)> = variants
        .into_iter()
        .map(|(name, _, _, samples)| (name, Spread::of(samples)))
        .collect();
    let off = spreads.last().expect("metering off").1.median.as_secs_f64();
    for (name, spread) in &spreads {
        println!(
            "{:<16} {:>9.2} ms {:>9.2} ms {:>15.3}x",
            name,
            ms(spread.median),
            ms(spread.p99),
            spread.median.as_secs_f64() / off
        );
    }
    let node = spreads[0].1.median.as_secs_f64() / off;
    println!(
        "target: fuel <= {:.2}x metering off on {} (measured {node:.3}x: {})",
        workload.target,
        workload.agent,
        if node <= workload.target { "met" } else { "NOT met" }
    );
}
