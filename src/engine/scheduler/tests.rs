//! The worker's batching, on a fake model that records every step: generations join and leave
//! between steps, a cancelled one leaves mid-batch, a long prompt is prefilled in chunks while
//! the others keep decoding, and a sequence that fails a batch step fails alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;
use tokenizers::models::bpe::{BPE, Vocab};
use tokio::sync::mpsc;

use super::step::PREFILL_BUDGET;
use super::{GenerationWorker, Job, ModelRuntime, QueueLimits};
use crate::engine::models::{BatchEntry, LanguageModel, Sequence};
use crate::engine::{FinishReason, GenerationEvent, SamplingParams};

const VOCABULARY: usize = 2048;
/// A token the fake model refuses to run.
const POISON: u32 = 2047;

/// What one entry of one step ran: (sequence id, tokens, position).
type Entry = (usize, usize, usize);

/// Predicts `last + 1` after every input, and writes down each step's entries.
struct RecordingModel {
    steps: Arc<Mutex<Vec<Vec<Entry>>>>,
    sequences: AtomicUsize,
}

struct FakeSequence {
    id: usize,
    held: usize,
}

impl Sequence for FakeSequence {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn fork(&self, len: usize) -> candle_core::Result<Box<dyn Sequence>> {
        static FORKS: AtomicUsize = AtomicUsize::new(1);
        let id = 1000 * FORKS.fetch_add(1, Ordering::Relaxed) + self.id;
        Ok(Box::new(FakeSequence { id, held: self.held.min(len) }))
    }

    fn shrink_to_fit(&mut self) -> candle_core::Result<()> {
        Ok(())
    }

    fn held_bytes(&self) -> usize {
        self.held
    }
}

impl LanguageModel for RecordingModel {
    fn new_sequence(&self) -> Box<dyn Sequence> {
        Box::new(FakeSequence { id: self.sequences.fetch_add(1, Ordering::Relaxed), held: 0 })
    }

