//! The exposition text of `/metrics`: escaping, histogram buckets, and the names, types and help
//! texts clients already query.

use super::*;

fn encode(snapshot: Snapshot) -> String {
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry(snapshot)).unwrap();
    text
}

fn snapshot(models: &[(&str, CountersSnapshot)], nodes: &[(&str, CountersSnapshot)]) -> Snapshot {
    let owned = |pairs: &[(&str, CountersSnapshot)]| {
        pairs.iter().map(|(name, counters)| (name.to_string(), counters.clone())).collect()
    };
    Snapshot {
        stats: StatsSnapshot { models: owned(models), nodes: owned(nodes) },
        load: EngineLoad {
            in_flight: 1,
            queued: 2,
            prompt_cache_hits: 3,
            prompt_tokens_reused: 4,
            prompt_cache_bytes: 5,
        },
        resources: None,
        nodes_online: 2,
        models: 1,
        keys: BTreeMap::new(),
    }
}

/// One sample line of the exposition text.
struct Sample<'a> {
    name: &'a str,
    /// Keys and unescaped values.
    labels: Vec<(String, String)>,
    value: f64,
}

/// `None` unless the line is exactly `name{key="value",...} value` or `name value`.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let is_name = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let (name, mut rest) = line.split_at(line.find(['{', ' '])?);
    let mut labels = Vec::new();
    if let Some(mut list) = rest.strip_prefix('{') {
        while !list.starts_with('}') {
            let (key, quoted) = list.split_once("=\"")?;
            let (mut value, mut chars) = (String::new(), quoted.char_indices());
            let end = loop {
                match chars.next()? {
                    (end, '"') => break end,
                    (_, '\\') => value.push(match chars.next()?.1 {
                        '\\' => '\\',
                        '"' => '"',
                        'n' => '\n',
                        _ => return None,
                    }),
                    (_, c) => value.push(c),
                }
            };
            (is_name(key) && key != "__name__").then_some(())?;
            labels.push((key.to_string(), value));
            list = &quoted[end + 1..];
            list = list.strip_prefix(',').or(list.starts_with('}').then_some(list))?;
        }
        rest = &list[1..];
    }
    let value = match rest.strip_prefix(' ')? {
        "+Inf" => f64::INFINITY,
        value => value.parse().ok()?,
    };
    is_name(name).then_some(Sample { name, labels, value })
}

#[test]
fn labels_are_escaped_and_every_line_parses() {
    let awkward = "a\"b\\c\nd";
    let counters = CountersSnapshot { requests: 3, ..CountersSnapshot::default() };
    let text = encode(snapshot(&[(awkward, counters.clone())], &[(awkward, counters)]));
    assert!(text.contains("llmesh_requests_total{model=\"a\\\"b\\\\c\\nd\",scope=\"model\"} 3\n"), "{text}");
    assert!(text.contains("llmesh_requests_total{node=\"a\\\"b\\\\c\\nd\",scope=\"node\"} 3\n"), "{text}");
    let (mut family, mut round_trips) = ("", 0);
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            family = declared.split(' ').next().unwrap();
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP llmesh_"), "{line}");
            continue;
        }
        let sample = parse_sample(line).unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let suffix = sample.name.strip_prefix(family).unwrap_or_else(|| panic!("outside {family}: {line}"));
        assert!(["", "_bucket", "_sum", "_count"].contains(&suffix), "{line}");
        round_trips += sample.labels.iter().filter(|(_, value)| value == awkward).count();
    }
    // Five counters by model and by node, two histograms of 14 buckets, a sum and a count.
    assert_eq!(round_trips, 5 * 2 + 2 * 16);
}

