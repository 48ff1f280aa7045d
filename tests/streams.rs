//! Inference streams between two bare overlay peers on loopback: a burst of streams that arrives
//! while the host is busy waits to be served instead of being reset unread, and a request whose
//! stream a connected host reset unread is sent again.

use std::time::Duration;

use llmesh::engine::{EmbedRequest, Embeddings};
use llmesh::p2p::wire::{read_frame, write_frame};
use llmesh::p2p::{self, InboundStreams, P2pConfig, P2pHandle};
use llmesh::router::{InferReply, InferRequest, forward_embed};
use tokio_util::sync::CancellationToken;

async fn peer(dir: &tempfile::TempDir, name: &str, peers: Vec<String>) -> (P2pHandle, InboundStreams) {
    let config = P2pConfig {
        data_dir: dir.path().join(name),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        peers,
        mdns: false,
        relay: false,
        cluster_psk: None,
        admission_key: None,
        fixed_cluster: false,
        external_addresses: Vec::new(),
    };
    let (handle, _events, inbound) = p2p::spawn(config, CancellationToken::new()).await.unwrap();
    (handle, inbound)
}

/// A host and an entry peer connected to it.
async fn host_and_entry(dir: &tempfile::TempDir) -> (P2pHandle, InboundStreams, P2pHandle) {
    let (host, inbound) = peer(dir, "host", Vec::new()).await;
    let host_addresses = loop {
        let addresses = host.listen_addresses().await.unwrap();
        if !addresses.is_empty() {
            break addresses;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (entry, _) = peer(dir, "entry", host_addresses).await;
    for _ in 0..100 {
        if entry.connected_peers().await.unwrap().contains(&host.peer_id()) {
            return (host, inbound, entry);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the entry peer never connected to the host");
}

/// Answer one embedding request on `stream` with a vector per input holding the input's length.
async fn answer_embedding(mut stream: p2p::P2pStream) {
    let Some(InferRequest::Embed(request)) = read_frame(&mut stream).await.unwrap() else {
        panic!("not an embedding request")
    };
    let vectors = request.inputs.iter().map(|input| vec![input.len() as f32]).collect();
    let embeddings = Embeddings { vectors, prompt_tokens: 1, served_by: None };
    write_frame(&mut stream, &InferReply::Embeddings(embeddings)).await.unwrap();
}

fn embed_request(input: &str) -> EmbedRequest {
    EmbedRequest { model: "m".into(), inputs: vec![input.to_string()] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_waits_for_a_busy_host() {
    const BURST: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let (host, mut inbound, entry) = host_and_entry(&dir).await;

    // Every request is sent while the host is not taking streams.
    let requests: Vec<_> = (0..BURST)
        .map(|i| {
            let (entry, host) = (entry.clone(), host.peer_id());
            tokio::spawn(
                async move { forward_embed(&entry, &host, "host", embed_request(&"x".repeat(i))).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let serving = tokio::spawn(async move {
        while let Some((_, stream)) = inbound.next().await {
            tokio::spawn(answer_embedding(stream));
        }
    });
    for (i, request) in requests.into_iter().enumerate() {
        let answer = tokio::time::timeout(Duration::from_secs(20), request).await.unwrap().unwrap();
        assert_eq!(answer.map(|embeddings| embeddings.vectors), Ok(vec![vec![i as f32]]), "request {i}");
    }
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_reset_unread_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let (host, mut inbound, entry) = host_and_entry(&dir).await;
    let answering = tokio::spawn(async move {
        // The first stream is dropped unread, as a host with no room to accept it does.
        drop(inbound.next().await.unwrap());
        let (_, mut stream) = inbound.next().await.unwrap();
        let Some(InferRequest::Embed(request)) = read_frame(&mut stream).await.unwrap() else {
            panic!("not an embedding request")
        };
        let embeddings =
            Embeddings { vectors: vec![vec![1.0]; request.inputs.len()], prompt_tokens: 2, served_by: None };
        write_frame(&mut stream, &InferReply::Embeddings(embeddings)).await.unwrap();
        inbound
    });
    let request = EmbedRequest { model: "m".into(), inputs: vec!["a".into(), "b".into()] };
    let embeddings = forward_embed(&entry, &host.peer_id(), "host", request).await.unwrap();
    assert_eq!(embeddings.vectors, vec![vec![1.0], vec![1.0]]);
    assert_eq!(embeddings.served_by.as_deref(), Some("host"));

    // A host that resets every stream is given up on, with the reason.
    let mut inbound = answering.await.unwrap();
    tokio::spawn(async move {
        while let Some(stream) = inbound.next().await {
            drop(stream);
        }
    });
    let error = forward_embed(&entry, &host.peer_id(), "host", embed_request("a")).await.unwrap_err();
    assert!(error.to_string().contains("host host failed before answering"), "{error}");
}
