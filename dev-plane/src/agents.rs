//! The reference's declarative agents: an agent is a definition (name,
//! instructions, model profile, budget, tools, connectors), stored with
//! immutable versions that runs name by `agent_id` and `version`.
//!
//! Pure logic, like `state`: the [`Agent`] and [`AgentVersion`] records,
//! reading them from JSON the reference's way (property names matched
//! ignoring case), the reference's spec validation, the semver check, and
//! the [`AgentBook`] that holds them. The book never changes itself: each
//! request asks it for the [`AgentChange`]s it implies, the ledger saves
//! those, and only then applies them, so an agent that cannot be saved is
//! not kept.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The most agents one plane holds.
pub const MAX_AGENTS: usize = 10_000;
/// The most versions one agent has.
pub const MAX_VERSIONS_PER_AGENT: usize = 1_000;
/// The longest agent id or version (as the REST API bounds every id).
pub const MAX_ID_BYTES: usize = 128;
/// The largest agent or version body the plane takes.
pub const MAX_AGENT_BODY_BYTES: usize = 256 * 1024;
/// The most bytes of agents and versions (as JSON) one plane holds: the
/// counts alone would let a client make it hold gigabytes.
pub const MAX_BOOK_BYTES: usize = 64 << 20;

/// The version a definition file without a top-level `"version"` gets.
pub const DEFAULT_FILE_VERSION: &str = "1.0.0";

/// An agent, as the reference's API shows it (camelCase; absent values
/// written as `null`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub agent_id: String,
    pub name: String,
    pub description: Option<String>,
    pub instructions: Option<String>,
    /// Free-form; in practice `model`, `temperature`, `maxTokens`.
    pub model_profile: Option<Map<String, Value>>,
    pub budget: Option<AgentBudget>,
    #[serde(default)]
    pub tools: Vec<String>,
    pub input: Option<Connector>,
    pub output: Option<Connector>,
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentBudget {
    pub max_tokens: Option<i64>,
    pub max_duration_seconds: Option<i64>,
}

/// An input or output connector: its type and free-form configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Connector {
    #[serde(rename = "type")]
    pub kind: String,
    pub config: Option<Map<String, Value>>,
}

/// One immutable version of an agent, as `GET
/// /v1/agents/{agentId}/versions/{version}` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentVersion {
    pub agent_id: String,
    pub version: String,
    pub spec: Agent,
    /// RFC 3339 UTC.
    pub created_at: String,
}

// ---- reading JSON the reference's way ----------------------------------

/// Case-insensitive access to one JSON object's properties (ASP.NET's
/// default), with errors that name the property.
struct Props<'a> {
    object: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Props<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.object
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
            .next_back()
            .filter(|value| !value.is_null())
    }

    fn has(&self, name: &str) -> bool {
        self.object.keys().any(|key| key.eq_ignore_ascii_case(name))
    }

    fn bad(&self, name: &str, expected: &str) -> String {
        format!("{}{name} must be {expected}", self.prefix)
    }

    fn string(&self, name: &str) -> Result<Option<String>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(self.bad(name, "a string")),
        }
    }

    fn int(&self, name: &str) -> Result<Option<i64>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value.as_i64().map(Some).ok_or_else(|| self.bad(name, "a whole number")),
        }
    }

    fn object(&self, name: &str) -> Result<Option<Props<'a>>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(object)) => Ok(Some(Props {
                object,
                prefix: format!("{}{name}.", self.prefix),
            })),
            Some(_) => Err(self.bad(name, "an object")),
        }
    }

    /// A free-form map, kept exactly as sent.
    fn map(&self, name: &str) -> Result<Option<Map<String, Value>>, String> {
        Ok(self.object(name)?.map(|props| props.object.clone()))
    }

    fn strings(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
        let Some(props) = self.object(name)? else {
            return Ok(None);
        };
        props
            .object
            .iter()
            .map(|(key, value)| match value {
                Value::String(text) => Ok((key.clone(), text.clone())),
                _ => Err(format!("{}{key} must be a string", props.prefix)),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn list(&self, name: &str) -> Result<Option<Vec<String>>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.bad(name, "a list of strings"))
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(_) => Err(self.bad(name, "a list of strings")),
        }
    }

    fn connector(&self, name: &str) -> Result<Option<Connector>, String> {
        let Some(props) = self.object(name)? else {
            return Ok(None);
        };
        Ok(Some(Connector {
            kind: props.string("type")?.unwrap_or_default(),
            config: props.map("config")?,
        }))
    }
}

