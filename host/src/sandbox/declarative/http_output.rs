//! The reference's `Http` output connector: one POST (or PUT, PATCH) of
//! the agent's answer per run, retried on 5xx, 408, 429 and network
//! errors.
//!
//! Everything that could widen what the operator allowed is decided in
//! [`prepare`], before the model is called and before anything is sent:
//!
//! - the endpoint's host must be on the operator's allow-list: the
//!   node-wide `DeclarativeAgents.AllowedHosts`, or the agent's own HTTP
//!   grants as any run of that agent id gets them (narrowed by the lease's
//!   `http.allow`, as for a component);
//! - a host name that resolves to a loopback, link-local, private or
//!   otherwise internal address is reached only when the operator listed
//!   that address (or wrote `localhost`) explicitly, and the addresses
//!   checked are the ones connected to (no second lookup to rebind);
//! - `${NAME}` placeholders are filled from the operator's secrets, each
//!   only for the hosts it is bound to (`secrets.rs`);
//! - redirects are not followed and no proxy is used: the request goes to
//!   the checked address or nowhere.
//!
//! Each attempt carries `Idempotency-Key` (from `idempotencyKeyFormat`:
//! `{RunId}`, `{MessageId}`), `X-Correlation-ID` (the run id) and
//! `traceparent` (the run's trace), is bounded by the connector's
//! `timeoutSeconds` and the run's deadline, and counts as one of the run's
//! HTTP requests in its report. Backoff is the connector's
//! `retryPolicy`, with up to 20% jitter; a `Retry-After` in seconds is
//! honoured up to `maxRetryDelayMs`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue};
use rand::Rng;

use super::secrets::Secrets;
use super::spec::{HttpOutput, RetryPolicy};
use crate::sandbox::capabilities::http::EgressPolicy;
use crate::sandbox::capabilities::log::HostWarning;
use crate::sandbox::run::RunContext;
use crate::sandbox::{HTTP_ALLOW_METADATA_KEY, HostGrant};

/// The events' target, so that log filters can pick the connector out.
const LOG_TARGET: &str = "node_runtime::sandbox::declarative::http_output";

/// The shortest wait between two attempts, whatever the policy says: a
/// spec's `retryDelayMs: 0` must not fire its retries in a burst.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(100);

/// How much of an error answer's body is quoted in the run's failure.
const QUOTED_BODY_BYTES: usize = 512;

/// A request the checks passed: filled, resolved and pinned.
pub(crate) struct PreparedPost {
    /// The endpoint as the spec wrote it (placeholders as names), the only
    /// form messages show.
    shown: String,
    /// The secret values this request carries: cut out of anything quoted
    /// back (a target's error body may echo the request).
    scrub: Vec<String>,
    url: reqwest::Url,
    host: String,
    port: u16,
    method: http::Method,
    headers: http::HeaderMap,
    /// The addresses checked for a host name; empty for an IP literal.
    pinned: Vec<SocketAddr>,
    timeout: Duration,
    retry: RetryPolicy,
}

/// Why the output was not sent, before or after trying.
#[derive(Debug, Clone)]
pub(crate) struct NotDelivered {
    pub message: String,
    /// Whether a later attempt could succeed (the target failed or could
    /// not be reached); a refusal or a 4xx will not.
    pub retryable: bool,
    /// Refused by the node's checks: nothing was sent.
    pub refused: bool,
    /// The run's deadline ended the delivery.
    pub deadline: bool,
}

impl NotDelivered {
    fn refused(message: String) -> NotDelivered {
        NotDelivered {
            message,
            retryable: false,
            refused: true,
            deadline: false,
        }
    }
}

/// What the target answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivered {
    pub status: u16,
    pub attempts: u32,
}

