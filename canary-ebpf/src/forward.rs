//! Forwarding a rewritten packet at TC ingress straight to its next hop's interface
//! (`forward = "redirect"`) instead of handing it to the stack's IP forwarding: a
//! client's packet towards its backend, and, on a backend-facing interface, a
//! redirected flow's reply towards the client. The kernel's own FIB answers where it
//! goes (routes, neighbours, the interface's forwarding switch, the MTU), the program
//! does what a router does to the packet (TTL or hop limit down by one, Ethernet
//! addresses of the next hop) and redirects it to that interface's egress. Anything
//! the FIB cannot answer at once (no neighbour entry yet, forwarding off, too big, TTL
//! running out) goes to the stack as before, which resolves the neighbour or sends the
//! ICMP error.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::TcContext,
    EbpfContext,
};
use canary_common::{csum, FAMILY_V4};

use crate::{ingress::Rewritten, maps::FIB, parse::ETH_LEN};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// TTL (IPv4) and hop limit (IPv6) offsets in the frame.
const TTL_OFF_V4: usize = ETH_LEN + 8;
const HOP_LIMIT_OFF_V6: usize = ETH_LEN + 7;
const IP_CHECK_OFF_V4: usize = ETH_LEN + 10;

/// Redirects the rewritten packet to the next hop's interface; TC_ACT_OK (the stack
/// forwards it) whenever the FIB has no complete answer.
#[inline(always)]
pub fn redirect(ctx: &TcContext, pkt: &Rewritten) -> i32 {
    let Some(fib) = FIB.get_ptr_mut(0) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: this CPU's slot, used by this program run only; an all-zero
    // bpf_fib_lookup is a valid value (plain integers and unions of them).
    let fib = unsafe {
        core::ptr::write_bytes(fib, 0, 1);
        &mut *fib
    };
    fib.family = if pkt.family == FAMILY_V4 {
        AF_INET
    } else {
        AF_INET6
    };
    fib.l4_protocol = pkt.proto;
    fib.sport = pkt.sport;
    fib.dport = pkt.dport;
    // tot_len 0: the kernel checks the MTU against the skb itself (GSO aware).
    // SAFETY: reading a field of the context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if pkt.family == FAMILY_V4 {
        fib.__bindgen_anon_3.ipv4_src = pkt.src[0];
        fib.__bindgen_anon_4.ipv4_dst = pkt.dst[0];
    } else {
        fib.__bindgen_anon_3.ipv6_src = pkt.src;
        fib.__bindgen_anon_4.ipv6_dst = pkt.dst;
    }
    // SAFETY: `fib` is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || next_hop(ctx, pkt, fib).is_none() {
        return TC_ACT_OK as i32;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(fib.ifindex, 0) as i32 }
}

/// What the stack would do to a forwarded packet: one hop less to live, the next hop's
/// Ethernet addresses. `None` (nothing written) when the TTL runs out here: the stack
/// sends the ICMP time-exceeded.
#[inline(always)]
fn next_hop(ctx: &TcContext, pkt: &Rewritten, fib: &bpf_fib_lookup) -> Option<()> {
    let (data, end) = (ctx.data(), ctx.data_end());
    // SAFETY: each access is within the Ethernet and IP headers, checked first; the
    // rewrite made the head writable.
    unsafe {
        if pkt.family == FAMILY_V4 {
            if data + ETH_LEN + 20 > end {
                return None;
            }
            let word = (data + TTL_OFF_V4) as *mut u16;
            let old = core::ptr::read_unaligned(word);
            let ttl = *(word as *const u8);
            if ttl <= 1 {
                return None;
            }
            *(word as *mut u8) = ttl - 1;
            let new = core::ptr::read_unaligned(word);
            let check = (data + IP_CHECK_OFF_V4) as *mut u16;
            core::ptr::write_unaligned(
                check,
                csum::replace16(core::ptr::read_unaligned(check), old, new),
            );
        } else {
            if data + ETH_LEN + 40 > end {
                return None;
            }
            let hop = (data + HOP_LIMIT_OFF_V6) as *mut u8;
            if *hop <= 1 {
                return None;
            }
            *hop -= 1;
        }
        core::ptr::write_unaligned(data as *mut [u8; 6], fib.dmac);
        core::ptr::write_unaligned((data + 6) as *mut [u8; 6], fib.smac);
    }
    Some(())
}
