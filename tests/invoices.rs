//! The invoice-classifier agent end to end: a dev plane and a node on
//! loopback, a stub OpenAI-compatible model, and a target API that records
//! what it receives. Fifty invoices go through; the target sees each once,
//! with the right body, idempotency key and correlation id, and the plane's
//! CostInfo is the stub's usage priced by the node's table.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use node_runtime::agent_store::AgentStore;
use node_runtime::config::Secret;
use node_runtime::control_plane::Capacity;
use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, RunStatus};
use node_runtime::sandbox::{EngineSettings, LlmSettings, ModelPrice, Sandbox, SandboxConfig};
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

/// A model that classifies by vendor name, deterministically.
async fn model(Json(body): Json<serde_json::Value>) -> Json<serde_json::Value> {
    let invoice: serde_json::Value = body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    let vendor = invoice["vendor"].as_str().unwrap_or("?");
    if vendor == "Garbled Answers Co" {
        return Json(serde_json::json!({
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "I think it is stationery?"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5, "total_tokens": PROMPT_TOKENS + 5},
        }));
    }
    let (_, category, route) = VENDORS.iter().find(|(name, ..)| *name == vendor).copied().unwrap_or((vendor, "Other", "General Accounts Payable"));
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
    Json(serde_json::json!({
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.to_string()}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": ANSWER_TOKENS, "total_tokens": PROMPT_TOKENS + ANSWER_TOKENS},
    }))
}

/// One POST the target API received.
#[derive(Debug, Clone)]
struct Received {
    idempotency_key: String,
    correlation_id: String,
    traceparent: String,
    body: serde_json::Value,
}

type Inbox = Arc<Mutex<Vec<Received>>>;

