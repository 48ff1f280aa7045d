//! Models loaded and unloaded while a node serves (`/api/models`), on a two-node cluster in one
//! process: the other node routes to a model once it is loaded, a stream in flight during an
//! unload finishes while new requests get 503, a forced unload ends its streams with an error, and
//! broken, missing or too large files are refused with their reason while the node keeps serving.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use llmesh::api::{self, ApiConfig};
use llmesh::node::Node;
use serde_json::{Value, json};
use support::cluster::{call, empty_node, eventually, hosts_of};
use support::tiny_model;
use tower::ServiceExt;

/// This node's entry for `id` in `GET /api/models`, if any.
async fn state_of(node: &Node, id: &str) -> Option<Value> {
    let answer = call(node, "GET", "/api/models", None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let list: Value = serde_json::from_str(&answer.body).unwrap();
    list["data"].as_array().unwrap().iter().find(|model| model["id"] == id).cloned()
}

async fn load(node: &Node, id: &str, path: &std::path::Path) {
    let answer = call(node, "POST", "/api/models", Some(json!({"id": id, "path": path}))).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
}

/// Wait until the load of `id` ends; its final entry.
async fn settled(node: &Node, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let state = state_of(node, id).await.expect("the model is listed while it loads");
        if state["state"] != "loading" {
            return state;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} still loading: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    })
}

