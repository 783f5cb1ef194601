//! The REST agent API, as the reference serves it (contract §3): agents
//! (`/v1/agents`, `/v1/agents/{agentId}`) and their immutable versions
//! (`/v1/agents/{agentId}:version`, `/v1/agents/{agentId}/versions[/{version}]`),
//! which nodes read to run declarative agents.
//!
//! Status codes are the reference's: 201 with `Location` on creation, 400
//! `{"error": ...}` for a missing name or a bad version, 400 `{"error":
//! "Spec validation failed", "errors": [...]}` for a bad spec, 409 for a
//! version of an unknown agent or one that exists, 404 with an empty body
//! for an unknown id. Beyond the reference: a body over
//! [`MAX_AGENT_BODY_BYTES`] is 413, and the number of agents and versions
//! is bounded (400 naming the bound), so a client cannot make the plane
//! hold without limit; a change that cannot be saved is 503 and not kept.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value};

use super::agents::{self, Agent, AgentChange, AgentRefusal, MAX_AGENT_BODY_BYTES};
use super::ledger::Ledger;
use super::rest::{created, empty, json, path_segment, save_failed};
use super::state::iso8601;

type Ledgered = State<Arc<Ledger>>;

pub fn routes() -> Router<Arc<Ledger>> {
    // `{agentId}:version` is a capture followed by a literal, which
    // matchit cannot route (see `rest`): it is a POST to
    // `/v1/agents/{target}` whose suffix the handler parses.
    Router::new()
        .route("/v1/agents", get(list_agents).post(create_agent))
        .route(
            "/v1/agents/{target}",
            get(get_agent).put(update_agent).delete(delete_agent).post(add_version),
        )
        .route("/v1/agents/{agent_id}/versions", get(list_versions))
        .route(
            "/v1/agents/{agent_id}/versions/{version}",
            get(get_version).delete(delete_version),
        )
}

async fn list_agents(State(ledger): Ledgered) -> Response {
    json(StatusCode::OK, &ledger.read_agents(agents::AgentBook::agents))
}

async fn create_agent(State(ledger): Ledgered, body: Body) -> Response {
    let object = match read_object(body).await {
        Ok(object) => object,
        Err(refused) => return refused,
    };
    let agent = match Agent::from_json(&object) {
        Ok(agent) => agent,
        Err(problem) => return bad_request(problem),
    };
    let agent_id = uuid::Uuid::new_v4().hyphenated().to_string();
    match ledger.change_agents(|book, _| book.create(agent, agent_id)).await {
        Ok(Ok(AgentChange::PutAgent(agent))) => {
            created(&format!("/v1/agents/{}", path_segment(&agent.agent_id)), &agent)
        }
        Ok(Ok(_)) => unreachable!("create puts an agent"),
        Ok(Err(refused)) => refusal(refused),
        Err(save) => save_failed(save),
    }
}

async fn get_agent(State(ledger): Ledgered, Path(agent_id): Path<String>) -> Response {
    match ledger.read_agents(|book| book.agent(&agent_id).cloned()) {
        Some(agent) => json(StatusCode::OK, &agent),
        None => empty(StatusCode::NOT_FOUND),
    }
}

async fn update_agent(State(ledger): Ledgered, Path(agent_id): Path<String>, body: Body) -> Response {
    let object = match read_object(body).await {
        Ok(object) => object,
        Err(refused) => return refused,
    };
    match ledger.change_agents(|book, _| book.update(&agent_id, &object)).await {
        Ok(Ok(AgentChange::PutAgent(agent))) => json(StatusCode::OK, &agent),
        Ok(Ok(_)) => unreachable!("update puts an agent"),
        Ok(Err(refused)) => refusal(refused),
        Err(save) => save_failed(save),
    }
}

async fn delete_agent(State(ledger): Ledgered, Path(agent_id): Path<String>) -> Response {
    match ledger.change_agents(|book, _| book.delete(&agent_id)).await {
        Ok(Ok(_)) => empty(StatusCode::NO_CONTENT),
        Ok(Err(refused)) => refusal(refused),
        Err(save) => save_failed(save),
    }
}

