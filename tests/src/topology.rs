//! The four-namespace lab: client -> node -> {stable, canary}.
//!
//! ```text
//!  client eth0 ── cli0 node stb0 ── eth0 stable
//!                           can0 ── eth0 canary
//! ```
//!
//! The node routes between the three links. The client routes the VIP ranges
//! to the node, where the XDP program under test rewrites them, and also the
//! backends' subnets, so the lab works (and is tested) without the balancer.

use crate::backend::{self, Backends};
use crate::netns::NetNs;
use anyhow::{bail, Result};
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The service's IPv4 virtual address (inside the client's VIP route).
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// The service's IPv6 virtual address (inside the client's VIP route).
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
/// IPv4 range the client routes to the node.
pub const VIP_RANGE_V4: &str = "198.19.0.0/16";
/// IPv6 range the client routes to the node.
pub const VIP_RANGE_V6: &str = "2001:db8:ffff::/48";

/// The stable link's IPv4 subnet, routed from the client via the node.
pub const STABLE_NET_V4: &str = "198.18.2.0/24";
/// The stable link's IPv6 subnet, routed from the client via the node.
pub const STABLE_NET_V6: &str = "2001:db8:2::/64";
/// The canary link's IPv4 subnet, routed from the client via the node.
pub const CANARY_NET_V4: &str = "198.18.3.0/24";
/// The canary link's IPv6 subnet, routed from the client via the node.
pub const CANARY_NET_V6: &str = "2001:db8:3::/64";

/// The node's interface facing the client: where the XDP program attaches and
/// whose TC egress restores the VIP on replies.
pub const NODE_CLIENT_IFACE: &str = "cli0";
/// The node's interface facing the stable backend.
pub const NODE_STABLE_IFACE: &str = "stb0";
/// The node's interface facing the canary backend.
pub const NODE_CANARY_IFACE: &str = "can0";
/// The interface name inside each leaf namespace (client, stable, canary).
pub const LEAF_IFACE: &str = "eth0";

/// The client's primary IPv4 address.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The client's primary IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The node's IPv4 address on the client link (the client's gateway).
pub const NODE_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The node's IPv6 address on the client link.
pub const NODE_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// The node's IPv4 address on the stable link (the stable backend's gateway).
pub const NODE_STABLE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// The node's IPv6 address on the stable link.
pub const NODE_STABLE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// The node's IPv4 address on the canary link (the canary backend's gateway).
pub const NODE_CANARY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
/// The node's IPv6 address on the canary link.
pub const NODE_CANARY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1);
/// The stable backend's real IPv4 address.
pub const STABLE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// The stable backend's real IPv6 address.
pub const STABLE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// The canary backend's real IPv4 address.
pub const CANARY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
/// The canary backend's real IPv6 address.
pub const CANARY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2);

/// Last octet / group of the first extra client address; keeps them clear of
/// the fixed addresses.
const EXTRA_CLIENT_BASE: u16 = 10;
/// Extra addresses stop at .254 of the client's /24.
const EXTRA_CLIENT_MAX: usize = 245;

/// Which backend a thing belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    Stable,
    Canary,
}

impl Version {
    pub const ALL: [Version; 2] = [Version::Stable, Version::Canary];

    /// The name the backend announces (banner, echo greeting, UDP reply,
    /// `x-canary-version`, metric label).
    pub fn name(self) -> &'static str {
        match self {
            Version::Stable => "stable",
            Version::Canary => "canary",
        }
    }

    /// The backend's real IPv4 address.
    pub fn v4(self) -> Ipv4Addr {
        match self {
            Version::Stable => STABLE_V4,
            Version::Canary => CANARY_V4,
        }
    }

    /// The backend's real IPv6 address.
    pub fn v6(self) -> Ipv6Addr {
        match self {
            Version::Stable => STABLE_V6,
            Version::Canary => CANARY_V6,
        }
    }

    /// The node's interface towards this backend.
    pub fn node_iface(self) -> &'static str {
        match self {
            Version::Stable => NODE_STABLE_IFACE,
            Version::Canary => NODE_CANARY_IFACE,
        }
    }
}

/// The lab's namespaces. Dropping it deletes them all and kills whatever runs
/// in them; drop sockets opened inside first, since an open socket keeps its
/// (then nameless) namespace and veths alive.
#[derive(Debug)]
pub struct Topology {
    pub client: NetNs,
    pub node: NetNs,
    pub stable: NetNs,
    pub canary: NetNs,
    extra_client_addrs: AtomicUsize,
}

