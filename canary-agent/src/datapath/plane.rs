//! What the agent asks of the kernel, as one interface: the aya-backed [`Datapath`]
//! implements it on the real maps and links, and a fake (`fake.rs`, tests only) on
//! plain collections, so the agent's desired-state, rollout and drain handling are
//! unit-tested without root. Every method is one kernel-side act the agent decides
//! elsewhere; none holds policy of its own.

use std::{collections::BTreeSet, net::IpAddr, time::Instant};

use anyhow::Result;
use canary_common::{BackendStats, ServiceKey};

use super::{
    Datapath, DrainGroup, DrainMode, DrainProgress, ServiceEntry, Splicer, VersionSignals,
};
use crate::{config::IngressHook, policy::routing::KernelTable};

pub trait Dataplane: Send {
    /// Services in the map, those an earlier agent left there included.
    fn installed(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>>;
    /// Installs or replaces a service: packets see all of the old entry or all of the
    /// new one. Only the weight changed: one write of the service value.
    fn install(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()>;
    fn uninstall(&mut self, key: &ServiceKey) -> Result<()>;
    /// Zeroes the counters of an id about to be given to another service.
    fn clear_stats(&mut self, id: u32) -> Result<()>;
    /// Whether TC ingress also rewrites replies of redirected flows.
    fn set_replies_at_ingress(&mut self, on: bool) -> Result<()>;
    /// Writes service `id`'s client-address table under generation `gen`; on an error
    /// nothing of it stays.
    fn write_cidr(&mut self, id: u32, gen: u8, table: &KernelTable) -> Result<()>;
    /// Removes every client-address table but the `(id, generation)` pairs in `keep`.
    fn retain_cidr(&mut self, keep: &BTreeSet<(u32, u8)>) -> Result<usize>;
    /// Interfaces the programs are attached to (through pinned links).
    fn attached(&self) -> Result<Vec<String>>;
    fn attach(&mut self, iface: &str, hook: IngressHook) -> Result<()>;
    fn detach(&mut self, iface: &str) -> Result<()>;
    /// Completes a map-layout upgrade once the new programs are attached.
    fn finish_upgrade(&mut self) -> Result<()>;
    /// Per-backend counters of service `id` by position (stable's `i` at `i`,
    /// canary's at `MAX_GROUP_BACKENDS + i`; `MAX_BACKENDS` of them).
    fn stats(&self, id: u32) -> Result<Vec<BackendStats>>;
    /// TCP segments to service `id` that belonged to no flow, passed untouched.
    fn stray(&self, id: u32) -> Result<u64>;
    /// Stable (`[0]`) and canary (`[1]`) signals of service `id`.
    fn signals(&self, id: u32) -> Result<[VersionSignals; 2]>;
    /// Connections decided in the kernel by client address, per rule slot.
    fn decisions(&self, id: u32) -> Result<Vec<[u64; 2]>>;
    /// Closes (or counts) the `group` connections of service `id` as `mode` says.
    fn drain(
        &mut self,
        id: u32,
        group: DrainGroup,
        mode: DrainMode,
        now: Instant,
    ) -> Result<DrainProgress>;
    /// Steers `addrs` to the router's listeners and hands it the splice maps.
    fn route(&mut self, addrs: &[IpAddr]) -> Result<Splicer>;
    /// No routed service: undoes what an earlier agent's [`Dataplane::route`] set up.
    fn unroute(&mut self) -> Result<()>;
}

impl Dataplane for Datapath {
    fn installed(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
        Datapath::installed(self)
    }
    fn install(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()> {
        Datapath::install(self, key, entry)
    }
    fn uninstall(&mut self, key: &ServiceKey) -> Result<()> {
        Datapath::uninstall(self, key)
    }
    fn clear_stats(&mut self, id: u32) -> Result<()> {
        Datapath::clear_stats(self, id)
    }
    fn set_replies_at_ingress(&mut self, on: bool) -> Result<()> {
        Datapath::set_replies_at_ingress(self, on)
    }
    fn write_cidr(&mut self, id: u32, gen: u8, table: &KernelTable) -> Result<()> {
        Datapath::write_cidr(self, id, gen, table)
    }
    fn retain_cidr(&mut self, keep: &BTreeSet<(u32, u8)>) -> Result<usize> {
        Datapath::retain_cidr(self, keep)
    }
    fn attached(&self) -> Result<Vec<String>> {
        super::attached_interfaces(self.bpffs_dir())
    }
    fn attach(&mut self, iface: &str, hook: IngressHook) -> Result<()> {
        Datapath::attach(self, iface, hook)
    }
    fn detach(&mut self, iface: &str) -> Result<()> {
        super::detach(self.bpffs_dir(), iface)
    }
    fn finish_upgrade(&mut self) -> Result<()> {
        Datapath::finish_upgrade(self)
    }
    fn stats(&self, id: u32) -> Result<Vec<BackendStats>> {
        Datapath::stats(self, id)
    }
    fn stray(&self, id: u32) -> Result<u64> {
        Datapath::stray(self, id)
    }
    fn signals(&self, id: u32) -> Result<[VersionSignals; 2]> {
        Datapath::signals(self, id)
    }
    fn decisions(&self, id: u32) -> Result<Vec<[u64; 2]>> {
        Datapath::decisions(self, id)
    }
    fn drain(
        &mut self,
        id: u32,
        group: DrainGroup,
        mode: DrainMode,
        now: Instant,
    ) -> Result<DrainProgress> {
        Datapath::drain(self, id, group, mode, now)
    }
    fn route(&mut self, addrs: &[IpAddr]) -> Result<Splicer> {
        Datapath::splicer(self, addrs)
    }
    fn unroute(&mut self) -> Result<()> {
        Datapath::unroute(self)
    }
}
