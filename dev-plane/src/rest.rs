//! The REST half of the plane: node registration, heartbeat and listing,
//! as the reference serves them, plus run submission and inspection,
//! which the reference lacks; the agent API is in `agent_api`.
//!
//! JSON follows the reference's conventions (ASP.NET's defaults):
//! camelCase names out, property names matched case-insensitively in,
//! `null` written, map keys kept exactly as sent. Unknown ids get 404 with
//! an empty body; validation errors 400 with `{"error": "..."}`. Bodies are
//! parsed by hand from a `serde_json::Value` because serde matches names
//! case-sensitively.
//!
//! Beyond the reference (see `access`): a POST must say `Content-Type:
//! application/json` (415 otherwise); a node id the connection's client
//! certificate does not carry is 403, when the plane binds them; a change
//! that cannot be saved is 503, and undone.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::{Map, Value};

use super::access::{self, NodeIds, NotThisNode};
use super::ledger::Ledger;
use super::state::{Budgets, Capacity, Invalid, NewRun, NodeStatus, Registration, RegistrationRefused};
use super::store::SaveError;

pub fn router(ledger: Arc<Ledger>) -> Router {
    Router::new()
        // The reference puts a literal after a colon inside a segment.
        // `nodes:register` is a plain static segment to matchit (axum 0.8's
        // router), but matchit 0.8.4 cannot match a capture followed by a
        // literal (`{nodeId}:heartbeat`: "dynamic suffixes are not
        // supported"), so heartbeat is a POST to `/v1/nodes/{target}` whose
        // suffix the handler parses.
        .route("/v1/nodes:register", post(register))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{target}", get(get_node).delete(delete_node).post(heartbeat))
        .route("/v1/runs", post(submit_run).get(list_runs))
        // A static segment, like `nodes:register`.
        .route("/v1/runs:counts", get(run_counts))
        .route("/v1/runs/{run_id}", get(get_run))
        .merge(super::agent_api::routes())
        .route_layer(axum::middleware::from_fn(access::json_only))
        .with_state(ledger)
}

type Ledgered = State<Arc<Ledger>>;

async fn register(State(ledger): Ledgered, Extension(node_ids): Extension<NodeIds>, body: Bytes) -> Response {
    let registration = match parse_registration(&body) {
        Ok(registration) => registration,
        Err(bad) => return bad.into_response(),
    };
    if let Err(bad) = bounded_id("NodeId", &registration.node_id, "node-1", IdKind::Plain) {
        return bad.into_response();
    }
    if let Err(not_this_node) = node_ids.check(&registration.node_id) {
        return forbidden(not_this_node);
    }
    match ledger.write(|state, now| state.register(registration, now)).await {
        Ok(Ok(node)) => created(&format!("/v1/nodes/{}", path_segment(&node.node_id)), &node),
        Ok(Err(RegistrationRefused::Invalid(invalid))) => BadRequest::from(invalid).into_response(),
        Ok(Err(duplicate @ RegistrationRefused::DuplicateKey(_))) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": duplicate.to_string() })),
        )
            .into_response(),
        Err(save) => save_failed(save),
    }
}

async fn heartbeat(
    State(ledger): Ledgered,
    Extension(node_ids): Extension<NodeIds>,
    Path(target): Path<String>,
    body: Bytes,
) -> Response {
    let Some(node_id) = target.strip_suffix(":heartbeat") else {
        // `POST /v1/nodes/{id}` is not a route of the reference either.
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    };
    if let Err(not_this_node) = node_ids.check(node_id) {
        return forbidden(not_this_node);
    }
    let status = match parse_heartbeat(&body) {
        Ok(status) => status,
        Err(bad) => return bad.into_response(),
    };
    match ledger.write(|state, now| state.heartbeat(node_id, status, now)).await {
        Ok(Some(node)) => json(StatusCode::OK, &node),
        Ok(None) => empty(StatusCode::NOT_FOUND),
        Err(save) => save_failed(save),
    }
}

async fn list_nodes(State(ledger): Ledgered) -> Response {
    let nodes: Vec<_> = ledger.read(|state| state.nodes().cloned().collect());
    json(StatusCode::OK, &nodes)
}

