//! Membership by peer id, in one process on loopback: holding the overlay's pre-shared key (which
//! every connection key carries) is not enough to be part of a cluster with a secret. A stranger
//! with the key but a fresh identity is dropped, its announcements ignored and its requests
//! refused; nodes admitted by a key and nodes founded with the secret know each other.

mod support;

use std::sync::Arc;
use std::time::Duration;

use llmesh::engine::{
    GenerateRequest, GenerationEvent, LocalEngine, ModelSpec, Prompt, QueueLimits, SamplingParams,
};
use llmesh::node::Node;
use llmesh::p2p::{self, Announcement, P2pHandle};
use llmesh::router::{Strategy, forward_generate};
use support::cluster::{call, config, eventually, hosts_of};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "team-secret-for-tests";

/// A node hosting the tiny model in the cluster of `SECRET`, dialing `peers`.
async fn private_host(name: &str, dir: &tempfile::TempDir, peers: Vec<String>) -> Node {
    let path = dir.path().join(format!("{name}.gguf"));
    support::tiny_model::write_tiny_llama(&path);
    let spec = ModelSpec { id: "tiny".into(), path };
    let engine = LocalEngine::load(&[spec], QueueLimits::default(), &candle_core::Device::Cpu).unwrap();
    Node::spawn_with_engine(config(name, dir, peers, Some(SECRET)), Arc::new(engine)).await.unwrap()
}

/// A bare overlay peer holding what a connection key carries (the pre-shared key and the
/// inviter's addresses) under a fresh identity: what someone who kept an old key can run.
async fn bare_peer(dir: &tempfile::TempDir, name: &str, key: &str, stop: &CancellationToken) -> P2pHandle {
    let config = support::overlay::key_holder_config(dir.path(), name, key);
    let (handle, _events, _inbound) = p2p::spawn(config, stop.clone()).await.unwrap();
    handle
}

fn announcement(p2p: &P2pHandle, name: &str, model: &str) -> Announcement {
    support::overlay::announcement(p2p.peer_id(), name, model, support::overlay::now_ms())
}

/// Ask `host` for three tokens directly over the overlay; the text, or why not.
async fn generate_on(p2p: &P2pHandle, host: &Node) -> Result<String, String> {
    let request = GenerateRequest {
        model: "tiny".into(),
        prompt: Prompt::Text("hello".into()),
        params: SamplingParams { max_tokens: 3, ..SamplingParams::default() },
    };
    let peer_id = &host.router().node().peer_id;
    let mut stream = forward_generate(p2p, peer_id, "host", request).await.map_err(|e| e.to_string())?;
    let mut text = String::new();
    while let Some(event) = stream.recv().await {
        match event {
            GenerationEvent::Text(piece) => text.push_str(&piece),
            GenerationEvent::Logprobs(_) => {}
            GenerationEvent::Done { .. } => return Ok(text),
            GenerationEvent::Error(error) => return Err(error.to_string()),
        }
    }
    Err("the stream ended early".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overlay_key_without_an_admission_gets_a_stranger_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let inviter = private_host("inviter", &dir, Vec::new()).await;
    let (key, _) = inviter.router().invite(1, Duration::from_secs(3600)).await.unwrap();

    // The control: a peer that redeems the key is served and listed.
    let member = bare_peer(&dir, "member", &key, &stop).await;
    member.join(&key).await.expect("redeem the key");
    member.announce(announcement(&member, "member", "member-model")).await.unwrap();
    eventually("the inviter lists the member's model", async || {
        hosts_of(&inviter, "member-model").await == ["member"]
    })
    .await;
    generate_on(&member, &inviter).await.expect("a member is served");

    // The same key material under a fresh identity, without redeeming anything.
    let stranger = bare_peer(&dir, "stranger", &key, &stop).await;
    let inviter_peer = inviter.router().node().peer_id.clone();
    eventually("the stranger passes the transport's handshake", async || {
        stranger.connected_peers().await.unwrap().contains(&inviter_peer)
    })
    .await;
    stranger.announce(announcement(&stranger, "stranger", "stolen-model")).await.unwrap();
    let refused = generate_on(&stranger, &inviter).await.expect_err("a stranger is not served");
    assert!(refused.contains("failed before answering"), "{refused}");

    // After its grace it is dropped, and what it announced was never taken in.
    eventually("the inviter drops the stranger", async || {
        !stranger.connected_peers().await.unwrap().contains(&inviter_peer)
    })
    .await;
    assert!(hosts_of(&inviter, "stolen-model").await.is_empty());
    let nodes = call(&inviter, "GET", "/api/nodes", None).await.body;
    assert!(!nodes.contains(&stranger.peer_id()), "{nodes}");
    assert!(nodes.contains(&member.peer_id()), "{nodes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn founders_and_invited_members_know_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let inviter = private_host("inviter", &dir, Vec::new()).await;
    let (key, _) = inviter.router().invite(1, Duration::from_secs(3600)).await.unwrap();
    let mut joining = config("laptop", &dir, Vec::new(), None);
    joining.join = Some(key);
    joining.routing.strategy = Strategy::RoundRobin;
    let engine = LocalEngine::load(&[], QueueLimits::default(), &candle_core::Device::Cpu).unwrap();
    let laptop = Node::spawn_with_engine(joining, Arc::new(engine)).await.unwrap();

    // A founder that arrives later knows only the secret and the inviter's address. The laptop
    // cannot check its proof (it holds no secret) and learns of it through the inviter.
    let founder = private_host("founder", &dir, inviter.p2p_addresses().to_vec()).await;
    eventually("the laptop reaches both hosts", async || {
        let mut hosts = hosts_of(&laptop, "tiny").await;
        hosts.sort();
        hosts == ["founder", "inviter"]
    })
    .await;
    let laptop_peer = laptop.router().node().peer_id.clone();
    eventually("the founder knows the laptop", async || {
        founder.router().cluster_nodes().iter().any(|node| node.announcement.peer_id == laptop_peer)
    })
    .await;
    // Round robin sends one of two requests to each host: both serve the laptop.
    let mut served_by = Vec::new();
    for _ in 0..2 {
        let chat = serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3});
        let answer = call(&laptop, "POST", "/v1/chat/completions", Some(chat)).await;
        assert_eq!(answer.status, axum::http::StatusCode::OK, "{}", answer.body);
        served_by.push(answer.served_by.unwrap());
    }
    served_by.sort();
    assert_eq!(served_by, ["founder", "inviter"]);
}
