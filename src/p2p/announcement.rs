//! What a node tells the cluster about itself on the gossipsub topic: name, addresses, models,
//! hardware, load. Each announcement is signed with the node's key and checked strictly on
//! receipt: size-bounded, decoded with a byte limit, signer equal to the gossip source, fields
//! within bounds, protocol version known, and its display strings made printable (no control
//! characters reach a log line or a terminal). How recent it must be is the network task's check
//! (`network/announcements.rs`).

use libp2p::PeerId;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};

use super::members::{MAX_ADMISSION_BYTES, MAX_MEMBERS};
use super::signed::{self, EnvelopeError};

/// Bumped when the announcement's shape changes. From version 4 on a change only appends: a
/// later version adds its fields after the last of these (a struct of its own, decoded from
/// the bytes after this one), so an older node decodes the fields it knows and ignores the rest
/// (bincode reads a prefix and reports where it stopped), and a newer node reads an older
/// announcement's prefix and defaults the rest. Nodes of versions 4 and later therefore see each
/// other; `infer_protocols` says which of them can serve whom.
///
/// 5: appends `Version5` (the API keys' digest and their usage through the node).
pub const ANNOUNCEMENT_VERSION: u16 = 5;
/// The oldest announcement version this node reads.
pub const MIN_ANNOUNCEMENT_VERSION: u16 = 4;
/// The largest signed announcement accepted on the wire (also gossipsub's transmit limit).
pub const MAX_ANNOUNCEMENT_BYTES: usize = 64 * 1024;
const MAX_MODELS: usize = 256;
const MAX_ADDRESSES: usize = 32;
const MAX_TEXT: usize = 256;
const MAX_PROTOCOLS: usize = 8;
/// Keys whose usage one announcement reports.
pub const MAX_KEY_REPORTS: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub version: u16,
    pub peer_id: String,
    /// The human name shown everywhere (`--name`, default the host name).
    pub name: String,
    /// Multiaddresses other nodes can dial.
    pub addresses: Vec<String>,
    pub models: Vec<AnnouncedModel>,
    pub hardware: Hardware,
    /// Live resource use, sampled every heartbeat.
    pub usage: ResourceUsage,
    pub load: AnnouncedLoad,
    /// llmesh's version, e.g. "0.1.0".
    pub software_version: String,
    /// Unix seconds when the node started.
    pub started_at: u64,
    /// Unix milliseconds when this announcement was made: each is later than the node's last,
    /// and one not later than what was seen of its author, or too far from now, is ignored.
    pub issued_at_ms: u64,
    /// The peers this node knows to be revoked, as a digest: a node whose own differs fetches
    /// the list (see `revoked.rs`). Filled in by the network task.
    pub revoked: RecordsDigest,
    /// Signed admission records, in a cluster with a secret: this node's own first, then those
    /// it vouches for (see `members.rs`). Filled in by the network task.
    pub members: Vec<Vec<u8>>,
    /// This node's proof that it holds the cluster secret, when it does.
    pub founder_proof: Option<[u8; 32]>,
    /// The node is going away: it takes no new requests and finishes those it runs. Routers
    /// stop choosing it at once.
    pub draining: bool,
    /// The inference stream protocols it serves (`/llmesh/infer/3`): a router hands a request
    /// only to a host that speaks its own.
    pub infer_protocols: Vec<String>,
    /// Version 5: the API keys this node knows, as a digest: a node whose own differs fetches
    /// the records (see `api_keys.rs`). Filled in by the network task.
    #[serde(skip)]
    pub api_keys: RecordsDigest,
    /// Version 5: what each API key used through this node, for limits counted cluster-wide.
    #[serde(skip)]
    pub key_usage: Vec<KeyUsageReport>,
}

/// The fields version 5 appends, after the whole of version 4's `Announcement`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Version5 {
    api_keys: RecordsDigest,
    key_usage: Vec<KeyUsageReport>,
}

