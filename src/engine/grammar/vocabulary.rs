//! The model's vocabulary as llguidance sees it: every token id's bytes, in a `toktrie::TokTrie`,
//! built once per model from our `tokenizers::Tokenizer` (the GGUF-built one or a
//! `tokenizer.json` beside the file).
//!
//! llguidance matches grammars on bytes, so each token must be given the bytes it stands for in
//! the output, not its vocabulary string:
//! - byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen): each character of the string stands for one
//!   byte through GPT-2's byte-to-character table (`Ġ` is a space);
//! - SentencePiece: `<0xNN>` byte-fallback tokens are the byte NN, `▁` is a space;
//! - special tokens (chat markers, EOS) are marked with toktrie's 0xFF prefix, which no grammar
//!   text can produce, so a grammar never allows them as text;
//! - added tokens that are not special are their text.
//!
//! (toktrie's own `toktrie_hf_tokenizers` adapter does the same but pins an older `tokenizers`.)

use std::collections::HashMap;
use std::sync::Arc;

use tokenizers::{AddedToken, DecoderWrapper, Tokenizer};
use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// How the vocabulary's strings spell bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// GPT-2's byte-to-character table.
    ByteLevel,
    /// SentencePiece: `▁` for a space, `<0xNN>` for raw bytes.
    SentencePiece,
}

/// Each token id's bytes, as the table below spells them: cheap to build and hold (the tokenizer
/// is shared), so a node has it from load, for log-probabilities' `bytes`, while the trie that
/// grammars need is built on first use.
pub struct TokenSpeller {
    tokenizer: Arc<Tokenizer>,
    spelling: Spelling,
    byte_of_char: Vec<Option<u8>>,
    added: HashMap<u32, AddedToken>,
    eos_token_ids: Vec<u32>,
    size: u32,
}

impl TokenSpeller {
    /// The tokens of `tokenizer`, where the ids in `eos_token_ids` (at least one) end a
    /// generation.
    pub fn new(tokenizer: Arc<Tokenizer>, eos_token_ids: &[u32]) -> Result<Self, String> {
        if eos_token_ids.is_empty() {
            return Err("the model has no end-of-sequence token".into());
        }
        let added: HashMap<u32, AddedToken> = tokenizer.get_added_tokens_decoder().into_iter().collect();
        let size = added.keys().map(|&id| id as usize + 1).fold(tokenizer.get_vocab_size(true), usize::max);
        let size = u32::try_from(size).map_err(|_| "the vocabulary is too large")?;
        if eos_token_ids.iter().any(|&id| id >= size) {
            return Err("an end-of-sequence token is outside the vocabulary".into());
        }
        Ok(Self {
            spelling: spelling_of(&tokenizer),
            tokenizer,
            byte_of_char: byte_level_decoding_table(),
            added,
            eos_token_ids: eos_token_ids.to_vec(),
            size,
        })
    }

    /// Token ids run from 0 to this.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// What token `id` stands for in the output; special tokens (chat markers, EOS) are their
    /// name behind toktrie's 0xFF marker, ids without a token are empty.
    pub fn bytes(&self, id: u32) -> Vec<u8> {
        let added_token = self.added.get(&id);
        if added_token.is_some_and(|token| token.special) || self.eos_token_ids.contains(&id) {
            let text = self.tokenizer.id_to_token(id).unwrap_or_else(|| format!("<[{id}]>"));
            return [&[TokTrie::SPECIAL_TOKEN_MARKER][..], text.as_bytes()].concat();
        }
        match added_token {
            Some(token) => token.content.as_bytes().to_vec(),
            // No text: a hole in the ids, a token that can never be produced.
            None => self
                .tokenizer
                .id_to_token(id)
                .map_or_else(Vec::new, |text| token_bytes(&text, self.spelling, &self.byte_of_char)),
        }
    }
}