async fn get_node(State(ledger): Ledgered, Path(node_id): Path<String>) -> Response {
    match ledger.read(|state| state.node(&node_id).cloned()) {
        Some(node) => json(StatusCode::OK, &node),
        None => empty(StatusCode::NOT_FOUND),
    }
}

async fn delete_node(State(ledger): Ledgered, Path(node_id): Path<String>) -> Response {
    match ledger.write(|state, _| state.remove_node(&node_id)).await {
        Ok(true) => empty(StatusCode::NO_CONTENT),
        Ok(false) => empty(StatusCode::NOT_FOUND),
        Err(save) => save_failed(save),
    }
}

async fn submit_run(State(ledger): Ledgered, body: Bytes) -> Response {
    let new_run = match parse_new_run(&body) {
        Ok(new_run) => new_run,
        Err(bad) => return bad.into_response(),
    };
    let bounds = bounded_id("AgentId", &new_run.agent_id, "invoice-classifier", IdKind::Plain)
        .and_then(|()| bounded_id("Version", &new_run.version, "1.0.0", IdKind::Version));
    if let Err(bad) = bounds {
        return bad.into_response();
    }
    match ledger.write(|state, now| state.submit(new_run, now)).await {
        Ok(Ok(run)) => {
            let location = format!("/v1/runs/{}", path_segment(&run.run_id));
            created(&location, &serde_json::json!({ "runId": run.run_id }))
        }
        Ok(Err(invalid)) => BadRequest::from(invalid).into_response(),
        Err(save) => save_failed(save),
    }
}

/// One page of runs in submission order: `limit` runs (default
/// [`DEFAULT_PAGE`], at most [`MAX_PAGE`]) after the run `after`, or from
/// the first. The body is the same JSON array as ever; when more runs
/// follow, a `Link` header names the next page (`rel="next"`).
async fn list_runs(State(ledger): Ledgered, RawQuery(query): RawQuery) -> Response {
    let (after, limit) = match parse_paging(query.as_deref().unwrap_or_default()) {
        Ok(paging) => paging,
        Err(bad) => return bad.into_response(),
    };
    let page = ledger.read(|state| state.runs_page(after.as_deref(), limit));
    let Some((runs, more)) = page else {
        let after = after.unwrap_or_default();
        return BadRequest(format!(
            "after: no run {after} on this plane; pass the runId of the last run of the previous page \
             (or leave after out to start from the first run)"
        ))
        .into_response();
    };
    let mut response = json(StatusCode::OK, &runs);
    if let (true, Some(last)) = (more, runs.last()) {
        let next = format!(
            "</v1/runs?limit={limit}&after={}>; rel=\"next\"",
            path_segment(&last.run_id)
        );
        if let Ok(value) = header::HeaderValue::from_str(&next) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    response
}

/// How many runs were submitted, wait, and ended: a poll that costs the
/// same however many runs the plane holds (load generators use it).
async fn run_counts(State(ledger): Ledgered) -> Response {
    json(StatusCode::OK, &ledger.read(|state| state.counts()))
}

async fn get_run(State(ledger): Ledgered, Path(run_id): Path<String>) -> Response {
    match ledger.read(|state| state.run(&run_id).cloned()) {
        Some(run) => json(StatusCode::OK, &run),
        None => empty(StatusCode::NOT_FOUND),
    }
}

// ---- responses ---------------------------------------------------------

pub(super) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    (status, Json(body)).into_response()
}

pub(super) fn created<T: Serialize>(location: &str, body: &T) -> Response {
    (
        StatusCode::CREATED,
        [(header::LOCATION, location.to_string())],
        Json(body),
    )
        .into_response()
}

pub(super) fn empty(status: StatusCode) -> Response {
    status.into_response()
}

