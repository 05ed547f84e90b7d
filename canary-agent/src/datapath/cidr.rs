//! Services decided in the kernel by client address (head-free routing plans): their
//! CANARY_CIDR entries and the decision counters the ingress program keeps.
//!
//! A changed table is written under the other generation, then the service's map value
//! switches to it in one write, then the old generation is removed: a packet sees the
//! old table or the new one, never a mix, and a failed write leaves the old one in force.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::Key, LpmTrie, MapData, PerCpuArray, PerCpuValues};
use canary_common::{decision_index, CidrKey, CidrValue, DECISION_RULES};

use super::encode::cidr_entries;
use super::Datapath;
use crate::policy::routing::KernelTable;

pub(super) struct Cidr {
    pub trie: LpmTrie<MapData, CidrKey, CidrValue>,
    pub decisions: PerCpuArray<MapData, u64>,
}

impl Datapath {
    /// Writes service `id`'s table under generation `gen` (replacing what that
    /// generation held). On an error the entries written so far are removed again.
    pub fn write_cidr(&mut self, id: u32, gen: u8, table: &KernelTable) -> Result<()> {
        self.remove_cidr_gen(id, gen)?;
        let entries = cidr_entries(id, gen, table);
        for (i, (key, value)) in entries.iter().enumerate() {
            if let Err(e) = self.cidr.trie.insert(key, value, 0) {
                for (key, _) in &entries[..i] {
                    let _ = self.cidr.trie.remove(key);
                }
                return Err(e).context(format!(
                    "writing the client-cidr table ({} entries; CANARY_CIDR holds {} for all \
                     services)",
                    entries.len(),
                    canary_common::MAX_CIDR_ENTRIES
                ));
            }
        }
        Ok(())
    }

    /// Removes every CANARY_CIDR entry except those of the `(service id, generation)`
    /// pairs in force.
    pub fn retain_cidr(&mut self, keep: &BTreeSet<(u32, u8)>) -> Result<usize> {
        self.remove_cidr_where(|k| !keep.contains(&(k.service, k.gen)))
    }

    /// Removes generation `gen` of service `id`.
    fn remove_cidr_gen(&mut self, id: u32, gen: u8) -> Result<usize> {
        self.remove_cidr_where(|k| k.service == id && k.gen == gen)
    }

    fn remove_cidr_where(&mut self, stale: impl Fn(&CidrKey) -> bool) -> Result<usize> {
        let keys: Vec<Key<CidrKey>> = self
            .cidr
            .trie
            .keys()
            .collect::<Result<_, _>>()
            .context("reading CANARY_CIDR")?;
        let mut removed = 0;
        for key in keys.iter().filter(|k| stale(&k.data())) {
            self.cidr
                .trie
                .remove(key)
                .context("removing from CANARY_CIDR")?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Connections the kernel decided for service `id`: per rule slot (cohort index,
    /// then the split), stable and canary, summed over CPUs.
    pub fn decisions(&self, id: u32) -> Result<Vec<[u64; 2]>> {
        (0..DECISION_RULES as u8)
            .map(|rule| {
                let mut n = [0u64; 2];
                for (version, total) in n.iter_mut().enumerate() {
                    let per_cpu = self
                        .cidr
                        .decisions
                        .get(&decision_index(id, rule, version as u8), 0)?;
                    *total = per_cpu.iter().sum();
                }
                Ok(n)
            })
            .collect()
    }

    /// Zeroes service `id`'s decision counters (an id given to another service).
    pub(super) fn clear_decisions(&mut self, id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        for rule in 0..DECISION_RULES as u8 {
            for version in 0..2 {
                let zero = PerCpuValues::try_from(vec![0u64; cpus])?;
                self.cidr
                    .decisions
                    .set(decision_index(id, rule, version), zero, 0)?;
            }
        }
        Ok(())
    }
}
