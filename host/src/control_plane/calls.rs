//! The Calls stream: Ack, Complete and Fail on one long-lived gRPC stream
//! (a node-runtime addition to the LeaseService), answered by id, instead
//! of one HTTP/2 request each. A request costs both sides its headers, a
//! stream's setup and its own task; a message on an open stream costs a
//! frame. Each call means exactly what its unary form means, and is
//! answered as that form would be: a response, or the status the call
//! would have ended with.
//!
//! The stream is opened at the first call, which is made unary meanwhile,
//! as is every call while the stream is not open. A plane without it (the
//! reference) answers UNIMPLEMENTED: the node then makes unary calls, and
//! asks again every [`ASK_AGAIN_AFTER`], as the plane may be upgraded. A
//! broken stream fails the calls waiting on it (as a broken connection
//! fails requests: their callers retry as they do then; an Ack is made
//! again unary, see [`LeaseClient::ack`](super::LeaseClient::ack)) and is reopened
//! at a later call: [`REOPEN_AFTER`] after a connection's trouble or the
//! plane ending it (doubling, up to [`ASK_AGAIN_AFTER`], while the streams
//! opened end without answering a call: a plane that takes the stream only
//! to end it is not asked every two seconds), [`ASK_AGAIN_AFTER`] after
//! the plane refused it a status of its own (a call too large for it, say).
//!
//! A call that gets no answer in its time closes the stream, and no new
//! one is opened until the plane has ended that one (or its connection
//! went). A plane that stopped reading it holds what was queued on it,
//! and HTTP/2 gives the node no way to take that back: dropping its side
//! does not reset a stream whose sending waits for the plane's window, so
//! each stream closed that way would stay open at the plane (with the
//! calls queued on it, which the plane may still read and answer as
//! repeats), and enough of them would use up the connection's streams,
//! Pull's and the unary calls' included. One such stream, with at most
//! [`MAX_QUEUED_CALLS`] calls, is the bound: against a plane that never
//! reads it again, for the life of the process; after a stall, until the
//! plane has read the rest and ended it.
//!
//! Only calls up to [`MAX_STREAMED_CALL_BYTES`] take the stream. A larger
//! report goes unary: it would hold the Acks behind it, and a plane that
//! refuses it for its size refuses that one call (the reporter shrinks it),
//! where on the stream the refusal would break every call sharing it.

// A call not taken is given back (`Err(call)`) to be made unary: moved
// once, where boxing it would cost every call an allocation.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use support::Backoff;
use tokio::sync::{Notify, mpsc, oneshot};
use tonic::transport::Channel;

use proto::lease_service_client::LeaseServiceClient;
use proto::{NodeCall, NodeCallAnswer, node_call, node_call_answer};

/// The largest call (encoded) sent on the stream; larger ones are unary.
pub const MAX_STREAMED_CALL_BYTES: usize = 64 * 1024;

/// How long a plane that has no Calls stream is not asked again.
pub const ASK_AGAIN_AFTER: Duration = Duration::from_secs(600);

/// How long opening the stream may take before it is given up (and calls
/// stay unary until a later one tries again).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// After the stream broke (or could not be opened), calls stay unary this
/// long before one opens it again.
pub const REOPEN_AFTER: Duration = Duration::from_secs(2);

/// Calls queued for the stream at most; past it, calls go unary.
pub const MAX_QUEUED_CALLS: usize = 128;

type Answered = Result<node_call_answer::Answer, tonic::Status>;

/// The Calls stream of one [`LeaseClient`](super::LeaseClient) and all its
/// clones.
pub struct CallStream {
    client: LeaseServiceClient<Channel>,
    state: Mutex<State>,
}

struct State {
    mode: Mode,
    /// Calls sent on the open stream and not yet answered, by id.
    waiting: HashMap<u64, oneshot::Sender<Answered>>,
    next_id: u64,
    /// How long after a break the stream may open again.
    reopen: Backoff,
    /// Whether the plane's lack of the stream has been logged.
    said_unsupported: bool,
}

enum Mode {
    /// Not open: the next call from `at` on opens it; `None`: no call
    /// does until the stream given up has ended.
    Closed {
        at: Option<Instant>,
    },
    Opening,
    Open {
        calls: mpsc::Sender<NodeCall>,
        /// Wakes the stream's reader to drop it.
        close: Arc<Notify>,
    },
}

impl CallStream {
    pub fn new(client: LeaseServiceClient<Channel>) -> Arc<CallStream> {
        Arc::new(CallStream {
            client,
            state: Mutex::new(State {
                mode: Mode::Closed {
                    at: Some(Instant::now()),
                },
                waiting: HashMap::new(),
                next_id: 0,
                reopen: Backoff::new(REOPEN_AFTER, ASK_AGAIN_AFTER),
                said_unsupported: false,
            }),
        })
    }

