//! The grammar machinery on a small byte-level vocabulary: every byte, a few merges, an
//! end-of-sequence token.

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::{AddedToken, Tokenizer};

use super::*;

const EOS: &str = "<|end|>";

/// GPT-2's spelling of `text`.
fn spelled(text: &str) -> String {
    let table = vocabulary_spelling();
    text.bytes().map(|byte| table[byte as usize]).collect()
}

fn vocabulary_spelling() -> Vec<char> {
    let decoding = super::vocabulary::byte_level_decoding_table();
    let mut spelling = vec!['\0'; 256];
    for (code, byte) in decoding.iter().enumerate() {
        if let Some(byte) = byte {
            spelling[*byte as usize] = char::from_u32(code as u32).expect("a character");
        }
    }
    spelling
}

/// Every byte is a token (ids 0..256), then `{"`, `": `, `, "` and the end token.
fn tokenizer() -> (Arc<Tokenizer>, u32) {
    let mut vocabulary = Vocab::new();
    let spelling = vocabulary_spelling();
    for (byte, c) in spelling.iter().enumerate() {
        vocabulary.insert(c.to_string(), byte as u32);
    }
    for (offset, merged) in ["{\"", "\": ", ", \""].iter().enumerate() {
        vocabulary.insert(spelled(merged), 256 + offset as u32);
    }
    let model = BPE::builder().vocab_and_merges(vocabulary, Vec::new()).build().expect("a BPE model");
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.add_special_tokens(vec![AddedToken::from(EOS, true)]).expect("an added token");
    let eos = tokenizer.token_to_id(EOS).expect("the end token");
    (Arc::new(tokenizer), eos)
}

fn compiler() -> (GrammarCompiler, Arc<Tokenizer>, u32) {
    let (tokenizer, eos) = tokenizer();
    (GrammarCompiler::new(tokenizer.clone(), &[eos]).expect("a compiler"), tokenizer, eos)
}

fn allowed(constraint: &mut TokenConstraint, size: usize) -> Vec<u32> {
    let mut logits = vec![0.0; size];
    let allowed = constraint.allowed_tokens().expect("a mask");
    constraint.mask(&allowed, &mut logits);
    (0..size as u32).filter(|&token| logits[token as usize].is_finite()).collect()
}

/// Feed `text` one byte token at a time.
fn feed(constraint: &mut TokenConstraint, text: &str) {
    for byte in text.bytes() {
        constraint.accept(byte as u32).unwrap_or_else(|error| panic!("{text:?} at {byte:?}: {error}"));
    }
}

fn schema(json: Value) -> ResponseFormat {
    ResponseFormat::JsonSchema { schema: json.to_string() }
}

#[test]
fn a_json_object_starts_with_a_brace_and_ends_at_its_close() {
    let (compiler, tokenizer, eos) = compiler();
    let size = tokenizer.get_vocab_size(true) + 3; // and a model's padding rows
    let mut constraint = compiler.compile(&ResponseFormat::JsonObject).unwrap().expect("a constraint");
    assert_eq!(allowed(&mut constraint, size), vec![b'{' as u32, 256], "'{{' or '{{\"' first");
    feed(&mut constraint, "{\"a\": [1, true]");
    assert!(!constraint.is_finished());
    let next = allowed(&mut constraint, size);
    assert!(next.contains(&(b'}' as u32)) && next.contains(&258) && !next.contains(&eos), "{next:?}");
    feed(&mut constraint, "}");
    assert!(constraint.is_finished());
}

#[test]
fn a_schema_holds_keys_types_and_enums() {
    let (compiler, tokenizer, _) = compiler();
    let size = tokenizer.get_vocab_size(true);
    let format = schema(serde_json::json!({
        "type": "object",
        "properties": {"color": {"enum": ["red", "blue"]}, "n": {"type": "integer"}},
        "required": ["color", "n"],
        "additionalProperties": false,
    }));
    let mut constraint = compiler.compile(&format).unwrap().expect("a constraint");
    feed(&mut constraint, "{\"color\": \"");
    assert_eq!(allowed(&mut constraint, size), vec![b'b' as u32, b'r' as u32]);
    feed(&mut constraint, "red\", \"n\": ");
    let digits = allowed(&mut constraint, size);
    assert!(digits.contains(&(b'7' as u32)) && !digits.contains(&(b'"' as u32)), "{digits:?}");
    assert!(constraint.accept(b'x' as u32).is_err(), "a token outside the mask is refused");
}

