//! `GET /metrics` in the Prometheus text format: routing counters and latency histograms by
//! model and node, this node's load and resource use, and the size of the cluster.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::router::{CountersSnapshot, Histogram, LATENCY_BUCKETS};

/// A metric's name, help text, and how to read it from a model's or node's counters.
type CounterMetric = (&'static str, &'static str, fn(&CountersSnapshot) -> u64);
type HistogramMetric = (&'static str, &'static str, fn(&CountersSnapshot) -> &Histogram);

pub async fn render(State(state): State<AppState>) -> Result<Response, ApiError> {
    let router =
        state.router.as_ref().ok_or_else(|| ApiError::Internal("no router behind this API".into()))?;
    let stats = router.stats();
    let mut out = String::new();
    let counters: [CounterMetric; 5] = [
        ("llmesh_requests_total", "Requests routed, by model and serving node.", |c| c.requests),
        ("llmesh_request_errors_total", "Requests that ended in an error.", |c| c.errors),
        ("llmesh_retries_total", "Hosts that failed before answering; the request went elsewhere.", |c| {
            c.retries
        }),
        ("llmesh_failovers_total", "Answers resumed on another host after theirs died.", |c| c.failovers),
        ("llmesh_tokens_generated_total", "Completion tokens delivered.", |c| c.tokens),
    ];
    for (name, help, value) in counters {
        header(&mut out, name, help, "counter");
        for (model, counters) in &stats.models {
            sample(&mut out, name, &[("model", model), ("scope", "model")], value(counters) as f64);
        }
        for (node, counters) in &stats.nodes {
            sample(&mut out, name, &[("node", node), ("scope", "node")], value(counters) as f64);
        }
    }
    let histograms: [HistogramMetric; 2] = [
        ("llmesh_time_to_first_token_seconds", "Time to the first token, by model.", |c| {
            &c.first_token_histogram
        }),
        ("llmesh_request_duration_seconds", "Total time of successful requests, by model.", |c| {
            &c.total_histogram
        }),
    ];
    for (name, help, histogram) in histograms {
        header(&mut out, name, help, "histogram");
        for (model, counters) in &stats.models {
            write_histogram(&mut out, name, model, histogram(counters));
        }
    }
    let load = router.local_load();
    header(&mut out, "llmesh_requests_in_flight", "Generations running on this node.", "gauge");
    sample(&mut out, "llmesh_requests_in_flight", &[], load.in_flight as f64);
    header(&mut out, "llmesh_requests_queued", "Generations waiting on this node.", "gauge");
    sample(&mut out, "llmesh_requests_queued", &[], load.queued as f64);
    header(
        &mut out,
        "llmesh_prompt_cache_hits_total",
        "Generations on this node that started from a prompt prefix already run.",
        "counter",
    );
    sample(&mut out, "llmesh_prompt_cache_hits_total", &[], load.prompt_cache_hits as f64);
    header(
        &mut out,
        "llmesh_prompt_cache_tokens_reused_total",
        "Prompt tokens taken from the prompt cache instead of being run again.",
        "counter",
    );
    sample(&mut out, "llmesh_prompt_cache_tokens_reused_total", &[], load.prompt_tokens_reused as f64);
    if let Some(own) = router.own_announcement() {
        let gauges = [
            ("llmesh_node_cpu_percent", "Machine CPU use, 0 to 100.", Some(own.usage.cpu_percent as f64)),
            (
                "llmesh_node_memory_used_bytes",
                "Machine memory in use.",
                Some(own.usage.memory_used_bytes as f64),
            ),
            ("llmesh_node_memory_total_bytes", "Machine memory.", Some(own.hardware.memory_bytes as f64)),
            ("llmesh_node_gpu_percent", "GPU use, 0 to 100.", own.usage.gpu_percent.map(f64::from)),
            (
                "llmesh_node_gpu_memory_used_bytes",
                "GPU memory in use.",
                own.usage.gpu_memory_used_bytes.map(|b| b as f64),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                header(&mut out, name, help, "gauge");
                sample(&mut out, name, &[], value);
            }
        }
    }
    let nodes = router.cluster_nodes();
    header(&mut out, "llmesh_cluster_nodes_online", "Nodes online, this one included.", "gauge");
    sample(&mut out, "llmesh_cluster_nodes_online", &[], (nodes.len() + 1) as f64);
    header(&mut out, "llmesh_cluster_models", "Distinct models in the cluster.", "gauge");
    sample(&mut out, "llmesh_cluster_models", &[], state.engine.models().len() as f64);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response())
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    let labels: Vec<String> =
        labels.iter().map(|(key, value)| format!("{key}=\"{}\"", escape(value))).collect();
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
    }
}

fn write_histogram(out: &mut String, name: &str, model: &str, histogram: &Histogram) {
    let bucket = format!("{name}_bucket");
    for (count, bound) in histogram.buckets.iter().zip(LATENCY_BUCKETS) {
        sample(out, &bucket, &[("model", model), ("le", &bound.to_string())], *count as f64);
    }
    sample(out, &bucket, &[("model", model), ("le", "+Inf")], histogram.count as f64);
    sample(out, &format!("{name}_sum"), &[("model", model)], histogram.sum_seconds);
    sample(out, &format!("{name}_count"), &[("model", model)], histogram.count as f64);
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("model", "a\"b\\c\nd")], 1.0);
        assert_eq!(out, "m{model=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
