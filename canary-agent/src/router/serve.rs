//! The router's listeners and connections: peek at the first request head (bounded in
//! size and time), decide, connect to a backend of the chosen version, and hand both
//! sockets to the kernel's splice (datapath `Splicer`), which carries every byte from
//! the first: the head is only peeked at (`MSG_PEEK`), never consumed here, so the
//! kernel moves the whole stream in order and there is no userspace-to-kernel hand-off.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use canary_common::{
    backend_index, client_hash, flow_hash, Backend, ServiceValue, SplicePeer, GROUP_CANARY,
    MAX_BACKENDS, MAX_GROUP_BACKENDS, MODE_EXACT, PROTO_TCP, SPLICE_REQUESTS, SPLICE_RESPONSES,
    STICKY_CLIENT_IP,
};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::decide::{decide, Head, Split};
use super::handover::{self, ClientFd, ListenerFd, PairFd, Record};
use crate::config::ServiceConfig;
use crate::datapath::encode::{encode_addr, encode_port};
use crate::datapath::{service_key, Splicer};
use crate::policy::routing::{Routing, Version};

/// Most headers a request head may have.
const MAX_HEADERS: usize = 100;
/// How long a close waits for spliced bytes that make no progress towards the peer.
const DRAIN_STALL: Duration = Duration::from_secs(5);
/// Accept queue of a router listener (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;
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
/// to make. A 502 (backend refused or timed out) is a request the kernel never saw:
/// counted here as a failed request of that version.
#[derive(Debug, Default)]
pub struct VersionCounts {
    pub connections: AtomicU64,
    pub connected: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Default)]
pub struct Counts {
    pub versions: [VersionCounts; 2],
    /// Connections the router opened to each backend slot (as the kernel's per-backend
    /// stats count the split's).
    pub backends: [AtomicU64; MAX_BACKENDS],
    /// (rule label, version) -> decisions.
    pub decisions: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Bytes the agent copied from clients to decide: the peeked heads (the kernel
    /// carries them too, with everything after).
    pub userspace_bytes: AtomicU64,
    pub bad_requests: AtomicU64,
    pub too_large: AtomicU64,
    pub timeouts: AtomicU64,
    pub open: AtomicU64,
}

pub(super) struct Service {
    pub id: u32,
    pub cfg: ServiceConfig,
    /// The rules and head limits in force (a reload replaces them).
    rules: std::sync::RwLock<(Arc<Routing>, HeadLimits)>,
    pub counts: Counts,
    exact: Mutex<u32>,
    /// Set by the agent each tick from the rollout state.
    pub rolled_back: AtomicBool,
}

pub(super) struct Shared {
    pub splicer: Mutex<Splicer>,
    pub services: Vec<Service>,
    /// Raised by a hand-over: every task gives its sockets to `handed` and stops.
    handover: tokio::sync::watch::Sender<bool>,
    handed: Mutex<Record>,
    /// Tasks (accept loops and connections) that have not yet stopped or handed over.
    tasks: AtomicU64,
}

impl Service {
    fn rules(&self) -> (Arc<Routing>, HeadLimits) {
        let rules = self.rules.read().unwrap_or_else(|e| e.into_inner());
        (rules.0.clone(), rules.1)
    }

    /// New rules and limits for connections placed from now on.
    pub fn set_rules(&self, routing: Routing, limits: HeadLimits) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(routing), limits);
    }
}

fn splicer(shared: &Shared) -> Result<std::sync::MutexGuard<'_, Splicer>> {
    shared
        .splicer
        .lock()
        .map_err(|_| anyhow!("router splicer poisoned"))
}

impl Shared {
    fn name(&self, i: usize) -> String {
        self.services[i].cfg.name.clone()
    }

    /// Runs a task counted in `tasks` (so a hand-over knows when all have reported).
    fn spawn(self: &Arc<Self>, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.fetch_add(1, Ordering::SeqCst);
        let shared = self.clone();
        tokio::spawn(async move {
            task.await;
            shared.tasks.fetch_sub(1, Ordering::SeqCst);
        });
    }

