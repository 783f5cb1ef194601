//! The built-in agent: runs a declarative agent (a definition in the
//! reference's format, no code) under the same meters, egress policy,
//! report and outcome kinds as a component.
//!
//! What a run does: the spec's instructions as the system message (the
//! lease's metadata `instructions` wins when present, as in the reference
//! node), the lease's `input_ref["message"]` as the user message, one
//! `llm.chat` call with the spec's model profile, then the output
//! connector (`http_output.rs`), and a result map holding the model's
//! answer as `output` and, when the answer is a JSON object, its fields.
//!
//! Why host code and not a component shipped inside the binary: the
//! built-in agent computes nothing of its own. It makes one model call
//! and one HTTP request, and both are host work whichever way it is
//! built: a guest's `llm.chat` and `wasi:http` calls land in the host
//! anyway. So it calls what a guest's imports reach directly: the model
//! through [`RunState::metered_chat`], the very function behind
//! `llm.chat` (token budget, prompt estimate, allowed models, pricing),
//! on a run state made by the same `RunStateBuilder` from the same
//! grants; its request through the run's [`EgressPolicy`] (the agent's
//! grants narrowed by the lease) plus the node-wide output allow-list; its
//! deadline from the same `run::begin`; its token verdict from the same
//! judge. A guest would add a compile, an instance and a second copy of
//! every byte, and would need the secrets inside guest memory, while the
//! node's build would need a WebAssembly toolchain. Fuel and memory read
//! 0: no guest code runs.
//!
//! Budgets: the spec's `budget` (tokens, duration) is the agent's own
//! ceiling. A lease may lower it, and the node's limits lower it again; a
//! lease that asks for more than the spec allows is refused before
//! anything is sent, since whoever writes a lease must not be able to
//! widen what the agent's author set.

mod http_output;
mod secrets;
mod spec;

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::Instrument;

pub use secrets::{BoundSecret, PlaceholderError, Secrets};
pub use spec::{AgentSpec, HTTP_POST_TOOL, HttpOutput, InvalidSpec, Output, RetryPolicy, SPEC_BYTES};

use super::bindings::llm::{ChatRequest, LlmError, Message, Role};
use super::capabilities::llm::ChatFailure;
use super::capabilities::log::HostWarnings;
use super::grants::AgentGrants;
use super::outcome::{FailKind, ResultMap, RunFailure, RunOutcome, RunReport};
use super::run::{self, RunRequest, RunResult, Shared};
use super::state_builder::RunStateBuilder;
use super::{BudgetRequest, HostGrant};

/// What the operator allows declarative agents beyond each agent's own
/// grants: output hosts for all of them, and the secrets their
/// placeholders may name.
#[derive(Debug, Clone, Default)]
pub struct DeclarativeSettings {
    /// Hosts (`host` or `host:port`) any declarative agent's output
    /// connector may post to.
    pub output_hosts: Vec<HostGrant>,
    pub secrets: Secrets,
}

/// The lease metadata that overrides the spec's instructions.
const INSTRUCTIONS_METADATA_KEY: &str = "instructions";
/// The lease metadata that names the agent in logs.
const AGENT_NAME_METADATA_KEY: &str = "agent_name";

