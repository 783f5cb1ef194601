//! Density: how many runs a node can hold suspended, and what each costs
//! in resident memory. N runs of an agent (`llm-chat` unless `--agent`
//! names another) all wait on a model that answers after 30 s (a stub in
//! a child process, so its connections do not count against the node's
//! memory). Each run's input is one invoice (`message`), so the invoice
//! classifiers in Rust, Python and JavaScript can be measured the same way:
//! they parse it and then wait in `llm.chat`.
//!
//! `cargo run -p bench -- density [--agent NAME] [N...]` (default
//! `llm-chat`, 1000 10000), after `scripts/build-agents`. For each N, a sandbox sized for N
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

/// The late answer: a classification the invoice classifiers accept, so
/// their runs complete as `llm-chat`'s do (it takes any answer).
const CLASSIFICATION: &str = r#"{"vendorName":"Paper Co","vendorCategory":"Office Supplies","invoiceNumber":"INV-1","invoiceDate":"2026-12-01","totalAmount":100.5,"currency":"EUR","routingDestination":"Procurement Department","confidence":0.9}"#;

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
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": CLASSIFICATION}, "finish_reason": "stop"}],
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

/// The process's resident memory and its parts, in bytes: VmRSS, and the
/// anonymous, file-backed and shared-memory pages it is made of. A page of
/// an agent's memory image (mapped copy-on-write, from the compiled code's
/// file or a memfd) that a run only reads counts once per run that mapped
/// it in RssFile/RssShmem, though all of them share one physical page; a
/// page a run wrote is its own, in RssAnon.
///
/// The proportional set size (PSS, from `/proc/self/smaps_rollup`) divides
/// each shared page among the mappings that share it: the memory the runs
/// really cost. And the machine's MemAvailable, read alongside, is the
/// measure nothing can flatter (other processes move it too: read it on a
/// quiet machine).
#[derive(Clone, Copy)]
struct Resident {
    total: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    pss: u64,
    available: u64,
}

fn kib_field(text: &str, name: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} line"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn resident() -> Resident {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    Resident {
        total: kib_field(&status, "VmRSS:"),
        anon: kib_field(&status, "RssAnon:"),
        file: kib_field(&status, "RssFile:"),
        shmem: kib_field(&status, "RssShmem:"),
        pss: kib_field(&rollup, "Pss:"),
        available: kib_field(&meminfo, "MemAvailable:"),
    }
}

fn request(agent: &str, i: usize) -> RunRequest {
    let invoice = format!(r#"{{"vendor":"Paper Co","number":"INV-{i}","amount":100.5}}"#);
    RunRequest {
        context: RunContext {
            run_id: format!("run-{i}"),
            agent_id: agent.to_string(),
            input_ref: BTreeMap::from([("message".to_string(), invoice)]),
            ..RunContext::default()
        },
        budget: BudgetRequest::default(),
        ..RunRequest::default()
    }
}

async fn measure(n: usize, stub: SocketAddr, answer_after: Duration, name: &str, wasm: Arc<[u8]>) {
    let mut llm = LlmSettings::openai(format!("http://{stub}"), Secret::new("bench"), "stub");
    llm.request_timeout = answer_after * 2;
    let sandbox = match Sandbox::new(SandboxConfig {
        limits: NodeLimits {
            duration: answer_after * 2,
            ..NodeLimits::default()
        },
        engine: EngineSettings {
            // One more than N: the warm-up run holds a slot too.
            max_concurrent_runs: n as u32 + 1,
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
    let agent = sandbox
        .load(wasm)
        .await
        .unwrap_or_else(|err| panic!("{name} loads: {err}"));
    // One run first, so what every run shares (the compiled code, the
    // memory image mapped from it, the host's lazily built state) is
    // resident before the reading, and only what each run holds counts.
    // It ends at the model, which answers late: no need to wait for it.
    let seen_before_warm = seen(stub);
    let warm = {
        let (sandbox, agent, name) = (sandbox.clone(), agent.clone(), name.to_string());
        tokio::spawn(async move { sandbox.run(&agent, request(&name, n)).await })
    };
    let warm_started = Instant::now();
    while seen(stub) == seen_before_warm && !warm.is_finished() && warm_started.elapsed() < answer_after {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_seen = seen(stub);
    let load = wait_for_quiet_machine("density");
    let before = resident();
    let started = Instant::now();
    let runs: Vec<_> = (0..n)
        .map(|i| {
            let (sandbox, agent, name) = (sandbox.clone(), agent.clone(), name.to_string());
            tokio::spawn(async move { sandbox.run(&agent, request(&name, i)).await })
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
    let during = resident();
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
    let per_run_of = |during: u64, before: u64| during.saturating_sub(before) as f64 / waiting.max(1) as f64 / 1024.0;
    let per_run = per_run_of(during.total, before.total);
    println!(
        "{:>6} {:>9} {:<28} {:>10.1} s {:>12.1} {:>12.1} {:>10.1} KiB {:>10} {:>6.2}   anon {:.1} / file {:.1} / shmem {:.1} KiB; PSS {:.1} KiB; MemAvailable {:.1} KiB",
        n,
        waiting,
        format!("{:?}", sandbox.allocator())
            .chars()
            .take(28)
            .collect::<String>(),
        suspended_after.as_secs_f64(),
        mib(before.total),
        mib(during.total),
        per_run,
        completed,
        load,
        per_run_of(during.anon, before.anon),
        per_run_of(during.file, before.file),
        per_run_of(during.shmem, before.shmem),
        per_run_of(during.pss, before.pss),
        per_run_of(before.available, during.available),
    );
    if n >= 10_000 {
        println!(
            "target: 10,000 suspended runs under 2 GiB resident (measured {:.2} GiB for {waiting})",
            mib(during.total) / 1024.0
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
    let mut args = args.as_slice();
    let mut name = "llm-chat".to_string();
    if let [flag, agent, rest @ ..] = args
        && flag == "--agent"
    {
        name = agent.clone();
        args = rest;
    }
    let counts: Vec<usize> = if args.is_empty() {
        vec![1000, 10_000]
    } else {
        args.iter().map(|n| n.parse().expect("N is a number")).collect()
    };
    let wasm = bench::agent_wasm(&name);
    let answer_after = ANSWER_AFTER + RAMP_PER_RUN * *counts.iter().max().unwrap() as u32;
    let (_stub_process, stub) = start_stub(answer_after);
    println!(
        "{name} runs waiting on a model that answers after {} s",
        answer_after.as_secs()
    );
    println!(
        "{:>6} {:>9} {:<28} {:>12} {:>12} {:>12} {:>14} {:>10} {:>6}",
        "N", "suspended", "allocator", "all waiting", "RSS before", "RSS during", "per run", "completed", "load"
    );
    for n in counts {
        measure(n, stub, answer_after, &name, wasm.clone()).await;
    }
}
