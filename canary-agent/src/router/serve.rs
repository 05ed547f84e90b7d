//! The router's listeners and connections: read the first request head (bounded in
//! size and time), decide, connect to a backend of the chosen version, write the head,
//! and hand both sockets to the kernel's splice (datapath `Splicer`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use canary_common::{
    backend_index, client_hash, flow_hash, Backend, ServiceValue, SplicePeer, SpliceState,
    GROUP_CANARY, MAX_GROUP_BACKENDS, MODE_EXACT, PROTO_TCP, SPLICE_NOT_READY, SPLICE_REQUESTS,
    SPLICE_RESPONSES, STICKY_CLIENT_IP,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::decide::{decide, Head, Split};
use crate::config::ServiceConfig;
use crate::datapath::encode::{encode_addr, encode_port};
use crate::datapath::{service_key, Splicer};
use crate::policy::routing::{Routing, Version};

/// Most headers a request head may have.
const MAX_HEADERS: usize = 100;
/// A backend that does not accept within this time gets the client a 502.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Limits of the head read, per service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// A routed service as the router sees it.
pub struct RoutedService {
    pub id: u32,
    pub cfg: ServiceConfig,
    pub routing: Routing,
    pub limits: HeadLimits,
}

/// Per-version counts the kernel cannot see: connections the router made or failed
/// to make (a 502 is a failed request of that version), and first requests (their
/// head went through the agent, not the verdict program).
#[derive(Debug, Default)]
pub struct VersionCounts {
    pub connections: AtomicU64,
    pub connected: AtomicU64,
    pub requests: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Default)]
pub struct Counts {
    pub versions: [VersionCounts; 2],
    /// (rule label, version) -> decisions.
    pub decisions: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Bytes the agent read from clients (heads, and bytes handed up before the splice).
    pub userspace_bytes: AtomicU64,
    pub bad_requests: AtomicU64,
    pub too_large: AtomicU64,
    pub timeouts: AtomicU64,
    pub open: AtomicU64,
}

pub(super) struct Service {
    pub routed: RoutedService,
    pub counts: Counts,
    exact: Mutex<u32>,
    /// Set by the agent each tick from the rollout state.
    pub rolled_back: AtomicBool,
}

pub(super) struct Shared {
    pub splicer: Mutex<Splicer>,
    pub services: Vec<Service>,
}

fn splicer(shared: &Shared) -> Result<std::sync::MutexGuard<'_, Splicer>> {
    shared
        .splicer
        .lock()
        .map_err(|_| anyhow!("router splicer poisoned"))
}

/// Binds one loopback listener per routed service and registers it for sk_lookup.
pub(super) fn start(maps: Splicer, routed: Vec<RoutedService>) -> Result<Arc<Shared>> {
    let shared = Arc::new(Shared {
        splicer: Mutex::new(maps),
        services: routed
            .into_iter()
            .map(|routed| Service {
                routed,
                counts: Counts::default(),
                exact: Mutex::new(0),
                rolled_back: AtomicBool::new(false),
            })
            .collect(),
    });
    for (i, svc) in shared.services.iter().enumerate() {
        let cfg = &svc.routed.cfg;
        let local: SocketAddr = if cfg.listen.is_ipv4() {
            "127.0.0.1:0".parse()?
        } else {
            "[::1]:0".parse()?
        };
        let std_listener = std::net::TcpListener::bind(local)
            .with_context(|| format!("binding the router listener of {}", cfg.name))?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let slot = svc.routed.id * 2 + cfg.listen.is_ipv6() as u32;
        splicer(&shared)?.set_listener(slot, listener.as_raw_fd())?;
        local_route(cfg.listen.ip())?;
        tracing::info!(service = %cfg.name, listen = %cfg.listen, "routing requests");
        tokio::spawn(accept(shared.clone(), i, listener));
    }
    Ok(shared)
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

async fn accept(shared: Arc<Shared>, i: usize, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let counts = &shared.services[i].counts;
                    counts.open.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = connection(&shared, i, client, peer).await {
                        tracing::debug!(error = %format!("{e:#}"), %peer, "routed connection ended");
                    }
                    counts.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "router accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How reading the first head ended.
enum HeadRead {
    Complete(Vec<u8>),
    Invalid,
    TooLarge,
    Closed,
}

async fn read_head(client: &TcpStream, max: usize) -> Result<HeadRead> {
    let mut buf = vec![0u8; max];
    let mut len = 0;
    loop {
        client.readable().await?;
        match client.try_read(&mut buf[len..]) {
            Ok(0) => return Ok(HeadRead::Closed),
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut headers).parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                buf.truncate(len);
                return Ok(HeadRead::Complete(buf));
            }
            Ok(httparse::Status::Partial) if len == max => return Ok(HeadRead::TooLarge),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Ok(HeadRead::TooLarge),
            Err(_) => return Ok(HeadRead::Invalid),
        }
    }
}

