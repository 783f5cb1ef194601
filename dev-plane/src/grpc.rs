//! `lease.LeaseService` on the server side: Pull streams leases to nodes;
//! Ack, Complete and Fail record what nodes report.
//!
//! This file translates between the wire types and the state's rules and
//! reproduces the reference's observable behaviour: INVALID_ARGUMENT only
//! for a bad PullRequest, every other refusal a `success=false` answer
//! with gRPC OK, and no response headers on an idle Pull until its first
//! lease (the node must be built for that, so the dev plane does it too).
//! Beyond the reference: a node id the connection's client certificate
//! does not carry is PERMISSION_DENIED when the plane binds them (see
//! `access`), a change that cannot be saved is UNAVAILABLE, and `Calls`
//! carries the three calls on one stream (a node falls back to unary calls
//! where a plane lacks it, as the reference does).

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::access::NodeIds;
use super::ledger::Ledger;
use super::state::{Costs, ErrorInfo, Grant, Outcome, Poll, Report, SandboxReadings, Timings};
use super::wait_for_shutdown;
use proto::lease_service_server::LeaseService;
use proto::{
    AckRequest, AckResponse, BudgetConstraints, CallStatus, CompleteRequest, CompleteResponse, CostInfo, FailRequest,
    FailResponse, Lease, NodeCall, NodeCallAnswer, PullRequest, RunSpec, SandboxReport, TimingInfo, node_call,
    node_call_answer,
};

/// The reference's budgets for every lease, used when a run gives none.
const DEFAULT_MAX_TOKENS: i32 = 4000;
const DEFAULT_MAX_DURATION_SECONDS: i32 = 60;
/// Any stable string: the reference has deployments, the dev plane does not.
const DEPLOYMENT_ID: &str = "dev";
/// Leases buffered per stream, whatever `max_leases` says: a poll takes no
/// more runs than the buffer has room for, so runs are not assigned to a
/// node that has stopped reading.
const MAX_BUFFERED_LEASES: usize = 64;

pub struct LeaseDesk {
    ledger: Arc<Ledger>,
    shutdown: watch::Receiver<bool>,
    idle_poll: Duration,
    calls_streams: Arc<CallsStreamCounts>,
}

/// Calls streams opened, and calls answered on them.
#[derive(Default)]
pub struct CallsStreamCounts {
    opened: AtomicU64,
    answered: AtomicU64,
}

impl CallsStreamCounts {
    pub fn read(&self) -> (u64, u64) {
        (
            self.opened.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
        )
    }
}

impl LeaseDesk {
    pub fn new(ledger: Arc<Ledger>, shutdown: watch::Receiver<bool>, idle_poll: Duration) -> LeaseDesk {
        LeaseDesk {
            ledger,
            shutdown,
            idle_poll,
            calls_streams: Arc::default(),
        }
    }

    pub fn calls_stream_counts(&self) -> Arc<CallsStreamCounts> {
        Arc::clone(&self.calls_streams)
    }
}

type LeaseStream = Pin<Box<dyn Stream<Item = Result<Lease, Status>> + Send>>;

