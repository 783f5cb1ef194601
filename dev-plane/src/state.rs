//! The plane's memory and its rules: registered nodes, submitted runs, and
//! how runs move between them (pending -> assigned -> completed | failed,
//! and back to pending when a lease expires).
//!
//! Pure logic: no I/O, no clock, no locks. Every method that depends on
//! time takes `now`, so the unit tests below drive expiry without
//! sleeping. The ledger wraps this in a lock and persists it; REST and
//! gRPC only translate wire messages into these calls. A change the ledger
//! could not save is undone here ([`PlaneState::begin`],
//! [`PlaneState::roll_back`]), so memory never runs ahead of the disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A worker node as the REST API shows it (the reference's Node record).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub node_id: String,
    pub metadata: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub status: NodeStatus,
    /// ISO-8601 UTC; set at registration too, so a new node counts as live.
    pub heartbeat_at: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    pub slots: i32,
    pub cpu: String,
    pub memory: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub state: String,
    pub active_runs: i32,
    pub available_slots: i32,
}

impl Node {
    /// The reference scheduler's rule: only an `active` node with a free
    /// slot gets runs. Heartbeat age is not checked, as in the reference.
    pub fn is_schedulable(&self) -> bool {
        self.status.state == "active" && self.status.available_slots > 0
    }
}

/// What `POST /v1/nodes:register` carries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registration {
    pub node_id: String,
    pub metadata: BTreeMap<String, String>,
    pub capacity: Capacity,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Pending,
    Assigned,
    Completed,
    Failed,
}

/// A run's budgets as submitted; `None` means "not given", which the lease
/// turns into the reference's defaults.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Budgets {
    pub max_tokens: Option<i32>,
    pub max_duration_seconds: Option<i32>,
    pub max_fuel: Option<i64>,
    pub max_memory_bytes: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    pub duration_ms: i64,
    pub queue_time_ms: i64,
    pub execution_time_ms: i64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Costs {
    pub tokens_in: i32,
    pub tokens_out: i32,
    pub usd_cost: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorInfo {
    pub error_message: String,
    pub error_details: String,
    pub retryable: bool,
}

/// A run as `GET /v1/runs/{runId}` shows it, and as the store saves it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub run_id: String,
    pub agent_id: String,
    pub version: String,
    /// The node holding (or that last held) the run; null while pending.
    pub node_id: Option<String>,
    pub status: RunStatus,
    pub input_ref: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub budgets: Budgets,
    pub result: Option<BTreeMap<String, String>>,
    pub timings: Option<Timings>,
    pub costs: Option<Costs>,
    pub error_info: Option<ErrorInfo>,
    /// The current lease, or the last one once the run has an outcome.
    pub lease_id: Option<String>,
    /// When the current lease expires; kept across restarts so a restart
    /// neither extends nor cuts short a lease a node is working on.
    pub lease_deadline_unix_ms: Option<i64>,
    /// When the current lease was acknowledged (null until then).
    pub acked_at: Option<String>,
    /// How many times the run was leased.
    pub attempts: u32,
    /// How many different outcomes were reported: 1 after an exactly-once
    /// report, 2 or more when a node contradicted itself.
    pub outcomes: u32,
    /// How many reports repeated the outcome already recorded, byte for
    /// byte, on the same lease: the at-least-once window of a node that
    /// died after this plane answered but before it forgot the report.
    /// Harmless (the state does not change), counted so tests can see it.
    #[serde(default)]
    pub repeats: u32,
    /// What the node's sandbox measured, from the last report.
    #[serde(default)]
    pub sandbox: Option<SandboxReadings>,
    pub created_at: String,
}

impl Run {
    /// Whether `outcome` is exactly the outcome this run already records.
    fn records(&self, outcome: &Outcome) -> bool {
        match outcome {
            Outcome::Completed { result, timings, costs } => {
                self.status == RunStatus::Completed
                    && self.result.as_ref() == Some(result)
                    && self.timings == *timings
                    && self.costs == *costs
            }
            Outcome::Failed { error, timings } => {
                self.status == RunStatus::Failed && self.error_info.as_ref() == Some(error) && self.timings == *timings
            }
        }
    }
}

/// What `POST /v1/runs` carries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewRun {
    pub agent_id: String,
    pub version: String,
    pub input_ref: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub budgets: Budgets,
}

/// A lease just granted: the run as it now stands (assigned, with its new
/// lease id and deadline) plus the trace id to send with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub run: Run,
    pub trace_id: String,
}

/// The answer to one poll of a Pull stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Poll {
    /// The node is not registered (any more): the stream ends.
    UnknownNode,
    /// Possibly none: no pending run, or the node is draining or full.
    Leases(Vec<Grant>),
}

/// What a node reports about a lease it held.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub lease_id: String,
    pub run_id: String,
    pub node_id: String,
    pub outcome: Outcome,
    /// node-runtime's meters, when the node sent them.
    pub sandbox: Option<SandboxReadings>,
}

/// `SandboxReport` of a Complete or Fail: what the run consumed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SandboxReadings {
    pub fuel_consumed: u64,
    pub peak_memory_bytes: u64,
    pub instantiate_us: u64,
    /// The host's part of `peak_memory_bytes`; absent in runs saved by
    /// an older plane.
    #[serde(default)]
    pub peak_host_bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Completed {
        result: BTreeMap<String, String>,
        timings: Option<Timings>,
        costs: Option<Costs>,
    },
    Failed {
        error: ErrorInfo,
        timings: Option<Timings>,
    },
}

/// How the plane answers a registration for a node id it knows already.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reregistration {
    /// Replace the node, as the reference's in-memory store does.
    #[default]
    Replace,
    /// Refuse with a duplicate-key error, as the reference's Postgres
    /// store does for as long as it lives (REST answers 500), so nodes can
    /// be tested against that behaviour.
    DuplicateKey,
}

