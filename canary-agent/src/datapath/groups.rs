//! The installed services as the datapath holds them: each service's value in
//! CANARY_SERVICES and its two versions' backends in CANARY_GROUPS, under a
//! generation that every change of backends renews, and the node's pool of
//! per-backend counter slots (CANARY_STATS).
//!
//! An install that changes backends writes the new groups under a fresh generation,
//! then the service value naming it (the one write packets see switch), then deletes
//! the old generation: a packet reads either the old value and old groups or the new
//! ones. An install that only changes the weight rewrites the value alone.

use std::collections::HashMap as StdHashMap;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use canary_common::{
    BackendStats, GroupKey, ServiceKey, ServiceValue, FAMILY_V6, MAX_BACKEND_SLOTS,
    MAX_GROUP_BACKENDS,
};

use super::encode::{GroupSpec, ServiceEntry};

pub(super) struct Groups {
    map: HashMap<MapData, GroupKey, canary_common::Group>,
    /// What each service key holds, as written: so an unchanged set of backends is not
    /// rewritten, and counters are found without reading the groups back.
    live: StdHashMap<ServiceKey, Live>,
    next_gen: u32,
    /// `refs[slot]`: how many live entries (a service's generation in force, and
    /// during an install the one replacing it) name that CANARY_STATS slot; 0: free.
    refs: Vec<u16>,
    /// Where the search for a free slot starts: slots are handed out round the pool,
    /// so a slot freed by a removed backend (whose open flows may still count into
    /// it) is the last to be given again.
    cursor: usize,
}

#[derive(Clone)]
struct Live {
    value: ServiceValue,
    groups: [GroupSpec; 2],
    /// Counter slot of each backend of `groups`.
    slots: [Vec<u16>; 2],
}

