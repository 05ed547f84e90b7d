//! Backend -> client: replies of pinned flows get the service address back as their
//! source. Runs at TC egress where packets may still carry CHECKSUM_PARTIAL (forwarded
//! from a local veth), so checksums go through the kernel's csum helpers, which handle
//! both partial and complete checksums correctly.

use aya_ebpf::programs::TcContext;
use canary_common::{stats_index, FlowKey, DIR_REPLY, FLOW_CLOSING, PROTO_TCP};

use crate::{
    checksum::{tc_rewrite, Side},
    frame::{tc_headers_linear, Frame},
    maps::{FLOWS, STATS},
    parse::{parse, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    telemetry,
};

#[inline(always)]
pub fn handle(ctx: &TcContext) {
    if !tc_headers_linear(ctx) {
        return;
    }
    let Some(pkt) = parse(ctx.data(), ctx.data_end()) else {
        return;
    };
    // Cut short: not rewritten, and it must not advance the flow.
    if ctx.cut_short(&pkt) {
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
            let len = ctx.payload_len(&pkt);
            telemetry::track(entry, flow.tcp, pkt.seq, len, pkt.tcp_flags, ack);
        }
        observe(ctx, entry, &flow, &pkt);
        if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            unsafe { (*entry).flags |= FLOW_CLOSING };
        }
    }
    if tc_rewrite(ctx, &pkt, Side::Source, &flow.addr, flow.port).is_err() {
        return;
    }
    if let Some(stats) = STATS.get_ptr_mut(stats_index(flow.service, flow.slot)) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*stats).packets_out += 1;
            (*stats).bytes_out += Frame::len(ctx) as u64;
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
