//! The engine's compute thread pool: a few persistent workers that the CPU kernels split an op
//! across, the calling thread taking part.
//!
//! Built for a machine with as few as two cores that also runs tokio, HTTP and other programs:
//! - an idle worker watches for the next op only briefly (`SPIN`), yielding the core to any
//!   thread that wants it, then parks, so a pool between ops leaves the cores to whoever else
//!   needs them;
//! - the caller never waits for a worker that has not started: a dispatch is a gate that workers
//!   enter while it is open, and the caller closes it once every item is claimed, then waits only
//!   for those inside (each finishing the range it holds). A worker that is slow to wake, or
//!   descheduled by another program, costs the op nothing;
//! - the items of an op are claimed in contiguous ranges from one cursor, each a share of what is
//!   left, so a thread that falls behind leaves its part to the others, and the last range of an
//!   op is short;
//! - one op at a time: a second caller (another model's worker thread) finding the pool busy runs
//!   its op on its own thread rather than waiting, as does an op started from inside a job.
//!
//! A job that panics does not wedge the pool: the panic is caught on the worker, the dispatch
//! completes, and the caller re-raises it.

use std::any::Any;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker keeps watching for the next op before it parks. Long enough to cover
/// most single-threaded stretches between the matmuls of a forward pass (norms, rotary,
/// attention), short enough that an idle pool gives the core back at once. It watches by yielding,
/// not with pause loops: a thread that wants the core in the meantime gets it.
const SPIN: Duration = Duration::from_micros(50);

/// `state` packs the dispatch generation (bits 33..), whether its gate is open (bit 32), and how
/// many workers are inside it (bits 0..32).
const OPEN: u64 = 1 << 32;
const GENERATION: u64 = 1 << 33;
const INSIDE: u64 = OPEN - 1;

/// The op being dispatched, on the caller's stack for the duration of `run`.
struct Job<'a> {
    items: usize,
    /// Each claim takes this fraction of the items left (at least one).
    share: usize,
    /// The first item not yet claimed.
    cursor: AtomicUsize,
    body: &'a (dyn Fn(Range<usize>) + Sync),
}

impl Job<'_> {
    /// Claim and run ranges until none are left. Ranges shrink as the op nears its end (guided
    /// scheduling): few claims on the shared cursor, and whoever finishes last has at most a
    /// small range left, so the others wait little for it.
    fn work(&self) {
        let mut start = self.cursor.load(Ordering::Relaxed);
        while start < self.items {
            let take = ((self.items - start) / self.share).max(1);
            // Relaxed: the cursor only hands out disjoint ranges; the results are published by
            // the gate (see `Dispatch`).
            match self.cursor.compare_exchange_weak(start, start + take, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    (self.body)(start..start + take);
                    start = self.cursor.load(Ordering::Relaxed);
                }
                Err(now) => start = now,
            }
        }
    }
}

/// A worker's parking flag, on its own cache line so that the spinning of one does not slow the
/// others.
#[repr(align(64))]
#[derive(Default)]
struct Parking {
    parked: AtomicBool,
}

struct Shared {
    state: AtomicU64,
    /// The current dispatch's job (lifetime erased); read only by a worker inside the gate.
    job: AtomicPtr<Job<'static>>,
    parking: Box<[Parking]>,
    stop: AtomicBool,
    /// The first panic of a dispatch's workers, for the caller to re-raise.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// A pool of `threads - 1` workers plus the calling thread.
pub struct ComputePool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Held for the length of a dispatch: one op at a time.
    dispatching: Mutex<()>,
}

