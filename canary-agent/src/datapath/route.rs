//! The router's kernel side: the `sk_lookup` program that hands new connections of
//! `http` services to the agent's listeners, and the maps of spliced sockets whose
//! `sk_skb` verdict moves their bytes in the kernel. The maps are pinned, so a
//! hand-over keeps spliced sockets under the same verdict; the sockets themselves
//! belong to the agent process (a socket leaves the maps when it closes).
//!
//! A routed service address is made local (`ip route local`, router/serve.rs) so that
//! the kernel looks up a socket for it; the addresses are listed in ROUTE_ADDRS, where
//! the sk_lookup program refuses every other port and protocol, so a host daemon bound
//! to 0.0.0.0 does not answer on them. The sk_lookup link is pinned like the others:
//! an agent that exits (or dies) leaves the addresses refusing, not open. An address
//! that is no longer routed loses its local route, then its entry; uninstall removes
//! the routes of all of them.

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{links::FdLink, SkLookup, SkSkb},
};
use canary_common::{
    Group, GroupKey, RouteAddr, ServiceKey, ServiceValue, SplicePeer, SpliceState, FAMILY_V4,
    FAMILY_V6, MAP_GROUPS, MAP_ROUTE_ADDRS, MAP_ROUTE_BYTES, MAP_ROUTE_LISTENERS, MAP_ROUTE_PEERS,
    MAP_ROUTE_SOCKS, MAP_ROUTE_STATE, MAP_SERVICES, PROG_ROUTE_LOOKUP, PROG_ROUTE_VERDICT,
};

use super::encode::encode_addr;
use super::{program, remove_pin, take, Datapath};

/// The sk_lookup link's pin: it stays attached across agent exits, hand-overs and
/// crashes; the next agent attaches its own link, then replaces the pin.
pub(super) const LOOKUP_PIN: &str = "route-lookup";
/// Where agents before the pinned link kept theirs across a hand-over only.
pub(super) const HANDOVER_LOOKUP_PIN: &str = "route-lookup-handover";

pub struct Splicer {
    listeners: SockHash<MapData, u32>,
    socks: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, SplicePeer>,
    state: HashMap<MapData, u64, SpliceState>,
    bytes: PerCpuArray<MapData, u64>,
    /// Second handles on the pinned services and groups maps: live weight and
    /// backends.
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    groups: HashMap<MapData, GroupKey, Group>,
}

fn route_addr(ip: IpAddr) -> RouteAddr {
    RouteAddr {
        addr: encode_addr(ip),
        family: if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
        _pad: [0; 3],
    }
}

fn route_ip(a: &RouteAddr) -> Option<IpAddr> {
    let b = |w: u32| w.to_ne_bytes();
    match a.family {
        FAMILY_V4 => Some(IpAddr::from(b(a.addr[0]))),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (chunk, w) in o.chunks_mut(4).zip(a.addr) {
                chunk.copy_from_slice(&b(w));
            }
            Some(IpAddr::from(o))
        }
        _ => None,
    }
}

/// Removes the `local` route the router added for `ip` (gone already is fine).
fn remove_local_route(ip: IpAddr) -> Result<()> {
    let (flag, prefix) = if ip.is_ipv4() {
        ("-4", 32)
    } else {
        ("-6", 128)
    };
    let out = std::process::Command::new("ip")
        .args([flag, "route", "del", "local"])
        .arg(format!("{ip}/{prefix}"))
        .args(["dev", "lo", "table", "local"])
        .output()
        .context("running ip route")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("No such process") {
        return Ok(());
    }
    Err(anyhow!("ip route del local {ip}: {}", err.trim()))
}

/// Makes ROUTE_ADDRS hold exactly `keep`: an address no longer routed loses its local
/// route first, then its entry (kept, and refusing, if the route cannot be removed).
fn sync_addrs(map: &mut HashMap<MapData, RouteAddr, u32>, keep: &[IpAddr]) -> Result<()> {
    let wanted: Vec<RouteAddr> = keep.iter().map(|ip| route_addr(*ip)).collect();
    let stale: Vec<RouteAddr> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !wanted.contains(k))
        .collect();
    for a in &stale {
        if let Some(ip) = route_ip(a) {
            if let Err(e) = remove_local_route(ip) {
                tracing::warn!(error = %format!("{e:#}"), %ip, "a formerly routed address stays refused");
                continue;
            }
            tracing::info!(%ip, "address no longer routed: local route removed");
        }
        map.remove(a)
            .context("removing an address from ROUTE_ADDRS")?;
    }
    for a in wanted {
        map.insert(a, 1, 0)
            .context("writing a routed address to ROUTE_ADDRS")?;
    }
    Ok(())
}

/// Uninstall: removes the local routes of every address in the pinned ROUTE_ADDRS.
pub(super) fn remove_local_routes(bpffs_dir: &Path) -> Result<()> {
    let pin = bpffs_dir.join(MAP_ROUTE_ADDRS);
    if !pin.exists() {
        return Ok(());
    }
    let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let mut map: HashMap<MapData, RouteAddr, u32> =
        HashMap::try_from(aya::maps::Map::HashMap(data))?;
    sync_addrs(&mut map, &[])
}