/// Runs `spec` once for `request`, granted `grants` (its agent id's).
pub(crate) async fn execute(
    shared: &Shared<'_>,
    grants: &AgentGrants,
    settings: &DeclarativeSettings,
    spec: &AgentSpec,
    mut request: RunRequest,
) -> RunResult {
    let failed = |failure: RunFailure| RunResult {
        outcome: RunOutcome::Failed(failure),
        report: RunReport::default(),
    };
    match lowered(spec, request.budget) {
        Ok(budget) => request.budget = budget,
        Err(message) => return failed(RunFailure::new(FailKind::AgentInvalid, message)),
    }
    let (budget, started, deadline) = match run::begin(shared.limits, &request) {
        Ok(begun) => begun,
        Err(late) => return failed(late),
    };
    let context = &request.context;
    let name = context
        .metadata
        .get(AGENT_NAME_METADATA_KEY)
        .filter(|name| !name.trim().is_empty())
        .unwrap_or(&spec.name);
    tracing::debug!(agent.name = %name, "running a declarative agent");
    let Some(message) = context.input_ref.get("message") else {
        return failed(RunFailure::new(
            FailKind::AgentInvalid,
            "the lease's input_ref has no \"message\": a declarative agent's input is \
             input_ref[\"message\"], the user message it hands the model",
        ));
    };
    let http_output = match &spec.output {
        None => None,
        Some(Output::Unsupported(kind)) => {
            return failed(RunFailure::new(
                FailKind::AgentInvalid,
                format!(
                    "{}: its output connector is of type {kind:?}, which this node cannot deliver \
                     through (it delivers through Http outputs only); nothing was run",
                    spec.describe()
                ),
            ));
        }
        Some(Output::Http(_)) if !spec.tools.contains(HTTP_POST_TOOL) => {
            return failed(RunFailure::new(
                FailKind::AgentInvalid,
                format!(
                    "{}: it has an Http output connector but its tools do not include \
                     \"{HTTP_POST_TOOL}\", which allows delivering through it; add the tool to the \
                     spec, or remove the output; nothing was run",
                    spec.describe()
                ),
            ));
        }
        Some(Output::Http(output)) => Some(output),
    };

    // The same run state a component gets: the agent's grants narrowed by
    // the lease, the token meter, the LLM client, the deadline.
    let narrowing = HostWarnings::default();
    let granted = grants.narrowed(&context.metadata, &narrowing);
    let mut builder = RunStateBuilder::new(shared.limits, &budget, context, deadline);
    builder.http_hosts(&granted.http_hosts);
    if let Some(client) = shared.llm {
        builder.llm(client);
    }
    let mut state = match builder.build() {
        Ok(state) => state,
        Err(unavailable) => return failed(RunFailure::handed_back(unavailable.to_string())),
    };
    state.egress.warnings.add(&narrowing);

    let report = |state: &super::state::RunState| RunReport {
        wall_ms: started.elapsed().as_millis() as u64,
        tokens_in: state.tokens.tokens_in,
        tokens_out: state.tokens.tokens_out,
        usd_cost: state.tokens.usd_cost,
        log_lines: state.log.lines(),
        log_lines_dropped: state.log.dropped(),
        http_requests: state.egress.requests + state.egress.denied,
        http_denied: state.egress.denied,
        host_warnings_suppressed: state.egress.warnings.suppressed(),
        ..RunReport::default()
    };
    let finish = |state: &super::state::RunState, outcome: RunOutcome| {
        state.egress.warnings.summarise();
        RunResult {
            outcome,
            report: report(state),
        }
    };

    // Everything the output needs is checked before the model is called:
    // a refusal spends no tokens and sends nothing.
    let prepared = match http_output {
        None => None,
        Some(output) => {
            match http_output::prepare(
                output,
                &settings.output_hosts,
                &settings.secrets,
                &mut state.egress,
                context,
                deadline,
            )
            .await
            {
                Ok(prepared) => Some(prepared),
                Err(refused) => {
                    let kind = if refused.refused {
                        FailKind::AgentInvalid
                    } else if refused.deadline {
                        FailKind::BudgetDeadline
                    } else {
                        FailKind::AgentError
                    };
                    let failure = RunFailure {
                        retryable: refused.retryable,
                        ..RunFailure::new(kind, refused.message)
                    };
                    return finish(&state, RunOutcome::Failed(failure));
                }
            }
        }
    };

    let instructions = context
        .metadata
        .get(INSTRUCTIONS_METADATA_KEY)
        .filter(|text| !text.trim().is_empty())
        .unwrap_or(&spec.instructions);
    let chat = ChatRequest {
        model: spec.model.clone(),
        messages: vec![
            Message {
                role: Role::System,
                content: instructions.clone(),
            },
            Message {
                role: Role::User,
                content: message.clone(),
            },
        ],
        max_tokens: spec.max_output_tokens,
        temperature: spec.temperature,
    };
    // The run's deadline ends the call (the chat call's own waits end a
    // little after it); cut off, the call is charged what it may have
    // cost, as the run's last reading has it.
    let answer = match tokio::time::timeout_at(deadline.into(), state.metered_chat(chat)).await {
        Err(_) => {
            state.tokens = state.last_reading.tokens();
            return finish(&state, deadline_passed("the model's answer"));
        }
        Ok(Err(failure)) => return finish(&state, chat_failed(failure)),
        Ok(Ok(answer)) => answer,
    };
    if answer.finish_reason == "content_filter" {
        let failure = RunFailure::new(
            FailKind::AgentError,
            "the LLM provider's content filter withheld the model's answer (finish_reason \
             content_filter); nothing was delivered",
        );
        return finish(&state, check_tokens(&state, RunOutcome::Failed(failure)));
    }
    if let RunOutcome::Failed(failure) = check_tokens(&state, RunOutcome::Completed(ResultMap::new())) {
        return finish(&state, RunOutcome::Failed(failure));
    }
    let result = match result_map(&answer.content, shared.limits.result_bytes) {
        Ok(result) => result,
        Err(failure) => return finish(&state, RunOutcome::Failed(failure)),
    };

    let Some(prepared) = prepared else {
        return finish(&state, RunOutcome::Completed(result));
    };
    let body = body(&answer.content);
    let span = tracing::info_span!("output.http", "http.attempts" = tracing::field::Empty);
    let sent = tokio::time::timeout_at(
        deadline.into(),
        http_output::send(prepared, body, &mut state.egress, deadline).instrument(span.clone()),
    )
    .await;
    match sent {
        Err(_) => finish(&state, deadline_passed("the output connector")),
        Ok(Ok(delivered)) => {
            span.record("http.attempts", delivered.attempts);
            tracing::debug!(
                status = delivered.status,
                attempts = delivered.attempts,
                "output delivered"
            );
            finish(&state, RunOutcome::Completed(result))
        }
        Ok(Err(not_delivered)) => {
            // The deadline is a budget like any run's; the rest is the
            // target's doing.
            let kind = if not_delivered.deadline {
                FailKind::BudgetDeadline
            } else {
                FailKind::AgentError
            };
            let failure = RunFailure {
                retryable: not_delivered.retryable && !not_delivered.deadline,
                ..RunFailure::new(kind, not_delivered.message)
            };
            finish(&state, RunOutcome::Failed(failure))
        }
    }
}

