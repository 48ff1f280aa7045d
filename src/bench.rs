//! `llmesh bench`: prompt and decode speed of a chat model on this machine, through the same
//! engine and worker thread that serve requests. Prints figures (or, with `--json`, one JSON
//! object of them); asserts nothing.
//!
//! The prompt cache is on, as when serving, so every measured request but the second chat turn has
//! a prompt of its own (a number in front): repeating one prompt would time the cache, not the
//! model. The second chat turn is the figure the cache is for: a conversation that grows by an
//! answer and a new question starts from the KV cache of that answer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::engine::{
    self, ChatMessage, Engine, GenerateRequest, GenerationEvent, LocalEngine, ModelSpec, Prompt, QueueLimits,
    SamplingParams,
};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The chat model (.gguf) to measure.
    #[arg(long)]
    pub model: PathBuf,
    /// An embeddings folder to load beside it, so the peak memory covers both demo models.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print the figures as one JSON object on stdout instead of lines of text.
    #[arg(long)]
    pub json: bool,
}

/// What `--json` prints. Rates are tokens per second, times milliseconds; medians over `runs`.
#[derive(Debug, Serialize)]
pub struct Figures {
    pub load_seconds: f64,
    pub threads: usize,
    /// Tokens in the prompt of the prompt and decode runs (as the engine counted them).
    pub prompt_tokens: usize,
    /// Prompt processing: prompt tokens over the time to the first token.
    pub prompt_tokens_per_second: f64,
    /// Time to first token for that prompt, no prompt cache involved.
    pub ttft_cold_ms: f64,
    pub decode_tokens: usize,
    /// Tokens after the first over the time after the first.
    pub decode_tokens_per_second: f64,
    pub concurrency: usize,
    /// All tokens of `concurrency` requests at once over the wall time they took.
    pub concurrent_tokens_per_second: f64,
    /// Median time to first token over those requests.
    pub concurrent_ttft_median_ms: f64,
    /// The second chat turn: the prompt of (system, question, the model's answer, new question).
    pub second_turn_prompt_tokens: usize,
    /// Its time to first token right after the first turn, the prompt cache holding that turn.
    pub second_turn_ttft_ms: f64,
    /// Prompt tokens of the second turn the prompt cache spared (median over runs).
    pub second_turn_tokens_reused: u64,
    /// The time to first token of the same conversation with nothing of it cached.
    pub second_turn_uncached_ttft_ms: f64,
    /// Peak resident memory of the process (VmHWM) once the prompt and decode runs are done, one
    /// request at a time: what `llama-bench` measures. `null` where /proc has none.
    pub one_stream_peak_rss_mib: Option<f64>,
    /// Of it, what the prompt cache held then: those runs' KV caches, kept for reuse
    /// (`llama-bench` keeps none).
    pub one_stream_prompt_cache_mib: f64,
    /// Peak resident memory of the whole bench: `concurrency` requests at once, the prompt cache
    /// holding earlier answers. `null` where /proc has none.
    pub peak_rss_mib: Option<f64>,
}

struct Timing {
    first_token: Duration,
    total: Duration,
    prompt_tokens: usize,
    completion_tokens: usize,
    text: String,
}

