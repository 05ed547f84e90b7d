//! Drain: closes one version's connections at a request boundary, so keep-alive
//! clients reconnect (and land on the other version) without an in-flight request
//! failing: a rolled-back service's canary, or a finishing release's old stable
//! ([`DrainGroup`]). Once a retirement times out, the rest are reset ([`DrainMode::Now`]).
//!
//! The node is an L4 NAT router with no socket of its own for these connections, so it
//! closes them the way a server closes an idle keep-alive connection, by emitting TCP
//! segments with exact sequence numbers. The kernel programs keep each direction's
//! sequence state in the flow entries (`FlowValue::tcp`: the sender's next sequence
//! number and last ack). A canary flow is closed at a request boundary:
//!
//! * no request is pending (the reply entry's `ts_ns` is 0: no request seen without
//!   the start of its response), the backend has acked everything the client sent,
//!   and the client has acked everything the backend sent,
//! * and that state has not changed for at least [`DRAIN_QUIET`] (across scans).
//!
//! A keep-alive connection that carries a request every few tens of milliseconds is
//! never quiet for 100 ms, and its client rarely shows a full ack: an HTTP client's
//! ACK of a response usually rides on its next request (delayed ACK). Such a
//! connection is *busy* once it has been draining for [`DRAIN_PATIENCE`] and its
//! client started new requests between scans at least [`BUSY_TURNOVERS`] times; it is
//! then closed at a boundary seen by one scan (and again by a re-read just before
//! closing) even if the client has not acked the latest response yet. Its client
//! keeps starting new requests, which an HTTP/1.1 client does once the previous
//! response is complete; what the backend sent has left the node. The quiet period is
//! what protects a response whose body pauses after its status line, so one long
//! response (no new requests) is only ever closed by the quiet rule. What a busy close
//! risks: a response segment lost in flight at that moment is not retransmitted (the
//! backend is reset), and a request the client sends while the FIN is on its way
//! fails without a response byte (HTTP clients retry it once if idempotent, RFC 9112
//! §9.3.1) — the race any server closing a keep-alive connection has.
//!
//! For an idle flow both entries are marked `FLOW_CLOSING` first (so the backend's
//! answer to what follows is not counted as a canary reset, and a SYN on the tuple is
//! placed afresh), then the backend gets an RST (from the client's address, with the
//! client's next sequence number: it frees its socket at once) and the client gets a
//! FIN|ACK from the service address with the backend's next sequence number. The
//! client's stack sees an orderly close of an idle connection: an HTTP client discards
//! it from its pool and opens a new one, which the current weights place on stable.
//! The client's answer (ACK, FIN) still reaches the canary backend, whose stack has no
//! socket any more and resets it, which ends the client's side without a wait.
//!
//! Segments go out through raw sockets in the agent's network namespace: IPPROTO_RAW
//! for IPv4 and for IPv6 (both imply a caller-built IP header, so a non-local source
//! needs neither IP_TRANSPARENT nor IP_FREEBIND; checked on Linux 6.18).

use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{HashMap, IterableMap, MapData};
use canary_common::{
    FlowKey, FlowValue, ServiceKey, TcpSeq, DIR_FORWARD, DIR_REPLY, FAMILY_V4, FLOW_CLOSING,
    GROUP_CANARY, PROTO_TCP,
};

use super::Datapath;

/// How long a flow's sequence state must stay unchanged before it counts as idle.
pub const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// How long a flow may go without a quiet moment before it is closed at any request
/// boundary, if it is busy with requests (see the module documentation).
pub const DRAIN_PATIENCE: Duration = Duration::from_secs(1);
/// New requests (seen between scans) that make a flow busy rather than one long
/// response.
pub const BUSY_TURNOVERS: u32 = 2;

/// Entries fetched per BPF_MAP_LOOKUP_BATCH call.
const BATCH: usize = 4096;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_EXIST: u64 = 2;
/// Window advertised in the FIN. The flow table does not keep the backend's window;
/// any non-zero window lets the client send its own FIN.
const FIN_WINDOW: u16 = 0xFFFF;
const TTL: u8 = 64;
use canary_common::{TCP_FLAG_ACK as TCP_ACK, TCP_FLAG_FIN as TCP_FIN, TCP_FLAG_RST as TCP_RST};

