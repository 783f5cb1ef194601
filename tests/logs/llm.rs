//! `llm.chat` against a stub OpenAI-compatible server on loopback: the
//! node's metering (tokens, cost, the budget), its retries, its deadline,
//! and that the API key reaches the provider and nothing else.

use crate::capture_logs;
use crate::support;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use node_runtime::sandbox::{
    BudgetRequest, EngineSettings, FailKind, LlmSettings, ModelPrice, NodeLimits, RunOutcome, RunResult, Sandbox,
    SandboxConfig,
};
use node_runtime::support::Secret;
use support::*;

const KEY: &str = "sk-test-4f1c9e2a7b3d-never-shown";
const PROMPT_TOKENS: u64 = 12;
/// The stub answers with at most this many completion tokens.
const ANSWER_TOKENS: u64 = 20;

/// One request the stub received.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    body: serde_json::Value,
}

/// A deterministic OpenAI-compatible chat-completions server.
#[derive(Default)]
struct Stub {
    requests: Mutex<Vec<Seen>>,
    /// Statuses to answer with before answering normally; `always` repeats
    /// the last one forever.
    script: Mutex<VecDeque<u16>>,
    always: Mutex<Option<u16>>,
    /// Report a full answer's usage whatever `max_tokens` said.
    ignore_max_tokens: std::sync::atomic::AtomicBool,
    /// Prompt tokens to report instead of [`PROMPT_TOKENS`] (0: that).
    prompt_tokens: std::sync::atomic::AtomicU64,
}

impl Stub {
    fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }
}

async fn completions(
    State(stub): State<Arc<Stub>>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> axum::response::Response {
    let number = {
        let mut requests = stub.requests.lock().unwrap();
        requests.push(Seen {
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: body.clone(),
        });
        requests.len()
    };
    let scripted = stub.script.lock().unwrap().pop_front();
    if let Some(status) = scripted.or(*stub.always.lock().unwrap()) {
        let status = StatusCode::from_u16(status).unwrap();
        return (status, format!("stub says {status}")).into_response();
    }
    let mut max_tokens = body["max_tokens"].as_u64().unwrap_or(u64::MAX);
    if stub.ignore_max_tokens.load(std::sync::atomic::Ordering::Relaxed) {
        max_tokens = u64::MAX;
    }
    let completion = ANSWER_TOKENS.min(max_tokens);
    let finish = if completion < ANSWER_TOKENS { "length" } else { "stop" };
    let prompt_tokens = match stub.prompt_tokens.load(std::sync::atomic::Ordering::Relaxed) {
        0 => PROMPT_TOKENS,
        reported => reported,
    };
    Json(serde_json::json!({
        "id": format!("chatcmpl-{number}"),
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": format!("answer {number}")},
            "finish_reason": finish,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        },
    }))
    .into_response()
}

async fn start_stub(stub: Arc<Stub>) -> SocketAddr {
    capture_logs();
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

fn settings(addr: SocketAddr) -> LlmSettings {
    let mut settings = LlmSettings::openai(format!("http://{addr}"), Secret::new(KEY), "stub-default");
    settings.prices = BTreeMap::from([(
        "stub-default".to_string(),
        ModelPrice {
            input_per_1k: 0.15,
            output_per_1k: 0.6,
        },
    )]);
    settings
}

fn llm_sandbox(settings: LlmSettings) -> Sandbox {
    Sandbox::new(SandboxConfig {
        limits: NodeLimits::default(),
        engine: EngineSettings {
            max_concurrent_runs: 2,
            ..EngineSettings::default()
        },
        llm: Some(settings),
        ..SandboxConfig::default()
    })
    .expect("the sandbox starts")
}

async fn run_chat(sandbox: &Sandbox, input: &[(&str, &str)], budget: BudgetRequest) -> RunResult {
    let agent = load(sandbox, "llm-chat").await;
    sandbox.run(&agent, request("llm-chat", input, budget)).await
}

fn completed(result: &RunResult) -> &BTreeMap<String, String> {
    match &result.outcome {
        RunOutcome::Completed(result) => result,
        RunOutcome::Failed(failure) => panic!("expected completion, the run failed: {failure:?}"),
    }
}

fn tokens(budget: u32) -> BudgetRequest {
    BudgetRequest {
        tokens: Some(budget),
        ..BudgetRequest::default()
    }
}

#[tokio::test]
async fn a_call_is_metered_and_priced_from_the_providers_usage() {
    let stub = Arc::new(Stub::default());
    let sandbox = llm_sandbox(settings(start_stub(stub.clone()).await));
    let result = run_chat(&sandbox, &[("message", "Classify INV-1")], tokens(1000)).await;

    let seen = completed(&result);
    assert_eq!(seen["answer.0"], "answer 1");
    assert_eq!(seen["model.0"], "stub-default");
    assert_eq!(seen["finish_reason.0"], "stop");
    assert_eq!(seen["tokens_in.0"], PROMPT_TOKENS.to_string());
    assert_eq!(seen["tokens_out.0"], ANSWER_TOKENS.to_string());
    assert!(!seen.contains_key("error"), "{seen:?}");
    assert_eq!(result.report.tokens_in as u64, PROMPT_TOKENS);
    assert_eq!(result.report.tokens_out as u64, ANSWER_TOKENS);
    let expected = (PROMPT_TOKENS as f64 * 0.15 + ANSWER_TOKENS as f64 * 0.6) / 1000.0;
    assert!(
        (result.report.usd_cost - expected).abs() < 1e-12,
        "{} != {expected}",
        result.report.usd_cost
    );

    let requests = stub.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.authorization.as_deref(), Some(&*format!("Bearer {KEY}")));
    assert_eq!(request.body["model"], "stub-default");
    // The prompt is estimated at 14 tokens: 4 for the request, 4 for the
    // message, 6 for its text ("Classify" 9 quarters, " INV" 7, "-" and
    // "1" a token each).
    assert_eq!(
        request.body["max_tokens"],
        1000 - 14,
        "no max_tokens: the budget's remainder after the estimated prompt"
    );
    assert_eq!(request.body["messages"][0]["role"], "user");
    assert_eq!(request.body["messages"][0]["content"], "Classify INV-1");
}

