//! The LeaseService client: the lease stream and the three reports.
//!
//! One HTTP/2 channel carries everything. Keep-alive pings, not timeouts,
//! detect a dead connection: an idle `Pull` legitimately sends nothing,
//! not even headers, until the first lease exists.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tonic::transport::{Channel, Endpoint};

use super::calls::CallStream;
use super::report::Report;
use super::tls::{self, ControlPlaneTls, TlsConnector};

use proto::lease_service_client::LeaseServiceClient;
use proto::{
    AckRequest, CompleteRequest, CompleteResponse, FailRequest, FailResponse, Lease, PullRequest, node_call,
    node_call_answer,
};

#[derive(Debug, Error)]
pub enum LeaseClientError {
    #[error("invalid ControlPlaneUrl {url:?} for gRPC: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("{call} failed: {}", describe_status(status))]
    Call {
        call: &'static str,
        status: Box<tonic::Status>,
    },
}

/// Whether a broken lease stream broke on a message larger than the
/// client decodes (tonic: OUT_OF_RANGE, "decoded message length too
/// large: found N bytes, the limit is: M bytes").
pub fn is_message_too_large(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::OutOfRange && status.message().contains("message length too large")
}

impl LeaseClientError {
    /// Whether the control plane refused the message for its size: gRPC
    /// servers answer RESOURCE_EXHAUSTED (ASP.NET's "Received message
    /// exceeds the maximum configured message size") or OUT_OF_RANGE
    /// (tonic's "decoded message length too large"). Sending it again
    /// cannot help.
    pub fn refused_for_size(&self) -> bool {
        let LeaseClientError::Call { status, .. } = self else {
            return false;
        };
        let message = status.message().to_ascii_lowercase();
        matches!(status.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange)
            && message.contains("message")
            && (message.contains("size") || message.contains("length") || message.contains("large"))
    }

    fn call(call: &'static str, status: tonic::Status) -> Self {
        LeaseClientError::Call {
            call,
            status: Box::new(status),
        }
    }
}

#[derive(Clone)]
pub struct LeaseClient {
    client: LeaseServiceClient<Channel>,
    /// Ack, Complete and Fail, where the plane has the Calls stream.
    /// None: every call is unary (`NodeRuntime.CallsStream` false).
    calls: Option<Arc<CallStream>>,
    /// Bound on each call (Ack, Complete, Fail), not on Pull.
    call_timeout: Duration,
}

impl std::fmt::Debug for LeaseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseClient")
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

/// The stream of leases for this node.
pub type LeaseStream = tonic::Streaming<Lease>;

impl LeaseClient {
    /// A lazily connected client: nothing is dialled until the first call,
    /// and a lost connection is re-dialled by the next one. An `https://`
    /// URL is verified against the system roots.
    pub fn connect_lazy(url: &str, call_timeout: Duration) -> Result<Self, LeaseClientError> {
        let tls = ControlPlaneTls::configure(url, &tls::TlsOptions::default()).map_err(|err| {
            LeaseClientError::InvalidUrl {
                url: url.to_string(),
                reason: err.to_string(),
            }
        })?;
        Self::connect_lazy_with(url, call_timeout, &tls)
    }