async fn add_version(State(ledger): Ledgered, Path(target): Path<String>, body: Body) -> Response {
    let Some(agent_id) = target.strip_suffix(":version") else {
        // `POST /v1/agents/{id}` is not a route of the reference either.
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    };
    let object = match read_object(body).await {
        Ok(object) => object,
        Err(refused) => return refused,
    };
    let field = |name: &str| {
        object
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
            .next_back()
            .filter(|value| !value.is_null())
    };
    let version = match field("version") {
        None => String::new(),
        Some(Value::String(version)) => version.clone(),
        Some(_) => return bad_request("version must be a string, e.g. \"1.0.0\"".to_string()),
    };
    let spec = match field("spec") {
        None => None,
        Some(Value::Object(spec)) => match Agent::from_json(spec) {
            Ok(spec) => Some(spec),
            Err(problem) => return bad_request(format!("spec.{problem}")),
        },
        Some(_) => return bad_request("spec must be an object: the agent's definition".to_string()),
    };
    let created_at = iso8601(std::time::SystemTime::now());
    match ledger
        .change_agents(|book, _| book.add_version(agent_id, &version, spec, created_at))
        .await
    {
        Ok(Ok(AgentChange::PutVersion(version))) => {
            let location = format!(
                "/v1/agents/{}/versions/{}",
                path_segment(&version.agent_id),
                path_segment(&version.version)
            );
            created(&location, &version)
        }
        Ok(Ok(_)) => unreachable!("add_version puts a version"),
        Ok(Err(refused)) => refusal(refused),
        Err(save) => save_failed(save),
    }
}

async fn list_versions(State(ledger): Ledgered, Path(agent_id): Path<String>) -> Response {
    match ledger.read_agents(|book| book.versions(&agent_id).map(<[_]>::to_vec)) {
        Some(versions) => json(StatusCode::OK, &versions),
        None => empty(StatusCode::NOT_FOUND),
    }
}

async fn get_version(State(ledger): Ledgered, Path((agent_id, version)): Path<(String, String)>) -> Response {
    match ledger.read_agents(|book| book.version(&agent_id, &version).cloned()) {
        Some(version) => json(StatusCode::OK, &version),
        None => empty(StatusCode::NOT_FOUND),
    }
}

async fn delete_version(State(ledger): Ledgered, Path((agent_id, version)): Path<(String, String)>) -> Response {
    match ledger
        .change_agents(|book, _| book.delete_version(&agent_id, &version))
        .await
    {
        Ok(Ok(_)) => empty(StatusCode::NO_CONTENT),
        Ok(Err(refused)) => refusal(refused),
        Err(save) => save_failed(save),
    }
}

// ---- bodies and answers ------------------------------------------------

/// The body as a JSON object, at most [`MAX_AGENT_BODY_BYTES`] (413 past
/// that, 400 if it is not a JSON object).
async fn read_object(body: Body) -> Result<Map<String, Value>, Response> {
    let bytes = axum::body::to_bytes(body, MAX_AGENT_BODY_BYTES).await.map_err(|_| {
        let message = format!(
            "the request body is more than {MAX_AGENT_BODY_BYTES} bytes, the most an agent or version may be; \
             shorten the instructions or the connector configuration"
        );
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(serde_json::json!({ "error": message })),
        )
            .into_response()
    })?;
    agents::parse_object(&bytes).map_err(bad_request)
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": message }))).into_response()
}

fn refusal(refused: AgentRefusal) -> Response {
    match refused {
        AgentRefusal::Invalid(message) => bad_request(message),
        AgentRefusal::Spec(errors) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "Spec validation failed", "errors": errors })),
        )
            .into_response(),
        AgentRefusal::NotFound => empty(StatusCode::NOT_FOUND),
        AgentRefusal::Conflict(message) => {
            (StatusCode::CONFLICT, Json(serde_json::json!({ "error": message }))).into_response()
        }
    }
}
