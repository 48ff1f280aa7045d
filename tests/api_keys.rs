//! API keys across a three-node cluster (a ← b ← c, each peered with the one before, `a` hosting
//! the tiny chat model and MiniLM): a key made on `a` works on `c`; it sees and uses only its
//! model; its request limit answers 429 with `Retry-After` on every node once the cluster has
//! counted its requests; its use is counted; revoked on `b`, it is refused everywhere, also by a
//! node restarted afterwards; a key made while a node is down reaches it when it comes back; and
//! no secret appears in a log line, an announcement, `/metrics` or a file the nodes keep.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use llmesh::api::{self, ApiConfig};
use llmesh::node::Node;
use serde_json::{Value, json};
use support::cluster::{Response, config, empty_node, eventually, hosting_node};
use tower::ServiceExt;

const ADMIN: &str = "the-admin-key-of-every-node";
const CLUSTER: &str = "api-keys-test-cluster-secret";

/// Every log line of every node, at every level, for the grep at the end.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A request through the node's own API (with its admin key configured), as `bearer`.
async fn send(node: &Node, bearer: &str, method: &str, path: &str, body: Option<Value>) -> Response {
    let app = api::node_app(
        node.router().clone(),
        ApiConfig { api_key: Some(ADMIN.into()), ..ApiConfig::default() },
    );
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {bearer}"))
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Response { status, served_by: None, retry_after, body: String::from_utf8(bytes.to_vec()).unwrap() }
}

fn json_of(response: &Response) -> Value {
    serde_json::from_str(&response.body).unwrap_or_else(|_| panic!("not JSON: {}", response.body))
}

fn chat() -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
}

