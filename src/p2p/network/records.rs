//! Spreading the signed record sets between members: the revoked peers (`revoked.rs`, over
//! `/llmesh/revoked/1`) and the API keys (`api_keys.rs`, over `/llmesh/keys/1`).
//!
//! Announcements carry a digest of each set. A node that sees a connected member announce a
//! digest other than its own, and other than the one it last fetched in full from that member,
//! fetches that member's records: per set one fetch at a time, each member at most once per
//! `FETCH_INTERVAL`, at most the set's bound of records in pages, within `FETCH_TIMEOUT`. What it
//! takes in changes its own digest, and its neighbours fetch from it in turn, so a record reaches
//! every node, late joiners included, however many there are. The file is written and the
//! announcement republished once per fetch, not once per record. A node serves its records to
//! members only, one request per set at a time (libp2p-stream resets the streams that arrive
//! meanwhile; the asker tries again at a later announcement).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::super::announcement::RecordsDigest;
use super::super::api_keys::{self, MAX_KEY_RECORD_BYTES, MAX_KEYS};
use super::super::revoked::{MAX_KEPT, MAX_REVOCATION_BYTES};
use super::super::wire::{read_frame, write_frame};
use super::super::{Command, RecordSet};
use super::Network;

/// A member is asked again at most this often.
const FETCH_INTERVAL: Duration = Duration::from_secs(5);
/// How long a fetch, or serving one, may take in all.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

impl RecordSet {
    pub(super) const ALL: [RecordSet; 2] = [RecordSet::Revoked, RecordSet::ApiKeys];

    pub(super) fn protocol(self) -> StreamProtocol {
        match self {
            RecordSet::Revoked => StreamProtocol::new("/llmesh/revoked/1"),
            RecordSet::ApiKeys => StreamProtocol::new("/llmesh/keys/1"),
        }
    }

    fn max_records(self) -> usize {
        match self {
            RecordSet::Revoked => MAX_KEPT,
            RecordSet::ApiKeys => MAX_KEYS,
        }
    }

    fn max_record_bytes(self) -> usize {
        match self {
            RecordSet::Revoked => MAX_REVOCATION_BYTES,
            RecordSet::ApiKeys => MAX_KEY_RECORD_BYTES,
        }
    }

    /// Records per frame: about 22 KB of revocations, at most 128 KB of keys.
    fn page_records(self) -> usize {
        match self {
            RecordSet::Revoked => 128,
            RecordSet::ApiKeys => 32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RecordSet::Revoked => "revoked list",
            RecordSet::ApiKeys => "API keys",
        }
    }
}

struct Fetch {
    from: PeerId,
    /// What the member announced when the fetch began.
    announced: RecordsDigest,
    /// This node's own digest then.
    ours_before: RecordsDigest,
    started: Instant,
}

/// The fetches of one set.
#[derive(Default)]
struct SetFetches {
    in_flight: Option<Fetch>,
    /// Per connected member: the digest it announced when its records were last read in full.
    fetched: HashMap<PeerId, RecordsDigest>,
    /// Per connected member: when a fetch from it last began.
    tried: HashMap<PeerId, Instant>,
}

#[derive(Default)]
pub(super) struct RecordFetches {
    revoked: SetFetches,
    api_keys: SetFetches,
}

impl RecordFetches {
    fn of(&mut self, set: RecordSet) -> &mut SetFetches {
        match set {
            RecordSet::Revoked => &mut self.revoked,
            RecordSet::ApiKeys => &mut self.api_keys,
        }
    }

    pub(super) fn forget(&mut self, peer: &PeerId) {
        for fetches in [&mut self.revoked, &mut self.api_keys] {
            fetches.fetched.remove(peer);
            fetches.tried.remove(peer);
        }
    }
}

impl Network {
    fn digest_of(&mut self, set: RecordSet) -> RecordsDigest {
        match set {
            RecordSet::Revoked => self.revoked.digest(),
            RecordSet::ApiKeys => api_keys::write(&self.api_keys).digest(),
        }
    }

    /// A member announced the digest of one of its sets: fetch its records if they may hold
    /// something new.
    pub(super) fn records_announced(&mut self, set: RecordSet, member: PeerId, announced: RecordsDigest) {
        let now = Instant::now();
        if announced == self.digest_of(set) || !self.swarm.is_connected(&member) {
            return;
        }
        let fetches = self.fetches.of(set);
        if fetches.fetched.get(&member) == Some(&announced)
            || fetches
                .in_flight
                .as_ref()
                .is_some_and(|fetch| now.duration_since(fetch.started) < FETCH_TIMEOUT)
            || fetches.tried.get(&member).is_some_and(|at| now.duration_since(*at) < FETCH_INTERVAL)
        {
            return;
        }
        fetches.tried.insert(member, now);
        let ours_before = self.digest_of(set);
        self.fetches.of(set).in_flight = Some(Fetch { from: member, announced, ours_before, started: now });
        tracing::debug!(peer = %member, count = announced.count, set = set.name(), "fetching a member's records");
        tokio::spawn(fetch_records(set, self.stream_control.clone(), member, self.commands.clone()));
    }

