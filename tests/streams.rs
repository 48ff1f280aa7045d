//! Inference streams between two bare overlay peers on loopback: a burst of streams that arrives
//! while the host is busy waits to be served instead of being reset unread, a request whose
//! stream a connected host reset unread is sent again, and a host that falls silent mid-answer is
//! given up while one that keeps saying it is working is waited for (a real node's serving code
//! says so while its engine works).

mod support;

use std::time::Duration;

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use llmesh::engine::{
    EmbedRequest, Embeddings, Engine, EngineError, GenerateRequest, GenerationEvent, GenerationStream,
    ModelInfo, ModelKind, Prompt, SamplingParams,
};
use llmesh::node::Node;
use llmesh::p2p::wire::{read_frame, write_frame};
use llmesh::p2p::{self, InboundStreams, P2pHandle};
use llmesh::router::{InferReply, InferRequest, forward_embed, forward_generate};
use tokio_util::sync::CancellationToken;

async fn peer(dir: &tempfile::TempDir, name: &str, peers: Vec<String>) -> (P2pHandle, InboundStreams) {
    let config = support::overlay::bare_peer_config(dir.path(), name, None, peers);
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
    wait_until_connected(&entry, &host.peer_id()).await;
    (host, inbound, entry)
}

async fn wait_until_connected(entry: &P2pHandle, host: &str) {
    for _ in 0..100 {
        if entry.connected_peers().await.unwrap().iter().any(|peer| peer == host) {
            return;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_falls_silent_mid_answer_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let (host, mut inbound, entry) = host_and_entry(&dir).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (_, mut stream) = inbound.next().await.unwrap();
        let _request: InferRequest = read_frame(&mut stream).await.unwrap().unwrap();
        write_frame(&mut stream, &InferReply::Accepted).await.unwrap();
        let first = InferReply::Event(GenerationEvent::Text("Once".into()));
        write_frame(&mut stream, &first).await.unwrap();
        // Then nothing, with the stream and its connection left open: a host whose cable was
        // pulled, or a stream whose connection was closed under it.
        let _ = stopped.await;
    });
    let request = GenerateRequest {
        model: "m".into(),
        prompt: Prompt::Text("tell me".into()),
        params: SamplingParams { max_tokens: 10, ..SamplingParams::default() },
    };
    let mut answer = forward_generate(&entry, &host.peer_id(), "host", request).await.unwrap();
    assert_eq!(answer.recv().await, Some(GenerationEvent::Text("Once".into())));
    let next = tokio::time::timeout(Duration::from_secs(60), answer.recv()).await.expect("still waiting");
    let Some(GenerationEvent::Error(EngineError::Unavailable(reason))) = next else {
        panic!("a silent host was not given up")
    };
    assert!(reason.contains("went away in the middle of the answer: nothing moved for"), "{reason}");
    drop(stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_keeps_saying_it_is_working_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let (host, mut inbound, entry) = host_and_entry(&dir).await;
    tokio::spawn(async move {
        let (_, mut stream) = inbound.next().await.unwrap();
        let Some(InferRequest::Embed(request)) = read_frame(&mut stream).await.unwrap() else {
            panic!("not an embedding request")
        };
        // Longer than an entry node waits without a word, with a word every second.
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            write_frame(&mut stream, &InferReply::Working).await.unwrap();
        }
        let vectors = vec![vec![7.0]; request.inputs.len()];
        let embeddings = Embeddings { vectors, prompt_tokens: 1, served_by: None };
        write_frame(&mut stream, &InferReply::Embeddings(embeddings)).await.unwrap();
    });
    let embeddings = forward_embed(&entry, &host.peer_id(), "host", embed_request("slow")).await.unwrap();
    assert_eq!(embeddings.vectors, vec![vec![7.0]]);
}

/// An embeddings model that takes longer than an entry node waits without a word.
struct SlowEngine;

impl Engine for SlowEngine {
    fn models(&self) -> Vec<ModelInfo> {
        let mut model = support::fake_engine::model("slow", ModelKind::Embeddings);
        model.architecture = "slow".into();
        vec![model]
    }

    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<GenerationStream, EngineError>> {
        async move { Err(EngineError::UnknownModel(request.model)) }.boxed()
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'static, Result<Embeddings, EngineError>> {
        async move {
            tokio::time::sleep(Duration::from_secs(12)).await;
            Ok(Embeddings {
                vectors: vec![vec![0.5]; request.inputs.len()],
                prompt_tokens: 1,
                served_by: None,
            })
        }
        .boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_says_it_is_working_while_its_engine_takes_long() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::cluster::config("host", &dir, Vec::new(), None);
    let host = Node::spawn_with_engine(config, Arc::new(SlowEngine)).await.unwrap();
    let (entry, _) = peer(&dir, "entry", host.p2p_addresses().to_vec()).await;
    let host_id = host.router().node().peer_id.clone();
    wait_until_connected(&entry, &host_id).await;
    let request = EmbedRequest { model: "slow".into(), inputs: vec!["a".into()] };
    let embeddings = forward_embed(&entry, &host_id, "host", request).await.unwrap();
    assert_eq!(embeddings.vectors, vec![vec![0.5]]);
}