impl Topology {
    /// Creates and wires the four namespaces. On error everything created so
    /// far is removed by the guards.
    pub fn build() -> Result<Topology> {
        let topo = Topology {
            client: NetNs::new("client")?,
            node: NetNs::new("node")?,
            stable: NetNs::new("stable")?,
            canary: NetNs::new("canary")?,
            extra_client_addrs: AtomicUsize::new(0),
        };
        topo.wire()?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        let links = [
            (
                &self.client,
                NODE_CLIENT_IFACE,
                [CLIENT_V4, NODE_CLIENT_V4],
                [CLIENT_V6, NODE_CLIENT_V6],
            ),
            (
                &self.stable,
                NODE_STABLE_IFACE,
                [STABLE_V4, NODE_STABLE_V4],
                [STABLE_V6, NODE_STABLE_V6],
            ),
            (
                &self.canary,
                NODE_CANARY_IFACE,
                [CANARY_V4, NODE_CANARY_V4],
                [CANARY_V6, NODE_CANARY_V6],
            ),
        ];
        for (leaf, node_iface, [leaf_v4, node_v4], [leaf_v6, node_v6]) in links {
            // Created from inside the node with both ends placed by name, so
            // no device ever exists in the root namespace.
            self.node.run(&[
                "ip",
                "link",
                "add",
                node_iface,
                "type",
                "veth",
                "peer",
                "name",
                LEAF_IFACE,
                "netns",
                leaf.name(),
            ])?;
            add_addrs(&self.node, node_iface, node_v4.into(), node_v6.into())?;
            add_addrs(leaf, LEAF_IFACE, leaf_v4.into(), leaf_v6.into())?;
            self.node.run(&["ip", "link", "set", node_iface, "up"])?;
            leaf.run(&["ip", "link", "set", LEAF_IFACE, "up"])?;
        }

        let mut sysctls = vec![
            "net.ipv4.ip_forward=1".to_string(),
            "net.ipv6.conf.all.forwarding=1".to_string(),
            "net.ipv4.conf.all.rp_filter=0".to_string(),
            "net.ipv4.conf.default.rp_filter=0".to_string(),
        ];
        // The effective rp_filter is the max of `all` and the interface's own.
        for iface in [NODE_CLIENT_IFACE, NODE_STABLE_IFACE, NODE_CANARY_IFACE] {
            sysctls.push(format!("net.ipv4.conf.{iface}.rp_filter=0"));
        }
        let mut argv = vec!["sysctl", "-q", "-w"];
        argv.extend(sysctls.iter().map(String::as_str));
        self.node.run(&argv)?;

        // Besides the VIPs, the client reaches the backends' real addresses
        // by plain routing, so the lab can be checked without the balancer.
        let (gw4, gw6) = (NODE_CLIENT_V4.to_string(), NODE_CLIENT_V6.to_string());
        for dest in [VIP_RANGE_V4, STABLE_NET_V4, CANARY_NET_V4] {
            self.client
                .run(&["ip", "route", "add", dest, "via", &gw4])?;
        }
        for dest in [VIP_RANGE_V6, STABLE_NET_V6, CANARY_NET_V6] {
            self.client
                .run(&["ip", "-6", "route", "add", dest, "via", &gw6])?;
        }
        for (leaf, gw4, gw6) in [
            (&self.stable, NODE_STABLE_V4, NODE_STABLE_V6),
            (&self.canary, NODE_CANARY_V4, NODE_CANARY_V6),
        ] {
            leaf.run(&["ip", "route", "add", "default", "via", &gw4.to_string()])?;
            leaf.run(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gw6.to_string(),
            ])?;
            // GRO turns on NAPI for the veth, which the kernel needs before it
            // accepts frames XDP_REDIRECTed into the peer (the node's stb0 or
            // can0); without it they are silently dropped.
            leaf.run(&["ethtool", "-K", LEAF_IFACE, "gro", "on"])?;
        }

        // With tx checksum offload a veth hands its peer CHECKSUM_PARTIAL
        // packets whose L4 checksum field holds only the pseudo-header sum, so
        // the node's XDP program would see (and have to fix up) checksums no
        // packet off a real wire carries. Off, the client sends full
        // checksums; this also turns off TSO, so XDP sees MTU-sized frames.
        self.client
            .run(&["ethtool", "-K", LEAF_IFACE, "tx", "off"])?;
        Ok(())
    }

    /// The namespace of a backend.
    pub fn backend(&self, version: Version) -> &NetNs {
        match version {
            Version::Stable => &self.stable,
            Version::Canary => &self.canary,
        }
    }

    /// All four namespaces, e.g. to check that they are gone after a drop.
    pub fn namespaces(&self) -> [&NetNs; 4] {
        [&self.client, &self.node, &self.stable, &self.canary]
    }

    /// Adds `n` more IPv4 (198.18.1.10, .11, ...) and `n` more IPv6
    /// (2001:db8:1::a, ::b, ...) addresses to the client, so tests can act as
    /// many clients. Returns the IPv4 ones, then the IPv6 ones; the client
    /// helpers use those matching the target's family. Repeated calls continue
    /// the sequence.
    pub fn add_client_addrs(&self, n: usize) -> Result<Vec<IpAddr>> {
        let first = self.extra_client_addrs.fetch_add(n, Ordering::Relaxed);
        if first + n > EXTRA_CLIENT_MAX {
            bail!("at most {EXTRA_CLIENT_MAX} extra client addresses fit in the client /24");
        }
        let mut v4 = Vec::with_capacity(n);
        let mut v6 = Vec::with_capacity(n);
        for i in first..first + n {
            // Bounded by EXTRA_CLIENT_MAX, so the casts cannot truncate.
            let host = EXTRA_CLIENT_BASE + i as u16;
            let a4 = Ipv4Addr::new(198, 18, 1, host as u8);
            let a6 = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, host);
            add_addrs(&self.client, LEAF_IFACE, a4.into(), a6.into())?;
            v4.push(IpAddr::V4(a4));
            v6.push(IpAddr::V6(a6));
        }
        v4.extend(v6);
        Ok(v4)
    }

    /// Starts `lab-backend` (path `bin`) in the stable and canary namespaces
    /// with the standard ports of [`backend`], and waits until
    /// both are listening.
    pub fn start_backends(&self, bin: &Path) -> Result<Backends> {
        Ok(Backends {
            stable: backend::start(&self.stable, bin, Version::Stable)?,
            canary: backend::start(&self.canary, bin, Version::Canary)?,
        })
    }
}

/// Adds one IPv4 /24 and one IPv6 /64 address. `nodad` makes the IPv6 one
/// usable at once instead of after duplicate address detection.
fn add_addrs(ns: &NetNs, iface: &str, v4: IpAddr, v6: IpAddr) -> Result<()> {
    ns.add_address(&format!("{v4}/24"), iface)?;
    ns.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{v6}/64"),
        "dev",
        iface,
        "nodad",
    ])?;
    Ok(())
}
