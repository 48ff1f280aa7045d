//! The network task's side of revocations (`revoked.rs`): revoking a peer here, and spreading the
//! signed records between members over `/llmesh/revoked/1`.
//!
//! Announcements carry a digest of each node's revoked set. A node that sees a connected member
//! announce a digest other than its own, and other than the one it last fetched in full from that
//! member, fetches that member's records: one fetch at a time, each member at most once per
//! `FETCH_INTERVAL`, at most `MAX_KEPT` records in pages of `PAGE_RECORDS`, within
//! `FETCH_TIMEOUT`. What it takes in changes its own digest, and its neighbours fetch from it in
//! turn, so a revocation reaches every node, late joiners included, however long the list. The
//! file is written and the announcement republished once per fetch, not once per record. A node
//! serves its records to members only, one request at a time (libp2p-stream resets the streams
//! that arrive meanwhile; the asker tries again at a later announcement).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::super::announcement::RevokedDigest;
use super::super::revoked::{MAX_KEPT, MAX_REVOCATION_BYTES, RevocationError};
use super::super::wire::{read_frame, write_frame};
use super::super::{Command, P2pEvent};
use super::Network;

pub(super) const REVOKED_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/revoked/1");
/// Records per frame (about 22 KB).
const PAGE_RECORDS: usize = 128;
/// A member is asked again at most this often.
const FETCH_INTERVAL: Duration = Duration::from_secs(5);
/// How long a fetch, or serving one, may take in all.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

struct Fetch {
    from: PeerId,
    /// What the member announced when the fetch began.
    announced: RevokedDigest,
    /// This node's own digest then.
    ours_before: RevokedDigest,
    started: Instant,
}

#[derive(Default)]
pub(super) struct RevocationFetches {
    in_flight: Option<Fetch>,
    /// Per connected member: the digest it announced when its records were last read in full.
    fetched: HashMap<PeerId, RevokedDigest>,
    /// Per connected member: when a fetch from it last began.
    tried: HashMap<PeerId, Instant>,
}

impl RevocationFetches {
    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.fetched.remove(peer);
        self.tried.remove(peer);
    }
}

impl Network {
    /// Revoke `peer` on this node's word; returns whether it is newly revoked.
    pub(super) fn revoke_here(&mut self, peer: PeerId) -> Result<bool, RevocationError> {
        let new = self.revoked.revoke(peer, &self.keypair)?;
        if new {
            self.enforce_revocation(peer);
            self.republish();
        }
        Ok(new)
    }

    /// Cut `peer` off in this node: its connections are closed and refused, it leaves the roster
    /// and the peers to dial, and the rest of the node hears it left.
    pub(super) fn enforce_revocation(&mut self, peer: PeerId) {
        if peer == *self.swarm.local_peer_id() {
            tracing::error!("this node has been revoked from its cluster");
            return;
        }
        self.swarm.behaviour_mut().blocked.block_peer(peer);
        if let Some(roster) = &mut self.roster {
            roster.remove(&peer);
        }
        self.peer_store.forget(&peer);
        self.explicit_peers
            .retain(|address| !address.iter().any(|p| p == libp2p::multiaddr::Protocol::P2p(peer)));
        tracing::warn!(%peer, "peer revoked: its connections are closed and refused from now on");
        self.emit(P2pEvent::PeerDisconnected(peer.to_string()));
    }

    /// A member announced the digest of its revoked set: fetch its records if they may hold
    /// something new.
    pub(super) fn revocations_announced(&mut self, member: PeerId, announced: RevokedDigest) {
        let now = Instant::now();
        let fetches = &mut self.fetches;
        if announced == self.revoked.digest()
            || fetches.fetched.get(&member) == Some(&announced)
            || fetches
                .in_flight
                .as_ref()
                .is_some_and(|fetch| now.duration_since(fetch.started) < FETCH_TIMEOUT)
            || fetches.tried.get(&member).is_some_and(|at| now.duration_since(*at) < FETCH_INTERVAL)
            || !self.swarm.is_connected(&member)
        {
            return;
        }
        fetches.tried.insert(member, now);
        let ours_before = self.revoked.digest();
        fetches.in_flight = Some(Fetch { from: member, announced, ours_before, started: now });
        tracing::debug!(peer = %member, count = announced.count, "fetching the revoked list of a member");
        tokio::spawn(fetch_revocations(self.stream_control.clone(), member, self.commands.clone()));
    }