#[tokio::test]
async fn the_model_comes_from_the_request_then_the_metadata_then_the_default() {
    let stub = Arc::new(Stub::default());
    let sandbox = llm_sandbox(settings(start_stub(stub.clone()).await));
    let agent = load(&sandbox, "llm-chat").await;
    let mut from_metadata = request("llm-chat", &[], BudgetRequest::default());
    from_metadata.context.metadata = map(&[("llm.model", "meta-model")]);
    completed(&sandbox.run(&agent, from_metadata.clone()).await);
    from_metadata.context.input_ref = map(&[("model", "asked-model"), ("max_tokens", "7")]);
    let result = sandbox.run(&agent, from_metadata).await;
    assert_eq!(completed(&result)["tokens_out.0"], "7");
    assert_eq!(result.report.usd_cost, 0.0, "an unpriced model costs nothing");

    let requests = stub.requests();
    assert_eq!(requests[0].body["model"], "meta-model");
    assert_eq!(requests[1].body["model"], "asked-model");
    assert_eq!(requests[1].body["max_tokens"], 7);
}

#[tokio::test]
async fn a_spent_budget_refuses_the_next_call_without_reaching_the_provider() {
    let stub = Arc::new(Stub::default());
    let sandbox = llm_sandbox(settings(start_stub(stub.clone()).await));
    // "hi" is estimated at 9 prompt tokens; the stub reports 12. With 44:
    // the first call may write 44 - 9 = 35 (writes 20; 32 used), the second
    // 12 - 9 = 3 (writes 3, and the 3 prompt tokens the estimate missed
    // take the run 3 over, within the tolerance), the third is refused.
    let result = run_chat(
        &sandbox,
        &[("message", "hi"), ("calls", "5"), ("max_tokens", "100")],
        tokens(44),
    )
    .await;
    let seen = completed(&result);
    assert_eq!(seen["calls_completed"], "2", "{seen:?}");
    assert_eq!(seen["tokens_out.1"], "3");
    assert_eq!(seen["finish_reason.1"], "length");
    assert!(seen["error"].starts_with("budget-exhausted: "), "{seen:?}");
    assert_eq!(seen["error_call"], "2");

    let requests = stub.requests();
    assert_eq!(requests.len(), 2, "the refused call never reached the provider");
    assert_eq!(requests[0].body["max_tokens"], 35);
    assert_eq!(requests[1].body["max_tokens"], 3);
    assert_eq!(
        result.report.tokens_in + result.report.tokens_out,
        44 + 3,
        "the overrun is what the estimate missed of the crossing call's prompt, no more"
    );
}

