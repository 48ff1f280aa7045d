//! Builds a `tokenizers::Tokenizer` from the vocabulary a GGUF file carries in its
//! `tokenizer.ggml.*` metadata, so a lone `.gguf` is enough to serve a model.
//!
//! Two vocabulary kinds are supported, following llama.cpp (`llama-vocab.cpp`), which defines
//! what these keys mean:
//! - `gpt2`: byte-level BPE from `tokens` and `merges`, split first by the regex llama.cpp picks
//!   for `tokenizer.ggml.pre`.
//! - `llama`: SentencePiece. llama.cpp tokenises these by repeatedly merging the adjacent pair
//!   whose concatenation is the highest-scoring token; that is exactly BPE with merges ranked by
//!   the merged token's score, so we derive such merges (as Hugging Face's converter does) and
//!   fall back to `<0xNN>` byte tokens for characters outside the vocabulary.
//!
//! Control and user-defined tokens become added tokens, matched whole in text. Nothing is added
//! automatically when encoding: the caller prepends BOS when `add_bos_token` says so.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{self, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use super::EngineError;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// Tokens llama.cpp treats as ending a generation whatever the metadata says.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// GPT-2's split regex is built into `ByteLevel`; these are the others llama.cpp knows.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer and the special tokens generation needs.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    /// Text of the BOS token.
    pub bos_token: Option<String>,
    /// Text of the EOS token.
    pub eos_token: Option<String>,
    /// Every id that ends a generation: EOS, EOT, EOM and the end-of-turn tokens llama.cpp knows.
    pub eos_token_ids: Vec<u32>,
    /// Whether prompts must start with BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos_token: bool,
    pub bos_token_id: Option<u32>,
}

pub fn tokenizer_from_gguf(content: &gguf_file::Content) -> Result<GgufTokenizer, EngineError> {
    tokenizer_from_metadata(&content.metadata)
}

pub fn tokenizer_from_metadata(metadata: &HashMap<String, Value>) -> Result<GgufTokenizer, EngineError> {
    let meta = Metadata(metadata);
    let kind = meta.string("tokenizer.ggml.model")?;
    let tokens = meta.string_array("tokenizer.ggml.tokens")?;
    if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
        return Err(key_error("tokenizer.ggml.tokens", "must hold between 1 and 2^32 tokens"));
    }
    let types = meta
        .optional_array("tokenizer.ggml.token_type", tokens.len(), integer, "integers")?
        .unwrap_or_else(|| vec![TYPE_NORMAL; tokens.len()]);
    let mut vocab = Vocab::default();
    for (id, text) in tokens.iter().enumerate() {
        // llama.cpp keeps duplicate texts; a map cannot, so the first id wins.
        vocab.entry((*text).to_owned()).or_insert(id as u32);
    }

    let (mut tokenizer, default_add_bos) = match kind {
        "gpt2" => (byte_level_bpe(&meta, vocab)?, false),
        "llama" => (sentencepiece(&meta, &tokens, &types, vocab)?, true),
        other => {
            return Err(key_error(
                "tokenizer.ggml.model",
                &format!("is '{other}'; only 'gpt2' and 'llama' vocabularies are supported"),
            ));
        }
    };

    let bos_token_id = meta.optional_token_id("tokenizer.ggml.bos_token_id", tokens.len())?;
    let eos_token_id = meta.optional_token_id("tokenizer.ggml.eos_token_id", tokens.len())?;
    let mut eos_token_ids: Vec<u32> = Vec::new();
    let mut end_generation_with = |id: u32| {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    };
    for key in ["eos", "eot", "eom"] {
        let key = format!("tokenizer.ggml.{key}_token_id");
        if let Some(id) = meta.optional_token_id(&key, tokens.len())? {
            end_generation_with(id);
        }
    }
    for (id, text) in tokens.iter().enumerate() {
        if END_OF_GENERATION_TEXTS.contains(text) {
            end_generation_with(id as u32);
        }
    }

    let is_special = |id: usize| {
        matches!(types[id], TYPE_CONTROL | TYPE_UNKNOWN)
            || eos_token_ids.contains(&(id as u32))
            || bos_token_id == Some(id as u32)
    };
    // Phi-3's chat tokens swallow the whitespace after them, as llama.cpp decides by the model's
    // name (`<|user|>\nHi` is `<|user|>`, `▁Hi`).
    let strips_right = phi3_strips_after_special_tokens(&meta)?;
    let rstrip = |id: usize| {
        strips_right
            && (matches!(types[id], TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN) || tokens[id] == "</s>")
            && !matches!(tokens[id], "<unk>" | "<s>" | "<|endoftext|>")
    };
    let special: Vec<AddedToken> = (0..tokens.len())
        .filter(|&id| is_special(id))
        .map(|id| AddedToken::from(tokens[id], true).rstrip(rstrip(id)))
        .collect();
    // User-defined tokens are stored as raw text (llama.cpp "pre-normalises" them).
    let user_defined: Vec<AddedToken> = (0..tokens.len())
        .filter(|&id| types[id] == TYPE_USER_DEFINED && !is_special(id))
        .map(|id| AddedToken::from(tokens[id], false).normalized(false).rstrip(rstrip(id)))
        .collect();
    tokenizer.add_special_tokens(special).map_err(tokenizer_error)?;
    tokenizer.add_tokens(user_defined).map_err(tokenizer_error)?;

    Ok(GgufTokenizer {
        tokenizer,
        bos_token: bos_token_id.map(|id| tokens[id as usize].to_owned()),
        eos_token: eos_token_id.map(|id| tokens[id as usize].to_owned()),
        eos_token_ids,
        add_bos_token: meta.optional_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos),
        bos_token_id,
    })
}