/// The budgets the reference control plane puts in every lease, whatever
/// the run or agent (contract: "budgets today always 4000 tokens / 60
/// s"). A lease carrying exactly this pair cannot be told from one that
/// asks nothing, so where it is above the spec it is not refused: the
/// spec's lower value applies. Where it is below, it lowers the spec's
/// as any lease does.
const PLANE_DEFAULT_TOKENS: u32 = 4000;
const PLANE_DEFAULT_DURATION: Duration = Duration::from_secs(60);

/// The run's budget request: the lower of the spec's and the lease's,
/// each meter. A lease asking for more than the spec allows is refused
/// (but for the reference plane's fixed pair, above).
fn lowered(spec: &AgentSpec, lease: BudgetRequest) -> Result<BudgetRequest, String> {
    let asked_tokens = lease.tokens.filter(|t| *t > 0);
    let asked_duration = lease.duration.filter(|d| !d.is_zero());
    let plane_default = asked_tokens == Some(PLANE_DEFAULT_TOKENS) && asked_duration == Some(PLANE_DEFAULT_DURATION);
    let lower = |asked: Option<u32>, allowed: Option<u32>| match (asked, allowed) {
        (Some(asked), Some(allowed)) => Some(asked.min(allowed)),
        (asked, allowed) => asked.or(allowed),
    };
    let tokens = lower(asked_tokens, spec.budget_tokens);
    let duration = match (asked_duration, spec.budget_duration) {
        (Some(asked), Some(allowed)) => Some(asked.min(allowed)),
        (asked, allowed) => asked.or(allowed),
    };
    if plane_default {
        return Ok(BudgetRequest {
            tokens,
            duration,
            ..lease
        });
    }
    if let (Some(asked), Some(allowed)) = (asked_tokens, spec.budget_tokens)
        && asked > allowed
    {
        return Err(format!(
            "the lease asks for {asked} LLM tokens, but {} allows at most {allowed} (its spec's \
             budget.maxTokens): a lease may lower an agent's budget, never raise it; nothing was run",
            spec.describe()
        ));
    }
    if let (Some(asked), Some(allowed)) = (asked_duration, spec.budget_duration)
        && asked > allowed
    {
        return Err(format!(
            "the lease asks for {}s of wall-clock time, but {} allows at most {}s (its spec's \
             budget.maxDurationSeconds): a lease may lower an agent's budget, never raise it; \
             nothing was run",
            asked.as_secs(),
            spec.describe(),
            allowed.as_secs()
        ));
    }
    Ok(BudgetRequest {
        tokens,
        duration,
        ..lease
    })
}

