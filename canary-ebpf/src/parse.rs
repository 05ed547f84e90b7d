//! Header parsing shared by both directions. It only accepts what the datapath can
//! rewrite safely (plain Ethernet, IPv4 without options or fragments, IPv6 with TCP or
//! UDP as the first header, lengths that agree with each other: the IP length holds
//! the L4 header, the TCP data offset lies within 5..=segment, the UDP length within
//! 8..=IP payload); everything else is reported as "not ours" and passes.
//!
//! Whether the frame holds the whole IP packet (`Packet::ip_end`) is left to the
//! caller: at XDP the frame ends at `data_end`, at TC `data_end` only ends the linear
//! part of the skb and the packet may go on in fragments.

use canary_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;

pub use canary_common::{
    TCP_FLAG_ACK as TCP_ACK, TCP_FLAG_FIN as TCP_FIN, TCP_FLAG_RST as TCP_RST,
    TCP_FLAG_SYN as TCP_SYN,
};

/// The parts of a packet the datapath decides on, plus where to rewrite them.
pub struct Packet {
    pub family: u8,
    pub proto: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Ports in network byte order, as they sit in the packet.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// TCP sequence number as loaded (0 for UDP).
    pub seq: u32,
    pub l4_off: usize,
    /// Where the L4 payload starts.
    pub payload_off: usize,
    /// Where the IP packet ends as its header claims (offset in the frame), or 0 when
    /// the length field is 0: the kernel's BIG TCP packets (over 64 KiB) carry no
    /// length and take it from the skb.
    pub ip_end: usize,
}

impl Packet {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        self.l4_off + if self.proto == PROTO_TCP { 16 } else { 6 }
    }
}

pub const IP_SRC_OFF_V4: usize = ETH_LEN + 12;
pub const IP_DST_OFF_V4: usize = ETH_LEN + 16;
pub const IP_CHECK_OFF_V4: usize = ETH_LEN + 10;
pub const IP_SRC_OFF_V6: usize = ETH_LEN + 8;
pub const IP_DST_OFF_V6: usize = ETH_LEN + 24;

#[inline(always)]
fn at<T>(data: usize, end: usize, off: usize) -> Option<*const T> {
    if data + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((data + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(data: usize, end: usize, off: usize) -> Option<T> {
    // SAFETY: bounds were checked against the end of the packet; unaligned reads are
    // used because headers need not be aligned.
    at::<T>(data, end, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Parses the packet between `data` and `end`; `None` means "not ours".
#[inline(always)]
pub fn parse(data: usize, end: usize) -> Option<Packet> {
    let ethertype = u16::from_be(read::<u16>(data, end, 12)?);
    // `len` is the IP length field, `counted` the header bytes it includes and `base`
    // the frame offset it counts from.
    let (family, proto, src, dst, l4_off, len, counted, base) = match ethertype {
        ETH_P_IP => {
            let ver_ihl: u8 = read(data, end, ETH_LEN)?;
            // IHL other than 5 means IP options: not rewritten, passes untouched.
            if ver_ihl != 0x45 {
                return None;
            }
            let frag = u16::from_be(read::<u16>(data, end, ETH_LEN + 6)?);
            // More-fragments flag or a fragment offset: ports are not reliably present.
            if frag & 0x3FFF != 0 {
                return None;
            }
            let proto: u8 = read(data, end, ETH_LEN + 9)?;
            let src: u32 = read(data, end, IP_SRC_OFF_V4)?;
            let dst: u32 = read(data, end, IP_DST_OFF_V4)?;
            let total = u16::from_be(read::<u16>(data, end, ETH_LEN + 2)?) as usize;
            (
                FAMILY_V4,
                proto,
                [src, 0, 0, 0],
                [dst, 0, 0, 0],
                ETH_LEN + IPV4_LEN,
                total,
                IPV4_LEN,
                ETH_LEN,
            )
        }
        ETH_P_IPV6 => {
            let ver: u8 = read(data, end, ETH_LEN)?;
            if ver >> 4 != 6 {
                return None;
            }
            let proto: u8 = read(data, end, ETH_LEN + 6)?;
            let src: [u32; 4] = read(data, end, IP_SRC_OFF_V6)?;
            let dst: [u32; 4] = read(data, end, IP_DST_OFF_V6)?;
            let payload = u16::from_be(read::<u16>(data, end, ETH_LEN + 4)?) as usize;
            (
                FAMILY_V6,
                proto,
                src,
                dst,
                ETH_LEN + IPV6_LEN,
                payload,
                0,
                ETH_LEN + IPV6_LEN,
            )
        }
        _ => return None,
    };
    let l4_min = match proto {
        PROTO_TCP => TCP_MIN_LEN,
        PROTO_UDP => UDP_LEN,
        _ => return None,
    };
    // An IP length that cannot even hold the L4 header: not a packet to rewrite.
    let ip_end = if len == 0 {
        0
    } else if len < counted + l4_min {
        return None;
    } else {
        base + len
    };
    let ports: [u16; 2] = match proto {
        PROTO_TCP => {
            at::<[u8; TCP_MIN_LEN]>(data, end, l4_off)?;
            read(data, end, l4_off)?
        }
        PROTO_UDP => {
            at::<[u8; UDP_LEN]>(data, end, l4_off)?;
            read(data, end, l4_off)?
        }
        _ => return None,
    };
    let (tcp_flags, seq, payload_off) = if proto == PROTO_TCP {
        let doff = (read::<u8>(data, end, l4_off + 12)? >> 4) as usize;
        // A data offset below the fixed header or past the segment: the payload (and
        // the telemetry read from it) would start in the wrong place.
        if doff < 5 || (ip_end != 0 && l4_off + doff * 4 > ip_end) {
            return None;
        }
        (
            read::<u8>(data, end, l4_off + 13)?,
            read::<u32>(data, end, l4_off + 4)?,
            l4_off + doff * 4,
        )
    } else {
        if ip_end != 0 {
            let udp_len = u16::from_be(read::<u16>(data, end, l4_off + 4)?) as usize;
            if udp_len < UDP_LEN || l4_off + udp_len > ip_end {
                return None;
            }
        }
        (0, 0, l4_off + UDP_LEN)
    };
    Some(Packet {
        family,
        proto,
        src,
        dst,
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
        seq,
        l4_off,
        payload_off,
        ip_end,
    })
}
