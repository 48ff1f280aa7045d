//! Entry points for the fuzz targets (`fuzz/`, replayed by `tests/fuzz_corpus.rs`): each takes
//! the bytes a peer could send and gives them to the decoder that reads them off the network,
//! then checks what is cheap to check of what it accepted. Nothing here runs in a node.
//!
//! No fuzzer forges an ed25519 signature, so the targets of signed values read a mode from the
//! first byte: the rest as it came (a record or announcement someone signed), or the rest as a
//! payload that [`signer`] seals first, so that the decoding behind the signature is fuzzed too;
//! the records targets also take a stream of record pages, as `network/records.rs` reads them.

use std::path::Path;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::executor::block_on;
use futures::io::Cursor;
use libp2p::PeerId;
use libp2p::identity::Keypair;

use super::announcement::{Announcement, AnnouncementError, MAX_ANNOUNCEMENT_BYTES};
use super::api_keys::{ApiKeyRecords, MAX_KEY_RECORD_BYTES, MAX_KEYS};
use super::invitation::{Invitation, KEY_PREFIX, MAX_INVITATION_BYTES};
use super::join::{JoinReply, MAX_JOIN_FRAME_BYTES};
use super::members::{MAX_ADMISSION_BYTES, MAX_MEMBERS, Roster};
use super::revoked::{MAX_REVOCATION_BYTES, RevokedPeers};
use super::signed;
use super::wire::{read_frame, read_frame_within};

/// The cluster every fuzzed record is for; a record for another is refused early.
pub const CLUSTER_ID: &str = "fuzz";
/// Records taken from one input's pages: enough to reach every bound that counts per batch.
const MAX_PAGE_RECORDS: usize = 2 * MAX_MEMBERS;

/// A data dir that cannot be created: the stores load nothing and save nothing.
fn no_data_dir() -> &'static Path {
    Path::new("/dev/null/llmesh-fuzz")
}

/// The member that signs what the targets seal: the peer every announcement comes from, the
/// signer the stores take as a member, the inviter of every invitation.
pub fn signer() -> &'static Keypair {
    static KEYPAIR: OnceLock<Keypair> = OnceLock::new();
    KEYPAIR.get_or_init(|| Keypair::ed25519_from_bytes([7u8; 32]).expect("32 bytes are an ed25519 secret"))
}

/// The node under test, a member that is not `signer`.
pub fn local() -> &'static Keypair {
    static KEYPAIR: OnceLock<Keypair> = OnceLock::new();
    KEYPAIR.get_or_init(|| Keypair::ed25519_from_bytes([8u8; 32]).expect("32 bytes are an ed25519 secret"))
}

fn signer_id() -> PeerId {
    signer().public().to_peer_id()
}

/// The signed values an input stands for, by its mode byte (see the module's comment).
fn signed_values<const LIMIT: usize>(data: &[u8], pages: bool) -> Vec<Vec<u8>> {
    let Some((&mode, rest)) = data.split_first() else { return Vec::new() };
    match mode % if pages { 3 } else { 2 } {
        0 => vec![rest.to_vec()],
        1 => signed::seal_payload::<LIMIT>(rest.to_vec(), signer()).into_iter().collect(),
        _ => {
            let mut stream = Cursor::new(rest);
            let mut records = Vec::new();
            while let Ok(Some(page)) = block_on(read_frame::<_, Vec<Vec<u8>>>(&mut stream)) {
                records.extend(page);
                if records.len() >= MAX_PAGE_RECORDS {
                    break;
                }
            }
            records.truncate(MAX_PAGE_RECORDS);
            records
        }
    }
}

/// A gossiped announcement from `signer`: one that verifies signs again to the same bytes.
pub fn announcement(data: &[u8]) {
    for bytes in signed_values::<MAX_ANNOUNCEMENT_BYTES>(data, false) {
        let Ok(announcement) = Announcement::verify(&bytes, &signer_id()) else { continue };
        let signed = match announcement.sign(signer()) {
            // Made printable, a display string may have grown past a bound (each control
            // character became a 3-byte U+FFFD): others' announcements are never re-sent.
            Err(AnnouncementError::TooLarge(_)) => continue,
            signed => signed.expect("a verified announcement signs again"),
        };
        let again = match Announcement::verify(&signed, &signer_id()) {
            Err(AnnouncementError::OutOfBounds(_)) => continue,
            again => again.expect("a re-signed announcement verifies"),
        };
        assert_eq!(again.sign(signer()).as_ref(), Ok(&signed), "verify and sign disagree");
    }
}