    fn hand(&self, f: impl FnOnce(&mut Record) -> Result<()>) {
        let kept = self
            .handed
            .lock()
            .map_err(|_| anyhow!("hand-over record poisoned"))
            .and_then(|mut r| f(&mut r));
        if let Err(e) = kept {
            tracing::warn!(error = %format!("{e:#}"), "a routed socket could not be kept for the next agent");
        }
    }

    async fn stopping(&self) {
        let mut rx = self.handover.subscribe();
        let _ = rx.wait_for(|h| *h).await;
    }
}

/// Binds one loopback listener per routed service (or takes the one a previous agent
/// handed over) and registers it for sk_lookup; adopts handed-over connections.
pub(super) fn start(
    maps: Splicer,
    routed: Vec<RoutedService>,
    inherited: Option<Record>,
) -> Result<Arc<Shared>> {
    let shared = Arc::new(Shared {
        splicer: Mutex::new(maps),
        services: routed
            .into_iter()
            .map(|routed| Service {
                id: routed.id,
                cfg: routed.cfg,
                rules: std::sync::RwLock::new((Arc::new(routed.routing), routed.limits)),
                counts: Counts::default(),
                exact: Mutex::new(0),
                rolled_back: AtomicBool::new(false),
            })
            .collect(),
        handover: tokio::sync::watch::Sender::new(false),
        handed: Mutex::new(Record::default()),
        tasks: AtomicU64::new(0),
    });
    let mut inherited = inherited.unwrap_or_default();
    let index = |name: &str| shared.services.iter().position(|s| s.cfg.name == name);
    // Spliced pairs of services still routed are watched again; their map entries are
    // where the previous agent left them. Every other per-socket entry is stale.
    let mut live = HashSet::new();
    for pair in std::mem::take(&mut inherited.spliced) {
        let (client, backend) = (handover::own(pair.client), handover::own(pair.backend));
        let Some(i) = index(&pair.service) else {
            continue;
        };
        let client = std::net::TcpStream::from(client);
        let backend = std::net::TcpStream::from(backend);
        let (c_cookie, b_cookie) = (cookie(&client)?, cookie(&backend)?);
        live.extend([c_cookie, b_cookie]);
        let client = TcpStream::from_std(client)?;
        let backend = TcpStream::from_std(backend)?;
        shared.services[i]
            .counts
            .open
            .fetch_add(1, Ordering::Relaxed);
        let s = shared.clone();
        shared.spawn(async move {
            let spliced = Spliced {
                client,
                backend,
                c_cookie,
                b_cookie,
                c_base: pair.client_base,
                b_base: pair.backend_base,
            };
            spliced.run(&s, i).await;
            s.services[i].counts.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let purged = splicer(&shared)?.purge(&live);
    tracing::info!(
        adopted = live.len() / 2,
        purged,
        "spliced connections from the previous agent"
    );
    for (i, svc) in shared.services.iter().enumerate() {
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
        splicer(&shared)?.set_listener(slot, listener.as_raw_fd())?;
        local_route(cfg.listen.ip())?;
        tracing::info!(service = %cfg.name, listen = %cfg.listen, "routing requests");
        let s = shared.clone();
        shared.spawn(accept(s, i, listener));
    }
    for l in inherited.listeners {
        drop(handover::own(l.fd));
    }
    for c in inherited.pending {
        let client = handover::own(c.fd);
        let Some(i) = index(&c.service) else {
            continue;
        };
        let client = TcpStream::from_std(std::net::TcpStream::from(client))?;
        // A client that left during the hand-over is simply closed.
        let Ok(peer) = client.peer_addr() else {
            continue;
        };
        let s = shared.clone();
        shared.spawn(serve(s, i, client, peer));
    }
    Ok(shared)
}

/// A loopback listener with a deep accept queue: a burst of new connections waits
/// for the router instead of having its SYNs dropped.
fn bind_listener(v6: bool) -> Result<TcpListener> {
    let (socket, local) = if v6 {
        (TcpSocket::new_v6()?, "[::1]:0".parse()?)
    } else {
        (TcpSocket::new_v4()?, "127.0.0.1:0".parse()?)
    };
    socket.bind(local)?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

/// Stops every task and collects the sockets the next agent image takes over; the
/// tasks that have not reported within `patience` lose their connections.
pub(super) async fn hand_over(shared: &Shared, patience: Duration) -> Result<Record> {
    shared.handover.send_replace(true);
    let deadline = tokio::time::Instant::now() + patience;
    while shared.tasks.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = shared.tasks.load(Ordering::SeqCst);
    if left > 0 {
        tracing::warn!(tasks = left, "routed connections not handed over in time");
    }
    let record = std::mem::take(
        &mut *shared
            .handed
            .lock()
            .map_err(|_| anyhow!("hand-over record poisoned"))?,
    );
    Ok(record)
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
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => shared.spawn(serve(shared.clone(), i, client, peer)),
                Err(e) => {
                    tracing::warn!(error = %e, "router accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shared.stopping() => break,
        }
    }
    let service = shared.name(i);
    shared.hand(|r| {
        let fd = handover::keep(listener.into_std()?)?;
        r.listeners.push(ListenerFd { service, fd });
        Ok(())
    });
}

async fn serve(shared: Arc<Shared>, i: usize, client: TcpStream, peer: SocketAddr) {
    let counts = &shared.services[i].counts;
    counts.open.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = connection(&shared, i, client, peer).await {
        tracing::debug!(error = %format!("{e:#}"), %peer, "routed connection ended");
    }
    counts.open.fetch_sub(1, Ordering::Relaxed);
}

/// How reading the first head ended.
enum HeadRead {
    Complete(Vec<u8>),
    Invalid,
    TooLarge,
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

/// Peeks until the queued bytes hold a complete request head (or prove it is none).
/// A peek that brings nothing new counts as "would block", so the task sleeps until
/// more bytes arrive instead of peeking the same ones again.
async fn peek_head(client: &TcpStream, max: usize) -> Result<HeadRead> {
    // The buffer waits for the first bytes: an idle client holds a socket, not 16 KiB.
    client.readable().await?;
    let mut buf = vec![0u8; max];
    let mut seen = 0;
    loop {
        let ready = client.ready(Interest::READABLE).await?;
        let got = client.try_io(Interest::READABLE, || {
            let n = peek(client, &mut buf)?;
            if n == seen && n > 0 && n < max {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match got {
            Ok(0) => return Ok(HeadRead::Closed),
            Ok(n) => n,
            // Nothing new: a peer that has closed will send nothing more.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    return Ok(HeadRead::Closed);
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        seen = n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut headers).parse(&buf[..n]) {
            Ok(httparse::Status::Complete(_)) => {
                buf.truncate(n);
                return Ok(HeadRead::Complete(buf));
            }
            Ok(httparse::Status::Partial) if n == max => return Ok(HeadRead::TooLarge),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Ok(HeadRead::TooLarge),
            Err(_) => return Ok(HeadRead::Invalid),
        }
    }
}

/// Answers and closes a connection that will not be spliced. What the client sent is
/// read and dropped first: closing with unread bytes would reset the connection and
/// could destroy the answer before the client reads it.
async fn reply(client: &mut TcpStream, status: &str) {
    let mut sink = vec![0u8; 64 * 1024];
    while let Ok(n) = client.try_read(&mut sink) {
        if n == 0 {
            break;
        }
    }
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

/// Makes the kernel run the verdict over the bytes queued before the socket joined the
/// splice (the head): `tcp_set_rcvlowat` signals data-ready at once.
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

/// Which backend of the service a decided connection goes to: the version's group,
/// the backend by the hash bits `bucket` does not use (as the XDP program does).
/// Returns the backend, its group and its slot.
fn pick(value: &ServiceValue, version: Version, hash: u64) -> Option<(Backend, u8, usize)> {
    let (base, n, group) = match version {
        Version::Canary if value.n_canary > 0 => (MAX_GROUP_BACKENDS, value.n_canary, 1),
        _ if value.n_stable > 0 => (0, value.n_stable, 0),
        _ => return None,
    };
    let slot = base + backend_index(hash, n) as usize;
    Some((value.backends[slot], group, slot))
}

/// Where placing a new connection ended.
enum Placed {
    Backend(TcpStream, u8),
    Reply(&'static str),
    Close,
}

async fn connection(
    shared: &Shared,
    i: usize,
    mut client: TcpStream,
    peer: SocketAddr,
) -> Result<()> {
    let placed = tokio::select! {
        placed = place(shared, i, &client, peer) => placed?,
        _ = shared.stopping() => {
            let service = shared.name(i);
            shared.hand(|r| {
                let fd = handover::keep(client.into_std()?)?;
                r.pending.push(ClientFd { service, fd });
                Ok(())
            });
            return Ok(());
        }
    };
    match placed {
        Placed::Backend(upstream, group) => {
            let spliced = Spliced::add(shared, i, client, upstream, group)?;
            spliced.run(shared, i).await;
        }
        Placed::Reply(status) => reply(&mut client, status).await,
        Placed::Close => {}
    }
    Ok(())
}

/// Peeks at the head, decides and connects to a backend of the chosen version.
async fn place(shared: &Shared, i: usize, client: &TcpStream, peer: SocketAddr) -> Result<Placed> {
    let svc = &shared.services[i];
    let counts = &svc.counts;
    let cfg = &svc.cfg;
    let (routing, limits) = svc.rules();
    let head = match tokio::time::timeout(limits.timeout, peek_head(client, limits.max_bytes)).await
    {
        Err(_) => {
            counts.timeouts.fetch_add(1, Ordering::Relaxed);
            return Ok(Placed::Close);
        }
        Ok(r) => r?,
    };
    let head = match head {
        HeadRead::Complete(h) => h,
        HeadRead::Invalid => {
            counts.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(Placed::Reply("400 Bad Request"));
        }
        HeadRead::TooLarge => {
            counts.too_large.fetch_add(1, Ordering::Relaxed);
            return Ok(Placed::Reply("431 Request Header Fields Too Large"));
        }
        HeadRead::Closed => return Ok(Placed::Close),
    };
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
            decide(&routing, &h, value.weight_bp, Split::Exact(&mut acc))
        } else {
            decide(&routing, &h, value.weight_bp, Split::Hash(conn_hash))
        }
    };
    if svc.rolled_back.load(Ordering::Relaxed) {
        decision.version = Version::Stable;
    }
    if let Ok(mut d) = counts.decisions.lock() {
        *d.entry((decision.rule.label(), decision.version.as_str()))
            .or_default() += 1;
    }
    let Some((backend, group, slot)) = pick(&value, decision.version, conn_hash) else {
        return Ok(Placed::Reply("502 Bad Gateway"));
    };
    let v = &counts.versions[group as usize];
    v.connections.fetch_add(1, Ordering::Relaxed);
    counts.backends[slot].fetch_add(1, Ordering::Relaxed);
    let to = socket_addr(&backend, cfg.listen.is_ipv6());
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(to)).await {
        Ok(Ok(upstream)) => {
            v.connected.fetch_add(1, Ordering::Relaxed);
            Ok(Placed::Backend(upstream, group))
        }
        _ => {
            v.failed.fetch_add(1, Ordering::Relaxed);
            Ok(Placed::Reply("502 Bad Gateway"))
        }
    }
}

/// A client and its backend joined in the kernel's splice.
struct Spliced {
    client: TcpStream,
    backend: TcpStream,
    c_cookie: u64,
    b_cookie: u64,
    /// What each socket had written when it joined the splice (the backend's SYN).
    c_base: u64,
    b_base: u64,
}

/// Bytes a TCP socket has written: acknowledged plus still queued.
fn written(sock: &impl AsRawFd) -> Result<u64> {
    // SAFETY: getsockopt into a zeroed tcp_info of the size given.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("TCP_INFO");
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: valid fd, SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCOUTQ");
    }
    Ok(info.tcpi_bytes_acked + queued.max(0) as u64)
}

impl Spliced {
    /// Both sockets into the splice, each with its peer written first, the backend's
    /// before the client's, so the verdict has a target for every byte; then the
    /// client's queued head is run through the verdict.
    fn add(
        shared: &Shared,
        i: usize,
        client: TcpStream,
        backend: TcpStream,
        group: u8,
    ) -> Result<Self> {
        let _ = (client.set_nodelay(true), backend.set_nodelay(true));
        let id = shared.services[i].id;
        let (c_cookie, b_cookie) = (cookie(&client)?, cookie(&backend)?);
        let peer = |peer, dir| SplicePeer {
            peer,
            service: id,
            version: group & GROUP_CANARY,
            dir,
            _pad: [0; 2],
        };
        let spliced = Self {
            c_base: written(&client)?,
            b_base: written(&backend)?,
            client,
            backend,
            c_cookie,
            b_cookie,
        };
        let mut s = splicer(shared)?;
        let added = s
            .add(b_cookie, &spliced.backend, peer(c_cookie, SPLICE_RESPONSES))
            .and_then(|()| s.add(c_cookie, &spliced.client, peer(b_cookie, SPLICE_REQUESTS)));
        if let Err(e) = added {
            s.remove(c_cookie);
            s.remove(b_cookie);
            return Err(e);
        }
        drop(s);
        kick(&spliced.client);
        Ok(spliced)
    }

    /// Watches the pair until both sides are closed (then the map entries go) or a
    /// hand-over takes it (then they stay for the next agent).
    async fn run(mut self, shared: &Shared, i: usize) {
        let ended = tokio::select! {
            r = self.watch(shared, i) => Some(r),
            _ = shared.stopping() => None,
        };
        match ended {
            Some(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %format!("{e:#}"), "spliced connection ended");
                }
                if let Ok(mut s) = splicer(shared) {
                    s.remove(self.c_cookie);
                    s.remove(self.b_cookie);
                }
            }
            None => {
                let service = shared.name(i);
                shared.hand(|r| {
                    let client = handover::keep(self.client.into_std()?)?;
                    let backend = handover::keep(self.backend.into_std()?)?;
                    r.spliced.push(PairFd {
                        service,
                        client,
                        backend,
                        client_base: self.c_base,
                        backend_base: self.b_base,
                    });
                    Ok(())
                });
            }
        }
    }
}

impl Spliced {
    /// Passes a close on one side to the other, once the peer has sent every byte the
    /// kernel carried to it. A byte the verdict handed up (its peer's entry was gone)
    /// is forwarded here so none is lost.
    async fn watch(&mut self, shared: &Shared, i: usize) -> Result<()> {
        let counts = &shared.services[i].counts;
        let mut buf = vec![0u8; 16 * 1024];
        let (mut client_open, mut backend_open) = (true, true);
        while client_open || backend_open {
            tokio::select! {
                r = self.client.readable(), if client_open => {
                    r?;
                    match self.client.try_read(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Ok(n) if n > 0 => {
                            self.backend.write_all(&buf[..n]).await?;
                            counts.userspace_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        // End of stream, or a reset (which ends the side the same way:
                        // what was already carried the other way still goes out first).
                        ended => {
                            if let Err(e) = ended {
                                tracing::debug!(error = %e, "client side of a spliced connection");
                            }
                            client_open = false;
                            self.drained(shared, self.c_cookie, &self.backend, self.b_base).await;
                            let _ = self.backend.shutdown().await;
                        }
                    }
                }
                r = self.backend.readable(), if backend_open => {
                    r?;
                    match self.backend.try_read(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // Responses are only handed up if the client's socket is gone.
                        Ok(n) if n > 0 => {}
                        ended => {
                            if let Err(e) = ended {
                                tracing::debug!(error = %e, "backend side of a spliced connection");
                            }
                            backend_open = false;
                            self.drained(shared, self.b_cookie, &self.client, self.c_base).await;
                            // SAFETY: valid fd; half-close the client's side.
                            unsafe { libc::shutdown(self.client.as_raw_fd(), libc::SHUT_WR) };
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits until `to` has written every byte the kernel carried to it from `from`
    /// (a kernel worker sends redirected bytes a moment after the verdict), giving up
    /// after [`DRAIN_STALL`] without progress.
    async fn drained(&self, shared: &Shared, from: u64, to: &TcpStream, base: u64) {
        let mut last = (0, tokio::time::Instant::now());
        loop {
            let carried = splicer(shared).map_or(0, |s| s.carried(from));
            let Ok(sent) = written(to).map(|w| w.saturating_sub(base)) else {
                return;
            };
            if sent >= carried {
                return;
            }
            if sent != last.0 {
                last = (sent, tokio::time::Instant::now());
            } else if last.1.elapsed() > DRAIN_STALL {
                tracing::debug!(carried, sent, "spliced bytes not sent before a close");
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