fn check_tokens(state: &super::state::RunState, outcome: RunOutcome) -> RunOutcome {
    run::check_tokens(&state.tokens, outcome)
}

fn deadline_passed(what: &str) -> RunOutcome {
    RunOutcome::Failed(RunFailure::new(
        FailKind::BudgetDeadline,
        format!("the run's deadline passed while it waited for {what}"),
    ))
}

/// A failed model call as the run's outcome, with the kinds a component
/// run that gave up on the same error would get.
fn chat_failed(failure: ChatFailure) -> RunOutcome {
    let (kind, message) = match failure.error {
        LlmError::BudgetExhausted(message) => (FailKind::BudgetTokens, message),
        LlmError::Timeout(message) => (FailKind::BudgetDeadline, format!("the LLM call timed out: {message}")),
        LlmError::NotConfigured(message) => (
            FailKind::AgentError,
            format!("{message}: a declarative agent needs the node's LLM (AgentRuntime.OpenAI or AzureAIFoundry)"),
        ),
        LlmError::Provider(message) => (FailKind::AgentError, message),
        LlmError::InvalidRequest(message) => (FailKind::AgentInvalid, message),
    };
    RunOutcome::Failed(RunFailure {
        retryable: failure.retryable,
        ..RunFailure::new(kind, message)
    })
}

/// `output` = the answer; when it is a JSON object, its fields too (text
/// as is, anything else as JSON), never replacing `output`.
fn result_map(answer: &str, limit: usize) -> Result<ResultMap, RunFailure> {
    let mut result = BTreeMap::new();
    if let Some(serde_json::Value::Object(fields)) = json_object(answer) {
        for (key, value) in fields {
            let text = match value {
                serde_json::Value::String(text) => text,
                other => other.to_string(),
            };
            result.insert(key, text);
        }
    }
    result.insert("output".to_string(), answer.to_string());
    let bytes: usize = result.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limit {
        return Err(RunFailure::new(
            FailKind::BudgetOutput,
            format!("the model's answer makes a result of {bytes} bytes, more than the {limit} the node accepts"),
        ));
    }
    Ok(result)
}

/// The answer as a JSON object, also when the model fenced it in a
/// Markdown code block as models often do.
fn json_object(answer: &str) -> Option<serde_json::Value> {
    let trimmed = answer.trim();
    let unfenced = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str::<serde_json::Value>(unfenced.trim())
        .ok()
        .filter(serde_json::Value::is_object)
}