/// Parses a JSON body as an object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err("the request body must be a JSON object".to_string()),
        Err(err) => Err(format!("the request body is not valid JSON: {err}")),
    }
}

impl Agent {
    /// An agent from its JSON object, property names matched ignoring
    /// case. Only types are checked here; see [`validate_spec`].
    pub fn from_json(object: &Map<String, Value>) -> Result<Agent, String> {
        Agent::default().updated_from(object)
    }

    /// This agent with the properties `object` carries replaced (PUT's
    /// partial update); `agentId` is never taken from a body.
    pub fn updated_from(mut self, object: &Map<String, Value>) -> Result<Agent, String> {
        let props = Props {
            object,
            prefix: String::new(),
        };
        if props.has("name") {
            self.name = props.string("name")?.unwrap_or_default();
        }
        if props.has("description") {
            self.description = props.string("description")?;
        }
        if props.has("instructions") {
            self.instructions = props.string("instructions")?;
        }
        if props.has("modelProfile") {
            self.model_profile = props.map("modelProfile")?;
        }
        if props.has("budget") {
            self.budget = match props.object("budget")? {
                Some(budget) => Some(AgentBudget {
                    max_tokens: budget.int("maxTokens")?,
                    max_duration_seconds: budget.int("maxDurationSeconds")?,
                }),
                None => None,
            };
        }
        if props.has("tools") {
            self.tools = props.list("tools")?.unwrap_or_default();
        }
        if props.has("input") {
            self.input = props.connector("input")?;
        }
        if props.has("output") {
            self.output = props.connector("output")?;
        }
        if props.has("metadata") {
            self.metadata = props.strings("metadata")?;
        }
        Ok(self)
    }
}

/// The top-level `agentId` and `version` of a definition file, if given.
pub fn file_ids(object: &Map<String, Value>) -> Result<(Option<String>, Option<String>), String> {
    let props = Props {
        object,
        prefix: String::new(),
    };
    Ok((props.string("agentId")?, props.string("version")?))
}

// ---- validation ----------------------------------------------------------

/// The connector types the reference's validator accepts (compared lower
/// case)...
const CONNECTOR_TYPES: [&str; 5] = ["service-bus", "http", "kafka", "storage", "sql"];
/// ...and the spelling its own definition files use, which its validator
/// rejects (`Http` lowers to `http` already).
const FILE_SPELLINGS: [&str; 1] = ["servicebus"];

/// Why a spec fails validation, one message per problem (empty: valid):
/// the reference's rules, each message naming the field and the bound.
pub fn validate_spec(spec: &Agent) -> Vec<String> {
    let mut errors = Vec::new();
    if spec.name.trim().is_empty() {
        errors.push("Name is required".to_string());
    }
    if spec.instructions.as_deref().is_none_or(|text| text.trim().is_empty()) {
        errors.push("Instructions are required".to_string());
    }
    if let Some(budget) = &spec.budget {
        if let Some(tokens) = budget.max_tokens
            && !(1..=128_000).contains(&tokens)
        {
            errors.push(format!("Budget.MaxTokens must be between 1 and 128000; got {tokens}"));
        }
        if let Some(seconds) = budget.max_duration_seconds
            && !(1..=3600).contains(&seconds)
        {
            errors.push(format!(
                "Budget.MaxDurationSeconds must be between 1 and 3600; got {seconds}"
            ));
        }
    }
    for (side, connector) in [("Input", &spec.input), ("Output", &spec.output)] {
        let Some(connector) = connector else { continue };
        let kind = connector.kind.trim().to_lowercase();
        if kind.is_empty() {
            errors.push(format!(
                "{side}.Type is required: one of {}",
                CONNECTOR_TYPES.join(", ")
            ));
        } else if !CONNECTOR_TYPES.contains(&kind.as_str()) && !FILE_SPELLINGS.contains(&kind.as_str()) {
            errors.push(format!(
                "{side}.Type {:?} is not supported: use one of {} (ServiceBus and Http are accepted too)",
                connector.kind,
                CONNECTOR_TYPES.join(", ")
            ));
        }
    }
    let mut seen = HashSet::new();
    for tool in &spec.tools {
        if tool.trim().is_empty() {
            errors.push("Tools must not hold a blank name".to_string());
        } else if !seen.insert(tool.as_str()) {
            errors.push(format!("Tools lists {tool:?} more than once"));
        }
    }
    errors
}

