//! The hostile-agent set, shared by `tests/it/hostile.rs` (one test per case)
//! and `tests/hostile_memory.rs` (the whole set, repeatedly, in one
//! sandbox, measuring resident memory).
//!
//! Every case drives a misbehaving agent through the library API, as the
//! node does, and checks the classified outcome a user or the control
//! plane would see. Loops are bounded by fuel or a short deadline, and the
//! only network is loopback.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use node_runtime::sandbox::outcome::{FAILURE_DETAILS_BYTES, FAILURE_MESSAGE_BYTES};
use node_runtime::sandbox::{
    Agent, AllocatorChoice, BudgetRequest, EngineSettings, FailKind, HostLimits, LlmSettings, NodeLimits, RunFailure,
    RunOutcome, RunResult, Sandbox, SandboxConfig,
};
use node_runtime::support::Secret;

use crate::support::*;

/// A listener on 127.0.0.1 that counts the connections it accepts (and
/// holds them open without answering).
pub struct Listener {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Listener {
    async fn start() -> Listener {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
                if held.len() > 32 {
                    held.remove(0);
                }
            }
        });
        Listener { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Prompt tokens the stub model reports for every call.
const PROMPT_TOKENS: u64 = 12;
/// Completion tokens it writes (fewer if `max_tokens` says so, unless the
/// model is `greedy`, which ignores `max_tokens` and writes
/// [`GREEDY_TOKENS`]).
const ANSWER_TOKENS: u64 = 20;
const GREEDY_TOKENS: u64 = 100;

/// A deterministic OpenAI-compatible stub on loopback.
#[derive(Default)]
pub struct LlmStub {
    requests: AtomicUsize,
}

async fn completions(State(stub): State<Arc<LlmStub>>, Json(body): Json<serde_json::Value>) -> Json<serde_json::Value> {
    stub.requests.fetch_add(1, Ordering::SeqCst);
    let greedy = body["model"] == "greedy";
    let max_tokens = body["max_tokens"].as_u64().unwrap_or(u64::MAX);
    let completion = if greedy {
        GREEDY_TOKENS
    } else {
        ANSWER_TOKENS.min(max_tokens)
    };
    Json(serde_json::json!({
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "more"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
                  "total_tokens": PROMPT_TOKENS + completion},
    }))
}

