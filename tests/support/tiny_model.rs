//! A tiny llama-architecture GGUF written on the fly: random weights, a byte-level BPE vocabulary
//! covering printable ASCII, ChatML special tokens. Real enough to run through the whole engine in
//! milliseconds, with no download.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

const DIM: usize = 16;
const HEADS: usize = 2;
const FFN: usize = 32;
const LAYERS: usize = 2;
pub const CONTEXT: usize = 256;

/// The vocabulary: specials first, then byte-level symbols for printable ASCII, space ('Ġ') and
/// newline ('Ċ'), then a few merged tokens.
fn vocabulary() -> (Vec<String>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    tokens.extend((b'!'..=b'~').map(|b| (b as char).to_string()));
    tokens.push("Ġ".into());
    tokens.push("Ċ".into());
    let merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"];
    for merge in merges {
        tokens.push(merge.replace(' ', ""));
    }
    (tokens, merges.map(String::from).to_vec())
}

fn pseudo_random(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// Write the model to `path`.
pub fn write_tiny_llama(path: &Path) {
    write_tiny_llama_with_context(path, CONTEXT as u32);
}

/// The same model declaring a context window of `context` tokens.
pub fn write_tiny_llama_with_context(path: &Path, context: u32) {
    let (tokens, merges) = vocabulary();
    let vocab = tokens.len();
    let strings = |items: &[String]| Value::Array(items.iter().cloned().map(Value::String).collect());
    let token_types: Vec<Value> = (0..vocab).map(|i| Value::I32(if i < 3 { 3 } else { 1 })).collect();
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.file_type", Value::U32(0)),
        ("llama.context_length", Value::U32(context)),
        ("llama.embedding_length", Value::U32(DIM as u32)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(HEADS as u32)),
        ("llama.rope.dimension_count", Value::U32((DIM / HEADS) as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.token_type", Value::Array(token_types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    let device = Device::Cpu;
    let mut seed = 0;
    let mut tensor = |shape: &[usize], ones: bool| {
        seed += 1;
        let len = shape.iter().product();
        let data = if ones { vec![1.0; len] } else { pseudo_random(len, seed, 0.8) };
        let tensor = Tensor::from_vec(data, shape, &device).expect("tensor");
        QTensor::quantize(&tensor, GgmlDType::F32).expect("quantize")
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), tensor(&[vocab, DIM], false)),
        ("output_norm.weight".into(), tensor(&[DIM], true)),
        ("output.weight".into(), tensor(&[vocab, DIM], false)),
    ];
    for layer in 0..LAYERS {
        let name = |part: &str| format!("blk.{layer}.{part}.weight");
        tensors.push((name("attn_q"), tensor(&[DIM, DIM], false)));
        tensors.push((name("attn_k"), tensor(&[DIM, DIM], false)));
        tensors.push((name("attn_v"), tensor(&[DIM, DIM], false)));
        tensors.push((name("attn_output"), tensor(&[DIM, DIM], false)));
        tensors.push((name("attn_norm"), tensor(&[DIM], true)));
        tensors.push((name("ffn_gate"), tensor(&[FFN, DIM], false)));
        tensors.push((name("ffn_up"), tensor(&[FFN, DIM], false)));
        tensors.push((name("ffn_down"), tensor(&[DIM, FFN], false)));
        tensors.push((name("ffn_norm"), tensor(&[DIM], true)));
    }
    let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).expect("create model file");
    candle_core::quantized::gguf_file::write(&mut file, &metadata_refs, &tensor_refs).expect("write gguf");
}