/// Which version's connections a drain closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DrainGroup {
    Stable,
    Canary,
}

/// How a drain scan treats the connections it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainMode {
    /// Each at a request boundary (the module documentation says when).
    AtBoundaries,
    /// Every one now: at a boundary gracefully, otherwise reset both ends.
    Now,
    /// None: only count them.
    Count,
}

/// Outcome of one [`Datapath::drain`] scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainProgress {
    /// Connections closed by this scan.
    pub closed: usize,
    /// TCP connections of the version still open (not closed by either end nor by a
    /// drain) after this scan.
    pub remaining: usize,
}

/// A flow as the drain's scans have seen it.
struct Seen {
    service: u32,
    /// The sequence state, and since when it has been unchanged.
    state: [TcpSeq; 2],
    since: Instant,
    /// When a scan first saw the flow.
    first: Instant,
    /// Sequence number of the latest request start (the forward entry's telemetry
    /// `last_seq`), and how many times it changed between scans.
    request: u32,
    turnovers: u32,
}

/// Why an idle flow may be closed now.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Why {
    Quiet,
    Busy,
}

impl Seen {
    /// Records this scan's view of the flow and says whether it may be closed now if
    /// it is at a request boundary.
    fn update(&mut self, state: [TcpSeq; 2], request: u32, now: Instant) -> Option<Why> {
        if state != self.state {
            self.state = state;
            self.since = now;
        }
        if request != self.request {
            self.request = request;
            self.turnovers += 1;
        }
        if now.duration_since(self.since) >= DRAIN_QUIET {
            Some(Why::Quiet)
        } else if now.duration_since(self.first) >= DRAIN_PATIENCE
            && self.turnovers >= BUSY_TURNOVERS
        {
            Some(Why::Busy)
        } else {
            None
        }
    }
}

/// Drain state kept in the [`Datapath`]: the flow table, the previous scans' view of
/// each canary flow, and the raw sockets (opened on first use).
pub(super) struct Drain {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    seen: StdHashMap<FlowKey, Seen>,
    raw4: Option<OwnedFd>,
    raw6: Option<OwnedFd>,
}

impl Drain {
    pub(super) fn new(map: aya::maps::Map) -> Result<Self> {
        Ok(Self {
            flows: HashMap::try_from(map).context("opening the flow table")?,
            seen: StdHashMap::new(),
            raw4: None,
            raw6: None,
        })
    }
}