#[test]
fn histograms_come_from_cumulative_snapshots() {
    // Observed: 0.003 s, 0.2 s and 7 s.
    let total_histogram =
        Histogram { buckets: vec![1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], sum_seconds: 7.203, count: 3 };
    let counters = CountersSnapshot { total_histogram, ..CountersSnapshot::default() };
    let text = encode(snapshot(&[("m", counters)], &[]));
    let value = |prefix: &str| {
        let line = text.lines().find(|line| line.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}"));
        parse_sample(line).unwrap().value
    };
    let duration = "llmesh_request_duration_seconds";
    assert_eq!(value(&format!("{duration}_bucket{{model=\"m\",le=\"0.005\"}}")), 1.0);
    assert_eq!(value(&format!("{duration}_bucket{{model=\"m\",le=\"0.1\"}}")), 1.0);
    assert_eq!(value(&format!("{duration}_bucket{{model=\"m\",le=\"0.25\"}}")), 2.0);
    assert_eq!(value(&format!("{duration}_bucket{{model=\"m\",le=\"10\"}}")), 3.0);
    assert_eq!(value(&format!("{duration}_bucket{{model=\"m\",le=\"+Inf\"}}")), 3.0);
    assert_eq!(value(&format!("{duration}_sum{{model=\"m\"}}")), 7.203);
    assert_eq!(value(&format!("{duration}_count{{model=\"m\"}}")), 3.0);
    // A histogram that has seen nothing still has every bucket, all empty.
    let first_token: Vec<&str> =
        text.lines().filter(|line| line.starts_with("llmesh_time_to_first_token_seconds_bucket")).collect();
    assert_eq!(first_token.len(), LATENCY_BUCKETS.len() + 1);
    assert!(first_token.iter().all(|line| line.ends_with(" 0")), "{first_token:?}");
}

#[test]
fn names_types_and_help_are_those_clients_know() {
    let mut snapshot = snapshot(&[], &[]);
    let usage =
        ResourceUsage { gpu_percent: Some(50.0), gpu_memory_used_bytes: Some(1), ..Default::default() };
    snapshot.resources = Some((Hardware::default(), usage));
    let text = encode(snapshot);
    let types: Vec<&str> = text.lines().filter_map(|line| line.strip_prefix("# TYPE ")).collect();
    assert_eq!(
        types,
        [
            "llmesh_requests_total counter",
            "llmesh_request_errors_total counter",
            "llmesh_retries_total counter",
            "llmesh_failovers_total counter",
            "llmesh_tokens_generated_total counter",
            "llmesh_time_to_first_token_seconds histogram",
            "llmesh_request_duration_seconds histogram",
            "llmesh_requests_in_flight gauge",
            "llmesh_requests_queued gauge",
            "llmesh_prompt_cache_hits_total counter",
            "llmesh_prompt_cache_tokens_reused_total counter",
            "llmesh_prompt_cache_bytes gauge",
            "llmesh_node_cpu_percent gauge",
            "llmesh_node_memory_used_bytes gauge",
            "llmesh_node_memory_total_bytes gauge",
            "llmesh_node_gpu_percent gauge",
            "llmesh_node_gpu_memory_used_bytes gauge",
            "llmesh_cluster_nodes_online gauge",
            "llmesh_cluster_models gauge",
            "llmesh_key_requests_total counter",
            "llmesh_key_prompt_tokens_total counter",
            "llmesh_key_completion_tokens_total counter",
        ]
    );
    assert!(text.contains("# HELP llmesh_requests_total Requests routed, by model and serving node.\n"));
    assert!(text.contains(
        "# HELP llmesh_retries_total Hosts that failed before answering; the request went elsewhere.\n"
    ));
    assert!(text.contains("\nllmesh_requests_queued 2\n"), "{text}");
    assert!(text.contains("\nllmesh_prompt_cache_hits_total 3\n"), "{text}");
    assert!(text.contains("\nllmesh_prompt_cache_bytes 5\n"), "{text}");
    assert!(text.contains("\nllmesh_cluster_nodes_online 2\n"), "{text}");
}

#[test]
fn each_keys_use_is_counted_by_model_under_its_name() {
    let mut snapshot = snapshot(&[], &[]);
    let usage = ModelUsage { requests: 2, prompt_tokens: 30, completion_tokens: 7 };
    snapshot.keys.insert("intern".into(), BTreeMap::from([("smollm2".to_string(), usage)]));
    let text = encode(snapshot);
    assert!(text.contains("\nllmesh_key_requests_total{key=\"intern\",model=\"smollm2\"} 2\n"), "{text}");
    assert!(
        text.contains("\nllmesh_key_prompt_tokens_total{key=\"intern\",model=\"smollm2\"} 30\n"),
        "{text}"
    );
    assert!(
        text.contains("\nllmesh_key_completion_tokens_total{key=\"intern\",model=\"smollm2\"} 7\n"),
        "{text}"
    );
}
