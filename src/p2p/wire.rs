//! Framing for messages on p2p streams: a 4-byte big-endian length, then the bincode encoding.
//! Every frame is bounded on both ends; a frame over the limit, or one that does not decode, is
//! an error and the stream is dropped.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame either side writes or reads.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

fn invalid(reason: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, reason.to_string())
}

pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    stream: &mut W,
    message: &T,
) -> std::io::Result<()> {
    let bytes = bincode::serde::encode_to_vec(message, codec()).map_err(invalid)?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(invalid(format!("frame of {} bytes is over the limit", bytes.len())));
    }
    let length = u32::try_from(bytes.len()).map_err(invalid)?;
    stream.write_all(&length.to_be_bytes()).await?;
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// The next message, or `None` when the other side closed the stream cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    stream: &mut R,
) -> std::io::Result<Option<T>> {
    let mut length = [0u8; 4];
    match stream.read_exact(&mut length).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(invalid(format!("frame of {length} bytes is over the limit")));
    }
    let mut bytes = vec![0u8; length];
    stream.read_exact(&mut bytes).await?;
    let (message, used) = bincode::serde::decode_from_slice(&bytes, codec()).map_err(invalid)?;
    if used != length {
        return Err(invalid("trailing bytes after the message"));
    }
    Ok(Some(message))
}
