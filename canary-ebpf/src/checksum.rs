//! Address and port rewrites with their checksum updates. XDP sees frames as they came
//! off the wire, so the L4 checksum is complete and RFC 1624 arithmetic (from
//! canary-common, unit-tested in userspace) applies directly. At TC a packet may carry
//! CHECKSUM_PARTIAL (sent by a local stack through a veth), so the L4 checksum there
//! goes through the kernel's csum helper, which handles partial and complete ones.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use canary_common::{csum, FAMILY_V4, PROTO_UDP};

use crate::parse::{
    Packet, IP_CHECK_OFF_V4, IP_DST_OFF_V4, IP_DST_OFF_V6, IP_SRC_OFF_V4, IP_SRC_OFF_V6,
};

/// Which end of the packet a TC rewrite changes.
#[derive(Clone, Copy, PartialEq)]
pub enum Side {
    /// Client -> service: the destination becomes the backend.
    Destination,
    /// Backend -> client: the source becomes the service address again.
    Source,
}

/// Rewrites `side`'s address and port of `pkt` to `addr:port` at TC. The headers are
/// in the linear part ([`crate::frame::tc_headers_linear`]) and the program writes
/// them directly, IPv4 header checksum included (always complete). Only the L4
/// checksum needs the kernel, which alone knows whether it is partial (then only the
/// pseudo-header part changes) or complete: two helper calls, address (as one diff)
/// and port. Each helper call costs a return through the CPU's return-stack
/// mitigation on this machine kind, so fewer calls is what makes the rewrite cheaper.
#[inline(always)]
pub fn tc_rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    side: Side,
    addr: &[u32; 4],
    port: u16,
) -> Result<(), i64> {
    let (old_addr, old_port, port_off, (off_v4, off_v6)) = match side {
        Side::Destination => (
            &pkt.dst,
            pkt.dport,
            pkt.l4_off + 2,
            (IP_DST_OFF_V4, IP_DST_OFF_V6),
        ),
        Side::Source => (
            &pkt.src,
            pkt.sport,
            pkt.l4_off,
            (IP_SRC_OFF_V4, IP_SRC_OFF_V6),
        ),
    };
    let check_off = pkt.l4_check_off();
    let (data, end) = (ctx.data(), ctx.data_end());
    let port_at = field::<u16>(data, end, port_off).ok_or(-1i64)?;
    // SAFETY: every pointer is bounds-checked before it is written; the program's
    // direct writes make the verifier unclone a shared head before the program runs.
    unsafe {
        if pkt.family == FAMILY_V4 {
            let ip_check = field::<u16>(data, end, IP_CHECK_OFF_V4).ok_or(-1i64)?;
            let ip_addr = field::<u32>(data, end, off_v4).ok_or(-1i64)?;
            let check = csum::replace32(core::ptr::read_unaligned(ip_check), old_addr[0], addr[0]);
            core::ptr::write_unaligned(ip_check, check);
            core::ptr::write_unaligned(ip_addr, addr[0]);
        } else {
            let ip_addr = field::<[u32; 4]>(data, end, off_v6).ok_or(-1i64)?;
            core::ptr::write_unaligned(ip_addr, *addr);
        }
        core::ptr::write_unaligned(port_at, port);
    }
    // UDP over IPv4 may carry no checksum: the helper keeps a zero one zero.
    let mangled = if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if pkt.family == FAMILY_V4 {
        ctx.l4_csum_replace(
            check_off,
            old_addr[0] as u64,
            addr[0] as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )?;
    } else {
        let diff = csum::addr_diff(old_addr, addr);
        ctx.l4_csum_replace(check_off, 0, diff as u64, BPF_F_PSEUDO_HDR as u64 | mangled)?;
    }
    ctx.l4_csum_replace(check_off, old_port as u64, port as u64, mangled | 2)?;
    Ok(())
}

#[inline(always)]
fn field<T>(data: usize, end: usize, off: usize) -> Option<*mut T> {
    if data + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((data + off) as *mut T)
}

/// Rewrites destination address and port of `pkt` to `addr:port`; `None` if the
/// packet is shorter than its headers claimed (nothing has been written then). The
/// caller (ingress) has already refused frames that do not hold their whole IP packet.
#[inline(always)]
pub fn rewrite_destination(
    data: usize,
    end: usize,
    pkt: &Packet,
    addr: &[u32; 4],
    port: u16,
) -> Option<()> {
    let l4_check = field::<u16>(data, end, pkt.l4_check_off())?;
    let dport = field::<u16>(data, end, pkt.l4_off + 2)?;
    // SAFETY: every pointer was bounds-checked above or below before it is written.
    unsafe {
        let old_l4 = core::ptr::read_unaligned(l4_check);
        // UDP over IPv4 may carry no checksum (zero): keep it that way.
        let skip_l4 = pkt.proto == PROTO_UDP && pkt.family == FAMILY_V4 && old_l4 == 0;
        let mut l4 = csum::replace_addr(old_l4, &pkt.dst, addr);
        l4 = csum::replace16(l4, pkt.dport, port);
        if pkt.family == FAMILY_V4 {
            let ip_check = field::<u16>(data, end, IP_CHECK_OFF_V4)?;
            let ip_dst = field::<u32>(data, end, IP_DST_OFF_V4)?;
            let ip = csum::replace32(core::ptr::read_unaligned(ip_check), pkt.dst[0], addr[0]);
            core::ptr::write_unaligned(ip_check, ip);
            core::ptr::write_unaligned(ip_dst, addr[0]);
        } else {
            let ip_dst = field::<[u32; 4]>(data, end, IP_DST_OFF_V6)?;
            core::ptr::write_unaligned(ip_dst, *addr);
        }
        core::ptr::write_unaligned(dport, port);
        if !skip_l4 {
            // A computed zero UDP checksum is sent as all ones (RFC 768).
            let l4 = if pkt.proto == PROTO_UDP && l4 == 0 {
                0xFFFF
            } else {
                l4
            };
            core::ptr::write_unaligned(l4_check, l4);
        }
    }
    Some(())
}
