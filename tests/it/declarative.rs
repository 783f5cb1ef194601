//! Declarative agents end to end: definitions in the reference's format,
//! created through the dev plane's agent API, run by a separate `serve`
//! node against a stub model, delivering to a recording target. Then the
//! refusals: a placeholder naming a secret the operator did not grant, an
//! endpoint off the allow-list, and a lease asking for more than the spec
//! allows each fail clearly, call no model and send nothing.

use crate::support::*;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, Run, RunStatus};

/// One request the target saw.
#[derive(Debug, Clone)]
struct Seen {
    headers: BTreeMap<String, String>,
    body: serde_json::Value,
}

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Seen>>,
}

async fn record(State(recorder): State<Arc<Recorder>>, headers: HeaderMap, body: axum::body::Bytes) -> StatusCode {
    let headers = headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.to_str().unwrap_or("").to_string()))
        .collect();
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    recorder.seen.lock().unwrap().push(Seen { headers, body });
    StatusCode::CREATED
}

/// A stub OpenAI-compatible model that answers every call with a JSON
/// object quoting the system message it got, and counts its calls.
#[derive(Default)]
struct Model {
    calls: std::sync::atomic::AtomicU32,
}

async fn chat(
    State(model): State<Arc<Model>>,
    axum::Json(body): axum::Json<serde_json::Value>,
) -> axum::Json<serde_json::Value> {
    model.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let system = body["messages"][0]["content"].as_str().unwrap_or_default().to_string();
    let user = body["messages"][1]["content"].as_str().unwrap_or_default().to_string();
    let answer = serde_json::json!({"category": "Office Supplies", "instructions": system, "input": user});
    axum::Json(serde_json::json!({
        "id": "chatcmpl-decl",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.to_string()}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60},
    }))
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("127.0.0.1:{}", addr.port())
}

/// The reference's spec, delivering to `endpoint`.
fn spec(endpoint: &str, authorization: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({
        "name": "Invoice router",
        "description": "Classifies invoices and posts them to the ERP.",
        "instructions": "Classify the invoice and answer with one JSON object.",
        "modelProfile": {"model": "stub-model", "temperature": 0.1, "maxTokens": 200},
        "budget": {"maxTokens": max_tokens, "maxDurationSeconds": 30},
        "tools": ["http-post"],
        "input": {"type": "ServiceBus", "config": {"queueName": "invoices"}},
        "output": {"type": "Http", "config": {
            "endpoint": endpoint,
            "method": "POST",
            "headers": {"Authorization": authorization, "X-Tenant": "acme"},
            "timeoutSeconds": 5,
            "retryPolicy": {"maxRetries": 2, "retryDelayMs": 50, "useExponentialBackoff": true, "maxRetryDelayMs": 200},
            "idempotencyKeyFormat": "{RunId}-{MessageId}"
        }},
        "metadata": {"team": "finance"}
    })
}

