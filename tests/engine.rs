//! The real engine (tokenizer, template, worker thread, sampling, stops, cancellation) on a tiny
//! model written by the test itself.

mod support;

use support::tiny_model;

use std::time::Duration;

use llmesh::engine::{
    ChatMessage, Engine, EngineError, FinishReason, GenerateRequest, GenerationEvent, GenerationStream,
    LocalEngine, ModelSpec, Prompt, QueueLimits, SamplingParams,
};

struct Answer {
    text: String,
    finish_reason: FinishReason,
    completion_tokens: usize,
    prompt_tokens: usize,
}

fn tiny_engine(limits: QueueLimits) -> (LocalEngine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_model::write_tiny_llama(&path);
    let engine =
        LocalEngine::load(&[ModelSpec { id: "tiny".into(), path }], limits, &candle_core::Device::Cpu)
            .expect("load the tiny model");
    (engine, dir)
}

fn request(prompt: &str, params: SamplingParams) -> GenerateRequest {
    GenerateRequest { model: "tiny".into(), prompt: Prompt::Text(prompt.into()), params }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

async fn collect(mut stream: GenerationStream) -> Answer {
    let mut text = String::new();
    while let Some(event) = stream.recv().await {
        match event {
            GenerationEvent::Text(piece) => text.push_str(&piece),
            GenerationEvent::Logprobs(_) => {}
            GenerationEvent::Done { finish_reason, usage } => {
                return Answer {
                    text,
                    finish_reason,
                    completion_tokens: usage.completion_tokens,
                    prompt_tokens: usage.prompt_tokens,
                };
            }
            GenerationEvent::Error(error) => panic!("generation failed: {error}"),
        }
    }
    panic!("stream closed without Done");
}

async fn run(engine: &LocalEngine, prompt: &str, params: SamplingParams) -> Answer {
    collect(engine.generate(request(prompt, params)).await.expect("accepted")).await
}

#[tokio::test]
async fn greedy_is_deterministic_and_stops_at_max_tokens() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let first = run(&engine, "the cat sat", greedy(12)).await;
    let second = run(&engine, "the cat sat", greedy(12)).await;
    assert_eq!(first.text, second.text);
    assert!(!first.text.is_empty());
    assert_eq!(first.completion_tokens, 12);
    assert_eq!(first.finish_reason, FinishReason::Length);
    assert!(first.prompt_tokens >= 5, "prompt tokens: {}", first.prompt_tokens);
}

#[tokio::test]
async fn seeded_sampling_repeats_and_seeds_differ() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let sampled = |seed| SamplingParams { temperature: 1.0, seed: Some(seed), ..greedy(24) };
    let a = run(&engine, "hello", sampled(1)).await;
    let b = run(&engine, "hello", sampled(1)).await;
    let c = run(&engine, "hello", sampled(2)).await;
    assert_eq!(a.text, b.text);
    assert_ne!(a.text, c.text);
}

#[tokio::test]
async fn stop_sequence_ends_the_text_before_it() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let full = run(&engine, "in the", greedy(40)).await.text;
    // A stop string from the middle of the greedy answer, likely spanning several tokens.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 12, "answer too short: {full:?}");
    let stop: String = chars[6..10].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let stopped = run(&engine, "in the", SamplingParams { stop: vec![stop.clone()], ..greedy(40) }).await;
    assert_eq!(stopped.text, expected, "stop {stop:?} in {full:?}");
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert!(!stopped.text.contains(&stop));
}

#[tokio::test]
async fn chat_prompts_use_the_chatml_fallback() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let messages = vec![ChatMessage::text("user", "hi")];
    let stream = engine
        .generate(GenerateRequest { model: "tiny".into(), prompt: Prompt::Chat(messages), params: greedy(3) })
        .await
        .unwrap();
    let answer = collect(stream).await;
    // "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n": 3 specials, "user", "hi", "assistant", newlines.
    assert!(answer.prompt_tokens > 10, "prompt tokens: {}", answer.prompt_tokens);
    assert_eq!(answer.completion_tokens, 3);
}

#[tokio::test]
async fn too_long_a_prompt_is_refused() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let prompt = "a ".repeat(tiny_model::CONTEXT);
    match engine.generate(request(&prompt, greedy(1))).await {
        Err(EngineError::ContextLength { prompt_tokens, context_length, .. }) => {
            assert!(prompt_tokens >= context_length);
        }
        other => panic!("expected a context length error, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn max_tokens_is_clamped_to_what_the_prompt_leaves() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let answer = run(&engine, "in", greedy(tiny_model::CONTEXT)).await;
    assert_eq!(answer.prompt_tokens + answer.completion_tokens, tiny_model::CONTEXT);
    assert_eq!(answer.finish_reason, FinishReason::Length);
}

#[tokio::test]
async fn max_tokens_beyond_the_context_window_is_refused() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let refused = engine.generate(request("in", greedy(1_000_000))).await;
    assert!(matches!(refused, Err(EngineError::InvalidRequest(ref m)) if m.contains("max_tokens")));
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_generation() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let mut stream = engine.generate(request("in", greedy(200))).await.unwrap();
    assert!(matches!(stream.recv().await, Some(GenerationEvent::Text(_))));
    drop(stream);
    let mut load = engine.load_of("tiny").unwrap();
    for _ in 0..500 {
        if load.active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        load = engine.load_of("tiny").unwrap();
    }
    assert_eq!((load.active, load.cancelled, load.finished), (0, 1, 0));
}

