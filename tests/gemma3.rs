//! The second architecture end to end: gemma-3-270m (Q4_K_M, a base model without a chat
//! template) continues a simple sequence greedily, through llmesh's decoder (GELU, sliding-window
//! layers, per-head norms; its Q5_0, Q8_0, Q4_K and Q6_K layers all on llmesh's kernels). Its own test
//! binary, as it loads a second model. Needs `LLMESH_FETCH_GEMMA=1 scripts/fetch-models.sh` (the
//! test script does it). It also shows constrained decoding on a SentencePiece vocabulary.

use std::path::PathBuf;

use llmesh::engine::{
    Engine, FinishReason, GenerateRequest, GenerationEvent, LocalEngine, ModelKind, ModelSpec, Prompt,
    QueueLimits, ResponseFormat, SamplingParams,
};

fn load_gemma() -> LocalEngine {
    let dir = std::env::var_os("LLMESH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let path = dir.join("gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run LLMESH_FETCH_GEMMA=1 scripts/fetch-models.sh",
        path.display()
    );
    let spec = ModelSpec { id: "gemma".into(), path };
    LocalEngine::load(&[spec], QueueLimits::default(), &candle_core::Device::Cpu).unwrap()
}

/// The whole answer and why it ended.
async fn generate(engine: &LocalEngine, prompt: &str, params: SamplingParams) -> (String, FinishReason) {
    let request = GenerateRequest { model: "gemma".into(), prompt: Prompt::Text(prompt.into()), params };
    let mut stream = engine.generate(request).await.unwrap();
    let mut text = String::new();
    loop {
        match stream.recv().await.expect("a Done event") {
            GenerationEvent::Text(piece) => text.push_str(&piece),
            GenerationEvent::Logprobs(_) => {}
            GenerationEvent::Done { finish_reason, .. } => return (text, finish_reason),
            GenerationEvent::Error(error) => panic!("{error}"),
        }
    }
}

#[tokio::test]
async fn gemma3_continues_a_counting_sequence() {
    let engine = load_gemma();
    let info = &engine.models()[0];
    assert_eq!(
        (info.kind, info.architecture.as_str(), info.quantization.as_str()),
        (ModelKind::Chat, "gemma3", "Q4_K_M")
    );

    let params = SamplingParams { temperature: 0.0, max_tokens: 8, ..SamplingParams::default() };
    let (text, finish) = generate(&engine, "1, 2, 3, 4, 5,", params).await;
    assert!(text.starts_with(" 6, 7"), "continuation: {text:?}");
    assert_eq!(finish, FinishReason::Length);
}

/// The grammar's view of a SentencePiece vocabulary (`▁` for spaces, `<0xNN>` byte tokens, 262k
/// tokens): a JSON Schema answer parses and holds to its schema, greedy and sampled.
#[tokio::test]
async fn gemma3_answers_follow_a_json_schema() {
    let engine = load_gemma();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "minItems": 1, "maxItems": 3}
        },
        "required": ["name", "age", "role", "tags"],
        "additionalProperties": false
    });
    for temperature in [0.0, 1.0] {
        let params = SamplingParams {
            temperature,
            seed: Some(3),
            max_tokens: 200,
            response_format: ResponseFormat::JsonSchema { schema: schema.to_string() },
            ..SamplingParams::default()
        };
        let (text, finish) =
            generate(&engine, "Alice is a 34 year old administrator. As JSON:", params).await;
        assert_eq!(finish, FinishReason::Stop, "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let mut keys: Vec<&str> = value.as_object().expect("an object").keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["age", "name", "role", "tags"], "{text}");
        assert!(value["age"].as_u64().is_some_and(|age| age <= 120), "{text}");
        assert!(["admin", "user", "guest"].contains(&value["role"].as_str().unwrap_or_default()), "{text}");
        let tags = value["tags"].as_array().expect("tags");
        assert!((1..=3).contains(&tags.len()) && tags.iter().all(serde_json::Value::is_string), "{text}");
    }
}
