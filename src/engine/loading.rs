//! What loading a model costs and how far it got: the bytes read so far (shown in `/api/models`
//! while a model loads at run time) and the memory check made before any weight is read.

use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};

use super::EngineError;

/// How far a load got, shared between the loading thread and whoever asks.
#[derive(Debug, Default)]
pub struct LoadProgress {
    bytes_read: AtomicU64,
    total_bytes: AtomicU64,
}

impl LoadProgress {
    pub fn set_total(&self, bytes: u64) {
        self.total_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        self.bytes_read.store(self.total_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// (bytes read, bytes in all).
    pub fn bytes(&self) -> (u64, u64) {
        let total = self.total_bytes.load(Ordering::Relaxed);
        (self.bytes_read.load(Ordering::Relaxed).min(total), total)
    }
}

/// A reader that counts what passes through it into a `LoadProgress`.
pub struct CountingReader<'a, R> {
    inner: R,
    progress: &'a LoadProgress,
}

impl<'a, R> CountingReader<'a, R> {
    pub fn new(inner: R, progress: &'a LoadProgress) -> Self {
        Self { inner, progress }
    }

    pub fn progress(&self) -> &'a LoadProgress {
        self.progress
    }
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.progress.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
        Ok(read)
    }
}

impl<R: Seek> Seek for CountingReader<'_, R> {
    fn seek(&mut self, position: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(position)
    }
}

/// Memory a model will hold: its weights as the file stores them (the kernels run on the file's
/// blocks) plus one sequence's KV cache filled to the whole context window (f32 keys and values).
/// Generations running at once each hold a cache of their own, grown as they go; this is the
/// least a model needs to answer one request of any length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryNeed {
    pub weights: u64,
    pub kv_cache: u64,
}

impl MemoryNeed {
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.kv_cache)
    }
}

/// Refuse, with the figures, a model that does not fit in the memory available now, rather than
/// be killed by the OOM killer halfway through reading it.
pub fn check_memory(model: &str, need: MemoryNeed) -> Result<(), EngineError> {
    let available = available_memory();
    if need.total() <= available {
        return Ok(());
    }
    Err(EngineError::InvalidRequest(format!(
        "not enough memory for {model}: it needs {} ({} of weights + {} of KV cache at its full context), {} is available",
        mib(need.total()),
        mib(need.weights),
        mib(need.kv_cache),
        mib(available)
    )))
}

/// What the system reports available; when it cannot say, no limit (the check is a courtesy,
/// not a guarantee).
fn available_memory() -> u64 {
    match sysinfo::System::new() {
        Ok(mut system) => {
            system.refresh_memory();
            system.available_memory()
        }
        Err(_) => u64::MAX,
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counting_reader_counts_reads_not_seeks() {
        let progress = LoadProgress::default();
        progress.set_total(10);
        let mut reader = CountingReader::new(std::io::Cursor::new(vec![7u8; 10]), &progress);
        let mut buf = [0u8; 4];
        reader.read_exact(&mut buf).unwrap();
        reader.seek(SeekFrom::Start(8)).unwrap();
        assert_eq!(progress.bytes(), (4, 10));
        progress.finish();
        assert_eq!(progress.bytes(), (10, 10));
    }

    #[test]
    fn the_refusal_gives_the_figures() {
        let need = MemoryNeed { weights: 3 << 20, kv_cache: u64::MAX / 2 };
        let error = check_memory("big.gguf", need).unwrap_err().to_string();
        assert!(error.contains("not enough memory for big.gguf"), "{error}");
        assert!(error.contains("3 MiB of weights"), "{error}");
        assert!(check_memory("small.gguf", MemoryNeed { weights: 1, kv_cache: 1 }).is_ok());
    }
}
