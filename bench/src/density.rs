//! Density: how many runs a node can hold suspended, and what each costs
//! in resident memory. N runs of `llm-chat` all wait on a model that
//! answers after 30 s (a stub in a child process, so its connections do
//! not count against the node's memory).
//!
//! `cargo run -p bench -- density [N...]` (default 1000 10000),
//! after `scripts/build-agents`. For each N, a sandbox sized for N
//! concurrent runs (`EngineSettings.max_concurrent_runs = N`; the pool
//! falls back to on-demand allocation when it cannot be reserved) starts
//! N runs, waits until the stub has seen N requests, and reads the
//! process's resident memory (VmRSS) against the same reading before the
//! runs started. Every run must then complete.
//!
//! The runs go straight to the sandbox, not through leases: the lease
//! bookkeeping of a suspended run (a few strings) is not counted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bench::wait_for_quiet_machine;
use node_runtime::sandbox::{
    BudgetRequest, EngineSettings, LlmSettings, NodeLimits, RunContext, RunOutcome, RunRequest, Sandbox, SandboxConfig,
};
use node_runtime::support::Secret;

const ANSWER_AFTER: Duration = Duration::from_secs(30);
/// Added to ANSWER_AFTER per run of the largest N, for the ramp-up.
const RAMP_PER_RUN: Duration = Duration::from_millis(1);

/// The stub model: answers every chat completion after ANSWER_AFTER, and
/// `GET /count` with how many completions it has been asked for.
async fn stub(answer_after: Duration) {
    use axum::routing::{get, post};
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(move || async move {
                SEEN.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(answer_after).await;
                axum::Json(serde_json::json!({
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": "stub",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "late answer"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
                }))
            }),
        )
        .route("/count", get(|| async { SEEN.load(Ordering::SeqCst).to_string() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}

/// The stub's process, killed when this is dropped (also on a panic).
struct StubProcess(Child);

impl Drop for StubProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_stub(answer_after: Duration) -> (StubProcess, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("density")
        .arg("--stub")
        .arg(answer_after.as_millis().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the stub process starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (
        StubProcess(child),
        line.trim().parse().expect("the stub prints its address"),
    )
}

fn seen(stub: SocketAddr) -> usize {
    let mut stream = TcpStream::connect(stub).unwrap();
    write!(stream, "GET /count HTTP/1.0\r\nHost: stub\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.rsplit("\r\n\r\n").next().unwrap().trim().parse().unwrap()
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn request(i: usize) -> RunRequest {
    RunRequest {
        context: RunContext {
            run_id: format!("run-{i}"),
            agent_id: "llm-chat".to_string(),
            input_ref: BTreeMap::from([("message".to_string(), "Classify INV-1".to_string())]),
            ..RunContext::default()
        },
        budget: BudgetRequest::default(),
        ..RunRequest::default()
    }
}

async fn measure(n: usize, stub: SocketAddr, answer_after: Duration, wasm: Arc<[u8]>) {
    let mut llm = LlmSettings::openai(format!("http://{stub}"), Secret::new("bench"), "stub");
    llm.request_timeout = answer_after * 2;
    let sandbox = match Sandbox::new(SandboxConfig {
        limits: NodeLimits {
            duration: answer_after * 2,
            ..NodeLimits::default()
        },
        engine: EngineSettings {
            max_concurrent_runs: n as u32,
            ..EngineSettings::default()
        },
        llm: Some(llm),
        ..SandboxConfig::default()
    }) {
        Ok(sandbox) => Arc::new(sandbox),
        Err(err) => {
            println!("{n:>6}: skipped, the sandbox could not be built: {err}");
            return;
        }
    };
    let agent = sandbox.load(wasm).await.expect("llm-chat loads");
    let before_seen = seen(stub);
    let load = wait_for_quiet_machine("density");
    let before = resident_bytes();
    let started = Instant::now();
    let runs: Vec<_> = (0..n)
        .map(|i| {
            let (sandbox, agent) = (sandbox.clone(), agent.clone());
            tokio::spawn(async move { sandbox.run(&agent, request(i)).await })
        })
        .collect();
    // Every run is either waiting on the model or already over (failed
    // before reaching it).
    let waiting = loop {
        let waiting = seen(stub) - before_seen;
        let over = runs.iter().filter(|run| run.is_finished()).count();
        if waiting + over >= n {
            break waiting;
        }
        assert!(
            started.elapsed() < answer_after,
            "only {waiting} of {n} runs reached the model before it started answering ({over} over)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let suspended_after = started.elapsed();
    let during = resident_bytes();
    let mut completed = 0;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for run in runs {
        match run.await.unwrap().outcome {
            RunOutcome::Completed(_) => completed += 1,
            RunOutcome::Failed(failure) => {
                *failures
                    .entry(format!("{}: {}", failure.kind.as_str(), failure.message))
                    .or_default() += 1
            }
        }
    }
    for (failure, count) in &failures {
        println!("{n:>6}: {count} runs failed: {failure}");
    }

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    // Per run actually suspended: runs that failed early hold nothing.
    let per_run = (during.saturating_sub(before)) as f64 / waiting.max(1) as f64;
    println!(
        "{:>6} {:>9} {:<28} {:>10.1} s {:>12.1} {:>12.1} {:>10.1} KiB {:>10} {:>6.2}",
        n,
        waiting,
        format!("{:?}", sandbox.allocator())
            .chars()
            .take(28)
            .collect::<String>(),
        suspended_after.as_secs_f64(),
        mib(before),
        mib(during),
        per_run / 1024.0,
        completed,
        load
    );
    if n >= 10_000 {
        println!(
            "target: 10,000 suspended runs under 2 GiB resident (measured {:.2} GiB for {waiting})",
            mib(during) / 1024.0
        );
    }
}

pub async fn main(args: Vec<String>) {
    if args.first().map(String::as_str) == Some("--stub") {
        let millis = args[1].parse().expect("--stub MILLIS");
        // The parent holds our stdin: when it dies, even by abort (a
        // refused allocation at 10,000 runs does that), stdin ends, and so
        // does the stub.
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
        return stub(Duration::from_millis(millis)).await;
    }
    let counts: Vec<usize> = if args.is_empty() {
        vec![1000, 10_000]
    } else {
        args.iter().map(|n| n.parse().expect("N is a number")).collect()
    };
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{target}/agents/llm-chat.wasm");
    let wasm: Arc<[u8]> = std::fs::read(&path)
        .unwrap_or_else(|err| panic!("{path}: {err} (run scripts/build-agents)"))
        .into();
    let answer_after = ANSWER_AFTER + RAMP_PER_RUN * *counts.iter().max().unwrap() as u32;
    let (_stub_process, stub) = start_stub(answer_after);
    println!(
        "llm-chat runs waiting on a model that answers after {} s",
        answer_after.as_secs()
    );
    println!(
        "{:>6} {:>9} {:<28} {:>12} {:>12} {:>12} {:>14} {:>10} {:>6}",
        "N", "suspended", "allocator", "all waiting", "RSS before", "RSS during", "per run", "completed", "load"
    );
    for n in counts {
        measure(n, stub, answer_after, wasm.clone()).await;
    }
}
