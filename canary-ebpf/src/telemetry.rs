//! Application signals seen on the wire, with no change to the application: HTTP/1.x
//! request starts (client segments), response status lines (backend segments), the
//! request -> response latency, backend resets and handshake times. Counted once per
//! segment sequence number, so retransmissions do not count twice. Also each
//! direction's TCP sequence state, which lets the agent close an idle connection
//! itself (drain).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use canary_common::{
    histogram::latency_bucket, latency_index, telemetry_index, FlowValue, TcpSeq, FLOW_ESTABLISHED,
};

use crate::maps::{LATENCY, STATS, TELEMETRY};

/// First four bytes of the HTTP/1.x methods, as loaded from the packet.
const METHODS: [[u8; 4]; 9] = [
    *b"GET ", *b"POST", *b"PUT ", *b"HEAD", *b"DELE", *b"PATC", *b"OPTI", *b"CONN", *b"TRAC",
];

#[inline(always)]
fn version(flow: &FlowValue) -> Option<&'static mut canary_common::VersionTelemetry> {
    let p = TELEMETRY.get_ptr_mut(telemetry_index(flow.service, flow.group))?;
    // SAFETY: per-CPU slot, only this program run on this CPU touches it.
    Some(unsafe { &mut *p })
}

#[inline(always)]
pub fn is_request(first: [u8; 4]) -> bool {
    let mut i = 0;
    while i < METHODS.len() {
        if first == METHODS[i] {
            return true;
        }
        i += 1;
    }
    false
}

/// A client segment that starts an HTTP request: count it and stamp the reply entry
/// so the response can be timed. `forward` holds the last counted sequence number.
#[inline(always)]
pub fn request(forward: *mut FlowValue, reply: Option<*mut FlowValue>, seq: u32) {
    // SAFETY: LRU entries stay valid for the program run; plain field writes.
    unsafe {
        if (*forward).last_seq == seq && seq != 0 {
            return;
        }
        (*forward).last_seq = seq;
        if let Some(v) = version(&*forward) {
            v.requests += 1;
        }
        if let Some(r) = reply {
            (*r).ts_ns = bpf_ktime_get_ns();
        }
    }
}

/// A backend segment starting with an HTTP/1.x status line: count its class and, if
/// a request is pending, its latency.
#[inline(always)]
pub fn response(reply: *mut FlowValue, seq: u32, class_digit: u8) {
    if !(b'1'..=b'5').contains(&class_digit) {
        return;
    }
    // SAFETY: as above.
    unsafe {
        if (*reply).last_seq == seq && seq != 0 {
            return;
        }
        (*reply).last_seq = seq;
        let flow = &*reply;
        let index = telemetry_index(flow.service, flow.group);
        if let Some(v) = version(flow) {
            v.responses[((class_digit - b'1') & 7) as usize % 5] += 1;
        }
        let started = (*reply).ts_ns;
        if started != 0 {
            (*reply).ts_ns = 0;
            let bucket = latency_bucket(bpf_ktime_get_ns().saturating_sub(started));
            if let Some(count) = LATENCY.get_ptr_mut(latency_index(index, bucket)) {
                *count += 1;
            }
        }
    }
}

/// The backend's SYN-ACK: handshake time from the SYN stamped at placement, and one
/// answered handshake for the backend (passive health).
#[inline(always)]
pub fn handshake(reply: *mut FlowValue) {
    // SAFETY: as above.
    unsafe {
        if (*reply).flags & FLOW_ESTABLISHED != 0 {
            return;
        }
        (*reply).flags |= FLOW_ESTABLISHED;
        if let Some(stats) = STATS.get_ptr_mut((*reply).stats) {
            (*stats).handshakes += 1;
        }
        let started = (*reply).ts_ns;
        (*reply).ts_ns = 0;
        if let Some(v) = version(&*reply) {
            v.handshakes += 1;
            if started != 0 {
                v.handshake_ns += bpf_ktime_get_ns().saturating_sub(started);
            }
        }
    }
}

/// A reset from the backend (counted once per connection); before its SYN-ACK it is
/// a refused connection of that backend (passive health).
#[inline(always)]
pub fn reset(reply: &FlowValue) {
    if let Some(v) = version(reply) {
        v.resets += 1;
    }
    if reply.flags & FLOW_ESTABLISHED == 0 {
        if let Some(stats) = STATS.get_ptr_mut(reply.stats) {
            // SAFETY: per-CPU slot.
            unsafe { (*stats).refused += 1 };
        }
    }
}

/// A TCP segment of a pinned flow: advances its direction's sequence state (`old` is
/// the entry's state as read at lookup). One 8-byte store into the entry the caller
/// already holds; `seq` and `ack` as loaded from the packet (network byte order).
#[inline(always)]
pub fn track(entry: *mut FlowValue, old: TcpSeq, seq: u32, payload_len: u32, flags: u8, ack: u32) {
    let new = old.advance(u32::from_be(seq), payload_len, flags, u32::from_be(ack));
    // SAFETY: LRU entry valid for the program run; an aligned 8-byte field. A racing
    // writer on another CPU (same flow, rare) can only lose one update, which the
    // drain's quiet period absorbs.
    unsafe { (*entry).tcp = new };
}
