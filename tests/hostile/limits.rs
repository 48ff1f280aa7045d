//! Peers and clients that hold resources without doing anything useful: HTTP connections that
//! never finish their request's head, TCP connections to the overlay that never finish the
//! handshake, oversized join frames, and a non-member storing provider records in the DHT. Each
//! is cut off, and the node keeps serving.
//!
//! The hostile overlay peer is a bare libp2p swarm speaking the node's protocols by name, with
//! the cluster's pre-shared key (as anyone holding a connection key has) when there is one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::Keypair;
use libp2p::kad;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, Transport, noise, tcp, yamux};
use llmesh::api::HEADER_READ_TIMEOUT;
use llmesh::engine::{LocalEngine, ModelSpec, QueueLimits};
use llmesh::node::Node;
use llmesh::p2p::{self, Invitation, P2pHandle, UPGRADE_TIMEOUT};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::cluster::{config, eventually};
use crate::support::tiny_model;

const SECRET: &str = "hostile-limits-secret";
const JOIN_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/join/2");
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/kad/1.0.0");

/// A node of the cluster of `SECRET` hosting the tiny model.
async fn private_host(name: &str, dir: &tempfile::TempDir) -> Node {
    let path = dir.path().join(format!("{name}.gguf"));
    tiny_model::write_tiny_llama(&path);
    let spec = ModelSpec { id: "tiny".into(), path };
    let engine = LocalEngine::load(&[spec], QueueLimits::default(), &candle_core::Device::Cpu).unwrap();
    Node::spawn_with_engine(config(name, dir, Vec::new(), Some(SECRET)), Arc::new(engine)).await.unwrap()
}

/// The node's overlay address on loopback and its peer id.
fn overlay_address(node: &Node) -> (Multiaddr, PeerId) {
    let address: Multiaddr = node.p2p_addresses()[0].parse().unwrap();
    (address, node.router().node().peer_id.parse().unwrap())
}

/// The TCP port of the node's overlay.
fn overlay_port(node: &Node) -> u16 {
    let (address, _) = overlay_address(node);
    address
        .iter()
        .find_map(|part| match part {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap()
}

#[derive(NetworkBehaviour)]
struct Hostile {
    stream: libp2p_stream::Behaviour,
    kademlia: kad::Behaviour<kad::store::MemoryStore>,
}

/// TCP, the pre-shared key, Noise and Yamux: the node's own transport, without its checks.
fn transport(keypair: &Keypair, psk: Option<[u8; 32]>) -> Boxed<(PeerId, StreamMuxerBox)> {
    tcp::tokio::Transport::new(tcp::Config::default())
        .and_then(move |socket, _| async move {
            match psk {
                Some(psk) => PnetConfig::new(PreSharedKey::new(psk))
                    .handshake(socket)
                    .await
                    .map(futures::future::Either::Left),
                None => Ok(futures::future::Either::Right(socket)),
            }
        })
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(keypair).unwrap())
        .multiplex(yamux::Config::default())
        .boxed()
}

/// A bare swarm connected to `target`, driven by its own task; kad events come out on the
/// receiver.
async fn hostile_peer(
    psk: Option<[u8; 32]>,
    target: (Multiaddr, PeerId),
) -> (libp2p_stream::Control, mpsc::Sender<HostileCommand>, mpsc::Receiver<kad::Event>) {
    let keypair = Keypair::generate_ed25519();
    let peer_id = keypair.public().to_peer_id();
    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config.set_query_timeout(Duration::from_secs(5));
    let behaviour = Hostile {
        stream: libp2p_stream::Behaviour::new(),
        kademlia: kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config),
    };
    let transport = transport(&keypair, psk);
    let mut swarm: Swarm<Hostile> = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|_| transport)
        .unwrap()
        .with_behaviour(|_| behaviour)
        .unwrap()
        .with_swarm_config(|config| config.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.behaviour_mut().kademlia.set_mode(Some(kad::Mode::Client));
    let without_peer: Multiaddr =
        target.0.iter().filter(|part| !matches!(part, libp2p::multiaddr::Protocol::P2p(_))).collect();
    swarm.behaviour_mut().kademlia.add_address(&target.1, without_peer);
    swarm.dial(target.0).unwrap();
    let control = swarm.behaviour().stream.new_control();
    let (commands, mut command_receiver) = mpsc::channel::<HostileCommand>(8);
    let (kad_events, kad_receiver) = mpsc::channel(64);
    let (connected, mut is_connected) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                command = command_receiver.recv() => match command {
                    Some(HostileCommand::Provide(key)) => {
                        swarm.behaviour_mut().kademlia.start_providing(kad::RecordKey::new(&key)).unwrap();
                    }
                    None => return,
                },
                event = swarm.select_next_some() => match event {
                    SwarmEvent::ConnectionEstablished { .. } => { let _ = connected.try_send(()); }
                    SwarmEvent::Behaviour(HostileEvent::Kademlia(event)) => {
                        let _ = kad_events.try_send(event);
                    }
                    _ => {}
                },
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), is_connected.recv()).await.expect("connects").unwrap();
    (control, commands, kad_receiver)
}

enum HostileCommand {
    Provide(String),
}

