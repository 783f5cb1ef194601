//! Outbound HTTP (`wasi:http/outgoing-handler`): the egress policy.
//!
//! Every request an agent makes passes through [`EgressPolicy`]. Until
//! allow-lists exist, the policy denies every request: the agent gets
//! `HTTP-request-denied`, an error it can handle, and the node logs the
//! host it tried to reach.

use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

#[derive(Debug, Default)]
pub struct EgressPolicy;

impl WasiHttpHooks for EgressPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), Error>> + Send>,
                    ),
                    Error,
                >,
            > + Send,
    > {
        let host = request.uri().authority().map(|a| a.to_string());
        tracing::warn!(
            host = host.as_deref().unwrap_or("<none>"),
            "outbound HTTP denied: no host is on this agent's allow-list"
        );
        Box::new(async { Err(Error::HttpRequestDenied) })
    }
}