#[tokio::test]
async fn a_prompt_larger_than_the_remaining_budget_is_refused_unsent() {
    let stub = Arc::new(Stub::default());
    let sandbox = llm_sandbox(settings(start_stub(stub.clone()).await));
    // 40,000 bytes are estimated at 10,008 tokens: an unbounded prompt in
    // the old scheme, where only the completion was capped.
    let prompt = "x".repeat(40_000);
    let result = run_chat(&sandbox, &[("message", &prompt), ("calls", "3")], tokens(4000)).await;
    let seen = completed(&result);
    assert_eq!(seen["calls_completed"], "0", "{seen:?}");
    let error = &seen["error"];
    assert!(error.starts_with("budget-exhausted: "), "{error}");
    assert!(
        error.contains("10008 tokens") && error.contains("4000") && error.contains("shorter prompt"),
        "{error}"
    );
    assert_eq!(stub.requests().len(), 0, "nothing reached the provider");
    assert_eq!(result.report.tokens_in + result.report.tokens_out, 0);
}

#[tokio::test]
async fn a_prompt_of_digits_and_punctuation_is_estimated_a_token_a_character_and_refused_unsent() {
    let stub = Arc::new(Stub::default());
    let sandbox = llm_sandbox(settings(start_stub(stub.clone()).await));
    // 3,000 characters of digits and punctuation cost about a token each
    // in the common tokenizers; at a quarter token a byte they were
    // estimated at 758, under a budget of 1,000, sent, and billed ~3,000.
    let prompt: String = (0..3000u32)
        .map(|i| char::from(b"0123456789!#$%&()*+,-./:;<=>?@[]^_{|}~"[(i * 7 % 37) as usize]))
        .collect();
    let result = run_chat(&sandbox, &[("message", &prompt), ("calls", "3")], tokens(1000)).await;
    let seen = completed(&result);
    assert_eq!(seen["calls_completed"], "0", "{seen:?}");
    let error = &seen["error"];
    assert!(
        error.starts_with("budget-exhausted: ") && error.contains("3008 tokens"),
        "{error}"
    );
    assert_eq!(stub.requests().len(), 0, "nothing reached the provider");
    assert_eq!(result.report.tokens_in + result.report.tokens_out, 0);
}

#[tokio::test]
async fn a_prompt_the_estimate_misses_by_more_than_the_tolerance_fails_budget_tokens() {
    let stub = Arc::new(Stub::default());
    // The provider counts 200 prompt tokens where the node estimates 9.
    stub.prompt_tokens.store(200, std::sync::atomic::Ordering::Relaxed);
    let sandbox = llm_sandbox(settings(start_stub(stub.clone()).await));
    let result = run_chat(&sandbox, &[("message", "hi"), ("calls", "5")], tokens(100)).await;
    let RunOutcome::Failed(failure) = &result.outcome else {
        panic!("expected budget.tokens: {:?}", result.outcome);
    };
    assert_eq!(failure.kind, FailKind::BudgetTokens);
    assert!(
        failure.message.contains("220 LLM tokens")
            && failure.message.contains("budget of 100 by 120")
            && failure.message.contains("32 tokens tolerated"),
        "{}",
        failure.message
    );
    assert_eq!(
        stub.requests().len(),
        1,
        "the second call is refused: the budget is spent"
    );
}

#[tokio::test]
async fn a_provider_writing_past_max_tokens_fails_the_run_budget_tokens() {
    let stub = Arc::new(Stub::default());
    stub.ignore_max_tokens.store(true, std::sync::atomic::Ordering::Relaxed);
    let sandbox = llm_sandbox(settings(start_stub(stub.clone()).await));
    // "Hello" is estimated at 10 tokens, so the call may write 15 of the
    // 25; the stub writes 20: 32 of 25, 7 over, 5 of them past the cap.
    let result = run_chat(&sandbox, &[("calls", "5")], tokens(25)).await;
    let RunOutcome::Failed(failure) = &result.outcome else {
        panic!("expected budget.tokens: {:?}", result.outcome);
    };
    assert_eq!(failure.kind, FailKind::BudgetTokens);
    assert!(
        failure.message.contains("32") && failure.message.contains("25") && failure.message.contains("5 tokens past"),
        "{}",
        failure.message
    );
    assert_eq!(stub.requests().len(), 1);
    assert_eq!(result.report.tokens_in + result.report.tokens_out, 32);
}