async fn reply(client: &mut TcpStream, status: &str) {
    let text = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = client.write_all(text.as_bytes()).await;
    let _ = client.shutdown().await;
}

fn socket_addr(b: &Backend, v6: bool) -> SocketAddr {
    let port = u16::from_be_bytes(b.port.to_ne_bytes());
    let ip: IpAddr = if v6 {
        let mut o = [0u8; 16];
        for (i, w) in b.addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        o.into()
    } else {
        b.addr[0].to_ne_bytes().into()
    };
    SocketAddr::new(ip, port)
}

/// Reads exactly the bytes queued on the socket now (a body sent with the head).
/// The kernel's verdict path takes whole segments from the receive queue and would
/// deliver a segment the head read consumed only in part a second time; reading all
/// that is queued leaves only whole segments behind.
fn take_queued(sock: &TcpStream, into: &mut Vec<u8>) -> Result<()> {
    let mut queued: libc::c_int = 0;
    // SAFETY: valid fd, FIONREAD writes one int.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut queued) } != 0 {
        return Err(std::io::Error::last_os_error()).context("FIONREAD");
    }
    let mut want = queued.max(0) as usize;
    let mut buf = vec![0u8; want];
    let mut got = 0;
    while want > 0 {
        match sock.try_read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                want -= n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
    into.extend_from_slice(&buf[..got]);
    Ok(())
}

fn cookie(sock: &impl AsRawFd) -> Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_COOKIE");
    }
    Ok(v)
}

