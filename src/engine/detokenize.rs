//! Turning generated tokens back into text, piece by piece: `IncrementalDecoder` never emits half
//! a UTF-8 character, and `StopMatcher` holds back text that might be the start of a stop
//! sequence so that a stop sequence never reaches the client, even when it spans two tokens.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// Decodes a growing token sequence into text deltas.
///
/// Decoding token by token is wrong for byte-level and SentencePiece vocabularies (a character can
/// span tokens, and a leading space depends on what came before), so each step decodes a short
/// window of recent tokens twice and emits the difference once it is whole.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self { tokenizer, tokens: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Add one token; returns the text it completes, if any.
    pub fn push(&mut self, token: u32) -> Option<String> {
        self.tokens.push(token);
        let before = self.decode(self.prefix_offset, self.read_offset);
        let after = self.decode(self.prefix_offset, self.tokens.len());
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') {
            return None;
        }
        let delta = after.get(before.len()..)?.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Some(delta)
    }

    fn decode(&self, start: usize, end: usize) -> String {
        self.tokenizer.decode(&self.tokens[start..end], true).unwrap_or_default()
    }
}

/// Watches generated text for stop sequences.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What the matcher lets through for one piece of text.
#[derive(Debug, PartialEq, Eq)]
pub struct StopCheck {
    /// Text that is safe to send now.
    pub text: String,
    /// A stop sequence was found; `text` ends right before it.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|stop| !stop.is_empty()).collect();
        Self { stops, held: String::new() }
    }

    pub fn push(&mut self, piece: &str) -> StopCheck {
        self.held.push_str(piece);
        if self.stops.is_empty() {
            return StopCheck { text: std::mem::take(&mut self.held), stopped: false };
        }
        let earliest_stop = self.stops.iter().filter_map(|stop| self.held.find(stop.as_str())).min();
        if let Some(position) = earliest_stop {
            let text = self.held[..position].to_string();
            self.held.clear();
            return StopCheck { text, stopped: true };
        }
        let keep_from = self.partial_stop_start();
        let text = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopCheck { text, stopped: false }
    }

    /// Text still held back when the generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Where the longest tail of `held` that begins some stop sequence starts (`held.len()` if
    /// none does).
    fn partial_stop_start(&self) -> usize {
        self.held
            .char_indices()
            .map(|(index, _)| index)
            .find(|&index| {
                let tail = &self.held[index..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let check = matcher.push(piece);
            out.push_str(&check.text);
            if check.stopped {
                return (out, true);
            }
        }
        out.push_str(&matcher.finish());
        (out, false)
    }

    #[test]
    fn no_stops_passes_everything() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".to_string(), false));
    }

    #[test]
    fn stop_inside_one_piece_is_cut() {
        assert_eq!(run(&["END"], &["hello END world"]), ("hello ".to_string(), true));
    }

    #[test]
    fn stop_spanning_pieces_is_never_emitted() {
        let mut matcher = StopMatcher::new(vec!["\n\nUser:".to_string()]);
        assert_eq!(matcher.push("Paris.\n").text, "Paris.");
        assert_eq!(matcher.push("\nUs").text, "");
        let check = matcher.push("er: next");
        assert_eq!(check, StopCheck { text: String::new(), stopped: true });
    }

    #[test]
    fn false_alarm_is_released() {
        assert_eq!(run(&["STOP"], &["ST", "OCK"]), ("STOCK".to_string(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".to_string(), true));
    }

    #[test]
    fn held_text_respects_char_boundaries() {
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".to_string(), false));
    }
}