/// Whether `text` is a semantic version (semver.org 2.0.0):
/// MAJOR.MINOR.PATCH without leading zeros, then an optional
/// `-pre.release` and an optional `+build.metadata`, each of dot-separated
/// non-empty identifiers of ASCII letters, digits and `-` (numeric
/// pre-release identifiers without leading zeros).
pub fn is_semver(text: &str) -> bool {
    let (rest, build) = match text.split_once('+') {
        Some((rest, build)) => (rest, Some(build)),
        None => (text, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (rest, None),
    };
    let identifier = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let numeric = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    let no_leading_zero = |part: &str| part == "0" || !part.starts_with('0');
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|part| numeric(part) && no_leading_zero(part))
        && pre.is_none_or(|pre| {
            pre.split('.')
                .all(|part| identifier(part) && (!numeric(part) || no_leading_zero(part)))
        })
        && build.is_none_or(|build| build.split('.').all(identifier))
}

/// Why `id` cannot be an agent id (it goes into URLs and node file
/// names): at most [`MAX_ID_BYTES`] of letters, digits, `-`, `_`, `.`,
/// `~`, not `.` or `..`.
pub fn agent_id_problem(id: &str) -> Option<String> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.~".contains(&b);
    if id.is_empty() {
        Some("AgentId is required".to_string())
    } else if id.len() > MAX_ID_BYTES || id == "." || id == ".." || !id.bytes().all(allowed) {
        Some(format!(
            "AgentId must be at most {MAX_ID_BYTES} bytes of letters, digits, `-`, `_`, `.`, `~` (not `.` or `..`): \
             it becomes part of URLs and file names; got {:?}",
            id.chars().take(64).collect::<String>()
        ))
    } else {
        None
    }
}

/// Why `version` cannot be a version: required, semver, bounded.
pub fn version_problem(version: &str) -> Option<String> {
    if version.is_empty() {
        Some("Version is required".to_string())
    } else if version.len() > MAX_ID_BYTES {
        Some(format!(
            "Version must be at most {MAX_ID_BYTES} bytes; got {} bytes",
            version.len()
        ))
    } else if !is_semver(version) {
        Some(format!(
            "Version {:?} is not a semantic version: give MAJOR.MINOR.PATCH, optionally with -pre.release \
             and +build, e.g. 1.0.0 or 2.1.0-beta.1",
            version
        ))
    } else {
        None
    }
}

// ---- the book ------------------------------------------------------------

/// One change to the agents, as the store writes it and the book applies it.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentChange {
    PutAgent(Agent),
    /// The agent and every version it has.
    DeleteAgent {
        agent_id: String,
        versions: Vec<String>,
    },
    PutVersion(AgentVersion),
    DeleteVersion {
        agent_id: String,
        version: String,
    },
}

/// Why a request about agents is refused; REST maps each to its status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentRefusal {
    /// 400.
    #[error("{0}")]
    Invalid(String),
    /// 400 `{"error":"Spec validation failed","errors":[...]}`.
    #[error("Spec validation failed: {}", .0.join("; "))]
    Spec(Vec<String>),
    /// 404 (empty body).
    #[error("not found")]
    NotFound,
    /// 409.
    #[error("{0}")]
    Conflict(String),
}

#[derive(Clone, Debug, Default)]
struct Entry {
    agent: Agent,
    /// In the order they were created.
    versions: Vec<AgentVersion>,
}

/// The agents a plane holds, with their versions.
#[derive(Debug, Default)]
pub struct AgentBook {
    agents: BTreeMap<String, Entry>,
    /// What they take as JSON, bounded by [`MAX_BOOK_BYTES`].
    bytes: usize,
}