/// 503: the plane's disk failed, not the request; nothing was changed, so
/// the same request may simply be sent again.
pub(super) fn save_failed(save: SaveError) -> Response {
    let body = serde_json::json!({
        "error": format!("{save}; the request was not carried out: send it again once the file can be written")
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

fn forbidden(not_this_node: NotThisNode) -> Response {
    tracing::warn!(peer = ?not_this_node.peer, "dev control plane refused a request: {not_this_node}");
    let body = serde_json::json!({ "error": not_this_node.to_string() });
    (StatusCode::FORBIDDEN, Json(body)).into_response()
}

/// A 400 with `{"error": message}`.
struct BadRequest(String);

impl From<Invalid> for BadRequest {
    fn from(invalid: Invalid) -> BadRequest {
        BadRequest(invalid.to_string())
    }
}

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": self.0 }))).into_response()
    }
}

/// Percent-encodes what a header value or path segment cannot carry, so an
/// odd node id still gets a valid `Location`.
pub(super) fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:@!$&'()*+,;=".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

// ---- ids and paging ----------------------------------------------------

/// The longest id the REST API takes (agent id, version, node id, a
/// paging cursor), as the node bounds its own `NodeId`.
pub const MAX_ID_BYTES: usize = 128;
/// Runs per page of `GET /v1/runs` when `limit` is not given.
pub const DEFAULT_PAGE: usize = 1_000;
/// The largest `limit` of `GET /v1/runs`.
pub const MAX_PAGE: usize = 10_000;

/// Which characters an id may hold besides RFC 3986's unreserved ones.
#[derive(Clone, Copy, PartialEq)]
enum IdKind {
    Plain,
    /// Also `+`: semver's build metadata (`1.0.0+build.7`).
    Version,
}

/// An id that goes into URLs and file names (the node lays agents out as
/// `<agent_id>/<version>.wasm`): at most [`MAX_ID_BYTES`] of RFC 3986's
/// unreserved characters (and `+` in a version), not `.` or `..`. Empty
/// passes: "X is required" is the state's answer, in the reference's
/// words.
fn bounded_id(field: &str, id: &str, example: &str, kind: IdKind) -> Result<(), BadRequest> {
    let plus = kind == IdKind::Version;
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (plus && b == b'+');
    let also = if plus { ", `+`" } else { "" };
    let problem = if id.len() > MAX_ID_BYTES {
        Some(format!("got {} bytes", id.len()))
    } else if id == "." || id == ".." {
        Some(format!("got {id:?}"))
    } else {
        id.bytes()
            .position(|b| !allowed(b))
            .map(|at| format!("got {:?} at byte {at}", id[at..].chars().next().unwrap_or_default()))
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(BadRequest(format!(
            "{field} must be at most {MAX_ID_BYTES} bytes of letters, digits, `-`, `_`, `.`, `~`{also} \
             (not `.` or `..`), e.g. {example}: it becomes part of URLs and file names; {problem}"
        ))),
    }
}

/// `limit` and `after` of `GET /v1/runs`; any other parameter is refused,
/// so a misspelt one is not silently ignored.
fn parse_paging(query: &str) -> Result<(Option<String>, usize), BadRequest> {
    let mut after = None;
    let mut limit = DEFAULT_PAGE;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=MAX_PAGE).contains(limit))
                    .ok_or_else(|| {
                        BadRequest(format!(
                            "limit must be a whole number from 1 to {MAX_PAGE} (default {DEFAULT_PAGE}); got {:?}",
                            truncated(value)
                        ))
                    })?;
            }
            "after" => {
                let id = percent_decoded(value)
                    .ok_or_else(|| BadRequest("after must be a percent-encoded UTF-8 run id".to_string()))?;
                if id.len() > MAX_ID_BYTES {
                    return Err(BadRequest(format!(
                        "after must be a run id of at most {MAX_ID_BYTES} bytes; got {} bytes",
                        id.len()
                    )));
                }
                after = Some(id);
            }
            other => {
                return Err(BadRequest(format!(
                    "GET /v1/runs takes limit and after, not {:?}; e.g. /v1/runs?limit=100&after=<runId>",
                    truncated(other)
                )));
            }
        }
    }
    Ok((after, limit))
}

/// At most 64 characters of what a client sent, for an error message.
fn truncated(text: &str) -> String {
    text.chars().take(64).collect()
}

fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

// ---- request bodies ----------------------------------------------------

