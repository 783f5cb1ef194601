//! The invoice classifier end to end, once per language it is written in
//! (Rust, Python, JavaScript), each through the same suite: a dev plane and
//! a node on loopback, a stub OpenAI-compatible model, and a target API that
//! records what it receives. Fifty invoices go through; the target sees each
//! once, with the right body, idempotency key and correlation id, and the
//! plane's CostInfo is the stub's usage priced by the node's table. Then,
//! in the same sandbox (so each component is compiled once): a garbled
//! model answer is final; a target API that keeps failing is worth a
//! retry; so is a provider that refuses the call, while a spent token
//! budget is final; a target API the node denies is final after one attempt
//! (the Python and JavaScript classifiers, through their kit SDK's `Denied`
//! error); and the agent fails `budget.fuel` and `budget.memory`
//! under half the fuel and memory a successful run used.

use crate::support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use node_runtime::agent_store::AgentStore;
use node_runtime::control_plane::Capacity;
use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, RunStatus};
use node_runtime::sandbox::{
    BudgetRequest, EngineSettings, FailKind, LlmSettings, ModelPrice, RunOutcome, RunRequest, Sandbox, SandboxConfig,
};
use node_runtime::support::Secret;
use node_runtime::worker::{NodeHandle, NodeSettings};
use support::*;

const PROMPT_TOKENS: u32 = 100;
const ANSWER_TOKENS: u32 = 50;
const MODEL: &str = "stub-classifier";

/// Vendors the stub knows, with the category and route it answers.
const VENDORS: [(&str, &str, &str); 3] = [
    ("Paper & Pens Ltd", "Office Supplies", "Procurement Department"),
    ("Gigabyte Servers", "Technology/Hardware", "IT Department"),
    ("City Water", "Utilities", "Facilities Management"),
];

/// The `response_format` of each request the model received.
type Formats = Arc<Mutex<Vec<serde_json::Value>>>;

/// A model that classifies by vendor name, deterministically, and keeps
/// the response format each request asked for.
async fn model(
    State(formats): State<Formats>,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    formats.lock().unwrap().push(body["response_format"].clone());
    let invoice: serde_json::Value = body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    let vendor = invoice["vendor"].as_str().unwrap_or("?");
    if vendor == "Refused Requests Co" {
        // A final 4xx: the node passes it on as `provider` at once.
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": {"message": "this stub refuses the request"}})),
        );
    }
    if vendor == "Garbled Answers Co" {
        return (
            StatusCode::OK,
            Json(serde_json::json!({
                "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "I think it is stationery?"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5, "total_tokens": PROMPT_TOKENS + 5},
            })),
        );
    }
    let (_, category, route) = VENDORS.iter().find(|(name, ..)| *name == vendor).copied().unwrap_or((
        vendor,
        "Other",
        "General Accounts Payable",
    ));
    let answer = serde_json::json!({
        "vendorName": vendor,
        "vendorCategory": category,
        "invoiceNumber": invoice["number"],
        "invoiceDate": "2026-11-01",
        "totalAmount": invoice["amount"],
        "currency": "EUR",
        "routingDestination": route,
        "confidence": 0.93,
    });
    (
        StatusCode::OK,
        Json(serde_json::json!({
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.to_string()}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": ANSWER_TOKENS, "total_tokens": PROMPT_TOKENS + ANSWER_TOKENS},
        })),
    )
}

/// One POST the target API received.
#[derive(Debug, Clone)]
struct Received {
    idempotency_key: String,
    correlation_id: String,
    traceparent: String,
    body: serde_json::Value,
}

/// What the target API saw: the invoices it accepted, and how many POSTs
/// its failing route answered 503.
#[derive(Default)]
struct TargetApi {
    accepted: Mutex<Vec<Received>>,
    unavailable: std::sync::atomic::AtomicU32,
}

async fn target(
    State(api): State<Arc<TargetApi>>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    api.accepted.lock().unwrap().push(Received {
        idempotency_key: header("idempotency-key"),
        correlation_id: header("x-correlation-id"),
        traceparent: header("traceparent"),
        body,
    });
    StatusCode::CREATED
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("127.0.0.1:{}", addr.port())
}