/// What `value` takes as JSON.
fn json_bytes(value: &impl Serialize) -> usize {
    serde_json::to_vec(value).map_or(0, |json| json.len())
}

impl AgentBook {
    /// Refuses a change that would take the book past [`MAX_BOOK_BYTES`].
    fn room_for(&self, adding: usize) -> Result<(), AgentRefusal> {
        if self.bytes.saturating_add(adding) > MAX_BOOK_BYTES {
            return Err(AgentRefusal::Invalid(format!(
                "this plane holds {} bytes of agents and versions, and this one ({adding} bytes) \
                 would take it past the {MAX_BOOK_BYTES} it keeps; delete agents or versions first",
                self.bytes
            )));
        }
        Ok(())
    }

    /// The JSON bytes of an agent with its versions.
    fn entry_bytes(entry: &Entry) -> usize {
        json_bytes(&entry.agent) + entry.versions.iter().map(json_bytes).sum::<usize>()
    }
}

impl AgentBook {
    /// The book from what the store saved; versions in creation order.
    pub fn from_saved(agents: Vec<Agent>, mut versions: Vec<AgentVersion>) -> AgentBook {
        let mut book = AgentBook::default();
        for agent in agents {
            book.agents.insert(
                agent.agent_id.clone(),
                Entry {
                    agent,
                    versions: Vec::new(),
                },
            );
        }
        versions.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        for version in versions {
            if let Some(entry) = book.agents.get_mut(&version.agent_id) {
                entry.versions.push(version);
            }
        }
        book.bytes = book.agents.values().map(AgentBook::entry_bytes).sum();
        book
    }

    /// All agents, by id.
    pub fn agents(&self) -> Vec<Agent> {
        self.agents.values().map(|entry| entry.agent.clone()).collect()
    }

    pub fn agent(&self, agent_id: &str) -> Option<&Agent> {
        self.agents.get(agent_id).map(|entry| &entry.agent)
    }

    /// The agent's versions in creation order; `None` for an unknown agent.
    pub fn versions(&self, agent_id: &str) -> Option<&[AgentVersion]> {
        self.agents.get(agent_id).map(|entry| entry.versions.as_slice())
    }

    pub fn version(&self, agent_id: &str, version: &str) -> Option<&AgentVersion> {
        self.versions(agent_id)?.iter().find(|v| v.version == version)
    }

    /// `POST /v1/agents`: the new agent (under `agent_id`, the server's
    /// choice) as a change. Only the name is required, as in the reference.
    pub fn create(&self, mut agent: Agent, agent_id: String) -> Result<AgentChange, AgentRefusal> {
        if agent.name.trim().is_empty() {
            return Err(AgentRefusal::Invalid("Name is required".to_string()));
        }
        if self.agents.len() >= MAX_AGENTS {
            return Err(AgentRefusal::Invalid(format!(
                "this plane holds {MAX_AGENTS} agents, the most it keeps; delete one \
                 (DELETE /v1/agents/{{agentId}}) before creating another"
            )));
        }
        agent.agent_id = agent_id;
        self.room_for(json_bytes(&agent))?;
        Ok(AgentChange::PutAgent(agent))
    }

    /// `PUT /v1/agents/{agentId}`: the properties `update` carries replace
    /// the agent's.
    pub fn update(&self, agent_id: &str, update: &Map<String, Value>) -> Result<AgentChange, AgentRefusal> {
        let entry = self.agents.get(agent_id).ok_or(AgentRefusal::NotFound)?;
        let mut agent = entry
            .agent
            .clone()
            .updated_from(update)
            .map_err(AgentRefusal::Invalid)?;
        if agent.name.trim().is_empty() {
            return Err(AgentRefusal::Invalid("Name is required".to_string()));
        }
        agent.agent_id = agent_id.to_string();
        // The agent it replaces gives its room back.
        self.room_for(json_bytes(&agent).saturating_sub(json_bytes(&entry.agent)))?;
        Ok(AgentChange::PutAgent(agent))
    }