impl Datapath {
    /// One flow-table entry (`None` if absent), e.g. to inspect a flow's tracked state.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.drain.flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading the flow table"),
        }
    }

    /// [`Datapath::drain`] of the canary at request boundaries, as after a rollback.
    pub fn drain_idle(&mut self, service_id: u32, now: Instant) -> Result<DrainProgress> {
        self.drain(service_id, DrainGroup::Canary, DrainMode::AtBoundaries, now)
    }

    /// Closes the `group` connections of service `service_id` as `mode` says (see the
    /// module documentation) and reports how many were closed and how many remain.
    /// Meant to be called periodically (every ~100 ms) while a service drains: at
    /// boundaries, a flow is only closed once its state has been seen unchanged for
    /// [`DRAIN_QUIET`], which takes at least two scans, or, if it is busy with
    /// requests, at a boundary after [`DRAIN_PATIENCE`]. Flows of other services and of
    /// the other group are never touched; UDP flows are not drained (there is no
    /// boundary to close them at).
    pub fn drain(
        &mut self,
        service_id: u32,
        group: DrainGroup,
        mode: DrainMode,
        now: Instant,
    ) -> Result<DrainProgress> {
        let service = self
            .installed()?
            .into_iter()
            .find(|(_, e)| e.value.id == service_id)
            .map(|(k, _)| k)
            .ok_or_else(|| anyhow!("no installed service has id {service_id}"))?;
        let entries = dump(self.drain.flows.map().fd().as_fd())?;
        let mut replies = StdHashMap::new();
        let mut open = Vec::new();
        for (key, value) in entries {
            if !is_tcp_of(&service, service_id, group, &key, &value) {
                continue;
            }
            if key.dir == DIR_REPLY {
                replies.insert(key, value);
            } else if key.dir == DIR_FORWARD && value.flags & FLOW_CLOSING == 0 {
                open.push((key, value));
            }
        }
        let drain = &mut self.drain;
        let mut progress = DrainProgress::default();
        let mut busy = 0;
        let mut scanned = Vec::with_capacity(open.len());
        for (key, fwd) in open {
            let rkey = key.reply(&fwd);
            let Some(reply) = replies.get(&rkey).copied() else {
                // No reply entry (evicted): the flow cannot be closed exactly.
                progress.remaining += 1;
                continue;
            };
            if reply.flags & FLOW_CLOSING != 0 {
                // The backend is closing it already.
                continue;
            }
            match mode {
                DrainMode::Count => {
                    progress.remaining += 1;
                    continue;
                }
                DrainMode::Now => {
                    let graceful = at_request_boundary(&fwd, &reply, true);
                    if drain.close(&key, &fwd, &rkey, &reply, graceful)? {
                        drain.seen.remove(&key);
                        progress.closed += 1;
                    } else {
                        progress.remaining += 1;
                    }
                    continue;
                }
                DrainMode::AtBoundaries => {}
            }
            scanned.push(key);
            let state = [fwd.tcp, reply.tcp];
            let seen = drain.seen.entry(key).or_insert(Seen {
                service: service_id,
                state,
                since: now,
                first: now,
                request: fwd.last_seq,
                turnovers: 0,
            });
            let why = seen.update(state, fwd.last_seq, now);
            let idle = match why {
                Some(Why::Quiet) => at_request_boundary(&fwd, &reply, false),
                Some(Why::Busy) => at_request_boundary(&fwd, &reply, true),
                None => false,
            };
            if idle && drain.close(&key, &fwd, &rkey, &reply, true)? {
                drain.seen.remove(&key);
                progress.closed += 1;
                busy += usize::from(why == Some(Why::Busy));
            } else {
                progress.remaining += 1;
            }
        }
        let scanned: std::collections::HashSet<FlowKey> = scanned.into_iter().collect();
        drain
            .seen
            .retain(|k, s| s.service != service_id || scanned.contains(k));
        if progress.closed > 0 {
            tracing::debug!(
                service_id,
                closed = progress.closed,
                busy,
                remaining = progress.remaining,
                ?group,
                ?mode,
                "closed connections (busy: at a boundary but never quiet for 100 ms)"
            );
        }
        Ok(progress)
    }
}

/// A TCP flow entry (either direction) of `service`, placed on one of its `group`
/// backends. The addresses are checked as well as the id, so a stale flow of a service
/// whose id was given to another is not taken for one of its flows.
fn is_tcp_of(
    service: &ServiceKey,
    id: u32,
    group: DrainGroup,
    key: &FlowKey,
    value: &FlowValue,
) -> bool {
    let canary = value.group == GROUP_CANARY;
    if value.service != id
        || canary != (group == DrainGroup::Canary)
        || key.proto != PROTO_TCP
        || key.proto != service.proto
        || key.family != service.family
    {
        return false;
    }
    match key.dir {
        // Client -> service address.
        DIR_FORWARD => key.dst == service.addr && key.dport == service.port,
        // Backend -> client, restored to the service address.
        DIR_REPLY => value.addr == service.addr && value.port == service.port,
        _ => false,
    }
}

/// No request pending and nothing in flight either way; for a busy flow, the client's
/// ack of what the backend sent may lag (see the module documentation).
fn at_request_boundary(fwd: &FlowValue, reply: &FlowValue, busy: bool) -> bool {
    let (client, backend) = (fwd.tcp, reply.tcp);
    let acked = client.ack == backend.next
        || (busy && client.ack != 0 && !canary_common::seq_after(client.ack, backend.next));
    reply.ts_ns == 0 && client.next != 0 && backend.next != 0 && backend.ack == client.next && acked
}

