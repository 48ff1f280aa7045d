//! `GET /metrics` in the Prometheus text format (0.0.4): routing counters and latency histograms by
//! model and node, this node's load and resource use, the size of the cluster, and each API
//! key's use of each model through this node (label `key`: the key's name, never its secret).
//!
//! Each scrape reads the router's snapshots into a [`Snapshot`], [`registry`] turns it into a
//! `prometheus-client` registry (one section per group of metrics), and the library encodes it,
//! so names, types, `_total` suffixes and label escaping are right by construction. Nothing is
//! kept between scrapes: the values are the router's, the registry only describes them.

use std::collections::BTreeMap;
use std::fmt;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::AppState;
use super::error::ApiError;
use crate::engine::EngineLoad;
use crate::p2p::{Hardware, ResourceUsage};
use crate::router::{CountersSnapshot, Histogram, LATENCY_BUCKETS, ModelUsage, StatsSnapshot};

pub async fn render(State(state): State<AppState>) -> Result<Response, ApiError> {
    let router =
        state.router.as_ref().ok_or_else(|| ApiError::Internal("no router behind this API".into()))?;
    let snapshot = Snapshot {
        stats: router.stats(),
        load: router.local_load(),
        resources: router.own_announcement().map(|own| (own.hardware, own.usage)),
        nodes_online: router.cluster_nodes().len() + 1,
        models: state.engine.models().len(),
        keys: router.key_usage_here(),
    };
    let mut body = String::new();
    prometheus_text::encode(&mut body, &registry(snapshot))
        .map_err(|_| ApiError::Internal("the metrics could not be encoded".into()))?;
    Ok(([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], body).into_response())
}

/// What one scrape reports, read from the router and the engine at once.
struct Snapshot {
    stats: StatsSnapshot,
    load: EngineLoad,
    /// This machine and its resource use, once this node has announced itself.
    resources: Option<(Hardware, ResourceUsage)>,
    /// Nodes online, this one included.
    nodes_online: usize,
    /// Distinct models in the cluster.
    models: usize,
    /// Each API key's use of each model through this node.
    keys: BTreeMap<String, BTreeMap<String, ModelUsage>>,
}

/// A metric's name, help text, and how to read it from a model's or node's counters. Names are
/// registered without the `_total` of counters (the encoder appends it) and help texts without
/// their final full stop (the registry appends it).
type CounterMetric = (&'static str, &'static str, fn(&CountersSnapshot) -> u64);
type HistogramMetric = (&'static str, &'static str, fn(&CountersSnapshot) -> &Histogram);
type KeyMetric = (&'static str, &'static str, fn(&ModelUsage) -> u64);