/// A member made by redeeming a key, as in `tests/membership.rs`.
async fn member(dir: &tempfile::TempDir, key: &str, stop: &CancellationToken) -> P2pHandle {
    let config = crate::support::overlay::key_holder_config(dir.path(), "member", key);
    let (handle, _events, _inbound) = p2p::spawn(config, stop.clone()).await.unwrap();
    handle.join(key).await.expect("redeem the key");
    handle
}

/// How long until the other end closes `socket`, reading (and dropping) whatever it sends;
/// `None` if it is still open after `limit`.
async fn closed_after(mut socket: TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buffer = [0u8; 1024];
    let reading = async {
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, reading).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_that_never_finishes_its_request_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node = crate::support::cluster::empty_node("target", &dir, Vec::new(), None).await;
    let mut slow = TcpStream::connect(node.http_address()).await.unwrap();
    slow.write_all(b"GET /health HT").await.unwrap();
    let silent = TcpStream::connect(node.http_address()).await.unwrap();
    let limit = HEADER_READ_TIMEOUT + Duration::from_secs(5);
    let (slow, silent) = tokio::join!(closed_after(slow, limit), closed_after(silent, limit));
    assert!(slow.is_some(), "a trickled request line still holds its connection after {limit:?}");
    assert!(silent.is_some(), "a connection that sent nothing is still open after {limit:?}");

    // Meanwhile and after, whole requests are answered.
    let mut client = TcpStream::connect(node.http_address()).await.unwrap();
    let host = node.http_address();
    client
        .write_all(format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_connections_that_never_finish_the_handshake_are_bounded_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node = private_host("target", &dir).await;
    let port = overlay_port(&node);
    // More than the node lets set up at once (`swarm.rs`: 128); none says a word, as a peer
    // without the pre-shared key would not.
    const OPENED: usize = 192;
    let limit = UPGRADE_TIMEOUT + Duration::from_secs(5);
    let mut sockets = Vec::new();
    for _ in 0..OPENED {
        let socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        sockets.push(tokio::spawn(closed_after(socket, limit)));
    }
    let mut closed = Vec::new();
    for socket in sockets {
        closed.push(socket.await.unwrap());
    }
    let at_once =
        closed.iter().filter(|after| after.is_some_and(|after| after < Duration::from_secs(2))).count();
    assert!(at_once >= OPENED - 128, "only {at_once} of {OPENED} silent connections were refused at once");
    assert!(closed.iter().all(Option::is_some), "a silent connection outlived the upgrade timeout");

    // The node still takes members.
    let (key, _) = node.router().invite(1, Duration::from_secs(600)).await.unwrap();
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    member(&dir, &key, &stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_frame_beyond_what_a_key_needs_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let node = private_host("inviter", &dir).await;
    let (key, _) = node.router().invite(1, Duration::from_secs(600)).await.unwrap();
    let psk = Invitation::from_key(&key).unwrap().cluster_psk;
    let (mut control, _commands, _kad) = hostile_peer(psk, overlay_address(&node)).await;
    let (_, inviter) = overlay_address(&node);

    // A 1 MiB "key": bincode's string (a varint length, then the bytes) in one frame.
    let text = vec![b'k'; 1 << 20];
    let mut frame = vec![252u8];
    frame.extend_from_slice(&(text.len() as u32).to_le_bytes());
    frame.extend_from_slice(&text);
    let mut stream = control.open_stream(inviter, JOIN_PROTOCOL).await.unwrap();
    let sending = async {
        stream.write_all(&(frame.len() as u32).to_be_bytes()).await?;
        stream.write_all(&frame).await?;
        stream.flush().await
    };
    // The inviter may stop reading (and reset the stream) before all of it is written.
    let _ = tokio::time::timeout(Duration::from_secs(10), sending).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the inviter neither answered nor closed the stream");
    assert!(answer.is_empty(), "the inviter read the whole frame and answered ({} bytes)", answer.len());

    // A real key, from a real member, still works.
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    member(&dir, &key, &stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dht_keeps_provider_records_of_members_only() {
    let dir = tempfile::tempdir().unwrap();
    let node = private_host("inviter", &dir).await;
    let (key, _) = node.router().invite(1, Duration::from_secs(600)).await.unwrap();
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let member = member(&dir, &key, &stop).await;
    let inviter = node.router().node().peer_id.clone();
    eventually("the member finds the inviter's model in the DHT", async || {
        member.find_providers("tiny").await.unwrap().contains(&inviter)
    })
    .await;

    // A stranger with the pre-shared key (from any old connection key) claims a model.
    let psk = Invitation::from_key(&key).unwrap().cluster_psk;
    let (_control, commands, mut kad_events) = hostile_peer(psk, overlay_address(&node)).await;
    commands.send(HostileCommand::Provide("tiny".into())).await.unwrap();
    let published = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = kad_events.recv().await {
            if let kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::StartProviding(result),
                ..
            } = event
            {
                return result.is_ok();
            }
        }
        false
    })
    .await;
    assert_eq!(published, Ok(true), "the stranger's provider record went out");
    for _ in 0..5 {
        let providers = member.find_providers("tiny").await.unwrap();
        assert_eq!(providers, std::slice::from_ref(&inviter), "the stranger passed for a host of the model");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
