//! The LeaseService client: the lease stream and the three reports.
//!
//! One HTTP/2 channel carries everything. Keep-alive pings, not timeouts,
//! detect a dead connection: an idle `Pull` legitimately sends nothing,
//! not even headers, until the first lease exists.

use std::time::Duration;

use thiserror::Error;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::proto::lease_service_client::LeaseServiceClient;
use crate::proto::{
    AckRequest, CompleteRequest, CompleteResponse, FailRequest, FailResponse, Lease, PullRequest,
};

#[derive(Debug, Error)]
pub enum LeaseClientError {
    #[error("invalid ControlPlaneUrl {url:?} for gRPC: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("{call} failed: {status}")]
    Call {
        call: &'static str,
        status: Box<tonic::Status>,
    },
}

impl LeaseClientError {
    fn call(call: &'static str, status: tonic::Status) -> Self {
        LeaseClientError::Call {
            call,
            status: Box::new(status),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LeaseClient {
    client: LeaseServiceClient<Channel>,
    /// Bound on each unary call (Ack, Complete, Fail), not on Pull.
    call_timeout: Duration,
}

/// The stream of leases for this node.
pub type LeaseStream = tonic::Streaming<Lease>;

impl LeaseClient {
    /// A lazily connected client: nothing is dialled until the first call,
    /// and a lost connection is re-dialled by the next one.
    pub fn connect_lazy(url: &str, call_timeout: Duration) -> Result<Self, LeaseClientError> {
        let invalid = |reason: String| LeaseClientError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|err| invalid(err.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|err| invalid(err.to_string()))?;
        }
        Ok(LeaseClient {
            client: LeaseServiceClient::new(endpoint.connect_lazy()),
            call_timeout,
        })
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

    pub async fn ack(&self, request: AckRequest) -> Result<(bool, String), LeaseClientError> {
        let response = self
            .client
            .clone()
            .ack(self.bounded(request))
            .await
            .map_err(|status| LeaseClientError::call("Ack", status))?
            .into_inner();
        Ok((response.success, response.message))
    }

    pub async fn complete(
        &self,
        request: CompleteRequest,
    ) -> Result<CompleteResponse, LeaseClientError> {
        self.client
            .clone()
            .complete(self.bounded(request))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| LeaseClientError::call("Complete", status))
    }

    pub async fn fail(&self, request: FailRequest) -> Result<FailResponse, LeaseClientError> {
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