/// Whether `general.name` names a Phi-3 model: llama.cpp then strips whitespace after its
/// special tokens (`llama_vocab::impl::load`, the token attribute `RSTRIP`).
fn phi3_strips_after_special_tokens(meta: &Metadata<'_>) -> Result<bool, EngineError> {
    let name = meta.optional_string("general.name")?.unwrap_or_default().to_lowercase();
    Ok(name.contains("phi-3") || name.contains("phi3"))
}

fn byte_level_bpe(meta: &Metadata<'_>, vocab: Vocab) -> Result<Tokenizer, EngineError> {
    const MERGES_KEY: &str = "tokenizer.ggml.merges";
    let merges = meta
        .string_array(MERGES_KEY)?
        .into_iter()
        .map(|merge| match merge.split_once(' ') {
            Some((left, right)) => Ok((left.to_owned(), right.to_owned())),
            None => Err(key_error(MERGES_KEY, &format!("holds '{merge}', not two tokens"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pre = meta.optional_string("tokenizer.ggml.pre")?;
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    // A `&str` pattern would be matched literally; these are regexes.
    let split = |regex: &str| -> Result<PreTokenizerWrapper, EngineError> {
        let split =
            Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false);
        Ok(split.map_err(tokenizer_error)?.into())
    };
    // Which regex each `tokenizer.ggml.pre` uses, as in llama.cpp's `llm_tokenizer_bpe`.
    let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match pre.unwrap_or("default") {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            let digits = Digits::new(true).into();
            (PreTokenizerSequence::new(vec![digits, byte_level(true).into()]).into(), false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => {
            let parts = vec![split(LLAMA3_REGEX)?, byte_level(false).into()];
            (PreTokenizerSequence::new(parts).into(), true)
        }
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" | "hunyuan" => {
            let parts = vec![split(QWEN2_REGEX)?, byte_level(false).into()];
            (PreTokenizerSequence::new(parts).into(), false)
        }
        other => {
            if !matches!(other, "default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion") {
                tracing::warn!(pre = other, "unknown tokenizer.ggml.pre; splitting words as GPT-2 does");
            }
            (byte_level(true).into(), false)
        }
    };
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|err| key_error(MERGES_KEY, &format!("does not fit the vocabulary: {err}")))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(byte_level(true)))
        .with_post_processor(Some(byte_level(true)));
    Ok(tokenizer)
}

fn sentencepiece(
    meta: &Metadata<'_>,
    tokens: &[&str],
    types: &[i64],
    vocab: Vocab,
) -> Result<Tokenizer, EngineError> {
    let scores = meta
        .optional_array("tokenizer.ggml.scores", tokens.len(), float, "numbers")?
        .ok_or_else(|| key_error("tokenizer.ggml.scores", "is missing"))?;
    let merges = merges_from_scores(tokens, types, &scores, &vocab);
    let unk_token = meta
        .optional_token_id("tokenizer.ggml.unknown_token_id", tokens.len())?
        .map(|id| tokens[id as usize].to_owned())
        .or_else(|| vocab.contains_key("<unk>").then(|| "<unk>".to_owned()));
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk_token {
        builder = builder.unk_token(unk);
    }
    let model = builder.build().map_err(tokenizer_error)?;

    let add_space_prefix = meta.optional_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let escape_spaces: NormalizerWrapper = Replace::new(" ", "▁").map_err(tokenizer_error)?.into();
    let normalizer = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("▁".to_owned()).into(), escape_spaces]).into()
    } else {
        escape_spaces
    };
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(tokenizer_error)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(normalizer)).map_err(tokenizer_error)?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Every split of a token into two tokens is a merge, ranked by the whole token's score (higher
/// first); that reproduces llama.cpp's SentencePiece tokenizer with a plain BPE model.
fn merges_from_scores(
    tokens: &[&str],
    types: &[i64],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mut candidates: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        if matches!(types[id], TYPE_CONTROL | TYPE_BYTE) || vocab.get(*text) != Some(&(id as u32)) {
            continue;
        }
        for (at, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                candidates.push((scores[id], id, left, right));
            }
        }
    }
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    candidates.into_iter().map(|(_, _, left, right)| (left.to_owned(), right.to_owned())).collect()
}