async fn models_seen(node: &Node, secret: &str) -> Option<Vec<String>> {
    let answer = send(node, secret, "GET", "/v1/models", None).await;
    (answer.status == StatusCode::OK).then(|| {
        json_of(&answer)["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    })
}

async fn key_entry(node: &Node, name: &str) -> Value {
    let list = json_of(&send(node, ADMIN, "GET", "/api/keys", None).await);
    list["data"].as_array().unwrap().iter().find(|key| key["name"] == name).cloned().unwrap_or(Value::Null)
}

async fn peered_node(name: &str, dir: &tempfile::TempDir, before: &Node) -> Node {
    empty_node(name, dir, before.p2p_addresses().to_vec(), Some(CLUSTER)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_spread_limit_count_and_revoke_across_the_cluster() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("llmesh=trace,info")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let dir = tempfile::tempdir().unwrap();
    let a = hosting_node("a", &dir, Some(CLUSTER)).await;
    let b = peered_node("b", &dir, &a).await;
    let c = peered_node("c", &dir, &b).await;
    eventually("c sees the tiny model", async || support::cluster::hosts_of(&c, "tiny").await == ["a"]).await;

    // Made on a, for one model, three requests a minute.
    let made = send(
        &a,
        ADMIN,
        "POST",
        "/api/keys",
        Some(json!({"name": "intern", "models": ["tiny"], "requests_per_minute": 3})),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let secret = json_of(&made)["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("sk-llmesh-"));
    let again = send(&a, ADMIN, "POST", "/api/keys", Some(json!({"name": "intern"}))).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST, "{}", again.body);

    // It works on c within a gossip round, and sees only its model.
    eventually("the key works on c", async || models_seen(&c, &secret).await.is_some()).await;
    assert_eq!(models_seen(&c, &secret).await.unwrap(), ["tiny"]);
    let admin_sees = models_seen(&c, ADMIN).await.unwrap();
    assert!(admin_sees.contains(&"minilm".to_string()), "{admin_sees:?}");
    let other_model =
        send(&c, &secret, "POST", "/v1/embeddings", Some(json!({"model": "minilm", "input": "x"}))).await;
    assert_eq!(other_model.status, StatusCode::NOT_FOUND, "{}", other_model.body);
    assert_eq!(json_of(&other_model)["error"]["code"], "model_not_found");
    let operator = send(&c, &secret, "GET", "/api/nodes", None).await;
    assert_eq!(operator.status, StatusCode::FORBIDDEN, "{}", operator.body);
    assert_eq!(
        send(&c, "sk-llmesh-not-a-key", "GET", "/v1/models", None).await.status,
        StatusCode::UNAUTHORIZED
    );

    // One request through each node; once the cluster has counted them, the fourth is refused
    // wherever it goes.
    for node in [&a, &b, &c] {
        let answer = send(node, &secret, "POST", "/v1/chat/completions", Some(chat())).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    for node in [&a, &b, &c] {
        eventually("every node counts the key's three requests", async || {
            key_entry(node, "intern").await["minute_requests"] == 3
        })
        .await;
    }
    for node in [&a, &b, &c] {
        let refused = send(node, &secret, "POST", "/v1/chat/completions", Some(chat())).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.body);
        let seconds: u64 = refused.retry_after.as_deref().expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&seconds), "{seconds}");
        assert_eq!(json_of(&refused)["error"]["code"], "rate_limit_exceeded");
    }

    // Its use is counted: by model where it was used, and across the cluster.
    let entry = key_entry(&c, "intern").await;
    assert_eq!(entry["usage"]["requests"], 3, "{entry}");
    assert!(entry["usage"]["completion_tokens"].as_u64().unwrap() >= 3, "{entry}");
    assert!(entry["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{entry}");
    assert_eq!(entry["usage_here"]["tiny"]["requests"], 1, "{entry}");
    let metrics = send(&a, ADMIN, "GET", "/metrics", None).await.body;
    assert!(metrics.contains(r#"llmesh_key_requests_total{key="intern",model="tiny"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"llmesh_key_completion_tokens_total{key="intern",model="tiny"}"#),
        "{metrics}"
    );

    // Revoked on b: refused everywhere within seconds.
    let revoked = send(&b, ADMIN, "POST", "/api/keys/intern/revoke", Some(json!({}))).await;
    assert_eq!(json_of(&revoked)["newly_revoked"], true, "{}", revoked.body);
    for node in [&a, &b, &c] {
        eventually("the revoked key is refused", async || models_seen(node, &secret).await.is_none()).await;
    }
    let unknown = send(&b, ADMIN, "POST", "/api/keys/nobody/revoke", Some(json!({}))).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);

    // c goes down; a key made meanwhile reaches it when it is back, and the revoked one stays
    // refused there.
    c.shutdown();
    c.join().await.unwrap();
    let made = send(&a, ADMIN, "POST", "/api/keys", Some(json!({"name": "app"}))).await;
    let app_secret = json_of(&made)["secret"].as_str().unwrap().to_string();
    let c = Node::spawn_with_engine(
        config("c", &dir, b.p2p_addresses().to_vec(), Some(CLUSTER)),
        Arc::new(
            llmesh::engine::LocalEngine::load(&[], Default::default(), &candle_core::Device::Cpu).unwrap(),
        ),
    )
    .await
    .unwrap();
    assert!(models_seen(&c, &secret).await.is_none(), "the revoked key works after a restart");
    eventually("the key made while c was down works on c", async || {
        models_seen(&c, &app_secret).await.is_some()
    })
    .await;

    // No secret anywhere it could leak.
    let nodes = [&a, &b, &c];
    let mut places =
        vec![("the logs".to_string(), String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned())];
    for node in nodes {
        places.push(("an announcement".into(), format!("{:?}", node.router().own_announcement())));
        places.push(("another node's announcement".into(), format!("{:?}", node.router().cluster_nodes())));
        places.push(("/metrics".into(), send(node, ADMIN, "GET", "/metrics", None).await.body));
        places.push(("/api/keys".into(), send(node, ADMIN, "GET", "/api/keys", None).await.body));
    }
    for entry in walk(dir.path()) {
        places.push((
            entry.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&entry).unwrap()).into_owned(),
        ));
    }
    assert!(places[0].1.contains("made an API key"), "the logs were not captured");
    for (place, text) in &places {
        for secret in [&secret, &app_secret] {
            let random_part = &secret["sk-llmesh-".len()..];
            assert!(!text.contains(random_part), "a secret is in {place}");
        }
    }
    for node in [a, b, c] {
        node.shutdown();
        tokio::time::timeout(Duration::from_secs(30), node.join()).await.unwrap().unwrap();
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
