//! Tool calling and structured output (the agent world 0.2.0), against
//! the stub model's scripted conversations: the `tool-loop` sample asks
//! the model, serves its tool call through `wasi:http`, hands the result
//! back and gets the answer, in the OpenAI and the Azure shape; a tool
//! call to a host the agent may not reach is refused and the model is told
//! so; a model that never stops calling tools is stopped by the token
//! budget; and a 0.1.0 component runs beside a 0.2.0 one in one sandbox.

use crate::support::*;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use node_runtime::dev_plane::stubs::{STUB_TOOLS_FOREVER_MODEL, STUB_TOOLS_MODEL, StubModel};
use node_runtime::sandbox::{
    BudgetRequest, EngineSettings, FailKind, LlmEndpoint, LlmSettings, RunOutcome, Sandbox, SandboxConfig,
};
use node_runtime::support::Secret;

/// The vendor registry the tool posts to: answers each lookup with a
/// category, and keeps what it was asked.
async fn registry() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let asked: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let recorder = asked.clone();
    let app = axum::Router::new().route(
        "/vendors",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let recorder = recorder.clone();
            async move {
                recorder.lock().unwrap().push(body);
                axum::Json(serde_json::json!({"category": "Office Supplies", "department": "Procurement"}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, asked)
}

fn sandbox(model: &StubModel, endpoint: LlmEndpoint, default_model: &str, allowed: &[&str]) -> Sandbox {
    let mut llm = LlmSettings::openai(model.url(), Secret::new("sk-tools"), default_model);
    llm.endpoint = endpoint;
    Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: 2,
            ..EngineSettings::default()
        },
        llm: Some(llm),
        allowed_hosts: BTreeMap::from([(
            "tool-loop".to_string(),
            allowed.iter().map(|host| host.to_string()).collect(),
        )]),
        ..SandboxConfig::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tool_loop_completes_in_each_provider_shape_and_a_denied_tool_call_is_told_to_the_model() {
    node_runtime::support::tls::install_crypto_provider();
    let model = StubModel::start().await.unwrap();
    let (registry, asked) = registry().await;
    let tool_url = format!("http://{registry}/vendors");
    let shapes = [
        LlmEndpoint::OpenAi { base_url: model.url() },
        LlmEndpoint::Azure {
            base_url: model.url(),
            deployment: STUB_TOOLS_MODEL.into(),
        },
    ];
    for endpoint in shapes {
        let azure = matches!(endpoint, LlmEndpoint::Azure { .. });
        let sandbox = sandbox(&model, endpoint, STUB_TOOLS_MODEL, &[&registry]);
        let before = model.request_count();
        let result = ask_about_paper_co(&sandbox, &tool_url).await;
        let RunOutcome::Completed(out) = &result.outcome else {
            panic!("azure {azure}: {:?}", result.outcome)
        };
        assert_eq!(
            (out["turns"].as_str(), out["tool_calls"].as_str()),
            ("2", "1"),
            "{out:?}"
        );
        assert_eq!(out["tool_errors"], "0");
        let answer: serde_json::Value = serde_json::from_str(&out["answer"]).unwrap();
        assert_eq!(answer["toolResults"][0]["category"], "Office Supplies", "{answer}");
        assert_eq!(model.request_count() - before, 2);
        // What the provider saw: the tool's schema, then the call handed
        // back before its result.
        let requests = model.requests();
        let first = requests[requests.len() - 2].json().unwrap();
        let second = requests[requests.len() - 1].json().unwrap();
        assert_eq!(first["tools"][0]["function"]["name"], "lookup_vendor");
        assert_eq!(first["tools"][0]["function"]["parameters"]["required"][0], "vendor");
        let messages = second["messages"].as_array().unwrap();
        let assistant = &messages[messages.len() - 2];
        assert_eq!(assistant["tool_calls"][0]["id"], "call_1", "{second}");
        assert_eq!(messages[messages.len() - 1]["role"], "tool");
        assert_eq!(messages[messages.len() - 1]["tool_call_id"], "call_1");
        assert!(result.report.tokens_in > 0 && result.report.tokens_out > 0);
        assert_eq!(result.report.http_requests, 1);
    }
    assert_eq!(asked.lock().unwrap().len(), 2, "one lookup per shape");
    assert_eq!(asked.lock().unwrap()[0]["vendor"], "Paper Co");

    // No grant for the registry: the call is denied, the model told.
    let sandbox = sandbox(
        &model,
        LlmEndpoint::OpenAi { base_url: model.url() },
        STUB_TOOLS_MODEL,
        &[],
    );
    let result = ask_about_paper_co(&sandbox, &tool_url).await;
    let RunOutcome::Completed(out) = &result.outcome else {
        panic!("{:?}", result.outcome)
    };
    assert_eq!(out["tool_errors"], "1", "{out:?}");
    let answer: serde_json::Value = serde_json::from_str(&out["answer"]).unwrap();
    let told = answer["toolResults"][0]["error"].as_str().unwrap_or_default();
    assert!(told.contains("HttpRequestDenied"), "the model was not told: {answer}");
    assert_eq!(result.report.http_denied, 1);
    assert_eq!(asked.lock().unwrap().len(), 2, "the denied call reached the registry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_budget_stops_a_model_that_never_stops_calling_tools() {
    node_runtime::support::tls::install_crypto_provider();
    let model = StubModel::start().await.unwrap();
    let (registry, asked) = registry().await;
    let sandbox = sandbox(
        &model,
        LlmEndpoint::OpenAi { base_url: model.url() },
        STUB_TOOLS_FOREVER_MODEL,
        &[&registry],
    );
    let agent = load(&sandbox, "tool-loop").await;
    let result = sandbox
        .run(
            &agent,
            request(
                "tool-loop",
                &[
                    ("message", "Paper Co"),
                    ("tool_url", &format!("http://{registry}/vendors")),
                    ("max_turns", "1000"),
                ],
                BudgetRequest {
                    tokens: Some(2000),
                    ..BudgetRequest::default()
                },
            ),
        )
        .await;
    let failure = result.outcome.failure().expect("the budget stops the loop");
    assert!(
        failure.kind == FailKind::BudgetTokens
            || (failure.kind == FailKind::AgentError && failure.message.contains("token budget ran out")),
        "{failure:?}"
    );
    let used = result.report.tokens_in + result.report.tokens_out;
    assert!(used <= 2000 + 200, "the budget held: {used} tokens");
    let calls = asked.lock().unwrap().len();
    assert!(
        (2..1000).contains(&calls),
        "{calls} tool calls before the budget stopped it"
    );
}

/// A component built against the agent world 0.1.0 and one built against
/// 0.2.0 run side by side in one sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_of_both_world_versions_run_in_one_sandbox() {
    let model = StubModel::start().await.unwrap();
    let sandbox = sandbox(
        &model,
        LlmEndpoint::OpenAi { base_url: model.url() },
        node_runtime::dev_plane::stubs::STUB_ECHO_MODEL,
        &[],
    );
    let old = load(&sandbox, "llm-chat").await;
    let new = load(&sandbox, "tool-loop").await;
    let old_run = sandbox
        .run(
            &old,
            request("llm-chat", &[("message", "hello")], BudgetRequest::default()),
        )
        .await;
    assert!(
        matches!(old_run.outcome, RunOutcome::Completed(_)),
        "{:?}",
        old_run.outcome
    );
    let new_run = sandbox
        .run(
            &new,
            request(
                "tool-loop",
                &[("message", "hello"), ("tool_url", "http://127.0.0.1:9/")],
                BudgetRequest::default(),
            ),
        )
        .await;
    // The echo model calls no tool: the loop ends at its first answer.
    let RunOutcome::Completed(out) = &new_run.outcome else {
        panic!("{:?}", new_run.outcome)
    };
    assert_eq!(out["turns"], "1", "{out:?}");
}

/// Serves `app` as the model on loopback; returns its base URL.
async fn model_at(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// One run of the `tool-loop` sample against the model at `url` as
/// `model`, its tool pointed at nothing.
async fn tool_loop_against(url: &str, model: &str) -> node_runtime::sandbox::RunResult {
    let sandbox = Sandbox::new(SandboxConfig {
        llm: Some(LlmSettings::openai(url, Secret::new("k"), model)),
        ..SandboxConfig::default()
    })
    .unwrap();
    ask_about_paper_co(&sandbox, "http://127.0.0.1:9/").await
}

/// One run of the `tool-loop` sample in `sandbox`: a question about the
/// vendor Paper Co, its tool posting to `tool_url`.
async fn ask_about_paper_co(sandbox: &Sandbox, tool_url: &str) -> node_runtime::sandbox::RunResult {
    let agent = load(sandbox, "tool-loop").await;
    sandbox
        .run(
            &agent,
            request(
                "tool-loop",
                &[("message", "Paper Co"), ("tool_url", tool_url)],
                BudgetRequest::default(),
            ),
        )
        .await
}

/// A run cut off at its deadline while it waits for the model reports what
/// it spent before (the first call's tokens, the tool's request, the host
/// work of copying out the prompt it is waiting on) and the most the call
/// it waits on may cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_off_waiting_for_the_model_is_charged_what_it_spent_and_the_most_the_call_may_cost() {
    node_runtime::support::tls::install_crypto_provider();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let call = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if call > 0 {
                    // The second call is never answered.
                    std::future::pending::<()>().await;
                }
                axum::Json(serde_json::json!({
                    "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "lookup_vendor", "arguments": "{\"vendor\":\"Paper Co\"}"}}]},
                        "finish_reason": "tool_calls"}],
                    "usage": {"prompt_tokens": 123, "completion_tokens": 45},
                }))
            }
        }),
    );
    let url = model_at(app).await;
    let (registry, asked) = registry().await;
    let sandbox = Sandbox::new(SandboxConfig {
        llm: Some(LlmSettings::openai(&url, Secret::new("k"), "m")),
        allowed_hosts: BTreeMap::from([("tool-loop".to_string(), vec![registry.clone()])]),
        ..SandboxConfig::default()
    })
    .unwrap();
    let agent = load(&sandbox, "tool-loop").await;
    let ask = |deadline: Duration| {
        request(
            "tool-loop",
            &[
                ("message", "Paper Co"),
                ("tool_url", &format!("http://{registry}/vendors")),
            ],
            BudgetRequest {
                duration: Some(deadline),
                ..BudgetRequest::default()
            },
        )
    };
    let mut fuel = Vec::new();
    for seconds in [2, 3] {
        // The model call's own wait ends 50 ms after the deadline: should
        // the run's timer be seen later than that (a loaded machine), the
        // call returns first and the run is stopped in the call hook
        // instead. Three attempts at most.
        let mut cut_off = None;
        for _attempt in 0..3 {
            calls.store(0, std::sync::atomic::Ordering::SeqCst);
            let reported = sandbox.run_reported(&agent, ask(Duration::from_secs(seconds))).await;
            if reported.cut_off.is_some() {
                cut_off = Some(reported);
                break;
            }
        }
        let reported = cut_off.expect("cut off while waiting for the model in one of three attempts");
        let result = reported.result;
        let failure = result.outcome.failure().expect("the deadline cuts the run off");
        assert_eq!(failure.kind, FailKind::BudgetDeadline, "{failure:?}");
        assert!(failure.message.contains("waiting in a host call"), "{failure:?}");
        // The first call's usage, and the second's most: its estimated
        // prompt and the 300 tokens tool-loop allows each answer (it may
        // have been answered and billed).
        assert!(result.report.tokens_in > 123, "{:?}", result.report);
        assert_eq!(result.report.tokens_out, 45 + 300, "{:?}", result.report);
        assert_eq!(result.report.http_requests, 1, "{:?}", result.report);
        fuel.push(result.report.fuel_consumed);
        reported.cut_off.unwrap().unwind().await;
    }
    assert!(asked.lock().unwrap().len() >= 2, "one tool call each run");
    assert!(fuel[0] > 0, "{fuel:?}");
    assert_eq!(fuel[0], fuel[1], "the same work up to the same wait: {fuel:?}");
}