/// Fills and checks the request `output` describes, for this run.
/// Nothing is sent.
pub(crate) async fn prepare(
    output: &HttpOutput,
    node_hosts: &[HostGrant],
    secrets: &Secrets,
    egress: &mut EgressPolicy,
    context: &RunContext,
    deadline: Instant,
) -> Result<PreparedPost, NotDelivered> {
    let refuse = |message: String| NotDelivered::refused(message);
    // The host is the one written: placeholders may stand only in the
    // path and query (`spec.rs` refuses one before them), so the template
    // names the host the checks below are about, and no message about it
    // can carry a secret's value.
    secrets
        .fill("output.config.endpoint", &output.endpoint, None)
        .map_err(|err| refuse(err.to_string()))?;
    let url = reqwest::Url::parse(&output.endpoint).map_err(|err| {
        refuse(format!(
            "output.config.endpoint {} is not a URL ({err})",
            quote_endpoint(&output.endpoint)
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse(format!(
            "output.config.endpoint {} must be an http:// or https:// URL",
            quote_endpoint(&output.endpoint)
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse(
            "output.config.endpoint carries credentials in the URL: put them in a header with a \
             ${NAME} placeholder instead"
                .to_string(),
        ));
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let port = url.port_or_known_default().unwrap_or(443);
    // The node-wide list, narrowed by the lease's `http.allow` as the
    // agent's own grants are (metadata never widens).
    let narrowing: Option<Vec<HostGrant>> = context.metadata.get(HTTP_ALLOW_METADATA_KEY).map(|list| {
        list.split(',')
            .filter_map(|entry| HostGrant::parse(entry.trim()).ok())
            .collect()
    });
    let allowed = |host: &str, port: u16| {
        let node_wide = node_hosts.iter().any(|g| g.allows(host, port))
            && narrowing
                .as_ref()
                .is_none_or(|narrowed| narrowed.iter().any(|g| g.allows(host, port)));
        node_wide || egress.allows(host, port)
    };
    if host.is_empty() || !allowed(&host, port) {
        egress.denied += 1;
        if egress.warnings.admit(HostWarning::EgressDenied) {
            tracing::warn!(target: LOG_TARGET, host = %host, port, "output connector denied: the host is not on the allow-list");
        }
        return Err(refuse(format!(
            "the output endpoint's host {host}:{port} is not on the operator's allow-list: add it \
             to DeclarativeAgents.AllowedHosts (every declarative agent) or \
             Sandbox.Grants.{}.AllowedHosts (this agent); run-agent: --allow-http {host}; nothing \
             was sent",
            context.agent_id
        )));
    }
    // Percent-encoded: a `?`, `#` or `/` in a secret must not change the
    // request's path or query.
    let filled = secrets
        .fill_encoded("output.config.endpoint", &output.endpoint, Some((&host, port)))
        .map_err(|err| refuse(err.to_string()))?;
    let url = reqwest::Url::parse(&filled)
        .ok()
        .filter(|filled| filled.host_str().map(str::to_ascii_lowercase).as_deref() == Some(host.as_str()))
        .ok_or_else(|| {
            refuse(format!(
                "output.config.endpoint {} is not a URL of the same host once its placeholders are filled",
                quote_endpoint(&output.endpoint)
            ))
        })?;
    let mut scrub = secrets.values_in(&output.endpoint);

    let mut headers = http::HeaderMap::new();
    for (name, template) in &output.headers {
        let field = format!("output.config.headers.{name}");
        let value = secrets
            .fill(&field, template, Some((&host, port)))
            .map_err(|err| refuse(err.to_string()))?;
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| refuse(format!("{field}: {name:?} is not a header name")))?;
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| refuse(format!("{field}: the value is not a valid header value")))?;
        if Secrets::has_placeholder(template) {
            value.set_sensitive(true);
            scrub.extend(secrets.values_in(template));
        }
        headers
            .try_append(header, value)
            .map_err(|_| refuse(format!("{field}: too many headers")))?;
    }
    if !headers.contains_key(http::header::CONTENT_TYPE) {
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Some(format) = &output.idempotency_key_format {
        let message_id = context
            .input_ref
            .get("messageId")
            .filter(|id| !id.is_empty())
            .unwrap_or(&context.run_id);
        let key = format
            .replace("{RunId}", &context.run_id)
            .replace("{MessageId}", message_id);
        let value = HeaderValue::from_str(&key).map_err(|_| {
            refuse(
                "the idempotency key made from output.config.idempotencyKeyFormat is not a valid header value".into(),
            )
        })?;
        headers.insert(HeaderName::from_static("idempotency-key"), value);
    }
    if let Ok(run_id) = HeaderValue::from_str(&context.run_id) {
        headers.insert(HeaderName::from_static("x-correlation-id"), run_id);
    }
    if let Some(traceparent) = egress.traceparent(None) {
        headers.insert(HeaderName::from_static("traceparent"), traceparent);
    }

    let pinned = match literal_ip(&host) {
        // The operator listed the address itself (the check above).
        Some(_) => Vec::new(),
        None => {
            let left = deadline.saturating_duration_since(Instant::now());
            let found = tokio::time::timeout(left, tokio::net::lookup_host((host.as_str(), port)))
                .await
                .map_err(|_| NotDelivered {
                    message: format!("the run's deadline passed while looking up {host}; nothing was sent"),
                    retryable: true,
                    refused: false,
                    deadline: true,
                })?
                .map_err(|err| NotDelivered {
                    message: format!("cannot look up the output endpoint's host {host}: {err}; nothing was sent"),
                    retryable: true,
                    refused: false,
                    deadline: false,
                })?
                .collect::<Vec<_>>();
            // `localhost` written by the operator allows its loopback
            // addresses, and only those.
            let loopback_name = host == "localhost" || host.ends_with(".localhost");
            let (kept, internal): (Vec<SocketAddr>, Vec<SocketAddr>) = found.into_iter().partition(|addr| {
                !is_internal(addr.ip())
                    || (loopback_name && addr.ip().to_canonical().is_loopback())
                    || allowed(&ip_host(addr.ip()), port)
            });
            if kept.is_empty() {
                let listed = internal.iter().map(|a| ip_host(a.ip())).collect::<Vec<_>>().join(", ");
                egress.denied += 1;
                return Err(refuse(format!(
                    "the output endpoint's host {host} resolves only to internal addresses ({listed}), \
                     which are reached only when the operator lists them: add the address to \
                     DeclarativeAgents.AllowedHosts or the agent's AllowedHosts; nothing was sent"
                )));
            }
            kept
        }
    };
    scrub.sort_by_key(|value| std::cmp::Reverse(value.len()));
    scrub.dedup();
    Ok(PreparedPost {
        shown: quote_endpoint(&output.endpoint),
        scrub,
        url,
        host,
        port,
        method: output.method.clone(),
        headers,
        pinned,
        timeout: output.timeout,
        retry: output.retry,
    })
}

/// Sends `body`, retrying as the connector's policy says while the
/// deadline allows.
pub(crate) async fn send(
    post: PreparedPost,
    body: Vec<u8>,
    egress: &mut EgressPolicy,
    deadline: Instant,
) -> Result<Delivered, NotDelivered> {
    support::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(post.timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("node-runtime/", env!("CARGO_PKG_VERSION")));
    if !post.pinned.is_empty() {
        builder = builder.resolve_to_addrs(&post.host, &post.pinned);
    }
    let client = builder.build().map_err(|err| NotDelivered {
        message: format!("cannot make the output connector's HTTP client: {err}"),
        retryable: true,
        refused: false,
        deadline: false,
    })?;
    let body = bytes::Bytes::from(body);
    let shown = &post.shown;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NotDelivered {
                message: format!(
                    "the run's deadline passed before the output reached {shown} ({} attempts)",
                    attempt - 1
                ),
                retryable: true,
                refused: false,
                deadline: true,
            });
        }
        egress.requests += 1;
        let sent = client
            .request(post.method.clone(), post.url.clone())
            .headers(post.headers.clone())
            .body(body.clone())
            .timeout(post.timeout.min(left))
            .send()
            .await;
        let (why, retry_after) = match sent {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    return Ok(Delivered {
                        status: status.as_u16(),
                        attempts: attempt,
                    });
                }
                let retry_after = retry_after(response.headers());
                // A target's answer may echo the request in any encoding,
                // and no scrubbing finds every one: when the request
                // carried a secret, nothing of the answer is quoted.
                let quoted = if post.scrub.is_empty() {
                    quoted_body(response).await
                } else {
                    drop(response);
                    " (its body is not quoted: the request carried a secret)".to_string()
                };
                let why = format!("{shown} answered {status}{quoted}");
                let transient = status.is_server_error() || matches!(status.as_u16(), 408 | 429);
                if !transient {
                    let hint = if status.is_redirection() {
                        " (redirects are not followed: point the endpoint at the final URL)"
                    } else {
                        ""
                    };
                    return Err(NotDelivered {
                        message: format!("the output connector's {} to {why}{hint}", post.method),
                        retryable: false,
                        refused: false,
                        deadline: false,
                    });
                }
                (why, retry_after)
            }
            Err(err) => (
                format!(
                    "{shown} could not be reached: {}",
                    scrubbed(support::error::error_chain(&err.without_url()), &post.scrub)
                ),
                None,
            ),
        };
        if Instant::now() >= deadline {
            return Err(NotDelivered {
                message: format!("the run's deadline passed during the output's attempt {attempt}: {why}"),
                retryable: true,
                refused: false,
                deadline: true,
            });
        }
        if egress.warnings.admit(HostWarning::EgressFailed) {
            tracing::warn!(target: LOG_TARGET, attempt, host = %post.host, port = post.port, "output connector: {why}");
        }
        if attempt > post.retry.max_retries {
            return Err(NotDelivered {
                message: format!("the output connector gave up after {attempt} attempts: {why}"),
                retryable: true,
                refused: false,
                deadline: false,
            });
        }
        let delay = delay(&post.retry, attempt, retry_after);
        if Instant::now() + delay >= deadline {
            return Err(NotDelivered {
                message: format!(
                    "the run's deadline leaves no time to retry the output (after {attempt} attempts): {why}"
                ),
                retryable: true,
                refused: false,
                deadline: true,
            });
        }
        tokio::time::sleep(delay).await;
    }
}