    /// Take in a page of the records being fetched from `from`.
    pub(super) fn take_revocation_page(&mut self, from: PeerId, records: Vec<Vec<u8>>) {
        if self.fetches.in_flight.as_ref().is_none_or(|fetch| fetch.from != from) {
            return;
        }
        let roster = &self.roster;
        let is_member = |peer: &PeerId| roster.as_ref().is_none_or(|roster| roster.is_member(peer));
        let mut newly_revoked = Vec::new();
        let mut refused: Option<RevocationError> = None;
        let mut refusals = 0;
        for record in records.iter().take(PAGE_RECORDS) {
            match self.revoked.accept(record, is_member) {
                Ok(Some(peer)) => newly_revoked.push(peer),
                Ok(None) => {}
                Err(error) => {
                    refusals += 1;
                    refused.get_or_insert(error);
                }
            }
        }
        if let Some(error) = refused {
            tracing::warn!(peer = %from, refusals, first = %error, "refused revocation records a member sent");
        }
        for peer in newly_revoked {
            self.enforce_revocation(peer);
        }
    }

    /// A fetch ended: write what it brought, and tell the cluster once.
    pub(super) fn revocation_fetch_ended(&mut self, from: PeerId, complete: bool) {
        let Some(fetch) = self.fetches.in_flight.take_if(|fetch| fetch.from == from) else { return };
        if complete && self.swarm.is_connected(&from) {
            self.fetches.fetched.insert(from, fetch.announced);
        }
        self.revoked.save_if_changed();
        if self.revoked.digest() != fetch.ours_before {
            self.republish();
        }
    }

    /// The records to send a peer that asks, if it is a member.
    pub(super) fn revocations_for(&self, peer: &PeerId) -> Option<Vec<Vec<u8>>> {
        self.is_member(peer).then(|| self.revoked.records())
    }
}

/// Serve members that fetch this node's revocation records, one at a time.
pub(super) async fn serve_revocations(
    mut requests: libp2p_stream::IncomingStreams,
    commands: mpsc::Sender<Command>,
) {
    while let Some((peer, mut stream)) = requests.next().await {
        let (reply, answer) = oneshot::channel();
        if commands.send(Command::RevocationsFor(peer, reply)).await.is_err() {
            return;
        }
        let Ok(Some(records)) = answer.await else {
            tracing::warn!(%peer, "refused the revoked list to a peer that is not a member");
            continue;
        };
        let send = async {
            for page in records.chunks(PAGE_RECORDS) {
                write_frame(&mut stream, &page).await?;
            }
            stream.close().await
        };
        match tokio::time::timeout(FETCH_TIMEOUT, send).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%peer, %error, "could not send the revoked list"),
            Err(_) => tracing::debug!(%peer, "sending the revoked list timed out"),
        }
    }
}

/// Read a member's revocation records and hand them to the network task page by page.
async fn fetch_revocations(
    mut control: libp2p_stream::Control,
    from: PeerId,
    commands: mpsc::Sender<Command>,
) {
    let fetch = async {
        let mut stream = control.open_stream(from, REVOKED_PROTOCOL).await.map_err(|e| e.to_string())?;
        let mut read = 0;
        while let Some(page) = read_frame::<_, Vec<Vec<u8>>>(&mut stream).await.map_err(|e| e.to_string())? {
            read += page.len();
            if page.len() > PAGE_RECORDS
                || read > MAX_KEPT
                || page.iter().any(|r| r.len() > MAX_REVOCATION_BYTES)
            {
                return Err("the revoked list is over the limits".to_string());
            }
            commands.send(Command::RevocationPage(from, page)).await.map_err(|_| "stopped".to_string())?;
        }
        Ok::<(), String>(())
    };
    let complete = match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            tracing::debug!(peer = %from, %error, "could not fetch the revoked list");
            false
        }
        Err(_) => {
            tracing::debug!(peer = %from, "fetching the revoked list timed out");
            false
        }
    };
    let _ = commands.send(Command::RevocationFetchEnded { from, complete }).await;
}
