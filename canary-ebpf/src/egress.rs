//! Backend -> client: replies of pinned flows get the service address back as their
//! source. Runs at TC egress where packets may still carry CHECKSUM_PARTIAL (forwarded
//! from a local veth), so checksums go through the kernel's csum helpers, which handle
//! both partial and complete checksums correctly.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use canary_common::{
    stats_index, FlowKey, DIR_REPLY, FAMILY_V4, FLOW_CLOSING, PROTO_TCP, PROTO_UDP,
};

use crate::{
    maps::{FLOWS, STATS},
    parse::{
        parse, IP_CHECK_OFF_V4, IP_SRC_OFF_V4, IP_SRC_OFF_V6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    telemetry,
};

#[inline(always)]
pub fn handle(ctx: &TcContext) {
    // Headers must be in the linear part for direct reads (IPv6 + TCP = 74 bytes).
    // They almost always are; pulling anyway would make every packet writable, which
    // copies the head of each cloned skb (TCP transmits clones), ours or not.
    let want = if ctx.len() < 74 { ctx.len() } else { 74 };
    if ctx.data_end() - ctx.data() < want as usize && ctx.pull_data(want).is_err() {
        return;
    }
    let Some(pkt) = parse(ctx.data(), ctx.data_end()) else {
        return;
    };
    // An IP packet that runs past the end of the skb was cut short: not rewritten, and
    // it must not advance the flow. (`data_end` only ends the linear part; the skb's
    // length is the whole packet. A length of 0 is BIG TCP, whose length is the skb's.)
    if pkt.ip_end != 0 && pkt.ip_end > ctx.len() as usize {
        return;
    }
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        dir: DIR_REPLY,
        _pad: 0,
    };
    let Some(entry) = FLOWS.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: LRU entry valid during the program run; a torn read of a field written
    // concurrently only makes it stale.
    let flow = unsafe { *entry };
    if pkt.proto == PROTO_TCP {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + pkt.l4_off + 12 <= end {
            // SAFETY: bounds checked just above.
            let ack = unsafe { core::ptr::read_unaligned((data + pkt.l4_off + 8) as *const u32) };
            // The skb's length, not an IP length field: a GSO packet (or a BIG TCP one,
            // whose length field is 0) carries all its segments' payload.
            let len = (ctx.len() as usize).saturating_sub(pkt.payload_off) as u32;
            telemetry::track(entry, flow.tcp, pkt.seq, len, pkt.tcp_flags, ack);
        }
        observe(ctx, entry, &flow, &pkt);
        if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            unsafe { (*entry).flags |= FLOW_CLOSING };
        }
    }
    if rewrite_source(ctx, &pkt.src, pkt.sport, &flow.addr, flow.port, &pkt).is_err() {
        return;
    }
    if let Some(stats) = STATS.get_ptr_mut(stats_index(flow.service, flow.slot)) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*stats).packets_out += 1;
            (*stats).bytes_out += ctx.len() as u64;
        }
    }
}

/// Telemetry from a backend TCP segment: handshake, reset, HTTP status line.
#[inline(always)]
fn observe(
    ctx: &TcContext,
    entry: *mut canary_common::FlowValue,
    flow: &canary_common::FlowValue,
    pkt: &crate::parse::Packet,
) {
    if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        telemetry::handshake(entry);
    }
    if pkt.tcp_flags & TCP_RST != 0 && flow.flags & FLOW_CLOSING == 0 {
        telemetry::reset(flow);
    }
    if (ctx.len() as usize) < pkt.payload_off + 12 {
        return;
    }
    if let Ok(head) = ctx.load::<[u8; 12]>(pkt.payload_off) {
        if head[..7] == *b"HTTP/1." {
            telemetry::response(entry, pkt.seq, head[9]);
        }
    }
}

#[inline(always)]
fn rewrite_source(
    ctx: &TcContext,
    old_addr: &[u32; 4],
    old_port: u16,
    addr: &[u32; 4],
    port: u16,
    pkt: &crate::parse::Packet,
) -> Result<(), i64> {
    let check_off = pkt.l4_check_off();
    let mangled = if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    if pkt.family == FAMILY_V4 {
        ctx.l4_csum_replace(check_off, old_addr[0] as u64, addr[0] as u64, pseudo)?;
        ctx.l3_csum_replace(IP_CHECK_OFF_V4, old_addr[0] as u64, addr[0] as u64, 4)?;
        ctx.store(IP_SRC_OFF_V4, &addr[0], 0)?;
    } else {
        for i in 0..4 {
            ctx.l4_csum_replace(check_off, old_addr[i] as u64, addr[i] as u64, pseudo)?;
        }
        ctx.store(IP_SRC_OFF_V6, addr, 0)?;
    }
    ctx.l4_csum_replace(check_off, old_port as u64, port as u64, mangled | 2)?;
    ctx.store(pkt.l4_off, &port, 0)?;
    Ok(())
}
