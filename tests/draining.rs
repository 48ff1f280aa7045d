//! A node that drains (SIGTERM, `llmesh drain`, `POST /api/drain`): it answers `/health` with 503
//! at once, the cluster sees it draining and routes around it, the answers it runs finish, then it
//! stops; past its timeout it stops anyway.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use llmesh::engine::{Engine, GenerateRequest, GenerationEvent, Prompt, QueueLimits, SamplingParams};
use serde_json::{Value, json};
use support::cluster::{call, eventually, tiny_host};

fn long_generation() -> GenerateRequest {
    GenerateRequest {
        model: "tiny".into(),
        prompt: Prompt::Text("once upon a time".into()),
        params: SamplingParams { max_tokens: 200, ignore_eos: true, ..SamplingParams::default() },
    }
}

fn chat() -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_is_routed_around_and_finishes_its_answers_before_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (a, engine_a) = tiny_host("a", &dir, Vec::new(), QueueLimits::default()).await;
    let (b, _) = tiny_host("b", &dir, a.p2p_addresses().to_vec(), QueueLimits::default()).await;
    eventually("b sees a", async || {
        let nodes: Value = serde_json::from_str(&call(&b, "GET", "/api/nodes", None).await.body).unwrap();
        nodes["data"].as_array().unwrap().iter().any(|node| node["name"] == "a" && node["status"] == "online")
    })
    .await;

    // An answer running on a, left unread so that it is still running when a drains.
    let mut running = engine_a.generate(long_generation()).await.unwrap();
    assert!(matches!(running.recv().await, Some(GenerationEvent::Text(_))));

    let drain = call(&a, "POST", "/api/drain", Some(json!({}))).await;
    assert_eq!(drain.status, StatusCode::ACCEPTED, "{}", drain.body);
    let health = call(&a, "GET", "/health", None).await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(serde_json::from_str::<Value>(&health.body).unwrap(), json!({"status": "draining"}));
    let again = call(&a, "POST", "/api/drain", Some(json!({}))).await;
    assert_eq!(serde_json::from_str::<Value>(&again.body).unwrap()["started"], false);

    eventually("b sees a draining", async || {
        let nodes: Value = serde_json::from_str(&call(&b, "GET", "/api/nodes", None).await.body).unwrap();
        nodes["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|node| node["name"] == "a" && node["status"] == "draining")
    })
    .await;
    // New work goes to b, whichever node it arrives at.
    for entry in [&a, &b, &b, &b] {
        let answer = call(entry, "POST", "/v1/chat/completions", Some(chat())).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.served_by.as_deref(), Some("b"));
    }

    let drained = tokio::spawn(a.drain(Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!drained.is_finished(), "a stopped with an answer still running");
    let mut finished = false;
    while let Some(event) = running.recv().await {
        match event {
            GenerationEvent::Done { usage, .. } => {
                assert_eq!(usage.completion_tokens, 200);
                finished = true;
            }
            GenerationEvent::Error(error) => panic!("the answer broke off: {error}"),
            _ => {}
        }
    }
    assert!(finished, "the answer ended without Done");
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("a stops once drained")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_stops_at_its_timeout_when_an_answer_does_not_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (a, engine_a) = tiny_host("a", &dir, Vec::new(), QueueLimits::default()).await;
    // Never read past the first event: the generation waits on its reader for good.
    let mut stuck = engine_a.generate(long_generation()).await.unwrap();
    assert!(matches!(stuck.recv().await, Some(GenerationEvent::Text(_))));
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), a.drain(Duration::from_millis(500)))
        .await
        .expect("the drain gives up at its timeout")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
    drop(stuck);
}