    /// Take in a page of the records being fetched from `from`.
    pub(super) fn take_record_page(&mut self, set: RecordSet, from: PeerId, mut records: Vec<Vec<u8>>) {
        if self.fetches.of(set).in_flight.as_ref().is_none_or(|fetch| fetch.from != from) {
            return;
        }
        records.truncate(set.page_records());
        let (refusals, first) = match set {
            RecordSet::Revoked => {
                let (refusals, first) = self.take_revocations(&records);
                (refusals, first.map(|error| error.to_string()))
            }
            RecordSet::ApiKeys => {
                let (refusals, first) = self.take_api_keys(&records);
                (refusals, first.map(|error| error.to_string()))
            }
        };
        if let Some(error) = first {
            tracing::warn!(peer = %from, refusals, first = %error, set = set.name(), "refused records a member sent");
        }
    }

    /// A fetch ended: write what it brought, and tell the cluster once.
    pub(super) fn record_fetch_ended(&mut self, set: RecordSet, from: PeerId, complete: bool) {
        let fetches = self.fetches.of(set);
        let Some(fetch) = fetches.in_flight.take_if(|fetch| fetch.from == from) else { return };
        if complete && self.swarm.is_connected(&from) {
            self.fetches.of(set).fetched.insert(from, fetch.announced);
        }
        match set {
            RecordSet::Revoked => self.revoked.save_if_changed(),
            RecordSet::ApiKeys => api_keys::write(&self.api_keys).save_if_changed(),
        }
        if self.digest_of(set) != fetch.ours_before {
            self.republish();
        }
    }

    /// The records of `set` to send a peer that asks, if it is a member.
    pub(super) fn records_for(&self, set: RecordSet, peer: &PeerId) -> Option<Vec<Vec<u8>>> {
        self.is_member(peer).then(|| match set {
            RecordSet::Revoked => self.revoked.records(),
            RecordSet::ApiKeys => api_keys::read(&self.api_keys).records(),
        })
    }
}

/// Serve members that fetch this node's records of `set`, one at a time.
pub(super) async fn serve_records(
    set: RecordSet,
    mut requests: libp2p_stream::IncomingStreams,
    commands: mpsc::Sender<Command>,
) {
    while let Some((peer, mut stream)) = requests.next().await {
        let (reply, answer) = oneshot::channel();
        if commands.send(Command::RecordsFor(set, peer, reply)).await.is_err() {
            return;
        }
        let Ok(Some(records)) = answer.await else {
            tracing::warn!(%peer, set = set.name(), "refused records to a peer that is not a member");
            continue;
        };
        let send = async {
            for page in records.chunks(set.page_records()) {
                write_frame(&mut stream, &page).await?;
            }
            stream.close().await
        };
        match tokio::time::timeout(FETCH_TIMEOUT, send).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%peer, %error, set = set.name(), "could not send records"),
            Err(_) => tracing::debug!(%peer, set = set.name(), "sending records timed out"),
        }
    }
}

/// Read a member's records of `set` and hand them to the network task page by page.
async fn fetch_records(
    set: RecordSet,
    mut control: libp2p_stream::Control,
    from: PeerId,
    commands: mpsc::Sender<Command>,
) {
    let fetch = async {
        let mut stream = control.open_stream(from, set.protocol()).await.map_err(|e| e.to_string())?;
        let mut read = 0;
        while let Some(page) = read_frame::<_, Vec<Vec<u8>>>(&mut stream).await.map_err(|e| e.to_string())? {
            read += page.len();
            if page.len() > set.page_records()
                || read > set.max_records()
                || page.iter().any(|record| record.len() > set.max_record_bytes())
            {
                return Err("the records are over the limits".to_string());
            }
            commands.send(Command::RecordPage(set, from, page)).await.map_err(|_| "stopped".to_string())?;
        }
        Ok::<(), String>(())
    };
    let complete = match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            tracing::debug!(peer = %from, %error, set = set.name(), "could not fetch records");
            false
        }
        Err(_) => {
            tracing::debug!(peer = %from, set = set.name(), "fetching records timed out");
            false
        }
    };
    let _ = commands.send(Command::RecordFetchEnded { set, from, complete }).await;
}
