//! A [`Dataplane`] on plain collections, for the agent's unit tests (as aya fakes its
//! syscalls and Cilium its LB maps). It keeps what the kernel would hold, records every
//! write in order, lets a test set counters and open canary connections, and fails a
//! chosen write on request, so that "nothing half-applied" is tested, not assumed.
//!
//! The handle is shared: a test keeps one clone and gives the other to the agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use anyhow::{bail, Result};
use canary_common::{BackendStats, ServiceKey, ServiceValue, DECISION_RULES, MAX_BACKENDS};

use super::ServiceEntry;

use super::{plane::Dataplane, DrainGroup, DrainMode, DrainProgress, Splicer, VersionSignals};
use crate::{config::IngressHook, policy::routing::KernelTable};

/// One kernel-side act, as the fake saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Install {
        id: u32,
        weight_bp: u16,
        rolled_back: bool,
    },
    Uninstall(ServiceKey),
    ClearStats(u32),
    Attach(String),
    Detach(String),
}

#[derive(Default)]
pub struct State {
    pub services: Vec<(ServiceKey, ServiceEntry)>,
    pub attached: BTreeSet<String>,
    /// Interfaces that exist; attaching to any other fails as the kernel would.
    pub interfaces: BTreeSet<String>,
    pub cidr: BTreeSet<(u32, u8)>,
    pub signals: BTreeMap<u32, [VersionSignals; 2]>,
    /// Per-backend counters per service id, by position (`MAX_BACKENDS` long).
    pub stats: BTreeMap<u32, Vec<BackendStats>>,
    /// Open connections per service id and group: counted by a `Count` scan, closed by
    /// any other.
    pub open: BTreeMap<(u32, DrainGroup), usize>,
    pub replies_at_ingress: bool,
    pub writes: Vec<Write>,
    /// The next `install` fails once this many more have succeeded.
    pub fail_install_after: Option<usize>,
}

#[derive(Clone, Default)]
pub struct FakeDataplane(Arc<Mutex<State>>);

impl FakeDataplane {
    /// A fake on a host whose interfaces are `interfaces`.
    pub fn new(interfaces: &[&str]) -> Self {
        let fake = Self::default();
        fake.state().interfaces = interfaces.iter().map(|i| i.to_string()).collect();
        fake
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().expect("fake dataplane poisoned")
    }

    /// The installed value of service `id`.
    pub fn service(&self, id: u32) -> Option<ServiceValue> {
        self.entry(id).map(|e| e.value)
    }

    /// The installed entry of service `id`.
    pub fn entry(&self, id: u32) -> Option<ServiceEntry> {
        let state = self.state();
        state
            .services
            .iter()
            .find(|(_, e)| e.value.id == id)
            .map(|e| e.1.clone())
    }

    /// Writes since the last call.
    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut self.state().writes)
    }
}

impl Dataplane for FakeDataplane {
    fn installed(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
        Ok(self.state().services.clone())
    }

    fn install(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()> {
        let value = &entry.value;
        let mut s = self.state();
        if let Some(n) = s.fail_install_after.as_mut() {
            if *n == 0 {
                s.fail_install_after = None;
                bail!("writing the service map: injected failure");
            }
            *n -= 1;
        }
        s.services.retain(|(k, _)| k != key);
        s.services.push((*key, entry.clone()));
        s.writes.push(Write::Install {
            id: value.id,
            weight_bp: value.weight_bp,
            rolled_back: value.rolled_back != 0,
        });
        Ok(())
    }

    fn uninstall(&mut self, key: &ServiceKey) -> Result<()> {
        let mut s = self.state();
        let before = s.services.len();
        s.services.retain(|(k, _)| k != key);
        if s.services.len() == before {
            bail!("removing from the service map: no such key {key:?}");
        }
        s.writes.push(Write::Uninstall(*key));
        Ok(())
    }

    fn clear_stats(&mut self, id: u32) -> Result<()> {
        let mut s = self.state();
        s.signals.remove(&id);
        s.writes.push(Write::ClearStats(id));
        Ok(())
    }

    fn set_replies_at_ingress(&mut self, on: bool) -> Result<()> {
        self.state().replies_at_ingress = on;
        Ok(())
    }

    fn write_cidr(&mut self, id: u32, gen: u8, _table: &KernelTable) -> Result<()> {
        self.state().cidr.insert((id, gen));
        Ok(())
    }

    fn retain_cidr(&mut self, keep: &BTreeSet<(u32, u8)>) -> Result<usize> {
        let mut s = self.state();
        let before = s.cidr.len();
        s.cidr.retain(|k| keep.contains(k));
        Ok(before - s.cidr.len())
    }

    fn attached(&self) -> Result<Vec<String>> {
        Ok(self.state().attached.iter().cloned().collect())
    }

    fn attach(&mut self, iface: &str, _hook: IngressHook) -> Result<()> {
        let mut s = self.state();
        if !s.interfaces.contains(iface) {
            bail!("attaching to {iface}: no such interface");
        }
        if s.attached.insert(iface.to_string()) {
            s.writes.push(Write::Attach(iface.to_string()));
        }
        Ok(())
    }

    fn detach(&mut self, iface: &str) -> Result<()> {
        let mut s = self.state();
        if s.attached.remove(iface) {
            s.writes.push(Write::Detach(iface.to_string()));
        }
        Ok(())
    }

    fn finish_upgrade(&mut self) -> Result<()> {
        Ok(())
    }

    fn stats(&self, id: u32) -> Result<Vec<BackendStats>> {
        let state = self.state();
        Ok(state
            .stats
            .get(&id)
            .cloned()
            .unwrap_or_else(|| vec![BackendStats::default(); MAX_BACKENDS]))
    }

    fn stray(&self, _id: u32) -> Result<u64> {
        Ok(0)
    }

    fn signals(&self, id: u32) -> Result<[VersionSignals; 2]> {
        Ok(self.state().signals.get(&id).cloned().unwrap_or_default())
    }

    fn decisions(&self, _id: u32) -> Result<Vec<[u64; 2]>> {
        Ok(vec![[0; 2]; DECISION_RULES as usize])
    }

    fn drain(
        &mut self,
        id: u32,
        group: DrainGroup,
        mode: DrainMode,
        _now: Instant,
    ) -> Result<DrainProgress> {
        let mut s = self.state();
        if !s.services.iter().any(|(_, e)| e.value.id == id) {
            bail!("no installed service has id {id}");
        }
        if mode == DrainMode::Count {
            let remaining = s.open.get(&(id, group)).copied().unwrap_or(0);
            return Ok(DrainProgress {
                closed: 0,
                remaining,
            });
        }
        let closed = s.open.remove(&(id, group)).unwrap_or(0);
        Ok(DrainProgress {
            closed,
            remaining: 0,
        })
    }

    fn route(&mut self, _addrs: &[IpAddr]) -> Result<Splicer> {
        bail!("request routing needs the kernel's sk_lookup and sockmap: not in the fake")
    }

    fn unroute(&mut self) -> Result<()> {
        Ok(())
    }
}
