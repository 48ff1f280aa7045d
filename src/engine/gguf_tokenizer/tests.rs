//! Tests of the GGUF tokenizer builder: tiny hand-made vocabularies and the real demo models.

use std::path::{Path, PathBuf};

use super::*;

const ROUND_TRIP_TEXTS: &[&str] = &[
    "Hello world",
    "  two  spaces,\ttabs\t\tand\nnew\n\nlines \n",
    "café – 日本語 🙂",
    " leading space, digits 2024 and trailing space ",
];

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|item| Value::String((*item).to_owned())).collect())
}

fn metadata(entries: Vec<(&str, Value)>) -> HashMap<String, Value> {
    entries.into_iter().map(|(key, value)| (key.to_owned(), value)).collect()
}

/// A byte-level vocabulary that spells "hello world" with a handful of merges.
fn tiny_gpt2() -> HashMap<String, Value> {
    let tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "Ġworl",
        "Ġworld",
        "1",
        "2",
        "12",
    ];
    let types = (0..tokens.len()).map(|id| Value::I32(if id < 3 { 3 } else { 1 })).collect();
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2"];
    metadata(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.eot_token_id", Value::I32(2)),
    ])
}

fn encode(tokenizer: &GgufTokenizer, text: &str) -> Vec<u32> {
    tokenizer.tokenizer.encode(text, false).expect("encodes").get_ids().to_vec()
}

fn assert_round_trips(tokenizer: &GgufTokenizer, text: &str) {
    let ids = encode(tokenizer, text);
    assert_eq!(tokenizer.tokenizer.decode(&ids, false).expect("decodes"), text, "ids {ids:?}");
}

#[test]
fn tiny_gpt2_vocabulary_merges_and_matches_special_tokens() {
    let tokenizer = tokenizer_from_metadata(&tiny_gpt2()).expect("builds");
    assert_eq!(encode(&tokenizer, "hello world"), [14, 19]);
    assert_eq!(encode(&tokenizer, "<|im_start|>hello<|im_end|>"), [1, 14, 2]);
    assert_round_trips(&tokenizer, "hello world");
    assert_eq!(tokenizer.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tokenizer.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tokenizer.eos_token_ids, [2, 0]);
    assert_eq!(tokenizer.bos_token_id, Some(1));
    assert!(!tokenizer.add_bos_token);
    assert_eq!(encode(&tokenizer, "12"), [22], "GPT-2 keeps runs of digits together");

    let mut smollm = tiny_gpt2();
    smollm.insert("tokenizer.ggml.pre".into(), Value::String("smollm".into()));
    let tokenizer = tokenizer_from_metadata(&smollm).expect("builds");
    assert_eq!(encode(&tokenizer, "12"), [20, 21], "pre = smollm splits digits one by one");
}

#[test]
fn tiny_sentencepiece_vocabulary_merges_by_score_and_falls_back_to_bytes() {
    let tokens = ["<unk>", "<s>", "</s>", "<0x0A>", "▁", "h", "i", "▁h", "hi"];
    let types = [2, 3, 3, 6, 1, 1, 1, 1, 1].map(Value::I32).to_vec();
    // "▁h" outscores "hi", so "▁hi" must become "▁h" + "i", not "▁" + "hi".
    let scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5, -1.0].map(Value::F32).to_vec();
    let tokenizer = tokenizer_from_metadata(&metadata(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ]))
    .expect("builds");
    assert_eq!(encode(&tokenizer, "hi hi\n"), [7, 6, 7, 6, 3]);
    assert_round_trips(&tokenizer, "hi hi\n");
    assert!(tokenizer.add_bos_token, "SentencePiece vocabularies add BOS unless told otherwise");
    assert_eq!(tokenizer.eos_token_ids, [2]);
}

#[test]
fn malformed_metadata_is_an_error_naming_the_key() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("tokenizer.ggml.model", Value::String("bert".into()), "tokenizer.ggml.model"),
        ("tokenizer.ggml.tokens", Value::U32(3), "tokenizer.ggml.tokens"),
        ("tokenizer.ggml.tokens", strings(&[]), "tokenizer.ggml.tokens"),
        ("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1)]), "tokenizer.ggml.token_type"),
        ("tokenizer.ggml.merges", strings(&["h e", "he"]), "tokenizer.ggml.merges"),
        ("tokenizer.ggml.merges", strings(&["x y"]), "tokenizer.ggml.merges"),
        ("tokenizer.ggml.eos_token_id", Value::U32(99), "tokenizer.ggml.eos_token_id"),
        ("tokenizer.ggml.eos_token_id", Value::String("2".into()), "tokenizer.ggml.eos_token_id"),
        ("tokenizer.ggml.add_bos_token", Value::U8(1), "tokenizer.ggml.add_bos_token"),
    ];
    for (key, value, named) in cases {
        let mut metadata = tiny_gpt2();
        metadata.insert(key.to_owned(), value);
        let err = tokenizer_from_metadata(&metadata).err().expect("malformed metadata is rejected");
        assert!(err.to_string().contains(named), "{key}: {err}");
    }
    let mut metadata = tiny_gpt2();
    metadata.remove("tokenizer.ggml.merges");
    let err = tokenizer_from_metadata(&metadata).err().expect("merges are required");
    assert!(err.to_string().contains("'tokenizer.ggml.merges' is missing"), "{err}");
}

fn model_path(name: &str) -> PathBuf {
    std::env::var_os("LLMESH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
        .join(name)
}

fn load(path: &Path) -> GgufTokenizer {
    let mut file = std::fs::File::open(path)
        .unwrap_or_else(|err| panic!("{}: {err}; run scripts/fetch-models.sh", path.display()));
    let content = gguf_file::Content::read(&mut file).expect("reads the GGUF header");
    tokenizer_from_gguf(&content).expect("builds the tokenizer")
}

#[test]
fn smollm2_tokenizer_matches_its_vocabulary() {
    let tokenizer = load(&model_path("SmolLM2-135M-Instruct.Q4_1.gguf"));
    for text in ROUND_TRIP_TEXTS {
        assert_round_trips(&tokenizer, text);
    }
    // "Hello" and "Ġworld" in the vocabulary; digits one by one, as `pre = smollm` says.
    assert_eq!(encode(&tokenizer, "Hello world"), [19556, 905]);
    assert_eq!(encode(&tokenizer, "2024"), [34, 32, 34, 36]);
    assert_eq!(encode(&tokenizer, "<|im_start|>user\n"), [1, 4093, 198]);
    assert_eq!(tokenizer.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tokenizer.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tokenizer.eos_token_ids, [2, 0], "<|im_end|>, then <|endoftext|>");
    assert!(!tokenizer.add_bos_token);
}

#[test]
fn gemma3_tokenizer_matches_its_vocabulary() {
    let path = model_path("gemma-3-270m-q4_k_m.gguf");
    if !path.exists() {
        println!("skipped: {} is absent (optional; scripts/fetch-models.sh)", path.display());
        return;
    }
    let tokenizer = load(&path);
    for text in ROUND_TRIP_TEXTS {
        assert_round_trips(&tokenizer, text);
    }
    assert_eq!(encode(&tokenizer, "Hello world"), [9259, 1902]);
    assert_eq!(encode(&tokenizer, "<start_of_turn>user\n"), [105, 2364, 107]);
    assert!(tokenizer.eos_token_ids.contains(&106), "<end_of_turn> ends a generation");
    assert_eq!(tokenizer.eos_token.as_deref(), Some("<eos>"));
    assert_eq!((tokenizer.bos_token.as_deref(), tokenizer.add_bos_token), (Some("<bos>"), true));
}
