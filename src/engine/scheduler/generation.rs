//! One generation as the worker holds it: its sequence (KV cache), where it stands in its prompt,
//! what it still owes its reader, and what it does with each step's logits.
//!
//! The worker asks each generation for its `work` (a chunk of the prompt, or its last token),
//! runs every generation's input in one batch step, and hands each its logits row
//! (`accept_logits`). All per-sequence logits processing happens there: a response format's
//! grammar mask, then sampling with its penalties; log-probabilities belong in the same place.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use toktrie::SimpleVob;

use super::super::detokenize::{IncrementalDecoder, StopMatcher};
use super::super::grammar::GenerationGrammar;
use super::super::models::Sequence;
use super::super::prompt_cache::PromptCache;
use super::super::sampling::Sampler;
use super::super::{EngineError, FinishReason, GenerationEvent, TokenLogprob, TopLogprob, Usage};
use super::{Job, ModelRuntime};

/// What a generation asks of the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Run its last sampled token.
    Decode,
    /// Run (part of) the prompt tokens it has not run yet.
    Prefill { remaining: usize },
}

/// What delivering a generation's pending events showed.
pub enum Delivery {
    /// Nothing pending: it may take part in the next step (or it is finished).
    Delivered,
    /// The reader has not taken the previous events yet.
    Waiting,
    /// Drop it.
    Ended(Ending),
}

pub enum Ending {
    /// Done or failed, every event delivered.
    Finished,
    /// The reader went away.
    Cancelled,
}

pub struct Generation {
    /// Taken back (`release`) when the generation ends, for the prompt cache; lent out
    /// (`lend_sequence`) for the length of a step.
    sequence: Option<Box<dyn Sequence>>,
    /// The tokens the sequence's KV cache holds, in order.
    held: Vec<u32>,
    /// Whether a forward pass failed (then the KV cache is not reused).
    failed: bool,
    prompt_tokens: Vec<u32>,
    /// Prompt tokens already run (or found in the prompt cache).
    pub(super) prefilled: usize,
    /// The choices of one request share this id (`SamplingParams::prefill_group`).
    pub(super) group: Option<u64>,
    /// Waiting for another choice of its request to run the prompt, to take a copy.
    pub(super) awaiting_prompt: bool,
    /// The last sampled token, fed to the model next.
    last_token: Option<u32>,
    sampler: Sampler,
    /// The response format's or the tool calls' grammar: masks the logits before sampling.
    grammar: Option<GenerationGrammar>,
    /// The mask for the next token, computed during the step's forward pass (`prepare_mask`).
    next_mask: Option<Result<SimpleVob, String>>,
    /// Time spent computing masks, for the log line at the end.
    mask_time: Duration,
    /// Step time beyond the forward pass spent on masks (starting their thread, waiting for it),
    /// for the log line at the end.
    mask_wait: Duration,
    /// Time spent applying masks and advancing the grammar, on the step's thread, for the log line.
    constraint_time: Duration,
    /// Send each token's log-probability with this many alternatives.
    logprobs: Option<usize>,
    /// Added to these tokens' logits.
    logit_bias: Vec<(u32, f32)>,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    completion_tokens: usize,
    max_tokens: usize,
    ignore_eos: bool,
    outbox: VecDeque<GenerationEvent>,
    finished: bool,
    events: mpsc::Sender<GenerationEvent>,
    pub(super) span: tracing::Span,
}

