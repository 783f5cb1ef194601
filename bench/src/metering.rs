//! What fuel and epoch metering cost a CPU-bound agent: `prime-sieve`
//! run in a sandbox whose engine meters guests (the node's only mode)
//! against one built with `Metering::Off` (a bench-only setting).
//!
//! `cargo run -p bench -- metering [RUNS [LIMIT]]`, after
//! `scripts/build-agents`. Each variant compiles the component itself
//! (metered and unmetered code differ), runs it a few times to warm up,
//! then RUNS times; the two variants alternate run by run so that load
//! from elsewhere on the machine falls on both alike.

use std::time::Duration;

use bench::{Spread, agent_wasm, sieve_run, wait_for_quiet_machine};
use node_runtime::sandbox::{EngineSettings, Metering, Sandbox, SandboxConfig};

pub async fn main(args: Vec<String>) {
    let mut args = args.into_iter();
    let runs: usize = args.next().map(|n| n.parse().expect("RUNS is a number")).unwrap_or(30);
    let limit: u64 = args
        .next()
        .map(|n| n.parse().expect("LIMIT is a number"))
        .unwrap_or(2_000_000);
    let wasm = agent_wasm("prime-sieve");

    let sandbox = |metering| {
        Sandbox::new(SandboxConfig {
            engine: EngineSettings {
                metering,
                max_concurrent_runs: 2,
                ..EngineSettings::default()
            },
            ..SandboxConfig::default()
        })
        .expect("sandbox")
    };
    // The node's mode first; the others only tell its cost apart.
    let variants = [
        ("fuel + epochs", Metering::FuelAndEpochs),
        ("fuel only", Metering::FuelOnly),
        ("epochs only", Metering::EpochsOnly),
        ("metering off", Metering::Off),
    ];
    let mut sandboxes = Vec::new();
    for (name, metering) in variants {
        let sandbox = sandbox(metering);
        let agent = sandbox.load(wasm.clone()).await.expect("prime-sieve loads");
        for _ in 0..3 {
            sieve_run(&sandbox, &agent, limit).await;
        }
        sandboxes.push((name, sandbox, agent, Vec::with_capacity(runs)));
    }
    let load = wait_for_quiet_machine("metering");
    let mut answer = None;
    for _ in 0..runs {
        for (_, sandbox, agent, samples) in &mut sandboxes {
            let (time, primes) = sieve_run(sandbox, agent, limit).await;
            samples.push(time);
            assert_eq!(
                answer.get_or_insert_with(|| primes.clone()),
                &primes,
                "every variant computes the same answer"
            );
        }
    }
    let load_after = bench::load_average();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("prime-sieve below {limit}, {runs} runs each, interleaved; load {load:.2} -> {load_after:.2}");
    println!(
        "{:<16} {:>12} {:>12} {:>16}",
        "variant", "median", "p99", "median vs off"
    );
    let spreads: Vec<(&str, Spread)> = sandboxes
        .into_iter()
        .map(|(name, _, _, samples)| (name, Spread::of(samples)))
        .collect();
    let off = spreads.last().unwrap().1.median.as_secs_f64();
    for (name, spread) in &spreads {
        println!(
            "{:<16} {:>9.2} ms {:>9.2} ms {:>15.3}x",
            name,
            ms(spread.median),
            ms(spread.p99),
            spread.median.as_secs_f64() / off
        );
    }
    println!(
        "target: fuel + epochs <= 1.3x metering off (measured {:.3}x)",
        spreads[0].1.median.as_secs_f64() / off
    );
}
