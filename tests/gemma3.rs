//! The second architecture end to end: gemma-3-270m (Q4_K_M, a base model without a chat
//! template) continues a simple sequence greedily, through llmesh's decoder (GELU, sliding-window
//! layers, per-head norms; its Q5_0, Q8_0, Q4_K and Q6_K layers all on llmesh's kernels). Its own test
//! binary, as it loads a second model. Needs `LLMESH_FETCH_GEMMA=1 scripts/fetch-models.sh` (the
//! test script does it).

use std::path::PathBuf;

use llmesh::engine::{
    Engine, FinishReason, GenerateRequest, GenerationEvent, LocalEngine, ModelKind, ModelSpec, Prompt,
    QueueLimits, SamplingParams,
};

#[tokio::test]
async fn gemma3_continues_a_counting_sequence() {
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
    let engine = LocalEngine::load(&[spec], QueueLimits::default(), &candle_core::Device::Cpu).unwrap();
    let info = &engine.models()[0];
    assert_eq!(
        (info.kind, info.architecture.as_str(), info.quantization.as_str()),
        (ModelKind::Chat, "gemma3", "Q4_K_M")
    );

    let request = GenerateRequest {
        model: "gemma".into(),
        prompt: Prompt::Text("1, 2, 3, 4, 5,".into()),
        params: SamplingParams { temperature: 0.0, max_tokens: 8, ..SamplingParams::default() },
    };
    let mut stream = engine.generate(request).await.unwrap();
    let mut text = String::new();
    let finish = loop {
        match stream.recv().await.expect("a Done event") {
            GenerationEvent::Text(piece) => text.push_str(&piece),
            GenerationEvent::Done { finish_reason, .. } => break finish_reason,
            GenerationEvent::Error(error) => panic!("{error}"),
        }
    };
    assert!(text.starts_with(" 6, 7"), "continuation: {text:?}");
    assert_eq!(finish, FinishReason::Length);
}