impl Generation {
    /// A generation starting from the prompt cache's longest shared prefix, if any.
    pub fn new(runtime: &ModelRuntime, job: Job, cache: &mut PromptCache<Box<dyn Sequence>>) -> Self {
        let (sequence, prefilled) = match cache.take(&job.prompt_tokens) {
            Some(reused) => (reused.sequence, reused.tokens),
            None => (runtime.model.new_sequence(), 0),
        };
        if prefilled > 0 {
            let _entered = job.span.enter();
            tracing::debug!(reused_tokens = prefilled, "prompt prefix found in the prompt cache");
        }
        Self {
            sequence: Some(sequence),
            held: job.prompt_tokens[..prefilled].to_vec(),
            failed: false,
            prompt_tokens: job.prompt_tokens,
            prefilled,
            group: job.params.prefill_group,
            awaiting_prompt: false,
            last_token: None,
            max_tokens: job.params.max_tokens,
            ignore_eos: job.params.ignore_eos,
            stops: StopMatcher::new(job.params.stop.clone()),
            logprobs: job.params.logprobs,
            logit_bias: job.params.logit_bias.clone(),
            sampler: Sampler::new(job.params),
            grammar: job.grammar,
            next_mask: None,
            mask_time: Duration::ZERO,
            mask_wait: Duration::ZERO,
            constraint_time: Duration::ZERO,
            decoder: IncrementalDecoder::new(runtime.tokenizer.clone()),
            completion_tokens: 0,
            outbox: VecDeque::new(),
            finished: false,
            events: job.events,
            span: job.span,
        }
    }

    /// Hand the reader what it can take of the pending events.
    pub fn deliver(&mut self) -> Delivery {
        while let Some(event) = self.outbox.pop_front() {
            let refused = match self.events.try_reserve() {
                Ok(permit) => {
                    permit.send(event);
                    continue;
                }
                Err(error) => error,
            };
            self.outbox.push_front(event);
            return match refused {
                mpsc::error::TrySendError::Full(()) => Delivery::Waiting,
                mpsc::error::TrySendError::Closed(()) => self.cancelled(),
            };
        }
        if self.finished {
            return Delivery::Ended(Ending::Finished);
        }
        if self.events.is_closed() {
            return self.cancelled();
        }
        Delivery::Delivered
    }

    /// What it needs from the next step; `None` while its reader lags behind or once it is done.
    pub fn work(&self) -> Option<Work> {
        if self.finished || !self.outbox.is_empty() || self.sequence.is_none() || self.awaiting_prompt {
            return None;
        }
        Some(match self.last_token {
            Some(_) => Work::Decode,
            None => Work::Prefill { remaining: self.prompt_tokens.len() - self.prefilled },
        })
    }

    /// The next `count` tokens to run (a decode step runs one) and the position of the first.
    pub fn input(&self, count: usize) -> (Vec<u32>, usize) {
        match self.last_token {
            Some(token) => (vec![token], self.prompt_tokens.len() + self.completion_tokens - 1),
            None => {
                let end = (self.prefilled + count).min(self.prompt_tokens.len());
                (self.prompt_tokens[self.prefilled..end].to_vec(), self.prefilled)
            }
        }
    }

    /// A copy of the KV cache of all but the prompt's last token, once this generation holds
    /// them (another choice of the same request runs the last one itself, for its logits).
    pub fn fork_prompt(&self, prompt: &[u32]) -> Option<candle_core::Result<Box<dyn Sequence>>> {
        let shared = prompt.len().checked_sub(1)?;
        let sequence = self.sequence.as_ref()?;
        let holds = self.held.len() >= shared && self.held[..shared] == prompt[..shared];
        holds.then(|| sequence.fork(shared))
    }

    pub fn prompt_tokens(&self) -> &[u32] {
        &self.prompt_tokens
    }

    /// Continue from another choice's copy of the prompt (`fork_prompt`).
    pub fn adopt_prompt(&mut self, sequence: Box<dyn Sequence>) {
        let shared = self.prompt_tokens.len() - 1;
        self.sequence = Some(sequence);
        self.held = self.prompt_tokens[..shared].to_vec();
        self.prefilled = shared;
        self.awaiting_prompt = false;
    }

    /// The sequence, lent to a step; give it back with `ran`.
    pub fn lend_sequence(&mut self) -> Option<Box<dyn Sequence>> {
        self.sequence.take()
    }

