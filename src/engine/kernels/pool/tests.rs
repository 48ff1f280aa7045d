//! The pool's contract: every item runs exactly once whatever the thread count, the caller and
//! the workers both run items, a panicking job neither wedges the pool nor goes unnoticed, and
//! dropping the pool ends its threads.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use super::ComputePool;

/// Runs `items` items on `pool` and checks that each ran exactly once.
fn assert_each_item_once(pool: &ComputePool, items: usize) {
    let runs: Vec<AtomicU32> = (0..items).map(|_| AtomicU32::new(0)).collect();
    pool.run(items, |range| {
        for item in range {
            runs[item].fetch_add(1, Ordering::Relaxed);
        }
    });
    for (item, count) in runs.iter().enumerate() {
        assert_eq!(count.load(Ordering::Relaxed), 1, "item {item} of {items} on {} threads", pool.threads());
    }
}

#[test]
fn every_item_runs_exactly_once_on_one_to_five_threads() {
    for threads in 1..=5 {
        let pool = ComputePool::new(threads).unwrap();
        assert_eq!(pool.threads(), threads);
        for items in [0, 1, 2, 3, 7, 64, 1000] {
            assert_each_item_once(&pool, items);
        }
        // Many dispatches in a row: workers that park, wake late or miss a whole op.
        for round in 0..500 {
            assert_each_item_once(&pool, 1 + round % 37);
        }
    }
}

#[test]
fn zero_threads_means_the_caller_alone() {
    let pool = ComputePool::new(0).unwrap();
    assert_eq!(pool.threads(), 1);
    let caller = std::thread::current().id();
    pool.run(10, |_| assert_eq!(std::thread::current().id(), caller));
}

#[test]
fn results_written_by_the_threads_are_all_seen_by_the_caller() {
    for threads in 1..=4 {
        let pool = ComputePool::new(threads).unwrap();
        for round in 0..50u64 {
            let out: Vec<AtomicUsize> = (0..997).map(|_| AtomicUsize::new(0)).collect();
            pool.run(out.len(), |range| {
                for index in range {
                    out[index].store(index * index + round as usize, Ordering::Relaxed);
                }
            });
            for (index, value) in out.iter().enumerate() {
                assert_eq!(value.load(Ordering::Relaxed), index * index + round as usize);
            }
        }
    }
}

#[test]
fn the_caller_and_a_worker_both_run_items() {
    let pool = ComputePool::new(2).unwrap();
    let seen = Mutex::new(HashSet::<ThreadId>::new());
    // Two items of one each: whichever thread holds one waits until another thread holds the
    // other, which only a second thread can do.
    pool.run(2, |_| {
        seen.lock().unwrap().insert(std::thread::current().id());
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.lock().unwrap().len() < 2 && Instant::now() < deadline {
            std::thread::yield_now();
        }
    });
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen.contains(&std::thread::current().id()), "the caller ran none of the items");
}

#[test]
fn a_panicking_job_reaches_the_caller_and_leaves_the_pool_working() {
    for threads in 1..=3 {
        let pool = ComputePool::new(threads).unwrap();
        for round in 0..50 {
            // Item `round % 8` panics, on whichever thread claims it: the caller or a worker.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(8, |range| {
                    if range.contains(&(round % 8)) {
                        panic!("job panics");
                    }
                })
            }));
            let payload = result.expect_err("the job's panic was swallowed");
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"job panics"));
            assert_each_item_once(&pool, 100);
        }
    }
}

#[test]
fn an_op_started_inside_a_job_runs_there_instead_of_deadlocking() {
    let pool = ComputePool::new(3).unwrap();
    let inner_items = AtomicUsize::new(0);
    pool.run(6, |range| {
        for _ in range {
            pool.run(5, |inner| {
                inner_items.fetch_add(inner.len(), Ordering::Relaxed);
            });
        }
    });
    assert_eq!(inner_items.load(Ordering::Relaxed), 30);
}

#[test]
fn callers_on_several_threads_share_one_pool() {
    let pool = Arc::new(ComputePool::new(3).unwrap());
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for items in 0..200 {
                    assert_each_item_once(&pool, items);
                }
            })
        })
        .collect();
    for caller in callers {
        caller.join().unwrap();
    }
}

#[test]
fn dropping_the_pool_ends_its_workers() {
    let pool = ComputePool::new(4).unwrap();
    assert_each_item_once(&pool, 100);
    // Every worker holds the shared state until its thread returns.
    let shared = Arc::downgrade(&pool.shared);
    assert_eq!(shared.strong_count(), 4);
    drop(pool);
    assert_eq!(shared.strong_count(), 0, "a worker outlived the pool");
}
