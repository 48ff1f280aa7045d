//! One sequence's keys and values, per layer, in buffers allocated ahead and grown in chunks: a
//! step writes its new rows in place and attention reads a view of the filled part, so no step
//! copies the cache (the candle-transformers models `cat` the whole cache onto every new token).
//! Rows are stored as the cache's `dtype`: f16 on the CPU (half the memory of f32, as llama.cpp's
//! default cache), rounded to the nearest as they are written.

use candle_core::{DType, Result, Tensor, bail};

/// Rows (positions) added at a time when a layer's buffer is full; at least doubling beyond that,
/// so growth costs O(length) copies in all.
const GROWTH: usize = 256;

/// Keys and values of one layer: `(kv_heads, capacity, head_dim)` buffers, the first `len`
/// positions filled.
struct LayerCache {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

impl LayerCache {
    fn capacity(&self) -> usize {
        self.keys.dims().get(1).copied().unwrap_or(0)
    }
}

/// The cache of every layer of one sequence. Layers are allocated at their first use, so a node
/// running a range of layers holds only those.
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    max_len: usize,
    dtype: DType,
}

impl KvCache {
    pub fn new(layers: usize, max_len: usize, dtype: DType) -> Self {
        Self { layers: (0..layers).map(|_| None).collect(), max_len, dtype }
    }

