//! Hostile peers on the gossip side: a member flooding made-up revocations, stale, replayed and
//! forged announcements, a flood of subscriptions, and a stranger that connected to a node before
//! the node itself became a member.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, noise, tcp, yamux};
use llmesh::engine::{LocalEngine, QueueLimits};
use llmesh::node::Node;
use llmesh::p2p::{self, Announcement, Invitation, P2pConfig, P2pEvent, P2pHandle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::cluster::{call, config, eventually, eventually_within};
use crate::support::overlay::{bare_peer_config, now_ms};

const SECRET: &str = "team-secret-for-tests";

/// A bare overlay peer (no router, no heartbeat: it announces only when told to), once listening.
async fn bare_peer(
    dir: &Path,
    name: &str,
    psk: Option<[u8; 32]>,
    admission_key: Option<[u8; 32]>,
    peers: Vec<String>,
    stop: &CancellationToken,
) -> (P2pHandle, mpsc::Receiver<P2pEvent>) {
    let config = P2pConfig { admission_key, ..bare_peer_config(dir, name, psk, peers) };
    let (handle, events, _inbound) = p2p::spawn(config, stop.clone()).await.unwrap();
    eventually("the peer listens", async || !handle.listen_addresses().await.unwrap().is_empty()).await;
    (handle, events)
}

/// A founder of the cluster of `SECRET`.
async fn founder(dir: &Path, name: &str, stop: &CancellationToken) -> (P2pHandle, mpsc::Receiver<P2pEvent>) {
    let (psk, admission) = (p2p::cluster_psk(SECRET), p2p::admission_key(SECRET));
    bare_peer(dir, name, Some(psk), Some(admission), Vec::new(), stop).await
}

/// A peer holding what `key` carries (the pre-shared key, the inviter's addresses), not joined.
async fn key_holder(dir: &Path, name: &str, key: &str, stop: &CancellationToken) -> P2pHandle {
    let invitation = Invitation::from_key(key).unwrap();
    bare_peer(dir, name, invitation.cluster_psk, None, invitation.addresses, stop).await.0
}

fn announcement(p2p: &P2pHandle, model: &str, issued_at_ms: u64) -> Announcement {
    crate::support::overlay::announcement(p2p.peer_id(), model, model, issued_at_ms)
}

/// Wait until `peer` is connected to `other`, and a moment more for gossipsub to learn that
/// `other` follows the announcements (a node publishes nothing to a peer before).
async fn subscribed_to(peer: &P2pHandle, other: &P2pHandle) {
    let other = other.peer_id();
    eventually("the peers are connected", async || peer.connected_peers().await.unwrap().contains(&other))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The models of the announcements `author` is seen to make, in order, until one announces
/// `last` (within 20 s).
async fn announced_models_until(
    events: &mut mpsc::Receiver<P2pEvent>,
    author: &str,
    last: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|model| model == last) {
        let event = tokio::time::timeout_at(deadline, events.recv()).await;
        let event = event.unwrap_or_else(|_| panic!("no announcement of {last} (saw {seen:?})")).unwrap();
        if let P2pEvent::Announcement(announcement) = event
            && announcement.peer_id == author
        {
            seen.extend(announcement.models.iter().map(|model| model.id.clone()));
        }
    }
    seen
}

/// Whether the revoked list a node keeps on disk names `peer`.
/// The peer ids in a node's `revoked.json` (none while it has no such file). Compared whole: a
/// made-up id is a few characters long and can turn up by chance inside a base64 record.
fn revoked_peers(data_dir: &Path) -> std::collections::HashSet<String> {
    let Ok(text) = std::fs::read_to_string(data_dir.join("revoked.json")) else { return Default::default() };
    let file: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    file["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|record| record["peer"].as_str().map(str::to_string))
        .collect()
}

fn revoked_on_disk(data_dir: &Path, peer: &str) -> bool {
    revoked_peers(data_dir).contains(peer)
}

/// A peer id on a short identity multihash: no key behind it, and it sorts before every real one.
fn made_up_peer(n: u16) -> String {
    let [high, low] = n.to_be_bytes();
    PeerId::from_bytes(&[0x00, 2, high, low]).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_flooding_made_up_revocations_cannot_keep_a_real_one_from_a_late_joiner() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let engine =
        || Arc::new(LocalEngine::load(&[], QueueLimits::default(), &candle_core::Device::Cpu).unwrap());
    let admin =
        Node::spawn_with_engine(config("admin", &dir, Vec::new(), Some(SECRET)), engine()).await.unwrap();
    let (key, _) = admin.router().invite(3, Duration::from_secs(3600)).await.unwrap();
    let hostile = key_holder(dir.path(), "hostile", &key, &stop).await;
    hostile.join(&key).await.expect("the hostile node is a member");
    let laptop = key_holder(dir.path(), "laptop", &key, &stop).await;
    laptop.join(&key).await.expect("the laptop is a member");
    hostile.announce(announcement(&hostile, "hostile", now_ms())).await.unwrap();

    // Ids with no key behind them, which sort before every real one, then more real-looking ids
    // than a member may revoke.
    let mut flood: Vec<String> = (0..600).map(made_up_peer).collect();
    flood.extend((0..150).map(|_| Keypair::generate_ed25519().public().to_peer_id().to_string()));
    for peer in &flood {
        let _ = hostile.revoke(peer).await;
    }
    hostile.announce(announcement(&hostile, "hostile", now_ms())).await.unwrap();
    let admin_dir = dir.path().join("admin");
    eventually("the admin takes in (some of) the flood", async || {
        let kept = revoked_peers(&admin_dir);
        flood.iter().any(|peer| kept.contains(peer))
    })
    .await;

    // The laptop is stolen: the admin revokes it.
    let stolen = laptop.peer_id();
    let answer = call(&admin, "POST", &format!("/api/nodes/{stolen}/revoke"), None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);

    // A node that joins afterwards learns of it.
    let mut late = config("late", &dir, Vec::new(), None);
    late.join = Some(key);
    let late = Node::spawn_with_engine(late, engine()).await.expect("the late node joins");
    let late_dir = dir.path().join("late");
    eventually("the late joiner knows the laptop is revoked", async || revoked_on_disk(&late_dir, &stolen))
        .await;
    let kept = revoked_peers(&late_dir);
    assert!(!flood[..600].iter().any(|peer| kept.contains(peer)), "made-up ids are never kept");
    let real_looking = flood[600..].iter().filter(|peer| kept.contains(*peer)).count();
    assert!(real_looking <= 128, "one member's revocations are capped ({real_looking} kept)");
    // Every node is still up and serving.
    for node in [&admin, &late] {
        assert_eq!(call(node, "GET", "/health", None).await.status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_replayed_and_forged_announcements_are_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let (victim, mut events) = founder(dir.path(), "victim", &stop).await;
    let key = victim.invite(1, p2p::unix_now() + 3600).await.unwrap();
    let member_stop = stop.child_token();
    let member = key_holder(dir.path(), "member", &key, &member_stop).await;
    member.join(&key).await.unwrap();
    let author = member.peer_id();
    subscribed_to(&member, &victim).await;

    // Recorded an hour ago, or signed for someone else: neither is taken.
    member.announce(announcement(&member, "an-hour-old", now_ms() - 3_600_000)).await.unwrap();
    let mut forged = announcement(&member, "forged", now_ms());
    forged.peer_id = victim.peer_id();
    member.announce(forged).await.unwrap();
    let first = now_ms();
    member.announce(announcement(&member, "fresh", first)).await.unwrap();
    let seen = announced_models_until(&mut events, &author, "fresh").await;
    assert_eq!(seen, ["fresh"]);

    // The member leaves; its last announcement, played back after gossip forgot it, does not
    // bring it back (a restarted node with the same identity plays it here).
    member_stop.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let event =
            tokio::time::timeout_at(deadline, events.recv()).await.expect("the member leaves").unwrap();
        if matches!(&event, P2pEvent::PeerDisconnected(peer) if *peer == author) {
            break;
        }
    }
    let restarted = key_holder(dir.path(), "member", &key, &stop).await;
    assert_eq!(restarted.peer_id(), author);
    subscribed_to(&restarted, &victim).await;
    restarted.announce(announcement(&restarted, "replayed", first)).await.unwrap();
    restarted.announce(announcement(&restarted, "back", now_ms())).await.unwrap();
    let seen = announced_models_until(&mut events, &author, "back").await;
    assert_eq!(seen, ["back"]);
    assert!(victim.connected_peers().await.unwrap().contains(&author), "the victim is still up");
}

/// Drive a raw gossipsub peer for a while; returns how many messages on `topic` it received.
async fn pump(
    swarm: &mut libp2p::Swarm<gossipsub::Behaviour>,
    topic: &IdentTopic,
    for_how_long: Duration,
) -> usize {
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + for_how_long;
    while let Ok(event) = tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
        if let SwarmEvent::Behaviour(gossipsub::Event::Message { message, .. }) = event
            && message.topic == topic.hash()
        {
            received += 1;
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_subscriptions_costs_a_bounded_number_of_announcements() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    // An open cluster: everyone is a member, so only the rate limit stands in the way.
    let (victim, _events) = bare_peer(dir.path(), "victim", None, None, Vec::new(), &stop).await;
    victim.announce(announcement(&victim, "victim-model", now_ms())).await.unwrap();
    let address: Multiaddr = victim.listen_addresses().await.unwrap()[0].parse().unwrap();

    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|key| {
            gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossipsub::Config::default())
                .unwrap()
        })
        .unwrap()
        .with_swarm_config(|config| config.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let topic = IdentTopic::new(format!("llmesh/{}/nodes/1", p2p::cluster_id(None)));
    swarm.behaviour_mut().subscribe(&topic).unwrap();
    swarm.dial(address).unwrap();
    let greeted = pump(&mut swarm, &topic, Duration::from_secs(2)).await;
    // 200 SUBSCRIBEs in about two seconds.
    let mut during_flood = 0;
    for _ in 0..200 {
        swarm.behaviour_mut().unsubscribe(&topic);
        swarm.behaviour_mut().subscribe(&topic).unwrap();
        during_flood += pump(&mut swarm, &topic, Duration::from_millis(10)).await;
    }
    during_flood += pump(&mut swarm, &topic, Duration::from_secs(1)).await;
    assert!(greeted <= 1, "{greeted} announcements greeted one subscriber");
    assert!(during_flood <= 4, "{during_flood} announcements answered 200 subscriptions");
    assert!(victim.connected_peers().await.is_ok(), "the victim is still up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_connected_before_a_node_became_a_member_is_put_on_probation() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let (inviter, _events) = founder(dir.path(), "inviter", &stop).await;
    let key = inviter.invite(1, p2p::unix_now() + 3600).await.unwrap();
    // The joining node holds the key but has not used it yet: a stranger that has the pre-shared
    // key (an old connection key) connects to it meanwhile.
    let joining = key_holder(dir.path(), "joining", &key, &stop).await;
    let psk = Invitation::from_key(&key).unwrap().cluster_psk;
    let addresses = joining.listen_addresses().await.unwrap();
    let (stranger, _events) = bare_peer(dir.path(), "stranger", psk, None, addresses, &stop).await;
    let joining_peer = joining.peer_id();
    eventually("the stranger is connected to the joining node", async || {
        stranger.connected_peers().await.unwrap().contains(&joining_peer)
    })
    .await;

    joining.join(&key).await.expect("the joining node becomes a member");
    let stranger_peer = stranger.peer_id();
    // Probation is 10 s; the wait allows for a loaded machine.
    eventually_within(
        Duration::from_secs(60),
        "the new member drops the stranger after its grace",
        async || !joining.connected_peers().await.unwrap().contains(&stranger_peer),
    )
    .await;
}