    fn forward_batch(&self, batch: &mut [BatchEntry<'_>]) -> candle_core::Result<Tensor> {
        // Slow enough that the test's requests arrive while others are running.
        std::thread::sleep(Duration::from_millis(1));
        let mut logits = vec![0.0f32; batch.len() * VOCABULARY];
        let mut step = Vec::new();
        for (row, entry) in batch.iter_mut().enumerate() {
            if entry.tokens.contains(&POISON) {
                candle_core::bail!("poisoned input");
            }
            let Some(sequence) = entry.sequence.as_any_mut().downcast_mut::<FakeSequence>() else {
                candle_core::bail!("not a fake sequence");
            };
            if entry.position > sequence.held {
                candle_core::bail!("a gap before position {}", entry.position);
            }
            sequence.held = entry.position + entry.tokens.len();
            step.push((sequence.id, entry.tokens.len(), entry.position));
            let next = (*entry.tokens.last().unwrap_or(&0) as usize + 1) % VOCABULARY;
            logits[row * VOCABULARY + next] = 10.0;
        }
        self.steps.lock().unwrap().push(step);
        Tensor::from_vec(logits, (batch.len(), VOCABULARY), &Device::Cpu)
    }
}

fn tokenizer() -> Arc<Tokenizer> {
    let vocabulary: Vocab = (0..VOCABULARY as u32).map(|id| (format!("<{id}>"), id)).collect();
    let model = BPE::builder().vocab_and_merges(vocabulary, Vec::new()).build().unwrap();
    Arc::new(Tokenizer::new(model))
}

fn worker(max_active: usize) -> (GenerationWorker, Arc<Mutex<Vec<Vec<Entry>>>>) {
    let steps = Arc::new(Mutex::new(Vec::new()));
    let model = RecordingModel { steps: steps.clone(), sequences: AtomicUsize::new(0) };
    let runtime = ModelRuntime {
        model_id: "fake".into(),
        model: Box::new(model),
        tokenizer: tokenizer(),
        eos_token_ids: Vec::new(),
        vocabulary: None,
    };
    let limits = QueueLimits { max_active, max_queued: 4, prompt_cache_tokens: 0 };
    (GenerationWorker::spawn(runtime, limits).unwrap(), steps)
}

fn submit(worker: &GenerationWorker, prompt: Vec<u32>, max_tokens: usize) -> mpsc::Receiver<GenerationEvent> {
    submit_in_group(worker, prompt, max_tokens, None)
}

fn submit_in_group(
    worker: &GenerationWorker,
    prompt: Vec<u32>,
    max_tokens: usize,
    prefill_group: Option<u64>,
) -> mpsc::Receiver<GenerationEvent> {
    let (events, receiver) = mpsc::channel(4);
    let params = SamplingParams { temperature: 0.0, max_tokens, prefill_group, ..SamplingParams::default() };
    let job = Job { prompt_tokens: prompt, params, grammar: None, events, span: tracing::Span::none() };
    worker.reserve().unwrap().submit(job).unwrap();
    receiver
}

/// Read events until the generation ends: (text pieces, how it ended).
async fn drain(
    mut events: mpsc::Receiver<GenerationEvent>,
) -> (usize, Result<(FinishReason, usize), String>) {
    let mut pieces = 0;
    while let Some(event) = events.recv().await {
        match event {
            GenerationEvent::Text(_) => pieces += 1,
            GenerationEvent::Logprobs(_) => {}
            GenerationEvent::Done { finish_reason, usage } => {
                return (pieces, Ok((finish_reason, usage.completion_tokens)));
            }
            GenerationEvent::Error(error) => return (pieces, Err(error.to_string())),
        }
    }
    (pieces, Err("the stream ended without Done".into()))
}

async fn first_text(events: &mut mpsc::Receiver<GenerationEvent>) {
    while let Some(event) = events.recv().await {
        if matches!(event, GenerationEvent::Text(_)) {
            return;
        }
    }
    panic!("no text came");
}

fn steps_with(steps: &[Vec<Entry>], id: usize) -> Vec<&Vec<Entry>> {
    steps.iter().filter(|step| step.iter().any(|entry| entry.0 == id)).collect()
}

#[tokio::test]
async fn generations_join_and_leave_between_steps() {
    let (worker, steps) = worker(4);
    let mut first = submit(&worker, vec![1, 2, 3, 4], 60);
    first_text(&mut first).await;
    let second = submit(&worker, vec![100, 101], 5);
    let (second, first) = tokio::join!(drain(second), drain(first));
    assert_eq!(second.1, Ok((FinishReason::Length, 5)));
    assert_eq!(first.1, Ok((FinishReason::Length, 60)));
    let steps = steps.lock().unwrap();
    let together = steps.iter().filter(|step| step.len() == 2).count();
    assert!(together >= 4, "the second generation decoded in the first's steps ({together} shared steps)");
    let last_of_second = steps.iter().rposition(|step| step.iter().any(|entry| entry.0 == 1)).unwrap();
    assert!(steps[last_of_second + 1..].iter().all(|step| step == &vec![(0, 1, step[0].2)]));
    assert!(steps.len() > last_of_second + 1, "the first went on alone after the second left");
}

#[tokio::test]
async fn a_cancelled_generation_leaves_mid_batch_and_the_others_go_on() {
    let (worker, steps) = worker(4);
    let kept = submit(&worker, vec![1, 2, 3], 80);
    let mut dropped = submit(&worker, vec![500, 501, 502], 1000);
    first_text(&mut dropped).await;
    drop(dropped);
    let kept = drain(kept).await;
    assert_eq!(kept.1, Ok((FinishReason::Length, 80)));
    let cancelled_steps = steps_with(&steps.lock().unwrap(), 1).len();
    assert!(cancelled_steps < 100, "the cancelled generation ran {cancelled_steps} steps");
    assert_eq!(worker.load().cancelled, 1);
    // The worker counts a generation out at the step after its last event went out.
    for _ in 0..500 {
        if worker.load().active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(worker.load().active, 0);
}

#[tokio::test]
async fn a_long_prompt_is_prefilled_in_chunks_while_the_others_decode() {
    let (worker, steps) = worker(4);
    let mut decoding = submit(&worker, vec![1, 2, 3], 200);
    first_text(&mut decoding).await;
    let long_prompt: Vec<u32> = (0..1000).map(|i| i % 1000).collect();
    let long = submit(&worker, long_prompt, 3);
    let (long, decoding) = tokio::join!(drain(long), drain(decoding));
    assert_eq!(long.1, Ok((FinishReason::Length, 3)));
    assert_eq!(decoding.1, Ok((FinishReason::Length, 200)));
    let steps = steps.lock().unwrap();
    let mut covered = 0;
    for step in steps_with(&steps, 1) {
        let &(_, tokens, position) = step.iter().find(|entry| entry.0 == 1).unwrap();
        if position < 1000 {
            assert_eq!(position, covered, "prompt chunks follow each other");
            assert!(tokens <= PREFILL_BUDGET);
            covered += tokens;
            assert!(
                step.iter().any(|entry| entry.0 == 0 && entry.1 == 1),
                "the decoding generation runs in every prefill step: {step:?}"
            );
        }
    }
    assert_eq!(covered, 1000);
}

#[tokio::test]
async fn a_sequence_that_fails_a_batch_step_fails_alone() {
    let (worker, _steps) = worker(4);
    let mut healthy = submit(&worker, vec![1, 2, 3], 40);
    first_text(&mut healthy).await;
    let poisoned = submit(&worker, vec![5, POISON, 7], 10);
    let (poisoned, healthy) = tokio::join!(drain(poisoned), drain(healthy));
    assert!(poisoned.1.as_ref().is_err_and(|error| error.contains("poisoned")), "{poisoned:?}");
    assert_eq!(healthy.1, Ok((FinishReason::Length, 40)));
}

#[tokio::test]
async fn the_choices_of_one_request_run_their_prompt_once() {
    let (worker, steps) = worker(4);
    let prompt: Vec<u32> = (1..=40).collect();
    let choices: Vec<_> = (0..3).map(|_| submit_in_group(&worker, prompt.clone(), 3, Some(7))).collect();
    for events in choices {
        assert_eq!(drain(events).await.1, Ok((FinishReason::Length, 3)));
    }
    let steps = steps.lock().unwrap();
    let entries: Vec<&Entry> = steps.iter().flatten().collect();
    let prompt_runs = entries.iter().filter(|(_, tokens, position)| *position == 0 && *tokens > 1).count();
    assert_eq!(prompt_runs, 1, "one prefill for three choices: {steps:?}");
    // The others each ran only the prompt's last token, from a copy of the first one's cache.
    let last_token_runs =
        entries.iter().filter(|(id, tokens, position)| *id >= 1000 && *tokens == 1 && *position == 39);
    assert_eq!(last_token_runs.count(), 2, "{steps:?}");
}
