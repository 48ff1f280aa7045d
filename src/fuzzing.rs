//! The fuzz targets' entry points, one function per target (`fuzz/fuzz_targets/<name>.rs`), each
//! feeding bytes from a peer or a user to the decoder that reads them. `tests/fuzz_corpus.rs`
//! replays the corpus (`fuzz/corpus/<name>/`) through them in every test run. Not an API.

pub use crate::api::fuzz::{chat_template, request as api_request, structured_output};
pub use crate::p2p::fuzz::{
    admission_record, announcement, api_key_record, invitation, join_frames, revocation_record,
};
pub use crate::router::fuzz::{infer_reply, infer_request};

/// A target: bytes in, a panic if a decoder or a check fails.
pub type Target = fn(&[u8]);

/// Every target by name, as the corpus directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("infer_request", infer_request),
    ("infer_reply", infer_reply),
    ("announcement", announcement),
    ("invitation", invitation),
    ("join_frames", join_frames),
    ("admission_record", admission_record),
    ("revocation_record", revocation_record),
    ("api_key_record", api_key_record),
    ("api_request", api_request),
    ("chat_template", chat_template),
    ("structured_output", structured_output),
];

/// Real encodings to start each target's corpus from, as `(target, bytes)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = crate::router::fuzz::seeds();
    seeds.extend(crate::p2p::fuzz::seeds());
    seeds.extend(crate::api::fuzz::seeds());
    seeds
}