impl ComputePool {
    /// A pool that runs ops on `threads` threads (the caller and `threads - 1` workers); 0 is
    /// taken as 1, which runs every op on the caller.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let worker_count = threads.max(1) - 1;
        let mut pool = Self::with_workers(worker_count);
        for index in 0..worker_count {
            let shared = pool.shared.clone();
            // On failure `pool` drops here, stopping and joining the workers already started.
            let worker = std::thread::Builder::new()
                .name(format!("llmesh-compute-{}", index + 1))
                .spawn(move || work(&shared, index))?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    /// A pool with room for `count` workers, none started yet.
    fn with_workers(count: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            parking: (0..count).map(|_| Parking::default()).collect(),
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
        });
        Self { shared, workers: Vec::with_capacity(count), dispatching: Mutex::new(()) }
    }

    /// Threads an op runs on, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Call `body` on ranges that together cover `0..items` exactly once, spread over the pool's
    /// threads; returns when all have run. A panic in `body` is re-raised here, after every
    /// thread has left the op.
    pub fn run(&self, items: usize, body: impl Fn(Range<usize>) + Sync) {
        if items == 0 {
            return;
        }
        if self.workers.is_empty() || items == 1 {
            return body(0..items);
        }
        let _dispatching = match self.dispatching.try_lock() {
            Ok(guard) => guard,
            // A job panicked on this thread before: the guard protects no data.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Busy with another thread's op, or called from inside a job.
            Err(TryLockError::WouldBlock) => return body(0..items),
        };
        let body: &(dyn Fn(Range<usize>) + Sync) = &body;
        let job = Job { items, share: 2 * self.threads(), cursor: AtomicUsize::new(0), body };
        // SAFETY: only the lifetime changes. Workers dereference the pointer only while inside
        // the gate, and `Dispatch::drop` closes the gate and waits for every worker inside to
        // leave before `job` goes out of scope.
        let erased = unsafe { std::mem::transmute::<*const Job<'_>, *mut Job<'static>>(&job) };
        self.shared.job.store(erased, Ordering::Relaxed);
        let dispatch = Dispatch { shared: &self.shared };
        // Publishes the job (the store above) to the workers that enter.
        // The gate is closed and empty (the last dispatch waited for that), so this opens it.
        self.shared.state.fetch_add(GENERATION | OPEN, Ordering::SeqCst);
        self.wake_parked();
        job.work();
        drop(dispatch);
    }

    fn wake_parked(&self) {
        for (parking, worker) in self.shared.parking.iter().zip(&self.workers) {
            // SeqCst pairs with the worker's store of `parked` and load of `state` before it
            // parks: either it sees the new generation, or this sees it parked.
            if parking.parked.swap(false, Ordering::SeqCst) {
                worker.thread().unpark();
            }
        }
    }
}

/// Closes a dispatch: no worker enters after this, and the ones inside are waited for. Runs when
/// `run` returns or unwinds, so that the job outlives every use of it.
struct Dispatch<'a> {
    shared: &'a Shared,
}

impl Drop for Dispatch<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.state.fetch_and(!OPEN, Ordering::SeqCst) & !OPEN;
        let mut waited = 0u32;
        // Acquire: the writes of every worker that left happen before the caller goes on.
        while state & INSIDE != 0 {
            if waited < 1_000 {
                std::hint::spin_loop();
                waited += 1;
            } else {
                std::thread::yield_now();
            }
            state = self.shared.state.load(Ordering::Acquire);
        }
        let panic = self.shared.panic.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(payload) = panic
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(payload);
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // A new generation with the gate closed: spinning workers see it, then `stop`.
        self.shared.state.fetch_add(GENERATION, Ordering::SeqCst);
        for worker in &self.workers {
            worker.thread().unpark();
        }
        for worker in self.workers.drain(..) {
            // A worker catches the panics of jobs, so its own end cannot be a panic worth
            // re-raising during a drop.
            let _ = worker.join();
        }
    }
}

