//! The fuzz target of constrained decoding (`structured_output`, reached through `api::fuzz` from
//! a chat request body): the grammar that a request's `response_format` and `tools` ask for,
//! compiled on the small byte-level vocabulary and walked the way a model samples under it, one
//! pseudo-random token out of each mask, leaning towards closing once the walk is long. Nothing
//! may panic, the constraint must take every token its own mask allowed, and a `response_format`
//! answer the grammar calls complete must be JSON.

use std::sync::OnceLock;

use super::small_vocabulary;
use super::{GenerationGrammar, GrammarCompiler, SCHEMA_PARAM};
use crate::engine::SamplingParams;
use crate::engine::tools::{GrammarPlan, ToolFormat, grammar_plan};

/// Tokens a walk samples at most.
const MAX_STEPS: usize = 256;
/// From this step on, a walk takes a closing token when the mask allows one.
const CLOSING_FROM: usize = 48;

/// Walk the grammar of `params` in the tool format `seed` picks, with `seed` choosing the tokens.
pub fn walk(params: &SamplingParams, seed: u8) {
    static COMPILER: OnceLock<(GrammarCompiler, u32)> = OnceLock::new();
    let (compiler, eos) = COMPILER.get_or_init(|| {
        let (tokenizer, eos) = small_vocabulary::tokenizer();
        (GrammarCompiler::new(tokenizer, &[eos]).expect("the small vocabulary compiles"), eos)
    });
    let format = [ToolFormat::Generic, ToolFormat::Hermes, ToolFormat::Llama3, ToolFormat::Mistral]
        [usize::from(seed % 4)];
    let Ok(plan) = grammar_plan(&params.tools, &params.response_format, format) else { return };
    let (mut grammar, json_answer) = match plan {
        GrammarPlan::Free => return,
        GrammarPlan::Now(grammar) => match compiler.compile_grammar(grammar, SCHEMA_PARAM) {
            Ok(constraint) => (GenerationGrammar::now(constraint), !params.tools.active()),
            Err(_) => return,
        },
        GrammarPlan::AfterMarker { marker, at_start, grammar } => {
            let Ok(constraint) = compiler.compile_grammar(grammar, "tools") else { return };
            let mut grammar = GenerationGrammar::after_marker(constraint, marker, at_start);
            // As if the model wrote the marker: from there on the call is constrained.
            if grammar.observe_text(marker).is_err() {
                return;
            }
            assert!(grammar.is_active(), "the marker {marker:?} did not start the grammar");
            (grammar, false)
        }
    };
    let Some(constraint) = grammar.active() else { return };
    let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut text = Vec::new();
    for step in 0..MAX_STEPS {
        // A mask that fails is answered as an error in production, never a panic.
        let Ok(allowed) = constraint.allowed_tokens() else { return };
        let tokens = allowed.to_list();
        let closing = [*eos, u32::from(b'}'), u32::from(b']'), u32::from(b'"'), u32::from(b'0')];
        let token = match closing.iter().find(|token| step >= CLOSING_FROM && tokens.contains(token)) {
            Some(&token) => token,
            None => {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                tokens[(state % tokens.len() as u64) as usize]
            }
        };
        if let Err(error) = constraint.accept(token) {
            let so_far = String::from_utf8_lossy(&text);
            panic!(
                "{format:?}: after {so_far:?}, the grammar refused token {token}, which its mask allowed: {error}"
            );
        }
        if token == *eos || constraint.is_finished() {
            if token != *eos {
                text.extend(compiler.token_bytes(token));
            }
            // JSON's syntax, not serde_json's range: `1e999` is JSON (RFC 8259 leaves the range
            // of numbers to the reader; Python and JavaScript read it as infinity).
            if json_answer && let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(&text) {
                panic!("a complete answer is not JSON ({error}): {:?}", String::from_utf8_lossy(&text));
            }
            return;
        }
        text.extend(compiler.token_bytes(token));
    }
}
