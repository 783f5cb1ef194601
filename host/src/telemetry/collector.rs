//! Whether an OTLP collector listens at the configured endpoint.
//!
//! The configuration's default endpoint (`http://localhost:4317`, the
//! reference's) is set whether or not a collector runs there. Building a
//! lease's spans and log records for OTLP costs the node about a third of
//! its CPU per lease (bench/README.md, lease-cost); when nothing listens,
//! all of it is thrown away by the exporter. So the OTLP layers ask
//! [`Collector::listening`] before they build anything (an answer each
//! callsite caches until the gate changes):
//!
//! - an export that fails while the endpoint refuses a TCP connection
//!   closes the gate (an export that fails at a listening collector, say
//!   for a rejected batch, does not);
//! - while it is closed, a thread of its own tries a TCP connection every
//!   [`PROBE_EVERY`] and opens the gate once one succeeds;
//! - an export that succeeds opens it.
//!
//! What the node does while the gate is closed is not exported; nothing
//! would have received it. A collector that starts is seen within
//! [`PROBE_EVERY`].

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{LogBatch, LogExporter};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// How often a closed gate tries the endpoint again.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// How long one TCP connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The gate. Cheap to clone; every clone is the same gate.
#[derive(Debug, Clone)]
pub struct Collector {
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    listening: AtomicBool,
    /// The endpoint as configured, for log lines.
    endpoint: String,
    /// Host and port to connect to.
    address: Option<(String, u16)>,
}

impl Collector {
    /// A gate for `endpoint`, open until an export says otherwise, with
    /// its probe thread (which ends when the last clone is dropped). An
    /// endpoint without a host cannot be probed: its gate stays open.
    pub fn watch(endpoint: &str) -> Collector {
        let address = host_and_port(endpoint);
        let collector = Collector {
            state: Arc::new(State {
                listening: AtomicBool::new(true),
                endpoint: endpoint.to_string(),
                address,
            }),
        };
        if collector.state.address.is_some() {
            let weak = Arc::downgrade(&collector.state);
            let spawned = std::thread::Builder::new()
                .name("otlp-probe".into())
                .spawn(move || probe_while_closed(weak));
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "cannot start the OTLP collector probe; telemetry is built for OTLP whether or not a collector listens");
            }
        }
        collector
    }

    /// Whether spans and log records are worth building.
    pub fn listening(&self) -> bool {
        self.state.listening.load(Ordering::Relaxed)
    }

    /// What an export's result says of the collector.
    fn exported(&self, result: &OTelSdkResult) {
        match result {
            Ok(()) => self.state.open(),
            Err(_) if !self.state.reachable() => self.close(),
            Err(_) => {}
        }
    }

    fn close(&self) {
        if self.state.listening.swap(false, Ordering::Relaxed) {
            gate_changed();
            tracing::info!(
                endpoint = %self.state.endpoint,
                "no OTLP collector listens at the endpoint: spans and log records are not built \
                 until one does (tried every {}s); set OpenTelemetry.OtlpExporter.Endpoint to \"\" \
                 to turn OTLP off",
                PROBE_EVERY.as_secs()
            );
        }
    }
}

impl State {
    fn open(&self) {
        if !self.listening.swap(true, Ordering::Relaxed) {
            gate_changed();
            tracing::info!(endpoint = %self.endpoint, "an OTLP collector listens at the endpoint: exporting again");
        }
    }

    /// Whether a TCP connection to the endpoint succeeds.
    fn reachable(&self) -> bool {
        let Some((host, port)) = &self.address else {
            return true;
        };
        let Ok(addresses) = (host.as_str(), *port).to_socket_addrs() else {
            return false;
        };
        addresses
            .take(4)
            .any(|address: SocketAddr| TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).is_ok())
    }
}

/// Tells every callsite to ask the subscriber again whether it is
/// wanted. The OTLP layers' gate is a filter whose answer each callsite
/// caches (a callsite that only they would take then costs nothing while
/// the gate is closed), so its answers change only with this.
fn gate_changed() {
    tracing::callsite::rebuild_interest_cache();
}

