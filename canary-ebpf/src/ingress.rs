//! Client -> service: find the service, pin or look up the flow, rewrite the
//! destination to the chosen backend, count. The same logic runs at XDP or at TC
//! ingress (see [`crate::frame`] for which and why).

use canary_common::{
    bucket, client_hash, decision_index, flow_hash, hash_group, smooth_pick, Backend, CidrKey,
    FlowKey, FlowValue, Group, GroupKey, ServiceKey, ServiceValue, TcpSeq, CIDR_CANARY,
    CIDR_KEY_BITS, CIDR_PERCENT, CIDR_STABLE, DECISION_SPLIT, DIR_FORWARD, DIR_REPLY, FLOW_CLOSING,
    FLOW_ESTABLISHED, FLOW_REDIRECT, FORWARD_REDIRECT, GROUP_CANARY, GROUP_STABLE, MODE_EXACT,
    PROTO_TCP, ROUTING_CIDR, STICKY_CLIENT_IP,
};

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};

use crate::{
    frame::Frame,
    maps::{CIDR, DECISIONS, EXACT, FLOWS, GROUPS, SERVICES, STATS, STRAY},
    parse::{parse, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    telemetry,
};

/// A packet rewritten towards its next hop (a request to its backend, a reply to its
/// client): what a FIB lookup for it needs.
pub struct Rewritten {
    /// How its flow is forwarded (FORWARD_*), fixed when the flow was placed, so both
    /// directions of a connection go the same way across config changes.
    pub forward: u8,
    pub family: u8,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// `Some` when the packet was ours and now goes to its backend.
#[inline(always)]
pub fn handle<F: Frame>(ctx: &F) -> Option<Rewritten> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let pkt = parse(data, end)?;
    // A packet the hook does not hold whole passes as it came: no flow placed, nothing
    // counted, no sequence state advanced, nothing rewritten.
    if ctx.cut_short(&pkt) {
        return None;
    }
    let svc_key = ServiceKey {
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
    };
    // SAFETY: SERVICES is not preallocated, so a concurrent update swaps in a new
    // element and this one stays valid for the rest of the program run.
    let svc = unsafe { SERVICES.get(&svc_key) }?;
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        dir: DIR_FORWARD,
        _pad: 0,
    };
    let tcp = if pkt.proto == PROTO_TCP {
        tcp_ack(data, end, &pkt).map(|ack| (ctx.payload_len(&pkt), ack))
    } else {
        None
    };
    let opens = opens_connection(&pkt);
    let (flow, entry) = match pinned_flow(&key, &pkt, opens) {
        Some((flow, entry)) => {
            if let Some((len, ack)) = tcp {
                telemetry::track(entry, flow.tcp, pkt.seq, len, pkt.tcp_flags, ack);
                if flow.flags & FLOW_ESTABLISHED == 0 && handshake_done(&key, &flow, &pkt, ack) {
                    // SAFETY: LRU entry valid for the program run; a flags-byte write.
                    unsafe { (*entry).flags |= FLOW_ESTABLISHED };
                }
            }
            (flow, Some(entry))
        }
        None if opens => (place(&key, &pkt, svc, tcp)?, None),
        None => match replace(&key, &pkt, svc, tcp) {
            Some(flow) => (flow, None),
            None => {
                // Not a connection we placed (a spoofed or stray segment, or one whose
                // entries are both gone): it passes untouched and the table is left
                // alone, so a flood of such segments evicts no live flow.
                if let Some(n) = STRAY.get_ptr_mut(svc.id) {
                    // SAFETY: per-CPU slot.
                    unsafe { *n += 1 };
                }
                return None;
            }
        },
    };
    // A segment without 4 bytes of payload (a bare ACK) starts no request: no load.
    let first = match tcp {
        Some((len, _)) if len >= 4 => ctx.load4(pkt.payload_off),
        _ => None,
    };
    if let Some(first) = first {
        // Counted only once the client has acknowledged the backend's SYN-ACK, which a
        // sender that does not see the backend's segments cannot do: spoofed segments
        // count no requests.
        let established = match entry {
            // SAFETY: as in `pinned_flow`; the flag may have been set just above.
            Some(e) => (unsafe { (*e).flags } & FLOW_ESTABLISHED) != 0,
            None => flow.flags & FLOW_ESTABLISHED != 0,
        };
        if established && telemetry::is_request(first) {
            // A just-placed flow has no entry pointer yet: look it up.
            if let Some(forward) = entry.or_else(|| FLOWS.get_ptr_mut(&key)) {
                let reply = FLOWS.get_ptr_mut(&key.reply(&flow));
                telemetry::request(forward, reply, pkt.seq);
            }
        }
    }
    ctx.rewrite_destination(&pkt, &flow.addr, flow.port)?;
    if let Some(stats) = STATS.get_ptr_mut(flow.stats) {
        // SAFETY: per-CPU slot, no other writer on this CPU during the program run.
        unsafe {
            (*stats).packets_in += 1;
            (*stats).bytes_in += ctx.len() as u64;
        }
    }
    Some(Rewritten {
        forward: flow.forwarding(),
        family: pkt.family,
        proto: pkt.proto,
        sport: pkt.sport,
        dport: flow.port,
        src: pkt.src,
        dst: flow.addr,
    })
}