#[tonic::async_trait]
impl LeaseService for LeaseDesk {
    type PullStream = LeaseStream;

    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<LeaseStream>, Status> {
        let node_ids = NodeIds::of(request.extensions());
        let PullRequest { node_id, max_leases } = request.into_inner();
        if node_id.is_empty() {
            return Err(Status::invalid_argument("node_id is required"));
        }
        may_act_as(&node_ids, &node_id)?;
        let Ok(max_leases @ 1..) = usize::try_from(max_leases) else {
            return Err(Status::invalid_argument(format!(
                "max_leases must be positive, got {max_leases}"
            )));
        };
        let (sender, mut receiver) = mpsc::channel(max_leases.min(MAX_BUFFERED_LEASES));
        let puller = Puller {
            ledger: Arc::clone(&self.ledger),
            node_id,
            max_leases,
            idle_poll: self.idle_poll,
            shutdown: self.shutdown.clone(),
            sender,
        };
        tokio::spawn(puller.run());
        // Answer (and so send headers) only with the first lease, like the
        // reference. If the node gives up first, hyper drops this future,
        // the receiver goes with it and the puller stops.
        match receiver.recv().await {
            // Unknown node, or the plane is shutting down: end with OK.
            None => Ok(Response::new(Box::pin(tokio_stream::empty()))),
            Some(Err(status)) => Err(status),
            Some(Ok(first)) => {
                let rest = tokio_stream::wrappers::ReceiverStream::new(receiver);
                Ok(Response::new(Box::pin(tokio_stream::once(Ok(first)).chain(rest))))
            }
        }
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let node_ids = NodeIds::of(request.extensions());
        self.desk()
            .ack(&node_ids, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn complete(&self, request: Request<CompleteRequest>) -> Result<Response<CompleteResponse>, Status> {
        let node_ids = NodeIds::of(request.extensions());
        self.desk()
            .complete(&node_ids, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn fail(&self, request: Request<FailRequest>) -> Result<Response<FailResponse>, Status> {
        let node_ids = NodeIds::of(request.extensions());
        self.desk()
            .fail(&node_ids, request.into_inner())
            .await
            .map(Response::new)
    }

    type CallsStream = CallsStream;

    /// The three calls on one stream: each is answered as its unary form
    /// would be, by id, as soon as it is done (calls run concurrently, as
    /// separate requests would). The stream ends when the node ends its
    /// side, or, once the calls under way are answered, when the plane
    /// shuts down.
    async fn calls(&self, request: Request<Streaming<NodeCall>>) -> Result<Response<CallsStream>, Status> {
        let node_ids = NodeIds::of(request.extensions());
        let mut incoming = request.into_inner();
        let (answers, answered) = mpsc::channel(MAX_CALLS_UNDER_WAY);
        let (desk, mut shutdown) = (self.desk(), self.shutdown.clone());
        let counts = Arc::clone(&self.calls_streams);
        counts.opened.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let under_way = Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_UNDER_WAY));
            loop {
                let call = tokio::select! {
                    biased;
                    () = wait_for_shutdown(&mut shutdown) => break,
                    call = incoming.message() => call,
                };
                let call = match call {
                    Ok(Some(call)) => call,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "a node's call stream broke");
                        break;
                    }
                };
                // Like requests on a connection, calls wait for room
                // rather than pile up without bound.
                let Ok(room) = Arc::clone(&under_way).acquire_owned().await else {
                    break;
                };
                let (desk, node_ids, answers, counts) =
                    (desk.clone(), node_ids.clone(), answers.clone(), Arc::clone(&counts));
                tokio::spawn(async move {
                    let answer = desk.answer(&node_ids, call).await;
                    if answers.send(Ok(answer)).await.is_ok() {
                        counts.answered.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(room);
                });
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            answered,
        ))))
    }
}

/// Calls on one Calls stream answered at once, at most.
const MAX_CALLS_UNDER_WAY: usize = 256;

type CallsStream = Pin<Box<dyn Stream<Item = Result<NodeCallAnswer, Status>> + Send>>;

/// Ack, Complete and Fail against the state's rules, for the unary calls
/// and the Calls stream alike.
#[derive(Clone)]
struct CallDesk {
    ledger: Arc<Ledger>,
}

impl LeaseDesk {
    fn desk(&self) -> CallDesk {
        CallDesk {
            ledger: Arc::clone(&self.ledger),
        }
    }
}