async fn target(State(inbox): State<Inbox>, headers: HeaderMap, Json(body): Json<serde_json::Value>) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    inbox.lock().unwrap().push(Received {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_invoices_are_classified_posted_once_each_and_priced() {
    node_runtime::control_plane::install_crypto_provider();
    let model_addr = serve(axum::Router::new().route("/v1/chat/completions", axum::routing::post(model))).await;
    let inbox: Inbox = Arc::default();
    let target_addr = serve(
        axum::Router::new()
            .route("/invoices", axum::routing::post(target))
            .with_state(inbox.clone()),
    )
    .await;

    let plane = DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let mut llm = LlmSettings::openai(format!("http://{model_addr}"), Secret::new("sk-invoices-test".to_string()), MODEL);
    llm.prices = BTreeMap::from([(MODEL.to_string(), ModelPrice { input_per_1k: 0.5, output_per_1k: 1.5 })]);
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings { max_concurrent_runs: 4, ..EngineSettings::default() },
        llm: Some(llm),
        allowed_hosts: BTreeMap::from([("invoice-classifier".to_string(), vec![target_addr.clone()])]),
        ..SandboxConfig::default()
    })
    .unwrap();
    let agents = agents_layout();
    let node = NodeHandle::start(
        NodeSettings {
            node_id: "invoice-node".into(),
            control_plane_url: plane.url(),
            slots: 4,
            max_leases: 4,
            heartbeat_interval: Duration::from_millis(500),
            capacity: Capacity { slots: 4, cpu: "2".into(), memory: "1Gi".into() },
            metadata: BTreeMap::new(),
            drain_timeout: Duration::from_secs(5),
        },
        Arc::new(sandbox),
        Arc::new(AgentStore::new(vec![agents.path().to_path_buf()])),
        // The directory goes at once; the open outbox file lives on.
        node_runtime::outbox::Outbox::open(tempfile::tempdir().unwrap().path()).unwrap(),
    )
    .unwrap();

    let mut expected = BTreeMap::new();
    for i in 0..50 {
        let (vendor, category, _) = VENDORS[i % VENDORS.len()];
        let invoice = serde_json::json!({"vendor": vendor, "number": format!("INV-{i}"), "amount": 100.0 + i as f64});
        let run = plane
            .submit(NewRun {
                agent_id: "invoice-classifier".into(),
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
        expected.insert(run.run_id, (format!("msg-{i}"), format!("INV-{i}"), category));
    }
    eventually(Duration::from_secs(120), "50 invoices to end", || {
        plane.runs().iter().all(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed)).then_some(())
    })
    .await;

    let received = inbox.lock().unwrap().clone();
    assert_eq!(received.len(), 50, "one POST per invoice");
    for (run_id, (message_id, number, category)) in &expected {
        let run = plane.run(run_id).unwrap();
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        let result = run.result.as_ref().unwrap();
        assert_eq!(result["vendorCategory"], *category);
        assert_eq!(result["invoiceNumber"], *number);
        let costs = run.costs.as_ref().unwrap();
        assert_eq!((costs.tokens_in, costs.tokens_out), (PROMPT_TOKENS as i32, ANSWER_TOKENS as i32));
        let priced = (f64::from(PROMPT_TOKENS) * 0.5 + f64::from(ANSWER_TOKENS) * 1.5) / 1000.0;
        assert!((costs.usd_cost - priced).abs() < 1e-9, "{costs:?} vs {priced}");

        let post = received
            .iter()
            .find(|post| post.idempotency_key == format!("{run_id}-{message_id}"))
            .unwrap_or_else(|| panic!("no POST with the idempotency key of {run_id}"));
        assert_eq!(&post.correlation_id, run_id);
        assert!(post.traceparent.starts_with("00-") && post.traceparent.len() == 55, "{}", post.traceparent);
        assert_eq!(post.body["vendorCategory"], *category);
        assert_eq!(post.body["invoiceNumber"], *number);
    }
    node.shutdown().await;
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_model_answer_is_final_and_a_failing_target_api_is_worth_a_retry() {
    use node_runtime::sandbox::{BudgetRequest, RunOutcome, RunRequest};

    node_runtime::control_plane::install_crypto_provider();
    let model_addr = serve(axum::Router::new().route("/v1/chat/completions", axum::routing::post(model))).await;
    let failures = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = failures.clone();
    let target_addr = serve(axum::Router::new().route(
        "/invoices",
        // Reads the whole body before answering, as a real API does, so
        // the agent's write never races the answer.
        axum::routing::post(move |_body: axum::body::Bytes| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { StatusCode::SERVICE_UNAVAILABLE }
        }),
    ))
    .await;
    let sandbox = Sandbox::new(SandboxConfig {
        llm: Some(LlmSettings::openai(format!("http://{model_addr}"), Secret::new("sk-x".to_string()), MODEL)),
        allowed_hosts: BTreeMap::from([("invoice-classifier".to_string(), vec![target_addr.clone()])]),
        ..SandboxConfig::default()
    })
    .unwrap();
    let agent = load(&sandbox, "invoice-classifier").await;
    let run = |vendor: &str| {
        let mut request: RunRequest = request(
            "invoice-classifier",
            &[("message", &serde_json::json!({"vendor": vendor, "number": "INV-9", "amount": 1.0}).to_string())],
            BudgetRequest::default(),
        );
        request.context.metadata = map(&[("target_url", &format!("http://{target_addr}/invoices"))]);
        request
    };

    let garbled = sandbox.run(&agent, run("Garbled Answers Co")).await;
    let RunOutcome::Failed(failure) = &garbled.outcome else { panic!("{:?}", garbled.outcome) };
    assert!(!failure.retryable, "{failure:?}");
    assert!(failure.message.contains("not the classification asked for"), "{}", failure.message);
    assert_eq!(failures.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing was posted");

    let unavailable = sandbox.run(&agent, run("City Water")).await;
    let RunOutcome::Failed(failure) = &unavailable.outcome else { panic!("{:?}", unavailable.outcome) };
    assert!(failure.retryable, "{failure:?}");
    assert!(failure.message.contains("503"), "{}", failure.message);
    assert_eq!(failures.load(std::sync::atomic::Ordering::SeqCst), 3, "the agent's own bounded retries");
}