const SYSTEM: &str = "You are a helpful assistant. Answer in two or three sentences.";
const FIRST_QUESTION: &str = "What is the capital of France, and what is the city known for?";
const SECOND_QUESTION: &str = "Which river runs through it, and where does that river end?";
/// The first turn's answer is cut here, so that a model that rambles still finishes in time.
const FIRST_ANSWER_TOKENS: usize = 64;

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut specs = vec![ModelSpec { id: "chat".into(), path: args.model.clone() }];
    if let Some(path) = &args.embeddings {
        specs.push(ModelSpec { id: "embeddings".into(), path: path.clone() });
    }
    let limits = QueueLimits {
        max_active: args.concurrency.max(1),
        max_queued: args.concurrency.max(1),
        ..QueueLimits::default()
    };
    let started = Instant::now();
    let engine =
        tokio::task::spawn_blocking(move || LocalEngine::load(&specs, limits, &engine::default_device()))
            .await??;
    let load_seconds = started.elapsed().as_secs_f64();
    let bench = Bench { engine, serial: AtomicUsize::new(0) };
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    say(format!("loaded in {load_seconds:.2} s"));
    let runs = args.runs.max(1);

    let mut prefill = Vec::new();
    for _ in 0..runs {
        prefill.push(bench.generate(bench.text_prompt(args.prompt_tokens), 1, true).await?);
    }
    let prompt_rate = median(prefill.iter().map(|t| t.prompt_tokens as f64 / t.total.as_secs_f64()));
    say(format!("prompt: {} tokens, {prompt_rate:.1} tokens/s", prefill[0].prompt_tokens));

    let mut decode = Vec::new();
    for _ in 0..runs {
        decode.push(bench.generate(bench.text_prompt(args.prompt_tokens), args.decode_tokens, true).await?);
    }
    let ttft_cold = median(decode.iter().map(|t| millis(t.first_token)));
    let decode_rate = median(
        decode.iter().map(|t| (t.completion_tokens - 1) as f64 / (t.total - t.first_token).as_secs_f64()),
    );
    say(format!("time to first token: {ttft_cold:.1} ms"));
    say(format!("decode: {} tokens, {decode_rate:.1} tokens/s", decode[0].completion_tokens));
    let one_stream_peak = peak_memory_mib();
    let one_stream_prompt_cache = bench.prompt_cache_mib().await;
    if let Some(peak) = one_stream_peak {
        say(format!(
            "peak memory so far, one request at a time (VmHWM): {peak:.0} MiB, \
             {one_stream_prompt_cache:.0} MiB of it the prompt cache"
        ));
    }

    let mut totals = Vec::new();
    let mut first_tokens = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let concurrent = futures::future::try_join_all(
            (0..args.concurrency)
                .map(|_| bench.generate(bench.text_prompt(args.prompt_tokens), args.decode_tokens, true)),
        )
        .await?;
        let wall = started.elapsed().as_secs_f64();
        let tokens: usize = concurrent.iter().map(|t| t.completion_tokens).sum();
        totals.push(tokens as f64 / wall);
        first_tokens.extend(concurrent.iter().map(|t| millis(t.first_token)));
    }
    let concurrent_rate = median(totals.into_iter());
    let concurrent_ttft = median(first_tokens.into_iter());
    say(format!(
        "{} concurrent requests: {concurrent_rate:.1} tokens/s in total, median time to first token {concurrent_ttft:.1} ms",
        args.concurrency
    ));

    let mut turns = Vec::new();
    for _ in 0..runs {
        turns.push(bench.second_turn().await?);
    }
    let second = SecondTurn {
        prompt_tokens: turns[0].prompt_tokens,
        ttft: median(turns.iter().map(|t| t.ttft)),
        reused: median(turns.iter().map(|t| t.reused as f64)) as u64,
        uncached_ttft: median(turns.iter().map(|t| t.uncached_ttft)),
    };
    say(format!(
        "second chat turn: {} prompt tokens, {} of them from the prompt cache, time to first token {:.1} ms ({:.1} ms with nothing cached)",
        second.prompt_tokens, second.reused, second.ttft, second.uncached_ttft
    ));

    let peak = peak_memory_mib();
    if let Some(peak) = peak {
        say(format!("peak memory (VmHWM): {peak:.0} MiB"));
    }
    if args.json {
        let figures = Figures {
            load_seconds,
            threads: candle_core::utils::get_num_threads(),
            prompt_tokens: prefill[0].prompt_tokens,
            prompt_tokens_per_second: prompt_rate,
            ttft_cold_ms: ttft_cold,
            decode_tokens: decode[0].completion_tokens,
            decode_tokens_per_second: decode_rate,
            concurrency: args.concurrency,
            concurrent_tokens_per_second: concurrent_rate,
            concurrent_ttft_median_ms: concurrent_ttft,
            second_turn_prompt_tokens: second.prompt_tokens,
            second_turn_ttft_ms: second.ttft,
            second_turn_tokens_reused: second.reused,
            second_turn_uncached_ttft_ms: second.uncached_ttft,
            one_stream_peak_rss_mib: one_stream_peak,
            one_stream_prompt_cache_mib: one_stream_prompt_cache,
            peak_rss_mib: peak,
        };
        println!("{}", serde_json::to_string(&figures)?);
    }
    Ok(())
}

