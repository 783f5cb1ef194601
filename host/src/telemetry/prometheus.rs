//! The Prometheus text format (0.0.4), rendered from the metrics the
//! OpenTelemetry SDK collected, so `/metrics` shows exactly what OTLP
//! exports.
//!
//! Counters keep their names (they already end in `_total`), histograms
//! become `_bucket` / `_sum` / `_count` series with cumulative `le`
//! buckets, and attribute keys lose their dots (`agent.id` ->
//! `agent_id`), which Prometheus label names may not contain. The
//! resource (service, node id, region, environment) is one `target_info`
//! series, as the OpenTelemetry-to-Prometheus convention has it.

use std::fmt::Write as _;

use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};

/// Renders every metric in `metrics`.
pub fn render(metrics: &ResourceMetrics) -> String {
    let mut out = String::new();
    let resource: Vec<(String, String)> = metrics
        .resource()
        .iter()
        .map(|(key, value)| (label_name(key.as_str()), value.to_string()))
        .collect();
    if !resource.is_empty() {
        out.push_str("# HELP target_info The node's resource attributes\n# TYPE target_info gauge\n");
        out.push_str("target_info");
        labels(&mut out, resource.iter().map(|(k, v)| (k.as_str(), v.as_str())), None);
        out.push_str(" 1\n");
    }
    for scope in metrics.scope_metrics() {
        for metric in scope.metrics() {
            match metric.data() {
                AggregatedMetrics::F64(data) => series(&mut out, metric, data, |v| *v),
                AggregatedMetrics::U64(data) => series(&mut out, metric, data, |v| *v as f64),
                AggregatedMetrics::I64(data) => series(&mut out, metric, data, |v| *v as f64),
            }
        }
    }
    out
}

fn series<T: Copy>(out: &mut String, metric: &Metric, data: &MetricData<T>, number: impl Fn(&T) -> f64) {
    let name = metric_name(metric.name());
    let help = metric.description().replace('\\', "\\\\").replace('\n', "\\n");
    let kind = match data {
        MetricData::Sum(sum) if sum.is_monotonic() => "counter",
        MetricData::Sum(_) | MetricData::Gauge(_) => "gauge",
        MetricData::Histogram(_) => "histogram",
        // Never configured by this node.
        MetricData::ExponentialHistogram(_) => return,
    };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    match data {
        MetricData::Sum(sum) => {
            for point in sum.data_points() {
                sample(out, &name, point.attributes(), None, number(&point.value()));
            }
        }
        MetricData::Gauge(gauge) => {
            for point in gauge.data_points() {
                sample(out, &name, point.attributes(), None, number(&point.value()));
            }
        }
        MetricData::Histogram(histogram) => {
            for point in histogram.data_points() {
                let mut cumulative = 0u64;
                let bucket = format!("{name}_bucket");
                for (bound, count) in point.bounds().zip(point.bucket_counts()) {
                    cumulative += count;
                    sample(out, &bucket, point.attributes(), Some(&float(bound)), cumulative as f64);
                }
                sample(out, &bucket, point.attributes(), Some("+Inf"), point.count() as f64);
                sample(
                    out,
                    &format!("{name}_sum"),
                    point.attributes(),
                    None,
                    number(&point.sum()),
                );
                sample(
                    out,
                    &format!("{name}_count"),
                    point.attributes(),
                    None,
                    point.count() as f64,
                );
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn sample<'a>(
    out: &mut String,
    name: &str,
    attributes: impl Iterator<Item = &'a KeyValue>,
    le: Option<&str>,
    value: f64,
) {
    out.push_str(name);
    let pairs: Vec<(String, String)> = attributes
        .map(|kv| (label_name(kv.key.as_str()), kv.value.to_string()))
        .collect();
    labels(out, pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())), le);
    let _ = writeln!(out, " {}", float(value));
}

fn labels<'a>(out: &mut String, pairs: impl Iterator<Item = (&'a str, &'a str)>, le: Option<&str>) {
    let mut first = true;
    let mut open = |out: &mut String| {
        out.push(if first { '{' } else { ',' });
        first = false;
    };
    for (key, value) in pairs {
        open(out);
        let _ = write!(out, "{key}=\"{}\"", escape(value));
    }
    if let Some(le) = le {
        open(out);
        let _ = write!(out, "le=\"{le}\"");
    }
    if !first {
        out.push('}');
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus numbers: integers without a fraction, `+Inf`, `NaN`.
fn float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn metric_name(name: &str) -> String {
    sanitize(name, true)
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
fn label_name(name: &str) -> String {
    sanitize(name, false)
}

fn sanitize(name: &str, colon: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) || out.is_empty() {
        out.insert(0, '_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_become_legal_prometheus_identifiers() {
        assert_eq!(label_name("agent.id"), "agent_id");
        assert_eq!(metric_name("Node.Runtime:x"), "Node_Runtime:x");
        assert_eq!(label_name("9lives"), "_9lives");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(float(3.0), "3");
        assert_eq!(float(0.25), "0.25");
        assert_eq!(float(f64::INFINITY), "+Inf");
    }
}
