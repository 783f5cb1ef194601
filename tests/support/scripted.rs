//! A control plane that plays back a script the dev plane would never
//! produce (the same lease twice, a lease already past its deadline, slow
//! or refusing answers) and records what the node reports. It speaks the
//! real wire protocol: REST registration and heartbeat, gRPC leases.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::post;
use node_runtime::proto::lease_service_server::{LeaseService, LeaseServiceServer};
use node_runtime::proto::*;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Default)]
pub struct Recorded {
    pub completes: Vec<CompleteRequest>,
    pub fails: Vec<FailRequest>,
    /// Each Ack, with how many reports (Complete or Fail) had arrived
    /// before it.
    pub acks: Vec<(AckRequest, usize)>,
    /// Pull streams opened.
    pub pulls: usize,
    /// Calls streams asked for.
    pub calls_streams: usize,
    /// Calls read on Calls streams (none is answered: see [`CallsStream`]).
    pub streamed_calls: usize,
    /// Reports answered UNAVAILABLE (see [`Answers::unavailable_first`]).
    pub unavailable: usize,
}

/// How the script answers Complete and Fail.
#[derive(Debug, Clone, Copy)]
pub struct Answers {
    /// How long each answer takes.
    pub delay: std::time::Duration,
    /// `success` in each answer: false is the reference's definitive refusal.
    pub success: bool,
    /// The largest message the plane's gRPC server decodes (tonic's
    /// default, 4 MiB, when `None`); a larger one is refused OUT_OF_RANGE.
    pub max_message_bytes: Option<usize>,
    /// What the Calls stream does.
    pub calls: CallsStream,
    /// The first this many reports (Complete or Fail) are answered
    /// UNAVAILABLE, unrecorded: the node must send them again.
    pub unavailable_first: usize,
    /// How long Pull waits before each lease it streams.
    pub lease_gap: std::time::Duration,
}

/// What the script does with a node's Calls stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CallsStream {
    /// Refuses it UNIMPLEMENTED, as the reference does.
    #[default]
    Unimplemented,
    /// Takes it and reads every call, but never answers one, and never
    /// ends its side.
    Silent,
    /// As `Silent`, but ends its side once the node has ended its own.
    SilentUntilEnd,
    /// Takes it and ends it at once (OK, no answer).
    EndsAtOnce,
    /// Takes it, reads this many calls without answering one, then ends
    /// it (OK): the calls waiting on it are lost with it.
    EndsAfter(usize),
}

impl Default for Answers {
    fn default() -> Self {
        Answers {
            delay: std::time::Duration::ZERO,
            success: true,
            max_message_bytes: None,
            calls: CallsStream::Unimplemented,
            unavailable_first: 0,
            lease_gap: std::time::Duration::ZERO,
        }
    }
}

impl Script {
    /// UNAVAILABLE while reports are still to be refused so.
    fn unavailable_now(&self) -> Result<(), tonic::Status> {
        let mut recorded = self.recorded.lock().unwrap();
        if recorded.unavailable < self.answers.unavailable_first {
            recorded.unavailable += 1;
            return Err(tonic::Status::unavailable("the script is not taking reports yet"));
        }
        Ok(())
    }
}

struct Script {
    /// What each Pull streams, in turn; later Pulls stream nothing.
    leases: Mutex<std::collections::VecDeque<Vec<Lease>>>,
    recorded: Arc<Mutex<Recorded>>,
    answers: Answers,
}

#[tonic::async_trait]
impl LeaseService for Script {
    type PullStream = ReceiverStream<Result<Lease, tonic::Status>>;