#[tokio::test]
async fn a_model_off_the_allow_list_is_refused_naming_it_and_the_setting() {
    let stub = Arc::new(Stub::default());
    let mut settings = settings(start_stub(stub.clone()).await);
    settings.allowed_models = ["stub-default".to_string()].into();
    let sandbox = llm_sandbox(settings);
    let refused = run_chat(&sandbox, &[("model", "gpt-unlisted")], tokens(1000)).await;
    let error = &completed(&refused)["error"];
    assert!(
        error.starts_with("invalid-request: ")
            && error.contains("\"gpt-unlisted\"")
            && error.contains("AgentRuntime.AllowedModels (stub-default)"),
        "{error}"
    );
    assert_eq!(stub.requests().len(), 0, "nothing reached the provider");
    let allowed = run_chat(&sandbox, &[], tokens(1000)).await;
    assert_eq!(completed(&allowed)["model.0"], "stub-default");
    assert_eq!(stub.requests().len(), 1);
}

#[tokio::test]
async fn a_configured_model_without_a_price_is_warned_about_at_start_up() {
    let captured = capture_logs();
    let stub = Arc::new(Stub::default());
    let mut settings = settings(start_stub(stub.clone()).await);
    settings.default_model = "unpriced-default-at-start-up".to_string();
    let _sandbox = llm_sandbox(settings);
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let warning = logs
        .lines()
        .find(|line| line.contains("unpriced-default-at-start-up"))
        .unwrap_or_else(|| panic!("no warning for the unpriced default model: {logs}"));
    assert!(
        warning.contains("WARN") && warning.contains("no price") && warning.contains("AgentRuntime.Prices"),
        "{warning}"
    );
    assert_eq!(stub.requests().len(), 0, "warned before any call");
}

#[tokio::test]
async fn rate_limits_are_retried_with_backoff() {
    let stub = Arc::new(Stub::default());
    stub.script.lock().unwrap().extend([429, 429]);
    let sandbox = llm_sandbox(settings(start_stub(stub.clone()).await));
    let result = run_chat(&sandbox, &[("message", "hi")], BudgetRequest::default()).await;
    let seen = completed(&result);
    assert_eq!(seen["answer.0"], "answer 3", "{seen:?}");
    assert_eq!(stub.requests().len(), 3);
}

#[tokio::test]
async fn a_provider_failing_until_the_deadline_never_outlasts_the_run() {
    let stub = Arc::new(Stub::default());
    *stub.always.lock().unwrap() = Some(500);
    let sandbox = llm_sandbox(settings(start_stub(stub.clone()).await));
    let started = Instant::now();
    let result = run_chat(
        &sandbox,
        &[("message", "hi")],
        BudgetRequest {
            duration: Some(Duration::from_millis(1500)),
            ..BudgetRequest::default()
        },
    )
    .await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    match &result.outcome {
        RunOutcome::Completed(seen) => {
            let error = &seen["error"];
            assert!(
                error.starts_with("provider: ") || error.starts_with("timeout: "),
                "{seen:?}"
            );
            assert!(error.contains("500"), "{error}");
        }
        RunOutcome::Failed(failure) => assert_eq!(failure.kind, FailKind::BudgetDeadline),
    }
    assert!(stub.requests().len() >= 2, "5xx is retried");
    assert_eq!(result.report.tokens_in + result.report.tokens_out, 0);
}

#[tokio::test]
async fn the_key_reaches_the_provider_and_nothing_else() {
    let captured = capture_logs();
    let stub = Arc::new(Stub::default());
    // A retry, an unpriced model and a provider error all get logged.
    stub.script.lock().unwrap().extend([503]);
    let addr = start_stub(stub.clone()).await;
    let settings = settings(addr);
    assert!(!format!("{settings:?}").contains(KEY));
    let sandbox = llm_sandbox(settings);
    let ok = run_chat(
        &sandbox,
        &[("model", "unpriced"), ("calls", "2")],
        BudgetRequest::default(),
    )
    .await;
    *stub.always.lock().unwrap() = Some(401);
    let refused = run_chat(&sandbox, &[], BudgetRequest::default()).await;
    assert!(completed(&refused)["error"].contains("401"), "{:?}", refused.outcome);

    for result in [&ok, &refused] {
        let everything = format!("{:?} {}", result, serde_json::to_string(&result.report).unwrap());
        assert!(!everything.contains(KEY), "the key leaked into the run: {everything}");
    }
    assert!(stub.requests().len() >= 4);
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logs.contains("retrying"), "the capture works: {logs}");
    assert!(!logs.contains(KEY), "the key leaked into the log");
}

#[tokio::test]
async fn a_node_without_llm_answers_not_configured() {
    // The capabilities probe's test covers the message; here the agent
    // sees the variant.
    let sandbox = support::sandbox();
    let result = run_chat(&sandbox, &[], BudgetRequest::default()).await;
    assert!(completed(&result)["error"].starts_with("not-configured: "));
}
