//! llmesh against the reference engine on the demo models: llama.cpp's prompt tokens, greedy
//! tokens and top logits, kept in `tests/fixtures/reference/` by
//! `scripts/make-reference-fixtures.sh`, for each model file as stored and for the same weights
//! dequantized to f32. A fixture runs when its model file is present: SmolLM2 must be
//! (`scripts/fetch-models.sh`); gemma-3-270m is skipped, saying so, unless fetched
//! (`LLMESH_FETCH_GEMMA=1`, as `scripts/test.sh` does).
//!
//! Every step is teacher-forced on llama.cpp's token: while our argmax agrees this is exactly a
//! greedy run, and after a disagreement the logits still compare like with like.

use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device};
use serde::Deserialize;

use super::tests::logits_differing_when_cut;
use super::{Decoder, DecoderConfig, DecoderModel, LanguageModel, open_language_model};
use crate::engine::tokenizer_from_metadata;

/// What the reference program (`scripts/reference/greedy_reference.cpp`) writes.
#[derive(Deserialize)]
struct Fixture {
    /// The model file's name in the models folder.
    model: String,
    /// Run on that file's weights dequantized to f32 rather than on the file itself.
    dequantized: bool,
    reference: String,
    /// What llama.cpp's KV cache stored, "f16" or "f32"; llmesh's is made the same.
    kv_cache: String,
    cases: Vec<Case>,
}

impl Fixture {
    fn cache_type(&self) -> DType {
        match self.kv_cache.as_str() {
            "f16" => DType::F16,
            "f32" => DType::F32,
            other => panic!("{}: a KV cache of {other:?}", self.model),
        }
    }
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    prompt_tokens: Vec<u32>,
    generated_tokens: Vec<u32>,
    /// Per step, llama.cpp's largest logits, largest first: (token id, logit).
    top_logits: Vec<Vec<(u32, f32)>>,
}

/// How closely llmesh must follow a fixture.
struct Bounds {
    /// The most one of our logits may differ from llama.cpp's for the same token.
    logit: f32,
    /// Our greedy token may differ from llama.cpp's only where llama.cpp itself rates ours within
    /// this of its choice (a near-tie), and at no more than one step in ten.
    tie: f32,
    /// The most the median difference over all compared logits may be: noise averages out here,
    /// a systematic error does not.
    median: f32,
}

/// On the files as stored. Both engines quantize every matmul's input to 8-bit blocks, and that
/// rounding is discontinuous: a summation order that differs in the last bit flips some roundings,
/// and the flips grow through the layers into differences the size of the quantization noise
/// itself. So token-for-token equality over 64 steps holds for neither engine against the other,
/// nor for llama.cpp against itself: run with only the prompt fed token by token instead of in
/// one batch, llama.cpp's logits move by up to 0.61 at once and its greedy output departs from its
/// own within 2 to 27 steps on four of the five SmolLM2 prompts. Our token may therefore differ at
/// a near-tie. Both engines keep their KV cache in f16 here, as they do by default (llama.cpp also
/// rounds the queries and the softmax weights to f16 for its matmuls; llmesh keeps them f32).
/// Measured on the fixtures (5 prompts × 64 steps), llmesh against llama.cpp:
///
/// | model   | largest | median | other token at a near-tie | (f32 caches, before) |
/// |---------|---------|--------|---------------------------|----------------------|
/// | SmolLM2 | 0.99    | 0.13   | 9 of 320 steps            | 1.06, 0.14, 8        |
/// | gemma3  | 1.41    | 0.16   | 6 of 320 steps            | 1.31, 0.19, 7        |
///
/// on logits of 10 to 40; each engine against the exact f32 computation differs by as much
/// (llama.cpp up to 1.39, llmesh up to 1.74). The bounds leave room for another CPU's summation
/// order (another draw of the noise) yet catch a crude kernel bug: activations rounded toward
/// zero instead of to the nearest give SmolLM2 a largest difference of 1.98 and a median of 0.36.
/// The rest of the decoder is held far tighter by the dequantized fixtures.
const AS_STORED_SMOLLM2: Bounds = Bounds { logit: 1.75, tie: 1.0, median: 0.2 };
const AS_STORED_GEMMA3: Bounds = Bounds { logit: 2.5, tie: 1.0, median: 0.3 };

/// On dequantized weights nothing is rounded to 8 bits, and both caches are f32: both engines
/// compute the same function in f32, and every greedy token agreed. Measured on SmolLM2: at most 4e-5 apart, median 5e-6,
/// where a norm epsilon ten times too small already moves logits by 5e-3 (median 9e-4).
const DEQUANTIZED_SMOLLM2: Bounds = Bounds { logit: 1e-3, tie: 1e-3, median: 1e-4 };

/// As `DEQUANTIZED_SMOLLM2`, but gemma3's GELU is one that llama.cpp reads from an f16 table
/// (ggml-cpu's `GGML_GELU_FP16`), and that rounding is the whole difference: measured at most
/// 0.015 apart over 64 steps (0.010 over the fixture's 16), median 0.0016. A wrong rope base,
/// scale or mask moves logits by far more.
const DEQUANTIZED_GEMMA3: Bounds = Bounds { logit: 0.05, tie: 0.05, median: 0.005 };