/// A worker's life: wait for a dispatch, join it if its gate is still open, repeat.
fn work(shared: &Shared, index: usize) {
    // The generation the pool started at, not the current one: a worker that starts late (after
    // dispatches, or after the pool began to stop) must still see that something happened.
    let mut seen = 0;
    loop {
        let state = wait_for_dispatch(shared, index, seen);
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        seen = state / GENERATION;
        if enter(shared, state) {
            // SAFETY: inside the gate the caller keeps the job alive (see `Dispatch`), and the
            // Acquire of entering sees the pointer stored before the gate opened.
            let job = unsafe { &*shared.job.load(Ordering::Relaxed) };
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.work())) {
                let mut panic = shared.panic.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                panic.get_or_insert(payload);
            }
            // Release: this worker's writes happen before the caller sees it leave.
            shared.state.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Enter the dispatch `observed` belongs to, if its gate is still open.
fn enter(shared: &Shared, mut observed: u64) -> bool {
    let generation = observed / GENERATION;
    loop {
        if observed / GENERATION != generation || observed & OPEN == 0 {
            return false;
        }
        match shared.state.compare_exchange_weak(observed, observed + 1, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => return true,
            Err(now) => observed = now,
        }
    }
}

/// Watch for `SPIN`, then park, until a generation after `seen` begins; returns its state.
fn wait_for_dispatch(shared: &Shared, index: usize, seen: u64) -> u64 {
    let started = Instant::now();
    let mut parking_due = false;
    loop {
        let state = shared.state.load(Ordering::Acquire);
        if state / GENERATION != seen {
            return state;
        }
        if !parking_due && started.elapsed() < SPIN {
            std::thread::yield_now();
            continue;
        }
        let parking = &shared.parking[index];
        parking.parked.store(true, Ordering::SeqCst);
        let state = shared.state.load(Ordering::SeqCst);
        if state / GENERATION != seen {
            parking.parked.store(false, Ordering::Relaxed);
            return state;
        }
        std::thread::park();
        parking.parked.store(false, Ordering::Relaxed);
        let state = shared.state.load(Ordering::Acquire);
        if state / GENERATION != seen {
            return state;
        }
        // Woken for nothing (a stale unpark): back to parking at once.
        parking_due = true;
    }
}

static GLOBAL: OnceLock<ComputePool> = OnceLock::new();
static CONFIGURED_THREADS: OnceLock<usize> = OnceLock::new();

/// The environment variable that sets the thread count, over the configuration.
pub const THREADS_VARIABLE: &str = "LLMESH_THREADS";

/// Ask for the engine's pool to run ops on `threads` threads (0: `default_threads`), unless
/// `LLMESH_THREADS` says otherwise. Only the first call before the pool's first use counts;
/// returns the number the pool runs, or will run, with.
pub fn configure_threads(threads: usize) -> usize {
    *CONFIGURED_THREADS.get_or_init(|| resolve_threads(threads))
}

fn resolve_threads(configured: usize) -> usize {
    let from_environment = std::env::var(THREADS_VARIABLE).ok().map(|value| value.trim().parse::<usize>());
    match from_environment {
        Some(Ok(threads)) if threads > 0 => threads,
        Some(_) => {
            tracing::warn!("{THREADS_VARIABLE} is not a positive number: ignored");
            configured_or_default(configured)
        }
        None => configured_or_default(configured),
    }
}

fn configured_or_default(configured: usize) -> usize {
    if configured > 0 { configured } else { default_threads() }
}

/// One thread per physical core this process may run on: the SIMD kernels gain nothing from a
/// core's second hardware thread, and on a small machine the caller plus the workers already
/// fill every core (the tokio threads mostly sleep while a model computes).
pub fn default_threads() -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, usize::from);
    sysinfo::System::physical_core_count().unwrap_or(allowed).clamp(1, allowed)
}

/// The engine's pool, started on first use with the configured number of threads. If no worker
/// thread can be started, ops run on their caller.
pub fn global() -> &'static ComputePool {
    GLOBAL.get_or_init(|| {
        let threads = configure_threads(0);
        match ComputePool::new(threads) {
            Ok(pool) => {
                tracing::debug!(threads, "compute threads started");
                pool
            }
            Err(error) => {
                tracing::warn!(%error, threads, "cannot start the compute threads: running on one");
                ComputePool::with_workers(0)
            }
        }
    })
}

#[cfg(test)]
mod tests;
