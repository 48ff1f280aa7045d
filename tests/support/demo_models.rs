//! The demo models of `scripts/fetch-models.sh`, for the tests that run them (LLMESH_MODELS_DIR
//! to look elsewhere than `models/`).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use llmesh::engine::{LocalEngine, ModelSpec, QueueLimits};
use llmesh::node::Node;

use super::cluster::{config, entry_node, eventually, hosts_of};

/// SmolLM2-135M-Instruct Q4_1, served as `smollm2`.
pub fn smollm2() -> ModelSpec {
    let dir = std::env::var_os("LLMESH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{} is missing: run scripts/fetch-models.sh", path.display());
    ModelSpec { id: "smollm2".into(), path }
}

/// A node hosting SmolLM2 ("host") and one without models ("entry") that sees it: what is asked
/// of the entry runs on the host, across `/llmesh/infer`.
pub async fn smollm2_host_and_entry(dir: &tempfile::TempDir) -> (Node, Node) {
    let engine = LocalEngine::load(&[smollm2()], QueueLimits::default(), &candle_core::Device::Cpu)
        .expect("load SmolLM2");
    let host =
        Node::spawn_with_engine(config("host", dir, Vec::new(), None), Arc::new(engine)).await.unwrap();
    let entry = entry_node("entry", dir, host.p2p_addresses().to_vec(), |_| {}).await;
    eventually("the entry sees the host", async || hosts_of(&entry, "smollm2").await.len() == 1).await;
    (host, entry)
}
