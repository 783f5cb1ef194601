//! Outbound HTTP: allow-lists from the node and the run's metadata, trace
//! context on every allowed request, the deadline and the response-body
//! cap, against real servers on loopback.

use crate::support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use node_runtime::sandbox::{
    BudgetRequest, EngineSettings, FailKind, HTTP_RESPONSE_BYTES, RunOutcome, RunRequest, RunResult, Sandbox,
    SandboxConfig, SandboxError,
};
use support::*;

const AGENT: &str = "http-fetch";

/// One request the target API received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A target API on 127.0.0.1 that records every request. `/big` answers
/// with a body of `BIG` bytes; anything else with `ok`.
struct Target {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

const BIG: usize = 8 * 1024 * 1024;

impl Target {
    async fn start() -> Target {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(Seen {
                    method: method.to_string(),
                    path: uri.path().to_string(),
                    headers,
                    body: body.to_vec(),
                });
                if uri.path() == "/big" {
                    vec![b'x'; BIG]
                } else {
                    b"ok".to_vec()
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Target { addr, seen }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.port())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A server that accepts connections and never answers.
async fn silent_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
            if held.len() > 64 {
                held.remove(0);
            }
        }
    });
    addr
}

fn egress_sandbox(grants: &[&str]) -> Sandbox {
    let allowed_hosts = BTreeMap::from([(
        AGENT.to_string(),
        grants.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
    )]);
    Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: 4,
            ..EngineSettings::default()
        },
        allowed_hosts,
        ..SandboxConfig::default()
    })
    .expect("the sandbox starts")
}

fn fetch_request(url: &str, body: Option<&str>, metadata: &[(&str, &str)], duration: Duration) -> RunRequest {
    let mut input = vec![("url", url)];
    if let Some(body) = body {
        input.push(("body", body));
    }
    let mut request = request(
        AGENT,
        &input,
        BudgetRequest {
            duration: Some(duration),
            ..BudgetRequest::default()
        },
    );
    request.context.metadata = map(metadata);
    request
}

/// Runs http-fetch with a 20 s bound on the test itself.
async fn fetch(sandbox: &Sandbox, request: RunRequest) -> RunResult {
    let agent = load(sandbox, AGENT).await;
    tokio::time::timeout(Duration::from_secs(20), sandbox.run(&agent, request))
        .await
        .expect("the run ends")
}

fn completed(result: &RunResult) -> &BTreeMap<String, String> {
    match &result.outcome {
        RunOutcome::Completed(result) => result,
        RunOutcome::Failed(failure) => panic!("expected completion, the run failed: {failure:?}"),
    }
}

fn assert_denied(result: &RunResult) {
    let seen = completed(result);
    let error = seen.get("error").map(String::as_str).unwrap_or("");
    assert!(
        error.contains("HttpRequestDenied"),
        "expected a denied request: {seen:?}"
    );
    assert!(!seen.contains_key("status"), "{seen:?}");
}

