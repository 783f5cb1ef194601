//! Who may use the plane. It runs on developers' laptops, next to a
//! browser that visits any page, and a page must not be able to submit
//! runs (spending the developer's LLM key) or read their inputs and
//! results. Checked before any handler runs:
//!
//! - **The Host check.** A request must name the plane by an address it
//!   listens on. DNS rebinding points a name the attacker owns at
//!   127.0.0.1, and the browser then sends that name as the Host; the
//!   plane answers 421 (gRPC: PERMISSION_DENIED). An IP literal can only
//!   come from a page served by that very address, so it is safe to
//!   accept; a name other than `localhost` needs `--allow-host`. Not
//!   applied when client certificates are required: a browser has none
//!   to present, and cannot pass a rebound name off as the plane's
//!   certificate's.
//! - **JSON-only POSTs.** A page may send `text/plain`, form and multipart
//!   bodies to any origin without asking; `application/json` needs a CORS
//!   preflight, which the plane never grants. So every REST POST must say
//!   `application/json`, or is answered 415.
//! - **gRPC only from gRPC clients.** The lease service would serve a
//!   browser's `text/plain` POST as well (a page could take the
//!   developer's leases): its calls must say `application/grpc`, which a
//!   page cannot send without a preflight, and must not carry `Origin`,
//!   which a browser adds and a gRPC client never does.
//! - **Node ids bound to certificates.** With client certificates
//!   required and [`PlaneTls::bind_node_ids`](super::PlaneTls), a request
//!   naming a node id (registration, heartbeat, Pull, Ack, Complete, Fail)
//!   must come with a certificate whose CN is that id: one node cannot
//!   act as another.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use axum::Json;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The other end of a connection: its address and, over TLS, the CN of
/// the client certificate it presented.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub subject: Option<String>,
}

/// A name (or address) the plane answers to besides its listen address's
/// own, as `--allow-host NAME[:PORT]` gives it: without a port, any port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedHost {
    name: String,
    port: Option<u16>,
}

impl FromStr for AllowedHost {
    type Err = String;

    fn from_str(text: &str) -> Result<AllowedHost, String> {
        let (name, port) = split_authority(text)
            .ok_or_else(|| format!("{text:?} is not a host name: give NAME or NAME:PORT, e.g. devbox.local:5109"))?;
        Ok(AllowedHost { name, port })
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.contains(':') {
            format!("[{}]", self.name)
        } else {
            self.name.clone()
        };
        match self.port {
            Some(port) => write!(f, "{name}:{port}"),
            None => f.write_str(&name),
        }
    }
}

/// The Host check: which Host values name this plane.
#[derive(Clone, Debug)]
pub struct HostRule {
    /// The bound address (never port 0).
    listen: SocketAddr,
    /// The port a Host without one means: 80, or 443 over TLS.
    default_port: u16,
    allowed: Vec<AllowedHost>,
}

impl HostRule {
    pub fn new(listen: SocketAddr, tls: bool, allowed: Vec<AllowedHost>) -> HostRule {
        HostRule {
            listen,
            default_port: if tls { 443 } else { 80 },
            allowed,
        }
    }

    /// Whether `authority` (a Host header or HTTP/2 `:authority`) names
    /// this plane.
    pub fn allows(&self, authority: &str) -> bool {
        let Some((name, port)) = split_authority(authority) else {
            return false;
        };
        let allowed = |entry: &AllowedHost| {
            entry.name == name
                && entry
                    .port
                    .is_none_or(|wanted| wanted == port.unwrap_or(self.default_port))
        };
        if self.allowed.iter().any(allowed) {
            return true;
        }
        if port.unwrap_or(self.default_port) != self.listen.port() {
            return false;
        }
        let listen = self.listen.ip();
        match name.parse::<IpAddr>() {
            Ok(ip) => listen.is_unspecified() || ip == listen || (listen.is_loopback() && ip.is_loopback()),
            Err(_) => name == "localhost" && (listen.is_loopback() || listen.is_unspecified()),
        }
    }

