//! Destination rewrite for XDP with incremental checksum updates. XDP sees frames as
//! they came off the wire, so the L4 checksum is complete and RFC 1624 arithmetic
//! (from canary-common, unit-tested in userspace) applies directly.

use canary_common::{csum, FAMILY_V4, PROTO_UDP};

use crate::parse::{Packet, IP_CHECK_OFF_V4, IP_DST_OFF_V4, IP_DST_OFF_V6};

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
