//! Who can reach a node's overlay: without a cluster secret it stays on loopback (and off mDNS)
//! unless the operator asks for an open cluster; a short secret and a damaged `cluster.json` stop
//! the node at start instead of leaving it open or in the wrong cluster.

mod support;

use std::sync::Arc;
use std::time::Duration;

use llmesh::config::Config;
use llmesh::engine::{LocalEngine, QueueLimits};
use llmesh::node::{Node, NodeError};
use llmesh::p2p::Invitation;
use support::cluster::config;

fn on_every_interface(name: &str, dir: &tempfile::TempDir) -> Config {
    Config { p2p_listen: vec!["/ip4/0.0.0.0/tcp/0".into()], ..config(name, dir, Vec::new(), None) }
}

async fn start(config: Config) -> Result<Node, NodeError> {
    let engine = LocalEngine::load(&[], QueueLimits::default(), &candle_core::Device::Cpu).unwrap();
    Node::spawn_with_engine(config, Arc::new(engine)).await
}

/// The overlay addresses a node puts in a connection key: what it listens on now, loopback left
/// out when there is anything else.
async fn listening_on(node: &Node) -> Vec<String> {
    let (key, _) = node.router().invite(1, Duration::from_secs(60)).await.unwrap();
    Invitation::from_key(&key).unwrap().addresses
}

fn off_loopback(addresses: &[String]) -> bool {
    addresses.iter().any(|a| !a.starts_with("/ip4/127.") && !a.starts_with("/ip6/::1/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_the_overlay_listens_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = start(Config {
        cluster_key: Some(llmesh::config::new_cluster_key()),
        ..on_every_interface("keyed", &dir)
    })
    .await
    .unwrap();
    let open = start(Config { open_cluster: true, ..on_every_interface("open", &dir) }).await.unwrap();
    let closed = start(on_every_interface("closed", &dir)).await.unwrap();

    // Whether this machine has an interface besides loopback is its own business: wait a little
    // for the keyed node to report one. When there is one, the keyed and the open node listen
    // there and the closed one does not.
    let mut machine_has_lan = false;
    for _ in 0..20 {
        machine_has_lan = off_loopback(&listening_on(&keyed).await);
        if machine_has_lan {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed_addresses = listening_on(&closed).await;
    assert!(!closed_addresses.is_empty(), "it still listens, on loopback");
    assert!(!off_loopback(&closed_addresses), "{closed_addresses:?}");
    let open_addresses = listening_on(&open).await;
    assert_eq!(off_loopback(&open_addresses), machine_has_lan, "{open_addresses:?}");
    for node in [keyed, open, closed] {
        node.shutdown();
        node.join().await.unwrap();
    }
}

#[tokio::test]
async fn a_short_cluster_secret_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let weak = Config { cluster_key: Some("hunter2".into()), ..config("weak", &dir, Vec::new(), None) };
    let error = start(weak).await.err().expect("a 7-character secret must not start a node");
    assert!(error.to_string().contains("at least 16"), "{error}");
}

#[tokio::test]
async fn a_damaged_cluster_json_stops_the_node_instead_of_leaving_its_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let joined = config("joined", &dir, Vec::new(), None);
    let data_dir = joined.data_dir.clone().unwrap();
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("cluster.json"), b"{\"invitation\": \"ab").unwrap();
    let error = start(joined).await.err().expect("a node must not start in no cluster instead");
    assert!(error.to_string().contains("cluster.json"), "{error}");
}
