//! llmesh's own decoder-only transformer, one implementation for llama, qwen2, qwen3, phi3, gemma2 and
//! gemma3 (`DecoderConfig` holds what differs). The weights are read once and shared (`Arc<Decoder>`);
//! each sequence owns a `KvCache`. The forward is split so that a node can run a contiguous
//! range of layers on hidden states it is handed: `embed`, `forward_layers`, `logits`.
//!
//! Tensors are candle tensors, so the same code runs on candle's CUDA and Metal devices; on the
//! CPU the linear layers run llmesh's kernels on the GGUF blocks (`weights::Linear`).

use std::io::{Read, Seek};
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor, bail};

use crate::engine::kernels::attention::AttentionShape;

use super::config::{DecoderConfig, RopeStyle};
use super::cpu_attention::CpuAttention;
use super::kv_cache::KvCache;
use super::weights::{Linear, TokenEmbedding, WeightReader};
use super::{BatchEntry, LanguageModel, Sequence};

/// RMS norm weights with their epsilon.
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load<R: Read + Seek>(weights: &mut WeightReader<'_, R>, name: &str, eps: f32) -> Result<Self> {
        Ok(Self { weight: weights.vector(name)?, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// Rotary embeddings of one base. The angles of the positions a step needs are computed for that
/// step (a few hundred values), rather than tables for the whole window kept in memory.
struct Rope {
    frequencies: Vec<f32>,
    style: RopeStyle,
    /// Cosines and sines are multiplied by this (LongRoPE's attention factor).
    scale: f32,
}

/// Cosine and sine, `(tokens, head_dim / 2)`, of one step's positions.
struct RopeAngles {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rope {
    /// `factors` divide the frequencies one by one: Llama 3's rope scaling and Phi-3's LongRoPE,
    /// which their files store ready-made (one factor per pair of dimensions).
    fn new(config: &DecoderConfig, base: f32, factors: Option<&[f32]>) -> Self {
        let half = config.head_dim / 2;
        let frequencies = (0..half)
            .map(|i| {
                let factor = factors.map_or(1.0, |factors| factors[i]);
                1.0 / base.powf(2.0 * i as f32 / config.head_dim as f32) / factor
            })
            .collect();
        Self { frequencies, style: config.rope_style, scale: config.rope_attention_factor }
    }

    /// The angles of every row of a batch step: each sequence's rows at its own positions.
    fn angles(&self, spans: &[Span], device: &Device) -> Result<RopeAngles> {
        let rows: usize = spans.iter().map(|span| span.tokens).sum();
        let mut angles = Vec::with_capacity(rows * self.frequencies.len());
        for span in spans {
            for position in span.position..span.position + span.tokens {
                angles.extend(self.frequencies.iter().map(|frequency| position as f32 * frequency));
            }
        }
        let angles = Tensor::from_vec(angles, (rows, self.frequencies.len()), device)?;
        let (mut cos, mut sin) = (angles.cos()?, angles.sin()?);
        if self.scale != 1.0 {
            cos = (cos * f64::from(self.scale))?;
            sin = (sin * f64::from(self.scale))?;
        }
        Ok(RopeAngles { cos, sin, style: self.style })
    }
}

impl RopeAngles {
    /// `x` is `(1, heads, rows, head_dim)`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x.contiguous()?, &self.cos, &self.sin),
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin),
        }
    }
}

/// Where one sequence's rows sit in a batch step: `tokens` rows, the first at `position` in that
/// sequence. A step's hidden states are the spans' rows one after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub position: usize,
    pub tokens: usize,
}

impl Span {
    fn end(&self) -> usize {
        self.position + self.tokens
    }
}

struct Layer {
    attention_norm: RmsNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    /// Query, key and value biases, where the family has them.
    biases: Option<[Tensor; 3]>,
    query_norm: Option<RmsNorm>,
    key_norm: Option<RmsNorm>,
    post_attention_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<RmsNorm>,
    /// Index into `Decoder::ropes` (layers of one base share it).
    rope: usize,
    window: Option<usize>,
}

pub struct Decoder {
    config: DecoderConfig,
    embedding: TokenEmbedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    ropes: Vec<Rope>,
    device: Device,
    /// What each sequence's KV cache stores (`default_cache_type`).
    cache_type: DType,
}