    pub fn delete(&self, agent_id: &str) -> Result<AgentChange, AgentRefusal> {
        let entry = self.agents.get(agent_id).ok_or(AgentRefusal::NotFound)?;
        Ok(AgentChange::DeleteAgent {
            agent_id: agent_id.to_string(),
            versions: entry.versions.iter().map(|v| v.version.clone()).collect(),
        })
    }

    /// `POST /v1/agents/{agentId}:version`: 400 for a bad version or spec,
    /// 409 for an unknown agent or an existing version. The spec is stored
    /// under the agent's id, whatever `agentId` it carried.
    pub fn add_version(
        &self,
        agent_id: &str,
        version: &str,
        spec: Option<Agent>,
        created_at: String,
    ) -> Result<AgentChange, AgentRefusal> {
        if let Some(problem) = version_problem(version) {
            return Err(AgentRefusal::Invalid(problem));
        }
        let Some(mut spec) = spec else {
            return Err(AgentRefusal::Invalid("Spec is required".to_string()));
        };
        let errors = validate_spec(&spec);
        if !errors.is_empty() {
            return Err(AgentRefusal::Spec(errors));
        }
        let Some(entry) = self.agents.get(agent_id) else {
            return Err(AgentRefusal::Conflict(format!(
                "Agent {agent_id} does not exist; create it first (POST /v1/agents)"
            )));
        };
        if entry.versions.iter().any(|v| v.version == version) {
            return Err(AgentRefusal::Conflict(format!(
                "Version {version} of agent {agent_id} already exists; versions are immutable: publish a new version"
            )));
        }
        if entry.versions.len() >= MAX_VERSIONS_PER_AGENT {
            return Err(AgentRefusal::Invalid(format!(
                "agent {agent_id} has {MAX_VERSIONS_PER_AGENT} versions, the most this plane keeps per agent; \
                 delete one (DELETE /v1/agents/{agent_id}/versions/{{version}}) first"
            )));
        }
        spec.agent_id = agent_id.to_string();
        let version = AgentVersion {
            agent_id: agent_id.to_string(),
            version: version.to_string(),
            spec,
            created_at,
        };
        self.room_for(json_bytes(&version))?;
        Ok(AgentChange::PutVersion(version))
    }

    pub fn delete_version(&self, agent_id: &str, version: &str) -> Result<AgentChange, AgentRefusal> {
        self.version(agent_id, version).ok_or(AgentRefusal::NotFound)?;
        Ok(AgentChange::DeleteVersion {
            agent_id: agent_id.to_string(),
            version: version.to_string(),
        })
    }

    /// Applies a change the store has saved.
    pub fn apply(&mut self, change: AgentChange) {
        // What the change takes away and adds, measured on the parts it
        // touches only.
        let (removed, added) = match &change {
            AgentChange::PutAgent(agent) => (
                self.agents
                    .get(&agent.agent_id)
                    .map_or(0, |entry| json_bytes(&entry.agent)),
                json_bytes(agent),
            ),
            AgentChange::DeleteAgent { agent_id, .. } => {
                (self.agents.get(agent_id).map_or(0, AgentBook::entry_bytes), 0)
            }
            AgentChange::PutVersion(version) => (
                self.version(&version.agent_id, &version.version).map_or(0, json_bytes),
                json_bytes(version),
            ),
            AgentChange::DeleteVersion { agent_id, version } => {
                (self.version(agent_id, version).map_or(0, json_bytes), 0)
            }
        };
        self.apply_unmeasured(change);
        self.bytes = self.bytes.saturating_sub(removed) + added;
    }