    /// Why a request for `authority` is refused, and what to do.
    fn refusal(&self, authority: Option<&str>) -> String {
        let listen = if self.listen.ip().is_unspecified() {
            format!("{} (any IP address of this machine, or localhost)", self.listen)
        } else if self.listen.ip().is_loopback() {
            format!("{} (or localhost:{})", self.listen, self.listen.port())
        } else {
            self.listen.to_string()
        };
        match authority {
            None => format!("the request names no host (no Host header): the plane answers only requests for {listen}"),
            Some(authority) => {
                let name = split_authority(authority).map_or_else(|| authority.to_string(), |(name, _)| name);
                format!(
                    "the plane answers only requests for {listen}, and this one is for Host {authority:?}: \
                     a web page on another site sends that (DNS rebinding); if you reach the plane by this \
                     name on purpose, start it with --allow-host {name}"
                )
            }
        }
    }
}

/// The host name (lower case, without a trailing dot or IPv6 brackets)
/// and port of `NAME[:PORT]`, `IPv4[:PORT]` or `[IPv6][:PORT]`; `None` for
/// anything else (user info, a port that is not a number, odd bytes).
fn split_authority(text: &str) -> Option<(String, Option<u16>)> {
    let port = |digits: &str| digits.parse::<u16>().ok();
    let (host, port) = match text.strip_prefix('[') {
        Some(bracketed) => {
            let (inside, after) = bracketed.split_once(']')?;
            inside.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                after => Some(port(after.strip_prefix(':')?)?),
            };
            (inside, port)
        }
        None => match text.rsplit_once(':') {
            Some((host, digits)) => (host, Some(port(digits)?)),
            None => (text, None),
        },
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':');
    if host.is_empty() || !host.bytes().all(plain) || (host.contains(':') && !text.starts_with('[')) {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

/// Which node ids a request may name.
#[derive(Clone, Debug)]
pub enum NodeIds {
    Any,
    /// Only the CN of the client certificate this peer presented; `None`
    /// (no peer known): no id at all.
    Subject(Option<Peer>),
}

/// A request naming a node id its certificate does not carry.
#[derive(Debug, thiserror::Error)]
#[error(
    "node id {node_id:?} does not match this connection's client certificate ({}); the plane binds node ids \
     to certificates: set the node's NodeRuntime.NodeId to its certificate's CN, or give it a certificate \
     with CN {node_id:?} from the plane's CA",
    match .subject { Some(subject) => format!("CN {subject:?}"), None => "none".to_string() }
)]
pub struct NotThisNode {
    pub node_id: String,
    pub subject: Option<String>,
    /// Who asked, for the plane's log (not sent back).
    pub peer: Option<SocketAddr>,
}

impl NodeIds {
    /// What the guard recorded for this request; without it (a route the
    /// guard does not cover), no node id is allowed.
    pub fn of(extensions: &axum::http::Extensions) -> NodeIds {
        extensions.get::<NodeIds>().cloned().unwrap_or(NodeIds::Subject(None))
    }

    /// Ok when the request may act as `node_id`. An empty id is left to
    /// the handler, which refuses it in the reference's words.
    pub fn check(&self, node_id: &str) -> Result<(), NotThisNode> {
        match self {
            NodeIds::Any => Ok(()),
            _ if node_id.is_empty() => Ok(()),
            NodeIds::Subject(Some(peer)) if peer.subject.as_deref() == Some(node_id) => Ok(()),
            NodeIds::Subject(peer) => Err(NotThisNode {
                node_id: node_id.to_string(),
                subject: peer.as_ref().and_then(|peer| peer.subject.clone()),
                peer: peer.as_ref().map(|peer| peer.addr),
            }),
        }
    }
}

/// What the guard checks, for the whole plane.
#[derive(Debug)]
pub struct Access {
    /// `None`: no Host check (client certificates are required).
    pub hosts: Option<HostRule>,
    pub bind_node_ids: bool,
}

