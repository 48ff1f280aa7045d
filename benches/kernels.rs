//! The CPU kernels alone: `cargo bench --bench kernels`. For each weight type, a matmul of a
//! 2048 × 2048 matrix against 1 token (decode), 4 and 128 tokens (a prompt), on the engine's
//! compute pool as a forward pass runs it; then the gated activation over 128 tokens of 2048; then
//! attention over a KV cache of 1024 positions in f16 and f32 (one decode step, and a prompt chunk
//! of 64 tokens), shaped as SmolLM2's and gemma-3-270m's.
//! Prints the median time per call and the weight bytes read per second; asserts nothing.
//! `LLMESH_KERNELS=scalar|avx2|vnni` picks a variant, `LLMESH_THREADS` the threads;
//! `cargo bench --bench kernels -- attention` (or `matmul`, `activation`) runs one part.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use llmesh::engine::kernels::activation::{GatedActivation, gated};
use llmesh::engine::kernels::attention::{AttentionShape, attend};
use llmesh::engine::kernels::{Kernels, QuantizedMatrix, WeightType, matmul_fused};

const SIZE: usize = 2048;

/// Median seconds of one call of `run`, over calls for about half a second.
fn median_seconds(mut run: impl FnMut()) -> f64 {
    run();
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(500) || times.len() < 5 {
        let call = Instant::now();
        run();
        times.push(call.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn main() -> candle_core::Result<()> {
    let only = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    let runs = |part: &str| only.as_deref().is_none_or(|only| only == part);
    let kernels = Kernels::detect();
    println!("kernels: {:?}", kernels.variant);
    if runs("matmul") {
        matmuls(&kernels)?;
    }
    if runs("activation") {
        activations();
    }
    if runs("attention") {
        attention();
    }
    Ok(())
}

/// Each weight type's matmul against 1, 4 and 128 tokens.
fn matmuls(kernels: &Kernels) -> candle_core::Result<()> {
    let weights = Tensor::from_vec(values(SIZE * SIZE, 1), (SIZE, SIZE), &Device::Cpu)?;
    for dtype in
        [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K]
    {
        let quantized = QTensor::quantize(&weights, dtype)?;
        let bytes = quantized.data()?.to_vec();
        let weight_bytes = bytes.len() as f64;
        let weight_type = WeightType::from_ggml(dtype).expect("a type of ours");
        let matrix = QuantizedMatrix::new(weight_type, SIZE, SIZE, bytes).expect("whole blocks");
        let mut line = format!("{dtype:?}:");
        for tokens in [1, 4, 128] {
            let input = values(tokens * SIZE, 2);
            let mut out = vec![0.0f32; tokens * SIZE];
            let seconds = median_seconds(|| matmul_fused(kernels, &[&matrix], black_box(&input), &mut out));
            line += &format!(
                "  {tokens} tokens {:.1} µs ({:.1} GB/s of weights, {:.2} µs/token)",
                seconds * 1e6,
                weight_bytes / seconds / 1e9,
                seconds * 1e6 / tokens as f64
            );
        }
        println!("{line}");
    }
    Ok(())
}

/// The gated activations over 128 tokens.
fn activations() {
    let fused = values(128 * 2 * SIZE, 3);
    let mut out = vec![0.0f32; 128 * SIZE];
    for activation in [GatedActivation::Silu, GatedActivation::GeluTanh] {
        let seconds = median_seconds(|| gated(activation, black_box(&fused), SIZE, &mut out));
        println!("{activation:?}, 128 tokens of {SIZE}: {:.1} µs", seconds * 1e6);
    }
}

/// One layer's attention over a filled cache of `POSITIONS`.
fn attention() {
    const POSITIONS: usize = 1024;
    // (model, heads, kv_heads, head_dim)
    for (model, heads, kv_heads, head_dim) in [("SmolLM2", 9, 3, 64), ("gemma-3-270m", 4, 1, 256)] {
        let cache = values(kv_heads * POSITIONS * head_dim, 4);
        let halves: Vec<f16> = cache.iter().map(|&v| f16::from_f32(v)).collect();
        let mut line = format!("attention, {model}:");
        for tokens in [1, 64] {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim,
                tokens,
                position: POSITIONS - tokens,
                window: None,
                scale: 0.125,
                softcap: None,
            };
            let queries = values(heads * tokens * head_dim, 5);
            let mut out = vec![0.0f32; tokens * heads * head_dim];
            let stride = POSITIONS * head_dim;
            let f16 =
                median_seconds(|| attend(&shape, black_box(&queries), &halves, &halves, stride, &mut out));
            let f32 =
                median_seconds(|| attend(&shape, black_box(&queries), &cache, &cache, stride, &mut out));
            line += &format!("  {tokens} tokens: f16 {:.1} µs, f32 {:.1} µs", f16 * 1e6, f32 * 1e6);
        }
        println!("{line}");
    }
}