impl Drain {
    /// Closes one flow, `graceful`ly at a boundary (FIN to the client) or by resetting
    /// both ends; `false` if it changed since the scan read it (it is looked at again
    /// on the next scan).
    fn close(
        &mut self,
        key: &FlowKey,
        fwd: &FlowValue,
        rkey: &FlowKey,
        reply: &FlowValue,
        graceful: bool,
    ) -> Result<bool> {
        // Re-read just before acting, to narrow the window in which a request that
        // starts now would meet the close (the race any server closing an idle
        // keep-alive connection has; HTTP clients retry such a request).
        let (Ok(fwd_now), Ok(reply_now)) = (self.flows.get(key, 0), self.flows.get(rkey, 0)) else {
            return Ok(false);
        };
        if fwd_now != *fwd || reply_now != *reply {
            return Ok(false);
        }
        let [rst, fin] = if graceful {
            close_segments(key, fwd, reply)
        } else {
            reset_segments(key, fwd, reply)
        };
        // Marked before sending: the client's answer to the FIN (and the backend's
        // reset of it) may cross the node before sendto returns.
        let mark = |v: &FlowValue| FlowValue {
            flags: v.flags | FLOW_CLOSING,
            ..*v
        };
        self.flows
            .insert(key, mark(fwd), BPF_EXIST)
            .context("marking a drained flow closing")?;
        self.flows
            .insert(rkey, mark(reply), BPF_EXIST)
            .context("marking a drained flow closing")?;
        // The backend first: it must be gone before the client's FIN|ACK reaches it.
        let sent = self
            .send(&rst)
            .and_then(|()| self.send(&fin))
            .with_context(|| format!("closing flow {}", describe(key)));
        if let Err(e) = sent {
            // Leave the flow as it was; a later scan tries again.
            let _ = self.flows.insert(key, fwd, BPF_EXIST);
            let _ = self.flows.insert(rkey, reply, BPF_EXIST);
            return Err(e);
        }
        Ok(true)
    }

    fn send(&mut self, seg: &Segment) -> Result<()> {
        let (slot, family) = match seg.dst {
            IpAddr::V4(_) => (&mut self.raw4, libc::AF_INET),
            IpAddr::V6(_) => (&mut self.raw6, libc::AF_INET6),
        };
        let fd = match slot {
            Some(fd) => fd,
            None => slot.insert(raw_socket(family)?),
        };
        send_to(fd.as_fd(), &seg.bytes, seg.dst)
    }
}

/// An IP packet to send and its destination.
#[derive(Debug)]
struct Segment {
    dst: IpAddr,
    bytes: Vec<u8>,
}

/// The two segments that close an idle flow: an RST to the backend from the client's
/// address:port, and a FIN|ACK to the client from the service address:port.
fn close_segments(key: &FlowKey, fwd: &FlowValue, reply: &FlowValue) -> [Segment; 2] {
    let (client, service) = (
        decode(key.family, &key.src, key.sport),
        decode(key.family, &key.dst, key.dport),
    );
    let backend = decode(key.family, &fwd.addr, fwd.port);
    let (c, b) = (fwd.tcp.next, reply.tcp.next);
    [
        Segment {
            dst: backend.ip(),
            bytes: ip_tcp(client, backend, c, b, TCP_RST | TCP_ACK, 0),
        },
        Segment {
            dst: client.ip(),
            bytes: ip_tcp(service, client, b, c, TCP_FIN | TCP_ACK, FIN_WINDOW),
        },
    ]
}

/// The two segments that end a flow that may be mid-request: [`close_segments`]' RST
/// to the backend, and an RST|ACK to the client from the service address at the
/// backend's next sequence number (exactly what the client expects, so it is taken).
fn reset_segments(key: &FlowKey, fwd: &FlowValue, reply: &FlowValue) -> [Segment; 2] {
    let [to_backend, _] = close_segments(key, fwd, reply);
    let (client, service) = (
        decode(key.family, &key.src, key.sport),
        decode(key.family, &key.dst, key.dport),
    );
    let (c, b) = (fwd.tcp.next, reply.tcp.next);
    let to_client = Segment {
        dst: client.ip(),
        bytes: ip_tcp(service, client, b, c, TCP_RST | TCP_ACK, 0),
    };
    [to_backend, to_client]
}

/// An address and port as stored in the maps (network byte order as loaded).
fn decode(family: u8, addr: &[u32; 4], port: u16) -> SocketAddr {
    let port = u16::from_be(port);
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let ip = if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    SocketAddr::new(ip, port)
}

fn describe(key: &FlowKey) -> String {
    format!(
        "{} -> {}",
        decode(key.family, &key.src, key.sport),
        decode(key.family, &key.dst, key.dport)
    )
}

