//! Conversion between configuration values and the wire layout of the maps
//! (addresses and ports kept in network byte order as loaded from packets).

use std::net::{IpAddr, SocketAddr};

use aya::maps::lpm_trie::Key;
use canary_common::{
    Backend, CidrKey, CidrValue, Group, ServiceKey, ServiceValue, CIDR_CANARY, CIDR_KEY_FIXED_BITS,
    CIDR_PERCENT, CIDR_SPLIT, CIDR_STABLE, FAMILY_V4, FAMILY_V6, FORWARD_REDIRECT, FORWARD_STACK,
    MAX_GROUP_BACKENDS, MODE_EXACT, MODE_HASH, PROTO_HTTP, PROTO_TCP, PROTO_UDP, ROUTING_CIDR,
    STICKY_CLIENT_IP, STICKY_CONNECTION,
};
use ipnet::IpNet;

use crate::config::{Forward, Mode, Protocol, ServiceConfig, Sticky};
use crate::policy::routing::{KernelRule, KernelTable, Routing, Target, Version};

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

/// The key of a service whose routing plan is `routing`: an `http` service with a
/// head-free plan is decided by the ingress program like a `tcp` one (the router never
/// sees it), so it is keyed as TCP.
pub fn service_key_for(svc: &ServiceConfig, routing: &Routing) -> ServiceKey {
    let mut key = service_key(svc);
    if svc.protocol == Protocol::Http && routing.head_free() {
        key.proto = PROTO_TCP;
    }
    key
}

/// How a service decided in the kernel is marked in its map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRouting {
    /// The CANARY_CIDR generation in force.
    pub gen: u8,
    /// The user key is the client address: the weight split is sticky per client.
    pub client_key: bool,
    /// The rollout is rolled back: no cohort sends a connection to canary (written with
    /// the rollback's weight, in the same map write).
    pub rolled_back: bool,
}

impl KernelRouting {
    /// Marks `value` as decided by client address.
    pub fn apply(&self, value: &mut ServiceValue) {
        value.routing = ROUTING_CIDR;
        value.cidr_gen = self.gen;
        value.rolled_back = self.rolled_back as u8;
        if self.client_key {
            value.mode = MODE_HASH;
            value.sticky = STICKY_CLIENT_IP;
        }
    }
}

/// The CANARY_CIDR entries of a kernel table for service `id`, generation `gen`: each
/// range, and the default cohort (when it has an assignment) as a zero-length prefix of
/// each family, which every address of the service holds.
pub fn cidr_entries(id: u32, gen: u8, table: &KernelTable) -> Vec<(Key<CidrKey>, CidrValue)> {
    let key = |family: u8, addr: [u32; 4], prefix: u8| {
        let data = CidrKey {
            service: id,
            gen,
            family,
            _pad: [0; 2],
            addr,
        };
        Key::new(CIDR_KEY_FIXED_BITS + prefix as u32, data)
    };
    let value = |rule: &KernelRule| {
        let (action, bp) = match rule.target {
            Some(Target::Version(Version::Stable)) => (CIDR_STABLE, 0),
            Some(Target::Version(Version::Canary)) => (CIDR_CANARY, 0),
            Some(Target::Percent(bp)) => (CIDR_PERCENT, bp),
            None => (CIDR_SPLIT, 0),
        };
        CidrValue {
            cohort: rule.cohort,
            action,
            bp,
        }
    };
    let mut out: Vec<_> = table
        .ranges
        .iter()
        .map(|(net, rule)| {
            let family = match net {
                IpNet::V4(_) => FAMILY_V4,
                IpNet::V6(_) => FAMILY_V6,
            };
            (
                key(family, encode_addr(net.addr()), net.prefix_len()),
                value(rule),
            )
        })
        .collect();
    if let Some(rule) = table.default.as_ref().filter(|r| r.target.is_some()) {
        for family in [FAMILY_V4, FAMILY_V6] {
            out.push((key(family, [0; 4], 0), value(rule)));
        }
    }
    out
}

/// A service as the kernel holds it: its map value and both versions' backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// `gen` is the datapath's to set: the caller's is ignored.
    pub value: ServiceValue,
    /// Stable (`[0]`) and canary (`[1]`).
    pub groups: [GroupSpec; 2],
}