impl CallDesk {
    async fn answer(&self, node_ids: &NodeIds, call: NodeCall) -> NodeCallAnswer {
        let answer = match call.call {
            Some(node_call::Call::Ack(ack)) => self.ack(node_ids, ack).await.map(node_call_answer::Answer::Ack),
            Some(node_call::Call::Complete(complete)) => self
                .complete(node_ids, complete)
                .await
                .map(node_call_answer::Answer::Complete),
            Some(node_call::Call::Fail(fail)) => self.fail(node_ids, fail).await.map(node_call_answer::Answer::Fail),
            None => Err(Status::invalid_argument(
                "the call is empty: Ack, Complete or Fail expected",
            )),
        };
        NodeCallAnswer {
            id: call.id,
            answer: Some(answer.unwrap_or_else(|status| {
                node_call_answer::Answer::Status(CallStatus {
                    code: status.code().into(),
                    message: status.message().to_string(),
                })
            })),
        }
    }

    async fn ack(&self, node_ids: &NodeIds, request: AckRequest) -> Result<AckResponse, Status> {
        let AckRequest { lease_id, node_id, .. } = request;
        may_act_as(node_ids, &node_id)?;
        let answer = self
            .ledger
            .write(|state, now| state.ack(&lease_id, &node_id, now))
            .await;
        let (success, message) = verdict(answer.map_err(unavailable)?, || {
            format!("lease {lease_id} acknowledged")
        });
        Ok(AckResponse { success, message })
    }

    async fn complete(&self, node_ids: &NodeIds, request: CompleteRequest) -> Result<CompleteResponse, Status> {
        may_act_as(node_ids, &request.node_id)?;
        let run_id = request.run_id.clone();
        let report = Report {
            lease_id: request.lease_id,
            run_id: request.run_id,
            node_id: request.node_id,
            outcome: Outcome::Completed {
                result: sorted(request.result),
                timings: request.timings.map(timings),
                costs: request.costs.map(costs),
            },
            sandbox: request.sandbox.map(readings),
        };
        let answer = self.ledger.write(|state, now| state.report(report, now)).await;
        let (success, message) = verdict(answer.map_err(unavailable)?, || format!("run {run_id} completed"));
        Ok(CompleteResponse { success, message })
    }

    async fn fail(&self, node_ids: &NodeIds, request: FailRequest) -> Result<FailResponse, Status> {
        may_act_as(node_ids, &request.node_id)?;
        let (run_id, retryable) = (request.run_id.clone(), request.retryable);
        let report = Report {
            lease_id: request.lease_id,
            run_id: request.run_id,
            node_id: request.node_id,
            outcome: Outcome::Failed {
                error: ErrorInfo {
                    error_message: request.error_message,
                    error_details: request.error_details,
                    retryable,
                },
                timings: request.timings.map(timings),
            },
            sandbox: request.sandbox.map(readings),
        };
        let answer = self.ledger.write(|state, now| state.report(report, now)).await;
        let (success, message) = verdict(answer.map_err(unavailable)?, || format!("run {run_id} failed"));
        // The reference echoes `retryable`; nothing on this side re-queues.
        Ok(FailResponse {
            success,
            message,
            should_retry: success && retryable,
        })
    }
}

/// One Pull stream's loop, in its own task so it can keep polling after
/// the handler has answered.
struct Puller {
    ledger: Arc<Ledger>,
    node_id: String,
    max_leases: usize,
    idle_poll: Duration,
    shutdown: watch::Receiver<bool>,
    sender: mpsc::Sender<Result<Lease, Status>>,
}

