//! What distinguishes one decoder family from another, read from GGUF metadata: sizes, the rotary
//! embedding's layout and base, and the few structural differences (norms around the blocks,
//! per-head norms, attention biases, the feed-forward activation, sliding-window layers). A new
//! family is a new arm of `DecoderConfig::from_metadata` plus, where the structure
//! truly differs, one more field here. What the tensors themselves say (phi3's fused matrices,
//! Llama 3's `rope_freqs`) the decoder reads at load.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{Result, bail};

use crate::engine::kernels::GatedActivation;

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): llama, mistral (GGUF llama files are converted for this).
    Interleaved,
    /// Pairs (i, i + d/2): gemma, qwen, phi3 ("neox").
    Halves,
}

/// Gemma's local layers: they attend to the last `size` positions only and use their own rotary
/// base; the others are global.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    /// Per layer: whether it is local.
    pub local: Vec<bool>,
    pub rope_base: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
    pub rope_base: f32,
    /// The longest sequence this config runs (the rotary tables are this long).
    pub context_length: usize,
    /// Token embeddings are multiplied by this (gemma: √hidden).
    pub embedding_scale: Option<f32>,
    /// RMS norm on every query and key head before the rotary embedding (gemma3, qwen3).
    pub qk_norm: bool,
    /// Biases added to the query, key and value projections (`attn_q.bias`, …: qwen2).
    pub attention_bias: bool,
    /// RMS norms on the attention and feed-forward outputs too, before the residual add (gemma).
    pub post_norms: bool,
    pub activation: GatedActivation,
    pub sliding_window: Option<SlidingWindow>,
    /// Queries are multiplied by this before the dot products: 1/√head_dim, except gemma 27B.
    pub query_scale: f32,
    /// Attention scores become `cap · tanh(score / cap)` (gemma2).
    pub attention_softcap: Option<f32>,
    /// Logits become `cap · tanh(logit / cap)` (gemma2, optionally gemma3).
    pub final_softcap: Option<f32>,
    /// The window the model was trained on before its rope was scaled
    /// (`rope.scaling.original_context_length`): Phi-3's LongRoPE takes its long factors when
    /// this config's window is longer.
    pub rope_original_context: Option<usize>,
    /// Cosines and sines are multiplied by this (`rope.scaling.attn_factor`; LongRoPE's
    /// √(1 + ln(scale) / ln(original)), 1 elsewhere).
    pub rope_attention_factor: f32,
}

/// The window used when a file declares none; candle-transformers' quantized llama had the same.
const DEFAULT_CONTEXT: usize = 4096;

