//! The decoder against candle-transformers' quantized llama (the implementation it replaces) on
//! small llama GGUFs written here: native Q4_1/Q8_0 kernels and candle's f32 path both, prefill
//! and decode, grouped key/value heads; and the decoder's own invariants (a prompt prefilled at
//! once equals it fed token by token; running the layers in two ranges equals running them all).

use std::io::Cursor;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama;

use super::decoder::{Decoder, Span};
use super::{BatchEntry, DecoderConfig, DecoderModel, LanguageModel, Sequence};

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 128;
const LAYERS: usize = 3;
const VOCAB: usize = 96;

fn pseudo_random(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// A llama GGUF in memory: layer matrices of `matrix_type`, the tied token table of `table_type`.
fn tiny_llama(matrix_type: GgmlDType, table_type: GgmlDType) -> Cursor<Vec<u8>> {
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.context_length", Value::U32(128)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.dimension_count", Value::U32((HIDDEN / HEADS) as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
    ];
    let mut seed = 0;
    let mut tensor = |shape: &[usize], dtype: GgmlDType, norm: bool| {
        seed += 1;
        let len = shape.iter().product();
        let values = if norm {
            pseudo_random(len, seed, 0.2).into_iter().map(|v| v + 1.0).collect()
        } else {
            pseudo_random(len, seed, 0.5)
        };
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
        QTensor::quantize(&tensor, dtype).unwrap()
    };
    let mut tensors = vec![
        ("token_embd.weight".to_string(), tensor(&[VOCAB, HIDDEN], table_type, false)),
        ("output_norm.weight".to_string(), tensor(&[HIDDEN], GgmlDType::F32, true)),
    ];
    let kv = HIDDEN / HEADS * KV_HEADS;
    for layer in 0..LAYERS {
        let name = |part: &str| format!("blk.{layer}.{part}.weight");
        tensors.push((name("attn_norm"), tensor(&[HIDDEN], GgmlDType::F32, true)));
        tensors.push((name("attn_q"), tensor(&[HIDDEN, HIDDEN], matrix_type, false)));
        tensors.push((name("attn_k"), tensor(&[kv, HIDDEN], matrix_type, false)));
        tensors.push((name("attn_v"), tensor(&[kv, HIDDEN], matrix_type, false)));
        tensors.push((name("attn_output"), tensor(&[HIDDEN, HIDDEN], matrix_type, false)));
        tensors.push((name("ffn_norm"), tensor(&[HIDDEN], GgmlDType::F32, true)));
        tensors.push((name("ffn_gate"), tensor(&[FFN, HIDDEN], matrix_type, false)));
        tensors.push((name("ffn_up"), tensor(&[FFN, HIDDEN], matrix_type, false)));
        tensors.push((name("ffn_down"), tensor(&[HIDDEN, FFN], matrix_type, false)));
    }
    let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = Cursor::new(Vec::new());
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
    file
}

fn our_decoder(file: &mut Cursor<Vec<u8>>) -> Decoder {
    file.set_position(0);
    let content = gguf_file::Content::read(file).unwrap();
    let config = DecoderConfig::from_metadata("llama", &content.metadata).unwrap();
    Decoder::load(config, &content, file, &Device::Cpu).unwrap()
}

fn reference(file: &mut Cursor<Vec<u8>>) -> quantized_llama::ModelWeights {
    file.set_position(0);
    let content = gguf_file::Content::read(file).unwrap();
    quantized_llama::ModelWeights::from_gguf(content, file, &Device::Cpu).unwrap()
}

fn argmax(values: &[f32]) -> usize {
    values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap()
}

/// The largest difference relative to the spread of the reference logits.
fn relative_difference(ours: &[f32], theirs: &[f32]) -> f32 {
    let spread = theirs.iter().fold(0.0f32, |max, v| max.max(v.abs()));
    ours.iter().zip(theirs).fold(0.0f32, |max, (a, b)| max.max((a - b).abs())) / spread
}

/// Prefill a prompt, then greedy-decode: the same tokens as candle's quantized llama, and (when
/// given) logits within `tolerance` of its spread.
fn agrees_with_candle(matrix_type: GgmlDType, table_type: GgmlDType, tolerance: Option<f32>) {
    let mut file = tiny_llama(matrix_type, table_type);
    // candle-transformers keeps its cache in f32.
    let model = DecoderModel(std::sync::Arc::new(our_decoder(&mut file).with_cache_type(DType::F32)));
    let mut theirs = reference(&mut file);
    let mut sequence = model.new_sequence();
    let mut tokens: Vec<u32> = vec![3, 17, 42, 5, 88, 11, 60];
    let mut position = 0;
    let mut worst = 0.0f32;
    for step in 0..8 {
        let input = &tokens[position..];
        let ours = model.forward_one(sequence.as_mut(), input, position).unwrap().to_vec1::<f32>().unwrap();
        let tensor = Tensor::new(input, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let reference =
            theirs.forward(&tensor, position).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        worst = worst.max(relative_difference(&ours, &reference));
        assert_eq!(argmax(&ours), argmax(&reference), "step {step}: greedy tokens differ");
        position = tokens.len();
        tokens.push(argmax(&ours) as u32);
    }
    if let Some(tolerance) = tolerance {
        assert!(worst < tolerance, "{matrix_type:?}: logits differ by {worst} of their spread");
    }
}

/// The same weights dequantized to f32, as a GGUF in memory: the model with no rounding of
/// activations at all.
fn dequantized(file: &mut Cursor<Vec<u8>>) -> Cursor<Vec<u8>> {
    file.set_position(0);
    let content = gguf_file::Content::read(file).unwrap();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let values = content.tensor(file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            (name.clone(), QTensor::quantize(&values, GgmlDType::F32).unwrap())
        })
        .collect();
    let metadata: Vec<(&str, &Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensor_refs).unwrap();
    out
}

#[test]
fn native_kernels_are_as_close_to_the_exact_model_as_candles() {
    // Both sides quantize activations to 8 bits, so neither equals the f32 model; ours (f32 block
    // scales) must stay at least as close to it as candle's (f16 scales).
    let tokens = [3u32, 17, 42, 5, 88, 11, 60];
    for matrix_type in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0] {
        let mut file = tiny_llama(matrix_type, GgmlDType::Q8_0);
        let mut exact_file = dequantized(&mut file);
        let run = |decoder: Decoder| {
            // f32 caches, as candle-transformers': only the matmuls differ.
            let model = DecoderModel(std::sync::Arc::new(decoder.with_cache_type(DType::F32)));
            model.forward_one(model.new_sequence().as_mut(), &tokens, 0).unwrap().to_vec1::<f32>().unwrap()
        };
        let exact = run(our_decoder(&mut exact_file));
        let ours = run(our_decoder(&mut file));
        let input = Tensor::new(&tokens[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let theirs =
            reference(&mut file).forward(&input, 0).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let (ours, theirs) = (relative_difference(&ours, &exact), relative_difference(&theirs, &exact));
        assert!(ours < 0.05 && ours <= theirs * 1.25, "{matrix_type:?}: ours {ours}, candle's {theirs}");
    }
}

#[test]
fn f32_weights_on_candle_matmuls_match_candle_transformers() {
    agrees_with_candle(GgmlDType::F32, GgmlDType::F32, Some(1e-4));
}

#[test]
fn native_q4_1_and_q8_0_kernels_match_candle_transformers() {
    agrees_with_candle(GgmlDType::Q4_1, GgmlDType::Q8_0, None);
}

#[test]
fn native_q4_0_and_q5_kernels_match_candle_transformers() {
    agrees_with_candle(GgmlDType::Q4_0, GgmlDType::Q8_0, None);
    agrees_with_candle(GgmlDType::Q5_0, GgmlDType::Q5_1, None);
}

#[test]
fn quantized_layers_run_on_native_kernels() {
    let mut file = tiny_llama(GgmlDType::Q4_1, GgmlDType::Q8_0);
    let decoder = our_decoder(&mut file);
    assert!(decoder.runs_natively());
    let mut file = tiny_llama(GgmlDType::F32, GgmlDType::F32);
    assert!(!our_decoder(&mut file).runs_natively());
}

#[test]
fn a_prompt_at_once_equals_the_prompt_token_by_token() {
    let mut file = tiny_llama(GgmlDType::Q8_0, GgmlDType::Q8_0);
    let model = DecoderModel(std::sync::Arc::new(our_decoder(&mut file)));
    let tokens = [9u32, 8, 7, 6, 5, 4, 3, 2, 1, 0];
    let at_once =
        model.forward_one(model.new_sequence().as_mut(), &tokens, 0).unwrap().to_vec1::<f32>().unwrap();
    let mut sequence = model.new_sequence();
    let mut last = Vec::new();
    for (position, token) in tokens.iter().enumerate() {
        last = model.forward_one(sequence.as_mut(), &[*token], position).unwrap().to_vec1::<f32>().unwrap();
    }
    assert!(last.iter().zip(&at_once).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn layers_run_in_two_ranges_equal_all_layers_at_once() {
    let mut file = tiny_llama(GgmlDType::Q4_1, GgmlDType::Q8_0);
    let decoder = our_decoder(&mut file);
    let tokens = [1u32, 2, 3, 4];
    let spans = [Span { position: 0, tokens: 4 }];
    let embedded = || decoder.embed(&tokens).unwrap();
    let mut whole = decoder.new_cache();
    let all = decoder.forward_layers(&mut [&mut whole], &spans, embedded(), 0..LAYERS).unwrap();
    let mut split = decoder.new_cache();
    let first = decoder.forward_layers(&mut [&mut split], &spans, embedded(), 0..1).unwrap();
    let second = decoder.forward_layers(&mut [&mut split], &spans, first, 1..LAYERS).unwrap();
    let difference = (all - second).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(difference, 0.0);
    let later = [Span { position: 4, tokens: 4 }];
    assert!(decoder.forward_layers(&mut [&mut split], &later, embedded(), 0..LAYERS + 1).is_err());
}

#[test]
fn tokens_outside_the_vocabulary_and_the_window_are_errors() {
    let mut file = tiny_llama(GgmlDType::Q8_0, GgmlDType::Q8_0);
    let model = DecoderModel(std::sync::Arc::new(our_decoder(&mut file)));
    let mut sequence = model.new_sequence();
    assert!(model.forward_one(sequence.as_mut(), &[VOCAB as u32], 0).is_err());
    assert!(model.forward_one(sequence.as_mut(), &[1], 5).is_err(), "a gap in positions");
    assert!(model.forward_one(sequence.as_mut(), &vec![1; 129], 0).is_err(), "beyond the context window");
}

/// Greedy tokens of `prompts`, run either one sequence at a time or all in one batch per step
/// (prompts of different lengths, so the sequences sit at different positions).
fn greedy(model: &DecoderModel, prompts: &[Vec<u32>], steps: usize, batched: bool) -> Vec<Vec<u32>> {
    let mut sequences: Vec<Box<dyn Sequence>> = prompts.iter().map(|_| model.new_sequence()).collect();
    let mut tokens: Vec<Vec<u32>> = prompts.to_vec();
    let mut positions = vec![0; prompts.len()];
    for _ in 0..steps {
        let logits: Vec<Vec<f32>> = if batched {
            let mut batch: Vec<BatchEntry<'_>> = sequences
                .iter_mut()
                .zip(&tokens)
                .zip(&positions)
                .map(|((sequence, tokens), &position)| BatchEntry {
                    sequence: sequence.as_mut(),
                    tokens: &tokens[position..],
                    position,
                })
                .collect();
            model.forward_batch(&mut batch).unwrap().to_vec2::<f32>().unwrap()
        } else {
            sequences
                .iter_mut()
                .zip(&tokens)
                .zip(&positions)
                .map(|((sequence, tokens), &position)| {
                    model
                        .forward_one(sequence.as_mut(), &tokens[position..], position)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect()
        };
        for ((logits, tokens), position) in logits.iter().zip(&mut tokens).zip(&mut positions) {
            *position = tokens.len();
            tokens.push(argmax(logits) as u32);
        }
    }
    tokens.iter().zip(prompts).map(|(tokens, prompt)| tokens[prompt.len()..].to_vec()).collect()
}

#[test]
fn a_batch_step_gives_each_sequence_what_it_gets_alone() {
    let mut file = tiny_llama(GgmlDType::Q4_1, GgmlDType::Q8_0);
    let model = DecoderModel(std::sync::Arc::new(our_decoder(&mut file)));
    let prompts = vec![vec![3u32, 17, 42, 5, 88], vec![9, 8], vec![60, 61, 62, 63, 64, 65, 66, 67, 1]];
    let alone = greedy(&model, &prompts, 12, false);
    let together = greedy(&model, &prompts, 12, true);
    assert_eq!(alone, together);
    assert!(alone.iter().any(|tokens| tokens != &alone[0]), "the prompts should lead apart");
}

#[test]
fn a_batch_with_a_foreign_or_empty_entry_is_refused() {
    let mut file = tiny_llama(GgmlDType::Q8_0, GgmlDType::Q8_0);
    let model = DecoderModel(std::sync::Arc::new(our_decoder(&mut file)));
    let mut sequence = model.new_sequence();
    let mut batch = [BatchEntry { sequence: sequence.as_mut(), tokens: &[], position: 0 }];
    assert!(model.forward_batch(&mut batch).is_err());
    assert!(model.forward_batch(&mut []).is_err());
}

/// A row's result does not depend on how its prompt was split into steps: the prompt cache
/// resumes a prompt after the prefix it holds, and the scheduler cuts long prompts into chunks,
/// so the same prompt must give the same logits, to the bit, however it is cut.
#[test]
fn a_prompt_split_anywhere_gives_the_same_logits_to_the_bit() {
    let mut file = tiny_llama(GgmlDType::Q4_1, GgmlDType::Q8_0);
    let model = DecoderModel(std::sync::Arc::new(our_decoder(&mut file)));
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % VOCAB as u32).collect();
    let whole =
        model.forward_one(model.new_sequence().as_mut(), &tokens, 0).unwrap().to_vec1::<f32>().unwrap();
    for cut in 1..tokens.len() {
        let differing = logits_differing_when_cut(&model, &tokens, cut, &whole);
        assert_eq!(differing, 0, "cut after {cut} tokens: {differing} logits differ");
    }
}

/// How many of `whole` (the logits of `prompt` run in one step) differ, to the bit, from those of
/// the same prompt run as two steps cut after `cut` tokens.
pub(super) fn logits_differing_when_cut(
    model: &dyn LanguageModel,
    prompt: &[u32],
    cut: usize,
    whole: &[f32],
) -> usize {
    let mut sequence = model.new_sequence();
    model.forward_one(sequence.as_mut(), &prompt[..cut], 0).unwrap();
    let split = model.forward_one(sequence.as_mut(), &prompt[cut..], cut).unwrap().to_vec1::<f32>().unwrap();
    whole.iter().zip(&split).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
}