/// A TCP segment's acknowledgment number (as loaded).
#[inline(always)]
fn tcp_ack(data: usize, end: usize, pkt: &Packet) -> Option<u32> {
    if data + pkt.l4_off + 12 > end {
        return None;
    }
    // SAFETY: bounds checked just above.
    Some(unsafe { core::ptr::read_unaligned((data + pkt.l4_off + 8) as *const u32) })
}

/// Whether the packet may start a connection: any UDP datagram, and a TCP segment with
/// SYN alone among SYN, ACK, FIN and RST (what a listening socket accepts).
#[inline(always)]
fn opens_connection(pkt: &Packet) -> bool {
    pkt.proto != PROTO_TCP || pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN
}

/// The flow's pinned backend and its entry, unless this is a SYN that starts a new
/// connection on a tuple whose previous connection has closed. Also marks client
/// FIN/RST.
#[inline(always)]
fn pinned_flow(key: &FlowKey, pkt: &Packet, opens: bool) -> Option<(FlowValue, *mut FlowValue)> {
    let entry = FLOWS.get_ptr_mut(key)?;
    // SAFETY: LRU entries stay valid during the program run; fields written after
    // insertion are the flags byte, the telemetry fields and the 8-byte `tcp` state,
    // each of which a torn read only makes stale.
    let flow = unsafe { *entry };
    let syn = pkt.proto == PROTO_TCP && opens;
    if syn && (flow.flags & FLOW_CLOSING != 0 || reply_closing(key, &flow)) {
        return None;
    }
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        unsafe { (*entry).flags |= FLOW_CLOSING };
    }
    Some((flow, entry))
}

/// Whether the backend side of a pinned flow has sent FIN or RST (marked by egress).
#[inline(always)]
fn reply_closing(key: &FlowKey, flow: &FlowValue) -> bool {
    let reply = key.reply(flow);
    // SAFETY: read-only copy of one byte of an LRU entry.
    unsafe { FLOWS.get(&reply) }.is_some_and(|r| r.flags & FLOW_CLOSING != 0)
}

/// Whether a client segment acknowledges exactly what the backend has sent (its
/// SYN-ACK, on the handshake's ACK): proof that the client sees the backend's
/// segments, which a blind spoofer does not.
#[inline(always)]
fn handshake_done(key: &FlowKey, flow: &FlowValue, pkt: &Packet, ack: u32) -> bool {
    if pkt.tcp_flags & TCP_ACK == 0 {
        return false;
    }
    // SAFETY: read-only copy of an LRU entry.
    unsafe { FLOWS.get(&key.reply(flow)) }.is_some_and(|r| acknowledges(r, ack))
}

/// `ack` (as loaded) is the backend's next sequence number, after its SYN-ACK.
#[inline(always)]
fn acknowledges(reply: &FlowValue, ack: u32) -> bool {
    reply.flags & FLOW_ESTABLISHED != 0 && reply.tcp.next == u32::from_be(ack)
}

