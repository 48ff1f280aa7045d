//! `/api/nodes` and `/api/stats`: the cluster as this node sees it and its routing statistics,
//! for the dashboard and the command line. Guarded by the API key like `/v1`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::extract::{FromJsonObject, JsonBody, JsonObject};
use crate::p2p::{AnnouncedLoad, Announcement, Hardware, ResourceUsage};
use crate::router::{NodeRecord, Router, StatsSnapshot};

#[derive(Debug, Serialize)]
pub struct NodeList {
    pub object: &'static str,
    pub data: Vec<NodeObject>,
}

#[derive(Debug, Serialize)]
pub struct NodeObject {
    pub name: String,
    pub peer_id: String,
    /// This node (the one answering).
    pub this_node: bool,
    /// "online", "offline" (listed for ten minutes after it left) or "starting" (this node,
    /// before its first announcement).
    pub status: &'static str,
    /// Unix seconds since when it has had that status (online: since this node first saw it).
    pub status_since: u64,
    /// Milliseconds since its last announcement arrived (0 for this node).
    pub last_seen_ms: u64,
    pub addresses: Vec<String>,
    pub version: String,
    /// Whether it runs another llmesh version than this node.
    pub version_skew: bool,
    /// The inference protocols it serves; a node that shares none with this one is never sent
    /// requests.
    pub infer_protocols: Vec<String>,
    /// Unix seconds.
    pub started_at: u64,
    pub models: Vec<String>,
    pub hardware: Hardware,
    pub usage: ResourceUsage,
    pub load: AnnouncedLoad,
    /// Why requests avoid this node right now, if they do.
    pub degraded: Option<String>,
}

fn router(state: &AppState) -> Result<&Router, ApiError> {
    state.router.as_ref().ok_or_else(|| ApiError::Internal("no router behind this API".into()))
}

/// When, in Unix seconds, something happened `ago`.
fn unix_seconds_ago(ago: std::time::Duration) -> u64 {
    SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

fn record_object(record: NodeRecord, now: Instant, degraded: Option<String>) -> NodeObject {
    let last_seen_ms = now.duration_since(record.last_seen).as_millis() as u64;
    let (status, since) = match record.offline_since {
        Some(since) => ("offline", since),
        None if record.announcement.draining => ("draining", record.online_since),
        None => ("online", record.online_since),
    };
    let mut node = node_object(record.announcement, false, last_seen_ms, degraded);
    node.status = status;
    node.status_since = unix_seconds_ago(now.duration_since(since));
    if status == "offline" {
        node.load = AnnouncedLoad::default();
    }
    node
}

fn node_object(
    announcement: Announcement,
    this_node: bool,
    last_seen_ms: u64,
    degraded: Option<String>,
) -> NodeObject {
    NodeObject {
        status_since: announcement.started_at,
        name: announcement.name,
        peer_id: announcement.peer_id,
        this_node,
        status: "online",
        last_seen_ms,
        addresses: announcement.addresses,
        version_skew: announcement.software_version != env!("CARGO_PKG_VERSION"),
        version: announcement.software_version,
        infer_protocols: announcement.infer_protocols,
        started_at: announcement.started_at,
        models: announcement.models.into_iter().map(|model| model.id).collect(),
        hardware: announcement.hardware,
        usage: announcement.usage,
        load: announcement.load,
        degraded,
    }
}

pub async fn list_nodes(State(state): State<AppState>) -> Result<Json<NodeList>, ApiError> {
    let router = router(&state)?;
    let open_breakers = router.open_breakers();
    let now = Instant::now();
    let mut data = Vec::new();
    if let Some(own) = router.own_announcement() {
        let draining = own.draining;
        let mut node = node_object(own, true, 0, None);
        if draining {
            node.status = "draining";
        }
        data.push(node);
    } else {
        let node = router.node();
        data.push(NodeObject {
            name: node.name.clone(),
            peer_id: node.peer_id.clone(),
            this_node: true,
            status: "starting",
            status_since: node.started_at,
            last_seen_ms: 0,
            addresses: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            version_skew: false,
            infer_protocols: vec![crate::p2p::INFER_PROTOCOL.to_string()],
            started_at: node.started_at,
            models: Vec::new(),
            hardware: Hardware::default(),
            usage: ResourceUsage::default(),
            load: AnnouncedLoad::default(),
            degraded: None,
        });
    }
    let mut others = router.cluster_nodes();
    others.sort_by(|a, b| a.announcement.name.cmp(&b.announcement.name));
    for record in others {
        let degraded = open_breakers
            .contains(&record.announcement.peer_id)
            .then(|| "circuit open: recent requests to it failed".to_string());
        data.push(record_object(record, now, degraded));
    }
    let mut offline = router.offline_nodes();
    offline.sort_by(|a, b| a.announcement.name.cmp(&b.announcement.name));
    data.extend(offline.into_iter().map(|record| record_object(record, now, None)));
    Ok(Json(NodeList { object: "list", data }))
}

#[derive(Debug, Serialize)]
pub struct StatsObject {
    /// Unix seconds when the snapshot was taken.
    pub at: u64,
    #[serde(flatten)]
    pub stats: StatsSnapshot,
}

pub async fn routing_stats(State(state): State<AppState>) -> Result<Json<StatsObject>, ApiError> {
    let stats = router(&state)?.stats();
    let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(Json(StatsObject { at, stats }))
}

/// Connection keys are valid this long unless the request says otherwise.
const DEFAULT_INVITATION_HOURS: u64 = 24;
const MAX_INVITATION_HOURS: u64 = 24 * 365;
const MAX_INVITATION_USES: u64 = 10_000;

#[derive(Debug, Serialize)]
pub struct InvitationObject {
    pub object: &'static str,
    /// The `llmesh://join/...` key to hand to the new machine.
    pub key: String,
    pub uses: u32,
    /// Unix seconds.
    pub expires_at: u64,
    /// The key as a QR code, an SVG document (for the dashboard).
    pub qr_svg: Option<String>,
}

/// `POST /api/invitations` with optional `uses` (default 1) and `valid_hours` (default 24), or
/// `valid_seconds` for short-lived keys.
pub async fn create_invitation(
    State(state): State<AppState>,
    JsonBody(fields): JsonBody<InvitationRequest>,
) -> Result<Json<InvitationObject>, ApiError> {
    let router = router(&state)?;
    let (key, expires_at) = router
        .invite(fields.uses, std::time::Duration::from_secs(fields.valid_seconds))
        .await
        .map_err(|error| ApiError::Internal(format!("issuing an invitation: {error}")))?;
    let qr_svg = qrcode::QrCode::new(key.as_bytes())
        .ok()
        .map(|code| code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(240, 240).build());
    Ok(Json(InvitationObject { object: "invitation", key, uses: fields.uses, expires_at, qr_svg }))
}

pub struct InvitationRequest {
    uses: u32,
    valid_seconds: u64,
}

impl FromJsonObject for InvitationRequest {
    fn from_json_object(mut fields: JsonObject) -> Result<Self, ApiError> {
        let uses = fields.optional::<u64>("uses")?.unwrap_or(1);
        let valid_hours = fields.optional::<u64>("valid_hours")?.unwrap_or(DEFAULT_INVITATION_HOURS);
        if !(1..=MAX_INVITATION_USES).contains(&uses) {
            return Err(ApiError::invalid_param(
                "uses",
                format!("'uses' must be between 1 and {MAX_INVITATION_USES}."),
            ));
        }
        if !(1..=MAX_INVITATION_HOURS).contains(&valid_hours) {
            return Err(ApiError::invalid_param(
                "valid_hours",
                format!("'valid_hours' must be between 1 and {MAX_INVITATION_HOURS}."),
            ));
        }
        let valid_seconds = match fields.optional::<u64>("valid_seconds")? {
            Some(seconds) if (1..=MAX_INVITATION_HOURS * 3600).contains(&seconds) => seconds,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "valid_seconds",
                    format!("'valid_seconds' must be between 1 and {}.", MAX_INVITATION_HOURS * 3600),
                ));
            }
            None => valid_hours * 3600,
        };
        Ok(Self { uses: uses as u32, valid_seconds })
    }
}

