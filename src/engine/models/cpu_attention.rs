//! `kernels::attention` as a candle op: a step's queries against a sequence's cache views, read
//! where they lie (CPU only; other devices keep candle's matmul and softmax).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, bail};

use crate::engine::kernels::attention::{AttentionShape, attend};

pub struct CpuAttention(pub AttentionShape);

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "llmesh-cpu-attention"
    }

    /// `queries` `(1, heads, tokens, head_dim)` contiguous, f32; `keys` and `values`
    /// `(kv_heads, len, head_dim)` views whose rows are contiguous (the cache's buffers, f16 or f32);
    /// out `(tokens, heads · head_dim)`.
    fn cpu_fwd(
        &self,
        queries: &CpuStorage,
        query_layout: &Layout,
        keys: &CpuStorage,
        key_layout: &Layout,
        values: &CpuStorage,
        value_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = &self.0;
        let CpuStorage::F32(queries) = queries else { bail!("{}: f32 queries expected", self.name()) };
        let Some((start, end)) = query_layout.contiguous_offsets() else {
            bail!("{}: the queries must be contiguous", self.name())
        };
        let expected = [shape.kv_heads, shape.positions(), shape.head_dim];
        let cache = |layout: &Layout| -> Result<usize> {
            match layout.stride() {
                [kv_stride, row, 1] if layout.dims() == expected && *row == shape.head_dim => Ok(*kv_stride),
                _ => bail!(
                    "{}: a cache view {:?} / {:?}, not {expected:?}",
                    self.name(),
                    layout.dims(),
                    layout.stride()
                ),
            }
        };
        let (key_stride, value_stride) = (cache(key_layout)?, cache(value_layout)?);
        if key_stride != value_stride {
            bail!("{}: keys and values laid out differently", self.name());
        }
        let mut out = vec![0.0f32; shape.tokens * shape.heads * shape.head_dim];
        let queries = &queries[start..end];
        let (keys_at, values_at) = (key_layout.start_offset(), value_layout.start_offset());
        match (keys, values) {
            (CpuStorage::F16(keys), CpuStorage::F16(values)) => {
                attend(shape, queries, &keys[keys_at..], &values[values_at..], key_stride, &mut out)
            }
            (CpuStorage::F32(keys), CpuStorage::F32(values)) => {
                attend(shape, queries, &keys[keys_at..], &values[values_at..], key_stride, &mut out)
            }
            _ => bail!("{}: keys and values both f16 or both f32 expected", self.name()),
        }
        Ok((CpuStorage::F32(out), Shape::from((shape.tokens, shape.heads * shape.head_dim))))
    }
}