/// f16 on the CPU, whose attention kernel widens it as it reads; f32 on other devices, where
/// candle's matmul runs attention and f16 has not been measured.
pub fn default_cache_type(device: &Device) -> DType {
    if device.is_cpu() { DType::F16 } else { DType::F32 }
}

impl Decoder {
    pub fn load<R: Read + Seek>(
        config: DecoderConfig,
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let mut weights = WeightReader::new(content, reader, device);
        let (embedding, output) = weights.embeddings("token_embd.weight", "output.weight")?;
        if embedding.columns() != config.hidden {
            bail!("token embeddings of {} values in a model of width {}", embedding.columns(), config.hidden);
        }
        // Llama 3's `rope_freqs`, or Phi-3's LongRoPE: long factors when this window is longer
        // than the one the model was trained on, else short ones (as llama.cpp picks them).
        let longrope = match config.rope_original_context {
            Some(original) if config.context_length > original => "rope_factors_long.weight",
            _ => "rope_factors_short.weight",
        };
        let factors_name = ["rope_freqs.weight", longrope].into_iter().find(|name| weights.contains(name));
        let rope_factors = match factors_name {
            Some(name) => {
                let factors = weights.vector(name)?.to_vec1::<f32>()?;
                if factors.len() != config.head_dim / 2 {
                    bail!("{name} holds {} factors for heads of {} dims", factors.len(), config.head_dim);
                }
                Some(factors)
            }
            None => None,
        };
        let eps = config.rms_eps;
        let norm = RmsNorm::load(&mut weights, "output_norm.weight", eps)?;
        let mut rope_bases: Vec<f32> = Vec::new();
        let mut layers = Vec::with_capacity(config.layers);
        for index in 0..config.layers {
            let name = |part: &str| format!("blk.{index}.{part}.weight");
            let optional_norm = |weights: &mut WeightReader<'_, R>, part: &str, wanted: bool| {
                wanted.then(|| RmsNorm::load(weights, &name(part), eps)).transpose()
            };
            let base = config.rope_base_of(index);
            let rope = match rope_bases.iter().position(|&known| known == base) {
                Some(known) => known,
                None => {
                    rope_bases.push(base);
                    rope_bases.len() - 1
                }
            };
            let biases = match config.attention_bias {
                true => Some([
                    weights.vector(&format!("blk.{index}.attn_q.bias"))?,
                    weights.vector(&format!("blk.{index}.attn_k.bias"))?,
                    weights.vector(&format!("blk.{index}.attn_v.bias"))?,
                ]),
                false => None,
            };
            // phi3 stores q|k|v as one matrix, and gate|up as one `ffn_up` without an `ffn_gate`.
            let [query, key, value] = if weights.contains(&name("attn_qkv")) {
                let (width, kv_width) = (config.heads * config.head_dim, config.kv_heads * config.head_dim);
                three(weights.linear_parts(&name("attn_qkv"), &[width, kv_width, kv_width])?)?
            } else {
                [
                    weights.linear(&name("attn_q"))?,
                    weights.linear(&name("attn_k"))?,
                    weights.linear(&name("attn_v"))?,
                ]
            };
            let [gate, up] = if weights.contains(&name("ffn_gate")) {
                [weights.linear(&name("ffn_gate"))?, weights.linear(&name("ffn_up"))?]
            } else {
                let fused = &name("ffn_up");
                let rows = weights.rows(fused)?;
                two(weights.linear_parts(fused, &[rows / 2, rows / 2])?)?
            };
            layers.push(Layer {
                attention_norm: RmsNorm::load(&mut weights, &name("attn_norm"), eps)?,
                query,
                key,
                value,
                output: weights.linear(&name("attn_output"))?,
                biases,
                query_norm: optional_norm(&mut weights, "attn_q_norm", config.qk_norm)?,
                key_norm: optional_norm(&mut weights, "attn_k_norm", config.qk_norm)?,
                post_attention_norm: optional_norm(&mut weights, "post_attention_norm", config.post_norms)?,
                ffn_norm: RmsNorm::load(&mut weights, &name("ffn_norm"), eps)?,
                gate,
                up,
                down: weights.linear(&name("ffn_down"))?,
                post_ffn_norm: optional_norm(&mut weights, "post_ffw_norm", config.post_norms)?,
                rope,
                window: config.window_of(index),
            });
        }
        let ropes =
            rope_bases.iter().map(|&base| Rope::new(&config, base, rope_factors.as_deref())).collect();
        let cache_type = default_cache_type(device);
        let decoder =
            Self { config, embedding, layers, norm, output, ropes, device: device.clone(), cache_type };
        tracing::debug!(native = decoder.runs_natively(), "decoder loaded");
        Ok(decoder)
    }

    /// Whether every linear layer runs on llmesh's CPU kernels.
    pub fn runs_natively(&self) -> bool {
        self.output.is_native()
            && self.layers.iter().all(|layer| {
                [&layer.query, &layer.key, &layer.value, &layer.output, &layer.gate, &layer.up, &layer.down]
                    .iter()
                    .all(|linear| linear.is_native())
            })
    }

    /// Store the KV cache as `dtype` (F16 or F32) instead of the device's default.
    pub fn with_cache_type(self, dtype: DType) -> Self {
        Self { cache_type: dtype, ..self }
    }

    /// A fresh KV cache for every layer.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.layers, self.config.context_length, self.cache_type)
    }

    /// Hidden states `(tokens, hidden)` of `tokens`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let hidden = self.embedding.forward(tokens)?;
        match self.config.embedding_scale {
            Some(scale) => hidden * f64::from(scale),
            None => Ok(hidden),
        }
    }

    /// Run `layers` on one step's `hidden` states (`(rows, hidden)`: the rows of every span, in
    /// order), each span appending to its own sequence's caches (`caches[i]` for `spans[i]`); the
    /// hidden states after the last of those layers. The linear layers run once on all rows, so
    /// every weight is read once per step for the whole batch; attention runs per sequence.
    pub fn forward_layers(
        &self,
        caches: &mut [&mut KvCache],
        spans: &[Span],
        mut hidden: Tensor,
        layers: Range<usize>,
    ) -> Result<Tensor> {
        let Some(selected) = self.layers.get(layers.clone()) else {
            bail!("layers {layers:?} are outside the model's {}", self.layers.len())
        };
        let rows: usize = spans.iter().map(|span| span.tokens).sum();
        if spans.is_empty() || caches.len() != spans.len() || hidden.dim(0)? != rows {
            bail!(
                "{} spans of {rows} rows, {} caches, {} hidden rows",
                spans.len(),
                caches.len(),
                hidden.dim(0)?
            );
        }
        if let Some(span) = spans.iter().find(|span| span.end() > self.config.context_length) {
            bail!("position {} is beyond the context window of {}", span.end(), self.config.context_length);
        }
        let angles: Vec<RopeAngles> =
            self.ropes.iter().map(|rope| rope.angles(spans, &self.device)).collect::<Result<_>>()?;
        for (index, layer) in layers.zip(selected) {
            hidden = self.layer_forward(layer, index, caches, spans, &hidden, &angles[layer.rope])?;
        }
        Ok(hidden)
    }

    /// Logits `(spans, vocabulary)`: for each span, those predicting the token after its last row.
    pub fn logits(&self, hidden: &Tensor, spans: &[Span]) -> Result<Tensor> {
        let mut last_rows = Vec::with_capacity(spans.len());
        let mut end = 0;
        for span in spans {
            end += span.tokens;
            last_rows.push(hidden.narrow(0, end - 1, 1)?);
        }
        let last = Tensor::cat(&last_rows, 0)?;
        let logits = self.output.forward(&self.norm.forward(&last)?)?.to_dtype(DType::F32)?;
        match self.config.final_softcap {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// One step for several sequences: embed, every layer, the logits of each span's last row.
    pub fn forward(&self, caches: &mut [&mut KvCache], spans: &[Span], tokens: &[u32]) -> Result<Tensor> {
        let hidden = self.embed(tokens)?;
        let hidden = self.forward_layers(caches, spans, hidden, 0..self.layers.len())?;
        self.logits(&hidden, spans)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        index: usize,
        caches: &mut [&mut KvCache],
        spans: &[Span],
        hidden: &Tensor,
        rope: &RopeAngles,
    ) -> Result<Tensor> {
        let x = layer.attention_norm.forward(hidden)?;
        let mut attention = self.attention(layer, index, caches, spans, &x, rope)?;
        if let Some(norm) = &layer.post_attention_norm {
            attention = norm.forward(&attention)?;
        }
        let hidden = (hidden + attention)?;
        let x = layer.ffn_norm.forward(&hidden)?;
        let gated = Linear::forward_gated(&layer.gate, &layer.up, self.config.activation, &x)?;
        let mut feed_forward = layer.down.forward(&gated)?;
        if let Some(norm) = &layer.post_ffn_norm {
            feed_forward = norm.forward(&feed_forward)?;
        }
        hidden + feed_forward
    }

    /// Self-attention of every span's rows against its own sequence's cache, `(rows, hidden)`.
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        caches: &mut [&mut KvCache],
        spans: &[Span],
        x: &Tensor,
        rope: &RopeAngles,
    ) -> Result<Tensor> {
        let config = &self.config;
        let (rows, _) = x.dims2()?;
        let (heads, kv_heads, head_dim) = (config.heads, config.kv_heads, config.head_dim);
        // (rows, heads · head_dim) → (1, heads, rows, head_dim)
        let split = |projected: Tensor, heads: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let mut per_head = projected.reshape((1, rows, heads, head_dim))?;
            if let Some(norm) = norm {
                per_head = norm.forward(&per_head)?;
            }
            per_head.transpose(1, 2)?.contiguous()
        };
        let [mut queries, mut keys, mut values]: [Tensor; 3] =
            Linear::forward_fused(&[&layer.query, &layer.key, &layer.value], x)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("three projections expected".into()))?;
        if let Some([query_bias, key_bias, value_bias]) = &layer.biases {
            queries = queries.broadcast_add(query_bias)?;
            keys = keys.broadcast_add(key_bias)?;
            values = values.broadcast_add(value_bias)?;
        }
        let queries = rope.apply(&split(queries, heads, layer.query_norm.as_ref())?)?;
        let keys = rope.apply(&split(keys, kv_heads, layer.key_norm.as_ref())?)?.squeeze(0)?;
        let values = split(values, kv_heads, None)?.squeeze(0)?;
        let mut attended = Vec::with_capacity(spans.len());
        let mut row = 0;
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let rows_of = |t: &Tensor, dim: usize| t.narrow(dim, row, span.tokens)?.contiguous();
            let (queries, keys, values) = (rows_of(&queries, 2)?, rows_of(&keys, 1)?, rows_of(&values, 1)?);
            attended.push(self.attend(layer, index, cache, *span, &queries, &keys, &values)?);
            row += span.tokens;
        }
        let attended = if attended.len() == 1 { attended.remove(0) } else { Tensor::cat(&attended, 0)? };
        layer.output.forward(&attended)
    }

    /// One sequence's attention: `queries` `(1, heads, tokens, head_dim)`, its new `keys` and
    /// `values` `(kv_heads, tokens, head_dim)` appended to its cache; `(tokens, heads · head_dim)`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: &Layer,
        index: usize,
        cache: &mut KvCache,
        span: Span,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<Tensor> {
        let config = &self.config;
        let (heads, kv_heads, head_dim) = (config.heads, config.kv_heads, config.head_dim);
        let Span { position, tokens } = span;
        if cache.len(index) != position {
            bail!("layer {index} holds {} positions, the input starts at {position}", cache.len(index));
        }
        let (keys, values) = cache.append(index, keys, values)?;
        let len = position + tokens;
        if self.device.is_cpu() {
            // Every row computed alike however the prompt was split (see `kernels::attention`).
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim,
                tokens,
                position,
                window: layer.window,
                scale: config.query_scale,
                softcap: config.attention_softcap,
            };
            return queries.apply_op3_no_bwd(&keys, &values, &CpuAttention(shape));
        }

        // Query heads that share a key/value head sit next to each other: group them as extra
        // rows of one matmul per key/value head instead of repeating the cache.
        let (keys, values) = (keys.to_dtype(queries.dtype())?, values.to_dtype(queries.dtype())?);
        let group = heads / kv_heads;
        let queries = queries.reshape((kv_heads, group * tokens, head_dim))?;
        let mut scores = (queries.matmul(&keys.t()?)? * f64::from(config.query_scale))?;
        if let Some(cap) = config.attention_softcap {
            scores = softcap(&scores, cap)?;
        }
        if let Some(mask) = self.mask(tokens, position, layer.window)? {
            scores = scores.reshape((kv_heads, group, tokens, len))?.broadcast_add(&mask)?.reshape((
                kv_heads,
                group * tokens,
                len,
            ))?;
        }
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let attended = weights.matmul(&values)?; // (kv_heads, group · tokens, head_dim)
        attended.reshape((heads, tokens, head_dim))?.transpose(0, 1)?.reshape((tokens, heads * head_dim))
    }

    /// An additive mask `(tokens, position + tokens)`: −∞ where a query may not look (the future;
    /// beyond the window of a sliding-window layer). `None` when nothing is hidden.
    fn mask(&self, tokens: usize, position: usize, window: Option<usize>) -> Result<Option<Tensor>> {
        let len = position + tokens;
        let hidden = |query: usize, key: usize| key > query || window.is_some_and(|size| query - key >= size);
        let any_hidden = tokens > 1 || window.is_some_and(|size| len > size);
        if !any_hidden {
            return Ok(None);
        }
        let mut mask = Vec::with_capacity(tokens * len);
        for row in 0..tokens {
            let query = position + row;
            mask.extend((0..len).map(|key| if hidden(query, key) { f32::NEG_INFINITY } else { 0.0 }));
        }
        Ok(Some(Tensor::from_vec(mask, (tokens, len), &self.device)?))
    }
}

