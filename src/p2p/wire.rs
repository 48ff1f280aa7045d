//! Framing for messages on p2p streams: a 4-byte big-endian length, then the bincode encoding.
//! Every frame is bounded on both ends; a frame over the limit, or one that does not decode, is
//! an error and the stream is dropped. Bincode bounds what it allocates but not how deep it
//! recurses, so a type read here must not contain itself (through a `Box`, `Vec` or `Option`):
//! a few bytes per level would let one small frame overflow the stack. [`Watchdog`] bounds how long a stream may go without
//! moving a byte.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::{Instant, Sleep};

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
    read_frame_within(stream, MAX_FRAME_BYTES).await
}

/// [`read_frame`] for a protocol whose messages are known to be smaller: a frame longer than
/// `max_bytes` (at most `MAX_FRAME_BYTES`) is refused before any of it is read or allocated.
pub async fn read_frame_within<R: AsyncRead + Unpin, T: DeserializeOwned>(
    stream: &mut R,
    max_bytes: usize,
) -> std::io::Result<Option<T>> {
    let max_bytes = max_bytes.min(MAX_FRAME_BYTES);
    let mut length = [0u8; 4];
    match stream.read_exact(&mut length).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length > max_bytes {
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

/// A stream that fails with `TimedOut` once a read or a write has waited `limit` without a byte
/// moving. Any progress restarts the clock, so a large frame on a slow link is not cut off, but
/// a peer that vanished without a word (a pulled cable; a connection closed under the stream)
/// is noticed.
pub struct Watchdog<'a, S> {
    inner: &'a mut S,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<'a, S> Watchdog<'a, S> {
    pub fn new(inner: &'a mut S, limit: Duration) -> Self {
        Self { inner, limit, deadline: Box::pin(tokio::time::sleep(limit)) }
    }

    /// After a poll of the inner stream: restart the clock on progress, fail once it ran out.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                let limit = self.limit;
                self.deadline.as_mut().reset(Instant::now() + limit);
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nothing moved for {} s", self.limit.as_secs()),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watchdog<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.watch(cx, poll)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watchdog<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut *self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut *self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut *self.inner).poll_close(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out one byte per `pause`, from `bytes`.
    struct Trickle {
        bytes: Vec<u8>,
        pause: Duration,
        next: Option<Pin<Box<Sleep>>>,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            let pause = self.pause;
            let next = self.next.get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
            if next.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.next = None;
            if self.bytes.is_empty() || buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            buf[0] = self.bytes.remove(0);
            Poll::Ready(Ok(1))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_moving_stream_is_not_cut_off() {
        // 6 bytes, one every 3 s: 18 s in all, longer than the limit, never 5 s without a byte.
        let mut slow = Trickle { bytes: b"llmesh".to_vec(), pause: Duration::from_secs(3), next: None };
        let mut read = Vec::new();
        Watchdog::new(&mut slow, Duration::from_secs(5)).read_to_end(&mut read).await.unwrap();
        assert_eq!(read, b"llmesh");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_times_out() {
        let mut stalled = Trickle { bytes: b"ll".to_vec(), pause: Duration::from_secs(60), next: None };
        let started = Instant::now();
        let mut byte = [0u8; 1];
        let error = Watchdog::new(&mut stalled, Duration::from_secs(5)).read(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5), "the paused clock moved to the deadline only");
    }

    #[tokio::test]
    async fn frames_round_trip_through_a_watchdog() {
        let mut buffer = futures::io::Cursor::new(Vec::new());
        write_frame(&mut Watchdog::new(&mut buffer, Duration::from_secs(5)), &("hello", 7u32)).await.unwrap();
        buffer.set_position(0);
        let frame: Option<(String, u32)> =
            read_frame(&mut Watchdog::new(&mut buffer, Duration::from_secs(5))).await.unwrap();
        assert_eq!(frame, Some(("hello".to_string(), 7)));
    }
}