/// A streamed chat through `node`'s API, its body left to read.
async fn open_stream(node: &Node) -> Body {
    let app = api::node_app(node.router().clone(), ApiConfig::default());
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(chat(200, true).to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body()
}

/// Read the next chunk of a stream's body as text.
async fn next_chunk(body: &mut Body) -> String {
    let frame = body.frame().await.expect("the stream has more").unwrap();
    String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
}

async fn rest(body: Body) -> String {
    String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_loaded_at_run_time_is_routed_to_and_unloads_after_its_streams() {
    let dir = tempfile::tempdir().unwrap();
    let host = empty_node("host", &dir, Vec::new(), None).await;
    let entry = empty_node("entry", &dir, host.p2p_addresses().to_vec(), None).await;
    let model = dir.path().join("tiny.gguf");
    tiny_model::write_tiny_llama(&model);

    assert_eq!(
        call(&entry, "POST", "/v1/chat/completions", Some(chat(4, false))).await.status,
        StatusCode::NOT_FOUND
    );
    load(&host, "tiny", &model).await;
    let ready = settled(&host, "tiny").await;
    assert_eq!(ready["state"], "ready", "{ready}");
    assert_eq!(ready["info"]["architecture"], "llama");
    assert!(ready["info"]["parameters"].as_u64().unwrap() > 0, "{ready}");
    assert_eq!(ready["info"]["file_bytes"].as_u64().unwrap(), std::fs::metadata(&model).unwrap().len());

    // The other node learns of it from the announcement, with its metadata, and routes to it.
    eventually("the entry node lists the new model", async || hosts_of(&entry, "tiny").await == ["host"])
        .await;
    let listed: Value = serde_json::from_str(&call(&entry, "GET", "/v1/models", None).await.body).unwrap();
    assert_eq!(listed["data"][0]["llmesh"]["parameters"], ready["info"]["parameters"]);
    let answer = call(&entry, "POST", "/v1/chat/completions", Some(chat(4, false))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.served_by.as_deref(), Some("host"));

    // Loading the same id again is refused; so is a nameless one.
    let again = call(&host, "POST", "/api/models", Some(json!({"id": "tiny", "path": model}))).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST, "{}", again.body);
    assert!(again.body.contains("already loaded"), "{}", again.body);
    let nameless = call(&host, "POST", "/api/models", Some(json!({"id": "", "path": model}))).await;
    assert_eq!(nameless.status, StatusCode::BAD_REQUEST, "{}", nameless.body);

    // An unload while a stream runs: the stream finishes, new requests get 503 meanwhile.
    let mut stream = open_stream(&host).await;
    assert!(next_chunk(&mut stream).await.contains("chat.completion.chunk"));
    let unload = call(&host, "DELETE", "/api/models/tiny", None).await;
    assert_eq!(unload.status, StatusCode::ACCEPTED, "{}", unload.body);
    assert_eq!(state_of(&host, "tiny").await.unwrap()["state"], "unloading");
    let refused = call(&host, "POST", "/v1/chat/completions", Some(chat(4, false))).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.body);
    let finished = rest(stream).await;
    assert!(finished.contains("\"finish_reason\":\"length\""), "{finished}");
    assert!(finished.trim_end().ends_with("data: [DONE]"), "{finished}");
    eventually("the model is gone from the host", async || state_of(&host, "tiny").await.is_none()).await;
    eventually("the entry node no longer lists it", async || hosts_of(&entry, "tiny").await.is_empty()).await;
    // For a while (the cluster's grace for a model whose last host went away): 503, not 404.
    let gone = call(&entry, "POST", "/v1/chat/completions", Some(chat(4, false))).await;
    assert_eq!(gone.status, StatusCode::SERVICE_UNAVAILABLE, "{}", gone.body);
    assert!(gone.body.contains("stopped serving it"), "{}", gone.body);

    // Loaded again, then unloaded by force: the running stream ends with an error.
    load(&host, "tiny", &model).await;
    assert_eq!(settled(&host, "tiny").await["state"], "ready");
    let mut stream = open_stream(&host).await;
    assert!(next_chunk(&mut stream).await.contains("chat.completion.chunk"));
    let forced = call(&host, "DELETE", "/api/models/tiny?force=true", None).await;
    assert_eq!(forced.status, StatusCode::ACCEPTED, "{}", forced.body);
    let cut = rest(stream).await;
    assert!(cut.contains("\"error\"") && cut.contains("shutting down"), "{cut}");
    assert!(!cut.contains("\"finish_reason\":\"length\""), "{cut}");
    eventually("the forced unload completes", async || state_of(&host, "tiny").await.is_none()).await;

    let unknown = call(&host, "DELETE", "/api/models/nothing", None).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_missing_and_too_large_models_are_refused_while_the_node_serves() {
    let dir = tempfile::tempdir().unwrap();
    let host = empty_node("host", &dir, Vec::new(), None).await;
    let model = dir.path().join("tiny.gguf");
    tiny_model::write_tiny_llama(&model);
    load(&host, "tiny", &model).await;
    assert_eq!(settled(&host, "tiny").await["state"], "ready");

    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"this is not a GGUF file at all").unwrap();
    let huge = dir.path().join("huge.gguf");
    // Valid, but a KV cache for 4 billion positions needs about a terabyte.
    tiny_model::write_tiny_llama_with_context(&huge, u32::MAX);
    let missing = dir.path().join("missing.gguf");
    let cases = [
        ("broken", &broken, "unknown magic"),
        ("huge", &huge, "not enough memory"),
        ("missing", &missing, "does not exist"),
    ];
    for (id, path, reason) in cases {
        load(&host, id, path).await;
        let failed = settled(&host, id).await;
        assert_eq!(failed["state"], "failed", "{failed}");
        let error = failed["error"].as_str().unwrap();
        assert!(error.contains(reason), "{id}: {error}");
        assert!(!error.contains("   0: "), "no backtrace in what users see: {error}");
        // The node still serves the model it has.
        let answer = call(&host, "POST", "/v1/chat/completions", Some(chat(4, false))).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    assert!(settled(&host, "huge").await["error"].as_str().unwrap().contains("MiB of KV cache"));
    // A failed load is forgotten by unloading it, and its id can be loaded again.
    assert_eq!(call(&host, "DELETE", "/api/models/broken", None).await.status, StatusCode::ACCEPTED);
    assert!(state_of(&host, "broken").await.is_none());
    load(&host, "broken", &model).await;
    assert_eq!(settled(&host, "broken").await["state"], "ready");
}