const LONG: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_request_arrives_with_the_runs_trace_context() {
    let target = Target::start().await;
    let sandbox = egress_sandbox(&[&format!("127.0.0.1:{}", target.port())]);
    let request = fetch_request(&target.url("127.0.0.1", "/invoices?x=1"), Some(r#"{"n":1}"#), &[], LONG);
    let trace_id = request.context.trace_id.clone();
    let run_id = request.context.run_id.clone();
    let result = fetch(&sandbox, request).await;
    let answer = completed(&result);
    assert_eq!(answer.get("status").map(String::as_str), Some("200"), "{answer:?}");
    assert_eq!(answer["body_bytes"], "2");

    let seen = target.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let request = &seen[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/invoices");
    assert_eq!(request.body, br#"{"n":1}"#);
    let traceparent = request.headers["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], trace_id);
    assert_eq!(parts[2].len(), 16, "{traceparent}");
    assert!(parts[2].bytes().all(|b| b.is_ascii_hexdigit()) && parts[2] != "0000000000000000");
    assert_eq!(parts[3], "01");
    // The guest set its own X-Correlation-ID; the node's replaces it.
    let correlation: Vec<_> = request.headers.get_all("x-correlation-id").iter().collect();
    assert_eq!(correlation, [run_id.as_str()]);

    // A second request gets a span id of its own.
    let request = fetch_request(&target.url("127.0.0.1", "/"), None, &[], LONG);
    completed(&fetch(&sandbox, request).await);
    let seen = target.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].method, "GET");
    assert_ne!(seen[0].headers["traceparent"], seen[1].headers["traceparent"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_not_on_the_allow_list_is_denied_and_reaches_nothing() {
    let target = Target::start().await;
    // Another agent's grant does not count; nor does another host.
    let sandbox = Sandbox::new(SandboxConfig {
        allowed_hosts: BTreeMap::from([
            ("someone-else".to_string(), vec!["127.0.0.1".to_string()]),
            (AGENT.to_string(), vec!["api.example.com".to_string()]),
        ]),
        ..SandboxConfig::default()
    })
    .unwrap();
    let result = fetch(&sandbox, fetch_request(&target.url("127.0.0.1", "/"), None, &[], LONG)).await;
    assert_denied(&result);
    // No grants at all: the default.
    let result = fetch(
        &sandbox_with(Default::default()),
        fetch_request(&target.url("127.0.0.1", "/"), None, &[], LONG),
    )
    .await;
    assert_denied(&result);
    assert!(target.seen().is_empty(), "{:?}", target.seen());
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_narrows_the_allow_list_and_never_widens_it() {
    let target = Target::start().await;
    let port = target.port();

    // The node allows only localhost; the metadata names 127.0.0.1 too.
    let sandbox = egress_sandbox(&[&format!("localhost:{port}")]);
    let metadata = format!("127.0.0.1:{port},localhost:{port}");
    let result = fetch(
        &sandbox,
        fetch_request(&target.url("127.0.0.1", "/"), None, &[("http.allow", &metadata)], LONG),
    )
    .await;
    assert_denied(&result);
    assert!(target.seen().is_empty());

    // The node allows both hosts (any port); the metadata keeps one, on
    // one port, matched case-insensitively.
    let sandbox = egress_sandbox(&["127.0.0.1", "LOCALHOST"]);
    let narrowed = [("http.allow", format!("Localhost:{port}"))];
    let narrowed = [(narrowed[0].0, narrowed[0].1.as_str())];
    let result = fetch(
        &sandbox,
        fetch_request(&target.url("127.0.0.1", "/"), None, &narrowed, LONG),
    )
    .await;
    assert_denied(&result);
    assert!(target.seen().is_empty());
    let result = fetch(
        &sandbox,
        fetch_request(&target.url("localhost", "/kept"), None, &narrowed, LONG),
    )
    .await;
    assert_eq!(
        completed(&result).get("status").map(String::as_str),
        Some("200"),
        "{:?}",
        result.outcome
    );
    let seen = target.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/kept");

    // Without metadata the node's list applies as is.
    let result = fetch(&sandbox, fetch_request(&target.url("127.0.0.1", "/"), None, &[], LONG)).await;
    assert_eq!(completed(&result).get("status").map(String::as_str), Some("200"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_grant_does_not_allow_another_port() {
    let allowed = Target::start().await;
    let other = Target::start().await;
    let sandbox = egress_sandbox(&[&format!("127.0.0.1:{}", allowed.port())]);
    let result = fetch(&sandbox, fetch_request(&other.url("127.0.0.1", "/"), None, &[], LONG)).await;
    assert_denied(&result);
    assert!(other.seen().is_empty());
    let result = fetch(&sandbox, fetch_request(&allowed.url("127.0.0.1", "/"), None, &[], LONG)).await;
    assert_eq!(completed(&result).get("status").map(String::as_str), Some("200"));
    assert_eq!(allowed.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_never_answers_ends_by_the_runs_deadline() {
    let addr = silent_server().await;
    let sandbox = egress_sandbox(&[&format!("127.0.0.1:{}", addr.port())]);
    let started = Instant::now();
    let result = fetch(
        &sandbox,
        fetch_request(&format!("http://{addr}/"), None, &[], Duration::from_millis(1500)),
    )
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "the run took {took:?}");
    match &result.outcome {
        RunOutcome::Completed(answer) => {
            assert!(
                answer.contains_key("error") && !answer.contains_key("status"),
                "{answer:?}"
            )
        }
        RunOutcome::Failed(failure) => assert_eq!(failure.kind, FailKind::BudgetDeadline, "{failure:?}"),
    }
}

/// A run cut off at its deadline while it reads a response body that
/// never ends has its connection closed there, before it is reported and
/// without waiting for its call to be unwound: the target sees the close
/// while the cut-off call is still held, not unwound.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_cut_off_mid_response_has_its_connection_closed_before_its_call_is_unwound() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Each connection in turn: a response head, then a byte every 100 ms
    // for 30 s at most; whether the node closed it is sent on `closed`.
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n";
                let mut open = socket.write_all(head).await.is_ok();
                for _ in 0..300 {
                    if !open {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    open = socket.write_all(b"x").await.is_ok();
                }
                let _ = closed_tx.send(!open);
            });
        }
    });
    let sandbox = egress_sandbox(&[&format!("127.0.0.1:{}", addr.port())]);
    let agent = load(&sandbox, AGENT).await;
    // A byte that arrives in the deadline's own millisecond returns the
    // guest to the call hook, which stops it there (nothing left to
    // unwind); the next attempt is then cut off in its wait.
    for _attempt in 0..5 {
        let request = fetch_request(&format!("http://{addr}/"), None, &[], Duration::from_millis(500));
        let reported = tokio::time::timeout(Duration::from_secs(20), sandbox.run_reported(&agent, request))
            .await
            .expect("the run ends");
        let failure = reported.result.outcome.failure().expect("the deadline ends the run");
        assert_eq!(failure.kind, FailKind::BudgetDeadline, "{failure:?}");
        let was_closed = tokio::time::timeout(Duration::from_secs(40), closed.recv()).await;
        assert!(
            matches!(was_closed, Ok(Some(true))),
            "the connection stayed open while the call was held: {was_closed:?}"
        );
        if let Some(call) = reported.cut_off {
            call.unwind().await;
            return;
        }
    }
    panic!("no attempt of five was cut off in its wait");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_body_past_the_cap_ends_with_an_error() {
    let target = Target::start().await;
    let sandbox = egress_sandbox(&["127.0.0.1"]);
    let result = fetch(
        &sandbox,
        fetch_request(&target.url("127.0.0.1", "/big"), None, &[], LONG),
    )
    .await;
    let answer = completed(&result);
    assert_eq!(answer.get("status").map(String::as_str), Some("200"), "{answer:?}");
    let read: u64 = answer["body_bytes"].parse().unwrap();
    assert!(read <= HTTP_RESPONSE_BYTES, "read {read} bytes, over the cap");
    assert!(
        answer
            .get("body_error")
            .is_some_and(|e| e.contains("HttpResponseBodySize") || e.contains("body size exceeds")),
        "{answer:?}"
    );
    assert!(
        result.report.peak_memory_bytes < 8 * MIB,
        "peak memory {}",
        result.report.peak_memory_bytes
    );
}

#[test]
fn an_invalid_grant_is_refused_when_the_sandbox_starts() {
    let err = Sandbox::new(SandboxConfig {
        allowed_hosts: BTreeMap::from([(AGENT.to_string(), vec!["https://example.com/".to_string()])]),
        ..SandboxConfig::default()
    })
    .err()
    .expect("refused");
    assert!(matches!(err, SandboxError::AllowedHost { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_agent_allow_http_grants_the_host() {
    let target = Target::start().await;
    let url = target.url("127.0.0.1", "/cli");
    let run = |allow: Option<String>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"));
        command
            .arg("run-agent")
            .arg(agent_path(AGENT))
            .arg("--input-ref")
            .arg(format!("url={url}"))
            .arg("--timeout")
            .arg("10s")
            .arg("--json");
        if let Some(allow) = allow {
            command.arg("--allow-http").arg(allow);
        }
        command.kill_on_drop(true);
        async move {
            let output = tokio::time::timeout(Duration::from_secs(30), command.output())
                .await
                .expect("run-agent ends")
                .expect("run-agent starts");
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let json: serde_json::Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|err| panic!("{err}: {stdout} {}", String::from_utf8_lossy(&output.stderr)));
            json
        }
    };

    let denied = run(None).await;
    assert!(
        denied["result"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("HttpRequestDenied"),
        "{denied}"
    );
    assert!(target.seen().is_empty());

    let allowed = run(Some(format!("127.0.0.1:{}", target.port()))).await;
    assert_eq!(allowed["result"]["status"], "200", "{allowed}");
    let seen = target.seen();
    assert_eq!(seen.len(), 1);
    let correlation = seen[0].headers["x-correlation-id"].to_str().unwrap();
    assert!(correlation.starts_with("local-"), "{correlation}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(["run-agent", "x.wasm", "--allow-http", "https://example.com/"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--allow-http"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