/// Reads the whole body before answering, as a real API does, so the
/// agent's write never races the answer.
async fn unavailable(State(api): State<Arc<TargetApi>>, _body: axum::body::Bytes) -> StatusCode {
    api.unavailable.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    StatusCode::SERVICE_UNAVAILABLE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_invoice_classifier_passes_the_invoice_suite() {
    invoice_suite("invoice-classifier").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_invoice_classifier_passes_the_invoice_suite() {
    invoice_suite("invoice-classifier-py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_invoice_classifier_passes_the_invoice_suite() {
    invoice_suite("invoice-classifier-js").await;
}

/// The whole suite against one built agent, `target/agents/{agent}.wasm`,
/// which runs under the agent id `agent`.
async fn invoice_suite(agent: &str) {
    node_runtime::support::tls::install_crypto_provider();
    let formats: Formats = Arc::default();
    let model_addr = serve(
        axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(model))
            .with_state(formats.clone()),
    )
    .await;
    let api = Arc::new(TargetApi::default());
    let target_addr = serve(
        axum::Router::new()
            .route("/invoices", axum::routing::post(target))
            .route("/unavailable", axum::routing::post(unavailable))
            .with_state(api.clone()),
    )
    .await;
    let mut llm = LlmSettings::openai(
        format!("http://{model_addr}"),
        Secret::new("sk-invoices-test".to_string()),
        MODEL,
    );
    llm.prices = BTreeMap::from([(
        MODEL.to_string(),
        ModelPrice {
            input_per_1k: 0.5,
            output_per_1k: 1.5,
        },
    )]);
    let sandbox = Arc::new(
        Sandbox::new(SandboxConfig {
            engine: EngineSettings {
                max_concurrent_runs: 4,
                ..EngineSettings::default()
            },
            llm: Some(llm),
            allowed_hosts: BTreeMap::from([(agent.to_string(), vec![target_addr.clone()])]),
            ..SandboxConfig::default()
        })
        .unwrap(),
    );

    fifty_invoices_are_classified_posted_once_each_and_priced(agent, &sandbox, &api, &target_addr).await;
    // The Python and JavaScript classifiers (agent world 0.2.0) ask for
    // their answer with a strict JSON Schema of the eight fields; the Rust
    // one (0.1.0) cannot ask.
    for format in formats.lock().unwrap().iter() {
        if agent == "invoice-classifier" {
            assert!(format.is_null(), "{format}");
        } else {
            assert_eq!(format["type"], "json_schema", "{agent}: {format}");
            assert_eq!(format["json_schema"]["strict"], true);
            assert_eq!(
                format["json_schema"]["schema"]["required"].as_array().map(Vec::len),
                Some(8)
            );
            assert_eq!(
                format["json_schema"]["schema"]["properties"]["vendorCategory"]["enum"][0],
                "Office Supplies"
            );
        }
    }
    a_garbled_model_answer_is_final_and_a_failing_target_api_is_worth_a_retry(agent, &sandbox, &api, &target_addr)
        .await;
    a_refusing_provider_is_worth_a_retry_and_a_spent_token_budget_is_final(agent, &sandbox).await;
    // The Rust classifier retries a denial like any transport error.
    if agent != "invoice-classifier" {
        a_target_api_the_node_denies_is_final_after_one_attempt(agent, &sandbox).await;
    }
    half_the_fuel_or_memory_of_a_successful_run_fails_its_budget(agent, &sandbox).await;
}

async fn fifty_invoices_are_classified_posted_once_each_and_priced(
    agent: &str,
    sandbox: &Arc<Sandbox>,
    api: &TargetApi,
    target_addr: &str,
) {
    let plane = DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let agents = agents_layout();
    let node = NodeHandle::builder(
        NodeSettings {
            node_id: "invoice-node".into(),
            control_plane_url: plane.url(),
            slots: 4,
            max_leases: 4,
            heartbeat_interval: Duration::from_millis(500),
            capacity: Capacity {
                slots: 4,
                cpu: "2".into(),
                memory: "1Gi".into(),
            },
            metadata: BTreeMap::new(),
            drain_timeout: Duration::from_secs(5),
        },
        sandbox.clone(),
        Arc::new(AgentStore::new(vec![agents.path().to_path_buf()])),
        // The directory goes at once; the open outbox file lives on.
        node_runtime::outbox::Outbox::open(tempfile::tempdir().unwrap().path()).unwrap(),
    )
    .start()
    .unwrap();

    let mut expected = BTreeMap::new();
    for i in 0..50 {
        let (vendor, category, _) = VENDORS[i % VENDORS.len()];
        let invoice = serde_json::json!({"vendor": vendor, "number": format!("INV-{i}"), "amount": 100.0 + i as f64});
        let run = plane
            .submit(NewRun {
                agent_id: agent.into(),
                version: "1.0.0".into(),
                input_ref: BTreeMap::from([
                    ("message".to_string(), invoice.to_string()),
                    ("messageId".to_string(), format!("msg-{i}")),
                ]),
                metadata: BTreeMap::from([("target_url".to_string(), format!("http://{target_addr}/invoices"))]),
                budgets: Budgets::default(),
            })
            .await
            .unwrap();
        expected.insert(
            run.run_id,
            (format!("msg-{i}"), format!("INV-{i}"), category, 100.0 + i as f64),
        );
    }
    // Generous: the first run waits for the component to compile (an 18 MB
    // one takes tens of seconds in a debug build on a busy machine).
    eventually(Duration::from_secs(300), "50 invoices to end", || {
        plane
            .runs()
            .iter()
            .all(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
            .then_some(())
    })
    .await;

    let received = api.accepted.lock().unwrap().clone();
    assert_eq!(received.len(), 50, "one POST per invoice");
    for (run_id, (message_id, number, category, amount)) in &expected {
        let run = plane.run(run_id).unwrap();
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        let result = run.result.as_ref().unwrap();
        assert_eq!(result["vendorCategory"], *category);
        assert_eq!(result["invoiceNumber"], *number);
        assert_eq!(result["totalAmount"].parse::<f64>().unwrap(), *amount, "{result:?}");
        assert_eq!(result["confidence"], "0.93");
        assert_eq!(
            (result["tokensIn"].as_str(), result["tokensOut"].as_str()),
            ("100", "50")
        );
        let costs = run.costs.as_ref().unwrap();
        assert_eq!(
            (costs.tokens_in, costs.tokens_out),
            (PROMPT_TOKENS as i32, ANSWER_TOKENS as i32)
        );
        let priced = (f64::from(PROMPT_TOKENS) * 0.5 + f64::from(ANSWER_TOKENS) * 1.5) / 1000.0;
        assert!((costs.usd_cost - priced).abs() < 1e-9, "{costs:?} vs {priced}");

        let post = received
            .iter()
            .find(|post| post.idempotency_key == format!("{run_id}-{message_id}"))
            .unwrap_or_else(|| panic!("no POST with the idempotency key of {run_id}"));
        assert_eq!(&post.correlation_id, run_id);
        assert!(
            post.traceparent.starts_with("00-") && post.traceparent.len() == 55,
            "{}",
            post.traceparent
        );
        assert_eq!(post.body["vendorCategory"], *category);
        assert_eq!(post.body["invoiceNumber"], *number);
        assert_eq!(post.body["totalAmount"].as_f64(), Some(*amount));
        assert_eq!(post.body["routingDestination"], result["routingDestination"].as_str());
    }
    node.shutdown().await;
    plane.shutdown().await;
}

fn invoice_request(agent: &str, vendor: &str, target_url: Option<&str>) -> RunRequest {
    let mut request: RunRequest = request(
        agent,
        &[(
            "message",
            &serde_json::json!({"vendor": vendor, "number": "INV-9", "amount": 1.0}).to_string(),
        )],
        BudgetRequest::default(),
    );
    if let Some(url) = target_url {
        request.context.metadata = map(&[("target_url", url)]);
    }
    request
}

async fn a_garbled_model_answer_is_final_and_a_failing_target_api_is_worth_a_retry(
    agent: &str,
    sandbox: &Sandbox,
    api: &TargetApi,
    target_addr: &str,
) {
    use std::sync::atomic::Ordering;

    let loaded = load(sandbox, agent).await;
    let unavailable_url = format!("http://{target_addr}/unavailable");

    let garbled = sandbox
        .run(
            &loaded,
            invoice_request(agent, "Garbled Answers Co", Some(&unavailable_url)),
        )
        .await;
    let RunOutcome::Failed(failure) = &garbled.outcome else {
        panic!("{agent}: {:?}", garbled.outcome)
    };
    assert!(!failure.retryable, "{agent}: {failure:?}");
    assert!(
        failure.message.contains("not the classification asked for"),
        "{agent}: {}",
        failure.message
    );
    assert_eq!(api.unavailable.load(Ordering::SeqCst), 0, "{agent}: nothing was posted");

    let unavailable = sandbox
        .run(&loaded, invoice_request(agent, "City Water", Some(&unavailable_url)))
        .await;
    let RunOutcome::Failed(failure) = &unavailable.outcome else {
        panic!("{agent}: {:?}", unavailable.outcome)
    };
    assert!(failure.retryable, "{agent}: {failure:?}");
    assert!(failure.message.contains("503"), "{agent}: {}", failure.message);
    assert_eq!(
        api.unavailable.load(Ordering::SeqCst),
        3,
        "{agent}: the agent's own bounded retries"
    );
}

/// The LLM's errors reach the outcome with the `retryable` their case
/// calls for (in Python and JavaScript through the kit SDK's `LlmError`):
/// a provider that refused the call may take it later; a spent token
/// budget will not grow.
async fn a_refusing_provider_is_worth_a_retry_and_a_spent_token_budget_is_final(agent: &str, sandbox: &Sandbox) {
    let loaded = load(sandbox, agent).await;
    let refused = sandbox
        .run(&loaded, invoice_request(agent, "Refused Requests Co", None))
        .await;
    let RunOutcome::Failed(failure) = &refused.outcome else {
        panic!("{agent}: {:?}", refused.outcome)
    };
    assert_eq!(failure.kind, FailKind::AgentError, "{agent}: {failure:?}");
    assert!(failure.retryable, "{agent}: {failure:?}");
    assert!(
        failure.message.contains("the LLM failed") && failure.message.contains("400"),
        "{agent}: {}",
        failure.message
    );

    let mut starved = invoice_request(agent, "City Water", None);
    starved.budget.tokens = Some(10);
    let spent = sandbox.run(&loaded, starved).await;
    let RunOutcome::Failed(failure) = &spent.outcome else {
        panic!("{agent}: {:?}", spent.outcome)
    };
    assert_eq!(failure.kind, FailKind::AgentError, "{agent}: {failure:?}");
    assert!(!failure.retryable, "{agent}: {failure:?}");
    assert!(
        failure.message.contains("the LLM refused") && failure.message.to_lowercase().contains("budget"),
        "{agent}: {}",
        failure.message
    );
    assert_eq!(
        spent.report.tokens_in, 0,
        "{agent}: no call was made: {:?}",
        spent.report
    );
}

/// The kit SDKs raise the node's denial as `Denied`, a final `AgentError`
/// naming the host and the fix; the classifier lets it end the run at once
/// instead of retrying a request that would be denied again.
async fn a_target_api_the_node_denies_is_final_after_one_attempt(agent: &str, sandbox: &Sandbox) {
    let loaded = load(sandbox, agent).await;
    let denied = sandbox
        .run(
            &loaded,
            invoice_request(agent, "City Water", Some("http://denied.invalid/invoices")),
        )
        .await;
    let RunOutcome::Failed(failure) = &denied.outcome else {
        panic!("{agent}: {:?}", denied.outcome)
    };
    assert_eq!(failure.kind, FailKind::AgentError, "{agent}: {failure:?}");
    assert!(!failure.retryable, "{agent}: {failure:?}");
    assert!(
        failure.message.contains("denied") && failure.message.contains("--allow-http denied.invalid"),
        "{agent}: {}",
        failure.message
    );
    assert_eq!(
        (denied.report.http_requests, denied.report.http_denied),
        (1, 1),
        "{agent}: one attempt, denied: {:?}",
        denied.report
    );

    // A URL with user information: the advice names what an allow-list
    // takes (host and port), and the message shows no credentials.
    let with_user = sandbox
        .run(
            &loaded,
            invoice_request(
                agent,
                "City Water",
                Some("http://deploy:s3cret@denied.invalid:8080/invoices"),
            ),
        )
        .await;
    let RunOutcome::Failed(failure) = &with_user.outcome else {
        panic!("{agent}: {:?}", with_user.outcome)
    };
    assert!(
        failure.message.contains("--allow-http denied.invalid:8080;")
            && failure
                .message
                .contains("request to denied.invalid:8080 (http://***@denied.invalid:8080/invoices)"),
        "{agent}: {}",
        failure.message
    );
    assert!(!failure.message.contains("s3cr"), "{agent}: {}", failure.message);
}

async fn half_the_fuel_or_memory_of_a_successful_run_fails_its_budget(agent: &str, sandbox: &Sandbox) {
    let loaded = load(sandbox, agent).await;
    let reference = sandbox.run(&loaded, invoice_request(agent, "City Water", None)).await;
    assert!(
        matches!(reference.outcome, RunOutcome::Completed(_)),
        "{agent}: {:?}",
        reference.outcome
    );
    let (fuel, memory) = (reference.report.fuel_consumed, reference.report.peak_memory_bytes);
    assert!(fuel > 0 && memory > 0, "{agent}: {:?}", reference.report);

    let mut starved = invoice_request(agent, "City Water", None);
    starved.budget.fuel = Some(fuel / 2);
    let result = sandbox.run(&loaded, starved).await;
    let RunOutcome::Failed(failure) = &result.outcome else {
        panic!("{agent}: {:?}", result.outcome)
    };
    assert_eq!(failure.kind, FailKind::BudgetFuel, "{agent}: {failure:?}");
    assert!(!failure.retryable, "{agent}: {failure:?}");

    let mut cramped = invoice_request(agent, "City Water", None);
    cramped.budget.memory_bytes = Some(memory / 2);
    let result = sandbox.run(&loaded, cramped).await;
    let RunOutcome::Failed(failure) = &result.outcome else {
        panic!("{agent}: {:?}", result.outcome)
    };
    assert_eq!(failure.kind, FailKind::BudgetMemory, "{agent}: {failure:?}");
    assert!(!failure.retryable, "{agent}: {failure:?}");
    assert!(
        result.report.peak_memory_bytes <= memory / 2,
        "{agent}: {:?}",
        result.report
    );
}