struct SecondTurn {
    prompt_tokens: usize,
    ttft: f64,
    reused: u64,
    uncached_ttft: f64,
}

struct Bench {
    engine: LocalEngine,
    /// Numbers the prompts, so that no two begin alike.
    serial: AtomicUsize,
}

impl Bench {
    /// About `tokens` tokens (" the" is one token in byte-level BPE vocabularies) behind a number
    /// no other prompt has, so that the prompt cache finds nothing of it; the figures use the
    /// count the engine reports.
    fn text_prompt(&self, tokens: usize) -> Prompt {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        Prompt::Text(format!("{serial}:{}", " the".repeat(tokens.saturating_sub(2))))
    }

    /// One conversation over two turns: the first answered in full, then the second's time to
    /// first token; and the same second turn once more with a number in front of the system
    /// prompt, which leaves the prompt cache nothing to offer.
    async fn second_turn(&self) -> anyhow::Result<SecondTurn> {
        let message = |role: &str, content: &str| ChatMessage::text(role, content);
        let first = vec![message("system", SYSTEM), message("user", FIRST_QUESTION)];
        let answer = self.generate(Prompt::Chat(first.clone()), FIRST_ANSWER_TOKENS, false).await?;
        let mut second = first;
        second.push(message("assistant", &answer.text));
        second.push(message("user", SECOND_QUESTION));

        let reused_before = self.engine.load().prompt_tokens_reused;
        let cached = self.generate(Prompt::Chat(second.clone()), 8, false).await?;
        let reused = self.engine.load().prompt_tokens_reused - reused_before;

        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        second[0].content = format!("{serial}. {SYSTEM}");
        let uncached = self.generate(Prompt::Chat(second), 8, false).await?;
        Ok(SecondTurn {
            prompt_tokens: cached.prompt_tokens,
            ttft: millis(cached.first_token),
            reused,
            uncached_ttft: millis(uncached.first_token),
        })
    }

    /// What the prompt cache holds once the worker has put away the last generation (it counts
    /// a generation out after keeping its KV cache).
    async fn prompt_cache_mib(&self) -> f64 {
        let started = Instant::now();
        while self.engine.load().in_flight > 0 && started.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.engine.load().prompt_cache_bytes as f64 / (1024.0 * 1024.0)
    }

    async fn generate(&self, prompt: Prompt, max_tokens: usize, ignore_eos: bool) -> anyhow::Result<Timing> {
        let request = GenerateRequest {
            model: "chat".into(),
            prompt,
            params: SamplingParams { temperature: 0.0, max_tokens, ignore_eos, ..SamplingParams::default() },
        };
        let started = Instant::now();
        let mut stream = self.engine.generate(request).await?;
        let mut first_token = None;
        let mut text = String::new();
        while let Some(event) = stream.recv().await {
            match event {
                GenerationEvent::Text(piece) => {
                    first_token.get_or_insert_with(|| started.elapsed());
                    text.push_str(&piece);
                }
                GenerationEvent::Logprobs(_) => {}
                GenerationEvent::Done { usage, .. } => {
                    let total = started.elapsed();
                    return Ok(Timing {
                        first_token: first_token.unwrap_or(total),
                        total,
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        text,
                    });
                }
                GenerationEvent::Error(error) => bail!(error),
            }
        }
        bail!("the generation ended without an answer")
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The process's peak resident memory, from /proc (Linux only).
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("no /proc").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
