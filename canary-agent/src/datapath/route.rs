//! The router's kernel side: the `sk_lookup` program that hands new connections of
//! `http` services to the agent's listeners, and the maps of spliced sockets whose
//! `sk_skb` verdict moves their bytes in the kernel. Unpinned: listeners and spliced
//! sockets belong to this agent process.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{SkLookup, SkSkb},
};
use canary_common::{
    ServiceKey, ServiceValue, SplicePeer, SpliceState, MAP_ROUTE_BYTES, MAP_ROUTE_LISTENERS,
    MAP_ROUTE_PEERS, MAP_ROUTE_SOCKS, MAP_ROUTE_STATE, MAP_SERVICES, PROG_ROUTE_LOOKUP,
    PROG_ROUTE_VERDICT,
};

use super::{program, take, Datapath};

pub struct Splicer {
    listeners: SockHash<MapData, u32>,
    socks: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, SplicePeer>,
    state: HashMap<MapData, u64, SpliceState>,
    bytes: PerCpuArray<MapData, u64>,
    /// A second handle on the pinned services map: live weight and backends.
    services: HashMap<MapData, ServiceKey, ServiceValue>,
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
        lookup
            .attach(netns.as_fd())
            .context("attaching sk_lookup to this network namespace")?;
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

    /// Adds a socket to the spliced set with where its bytes go (and, for a client
    /// socket, its state with the time its first request started).
    pub fn add(
        &mut self,
        cookie: u64,
        sock: &impl AsRawFd,
        peer: SplicePeer,
        state: Option<SpliceState>,
    ) -> Result<()> {
        if let Some(s) = state {
            self.state.insert(cookie, s, 0)?;
        }
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
