//! Candle's own CPU thread pools, set up so that they neither fight the engine's pool
//! (`pool.rs`) nor cost time where they are not needed.
//!
//! Besides our kernels, candle 0.11 computes on two pools, both sized from the environment:
//! - its barrier pool (`candle_core::utils::barrier_pool`; `CANDLE_NUM_THREADS`, else
//!   `RAYON_NUM_THREADS`, else the physical cores): elementwise ops over 64K values or more (a
//!   prompt's activations) and candle's quantized matmul, which runs the types without a kernel
//!   of ours (Q2_K, Q3_K, Q5_K). Its idle workers spin 25,000 pauses (about 0.7 ms on these CPUs)
//!   after each op before they park, holding a core our workers need, and every op waits for all
//!   of its workers to finish, including one another program has descheduled: on a busy two-core
//!   machine decode collapsed to a few tokens per second, at eight times the CPU time. Shortening
//!   the spin was not enough: on two busy cores it still lost to one thread, also for K-quant
//!   matmuls (gemma's, measured while they ran on candle: prompt 73 against 112 tokens/s, decode
//!   22 against 31), and on two idle ones it gained nothing measurable. So it runs on one thread,
//!   the caller's: no worker, no spin, no wait;
//! - rayon's global pool (`RAYON_NUM_THREADS`, else the logical cores): softmax, the norms and
//!   rotary embeddings of many rows at once, and gemm's f32 matmuls (a prompt's attention, BERT).
//!   Its idle workers yield, then sleep, so it keeps the engine's thread count. With the variable
//!   unset, candle counts the physical cores again, parsing /proc/cpuinfo, at every f32 matmul:
//!   60-80 µs, twice per layer and token.
//!
//! (`Device::with_context` installs a third, private rayon pool; llmesh does not use it.)
//!
//! And each model's worker loop runs inside a rayon pool of its own (`in_own_rayon_pool`), so
//! that candle's ops run on the worker instead of being handed to another thread.
//! Variables the user set are left alone: `CANDLE_NUM_THREADS=N` brings the barrier pool back,
//! which may pay on a large idle machine serving Q2_K/Q3_K/Q5_K files.

/// Set the environment variables candle's pools read, unless already set, for an engine that
/// computes on `threads` threads.
///
/// # Safety
/// Changes the environment: call while the process has a single thread, before candle or rayon
/// run anything (first thing in `main`).
pub unsafe fn configure(threads: usize) {
    let threads = threads.max(1).to_string();
    for (variable, value) in [("CANDLE_NUM_THREADS", "1"), ("RAYON_NUM_THREADS", threads.as_str())] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: the caller guarantees that no other thread runs.
            unsafe { std::env::set_var(variable, value) };
        }
    }
}

/// Run `work` (a model's worker loop) on a rayon pool of its own, as many threads as the engine
/// computes on.
///
/// Candle's CPU ops (softmax, rotary embeddings, elementwise maps, its f32 matmuls) run their
/// parallel loops on the rayon pool of the thread that calls them. Called from a thread outside
/// any pool, each op is handed to the global pool and the caller sleeps until it is done: a
/// futex wake and a wait for every op, hundreds per token. Measured on SmolLM2 (2 cores): decode
/// 84-87 tok/s handing over, 100-113 inside a pool; on one thread 42 against 64. Whether that pool
/// has one thread or two made no difference beyond the noise; two keep a long prompt's attention
/// on both cores.
pub fn in_own_rayon_pool(work: impl FnOnce() + Send) {
    let threads = super::pool::global().threads();
    match rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|_| "model-ops".into()).build() {
        Ok(pool) => pool.install(work),
        Err(error) => {
            tracing::warn!(%error, "no rayon pool of its own: candle's ops go to the global one");
            work()
        }
    }
}