/// The probe thread: while the gate is closed, a connection attempt every
/// [`PROBE_EVERY`]. Ends with the gate.
fn probe_while_closed(state: Weak<State>) {
    loop {
        std::thread::sleep(PROBE_EVERY);
        let Some(state) = state.upgrade() else {
            return;
        };
        if !state.listening.load(Ordering::Relaxed) && state.reachable() {
            state.open();
        }
    }
}

/// `http://host:port/...` to its host and port (80 and 443 by default).
fn host_and_port(endpoint: &str) -> Option<(String, u16)> {
    let uri: http::Uri = endpoint.trim().parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    Some((host.to_string(), port))
}

/// An exporter that tells the gate how each export went.
#[derive(Debug)]
pub struct Gated<E> {
    inner: E,
    collector: Collector,
}

impl<E> Gated<E> {
    pub fn new(inner: E, collector: Collector) -> Self {
        Gated { inner, collector }
    }
}

impl<E: SpanExporter> SpanExporter for Gated<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.collector.exported(&result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: LogExporter> LogExporter for Gated<E> {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.collector.exported(&result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn event_enabled(&self, level: opentelemetry::logs::Severity, target: &str, name: Option<&str>) -> bool {
        self.inner.event_enabled(level, target, name)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_names_its_host_and_port() {
        assert_eq!(host_and_port("http://localhost:4317"), Some(("localhost".into(), 4317)));
        assert_eq!(
            host_and_port("https://collector.example/otlp/"),
            Some(("collector.example".into(), 443))
        );
        assert_eq!(host_and_port("http://[::1]:4318"), Some(("::1".into(), 4318)));
        assert_eq!(host_and_port("not a url"), None);
    }

    /// The gate is a filter whose answer each callsite caches: a change
    /// must reach a callsite that was asked already.
    #[test]
    fn a_callsite_asked_before_the_gate_changes_follows_it() {
        use std::sync::atomic::AtomicUsize;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::{Layer, filter::filter_fn};

        struct Count(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> Layer<S> for Count {
            fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
                if event.metadata().target() == "gate_test" {
                    self.0.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let collector = Collector::watch(&format!("http://127.0.0.1:{port}"));
        let seen = Arc::new(AtomicUsize::new(0));
        let gate = collector.clone();
        let subscriber =
            tracing_subscriber::registry().with(Count(seen.clone()).with_filter(filter_fn(move |_| gate.listening())));
        tracing::subscriber::with_default(subscriber, || {
            // One callsite, asked in each state.
            let emit = || tracing::info!(target: "gate_test", "an event");
            emit();
            emit();
            assert_eq!(seen.load(Ordering::Relaxed), 2, "open");
            collector.close();
            emit();
            assert_eq!(seen.load(Ordering::Relaxed), 2, "closed: not taken");
            collector.state.open();
            emit();
            assert_eq!(seen.load(Ordering::Relaxed), 3, "open again");
        });
    }

    #[test]
    fn the_gate_closes_when_nothing_listens_and_opens_when_something_does() {
        // A port that was just free, and one that listens.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = free.local_addr().unwrap().port();
        drop(free);
        let collector = Collector::watch(&format!("http://127.0.0.1:{closed_port}"));
        assert!(collector.listening(), "open until an export fails");
        collector.exported(&Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
            "refused".into(),
        )));
        assert!(
            !collector.listening(),
            "a failed export with nothing at the port closes it"
        );
        collector.exported(&Ok(()));
        assert!(collector.listening());

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let collector = Collector::watch(&format!("http://127.0.0.1:{port}"));
        collector.exported(&Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
            "rejected".into(),
        )));
        assert!(
            collector.listening(),
            "a collector that listens but fails an export keeps it open"
        );
        assert!(collector.state.reachable());
        collector.close();
        assert!(!collector.listening());
    }
}
