//! Choosing the next token from a model's logits: temperature, top-k, top-p, frequency and
//! presence penalties, seeded randomness. Pure logic, kept apart from the models.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::grammar::ResponseFormat;
use super::tools::ToolParams;

/// How a generation picks tokens and when it stops. Validated by the API before it gets here.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Upper bound on generated tokens; the context window may cut it shorter.
    pub max_tokens: usize,
    /// Strings that end the generation. They are never sent to the client.
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    /// Subtracted from a token's logit once per earlier occurrence in the completion.
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit once if it occurred in the completion at all.
    pub presence_penalty: f32,
    /// Keep generating past the model's end-of-sequence tokens (benchmarks). A response format's
    /// grammar still ends the generation when the output is complete.
    pub ignore_eos: bool,
    /// What the output must be (plain text, a JSON object, JSON valid against a schema).
    pub response_format: ResponseFormat,
    /// The tools the model may call, and how.
    pub tools: ToolParams,
    /// Send each generated token's log-probability with this many of the most likely
    /// alternatives (0 to [`MAX_TOP_LOGPROBS`]); `None`: none.
    pub logprobs: Option<usize>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`: -100 bans a token,
    /// 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// The choices of one request (`n`) share this id: a host runs their prompt once and gives
    /// each a copy of its KV cache.
    pub prefill_group: Option<u64>,
}

/// Tokens one `logit_bias` may name.
pub const MAX_LOGIT_BIAS_TOKENS: usize = 1024;

/// The most alternatives `logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_tokens: 256,
            stop: Vec::new(),
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            ignore_eos: false,
            response_format: ResponseFormat::Text,
            tools: ToolParams::default(),
            logprobs: None,
            logit_bias: Vec::new(),
            prefill_group: None,
        }
    }
}

/// Per-generation sampling state: the random generator and the counts the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng, counts: HashMap::new() }
    }

    /// Pick the next token from raw logits and remember it for the penalties.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let token = if self.params.temperature <= 0.0 { argmax(logits) } else { self.sample_random(logits) };
        *self.counts.entry(token).or_insert(0) += 1;
        token
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        if self.params.frequency_penalty == 0.0 && self.params.presence_penalty == 0.0 {
            return;
        }
        for (&token, &count) in &self.counts {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= self.params.frequency_penalty * count as f32 + self.params.presence_penalty;
            }
        }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let inverse_temperature = 1.0 / self.params.temperature;
        let max = logits.iter().copied().filter(|l| l.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return 0;
        }
        // The usual case (no top-k, no top-p) needs no sorting: one pass over the vocabulary.
        if self.params.top_k == 0 && self.params.top_p >= 1.0 {
            let weight = |logit: f32| {
                if logit.is_finite() { ((logit - max) * inverse_temperature).exp() } else { 0.0 }
            };
            let total: f64 = logits.iter().map(|&l| weight(l) as f64).sum();
            let mut target = self.rng.random::<f64>() * total;
            for (token, &logit) in logits.iter().enumerate() {
                target -= weight(logit) as f64;
                if target <= 0.0 {
                    return token as u32;
                }
            }
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, logit)| logit.is_finite())
            .map(|(token, &logit)| (token as u32, ((logit - max) * inverse_temperature).exp()))
            .collect();
        if self.params.top_k > 0 && self.params.top_k < candidates.len() {
            // Partition first: only the k best need sorting.
            candidates.select_nth_unstable_by(self.params.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            candidates.truncate(self.params.top_k);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let mut total: f64 = candidates.iter().map(|c| c.1 as f64).sum();
        if self.params.top_p < 1.0 {
            let mut mass = 0.0f64;
            let mut keep = candidates.len();
            for (index, candidate) in candidates.iter().enumerate() {
                mass += candidate.1 as f64 / total;
                if mass >= self.params.top_p as f64 {
                    keep = index + 1;
                    break;
                }
            }
            candidates.truncate(keep);
            total = candidates.iter().map(|c| c.1 as f64).sum();
        }
        let mut target = self.rng.random::<f64>() * total;
        for &(token, weight) in &candidates {
            target -= weight as f64;
            if target <= 0.0 {
                return token;
            }
        }
        candidates[candidates.len() - 1].0
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, logit) in logits.iter().enumerate() {
        if *logit > logits[best] {
            best = index;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..SamplingParams::default() }
    }

    #[test]
    fn zero_temperature_is_greedy() {
        let mut sampler = Sampler::new(params(0.0));
        assert_eq!(sampler.sample(&mut [0.1, 3.0, 2.9, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut sampler = Sampler::new(SamplingParams { top_k: 1, ..params(5.0) });
        for _ in 0..50 {
            assert_eq!(sampler.sample(&mut [0.0, 1.0, 0.5, 0.9]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 2 holds ~88% of the mass; with top_p 0.5 nothing else can be drawn.
        let mut sampler = Sampler::new(SamplingParams { top_p: 0.5, ..params(1.0) });
        for _ in 0..200 {
            assert_eq!(sampler.sample(&mut [0.0, 1.0, 3.0, 0.0]), 2);
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let draw = |seed| {
            let mut sampler = Sampler::new(SamplingParams { seed: Some(seed), ..params(1.0) });
            (0..32).map(|_| sampler.sample(&mut [1.0; 16])).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn high_temperature_spreads_draws() {
        let mut sampler = Sampler::new(params(1.0));
        let distinct: std::collections::HashSet<_> =
            (0..200).map(|_| sampler.sample(&mut [1.0; 8])).collect();
        assert!(distinct.len() > 4, "uniform logits should give many tokens: {distinct:?}");
    }

    #[test]
    fn plain_sampling_follows_the_distribution() {
        // Token 1 has e^2 ≈ 7.4 times the weight of token 0; token 2 is excluded (-inf).
        let mut sampler = Sampler::new(params(1.0));
        let ones = (0..4000).filter(|_| sampler.sample(&mut [0.0, 2.0, f32::NEG_INFINITY]) == 1).count();
        assert!((3350..3700).contains(&ones), "{ones} of 4000");
    }

    #[test]
    fn presence_penalty_steers_away_from_repeats() {
        let mut sampler = Sampler::new(SamplingParams { presence_penalty: 2.0, ..params(0.0) });
        assert_eq!(sampler.sample(&mut [1.0, 0.0]), 0);
        assert_eq!(sampler.sample(&mut [1.0, 0.0]), 1);
    }

    #[test]
    fn frequency_penalty_grows_with_count() {
        let mut sampler = Sampler::new(SamplingParams { frequency_penalty: 0.6, ..params(0.0) });
        assert_eq!(sampler.sample(&mut [1.0, 0.0]), 0); // 0 seen once: 1.0 - 0.6 = 0.4 > 0
        assert_eq!(sampler.sample(&mut [1.0, 0.0]), 0); // seen twice now: -0.2 < 0
        assert_eq!(sampler.sample(&mut [1.0, 0.0]), 1);
    }
}
