//! Signed envelopes: a bincode payload, the signer's public key and its signature, decoded with a
//! byte limit. Announcements and invitations both travel this way.

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    payload: Vec<u8>,
    public_key: Vec<u8>,
    signature: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("{0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("does not decode: {0}")]
    Malformed(String),
    #[error("the signature is invalid")]
    BadSignature,
}

fn codec<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Encode `value` and sign it with `keypair`.
pub fn seal<T: Serialize, const LIMIT: usize>(
    value: &T,
    keypair: &Keypair,
) -> Result<Vec<u8>, EnvelopeError> {
    let payload = bincode::serde::encode_to_vec(value, codec::<LIMIT>())
        .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    seal_payload::<LIMIT>(payload, keypair)
}

/// Sign bytes that are already a payload's encoding (`seal` after encoding; the fuzz targets
/// seal payloads they made up, since no fuzzer forges a signature).
pub fn seal_payload<const LIMIT: usize>(
    payload: Vec<u8>,
    keypair: &Keypair,
) -> Result<Vec<u8>, EnvelopeError> {
    let malformed = |e: &dyn std::fmt::Display| EnvelopeError::Malformed(e.to_string());
    let signature = keypair.sign(&payload).map_err(|e| malformed(&e))?;
    let envelope = Envelope { payload, public_key: keypair.public().encode_protobuf(), signature };
    let bytes = bincode::serde::encode_to_vec(&envelope, codec::<LIMIT>()).map_err(|e| malformed(&e))?;
    if bytes.len() > LIMIT {
        return Err(EnvelopeError::TooLarge(bytes.len(), LIMIT));
    }
    Ok(bytes)
}

/// Decode the payload without checking the signature: only to decide whether a value is worth
/// checking (a record already known need not be verified again).
pub fn read_unverified<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, EnvelopeError> {
    if bytes.len() > LIMIT {
        return Err(EnvelopeError::TooLarge(bytes.len(), LIMIT));
    }
    let malformed = |e: &dyn std::fmt::Display| EnvelopeError::Malformed(e.to_string());
    let (envelope, _): (Envelope, _) =
        bincode::serde::decode_from_slice(bytes, codec::<LIMIT>()).map_err(|e| malformed(&e))?;
    let (value, _): (T, _) =
        bincode::serde::decode_from_slice(&envelope.payload, codec::<LIMIT>()).map_err(|e| malformed(&e))?;
    Ok(value)
}

/// The payload's bytes, undecoded and unverified (the fuzz targets' seeds are made of them).
pub fn payload_unverified<const LIMIT: usize>(bytes: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let (envelope, _): (Envelope, _) = bincode::serde::decode_from_slice(bytes, codec::<LIMIT>())
        .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    Ok(envelope.payload)
}

/// Check the signature and decode; returns the value and the peer id of its signer.
pub fn open<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<(T, PeerId), EnvelopeError> {
    open_prefix::<T, LIMIT>(bytes).map(|(value, _, signer)| (value, signer))
}

/// Like `open`, for a payload that is a `T` followed by more (what a later version appended):
/// returns the bytes after the `T` too.
pub fn open_prefix<T: DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
) -> Result<(T, Vec<u8>, PeerId), EnvelopeError> {
    if bytes.len() > LIMIT {
        return Err(EnvelopeError::TooLarge(bytes.len(), LIMIT));
    }
    let malformed = |e: &dyn std::fmt::Display| EnvelopeError::Malformed(e.to_string());
    let (mut envelope, _): (Envelope, _) =
        bincode::serde::decode_from_slice(bytes, codec::<LIMIT>()).map_err(|e| malformed(&e))?;
    let public_key = PublicKey::try_decode_protobuf(&envelope.public_key).map_err(|e| malformed(&e))?;
    if !public_key.verify(&envelope.payload, &envelope.signature) {
        return Err(EnvelopeError::BadSignature);
    }
    let (value, read): (T, _) =
        bincode::serde::decode_from_slice(&envelope.payload, codec::<LIMIT>()).map_err(|e| malformed(&e))?;
    let rest = envelope.payload.split_off(read);
    Ok((value, rest, public_key.to_peer_id()))
}

/// Decode what a later version appended to a payload (see `open_prefix`).
pub fn decode_rest<T: DeserializeOwned, const LIMIT: usize>(rest: &[u8]) -> Result<T, EnvelopeError> {
    let (value, _): (T, _) = bincode::serde::decode_from_slice(rest, codec::<LIMIT>())
        .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    Ok(value)
}
