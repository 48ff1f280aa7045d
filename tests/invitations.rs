//! Joining with a connection key, in one process on loopback: a node with nothing but the key
//! joins and reaches the inviter's models; a single-use key is refused the second time, an
//! expired or tampered one at once; a joined node rejoins after a restart without the key.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use llmesh::engine::{LocalEngine, ModelSpec, QueueLimits};
use llmesh::node::Node;
use serde_json::{Value, json};
use support::cluster::{call, config, eventually, hosts_of, tiny_host};

async fn joining_node(name: &str, dir: &tempfile::TempDir, key: Option<&str>) -> Result<Node, String> {
    let mut config = config(name, dir, Vec::new(), None);
    config.join = key.map(str::to_string);
    let engine = LocalEngine::load(&[], QueueLimits::default(), &candle_core::Device::Cpu).unwrap();
    Node::spawn_with_engine(config, Arc::new(engine)).await.map_err(|error| error.to_string())
}

/// A node hosting the tiny model in a cluster with a secret.
async fn private_inviter(dir: &tempfile::TempDir) -> Node {
    let path = dir.path().join("tiny.gguf");
    support::tiny_model::write_tiny_llama(&path);
    let spec = ModelSpec { id: "tiny".into(), path };
    let engine = LocalEngine::load(&[spec], QueueLimits::default(), &candle_core::Device::Cpu).unwrap();
    let config = config("inviter", dir, Vec::new(), Some("team-secret-for-tests"));
    Node::spawn_with_engine(config, Arc::new(engine)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_key_is_all_a_new_node_needs() {
    let dir = tempfile::tempdir().unwrap();
    // The cluster has a secret; the new node is given nothing but the key.
    let inviter = private_inviter(&dir).await;
    let made = call(&inviter, "POST", "/api/invitations", Some(json!({"uses": 1}))).await;
    assert_eq!(made.status, StatusCode::OK, "{}", made.body);
    let made: Value = serde_json::from_str(&made.body).unwrap();
    let key = made["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("llmesh://join/"));

    let joined = joining_node("laptop", &dir, Some(&key)).await.expect("join with the key");
    eventually("the new node sees the inviter's model", async || {
        hosts_of(&joined, "tiny").await == ["inviter"]
    })
    .await;
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let answer = call(&joined, "POST", "/v1/chat/completions", Some(chat)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.served_by.as_deref(), Some("inviter"));

    // The key was for one use.
    let refused = joining_node("intruder", &dir, Some(&key)).await.err().expect("a second use is refused");
    assert!(refused.contains("already been used"), "{refused}");

    // Restarted without the key, the node rejoins from what it remembered.
    drop(joined);
    let restarted = joining_node("laptop", &dir, None).await.unwrap();
    eventually("the restarted node rejoins", async || hosts_of(&restarted, "tiny").await == ["inviter"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_tampered_keys_are_refused_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (inviter, _) = tiny_host("inviter", &dir, Vec::new(), QueueLimits::default()).await;
    let (expired, _) = inviter.router().invite(1, Duration::ZERO).await.unwrap();
    let error = joining_node("late", &dir, Some(&expired)).await.err().expect("an expired key is refused");
    assert!(error.contains("expired"), "{error}");

    let (key, _) = inviter.router().invite(1, Duration::from_secs(3600)).await.unwrap();
    let mut tampered = key.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let error = joining_node("forger", &dir, Some(&tampered)).await.err().expect("a tampered key is refused");
    assert!(error.contains("tampered") || error.contains("damaged"), "{error}");
    let error = joining_node("typo", &dir, Some("llmesh:/join/abc")).await.err().unwrap();
    assert!(error.contains("not an llmesh connection key"), "{error}");

    let bad = call(&inviter, "POST", "/api/invitations", Some(json!({"uses": 0}))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_loses_access_everywhere_and_cannot_return() {
    let dir = tempfile::tempdir().unwrap();
    let inviter = private_inviter(&dir).await;
    let (key, _) = inviter.router().invite(2, Duration::from_secs(3600)).await.unwrap();
    let member = joining_node("member", &dir, Some(&key)).await.unwrap();
    let revoked = joining_node("stolen-laptop", &dir, Some(&key)).await.unwrap();
    let revoked_peer = revoked.router().node().peer_id.clone();
    for node in [&member, &revoked] {
        eventually("both joined nodes see the model", async || hosts_of(node, "tiny").await == ["inviter"])
            .await;
    }
    eventually("the member knows the other node", async || {
        member.router().cluster_nodes().iter().any(|n| n.announcement.peer_id == revoked_peer)
    })
    .await;

    let answer = call(&inviter, "POST", &format!("/api/nodes/{revoked_peer}/revoke"), None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let answer: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(answer["newly_revoked"], true);

    eventually("the revoked node loses the cluster", async || hosts_of(&revoked, "tiny").await.is_empty())
        .await;
    eventually("the revocation reaches the other member", async || {
        !member.router().cluster_nodes().iter().any(|n| n.announcement.peer_id == revoked_peer)
            && !member.router().connected_peers().await.contains(&revoked_peer)
    })
    .await;
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    assert_ne!(call(&revoked, "POST", "/v1/chat/completions", Some(chat)).await.status, StatusCode::OK);

    // Restarted with its remembered secret and peers, it is still refused.
    drop(revoked);
    let returning = joining_node("stolen-laptop", &dir, None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(hosts_of(&returning, "tiny").await.is_empty());
    assert!(returning.router().connected_peers().await.is_empty());
    let bad = call(&inviter, "POST", "/api/nodes/not-a-peer/revoke", None).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_joins_with_a_key_and_moves_to_its_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let inviter = private_inviter(&dir).await;
    let (key, _) = inviter.router().invite(3, Duration::from_secs(3600)).await.unwrap();
    let engine =
        || Arc::new(LocalEngine::load(&[], QueueLimits::default(), &candle_core::Device::Cpu).unwrap());

    // Same cluster key, but no peers: it cannot find the cluster until it joins.
    let lonely =
        Node::spawn_with_engine(config("lonely", &dir, Vec::new(), Some("team-secret-for-tests")), engine())
            .await
            .unwrap();
    let joined = call(&lonely, "POST", "/api/join", Some(json!({"key": key}))).await;
    assert_eq!(joined.status, StatusCode::OK, "{}", joined.body);
    eventually("the node joined while running", async || hosts_of(&lonely, "tiny").await == ["inviter"])
        .await;

    // A node running on its own (no cluster key) moves to the key's cluster, and stays there
    // after a restart.
    let solo = Node::spawn_with_engine(config("solo", &dir, Vec::new(), None), engine()).await.unwrap();
    let joined = call(&solo, "POST", "/api/join", Some(json!({"key": key}))).await;
    assert_eq!(joined.status, StatusCode::OK, "{}", joined.body);
    eventually("the solo node moved into the cluster", async || hosts_of(&solo, "tiny").await == ["inviter"])
        .await;
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let answer = call(&solo, "POST", "/v1/chat/completions", Some(chat)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    drop(solo);
    let restarted = joining_node("solo", &dir, None).await.unwrap();
    eventually("the moved node rejoins after a restart", async || {
        hosts_of(&restarted, "tiny").await == ["inviter"]
    })
    .await;

    // A node configured with another cluster's key would go back to it at its next start.
    let other =
        Node::spawn_with_engine(config("other", &dir, Vec::new(), Some("other-secret-for-tests")), engine())
            .await
            .unwrap();
    let refused = call(&other, "POST", "/api/join", Some(json!({"key": key}))).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert!(refused.body.contains("--cluster-key"), "{}", refused.body);
}