    /// Positions held by `layer` (0 before its first use).
    pub fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).and_then(Option::as_ref).map_or(0, |cache| cache.len)
    }

    /// Forget every position from `len` on (to rerun them, or reuse a prefix).
    pub fn truncate(&mut self, len: usize) {
        for cache in self.layers.iter_mut().flatten() {
            cache.len = cache.len.min(len);
        }
    }

    /// A copy of the first `len` positions (its own storage: appends to either leave the other
    /// alone), for another generation that shares the prompt.
    pub fn fork(&self, len: usize) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                let Some(cache) = layer else { return Ok(None) };
                let kept = cache.len.min(len);
                Ok(Some(LayerCache { keys: cache.keys.copy()?, values: cache.values.copy()?, len: kept }))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, max_len: self.max_len, dtype: self.dtype })
    }

    /// Give every layer's buffers room for exactly the positions they hold (a copy of those), so
    /// that a sequence kept for later reuse (the prompt cache) costs its length rather than its
    /// capacity, which may be twice that. Appending later grows it again.
    pub fn shrink_to_fit(&mut self) -> Result<()> {
        for cache in self.layers.iter_mut().flatten() {
            if cache.capacity() == cache.len || cache.len == 0 {
                continue;
            }
            let keep = |buffer: &Tensor| -> Result<Tensor> {
                let (heads, _, head_dim) = buffer.dims3()?;
                let kept = Tensor::zeros((heads, cache.len, head_dim), buffer.dtype(), buffer.device())?;
                kept.slice_set(&buffer.narrow(1, 0, cache.len)?.contiguous()?, 1, 0)?;
                Ok(kept)
            };
            (cache.keys, cache.values) = (keep(&cache.keys)?, keep(&cache.values)?);
        }
        Ok(())
    }

    /// Bytes of every layer's buffers (their capacity, not only the filled positions).
    pub fn bytes(&self) -> usize {
        let elements: usize = self
            .layers
            .iter()
            .flatten()
            .map(|cache| cache.keys.elem_count() + cache.values.elem_count())
            .sum();
        elements * self.dtype.size_in_bytes()
    }

    /// Append `keys` and `values` (`(kv_heads, new, head_dim)`, contiguous) to `layer` and return
    /// views of all its positions, `(kv_heads, len, head_dim)`.
    pub fn append(&mut self, layer: usize, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        let (heads, new, head_dim) = keys.dims3()?;
        let (max_len, dtype) = (self.max_len, self.dtype);
        let Some(slot) = self.layers.get_mut(layer) else { bail!("layer {layer} is out of range") };
        let len = slot.as_ref().map_or(0, |cache| cache.len);
        let needed = len + new;
        if needed > max_len {
            bail!("the sequence would hold {needed} positions, more than the {max_len} it may");
        }
        let capacity = slot.as_ref().map_or(0, LayerCache::capacity);
        if needed > capacity {
            let grown = needed.next_multiple_of(GROWTH).max(capacity * 2).min(max_len);
            let (new_keys, new_values) = (
                Tensor::zeros((heads, grown, head_dim), dtype, keys.device())?,
                Tensor::zeros((heads, grown, head_dim), dtype, keys.device())?,
            );
            if let Some(old) = slot.as_ref().filter(|cache| cache.len > 0) {
                new_keys.slice_set(&old.keys.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                new_values.slice_set(&old.values.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
            *slot = Some(LayerCache { keys: new_keys, values: new_values, len });
        }
        let Some(cache) = slot.as_mut() else { bail!("layer {layer} has no cache") };
        cache.keys.slice_set(&keys.to_dtype(dtype)?.contiguous()?, 1, len)?;
        cache.values.slice_set(&values.to_dtype(dtype)?.contiguous()?, 1, len)?;
        cache.len = needed;
        Ok((cache.keys.narrow(1, 0, needed)?, cache.values.narrow(1, 0, needed)?))
    }

    #[cfg(test)]
    fn capacity(&self, layer: usize) -> usize {
        self.layers[layer].as_ref().map_or(0, LayerCache::capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(start: usize, count: usize) -> Tensor {
        let values: Vec<f32> = (start..start + count).flat_map(|p| [p as f32, -(p as f32)]).collect();
        Tensor::from_vec(values, (1, count, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn appends_grow_in_chunks_and_keep_every_position() {
        let mut cache = KvCache::new(2, 10_000, DType::F32);
        let (keys, _) = cache.append(1, &rows(0, 5), &rows(0, 5)).unwrap();
        assert_eq!(keys.dims(), &[1, 5, 2]);
        assert_eq!(cache.capacity(1), GROWTH);
        assert_eq!(cache.len(0), 0);
        for position in 5..300 {
            cache.append(1, &rows(position, 1), &rows(position, 1)).unwrap();
        }
        assert_eq!(cache.capacity(1), 2 * GROWTH);
        let (keys, values) = cache.append(1, &rows(300, 2), &rows(300, 2)).unwrap();
        let expected = rows(0, 302).squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(keys.squeeze(0).unwrap().to_vec2::<f32>().unwrap(), expected);
        assert_eq!(values.squeeze(0).unwrap().to_vec2::<f32>().unwrap(), expected);
    }

    #[test]
    fn truncating_rewrites_from_the_cut() {
        let mut cache = KvCache::new(1, 100, DType::F32);
        cache.append(0, &rows(0, 4), &rows(0, 4)).unwrap();
        cache.truncate(2);
        let (keys, _) = cache.append(0, &rows(10, 1), &rows(10, 1)).unwrap();
        let keys = keys.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(keys, vec![vec![0.0, -0.0], vec![1.0, -1.0], vec![10.0, -10.0]]);
    }

    #[test]
    fn a_fork_is_a_copy_of_the_prefix() {
        let mut cache = KvCache::new(1, 100, DType::F32);
        cache.append(0, &rows(0, 4), &rows(0, 4)).unwrap();
        let mut fork = cache.fork(3).unwrap();
        let (forked, _) = fork.append(0, &rows(20, 1), &rows(20, 1)).unwrap();
        let (original, _) = cache.append(0, &rows(30, 1), &rows(30, 1)).unwrap();
        let first = |keys: Tensor| {
            keys.squeeze(0).unwrap().to_vec2::<f32>().unwrap().iter().map(|row| row[0]).collect::<Vec<_>>()
        };
        assert_eq!(first(forked), [0.0, 1.0, 2.0, 20.0]);
        assert_eq!(first(original), [0.0, 1.0, 2.0, 3.0, 30.0]);
    }

    #[test]
    fn shrinking_keeps_every_position_and_appending_grows_again() {
        let mut cache = KvCache::new(2, 10_000, DType::F32);
        for layer in 0..2 {
            cache.append(layer, &rows(0, 3), &rows(0, 3)).unwrap();
        }
        cache.truncate(2);
        assert_eq!(cache.bytes(), 2 * 2 * GROWTH * 2 * 4, "room for a first chunk");
        cache.shrink_to_fit().unwrap();
        assert_eq!((cache.capacity(0), cache.capacity(1), cache.len(1)), (2, 2, 2));
        // Two layers, keys and values, one head of two dimensions over two positions, f32.
        assert_eq!(cache.bytes(), 2 * 2 * 2 * 2 * 4);
        let (keys, values) = cache.append(1, &rows(7, 1), &rows(7, 1)).unwrap();
        assert_eq!(cache.capacity(1), GROWTH);
        let expected = vec![vec![0.0, -0.0], vec![1.0, -1.0], vec![7.0, -7.0]];
        assert_eq!(keys.squeeze(0).unwrap().to_vec2::<f32>().unwrap(), expected);
        assert_eq!(values.squeeze(0).unwrap().to_vec2::<f32>().unwrap(), expected);
    }

    #[test]
    fn an_f16_cache_holds_the_rows_rounded() {
        let mut cache = KvCache::new(1, 100, DType::F16);
        let row = Tensor::from_vec(vec![1.0f32 / 3.0, 70_000.0], (1, 1, 2), &Device::Cpu).unwrap();
        let (keys, values) = cache.append(0, &row, &row).unwrap();
        assert_eq!((keys.dtype(), values.dtype()), (DType::F16, DType::F16));
        let keys = keys.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The nearest f16 to 1/3, and a value beyond f16's range (65504) as infinity.
        assert_eq!(keys, [0.333_251_95, f32::INFINITY]);
    }

    #[test]
    fn the_window_is_a_hard_limit() {
        let mut cache = KvCache::new(1, 3, DType::F32);
        cache.append(0, &rows(0, 3), &rows(0, 3)).unwrap();
        assert!(cache.append(0, &rows(3, 1), &rows(3, 1)).is_err());
    }
}