/// Typed, panic-free access to GGUF metadata; every error names the key.
struct Metadata<'a>(&'a HashMap<String, Value>);

impl<'a> Metadata<'a> {
    fn string(&self, key: &str) -> Result<&'a str, EngineError> {
        self.optional_string(key)?.ok_or_else(|| key_error(key, "is missing"))
    }

    fn optional_string(&self, key: &str) -> Result<Option<&'a str>, EngineError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>, EngineError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(flag)) => Ok(Some(*flag)),
            Some(other) => Err(wrong_type(key, "a boolean", other)),
        }
    }

    /// A token id, which must index the vocabulary. Negative ids mean "none" in some files.
    fn optional_token_id(&self, key: &str, vocab_size: usize) -> Result<Option<u32>, EngineError> {
        let Some(value) = self.0.get(key) else {
            return Ok(None);
        };
        match integer(value) {
            Some(id) if id < 0 => Ok(None),
            Some(id) if (id as u64) < vocab_size as u64 => Ok(Some(id as u32)),
            Some(id) => Err(key_error(key, &format!("is {id}, outside the {vocab_size}-token vocabulary"))),
            None => Err(wrong_type(key, "an integer", value)),
        }
    }

    fn string_array(&self, key: &str) -> Result<Vec<&'a str>, EngineError> {
        let items = self.array(key)?.ok_or_else(|| key_error(key, "is missing"))?;
        items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.as_str()),
                other => Err(wrong_type(key, "an array of strings", other)),
            })
            .collect()
    }

    /// An array with one entry per token, each converted by `convert`.
    fn optional_array<T>(
        &self,
        key: &str,
        len: usize,
        convert: fn(&Value) -> Option<T>,
        expected: &str,
    ) -> Result<Option<Vec<T>>, EngineError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        if items.len() != len {
            return Err(key_error(key, &format!("has {} entries for {len} tokens", items.len())));
        }
        let convert =
            |item| convert(item).ok_or_else(|| wrong_type(key, &format!("an array of {expected}"), item));
        items.iter().map(convert).collect::<Result<_, _>>().map(Some)
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>, EngineError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(wrong_type(key, "an array", other)),
        }
    }
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::I8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::I32(v) => Some(v.into()),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

fn float(value: &Value) -> Option<f32> {
    match *value {
        Value::F32(v) => Some(v),
        Value::F64(v) => Some(v as f32),
        _ => integer(value).map(|v| v as f32),
    }
}

fn key_error(key: &str, problem: &str) -> EngineError {
    EngineError::Inference(format!("GGUF metadata key '{key}' {problem}"))
}

fn wrong_type(key: &str, expected: &str, found: &Value) -> EngineError {
    key_error(key, &format!("should be {expected} but holds a {:?}", found.value_type()))
}

fn tokenizer_error(err: tokenizers::Error) -> EngineError {
    EngineError::Inference(format!("cannot build the tokenizer from GGUF metadata: {err}"))
}

#[cfg(test)]
mod tests;