fn parse_registration(body: &[u8]) -> Result<Registration, BadRequest> {
    let object = parse_object(body)?;
    let fields = Fields::top(&object);
    let capacity = match fields.object("capacity")? {
        Some(capacity) => Capacity {
            slots: capacity.int32("slots")?.unwrap_or(0),
            cpu: capacity.string("cpu")?,
            memory: capacity.string("memory")?,
        },
        None => Capacity::default(),
    };
    Ok(Registration {
        node_id: fields.string("nodeId")?,
        metadata: fields.strings("metadata")?,
        capacity,
    })
}

fn parse_heartbeat(body: &[u8]) -> Result<NodeStatus, BadRequest> {
    let object = parse_object(body)?;
    let status = Fields::top(&object)
        .object("status")?
        .ok_or_else(|| BadRequest("Status is required".to_string()))?;
    Ok(NodeStatus {
        state: status.string("state")?,
        active_runs: status.int32("activeRuns")?.unwrap_or(0),
        available_slots: status.int32("availableSlots")?.unwrap_or(0),
    })
}

fn parse_new_run(body: &[u8]) -> Result<NewRun, BadRequest> {
    let object = parse_object(body)?;
    let fields = Fields::top(&object);
    let budgets = match fields.object("budgets")? {
        Some(budgets) => Budgets {
            max_tokens: budgets.int32("maxTokens")?,
            max_duration_seconds: budgets.int32("maxDurationSeconds")?,
            max_fuel: budgets.int64("maxFuel")?,
            max_memory_bytes: budgets.int64("maxMemoryBytes")?,
        },
        None => Budgets::default(),
    };
    Ok(NewRun {
        agent_id: fields.string("agentId")?,
        version: fields.string("version")?,
        input_ref: fields.strings("inputRef")?,
        metadata: fields.strings("metadata")?,
        budgets,
    })
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, BadRequest> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(BadRequest("the request body must be a JSON object".to_string())),
        Err(err) => Err(BadRequest(format!("the request body is not valid JSON: {err}"))),
    }
}

/// Case-insensitive access to one JSON object's properties, with errors
/// that name the property (`capacity.slots must be an integer`).
struct Fields<'a> {
    object: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn top(object: &'a Map<String, Value>) -> Fields<'a> {
        Fields {
            object,
            prefix: String::new(),
        }
    }

    /// The property, matched ignoring ASCII case (the last one wins if the
    /// body has several); `null` counts as absent.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.object
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
            .next_back()
            .filter(|value| !value.is_null())
    }

    fn bad(&self, name: &str, expected: &str) -> BadRequest {
        BadRequest(format!("{}{name} must be {expected}", self.prefix))
    }

    /// A string property; absent reads as empty, so "required" checks see
    /// one rule for both.
    fn string(&self, name: &str) -> Result<String, BadRequest> {
        match self.get(name) {
            None => Ok(String::new()),
            Some(Value::String(value)) => Ok(value.clone()),
            Some(_) => Err(self.bad(name, "a string")),
        }
    }

    fn int64(&self, name: &str) -> Result<Option<i64>, BadRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.bad(name, "a 64-bit integer")),
        }
    }

    fn int32(&self, name: &str) -> Result<Option<i32>, BadRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_i64()
                .and_then(|value| i32::try_from(value).ok())
                .map(Some)
                .ok_or_else(|| self.bad(name, "a 32-bit integer")),
        }
    }

    fn object(&self, name: &str) -> Result<Option<Fields<'a>>, BadRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(object)) => Ok(Some(Fields {
                object,
                prefix: format!("{}{name}.", self.prefix),
            })),
            Some(_) => Err(self.bad(name, "an object")),
        }
    }

    /// A map of strings; its keys are data, kept exactly as sent.
    fn strings(&self, name: &str) -> Result<BTreeMap<String, String>, BadRequest> {
        let Some(map) = self.object(name)? else {
            return Ok(BTreeMap::new());
        };
        map.object
            .iter()
            .map(|(key, value)| match value {
                Value::String(value) => Ok((key.clone(), value.clone())),
                _ => Err(BadRequest(format!("{}{key} must be a string", map.prefix))),
            })
            .collect()
    }
}
