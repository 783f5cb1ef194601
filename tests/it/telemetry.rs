//! Telemetry end to end, with the real binary (`node-runtime serve`) on
//! loopback: what an OTLP collector receives for a run (over gRPC and over
//! HTTP/protobuf), a collector that is down, the admin endpoint against a
//! control plane that goes away and comes back, log formats and levels, and
//! the Grafana dashboard's queries.

use crate::otlp;
use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use node_runtime::dev_plane::{DevPlane, NewRun, PlaneOptions, RunStatus, stubs};
use node_runtime::outbox::now_unix_ms;
use node_runtime::proto::Lease;
use node_runtime::telemetry::METRIC_NAMES;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use support::*;

/// The control plane's trace id for the run, as the reference writes it.
const TRACE_GUID: &str = "4BF92F35-77B3-4DA6-A3CE-929D0E0E4736";
const TRACE_HEX: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A node process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Node {
    child: Child,
    stderr: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(config: serde_json::Value, args: &[&str], env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("appsettings.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let stderr = dir.path().join("stderr.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_node-runtime"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env_remove("RUST_LOG")
            // Export spans and log records every 200 ms, not every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env("OTEL_BLRP_SCHEDULE_DELAY", "200")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        Node {
            child: command.spawn().expect("node-runtime starts"),
            stderr,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, and the exit status within `limit`.
    async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let child = &mut self.child;
        eventually(limit, "the node to exit after SIGTERM", || child.try_wait().unwrap()).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn base_config(url: &str, agents: &Path, data: &Path) -> serde_json::Value {
    serde_json::json!({
        "NodeRuntime": {
            "NodeId": "otel-node",
            "ControlPlaneUrl": url,
            "MaxConcurrentLeases": 2,
            "HeartbeatIntervalSeconds": 1,
            "Capacity": { "Slots": 2 },
            "Metadata": { "Region": "eu-test", "Environment": "ci" },
            "AgentsDirectory": agents.to_str().unwrap(),
            "DataDirectory": data.to_str().unwrap(),
            "DrainTimeoutSeconds": 5,
        },
        "OpenTelemetry": { "OtlpExporter": { "Endpoint": "" } },
    })
}

fn lease(lease_id: &str, agent: &str, trace_id: &str, input: &[(&str, &str)]) -> Lease {
    let mut lease = scripted::lease(lease_id, agent, now_unix_ms() + 120_000);
    lease.trace_id = trace_id.to_string();
    if let Some(spec) = lease.run_spec.as_mut() {
        spec.input_ref = input.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }
    lease
}

/// A target for the agent's outbound HTTP that keeps each request's
/// `traceparent`.
async fn traceparent_target() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/ping",
        axum::routing::get(move |headers: axum::http::HeaderMap| async move {
            let traceparent = headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            record.lock().unwrap().push(traceparent);
            "pong"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/ping"), seen)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value a metric's latest data point carries (sums and gauges), or
/// the count of its latest histogram point.
fn latest_value(
    metrics: &[(
        Option<otlp_resource::Resource>,
        opentelemetry_proto::tonic::metrics::v1::Metric,
    )],
    name: &str,
) -> Option<f64> {
    let (_, metric) = metrics.iter().rev().find(|(_, m)| m.name == name)?;
    let number = |point: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| match point.value? {
        number_data_point::Value::AsInt(i) => Some(i as f64),
        number_data_point::Value::AsDouble(d) => Some(d),
    };
    match metric.data.as_ref()? {
        Data::Sum(sum) => sum.data_points.iter().map(number).sum(),
        Data::Gauge(gauge) => gauge.data_points.last().and_then(number),
        Data::Histogram(histogram) => Some(histogram.data_points.iter().map(|p| p.count as f64).sum()),
        _ => None,
    }
}

use opentelemetry_proto::tonic::resource::v1 as otlp_resource;

async fn one_run_is_exported(protocol: &str) {
    let (collector, received) = otlp::start().await;
    let (target_url, traceparents) = traceparent_target().await;
    let model = stubs::start_stub_model().await.unwrap();
    let leases = vec![
        lease("lease-echo", "echo", TRACE_GUID, &[("message", "{\"invoice\": 1}")]),
        lease(
            "lease-http",
            "http-fetch",
            "0af7651916cd43dd8448eb211c80319c",
            &[("url", &target_url)],
        ),
        lease(
            "lease-llm",
            "llm-chat",
            "5c6f4f5e8d2a4b1c9e7f0a1b2c3d4e5f",
            &[("message", "{\"vendor\": \"Acme\"}")],
        ),
    ];
    let (plane, recorded) = scripted::serve(leases).await;
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let mut config = base_config(&plane, agents.path(), data.path());
    config["OpenTelemetry"] = serde_json::json!({
        "ServiceName": "node-under-test",
        "ServiceVersion": "9.9.9",
        "OtlpExporter": { "Endpoint": collector, "Protocol": protocol },
        "Traces": { "Enabled": true, "SamplingRatio": 1.0 },
        "Metrics": { "Enabled": true, "ExportIntervalMilliseconds": 300 },
    });
    config["Sandbox"] = serde_json::json!({ "AllowedHosts": { "http-fetch": ["127.0.0.1"] } });
    config["AgentRuntime"] = serde_json::json!({
        "DefaultModel": stubs::STUB_MODEL,
        "OpenAI": { "Endpoint": model, "ApiKeyEnvironmentVariable": "TELEMETRY_TEST_LLM_KEY" },
        "Prices": { stubs::STUB_MODEL: { "InputPer1K": 0.5, "OutputPer1K": 1.0 } },
    });
    let mut node = Node::start(config, &[], &[("TELEMETRY_TEST_LLM_KEY", "test-key")]);

    eventually(Duration::from_secs(120), "three Completes at the control plane", || {
        (recorded.lock().unwrap().completes.len() == 3).then_some(())
    })
    .await;
    let completes = recorded.lock().unwrap().completes.clone();
    let llm_cost = completes
        .iter()
        .find(|c| c.lease_id == "lease-llm")
        .and_then(|c| c.costs)
        .expect("the llm run's costs");
    assert!(
        llm_cost.tokens_in > 0 && llm_cost.usd_cost > 0.0,
        "the stub model was metered: {llm_cost:?}"
    );

    // Spans: the lease spans close once their report is answered.
    let spans = eventually(
        Duration::from_secs(60),
        "the three lease spans and their children",
        || {
            let spans = received.lock().unwrap().spans();
            let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
            let leases = names.iter().filter(|n| **n == "lease").count();
            (leases == 3 && names.contains(&"llm.chat") && names.contains(&"http.request")).then_some(spans)
        },
    )
    .await;
    let lease_span = |lease_id: &str| {
        spans
            .iter()
            .find(|(_, s)| s.name == "lease" && otlp::attribute(&s.attributes, "lease.id").as_deref() == Some(lease_id))
            .unwrap_or_else(|| panic!("a lease span for {lease_id}"))
            .clone()
    };
    let children = |parent: &opentelemetry_proto::tonic::trace::v1::Span| -> BTreeMap<String, opentelemetry_proto::tonic::trace::v1::Span> {
        spans
            .iter()
            .filter(|(_, s)| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
            .map(|(_, s)| (s.name.clone(), s.clone()))
            .collect()
    };

    let (resource, echo) = lease_span("lease-echo");
    assert_eq!(
        hex(&echo.trace_id),
        TRACE_HEX,
        "the lease's GUID is the span's trace id"
    );
    for (key, want) in [
        ("lease.id", "lease-echo"),
        ("run.id", "run-of-lease-echo"),
        ("node.id", "otel-node"),
        ("agent.id", "echo"),
        ("agent.version", "1.0.0"),
        ("outcome", "completed"),
    ] {
        assert_eq!(
            otlp::attribute(&echo.attributes, key).as_deref(),
            Some(want),
            "lease span attribute {key}"
        );
    }
    for key in ["run.fuel_consumed", "run.peak_memory_bytes"] {
        let value: f64 = otlp::attribute(&echo.attributes, key)
            .unwrap_or_else(|| panic!("{key}"))
            .parse()
            .unwrap();
        assert!(value > 0.0, "{key} = {value}");
    }
    for key in ["run.tokens_in", "run.tokens_out", "run.cost_usd"] {
        assert!(
            otlp::attribute(&echo.attributes, key).is_some(),
            "lease span attribute {key}"
        );
    }
    let resource = resource.expect("a resource").attributes;
    for (key, want) in [
        ("service.name", "node-under-test"),
        ("service.version", "9.9.9"),
        ("node.id", "otel-node"),
        ("node.region", "eu-test"),
        ("node.environment", "ci"),
    ] {
        assert_eq!(
            otlp::attribute(&resource, key).as_deref(),
            Some(want),
            "resource attribute {key}"
        );
    }
    assert!(otlp::attribute(&resource, "host.arch").is_some_and(|a| !a.is_empty()));

    let echo_children = children(&echo);
    for name in ["resolve", "execute", "report"] {
        assert!(
            echo_children.contains_key(name),
            "the lease span has a {name} child: {:?}",
            echo_children.keys()
        );
    }
    assert_eq!(
        otlp::attribute(&echo_children["report"].attributes, "report.kind").as_deref(),
        Some("Complete")
    );
    assert!(children(&echo_children["execute"]).contains_key("instantiate"));

    let (_, http) = lease_span("lease-http");
    assert_eq!(hex(&http.trace_id), "0af7651916cd43dd8448eb211c80319c");
    let http_execute = children(&http).remove("execute").expect("execute under the http lease");
    let request = children(&http_execute)
        .remove("http.request")
        .expect("an http.request span");
    assert_eq!(
        otlp::attribute(&request.attributes, "http.status_code").as_deref(),
        Some("200")
    );
    let sent = traceparents.lock().unwrap().clone();
    assert_eq!(
        sent,
        vec![format!(
            "00-0af7651916cd43dd8448eb211c80319c-{}-01",
            hex(&request.span_id)
        )],
        "the outbound request carries the trace and its own span as parent"
    );

    let (_, llm) = lease_span("lease-llm");
    let llm_execute = children(&llm).remove("execute").expect("execute under the llm lease");
    let chat = children(&llm_execute).remove("llm.chat").expect("an llm.chat span");
    assert_eq!(
        otlp::attribute(&chat.attributes, "llm.tokens_in"),
        Some(llm_cost.tokens_in.to_string())
    );
    let cost: f64 = otlp::attribute(&llm.attributes, "run.cost_usd")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (cost - llm_cost.usd_cost).abs() < 1e-9,
        "span cost {cost} = reported {}",
        llm_cost.usd_cost
    );

    // Metrics: cumulative, so the latest export has the totals. A lease is
    // counted completed a moment before its slot is given back, so an
    // export can fall between the two: wait for the slots too.
    let metrics = eventually(Duration::from_secs(60), "metrics counting the three runs", || {
        let metrics = received.lock().unwrap().metrics();
        (latest_value(&metrics, "leases_completed_total") == Some(3.0)
            && latest_value(&metrics, "agent_execution_duration_ms") == Some(3.0)
            && latest_value(&metrics, "available_slots") == Some(2.0))
        .then_some(metrics)
    })
    .await;
    for (name, want) in [
        ("leases_received_total", 3.0),
        ("leases_acknowledged_total", 3.0),
        ("leases_completed_total", 3.0),
        ("agent_executions_total", 3.0),
        ("lease_processing_duration_ms", 3.0),
        ("agent_tokens_total", 3.0),
        ("agent_cost_usd", 3.0),
        ("agent_fuel_consumed", 3.0),
        ("agent_peak_memory_bytes", 3.0),
        ("available_slots", 2.0),
        ("active_leases", 0.0),
    ] {
        assert_eq!(latest_value(&metrics, name), Some(want), "metric {name}");
    }
    assert_eq!(latest_value(&metrics, "leases_failed_total").unwrap_or(0.0), 0.0);
    let (resource, _) = metrics.last().unwrap();
    assert_eq!(
        otlp::attribute(&resource.as_ref().unwrap().attributes, "node.id").as_deref(),
        Some("otel-node")
    );
    for (_, metric) in &metrics {
        let attributes: Vec<_> = match metric.data.as_ref() {
            Some(Data::Sum(sum)) => sum.data_points.iter().flat_map(|p| p.attributes.clone()).collect(),
            Some(Data::Gauge(gauge)) => gauge.data_points.iter().flat_map(|p| p.attributes.clone()).collect(),
            Some(Data::Histogram(h)) => h.data_points.iter().flat_map(|p| p.attributes.clone()).collect(),
            _ => Vec::new(),
        };
        assert!(
            attributes.iter().all(|kv| kv.key != "lease.id" && kv.key != "run.id"),
            "{} has no lease or run id attribute",
            metric.name
        );
    }

    // Logs: the line about the run carries its ids.
    let records = eventually(Duration::from_secs(60), "a log record about the echo run", || {
        let records = received.lock().unwrap().log_records();
        records
            .iter()
            .any(|r| otlp::attribute(&r.attributes, "run.id").as_deref() == Some("run-of-lease-echo"))
            .then_some(records)
    })
    .await;
    let completed = records
        .iter()
        .find(|r| {
            otlp::attribute(&r.attributes, "run.id").as_deref() == Some("run-of-lease-echo")
                && r.body.as_ref().and_then(otlp::text).as_deref() == Some("run completed")
        })
        .expect("the 'run completed' record of the echo run");
    assert_eq!(
        otlp::attribute(&completed.attributes, "lease.id").as_deref(),
        Some("lease-echo")
    );
    assert_eq!(
        otlp::attribute(&completed.attributes, "trace_id").as_deref(),
        Some(TRACE_HEX)
    );
    assert_eq!(
        hex(&completed.trace_id),
        TRACE_HEX,
        "the record is in the run's trace, natively too"
    );

    let status = node.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status:?}; stderr:\n{}", node.stderr());
    let received = received.lock().unwrap();
    if protocol == "grpc" {
        assert!(received.grpc_requests > 0 && received.http_requests == 0);
    } else {
        assert!(received.http_requests > 0 && received.grpc_requests == 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reaches_an_otlp_collector_over_grpc_as_spans_metrics_and_logs() {
    one_run_is_exported("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reaches_an_otlp_collector_over_http_protobuf_as_spans_metrics_and_logs() {
    one_run_is_exported("http/protobuf").await;
}

/// Accepts connections and never answers: worse than a closed port, since
/// every export waits for its timeout.
async fn black_hole() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_keep_completing_when_the_collector_is_down_or_silent() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let silent = black_hole().await;
    let (live, _received) = otlp::start().await;
    // OTLP off and a working collector first, for comparison: the times
    // are printed (run with --nocapture), not asserted.
    let cases = [
        ("", "grpc", "OTLP off"),
        (live.as_str(), "grpc", "collector up"),
        (closed.as_str(), "grpc", "port closed"),
        (silent.as_str(), "grpc", "collector silent"),
        (silent.as_str(), "http/protobuf", "collector silent"),
    ];
    for (collector, protocol, case) in cases {
        let leases: Vec<Lease> = (0..20)
            .map(|i| lease(&format!("lease-{i}"), "echo", TRACE_GUID, &[("message", "{}")]))
            .collect();
        let (plane, recorded) = scripted::serve(leases).await;
        let agents = agents_layout();
        let data = tempfile::tempdir().unwrap();
        let mut config = base_config(&plane, agents.path(), data.path());
        config["OpenTelemetry"] = serde_json::json!({
            "OtlpExporter": { "Endpoint": collector, "Protocol": protocol },
            "Metrics": { "ExportIntervalMilliseconds": 100 },
        });
        let started = std::time::Instant::now();
        let mut node = Node::start(config, &[], &[]);
        eventually(
            Duration::from_secs(120),
            "20 Completes with the collector unreachable",
            || (recorded.lock().unwrap().completes.len() == 20).then_some(()),
        )
        .await;
        let runs = started.elapsed();
        // Shutdown flushes telemetry, each signal bounded by its timeout.
        let stopping = std::time::Instant::now();
        let status = node.terminate(Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "{protocol} to {collector}: exit {status:?}; stderr:\n{}",
            node.stderr()
        );
        eprintln!(
            "{case:>16} ({protocol:>13}): start + 20 runs {:>5} ms, SIGTERM to exit {:>5} ms",
            runs.as_millis(),
            stopping.elapsed().as_millis()
        );
    }
}

/// Nothing listens at the configured endpoint (as with the default one on
/// most machines): the node notices at its first export and stops
/// building spans and log records for OTLP. A collector that starts there
/// later is found by the node's probe and receives the next run's spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_not_built_while_no_collector_listens_and_a_late_collector_gets_them() {
    let collector_port = free_port();
    let plane = DevPlane::start(PlaneOptions {
        listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let mut config = base_config(&plane.url(), agents.path(), data.path());
    config["OpenTelemetry"] = serde_json::json!({
        "OtlpExporter": { "Endpoint": format!("http://127.0.0.1:{collector_port}"), "Protocol": "grpc" },
        "Traces": { "Enabled": true, "SamplingRatio": 1.0 },
        "Metrics": { "Enabled": false },
    });
    let mut node = Node::start(config, &[], &[]);
    complete_echo(&plane).await;
    eventually(Duration::from_secs(30), "the node to find no collector", || {
        node.stderr()
            .contains("no OTLP collector listens at the endpoint")
            .then_some(())
    })
    .await;

    let (_, received) = otlp::start_at(collector_port).await;
    eventually(
        Duration::from_secs(30),
        "the node's probe to find the collector",
        || {
            node.stderr()
                .contains("an OTLP collector listens at the endpoint")
                .then_some(())
        },
    )
    .await;
    let run_id = complete_echo(&plane).await;
    eventually(
        Duration::from_secs(30),
        "the late run's lease span at the collector",
        || {
            received.lock().unwrap().spans().into_iter().find(|(_, span)| {
                span.name == "lease" && otlp::attribute(&span.attributes, "run.id").as_deref() == Some(run_id.as_str())
            })
        },
    )
    .await;

    let status = node.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "stderr:\n{}", node.stderr());
    plane.shutdown().await;
}

/// Submits an `echo` run to `plane` and waits until it completes; its id.
async fn complete_echo(plane: &DevPlane) -> String {
    let run = plane
        .submit(NewRun {
            agent_id: "echo".to_string(),
            version: "1.0.0".to_string(),
            input_ref: BTreeMap::from([("message".to_string(), "{}".to_string())]),
            metadata: BTreeMap::new(),
            budgets: Default::default(),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "the run to complete", || {
        plane.run(&run.run_id).filter(|r| r.status == RunStatus::Completed)
    })
    .await;
    run.run_id
}

async fn get(url: &str) -> (u16, String) {
    node_runtime::support::tls::install_crypto_provider();
    match reqwest::get(url).await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Parses the Prometheus text format strictly enough to catch a malformed
/// line; returns each sample as (name, labels, value).
fn parse_prometheus(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut samples = Vec::new();
    let mut typed = BTreeSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().expect("a metric name"));
            if kind == "TYPE" {
                let kind = parts.next().expect("a type");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
                assert!(typed.insert(name.to_string()), "one TYPE line per metric: {line}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().unwrap_or_else(|_| panic!("a number in: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("closed labels: {line}"));
                let mut labels = BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (key, value) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("label=\"value\": {line}"));
                    labels.insert(key.to_string(), value.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "a legal metric name: {line}"
        );
        samples.push((name, labels, value));
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_control_plane_and_metrics_show_the_heartbeats_free_slots() {
    let plane_port = free_port();
    let plane_addr = format!("127.0.0.1:{plane_port}");
    let start_plane = || {
        DevPlane::start(PlaneOptions {
            listen: plane_addr.parse().unwrap(),
            idle_poll: Duration::from_millis(200),
            ..PlaneOptions::default()
        })
    };
    let plane = start_plane().await.unwrap();
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = base_config(&plane.url(), agents.path(), data.path());
    let mut node = Node::start(config, &["--admin-listen", &admin], &[]);
    let base = format!("http://{admin}");

    eventually_async(Duration::from_secs(30), "/readyz ready", || async {
        (get(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);

    // Two runs of one agent: the histograms have something to show, and
    // the second finds the agent compiled.
    for _ in 0..2 {
        complete_echo(&plane).await;
    }

    let samples = eventually_async(Duration::from_secs(30), "/metrics with the completed run", || async {
        let (status, text) = get(&format!("{base}/metrics")).await;
        assert_eq!(status, 200);
        let samples = parse_prometheus(&text);
        samples
            .iter()
            .any(|(name, _, value)| name == "leases_completed_total" && *value == 2.0)
            .then_some(samples)
    })
    .await;
    let value = |wanted: &str| {
        samples
            .iter()
            .find(|(name, _, _)| name == wanted)
            .map(|(_, _, value)| *value)
            .unwrap_or_else(|| panic!("{wanted} in /metrics"))
    };
    // The plane sees what the last heartbeat said, which may predate the
    // runs' end on a busy machine: wait for the one after it.
    eventually(Duration::from_secs(30), "a heartbeat offering both slots", || {
        let nodes = plane.nodes();
        let node = nodes.iter().find(|n| n.node_id == "otel-node")?;
        (node.status.available_slots == 2).then_some(())
    })
    .await;
    assert_eq!(value("available_slots"), 2.0, "as the heartbeat says");
    assert_eq!(value("agent_execution_duration_ms_count"), 2.0);
    assert_eq!(value("agent_executions_total"), 2.0);
    assert_eq!(value("agent_compile_cache_misses_total"), 1.0);
    assert_eq!(value("agent_compile_cache_hits_total"), 1.0);
    assert_eq!(value("outbox_depth"), 0.0);
    assert!(
        samples
            .iter()
            .any(|(name, labels, _)| name == "target_info"
                && labels.get("node_id").map(String::as_str) == Some("otel-node")),
        "target_info carries the node id"
    );

    // The control plane goes away: not ready (heartbeats and the stream fail).
    plane.shutdown().await;
    let (_, body) = eventually_async(Duration::from_secs(30), "/readyz unready", || async {
        let (status, body) = get(&format!("{base}/readyz")).await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert!(body.contains("heartbeat") || body.contains("lease stream"), "{body}");
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200, "still alive");

    // It comes back (forgetting the node): ready again once re-registered.
    let plane = start_plane().await.unwrap();
    eventually_async(Duration::from_secs(90), "/readyz ready again", || async {
        (get(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;

    let status = node.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "stderr:\n{}", node.stderr());
    plane.shutdown().await;
    let samples_text = node.stderr();
    assert!(samples_text.contains("admin endpoint listening"), "{samples_text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_about_a_run_carry_its_run_lease_and_trace_ids() {
    let stderr = json_lines_of(vec![lease("lease-json", "echo", TRACE_GUID, &[("message", "{}")])]).await;
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}")))
        .collect();
    let about_the_run: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| {
            line["spans"]
                .as_array()
                .is_some_and(|spans| spans.iter().any(|s| s["name"] == "lease"))
        })
        .collect();
    assert!(
        about_the_run
            .iter()
            .any(|line| line["fields"]["message"] == "run completed"),
        "{stderr}"
    );
    for line in about_the_run {
        let lease = line["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "lease")
            .unwrap();
        assert_eq!(lease["run.id"], "run-of-lease-json", "{line}");
        assert_eq!(lease["lease.id"], "lease-json", "{line}");
        assert_eq!(lease["trace_id"], TRACE_HEX, "{line}");
    }
}

/// What a node logging JSON lines wrote on stderr, run against a scripted
/// plane until every one of `leases` is completed, then stopped (SIGTERM).
async fn json_lines_of(leases: Vec<Lease>) -> String {
    let count = leases.len();
    let (plane, recorded) = scripted::serve(leases).await;
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let mut node = Node::start(
        base_config(&plane, agents.path(), data.path()),
        &["--log-format", "json"],
        &[],
    );
    eventually(Duration::from_secs(120), "every Complete", || {
        (recorded.lock().unwrap().completes.len() == count).then_some(())
    })
    .await;
    let status = node.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status:?}");
    node.stderr()
}

/// The daemon gathers its log lines and writes them a few at a time: none
/// is lost or torn, and those logged as it exits are written before it
/// does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gathered_log_lines_are_whole_in_order_and_written_before_exit() {
    const RUNS: usize = 300;
    let leases = (0..RUNS)
        .map(|n| lease(&format!("lease-many-{n}"), "echo", TRACE_GUID, &[("message", "{}")]))
        .collect();
    let stderr = json_lines_of(leases).await;
    let messages: Vec<(String, Option<String>)> = stderr
        .lines()
        .map(|line| {
            let line: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|err| panic!("not one JSON line ({err}): {line}"));
            let lease = line["spans"].as_array().and_then(|spans| {
                spans
                    .iter()
                    .find(|s| s["name"] == "lease")
                    .and_then(|s| s["lease.id"].as_str().map(str::to_string))
            });
            (
                line["fields"]["message"].as_str().unwrap_or_default().to_string(),
                lease,
            )
        })
        .collect();
    let completed: BTreeSet<&str> = messages
        .iter()
        .filter(|(message, _)| message == "run completed")
        .filter_map(|(_, lease)| lease.as_deref())
        .collect();
    assert_eq!(completed.len(), RUNS, "a `run completed` line per lease");
    let last_run = messages.iter().rposition(|(message, _)| message == "run completed");
    let stopped = messages.iter().position(|(message, _)| message == "stopped");
    assert!(
        matches!((last_run, stopped), (Some(run), Some(stop)) if run < stop),
        "the line logged as the node stops, after the runs' lines; the last lines:\n{}",
        last_lines(&stderr, 10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_loglevel_sets_the_level_and_rust_log_overrides_it() {
    // A control plane that is not there: the node warns about it.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let agents = agents_layout();
    for (rust_log, want_info) in [(None, false), (Some("info"), true)] {
        let data = tempfile::tempdir().unwrap();
        let mut config = base_config(&nowhere, agents.path(), data.path());
        config["Logging"] = serde_json::json!({ "LogLevel": { "Default": "Warning" } });
        let env: Vec<(&str, &str)> = rust_log.iter().map(|level| ("RUST_LOG", *level)).collect();
        let mut node = Node::start(config, &[], &env);
        let node_ref = &node;
        eventually(Duration::from_secs(30), "a warning about registration", || {
            node_ref.stderr().contains("registration failed").then_some(())
        })
        .await;
        node.terminate(Duration::from_secs(30)).await;
        let stderr = node.stderr();
        assert!(stderr.contains("WARN"), "{stderr}");
        assert_eq!(stderr.contains(" INFO "), want_info, "RUST_LOG={rust_log:?}:\n{stderr}");
    }
}

/// PromQL words the dashboard may use that are not metric names.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "max",
    "min",
    "avg",
    "count",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "topk",
    "bottomk",
    "time",
    "clamp_min",
    "or",
    "and",
    "unless",
    "le",
    "kind",
    "agent_id",
    "outcome",
    "node_id",
    "instance",
    "job",
    "service_name",
    "node_region",
    "node_environment",
    "label_values",
];

#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/node-fleet.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana/node-fleet.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut expressions = Vec::new();
    fn collect(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "definition", serde_json::Value::String(expr)) => out.push(expr.clone()),
                        _ => collect(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| collect(item, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut expressions);
    assert!(
        expressions.len() >= 8,
        "the dashboard has its panels' queries: {expressions:?}"
    );
    let mut used = BTreeSet::new();
    for expr in &expressions {
        // Drop quoted label values and Grafana variables, then read identifiers.
        let mut unquoted = String::new();
        let mut in_quotes = false;
        for c in expr.chars() {
            if c == '"' {
                in_quotes = !in_quotes;
            } else if !in_quotes {
                unquoted.push(c);
            }
        }
        for word in unquoted.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == ':')) {
            if word.is_empty() || word.starts_with('$') || word.starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            if PROMQL_WORDS.contains(&word) {
                continue;
            }
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix).filter(|b| METRIC_NAMES.contains(b)))
                .unwrap_or(word);
            assert!(
                METRIC_NAMES.contains(&base),
                "the dashboard queries `{word}`, which the node does not export (in: {expr})"
            );
            used.insert(base.to_string());
        }
    }
    for wanted in [
        "leases_completed_total",
        "leases_failed_total",
        "agent_fuel_consumed",
        "agent_peak_memory_bytes",
        "agent_tokens_total",
        "agent_cost_usd",
        "outbox_depth",
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_the_admin_endpoint_and_logs_json() {
    let admin = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("stderr.log");
    let child = Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin,
            "--log-format",
            "json",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut node = Node {
        child,
        stderr,
        _dir: dir,
    };
    let base = format!("http://{admin}");
    eventually_async(Duration::from_secs(30), "dev's /readyz ready", || async {
        (get(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let samples = parse_prometheus(&text);
    assert!(
        samples
            .iter()
            .any(|(name, _, value)| name == "available_slots" && *value == 4.0),
        "{text}"
    );
    node.terminate(Duration::from_secs(30)).await;
    let log = node.stderr();
    let json_lines: Vec<&str> = log.lines().filter(|line| line.starts_with('{')).collect();
    assert!(!json_lines.is_empty(), "{log}");
    for line in json_lines {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
    }
}

#[test]
fn run_agent_logs_json_inside_a_span_with_the_runs_ids() {
    let output = Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args([
            "run-agent",
            agent_path("echo").to_str().unwrap(),
            "--input",
            "{\"a\": 1}",
            "--log-format",
            "json",
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let agent_line = stderr
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
        })
        .find(|line| line["target"] == "agent")
        .unwrap_or_else(|| panic!("the agent's log line in:\n{stderr}"));
    let run = agent_line["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "run")
        .expect("the run span");
    assert!(
        run["run.id"].as_str().is_some_and(|id| id.starts_with("local-")),
        "{agent_line}"
    );
    assert!(
        run["lease.id"]
            .as_str()
            .is_some_and(|id| id.starts_with("lease-local-")),
        "{agent_line}"
    );
    assert_eq!(run["trace_id"].as_str().map(str::len), Some(32), "{agent_line}");
}