async fn start_stub(stub: Arc<LlmStub>) -> SocketAddr {
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(completions))
        .with_state(stub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// Everything the cases run against: one sandbox configured like a node
/// (an LLM endpoint, one HTTP grant), and loopback servers that record
/// whether anything reached them.
pub struct Env {
    pub sandbox: Sandbox,
    /// A node whose table limit (16 elements) is below what a Rust agent's
    /// function table needs.
    pub tight_tables: Sandbox,
    /// A node with the default limits whose instances get their memory
    /// when created: no pool bounds what one asks for.
    pub on_demand: Sandbox,
    /// The deadline of the cases that end by the wall clock.
    pub short: Duration,
    /// Granted to `http-fetch`; accepts and never answers.
    pub silent: Listener,
    /// Not granted to anyone: outbound HTTP to it must be denied.
    pub denied: Listener,
    /// The hostile agent's socket attempts aim here.
    pub socket_target: Listener,
    pub llm: Arc<LlmStub>,
    /// Granted to `hostile`: answers `/small` with a few headers and
    /// `/big` with 95 headers of 4,000 bytes, both with no body.
    pub headers: SocketAddr,
    /// `WRITER`'s read-write grant (`a/`, holding `a/shared/`), in a
    /// scratch directory (`root`).
    pub writable: tempfile::TempDir,
}

/// The agent id under which the hostile agent holds a read-write grant.
pub const WRITER: &str = "hostile-writer";

/// A server whose answers carry few or many headers.
async fn start_headers_server() -> SocketAddr {
    let small = || async { ([("x-small", "1")], "") };
    let big = || async {
        let mut response = axum::response::Response::new(axum::body::Body::empty());
        for n in 0..95 {
            let name = axum::http::HeaderName::from_bytes(format!("x-big-{n}").as_bytes()).unwrap();
            response
                .headers_mut()
                .insert(name, axum::http::HeaderValue::from_str(&"h".repeat(4000)).unwrap());
        }
        response
    };
    let app = axum::Router::new()
        .route("/small", axum::routing::get(small))
        .route("/big", axum::routing::get(big));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

pub const TABLE_LIMIT: u32 = 16;

impl Env {
    pub async fn start(short: Duration) -> Env {
        let silent = Listener::start().await;
        let denied = Listener::start().await;
        let socket_target = Listener::start().await;
        let llm = Arc::new(LlmStub::default());
        let stub = start_stub(llm.clone()).await;
        let headers = start_headers_server().await;
        let writable = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(writable.path().join("a").join("shared")).unwrap();
        let sandbox = Sandbox::new(SandboxConfig {
            // A token ceiling far above what the cases ask for, so that the
            // escaped-characters prompt (2,000,000 control characters,
            // estimated at a token each: 2,000,008) meets the request's byte
            // cap rather than the budget.
            limits: NodeLimits {
                tokens: 4_000_000,
                ..NodeLimits::default()
            },
            grants: BTreeMap::from([(WRITER.to_string(), writer_grants(&writable))]),
            engine: EngineSettings {
                max_concurrent_runs: 4,
                ..EngineSettings::default()
            },
            llm: Some(LlmSettings::openai(
                format!("http://{stub}"),
                Secret::new("sk-hostile"),
                "stub",
            )),
            allowed_hosts: BTreeMap::from([
                (
                    "http-fetch".to_string(),
                    vec![format!("127.0.0.1:{}", silent.addr.port())],
                ),
                ("hostile".to_string(), vec![format!("127.0.0.1:{}", headers.port())]),
            ]),
            ..SandboxConfig::default()
        })
        .expect("the sandbox starts");
        let tight_tables = Sandbox::new(SandboxConfig {
            limits: NodeLimits {
                table_elements: TABLE_LIMIT,
                ..NodeLimits::default()
            },
            engine: EngineSettings {
                allocator: AllocatorChoice::OnDemand,
                max_concurrent_runs: 1,
                ..EngineSettings::default()
            },
            ..SandboxConfig::default()
        })
        .expect("the sandbox starts");
        let on_demand = Sandbox::new(SandboxConfig {
            engine: EngineSettings {
                allocator: AllocatorChoice::OnDemand,
                max_concurrent_runs: 1,
                ..EngineSettings::default()
            },
            ..SandboxConfig::default()
        })
        .expect("the sandbox starts");
        Env {
            sandbox,
            tight_tables,
            on_demand,
            short,
            silent,
            denied,
            socket_target,
            llm,
            headers,
            writable,
        }
    }

    async fn run_on(&self, sandbox: &Sandbox, name: &str, input: &[(&str, &str)], budget: BudgetRequest) -> RunResult {
        let agent: Arc<Agent> = load(sandbox, name).await;
        // However the run ends, the test itself is bounded.
        tokio::time::timeout(
            Duration::from_secs(20),
            sandbox.run(&agent, request(name, input, budget)),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} {input:?}: the run did not end within 20 s"))
    }

    async fn run(&self, name: &str, input: &[(&str, &str)], budget: BudgetRequest) -> RunResult {
        self.run_on(&self.sandbox, name, input, budget).await
    }

    fn deadline(&self) -> BudgetRequest {
        BudgetRequest {
            duration: Some(self.short),
            ..BudgetRequest::default()
        }
    }

    /// The node is still healthy: `echo` completes in the same sandbox.
    pub async fn echo_completes(&self) {
        let result = self
            .run("echo", &[("message", "still here")], BudgetRequest::default())
            .await;
        assert_eq!(completed(&result)["message"], "still here");
    }

    /// Loads `bytes`, which must be refused; returns the reason.
    async fn refused(&self, bytes: Vec<u8>) -> String {
        match self.sandbox.load(Arc::from(bytes)).await {
            Ok(agent) => panic!("loaded {agent:?}"),
            Err(invalid) => invalid.to_string(),
        }
    }
}

pub fn failure(result: &RunResult) -> &RunFailure {
    match &result.outcome {
        RunOutcome::Failed(failure) => failure,
        RunOutcome::Completed(result) => panic!("expected a failure, the run completed: {result:?}"),
    }
}

pub fn completed(result: &RunResult) -> &BTreeMap<String, String> {
    match &result.outcome {
        RunOutcome::Completed(result) => result,
        RunOutcome::Failed(failure) => panic!("expected completion, the run failed: {failure:?}"),
    }
}

fn fails(result: &RunResult, kind: FailKind, message_has: &str) {
    let failure = failure(result);
    assert_eq!(failure.kind, kind, "{failure:?}");
    assert!(!failure.retryable, "{failure:?}");
    assert!(
        failure.message.contains(message_has),
        "expected {message_has:?} in: {}",
        failure.message
    );
}

fn fuel(n: u64) -> BudgetRequest {
    BudgetRequest {
        fuel: Some(n),
        ..BudgetRequest::default()
    }
}

fn memory(bytes: u64) -> BudgetRequest {
    BudgetRequest {
        memory_bytes: Some(bytes),
        ..BudgetRequest::default()
    }
}

/// The run ended by its deadline, and not long after it.
fn on_time(env: &Env, result: &RunResult) {
    let limit = env.short + Duration::from_millis(500);
    assert!(
        result.report.wall_ms as u128 <= limit.as_millis(),
        "ended {} ms after start, deadline {:?}",
        result.report.wall_ms,
        env.short
    );
}

// ---- CPU -----------------------------------------------------------------

pub async fn busy_loop_out_of_fuel(env: &Env) {
    let result = env.run("spin-forever", &[], fuel(5_000_000)).await;
    fails(&result, FailKind::BudgetFuel, "5000000");
    assert_eq!(result.report.fuel_consumed, 5_000_000);
}

pub async fn busy_loop_past_the_deadline(env: &Env) {
    let result = env.run("spin-forever", &[], env.deadline()).await;
    fails(&result, FailKind::BudgetDeadline, "deadline");
    on_time(env, &result);
}

pub async fn host_call_loop_out_of_fuel(env: &Env) {
    // `budget.remaining` in a tight loop: the fuel between host calls adds up.
    let result = env.run("hostile", &[("attack", "budget-loop")], fuel(5_000_000)).await;
    fails(&result, FailKind::BudgetFuel, "5000000");
}

pub async fn host_call_loop_past_the_deadline(env: &Env) {
    let result = env.run("hostile", &[("attack", "budget-loop")], env.deadline()).await;
    fails(&result, FailKind::BudgetDeadline, "deadline");
    on_time(env, &result);
}

pub async fn log_call_loop_past_the_deadline(env: &Env) {
    // `log` forever: lines past the cap are dropped, the loop still ends.
    let result = env.run("hostile", &[("attack", "log-loop")], env.deadline()).await;
    fails(&result, FailKind::BudgetDeadline, "deadline");
    on_time(env, &result);
    let limits = NodeLimits::default();
    assert_eq!(result.report.log_lines, limits.log_lines, "{:?}", result.report);
    assert!(result.report.log_lines_dropped > 0, "{:?}", result.report);
}

pub async fn random_draw_loop_past_the_deadline(env: &Env) {
    // A megabyte of random bytes per call: the guest spends its time in
    // synchronous host calls, where fuel does not advance, so it burns
    // little fuel of its own and rarely reaches a fuel yield. It is
    // stopped where it returns from the host, not at a later yield, and
    // not as if it were waiting.
    let result = env.run("hostile", &[("attack", "random-loop")], env.deadline()).await;
    fails(&result, FailKind::BudgetDeadline, "deadline");
    let message = &failure(&result).message;
    assert!(!message.contains("host call"), "{message}");
    on_time(env, &result);
}

pub async fn log_call_loop_out_of_fuel(env: &Env) {
    let result = env.run("hostile", &[("attack", "log-loop")], fuel(5_000_000)).await;
    fails(&result, FailKind::BudgetFuel, "5000000");
    assert!(result.report.log_lines_dropped > 0, "{:?}", result.report);
}

// ---- memory and the stack ------------------------------------------------

pub async fn memory_bomb(env: &Env) {
    let result = env.run("memory-bomb", &[], memory(32 * MIB)).await;
    fails(&result, FailKind::BudgetMemory, "32 MiB");
    assert!(result.report.peak_memory_bytes <= 32 * MIB, "{:?}", result.report);
}

pub async fn table_growth_refused(env: &Env) {
    // Stable Rust cannot emit `table.grow` for wasm32-wasip2 (no intrinsic,
    // no inline assembly), so the bomb is a function table larger than the
    // node's table limit: the same limiter refuses it when the instance is
    // created.
    let result = env
        .run_on(
            &env.tight_tables,
            "hostile",
            &[("attack", "env")],
            BudgetRequest::default(),
        )
        .await;
    fails(&result, FailKind::BudgetMemory, "table growth to");
    assert!(
        failure(&result).message.contains(&format!("limit is {TABLE_LIMIT}")),
        "{:?}",
        result.outcome
    );
}

/// A table of a hundred million elements, declared by the component's
/// core module, on a node that allocates each instance's memory when it is
/// created (no pool to bound it): the store limiter refuses the table
/// before wasmtime allocates it, so the bomb costs nothing.
pub async fn table_bomb_under_the_on_demand_allocator(env: &Env) {
    const BOMB: u64 = 100_000_000;
    let sandbox = &env.on_demand;
    let bytes = with_tables_of(&agent_bytes("echo"), BOMB);
    let agent = sandbox
        .load(Arc::from(bytes))
        .await
        .expect("the bomb is a valid component");
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        sandbox.run(
            &agent,
            request("echo", &[("message", "boom")], BudgetRequest::default()),
        ),
    )
    .await
    .expect("the run ends within 20 s");
    // The bomb, plus the few elements of the shims' own tables.
    fails(&result, FailKind::BudgetMemory, "table growth to");
    let asked: u64 = failure(&result).message["table growth to ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{:?}", result.outcome));
    assert!((BOMB..BOMB + 1000).contains(&asked), "{:?}", result.outcome);
    assert!(result.report.peak_memory_bytes < 64 * MIB, "{:?}", result.report);
    let limit = NodeLimits::default().table_elements;
    assert!(
        failure(&result).message.contains(&format!("limit is {limit}")),
        "{:?}",
        result.outcome
    );
    // The same node still runs the real echo.
    let agent = load(sandbox, "echo").await;
    let result = sandbox
        .run(
            &agent,
            request("echo", &[("message", "after")], BudgetRequest::default()),
        )
        .await;
    assert_eq!(completed(&result)["message"], "after");
}