async fn post_json(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

fn error_details(run: &Run) -> serde_json::Value {
    serde_json::from_str(
        &run.error_info
            .as_ref()
            .expect("a failed run has error info")
            .error_details,
    )
    .expect("errorDetails is JSON")
}

fn ended(run: &Run) -> bool {
    matches!(run.status, RunStatus::Completed | RunStatus::Failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_from_the_agent_api_runs_on_a_serve_node_and_cannot_widen_the_operators_grants() {
    node_runtime::support::tls::install_crypto_provider();
    let recorder = Arc::new(Recorder::default());
    let target = serve(
        axum::Router::new()
            .route("/invoices", axum::routing::post(record))
            .with_state(recorder.clone()),
    )
    .await;
    let model = Arc::new(Model::default());
    let model_addr = serve(
        axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(chat))
            .with_state(model.clone()),
    )
    .await;
    let plane = DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let api = reqwest::Client::new();
    let base = plane.url();

    // The agent and its versions, through the API as a platform makes them.
    let (status, agent) = post_json(
        &api,
        &format!("{base}/v1/agents"),
        &serde_json::json!({"name": "Invoice router", "instructions": "Classify."}),
    )
    .await;
    assert_eq!(status, 201, "{agent}");
    let agent_id = agent["agentId"].as_str().expect("a generated agent id").to_string();
    let endpoint = format!("http://{target}/invoices");
    let versions = [
        ("1.0.0", spec(&endpoint, "Bearer ${ERP_TOKEN}", 1000)),
        // A placeholder the operator never granted.
        ("1.1.0", spec(&endpoint, "Bearer ${DATABASE_PASSWORD}", 1000)),
        // An endpoint off the allow-list (another port of the same host).
        (
            "1.2.0",
            spec(
                &format!("http://127.0.0.1:{}/invoices", free_port()),
                "Bearer ${ERP_TOKEN}",
                1000,
            ),
        ),
    ];
    for (version, spec) in &versions {
        let (status, body) = post_json(
            &api,
            &format!("{base}/v1/agents/{agent_id}:version"),
            &serde_json::json!({"version": version, "spec": spec}),
        )
        .await;
        assert_eq!(status, 201, "{version}: {body}");
    }

    // A separate node, configured as an operator would.
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("appsettings.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "NodeRuntime": {"NodeId": "declarative-node", "ControlPlaneUrl": base, "HeartbeatIntervalSeconds": 1,
                            "MaxConcurrentLeases": 4, "DataDirectory": data.path().join("data")},
            "AgentRuntime": {"DefaultModel": "stub-model", "MaxTokens": 4000,
                             "OpenAI": {"Endpoint": format!("http://{model_addr}"), "ApiKeyEnvironmentVariable": "STUB_LLM_KEY"},
                             "Prices": {"stub-model": {"InputPer1K": 0.5, "OutputPer1K": 1.0}}},
            "DeclarativeAgents": {"AllowedHosts": [target],
                                  "Secrets": {"ERP_TOKEN": {"EnvironmentVariable": "ERP_TOKEN_FOR_TEST", "Hosts": [target]},
                                              "DATABASE_PASSWORD_OTHER": {"Value": "unused", "Hosts": ["db.example.com"]}}}
        })
        .to_string(),
    )
    .unwrap();
    let mut node = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("STUB_LLM_KEY", "sk-stub")
        .env("ERP_TOKEN_FOR_TEST", "erp-s3cret")
        // Nothing else may fill a placeholder: not the node's environment.
        .env("DATABASE_PASSWORD", "from-the-environment")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime serve starts");

    let submit = |version: &str, message_id: &str, budgets: Budgets| NewRun {
        agent_id: agent_id.clone(),
        version: version.into(),
        input_ref: BTreeMap::from([
            (
                "message".to_string(),
                format!("{{\"vendor\": \"Paper Co\", \"number\": \"{message_id}\"}}"),
            ),
            ("messageId".to_string(), message_id.to_string()),
        ]),
        metadata: BTreeMap::new(),
        budgets,
    };
    let mut good = Vec::new();
    for i in 0..5 {
        let message_id = format!("msg-{i}");
        let run = plane
            .submit(submit("1.0.0", &message_id, Budgets::default()))
            .await
            .unwrap();
        good.push((run.run_id, message_id));
    }
    let finished = |ids: Vec<String>| {
        let plane = &plane;
        async move {
            eventually(Duration::from_secs(60), "the runs to end", || {
                let runs: Vec<Run> = ids.iter().filter_map(|id| plane.run(id)).collect();
                (runs.len() == ids.len() && runs.iter().all(ended)).then_some(runs)
            })
            .await
        }
    };
    let runs = finished(good.iter().map(|(id, _)| id.clone()).collect()).await;
    for run in &runs {
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        let result = run.result.as_ref().unwrap();
        assert_eq!(result["category"], "Office Supplies", "{result:?}");
        assert_eq!(
            result["instructions"],
            "Classify the invoice and answer with one JSON object."
        );
        assert!(result["output"].starts_with('{'), "{result:?}");
        let costs = run.costs.as_ref().unwrap();
        assert_eq!((costs.tokens_in, costs.tokens_out), (40, 20));
        assert!((costs.usd_cost - 0.04).abs() < 1e-9, "{costs:?}");
    }
    // One POST per run, with the configured headers and idempotency key.
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5, "{seen:?}");
    for (run_id, message_id) in &good {
        let posts: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.headers.get("x-correlation-id") == Some(run_id))
            .collect();
        assert_eq!(posts.len(), 1, "run {run_id}: {seen:?}");
        let post = posts[0];
        assert_eq!(post.headers["authorization"], "Bearer erp-s3cret");
        assert_eq!(post.headers["x-tenant"], "acme");
        assert_eq!(post.headers["idempotency-key"], format!("{run_id}-{message_id}"));
        assert!(post.headers["traceparent"].starts_with("00-"), "{post:?}");
        assert_eq!(post.body["category"], "Office Supplies");
    }
    let calls_before = model.calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(calls_before, 5);

    // The refusals: each ends clearly, calls no model, sends nothing.
    let ungranted = plane
        .submit(submit("1.1.0", "msg-u", Budgets::default()))
        .await
        .unwrap();
    let off_list = plane
        .submit(submit("1.2.0", "msg-o", Budgets::default()))
        .await
        .unwrap();
    let raising = plane
        .submit(submit(
            "1.0.0",
            "msg-r",
            Budgets {
                max_tokens: Some(5000),
                ..Budgets::default()
            },
        ))
        .await
        .unwrap();
    let unknown = plane
        .submit(submit("9.9.9", "msg-n", Budgets::default()))
        .await
        .unwrap();
    let refused = finished(vec![
        ungranted.run_id.clone(),
        off_list.run_id.clone(),
        raising.run_id.clone(),
        unknown.run_id.clone(),
    ])
    .await;
    let says = |run: &Run, kind: &str, words: &[&str]| {
        assert_eq!(run.status, RunStatus::Failed, "{run:?}");
        assert_eq!(error_details(run)["kind"], kind, "{run:?}");
        let message = &run.error_info.as_ref().unwrap().error_message;
        for word in words {
            assert!(message.contains(word), "{word:?} not in {message}");
        }
        assert!(!message.contains("erp-s3cret") && !message.contains("from-the-environment"));
    };
    says(
        &refused[0],
        "agent.invalid",
        &["${DATABASE_PASSWORD}", "DeclarativeAgents.Secrets"],
    );
    says(&refused[1], "agent.invalid", &["allow-list", "nothing was sent"]);
    says(
        &refused[2],
        "agent.invalid",
        &["5000", "budget.maxTokens", "never raise"],
    );
    says(&refused[3], "agent.invalid", &["9.9.9", "not found"]);
    assert_eq!(
        model.calls.load(std::sync::atomic::Ordering::SeqCst),
        calls_before,
        "a refused run called the model"
    );
    assert_eq!(recorder.seen.lock().unwrap().len(), 5, "a refused run posted");

    node.start_kill().unwrap();
    let _ = node.wait().await;
    plane.shutdown().await;
}