/// The wait before retry `attempt` (1 for the first retry): the policy's
/// delay, doubled per attempt when exponential, capped, plus up to 20%
/// jitter; a longer `Retry-After` wins, up to the cap.
fn delay(policy: &RetryPolicy, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let policy = &RetryPolicy {
        retry_delay: policy.retry_delay.max(MIN_RETRY_DELAY),
        max_retry_delay: policy.max_retry_delay.max(MIN_RETRY_DELAY),
        ..*policy
    };
    let base = if policy.exponential {
        policy.retry_delay.saturating_mul(1 << (attempt - 1).min(20))
    } else {
        policy.retry_delay
    };
    let base = base.min(policy.max_retry_delay);
    let jitter = base.mul_f64(rand::rng().random_range(0.0..=0.2));
    let chosen = (base + jitter).min(policy.max_retry_delay.max(base));
    match retry_after {
        Some(asked) if asked > chosen => asked.min(policy.max_retry_delay),
        _ => chosen,
    }
}

fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

async fn quoted_body(response: reqwest::Response) -> String {
    let mut response = response;
    let mut kept = Vec::new();
    while kept.len() < QUOTED_BODY_BYTES {
        match tokio::time::timeout(Duration::from_secs(1), response.chunk()).await {
            Ok(Ok(Some(chunk))) => kept.extend_from_slice(&chunk),
            _ => break,
        }
    }
    kept.truncate(QUOTED_BODY_BYTES);
    let text = String::from_utf8_lossy(&kept);
    let text = support::one_line::escape(text.trim());
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// `text` with every secret value this request carries replaced by `***`.
fn scrubbed(text: String, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|value| !value.is_empty())
        .fold(text, |text, value| text.replace(value.as_str(), "***"))
}

