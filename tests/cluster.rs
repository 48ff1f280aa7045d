//! Several nodes in one process on loopback (port 0, mDNS off, explicit peers): models hosted on
//! one node are listed and served through the others over the overlay; a node that leaves
//! disappears; a node with another cluster key sees nothing; a peer listed first at an address
//! that never answers is reached at its next one.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::cluster::{call, empty_node, eventually, hosting_node, hosts_of};

fn chat(stream: bool) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "in the"}], "temperature": 0, "max_tokens": 12, "stream": stream})
}

fn streamed_text(body: &str) -> String {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .take_while(|data| *data != "[DONE]")
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_on_one_node_are_served_through_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let c = hosting_node("node-c", &dir, None).await;
    let b = empty_node("node-b", &dir, c.p2p_addresses().to_vec(), None).await;
    // A knows only B: it learns of C through B.
    let a = empty_node("node-a", &dir, b.p2p_addresses().to_vec(), None).await;

    eventually("A lists C's models", async || hosts_of(&a, "tiny").await == ["node-c"]).await;
    assert_eq!(hosts_of(&a, "minilm").await, ["node-c"]);
    // B relayed C's announcement to A; its own copy may be applied a moment later.
    eventually("B lists C's models", async || hosts_of(&b, "tiny").await == ["node-c"]).await;

    let direct = call(&c, "POST", "/v1/chat/completions", Some(chat(false))).await;
    let through_a = call(&a, "POST", "/v1/chat/completions", Some(chat(false))).await;
    assert_eq!(through_a.status, StatusCode::OK, "{}", through_a.body);
    assert_eq!(through_a.served_by.as_deref(), Some("node-c"));
    let direct: Value = serde_json::from_str(&direct.body).unwrap();
    let remote: Value = serde_json::from_str(&through_a.body).unwrap();
    assert_eq!(remote["choices"][0]["message"], direct["choices"][0]["message"]);
    assert_eq!(remote["usage"], direct["usage"]);

    let streamed = call(&a, "POST", "/v1/chat/completions", Some(chat(true))).await;
    assert_eq!(streamed.status, StatusCode::OK);
    assert_eq!(streamed_text(&streamed.body), remote["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(streamed.body.trim_end().ends_with("data: [DONE]"));

    let completion =
        call(&a, "POST", "/v1/completions", Some(json!({"model": "tiny", "prompt": "the", "max_tokens": 3})))
            .await;
    assert_eq!(completion.status, StatusCode::OK, "{}", completion.body);

    let embedded =
        call(&a, "POST", "/v1/embeddings", Some(json!({"model": "minilm", "input": ["a cat", "a dog"]})))
            .await;
    assert_eq!(embedded.status, StatusCode::OK, "{}", embedded.body);
    assert_eq!(embedded.served_by.as_deref(), Some("node-c"));
    let embedded: Value = serde_json::from_str(&embedded.body).unwrap();
    assert_eq!(embedded["data"][1]["embedding"].as_array().unwrap().len(), 384);

    // The host's errors come back as the same OpenAI errors a local call gives.
    let too_long =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000});
    let refused = call(&a, "POST", "/v1/chat/completions", Some(too_long)).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert!(refused.body.contains("max_tokens"), "{}", refused.body);

    // C leaves: A stops listing its models, and a request is a clear 503, not a hang.
    c.shutdown();
    c.join().await.unwrap();
    eventually("A forgets C's models", async || hosts_of(&a, "tiny").await.is_empty()).await;
    let nodes: Value = serde_json::from_str(&call(&a, "GET", "/api/nodes", None).await.body).unwrap();
    let c_entry = nodes["data"].as_array().unwrap().iter().find(|n| n["name"] == "node-c").cloned();
    assert_eq!(
        c_entry.map(|n| n["status"].clone()),
        Some(json!("offline")),
        "C is listed as offline for a while"
    );
    let gone = call(&a, "POST", "/v1/chat/completions", Some(chat(false))).await;
    assert_eq!(gone.status, StatusCode::SERVICE_UNAVAILABLE, "{}", gone.body);
    let unknown = call(
        &a,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "never-existed", "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cluster_key_is_kept_out() {
    let dir = tempfile::tempdir().unwrap();
    let c = hosting_node("node-c", &dir, Some("team-secret-for-tests")).await;
    let member = empty_node("member", &dir, c.p2p_addresses().to_vec(), Some("team-secret-for-tests")).await;
    let stranger =
        empty_node("stranger", &dir, c.p2p_addresses().to_vec(), Some("wrong-secret-for-tests")).await;

    eventually("the member sees C's models", async || hosts_of(&member, "tiny").await == ["node-c"]).await;
    // The stranger has dialed C several times by now (backing off from 1 s) and must have failed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(hosts_of(&stranger, "tiny").await.is_empty());
    assert!(stranger.router().connected_peers().await.is_empty());
    assert!(!c.router().connected_peers().await.contains(&stranger.router().node().peer_id));
    let refused = call(&stranger, "POST", "/v1/chat/completions", Some(chat(false))).await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND, "{}", refused.body);
    assert!(c.router().cluster_nodes().iter().all(|node| node.announcement.name != "stranger"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_is_reached_at_its_next_address_when_the_first_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let host = hosting_node("host", &dir, None).await;
    // A port that takes connections and never says a word (a stale VPN address behind a firewall
    // that drops packets), listed first. The handshake on it would wait 20 s before failing.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_address = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        mute.local_addr().unwrap().port(),
        host.router().node().peer_id
    );
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = mute.accept().await {
            held.push(socket);
        }
    });
    let peers = [vec![mute_address], host.p2p_addresses().to_vec()].concat();
    let entry = empty_node("entry", &dir, peers, None).await;
    eventually("the entry reaches the host at its live address", async || {
        hosts_of(&entry, "tiny").await == ["host"]
    })
    .await;
}