    /// Makes `call` on the stream and waits up to `timeout` for its answer.
    /// `Err(call)`: the stream is not open (or the call is too large for
    /// it): make the unary call instead.
    pub async fn call(self: &Arc<Self>, call: node_call::Call, timeout: Duration) -> Result<Answered, node_call::Call> {
        let (id, answer) = self.send(call)?;
        // A caller that stops waiting (its future dropped) leaves no entry.
        let _waiting = Waiting { stream: self, id };
        Ok(match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(answered)) => answered,
            Ok(Err(_)) => Err(tonic::Status::unavailable(
                "the call stream closed before the control plane answered",
            )),
            Err(_) => {
                self.close(Some(id), Closing::Unanswered(timeout));
                Err(tonic::Status::deadline_exceeded(format!(
                    "the control plane did not answer within {timeout:?}"
                )))
            }
        })
    }

    /// Queues `call` on the open stream: its id and where its answer comes.
    fn send(self: &Arc<Self>, call: node_call::Call) -> Result<(u64, oneshot::Receiver<Answered>), node_call::Call> {
        let mut state = self.state.lock().expect("the call stream's state is never poisoned");
        let now = Instant::now();
        let calls = match &state.mode {
            Mode::Open { calls, .. } => calls,
            Mode::Closed { at: Some(at) } if *at <= now => {
                state.mode = Mode::Opening;
                tokio::spawn(open(Arc::downgrade(self), self.client.clone()));
                return Err(call);
            }
            Mode::Closed { .. } | Mode::Opening => return Err(call),
        };
        if call.encoded_len() > MAX_STREAMED_CALL_BYTES {
            return Err(call);
        }
        let id = state.next_id;
        match calls.try_send(NodeCall { id, call: Some(call) }) {
            Ok(()) => {}
            // Full: this one goes unary; the stream is kept.
            Err(mpsc::error::TrySendError::Full(sent)) => return Err(sent.call.expect("just set")),
            Err(mpsc::error::TrySendError::Closed(sent)) => {
                drop(state);
                self.close(
                    None,
                    // Its reader will say whether it answered; this is a
                    // plain break, not a sign the plane refuses it.
                    Closing::Broke {
                        why: "its sender closed".to_string(),
                        answered: true,
                    },
                );
                return Err(sent.call.expect("just set"));
            }
        }
        let (answer, answered) = oneshot::channel();
        state.next_id += 1;
        state.waiting.insert(id, answer);
        Ok((id, answered))
    }

    /// Closes the open stream: the calls waiting on it fail (the one that
    /// timed out, `timed_out`, has given up already), and a later call
    /// opens a new one, when `why` says.
    fn close(&self, timed_out: Option<u64>, why: Closing) {
        let mut state = self.state.lock().expect("the call stream's state is never poisoned");
        // A call of a stream already closed says nothing of the open one.
        if let Some(id) = timed_out
            && state.waiting.remove(&id).is_none()
        {
            return;
        }
        if let Mode::Open { close, .. } = &state.mode {
            close.notify_one();
            let now = Instant::now();
            let at = match why {
                Closing::Broke { why, answered } => {
                    tracing::info!(
                        "the stream of calls to the control plane closed ({why}); calls are unary until it reopens"
                    );
                    if answered {
                        state.reopen.reset();
                    }
                    Some(now + state.reopen.next_delay())
                }
                Closing::Refused(status) => {
                    tracing::warn!(
                        error = %status,
                        "the control plane ended the stream of calls with an error of its own; calls are unary for {} minutes",
                        ASK_AGAIN_AFTER.as_secs() / 60
                    );
                    Some(now + ASK_AGAIN_AFTER)
                }
                Closing::Unanswered(timeout) => {
                    tracing::warn!(
                        "a call on the stream of calls got no answer within {timeout:?}: the stream is closed, and \
                         calls are unary until the plane has ended it (a plane that stopped reading a stream keeps \
                         it open, with what was queued on it; against one that never reads it again, until the \
                         node restarts)"
                    );
                    None
                }
            };
            state.mode = Mode::Closed { at };
        }
        // Dropping each waiting call's sender answers it "closed".
        state.waiting.clear();
    }

    /// The stream given up for an unanswered call has ended (the plane
    /// ended it, or its connection went): nothing of it is left at the
    /// plane, so a later call may open a new one.
    fn abandoned_ended(&self) {
        let mut state = self.state.lock().expect("the call stream's state is never poisoned");
        if let Mode::Closed { at: None } = state.mode {
            tracing::info!("the stream of calls given up earlier has ended; a later call opens a new one");
            state.mode = Mode::Closed {
                at: Some(Instant::now() + REOPEN_AFTER),
            };
        }
    }

    fn answered(&self, answer: NodeCallAnswer) {
        let waiting = {
            let mut state = self.state.lock().expect("the call stream's state is never poisoned");
            state.waiting.remove(&answer.id)
        };
        let Some(waiting) = waiting else {
            // Its caller gave up (timed out), or the plane answered an id
            // it was never sent: nothing waits for it.
            tracing::debug!(id = answer.id, "an answer on the call stream that no call waits for");
            return;
        };
        let answered = answer
            .answer
            .ok_or_else(|| tonic::Status::internal("the control plane's answer on the call stream was empty"))
            .and_then(|answer| match answer {
                node_call_answer::Answer::Status(status) => Err(tonic::Status::new(status.code.into(), status.message)),
                answer => Ok(answer),
            });
        let _ = waiting.send(answered);
    }
}