/// Every metric of one scrape, in the order clients see them.
fn registry(snapshot: Snapshot) -> Registry {
    let Snapshot { stats, load, resources, nodes_online, models, keys } = snapshot;
    let mut registry = Registry::default();

    // Routing, by model (`scope="model"`) and by serving node (`scope="node"`).
    let counters: [CounterMetric; 5] = [
        ("llmesh_requests", "Requests routed, by model and serving node", |c| c.requests),
        ("llmesh_request_errors", "Requests that ended in an error", |c| c.errors),
        ("llmesh_retries", "Hosts that failed before answering; the request went elsewhere", |c| c.retries),
        ("llmesh_failovers", "Answers resumed on another host after theirs died", |c| c.failovers),
        ("llmesh_tokens_generated", "Completion tokens delivered", |c| c.tokens),
    ];
    for (name, help, value) in counters {
        let by_model =
            stats.models.iter().map(|(model, c)| (labels([("model", model), ("scope", "model")]), c));
        let by_node = stats.nodes.iter().map(|(node, c)| (labels([("node", node), ("scope", "node")]), c));
        let series = by_model.chain(by_node).map(|(labels, c)| (labels, ConstCounter::new(value(c))));
        registry.register(name, help, Series(series.collect()));
    }

    // Latency, by model.
    let histograms: [HistogramMetric; 2] = [
        ("llmesh_time_to_first_token_seconds", "Time to the first token, by model", |c| {
            &c.first_token_histogram
        }),
        ("llmesh_request_duration_seconds", "Total time of successful requests, by model", |c| {
            &c.total_histogram
        }),
    ];
    for (name, help, histogram) in histograms {
        let series = stats.models.iter().map(|(model, c)| (labels([("model", model)]), histogram(c).clone()));
        registry.register(name, help, Series(series.collect()));
    }

    // This node's load.
    registry.register(
        "llmesh_requests_in_flight",
        "Generations running on this node",
        ConstGauge::new(load.in_flight),
    );
    registry.register(
        "llmesh_requests_queued",
        "Generations waiting on this node",
        ConstGauge::new(load.queued),
    );
    registry.register(
        "llmesh_prompt_cache_hits",
        "Generations on this node that started from a prompt prefix already run",
        ConstCounter::new(load.prompt_cache_hits),
    );
    registry.register(
        "llmesh_prompt_cache_tokens_reused",
        "Prompt tokens taken from the prompt cache instead of being run again",
        ConstCounter::new(load.prompt_tokens_reused),
    );
    registry.register(
        "llmesh_prompt_cache_bytes",
        "Memory held by the KV caches kept for reuse",
        ConstGauge::new(load.prompt_cache_bytes),
    );

    // This machine's resources, once sampled; the GPU's only where there is one.
    if let Some((hardware, usage)) = resources {
        registry.register(
            "llmesh_node_cpu_percent",
            "Machine CPU use, 0 to 100",
            ConstGauge::new(usage.cpu_percent),
        );
        registry.register(
            "llmesh_node_memory_used_bytes",
            "Machine memory in use",
            ConstGauge::new(usage.memory_used_bytes),
        );
        registry.register(
            "llmesh_node_memory_total_bytes",
            "Machine memory",
            ConstGauge::new(hardware.memory_bytes),
        );
        if let Some(percent) = usage.gpu_percent {
            registry.register("llmesh_node_gpu_percent", "GPU use, 0 to 100", ConstGauge::new(percent));
        }
        if let Some(bytes) = usage.gpu_memory_used_bytes {
            registry.register(
                "llmesh_node_gpu_memory_used_bytes",
                "GPU memory in use",
                ConstGauge::new(bytes),
            );
        }
    }

    // The cluster.
    registry.register(
        "llmesh_cluster_nodes_online",
        "Nodes online, this one included",
        ConstGauge::new(nodes_online),
    );
    registry.register("llmesh_cluster_models", "Distinct models in the cluster", ConstGauge::new(models));

    // API keys, by key name and model, through this node (Prometheus sums the nodes).
    let key_counters: [KeyMetric; 3] = [
        ("llmesh_key_requests", "Requests admitted for an API key, by model, through this node", |u| {
            u.requests
        }),
        ("llmesh_key_prompt_tokens", "Prompt tokens of an API key's answers, by model", |u| u.prompt_tokens),
        ("llmesh_key_completion_tokens", "Completion tokens of an API key's answers, by model", |u| {
            u.completion_tokens
        }),
    ];
    for (name, help, value) in key_counters {
        let series = keys.iter().flat_map(|(key, by_model)| {
            by_model.iter().map(move |(model, usage)| {
                (labels([("key", key), ("model", model)]), ConstCounter::new(value(usage)))
            })
        });
        registry.register(name, help, Series(series.collect()));
    }
    registry
}

/// A series' labels, in the order given; the encoder escapes their values.
type Labels = Vec<(&'static str, String)>;

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.into_iter().map(|(key, value)| (key, value.to_string())).collect()
}

/// One metric's samples read from a snapshot, one per label set, in the order given. It is what
/// the library's `Family` is for live metrics, except that it holds values instead of counting,
/// keeps its order, and is described (`# HELP`, `# TYPE`) even while it has no samples yet.
#[derive(Debug)]
struct Series<M>(Vec<(Labels, M)>);

impl<M: EncodeMetric + TypedMetric> EncodeMetric for Series<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        for (labels, metric) in &self.0 {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

/// The router keeps each bound's cumulative count (`LATENCY_BUCKETS`); the encoder takes each
/// bucket's own count, adds them up itself and writes `+Inf`, `_sum` and `_count` from the totals.
impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        // A histogram that has seen nothing has no buckets yet: every bucket is empty.
        let cumulative = self.buckets.iter().copied().chain(std::iter::repeat(0));
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .into_iter()
            .zip(cumulative)
            .map(|(bound, up_to)| {
                let own = up_to.saturating_sub(below);
                below = up_to;
                (bound, own)
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.sum_seconds, self.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests;
