//! The generation worker: one dedicated OS thread per chat model that runs every active
//! generation of that model together, one batch step at a time (continuous batching).
//!
//! Each step runs every decoding generation's next token and chunks of the prompts being
//! prefilled in one forward pass (`step.rs`), so the weights are read once per step for all of
//! them; generations join and leave between steps (`generation.rs` holds one generation's state).
//! Jobs wait in a bounded queue; a full queue is refused at once (`EngineError::QueueFull`). A
//! generation whose receiver is dropped (the client went away) leaves at the next step. Events
//! go out through `try_reserve`, so a slow reader pauses only its own generation, never the
//! thread. `abort_all` (a forced unload) ends every generation, running and queued, with an
//! error at the next step.

mod generation;
mod step;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use generation::{Delivery, Ending, Generation};

use super::grammar::{GenerationGrammar, GrammarCompiler};
use super::models::{LanguageModel, Sequence};
use super::prompt_cache::PromptCache;
use super::sampling::SamplingParams;
use super::{EngineError, GenerationEvent};

/// How much work one chat model accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueLimits {
    /// Generations run at the same time (batched into each step).
    pub max_active: usize,
    /// Generations waiting for a place; one more is refused.
    pub max_queued: usize,
    /// Tokens of finished generations' KV caches kept for reuse (`prompt_cache.rs`); 0 turns the
    /// prompt cache off.
    pub prompt_cache_tokens: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self { max_active: 8, max_queued: 32, prompt_cache_tokens: 4096 }
    }
}

/// A generation handed to the worker, its prompt already tokenized and checked against the
/// context window.
pub struct Job {
    pub prompt_tokens: Vec<u32>,
    pub params: SamplingParams,
    /// The grammar of `params.response_format` or `params.tools`, compiled; `None` for free
    /// text.
    pub grammar: Option<GenerationGrammar>,
    pub events: mpsc::Sender<GenerationEvent>,
    pub span: tracing::Span,
}

/// What every generation of one model shares.
pub struct ModelRuntime {
    pub model_id: String,
    pub model: Box<dyn LanguageModel>,
    pub tokenizer: Arc<Tokenizer>,
    pub eos_token_ids: Vec<u32>,
    /// The vocabulary as bytes (the grammars' spelling), for log-probabilities' `bytes`.
    pub vocabulary: Option<Arc<GrammarCompiler>>,
}

impl ModelRuntime {
    /// A token's bytes: from the grammar's vocabulary, else as the tokenizer decodes it alone.
    pub fn token_bytes(&self, token: u32) -> Vec<u8> {
        match &self.vocabulary {
            Some(vocabulary) => vocabulary.token_bytes(token),
            None => self.tokenizer.decode(&[token], false).unwrap_or_default().into_bytes(),
        }
    }
}

/// Live counts of one model's worker, read by the API and (later) announced to the cluster.
#[derive(Debug, Default)]
pub struct WorkerStats {
    queued: AtomicUsize,
    active: AtomicUsize,
    finished: AtomicU64,
    cancelled: AtomicU64,
    prompt_cache_hits: AtomicU64,
    prompt_tokens_reused: AtomicU64,
    prompt_cache_bytes: AtomicUsize,
    /// Set by `abort_all`: everything running or queued ends with an error.
    aborted: AtomicBool,
}

/// A copy of `WorkerStats` at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerLoad {
    /// Accepted, waiting for a place (or being prepared for the queue).
    pub queued: usize,
    /// Being generated now.
    pub active: usize,
    /// Ended with `Done` or an error since start.
    pub finished: u64,
    /// Abandoned because the reader went away.
    pub cancelled: u64,
    /// Generations that started from a prefix in the prompt cache.
    pub prompt_cache_hits: u64,
    /// Prompt tokens those generations did not run again.
    pub prompt_tokens_reused: u64,
    /// Bytes of the KV caches the prompt cache holds now.
    pub prompt_cache_bytes: usize,
}