/// One version's backends in config order, and which are out of the selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupSpec {
    pub backends: Vec<SocketAddr>,
    /// `down[i]`: `backends[i]` failed its health checks; as long as `backends`.
    pub down: Vec<bool>,
}

impl GroupSpec {
    fn is_down(&self, i: usize) -> bool {
        self.down.get(i).copied().unwrap_or(false)
    }

    /// Backends taking new connections.
    pub fn up(&self) -> usize {
        (0..self.backends.len())
            .filter(|&i| !self.is_down(i))
            .count()
    }

    /// The kernel's form, its ring built; `stats[i]` is `backends[i]`'s counter slot.
    pub fn encode(&self, stats: &[u16]) -> Group {
        let mut g = Group {
            count: self.backends.len().min(MAX_GROUP_BACKENDS) as u16,
            ..Group::default()
        };
        for (i, addr) in self.backends.iter().take(MAX_GROUP_BACKENDS).enumerate() {
            g.backends[i] = Backend {
                addr: encode_addr(addr.ip()),
                port: encode_port(addr.port()),
                stats: stats.get(i).copied().unwrap_or(0),
            };
            if self.is_down(i) {
                g.down[i / 32] |= 1 << (i % 32);
            }
        }
        canary_common::ring::build(&mut g);
        g
    }

    /// The spec and counter slots of a group read back from the kernel.
    pub fn decode(g: &Group, v6: bool) -> (Self, Vec<u16>) {
        let n = (g.count as usize).min(MAX_GROUP_BACKENDS);
        let spec = GroupSpec {
            backends: g.backends[..n]
                .iter()
                .map(|b| decode_backend(b, v6))
                .collect(),
            down: (0..n).map(|i| g.is_down(i)).collect(),
        };
        (spec, g.backends[..n].iter().map(|b| b.stats).collect())
    }
}

/// A backend's socket address from its wire form.
pub fn decode_backend(b: &Backend, v6: bool) -> SocketAddr {
    let port = u16::from_be_bytes(b.port.to_ne_bytes());
    let ip: IpAddr = if v6 {
        let mut o = [0u8; 16];
        for (i, w) in b.addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        o.into()
    } else {
        b.addr[0].to_ne_bytes().into()
    };
    SocketAddr::new(ip, port)
}

/// The complete entry for a service at `weight_bp`, every backend up.
pub fn encode_service(svc: &ServiceConfig, id: u32, weight_bp: u16) -> ServiceEntry {
    let value = ServiceValue {
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
        forward: match svc.forward {
            Forward::Stack => FORWARD_STACK,
            Forward::Redirect => FORWARD_REDIRECT,
        },
        ..Default::default()
    };
    let group = |list: &[SocketAddr]| GroupSpec {
        backends: list.to_vec(),
        down: vec![false; list.len()],
    };
    ServiceEntry {
        value,
        groups: [group(&svc.stable), group(&svc.canary)],
    }
}

impl ServiceEntry {
    /// With the health checks' selection: `down[g][i]` takes backend `i` of version
    /// `g` out.
    pub fn with_down(mut self, down: [Vec<bool>; 2]) -> Self {
        for (g, mut d) in self.groups.iter_mut().zip(down) {
            d.resize(g.backends.len(), false);
            g.down = d;
        }
        self
    }
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

    #[test]
    fn a_group_round_trips_through_its_kernel_form() {
        let spec = GroupSpec {
            backends: vec![
                "198.18.2.2:8080".parse().unwrap(),
                "198.18.2.3:8081".parse().unwrap(),
            ],
            down: vec![false, true],
        };
        let g = spec.encode(&[7, 9]);
        assert_eq!((g.count, g.up), (2, 1));
        assert!(
            g.ring.iter().all(|&i| i == 0),
            "only the backend up is on the ring"
        );
        assert_eq!(GroupSpec::decode(&g, false), (spec, vec![7, 9]));
        let v6 = GroupSpec {
            backends: vec!["[2001:db8::5]:443".parse().unwrap()],
            down: vec![false],
        };
        assert_eq!(GroupSpec::decode(&v6.encode(&[1]), true).0, v6);
    }
}