/// The tiny random-weight models of one family each (`scripts/make-tiny-models.py`), stored in
/// f32: both engines compute the same f32 function, so they agree as closely as on dequantized
/// weights. The weights are drawn wide (unit embeddings, output rows of 0.5) so that logits spread
/// over several units (top logits 8 to 15; llama.cpp's runner-up is at least 0.014 behind, at the
/// median about 1) and the greedy choice is no coin toss. An f64 numpy forward of the same files
/// is within 2.4e-5 of llama.cpp on every family, with every greedy token the same; the same
/// forward without one family's feature moves logits by units and changes most greedy tokens
/// (without qwen2's biases 15, qwen3's QK norm 15, phi3's gate and up swapped 10, Llama 3's
/// `rope_freqs` 9.4), so 1e-3 leaves f32 summation order room and catches any of those.
const TINY_F32: Bounds = Bounds { logit: 1e-3, tie: 1e-3, median: 1e-4 };

/// Models every checkout must have; the others are optional downloads.
const REQUIRED_MODELS: [&str; 1] = ["SmolLM2-135M-Instruct.Q4_1.gguf"];

fn read_fixture(name: &str) -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture's model file, or `None` (with a message) for an optional one that is missing. The
/// tiny models of `tests/fixtures/tiny/` are committed, so always there.
fn model_file(fixture: &Fixture) -> Option<PathBuf> {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny").join(&fixture.model);
    if fixture.model.starts_with("tiny-") {
        assert!(tiny.is_file(), "{} is missing: run scripts/make-tiny-models.sh", tiny.display());
        return Some(tiny);
    }
    let dir = std::env::var_os("LLMESH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"));
    let path = dir.join(&fixture.model);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        !REQUIRED_MODELS.contains(&fixture.model.as_str()),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    eprintln!(
        "skipped: {} is not here (LLMESH_FETCH_GEMMA=1 scripts/fetch-models.sh fetches it)",
        path.display()
    );
    None
}

/// The decoder on `file`'s weights dequantized to f32, as llama-quantize's F32 output holds them.
fn dequantized_model<R: Read + Seek>(
    content: &gguf_file::Content,
    file: &mut R,
    cache_type: DType,
) -> DecoderModel {
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let values = content.tensor(file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        tensors.push((name.as_str(), QTensor::quantize(&values, GgmlDType::F32).unwrap()));
    }
    let metadata: Vec<_> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<_> = tensors.iter().map(|(name, tensor)| (*name, tensor)).collect();
    let mut f32_file = Cursor::new(Vec::new());
    gguf_file::write(&mut f32_file, &metadata, &tensor_refs).unwrap();
    drop(tensor_refs);
    drop(tensors);
    f32_file.set_position(0);
    let f32_content = gguf_file::Content::read(&mut f32_file).unwrap();
    let architecture = match content.metadata.get("general.architecture") {
        Some(gguf_file::Value::String(name)) => name.clone(),
        other => panic!("general.architecture is {other:?}"),
    };
    let config = DecoderConfig::from_metadata(&architecture, &f32_content.metadata).unwrap();
    let decoder = Decoder::load(config, &f32_content, &mut f32_file, &Device::Cpu).unwrap();
    DecoderModel(Arc::new(decoder.with_cache_type(cache_type)))
}

fn argmax(values: &[f32]) -> u32 {
    // The first of equal maxima, as llama.cpp's scan keeps it.
    let mut best = 0;
    for (index, value) in values.iter().enumerate() {
        if *value > values[best] {
            best = index;
        }
    }
    best as u32
}