#[derive(Debug, Serialize)]
pub struct RevocationObject {
    pub object: &'static str,
    pub peer_id: String,
    /// False when the peer had been revoked before.
    pub newly_revoked: bool,
}

/// `POST /api/nodes/{peer_id}/revoke`: close the node's connections and refuse it from now on,
/// on every node of the cluster.
pub async fn revoke_node(
    State(state): State<AppState>,
    axum::extract::Path(peer_id): axum::extract::Path<String>,
) -> Result<Json<RevocationObject>, ApiError> {
    let newly_revoked = router(&state)?.revoke(&peer_id).await.map_err(|error| match error {
        crate::p2p::P2pError::PeerId(reason) => {
            ApiError::invalid_param("peer_id", format!("invalid peer id: {reason}"))
        }
        other => ApiError::Internal(format!("revoking {peer_id}: {other}")),
    })?;
    Ok(Json(RevocationObject { object: "revocation", peer_id, newly_revoked }))
}

#[derive(Debug, Serialize)]
pub struct JoinObject {
    pub object: &'static str,
    /// The peer id of the node that admitted this one.
    pub inviter: String,
}

pub struct JoinRequest {
    key: String,
}

impl FromJsonObject for JoinRequest {
    fn from_json_object(mut fields: JsonObject) -> Result<Self, ApiError> {
        let key = fields.optional::<String>("key")?.ok_or_else(|| {
            ApiError::invalid_param("key", "'key' (an llmesh://join/... connection key) is required.")
        })?;
        Ok(Self { key })
    }
}

/// `POST /api/join` with `{"key": "llmesh://join/..."}`: join while running, moving to the key's
/// cluster if need be.
pub async fn join_cluster(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<JoinRequest>,
) -> Result<Json<JoinObject>, ApiError> {
    let inviter = router(&state)?.join(&request.key).await.map_err(|error| match error {
        crate::p2p::P2pError::Invitation(reason) => ApiError::invalid_param("key", reason.to_string()),
        crate::p2p::P2pError::Join(reason) => {
            ApiError::invalid_param("key", format!("cannot join: {reason}"))
        }
        other => ApiError::Internal(format!("joining: {other}")),
    })?;
    Ok(Json(JoinObject { object: "join", inviter }))
}

#[derive(Debug, Serialize)]
pub struct DrainObject {
    pub status: &'static str,
    /// False when the node was draining already.
    pub started: bool,
}

/// `POST /api/drain`: the node stops taking new work, announces it, finishes what it runs (up to
/// its `drain_timeout`) and exits, as on SIGTERM.
pub async fn drain(State(state): State<AppState>) -> Result<(StatusCode, Json<DrainObject>), ApiError> {
    let started = router(&state)?.start_draining();
    Ok((StatusCode::ACCEPTED, Json(DrainObject { status: "draining", started })))
}