    async fn pull(&self, _: tonic::Request<PullRequest>) -> Result<tonic::Response<Self::PullStream>, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        self.recorded.lock().unwrap().pulls += 1;
        let leases = self.leases.lock().unwrap().pop_front().unwrap_or_default();
        let gap = self.answers.lease_gap;
        tokio::spawn(async move {
            for lease in leases {
                tokio::time::sleep(gap).await;
                if tx.send(Ok(lease)).await.is_err() {
                    return;
                }
            }
            // Keep the stream open, as the reference does.
            tx.closed().await;
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn ack(&self, request: tonic::Request<AckRequest>) -> Result<tonic::Response<AckResponse>, tonic::Status> {
        let mut recorded = self.recorded.lock().unwrap();
        let reports = recorded.completes.len() + recorded.fails.len();
        recorded.acks.push((request.into_inner(), reports));
        drop(recorded);
        Ok(tonic::Response::new(AckResponse {
            success: true,
            message: String::new(),
        }))
    }

    async fn complete(
        &self,
        request: tonic::Request<CompleteRequest>,
    ) -> Result<tonic::Response<CompleteResponse>, tonic::Status> {
        tokio::time::sleep(self.answers.delay).await;
        self.unavailable_now()?;
        self.recorded.lock().unwrap().completes.push(request.into_inner());
        let message = if self.answers.success {
            String::new()
        } else {
            "Run held by another node".to_string()
        };
        Ok(tonic::Response::new(CompleteResponse {
            success: self.answers.success,
            message,
        }))
    }

    async fn fail(&self, request: tonic::Request<FailRequest>) -> Result<tonic::Response<FailResponse>, tonic::Status> {
        tokio::time::sleep(self.answers.delay).await;
        self.unavailable_now()?;
        let request = request.into_inner();
        let retryable = request.retryable;
        self.recorded.lock().unwrap().fails.push(request);
        Ok(tonic::Response::new(FailResponse {
            success: self.answers.success,
            message: String::new(),
            should_retry: retryable,
        }))
    }

    type CallsStream = ReceiverStream<Result<NodeCallAnswer, tonic::Status>>;

    /// By default as the reference's server answers (it has no Calls
    /// stream), so the node makes unary calls here.
    async fn calls(
        &self,
        request: tonic::Request<tonic::Streaming<NodeCall>>,
    ) -> Result<tonic::Response<Self::CallsStream>, tonic::Status> {
        self.recorded.lock().unwrap().calls_streams += 1;
        match self.answers.calls {
            CallsStream::Unimplemented => Err(tonic::Status::unimplemented(
                "lease.LeaseService/Calls is not a method of the reference",
            )),
            CallsStream::EndsAtOnce => {
                let (_, answered) = tokio::sync::mpsc::channel(1);
                Ok(tonic::Response::new(ReceiverStream::new(answered)))
            }
            CallsStream::EndsAfter(count) => {
                let (answers, answered) = tokio::sync::mpsc::channel(1);
                let (mut incoming, recorded) = (request.into_inner(), self.recorded.clone());
                tokio::spawn(async move {
                    for _ in 0..count {
                        if !matches!(incoming.message().await, Ok(Some(_))) {
                            break;
                        }
                        recorded.lock().unwrap().streamed_calls += 1;
                    }
                    drop(answers);
                });
                Ok(tonic::Response::new(ReceiverStream::new(answered)))
            }
            mode @ (CallsStream::Silent | CallsStream::SilentUntilEnd) => {
                let (answers, answered) = tokio::sync::mpsc::channel(1);
                let (mut incoming, recorded) = (request.into_inner(), self.recorded.clone());
                tokio::spawn(async move {
                    while let Ok(Some(_)) = incoming.message().await {
                        recorded.lock().unwrap().streamed_calls += 1;
                    }
                    if mode == CallsStream::Silent {
                        // Held until the node's connection goes.
                        answers.closed().await;
                    }
                    drop(answers);
                });
                Ok(tonic::Response::new(ReceiverStream::new(answered)))
            }
        }
    }
}

/// Serves the script on a loopback port; returns its URL and records.
pub async fn serve(leases: Vec<Lease>) -> (String, Arc<Mutex<Recorded>>) {
    serve_with(leases, Answers::default()).await
}

/// Like [`serve`], answering reports as `answers` says.
pub async fn serve_with(leases: Vec<Lease>, answers: Answers) -> (String, Arc<Mutex<Recorded>>) {
    serve_pulls(vec![leases], answers).await
}

/// Like [`serve_with`], streaming `pulls[0]` on the first Pull, `pulls[1]`
/// on the second (after the node reopened the stream), and so on.
pub async fn serve_pulls(pulls: Vec<Vec<Lease>>, answers: Answers) -> (String, Arc<Mutex<Recorded>>) {
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let script = Script {
        leases: Mutex::new(pulls.into()),
        recorded: recorded.clone(),
        answers,
    };
    let mut service = LeaseServiceServer::new(script);
    if let Some(limit) = answers.max_message_bytes {
        service = service.max_decoding_message_size(limit);
    }
    let nodes = post(|| async { (axum::http::StatusCode::CREATED, axum::Json(serde_json::json!({}))) });
    let app = Router::new()
        .route("/v1/nodes:register", nodes.clone())
        .route("/v1/nodes/{heartbeat}", nodes)
        .route_service("/lease.LeaseService/{*method}", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, recorded)
}

pub fn lease(lease_id: &str, agent: &str, deadline_unix_ms: i64) -> Lease {
    Lease {
        lease_id: lease_id.to_string(),
        run_id: format!("run-of-{lease_id}"),
        run_spec: Some(RunSpec {
            agent_id: agent.to_string(),
            version: "1.0.0".to_string(),
            ..RunSpec::default()
        }),
        deadline_unix_ms,
        trace_id: "4bf92f35-77b3-4da6-a3ce-929d0e0e4736".to_string(),
    }
}
