//! Routing between replicas in one process: a burst spreads over two hosts, killing a host under
//! load loses no request, and saturation answers 429 with Retry-After and recovers.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llmesh::api::{self, ApiConfig};
use llmesh::engine::QueueLimits;
use llmesh::node::Node;
use serde_json::{Value, json};
use support::cluster::{call, entry_node, eventually, hosts_of, tiny_host};
use tower::ServiceExt;

fn chat(max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "in the"}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    })
}

async fn two_hosts_and_an_entry(
    dir: &tempfile::TempDir,
    limits: QueueLimits,
) -> (Node, Node, Node, Arc<llmesh::engine::LocalEngine>) {
    let (h1, engine1) = tiny_host("host-1", dir, Vec::new(), limits).await;
    let (h2, _) = tiny_host("host-2", dir, h1.p2p_addresses().to_vec(), limits).await;
    let peers = [h1.p2p_addresses(), h2.p2p_addresses()].concat();
    let entry = entry_node("entry", dir, peers, |_| {}).await;
    eventually("the entry sees both hosts", async || hosts_of(&entry, "tiny").await.len() == 2).await;
    (h1, h2, entry, engine1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_spreads_over_both_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let (_h1, _h2, entry, _) = two_hosts_and_an_entry(&dir, QueueLimits::default()).await;
    let entry = Arc::new(entry);
    let requests = (0..40).map(|_| {
        let entry = entry.clone();
        tokio::spawn(async move { call(&entry, "POST", "/v1/chat/completions", Some(chat(20, false))).await })
    });
    let mut served: HashMap<String, usize> = HashMap::new();
    for response in futures::future::join_all(requests).await {
        let response = response.unwrap();
        assert_eq!(response.status, StatusCode::OK, "{}", response.body);
        *served.entry(response.served_by.unwrap()).or_default() += 1;
    }
    assert_eq!(served.values().sum::<usize>(), 40);
    for host in ["host-1", "host-2"] {
        assert!(served.get(host).copied().unwrap_or(0) >= 12, "uneven spread: {served:?}");
    }
    let stats: Value = serde_json::from_str(&call(&entry, "GET", "/api/stats", None).await.body).unwrap();
    assert_eq!(stats["models"]["tiny"]["requests"], 40);
    assert_eq!(stats["models"]["tiny"]["tokens"], 40 * 20);
    assert!(stats["models"]["tiny"]["total_ms"]["p95"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_host_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limits = QueueLimits { max_active: 2, max_queued: 64, ..QueueLimits::default() };
    let (h1, _h2, entry, engine1) = two_hosts_and_an_entry(&dir, limits).await;
    let entry = Arc::new(entry);
    let requests: Vec<_> = (0..40)
        .map(|i| {
            let entry = entry.clone();
            let stream = i % 4 == 0;
            tokio::spawn(async move {
                (stream, call(&entry, "POST", "/v1/chat/completions", Some(chat(200, stream))).await)
            })
        })
        .collect();
    // Kill host 1 once it is busy generating and has more waiting.
    eventually("host 1 is busy", async || {
        let load = llmesh::engine::Engine::load(engine1.as_ref());
        load.in_flight > 0 && load.queued > 0
    })
    .await;
    drop(h1);
    for request in requests {
        let (stream, response) = request.await.unwrap();
        assert_eq!(response.status, StatusCode::OK, "{}", response.body);
        if stream {
            assert!(!response.body.contains("\"error\""), "stream broke: {}", response.body);
            assert!(response.body.trim_end().ends_with("data: [DONE]"));
        } else {
            let body: Value = serde_json::from_str(&response.body).unwrap();
            assert_eq!(body["choices"][0]["finish_reason"], "length");
        }
    }
    let stats: Value = serde_json::from_str(&call(&entry, "GET", "/api/stats", None).await.body).unwrap();
    let model = &stats["models"]["tiny"];
    assert_eq!(model["errors"], 0);
    assert!(model["retries"].as_u64().unwrap() + model["failovers"].as_u64().unwrap() > 0, "{model}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_gives_429_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (host, engine) = tiny_host(
        "host",
        &dir,
        Vec::new(),
        QueueLimits { max_active: 1, max_queued: 0, ..QueueLimits::default() },
    )
    .await;
    let entry = entry_node("entry", &dir, host.p2p_addresses().to_vec(), |config| {
        config.routing.saturation_wait_ms = 300;
    })
    .await;
    eventually("the entry sees the host", async || hosts_of(&entry, "tiny").await.len() == 1).await;

    // A stream nobody reads holds the host's only slot. (Asked of the host itself: through the
    // entry, the overlay's buffers could take the whole answer, and the slot would come free.)
    let app = api::app(Arc::new(host.router().clone()), ApiConfig::default());
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(chat(250, true).to_string()))
        .unwrap();
    let held = app.oneshot(request).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    eventually("the host is busy", async || engine.load_of("tiny").unwrap().active == 1).await;

    let refused = call(&entry, "POST", "/v1/chat/completions", Some(chat(5, false))).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.body);
    assert!(refused.retry_after.is_some(), "429 without Retry-After");
    let error: Value = serde_json::from_str(&refused.body).unwrap();
    assert_eq!(error["error"]["code"], "model_busy");

    // Dropping the held stream cancels its generation and frees the slot.
    drop(held);
    eventually("the held generation is cancelled", async || engine.load_of("tiny").unwrap().cancelled == 1)
        .await;
    let served = call(&entry, "POST", "/v1/chat/completions", Some(chat(5, false))).await;
    assert_eq!(served.status, StatusCode::OK, "{}", served.body);
}