/// The middleware in front of REST and gRPC alike: the Host check, then
/// the request's [`NodeIds`] for the handlers.
pub async fn guard(State(access): State<Arc<Access>>, mut request: Request, next: Next) -> Response {
    if let Some(rule) = &access.hosts {
        // HTTP/2 carries the host in `:authority` (the URI), HTTP/1.1 in Host.
        let authority = request
            .uri()
            .authority()
            .map(|authority| authority.as_str().to_string())
            .or_else(|| {
                request
                    .headers()
                    .get(header::HOST)
                    .and_then(|host| host.to_str().ok())
                    .map(str::to_string)
            });
        if !authority.as_deref().is_some_and(|authority| rule.allows(authority)) {
            let message = rule.refusal(authority.as_deref());
            tracing::warn!(path = %request.uri().path(), "dev control plane refused a request: {message}");
            return if is_grpc(request.headers()) {
                tonic::Status::permission_denied(message).into_http::<axum::body::Body>()
            } else {
                (
                    StatusCode::MISDIRECTED_REQUEST,
                    Json(serde_json::json!({ "error": message })),
                )
                    .into_response()
            };
        }
    }
    if request.uri().path().starts_with(LEASE_SERVICE)
        && let Some(refusal) = not_from_a_grpc_client(request.headers())
    {
        tracing::warn!(path = %request.uri().path(), "dev control plane refused a request: {refusal}");
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(serde_json::json!({ "error": refusal })),
        )
            .into_response();
    }
    let node_ids = if access.bind_node_ids {
        let peer = request
            .extensions()
            .get::<ConnectInfo<Peer>>()
            .map(|ConnectInfo(peer)| peer.clone());
        NodeIds::Subject(peer)
    } else {
        NodeIds::Any
    };
    request.extensions_mut().insert(node_ids);
    next.run(request).await
}

/// Where the gRPC lease service is served.
const LEASE_SERVICE: &str = "/lease.LeaseService/";

/// Why a call to the lease service did not come from a gRPC client, if
/// it did not.
fn not_from_a_grpc_client(headers: &HeaderMap) -> Option<String> {
    if !is_grpc(headers) {
        return Some(
            "the lease service takes gRPC calls only (Content-Type: application/grpc); \
             use a gRPC client"
                .to_string(),
        );
    }
    if headers.contains_key(header::ORIGIN) {
        return Some(
            "the lease service takes no requests from web pages (this one carries an Origin header)".to_string(),
        );
    }
    None
}

/// The layer on REST routes: a POST must carry JSON, said so.
pub async fn json_only(request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::POST && !is_json(request.headers()) {
        let given = request.headers().get(header::CONTENT_TYPE).map_or_else(
            || "none".to_string(),
            |value| format!("{:?}", String::from_utf8_lossy(value.as_bytes())),
        );
        let message = format!(
            "POST {} needs the header Content-Type: application/json (this request's content type: {given}); \
             send the body as JSON with that header (curl: -H 'content-type: application/json')",
            request.uri().path()
        );
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(serde_json::json!({ "error": message })),
        )
            .into_response();
    }
    next.run(request).await
}

