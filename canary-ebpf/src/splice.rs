//! `sk_skb` stream verdict on spliced sockets: every byte of the connection, the first
//! request head included, moves between client and backend in the kernel
//! (`bpf_sk_redirect_hash`). The agent only peeks at the head to decide, and writes a
//! socket's peer before the socket joins the splice, so there is no hand-off: the
//! kernel carries the byte stream from its first byte. Counts requests, response
//! classes and latency per version like the XDP path, and the bytes carried.

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SkBuffContext,
};
use canary_common::{histogram::latency_bucket, latency_index, SPLICE_REQUESTS};

use crate::maps::{LATENCY, ROUTE_BYTES, ROUTE_PEERS, ROUTE_SOCKS, ROUTE_STATE, TELEMETRY};
use crate::telemetry::is_request;

#[inline(always)]
pub fn verdict(ctx: &SkBuffContext) -> u32 {
    // SAFETY: the skb pointer is valid for the program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    // SAFETY: agent-written value, copied out.
    let Some(peer) = (unsafe { ROUTE_PEERS.get(&cookie) }).copied() else {
        return SK_PASS;
    };
    let len = ctx.len() as u64;
    let state = ROUTE_STATE.get_ptr_mut(&cookie);
    let version = peer.service * 2 + (peer.version & 1) as u32;
    if peer.dir == SPLICE_REQUESTS {
        if let Ok(first) = ctx.load::<[u8; 4]>(0) {
            if is_request(first) {
                if let Some(v) = TELEMETRY.get_ptr_mut(version) {
                    // SAFETY: per-CPU slot.
                    unsafe { (*v).requests += 1 };
                }
                if let Some(s) = state {
                    // SAFETY: as above.
                    unsafe { (*s).request_ns = bpf_ktime_get_ns() };
                }
            }
        }
    } else if let Ok(line) = ctx.load::<[u8; 12]>(0) {
        let class = line[9];
        if &line[..7] == b"HTTP/1." && (b'1'..=b'5').contains(&class) {
            if let Some(v) = TELEMETRY.get_ptr_mut(version) {
                // SAFETY: per-CPU slot.
                unsafe { (*v).responses[((class - b'1') & 7) as usize % 5] += 1 };
            }
            if let Some(client) = ROUTE_STATE.get_ptr_mut(&peer.peer) {
                // SAFETY: as above.
                let started = unsafe { (*client).request_ns };
                if started != 0 {
                    unsafe { (*client).request_ns = 0 };
                    let bucket =
                        latency_bucket(unsafe { bpf_ktime_get_ns() }.saturating_sub(started));
                    if let Some(count) = LATENCY.get_ptr_mut(latency_index(version, bucket)) {
                        // SAFETY: per-CPU slot.
                        unsafe { *count += 1 };
                    }
                }
            }
        }
    }
    if let Some(bytes) = ROUTE_BYTES.get_ptr_mut(peer.service) {
        // SAFETY: per-CPU slot.
        unsafe { *bytes += len };
    }
    let verdict = ROUTE_SOCKS.redirect_skb(ctx, peer.peer, 0) as u32;
    if verdict == SK_PASS {
        if let Some(s) = state {
            // SAFETY: as above.
            unsafe { (*s).carried += len };
        }
    }
    verdict
}