    fn apply_unmeasured(&mut self, change: AgentChange) {
        match change {
            AgentChange::PutAgent(agent) => {
                let entry = self.agents.entry(agent.agent_id.clone()).or_default();
                entry.agent = agent;
            }
            AgentChange::DeleteAgent { agent_id, .. } => {
                self.agents.remove(&agent_id);
            }
            AgentChange::PutVersion(version) => {
                if let Some(entry) = self.agents.get_mut(&version.agent_id) {
                    entry.versions.retain(|v| v.version != version.version);
                    entry.versions.push(version);
                }
            }
            AgentChange::DeleteVersion { agent_id, version } => {
                if let Some(entry) = self.agents.get_mut(&agent_id) {
                    entry.versions.retain(|v| v.version != version);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: Value) -> Agent {
        Agent::from_json(value.as_object().unwrap()).unwrap()
    }

    fn valid() -> Value {
        json!({
            "name": "Invoice classifier",
            "instructions": "Classify the invoice.",
            "budget": {"maxTokens": 4000, "maxDurationSeconds": 60},
            "tools": ["http-post"],
            "input": {"type": "ServiceBus", "config": {"queue": "invoices"}},
            "output": {"type": "Http", "config": {"endpoint": "http://127.0.0.1:8089/invoices"}},
        })
    }

    #[test]
    fn the_book_is_bounded_in_bytes_and_a_deletion_gives_the_room_back() {
        let mut book = AgentBook::default();
        book.apply(
            book.create(
                Agent {
                    name: "big".into(),
                    ..Agent::default()
                },
                "big".into(),
            )
            .unwrap(),
        );
        let mut large = valid();
        large["instructions"] = json!("x".repeat(200 * 1024));
        let mut added = 0;
        loop {
            match book.add_version("big", &format!("1.0.{added}"), Some(spec(large.clone())), "t".into()) {
                Ok(change) => {
                    book.apply(change);
                    added += 1;
                    assert!(added < 1000, "never refused");
                }
                Err(AgentRefusal::Invalid(message)) => {
                    assert!(message.contains("delete agents or versions"), "{message}");
                    break;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        assert!(
            book.bytes <= MAX_BOOK_BYTES && added >= 300,
            "{added} versions, {} bytes",
            book.bytes
        );
        // Nor can an update of an agent take it past the bound.
        let mut update = Map::new();
        update.insert(
            "description".into(),
            json!("d".repeat(MAX_BOOK_BYTES - book.bytes + 100)),
        );
        let updated = book.update("big", &update);
        assert!(
            matches!(updated, Err(AgentRefusal::Invalid(_))),
            "at {} bytes, adding {}",
            book.bytes,
            update["description"].as_str().unwrap().len()
        );
        book.apply(book.delete_version("big", "1.0.0").unwrap());
        assert!(book.add_version("big", "2.0.0", Some(spec(large)), "t".into()).is_ok());
    }

    #[test]
    fn semver_takes_core_pre_release_and_build_and_nothing_else() {
        for good in [
            "0.0.0",
            "1.0.0",
            "10.20.30",
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-0.3.7",
            "1.0.0-x.7.z.92",
            "1.0.0+20130313144700",
            "1.0.0-beta+exp.sha.5114f85",
            "1.0.0-x-y-z.--",
        ] {
            assert!(is_semver(good), "{good}");
        }
        for bad in [
            "",
            "1",
            "1.0",
            "1.0.0.0",
            "01.0.0",
            "1.02.0",
            "1.0.00",
            "v1.0.0",
            "1.0.0-",
            "1.0.0+",
            "1.0.0-01",
            "1.0.0-a..b",
            "1.0.0+a..b",
            "1.0.0-a_b",
            "1.0.0 ",
            "a.b.c",
            "1.0.-1",
            "-1.0.0",
        ] {
            assert!(!is_semver(bad), "{bad}");
        }
    }

    #[test]
    fn a_valid_spec_in_the_reference_files_spelling_passes() {
        assert_eq!(validate_spec(&spec(valid())), Vec::<String>::new());
        let lower = json!({"name": "a", "instructions": "b", "input": {"type": "service-bus"},
                           "output": {"type": "KAFKA"}});
        assert_eq!(validate_spec(&spec(lower)), Vec::<String>::new());
    }

    #[test]
    fn every_rule_of_the_reference_validator_is_enforced_with_a_message_each() {
        let bad = json!({
            "name": " ",
            "budget": {"maxTokens": 128_001, "maxDurationSeconds": 0},
            "tools": ["http-post", "", "http-post"],
            "input": {"type": "ftp"},
            "output": {"config": {}},
        });
        let errors = validate_spec(&spec(bad));
        let expected = [
            "Name is required",
            "Instructions are required",
            "Budget.MaxTokens must be between 1 and 128000",
            "Budget.MaxDurationSeconds must be between 1 and 3600",
            "Input.Type \"ftp\" is not supported",
            "Output.Type is required",
            "Tools must not hold a blank name",
            "Tools lists \"http-post\" more than once",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:?}");
        for (error, start) in errors.iter().zip(expected) {
            assert!(error.starts_with(start), "{error} / {start}");
        }
        let edges = json!({"name": "a", "instructions": "b",
                           "budget": {"maxTokens": 1, "maxDurationSeconds": 3600}});
        assert!(validate_spec(&spec(edges)).is_empty());
        let over = json!({"name": "a", "instructions": "b", "budget": {"maxTokens": 0, "maxDurationSeconds": 3601}});
        assert_eq!(validate_spec(&spec(over)).len(), 2);
    }

    #[test]
    fn properties_are_read_ignoring_case_and_typed_with_errors_that_name_them() {
        let agent = spec(json!({"NAME": "x", "Instructions": "y", "Budget": {"MAXTOKENS": 5},
                               "Output": {"Type": "Http", "Config": {"Endpoint": "e"}}}));
        assert_eq!(agent.name, "x");
        assert_eq!(agent.budget.unwrap().max_tokens, Some(5));
        assert_eq!(agent.output.as_ref().unwrap().kind, "Http");
        // Free-form maps keep their keys as sent.
        assert_eq!(agent.output.unwrap().config.unwrap()["Endpoint"], "e");
        let wrong = Agent::from_json(json!({"budget": {"maxTokens": "many"}}).as_object().unwrap());
        assert_eq!(wrong.unwrap_err(), "budget.maxTokens must be a whole number");
        let wrong = Agent::from_json(json!({"tools": "http-post"}).as_object().unwrap());
        assert_eq!(wrong.unwrap_err(), "tools must be a list of strings");
    }

    #[test]
    fn versions_are_refused_when_bad_or_taken_and_an_unknown_agent_is_a_conflict() {
        let mut book = AgentBook::default();
        let change = book.create(spec(valid()), "a1".to_string()).unwrap();
        book.apply(change);
        let add = |book: &AgentBook, id: &str, version: &str| {
            book.add_version(id, version, Some(spec(valid())), "2026-01-01T00:00:00Z".to_string())
        };
        assert!(matches!(add(&book, "a1", ""), Err(AgentRefusal::Invalid(m)) if m == "Version is required"));
        assert!(matches!(add(&book, "a1", "1.0"), Err(AgentRefusal::Invalid(_))));
        assert!(matches!(add(&book, "nope", "1.0.0"), Err(AgentRefusal::Conflict(_))));
        let change = add(&book, "a1", "1.0.0").unwrap();
        book.apply(change);
        assert!(matches!(add(&book, "a1", "1.0.0"), Err(AgentRefusal::Conflict(_))));
        assert_eq!(book.version("a1", "1.0.0").unwrap().spec.agent_id, "a1");
        let no_spec = book.add_version("a1", "2.0.0", None, String::new());
        assert_eq!(no_spec, Err(AgentRefusal::Invalid("Spec is required".to_string())));
        let change = book.delete("a1").unwrap();
        assert_eq!(
            change,
            AgentChange::DeleteAgent {
                agent_id: "a1".to_string(),
                versions: vec!["1.0.0".to_string()]
            }
        );
    }

    #[test]
    fn the_book_holds_at_most_so_many_agents() {
        let mut book = AgentBook::default();
        for i in 0..MAX_AGENTS {
            book.agents.insert(format!("a{i}"), Entry::default());
        }
        let refused = book.create(spec(valid()), "one-more".to_string()).unwrap_err();
        assert!(refused.to_string().contains("delete one"), "{refused}");

        let entry = book.agents.get_mut("a0").unwrap();
        for i in 0..MAX_VERSIONS_PER_AGENT {
            entry.versions.push(AgentVersion {
                agent_id: "a0".to_string(),
                version: format!("1.0.{i}"),
                spec: Agent::default(),
                created_at: String::new(),
            });
        }
        let refused = book
            .add_version("a0", "2.0.0", Some(spec(valid())), String::new())
            .unwrap_err();
        assert!(
            matches!(&refused, AgentRefusal::Invalid(m) if m.contains("1000 versions")),
            "{refused}"
        );
    }
}