    /// The step ran `tokens` (from `input`) in `sequence`. True when the step's logits for this
    /// generation are to be used: a decode step, or the prompt's last chunk.
    pub fn ran(&mut self, sequence: Box<dyn Sequence>, tokens: &[u32]) -> bool {
        self.sequence = Some(sequence);
        if self.last_token.is_some() {
            self.held.extend_from_slice(tokens);
            return true;
        }
        // From a cached prefix, the sequence dropped what it held beyond `prefilled`.
        self.held.truncate(self.prefilled);
        self.held.extend_from_slice(tokens);
        self.prefilled += tokens.len();
        self.prefilled == self.prompt_tokens.len()
    }

    /// The per-sequence logits processing of one step: pick the next token from `logits` (the
    /// place for penalties, grammar masks and log-probabilities), then stream its text and decide
    /// whether the generation ends.
    pub fn accept_logits(&mut self, runtime: &ModelRuntime, logits: &mut [f32]) {
        self.prepare_mask();
        // The model's own distribution: before the mask and the penalties change the logits.
        let distribution = self.logprobs.map(|top| Distribution::of(logits, top));
        for &(token, bias) in &self.logit_bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
        let constraint = self.grammar.as_mut().and_then(GenerationGrammar::active);
        if let (Some(constraint), Some(allowed)) = (constraint, self.next_mask.take()) {
            let started = Instant::now();
            match allowed {
                Ok(allowed) => constraint.mask(&allowed, logits),
                Err(error) => return self.grammar_failed(&error),
            }
            self.constraint_time += started.elapsed();
        }
        let token = self.sampler.sample(logits);
        self.last_token = Some(token);
        // A grammar allows an end-of-sequence token only where the output is complete.
        let constrained = self.grammar.as_ref().is_some_and(GenerationGrammar::is_active);
        let ends = runtime.eos_token_ids.contains(&token) && (!self.ignore_eos || constrained);
        if ends {
            self.finish(FinishReason::Stop);
            return;
        }
        if let Some(distribution) = distribution {
            self.outbox.push_back(GenerationEvent::Logprobs(distribution.entry(runtime, token)));
        }
        let mut complete = false;
        if let Some(constraint) = self.grammar.as_mut().and_then(GenerationGrammar::active) {
            let started = Instant::now();
            if let Err(error) = constraint.accept(token) {
                return self.grammar_failed(&error);
            }
            complete = constraint.is_finished();
            self.constraint_time += started.elapsed();
        }
        self.completion_tokens += 1;
        if let Some(piece) = self.decoder.push(token) {
            if let Some(grammar) = self.grammar.as_mut().filter(|grammar| !grammar.is_active()) {
                // A tool call's marker switches its grammar on, from the marker.
                if let Err(error) = grammar.observe_text(&piece) {
                    return self.grammar_failed(&error);
                }
                complete = grammar.active().is_some_and(|constraint| constraint.is_finished());
            }
            let check = self.stops.push(&piece);
            self.send_text(check.text);
            if check.stopped {
                self.finish(FinishReason::Stop);
                return;
            }
        }
        if complete {
            self.finish(FinishReason::Stop);
        } else if self.completion_tokens >= self.max_tokens {
            self.finish(FinishReason::Length);
        }
    }

    /// Whether the generation has a grammar whose next mask is still to be computed.
    pub fn needs_mask(&self) -> bool {
        self.grammar.as_ref().is_some_and(GenerationGrammar::is_active)
            && self.next_mask.is_none()
            && !self.finished
    }

    /// Compute the mask for the next token, unless it is already there. The grammar's state
    /// changes only when a token is accepted, so a mask computed during a step's forward pass
    /// (or a prefill's earlier chunks) is the one its logits need.
    pub fn prepare_mask(&mut self) {
        if !self.needs_mask() {
            return;
        }
        if let Some(constraint) = self.grammar.as_mut().and_then(GenerationGrammar::active) {
            let started = Instant::now();
            self.next_mask = Some(constraint.allowed_tokens());
            self.mask_time += started.elapsed();
        }
    }

    /// A step spent `wait` beyond its forward pass on masks; counted if this generation's was one.
    pub fn waited_for_mask(&mut self, wait: Duration) {
        if self.next_mask.is_some() {
            self.mask_wait += wait;
        }
    }

