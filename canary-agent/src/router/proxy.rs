//! The proxy's listeners and client connections. sk_lookup hands a new connection of
//! an `http` service to the service's loopback listener (nothing binds the service
//! address); the first bytes tell HTTP/2 prior knowledge (the client preface) from
//! HTTP/1.x; hyper then serves the connection and every request on it is decided and
//! forwarded on its own (`forward`). Connections are capped per service and per client
//! address; a client has `head_timeout` to send its first bytes and each later head.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::forward::{self, ConnCtx};
use super::handover::{self, ClientFd, ListenerFd, Record};
use super::splice::{cookie, Spliced};
use super::state::{Admitted, HeadLimits, RoutedService, Service, Shared};
use crate::datapath::Splicer;

/// Accept queue of a proxy listener (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;
/// Most headers a request head may have.
const MAX_HEADERS: usize = 100;
/// What a connection may buffer in each direction besides its head (hyper's read and
/// write buffers): bodies stream through in pieces of at most this size.
const CONN_BUFFER: usize = 64 * 1024;
/// HTTP/2: streams at once per connection, and the flow-control windows that bound
/// what a stream and a connection may have in flight towards the proxy.
const H2_STREAMS: u32 = 256;
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONN_WINDOW: u32 = 1024 * 1024;
/// The client preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Binds one loopback listener per routed service (or takes the one a previous agent
/// handed over) and registers it for sk_lookup; adopts handed-over connections.
pub(super) fn start(
    maps: Splicer,
    routed: Vec<RoutedService>,
    inherited: Option<Record>,
) -> Result<Arc<Shared>> {
    let services = routed
        .into_iter()
        .map(|routed| Service::new(routed).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    let shared = Arc::new(Shared::new(maps, services));
    let mut inherited = inherited.unwrap_or_default();
    let find = |name: &str| shared.services.iter().find(|s| s.cfg.name == name).cloned();
    // Spliced (upgraded) pairs of services still routed are watched again; their map
    // entries are where the previous agent left them. Every other entry is stale.
    let mut live = HashSet::new();
    for pair in std::mem::take(&mut inherited.spliced) {
        let (client, backend) = (handover::own(pair.client), handover::own(pair.backend));
        let Some(svc) = find(&pair.service) else {
            continue;
        };
        let client = std::net::TcpStream::from(client);
        let backend = std::net::TcpStream::from(backend);
        let (c_cookie, b_cookie) = (cookie(&client)?, cookie(&backend)?);
        live.extend([c_cookie, b_cookie]);
        let client = TcpStream::from_std(client)?;
        let backend = TcpStream::from_std(backend)?;
        let s = shared.clone();
        shared.spawn(async move {
            svc.counts.open.fetch_add(1, Ordering::Relaxed);
            let spliced = Spliced {
                client,
                backend,
                c_cookie,
                b_cookie,
                c_base: pair.client_base,
                b_base: pair.backend_base,
            };
            spliced.run(&s, &svc).await;
            svc.counts.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let purged = shared.splicer_mut()?.purge(&live);
    tracing::info!(
        adopted = live.len() / 2,
        purged,
        "spliced connections from the previous agent"
    );
    for svc in &shared.services {
        let cfg = &svc.cfg;
        let kept = inherited
            .listeners
            .iter()
            .position(|l| l.service == cfg.name)
            .map(|at| inherited.listeners.swap_remove(at));
        let listener = match kept {
            Some(l) => {
                let listener = std::net::TcpListener::from(handover::own(l.fd));
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)?
            }
            None => bind_listener(cfg.listen.is_ipv6())
                .with_context(|| format!("binding the router listener of {}", cfg.name))?,
        };
        let slot = svc.id * 2 + cfg.listen.is_ipv6() as u32;
        shared
            .splicer_mut()?
            .set_listener(slot, listener.as_raw_fd())?;
        local_route(cfg.listen.ip())?;
        tracing::info!(service = %cfg.name, listen = %cfg.listen, "routing requests");
        let s = shared.clone();
        shared.spawn(accept(s, svc.clone(), listener));
    }
    for l in inherited.listeners {
        drop(handover::own(l.fd));
    }
    let mut adopted = 0;
    for c in inherited.pending {
        let client = handover::own(c.fd);
        let Some(svc) = find(&c.service) else {
            continue;
        };
        let client = TcpStream::from_std(std::net::TcpStream::from(client))?;
        // A client that left during the hand-over is simply closed.
        let Ok(peer) = client.peer_addr() else {
            continue;
        };
        let Some(admitted) = svc.admit(peer.ip()) else {
            continue;
        };
        adopted += 1;
        let s = shared.clone();
        shared.spawn(serve(s, svc, admitted, client, peer, c.buffered));
    }
    tracing::info!(adopted, "idle connections from the previous agent");
    Ok(shared)
}

/// A loopback listener with a deep accept queue: a burst of new connections waits
/// for the proxy instead of having its SYNs dropped.
fn bind_listener(v6: bool) -> Result<TcpListener> {
    let (socket, local) = if v6 {
        (TcpSocket::new_v6()?, "[::1]:0".parse()?)
    } else {
        (TcpSocket::new_v4()?, "127.0.0.1:0".parse()?)
    };
    socket.bind(local)?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

/// Stops accepting, lets every connection finish its requests in flight and collects
/// what the next agent image takes over (`hand_over`) or closes it (a stop); waits at
/// most `patience` for the connections to end.
pub(super) async fn stop(shared: &Shared, hand_over: bool, patience: Duration) -> Result<Record> {
    shared.begin_stop(hand_over);
    let deadline = tokio::time::Instant::now() + patience;
    while shared.tasks_left() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = shared.tasks_left();
    if left > 0 {
        tracing::warn!(tasks = left, "routed connections not finished in time");
    }
    shared.take_record()
}

/// The service address must be local for the kernel to look up a socket for it
/// (sk_lookup runs in that lookup); a `local` route does that without binding it.
fn local_route(ip: IpAddr) -> Result<()> {
    let (flag, prefix) = if ip.is_ipv4() {
        ("-4", 32)
    } else {
        ("-6", 128)
    };
    let out = std::process::Command::new("ip")
        .args([flag, "route", "replace", "local"])
        .arg(format!("{ip}/{prefix}"))
        .args(["dev", "lo", "table", "local"])
        .output()
        .context("running ip route")?;
    if !out.status.success() {
        return Err(anyhow!(
            "ip route replace local {ip}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Accepts until a stop; an accept error (EMFILE, ENOBUFS) pauses it, never ends it.
async fn accept(shared: Arc<Shared>, svc: Arc<Service>, listener: TcpListener) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => match svc.admit(peer.ip()) {
                    Some(admitted) => {
                        shared.spawn(serve(shared.clone(), svc.clone(), admitted, client, peer, Vec::new()))
                    }
                    None => {
                        svc.counts.refused.fetch_add(1, Ordering::Relaxed);
                        drop(client);
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "router accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shared.stopping() => break,
        }
    }
    if shared.handing_over() {
        let service = svc.cfg.name.clone();
        shared.hand(|r| {
            let fd = handover::keep(listener.into_std()?)?;
            r.listeners.push(ListenerFd { service, fd });
            Ok(())
        });
    }
}

/// The client's socket with the bytes a previous agent image had already read from it
/// (a hand-over between two requests) in front.
pub(super) struct Prefixed {
    pub prefix: Vec<u8>,
    pub at: usize,
    pub stream: TcpStream,
}

impl Prefixed {
    fn left(&self) -> &[u8] {
        &self.prefix[self.at..]
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = self.left().len().min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Which protocol a new connection speaks, from its first bytes.
enum Detected {
    Http1,
    Http2,
    Closed,
}

/// Copies what is queued on the socket, up to `buf.len()` bytes, without consuming it.
fn peek(sock: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: valid fd and buffer of the length given.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Peeks until the first bytes either are the HTTP/2 preface or cannot be. Nothing is
/// allocated until the client sends: an idle client holds a socket and a small task.
async fn detect(client: &TcpStream) -> std::io::Result<Detected> {
    let mut buf = [0u8; 24];
    let mut seen = 0;
    loop {
        let ready = client.ready(Interest::READABLE).await?;
        let got = client.try_io(Interest::READABLE, || {
            let n = peek(client, &mut buf)?;
            // The same bytes again: wait for more instead of peeking them again.
            if n == seen && n > 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match got {
            Ok(0) => return Ok(Detected::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    return Ok(Detected::Http1);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        seen = n;
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Detected::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Detected::Http2);
        }
    }
}

/// Serves one client connection until it closes, is stopped, or is upgraded.
async fn serve(
    shared: Arc<Shared>,
    svc: Arc<Service>,
    admitted: Admitted,
    client: TcpStream,
    peer: SocketAddr,
    buffered: Vec<u8>,
) {
    if let Err(e) = connection(&shared, &svc, client, peer, buffered).await {
        tracing::debug!(error = %format!("{e:#}"), %peer, "routed connection ended");
    }
    drop(admitted);
}

fn keep_pending(shared: &Shared, svc: &Service, stream: TcpStream, buffered: Vec<u8>) {
    let service = svc.cfg.name.clone();
    shared.hand(|r| {
        let fd = handover::keep(stream.into_std()?)?;
        r.pending.push(ClientFd {
            service,
            fd,
            buffered,
        });
        Ok(())
    });
}

async fn connection(
    shared: &Arc<Shared>,
    svc: &Arc<Service>,
    client: TcpStream,
    peer: SocketAddr,
    buffered: Vec<u8>,
) -> Result<()> {
    let (_, limits) = svc.rules();
    let detected = if buffered.is_empty() {
        let detected = tokio::select! {
            d = tokio::time::timeout(limits.timeout, detect(&client)) => d,
            _ = shared.stopping() => {
                if shared.handing_over() {
                    keep_pending(shared, svc, client, buffered);
                }
                return Ok(());
            }
        };
        match detected {
            Err(_) => {
                svc.counts.timeouts.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Ok(d) => d?,
        }
    } else {
        Detected::Http1
    };
    let _ = client.set_nodelay(true);
    let ctx = Arc::new(ConnCtx::new(shared.clone(), svc.clone(), peer));
    match detected {
        Detected::Closed => Ok(()),
        Detected::Http1 => {
            let io = Prefixed {
                prefix: buffered,
                at: 0,
                stream: client,
            };
            // Boxed, here and for h2: a task is as large as its largest state, so an
            // idle client that has sent nothing yet holds only the detection's.
            Box::pin(http1(shared, svc, ctx, io, limits)).await
        }
        Detected::Http2 => Box::pin(http2(shared, svc, ctx, client, limits)).await,
    }
}

/// HTTP/1.x: hyper serves requests until the connection ends. An upgrade (101) ends
/// hyper's part and the two sockets go to the kernel's splice; a hand-over takes an
/// idle connection (between requests) to the next image with what was read of it.
async fn http1(
    shared: &Arc<Shared>,
    svc: &Arc<Service>,
    ctx: Arc<ConnCtx>,
    io: Prefixed,
    limits: HeadLimits,
) -> Result<()> {
    let handler = ctx.clone();
    let service = hyper::service::service_fn(move |req| forward::handle(handler.clone(), req));
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(limits.max_bytes)
        .max_buf_size(CONN_BUFFER.max(limits.max_bytes))
        .serve_connection(TokioIo::new(io), service);
    let stop = shared.stopping();
    tokio::pin!(stop);
    let mut stopped = None;
    let ended = std::future::poll_fn(|cx| {
        if stopped.is_none() && stop.as_mut().poll(cx).is_ready() {
            // Busy: the response in flight says `Connection: close`, then it closes.
            stopped = Some(ctx.busy.load(Ordering::SeqCst) > 0);
            Pin::new(&mut conn).graceful_shutdown();
        }
        conn.poll_without_shutdown(cx)
    })
    .await;
    let parts = conn.into_parts();
    let mut io = parts.io.into_inner();
    if let Err(e) = &ended {
        let counts = &svc.counts;
        if e.is_parse_too_large() {
            counts.too_large.fetch_add(1, Ordering::Relaxed);
        } else if e.is_parse() {
            counts.bad_requests.fetch_add(1, Ordering::Relaxed);
        } else if e.is_timeout() {
            counts.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        // hyper has answered 400 or 431 where it could: what the client sent is read
        // and dropped first, as closing on unread bytes resets the connection and
        // could destroy the answer before the client reads it.
        if e.is_parse() {
            let _ = io.stream.shutdown().await;
            let mut sink = vec![0u8; 16 * 1024];
            let drain = async {
                use tokio::io::AsyncReadExt;
                while let Ok(n) = io.stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        }
        return Ok(());
    }
    if let Some(up) = ctx.take_upgrade() {
        let mut leftover = io.left().to_vec();
        leftover.extend_from_slice(&parts.read_buf);
        return forward::splice_upgrade(shared, svc, io.stream, leftover, up).await;
    }
    if stopped == Some(false) && shared.handing_over() {
        let mut buffered = io.left().to_vec();
        buffered.extend_from_slice(&parts.read_buf);
        keep_pending(shared, svc, io.stream, buffered);
        return Ok(());
    }
    let _ = io.stream.shutdown().await;
    Ok(())
}

/// HTTP/2 with prior knowledge: hyper serves the streams; a stop sends GOAWAY and the
/// streams in flight finish. A protocol error closes this connection (GOAWAY) only.
async fn http2(
    shared: &Arc<Shared>,
    svc: &Arc<Service>,
    ctx: Arc<ConnCtx>,
    client: TcpStream,
    limits: HeadLimits,
) -> Result<()> {
    let handler = ctx.clone();
    let service = hyper::service::service_fn(move |req| forward::handle(handler.clone(), req));
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_header_list_size(limits.max_bytes as u32)
        .max_send_buf_size(CONN_BUFFER)
        .serve_connection(TokioIo::new(client), service);
    tokio::pin!(conn);
    let stop = shared.stopping();
    tokio::pin!(stop);
    let mut stopped = false;
    let ended = std::future::poll_fn(|cx| {
        if !stopped && stop.as_mut().poll(cx).is_ready() {
            stopped = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await;
    if let Err(e) = ended {
        if e.is_parse() || e.to_string().contains("protocol") {
            svc.counts.bad_requests.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(error = %e, "h2 connection ended");
    }
    Ok(())
}