/// An answer the node cannot use (here 200 tool calls, more than it
/// reads) was still answered, and perhaps billed: its usage is metered
/// before the call fails, and the flood is never built in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_too_many_tool_calls_is_metered_before_it_fails() {
    node_runtime::support::tls::install_crypto_provider();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            let calls: Vec<serde_json::Value> = (0..200)
                .map(|n| {
                    serde_json::json!({"id": format!("call_{n}"), "type": "function",
                    "function": {"name": "lookup_vendor", "arguments": {"vendor": "x"}}})
                })
                .collect();
            axum::Json(serde_json::json!({
                "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls},
                             "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 123, "completion_tokens": 456},
            }))
        }),
    );
    let result = tool_loop_against(&model_at(app).await, "m").await;
    let failure = result.outcome.failure().expect("the answer cannot be used");
    assert!(failure.message.contains("200 tool calls"), "{failure:?}");
    assert_eq!(
        (result.report.tokens_in, result.report.tokens_out),
        (123, 456),
        "{:?}",
        result.report
    );
}

/// What a hostile or broken provider answers is never free: tool-call
/// arguments that are not text (skipped unbuilt), a `usage` without its
/// counts, and a 2xx body larger than the node reads are each charged
/// (the reported usage, else the estimated prompt and every token the
/// call was allowed) before the call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_provider_answers_are_charged_not_free() {
    node_runtime::support::tls::install_crypto_provider();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|axum::Json(body): axum::Json<serde_json::Value>| async move {
            let answer = match body["model"].as_str().unwrap_or_default() {
                "object-arguments" => serde_json::json!({
                    "choices": [{"message": {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "lookup_vendor", "arguments": vec![serde_json::json!([[]]); 10_000]}}]},
                        "finish_reason": "tool_calls"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 9}}),
                "empty-usage" => serde_json::json!({
                    "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                    "usage": {"input_tokens": 5, "output_tokens": 5}}),
                _ => serde_json::json!({
                    "choices": [{"message": {"role": "assistant", "content": "x".repeat(3 << 20)}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
            };
            axum::Json(answer)
        }),
    );
    let url = model_at(app).await;
    for (model, charged_at_least) in [("object-arguments", 16), ("empty-usage", 300), ("too-large", 300)] {
        let result = tool_loop_against(&url, model).await;
        let used = result.report.tokens_in + result.report.tokens_out;
        assert!(
            used >= charged_at_least,
            "{model}: {used} tokens charged: {:?}",
            result.outcome
        );
        if model != "empty-usage" {
            assert!(result.outcome.failure().is_some(), "{model}: {:?}", result.outcome);
        }
    }
}