/// `component` with the tables of its main core module (the largest: the
/// agent's code, beside the small adapter shims, whose tables other
/// modules import and so must keep their limits) declared with `elements`
/// as their minimum and no maximum: a valid component whose instantiation
/// asks for that much table.
fn with_tables_of(component: &[u8], elements: u64) -> Vec<u8> {
    let sections = wasm_sections(component);
    // Section 1 of a component is a core module.
    let main = (0..sections.len())
        .filter(|&at| sections[at].0 == 1)
        .max_by_key(|&at| sections[at].1.len())
        .expect("a component holds a core module");
    let mut out = component[..8].to_vec();
    for (at, (id, range)) in sections.into_iter().enumerate() {
        let payload = &component[range];
        let payload = if at == main {
            core_module_with_tables_of(payload, elements)
        } else {
            payload.to_vec()
        };
        push_section(&mut out, id, &payload);
    }
    out
}

fn core_module_with_tables_of(module: &[u8], elements: u64) -> Vec<u8> {
    let mut out = module[..8].to_vec();
    for (id, range) in wasm_sections(module) {
        let payload = &module[range];
        if id != 4 {
            push_section(&mut out, id, payload);
            continue;
        }
        // The table section: a count, then per table a reference type
        // (one byte for funcref and externref, which is all a Rust agent
        // declares) and limits (a flag byte, the minimum, and the maximum
        // when flag bit 0 is set).
        let (count, mut at) = read_leb(payload, 0);
        let mut tables = Vec::new();
        write_leb(&mut tables, count);
        for _ in 0..count {
            let reftype = payload[at];
            assert!(
                reftype == 0x70 || reftype == 0x6f,
                "a table of reference type {reftype:#x}"
            );
            let flags = payload[at + 1];
            assert!(flags <= 1, "table limits with flags {flags:#x}");
            let (_min, next) = read_leb(payload, at + 2);
            at = if flags == 1 { read_leb(payload, next).1 } else { next };
            tables.push(reftype);
            tables.push(0x00);
            write_leb(&mut tables, elements);
        }
        assert_eq!(at, payload.len(), "the table section ends where its tables do");
        push_section(&mut out, 4, &tables);
    }
    out
}

/// The sections of a module or component (`bytes`, its 8-byte header
/// first), as (id, the payload's range in `bytes`).
fn wasm_sections(bytes: &[u8]) -> Vec<(u8, std::ops::Range<usize>)> {
    let mut sections = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let (size, start) = read_leb(bytes, at + 1);
        let end = start + size as usize;
        sections.push((bytes[at], start..end));
        at = end;
    }
    sections
}

