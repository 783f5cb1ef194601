//! How far past its deadline a run ends: `spin-forever` (computing) and
//! `sleep-forever` (blocked in a host call) with a 200 ms deadline, in
//! process through the sandbox as the daemon runs a lease, and through
//! `node-runtime run-agent --timeout 200ms` as a developer does.
//!
//! `cargo run -p bench -- deadline [RUNS [NODE_BINARY]]`, after
//! `scripts/build-agents`. In process, each case is timed from the call to
//! `Sandbox::run_reported` to its result (the agent already loaded; a call
//! cut off in a host call is unwound after, as the daemon does once the
//! report is stored), under the
//! node's metering (`fuel`) and, for comparison, the metering nodes used
//! before issue 22 (`fuel + epochs`: epoch checks compiled in, ticking
//! every 10 ms). With NODE_BINARY (a built `node-runtime`), each case is
//! also run RUNS times with `run-agent`, and its printed wall time (whole
//! milliseconds, from the run's start to its report) taken. The overrun is
//! the time past 200 ms; every run must fail with `budget.deadline`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bench::{Spread, agent_wasm, metered_sandbox, wait_for_quiet_machine};
use node_runtime::sandbox::{BudgetRequest, FailKind, Metering, RunOutcome, RunRequest};

const DEADLINE: Duration = Duration::from_millis(200);
const CASES: [&str; 2] = ["spin-forever", "sleep-forever"];

pub async fn main(args: Vec<String>) {
    let mut args = args.into_iter();
    let runs: usize = args.next().map(|n| n.parse().expect("RUNS is a number")).unwrap_or(50);
    let node = args.next();
    let load = wait_for_quiet_machine("deadline");
    println!("deadline {DEADLINE:?}, {runs} runs per case; load {load:.2}");
    println!(
        "{:<34} {:>14} {:>14} {:>14}",
        "case", "median overrun", "p99 overrun", "max overrun"
    );
    for (name, metering) in [
        ("fuel (node)", Metering::Fuel),
        ("fuel + epochs", Metering::FuelAndEpochs),
    ] {
        let sandbox = metered_sandbox(metering);
        for case in CASES {
            let agent = sandbox.load(agent_wasm(case)).await.expect("the agent loads");
            let mut overruns = Vec::with_capacity(runs);
            for _ in 0..runs {
                let request = RunRequest {
                    budget: BudgetRequest {
                        duration: Some(DEADLINE),
                        ..BudgetRequest::default()
                    },
                    ..RunRequest::default()
                };
                let started = Instant::now();
                let reported = sandbox.run_reported(&agent, request).await;
                overruns.push(started.elapsed().saturating_sub(DEADLINE));
                if let Some(call) = reported.cut_off {
                    call.unwind().await;
                }
                match reported.result.outcome {
                    RunOutcome::Failed(failure) if failure.kind == FailKind::BudgetDeadline => {}
                    other => panic!("{case} did not end at its deadline: {other:?}"),
                }
            }
            print_row(&format!("{case}, in process, {name}"), overruns);
        }
    }
    if let Some(node) = node {
        for case in CASES {
            let overruns = (0..runs).map(|_| run_agent(Path::new(&node), case)).collect();
            print_row(&format!("{case}, run-agent"), overruns);
        }
    }
    println!("load after: {:.2}", bench::load_average());
    println!("target: p99 overrun <= 10 ms, busy and blocked");
}

fn print_row(case: &str, mut overruns: Vec<Duration>) {
    overruns.sort();
    let max = *overruns.last().expect("samples");
    let spread = Spread::of(overruns);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:<34} {:>11.2} ms {:>11.2} ms {:>11.2} ms",
        case,
        ms(spread.median),
        ms(spread.p99),
        ms(max)
    );
}

/// The overrun of one `run-agent --timeout 200ms` of `case`, from the wall
/// time it prints.
fn run_agent(node: &Path, case: &str) -> Duration {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let output = Command::new(node)
        .args([
            "run-agent",
            &format!("{target}/agents/{case}.wasm"),
            "--timeout",
            "200ms",
        ])
        .output()
        .expect("run-agent starts");
    let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("budget.deadline"), "{case}: {text}");
    let wall_ms: u64 = text
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("wall time")?
                .trim()
                .strip_suffix("ms")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{case}: no wall time in {text}"));
    Duration::from_millis(wall_ms).saturating_sub(DEADLINE)
}
