//! Routing statistics, per model and per serving node: requests, errors, retries, failovers,
//! tokens, and latency (time to first token and total) as p50/p95 over recent requests.
//! Kept in memory, bounded (a fixed number of latency samples per key).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Latency samples kept per model and per node.
const SAMPLES: usize = 1024;
/// Upper bounds (seconds) of the latency histogram buckets exported to Prometheus.
pub const LATENCY_BUCKETS: [f64; 13] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A cumulative latency histogram, as Prometheus wants it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Histogram {
    /// Observations at or below each bound of `LATENCY_BUCKETS`.
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; LATENCY_BUCKETS.len()];
        }
        for (bucket, bound) in self.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: u64,
    errors: u64,
    retries: u64,
    failovers: u64,
    tokens: u64,
    first_token_ms: VecDeque<f64>,
    total_ms: VecDeque<f64>,
    first_token_histogram: Histogram,
    total_histogram: Histogram,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CountersSnapshot {
    pub requests: u64,
    pub errors: u64,
    pub retries: u64,
    pub failovers: u64,
    pub tokens: u64,
    pub first_token_ms: Percentiles,
    pub total_ms: Percentiles,
    #[serde(skip)]
    pub first_token_histogram: Histogram,
    #[serde(skip)]
    pub total_histogram: Histogram,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatsSnapshot {
    pub models: BTreeMap<String, CountersSnapshot>,
    /// Keyed by node name.
    pub nodes: BTreeMap<String, CountersSnapshot>,
}

/// One finished request, as the router saw it.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    pub model: &'a str,
    /// The node that served it (the last one, after failovers); `None` if none could.
    pub node: Option<&'a str>,
    pub ok: bool,
    pub tokens: u64,
    pub first_token: Option<Duration>,
    pub total: Duration,
}

#[derive(Debug, Default)]
pub struct RoutingStats {
    models: Mutex<HashMap<String, Counters>>,
    nodes: Mutex<HashMap<String, Counters>>,
}

impl RoutingStats {
    /// A host failed before answering and the request was tried elsewhere.
    pub fn retried(&self, model: &str, failed_node: &str) {
        self.update(model, Some(failed_node), |counters| counters.retries += 1);
    }

    /// A host failed in the middle of an answer and another one took over.
    pub fn failed_over(&self, model: &str, failed_node: &str) {
        self.update(model, Some(failed_node), |counters| counters.failovers += 1);
    }

    pub fn finished(&self, outcome: Outcome<'_>) {
        self.update(outcome.model, outcome.node, |counters| {
            counters.requests += 1;
            counters.tokens += outcome.tokens;
            if !outcome.ok {
                counters.errors += 1;
            }
            if let Some(first) = outcome.first_token {
                push(&mut counters.first_token_ms, first.as_secs_f64() * 1000.0);
                counters.first_token_histogram.observe(first.as_secs_f64());
            }
            if outcome.ok {
                push(&mut counters.total_ms, outcome.total.as_secs_f64() * 1000.0);
                counters.total_histogram.observe(outcome.total.as_secs_f64());
            }
        });
        tracing::debug!(
            model = outcome.model,
            node = outcome.node.unwrap_or("-"),
            ok = outcome.ok,
            tokens = outcome.tokens,
            total_ms = outcome.total.as_millis() as u64,
            "request finished"
        );
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot { models: snapshot_of(&self.models), nodes: snapshot_of(&self.nodes) }
    }

    fn update(&self, model: &str, node: Option<&str>, change: impl Fn(&mut Counters)) {
        change(lock(&self.models).entry(model.to_string()).or_default());
        if let Some(node) = node {
            change(lock(&self.nodes).entry(node.to_string()).or_default());
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn push(samples: &mut VecDeque<f64>, value: f64) {
    if samples.len() == SAMPLES {
        samples.pop_front();
    }
    samples.push_back(value);
}

fn snapshot_of(map: &Mutex<HashMap<String, Counters>>) -> BTreeMap<String, CountersSnapshot> {
    lock(map)
        .iter()
        .map(|(key, c)| {
            let snapshot = CountersSnapshot {
                requests: c.requests,
                errors: c.errors,
                retries: c.retries,
                failovers: c.failovers,
                tokens: c.tokens,
                first_token_ms: percentiles(&c.first_token_ms),
                total_ms: percentiles(&c.total_ms),
                first_token_histogram: c.first_token_histogram.clone(),
                total_histogram: c.total_histogram.clone(),
            };
            (key.clone(), snapshot)
        })
        .collect()
}

fn percentiles(samples: &VecDeque<f64>) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    let mut sorted: Vec<f64> = samples.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    Percentiles { p50: Some(at(0.5)), p95: Some(at(0.95)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ms: u64, ok: bool) -> Outcome<'static> {
        Outcome {
            model: "chat",
            node: Some("gpu-box"),
            ok,
            tokens: 10,
            first_token: Some(Duration::from_millis(ms / 10)),
            total: Duration::from_millis(ms),
        }
    }

    #[test]
    fn counts_and_percentiles_per_model_and_node() {
        let stats = RoutingStats::default();
        for ms in 1..=100 {
            stats.finished(outcome(ms, true));
        }
        stats.finished(outcome(5000, false));
        stats.retried("chat", "laptop");
        stats.failed_over("chat", "laptop");
        let snapshot = stats.snapshot();
        let model = &snapshot.models["chat"];
        assert_eq!((model.requests, model.errors, model.retries, model.failovers), (101, 1, 1, 1));
        assert_eq!(model.tokens, 1010);
        assert_eq!(model.total_ms.p50, Some(51.0));
        assert_eq!(model.total_ms.p95, Some(95.0));
        assert_eq!(snapshot.nodes["gpu-box"].requests, 101);
        assert_eq!(snapshot.nodes["laptop"].retries, 1);
        assert_eq!(snapshot.nodes["laptop"].requests, 0);
        let histogram = &model.total_histogram;
        assert_eq!(histogram.count, 100, "failed requests have no total latency");
        // 5 ms bucket: 1..=5 ms; 10 ms bucket: 1..=10 ms; the last bucket holds everything.
        assert_eq!(&histogram.buckets[..2], &[5, 10]);
        assert_eq!(*histogram.buckets.last().unwrap(), 100);
    }

    #[test]
    fn samples_are_bounded() {
        let stats = RoutingStats::default();
        for ms in 0..(SAMPLES as u64 + 500) {
            stats.finished(outcome(ms, true));
        }
        assert_eq!(lock(&stats.models)["chat"].total_ms.len(), SAMPLES);
        assert_eq!(stats.snapshot().models["chat"].requests, SAMPLES as u64 + 500);
    }
}