fn push_section(out: &mut Vec<u8>, id: u8, payload: &[u8]) {
    out.push(id);
    write_leb(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// An unsigned LEB128 at `at`: its value and the offset after it.
fn read_leb(bytes: &[u8], mut at: usize) -> (u64, usize) {
    let (mut value, mut shift) = (0u64, 0);
    loop {
        let byte = bytes[at];
        at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return (value, at);
        }
        shift += 7;
    }
}

fn write_leb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub async fn deep_recursion(env: &Env) {
    let result = env.run("stack-overflow", &[], BudgetRequest::default()).await;
    fails(&result, FailKind::AgentTrap, "stack overflow");
    assert!(failure(&result).details.contains("wasm backtrace"));
    assert!(
        failure(&result).details.len() <= FAILURE_DETAILS_BYTES,
        "{}",
        failure(&result).details.len()
    );
}

// ---- what the host holds for a run -----------------------------------------

/// What the host charges for one header map: twice its size limit, and
/// the entry.
fn one_map() -> u64 {
    2 * HostLimits::default().field_bytes as u64 + 512
}

pub async fn http_fields_bomb(env: &Env) {
    // Header maps of 30 KiB each, kept: no grant needed, no linear memory
    // used. The host charges each map to the run and stops it at 32 MiB.
    let result = env.run("hostile", &[("attack", "http-fields")], memory(32 * MIB)).await;
    fails(&result, FailKind::BudgetMemory, "host resources the run holds");
    let report = &result.report;
    assert!(report.peak_host_bytes > 24 * MIB, "the maps were counted: {report:?}");
    assert!(report.peak_memory_bytes <= 32 * MIB + one_map(), "{report:?}");
    // Maps of hundreds of one-byte headers, whose bookkeeping outweighs
    // their bytes, and maps moved into responses: charged all the same.
    for input in [
        &[("attack", "http-fields"), ("tiny", "1")][..],
        &[("attack", "out-responses")],
    ] {
        let result = env.run("hostile", input, memory(32 * MIB)).await;
        fails(&result, FailKind::BudgetMemory, "host resources the run holds");
        assert!(
            result.report.peak_memory_bytes <= 32 * MIB + one_map(),
            "{input:?}: {:?}",
            result.report
        );
    }
    // One map over its size limit.
    let over = (HostLimits::default().field_bytes + 1).to_string();
    let result = env
        .run(
            "hostile",
            &[("attack", "http-fields"), ("value_bytes", &over)],
            memory(32 * MIB),
        )
        .await;
    fails(&result, FailKind::BudgetMemory, "HTTP header map past 32 KiB");
}

pub async fn kept_http_responses(env: &Env) {
    // Responses of an allowed host, waited for and kept unread: each holds
    // a connection's buffers, charged to the run.
    let url = format!("http://{}/small", env.headers);
    let result = env
        .run(
            "hostile",
            &[("attack", "keep-responses"), ("url", &url)],
            memory(32 * MIB),
        )
        .await;
    fails(&result, FailKind::BudgetMemory, "host resources the run holds");
    assert!(result.report.peak_host_bytes > 24 * MIB, "{:?}", result.report);
    // Headers past what a run may hold are refused, before any is kept.
    let url = format!("http://{}/big", env.headers);
    let result = env
        .run(
            "hostile",
            &[("attack", "response-headers"), ("url", &url)],
            memory(32 * MIB),
        )
        .await;
    let seen = completed(&result);
    assert!(
        seen.get("error")
            .is_some_and(|e| e.contains("HttpResponseHeaderSectionSize")),
        "{seen:?}"
    );
    let url = format!("http://{}/small", env.headers);
    let result = env
        .run(
            "hostile",
            &[("attack", "response-headers"), ("url", &url)],
            BudgetRequest::default(),
        )
        .await;
    assert_eq!(completed(&result)["status"], "200");
}

pub async fn audit_loop_pays_in_fuel(env: &Env) {
    // Host work a run causes is paid in fuel, not only in time: each
    // `wasi:http` call makes the host look at the run's 4,000 resources;
    // 1 MiB random draws; log lines of a megabyte.
    let budget = BudgetRequest {
        fuel: Some(50_000_000),
        duration: Some(Duration::from_secs(20)),
        ..BudgetRequest::default()
    };
    for input in [
        &[("attack", "audit-loop")][..],
        &[("attack", "random-loop")],
        &[("attack", "log-loop"), ("bytes", "1000000")],
    ] {
        let result = env.run("hostile", input, budget).await;
        fails(&result, FailKind::BudgetFuel, "50000000");
        assert!(
            result.report.wall_ms < 10_000,
            "{input:?} ended by fuel, long before its deadline: {:?}",
            result.report
        );
    }
}

pub async fn llm_request_of_escaped_characters(env: &Env) {
    // 2,000,000 control characters, within what a call may carry, are
    // 12 MB as JSON: refused before more than 2 MiB of it is written.
    let before = env.llm.requests.load(Ordering::SeqCst);
    let result = env
        .run("hostile", &[("attack", "llm-escape")], BudgetRequest::default())
        .await;
    let seen = completed(&result);
    assert!(
        seen["error"].contains("InvalidRequest") && seen["error"].contains("2097152 bytes"),
        "{seen:?}"
    );
    assert_eq!(env.llm.requests.load(Ordering::SeqCst), before, "nothing was sent");
    let result = env
        .run(
            "hostile",
            &[("attack", "llm-escape"), ("bytes", "1000")],
            BudgetRequest::default(),
        )
        .await;
    assert_eq!(completed(&result)["answer"], "more");
}

pub async fn resource_table_exhaustion(env: &Env) {
    // Clock pollables, kept: small, but each one a host resource.
    let result = env
        .run("hostile", &[("attack", "resource-flood")], BudgetRequest::default())
        .await;
    let limit = HostLimits::default().resource_entries;
    fails(&result, FailKind::BudgetMemory, &format!("{limit} host resources"));
}

pub async fn random_bytes_past_the_limit(env: &Env) {
    let result = env
        .run("hostile", &[("attack", "random-bytes")], BudgetRequest::default())
        .await;
    fails(&result, FailKind::BudgetMemory, "random bytes in one call");
    let within = (HostLimits::default().random_bytes).to_string();
    let result = env
        .run(
            "hostile",
            &[("attack", "random-bytes"), ("bytes", &within)],
            BudgetRequest::default(),
        )
        .await;
    assert_eq!(completed(&result)["random_bytes"], within);
}

pub async fn oversized_fail_message_and_details(env: &Env) {
    // A 1.5 MiB error message and a megabyte of stderr: the Fail carries the
    // start of each, the cut marked, well within what a plane accepts.
    let result = env
        .run(
            "hostile",
            &[("attack", "huge-error"), ("stderr", "1000000")],
            memory(64 * MIB),
        )
        .await;
    let failure = failure(&result);
    assert_eq!(failure.kind, FailKind::AgentError, "{}", failure.message.len());
    assert!(
        failure.message.len() <= FAILURE_MESSAGE_BYTES,
        "{}",
        failure.message.len()
    );
    assert!(failure.message.starts_with("mmmm") && failure.message.ends_with(" bytes cut]"));
    assert!(
        failure.details.len() <= FAILURE_DETAILS_BYTES,
        "{}",
        failure.details.len()
    );
    assert!(
        failure.details.contains("[stderr truncated]"),
        "{}",
        &failure.details[failure.details.len() - 100..]
    );
    // 20 MiB is more than a returned value may carry out of the guest.
    let twenty = (20 * MIB).to_string();
    let result = env
        .run(
            "hostile",
            &[("attack", "huge-error"), ("bytes", &twenty)],
            memory(64 * MIB),
        )
        .await;
    fails(&result, FailKind::BudgetOutput, "the agent returned more than 2 MiB");
}

// ---- traps -----------------------------------------------------------------

pub async fn panic(env: &Env) {
    let result = env.run("panic", &[], BudgetRequest::default()).await;
    fails(&result, FailKind::AgentTrap, "this agent always panics");
}

pub async fn unreachable(env: &Env) {
    let result = env
        .run("hostile", &[("attack", "unreachable")], BudgetRequest::default())
        .await;
    fails(&result, FailKind::AgentTrap, "`unreachable` executed");
    assert!(failure(&result).details.contains("wasm backtrace"));
}

// ---- output ----------------------------------------------------------------

pub async fn huge_result(env: &Env) {
    let result = env.run("big-result", &[], memory(64 * MIB)).await;
    fails(&result, FailKind::BudgetOutput, "over the node's cap of 1 MiB");
    assert!(result.report.peak_memory_bytes <= 64 * MIB);
}

pub async fn huge_single_log_line(env: &Env) {
    // One 1.5 MiB message: passed on cut to 8 KiB, the run completes.
    let one_and_a_half = (3 * MIB / 2).to_string();
    let result = env
        .run(
            "hostile",
            &[("attack", "huge-log"), ("bytes", &one_and_a_half)],
            memory(64 * MIB),
        )
        .await;
    assert_eq!(completed(&result)["logged_bytes"], one_and_a_half);
    assert_eq!(
        (result.report.log_lines, result.report.log_lines_dropped),
        (1, 0),
        "{:?}",
        result.report
    );
    assert!(result.report.peak_memory_bytes <= 64 * MIB);
    // 10 MiB is more than one call may carry into the host: refused.
    let result = env.run("hostile", &[("attack", "huge-log")], memory(64 * MIB)).await;
    fails(&result, FailKind::BudgetMemory, "in one call");
}

pub async fn log_flood(env: &Env) {
    let result = env
        .run("log-flood", &[("lines", "5000")], BudgetRequest::default())
        .await;
    assert_eq!(completed(&result)["lines"], "5000");
    assert_eq!(result.report.log_lines, NodeLimits::default().log_lines);
    assert_eq!(result.report.log_lines + result.report.log_lines_dropped, 5001);
}

// ---- waiting ---------------------------------------------------------------

pub async fn sleeping_forever(env: &Env) {
    let result = env.run("sleep-forever", &[], env.deadline()).await;
    fails(&result, FailKind::BudgetDeadline, "host call");
    on_time(env, &result);
}

// ---- what the sandbox does not grant --------------------------------------

pub async fn filesystem_access(env: &Env) {
    let result = env.run("hostile", &[("attack", "fs")], BudgetRequest::default()).await;
    let seen = completed(&result);
    for n in 0..3 {
        assert!(
            seen.contains_key(&format!("fs.{n}.error")),
            "{} was read: {seen:?}",
            seen[&format!("fs.{n}.path")]
        );
        assert!(!seen.contains_key(&format!("fs.{n}.read")), "{seen:?}");
    }
    for n in 0..3 {
        assert!(
            seen.contains_key(&format!("dir.{n}.error")),
            "a directory was listed: {seen:?}"
        );
    }
    assert!(seen.contains_key("write.error"), "{seen:?}");
    assert!(
        !seen.values().any(|value| value.contains("root:")),
        "/etc/passwd leaked: {seen:?}"
    );
}

pub async fn environment_read(env: &Env) {
    let result = env.run("hostile", &[("attack", "env")], BudgetRequest::default()).await;
    let seen = completed(&result);
    assert_eq!(seen["env.count"], "0", "{seen:?}");
    assert_eq!(seen["env.names"], "");
    assert!(seen["env.PATH"].starts_with("error"), "{seen:?}");
    assert!(seen["env.HOME"].starts_with("error"), "{seen:?}");
    if let Ok(path) = std::env::var("PATH") {
        assert!(
            !seen.values().any(|value| value.contains(&path)),
            "the host's PATH is visible: {seen:?}"
        );
    }
}

pub async fn socket_attempt(env: &Env) {
    let addr = env.socket_target.addr.to_string();
    let result = env
        .run(
            "hostile",
            &[("attack", "socket"), ("addr", &addr)],
            BudgetRequest::default(),
        )
        .await;
    let seen = completed(&result);
    assert!(seen.contains_key("socket.error"), "{seen:?}");
    assert!(!seen.contains_key("socket.connected"), "{seen:?}");
    assert!(!seen.contains_key("udp.sent"), "{seen:?}");
    // Give a connection that slipped through time to be accepted.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(env.socket_target.accepted(), 0, "the listener saw a connection");
}

pub async fn http_to_a_denied_host(env: &Env) {
    let url = format!("http://{}/", env.denied.addr);
    let result = env.run("http-fetch", &[("url", &url)], BudgetRequest::default()).await;
    let seen = completed(&result);
    assert!(
        seen.get("error").is_some_and(|e| e.contains("HttpRequestDenied")),
        "{seen:?}"
    );
    assert!(!seen.contains_key("status"));
    assert_eq!((result.report.http_requests, result.report.http_denied), (1, 1));
    assert_eq!(env.denied.accepted(), 0, "the denied host saw a connection");
}

pub async fn http_to_an_allowed_host_that_never_answers(env: &Env) {
    let url = format!("http://{}/", env.silent.addr);
    let started = Instant::now();
    let result = env.run("http-fetch", &[("url", &url)], env.deadline()).await;
    assert!(
        started.elapsed() < env.short + Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    match &result.outcome {
        RunOutcome::Completed(seen) => {
            assert!(seen.contains_key("error") && !seen.contains_key("status"), "{seen:?}")
        }
        RunOutcome::Failed(failure) => assert_eq!(failure.kind, FailKind::BudgetDeadline, "{failure:?}"),
    }
}

// ---- LLM -------------------------------------------------------------------

pub async fn llm_loop_is_refused_past_the_token_budget(env: &Env) {
    // 32 tokens a call against a budget of 100, each prompt estimated at
    // 10: three full calls, then the 4 tokens left cannot hold the next
    // prompt, and every call is refused unsent.
    let before = env.llm.requests.load(Ordering::SeqCst);
    let budget = BudgetRequest {
        tokens: Some(100),
        ..BudgetRequest::default()
    };
    let result = env.run("llm-chat", &[("calls", "1000")], budget).await;
    let seen = completed(&result);
    assert_eq!(seen["calls_completed"], "3", "{seen:?}");
    assert!(seen["error"].starts_with("budget-exhausted: "), "{seen:?}");
    assert_eq!(
        env.llm.requests.load(Ordering::SeqCst) - before,
        3,
        "refused calls never reach the provider"
    );
}

pub async fn llm_loop_past_the_token_budget_fails(env: &Env) {
    // A provider that ignores max_tokens (100 tokens where 90 were
    // allowed): the run goes over and fails.
    let budget = BudgetRequest {
        tokens: Some(100),
        ..BudgetRequest::default()
    };
    let result = env
        .run("llm-chat", &[("calls", "1000"), ("model", "greedy")], budget)
        .await;
    fails(&result, FailKind::BudgetTokens, "over its budget of 100");
    assert_eq!(result.report.tokens_in + result.report.tokens_out, 112);
}

pub async fn llm_prompt_larger_than_the_remaining_budget(env: &Env) {
    // 100,000 bytes of prompt, estimated at 25,008 tokens, against a budget
    // of 4,000: refused before any request reaches the provider, every
    // time the agent asks.
    let before = env.llm.requests.load(Ordering::SeqCst);
    let budget = BudgetRequest {
        tokens: Some(4000),
        ..BudgetRequest::default()
    };
    let prompt = "p".repeat(100_000);
    let result = env
        .run("llm-chat", &[("message", &prompt), ("calls", "50")], budget)
        .await;
    let seen = completed(&result);
    assert_eq!(seen["calls_completed"], "0", "{seen:?}");
    assert!(
        seen["error"].starts_with("budget-exhausted: ") && seen["error"].contains("25008 tokens"),
        "{seen:?}"
    );
    assert_eq!(
        env.llm.requests.load(Ordering::SeqCst),
        before,
        "nothing reached the provider"
    );
    assert_eq!(result.report.tokens_in + result.report.tokens_out, 0);
}

// ---- artifacts that are not agents ------------------------------------------

pub async fn a_core_module(env: &Env) {
    let reason = env.refused(b"\0asm\x01\0\0\0".to_vec()).await;
    assert!(reason.contains("core WebAssembly module"), "{reason}");
}

pub async fn not_webassembly(env: &Env) {
    let reason = env.refused(b"#!/bin/sh\nrm -rf /\n".to_vec()).await;
    assert!(reason.contains("not WebAssembly"), "{reason}");
}

pub async fn a_component_of_another_world(env: &Env) {
    let reason = env.refused(agent_bytes("other-world").to_vec()).await;
    assert!(reason.contains("another world") && reason.contains("greet"), "{reason}");
}

pub async fn an_import_the_node_does_not_provide(env: &Env) {
    let reason = env.refused(agent_bytes("missing-import").to_vec()).await;
    assert!(reason.contains("an import this node does not provide"), "{reason}");
    assert!(reason.contains("nope:missing/thing"), "the import is named: {reason}");
}

pub async fn a_truncated_file(env: &Env) {
    let echo = agent_bytes("echo");
    let reason = env.refused(echo[..echo.len() / 2].to_vec()).await;
    assert!(reason.contains("not a valid WebAssembly component"), "{reason}");
}

pub async fn a_corrupt_file(env: &Env) {
    // Flip bytes in the middle of the agent's code. (The middle of the
    // file is no good: in a build with debug info it is a custom section,
    // which nobody validates.)
    let mut bytes = agent_bytes("echo").to_vec();
    let code = code_section(&bytes).expect("echo has a core module with a code section");
    let middle = (code.start + code.end) / 2;
    for byte in &mut bytes[middle..middle + 64] {
        *byte ^= 0xa5;
    }
    let reason = env.refused(bytes).await;
    assert!(reason.contains("not a valid WebAssembly component"), "{reason}");
}

/// Where the code section of a component's first core module is.
fn code_section(component: &[u8]) -> Option<std::ops::Range<usize>> {
    const COMPONENT_CORE_MODULE: u8 = 1;
    const MODULE_CODE: u8 = 10;
    let (_, module) = wasm_sections(component)
        .into_iter()
        .find(|(id, _)| *id == COMPONENT_CORE_MODULE)?;
    let (_, code) = wasm_sections(&component[module.clone()])
        .into_iter()
        .find(|(id, _)| *id == MODULE_CODE)?;
    Some(module.start + code.start..module.start + code.end)
}

pub async fn a_cwasm_from_a_network_source(env: &Env) {
    // Native code served as `echo` 1.0.0 by an HTTP agent source: whoever
    // controls that server must not get to run it in the node.
    use node_runtime::agent_store::{AgentSource, AgentStore, HttpSource, HttpSourceSettings};
    let cwasm = env.sandbox.precompile(&agent_bytes("echo")).expect("echo precompiles");
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let app = axum::Router::new().route(
        "/agents/echo/1.0.0.wasm",
        axum::routing::get(move || {
            count.fetch_add(1, Ordering::SeqCst);
            let cwasm = cwasm.clone();
            async move { cwasm }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let cache = tempfile::tempdir().unwrap();
    let source = HttpSource::new(
        HttpSourceSettings {
            url_template: format!("http://{addr}/agents/{{agent_id}}/{{version}}.wasm"),
            max_bytes: 64 * MIB,
            timeout: Duration::from_secs(10),
            cache_dir: cache.path().to_path_buf(),
            cache_max_bytes: 1 << 30,
        },
        None,
    )
    .unwrap();
    let store = AgentStore::with_sources(vec![AgentSource::Http(source)], false);
    let refused = store
        .resolve(&env.sandbox, "echo", "1.0.0")
        .await
        .expect_err("a .cwasm from the network loads");
    assert!(!refused.is_retryable(), "{refused}");
    let reason = refused.to_string();
    assert!(
        reason.contains("precompiled") && reason.contains("AgentsDirectory"),
        "{reason}"
    );
    assert_eq!(served.load(Ordering::SeqCst), 1, "it was fetched, then refused");
    assert!(
        std::fs::read_dir(cache.path()).unwrap().all(|entry| {
            let path = entry.unwrap().path();
            !path.is_dir() || std::fs::read_dir(path).unwrap().next().is_none()
        }),
        "nothing was kept in the download cache"
    );
}

pub async fn a_zero_byte_file(env: &Env) {
    let reason = env.refused(Vec::new()).await;
    assert!(reason.contains("empty"), "{reason}");
}

/// A component holding one core module of `functions` bodies, each
/// `blocks` nested blocks deep and declaring `locals` `i64` locals: valid
/// WebAssembly, written byte by byte.
fn code_bomb(functions: u32, blocks: u32, locals: u32) -> Vec<u8> {
    let mut body = Vec::new();
    if locals == 0 {
        body.push(0); // no locals
    } else {
        body.push(1); // one run of locals: `locals` of type i64
        write_leb(&mut body, u64::from(locals));
        body.push(0x7e);
    }
    for _ in 0..blocks {
        body.extend_from_slice(&[0x02, 0x40]); // block (no result)
    }
    body.extend(std::iter::repeat_n(0x0b, blocks as usize + 1)); // the ends
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    push_section(&mut module, 1, &[1, 0x60, 0, 0]); // one type: [] -> []
    let mut funcs = Vec::new();
    write_leb(&mut funcs, u64::from(functions));
    funcs.extend(std::iter::repeat_n(0, functions as usize));
    push_section(&mut module, 3, &funcs);
    let mut code = Vec::new();
    write_leb(&mut code, u64::from(functions));
    for _ in 0..functions {
        write_leb(&mut code, body.len() as u64);
        code.extend_from_slice(&body);
    }
    push_section(&mut module, 10, &code);
    let mut component = b"\0asm\x0d\0\x01\0".to_vec();
    push_section(&mut component, 1, &module);
    component
}

pub async fn compile_bomb(env: &Env) {
    // Well within the size bound (under 1 MB each), but compiling them
    // would keep a thread busy that no deadline can stop: 250,000
    // functions; one function of 200,000 nested blocks; 100,000 six-byte
    // functions of 50,000 locals each (minutes and most of a gigabyte in
    // Cranelift); and, within every per-function bound, 2,000 functions
    // of 4,000 locals. All are refused before wasmtime sees them, naming
    // the bound.
    let many = code_bomb(250_000, 0, 0);
    assert!(many.len() < 1 << 20, "{} bytes", many.len());
    let reason = env.refused(many).await;
    assert!(
        reason.contains("more than 100000 functions") && reason.contains("Sandbox.MaxFunctions"),
        "{reason}"
    );
    let deep = code_bomb(1, 200_000, 0);
    assert!(deep.len() < 1 << 20, "{} bytes", deep.len());
    let reason = env.refused(deep).await;
    assert!(
        reason.contains("more than 4000 deep") && reason.contains("Sandbox.MaxNesting"),
        "{reason}"
    );
    let locals = code_bomb(100_000, 0, 50_000);
    assert!(locals.len() < 1 << 20, "{} bytes", locals.len());
    let reason = env.refused(locals).await;
    assert!(
        reason.contains("function 0")
            && reason.contains("more than 5000 locals")
            && reason.contains("Sandbox.MaxFunctionLocals"),
        "{reason}"
    );
    let spread = code_bomb(2_000, 0, 4_000);
    let reason = env.refused(spread).await;
    assert!(
        reason.contains("more than 500000 locals together") && reason.contains("Sandbox.MaxLocals"),
        "{reason}"
    );
}

// ---- Added with the second hardening: floods and grants ------------------

pub async fn egress_denial_flood(env: &Env) {
    // Thousands of denied requests within fuel: each is counted, the node
    // logs the first few (`tests/logs/host_warnings.rs` reads the lines)
    // and counts the rest in the report.
    let url = format!("http://{}/", env.denied.addr);
    let result = env
        .run(
            "hostile",
            &[("attack", "http-flood"), ("url", &url), ("count", "5000")],
            BudgetRequest::default(),
        )
        .await;
    let seen = completed(&result);
    assert_eq!(seen["denied"], "5000", "{seen:?}");
    assert_eq!((result.report.http_requests, result.report.http_denied), (5000, 5000));
    assert_eq!(
        result.report.host_warnings_suppressed,
        5000 - node_runtime::sandbox::HOST_WARNINGS_PER_KIND
    );
    assert_eq!(env.denied.accepted(), 0, "the denied host saw a connection");
}

fn writer_grants(writable: &tempfile::TempDir) -> node_runtime::sandbox::Grants {
    node_runtime::sandbox::Grants {
        directories: vec![node_runtime::sandbox::DirectoryGrant {
            host_path: writable.path().join("a"),
            guest_path: "/data".to_string(),
            read_only: false,
        }],
        ..Default::default()
    }
}

pub async fn nested_grant_symlink_swap(env: &Env) {
    // The agent with a read-write grant on `a/` swaps `a/shared/` for a
    // symlink out of its grant; a node that would also grant `a/shared/`
    // to another agent is refused at start-up, before and after the swap.
    let a = env.writable.path().join("a");
    let shared = a.join("shared");
    if shared.is_symlink() {
        std::fs::remove_file(&shared).unwrap();
    }
    std::fs::create_dir_all(&shared).unwrap();
    let node_granting_shared = || {
        let reader = node_runtime::sandbox::Grants {
            directories: vec![node_runtime::sandbox::DirectoryGrant {
                host_path: shared.clone(),
                guest_path: "/shared".to_string(),
                read_only: true,
            }],
            ..Default::default()
        };
        let grants = BTreeMap::from([
            (WRITER.to_string(), writer_grants(&env.writable)),
            ("reader".to_string(), reader),
        ]);
        match Sandbox::new(SandboxConfig {
            grants,
            ..SandboxConfig::default()
        }) {
            Ok(_) => panic!("a grant inside another agent's writable grant was accepted"),
            Err(err) => err.to_string(),
        }
    };
    let refused = node_granting_shared();
    for part in [WRITER, "reader", "lies inside", "read-only"] {
        assert!(refused.contains(part), "{part} not in {refused}");
    }

    let agent = load(&env.sandbox, "hostile").await;
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        env.sandbox.run(
            &agent,
            request(WRITER, &[("attack", "symlink-swap")], BudgetRequest::default()),
        ),
    )
    .await
    .expect("the run ends");
    let seen = completed(&result);
    assert_eq!(seen["rmdir"], "Ok(())", "{seen:?}");
    // wasmtime 48 lets a writable grant hold a symlink pointing out of it
    // (following it from inside the grant is refused); the host sees it.
    if seen["symlink"] == "Ok(())" {
        assert!(shared.is_symlink(), "the agent's symlink is on the host");
    }
    let refused = node_granting_shared();
    assert!(refused.contains("lies inside"), "{refused}");
}

pub type Case = for<'a> fn(&'a Env) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        /// Every case, by name.
        pub const CASES: &[(&str, Case)] = &[$((stringify!($name), {
            fn boxed(env: &Env) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
                Box::pin($name(env))
            }
            boxed
        })),*];
    };
}