impl Puller {
    /// Ends when the node is unknown (now or after a DELETE), the client
    /// goes away, or the plane shuts down; never by itself otherwise.
    async fn run(mut self) {
        while !*self.shutdown.borrow() && !self.sender.is_closed() {
            let room = self.sender.capacity();
            if room == 0 {
                // The client is not reading: wait for room before leasing
                // more, so no run sits assigned in a full buffer.
                tokio::select! {
                    permit = self.sender.reserve() => if permit.is_err() { return },
                    () = wait_for_shutdown(&mut self.shutdown) => return,
                }
                continue;
            }
            let woken = self.ledger.work_notified();
            tokio::pin!(woken);
            woken.as_mut().enable();

            let (node_id, ttl, max) = (&self.node_id, self.ledger.lease_ttl, self.max_leases.min(room));
            let poll = match self
                .ledger
                .write(|state, now| state.lease(node_id, max, now, ttl))
                .await
            {
                Ok(poll) => poll,
                Err(save) => {
                    let _ = self.sender.try_send(Err(unavailable(save)));
                    return;
                }
            };
            match poll {
                Poll::UnknownNode => return,
                Poll::Leases(grants) if grants.is_empty() => {
                    tokio::select! {
                        // Leaving first: a gone client must not be leased
                        // a run that is ready at the same moment.
                        biased;
                        () = self.sender.closed() => return,
                        () = wait_for_shutdown(&mut self.shutdown) => return,
                        () = &mut woken => {}
                        () = tokio::time::sleep(self.idle_poll) => {}
                    }
                }
                Poll::Leases(grants) => {
                    for grant in grants {
                        // Cannot be full (we took at most `room`); an error
                        // means the client went away. The leases not sent
                        // come back when they expire, as with a dead node.
                        if self.sender.try_send(Ok(lease(grant))).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

fn lease(grant: Grant) -> Lease {
    let run = grant.run;
    let budgets = BudgetConstraints {
        max_tokens: run.budgets.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        max_duration_seconds: run.budgets.max_duration_seconds.unwrap_or(DEFAULT_MAX_DURATION_SECONDS),
        max_fuel: run.budgets.max_fuel.unwrap_or(0),
        max_memory_bytes: run.budgets.max_memory_bytes.unwrap_or(0),
    };
    Lease {
        lease_id: run.lease_id.unwrap_or_default(),
        run_id: run.run_id,
        run_spec: Some(RunSpec {
            agent_id: run.agent_id,
            version: run.version,
            deployment_id: DEPLOYMENT_ID.to_string(),
            input_ref: run.input_ref.into_iter().collect(),
            budgets: Some(budgets),
            metadata: run.metadata.into_iter().collect(),
        }),
        deadline_unix_ms: run.lease_deadline_unix_ms.unwrap_or_default(),
        trace_id: grant.trace_id,
    }
}

/// `(success, message)` for an Ack/Complete/Fail answer.
fn verdict(answer: Result<(), super::state::Refusal>, accepted: impl FnOnce() -> String) -> (bool, String) {
    match answer {
        Ok(()) => (true, accepted()),
        Err(refusal) => (false, refusal.to_string()),
    }
}

/// PERMISSION_DENIED for a node id the caller's certificate does not carry.
fn may_act_as(node_ids: &NodeIds, node_id: &str) -> Result<(), Status> {
    node_ids.check(node_id).map_err(|not_this_node| {
        tracing::warn!(peer = ?not_this_node.peer, "dev control plane refused a request: {not_this_node}");
        Status::permission_denied(not_this_node.to_string())
    })
}

/// A failed save is the plane's fault, not the report's: UNAVAILABLE tells
/// the node to retry, where `success=false` would tell it to give up.
fn unavailable(save: super::store::SaveError) -> Status {
    Status::unavailable(save.to_string())
}

fn sorted(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn readings(report: SandboxReport) -> SandboxReadings {
    SandboxReadings {
        fuel_consumed: report.fuel_consumed,
        peak_memory_bytes: report.peak_memory_bytes,
        instantiate_us: report.instantiate_us,
        peak_host_bytes: report.peak_host_bytes,
    }
}

fn timings(t: TimingInfo) -> Timings {
    Timings {
        duration_ms: t.duration_ms,
        queue_time_ms: t.queue_time_ms,
        execution_time_ms: t.execution_time_ms,
    }
}

fn costs(c: CostInfo) -> Costs {
    Costs {
        tokens_in: c.tokens_in,
        tokens_out: c.tokens_out,
        usd_cost: c.usd_cost,
    }
}
