//! Map definitions. All are pinned by name under the agent's bpffs directory, so an
//! agent restart reattaches to the same services, flows and counters.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use canary_common::{
    histogram::LATENCY_BUCKETS, BackendStats, CidrKey, CidrValue, FlowKey, FlowValue, Group,
    GroupKey, RouteAddr, ServiceKey, ServiceValue, SplicePeer, SpliceState, VersionTelemetry,
    DECISION_RULES, FLOW_TABLE_SIZE, MAX_BACKEND_SLOTS, MAX_CIDR_ENTRIES, MAX_SERVICES,
    MAX_SPLICED,
};

/// Service address -> weight and the generation of its backends. Not preallocated,
/// so replacing a value swaps in a fresh element instead of overwriting the one a
/// packet may be reading.
#[map(name = "CANARY_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// (service, generation, version) -> backends and their ring: the generation in force
/// and the one an install is writing, so four per service at most. Not preallocated:
/// memory only for the services configured.
#[map(name = "CANARY_GROUPS")]
pub static GROUPS: HashMap<GroupKey, Group> = HashMap::pinned(MAX_SERVICES * 4, BPF_F_NO_PREALLOC);

/// Node-wide switches (SETTING_*), written by the agent.
#[map(name = "CANARY_SETTINGS")]
pub static SETTINGS: Array<u32> = Array::pinned(1, 0);

/// Pinned connections, both directions. Shared by all CPUs: a flow's packets may
/// arrive on any CPU.
#[map(name = "CANARY_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(FLOW_TABLE_SIZE, 0);

/// Per service: TCP segments that were neither a SYN nor of a connection whose reply
/// entry was left (spoofed, stray, or both entries lost), passed untouched.
#[map(name = "CANARY_STRAY")]
pub static STRAY: PerCpuArray<u64> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Per-backend counters, indexed by [`canary_common::Backend::stats`].
#[map(name = "CANARY_STATS")]
pub static STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(MAX_BACKEND_SLOTS, 0);

/// Exact mode's smooth-counter accumulator, per service and per CPU.
#[map(name = "CANARY_EXACT")]
pub static EXACT: PerCpuArray<u32> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// HTTP and connection signals per service and version (index service * 2 + version).
#[map(name = "CANARY_TELEMETRY")]
pub static TELEMETRY: PerCpuArray<VersionTelemetry> = PerCpuArray::pinned(MAX_SERVICES * 2, 0);

/// Request -> response latency histograms, per service and version.
#[map(name = "CANARY_LATENCY")]
pub static LATENCY: PerCpuArray<u64> =
    PerCpuArray::pinned(MAX_SERVICES * 2 * LATENCY_BUCKETS as u32, 0);

/// Client address ranges of the `client-cidr` cohorts of services decided in the
/// kernel (ServiceValue.routing), per service and table generation.
#[map(name = "CANARY_CIDR")]
pub static CIDR: LpmTrie<CidrKey, CidrValue> = LpmTrie::pinned(MAX_CIDR_ENTRIES, 0);

/// Connections decided per service, rule (cohort or split) and version.
#[map(name = "CANARY_DECISIONS")]
pub static DECISIONS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_SERVICES * DECISION_RULES * 2, 0);

// The router's maps (route.rs, splice.rs) are pinned too, so that an agent hand-over
// (SIGUSR2) keeps the spliced sockets in the same map under the same verdict. A socket
// leaves its SockHash by itself when it closes; the agent purges the per-cookie hashes
// of sockets it does not hold on start.

/// Service id -> the agent's listening socket for that `http` service.
#[map(name = "ROUTE_LISTENERS")]
pub static ROUTE_LISTENERS: SockHash<u32> = SockHash::pinned(MAX_SERVICES * 2, 0);

/// Addresses the agent made local for the router (value: unused, 1). Every TCP or UDP
/// lookup to one that is not a routed service's is refused, so a host daemon bound to
/// 0.0.0.0 does not answer on a service address.
#[map(name = "ROUTE_ADDRS")]
pub static ROUTE_ADDRS: HashMap<RouteAddr, u32> = HashMap::pinned(MAX_SERVICES * 2, 0);

/// Socket cookie -> spliced socket (client or backend side).
#[map(name = "ROUTE_SOCKS")]
pub static ROUTE_SOCKS: SockHash<u64> = SockHash::pinned(MAX_SPLICED, 0);

/// Socket cookie -> where its bytes go (written by the agent).
#[map(name = "ROUTE_PEERS")]
pub static ROUTE_PEERS: HashMap<u64, SplicePeer> = HashMap::pinned(MAX_SPLICED, 0);

/// Socket cookie -> kernel-owned counters of the socket.
#[map(name = "ROUTE_STATE")]
pub static ROUTE_STATE: HashMap<u64, SpliceState> = HashMap::pinned(MAX_SPLICED, 0);

/// Bytes redirected in the kernel, per service (the agent counts what it copies).
#[map(name = "ROUTE_BYTES")]
pub static ROUTE_BYTES: PerCpuArray<u64> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// A FIB lookup's parameters (64 bytes: too many for the program's stack beside the
/// flow keys). Per CPU, used within one program run; not pinned, it holds no state.
#[map(name = "CANARY_FIB")]
pub static FIB: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);