/// Makes the kernel run the verdict over bytes queued before the socket joined the
/// map (`tcp_set_rcvlowat` signals data-ready at once), so they are counted as passed.
fn kick(sock: &impl AsRawFd) {
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Which backend of the service a decided connection goes to: the version's group,
/// the backend by the hash bits `bucket` does not use (as the XDP program does).
fn pick(value: &ServiceValue, version: Version, hash: u64) -> Option<(Backend, u8)> {
    let (base, n, group) = match version {
        Version::Canary if value.n_canary > 0 => (MAX_GROUP_BACKENDS, value.n_canary, 1),
        _ if value.n_stable > 0 => (0, value.n_stable, 0),
        _ => return None,
    };
    let slot = base + backend_index(hash, n) as usize;
    Some((value.backends[slot], group))
}

async fn connection(
    shared: &Shared,
    i: usize,
    mut client: TcpStream,
    peer: SocketAddr,
) -> Result<()> {
    let svc = &shared.services[i];
    let counts = &svc.counts;
    let cfg = &svc.routed.cfg;
    let limits = svc.routed.limits;
    let head =
        match tokio::time::timeout(limits.timeout, read_head(&client, limits.max_bytes)).await {
            Err(_) => {
                counts.timeouts.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Ok(r) => r?,
        };
    let mut head = match head {
        HeadRead::Complete(h) => h,
        HeadRead::Invalid => {
            counts.bad_requests.fetch_add(1, Ordering::Relaxed);
            reply(&mut client, "400 Bad Request").await;
            return Ok(());
        }
        HeadRead::TooLarge => {
            counts.too_large.fetch_add(1, Ordering::Relaxed);
            reply(&mut client, "431 Request Header Fields Too Large").await;
            return Ok(());
        }
        HeadRead::Closed => return Ok(()),
    };
    take_queued(&client, &mut head)?;
    counts
        .userspace_bytes
        .fetch_add(head.len() as u64, Ordering::Relaxed);
    let local = client.local_addr()?;
    let value = splicer(shared)?
        .service(&service_key(cfg))
        .ok_or_else(|| anyhow!("service {} is not installed", cfg.name))?;
    let conn_hash = if value.sticky == STICKY_CLIENT_IP {
        client_hash(&encode_addr(peer.ip()))
    } else {
        flow_hash(
            &encode_addr(peer.ip()),
            &encode_addr(local.ip()),
            encode_port(peer.port()),
            encode_port(local.port()),
            PROTO_TCP,
        )
    };
    let mut decision = {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(&head)?;
        let h = Head {
            headers: req.headers,
            client: peer.ip(),
        };
        if value.mode == MODE_EXACT {
            let mut acc = svc.exact.lock().map_err(|_| anyhow!("poisoned"))?;
            decide(
                &svc.routed.routing,
                &h,
                value.weight_bp,
                Split::Exact(&mut acc),
            )
        } else {
            decide(
                &svc.routed.routing,
                &h,
                value.weight_bp,
                Split::Hash(conn_hash),
            )
        }
    };
    if svc.rolled_back.load(Ordering::Relaxed) {
        decision.version = Version::Stable;
    }
    if let Ok(mut d) = counts.decisions.lock() {
        *d.entry((decision.rule.label(), decision.version.as_str()))
            .or_default() += 1;
    }
    let Some((backend, group)) = pick(&value, decision.version, conn_hash) else {
        reply(&mut client, "502 Bad Gateway").await;
        return Ok(());
    };
    let v = &counts.versions[group as usize];
    v.connections.fetch_add(1, Ordering::Relaxed);
    v.requests.fetch_add(1, Ordering::Relaxed);
    let to = socket_addr(&backend, cfg.listen.is_ipv6());
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(to)).await {
        Ok(Ok(s)) => s,
        _ => {
            v.failed.fetch_add(1, Ordering::Relaxed);
            reply(&mut client, "502 Bad Gateway").await;
            return Ok(());
        }
    };
    v.connected.fetch_add(1, Ordering::Relaxed);
    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
    splice(shared, i, client, &mut upstream, head, group).await
}

/// Both sockets into the kernel's splice, then watches them: bytes the kernel handed up
/// (before the splice was ready) are forwarded in order, and a close on one side is
/// passed on to the other. Map entries go when both are closed.
async fn splice(
    shared: &Shared,
    i: usize,
    client: TcpStream,
    upstream: &mut TcpStream,
    head: Vec<u8>,
    group: u8,
) -> Result<()> {
    let svc = &shared.services[i];
    let (c_cookie, b_cookie) = (cookie(&client)?, cookie(upstream)?);
    let peer = |peer, dir, consumed| SplicePeer {
        peer,
        consumed,
        service: svc.routed.id,
        version: group & GROUP_CANARY,
        dir,
        _pad: [0; 2],
    };
    let client_peer = |consumed| peer(b_cookie, SPLICE_REQUESTS, consumed);
    let result = async {
        {
            let mut s = splicer(shared)?;
            s.add(
                c_cookie,
                &client,
                client_peer(SPLICE_NOT_READY),
                Some(SpliceState {
                    passed: 0,
                    request_ns: monotonic_ns(),
                }),
            )?;
            s.add(
                b_cookie,
                upstream,
                peer(c_cookie, SPLICE_RESPONSES, 0),
                None,
            )?;
        }
        kick(&client);
        upstream.write_all(&head).await?;
        watch(shared, i, &client, upstream, c_cookie, client_peer).await
    }
    .await;
    let mut s = splicer(shared)?;
    s.remove(c_cookie);
    s.remove(b_cookie);
    result
}

async fn watch(
    shared: &Shared,
    i: usize,
    client: &TcpStream,
    upstream: &mut TcpStream,
    c_cookie: u64,
    client_peer: impl Fn(u64) -> SplicePeer,
) -> Result<()> {
    let counts = &shared.services[i].counts;
    let mut consumed = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    // Forward what was handed up so far, then let the kernel take over.
    loop {
        match client.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                upstream.write_all(&buf[..n]).await?;
                consumed += n as u64;
                counts
                    .userspace_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    splicer(shared)?.set_peer(c_cookie, client_peer(consumed))?;
    let (mut client_open, mut upstream_open) = (true, true);
    while client_open || upstream_open {
        tokio::select! {
            r = client.readable(), if client_open => {
                r?;
                match client.try_read(&mut buf) {
                    Ok(0) => {
                        client_open = false;
                        let _ = upstream.shutdown().await;
                    }
                    Ok(n) => {
                        upstream.write_all(&buf[..n]).await?;
                        consumed += n as u64;
                        counts.userspace_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        splicer(shared)?.set_peer(c_cookie, client_peer(consumed))?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
            r = upstream.readable(), if upstream_open => {
                r?;
                match upstream.try_read(&mut buf) {
                    Ok(0) => {
                        upstream_open = false;
                        // SAFETY: valid fd; half-close the client's side.
                        unsafe { libc::shutdown(client.as_raw_fd(), libc::SHUT_WR) };
                    }
                    // Responses are only handed up if the client's socket is gone.
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}
