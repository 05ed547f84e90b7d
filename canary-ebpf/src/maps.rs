//! Map definitions. All are pinned by name under the agent's bpffs directory, so an
//! agent restart reattaches to the same services, flows and counters.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use canary_common::{
    BackendStats, FlowKey, FlowValue, ServiceKey, ServiceValue, FLOW_TABLE_SIZE, MAX_BACKENDS,
    MAX_SERVICES,
};

/// Service address -> weight and backends. Not preallocated, so replacing a value
/// swaps in a fresh element instead of overwriting the one a packet may be reading.
#[map(name = "CANARY_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Pinned connections, both directions. Shared by all CPUs: a flow's packets may
/// arrive on any CPU.
#[map(name = "CANARY_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(FLOW_TABLE_SIZE, 0);

#[map(name = "CANARY_STATS")]
pub static STATS: PerCpuArray<BackendStats> =
    PerCpuArray::pinned(MAX_SERVICES * MAX_BACKENDS as u32, 0);

/// Exact mode's smooth-counter accumulator, per service and per CPU.
#[map(name = "CANARY_EXACT")]
pub static EXACT: PerCpuArray<u32> = PerCpuArray::pinned(MAX_SERVICES, 0);
