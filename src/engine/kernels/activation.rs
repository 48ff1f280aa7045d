//! The gated feed-forward's activation, `act(gate) · up`, read straight from the fused gate|up
//! output of a matmul in one pass (as ggml's `swiglu` and `geglu` ops do), instead of an
//! activation over a strided view, a copy and a multiplication.
//!
//! Both activations are written as `x · σ(k·z)`: SiLU is `x · σ(x)`, and GELU's tanh form
//! `½x(1 + tanh(z))` equals `x · σ(2z)` with `z = √(2/π)(x + 0.044715x³)`. `scalar` is the
//! reference (f32 `exp`); the AVX2 variant computes `exp` with a polynomial and is held to the
//! reference by tests.

/// Which activation gates the feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatedActivation {
    /// SiLU (llama, qwen, phi3).
    Silu,
    /// GELU, tanh approximation (gemma).
    GeluTanh,
}

/// `√(2/π)`.
const GELU_SCALE: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// `out[t][i] = act(fused[t][i]) · fused[t][width + i]` for every row `t` of `fused` (`2·width`
/// values each: the gate's outputs, then the up projection's). Panics on lengths that do not fit.
pub fn gated(activation: GatedActivation, fused: &[f32], width: usize, out: &mut [f32]) {
    assert!(width > 0 && fused.len() == 2 * out.len() && out.len().is_multiple_of(width), "gated: lengths");
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::gated(activation, fused, width, out) };
    }
    scalar(activation, fused, width, out)
}

/// The reference: the same formula with the standard library's `exp`.
pub fn scalar(activation: GatedActivation, fused: &[f32], width: usize, out: &mut [f32]) {
    for (row, out) in fused.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
        let (gate, up) = row.split_at(width);
        for ((out, &x), &up) in out.iter_mut().zip(gate).zip(up) {
            *out = activate(activation, x) * up;
        }
    }
}

/// `x · σ(k·z)`.
fn activate(activation: GatedActivation, x: f32) -> f32 {
    let argument = match activation {
        GatedActivation::Silu => x,
        GatedActivation::GeluTanh => 2.0 * GELU_SCALE * (x + GELU_CUBIC * x * x * x),
    };
    x / (1.0 + (-argument).exp())
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::{GELU_CUBIC, GELU_SCALE, GatedActivation};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// `exp(x)` on eight lanes: `x = n·ln 2 + r` with `|r| ≤ ½ ln 2`, `eʳ` by a degree-7 polynomial
    /// (Taylor; relative error below 2e-7 there), `2ⁿ` built in the exponent bits. Inputs are
    /// clamped to ±87, where the result stays a normal f32; callers only need `1 + exp(−y)` to
    /// saturate, which it does long before.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        // ln 2 in two parts, so that n·ln 2 is subtracted without losing r's low bits.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for coefficient in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(coefficient));
        }
        let power = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(power))
    }

    /// `super::gated` on eight values at a time, the tail of each row by the reference.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA (`available`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gated(activation: GatedActivation, fused: &[f32], width: usize, out: &mut [f32]) {
        let vectors = width / 8;
        for (row, out) in fused.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
            let (gate, up) = row.split_at(width);
            for i in 0..vectors {
                // SAFETY: i·8 + 8 ≤ width, the length of `gate`, `up` and `out`.
                unsafe {
                    let x = _mm256_loadu_ps(gate.as_ptr().add(8 * i));
                    let u = _mm256_loadu_ps(up.as_ptr().add(8 * i));
                    let argument = match activation {
                        GatedActivation::Silu => x,
                        GatedActivation::GeluTanh => {
                            let cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                            let z = _mm256_fmadd_ps(_mm256_set1_ps(GELU_CUBIC), cube, x);
                            _mm256_mul_ps(_mm256_set1_ps(2.0 * GELU_SCALE), z)
                        }
                    };
                    let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), argument));
                    let activated = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                    _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), _mm256_mul_ps(activated, u));
                }
            }
            for i in 8 * vectors..width {
                out[i] = super::activate(activation, gate[i]) * up[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::tests::Random;

    #[test]
    fn the_sigmoid_form_is_gelu_tanh_and_silu() {
        for x in [-6.0f32, -1.5, -0.1, 0.0, 0.3, 2.0, 7.5] {
            let fused = [x, 1.0];
            let mut out = [0.0];
            scalar(GatedActivation::GeluTanh, &fused, 1, &mut out);
            let z = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
            let gelu = 0.5 * x * (1.0 + z.tanh());
            assert!((out[0] - gelu).abs() <= 1e-6 * (1.0 + gelu.abs()), "gelu({x}) = {} not {gelu}", out[0]);
            scalar(GatedActivation::Silu, &fused, 1, &mut out);
            let silu = x / (1.0 + (-x).exp());
            assert!((out[0] - silu).abs() <= 1e-6 * (1.0 + silu.abs()), "silu({x}) = {} not {silu}", out[0]);
        }
    }

    #[test]
    fn the_gate_multiplies_the_up_projection_row_by_row() {
        // Two rows of width 2: [g0 g1 u0 u1].
        let fused = [1.0, -2.0, 3.0, 4.0, 0.5, 0.0, -1.0, 10.0];
        let mut out = [0.0; 4];
        scalar(GatedActivation::Silu, &fused, 2, &mut out);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        assert_eq!(out, [silu(1.0) * 3.0, silu(-2.0) * 4.0, -silu(0.5), 0.0]);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_matches_the_reference() {
        if !avx2::available() {
            return;
        }
        // Widths with and without a tail of fewer than eight values.
        for width in [8, 13, 640, 2051] {
            // Values across the range a feed-forward sees, the tails of the sigmoid included.
            let fused = Random(width as u64).floats(3 * 2 * width, 20.0);
            for activation in [GatedActivation::Silu, GatedActivation::GeluTanh] {
                let (mut expected, mut got) = (vec![0.0; 3 * width], vec![0.0; 3 * width]);
                scalar(activation, &fused, width, &mut expected);
                // SAFETY: checked `available` above.
                unsafe { avx2::gated(activation, &fused, width, &mut got) };
                for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
                    assert!(
                        (e - g).abs() <= 2e-6 * e.abs().max(1.0),
                        "{activation:?}, width {width}, value {i}: {g} against {e}"
                    );
                }
            }
        }
    }
}
