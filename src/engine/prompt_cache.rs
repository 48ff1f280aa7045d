//! The prompt cache: KV caches of recent generations, kept so that a request whose prompt begins
//! with tokens one of them already ran (the same system prompt, a chat that grows turn by turn)
//! starts from that prefix instead of running it again.
//!
//! A finished generation hands its sequence back with the tokens its KV cache holds. A new
//! generation takes the entry sharing the longest prefix with its prompt (the entry leaves the
//! cache: a KV cache has one owner) and reruns from the first token that differs; the sequence
//! drops whatever it held beyond that point. Bounded by the tokens held in all; the least
//! recently used entries go first. The bytes its entries hold are counted for `/metrics`. Pure
//! bookkeeping, generic over what it holds, so it is tested without a model.

use std::collections::VecDeque;

use super::models::Sequence;

/// Prefixes shorter than this are not worth an entry's reuse (a chat template's first tokens are
/// shared by every prompt; a fresh sequence costs nothing to make).
pub const MIN_REUSED_TOKENS: usize = 8;

/// A sequence taken from the cache, and how many of the prompt's tokens it already holds.
pub struct Reused<S> {
    pub sequence: S,
    pub tokens: usize,
}

/// What an entry holds in memory.
pub trait Held {
    fn held_bytes(&self) -> usize;
}

impl Held for Box<dyn Sequence> {
    fn held_bytes(&self) -> usize {
        self.as_ref().held_bytes()
    }
}

pub struct PromptCache<S> {
    /// Most recently used last.
    entries: VecDeque<(Vec<u32>, S)>,
    held_tokens: usize,
    held_bytes: usize,
    max_tokens: usize,
}

impl<S: Held> PromptCache<S> {
    /// A cache holding KV caches of at most `max_tokens` tokens in all (0 turns it off).
    pub fn new(max_tokens: usize) -> Self {
        Self { entries: VecDeque::new(), held_tokens: 0, held_bytes: 0, max_tokens }
    }

    /// Bytes of memory the entries hold.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// The entry sharing the longest prefix with `prompt`, if that prefix is worth it. At least
    /// the prompt's last token is left to run, since its logits are what the generation needs.
    pub fn take(&mut self, prompt: &[u32]) -> Option<Reused<S>> {
        let (index, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(index, (tokens, _))| (index, shared_prefix(tokens, prompt)))
            .max_by_key(|&(index, shared)| (shared, index))?;
        let reusable = shared.min(prompt.len().saturating_sub(1));
        if reusable < MIN_REUSED_TOKENS {
            return None;
        }
        let (tokens, sequence) = self.entries.remove(index)?;
        self.held_tokens -= tokens.len();
        self.held_bytes -= sequence.held_bytes();
        Some(Reused { sequence, tokens: reusable })
    }

    /// Keep `sequence`, whose KV cache holds `tokens`, evicting the least recently used entries
    /// beyond the bound. A sequence larger than the whole cache is dropped.
    pub fn put(&mut self, tokens: Vec<u32>, sequence: S) {
        if tokens.len() < MIN_REUSED_TOKENS || tokens.len() > self.max_tokens {
            return;
        }
        while self.held_tokens + tokens.len() > self.max_tokens {
            let Some((evicted, sequence)) = self.entries.pop_front() else { break };
            self.held_tokens -= evicted.len();
            self.held_bytes -= sequence.held_bytes();
        }
        self.held_tokens += tokens.len();
        self.held_bytes += sequence.held_bytes();
        self.entries.push_back((tokens, sequence));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn held_tokens(&self) -> usize {
        self.held_tokens
    }
}

fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of the tests: its name, and as many bytes as the name has.
    impl Held for &str {
        fn held_bytes(&self) -> usize {
            self.len()
        }
    }

    fn tokens(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn a_prompt_that_extends_a_cached_one_reuses_it_up_to_its_last_token() {
        let mut cache = PromptCache::new(1000);
        cache.put(tokens(0..40), "first turn");
        let second_turn = tokens(0..60);
        let reused = cache.take(&second_turn).expect("a hit");
        assert_eq!((reused.sequence, reused.tokens), ("first turn", 40));
        assert_eq!((cache.len(), cache.held_tokens()), (0, 0), "taken out: one owner per KV cache");
        // The same prompt again: everything but the last token, which must run for its logits.
        cache.put(tokens(0..40), "again");
        assert_eq!(cache.take(&tokens(0..40)).unwrap().tokens, 39);
    }

    #[test]
    fn prompts_sharing_too_little_miss() {
        let mut cache = PromptCache::new(1000);
        cache.put(tokens(0..40), "cached");
        let mut other = tokens(0..(MIN_REUSED_TOKENS as u32 - 1));
        other.extend(500..540);
        assert!(cache.take(&other).is_none());
        assert!(cache.take(&tokens(100..140)).is_none());
        assert_eq!(cache.len(), 1, "a miss leaves the cache as it was");
    }

    #[test]
    fn a_prefix_that_diverges_in_the_middle_reuses_only_what_is_shared() {
        let mut cache = PromptCache::new(1000);
        cache.put(tokens(0..50), "system prompt and an old question");
        let mut new_question = tokens(0..20);
        new_question.extend(900..930);
        let reused = cache.take(&new_question).unwrap();
        assert_eq!(reused.tokens, 20);
    }

    #[test]
    fn the_longest_shared_prefix_wins() {
        let mut cache = PromptCache::new(1000);
        cache.put(tokens(0..20), "short");
        let mut long = tokens(0..30);
        long.push(7);
        cache.put(long, "long");
        cache.put(tokens(200..240), "unrelated");
        assert_eq!(cache.take(&tokens(0..100)).unwrap().sequence, "long");
    }

    #[test]
    fn the_least_recently_used_entries_are_evicted_beyond_the_bound() {
        let mut cache = PromptCache::new(100);
        cache.put(tokens(0..40), "oldest");
        cache.put(tokens(100..140), "middle");
        cache.put(tokens(200..240), "newest");
        assert_eq!((cache.len(), cache.held_tokens()), (2, 80));
        assert_eq!(cache.held_bytes(), "middle".len() + "newest".len());
        assert!(cache.take(&tokens(0..50)).is_none(), "evicted");
        assert_eq!(cache.take(&tokens(100..150)).unwrap().sequence, "middle");
        assert_eq!(cache.held_bytes(), "newest".len(), "a taken entry is no longer held");
        cache.put(tokens(0..101), "larger than the whole cache");
        assert_eq!((cache.len(), cache.held_bytes()), (1, "newest".len()));
        let mut off = PromptCache::new(0);
        off.put(tokens(0..40), "never kept");
        assert_eq!(off.len(), 0);
    }
}