/// A connection key pasted by a user (mode 0: the text; 1: a key sealing the payload).
pub fn invitation(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let key = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let Ok(sealed) = signed::seal_payload::<MAX_INVITATION_BYTES>(rest.to_vec(), signer()) else {
            return;
        };
        format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(sealed))
    };
    check_key(&key);
}

fn check_key(key: &str) {
    let Ok(invitation) = Invitation::from_key(key) else { return };
    if invitation.inviter == signer_id().to_string() {
        let again = invitation.to_key(signer()).expect("a read invitation signs again");
        assert_eq!(Invitation::from_key(&again), Ok(invitation), "to_key and from_key disagree");
    }
}

/// The join protocol's frames: mode 0, what an inviter reads (a key); 1, what the joining node
/// reads (the answer, whose roster it adopts).
pub fn join_frames(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut stream = Cursor::new(rest);
    if mode % 2 == 0 {
        if let Ok(Some(key)) = block_on(read_frame_within::<_, String>(&mut stream, MAX_JOIN_FRAME_BYTES)) {
            check_key(&key);
        }
        return;
    }
    let Ok(Some(JoinReply::Accepted(credentials))) =
        block_on(read_frame_within::<_, JoinReply>(&mut stream, MAX_JOIN_FRAME_BYTES))
    else {
        return;
    };
    let mut roster = Roster::load(no_data_dir(), CLUSTER_ID, local(), None);
    if roster.adopt(signer_id(), &credentials, |_| false).is_ok() {
        assert!(roster.is_member(&signer_id()), "the inviter is a member once adopted");
    }
    assert!(roster.records().len() <= MAX_MEMBERS);
}

/// Admission records, as announcements carry them, learnt by a member that trusts `signer`.
pub fn admission_record(data: &[u8]) {
    let records = signed_values::<MAX_ADMISSION_BYTES>(data, true);
    let mut roster = Roster::load(no_data_dir(), CLUSTER_ID, local(), None);
    roster.admit(signer_id());
    let admitted = roster.learn(&records, |_| false);
    for peer in &admitted {
        assert!(roster.is_member(peer), "{peer} was admitted but is not a member");
    }
    assert!(roster.records().len() <= MAX_MEMBERS);
}

/// Revocation records, as another member sends its list.
pub fn revocation_record(data: &[u8]) {
    let records = signed_values::<MAX_REVOCATION_BYTES>(data, true);
    let mut revoked = RevokedPeers::load(no_data_dir(), CLUSTER_ID, local());
    let member = signer_id();
    for record in &records {
        if let Ok(Some(peer)) = revoked.accept(record, |peer| *peer == member) {
            assert!(revoked.contains(&peer), "{peer} was accepted but is not revoked");
            assert!(matches!(revoked.accept(record, |peer| *peer == member), Ok(None)), "taken twice");
        }
    }
    assert_eq!(revoked.digest().count as usize, revoked.records().len());
}

/// API key records, as another member sends them.
pub fn api_key_record(data: &[u8]) {
    let records = signed_values::<MAX_KEY_RECORD_BYTES>(data, true);
    let mut keys = ApiKeyRecords::load(no_data_dir(), CLUSTER_ID, local().public().to_peer_id());
    let member = signer_id();
    for record in &records {
        if let Ok(true) = keys.accept(record, |peer| *peer == member) {
            assert!(matches!(keys.accept(record, |peer| *peer == member), Ok(false)), "taken twice");
        }
    }
    assert_eq!(keys.list().len(), keys.records().len());
    assert!(keys.records().len() <= MAX_KEYS);
}