    /// The grammar rejected what the model can do (it should not: each token was allowed).
    fn grammar_failed(&mut self, error: &str) {
        let _entered = self.span.enter();
        tracing::error!(%error, "the grammar failed");
        let error = EngineError::Inference(format!("constrained decoding failed: {error}"));
        self.outbox.push_back(GenerationEvent::Error(error));
        self.finished = true;
    }

    /// A forward pass of this generation failed: its reader gets the error, its KV cache is
    /// dropped.
    pub fn fail(&mut self, sequence: Option<Box<dyn Sequence>>, error: &candle_core::Error) {
        let _entered = self.span.enter();
        tracing::error!(%error, "generation failed");
        self.sequence = sequence;
        self.failed = true;
        self.outbox.push_back(GenerationEvent::Error(EngineError::Inference(error.to_string())));
        self.finished = true;
    }

    /// End now with `error` (its model is being unloaded by force); what was sent stays sent.
    pub fn abort(&mut self, error: EngineError) {
        if self.finished {
            return;
        }
        let _entered = self.span.enter();
        tracing::info!(completion_tokens = self.completion_tokens, %error, "generation aborted");
        self.failed = true;
        self.outbox.push_back(GenerationEvent::Error(error));
        self.finished = true;
    }

    /// The sequence and the tokens its KV cache holds, unless a forward pass failed.
    pub fn release(&mut self) -> Option<(Vec<u32>, Box<dyn Sequence>)> {
        let sequence = self.sequence.take()?;
        (!self.failed).then(|| (std::mem::take(&mut self.held), sequence))
    }

    fn cancelled(&mut self) -> Delivery {
        let _entered = self.span.enter();
        tracing::debug!(completion_tokens = self.completion_tokens, "generation cancelled by its reader");
        Delivery::Ended(Ending::Cancelled)
    }

    fn send_text(&mut self, text: String) {
        if !text.is_empty() {
            self.outbox.push_back(GenerationEvent::Text(text));
        }
    }

    fn finish(&mut self, finish_reason: FinishReason) {
        // Text held back as a possible stop sequence turned out not to be one.
        let held = self.stops.finish();
        self.send_text(held);
        let usage =
            Usage { prompt_tokens: self.prompt_tokens.len(), completion_tokens: self.completion_tokens };
        let _entered = self.span.enter();
        tracing::debug!(?finish_reason, completion_tokens = usage.completion_tokens, "generation finished");
        if self.grammar.is_some() {
            let steps = usage.completion_tokens.max(1) as f64;
            let per_token = |time: Duration| time.as_secs_f64() * 1e6 / steps;
            tracing::debug!(
                mask_microseconds_per_token = per_token(self.mask_time),
                mask_wait_microseconds_per_token = per_token(self.mask_wait),
                apply_and_accept_microseconds_per_token = per_token(self.constraint_time),
                "grammar masks"
            );
        }
        self.outbox.push_back(GenerationEvent::Done { finish_reason, usage });
        self.finished = true;
    }
}

/// One step's log-probabilities: the raw logits' log-sum-exp and the most likely tokens.
struct Distribution {
    logits: Vec<f32>,
    log_sum_exp: f32,
    top: Vec<u32>,
}

impl Distribution {
    fn of(logits: &[f32], top: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&logit| f64::from(logit - max).exp()).sum();
        let log_sum_exp = max + sum.ln() as f32;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if top > 0 && top < order.len() {
            order.select_nth_unstable_by(top - 1, by_logit);
        }
        order.truncate(top);
        order.sort_unstable_by(by_logit);
        Self { logits: logits.to_vec(), log_sum_exp, top: order }
    }

    fn entry(&self, runtime: &ModelRuntime, token: u32) -> TokenLogprob {
        let logprob = |token: u32| self.logits[token as usize] - self.log_sum_exp;
        let top = self
            .top
            .iter()
            .map(|&other| TopLogprob { bytes: runtime.token_bytes(other), logprob: logprob(other) })
            .collect();
        TokenLogprob { bytes: runtime.token_bytes(token), logprob: logprob(token), top }
    }
}
