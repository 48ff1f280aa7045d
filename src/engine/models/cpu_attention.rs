//! `kernels::attention` as a candle op: a step's queries against a sequence's cache views, read
//! where they lie (CPU only; other devices keep candle's matmul and softmax).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, bail};

use crate::engine::kernels::attention::{AttentionShape, attend};

pub struct CpuAttention(pub AttentionShape);

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "llmesh-cpu-attention"
    }

    /// `queries` `(1, heads, tokens, head_dim)` contiguous; `keys` and `values`
    /// `(kv_heads, len, head_dim)` views whose rows are contiguous (the cache's buffers);
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
        let (CpuStorage::F32(queries), CpuStorage::F32(keys), CpuStorage::F32(values)) =
            (queries, keys, values)
        else {
            bail!("{}: f32 expected", self.name())
        };
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
        let (keys, values) = (&keys[key_layout.start_offset()..], &values[value_layout.start_offset()..]);
        let mut out = vec![0.0f32; shape.tokens * shape.heads * shape.head_dim];
        attend(shape, &queries[start..end], keys, values, key_stride, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((shape.tokens, shape.heads * shape.head_dim))))
    }
}