impl DecoderConfig {
    pub fn from_metadata(architecture: &str, metadata: &HashMap<String, Value>) -> Result<Self> {
        let get = |key: &str| metadata.get(&format!("{architecture}.{key}"));
        let count = |key: &str| -> Result<usize> {
            match get(key) {
                Some(value) => Ok(value.to_u32()? as usize),
                None => bail!("the file has no {architecture}.{key}"),
            }
        };
        let float =
            |key: &str, default: f32| get(key).and_then(|value| value.to_f32().ok()).unwrap_or(default);
        let hidden = count("embedding_length")?;
        let heads = count("attention.head_count")?;
        if heads == 0 {
            bail!("{architecture}.attention.head_count is 0");
        }
        let kv_heads = count("attention.head_count_kv").unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            bail!("{heads} query heads cannot share {kv_heads} key/value heads");
        }
        let context_length = count("context_length").unwrap_or(DEFAULT_CONTEXT);
        let layers = count("block_count")?;
        let head_dim = count("attention.key_length").unwrap_or(hidden / heads);
        let mut config = Self {
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_style: RopeStyle::Interleaved,
            rope_base: float("rope.freq_base", 10_000.0),
            context_length,
            embedding_scale: None,
            qk_norm: false,
            attention_bias: false,
            post_norms: false,
            activation: GatedActivation::Silu,
            sliding_window: None,
            query_scale: 1.0 / (head_dim as f32).sqrt(),
            attention_softcap: None,
            final_softcap: None,
            rope_original_context: count("rope.scaling.original_context_length").ok(),
            rope_attention_factor: float("rope.scaling.attn_factor", 1.0),
        };
        if let Ok(rope_dims) = count("rope.dimension_count")
            && rope_dims != config.head_dim
        {
            bail!("partial rotary embeddings ({rope_dims} of {} dims) are not supported", config.head_dim);
        }
        match architecture {
            "llama" => {}
            "qwen2" => {
                config.rope_style = RopeStyle::Halves;
                config.attention_bias = true;
            }
            "phi3" => {
                // llama.cpp leaves phi3's `attention.sliding_window` off (its conversions get it
                // wrong), and so does this decoder, to compute the same function.
                config.rope_style = RopeStyle::Halves;
            }
            "qwen3" => {
                config.rope_style = RopeStyle::Halves;
                config.qk_norm = true;
            }
            "gemma2" | "gemma3" => {
                // As llama.cpp's `llama_model_gemma2` / `llama_model_gemma3`.
                let gemma3 = architecture == "gemma3";
                config.rope_style = RopeStyle::Halves;
                config.embedding_scale = Some((hidden as f32).sqrt());
                config.post_norms = true;
                config.activation = GatedActivation::GeluTanh;
                config.qk_norm = gemma3;
                // The 27B models scale queries by the width per head, not the head size.
                if layers == if gemma3 { 62 } else { 46 } {
                    config.query_scale = 1.0 / (hidden as f32 / heads as f32).sqrt();
                }
                let (window, pattern) = if gemma3 {
                    config.rope_base = float("rope.freq_base", 1_000_000.0);
                    config.final_softcap = get("final_logit_softcapping").and_then(|v| v.to_f32().ok());
                    (count("attention.sliding_window").unwrap_or(0), 6)
                } else {
                    config.attention_softcap = Some(float("attn_logit_softcapping", 50.0));
                    config.final_softcap = Some(float("final_logit_softcapping", 30.0));
                    (count("attention.sliding_window").unwrap_or(4096), 2)
                };
                let rope_base = if gemma3 { 10_000.0 } else { config.rope_base };
                if window > 0 {
                    config.sliding_window = Some(SlidingWindow {
                        size: window,
                        local: local_layers(get("attention.sliding_window_pattern"), pattern, layers)?,
                        rope_base: float("rope.freq_base_swa", rope_base),
                    });
                }
            }
            other => bail!("the decoder has no configuration for architecture '{other}'"),
        }
        if count("expert_count").unwrap_or(0) > 1 {
            bail!("mixture-of-experts models are not supported");
        }
        Ok(config)
    }

    /// The window of layer `layer`: `Some(size)` for a sliding-window layer.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window.as_ref()?;
        window.local.get(layer).copied().unwrap_or(false).then_some(window.size)
    }

    pub fn rope_base_of(&self, layer: usize) -> f32 {
        match &self.sliding_window {
            Some(window) if self.window_of(layer).is_some() => window.rope_base,
            _ => self.rope_base,
        }
    }
}

/// Which layers are local: `attention.sliding_window_pattern` as one flag per layer, or as `n`
/// (of every `n` layers, all but the last are local; 0: all are), else the family's `n`.
fn local_layers(pattern: Option<&Value>, default: usize, layers: usize) -> Result<Vec<bool>> {
    let every = |n: usize| (0..layers).map(|layer| n == 0 || layer % n < n - 1).collect();
    match pattern {
        None => Ok(every(default)),
        Some(Value::Array(flags)) => {
            if flags.len() != layers {
                bail!("attention.sliding_window_pattern has {} flags for {layers} layers", flags.len());
            }
            flags.iter().map(|flag| flag.to_bool()).collect()
        }
        Some(value) => Ok(every(value.to_u32()? as usize)),
    }
}