/// What the output connector posts: the answer when it is a JSON object,
/// else `{"output": answer}`.
fn body(answer: &str) -> Vec<u8> {
    match json_object(answer) {
        Some(object) => object.to_string().into_bytes(),
        None => serde_json::json!({ "output": answer }).to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tokens: Option<u32>, seconds: Option<u64>) -> AgentSpec {
        let mut spec = AgentSpec::parse(br#"{"name": "n", "instructions": "i"}"#).unwrap();
        spec.budget_tokens = tokens;
        spec.budget_duration = seconds.map(Duration::from_secs);
        spec
    }

    #[test]
    fn a_lease_lowers_the_specs_budget_and_never_raises_it() {
        let lease = |tokens: u32, seconds: u64| BudgetRequest {
            tokens: Some(tokens),
            duration: Some(Duration::from_secs(seconds)),
            ..BudgetRequest::default()
        };
        let lowered_budget = lowered(&spec(Some(1000), Some(30)), lease(500, 10)).unwrap();
        assert_eq!(lowered_budget.tokens, Some(500));
        assert_eq!(lowered_budget.duration, Some(Duration::from_secs(10)));
        // 0 on the wire: "the default", here the spec's.
        let defaulted = lowered(&spec(Some(1000), Some(30)), lease(0, 0)).unwrap();
        assert_eq!(defaulted.tokens, Some(1000));
        assert_eq!(defaulted.duration, Some(Duration::from_secs(30)));
        let err = lowered(&spec(Some(1000), Some(30)), lease(5000, 10)).unwrap_err();
        assert!(err.contains("5000") && err.contains("budget.maxTokens"), "{err}");
        let err = lowered(&spec(Some(1000), Some(30)), lease(10, 90)).unwrap_err();
        assert!(err.contains("budget.maxDurationSeconds"), "{err}");
        // A spec without a budget leaves the lease's (and the node's).
        assert_eq!(lowered(&spec(None, None), lease(5000, 60)).unwrap().tokens, Some(5000));
        // The reference plane's fixed 4000 tokens / 60 s are not refused
        // where they are above the spec (the spec's value applies), and
        // lower it where they are below.
        let reference = lowered(&spec(Some(1000), Some(30)), lease(4000, 60)).unwrap();
        assert_eq!(reference.tokens, Some(1000));
        assert_eq!(reference.duration, Some(Duration::from_secs(30)));
        let bigger_spec = lowered(&spec(Some(8000), Some(30)), lease(4000, 60)).unwrap();
        assert_eq!(
            bigger_spec.tokens,
            Some(4000),
            "the lease's 4000 lowers the spec's 8000"
        );
        assert_eq!(lowered(&spec(None, None), lease(4000, 60)).unwrap().tokens, Some(4000));
        // Only the pair: 4000 tokens with another duration is an ask.
        assert!(lowered(&spec(Some(1000), Some(30)), lease(4000, 20)).is_err());
    }

    #[test]
    fn the_result_holds_the_answer_and_its_fields() {
        let result = result_map("```json\n{\"category\": \"IT\", \"amount\": 12.5}\n```", 1 << 20).unwrap();
        assert_eq!(result["category"], "IT");
        assert_eq!(result["amount"], "12.5");
        assert!(result["output"].starts_with("```json"));
        let result = result_map("{\"output\": \"theirs\"}", 1 << 20).unwrap();
        assert_eq!(result["output"], "{\"output\": \"theirs\"}");
        let plain = result_map("just text", 1 << 20).unwrap();
        assert_eq!(plain.len(), 1);
        assert_eq!(
            result_map(&"x".repeat(100), 50).unwrap_err().kind,
            FailKind::BudgetOutput
        );
        assert_eq!(body("just text"), br#"{"output":"just text"}"#);
        assert_eq!(body(" {\"a\":1} "), br#"{"a":1}"#);
    }
}