impl WorkerStats {
    pub fn snapshot(&self) -> WorkerLoad {
        WorkerLoad {
            queued: self.queued.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            prompt_cache_hits: self.prompt_cache_hits.load(Ordering::Relaxed),
            prompt_tokens_reused: self.prompt_tokens_reused.load(Ordering::Relaxed),
            prompt_cache_bytes: self.prompt_cache_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The handle to a model's worker thread. Dropping it lets the thread finish what it holds and
/// exit.
pub struct GenerationWorker {
    model_id: String,
    jobs: SyncSender<Job>,
    /// Places in the queue, counting those reserved by jobs still being prepared.
    places: usize,
    stats: Arc<WorkerStats>,
}

impl GenerationWorker {
    pub fn spawn(runtime: ModelRuntime, limits: QueueLimits) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::sync_channel(limits.max_queued);
        let model_id = runtime.model_id.clone();
        let stats = Arc::new(WorkerStats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new().name(format!("generate-{model_id}")).spawn(move || {
            crate::engine::kernels::candle_pools::in_own_rayon_pool(|| {
                run_worker(runtime, queue, limits, &worker_stats)
            })
        })?;
        // With no queue (`max_queued` 0) a job is handed over only to an idle worker; one may be
        // prepared at a time, and the hand-over decides.
        Ok(Self { model_id, jobs, places: limits.max_queued.max(1), stats })
    }

    /// Take a place in the queue for a job about to be prepared, or `QueueFull` at once. Taken
    /// before the prompt is rendered and tokenized, so that a full model costs a refused request
    /// nothing, and no more prompts are prepared at once than there are places to put them.
    pub fn reserve(&self) -> Result<QueuePlace, EngineError> {
        // Counted as queued from now on, so the worker's decrement can never come first.
        self.stats
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                (queued < self.places).then_some(queued + 1)
            })
            .map_err(|_| EngineError::QueueFull(self.model_id.clone()))?;
        Ok(QueuePlace {
            model_id: self.model_id.clone(),
            jobs: self.jobs.clone(),
            stats: self.stats.clone(),
            held: true,
        })
    }

    pub fn load(&self) -> WorkerLoad {
        self.stats.snapshot()
    }

    /// End every generation of this worker, running or queued, with `ShuttingDown`, from its
    /// next step on; new jobs end so too.
    pub fn abort_all(&self) {
        self.stats.aborted.store(true, Ordering::Relaxed);
    }
}

/// A place in a model's queue, held while a job is prepared; given back if it is dropped unused.
pub struct QueuePlace {
    model_id: String,
    jobs: SyncSender<Job>,
    stats: Arc<WorkerStats>,
    /// Still this place's to give back: no job was handed over in it.
    held: bool,
}

impl QueuePlace {
    /// Queue `job` in this place. (The place was counted, so the queue has room for it, except
    /// with no queue at all when the worker is busy.)
    pub fn submit(mut self, job: Job) -> Result<(), EngineError> {
        match self.jobs.try_send(job) {
            Ok(()) => {
                // The job counts as queued until the worker takes it.
                self.held = false;
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(EngineError::QueueFull(self.model_id.clone())),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::ShuttingDown(self.model_id.clone())),
        }
    }
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        if self.held {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn run_worker(runtime: ModelRuntime, queue: Receiver<Job>, limits: QueueLimits, stats: &WorkerStats) {
    let max_active = limits.max_active.max(1);
    let mut cache = PromptCache::new(limits.prompt_cache_tokens);
    let start = |job, cache: &mut PromptCache<Box<dyn Sequence>>| {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        stats.active.fetch_add(1, Ordering::Relaxed);
        let generation = Generation::new(&runtime, job, cache);
        stats.prompt_cache_bytes.store(cache.held_bytes(), Ordering::Relaxed);
        if generation.prefilled > 0 {
            stats.prompt_cache_hits.fetch_add(1, Ordering::Relaxed);
            stats.prompt_tokens_reused.fetch_add(generation.prefilled as u64, Ordering::Relaxed);
        }
        generation
    };
    let mut active: Vec<Generation> = Vec::new();
    let mut queue_open = true;
    loop {
        // New generations join between steps.
        while queue_open && active.len() < max_active {
            let next = if active.is_empty() {
                queue.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                queue.try_recv()
            };
            match next {
                Ok(job) => join(&mut active, start(job, &mut cache)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => queue_open = false,
            }
        }
        if stats.aborted.load(Ordering::Relaxed) {
            for generation in &mut active {
                generation.abort(EngineError::ShuttingDown(runtime.model_id.clone()));
            }
        }
        if active.is_empty() {
            if queue_open {
                continue;
            }
            return;
        }
        // Hand out the last step's events; generations that ended leave.
        active.retain_mut(|generation| match generation.deliver() {
            Delivery::Delivered | Delivery::Waiting => true,
            Delivery::Ended(ending) => {
                if let Some((tokens, mut sequence)) = generation.release() {
                    // Kept at its length: the cache's bound in tokens is then its bound in bytes.
                    match sequence.shrink_to_fit() {
                        Ok(()) => {
                            cache.put(tokens, sequence);
                            stats.prompt_cache_bytes.store(cache.held_bytes(), Ordering::Relaxed);
                        }
                        Err(error) => tracing::warn!(%error, "a finished sequence is not kept for reuse"),
                    }
                }
                // Counted out once the cache holds what it leaves behind.
                stats.active.fetch_sub(1, Ordering::Relaxed);
                match ending {
                    Ending::Finished => stats.finished.fetch_add(1, Ordering::Relaxed),
                    Ending::Cancelled => stats.cancelled.fetch_add(1, Ordering::Relaxed),
                };
                false
            }
        });
        share_prompts(&mut active);
        let work: Vec<_> = active.iter().map(Generation::work).collect();
        let plan = step::plan(&work, step::PREFILL_BUDGET);
        if plan.iter().any(|&tokens| tokens > 0) {
            step::run(&runtime, &mut active, &plan);
        } else if !active.is_empty() {
            // Every generation waits on a slow reader: sleep a little, but wake for new work if
            // there is room for it. (Readers that stop reading must not let more than
            // `max_active` run: each holds a KV cache, and the queue would never fill.)
            if active.len() >= max_active {
                std::thread::sleep(Duration::from_millis(2));
            } else {
                match queue.recv_timeout(Duration::from_millis(2)) {
                    Ok(job) => join(&mut active, start(job, &mut cache)),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => queue_open = false,
                }
            }
        }
    }
}

/// Start a generation beside `active`: one of several choices of a request waits for the
/// first of them to run the prompt (`share_prompts`).
fn join(active: &mut Vec<Generation>, mut generation: Generation) {
    let group = generation.group;
    generation.awaiting_prompt = group.is_some() && active.iter().any(|other| other.group == group);
    active.push(generation);
}

/// The choices of one request run their prompt once: the first to arrive runs it, the others
/// wait and then each takes a copy of its KV cache. (Should the first end before, the next one
/// runs the prompt itself.)
fn share_prompts(active: &mut [Generation]) {
    for follower in 0..active.len() {
        if !active[follower].awaiting_prompt {
            continue;
        }
        let group = active[follower].group;
        let leader = active.iter().position(|other| other.group == group && !other.awaiting_prompt);
        let Some(leader) = leader else {
            active[follower].awaiting_prompt = false;
            continue;
        };
        let prompt = active[follower].prompt_tokens().to_vec();
        match active[leader].fork_prompt(&prompt) {
            Some(Ok(sequence)) => active[follower].adopt_prompt(sequence),
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot copy a prompt's KV cache; running it again");
                active[follower].awaiting_prompt = false;
            }
            // The first has not run the prompt yet.
            None => {}
        }
    }
}

#[cfg(test)]
mod tests;
