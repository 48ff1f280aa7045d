//! Serving the API on a TCP listener: HTTP/1.1 through hyper, with two bounds `axum::serve` does
//! not set. A request's head must arrive within [`HEADER_READ_TIMEOUT`] of the connection opening
//! (or of the previous answer, on a kept-alive connection), so a client that sends nothing, or
//! one byte now and then (slowloris), holds a connection for seconds, not forever. At most
//! [`MAX_CONNECTIONS`] are open at once; more wait in the kernel's accept queue.
//!
//! HTTP/1.1 only: the node speaks plain HTTP, where browsers and the OpenAI clients never use
//! HTTP/2, and hyper's negotiation of the two reads the connection's first bytes without a
//! deadline.
//!
//! Shutdown: once `shutdown` is cancelled no connection is accepted, each open one finishes the
//! request in flight (a streamed answer to its end) and closes, and `serve` returns when all have.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;

/// How long a client may take to send a request's line and headers. Every client of this API
/// sends them in one write; ten seconds leaves room for a slow link and bounds what an idle or
/// trickling connection costs.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections open at once. Far more than the concurrent generations a node runs; few enough
/// to stay clear of the usual 1,024 file descriptors, which the overlay needs as well.
pub const MAX_CONNECTIONS: usize = 512;

/// After an accept error that is not about one connection (out of file descriptors), wait this
/// long before accepting again rather than spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Serve `app` on `listener` until `shutdown`, then drain (see the module's documentation).
/// Cancel-safe only in that dropping it drops the listener; connections already handed to their
/// tasks run on.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Every connection task holds a receiver: the send asks them to finish, and the sender sees
    // when the last is gone.
    let (closing, closed) = watch::channel(());
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.map_err(io::Error::other)?,
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    tracing::warn!(%error, "cannot accept HTTP connections; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(stream, app.clone(), closed.clone(), slot));
    }
    drop(listener);
    drop(closed);
    let _ = closing.send(());
    closing.closed().await;
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    mut closing: watch::Receiver<()>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = closing.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "HTTP connection ended with an error");
    }
}

/// Errors about one connection that went away before it was accepted.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}