/// Why a registration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationRefused {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// Postgres's words, as the reference's 500 carries them.
    #[error(
        "23505: duplicate key value violates unique constraint \"PK_Nodes\": Key (\"NodeId\")=({0}) already exists \
         (this plane answers a re-registration as the reference's Postgres store does: --reregistration-answers-500)"
    )]
    DuplicateKey(String),
}

/// Why a registration or submission is rejected (REST answers 400 with
/// this message, in the reference's wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0} is required")]
    Required(&'static str),
    #[error("{0} must not be negative")]
    Negative(&'static str),
}

/// Why an Ack, Complete or Fail is refused; gRPC answers `success=false`
/// with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("lease {0} was not issued by this control plane")]
    UnknownLease(String),
    #[error("run {0} not found")]
    UnknownRun(String),
    #[error("lease {lease_id} is stale: run {run_id} expired and was re-queued or leased again")]
    StaleLease { lease_id: String, run_id: String },
    #[error("run {run_id} is held by {}, not by node {node_id}", holder_name(.holder))]
    HeldByAnotherNode {
        run_id: String,
        holder: Option<String>,
        node_id: String,
    },
}

fn holder_name(holder: &Option<String>) -> String {
    match holder {
        Some(node) => format!("node {node}"),
        None => "no node".to_string(),
    }
}

/// How many runs the plane holds, by where they are (`GET /v1/runs:counts`).
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunCounts {
    pub submitted: usize,
    /// Waiting for a node (never leased, or re-queued).
    pub pending: usize,
    /// Completed or failed.
    pub finished: usize,
}

/// Nodes and runs. Runs are never deleted, so a run's index in `runs` is
/// stable and doubles as its submission order.
#[derive(Debug, Default)]
pub struct PlaneState {
    nodes: BTreeMap<String, Node>,
    runs: Vec<Run>,
    index: HashMap<String, usize>,
    /// Indices of pending runs; iterating it yields the oldest first.
    pending: BTreeSet<usize>,
    /// Assigned runs by lease deadline (a run assigned without one sorts
    /// first), so expiry looks only at the lapsed ones.
    leased: BTreeSet<(i64, usize)>,
    /// Indices of runs in the order they first reached a final status.
    finished: Vec<usize>,
    /// Bumped on every change to runs (never to nodes, which are not
    /// saved), so the store can tell whether there is anything to write.
    revision: u64,
    /// Set when a change may let an idle Pull find work: a run submitted
    /// or re-queued, a node registered or turned schedulable. A poll
    /// itself never sets it, or a puller would keep waking itself.
    wake_pullers: bool,
    reregistration: Reregistration,
    /// While a change is being saved: how to undo it.
    journal: Option<Journal>,
}

/// What runs looked like when [`PlaneState::begin`] was called, kept only
/// as far as a change touched them. Nodes are not saved, so a failed save
/// never needs to undo a node change.
#[derive(Debug)]
struct Journal {
    revision: u64,
    runs: usize,
    finished: usize,
    /// Each run the change modified, as it was before (the first copy wins).
    before: HashMap<usize, Run>,
}

impl PlaneState {
    pub fn new() -> PlaneState {
        PlaneState::default()
    }

    /// The same state, answering re-registrations as `reregistration` says.
    pub fn with_reregistration(mut self, reregistration: Reregistration) -> PlaneState {
        self.reregistration = reregistration;
        self
    }

