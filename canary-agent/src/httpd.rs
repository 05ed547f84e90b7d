//! The agent's own HTTP listeners (`/metrics` with the probes, and the dashboard):
//! reachable by anyone on the network, so bounded whatever a client does. A client
//! has [`HEAD_TIMEOUT`] to send each request head (idle keep-alive included), at most
//! [`MAX_CONNECTIONS`] are served at once (more are closed at once), and a failing
//! `accept` (EMFILE) is retried after a pause instead of ending the listener, which
//! would fail the liveness probe and restart the pod.
//!
//! What such a client reads is served from [`Cached`]: however many ask, the agent's
//! lock is taken at most once per refresh interval for them.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::{body::Incoming, server::conn::http1, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

/// Time a client has to send a complete request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once per listener.
pub const MAX_CONNECTIONS: usize = 256;
/// Pause after a failed `accept` (out of descriptors, usually).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `service` on `listener` until the runtime stops; `what` names it in logs.
pub async fn serve<S, B>(listener: TcpListener, service: S, what: &'static str, max: usize)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let slots = Arc::new(Semaphore::new(max));
    let mut failures = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                failures += 1;
                // Logged on the first failure and then every hundredth.
                if failures % 100 == 1 {
                    tracing::warn!(error = %e, failures, "{what}: accept failed; retrying");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: a client over the cap costs nothing but the accept.
            tracing::debug!("{what}: {max} connections open; one refused");
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, service, what, HEAD_TIMEOUT).await;
        });
    }
}

/// One connection, each request head due within `head_timeout`.
async fn serve_connection<S, B, I>(io: I, service: S, what: &'static str, head_timeout: Duration)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "{what} connection");
    }
}

/// A value read under the agent's lock, shared by every reader for `max_age`: one
/// reader refreshes it (off the async workers) while the others get the last one.
pub struct Cached<T> {
    max_age: Duration,
    slot: Mutex<Option<(Instant, Arc<T>)>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl<T: Send + Sync + 'static> Cached<T> {
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            slot: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn fresh(&self, max_age: Duration) -> Option<Arc<T>> {
        let slot = self.slot.lock().ok()?;
        let (at, v) = slot.as_ref()?;
        (at.elapsed() < max_age).then(|| v.clone())
    }

    fn last(&self) -> Option<Arc<T>> {
        Some(self.slot.lock().ok()?.as_ref()?.1.clone())
    }

    /// The cached value, refreshed with `read` when older than `max_age`.
    pub async fn get(&self, read: impl FnOnce() -> T + Send + 'static) -> Arc<T> {
        if let Some(v) = self.fresh(self.max_age) {
            return v;
        }
        let guard = match self.refreshing.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                // Someone refreshes: the last value will do; the very first waits.
                if let Some(v) = self.last() {
                    return v;
                }
                self.refreshing.lock().await
            }
        };
        if let Some(v) = self.fresh(self.max_age) {
            return v;
        }
        let value = match tokio::task::spawn_blocking(read).await {
            Ok(v) => Arc::new(v),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some((Instant::now(), value.clone()));
        }
        drop(guard);
        value
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_client_that_never_finishes_its_head_is_dropped() {
        let (mut client, server) = tokio::io::duplex(4096);
        let service = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                hyper::body::Bytes::from_static(b"ok"),
            )))
        });
        let limit = Duration::from_millis(300);
        let served = tokio::spawn(serve_connection(server, service, "test", limit));
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        // hyper answers 408 and closes: the read ends instead of hanging.
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("the server closed the connection")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the connection ended")
            .unwrap();
        let text = String::from_utf8_lossy(&rest);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn many_readers_take_the_lock_once_per_refresh() {
        let reads = Arc::new(AtomicUsize::new(0));
        let cached = Arc::new(Cached::new(Duration::from_secs(3600)));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (reads, cached) = (reads.clone(), cached.clone());
            tasks.push(tokio::spawn(async move {
                *cached
                    .get(move || {
                        std::thread::sleep(Duration::from_millis(20));
                        reads.fetch_add(1, Ordering::SeqCst)
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 0);
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        let stale = Cached::new(Duration::ZERO);
        assert_eq!(*stale.get(|| 1).await, 1);
        assert_eq!(*stale.get(|| 2).await, 2);
    }
}
