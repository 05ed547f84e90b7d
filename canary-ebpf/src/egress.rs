//! Backend -> client: replies of pinned flows get the service address back as their
//! source. Runs at TC egress of the client-facing interface, where packets may still
//! carry CHECKSUM_PARTIAL (forwarded from a local veth), so the L4 checksum goes
//! through the kernel's csum helper. Replies of flows placed under `forward =
//! "redirect"` are taken already at the TC ingress of the backend's interface (when
//! the agent is attached there), rewritten the same way and redirected to the client's
//! next hop: a connection then skips IP forwarding both ways.

use aya_ebpf::programs::TcContext;
use canary_common::{FlowKey, DIR_REPLY, FLOW_CLOSING, FLOW_REDIRECT, PROTO_TCP};

use crate::{
    checksum::{tc_rewrite, Side},
    frame::Frame,
    ingress::Rewritten,
    maps::{FLOWS, STATS},
    parse::{parse, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    telemetry,
};

/// Where the reply is seen: at the client-facing egress every flow's replies are
/// rewritten; at a backend-facing ingress only those of redirected flows.
#[derive(Clone, Copy, PartialEq)]
pub enum At {
    Egress,
    Ingress,
}

/// Rewrites a reply of a pinned flow (the caller has made its headers linear);
/// `Some`: what a FIB lookup for its way to the client needs.
#[inline(always)]
pub fn handle(ctx: &TcContext, at: At) -> Option<Rewritten> {
    let pkt = parse(ctx.data(), ctx.data_end())?;
    // Cut short: not rewritten, and it must not advance the flow.
    if ctx.cut_short(&pkt) {
        return None;
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
    let entry = FLOWS.get_ptr_mut(&key)?;
    // SAFETY: LRU entry valid during the program run; a torn read of a field written
    // concurrently only makes it stale.
    let flow = unsafe { *entry };
    if at == At::Ingress && flow.flags & FLOW_REDIRECT == 0 {
        return None;
    }
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
    tc_rewrite(ctx, &pkt, Side::Source, &flow.addr, flow.port).ok()?;
    if let Some(stats) = STATS.get_ptr_mut(flow.stats) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*stats).packets_out += 1;
            (*stats).bytes_out += Frame::len(ctx) as u64;
        }
    }
    Some(Rewritten {
        forward: flow.forwarding(),
        family: pkt.family,
        proto: pkt.proto,
        sport: flow.port,
        dport: pkt.dport,
        src: flow.addr,
        dst: pkt.dst,
    })
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
