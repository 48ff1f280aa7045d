//! A member that abuses `/llmesh/infer/3`: a request nested deep enough to overflow a decoder's
//! stack, sent to a free host and to a busy one; frames over the size limit; garbage; a flood of
//! streams; requests over the limits an HTTP request meets. The host closes what does not
//! decode, answers what breaks a limit with an error without handing it to its engine, and serves
//! a normal request afterwards.

use std::sync::Arc;
use std::time::Duration;

use futures::AsyncWriteExt;
use futures::future::join_all;
use llmesh::engine::{EmbedRequest, EngineError, GenerateRequest, GenerationEvent, Prompt, SamplingParams};
use llmesh::node::Node;
use llmesh::p2p::wire::{MAX_FRAME_BYTES, read_frame, write_frame};
use llmesh::p2p::{self, P2pHandle, P2pStream};
use llmesh::router::{InferReply, InferRequest, forward_embed, forward_generate};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::support::cluster::{config, eventually};
use crate::support::fake_engine::{FakeEngine, SCRIPTED_TEXT};

const SECRET: &str = "hostile-wire-secret";
/// Inbound requests a host serves at once (`router::remote`); one more is refused as busy.
const HOST_SLOTS: usize = 256;

/// A node over a fake engine, and a bare overlay peer it admitted with a connection key: a
/// member, free to open inference streams and write whatever it likes on them.
struct Hostile {
    node: Node,
    engine: Arc<FakeEngine>,
    member: P2pHandle,
    host: String,
    _stop: DropGuard,
    _dir: tempfile::TempDir,
}

async fn node_and_member() -> Hostile {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    let node = Node::spawn_with_engine(config("host", &dir, Vec::new(), Some(SECRET)), engine.clone())
        .await
        .unwrap();
    let (key, _) = node.router().invite(1, Duration::from_secs(3600)).await.unwrap();
    let stop = CancellationToken::new();
    let peer = crate::support::overlay::key_holder_config(dir.path(), "member", &key);
    let (member, _events, _inbound) = p2p::spawn(peer, stop.clone()).await.unwrap();
    member.join(&key).await.expect("redeem the key");
    let host = node.router().node().peer_id.clone();
    let hostile = Hostile { node, engine, member, host, _stop: stop.drop_guard(), _dir: dir };
    hostile.still_serving().await;
    hostile
}

impl Hostile {
    /// Wait until a normal request from the member is answered in full, for at most 20 s.
    async fn still_serving(&self) {
        eventually("the host serves the member", async || self.generate("fake-chat").await.is_ok()).await;
        let health = crate::support::cluster::call(&self.node, "GET", "/health", None).await;
        assert_eq!(health.status, axum::http::StatusCode::OK);
    }

    /// The text of a three-token generation on the host, or its error.
    async fn generate(&self, model: &str) -> Result<String, EngineError> {
        let request = GenerateRequest {
            model: model.into(),
            prompt: Prompt::Text("hello".into()),
            params: SamplingParams { max_tokens: 3, ..SamplingParams::default() },
        };
        let mut stream = forward_generate(&self.member, &self.host, "host", request).await?;
        let mut text = String::new();
        while let Some(event) = stream.recv().await {
            match event {
                GenerationEvent::Text(piece) => text.push_str(&piece),
                GenerationEvent::Logprobs(_) => {}
                GenerationEvent::Done { .. } => {
                    assert_eq!(text, SCRIPTED_TEXT.concat());
                    return Ok(text);
                }
                GenerationEvent::Error(error) => return Err(error),
            }
        }
        Err(EngineError::Unavailable("the answer ended early".into()))
    }

    async fn open(&self) -> P2pStream {
        self.member.open_stream(&self.host).await.expect("open an inference stream")
    }

    /// A stream the host has been offered (the protocol's name goes out with the first flush)
    /// and on which nothing is said.
    async fn open_silent(&self) -> P2pStream {
        let mut stream = self.open().await;
        stream.flush().await.expect("offer the stream");
        stream
    }

    /// Write `bytes` as they are on a new stream and return what the host answers, if anything.
    async fn send_raw(&self, bytes: &[u8]) -> Option<InferReply> {
        let mut stream = self.open().await;
        // The host may close the stream before it has everything (a length over the limit).
        // Closing the writing half tells it nothing more is coming (a frame cut short).
        let _ = stream.write_all(bytes).await;
        let _ = stream.close().await;
        answer(&mut stream).await
    }
}

/// The host's reply on `stream`; `None` once it closed or reset the stream without one.
async fn answer(stream: &mut P2pStream) -> Option<InferReply> {
    let read = tokio::time::timeout(Duration::from_secs(30), read_frame::<_, InferReply>(stream));
    read.await.expect("the host neither answered nor closed the stream").ok().flatten()
}

fn framed(bytes: &[u8]) -> Vec<u8> {
    [&u32::try_from(bytes.len()).unwrap().to_be_bytes()[..], bytes].concat()
}