/// The built-in agent against the stub model in each provider's shape:
/// OpenAI and Azure answers complete with their usage metered; a refusal
/// (metered too) and a content filter fail `agent.error`, final; a 429
/// with `Retry-After` is waited out and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_agent_meters_each_provider_shape_and_fails_refusals_clearly() {
    use node_runtime::dev_plane::stubs::{STUB_ECHO_MODEL, STUB_REFUSAL_MODEL, StubModel, StubModelOptions};
    use node_runtime::sandbox::declarative::AgentSpec;
    use node_runtime::sandbox::{FailKind, LlmEndpoint, LlmSettings, RunOutcome, Sandbox, SandboxConfig};
    use node_runtime::support::Secret;

    node_runtime::support::tls::install_crypto_provider();
    let model = StubModel::start_with(StubModelOptions {
        api_key: Some("sk-shapes".into()),
    })
    .await
    .unwrap();
    let spec = |model: &str| {
        AgentSpec::parse(
            serde_json::json!({"name": "shapes", "instructions": "Answer as JSON.",
                               "modelProfile": {"model": model}})
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    };
    let sandbox = |endpoint: LlmEndpoint| {
        let mut llm = LlmSettings::openai(model.url(), Secret::new("sk-shapes"), STUB_ECHO_MODEL);
        llm.endpoint = endpoint;
        Sandbox::new(SandboxConfig {
            llm: Some(llm),
            ..SandboxConfig::default()
        })
        .unwrap()
    };
    let openai = sandbox(LlmEndpoint::OpenAi { base_url: model.url() });
    async fn run_on(sandbox: &Sandbox, spec: AgentSpec) -> node_runtime::sandbox::RunResult {
        let request = request("shapes", &[("message", "the input")], Default::default());
        sandbox.run_spec(&spec, request).await
    }
    let run = |sandbox, model: &str| run_on(sandbox, spec(model));

    let echo = run(&openai, STUB_ECHO_MODEL).await;
    let RunOutcome::Completed(result) = &echo.outcome else {
        panic!("{:?}", echo.outcome)
    };
    assert_eq!(result["instructions"], "Answer as JSON.", "{result:?}");
    assert_eq!(result["input"], "the input", "{result:?}");
    assert!(
        echo.report.tokens_in > 0 && echo.report.tokens_out > 0,
        "{:?}",
        echo.report
    );

    let refused = run(&openai, STUB_REFUSAL_MODEL).await;
    let failure = refused.outcome.failure().expect("a refusal fails");
    assert_eq!(
        (failure.kind, failure.retryable),
        (FailKind::AgentError, false),
        "{failure:?}"
    );
    assert!(failure.message.contains("refused"), "{failure:?}");
    assert!(
        refused.report.tokens_out > 0,
        "a refusal's tokens are metered: {:?}",
        refused.report
    );

    // The first answer is a 429 asking for a second's wait; the retry answers.
    let before = model.request_count();
    let limited = run(&openai, "stub-rate-limited-1").await;
    assert!(
        matches!(limited.outcome, RunOutcome::Completed(_)),
        "{:?}",
        limited.outcome
    );
    assert_eq!(model.request_count() - before, 2);
    assert!(
        limited.report.wall_ms >= 1000,
        "Retry-After: 1 was not waited out: {:?}",
        limited.report
    );

    let azure = sandbox(LlmEndpoint::Azure {
        base_url: model.url(),
        deployment: STUB_ECHO_MODEL.into(),
    });
    let echo = run(&azure, STUB_ECHO_MODEL).await;
    assert!(matches!(echo.outcome, RunOutcome::Completed(_)), "{:?}", echo.outcome);
    assert!(echo.report.tokens_in > 0);
    let last = model.requests().pop().unwrap();
    assert!(last.path.starts_with("/openai/deployments/"), "{last:?}");
    assert_eq!(last.header("api-key"), Some("sk-shapes"));
    let azure_refusal = sandbox(LlmEndpoint::Azure {
        base_url: model.url(),
        deployment: STUB_REFUSAL_MODEL.into(),
    });
    let filtered = run(&azure_refusal, STUB_REFUSAL_MODEL).await;
    let failure = filtered.outcome.failure().expect("a filtered answer fails");
    assert_eq!(failure.kind, FailKind::AgentError, "{failure:?}");
    assert!(failure.message.contains("content filter"), "{failure:?}");
}