/// The placement hash of the packet's flow.
#[inline(always)]
fn placement_hash(pkt: &Packet, svc: &ServiceValue) -> u64 {
    if svc.sticky == STICKY_CLIENT_IP {
        client_hash(&pkt.src)
    } else {
        flow_hash(&pkt.src, &pkt.dst, pkt.sport, pkt.dport, pkt.proto)
    }
}

/// A TCP segment that is not a SYN and found no forward entry: the table lost it
/// (eviction), or the connection is not ours. Re-placed only when the reply entry of
/// the connection is still there, on the backend it names: the backend the hash picks
/// in the group the weight picks, else in the other group (a weight or exact-mode pick
/// may have changed since). Nothing is inserted otherwise. Counted in `flow_misses`.
#[inline(always)]
fn replace(
    key: &FlowKey,
    pkt: &Packet,
    svc: &ServiceValue,
    tcp: Option<(u32, u32)>,
) -> Option<FlowValue> {
    let hash = placement_hash(pkt, svc);
    let first = hash_group(hash, svc.weight_bp);
    let flow = match from_reply(key, pkt, svc, tcp, hash, first) {
        Some(flow) => flow,
        None => from_reply(key, pkt, svc, tcp, hash, 1 - first)?,
    };
    if let Some(stats) = STATS.get_ptr_mut(flow.stats) {
        // SAFETY: per-CPU slot.
        unsafe { (*stats).flow_misses += 1 };
    }
    Some(flow)
}

/// The forward entry of `key` on the hash's backend in `group`, if that backend's
/// reply entry for this connection exists; inserted, its sequence state started from
/// this segment.
#[inline(always)]
fn from_reply(
    key: &FlowKey,
    pkt: &Packet,
    svc: &ServiceValue,
    tcp: Option<(u32, u32)>,
    hash: u64,
    group: u8,
) -> Option<FlowValue> {
    let backend = pick(svc, group, hash)?;
    let reply_key = FlowKey {
        src: backend.addr,
        dst: pkt.src,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        family: pkt.family,
        dir: DIR_REPLY,
        _pad: 0,
    };
    // SAFETY: read-only copy of an LRU entry.
    let reply = unsafe { FLOWS.get(&reply_key) }?;
    if reply.addr != pkt.dst || reply.port != pkt.dport || reply.service != svc.id {
        return None;
    }
    let (len, ack) = tcp?;
    let mut flags = reply.flags & FLOW_REDIRECT;
    if pkt.tcp_flags & TCP_ACK != 0 && acknowledges(reply, ack) {
        flags |= FLOW_ESTABLISHED;
    }
    let flow = FlowValue {
        addr: backend.addr,
        port: backend.port,
        group,
        flags,
        service: svc.id,
        ts_ns: 0,
        last_seq: 0,
        stats: backend.stats as u32,
        tcp: TcpSeq::default().advance(
            u32::from_be(pkt.seq),
            len,
            pkt.tcp_flags,
            u32::from_be(ack),
        ),
    };
    let _ = FLOWS.insert(key, flow, 0);
    Some(flow)
}

/// The backends of `group` in force for the service.
#[inline(always)]
fn group_of(svc: &ServiceValue, group: u8) -> Option<&'static Group> {
    let key = GroupKey {
        service: svc.id,
        gen: svc.gen,
        group,
        _pad: [0; 3],
    };
    // SAFETY: GROUPS is not preallocated: an install writes a new generation under
    // another key and deletes the old one, whose element outlives this program run.
    unsafe { GROUPS.get(&key) }
}

/// The backend the hash picks among `group`'s backends that are up.
#[inline(always)]
fn pick(svc: &ServiceValue, group: u8, hash: u64) -> Option<Backend> {
    group_of(svc, group)?.pick(hash).map(|(_, b)| *b)
}