/// Tokenize, run and compare every case of the fixture `name`; panics listing every disagreement.
fn agrees_with_llama_cpp(name: &str, bounds: Bounds) {
    let fixture = read_fixture(name);
    let Some(path) = model_file(&fixture) else { return };
    let (model, metadata): (Box<dyn LanguageModel>, _) = if fixture.dequantized {
        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        (Box::new(dequantized_model(&content, &mut file, fixture.cache_type())), content.metadata)
    } else {
        let progress = Default::default();
        let opened = open_language_model(&path, &progress).unwrap();
        let metadata = opened.metadata().clone();
        (opened.load_with_cache_type(&Device::Cpu, fixture.cache_type()).unwrap().model, metadata)
    };
    let tokens = tokenizer_from_metadata(&metadata).unwrap();
    let bos = tokens.bos_token_id.filter(|_| tokens.add_bos_token);

    let mut differences = Vec::new();
    let mut disagreements = Vec::new();
    let (mut steps, mut ties) = (0, 0);
    for case in &fixture.cases {
        // As the engine prepares a prompt (`ChatRunner::submit`): special tokens in the text are
        // matched, BOS goes first when the file asks for it and the text lacks it.
        let mut prompt = tokens.tokenizer.encode(case.prompt.as_str(), false).unwrap().get_ids().to_vec();
        if let Some(bos) = bos
            && prompt.first() != Some(&bos)
        {
            prompt.insert(0, bos);
        }
        assert_eq!(prompt, case.prompt_tokens, "{name}: prompt {:?} tokenized differently", case.prompt);
        assert_eq!(case.top_logits.len(), case.generated_tokens.len(), "{name}: a malformed fixture");

        let mut sequence = model.new_sequence();
        let mut input = case.prompt_tokens.clone();
        let mut position = 0;
        for (step, (expected, top)) in case.generated_tokens.iter().zip(&case.top_logits).enumerate() {
            let logits =
                model.forward_one(sequence.as_mut(), &input, position).unwrap().to_vec1::<f32>().unwrap();
            let ours: Vec<f32> = top.iter().map(|&(token, _)| logits[token as usize]).collect();
            let step_differences: Vec<f32> = ours.iter().zip(top).map(|(o, (_, t))| o - t).collect();
            let chosen = argmax(&logits);
            let their_margin = top.first().zip(top.iter().find(|(token, _)| *token == chosen));
            let near_tie = their_margin.is_some_and(|((_, best), (_, ours))| best - ours <= bounds.tie);
            ties += usize::from(chosen != *expected && near_tie);
            if (chosen != *expected && !near_tie) || step_differences.iter().any(|d| d.abs() > bounds.logit) {
                disagreements.push(format!(
                    "prompt {:?}, step {step}: ours {chosen} ({}), llama.cpp's top {top:?}, ours minus theirs {step_differences:?}",
                    case.prompt, logits[chosen as usize]
                ));
            }
            differences.extend(step_differences.iter().map(|d| d.abs()));
            steps += 1;
            position += input.len();
            input = vec![*expected];
        }
    }
    differences.sort_by(f32::total_cmp);
    let median = differences[differences.len() / 2];
    let largest = differences.last().copied().unwrap_or(0.0);
    eprintln!(
        "{name} ({}): {} prompts, {steps} steps; logits differ by at most {largest}, median {median}; \
         {ties} near-tie steps chose another token",
        fixture.reference,
        fixture.cases.len()
    );
    assert!(
        disagreements.is_empty(),
        "{name} disagrees with llama.cpp (a greedy token that was no near-tie, or a logit off by more than {}):\n{}",
        bounds.logit,
        disagreements.join("\n")
    );
    assert!(ties * 10 <= steps, "{name}: {ties} of {steps} steps chose another token at a near-tie");
    assert!(median <= bounds.median, "{name}: the median logit difference is {median}");
}

#[test]
fn smollm2_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("SmolLM2-135M-Instruct.Q4_1.json", AS_STORED_SMOLLM2);
}

#[test]
fn smollm2_dequantized_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("SmolLM2-135M-Instruct.Q4_1.dequantized.json", DEQUANTIZED_SMOLLM2);
}

#[test]
fn gemma3_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("gemma-3-270m-q4_k_m.json", AS_STORED_GEMMA3);
}

#[test]
fn gemma3_dequantized_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("gemma-3-270m-q4_k_m.dequantized.json", DEQUANTIZED_GEMMA3);
}

#[test]
fn tiny_qwen2_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("tiny-qwen2.json", TINY_F32);
}

#[test]
fn tiny_qwen3_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("tiny-qwen3.json", TINY_F32);
}

#[test]
fn tiny_phi3_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("tiny-phi3.json", TINY_F32);
}

#[test]
fn tiny_phi3_with_longrope_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("tiny-phi3-longrope.json", TINY_F32);
}

#[test]
fn tiny_llama3_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("tiny-llama3.json", TINY_F32);
}

#[test]
fn tiny_gemma2_agrees_with_llama_cpp() {
    agrees_with_llama_cpp("tiny-gemma2.json", TINY_F32);
}

/// The model of fixture `name` gives a prompt's logits to the bit however the prompt is split into
/// steps, as a prompt-cache hit and the scheduler's chunks split it (the tiny llama of
/// `tests.rs` is cut everywhere; these are the real files, with every family feature they have).
fn a_split_prompt_gives_the_same_logits(name: &str) {
    let fixture = read_fixture(name);
    let Some(path) = model_file(&fixture) else { return };
    let progress = Default::default();
    let model = open_language_model(&path, &progress).unwrap().load(&Device::Cpu).unwrap().model;
    for case in &fixture.cases {
        let prompt = &case.prompt_tokens;
        let whole =
            model.forward_one(model.new_sequence().as_mut(), prompt, 0).unwrap().to_vec1::<f32>().unwrap();
        for cut in [1, prompt.len() / 2, prompt.len() - 1] {
            let differing = logits_differing_when_cut(model.as_ref(), prompt, cut, &whole);
            assert_eq!(
                differing, 0,
                "{name}, prompt {:?} cut after {cut} tokens: {differing} logits differ",
                case.prompt
            );
        }
    }
}

#[test]
fn smollm2_gives_a_split_prompt_the_same_logits() {
    a_split_prompt_gives_the_same_logits("SmolLM2-135M-Instruct.Q4_1.json");
}

#[test]
fn gemma3_gives_a_split_prompt_the_same_logits() {
    a_split_prompt_gives_the_same_logits("gemma-3-270m-q4_k_m.json");
}
