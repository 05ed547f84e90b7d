//! What the ingress logic needs from the hook it runs at. XDP sees one linear frame as
//! it came off the wire, with complete checksums: it reads and rewrites the bytes
//! directly. TC sees an skb: the payload may sit in fragments beyond the linear part,
//! the packet may be a GSO super-packet, and its checksum may be partial (sent by a
//! local stack through a veth), so reads beyond the headers and every rewrite go
//! through the kernel's helpers, which handle each checksum state. On a veth, native
//! XDP copies every packet into a fresh page before the program sees it (TCP hands
//! the stack clones) and takes GSO away from the peer; TC ingress works on the skb as
//! it is, so the agent attaches there on virtual interfaces.

use aya_ebpf::programs::{TcContext, XdpContext};

use crate::{
    checksum,
    parse::{Packet, ETH_P_IP},
};

pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet (at TC, beyond the linear part).
    fn len(&self) -> usize;
    /// Whether the IP packet runs past what the hook holds: cut short, left alone.
    fn cut_short(&self, pkt: &Packet) -> bool;
    /// Payload bytes of a TCP segment (all segments' worth for a GSO packet).
    fn payload_len(&self, pkt: &Packet) -> u32;
    /// Four bytes at `off`, if the packet has them.
    fn load4(&self, off: usize) -> Option<[u8; 4]>;
    /// Rewrites destination address and port; `None` if nothing could be written.
    fn rewrite_destination(&self, pkt: &Packet, addr: &[u32; 4], port: u16) -> Option<()>;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    /// XDP sees the whole frame: an IP packet that runs past its end was cut short, and
    /// one without a length is malformed on the wire (BIG TCP exists only inside the
    /// stack). The kernel drops both.
    #[inline(always)]
    fn cut_short(&self, pkt: &Packet) -> bool {
        pkt.ip_end == 0 || XdpContext::data(self) + pkt.ip_end > XdpContext::data_end(self)
    }

    /// From the IP length: a short frame may carry Ethernet padding.
    #[inline(always)]
    fn payload_len(&self, pkt: &Packet) -> u32 {
        pkt.ip_end.saturating_sub(pkt.payload_off) as u32
    }

    #[inline(always)]
    fn load4(&self, off: usize) -> Option<[u8; 4]> {
        let (data, end) = (XdpContext::data(self), XdpContext::data_end(self));
        if data + off + 4 > end {
            return None;
        }
        // SAFETY: bounds checked just above.
        Some(unsafe { core::ptr::read_unaligned((data + off) as *const [u8; 4]) })
    }

    #[inline(always)]
    fn rewrite_destination(&self, pkt: &Packet, addr: &[u32; 4], port: u16) -> Option<()> {
        checksum::rewrite_destination(
            XdpContext::data(self),
            XdpContext::data_end(self),
            pkt,
            addr,
            port,
        )
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    /// `data_end` only ends the linear part; the skb's length is the whole packet. A
    /// length field of 0 is BIG TCP, whose length is the skb's.
    #[inline(always)]
    fn cut_short(&self, pkt: &Packet) -> bool {
        pkt.ip_end != 0 && pkt.ip_end > TcContext::len(self) as usize
    }

    /// From the IP length when there is one (before the stack trims it, a short
    /// frame's skb may hold Ethernet padding), else from the skb (BIG TCP).
    #[inline(always)]
    fn payload_len(&self, pkt: &Packet) -> u32 {
        let end = if pkt.ip_end != 0 {
            pkt.ip_end
        } else {
            TcContext::len(self) as usize
        };
        end.saturating_sub(pkt.payload_off) as u32
    }

    #[inline(always)]
    fn load4(&self, off: usize) -> Option<[u8; 4]> {
        self.load::<[u8; 4]>(off).ok()
    }

    #[inline(always)]
    fn rewrite_destination(&self, pkt: &Packet, addr: &[u32; 4], port: u16) -> Option<()> {
        checksum::tc_rewrite(self, pkt, checksum::Side::Destination, addr, port).ok()
    }
}

/// Makes sure the headers the parser reads (Ethernet + IPv4 + TCP = 54 bytes, with IPv6
/// 74) are in the skb's linear part. A local stack's TCP segment keeps exactly its
/// headers there and its payload in page fragments, so asking for more than the
/// family needs would pull payload in; and any pull makes the skb writable, which copies
/// the head of a cloned skb (TCP transmits clones), ours or not. `false`: the packet
/// is too short to pull, leave it alone.
#[inline(always)]
pub fn tc_headers_linear(ctx: &TcContext) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    let v4 = data + 14 <= end
        // SAFETY: bounds checked on the line above.
        && u16::from_be(unsafe { core::ptr::read_unaligned((data + 12) as *const u16) })
            == ETH_P_IP;
    let need = if v4 { 54 } else { 74 };
    let want = if ctx.len() < need { ctx.len() } else { need };
    end - data >= want as usize || ctx.pull_data(want).is_ok()
}
