//! The network task's use of the Kademlia DHT: walked now and then so a node that joined through
//! one member learns of the others, and model ids advertised as provider records so a node can
//! find a model's hosts before their announcements reach it. What others ask to store is
//! filtered here (`StoreInserts::FilterBoth`): provider records of members only, and no values,
//! which llmesh never puts.

use std::collections::HashSet;
use std::time::Instant;

use libp2p::kad;
use libp2p::kad::store::RecordStore;

use super::{BOOTSTRAP_INTERVAL, Network};

impl Network {
    /// Walk the DHT now and then, so a node that joined through one member learns of the others
    /// (and they of it) beyond gossip.
    pub(super) fn bootstrap_dht(&mut self) {
        let due = self.last_bootstrap.is_none_or(|at| at.elapsed() >= BOOTSTRAP_INTERVAL);
        if due && !self.connections.is_empty() {
            self.last_bootstrap = Some(Instant::now());
            self.peer_store.save();
            if let Err(error) = self.swarm.behaviour_mut().kademlia.bootstrap() {
                tracing::debug!(%error, "DHT bootstrap skipped");
            }
        }
    }

    /// Advertise exactly these model ids as provider records.
    pub(super) fn provide(&mut self, ids: HashSet<String>) {
        let kademlia = &mut self.swarm.behaviour_mut().kademlia;
        for gone in self.provided.difference(&ids) {
            kademlia.stop_providing(&kad::RecordKey::new(gone));
        }
        for new in ids.difference(&self.provided) {
            if let Err(error) = kademlia.start_providing(kad::RecordKey::new(new)) {
                tracing::warn!(model = %new, %error, "cannot advertise model in the DHT");
            }
        }
        self.provided = ids;
    }

    /// Store what another peer asked to: a provider record if its provider (kad checked that it
    /// is the sender) is a member; never a value.
    pub(super) fn inbound_dht_request(&mut self, request: kad::InboundRequest) {
        match request {
            kad::InboundRequest::AddProvider { record: Some(record) } => {
                if !self.is_member(&record.provider) {
                    tracing::debug!(peer = %record.provider, "ignored a non-member's provider record");
                    return;
                }
                if let Err(error) = self.swarm.behaviour_mut().kademlia.store_mut().add_provider(record) {
                    tracing::debug!(%error, "provider record not stored");
                }
            }
            kad::InboundRequest::PutRecord { source, record: Some(_), .. } => {
                tracing::debug!(peer = %source, "ignored a DHT value: llmesh stores none");
            }
            _ => {}
        }
    }

    /// Collect a provider query's finds; on its last step, dial them (their announcements follow)
    /// and answer whoever asked.
    pub(super) fn provider_query_progressed(
        &mut self,
        id: kad::QueryId,
        result: kad::QueryResult,
        last: bool,
    ) {
        if let kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders { providers, .. })) =
            &result
            && let Some((_, found)) = self.provider_queries.get_mut(&id)
        {
            found.extend(providers.iter().copied());
        }
        if last && let Some((reply, found)) = self.provider_queries.remove(&id) {
            for peer in &found {
                if !self.swarm.is_connected(peer) {
                    let _ = self.swarm.dial(*peer);
                }
            }
            let _ = reply.send(found.iter().map(|peer| peer.to_string()).collect());
        }
    }
}