/// Chooses a backend for a new flow (a SYN, or a UDP datagram) from the service's
/// current weight, pins both directions and counts the connection. `tcp`: the
/// segment's payload length and ack, which start the forward entry's sequence state.
#[inline(always)]
fn place(
    key: &FlowKey,
    pkt: &Packet,
    svc: &ServiceValue,
    tcp: Option<(u32, u32)>,
) -> Option<FlowValue> {
    let hash = placement_hash(pkt, svc);
    let cohort = if svc.routing == ROUTING_CIDR {
        cohort_group(pkt, svc)
    } else {
        None
    };
    let (rule, mut group) = match cohort {
        Some(decided) => decided,
        None => {
            let group = if svc.mode == MODE_EXACT {
                let acc = EXACT.get_ptr_mut(svc.id)?;
                // SAFETY: per-CPU accumulator, only this CPU's program run touches it.
                smooth_pick(unsafe { &mut *acc }, svc.weight_bp)
            } else {
                hash_group(hash, svc.weight_bp)
            };
            (DECISION_SPLIT, group)
        }
    };
    // A canary without a backend up cannot take traffic: stable takes it. Never the
    // other way: stable without backends (a name not answered yet) places nothing,
    // and the agent never marks every stable backend down (stable fails open).
    if group == GROUP_CANARY && group_of(svc, GROUP_CANARY).is_none_or(|g| g.up == 0) {
        group = GROUP_STABLE;
    }
    if svc.routing == ROUTING_CIDR {
        if let Some(n) = DECISIONS.get_ptr_mut(decision_index(svc.id, rule, group)) {
            // SAFETY: per-CPU slot.
            unsafe { *n += 1 };
        }
    }
    let backend = pick(svc, group, hash)?;
    let flow = FlowValue {
        addr: backend.addr,
        port: backend.port,
        group,
        flags: if svc.forward == FORWARD_REDIRECT {
            FLOW_REDIRECT
        } else {
            0
        },
        service: svc.id,
        ts_ns: 0,
        last_seq: 0,
        stats: backend.stats as u32,
        tcp: TcpSeq::default(),
    };
    let reply = FlowValue {
        addr: pkt.dst,
        port: pkt.dport,
        // SYN time, for the handshake time measured at the backend's SYN-ACK.
        ts_ns: if pkt.proto == PROTO_TCP {
            unsafe { bpf_ktime_get_ns() }
        } else {
            0
        },
        ..flow
    };
    // If the table is full the LRU evicts the coldest flow; an insert error only means
    // this flow is not pinned and its next packet is placed again.
    let forward = match tcp {
        Some((len, ack)) => FlowValue {
            tcp: TcpSeq::default().advance(
                u32::from_be(pkt.seq),
                len,
                pkt.tcp_flags,
                u32::from_be(ack),
            ),
            ..flow
        },
        None => flow,
    };
    let _ = FLOWS.insert(key.reply(&flow), reply, 0);
    let _ = FLOWS.insert(key, forward, 0);
    if let Some(stats) = STATS.get_ptr_mut(flow.stats) {
        // SAFETY: per-CPU slot.
        unsafe { (*stats).connections += 1 };
    }
    Some(flow)
}

/// A service decided by client address: the cohort whose range holds the client
/// (longest prefix; the agent leaves out ranges an earlier cohort shadows, so this is
/// the first matching cohort) and its version. `None`: no cohort decides, the weight
/// split does. A rolled-back canary gets no connection from a cohort.
#[inline(always)]
fn cohort_group(pkt: &Packet, svc: &ServiceValue) -> Option<(u8, u8)> {
    let key = Key::new(
        CIDR_KEY_BITS,
        CidrKey {
            service: svc.id,
            gen: svc.cidr_gen,
            family: pkt.family,
            _pad: [0; 2],
            addr: pkt.src,
        },
    );
    let hit = CIDR.get(&key)?;
    let canary = match hit.action {
        CIDR_STABLE => false,
        CIDR_CANARY => true,
        CIDR_PERCENT => bucket(client_hash(&pkt.src)) < hit.bp,
        _ => return None,
    };
    let group = if canary && svc.rolled_back == 0 {
        GROUP_CANARY
    } else {
        GROUP_STABLE
    };
    Some((hit.cohort, group))
}