impl Datapath {
    /// Loads and attaches the router's programs (sk_lookup in this network namespace,
    /// the verdict on the spliced-socket map) and hands their maps to the router.
    /// `addrs`: the routed services' addresses, refused but for their services from
    /// before the router makes them local.
    pub fn splicer(&mut self, addrs: &[IpAddr]) -> Result<Splicer> {
        let mut routed: HashMap<MapData, RouteAddr, u32> =
            take(&mut self.ebpf, MAP_ROUTE_ADDRS)?.try_into()?;
        sync_addrs(&mut routed, addrs)?;
        let socks: SockHash<MapData, u64> = take(&mut self.ebpf, MAP_ROUTE_SOCKS)?.try_into()?;
        let verdict: &mut SkSkb = program(&mut self.ebpf, PROG_ROUTE_VERDICT)?;
        verdict
            .load()
            .context("loading the sk_skb verdict (verifier)")?;
        verdict
            .attach(socks.fd())
            .context("attaching the sk_skb verdict to ROUTE_SOCKS")?;
        let lookup: &mut SkLookup = program(&mut self.ebpf, PROG_ROUTE_LOOKUP)?;
        lookup
            .load()
            .context("loading the sk_lookup program (verifier)")?;
        let netns = std::fs::File::open("/proc/self/ns/net").context("opening this netns")?;
        let id = lookup
            .attach(netns.as_fd())
            .context("attaching sk_lookup to this network namespace")?;
        let lookup_link: FdLink = lookup.take_link(id)?.into();
        // The previous agent's link goes now that this one is attached (both run in
        // between and agree).
        remove_pin(&self.bpffs_dir.join(HANDOVER_LOOKUP_PIN))?;
        let pin = self.bpffs_dir.join(LOOKUP_PIN);
        remove_pin(&pin)?;
        lookup_link
            .pin(&pin)
            .with_context(|| format!("pinning the sk_lookup link at {}", pin.display()))?;
        let open = |name: &str| {
            let pin = self.bpffs_dir.join(name);
            MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))
        };
        let services = open(MAP_SERVICES)?;
        let groups = open(MAP_GROUPS)?;
        Ok(Splicer {
            listeners: take(&mut self.ebpf, MAP_ROUTE_LISTENERS)?.try_into()?,
            socks,
            peers: take(&mut self.ebpf, MAP_ROUTE_PEERS)?.try_into()?,
            state: take(&mut self.ebpf, MAP_ROUTE_STATE)?.try_into()?,
            bytes: take(&mut self.ebpf, MAP_ROUTE_BYTES)?.try_into()?,
            services: HashMap::try_from(aya::maps::Map::HashMap(services))?,
            groups: HashMap::try_from(aya::maps::Map::HashMap(groups))?,
        })
    }

    /// No routed service in this config: addresses an earlier agent routed lose their
    /// local routes, and its sk_lookup link is detached.
    pub fn unroute(&mut self) -> Result<()> {
        let mut routed: HashMap<MapData, RouteAddr, u32> =
            take(&mut self.ebpf, MAP_ROUTE_ADDRS)?.try_into()?;
        sync_addrs(&mut routed, &[])?;
        if routed.keys().next().is_none() {
            remove_pin(&self.bpffs_dir.join(LOOKUP_PIN))?;
        }
        Ok(())
    }
}

impl Splicer {
    /// `slot`: service id * 2, + 1 for the IPv6 listener.
    pub fn set_listener(&mut self, slot: u32, fd: RawFd) -> Result<()> {
        self.listeners
            .insert(slot, fd, 0)
            .context("inserting a router listener")
    }

    pub fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key, 0).ok()
    }

    /// Version `group`'s backends of service `id` under generation `gen`.
    pub fn group(&self, id: u32, gen: u32, group: u8) -> Option<Group> {
        let key = GroupKey {
            service: id,
            gen,
            group,
            _pad: [0; 3],
        };
        self.groups.get(&key, 0).ok()
    }

    /// Adds a socket to the spliced set with where its bytes go, and its (zeroed)
    /// kernel state.
    pub fn add(&mut self, cookie: u64, sock: &impl AsRawFd, peer: SplicePeer) -> Result<()> {
        self.state.insert(cookie, SpliceState::default(), 0)?;
        self.peers.insert(cookie, peer, 0)?;
        self.socks
            .insert(cookie, sock.as_raw_fd(), 0)
            .context("inserting a spliced socket")
    }

    pub fn set_peer(&mut self, cookie: u64, peer: SplicePeer) -> Result<()> {
        Ok(self.peers.insert(cookie, peer, 0)?)
    }

    /// Forgets a socket (its SockHash entry goes when the socket closes; removed here
    /// too in case it is still open).
    pub fn remove(&mut self, cookie: u64) {
        let _ = self.socks.remove(&cookie);
        let _ = self.peers.remove(&cookie);
        let _ = self.state.remove(&cookie);
    }

    /// Bytes the kernel read from a spliced socket and redirected to its peer.
    pub fn carried(&self, cookie: u64) -> u64 {
        self.state.get(&cookie, 0).map_or(0, |s| s.carried)
    }

    /// Removes the per-socket entries of every socket not in `live` (left by an agent
    /// that was killed); returns how many sockets' entries went.
    pub fn purge(&mut self, live: &HashSet<u64>) -> usize {
        let stale: HashSet<u64> = self
            .peers
            .keys()
            .chain(self.state.keys())
            .filter_map(|k| k.ok())
            .filter(|k| !live.contains(k))
            .collect();
        for cookie in &stale {
            self.remove(*cookie);
        }
        stale.len()
    }

    /// Bytes the kernel carried for a service, summed over CPUs.
    pub fn bytes(&self, id: u32) -> u64 {
        self.bytes.get(&id, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Entries in the per-socket maps (leak checks).
    pub fn entries(&self) -> (usize, usize, usize) {
        (
            self.socks.keys().count(),
            self.peers.keys().count(),
            self.state.keys().count(),
        )
    }
}