/// A model's tokens as bytes, for llguidance (`toktrie::TokenizerEnv`).
///
/// It tells llguidance that its tokenization is not canonical, even for byte-level BPE where
/// encoding is. Told otherwise, llguidance computes the mask after a token that a canonical
/// tokenization would have merged with the bytes the grammar forces next (`:` alone where `": `
/// is forced) as if those bytes had been sampled too: the mask then allows only tokens that the
/// grammar refuses once sampled, and the generation fails. Models sample such tokens (found by
/// the `structured_output` fuzz target). llmesh never asks llguidance for forced tokens, the
/// one thing canonical tokenization would buy.
pub struct ModelVocabulary {
    trie: TokTrie,
}

impl ModelVocabulary {
    /// Every token of `speller` in one trie. Panics inside toktrie (its invariants are asserted)
    /// are the caller's to catch.
    pub fn new(speller: &TokenSpeller) -> Self {
        let words: Vec<Vec<u8>> = (0..speller.size).map(|id| speller.bytes(id)).collect();
        let info = TokRxInfo::new(speller.size, speller.eos_token_ids[0]);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&speller.eos_token_ids);
        Self { trie }
    }
}

impl TokenizerEnv for ModelVocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(bytes)
    }

    /// Never (see the type's documentation).
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// Byte-level when the decoder (or one in a sequence of decoders) is GPT-2's `ByteLevel`.
fn spelling_of(tokenizer: &Tokenizer) -> Spelling {
    fn byte_level(decoder: &DecoderWrapper) -> bool {
        match decoder {
            DecoderWrapper::ByteLevel(_) => true,
            DecoderWrapper::Sequence(sequence) => sequence.get_decoders().iter().any(byte_level),
            _ => false,
        }
    }
    match tokenizer.get_decoder() {
        Some(decoder) if byte_level(decoder) => Spelling::ByteLevel,
        _ => Spelling::SentencePiece,
    }
}

fn token_bytes(text: &str, spelling: Spelling, byte_of_char: &[Option<u8>]) -> Vec<u8> {
    match spelling {
        Spelling::ByteLevel => {
            let mut bytes = Vec::with_capacity(text.len());
            for c in text.chars() {
                match byte_of_char.get(c as usize).copied().flatten() {
                    Some(byte) => bytes.push(byte),
                    // Not a byte-level character (a token added as plain text): its own bytes.
                    None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            bytes
        }
        Spelling::SentencePiece => match byte_fallback(text) {
            Some(byte) => vec![byte],
            None => text.replace('▁', " ").into_bytes(),
        },
    }
}

/// The byte of a SentencePiece byte-fallback token, `<0xNN>`.
fn byte_fallback(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's table, read backwards: indexed by a character's code point, the byte it stands for.
/// Printable Latin-1 bytes stand for themselves; the others (control characters, space, ...)
/// are given the code points from 256 on, in byte order.
pub(super) fn byte_level_decoding_table() -> Vec<Option<u8>> {
    let printable = |byte: u8| matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = vec![None; 512];
    let mut next = 256;
    for byte in 0..=255u8 {
        if printable(byte) {
            table[byte as usize] = Some(byte);
        } else {
            table[next] = Some(byte);
            next += 1;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_characters_stand_for_their_bytes() {
        let table = byte_level_decoding_table();
        let table = &table;
        assert_eq!(token_bytes("Ġhello", Spelling::ByteLevel, table), b" hello");
        assert_eq!(token_bytes("Ċ", Spelling::ByteLevel, table), b"\n");
        assert_eq!(token_bytes("{\"", Spelling::ByteLevel, table), b"{\"");
        // "é" is two bytes, each spelled by one character.
        assert_eq!(token_bytes("Ã©", Spelling::ByteLevel, table), "é".as_bytes());
        // Every byte has exactly one character.
        assert_eq!(table.iter().flatten().count(), 256);
    }

    #[test]
    fn sentencepiece_spaces_and_byte_tokens() {
        let table = byte_level_decoding_table();
        assert_eq!(token_bytes("▁world", Spelling::SentencePiece, &table), b" world");
        assert_eq!(token_bytes("<0x0A>", Spelling::SentencePiece, &table), b"\n");
        assert_eq!(token_bytes("<0xE2>", Spelling::SentencePiece, &table), [0xE2]);
        assert_eq!(token_bytes("<0x1>", Spelling::SentencePiece, &table), b"<0x1>");
    }
}
