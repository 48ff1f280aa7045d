//! `llmesh bench`: prompt and decode speed of a chat model on this machine, through the same
//! engine and worker thread that serve requests. Prints figures; asserts nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::engine::{
    self, Engine, GenerateRequest, GenerationEvent, LocalEngine, ModelSpec, Prompt, QueueLimits,
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
}

struct Timing {
    first_token: Duration,
    total: Duration,
    prompt_tokens: usize,
    completion_tokens: usize,
}

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
    println!("loaded in {:.2} s", started.elapsed().as_secs_f64());

    // " the" is one token in byte-level BPE vocabularies, so the prompt has about N tokens;
    // the figures use the count the engine reports.
    let prompt = " the".repeat(args.prompt_tokens);
    let runs = args.runs.max(1);

    let mut prefill = Vec::new();
    for _ in 0..runs {
        prefill.push(generate(&engine, &prompt, 1).await?);
    }
    let prefill_rate = median(prefill.iter().map(|t| t.prompt_tokens as f64 / t.total.as_secs_f64()));
    println!("prompt: {} tokens, {prefill_rate:.1} tokens/s", prefill[0].prompt_tokens);

    let mut decode = Vec::new();
    for _ in 0..runs {
        decode.push(generate(&engine, &prompt, args.decode_tokens).await?);
    }
    let first_token = median(decode.iter().map(|t| t.first_token.as_secs_f64() * 1000.0));
    let decode_rate = median(
        decode.iter().map(|t| (t.completion_tokens - 1) as f64 / (t.total - t.first_token).as_secs_f64()),
    );
    println!("time to first token: {first_token:.1} ms");
    println!("decode: {} tokens, {decode_rate:.1} tokens/s", decode[0].completion_tokens);

    let started = Instant::now();
    let concurrent = futures::future::try_join_all(
        (0..args.concurrency).map(|_| generate(&engine, &prompt, args.decode_tokens)),
    )
    .await?;
    let wall = started.elapsed().as_secs_f64();
    let tokens: usize = concurrent.iter().map(|t| t.completion_tokens).sum();
    println!(
        "{} concurrent requests: {tokens} tokens in {wall:.2} s, {:.1} tokens/s in total",
        args.concurrency,
        tokens as f64 / wall
    );
    if let Some(peak) = peak_memory_mib() {
        println!("peak memory (VmHWM): {peak:.0} MiB");
    }
    Ok(())
}

async fn generate(engine: &LocalEngine, prompt: &str, max_tokens: usize) -> anyhow::Result<Timing> {
    let request = GenerateRequest {
        model: "chat".into(),
        prompt: Prompt::Text(prompt.to_string()),
        params: SamplingParams {
            temperature: 0.0,
            max_tokens,
            ignore_eos: true,
            ..SamplingParams::default()
        },
    };
    let started = Instant::now();
    let mut stream = engine.generate(request).await?;
    let mut first_token = None;
    while let Some(event) = stream.recv().await {
        match event {
            GenerationEvent::Text(_) => {
                first_token.get_or_insert_with(|| started.elapsed());
            }
            GenerationEvent::Done { usage, .. } => {
                let total = started.elapsed();
                return Ok(Timing {
                    first_token: first_token.unwrap_or(total),
                    total,
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                });
            }
            GenerationEvent::Error(error) => bail!(error),
        }
    }
    bail!("the generation ended without an answer")
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