/// A secret the output carries never comes back in the run's failure:
/// not from a target that echoes the request in its error body, not from
/// a path that holds it when the target cannot be reached, and a spec
/// cannot put one in the host it is checked against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_failure_message() {
    use node_runtime::dev_plane::stubs::{STUB_ECHO_MODEL, StubModel};
    use node_runtime::sandbox::declarative::{AgentSpec, BoundSecret, DeclarativeSettings, Secrets};
    use node_runtime::sandbox::{FailKind, HostGrant, LlmSettings, Sandbox, SandboxConfig};
    use node_runtime::support::Secret;

    const VALUE: &str = "Sup3rSecretValue";
    node_runtime::support::tls::install_crypto_provider();
    let model = StubModel::start().await.unwrap();
    // A target that answers 400 quoting everything it was sent.
    let echo = serve(
        axum::Router::new().fallback(|request: axum::extract::Request| async move {
            let (parts, _) = request.into_parts();
            let mut body = format!("{} {}\n", parts.method, parts.uri);
            for (name, value) in &parts.headers {
                body.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("")));
            }
            (StatusCode::BAD_REQUEST, body)
        }),
    )
    .await;
    let closed = format!("127.0.0.1:{}", free_port());
    let hosts = vec![HostGrant::parse(&echo).unwrap(), HostGrant::parse(&closed).unwrap()];
    let sandbox = Sandbox::new(SandboxConfig {
        llm: Some(LlmSettings::openai(model.url(), Secret::new("k"), STUB_ECHO_MODEL)),
        declarative: DeclarativeSettings {
            output_hosts: hosts.clone(),
            secrets: Secrets(BTreeMap::from([(
                "TOK".to_string(),
                BoundSecret {
                    value: Secret::new(VALUE),
                    hosts,
                },
            )])),
        },
        ..SandboxConfig::default()
    })
    .unwrap();
    let spec = |endpoint: String| {
        AgentSpec::parse(
            serde_json::json!({"name": "leak", "instructions": "i", "tools": ["http-post"],
                "output": {"type": "Http", "config": {"endpoint": endpoint,
                    "headers": {"Authorization": "Bearer ${TOK}"},
                    "retryPolicy": {"maxRetries": 1, "retryDelayMs": 10}}}})
            .to_string()
            .as_bytes(),
        )
    };
    for endpoint in [
        format!("http://{echo}/hook/${{TOK}}?key=${{TOK}}"),
        format!("http://{closed}/hook/${{TOK}}"),
    ] {
        let result = sandbox
            .run_spec(
                &spec(endpoint.clone()).unwrap(),
                request("leak", &[("message", "hi")], Default::default()),
            )
            .await;
        let failure = result.outcome.failure().expect("the delivery fails");
        assert_eq!(failure.kind, FailKind::AgentError, "{failure:?}");
        let shown = format!("{failure:?}").to_lowercase();
        assert!(!shown.contains(&VALUE.to_lowercase()), "{endpoint}: {failure:?}");
        assert!(
            failure.message.contains("${TOK}"),
            "the endpoint is shown as written: {failure:?}"
        );
    }
    // In the host, the placeholder is refused before anything runs.
    let err = spec(format!("http://${{TOK}}.{echo}/")).unwrap_err();
    assert!(err.0.contains("scheme, host or port"), "{err}");
}

