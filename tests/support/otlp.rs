//! An OTLP receiver on loopback, built on the published OTLP protobuf
//! definitions (`opentelemetry-proto`): gRPC (`TraceService`,
//! `MetricsService`, `LogsService`) and HTTP/protobuf (`POST /v1/traces`,
//! `/v1/metrics`, `/v1/logs`) on one port, keeping every request.

// Each test file uses its own part of it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::Metric;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// Everything received, by signal, and over which protocol.
#[derive(Default)]
pub struct Received {
    pub traces: Vec<ExportTraceServiceRequest>,
    pub metrics: Vec<ExportMetricsServiceRequest>,
    pub logs: Vec<ExportLogsServiceRequest>,
    pub grpc_requests: usize,
    pub http_requests: usize,
}

impl Received {
    pub fn spans(&self) -> Vec<(Option<Resource>, Span)> {
        let mut spans = Vec::new();
        for request in &self.traces {
            for resource in &request.resource_spans {
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        spans.push((resource.resource.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }

    /// Every metric, in the order received (later exports last).
    pub fn metrics(&self) -> Vec<(Option<Resource>, Metric)> {
        let mut metrics = Vec::new();
        for request in &self.metrics {
            for resource in &request.resource_metrics {
                for scope in &resource.scope_metrics {
                    for metric in &scope.metrics {
                        metrics.push((resource.resource.clone(), metric.clone()));
                    }
                }
            }
        }
        metrics
    }

    pub fn log_records(&self) -> Vec<LogRecord> {
        self.logs
            .iter()
            .flat_map(|request| &request.resource_logs)
            .flat_map(|resource| &resource.scope_logs)
            .flat_map(|scope| scope.log_records.clone())
            .collect()
    }
}

/// An attribute's value as text (strings as they are, numbers printed).
pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(text)
}

pub fn text(value: &AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        received.grpc_requests += 1;
        received.traces.push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        received.grpc_requests += 1;
        received.metrics.push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        received.grpc_requests += 1;
        received.logs.push(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

fn protobuf(body: Vec<u8>) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], body)
}

/// Starts the receiver; returns its `http://127.0.0.1:PORT` and records.
pub async fn start() -> (String, Arc<Mutex<Received>>) {
    start_at(0).await
}

/// Like [`start`], on `port` of 127.0.0.1 (0: any free one).
pub async fn start_at(port: u16) -> (String, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    let sink = Sink(received.clone());
    let (traces, metrics, logs) = (sink.clone(), sink.clone(), sink.clone());
    let app = Router::new()
        .route(
            "/v1/traces",
            post(move |body: Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace request");
                let mut received = traces.0.lock().unwrap();
                received.http_requests += 1;
                received.traces.push(request);
                protobuf(ExportTraceServiceResponse::default().encode_to_vec())
            }),
        )
        .route(
            "/v1/metrics",
            post(move |body: Bytes| async move {
                let request = ExportMetricsServiceRequest::decode(body).expect("an OTLP metrics request");
                let mut received = metrics.0.lock().unwrap();
                received.http_requests += 1;
                received.metrics.push(request);
                protobuf(ExportMetricsServiceResponse::default().encode_to_vec())
            }),
        )
        .route(
            "/v1/logs",
            post(move |body: Bytes| async move {
                let request = ExportLogsServiceRequest::decode(body).expect("an OTLP logs request");
                let mut received = logs.0.lock().unwrap();
                received.http_requests += 1;
                received.logs.push(request);
                protobuf(ExportLogsServiceResponse::default().encode_to_vec())
            }),
        )
        .route_service(
            "/opentelemetry.proto.collector.trace.v1.TraceService/{*method}",
            TraceServiceServer::new(sink.clone()),
        )
        .route_service(
            "/opentelemetry.proto.collector.metrics.v1.MetricsService/{*method}",
            MetricsServiceServer::new(sink.clone()),
        )
        .route_service(
            "/opentelemetry.proto.collector.logs.v1.LogsService/{*method}",
            LogsServiceServer::new(sink),
        );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}
