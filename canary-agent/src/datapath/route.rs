//! The router's kernel side: the `sk_lookup` program that hands new connections of
//! `http` services to the agent's listeners, and the maps of spliced sockets whose
//! `sk_skb` verdict moves their bytes in the kernel. The maps are pinned, so a
//! hand-over keeps spliced sockets under the same verdict; the sockets themselves
//! belong to the agent process (a socket leaves the maps when it closes).

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{links::FdLink, SkLookup, SkSkb},
};
use canary_common::{
    ServiceKey, ServiceValue, SplicePeer, SpliceState, MAP_ROUTE_BYTES, MAP_ROUTE_LISTENERS,
    MAP_ROUTE_PEERS, MAP_ROUTE_SOCKS, MAP_ROUTE_STATE, MAP_SERVICES, PROG_ROUTE_LOOKUP,
    PROG_ROUTE_VERDICT,
};

use super::{program, remove_pin, take, Datapath};

/// Where a hand-over pins the outgoing agent's sk_lookup link, so that the service
/// addresses keep reaching the listeners across the exec; the next agent removes the
/// pin once its own link is attached.
const HANDOVER_LOOKUP_PIN: &str = "route-lookup-handover";

pub struct Splicer {
    listeners: SockHash<MapData, u32>,
    socks: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, SplicePeer>,
    state: HashMap<MapData, u64, SpliceState>,
    bytes: PerCpuArray<MapData, u64>,
    /// A second handle on the pinned services map: live weight and backends.
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// This agent's sk_lookup attachment (owned by this process).
    lookup_link: Option<FdLink>,
    bpffs_dir: PathBuf,
}

impl Datapath {
    /// Loads and attaches the router's programs (sk_lookup in this network namespace,
    /// the verdict on the spliced-socket map) and hands their maps to the router.
    pub fn splicer(&mut self) -> Result<Splicer> {
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
        // The previous agent's link (a hand-over) goes now that this one is attached.
        remove_pin(&self.bpffs_dir.join(HANDOVER_LOOKUP_PIN))?;
        let pin = self.bpffs_dir.join(MAP_SERVICES);
        let services =
            MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        Ok(Splicer {
            listeners: take(&mut self.ebpf, MAP_ROUTE_LISTENERS)?.try_into()?,
            socks,
            peers: take(&mut self.ebpf, MAP_ROUTE_PEERS)?.try_into()?,
            state: take(&mut self.ebpf, MAP_ROUTE_STATE)?.try_into()?,
            bytes: take(&mut self.ebpf, MAP_ROUTE_BYTES)?.try_into()?,
            services: HashMap::try_from(aya::maps::Map::HashMap(services))?,
            lookup_link: Some(lookup_link),
            bpffs_dir: self.bpffs_dir.clone(),
        })
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

    /// Pins this agent's sk_lookup link for the next agent image (hand-over).
    pub fn keep_lookup_for_handover(&mut self) -> Result<()> {
        if let Some(link) = self.lookup_link.take() {
            let pin = self.bpffs_dir.join(HANDOVER_LOOKUP_PIN);
            remove_pin(&pin)?;
            link.pin(&pin)
                .with_context(|| format!("pinning the sk_lookup link at {}", pin.display()))?;
        }
        Ok(())
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