/// `cap · tanh(x / cap)`: gemma2 bounds its attention scores and logits so.
fn softcap(x: &Tensor, cap: f32) -> Result<Tensor> {
    (x / f64::from(cap))?.tanh()? * f64::from(cap)
}

fn three(linears: Vec<Linear>) -> Result<[Linear; 3]> {
    linears.try_into().map_err(|_| candle_core::Error::Msg("three projections expected".into()))
}

fn two(linears: Vec<Linear>) -> Result<[Linear; 2]> {
    linears.try_into().map_err(|_| candle_core::Error::Msg("two projections expected".into()))
}

/// The decoder as the engine holds it.
pub struct DecoderModel(pub Arc<Decoder>);

impl LanguageModel for DecoderModel {
    fn new_sequence(&self) -> Box<dyn Sequence> {
        Box::new(DecoderSequence { cache: self.0.new_cache() })
    }

    fn forward_batch(&self, batch: &mut [BatchEntry<'_>]) -> Result<Tensor> {
        let mut caches = Vec::with_capacity(batch.len());
        let mut spans = Vec::with_capacity(batch.len());
        let mut tokens = Vec::new();
        for entry in batch.iter_mut() {
            let Some(sequence) = entry.sequence.as_any_mut().downcast_mut::<DecoderSequence>() else {
                bail!("a sequence of another model in the batch");
            };
            let span = sequence.prepare(entry.tokens, entry.position)?;
            caches.push(&mut sequence.cache);
            spans.push(span);
            tokens.extend_from_slice(entry.tokens);
        }
        self.0.forward(&mut caches, &spans, &tokens)
    }
}

/// One generation's KV cache.
pub struct DecoderSequence {
    cache: KvCache,
}

impl DecoderSequence {
    /// Check that `tokens` may run from `position`, and drop what the cache holds beyond it (an
    /// earlier position reruns from there).
    fn prepare(&mut self, tokens: &[u32], position: usize) -> Result<Span> {
        if tokens.is_empty() {
            bail!("no tokens to run");
        }
        let held = self.cache.len(0);
        if position > held {
            bail!("position {position} is past the {held} positions the sequence holds");
        }
        self.cache.truncate(position);
        Ok(Span { position, tokens: tokens.len() })
    }
}

impl Sequence for DecoderSequence {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn fork(&self, len: usize) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(DecoderSequence { cache: self.cache.fork(len)? }))
    }

    fn shrink_to_fit(&mut self) -> Result<()> {
        self.cache.shrink_to_fit()
    }

    fn held_bytes(&self) -> usize {
        self.cache.bytes()
    }
}
