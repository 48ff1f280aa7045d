//! The fuzz corpus replayed through the functions the fuzz targets call (`llmesh::fuzzing`), so
//! an input the fuzzer once needed, or one that once crashed a decoder, fails the ordinary test
//! run if it panics again; no nightly compiler or instrumented build needed. Inputs live in
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`; the seeds (real encodings) are
//! written there by `cargo test --test fuzz_corpus -- --ignored write_seeds`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use llmesh::fuzzing::{TARGETS, Target, seeds};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every file under `fuzz/<folder>/<target>/`, by path.
fn inputs(folder: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(fuzz_dir().join(folder).join(target)) else { return Vec::new() };
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| entry.expect("a readable corpus dir").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = std::fs::read(&path).expect("a readable corpus file");
            (path, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

/// Runs `target` on `bytes`; the panic's message if it panicked.
fn panic_of(target: Target, bytes: &[u8]) -> Option<String> {
    let error = catch_unwind(AssertUnwindSafe(|| target(bytes))).err()?;
    let message = error
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| error.downcast_ref::<&str>().map(|text| text.to_string()))
        .unwrap_or_default();
    Some(message)
}

#[test]
fn every_corpus_input_is_decoded_without_a_panic() {
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        let corpus = inputs("corpus", name);
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty: a target with nothing to replay");
        for (path, bytes) in corpus.iter().chain(&inputs("regressions", name)) {
            if let Some(message) = panic_of(*target, bytes) {
                failures.push(format!("{}: {message}", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "inputs that panic:\n{}", failures.join("\n"));
}

#[test]
fn every_target_has_seeds_and_takes_them() {
    let seeds = seeds();
    for (name, target) in TARGETS {
        let mine: Vec<&Vec<u8>> = seeds.iter().filter(|(of, _)| of == name).map(|(_, bytes)| bytes).collect();
        assert!(!mine.is_empty(), "no seeds for {name}");
        for bytes in mine {
            assert_eq!(panic_of(*target, bytes), None, "a seed of {name} panics");
        }
    }
    assert!(seeds.iter().all(|(of, _)| TARGETS.iter().any(|(name, _)| name == of)), "a seed for no target");
}

/// Writes the seeds into `fuzz/corpus/<target>/seed-<n>` (run by hand when an encoding changes).
#[test]
#[ignore = "writes into the source tree"]
fn write_seeds() {
    let mut counts = std::collections::HashMap::new();
    for (name, bytes) in seeds() {
        let count = counts.entry(name).or_insert(0);
        let dir = fuzz_dir().join("corpus").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{count}")), bytes).unwrap();
        *count += 1;
    }
}
