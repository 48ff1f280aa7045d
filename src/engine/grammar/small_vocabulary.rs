//! A small byte-level vocabulary for the tests and the fuzz target: every byte is a token
//! (ids 0..256, spelled as GPT-2 spells bytes), then the merges of JSON's punctuation (`{"`,
//! `":`, `": `, `, `, `, "`), then an end-of-sequence token. Any text can be written with it, so a
//! grammar that allows nothing on it allows nothing at all; and like a real BPE vocabulary, its
//! merged tokens are what encoding produces (llguidance relies on that to force bytes).

use std::sync::Arc;

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::{AddedToken, Tokenizer};

pub const EOS: &str = "<|end|>";
/// Each merge as its two parts, in the order they apply; the merged token's id follows the bytes'.
const MERGES: [(&str, &str); 5] = [("{", "\""), ("\"", ":"), ("\":", " "), (",", " "), (", ", "\"")];

/// GPT-2's spelling of `text`.
fn spelled(text: &str) -> String {
    let table = byte_spelling();
    text.bytes().map(|byte| table[byte as usize]).collect()
}

/// The character GPT-2's byte-level tokenizers spell each byte with.
fn byte_spelling() -> Vec<char> {
    let decoding = super::vocabulary::byte_level_decoding_table();
    let mut spelling = vec!['\0'; 256];
    for (code, byte) in decoding.iter().enumerate() {
        if let Some(byte) = byte {
            spelling[*byte as usize] = char::from_u32(code as u32).expect("a character");
        }
    }
    spelling
}

/// The tokenizer and its end-of-sequence token.
pub fn tokenizer() -> (Arc<Tokenizer>, u32) {
    let mut vocabulary = Vocab::new();
    for (byte, c) in byte_spelling().iter().enumerate() {
        vocabulary.insert(c.to_string(), byte as u32);
    }
    let mut merges = Vec::new();
    for (offset, (left, right)) in MERGES.iter().enumerate() {
        vocabulary.insert(spelled(&format!("{left}{right}")), 256 + offset as u32);
        merges.push((spelled(left), spelled(right)));
    }
    let model = BPE::builder().vocab_and_merges(vocabulary, merges).build().expect("a BPE model");
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.add_special_tokens(vec![AddedToken::from(EOS, true)]).expect("an added token");
    let eos = tokenizer.token_to_id(EOS).expect("the end token");
    (Arc::new(tokenizer), eos)
}