/// A generation request framed for the wire whose prompt is `depth` continuations nested around
/// `Text("x")`, in bincode written by hand: bincode has no depth limit of its own, so whether
/// this decodes is up to the types.
async fn nested_continuations(depth: usize) -> Vec<u8> {
    let plain = InferRequest::Generate(Box::new(GenerateRequest {
        model: "fake-chat".into(),
        prompt: Prompt::Text("x".into()),
        params: SamplingParams::default(),
    }));
    let mut frame = futures::io::Cursor::new(Vec::new());
    write_frame(&mut frame, &plain).await.unwrap();
    let plain = &frame.get_ref()[4..];
    // Generate (variant 0), the model (length 9, "fake-chat"), then Text (variant 1, "x").
    let (head, rest) = plain.split_at(11);
    let (text, params) = rest.split_at(3);
    assert_eq!((head[0], head[1], text), (0, 9, &[1, 1, b'x'][..]));
    // Continue is variant 2: its prompt first, then what was generated (empty here).
    framed(&[head, &vec![2; depth], text, &vec![0; depth], params].concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_dropped_and_the_host_keeps_serving() {
    let hostile = node_and_member().await;
    let nested = nested_continuations(100_000).await;
    assert!(nested.len() < 256 * 1024, "one small frame: {} bytes", nested.len());
    let over_limit = u32::try_from(MAX_FRAME_BYTES + 1).unwrap().to_be_bytes();
    let attacks: [(&str, Vec<u8>); 6] = [
        ("nested continuations", nested),
        ("a length over the limit", over_limit.to_vec()),
        ("the largest length there is", u32::MAX.to_be_bytes().to_vec()),
        ("garbage in a frame", framed(&[0xff; 1000])),
        ("a frame cut short", framed(&[0; 64])[..40].to_vec()),
        ("no frame at all", b"GET / HTTP/1.1\r\nHost: llmesh\r\n\r\n".to_vec()),
    ];
    for (attack, bytes) in attacks {
        let reply = hostile.send_raw(&bytes).await;
        assert!(reply.is_none(), "{attack}: answered {reply:?}");
    }
    hostile.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_streams_and_a_nested_frame_to_the_busy_host_leave_it_serving() {
    let hostile = node_and_member().await;
    // Streams that never say anything hold every place the host has for requests. (A few more
    // than there are places: of streams that arrive in the same instant, some are reset unread.)
    // A silent stream holds its place for 10 s at most, so on a slow machine the places may free
    // up before the probe: each try opens a fresh set just before it.
    let silent = std::sync::Mutex::new(Vec::new());
    eventually("the host refuses more as busy", async || {
        let fresh = join_all((0..HOST_SLOTS + 32).map(|_| hostile.open_silent())).await;
        silent.lock().unwrap().extend(fresh);
        matches!(hostile.generate("fake-chat").await, Err(EngineError::QueueFull(_)))
    })
    .await;
    // A busy host still reads a request, to refuse it by name: that read must hold too.
    let reply = hostile.send_raw(&nested_continuations(100_000).await).await;
    assert!(reply.is_none(), "answered {reply:?}");
    drop(silent);
    // And streams opened and dropped at once, many at a time.
    for _ in 0..4 {
        drop(join_all((0..100).map(|_| hostile.open_silent())).await);
    }
    hostile.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_limits_get_an_error_and_never_reach_the_engine() {
    let hostile = node_and_member().await;
    *hostile.engine.last_generate.lock().unwrap() = None;
    // A million empty texts fit in one frame; the API would take at most 2048 non-empty ones.
    let embed = EmbedRequest { model: "fake-embed".into(), inputs: vec![String::new(); 1_000_000] };
    let refused = forward_embed(&hostile.member, &hostile.host, "host", embed).await;
    assert!(matches!(refused, Err(EngineError::InvalidRequest(ref m)) if m.contains("input")), "{refused:?}");
    let stops = SamplingParams { stop: vec!["x".into(); 10_000], ..SamplingParams::default() };
    let nan = SamplingParams { temperature: f32::NAN, ..SamplingParams::default() };
    let prompts = [
        (Prompt::Text("hi".into()), stops),
        (Prompt::Text("hi".into()), nan),
        (Prompt::Chat(Vec::new()), SamplingParams::default()),
    ];
    for (prompt, params) in prompts {
        let request = GenerateRequest { model: "fake-chat".into(), prompt, params };
        let refused = forward_generate(&hostile.member, &hostile.host, "host", request).await;
        assert!(matches!(refused, Err(EngineError::InvalidRequest(_))), "{:?}", refused.map(|_| ()));
    }
    assert!(hostile.engine.last_embed.lock().unwrap().is_none(), "an embedding reached the engine");
    assert!(hostile.engine.last_generate.lock().unwrap().is_none(), "a generation reached the engine");
    hostile.still_serving().await;
}