cases!(
    busy_loop_out_of_fuel,
    busy_loop_past_the_deadline,
    host_call_loop_out_of_fuel,
    host_call_loop_past_the_deadline,
    log_call_loop_out_of_fuel,
    log_call_loop_past_the_deadline,
    random_draw_loop_past_the_deadline,
    memory_bomb,
    table_growth_refused,
    table_bomb_under_the_on_demand_allocator,
    deep_recursion,
    http_fields_bomb,
    kept_http_responses,
    audit_loop_pays_in_fuel,
    llm_request_of_escaped_characters,
    resource_table_exhaustion,
    random_bytes_past_the_limit,
    oversized_fail_message_and_details,
    panic,
    unreachable,
    huge_result,
    huge_single_log_line,
    log_flood,
    sleeping_forever,
    filesystem_access,
    environment_read,
    socket_attempt,
    http_to_a_denied_host,
    http_to_an_allowed_host_that_never_answers,
    llm_loop_is_refused_past_the_token_budget,
    llm_loop_past_the_token_budget_fails,
    a_core_module,
    not_webassembly,
    a_component_of_another_world,
    an_import_the_node_does_not_provide,
    a_truncated_file,
    a_corrupt_file,
    a_cwasm_from_a_network_source,
    a_zero_byte_file,
    llm_prompt_larger_than_the_remaining_budget,
    compile_bomb,
    egress_denial_flood,
    nested_grant_symlink_swap,
);
