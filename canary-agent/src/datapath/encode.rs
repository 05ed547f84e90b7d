//! Conversion between configuration values and the wire layout of the maps
//! (addresses and ports kept in network byte order as loaded from packets).

use std::net::{IpAddr, SocketAddr};

use canary_common::{
    Backend, ServiceKey, ServiceValue, FAMILY_V4, FAMILY_V6, MAX_GROUP_BACKENDS, MODE_EXACT,
    MODE_HASH, PROTO_HTTP, PROTO_TCP, PROTO_UDP, STICKY_CLIENT_IP, STICKY_CONNECTION,
};

use crate::config::{Mode, Protocol, ServiceConfig, Sticky};

pub fn encode_addr(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

pub fn encode_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

fn family(addr: &SocketAddr) -> u8 {
    if addr.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

pub fn service_key(svc: &ServiceConfig) -> ServiceKey {
    ServiceKey {
        addr: encode_addr(svc.listen.ip()),
        port: encode_port(svc.listen.port()),
        proto: match svc.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Http => PROTO_HTTP,
        },
        family: family(&svc.listen),
    }
}

/// The complete map value for a service at `weight_bp`.
pub fn encode_service(svc: &ServiceConfig, id: u32, weight_bp: u16) -> ServiceValue {
    let mut v = ServiceValue {
        id,
        weight_bp,
        mode: match svc.mode {
            Mode::Hash => MODE_HASH,
            Mode::Exact => MODE_EXACT,
        },
        sticky: match svc.sticky {
            Sticky::Connection => STICKY_CONNECTION,
            Sticky::ClientIp => STICKY_CLIENT_IP,
        },
        n_stable: svc.stable.len() as u8,
        n_canary: svc.canary.len() as u8,
        ..Default::default()
    };
    let groups = [(0, &svc.stable), (MAX_GROUP_BACKENDS, &svc.canary)];
    for (base, list) in groups {
        for (i, addr) in list.iter().enumerate() {
            v.backends[base + i] = Backend {
                addr: encode_addr(addr.ip()),
                port: encode_port(addr.port()),
                _pad: 0,
            };
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_in_packet_order() {
        let v4: IpAddr = "198.19.0.10".parse().unwrap();
        let w = encode_addr(v4);
        assert_eq!(w[0].to_ne_bytes(), [198, 19, 0, 10]);
        assert_eq!(&w[1..], &[0, 0, 0]);
        let v6: IpAddr = "2001:db8:ffff::10".parse().unwrap();
        let w6 = encode_addr(v6);
        assert_eq!(w6[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(w6[3].to_ne_bytes(), [0, 0, 0, 0x10]);
        assert_eq!(encode_port(80).to_ne_bytes(), [0, 80]);
        assert_eq!(encode_port(8080).to_ne_bytes(), [0x1f, 0x90]);
    }
}