/// Seeds for the corpus: real encodings of each kind, as `(target, bytes)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with_mode = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    let page = |records: Vec<Vec<u8>>| {
        let mut stream = Cursor::new(Vec::new());
        block_on(super::wire::write_frame(&mut stream, &records)).expect("a page encodes");
        with_mode(2, &stream.into_inner())
    };
    let payload = |record: &[u8]| {
        signed::payload_unverified::<MAX_ANNOUNCEMENT_BYTES>(record).expect("a sealed value opens")
    };
    let mut seeds = Vec::new();

    let announcement = sample_announcement(&signer_id());
    let sealed = announcement.sign(signer()).expect("the sample signs");
    seeds.push(("announcement", with_mode(0, &sealed)));
    seeds.push(("announcement", with_mode(1, &payload(&sealed))));

    let invitation = Invitation::new(
        CLUSTER_ID.into(),
        Some([5; 32]),
        signer_id().to_string(),
        vec![format!("/ip4/10.0.0.2/tcp/7690/p2p/{}", signer_id())],
        4_000_000_000,
        3,
    );
    let key = invitation.to_key(signer()).expect("the invitation signs");
    let sealed_invitation = URL_SAFE_NO_PAD.decode(key.trim_start_matches(KEY_PREFIX)).expect("base64");
    seeds.push(("invitation", with_mode(0, key.as_bytes())));
    seeds.push(("invitation", with_mode(1, &payload(&sealed_invitation))));

    let mut sponsor = Roster::load(no_data_dir(), CLUSTER_ID, signer(), Some([6; 32]));
    sponsor.admit(local().public().to_peer_id());
    sponsor.admit(Keypair::generate_ed25519().public().to_peer_id());
    let admissions = sponsor.records();
    seeds.push(("admission_record", with_mode(0, &admissions[1])));
    seeds.push(("admission_record", with_mode(1, &payload(&admissions[1]))));
    seeds.push(("admission_record", page(admissions.clone())));

    let mut frames = Cursor::new(Vec::new());
    block_on(super::wire::write_frame(&mut frames, &key)).expect("a key frame encodes");
    seeds.push(("join_frames", with_mode(0, &frames.into_inner())));
    let mut frames = Cursor::new(Vec::new());
    block_on(super::wire::write_frame(&mut frames, &JoinReply::Accepted(sponsor.credentials())))
        .expect("an answer encodes");
    seeds.push(("join_frames", with_mode(1, &frames.into_inner())));

    let mut revoked = RevokedPeers::load(no_data_dir(), CLUSTER_ID, signer());
    for _ in 0..2 {
        revoked.revoke(Keypair::generate_ed25519().public().to_peer_id(), signer()).expect("revokes");
    }
    let revocations = revoked.records();
    seeds.push(("revocation_record", with_mode(0, &revocations[0])));
    seeds.push(("revocation_record", with_mode(1, &payload(&revocations[0]))));
    seeds.push(("revocation_record", page(revocations)));

    let mut keys = ApiKeyRecords::load(no_data_dir(), CLUSTER_ID, signer_id());
    let spec = |name: &str, models: Vec<String>| super::KeySpec {
        name: name.into(),
        models,
        requests_per_minute: Some(60),
        tokens_per_minute: Some(10_000),
        expires_at: Some(4_000_000_000),
    };
    keys.create(spec("ci", Vec::new()), signer()).expect("a key");
    keys.create(spec("team-a", vec!["smollm2".into(), "gemma".into()]), signer()).expect("a key");
    keys.revoke("ci", signer()).expect("revokes");
    let key_records = keys.records();
    seeds.push(("api_key_record", with_mode(0, &key_records[1])));
    seeds.push(("api_key_record", with_mode(1, &payload(&key_records[1]))));
    seeds.push(("api_key_record", page(key_records)));
    seeds
}

/// An announcement with every field set, from `peer` (also the announcement tests' sample).
pub(super) fn sample_announcement(peer: &PeerId) -> Announcement {
    use super::announcement::*;
    Announcement {
        version: ANNOUNCEMENT_VERSION,
        peer_id: peer.to_string(),
        name: "workstation".into(),
        addresses: vec!["/ip4/10.0.0.2/tcp/7690".into()],
        models: vec![AnnouncedModel {
            id: "smollm2".into(),
            kind: "chat".into(),
            architecture: "llama".into(),
            quantization: "Q4_1".into(),
            context_length: 4096,
            parameters: 134_515_008,
            file_bytes: 85_000_000,
        }],
        hardware: Hardware {
            cpu: "Ryzen".into(),
            cores: 16,
            memory_bytes: 64 << 30,
            gpu: Some("RTX".into()),
            gpu_memory_bytes: Some(8 << 30),
        },
        usage: ResourceUsage {
            cpu_percent: 12.5,
            memory_used_bytes: 8 << 30,
            gpu_percent: Some(3.0),
            gpu_memory_used_bytes: Some(1 << 30),
        },
        load: AnnouncedLoad { in_flight: 1, queued: 0 },
        software_version: "0.1.0".into(),
        started_at: 1,
        issued_at_ms: 2,
        revoked: RecordsDigest::default(),
        members: vec![vec![1; 200]; 2],
        founder_proof: Some([3; 32]),
        draining: false,
        infer_protocols: vec![super::INFER_PROTOCOL.to_string()],
        api_keys: RecordsDigest { count: 1, hash: [4; 32] },
        key_usage: vec![KeyUsageReport {
            key: "ci".into(),
            minute_requests: 2,
            minute_tokens: 30,
            ..Default::default()
        }],
    }
}