/// The endpoint as written, for an error: placeholders are names, not
/// values, so it can be shown; credentials in it are masked.
fn quote_endpoint(endpoint: &str) -> String {
    format!(
        "{:?}",
        support::redact::url(&endpoint.chars().take(300).collect::<String>())
    )
}

fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// An address as an allow-list names it: `10.0.0.5`, `[fd00::1]`.
fn ip_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("[{v6}]"),
        },
    }
}

/// Loopback, private, link-local, shared, unspecified, broadcast,
/// multicast and documentation addresses: the inside of a network, or no
/// real destination.
pub(crate) fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_internal(IpAddr::V4(v4)),
            None => {
                let segments = v6.segments();
                let first = segments[0];
                // An IPv4 address carried inside: NAT64 (64:ff9b::/96) and
                // 6to4 (2002::/16) reach it.
                let embedded = |high: u16, low: u16| {
                    let [a, b] = high.to_be_bytes();
                    let [c, d] = low.to_be_bytes();
                    is_internal(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)))
                };
                let nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
                // IPv4-compatible (::a.b.c.d) and SIIT (::ffff:0:a.b.c.d).
                let compatible = segments[..6] == [0, 0, 0, 0, 0, 0] || segments[..6] == [0, 0, 0, 0, 0xffff, 0];
                let discard = segments[..4] == [0x100, 0, 0, 0];
                let documentation = first == 0x2001 && segments[1] == 0x0db8;
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80
                    || (first & 0xffc0) == 0xfec0
                    || ((nat64 || compatible) && embedded(segments[6], segments[7]))
                    || discard
                    || documentation
                    || (first == 0x2002 && embedded(segments[1], segments[2]))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_told_apart_from_public_ones() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "fec0::1",
            "::a00:1",
            "::ffff:0:a00:1",
            "100::1",
            "2001:db8::1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
        assert_eq!(ip_host("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(ip_host("fd00::1".parse().unwrap()), "[fd00::1]");
    }

    #[test]
    fn delays_follow_the_policy_and_stay_under_its_cap() {
        let policy = RetryPolicy {
            max_retries: 5,
            retry_delay: Duration::from_millis(100),
            exponential: true,
            max_retry_delay: Duration::from_millis(350),
        };
        for _ in 0..50 {
            let first = delay(&policy, 1, None);
            assert!(
                first >= Duration::from_millis(100) && first <= Duration::from_millis(120),
                "{first:?}"
            );
            let second = delay(&policy, 2, None);
            assert!(
                second >= Duration::from_millis(200) && second <= Duration::from_millis(240),
                "{second:?}"
            );
            assert!(delay(&policy, 5, None) <= Duration::from_millis(350));
        }
        assert_eq!(
            delay(&policy, 1, Some(Duration::from_secs(1))),
            Duration::from_millis(350)
        );
        let flat = RetryPolicy {
            exponential: false,
            ..policy
        };
        assert!(delay(&flat, 4, None) <= Duration::from_millis(120));
    }
}