/// `application/json`, in any case, with any parameters.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"))
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lease_service_takes_grpc_without_an_origin_only() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(
                    axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            map
        };
        assert_eq!(
            super::not_from_a_grpc_client(&headers(&[("content-type", "application/grpc")])),
            None
        );
        assert_eq!(
            super::not_from_a_grpc_client(&headers(&[("content-type", "application/grpc+proto")])),
            None
        );
        for refused in [
            &[("content-type", "text/plain")][..],
            &[],
            &[("content-type", "application/grpc"), ("origin", "https://evil.example")],
        ] {
            assert!(
                super::not_from_a_grpc_client(&headers(refused)).is_some(),
                "{refused:?}"
            );
        }
    }

    use super::*;

    fn rule(listen: &str, allowed: &[&str]) -> HostRule {
        HostRule::new(
            listen.parse().unwrap(),
            false,
            allowed.iter().map(|name| name.parse().unwrap()).collect(),
        )
    }

    #[test]
    fn a_loopback_plane_answers_to_its_loopback_names_on_its_port() {
        let rule = rule("127.0.0.1:5109", &[]);
        for host in [
            "127.0.0.1:5109",
            "localhost:5109",
            "LOCALHOST:5109",
            "localhost.:5109",
            "[::1]:5109",
            "127.0.0.2:5109",
        ] {
            assert!(rule.allows(host), "{host}");
        }
        for host in [
            "attacker.example:5109",
            "localhost.attacker.example:5109",
            "localhost:80",
            "localhost",
            "192.168.1.5:5109",
            "0.0.0.0:5109",
            "user@localhost:5109",
            "",
        ] {
            assert!(!rule.allows(host), "{host}");
        }
    }

    #[test]
    fn a_plane_on_one_address_answers_to_it_and_to_allowed_names() {
        let rule = rule("192.168.1.5:5109", &["devbox.local", "proxy.example:443"]);
        assert!(rule.allows("192.168.1.5:5109"));
        assert!(!rule.allows("localhost:5109"), "not reachable as localhost");
        assert!(!rule.allows("10.0.0.1:5109"));
        assert!(
            rule.allows("devbox.local:5109") && rule.allows("DevBox.Local:1234"),
            "any port"
        );
        assert!(rule.allows("proxy.example:443"));
        assert!(!rule.allows("proxy.example:5109"), "that port only");
        assert!(!rule.allows("other.local:5109"));
    }

    #[test]
    fn a_wildcard_plane_answers_to_any_ip_and_localhost_but_names_need_allowing() {
        let rule = rule("0.0.0.0:5109", &["devbox.local"]);
        for host in [
            "192.168.1.5:5109",
            "10.0.0.1:5109",
            "[fe80::1]:5109",
            "localhost:5109",
            "devbox.local:5109",
        ] {
            assert!(rule.allows(host), "{host}");
        }
        assert!(!rule.allows("attacker.example:5109"));
        assert!(!rule.allows("192.168.1.5:80"));
    }

    #[test]
    fn a_host_without_a_port_means_the_scheme_default() {
        let rule = rule("127.0.0.1:80", &[]);
        assert!(rule.allows("localhost") && rule.allows("localhost:80"));
        let tls = HostRule::new("127.0.0.1:443".parse().unwrap(), true, Vec::new());
        assert!(tls.allows("localhost") && !tls.allows("localhost:80"));
    }

    #[test]
    fn allowed_hosts_parse_names_ports_and_ipv6() {
        let parsed = |text: &str| text.parse::<AllowedHost>().map(|host| host.to_string());
        assert_eq!(parsed("DevBox.Local").unwrap(), "devbox.local");
        assert_eq!(parsed("devbox.local:5109").unwrap(), "devbox.local:5109");
        assert_eq!(parsed("[::1]:5109").unwrap(), "[::1]:5109");
        assert!(parsed("").is_err());
        assert!(parsed("a b").is_err());
        assert!(parsed("host:port").is_err());
    }

    #[test]
    fn node_ids_bound_to_a_subject_allow_only_that_one() {
        let bound = NodeIds::Subject(Some(Peer {
            addr: "127.0.0.1:40000".parse().unwrap(),
            subject: Some("node-a".to_string()),
        }));
        assert!(bound.check("node-a").is_ok());
        let refused = bound.check("node-b").unwrap_err().to_string();
        assert!(
            refused.contains("\"node-b\"") && refused.contains("CN \"node-a\""),
            "{refused}"
        );
        assert!(NodeIds::Subject(None).check("node-a").is_err());
        assert!(NodeIds::Any.check("node-b").is_ok());
        assert!(bound.check("").is_ok(), "left to the handler's own check");
    }
}
