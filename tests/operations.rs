//! The operator's endpoints on a two-node cluster: `/api/nodes`, `/api/stats` and `/metrics`
//! (names, labels, values that move after a request), all behind the API key.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llmesh::api::{self, ApiConfig};
use llmesh::engine::QueueLimits;
use serde_json::{Value, json};
use support::cluster::{call, entry_node, eventually, hosts_of, tiny_host};
use tower::ServiceExt;

/// The value of the sample whose line starts with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|line| line.starts_with(prefix)).and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_stats_and_metrics_describe_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (host, _) = tiny_host("host", &dir, Vec::new(), QueueLimits::default()).await;
    let entry = entry_node("entry", &dir, host.p2p_addresses().to_vec(), |_| {}).await;
    eventually("the entry sees the host", async || hosts_of(&entry, "tiny").await.len() == 1).await;

    let nodes: Value = serde_json::from_str(&call(&entry, "GET", "/api/nodes", None).await.body).unwrap();
    let nodes = nodes["data"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(nodes[0]["name"], "entry");
    assert_eq!(nodes[0]["this_node"], true);
    let remote = &nodes[1];
    assert_eq!((remote["name"].as_str(), remote["status"].as_str()), (Some("host"), Some("online")));
    assert_eq!(remote["models"], json!(["tiny"]));
    assert!(remote["hardware"]["cores"].as_u64().unwrap() > 0);
    assert!(remote["hardware"]["memory_bytes"].as_u64().unwrap() > 0);
    assert!(!remote["addresses"].as_array().unwrap().is_empty());
    assert_eq!(remote["degraded"], Value::Null);

    let before = call(&entry, "GET", "/metrics", None).await;
    assert_eq!(before.status, StatusCode::OK);
    assert_eq!(metric(&before.body, "llmesh_cluster_nodes_online "), Some(2.0));
    assert_eq!(metric(&before.body, "llmesh_cluster_models "), Some(1.0));
    assert!(before.body.contains("# TYPE llmesh_requests_total counter"));
    assert_eq!(metric(&before.body, "llmesh_requests_total{model=\"tiny\""), None);

    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "ignore_eos": true});
    assert_eq!(call(&entry, "POST", "/v1/chat/completions", Some(chat)).await.status, StatusCode::OK);

    let after = call(&entry, "GET", "/metrics", None).await.body;
    assert_eq!(metric(&after, "llmesh_requests_total{model=\"tiny\",scope=\"model\"}"), Some(1.0));
    assert_eq!(metric(&after, "llmesh_requests_total{node=\"host\",scope=\"node\"}"), Some(1.0));
    assert_eq!(metric(&after, "llmesh_tokens_generated_total{model=\"tiny\",scope=\"model\"}"), Some(7.0));
    assert_eq!(metric(&after, "llmesh_request_duration_seconds_count{model=\"tiny\"}"), Some(1.0));
    assert_eq!(
        metric(&after, "llmesh_time_to_first_token_seconds_bucket{model=\"tiny\",le=\"+Inf\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&after, "llmesh_request_errors_total{model=\"tiny\",scope=\"model\"}"), Some(0.0));

    let stats: Value = serde_json::from_str(&call(&entry, "GET", "/api/stats", None).await.body).unwrap();
    assert_eq!(stats["models"]["tiny"]["requests"], 1);
    assert_eq!(stats["nodes"]["host"]["tokens"], 7);
    assert!(stats["models"]["tiny"]["first_token_ms"]["p50"].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_need_the_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let node = entry_node("solo", &dir, Vec::new(), |_| {}).await;
    let config = ApiConfig { api_key: Some("secret".into()), ..ApiConfig::default() };
    for path in ["/api/nodes", "/api/stats", "/api/models", "/metrics"] {
        let app = api::node_app(node.router().clone(), config.clone());
        let anonymous = app.clone().oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED, "{path}");
        let request =
            Request::get(path).header("authorization", "Bearer secret").body(Body::empty()).unwrap();
        assert_eq!(app.oneshot(request).await.unwrap().status(), StatusCode::OK, "{path}");
    }
}