/// A call waiting for its answer: removed from the waiting calls when its
/// caller stops waiting, however it stops.
struct Waiting<'s> {
    stream: &'s CallStream,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.stream.state.lock() {
            state.waiting.remove(&self.id);
        }
    }
}

/// Opens the stream and reads its answers until it ends, breaks, or is
/// closed. Holds the stream only weakly: when the last client goes, its
/// side of the stream ends, and so does the stream.
async fn open(stream: Weak<CallStream>, mut client: LeaseServiceClient<Channel>) {
    let (calls, queued) = mpsc::channel(MAX_QUEUED_CALLS);
    let opening = client.calls(tokio_stream::wrappers::ReceiverStream::new(queued));
    let opened = tokio::time::timeout(OPEN_TIMEOUT, opening).await;
    let Some(this) = stream.upgrade() else { return };
    let mut answers = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            let mut state = this.state.lock().expect("the call stream's state is never poisoned");
            if !state.said_unsupported {
                state.said_unsupported = true;
                tracing::info!(
                    "the control plane has no stream of calls (Calls is UNIMPLEMENTED, as on the reference): \
                     one request per Ack, Complete and Fail"
                );
            }
            // Asked again in a while: the plane may be upgraded.
            state.mode = Mode::Closed {
                at: Some(Instant::now() + ASK_AGAIN_AFTER),
            };
            return;
        }
        failed => {
            // The connection's trouble (an outage, or no answer in time):
            // asked again soon, so that calls share a stream as soon as the
            // plane is back. A plane that refuses it otherwise: ever less
            // often.
            let (why, refused) = match failed {
                Ok(Err(status)) => (
                    status.to_string(),
                    !matches!(Closing::of(status, false), Closing::Broke { .. }),
                ),
                _ => (format!("no answer within {OPEN_TIMEOUT:?}"), false),
            };
            tracing::debug!(%why, "the stream of calls to the control plane could not be opened; calls stay unary");
            let mut state = this.state.lock().expect("the call stream's state is never poisoned");
            let delay = if refused {
                state.reopen.next_delay()
            } else {
                REOPEN_AFTER
            };
            state.mode = Mode::Closed {
                at: Some(Instant::now() + delay),
            };
            return;
        }
    };
    let close = Arc::new(Notify::new());
    {
        let mut state = this.state.lock().expect("the call stream's state is never poisoned");
        state.mode = Mode::Open {
            calls,
            close: close.clone(),
        };
    }
    tracing::info!("Ack, Complete and Fail share one stream to the control plane (Calls)");
    drop(this);
    let mut answered = false;
    let why = loop {
        let message = tokio::select! {
            () = close.notified() => {
                // Closed from outside (a call unanswered, its sender gone):
                // the plane may still hold it. Its answers are read and
                // dropped until it ends; then a later call may open another.
                while let Ok(Some(_)) = answers.message().await {}
                if let Some(this) = stream.upgrade() {
                    this.abandoned_ended();
                }
                return;
            }
            message = answers.message() => message,
        };
        let Some(this) = stream.upgrade() else { return };
        match message {
            Ok(Some(answer)) => {
                answered = true;
                this.answered(answer);
            }
            Ok(None) => {
                break Closing::Broke {
                    why: "the control plane ended it".to_string(),
                    answered,
                };
            }
            Err(status) => break Closing::of(status, answered),
        }
    };
    if let Some(this) = stream.upgrade() {
        this.close(None, why);
        // Given up by a call's timeout just as it ended by itself: it has
        // ended all the same.
        this.abandoned_ended();
    }
}

/// Why the open stream closes, which says when it may open again.
enum Closing {
    /// The connection's trouble, or the plane ended it: soon, if it
    /// `answered` a call (else later each time).
    Broke { why: String, answered: bool },
    /// The plane ended it with a status of its own: after a while.
    Refused(tonic::Status),
    /// A call on it got no answer in its time: once the plane ended it.
    Unanswered(Duration),
}

impl Closing {
    fn of(status: tonic::Status, answered: bool) -> Closing {
        use tonic::Code;
        match status.code() {
            // What a lost connection, a restart or a shutdown ends it with.
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::DeadlineExceeded => {
                Closing::Broke {
                    why: status.to_string(),
                    answered,
                }
            }
            _ => Closing::Refused(status),
        }
    }
}
