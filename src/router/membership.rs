//! The membership task: folds p2p events into the `ClusterView`, declares silent nodes offline,
//! and publishes this node's announcement at start, whenever it changes, and as a heartbeat.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::RouterInner;
use crate::engine::ModelKind;
use crate::p2p::{
    ANNOUNCEMENT_VERSION, AnnouncedLoad, AnnouncedModel, Announcement, Hardware, P2pEvent, RecordsDigest,
    ResourceUsage,
};

/// Announcements go out at least this often; the cluster declares a node offline after three
/// missed ones.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How often the node checks whether its announcement changed (its load, mostly).
const CHANGE_CHECK: Duration = Duration::from_millis(250);

pub async fn run(
    router: Arc<RouterInner>,
    mut events: mpsc::Receiver<P2pEvent>,
    shutdown: CancellationToken,
) {
    let hardware = tokio::task::spawn_blocking(crate::hardware::probe).await.unwrap_or_default();
    let mut sampler = Some(crate::hardware::UsageSampler::new(&hardware));
    let mut usage = ResourceUsage::default();
    let mut sampled_at: Option<Instant> = None;
    // Models come and go at run time: the DHT's provider records follow the announcement.
    let mut provided: Option<Vec<String>> = None;
    let mut published: Option<(Announcement, Instant)> = None;
    let mut tick = tokio::time::interval(CHANGE_CHECK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Some(P2pEvent::Announcement(announcement)) => {
                    router.write_cluster().apply(*announcement, Instant::now());
                }
                Some(P2pEvent::PeerDisconnected(peer)) => {
                    if let Some(record) = router.write_cluster().remove(&peer, Instant::now()) {
                        tracing::info!(node = %record.announcement.name, "node left");
                    }
                }
                None => return,
            },
            _ = tick.tick() => {
                for name in router.write_cluster().expire(Instant::now()) {
                    tracing::warn!(node = %name, "node went silent; declared offline");
                }
                if sampled_at.is_none_or(|at| at.elapsed() >= HEARTBEAT)
                    && let Some(mut taken) = sampler.take()
                {
                    let (returned, sample) = tokio::task::spawn_blocking(move || {
                        let sample = taken.sample();
                        (taken, sample)
                    })
                    .await
                    .unwrap_or_else(|_| (crate::hardware::UsageSampler::new(&hardware), usage));
                    sampler = Some(returned);
                    usage = sample;
                    sampled_at = Some(Instant::now());
                }
                let current = describe(&router, &hardware, usage).await;
                let model_ids: Vec<String> = current.models.iter().map(|model| model.id.clone()).collect();
                if provided.as_ref() != Some(&model_ids) {
                    if let Err(error) = router.p2p.provide_models(model_ids.clone()).await {
                        tracing::warn!(%error, "cannot advertise models in the DHT");
                    }
                    provided = Some(model_ids);
                }
                let due = match &published {
                    None => true,
                    Some((last, at)) => at.elapsed() >= HEARTBEAT || !same_content(last, &current),
                };
                if due {
                    if router.p2p.announce(current.clone()).await.is_err() {
                        return;
                    }
                    *router.announced.write().unwrap_or_else(|p| p.into_inner()) = Some(current.clone());
                    published = Some((current, Instant::now()));
                }
            }
        }
    }
}

/// This node's announcement as of now.
async fn describe(router: &RouterInner, hardware: &Hardware, usage: ResourceUsage) -> Announcement {
    // The p2p task puts in the addresses of the moment again when it publishes; these are for
    // this node's own entry in the cluster views.
    let addresses = router.p2p.listen_addresses().await.unwrap_or_default();
    let models = router
        .local
        .models()
        .into_iter()
        .map(|model| AnnouncedModel {
            id: model.id,
            kind: match model.kind {
                ModelKind::Chat => "chat".into(),
                ModelKind::Embeddings => "embeddings".into(),
            },
            architecture: model.architecture,
            quantization: model.quantization,
            context_length: model.context_length as u64,
            parameters: model.parameters,
            file_bytes: model.file_bytes,
        })
        .collect();
    let load = router.local.load();
    Announcement {
        version: ANNOUNCEMENT_VERSION,
        peer_id: router.node.peer_id.clone(),
        name: router.node.name.clone(),
        addresses,
        models,
        hardware: hardware.clone(),
        usage,
        load: AnnouncedLoad {
            in_flight: u32::try_from(load.in_flight).unwrap_or(u32::MAX),
            queued: u32::try_from(load.queued).unwrap_or(u32::MAX),
        },
        software_version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: router.node.started_at,
        issued_at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        // Filled in by the p2p task, which keeps the revoked list and the roster.
        revoked: RecordsDigest::default(),
        members: Vec::new(),
        founder_proof: None,
        draining: router.draining.load(std::sync::atomic::Ordering::Relaxed),
        infer_protocols: vec![crate::p2p::INFER_PROTOCOL.to_string()],
        api_keys: Default::default(),
        key_usage: router.key_reports(),
    }
}

fn same_content(a: &Announcement, b: &Announcement) -> bool {
    Announcement { issued_at_ms: b.issued_at_ms, ..a.clone() } == *b
}