#[test]
fn special_tokens_are_never_text_and_eos_only_ends() {
    let (compiler, tokenizer, eos) = compiler();
    let size = tokenizer.get_vocab_size(true);
    // Any string: the end token's text is not a way to write "<|end|>".
    let format = schema(serde_json::json!({"type": "string"}));
    let mut constraint = compiler.compile(&format).unwrap().expect("a constraint");
    feed(&mut constraint, "\"a");
    assert!(!allowed(&mut constraint, size).contains(&eos));
    feed(&mut constraint, "\"");
    assert_eq!(allowed(&mut constraint, size), vec![eos], "only the end once the string closed");
}

#[test]
fn a_continuation_resumes_where_the_text_stopped() {
    let (compiler, tokenizer, _) = compiler();
    let mut constraint = compiler.compile(&ResponseFormat::JsonObject).unwrap().expect("a constraint");
    constraint.accept_text("{\"key\": ").unwrap();
    let next = allowed(&mut constraint, tokenizer.get_vocab_size(true));
    assert!(next.contains(&(b'"' as u32)) && !next.contains(&(b'}' as u32)), "{next:?}");
    let mut other = compiler.compile(&ResponseFormat::JsonObject).unwrap().expect("a constraint");
    assert!(other.accept_text("not json").is_err());
}

#[test]
fn schemas_that_cannot_be_compiled_name_the_schema_and_the_feature() {
    let (compiler, _, _) = compiler();
    let refused = |json: Value| match compiler.compile(&schema(json)) {
        Err(EngineError::InvalidParam { param, message }) => (param, message),
        Err(other) => panic!("not an invalid param: {other:?}"),
        Ok(_) => panic!("compiled"),
    };
    let overlapping = [
        serde_json::json!({"type": "object", "properties": {"a": {"type": "string"}}}),
        serde_json::json!({"type": "object", "properties": {"b": {"type": "integer"}}}),
    ];
    let (param, message) = refused(serde_json::json!({"oneOf": overlapping}));
    assert_eq!(param, SCHEMA_PARAM);
    assert!(message.contains("oneOf"), "{message}");
    let (_, message) = refused(serde_json::json!({"type": "object", "if": {"required": ["a"]}}));
    assert!(message.contains("if"), "{message}");
    let (_, message) = refused(serde_json::json!({"type": "integer", "minimum": 5, "maximum": 1}));
    assert!(!message.is_empty());
}

#[test]
fn a_schema_must_be_a_json_object_of_bounded_size() {
    let invalid = |schema: &str| ResponseFormat::JsonSchema { schema: schema.into() }.validate().unwrap_err();
    assert_eq!(invalid("[1]").param, SCHEMA_PARAM);
    assert_eq!(invalid("{").param, SCHEMA_PARAM);
    let huge = format!("{{\"description\": \"{}\"}}", "x".repeat(MAX_SCHEMA_BYTES));
    assert_eq!(invalid(&huge).param, SCHEMA_PARAM);
    assert_eq!(schema(serde_json::json!({"type": "object"})).validate(), Ok(()));
    assert_eq!(ResponseFormat::Text.validate(), Ok(()));
}

#[test]
fn plain_text_needs_no_constraint() {
    let (compiler, _, _) = compiler();
    assert!(compiler.compile(&ResponseFormat::Text).unwrap().is_none());
}

#[test]
fn the_deepest_schema_json_can_carry_compiles_on_a_small_stack() {
    // serde_json refuses JSON nested deeper than 128, so this is as deep as a schema gets; a
    // blocking thread of tokio's has 2 MiB of stack, and overflowing it would abort the node.
    let (compiler, tokenizer, _) = compiler();
    let mut schema = serde_json::json!({"type": "integer"});
    for _ in 0..62 {
        schema = serde_json::json!({"type": "object", "properties": {"a": schema}, "required": ["a"]});
    }
    let format = ResponseFormat::JsonSchema { schema: schema.to_string() };
    assert_eq!(format.validate(), Ok(()), "within serde_json's depth");
    let size = tokenizer.get_vocab_size(true);
    let compiled = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            let mut constraint = compiler.compile(&format).unwrap().expect("a constraint");
            feed(&mut constraint, &"{\"a\": ".repeat(62));
            allowed(&mut constraint, size)
        })
        .unwrap()
        .join()
        .expect("no stack overflow");
    assert!(compiled.contains(&(b'7' as u32)));
}