impl Groups {
    /// Reads what an earlier agent left: the services' groups in force are kept, any
    /// other generation (an install cut short) is deleted.
    pub(super) fn load(
        map: HashMap<MapData, GroupKey, canary_common::Group>,
        services: &HashMap<MapData, ServiceKey, ServiceValue>,
    ) -> Result<Self> {
        let mut groups = Self {
            map,
            live: StdHashMap::new(),
            next_gen: 1,
            refs: vec![0; MAX_BACKEND_SLOTS as usize],
            cursor: 1,
        };
        for entry in services.iter() {
            let (key, value) = entry.context("reading the service map")?;
            let mut live = Live {
                value,
                groups: Default::default(),
                slots: Default::default(),
            };
            for g in 0..2u8 {
                let gk = group_key(value.id, value.gen, g);
                if let Ok(group) = groups.map.get(&gk, 0) {
                    let (spec, slots) = GroupSpec::decode(&group, key.family == FAMILY_V6);
                    for &s in &slots {
                        if let Some(r) = groups.refs.get_mut(s as usize) {
                            *r += 1;
                        }
                    }
                    live.groups[g as usize] = spec;
                    live.slots[g as usize] = slots;
                }
            }
            groups.next_gen = groups.next_gen.max(value.gen.wrapping_add(1));
            groups.live.insert(key, live);
        }
        let stale: Vec<GroupKey> = groups
            .map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !groups.in_force(k))
            .collect();
        for k in stale {
            let _ = groups.map.remove(&k);
        }
        Ok(groups)
    }

    fn in_force(&self, k: &GroupKey) -> bool {
        self.live
            .values()
            .any(|l| l.value.id == k.service && l.value.gen == k.gen)
    }

    pub(super) fn installed(&self) -> Vec<(ServiceKey, ServiceEntry)> {
        self.live
            .iter()
            .map(|(k, l)| {
                let entry = ServiceEntry {
                    value: l.value,
                    groups: l.groups.clone(),
                };
                (*k, entry)
            })
            .collect()
    }

    /// Counter slots of service `id`'s backends (stable, canary), if installed.
    pub(super) fn slots(&self, id: u32) -> Option<&[Vec<u16>; 2]> {
        self.live
            .values()
            .find(|l| l.value.id == id)
            .map(|l| &l.slots)
    }

    pub(super) fn install(
        &mut self,
        key: &ServiceKey,
        entry: &ServiceEntry,
        services: &mut HashMap<MapData, ServiceKey, ServiceValue>,
        stats: &mut PerCpuArray<MapData, BackendStats>,
    ) -> Result<()> {
        let current = self.live.get(key).cloned();
        let same_id = current.as_ref().filter(|c| c.value.id == entry.value.id);
        if let Some(c) = same_id.filter(|c| c.groups == entry.groups) {
            let value = ServiceValue {
                gen: c.value.gen,
                ..entry.value
            };
            services
                .insert(key, value, 0)
                .context("writing the service map")?;
            self.live.get_mut(key).expect("just found").value = value;
            return Ok(());
        }
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let id = entry.value.id;
        let mut slots: [Vec<u16>; 2] = Default::default();
        // Allocated by this install (their count already 1): freed if it fails.
        let mut fresh = Vec::new();
        let result = (|| -> Result<()> {
            for (g, group_slots) in slots.iter_mut().enumerate() {
                for addr in &entry.groups[g].backends {
                    // A backend that stays keeps its counters.
                    let kept = same_id.and_then(|c| {
                        let i = c.groups[g].backends.iter().position(|b| b == addr)?;
                        c.slots[g].get(i).copied()
                    });
                    let slot = match kept {
                        Some(s) => s,
                        None => {
                            let s = self.allocate(stats)?;
                            fresh.push(s);
                            s
                        }
                    };
                    group_slots.push(slot);
                }
            }
            for g in 0..2u8 {
                let group = entry.groups[g as usize].encode(&slots[g as usize]);
                self.map
                    .insert(group_key(id, gen, g), group, 0)
                    .context("writing the backends map")?;
            }
            let value = ServiceValue { gen, ..entry.value };
            services
                .insert(key, value, 0)
                .context("writing the service map")
        })();
        if let Err(e) = result {
            for g in 0..2 {
                let _ = self.map.remove(&group_key(id, gen, g));
            }
            for s in fresh {
                self.refs[s as usize] = 0;
            }
            return Err(e);
        }
        for &s in slots.iter().flatten() {
            if !fresh.contains(&s) {
                self.refs[s as usize] += 1;
            }
        }
        self.live.insert(
            *key,
            Live {
                value: ServiceValue { gen, ..entry.value },
                groups: entry.groups.clone(),
                slots,
            },
        );
        if let Some(old) = current {
            self.retire(&old);
        }
        Ok(())
    }

    /// After `key`'s service value was removed from the map.
    pub(super) fn uninstalled(&mut self, key: &ServiceKey) {
        if let Some(old) = self.live.remove(key) {
            self.retire(&old);
        }
    }

    /// Deletes a generation no service names any more and frees the slots no live
    /// backend counts into.
    fn retire(&mut self, old: &Live) {
        let key = |g| group_key(old.value.id, old.value.gen, g);
        if !self.in_force(&key(0)) {
            for g in 0..2 {
                let _ = self.map.remove(&key(g));
            }
        }
        for &s in old.slots.iter().flatten() {
            if let Some(r) = self.refs.get_mut(s as usize) {
                *r = r.saturating_sub(1);
            }
        }
    }

    /// A free counter slot, zeroed.
    fn allocate(&mut self, stats: &mut PerCpuArray<MapData, BackendStats>) -> Result<u16> {
        let n = self.refs.len();
        let slot = (0..n)
            .map(|i| (self.cursor + i) % n)
            .find(|&s| s != 0 && self.refs[s] == 0)
            .with_context(|| {
                format!(
                    "every one of the node's {} backend counter slots is taken",
                    MAX_BACKEND_SLOTS - 1
                )
            })?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = PerCpuValues::try_from(vec![BackendStats::default(); cpus])?;
        stats
            .set(slot as u32, zero, 0)
            .context("zeroing a backend's counters")?;
        self.refs[slot] = 1;
        self.cursor = slot + 1;
        Ok(slot as u16)
    }

    /// Zeroes the counters of service `id`'s backends (its id is being reused).
    pub(super) fn clear(
        &self,
        id: u32,
        stats: &mut PerCpuArray<MapData, BackendStats>,
    ) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        for &s in self.slots(id).into_iter().flatten().flatten() {
            let zero = PerCpuValues::try_from(vec![BackendStats::default(); cpus])?;
            stats.set(s as u32, zero, 0)?;
        }
        Ok(())
    }
}

fn group_key(service: u32, gen: u32, group: u8) -> GroupKey {
    GroupKey {
        service,
        gen,
        group,
        _pad: [0; 3],
    }
}

/// Slot `g * MAX_GROUP_BACKENDS + i` of a service's userspace view, for backend `i`
/// of version `g`.
pub(super) fn position(g: usize, i: usize) -> usize {
    g * MAX_GROUP_BACKENDS + i
}