/// A provider's `Retry-After` of any size is an answer, not a crash: past
/// the run's deadline, the call gives up at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_from_the_model_ends_the_call_not_the_node() {
    use node_runtime::sandbox::declarative::AgentSpec;
    use node_runtime::sandbox::{FailKind, LlmSettings, Sandbox, SandboxConfig};
    use node_runtime::support::Secret;

    node_runtime::support::tls::install_crypto_provider();
    let model = serve(axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "18446744073709551615")],
                "{\"error\": {\"message\": \"slow down\"}}",
            )
        }),
    ))
    .await;
    let sandbox = Sandbox::new(SandboxConfig {
        llm: Some(LlmSettings::openai(format!("http://{model}"), Secret::new("k"), "m")),
        ..SandboxConfig::default()
    })
    .unwrap();
    let spec = AgentSpec::parse(br#"{"name": "n", "instructions": "i"}"#).unwrap();
    let result = sandbox
        .run_spec(&spec, request("n", &[("message", "hi")], Default::default()))
        .await;
    let failure = result.outcome.failure().expect("the call gives up");
    assert_eq!(
        (failure.kind, failure.retryable),
        (FailKind::AgentError, true),
        "{failure:?}"
    );
    assert!(failure.message.contains("429"), "{failure:?}");
}

/// A definition's model call cut off by the run's deadline was perhaps
/// answered and billed: the run fails `budget.deadline`, charged its
/// estimated prompt and every token the answer was allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_call_cut_off_by_the_deadline_is_charged_the_most_it_may_cost() {
    use node_runtime::sandbox::declarative::AgentSpec;
    use node_runtime::sandbox::{BudgetRequest, FailKind, LlmSettings, Sandbox, SandboxConfig};
    use node_runtime::support::Secret;

    node_runtime::support::tls::install_crypto_provider();
    let model = serve(axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(std::future::pending::<StatusCode>),
    ))
    .await;
    let sandbox = Sandbox::new(SandboxConfig {
        llm: Some(LlmSettings::openai(format!("http://{model}"), Secret::new("k"), "m")),
        ..SandboxConfig::default()
    })
    .unwrap();
    let spec = AgentSpec::parse(br#"{"name": "n", "instructions": "i", "modelProfile": {"maxTokens": 400}}"#).unwrap();
    let budget = BudgetRequest {
        duration: Some(std::time::Duration::from_millis(500)),
        ..BudgetRequest::default()
    };
    // The model call's own wait ends 50 ms after the deadline: should the
    // run's timer be seen later than that (a loaded machine), the call's
    // timeout ends it first (`agent.error`). Three attempts at most.
    let mut result = sandbox
        .run_spec(&spec, request("n", &[("message", "hi")], budget))
        .await;
    for _attempt in 1..3 {
        if result
            .outcome
            .failure()
            .is_some_and(|failure| failure.kind == FailKind::BudgetDeadline)
        {
            break;
        }
        result = sandbox
            .run_spec(&spec, request("n", &[("message", "hi")], budget))
            .await;
    }
    let failure = result.outcome.failure().expect("the deadline cuts the call off");
    assert_eq!(failure.kind, FailKind::BudgetDeadline, "{failure:?}");
    assert!(failure.message.contains("the model's answer"), "{failure:?}");
    assert!(result.report.tokens_in > 0, "{:?}", result.report);
    assert_eq!(result.report.tokens_out, 400, "{:?}", result.report);
}
