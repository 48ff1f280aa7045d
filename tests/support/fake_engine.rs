//! A fake engine whose models answer with scripted events, and helpers to drive the real HTTP
//! router over it with `oneshot` (no socket).

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode, header};
use futures::FutureExt;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tower::ServiceExt;

use llmesh::api::{self, ApiConfig};
use llmesh::engine::{
    EmbedRequest, Embeddings, Engine, EngineError, FinishReason, GenerateRequest, GenerationEvent,
    GenerationStream, ModelInfo, ModelKind, Usage,
};

pub const CHAT_CONTEXT: usize = 2048;
pub const SCRIPTED_TEXT: [&str; 3] = ["Hello", ", ", "world"];
pub const SCRIPTED_USAGE: Usage = Usage { prompt_tokens: 7, completion_tokens: 3 };

/// Models, by id:
/// - `fake-chat`: answers [`SCRIPTED_TEXT`] then `Done(stop, SCRIPTED_USAGE)`;
/// - `fake-broken`: "partial", then an inference error;
/// - `fake-silent`: closes its stream without a result;
/// - `fake-endless`: sends text until the receiver is dropped, then reports on `cancelled`;
/// - `fake-busy`: its queue is always full;
/// - `fake-embed`: an embeddings model, vector `[index, 0.5, -1.25]` per input.
#[derive(Default)]
pub struct FakeEngine {
    pub last_generate: Mutex<Option<GenerateRequest>>,
    pub last_embed: Mutex<Option<EmbedRequest>>,
    pub cancelled: Mutex<Option<oneshot::Sender<()>>>,
}

pub fn model(id: &str, kind: ModelKind) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        kind,
        architecture: "fake".into(),
        quantization: "f32".into(),
        context_length: CHAT_CONTEXT,
        parameters: 0,
        file_bytes: 0,
        created: 1_700_000_000,
        hosts: Vec::new(),
    }
}

pub fn scripted(events: Vec<GenerationEvent>) -> GenerationStream {
    let (sender, receiver) = mpsc::channel(events.len().max(1));
    for event in events {
        sender.try_send(event).expect("the channel holds the whole script");
    }
    GenerationStream::new(receiver)
}

impl Engine for FakeEngine {
    fn models(&self) -> Vec<ModelInfo> {
        vec![model("fake-chat", ModelKind::Chat), model("fake-embed", ModelKind::Embeddings)]
    }

    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<GenerationStream, EngineError>> {
        *self.last_generate.lock().unwrap() = Some(request.clone());
        let text = |piece: &str| GenerationEvent::Text(piece.into());
        let result = match request.model.as_str() {
            "fake-chat" => {
                let mut events: Vec<_> = SCRIPTED_TEXT.iter().map(|piece| text(piece)).collect();
                events
                    .push(GenerationEvent::Done { finish_reason: FinishReason::Stop, usage: SCRIPTED_USAGE });
                Ok(scripted(events))
            }
            "fake-broken" => Ok(scripted(vec![
                text("partial"),
                GenerationEvent::Error(EngineError::Inference("secret gpu detail".into())),
            ])),
            "fake-silent" => Ok(scripted(vec![text("lost")])),
            "fake-endless" => {
                let (sender, receiver) = mpsc::channel(1);
                let cancelled = self.cancelled.lock().unwrap().take();
                tokio::spawn(async move {
                    while sender.send(GenerationEvent::Text("tick".into())).await.is_ok() {}
                    if let Some(cancelled) = cancelled {
                        let _ = cancelled.send(());
                    }
                });
                Ok(GenerationStream::new(receiver))
            }
            "fake-busy" => Err(EngineError::QueueFull(request.model)),
            "fake-embed" => Err(EngineError::WrongKind { model: request.model, operation: "chat".into() }),
            _ => Err(EngineError::UnknownModel(request.model)),
        };
        futures::future::ready(result).boxed()
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'static, Result<Embeddings, EngineError>> {
        *self.last_embed.lock().unwrap() = Some(request.clone());
        let result = match request.model.as_str() {
            "fake-embed" => Ok(Embeddings {
                vectors: (0..request.inputs.len()).map(embedding).collect(),
                prompt_tokens: 2 * request.inputs.len(),
                served_by: None,
            }),
            "fake-chat" => {
                Err(EngineError::WrongKind { model: request.model, operation: "embeddings".into() })
            }
            _ => Err(EngineError::UnknownModel(request.model)),
        };
        futures::future::ready(result).boxed()
    }
}

pub fn embedding(index: usize) -> Vec<f32> {
    vec![index as f32, 0.5, -1.25]
}

pub fn setup(config: ApiConfig) -> (Router, Arc<FakeEngine>) {
    let engine = Arc::new(FakeEngine::default());
    (api::app(engine.clone(), config), engine)
}

pub fn router() -> Router {
    setup(ApiConfig::default()).0
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Assert the OpenAI error shape and status; return the `error` object.
    pub fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "body: {}", String::from_utf8_lossy(&self.body));
        assert_eq!(self.headers[header::CONTENT_TYPE], "application/json");
        assert_openai_error(&self.json())
    }

    /// The payloads of the `data:` lines of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        assert_eq!(self.status, StatusCode::OK, "body: {}", String::from_utf8_lossy(&self.body));
        assert_eq!(self.headers[header::CONTENT_TYPE], "text/event-stream");
        let text = std::str::from_utf8(&self.body).expect("SSE is UTF-8");
        text.lines().filter_map(|line| line.strip_prefix("data: ")).map(str::to_owned).collect()
    }
}

pub fn assert_openai_error(body: &Value) -> Value {
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "message: {body}");
    assert!(error["type"].is_string(), "type: {body}");
    let detail = error.as_object().expect("error is an object");
    assert!(detail["param"].is_null() || detail["param"].is_string(), "param: {body}");
    assert!(detail["code"].is_null() || detail["code"].is_string(), "code: {body}");
    error.clone()
}

pub async fn send(app: Router, request: Request<Body>) -> Answer {
    let response = app.oneshot(request).await.expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("the body streams").to_bytes();
    Answer { status, headers, body }
}

pub fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri).header(header::CONTENT_TYPE, "application/json").body(body.into()).unwrap()
}

pub async fn post_json(app: Router, uri: &str, body: Value) -> Answer {
    send(app, post(uri, body.to_string())).await
}

pub fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]})
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}
