//! Helpers for tests that start several nodes in one process on loopback (port 0, mDNS off,
//! explicit peers) and talk to them through the real HTTP router.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use llmesh::api::{self, ApiConfig};
use llmesh::config::Config;
use llmesh::engine::{LocalEngine, ModelSpec, QueueLimits};
use llmesh::node::Node;
use serde_json::Value;
use tower::ServiceExt;

use super::tiny_model;

pub struct Response {
    pub status: StatusCode,
    pub served_by: Option<String>,
    pub retry_after: Option<String>,
    pub body: String,
}

pub async fn call(node: &Node, method: &str, path: &str, body: Option<Value>) -> Response {
    let app = api::node_app(node.router().clone(), ApiConfig::default());
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let served_by = response.headers().get("x-llmesh-node").map(|v| v.to_str().unwrap().to_string());
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Response { status, served_by, retry_after, body: String::from_utf8(bytes.to_vec()).unwrap() }
}

pub fn config(
    name: &str,
    data_dir: &tempfile::TempDir,
    peers: Vec<String>,
    cluster_key: Option<&str>,
) -> Config {
    log_when_asked();
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        name: Some(name.into()),
        data_dir: Some(data_dir.path().join(name)),
        p2p_listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        peers,
        mdns: false,
        cluster_key: cluster_key.map(str::to_string),
        ..Config::default()
    }
}

/// Print the nodes' logs (captured per test) when `RUST_LOG` is set, e.g. `RUST_LOG=llmesh=debug`.
fn log_when_asked() {
    if std::env::var_os("RUST_LOG").is_some() {
        let filter = tracing_subscriber::EnvFilter::from_default_env();
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// A node hosting the tiny chat model and MiniLM.
pub async fn hosting_node(name: &str, dir: &tempfile::TempDir, cluster_key: Option<&str>) -> Node {
    let model_path = dir.path().join("tiny.gguf");
    tiny_model::write_tiny_llama(&model_path);
    let models_dir = std::env::var_os("LLMESH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let specs = [
        ModelSpec { id: "tiny".into(), path: model_path },
        ModelSpec { id: "minilm".into(), path: models_dir.join("all-MiniLM-L6-v2") },
    ];
    let engine = LocalEngine::load(&specs, QueueLimits::default(), &candle_core::Device::Cpu)
        .expect("load models (run scripts/fetch-models.sh for MiniLM)");
    Node::spawn_with_engine(config(name, dir, Vec::new(), cluster_key), Arc::new(engine)).await.unwrap()
}

pub async fn empty_node(
    name: &str,
    dir: &tempfile::TempDir,
    peers: Vec<String>,
    cluster_key: Option<&str>,
) -> Node {
    let engine = LocalEngine::load(&[], QueueLimits::default(), &candle_core::Device::Cpu).unwrap();
    Node::spawn_with_engine(config(name, dir, peers, cluster_key), Arc::new(engine)).await.unwrap()
}

/// The hosts `node` lists for `model` (empty when it does not list the model).
pub async fn hosts_of(node: &Node, model: &str) -> Vec<String> {
    let models: Value = serde_json::from_str(&call(node, "GET", "/v1/models", None).await.body).unwrap();
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["id"] == model)
        .flat_map(|m| m["llmesh"]["hosts"].as_array().unwrap().iter())
        .map(|host| host["name"].as_str().unwrap().to_string())
        .collect()
}

/// Poll until `condition` holds, for at most 20 s.
pub async fn eventually<F: AsyncFn() -> bool>(what: &str, condition: F) {
    eventually_within(Duration::from_secs(20), what, condition).await
}

/// Poll until `condition` holds, for at most `limit` (for waits that include a protocol's own
/// timeouts, which a loaded machine stretches).
pub async fn eventually_within<F: AsyncFn() -> bool>(limit: Duration, what: &str, condition: F) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A node hosting only the tiny chat model with the given limits, peered with `peers`; the engine
/// is returned too so tests can watch its load.
pub async fn tiny_host(
    name: &str,
    dir: &tempfile::TempDir,
    peers: Vec<String>,
    limits: QueueLimits,
) -> (Node, Arc<LocalEngine>) {
    let model_path = dir.path().join(format!("{name}.gguf"));
    tiny_model::write_tiny_llama(&model_path);
    let spec = ModelSpec { id: "tiny".into(), path: model_path };
    let engine = Arc::new(LocalEngine::load(&[spec], limits, &candle_core::Device::Cpu).unwrap());
    let node = Node::spawn_with_engine(config(name, dir, peers, None), engine.clone()).await.unwrap();
    (node, engine)
}

/// A node without models whose config `adjust` may change before it starts.
pub async fn entry_node(
    name: &str,
    dir: &tempfile::TempDir,
    peers: Vec<String>,
    adjust: impl FnOnce(&mut Config),
) -> Node {
    let mut config = config(name, dir, peers, None);
    adjust(&mut config);
    let engine = LocalEngine::load(&[], QueueLimits::default(), &candle_core::Device::Cpu).unwrap();
    Node::spawn_with_engine(config, Arc::new(engine)).await.unwrap()
}