    /// Like [`Self::connect_lazy`], with the TLS the configuration asks
    /// for. Each (re)connection is a full handshake, so a rotated client
    /// certificate is presented from the next reconnect on.
    pub fn connect_lazy_with(
        url: &str,
        call_timeout: Duration,
        tls: &ControlPlaneTls,
    ) -> Result<Self, LeaseClientError> {
        let invalid = |reason: String| LeaseClientError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let tls_config = tls.client_config(&[b"h2"]);
        // With TLS the connector dials an `http://` endpoint itself (tonic
        // refuses an https:// URI it does not encrypt); the origin keeps
        // `:scheme https` on the requests.
        let dial_url = match (&tls_config, url.get(..8)) {
            (Some(_), Some(scheme)) if scheme.eq_ignore_ascii_case("https://") => format!("http://{}", &url[8..]),
            _ => url.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(dial_url)
            .map_err(|err| invalid(err.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let channel = match tls_config {
            Some(config) => {
                let origin = url
                    .parse()
                    .map_err(|err: http::uri::InvalidUri| invalid(err.to_string()))?;
                endpoint = endpoint.origin(origin);
                endpoint.connect_with_connector_lazy(TlsConnector::new(config))
            }
            None => endpoint.connect_lazy(),
        };
        let client = LeaseServiceClient::new(channel);
        Ok(LeaseClient {
            calls: Some(CallStream::new(client.clone())),
            client,
            call_timeout,
        })
    }

    /// Whether Ack, Complete and Fail try the `Calls` stream first (on
    /// unless turned off).
    pub fn calls_stream(mut self, enabled: bool) -> Self {
        if !enabled {
            self.calls = None;
        }
        self
    }

    /// `call` on the Calls stream; `Err(call)`: make it unary instead.
    async fn on_stream(
        &self,
        call: node_call::Call,
    ) -> Result<Result<node_call_answer::Answer, tonic::Status>, node_call::Call> {
        match &self.calls {
            Some(calls) => calls.call(call, self.call_timeout).await,
            None => Err(call),
        }
    }

    /// Decodes lease messages of up to `bytes` (tonic's default is 4 MiB).
    pub fn max_lease_message_bytes(mut self, bytes: usize) -> Self {
        self.client = self.client.max_decoding_message_size(bytes);
        self
    }

    /// Opens the lease stream. Returns only once the server sends headers,
    /// which the reference does with its first lease: callers wait here
    /// under a shutdown signal, never under a timeout.
    pub async fn pull(&self, node_id: &str, max_leases: u32) -> Result<LeaseStream, LeaseClientError> {
        let request = PullRequest {
            node_id: node_id.to_string(),
            max_leases: i32::try_from(max_leases).unwrap_or(i32::MAX),
        };
        self.client
            .clone()
            .pull(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| LeaseClientError::call("Pull", status))
    }

    /// Acks a lease. An Ack the Calls stream lost (the stream broke, or
    /// no answer came in time) is made once more, unary: nothing else
    /// would send it again (a report is retried by its sender), and a
    /// repeated Ack changes nothing at the plane.
    pub async fn ack(&self, request: AckRequest) -> Result<(bool, String), LeaseClientError> {
        let request = match &self.calls {
            None => request,
            Some(_) => match self.on_stream(node_call::Call::Ack(request.clone())).await {
                Ok(Ok(node_call_answer::Answer::Ack(response))) => return Ok((response.success, response.message)),
                Ok(Err(status))
                    if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) =>
                {
                    tracing::debug!(lease_id = %request.lease_id, error = %status, "an Ack the call stream lost is made again, unary");
                    request
                }
                Ok(answered) => return Err(unexpected("Ack", answered)),
                Err(_) => request,
            },
        };
        let response = self
            .client
            .clone()
            .ack(self.bounded(request))
            .await
            .map_err(|status| LeaseClientError::call("Ack", status))?
            .into_inner();
        Ok((response.success, response.message))
    }

    /// Sends a run's report, Complete or Fail: `Ok((true, _))` when the
    /// plane took it, `Ok((false, message))` when it answered but refused it
    /// (it will never take it), `Err` when it did not answer.
    pub async fn send_report(&self, report: &Report) -> Result<(bool, String), LeaseClientError> {
        match report {
            Report::Complete(request) => self
                .complete(request.clone())
                .await
                .map(|response| (response.success, response.message)),
            Report::Fail(request) => self
                .fail(request.clone())
                .await
                .map(|response| (response.success, response.message)),
        }
    }

    pub async fn complete(&self, request: CompleteRequest) -> Result<CompleteResponse, LeaseClientError> {
        let request = match self.on_stream(node_call::Call::Complete(request)).await {
            Ok(Ok(node_call_answer::Answer::Complete(response))) => return Ok(response),
            Ok(answered) => return Err(unexpected("Complete", answered)),
            Err(node_call::Call::Complete(request)) => request,
            Err(_) => unreachable!("the call stream gives back the call it was given"),
        };
        self.client
            .clone()
            .complete(self.bounded(request))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| LeaseClientError::call("Complete", status))
    }

    pub async fn fail(&self, request: FailRequest) -> Result<FailResponse, LeaseClientError> {
        let request = match self.on_stream(node_call::Call::Fail(request)).await {
            Ok(Ok(node_call_answer::Answer::Fail(response))) => return Ok(response),
            Ok(answered) => return Err(unexpected("Fail", answered)),
            Err(node_call::Call::Fail(request)) => request,
            Err(_) => unreachable!("the call stream gives back the call it was given"),
        };
        self.client
            .clone()
            .fail(self.bounded(request))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| LeaseClientError::call("Fail", status))
    }

    fn bounded<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.call_timeout);
        request
    }
}

/// A status with its transport causes, which tonic's `Display` leaves out
/// (a refused TLS handshake would read as a bare "transport error").
fn describe_status(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = status.source() {
        let causes = tls::describe(source);
        if !text.contains(&causes) {
            text.push_str(" (");
            text.push_str(&causes);
            text.push(')');
        }
    }
    text
}

/// A call's answer on the stream that is not its response: the status it
/// ended with, or another call's response.
fn unexpected(call: &'static str, answered: Result<node_call_answer::Answer, tonic::Status>) -> LeaseClientError {
    let status = answered.err().unwrap_or_else(|| {
        tonic::Status::internal("the control plane answered with another call's response on the call stream")
    });
    LeaseClientError::call(call, status)
}