    /// Rebuilds the state from saved runs. Assigned runs keep their lease
    /// and deadline; the next expiry pass re-queues those that lapsed while
    /// the plane was down.
    pub fn from_runs(runs: Vec<Run>) -> PlaneState {
        let mut state = PlaneState::new();
        for run in runs {
            if state.index.contains_key(&run.run_id) {
                continue;
            }
            let at = state.runs.len();
            match run.status {
                RunStatus::Pending => {
                    state.pending.insert(at);
                }
                RunStatus::Completed | RunStatus::Failed => state.finished.push(at),
                _ => {}
            }
            if let Some(key) = lease_key(&run, at) {
                state.leased.insert(key);
            }
            state.index.insert(run.run_id.clone(), at);
            state.runs.push(run);
        }
        state
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether idle pullers should poll again (see `wake_pullers`); resets
    /// the flag.
    pub fn take_wake_pullers(&mut self) -> bool {
        std::mem::take(&mut self.wake_pullers) && self.has_pending()
    }

    // ---- undoing a change that could not be saved ----------------------

    /// Starts recording how to undo the changes to runs that follow, until
    /// [`commit`](Self::commit) or [`roll_back`](Self::roll_back).
    pub fn begin(&mut self) {
        self.journal = Some(Journal {
            revision: self.revision,
            runs: self.runs.len(),
            finished: self.finished.len(),
            before: HashMap::new(),
        });
    }

    /// Keeps the changes since [`begin`](Self::begin).
    pub fn commit(&mut self) {
        self.journal = None;
    }

    /// Undoes every change to runs since [`begin`](Self::begin): runs
    /// submitted since are forgotten, changed ones restored with their
    /// place in the queue and the lease index.
    pub fn roll_back(&mut self) {
        let Some(journal) = self.journal.take() else {
            return;
        };
        for run in self.runs.drain(journal.runs..) {
            self.index.remove(&run.run_id);
        }
        self.pending.split_off(&journal.runs);
        self.leased.retain(|&(_, at)| at < journal.runs);
        self.finished.truncate(journal.finished);
        for (at, before) in journal.before {
            self.pending.remove(&at);
            if let Some(key) = lease_key(&self.runs[at], at) {
                self.leased.remove(&key);
            }
            if before.status == RunStatus::Pending {
                self.pending.insert(at);
            }
            if let Some(key) = lease_key(&before, at) {
                self.leased.insert(key);
            }
            self.runs[at] = before;
        }
        self.revision = journal.revision;
    }

    /// The runs changed since [`begin`](Self::begin), with their places:
    /// what a save must write.
    pub fn changed_runs(&self) -> Vec<(usize, &Run)> {
        let Some(journal) = &self.journal else {
            return Vec::new();
        };
        let mut changed: Vec<usize> = journal.before.keys().copied().collect();
        changed.extend(journal.runs..self.runs.len());
        changed.sort_unstable();
        changed.into_iter().map(|at| (at, &self.runs[at])).collect()
    }

    /// Copies run `at` into the journal before its first change.
    fn keep_for_undo(&mut self, at: usize) {
        if let Some(journal) = &mut self.journal
            && at < journal.runs
        {
            journal.before.entry(at).or_insert_with(|| self.runs[at].clone());
        }
    }

    // ---- nodes -------------------------------------------------------

    /// Registers a node, replacing any node with the same id (unless told
    /// to refuse that, see [`Reregistration`]). A new node is schedulable
    /// at once (active, every slot free), before its first heartbeat.
    pub fn register(&mut self, registration: Registration, now: SystemTime) -> Result<Node, RegistrationRefused> {
        if registration.node_id.is_empty() {
            return Err(Invalid::Required("NodeId").into());
        }
        if self.reregistration == Reregistration::DuplicateKey && self.nodes.contains_key(&registration.node_id) {
            return Err(RegistrationRefused::DuplicateKey(registration.node_id));
        }
        let node = Node {
            status: NodeStatus {
                state: "active".to_string(),
                active_runs: 0,
                available_slots: registration.capacity.slots.max(0),
            },
            node_id: registration.node_id,
            metadata: registration.metadata,
            capacity: registration.capacity,
            heartbeat_at: Some(iso8601(now)),
        };
        self.nodes.insert(node.node_id.clone(), node.clone());
        self.wake_pullers = true;
        Ok(node)
    }

    /// Replaces the node's whole status; `None` if the node is unknown.
    pub fn heartbeat(&mut self, node_id: &str, status: NodeStatus, now: SystemTime) -> Option<Node> {
        let node = self.nodes.get_mut(node_id)?;
        node.status = status;
        node.heartbeat_at = Some(iso8601(now));
        self.wake_pullers |= node.is_schedulable();
        Some(node.clone())
    }

    pub fn node(&self, node_id: &str) -> Option<&Node> {
        self.nodes.get(node_id)
    }

    /// All nodes, ordered by id.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// Forgets a node. Runs it holds stay assigned until their leases
    /// expire, as when a node dies.
    pub fn remove_node(&mut self, node_id: &str) -> bool {
        self.nodes.remove(node_id).is_some()
    }

    // ---- runs --------------------------------------------------------

    pub fn submit(&mut self, new: NewRun, now: SystemTime) -> Result<Run, Invalid> {
        if new.agent_id.is_empty() {
            return Err(Invalid::Required("AgentId"));
        }
        if new.version.is_empty() {
            return Err(Invalid::Required("Version"));
        }
        let budgets = new.budgets;
        let negative = [
            ("Budgets.MaxTokens", budgets.max_tokens.map(i64::from)),
            (
                "Budgets.MaxDurationSeconds",
                budgets.max_duration_seconds.map(i64::from),
            ),
            ("Budgets.MaxFuel", budgets.max_fuel),
            ("Budgets.MaxMemoryBytes", budgets.max_memory_bytes),
        ]
        .into_iter()
        .find(|(_, value)| value.is_some_and(|value| value < 0));
        if let Some((name, _)) = negative {
            return Err(Invalid::Negative(name));
        }
        let run = Run {
            run_id: uuid::Uuid::new_v4().hyphenated().to_string(),
            agent_id: new.agent_id,
            version: new.version,
            node_id: None,
            status: RunStatus::Pending,
            input_ref: new.input_ref,
            metadata: new.metadata,
            budgets,
            result: None,
            timings: None,
            costs: None,
            error_info: None,
            lease_id: None,
            lease_deadline_unix_ms: None,
            acked_at: None,
            attempts: 0,
            outcomes: 0,
            repeats: 0,
            sandbox: None,
            created_at: iso8601(now),
        };
        let at = self.runs.len();
        self.index.insert(run.run_id.clone(), at);
        self.pending.insert(at);
        self.runs.push(run.clone());
        self.revision += 1;
        self.wake_pullers = true;
        Ok(run)
    }

    pub fn run(&self, run_id: &str) -> Option<&Run> {
        self.index.get(run_id).map(|&at| &self.runs[at])
    }

    /// All runs in submission order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Up to `limit` runs in submission order, after the run `after` (or
    /// from the first), and whether more follow; `None` if `after` names no
    /// run.
    pub fn runs_page(&self, after: Option<&str>, limit: usize) -> Option<(Vec<Run>, bool)> {
        let start = match after {
            Some(run_id) => self.index.get(run_id)? + 1,
            None => 0,
        };
        let rest = self.runs.get(start..).unwrap_or_default();
        let page = rest.iter().take(limit).cloned().collect();
        Some((page, rest.len() > limit))
    }

    // ---- leasing -----------------------------------------------------

    /// One poll of a Pull stream: leases up to `max` pending runs, oldest
    /// first, to `node_id` if that node is schedulable. `max` caps this poll
    /// only; like the reference, the plane may lease a node more runs than
    /// it has free slots over several polls.
    pub fn lease(&mut self, node_id: &str, max: usize, now: SystemTime, ttl: Duration) -> Poll {
        self.expire_leases(now);
        let Some(node) = self.nodes.get(node_id) else {
            return Poll::UnknownNode;
        };
        if !node.is_schedulable() {
            return Poll::Leases(Vec::new());
        }
        let chosen: Vec<usize> = self.pending.iter().take(max).copied().collect();
        let deadline = unix_ms(now).saturating_add(ttl.as_millis().try_into().unwrap_or(i64::MAX));
        let mut grants = Vec::with_capacity(chosen.len());
        for at in chosen {
            self.pending.remove(&at);
            self.keep_for_undo(at);
            let run = &mut self.runs[at];
            run.status = RunStatus::Assigned;
            run.node_id = Some(node_id.to_string());
            run.lease_id = Some(new_lease_id(&run.run_id));
            run.lease_deadline_unix_ms = Some(deadline);
            run.acked_at = None;
            run.attempts += 1;
            self.leased.insert((deadline, at));
            grants.push(Grant {
                run: run.clone(),
                trace_id: uuid::Uuid::new_v4().hyphenated().to_string(),
            });
        }
        if !grants.is_empty() {
            self.revision += 1;
        }
        Poll::Leases(grants)
    }

    /// Re-queues every assigned run whose lease deadline has passed; their
    /// lease ids become stale. Returns how many were re-queued.
    ///
    /// Every leasing call runs this first, so a lease past its deadline is
    /// dead at once and never half-alive until the next background tick.
    pub fn expire_leases(&mut self, now: SystemTime) -> usize {
        let now_ms = unix_ms(now);
        let mut expired = 0;
        while let Some(&(deadline, at)) = self.leased.first() {
            if deadline > now_ms {
                break;
            }
            self.leased.pop_first();
            if self.runs[at].status == RunStatus::Assigned {
                self.keep_for_undo(at);
                let run = &mut self.runs[at];
                run.status = RunStatus::Pending;
                run.node_id = None;
                run.lease_deadline_unix_ms = None;
                self.pending.insert(at);
                expired += 1;
            }
        }
        if expired > 0 {
            self.revision += 1;
            self.wake_pullers = true;
        }
        expired
    }

    /// Runs that reached a final status, in that order, from position
    /// `from` of that order on: each run's id and status, and the position
    /// to ask from next time. Cheap to poll, unlike cloning every run.
    pub fn finished_since(&self, from: usize) -> (Vec<(String, RunStatus)>, usize) {
        let newly = self.finished.get(from..).unwrap_or_default();
        let runs = newly
            .iter()
            .map(|&at| (self.runs[at].run_id.clone(), self.runs[at].status))
            .collect();
        (runs, self.finished.len().max(from))
    }

    /// How many runs were submitted, wait for a node, and reached a final
    /// status: what a load generator polls to see a batch end, at no cost
    /// that grows with the runs.
    pub fn counts(&self) -> RunCounts {
        RunCounts {
            submitted: self.runs.len(),
            pending: self.pending.len(),
            finished: self.finished.len(),
        }
    }

    /// Records that a node acknowledged a lease. AckRequest has no run id:
    /// it is read back from the lease id, which embeds it.
    pub fn ack(&mut self, lease_id: &str, node_id: &str, now: SystemTime) -> Result<(), Refusal> {
        if lease_id.is_empty() {
            return Err(Refusal::Missing("lease_id"));
        }
        if node_id.is_empty() {
            return Err(Refusal::Missing("node_id"));
        }
        let run_id = run_id_of_lease(lease_id).ok_or_else(|| Refusal::UnknownLease(lease_id.to_string()))?;
        self.expire_leases(now);
        let at = self.holder_check(lease_id, run_id, node_id)?;
        if self.runs[at].status == RunStatus::Assigned && self.runs[at].acked_at.is_none() {
            self.keep_for_undo(at);
            self.runs[at].acked_at = Some(iso8601(now));
            self.revision += 1;
        }
        Ok(())
    }

    /// Accepts a Complete or Fail from the node holding the run's current
    /// lease. A different second report on the same lease overwrites the
    /// first, as in the reference, and `outcomes` counts it, so tests can
    /// prove a node never sends two outcomes; an identical resend changes
    /// nothing and is counted in `repeats` instead.
    pub fn report(&mut self, report: Report, now: SystemTime) -> Result<(), Refusal> {
        for (name, value) in [
            ("lease_id", &report.lease_id),
            ("run_id", &report.run_id),
            ("node_id", &report.node_id),
        ] {
            if value.is_empty() {
                return Err(Refusal::Missing(name));
            }
        }
        self.expire_leases(now);
        let at = self.holder_check(&report.lease_id, &report.run_id, &report.node_id)?;
        self.keep_for_undo(at);
        let run = &mut self.runs[at];
        if run.outcomes > 0 && run.sandbox == report.sandbox && run.records(&report.outcome) {
            run.repeats += 1;
            self.revision += 1;
            return Ok(());
        }
        if let Some(key) = lease_key(run, at) {
            self.leased.remove(&key);
        }
        if run.outcomes == 0 {
            self.finished.push(at);
        }
        // The run keeps its node id and lease id: they say who reported.
        run.lease_deadline_unix_ms = None;
        run.outcomes += 1;
        run.sandbox = report.sandbox;
        match report.outcome {
            Outcome::Completed { result, timings, costs } => {
                run.status = RunStatus::Completed;
                run.result = Some(result);
                run.timings = timings;
                run.costs = costs;
                run.error_info = None;
            }
            Outcome::Failed { error, timings } => {
                run.status = RunStatus::Failed;
                run.result = None;
                run.timings = timings;
                run.costs = None;
                run.error_info = Some(error);
            }
        }
        self.revision += 1;
        Ok(())
    }

    /// The run's index if `lease_id` is its current lease and `node_id`
    /// holds it. A run whose lease expired has no holder and a different
    /// (or no) current lease once re-leased, so stale reports fail here.
    fn holder_check(&self, lease_id: &str, run_id: &str, node_id: &str) -> Result<usize, Refusal> {
        let &at = self
            .index
            .get(run_id)
            .ok_or_else(|| Refusal::UnknownRun(run_id.to_string()))?;
        let run = &self.runs[at];
        let current = run.lease_id.as_deref() == Some(lease_id) && run.status != RunStatus::Pending;
        if !current {
            return Err(Refusal::StaleLease {
                lease_id: lease_id.to_string(),
                run_id: run_id.to_string(),
            });
        }
        if run.node_id.as_deref() != Some(node_id) {
            return Err(Refusal::HeldByAnotherNode {
                run_id: run_id.to_string(),
                holder: run.node_id.clone(),
                node_id: node_id.to_string(),
            });
        }
        Ok(at)
    }
}

/// The run's entry in [`PlaneState::leased`], if it is assigned.
fn lease_key(run: &Run, at: usize) -> Option<(i64, usize)> {
    (run.status == RunStatus::Assigned).then(|| (run.lease_deadline_unix_ms.unwrap_or(i64::MIN), at))
}

/// `lease-{runId}-{32 lowercase hex}`, the reference's lease id shape.
fn new_lease_id(run_id: &str) -> String {
    format!("lease-{run_id}-{}", uuid::Uuid::new_v4().simple())
}

/// The run id inside a lease id of the shape above, if it has that shape.
fn run_id_of_lease(lease_id: &str) -> Option<&str> {
    let (run_id, suffix) = lease_id.strip_prefix("lease-")?.rsplit_once('-')?;
    let hex = suffix.len() == 32 && suffix.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && !run_id.is_empty()).then_some(run_id)
}

pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis().try_into().unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// ISO-8601 UTC with microseconds, e.g. `2025-01-31T09:30:00.123456Z`.
pub fn iso8601(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(300);

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seconds)
    }

    fn registration(node_id: &str, slots: i32) -> Registration {
        Registration {
            node_id: node_id.to_string(),
            metadata: BTreeMap::from([("Region".to_string(), "local".to_string())]),
            capacity: Capacity {
                slots,
                cpu: "4".to_string(),
                memory: "8Gi".to_string(),
            },
        }
    }

    fn new_run(agent_id: &str) -> NewRun {
        NewRun {
            agent_id: agent_id.to_string(),
            version: "1".to_string(),
            ..NewRun::default()
        }
    }

    fn status(state: &str, available_slots: i32) -> NodeStatus {
        NodeStatus {
            state: state.to_string(),
            active_runs: 0,
            available_slots,
        }
    }

    fn grants(poll: Poll) -> Vec<Grant> {
        match poll {
            Poll::Leases(grants) => grants,
            Poll::UnknownNode => panic!("the node should be known"),
        }
    }

    fn completed(grant: &Grant, node_id: &str) -> Report {
        Report {
            lease_id: grant.run.lease_id.clone().unwrap(),
            run_id: grant.run.run_id.clone(),
            node_id: node_id.to_string(),
            outcome: Outcome::Completed {
                result: BTreeMap::from([("answer".to_string(), "42".to_string())]),
                timings: Some(Timings {
                    duration_ms: 3,
                    queue_time_ms: 1,
                    execution_time_ms: 2,
                }),
                costs: Some(Costs {
                    tokens_in: 5,
                    tokens_out: 6,
                    usd_cost: 0.01,
                }),
            },
            sandbox: None,
        }
    }

    /// A state with one registered node and `runs` pending runs.
    fn with_node_and_runs(slots: i32, runs: usize) -> (PlaneState, Vec<String>) {
        let mut state = PlaneState::new();
        state.register(registration("node-1", slots), at(0)).unwrap();
        let ids = (0..runs)
            .map(|i| state.submit(new_run(&format!("agent-{i}")), at(0)).unwrap().run_id)
            .collect();
        (state, ids)
    }

    #[test]
    fn a_new_node_is_active_with_all_slots_free() {
        let mut state = PlaneState::new();
        let node = state.register(registration("node-1", 8), at(0)).unwrap();
        assert_eq!(node.status, status("active", 8));
        assert!(node.is_schedulable());
        assert!(node.heartbeat_at.is_some());
    }

    #[test]
    fn registration_needs_a_node_id() {
        let mut state = PlaneState::new();
        let err = state.register(registration("", 8), at(0)).unwrap_err();
        assert_eq!(err.to_string(), "NodeId is required");
    }

    #[test]
    fn a_heartbeat_replaces_the_whole_status_and_an_unknown_node_gets_none() {
        let (mut state, _) = with_node_and_runs(8, 0);
        let node = state.heartbeat("node-1", status("draining", 0), at(5)).unwrap();
        assert_eq!(node.status, status("draining", 0));
        assert_eq!(node.heartbeat_at.as_deref(), Some("2023-11-14T22:13:25.000000Z"));
        assert!(state.heartbeat("node-2", status("active", 1), at(5)).is_none());
    }

    #[test]
    fn submission_needs_agent_and_version_and_non_negative_budgets() {
        let mut state = PlaneState::new();
        assert_eq!(
            state.submit(new_run(""), at(0)).unwrap_err().to_string(),
            "AgentId is required"
        );
        let no_version = NewRun {
            version: String::new(),
            ..new_run("a")
        };
        assert_eq!(
            state.submit(no_version, at(0)).unwrap_err().to_string(),
            "Version is required"
        );
        let negative = NewRun {
            budgets: Budgets {
                max_fuel: Some(-1),
                ..Budgets::default()
            },
            ..new_run("a")
        };
        assert_eq!(
            state.submit(negative, at(0)).unwrap_err().to_string(),
            "Budgets.MaxFuel must not be negative"
        );
        assert!(state.runs().is_empty());
    }

    #[test]
    fn counts_follow_runs_from_submission_to_outcome() {
        let (mut state, _) = with_node_and_runs(8, 3);
        let counts = |submitted, pending, finished| RunCounts {
            submitted,
            pending,
            finished,
        };
        assert_eq!(state.counts(), counts(3, 3, 0));
        let leased = grants(state.lease("node-1", 2, at(1), Duration::from_secs(300)));
        assert_eq!(state.counts(), counts(3, 1, 0));
        state.report(completed(&leased[0], "node-1"), at(2)).unwrap();
        assert_eq!(state.counts(), counts(3, 1, 1));
    }

    #[test]
    fn a_poll_leases_the_oldest_pending_runs_up_to_the_cap() {
        let (mut state, ids) = with_node_and_runs(1, 3);
        let first = grants(state.lease("node-1", 2, at(1), TTL));
        let leased: Vec<_> = first.iter().map(|g| g.run.run_id.clone()).collect();
        assert_eq!(leased, ids[..2]);
        // The cap is per poll, not a slot count: the next poll gets the rest.
        let second = grants(state.lease("node-1", 2, at(1), TTL));
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].run.run_id, ids[2]);
        assert!(grants(state.lease("node-1", 2, at(1), TTL)).is_empty());
    }

    #[test]
    fn a_lease_has_the_reference_shape() {
        let (mut state, ids) = with_node_and_runs(1, 1);
        let grant = grants(state.lease("node-1", 1, at(1), TTL)).remove(0);
        let lease_id = grant.run.lease_id.clone().unwrap();
        let suffix = lease_id.strip_prefix(&format!("lease-{}-", ids[0])).unwrap();
        assert_eq!(suffix.len(), 32);
        assert!(suffix.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_eq!(run_id_of_lease(&lease_id), Some(ids[0].as_str()));
        assert_eq!(grant.trace_id.len(), 36);
        assert_eq!(grant.run.lease_deadline_unix_ms, Some(unix_ms(at(1)) + 300_000));
        assert_eq!(grant.run.status, RunStatus::Assigned);
        assert_eq!(grant.run.node_id.as_deref(), Some("node-1"));
        assert_eq!(grant.run.attempts, 1);
    }

    #[test]
    fn a_draining_or_full_node_gets_nothing_and_an_unknown_node_is_told_so() {
        let (mut state, _) = with_node_and_runs(4, 1);
        state.heartbeat("node-1", status("draining", 4), at(1));
        assert!(grants(state.lease("node-1", 5, at(1), TTL)).is_empty());
        state.heartbeat("node-1", status("active", 0), at(1));
        assert!(grants(state.lease("node-1", 5, at(1), TTL)).is_empty());
        assert_eq!(state.lease("node-9", 5, at(1), TTL), Poll::UnknownNode);
        state.heartbeat("node-1", status("active", 1), at(2));
        assert_eq!(grants(state.lease("node-1", 5, at(2), TTL)).len(), 1);
    }

    #[test]
    fn one_run_goes_to_one_node() {
        let (mut state, _) = with_node_and_runs(8, 3);
        state.register(registration("node-2", 8), at(0)).unwrap();
        let mut seen: Vec<String> = Vec::new();
        for node in ["node-1", "node-2", "node-1", "node-2"] {
            seen.extend(
                grants(state.lease(node, 1, at(1), TTL))
                    .into_iter()
                    .map(|g| g.run.run_id),
            );
        }
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(seen.len(), 3);
        assert_eq!(unique.len(), 3);
    }

    #[test]
    fn complete_records_the_outcome_from_the_holder() {
        let (mut state, ids) = with_node_and_runs(1, 1);
        let grant = grants(state.lease("node-1", 1, at(1), TTL)).remove(0);
        state
            .ack(grant.run.lease_id.as_deref().unwrap(), "node-1", at(2))
            .unwrap();
        state.report(completed(&grant, "node-1"), at(3)).unwrap();
        let run = state.run(&ids[0]).unwrap();
        assert_eq!(run.status, RunStatus::Completed);
        assert_eq!(run.result.as_ref().unwrap()["answer"], "42");
        assert_eq!(run.costs.unwrap().tokens_out, 6);
        assert_eq!(run.timings.unwrap().execution_time_ms, 2);
        assert_eq!(run.node_id.as_deref(), Some("node-1"));
        assert!(run.acked_at.is_some());
        assert_eq!(run.outcomes, 1);
    }

    #[test]
    fn an_identical_resend_is_a_repeat_not_a_second_outcome() {
        let (mut state, ids) = with_node_and_runs(1, 1);
        let grant = grants(state.lease("node-1", 1, at(1), TTL)).remove(0);
        state.report(completed(&grant, "node-1"), at(2)).unwrap();
        state.report(completed(&grant, "node-1"), at(3)).unwrap();
        let run = state.run(&ids[0]).unwrap();
        assert_eq!((run.outcomes, run.repeats), (1, 1));
        let slower = Report {
            outcome: Outcome::Completed {
                result: BTreeMap::from([("answer".to_string(), "42".to_string())]),
                timings: None,
                costs: None,
            },
            ..completed(&grant, "node-1")
        };
        state.report(slower, at(4)).unwrap();
        let run = state.run(&ids[0]).unwrap();
        assert_eq!(
            (run.outcomes, run.repeats),
            (2, 1),
            "a report that differs is a second outcome"
        );
    }

    #[test]
    fn a_repeated_report_on_the_same_lease_overwrites_and_is_counted() {
        let (mut state, ids) = with_node_and_runs(1, 1);
        let grant = grants(state.lease("node-1", 1, at(1), TTL)).remove(0);
        state.report(completed(&grant, "node-1"), at(2)).unwrap();
        let fail = Report {
            outcome: Outcome::Failed {
                error: ErrorInfo {
                    error_message: "boom".to_string(),
                    error_details: String::new(),
                    retryable: true,
                },
                timings: None,
            },
            ..completed(&grant, "node-1")
        };
        state.report(fail, at(3)).unwrap();
        let run = state.run(&ids[0]).unwrap();
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.result, None);
        assert_eq!(run.error_info.as_ref().unwrap().error_message, "boom");
        assert_eq!(run.outcomes, 2);
    }

    #[test]
    fn reports_are_refused_for_missing_ids_unknown_runs_and_other_nodes() {
        let (mut state, _) = with_node_and_runs(1, 1);
        let grant = grants(state.lease("node-1", 1, at(1), TTL)).remove(0);
        let missing = Report {
            node_id: String::new(),
            ..completed(&grant, "node-1")
        };
        assert_eq!(state.report(missing, at(2)), Err(Refusal::Missing("node_id")));
        let unknown = Report {
            run_id: "nope".to_string(),
            ..completed(&grant, "node-1")
        };
        assert_eq!(
            state.report(unknown, at(2)),
            Err(Refusal::UnknownRun("nope".to_string()))
        );
        let other = state.report(completed(&grant, "node-2"), at(2)).unwrap_err();
        assert!(matches!(other, Refusal::HeldByAnotherNode { .. }), "{other}");
        assert!(other.to_string().contains("held by node node-1"), "{other}");
        assert_eq!(
            state.ack("not-a-lease", "node-1", at(2)),
            Err(Refusal::UnknownLease("not-a-lease".to_string()))
        );
        assert_eq!(state.run(&grant.run.run_id).unwrap().outcomes, 0);
    }

    #[test]
    fn an_expired_lease_requeues_the_run_and_goes_stale() {
        let (mut state, ids) = with_node_and_runs(1, 1);
        let ttl = Duration::from_secs(10);
        let first = grants(state.lease("node-1", 1, at(0), ttl)).remove(0);
        assert_eq!(state.expire_leases(at(9)), 0);
        assert_eq!(state.expire_leases(at(10)), 1);
        let run = state.run(&ids[0]).unwrap();
        assert_eq!(run.status, RunStatus::Pending);
        assert_eq!(run.node_id, None);
        assert!(matches!(
            state.report(completed(&first, "node-1"), at(11)),
            Err(Refusal::StaleLease { .. })
        ));

        // Leased again: the old lease stays stale, the new one is accepted.
        let second = grants(state.lease("node-1", 1, at(12), ttl)).remove(0);
        assert_ne!(second.run.lease_id, first.run.lease_id);
        assert_eq!(second.run.attempts, 2);
        assert!(matches!(
            state.report(completed(&first, "node-1"), at(13)),
            Err(Refusal::StaleLease { .. })
        ));
        state.report(completed(&second, "node-1"), at(13)).unwrap();
        assert_eq!(state.run(&ids[0]).unwrap().outcomes, 1);
    }

    #[test]
    fn expiry_finds_only_lapsed_leases_however_runs_ended_or_were_restored() {
        let (mut state, ids) = with_node_and_runs(1, 4);
        let short = Duration::from_secs(10);
        let long = Duration::from_secs(100);
        let a = grants(state.lease("node-1", 1, at(0), short)).remove(0);
        let b = grants(state.lease("node-1", 1, at(0), long)).remove(0);
        let c = grants(state.lease("node-1", 1, at(1), short)).remove(0);
        // A completed run leaves the deadline index: it never lapses.
        state.report(completed(&a, "node-1"), at(2)).unwrap();
        assert_eq!(state.expire_leases(at(50)), 1, "only c lapsed");
        assert_eq!(state.run(&c.run.run_id).unwrap().status, RunStatus::Pending);
        assert_eq!(state.run(&b.run.run_id).unwrap().status, RunStatus::Assigned);

        // A plane restored from saved runs still expires b on time.
        let mut restored = PlaneState::from_runs(state.runs().to_vec());
        assert_eq!(restored.expire_leases(at(99)), 0);
        assert_eq!(restored.expire_leases(at(100)), 1);
        assert_eq!(restored.run(&b.run.run_id).unwrap().status, RunStatus::Pending);

        // Ended runs are listed once each, in the order they ended.
        let (ended, next) = state.finished_since(0);
        assert_eq!(ended, [(ids[0].clone(), RunStatus::Completed)]);
        let d = grants(state.lease("node-1", 1, at(60), short)).remove(0);
        state.report(completed(&d, "node-1"), at(61)).unwrap();
        state.report(completed(&d, "node-1"), at(62)).unwrap();
        let (ended, last) = state.finished_since(next);
        assert_eq!(
            ended,
            [(d.run.run_id.clone(), RunStatus::Completed)],
            "a repeat is not listed again"
        );
        assert_eq!(state.finished_since(last), (Vec::new(), last));
        assert_eq!(
            restored.finished_since(0).0.len(),
            1,
            "restored runs that had ended are listed"
        );
    }

    #[test]
    fn a_report_past_the_deadline_is_refused_even_before_a_background_pass() {
        let (mut state, _) = with_node_and_runs(1, 1);
        let grant = grants(state.lease("node-1", 1, at(0), Duration::from_secs(10))).remove(0);
        assert!(matches!(
            state.report(completed(&grant, "node-1"), at(10)),
            Err(Refusal::StaleLease { .. })
        ));
    }

    #[test]
    fn a_finished_run_is_never_requeued() {
        let (mut state, ids) = with_node_and_runs(1, 1);
        let grant = grants(state.lease("node-1", 1, at(0), Duration::from_secs(10))).remove(0);
        let fail = Report {
            outcome: Outcome::Failed {
                error: ErrorInfo {
                    error_message: "x".into(),
                    error_details: "y".into(),
                    retryable: true,
                },
                timings: None,
            },
            ..completed(&grant, "node-1")
        };
        state.report(fail, at(1)).unwrap();
        assert_eq!(state.expire_leases(at(100)), 0);
        assert_eq!(state.run(&ids[0]).unwrap().status, RunStatus::Failed);
        assert!(!state.has_pending());
    }

    #[test]
    fn saved_runs_come_back_with_their_leases_and_queue_order() {
        let (mut state, ids) = with_node_and_runs(1, 3);
        let grant = grants(state.lease("node-1", 1, at(0), TTL)).remove(0);
        let mut restored = PlaneState::from_runs(state.runs().to_vec());
        assert_eq!(restored.run(&ids[0]), Some(&grant.run));
        // Nodes are not saved: the node must register again.
        assert_eq!(restored.lease("node-1", 5, at(1), TTL), Poll::UnknownNode);
        restored.register(registration("node-1", 1), at(1)).unwrap();
        let next: Vec<_> = grants(restored.lease("node-1", 5, at(1), TTL))
            .into_iter()
            .map(|g| g.run.run_id)
            .collect();
        assert_eq!(next, ids[1..]);
        restored.report(completed(&grant, "node-1"), at(2)).unwrap();
    }

    #[test]
    fn pullers_are_woken_by_new_work_but_never_by_a_poll() {
        let (mut state, _) = with_node_and_runs(1, 2);
        assert!(state.take_wake_pullers());
        assert!(!state.take_wake_pullers());
        state.lease("node-1", 1, at(1), TTL);
        assert!(!state.take_wake_pullers(), "a poll must not wake pollers, or they spin");
        state.heartbeat("node-1", status("draining", 0), at(1));
        assert!(!state.take_wake_pullers());
        state.heartbeat("node-1", status("active", 1), at(1));
        assert!(state.take_wake_pullers());
        state.lease("node-1", 1, at(1), TTL);
        // Nothing pending: nothing to wake for, whatever happens.
        state.register(registration("node-2", 1), at(1)).unwrap();
        assert!(!state.take_wake_pullers());
        state.expire_leases(at(1000));
        assert!(state.take_wake_pullers());
    }

    #[test]
    fn a_rolled_back_change_leaves_the_state_as_it_was() {
        let (mut state, ids) = with_node_and_runs(4, 2);
        let first = grants(state.lease("node-1", 1, at(1), TTL)).remove(0);
        let before = state.runs().to_vec();
        let revision = state.revision();

        // A submission: forgotten, not queued.
        state.begin();
        let lost = state.submit(new_run("lost"), at(2)).unwrap();
        state.roll_back();
        assert!(state.run(&lost.run_id).is_none());
        assert_eq!(state.runs(), &before[..]);
        assert_eq!(state.revision(), revision);

        // A lease: the run is pending again, and leased next.
        state.begin();
        assert_eq!(grants(state.lease("node-1", 4, at(3), TTL)).len(), 1);
        state.roll_back();
        assert_eq!(state.runs(), &before[..]);

        // A report and an expiry: the lease is current again and lapses
        // on time.
        state.begin();
        state.report(completed(&first, "node-1"), at(4)).unwrap();
        state.roll_back();
        state.begin();
        assert_eq!(state.expire_leases(at(1000)), 1);
        state.roll_back();
        assert_eq!(state.runs(), &before[..]);
        assert!(state.finished_since(0).0.is_empty());

        // What is left behaves as if nothing had happened.
        let second = grants(state.lease("node-1", 4, at(5), TTL));
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].run.run_id, ids[1]);
        state.report(completed(&first, "node-1"), at(6)).unwrap();
        assert_eq!(state.finished_since(0).0, [(ids[0].clone(), RunStatus::Completed)]);
        assert_eq!(state.expire_leases(at(301)), 0);
        assert_eq!(state.expire_leases(at(305)), 1, "the second lease lapses on time");

        // A committed change stays.
        state.begin();
        let kept = state.submit(new_run("kept"), at(7)).unwrap();
        state.commit();
        state.roll_back();
        assert!(state.run(&kept.run_id).is_some());
    }

    #[test]
    fn a_plane_like_the_postgres_reference_refuses_a_known_node_id() {
        let mut state = PlaneState::new().with_reregistration(Reregistration::DuplicateKey);
        state.register(registration("node-1", 2), at(0)).unwrap();
        let refused = state.register(registration("node-1", 4), at(1)).unwrap_err();
        assert_eq!(refused, RegistrationRefused::DuplicateKey("node-1".to_string()));
        assert!(refused.to_string().contains("duplicate key"), "{refused}");
        assert_eq!(state.node("node-1").unwrap().capacity.slots, 2, "the node is kept");
        // Gone (deleted), it may register again.
        state.remove_node("node-1");
        state.register(registration("node-1", 4), at(2)).unwrap();
    }

    #[test]
    fn pages_follow_the_cursor_in_submission_order_and_say_whether_more_follow() {
        let (state, ids) = with_node_and_runs(1, 5);
        let page = |after: Option<&str>, limit| {
            let (runs, more) = state.runs_page(after, limit).unwrap();
            (runs.into_iter().map(|run| run.run_id).collect::<Vec<_>>(), more)
        };
        assert_eq!(page(None, 2), (ids[..2].to_vec(), true));
        assert_eq!(page(Some(&ids[1]), 2), (ids[2..4].to_vec(), true));
        assert_eq!(page(Some(&ids[3]), 2), (ids[4..].to_vec(), false));
        assert_eq!(page(Some(&ids[4]), 2), (Vec::new(), false));
        assert_eq!(page(None, 5), (ids.clone(), false));
        assert!(state.runs_page(Some("no-such-run"), 2).is_none());
    }

    #[test]
    fn a_change_names_exactly_the_runs_it_touched_for_the_store() {
        let (mut state, ids) = with_node_and_runs(4, 3);
        state.begin();
        let leased = grants(state.lease("node-1", 2, at(1), TTL));
        let touched: Vec<usize> = state.changed_runs().into_iter().map(|(at, _)| at).collect();
        assert_eq!(touched, [0, 1]);
        state.commit();

        state.begin();
        let new = state.submit(new_run("later"), at(2)).unwrap();
        state.report(completed(&leased[1], "node-1"), at(2)).unwrap();
        let touched: Vec<(usize, String)> = state
            .changed_runs()
            .into_iter()
            .map(|(at, run)| (at, run.run_id.clone()))
            .collect();
        assert_eq!(touched, [(1, ids[1].clone()), (3, new.run_id)]);
        state.commit();
        assert!(state.changed_runs().is_empty(), "nothing outside a change");
    }

    #[test]
    fn the_revision_moves_only_when_runs_change() {
        let (mut state, _) = with_node_and_runs(1, 1);
        let before = state.revision();
        state.heartbeat("node-1", status("active", 1), at(1));
        assert_eq!(state.lease("node-2", 1, at(1), TTL), Poll::UnknownNode);
        assert_eq!(state.revision(), before);
        state.lease("node-1", 1, at(1), TTL);
        assert!(state.revision() > before);
    }
}