/// One API key's use of this node: in the last minute (what limits count) and since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsageReport {
    pub key: String,
    pub minute_requests: u32,
    pub minute_tokens: u64,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedModel {
    pub id: String,
    /// "chat" or "embeddings".
    pub kind: String,
    pub architecture: String,
    pub quantization: String,
    pub context_length: u64,
    /// Parameters in the model's files (0: unknown).
    pub parameters: u64,
    /// Bytes of the model's files (0: unknown).
    pub file_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardware {
    pub cpu: String,
    pub cores: u32,
    pub memory_bytes: u64,
    pub gpu: Option<String>,
    pub gpu_memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// Whole machine, 0 to 100.
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub gpu_percent: Option<f32>,
    pub gpu_memory_used_bytes: Option<u64>,
}

/// A set of signed records (revoked peers, API keys) in a few bytes: how many, and a SHA-256
/// over them in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordsDigest {
    pub count: u32,
    pub hash: [u8; 32],
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedLoad {
    pub in_flight: u32,
    pub queued: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnouncementError {
    #[error("announcement of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("announcement does not decode: {0}")]
    Malformed(String),
    #[error("announcement signature is invalid")]
    BadSignature,
    #[error("announcement signed by {signer} arrived from {source_peer}")]
    WrongSigner { signer: String, source_peer: String },
    #[error("announcement version {0} is not supported")]
    UnknownVersion(u16),
    #[error("announcement field {0} is out of bounds")]
    OutOfBounds(&'static str),
}

impl From<EnvelopeError> for AnnouncementError {
    fn from(error: EnvelopeError) -> Self {
        match error {
            EnvelopeError::TooLarge(size, _) => AnnouncementError::TooLarge(size),
            EnvelopeError::Malformed(reason) => AnnouncementError::Malformed(reason),
            EnvelopeError::BadSignature => AnnouncementError::BadSignature,
        }
    }
}

impl Announcement {
    /// Sign and encode for publication.
    pub fn sign(&self, keypair: &Keypair) -> Result<Vec<u8>, AnnouncementError> {
        let appended = Version5 { api_keys: self.api_keys, key_usage: self.key_usage.clone() };
        signed::seal::<_, MAX_ANNOUNCEMENT_BYTES>(&(self, appended), keypair).map_err(AnnouncementError::from)
    }

    /// Decode and check an announcement that gossip says was published by `source`.
    pub fn verify(bytes: &[u8], source: &PeerId) -> Result<Self, AnnouncementError> {
        let (mut announcement, rest, signer): (Announcement, _, PeerId) =
            signed::open_prefix::<_, MAX_ANNOUNCEMENT_BYTES>(bytes)?;
        // Version 4 ends here; what a version after 5 appends beyond `Version5` is ignored.
        if !rest.is_empty() {
            let appended: Version5 = signed::decode_rest::<_, MAX_ANNOUNCEMENT_BYTES>(&rest)?;
            announcement.api_keys = appended.api_keys;
            announcement.key_usage = appended.key_usage;
        }
        if signer != *source {
            return Err(AnnouncementError::WrongSigner {
                signer: signer.to_string(),
                source_peer: source.to_string(),
            });
        }
        if announcement.version < MIN_ANNOUNCEMENT_VERSION {
            return Err(AnnouncementError::UnknownVersion(announcement.version));
        }
        if announcement.peer_id != signer.to_string() {
            return Err(AnnouncementError::WrongSigner {
                signer: signer.to_string(),
                source_peer: announcement.peer_id,
            });
        }
        announcement.check_bounds()?;
        announcement.make_printable();
        Ok(announcement)
    }

    fn check_bounds(&self) -> Result<(), AnnouncementError> {
        let text_ok = |text: &str| !text.is_empty() && text.len() <= MAX_TEXT;
        // Names that identify something (a model, an address) are refused when unprintable:
        // cleaned, they would name something else.
        let identifier_ok = |text: &str| text_ok(text) && !text.chars().any(is_unprintable);
        let display_ok = |text: &str| text.len() <= MAX_TEXT;
        if !text_ok(&self.name) {
            return Err(AnnouncementError::OutOfBounds("name"));
        }
        if self.addresses.len() > MAX_ADDRESSES || self.addresses.iter().any(|a| !identifier_ok(a)) {
            return Err(AnnouncementError::OutOfBounds("addresses"));
        }
        let hardware = &self.hardware;
        if !display_ok(&hardware.cpu) || !hardware.gpu.as_deref().is_none_or(display_ok) {
            return Err(AnnouncementError::OutOfBounds("hardware"));
        }
        if !display_ok(&self.software_version) {
            return Err(AnnouncementError::OutOfBounds("software_version"));
        }
        if self.members.len() > MAX_MEMBERS || self.members.iter().any(|r| r.len() > MAX_ADMISSION_BYTES) {
            return Err(AnnouncementError::OutOfBounds("members"));
        }
        if self.infer_protocols.len() > MAX_PROTOCOLS
            || self.infer_protocols.iter().any(|p| !identifier_ok(p))
        {
            return Err(AnnouncementError::OutOfBounds("infer_protocols"));
        }
        if self.models.len() > MAX_MODELS {
            return Err(AnnouncementError::OutOfBounds("models"));
        }
        if self.key_usage.len() > MAX_KEY_REPORTS
            || self.key_usage.iter().any(|report| !super::api_keys::valid_key_name(&report.key))
        {
            return Err(AnnouncementError::OutOfBounds("key_usage"));
        }
        for model in &self.models {
            if !identifier_ok(&model.id)
                || !matches!(model.kind.as_str(), "chat" | "embeddings")
                || !display_ok(&model.architecture)
                || !display_ok(&model.quantization)
            {
                return Err(AnnouncementError::OutOfBounds("models"));
            }
        }
        Ok(())
    }

    /// Replace what a terminal or a log would act on in the strings that are only shown.
    fn make_printable(&mut self) {
        let clean = |text: &mut String| {
            if text.chars().any(is_unprintable) {
                *text = printable(text);
            }
        };
        clean(&mut self.name);
        clean(&mut self.software_version);
        clean(&mut self.hardware.cpu);
        if let Some(gpu) = &mut self.hardware.gpu {
            clean(gpu);
        }
        for model in &mut self.models {
            clean(&mut model.architecture);
            clean(&mut model.quantization);
        }
    }
}

/// Control characters (newlines, escape sequences) and the bidirectional overrides that make text
/// read differently from what it is.
fn is_unprintable(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every character a terminal or log reader would act on replaced by `\u{fffd}`.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if is_unprintable(c) { '\u{fffd}' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(keypair: &Keypair) -> Announcement {
        crate::p2p::fuzz::sample_announcement(&keypair.public().to_peer_id())
    }

    #[test]
    fn signed_announcement_round_trips() {
        let keypair = Keypair::generate_ed25519();
        let bytes = sample(&keypair).sign(&keypair).unwrap();
        let decoded = Announcement::verify(&bytes, &keypair.public().to_peer_id()).unwrap();
        assert_eq!(decoded, sample(&keypair));
    }

    #[test]
    fn a_flipped_byte_is_refused() {
        let keypair = Keypair::generate_ed25519();
        let mut bytes = sample(&keypair).sign(&keypair).unwrap();
        let middle = bytes.len() / 3;
        bytes[middle] ^= 0x40;
        assert!(Announcement::verify(&bytes, &keypair.public().to_peer_id()).is_err());
    }

    #[test]
    fn another_peer_cannot_speak_for_a_node() {
        let keypair = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let bytes = sample(&keypair).sign(&keypair).unwrap();
        assert!(matches!(Announcement::verify(&bytes, &other), Err(AnnouncementError::WrongSigner { .. })));
        // Signed by one key while claiming another peer id.
        let mut forged = sample(&keypair);
        forged.peer_id = other.to_string();
        let bytes = forged.sign(&keypair).unwrap();
        assert!(matches!(
            Announcement::verify(&bytes, &keypair.public().to_peer_id()),
            Err(AnnouncementError::WrongSigner { .. })
        ));
    }

    #[test]
    fn older_versions_and_bad_fields_are_refused() {
        let keypair = Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let mut older = sample(&keypair);
        older.version = MIN_ANNOUNCEMENT_VERSION - 1;
        let bytes = older.sign(&keypair).unwrap();
        assert_eq!(Announcement::verify(&bytes, &peer), Err(AnnouncementError::UnknownVersion(3)));
        let mut nameless = sample(&keypair);
        nameless.name.clear();
        let bytes = nameless.sign(&keypair).unwrap();
        assert_eq!(Announcement::verify(&bytes, &peer), Err(AnnouncementError::OutOfBounds("name")));
        let mut odd_kind = sample(&keypair);
        odd_kind.models[0].kind = "vision".into();
        let bytes = odd_kind.sign(&keypair).unwrap();
        assert_eq!(Announcement::verify(&bytes, &peer), Err(AnnouncementError::OutOfBounds("models")));
    }

    /// What a later version may add: fields of its own after the last of these.
    #[derive(Serialize)]
    struct LaterFields {
        region: String,
        protocols_v9: Vec<u32>,
    }

    #[test]
    fn a_later_version_with_appended_fields_is_read_for_what_this_one_knows() {
        let keypair = Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let mut later = sample(&keypair);
        later.version = ANNOUNCEMENT_VERSION + 5;
        later.api_keys = RecordsDigest { count: 2, hash: [3; 32] };
        later.key_usage =
            vec![KeyUsageReport { key: "intern".into(), minute_requests: 4, ..Default::default() }];
        let version5 = Version5 { api_keys: later.api_keys, key_usage: later.key_usage.clone() };
        let appended = LaterFields { region: "eu".into(), protocols_v9: vec![9, 10] };
        let bytes =
            signed::seal::<_, MAX_ANNOUNCEMENT_BYTES>(&(&later, &version5, &appended), &keypair).unwrap();
        assert_eq!(Announcement::verify(&bytes, &peer), Ok(later));
    }

    #[test]
    fn a_version_4_announcement_is_read_with_the_later_fields_empty() {
        let keypair = Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let mut older = sample(&keypair);
        older.version = 4;
        let bytes = signed::seal::<_, MAX_ANNOUNCEMENT_BYTES>(&older, &keypair).unwrap();
        let read = Announcement::verify(&bytes, &peer).unwrap();
        assert_eq!((read.api_keys, read.key_usage.len()), (RecordsDigest::default(), 0));
        // And a version 4 node reads ours: the fields it knows, the rest ignored.
        let mut ours = sample(&keypair);
        ours.key_usage = vec![KeyUsageReport { key: "app".into(), requests: 9, ..Default::default() }];
        let (prefix, _): (Announcement, PeerId) =
            signed::open::<_, MAX_ANNOUNCEMENT_BYTES>(&ours.sign(&keypair).unwrap()).unwrap();
        assert_eq!(prefix.name, ours.name);
    }

    #[test]
    fn key_usage_is_bounded_and_named_by_valid_key_names() {
        let keypair = Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let mut many = sample(&keypair);
        many.key_usage = (0..=MAX_KEY_REPORTS)
            .map(|n| KeyUsageReport { key: format!("k{n}"), ..Default::default() })
            .collect();
        let bytes = many.sign(&keypair).unwrap();
        assert_eq!(Announcement::verify(&bytes, &peer), Err(AnnouncementError::OutOfBounds("key_usage")));
        let mut odd = sample(&keypair);
        odd.key_usage = vec![KeyUsageReport { key: "a\nb".into(), ..Default::default() }];
        let bytes = odd.sign(&keypair).unwrap();
        assert_eq!(Announcement::verify(&bytes, &peer), Err(AnnouncementError::OutOfBounds("key_usage")));
    }

    #[test]
    fn control_characters_never_leave_an_announcement() {
        let keypair = Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let mut hostile = sample(&keypair);
        hostile.name = "box\n2025-01-01T00:00:00Z  WARN node revoked\u{1b}[2J\u{202e}".into();
        hostile.hardware.cpu = "\u{1b}]0;owned\u{7}".into();
        hostile.models[0].quantization = "Q4\r".into();
        let decoded = Announcement::verify(&hostile.sign(&keypair).unwrap(), &peer).unwrap();
        for text in [&decoded.name, &decoded.hardware.cpu, &decoded.models[0].quantization] {
            assert!(!text.chars().any(is_unprintable), "{text:?}");
        }
        assert!(decoded.name.starts_with("box\u{fffd}2025"), "{:?}", decoded.name);
        // An identifier is refused rather than cleaned into another one.
        let mut odd_model = sample(&keypair);
        odd_model.models[0].id = "tiny\u{1b}[0m".into();
        let bytes = odd_model.sign(&keypair).unwrap();
        assert_eq!(Announcement::verify(&bytes, &peer), Err(AnnouncementError::OutOfBounds("models")));
        assert_eq!(printable("plain name é"), "plain name é");
    }

    #[test]
    fn oversized_or_garbage_input_is_refused_without_panicking() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        assert!(matches!(
            Announcement::verify(&vec![0; MAX_ANNOUNCEMENT_BYTES + 1], &peer),
            Err(AnnouncementError::TooLarge(_))
        ));
        for garbage in [&b""[..], b"\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"hello world"] {
            assert!(Announcement::verify(garbage, &peer).is_err());
        }
    }
}
