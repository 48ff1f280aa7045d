//! End to end on the real demo models (SmolLM2-135M-Instruct Q4_1 and all-MiniLM-L6-v2) through
//! the real HTTP router. The models come from `scripts/fetch-models.sh`; the README's test command
//! fetches them first. Set LLMESH_MODELS_DIR to look elsewhere than `models/`.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use llmesh::api::{self, ApiConfig};
use llmesh::engine::{
    IncrementalDecoder, LocalEngine, ModelSpec, QueueLimits, SharedEngine, tokenizer_from_gguf,
};
use serde_json::{Value, json};
use tower::ServiceExt;

const CHAT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const EMBEDDINGS_FOLDER: &str = "all-MiniLM-L6-v2";

fn models_dir() -> PathBuf {
    let dir = std::env::var_os("LLMESH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    assert!(
        dir.join(CHAT_FILE).is_file() && dir.join(EMBEDDINGS_FOLDER).is_dir(),
        "the demo models are missing from {}: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

/// One engine for every test in this file: loading is the slow part.
fn engine() -> SharedEngine {
    static ENGINE: OnceLock<SharedEngine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let dir = models_dir();
            let specs = [
                ModelSpec { id: "smollm2".into(), path: dir.join(CHAT_FILE) },
                ModelSpec { id: "minilm".into(), path: dir.join(EMBEDDINGS_FOLDER) },
            ];
            let engine = LocalEngine::load(&specs, QueueLimits::default(), &candle_core::Device::Cpu)
                .expect("load the demo models");
            Arc::new(engine)
        })
        .clone()
}

async fn post(path: &str, body: Value) -> (StatusCode, String) {
    post_to(engine(), path, body).await
}

async fn post_to(engine: SharedEngine, path: &str, body: Value) -> (StatusCode, String) {
    let app = api::app(engine, ApiConfig::default());
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

fn capital_of_france(stream: bool) -> Value {
    json!({
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}
        ],
        "temperature": 0,
        "max_tokens": 40,
        "stream": stream,
    })
}

#[tokio::test]
async fn greedy_chat_knows_the_capital_of_france() {
    let (status, body) = post("/v1/chat/completions", capital_of_france(false)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "answer: {content:?}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
}

#[tokio::test]
async fn streaming_gives_the_same_greedy_text() {
    let (_, plain) = post("/v1/chat/completions", capital_of_france(false)).await;
    let plain: Value = serde_json::from_str(&plain).unwrap();
    let (status, streamed) = post("/v1/chat/completions", capital_of_france(true)).await;
    assert_eq!(status, StatusCode::OK);
    let mut text = String::new();
    let mut chunks = 0;
    for line in streamed.lines().filter_map(|line| line.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
            chunks += 1;
        }
    }
    assert_eq!(text, plain["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(chunks > 3, "the answer should arrive in many chunks, got {chunks}");
}

#[tokio::test]
async fn chats_batched_together_answer_as_each_does_alone() {
    // Its own engine without a prompt cache, so the batched run prefills as the lone runs did.
    let limits = QueueLimits { prompt_cache_tokens: 0, ..QueueLimits::default() };
    let spec = ModelSpec { id: "smollm2".into(), path: models_dir().join(CHAT_FILE) };
    let engine: SharedEngine =
        Arc::new(LocalEngine::load(&[spec], limits, &candle_core::Device::Cpu).expect("load SmolLM2"));
    let questions = ["What is the capital of France?", "Name three colours.", "Count from one to five."];
    let ask = |question: &str| {
        let body = json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 24,
        });
        let engine = engine.clone();
        async move {
            let (status, body) = post_to(engine, "/v1/chat/completions", body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            body["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        }
    };
    let mut alone = Vec::new();
    for question in questions {
        alone.push(ask(question).await);
    }
    let together = futures::future::join_all(questions.map(ask)).await;
    assert_eq!(together, alone);
    assert!(alone[0] != alone[1] && alone[1] != alone[2], "three different answers: {alone:?}");
}

#[tokio::test]
async fn embeddings_rank_a_paraphrase_above_an_unrelated_sentence() {
    let (status, body) = post(
        "/v1/embeddings",
        json!({
            "model": "minilm",
            "input": [
                "The cat is sleeping on the sofa.",
                "A cat naps on the couch.",
                "Quarterly revenue grew by eight percent."
            ]
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let vectors: Vec<Vec<f64>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect();
    assert_eq!(vectors.len(), 3);
    assert_eq!(vectors[0].len(), 384);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert!((dot(&vectors[0], &vectors[0]) - 1.0).abs() < 1e-3, "vectors are L2-normalised");
    let paraphrase = dot(&vectors[0], &vectors[1]);
    let unrelated = dot(&vectors[0], &vectors[2]);
    assert!(paraphrase > unrelated + 0.2, "paraphrase {paraphrase:.3} vs unrelated {unrelated:.3}");
}

#[tokio::test]
async fn one_input_embeds_the_same_alone_and_in_a_batch() {
    let single =
        post("/v1/embeddings", json!({"model": "minilm", "input": "A cat naps on the couch."})).await;
    let batch = post(
        "/v1/embeddings",
        json!({"model": "minilm", "input": ["A much longer sentence that forces padding of the other one.", "A cat naps on the couch."]}),
    )
    .await;
    let single: Value = serde_json::from_str(&single.1).unwrap();
    let batch: Value = serde_json::from_str(&batch.1).unwrap();
    let a = single["data"][0]["embedding"].as_array().unwrap();
    let b = batch["data"][1]["embedding"].as_array().unwrap();
    let max_difference =
        a.iter().zip(b).map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs()).fold(0.0, f64::max);
    assert!(max_difference < 1e-4, "padding changed the vector by {max_difference}");
}

#[tokio::test]
async fn legacy_completions_continue_a_prompt() {
    let (status, body) = post(
        "/v1/completions",
        json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(!body["choices"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(body["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn chat_on_an_embeddings_model_is_a_clear_400() {
    let (status, body) = post(
        "/v1/chat/completions",
        json!({"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("minilm"), "{body}");
}

#[test]
fn incremental_decoding_round_trips_multibyte_text() {
    let path = models_dir().join(CHAT_FILE);
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let tokenizer = Arc::new(tokenizer_from_gguf(&content).unwrap().tokenizer);
    let text = "Café – 日本語 🙂\n\tdouble  space";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let mut decoder = IncrementalDecoder::new(tokenizer);
    let mut decoded = String::new();
    for id in ids {
        if let Some(piece) = decoder.push(id) {
            assert!(!piece.contains('\u{FFFD}'), "half a character was emitted: {piece:?}");
            decoded.push_str(&piece);
        }
    }
    assert_eq!(decoded, text);
}
