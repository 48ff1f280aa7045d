//! Attention of a decode step's few query rows against one sequence's cached keys and values, on
//! the CPU, read in place from the cache: no transposed copy of the keys, no packing for a
//! general matmul, no score tensor per op. A decode step has one row per sequence, so each
//! of these is a few thousand multiply-adds that candle's matmul, mask and softmax ops cost
//! more to set up than to run; a prompt's many rows stay on candle's matmul.
//!
//! Query heads that share a key/value head (grouped-query attention) read the same cached rows.

/// What one call attends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Query rows (new tokens); the first sits at `position`, so the cache holds
    /// `position + tokens` positions, the new ones included.
    pub tokens: usize,
    pub position: usize,
    /// Sliding-window layers see only the last `window` positions, their own included.
    pub window: Option<usize>,
    /// Scores are `scale · q·k`, then `cap · tanh(score / cap)` where a cap is set.
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl AttentionShape {
    /// Positions in the cache, the new ones included.
    pub fn positions(&self) -> usize {
        self.position + self.tokens
    }

    /// The cache positions query row `token` may look at.
    fn visible(&self, token: usize) -> std::ops::Range<usize> {
        let query = self.position + token;
        let first = self.window.map_or(0, |size| (query + 1).saturating_sub(size));
        first..query + 1
    }
}

/// `queries` is `(heads, tokens, head_dim)`; `keys` and `values` hold key/value head `h`'s
/// position `p` at `h · kv_stride + p · head_dim` (the cache's buffers, `len` positions filled);
/// `out` is `(tokens, heads · head_dim)`. Panics on slices too short for the shape.
pub fn attend(
    shape: &AttentionShape,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    kv_stride: usize,
    out: &mut [f32],
) {
    let AttentionShape { heads, kv_heads, head_dim, tokens, .. } = *shape;
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads), "heads in whole groups");
    assert_eq!(queries.len(), heads * tokens * head_dim, "queries");
    assert_eq!(out.len(), tokens * heads * head_dim, "output");
    let len = shape.positions();
    let needed = (kv_heads - 1) * kv_stride + len * head_dim;
    assert!(kv_stride >= len * head_dim && keys.len() >= needed && values.len() >= needed, "cache");
    let group = heads / kv_heads;
    let mut scores = vec![0.0f32; len];
    for head in 0..heads {
        let cache_start = head / group * kv_stride;
        let (head_keys, head_values) = (&keys[cache_start..], &values[cache_start..]);
        for token in 0..tokens {
            let query = &queries[(head * tokens + token) * head_dim..][..head_dim];
            let visible = shape.visible(token);
            let scores = &mut scores[visible.clone()];
            let mut max = f32::NEG_INFINITY;
            for (score, position) in scores.iter_mut().zip(visible.clone()) {
                let mut value = shape.scale * dot(query, &head_keys[position * head_dim..][..head_dim]);
                if let Some(cap) = shape.softcap {
                    value = cap * (value / cap).tanh();
                }
                *score = value;
                max = max.max(value);
            }
            let mut total = 0.0f32;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                total += *score;
            }
            let row = &mut out[(token * heads + head) * head_dim..][..head_dim];
            row.fill(0.0);
            for (&weight, position) in scores.iter().zip(visible) {
                add_scaled(row, weight / total, &head_values[position * head_dim..][..head_dim]);
            }
        }
    }
}

/// Eight independent partial sums, which the compiler keeps in one vector register.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `out += weight · values`.
fn add_scaled(out: &mut [f32], weight: f32, values: &[f32]) {
    for (out, value) in out.iter_mut().zip(values) {
        *out += weight * value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The textbook definition, in f64, one query head at a time.
    fn reference(
        shape: &AttentionShape,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        kv_stride: usize,
    ) -> Vec<f32> {
        let AttentionShape { heads, kv_heads, head_dim, tokens, position, .. } = *shape;
        let mut out = vec![0.0f32; tokens * heads * head_dim];
        for head in 0..heads {
            let kv = head / (heads / kv_heads);
            for token in 0..tokens {
                let query = position + token;
                let q = &queries[(head * tokens + token) * head_dim..][..head_dim];
                let scores: Vec<Option<f64>> = (0..shape.positions())
                    .map(|key| {
                        let hidden = key > query || shape.window.is_some_and(|size| query - key >= size);
                        (!hidden).then(|| {
                            let k = &keys[kv * kv_stride + key * head_dim..][..head_dim];
                            let mut s = f64::from(shape.scale)
                                * q.iter().zip(k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>();
                            if let Some(cap) = shape.softcap {
                                s = f64::from(cap) * (s / f64::from(cap)).tanh();
                            }
                            s
                        })
                    })
                    .collect();
                let max = scores.iter().flatten().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                let total: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                for d in 0..head_dim {
                    let mut value = 0.0;
                    for (key, score) in scores.iter().enumerate() {
                        if let Some(s) = score {
                            value += (s - max).exp() / total
                                * f64::from(values[kv * kv_stride + key * head_dim + d]);
                        }
                    }
                    out[(token * heads + head) * head_dim + d] = value as f32;
                }
            }
        }
        out
    }

    #[test]
    fn agrees_with_the_definition() {
        let cases = [
            // heads, kv_heads, head_dim, tokens, position, window, softcap
            (4, 4, 16, 1, 0, None, None),
            (9, 3, 64, 1, 37, None, None),
            (4, 1, 36, 3, 20, None, Some(50.0)),
            (8, 2, 12, 2, 30, Some(8), None),
            (2, 1, 8, 5, 0, Some(3), Some(30.0)),
        ];
        for (seed, (heads, kv_heads, head_dim, tokens, position, window, softcap)) in
            cases.into_iter().enumerate()
        {
            let shape =
                AttentionShape { heads, kv_heads, head_dim, tokens, position, window, scale: 0.3, softcap };
            // A cache with room beyond what is filled, as the real one has.
            let kv_stride = (shape.positions() + 5) * head_dim;
            let queries = sample(heads * tokens * head_dim, seed as u64);
            let keys = sample(kv_heads * kv_stride, 100 + seed as u64);
            let values = sample(kv_heads * kv_stride, 200 + seed as u64);
            let mut out = vec![f32::NAN; tokens * heads * head_dim];
            attend(&shape, &queries, &keys, &values, kv_stride, &mut out);
            let expected = reference(&shape, &queries, &keys, &values, kv_stride);
            for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
                assert!((got - want).abs() <= 1e-5, "case {seed}, value {i}: {got} against {want}");
            }
        }
    }

    #[test]
    fn a_window_of_one_sees_only_its_own_position() {
        let shape = AttentionShape {
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            tokens: 1,
            position: 3,
            window: Some(1),
            scale: 1.0,
            softcap: None,
        };
        let keys = [9.0; 8];
        let values = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, -4.0];
        let mut out = [0.0; 2];
        attend(&shape, &[1.0, 0.0], &keys, &values, 8, &mut out);
        assert_eq!(out, [4.0, -4.0]);
    }
}