/// An IPv4 or IPv6 header and a 20-byte TCP header without options or payload, with
/// both checksums.
fn ip_tcp(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, flags: u8, window: u16) -> Vec<u8> {
    const TCP_LEN: u16 = 20;
    let mut tcp = Vec::with_capacity(TCP_LEN as usize);
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4); // data offset: 5 words, no options
    tcp.push(flags);
    tcp.extend_from_slice(&window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let mut out = Vec::with_capacity(60);
    let mut pseudo = Vec::with_capacity(40);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&(20 + TCP_LEN).to_be_bytes());
            // Identification 0 (the kernel picks one), don't fragment.
            out.extend_from_slice(&[0, 0, 0x40, 0, TTL, libc::IPPROTO_TCP as u8, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let check = checksum(&[&out]);
            out[10..12].copy_from_slice(&check.to_be_bytes());
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
            pseudo.extend_from_slice(&TCP_LEN.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&TCP_LEN.to_be_bytes());
            out.extend_from_slice(&[libc::IPPROTO_TCP as u8, TTL]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(TCP_LEN).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, libc::IPPROTO_TCP as u8]);
        }
        _ => unreachable!("a flow's addresses share one family"),
    }
    let check = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    out.extend_from_slice(&tcp);
    out
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts` (each of even
/// length).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for word in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)]));
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

fn raw_socket(family: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("opening a raw socket to close drained flows (needs CAP_NET_RAW)");
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_to(fd: BorrowedFd<'_>, packet: &[u8], dst: IpAddr) -> Result<()> {
    // SAFETY: zeroed sockaddr structs are valid; the pointers and lengths passed to
    // sendto describe live buffers.
    let rc = unsafe {
        match dst {
            IpAddr::V4(a) => {
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                libc::sendto(
                    fd.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
            IpAddr::V6(a) => {
                let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_addr.s6_addr = a.octets();
                libc::sendto(
                    fd.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("sendto {dst}"));
    }
    if rc as usize != packet.len() {
        bail!("sendto {dst}: {rc} of {} bytes sent", packet.len());
    }
    Ok(())
}

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the flow table, BATCH entries per system call (one syscall per
/// entry with get_next_key + lookup would take too long on a full table).
fn dump(fd: BorrowedFd<'_>) -> Result<Vec<(FlowKey, FlowValue)>> {
    let mut out = Vec::new();
    let mut cap = BATCH;
    // The hash map's batch token is a bucket index (u32); 8 bytes leave room.
    let (mut token, mut next) = ([0u8; 8], [0u8; 8]);
    let mut first = true;
    loop {
        let mut keys = vec![FlowKey::default(); cap];
        let mut values = vec![FlowValue::default(); cap];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: cap as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: attr points at buffers of `count` keys and values and two tokens,
        // all live for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = std::io::Error::last_os_error();
        let n = (attr.count as usize).min(cap);
        out.extend(keys.into_iter().zip(values).take(n));
        if rc == 0 {
            token = next;
            first = false;
            continue;
        }
        match err.raw_os_error() {
            // The end of the table.
            Some(libc::ENOENT) => return Ok(out),
            // A bucket holds more entries than fit: retry it with more room.
            Some(libc::ENOSPC) if n == 0 && cap < 1 << 20 => cap *= 2,
            _ => return Err(err).context("BPF_MAP_LOOKUP_BATCH on the flow table"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::encode::{encode_addr, encode_port};
    use canary_common::GROUP_STABLE;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A forward entry client -> service placed on canary backend slot 16, with
    /// the reply entry's backend-side state.
    fn flow(client: &str, service: &str, backend: &str) -> (FlowKey, FlowValue, FlowValue) {
        let (c, s, b) = (sa(client), sa(service), sa(backend));
        let key = FlowKey {
            src: encode_addr(c.ip()),
            dst: encode_addr(s.ip()),
            sport: encode_port(c.port()),
            dport: encode_port(s.port()),
            proto: PROTO_TCP,
            family: if c.is_ipv4() { FAMILY_V4 } else { 6 },
            dir: DIR_FORWARD,
            _pad: 0,
        };
        let fwd = FlowValue {
            addr: encode_addr(b.ip()),
            port: encode_port(b.port()),
            group: GROUP_CANARY,
            service: 3,
            tcp: TcpSeq {
                next: 1_000_101,
                ack: 4_000_201,
            },
            ..Default::default()
        };
        let reply = FlowValue {
            addr: key.dst,
            port: key.dport,
            tcp: TcpSeq {
                next: 4_000_201,
                ack: 1_000_101,
            },
            ..fwd
        };
        (key, fwd, reply)
    }

    /// (src, dst, seq, ack, flags byte, window) after checking both checksums.
    fn parse(bytes: &[u8]) -> (SocketAddr, SocketAddr, u32, u32, u8, u16) {
        let p = SlicedPacket::from_ip(bytes).expect("a valid IP packet");
        let TransportSlice::Tcp(t) = p.transport.unwrap() else {
            panic!("not TCP")
        };
        let h = t.to_header();
        let (src, dst, want) = match p.net.unwrap() {
            NetSlice::Ipv4(v4) => {
                let ip = v4.header().to_header();
                assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                assert!(ip.dont_fragment);
                let want = h.calc_checksum_ipv4(&ip, t.payload()).unwrap();
                (IpAddr::from(ip.source), IpAddr::from(ip.destination), want)
            }
            NetSlice::Ipv6(v6) => {
                let ip = v6.header().to_header();
                let want = h.calc_checksum_ipv6(&ip, t.payload()).unwrap();
                (IpAddr::from(ip.source), IpAddr::from(ip.destination), want)
            }
        };
        assert_eq!(h.checksum, want, "TCP checksum");
        assert!(t.payload().is_empty());
        let flags = bytes[bytes.len() - 20 + 13];
        (
            SocketAddr::new(src, h.source_port),
            SocketAddr::new(dst, h.destination_port),
            h.sequence_number,
            h.acknowledgment_number,
            flags,
            h.window_size,
        )
    }

    #[test]
    fn close_segments_carry_the_tracked_sequence_numbers() {
        for (client, service, backend) in [
            ("198.18.1.2:40000", "198.19.0.10:80", "198.18.3.2:8080"),
            (
                "[2001:db8:1::2]:40000",
                "[2001:db8:ffff::10]:80",
                "[2001:db8:3::2]:8080",
            ),
        ] {
            let (key, fwd, reply) = flow(client, service, backend);
            let [rst, fin] = close_segments(&key, &fwd, &reply);
            assert_eq!(rst.dst, sa(backend).ip());
            assert_eq!(
                parse(&rst.bytes),
                (
                    sa(client),
                    sa(backend),
                    1_000_101,
                    4_000_201,
                    TCP_RST | TCP_ACK,
                    0
                )
            );
            assert_eq!(fin.dst, sa(client).ip());
            assert_eq!(
                parse(&fin.bytes),
                (
                    sa(service),
                    sa(client),
                    4_000_201,
                    1_000_101,
                    TCP_FIN | TCP_ACK,
                    FIN_WINDOW
                )
            );
        }
    }

    #[test]
    fn reset_segments_end_both_sides_at_the_tracked_sequence_numbers() {
        let (client, service, backend) = ("198.18.1.2:40000", "198.19.0.10:80", "198.18.3.2:8080");
        let (key, fwd, reply) = flow(client, service, backend);
        let [to_backend, to_client] = reset_segments(&key, &fwd, &reply);
        assert_eq!(to_backend.dst, sa(backend).ip());
        assert_eq!(
            parse(&to_backend.bytes),
            (
                sa(client),
                sa(backend),
                1_000_101,
                4_000_201,
                TCP_RST | TCP_ACK,
                0
            )
        );
        assert_eq!(to_client.dst, sa(client).ip());
        assert_eq!(
            parse(&to_client.bytes),
            (
                sa(service),
                sa(client),
                4_000_201,
                1_000_101,
                TCP_RST | TCP_ACK,
                0
            )
        );
    }

    #[test]
    fn idle_only_at_a_request_boundary() {
        let (_, fwd, reply) = flow("198.18.1.2:1", "198.19.0.10:80", "198.18.3.2:8080");
        for busy in [false, true] {
            assert!(at_request_boundary(&fwd, &reply, busy));
            let pending = FlowValue { ts_ns: 5, ..reply };
            assert!(
                !at_request_boundary(&fwd, &pending, busy),
                "request pending"
            );
            let mut sent = fwd;
            sent.tcp.next += 30; // a request the backend has not acked
            assert!(!at_request_boundary(&sent, &reply, busy));
            let mut unseen = reply;
            unseen.tcp = TcpSeq::default(); // no backend segment seen (no SYN-ACK)
            let mut fwd_unseen = fwd;
            fwd_unseen.tcp.ack = 0;
            assert!(!at_request_boundary(&fwd_unseen, &unseen, busy));
        }
        // The client has not acked the end of the response (delayed ACK): a boundary
        // only for a busy flow.
        let mut unacked = fwd;
        unacked.tcp.ack -= 10;
        assert!(!at_request_boundary(&unacked, &reply, false));
        assert!(at_request_boundary(&unacked, &reply, true));
        let mut beyond = fwd;
        beyond.tcp.ack += 10; // acks what the backend never sent: inconsistent
        assert!(!at_request_boundary(&beyond, &reply, true));
    }

    #[test]
    fn quiet_flows_and_busy_request_flows_may_close_one_long_response_only_when_quiet() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let state = |n: u32| [TcpSeq { next: n, ack: 1 }, TcpSeq { next: 1, ack: n }];
        let new = |at| Seen {
            service: 0,
            state: state(0),
            since: at,
            first: at,
            request: 0,
            turnovers: 0,
        };
        // Quiet: unchanged for 100 ms, however long it has been drained.
        let mut s = new(ms(0));
        assert_eq!(s.update(state(0), 0, ms(50)), None);
        assert_eq!(s.update(state(0), 0, ms(100)), Some(Why::Quiet));
        assert_eq!(
            s.update(state(1), 0, ms(150)),
            None,
            "changed: quiet again from 150"
        );
        assert_eq!(s.update(state(1), 0, ms(250)), Some(Why::Quiet));
        // A connection with a new request at every scan is never quiet; after the
        // patience it is busy.
        let mut s = new(ms(0));
        for (i, at) in (100..1000).step_by(100).enumerate() {
            assert_eq!(s.update(state(i as u32 + 1), i as u32 + 1, ms(at)), None);
        }
        assert_eq!(s.update(state(20), 20, ms(1000)), Some(Why::Busy));
        // One long response: data moves, no new request: never busy.
        let mut s = new(ms(0));
        for (i, at) in (100..3000).step_by(100).enumerate() {
            assert_eq!(s.update(state(i as u32 + 1), 0, ms(at)), None);
        }
    }

    #[test]
    fn only_tcp_flows_of_the_service_and_group_are_candidates() {
        let (key, fwd, reply) = flow("198.18.1.2:1", "198.19.0.10:80", "198.18.3.2:8080");
        let svc = ServiceKey {
            addr: key.dst,
            port: key.dport,
            proto: PROTO_TCP,
            family: FAMILY_V4,
        };
        let rkey = key.reply(&fwd);
        let canary = |svc: &ServiceKey, id, key: &FlowKey, value: &FlowValue| {
            is_tcp_of(svc, id, DrainGroup::Canary, key, value)
        };
        assert!(canary(&svc, 3, &key, &fwd));
        assert!(canary(&svc, 3, &rkey, &reply));
        assert!(!canary(&svc, 4, &key, &fwd), "other service id");
        let stable = FlowValue {
            group: GROUP_STABLE,
            ..fwd
        };
        assert!(!canary(&svc, 3, &key, &stable), "stable slot");
        assert!(is_tcp_of(&svc, 3, DrainGroup::Stable, &key, &stable));
        assert!(
            !is_tcp_of(&svc, 3, DrainGroup::Stable, &key, &fwd),
            "canary slot"
        );
        let other = ServiceKey { port: 81, ..svc };
        assert!(
            !canary(&other, 3, &key, &fwd),
            "same id, other address: a stale flow of a previous owner of the id"
        );
        let udp = FlowKey { proto: 17, ..key };
        assert!(!canary(&svc, 3, &udp, &fwd));
    }

    #[test]
    fn decode_round_trips_the_map_encoding() {
        for s in ["198.18.1.2:40000", "[2001:db8:1::2]:443"] {
            let a = sa(s);
            let family = if a.is_ipv4() { FAMILY_V4 } else { 6 };
            assert_eq!(
                decode(family, &encode_addr(a.ip()), encode_port(a.port())),
                a
            );
        }
    }
}