/// Start a long generation on a model that runs one at a time, and wait until it runs (its
/// stream is returned: dropping it would end the generation).
async fn start_running(engine: &LocalEngine) -> GenerationStream {
    let running = engine.generate(request("in", greedy(200))).await.unwrap();
    for _ in 0..500 {
        if engine.load_of("tiny").unwrap().active == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once() {
    let (engine, _dir) = tiny_engine(QueueLimits { max_active: 1, max_queued: 1, ..QueueLimits::default() });
    let _running = start_running(&engine).await;
    let _queued = engine.generate(request("in", greedy(200))).await.unwrap();
    let refused = engine.generate(request("in", greedy(200))).await;
    assert!(matches!(refused, Err(EngineError::QueueFull(_))), "{:?}", refused.map(|_| ()));
    assert_eq!(engine.load_of("tiny").unwrap().queued, 1);
}

#[tokio::test]
async fn readers_that_stop_reading_do_not_let_more_generations_run() {
    let (engine, _dir) = tiny_engine(QueueLimits { max_active: 1, max_queued: 1, ..QueueLimits::default() });
    // Never read: within a few tokens its events fill their buffer and it waits for its reader.
    let _running = start_running(&engine).await;
    let _queued = engine.generate(request("in", greedy(200))).await.unwrap();
    // With nothing to do but wait, the worker must still not start what is queued.
    for _ in 0..100 {
        let load = engine.load_of("tiny").unwrap();
        assert_eq!((load.active, load.queued), (1, 1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_full_queue_refuses_before_any_work_on_the_prompt() {
    let (engine, _dir) = tiny_engine(QueueLimits { max_active: 1, max_queued: 1, ..QueueLimits::default() });
    let _running = start_running(&engine).await;
    let _queued = engine.generate(request("in", greedy(200))).await.unwrap();
    // Only rendering and tokenizing this prompt can tell that it is too long for the window: a
    // full model answers QueueFull without finding out.
    let too_long = "a ".repeat(tiny_model::CONTEXT);
    let refused = engine.generate(request(&too_long, greedy(1))).await;
    assert!(matches!(refused, Err(EngineError::QueueFull(_))), "{:?}", refused.map(|_| ()));
}

#[tokio::test]
async fn a_prompt_that_fails_gives_its_place_in_the_queue_back() {
    let (engine, _dir) = tiny_engine(QueueLimits { max_active: 1, max_queued: 1, ..QueueLimits::default() });
    let _running = start_running(&engine).await;
    let too_long = "a ".repeat(tiny_model::CONTEXT);
    let refused = engine.generate(request(&too_long, greedy(1))).await;
    assert!(matches!(refused, Err(EngineError::ContextLength { .. })), "{:?}", refused.map(|_| ()));
    assert_eq!(engine.load_of("tiny").unwrap().queued, 0);
    let _queued = engine.generate(request("in", greedy(200))).await.expect("the place is free again");
    assert_eq!(engine.load_of("tiny").unwrap().queued, 1);
}

#[tokio::test]
async fn concurrent_generations_are_interleaved() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let mut long = engine.generate(request("in", greedy(150))).await.unwrap();
    let mut short = engine.generate(request("the", greedy(5))).await.unwrap();
    let mut long_done = false;
    loop {
        tokio::select! {
            Some(event) = long.recv(), if !long_done => {
                long_done = matches!(event, GenerationEvent::Done { .. });
            }
            Some(event) = short.recv() => {
                if matches!(event, GenerationEvent::Done { .. }) {
                    break;
                }
            }
        }
    }
    assert!(!long_done, "the short request waited for the long one to finish");
}

#[tokio::test]
async fn unknown_model_is_reported() {
    let (engine, _dir) = tiny_engine(QueueLimits::default());
    let mut missing = request("x", greedy(1));
    missing.model = "nope".into();
    assert!(matches!(engine.generate(missing).await, Err(EngineError::UnknownModel(_))));
}

#[tokio::test]
async fn a_prompt_that_extends_an_earlier_one_reuses_its_kv_cache_and_answers_the_same() {
    let (cached, _dir) = tiny_engine(QueueLimits::default());
    let (uncached, _dir2) = tiny_engine(QueueLimits { prompt_cache_tokens: 0, ..QueueLimits::default() });
    let first_turn = "in the in the in the in the in the in the";
    let first = run(&cached, first_turn, greedy(6)).await;
    assert_eq!(first.text, run(&uncached, first_turn, greedy(6)).await.text);
    // The finished sequence is kept (once the worker has handed out its last event), and counted.
    let started = std::time::Instant::now();
    while cached.load().prompt_cache_bytes == 0 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(cached.load().prompt_cache_bytes > 0, "the first turn is held");
    assert_eq!(uncached.load().prompt_cache_bytes, 0);
    // The next turn: the same text, the answer, and more; greedy, so both engines must agree.
    let second_turn = format!("{first_turn}{} in the in the", first.text);
    let reused = run(&cached, &second_turn, greedy(8)).await;
    let recomputed = run(&uncached, &second_turn, greedy(8)).await;
    assert_eq!(reused.text, recomputed.text);
    assert_eq!(reused.prompt_tokens, recomputed.prompt_tokens, "usage counts the whole prompt");
    let (hits, tokens) = (cached.load().prompt_cache_hits, cached.load().prompt_tokens_reused);
    assert_eq!(hits, 1);
    assert!(tokens >= first.prompt_tokens as u64 - 1, "reused {tokens} of {} tokens", first.prompt_tokens);
    assert_eq!(uncached.load().prompt_cache_hits, 0);
    // A prompt sharing nothing with what ran before starts afresh.
    run(&cached, "the the the", greedy(2)).await;
    assert_eq!(cached.load().prompt_cache_hits, 1);
}
