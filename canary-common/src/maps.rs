//! BPF map layouts and wire constants. Addresses are stored as the four 32-bit words
//! loaded straight from the packet (network byte order in memory); IPv4 uses word 0
//! and leaves the rest zero. Ports are stored in network byte order too, so the
//! datapath never converts anything on the hot path.

/// Canary weights are expressed in basis points: 10 000 = 100 %.
pub const WEIGHT_SCALE: u16 = 10_000;

/// Upper bounds sized for one node's services; the agent rejects configs beyond them.
pub const MAX_SERVICES: u32 = 1024;
/// Backends of one version of a service (a ring entry is a `u8` index into them).
pub const MAX_GROUP_BACKENDS: usize = 256;
/// Backend positions of a service in userspace views (status, the router's counts):
/// stable's `i` at `i`, canary's at `MAX_GROUP_BACKENDS + i`.
pub const MAX_BACKENDS: usize = 2 * MAX_GROUP_BACKENDS;
/// Per-backend counter slots of the node, shared by every service (Katran's reals
/// pool): slot 0 is never given out, so a flow carrying 0 counts nowhere.
pub const MAX_BACKEND_SLOTS: u32 = 32_768;
/// Entries of a version's Maglev lookup ring, a prime well above
/// [`MAX_GROUP_BACKENDS`] so that every backend holds at least 63 entries.
pub const RING_SIZE: usize = 16_381;
/// Entries in the flow table; each connection uses two (forward and reply).
pub const FLOW_TABLE_SIZE: u32 = 131_072;

pub const GROUP_STABLE: u8 = 0;
pub const GROUP_CANARY: u8 = 1;

pub const MODE_HASH: u8 = 0;
pub const MODE_EXACT: u8 = 1;

pub const STICKY_CONNECTION: u8 = 0;
pub const STICKY_CLIENT_IP: u8 = 1;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// Key protocol of an `http` service: no packet carries it, so the XDP program never
/// matches the service and its connections reach the local stack, where the
/// `sk_lookup` program hands them to the agent's router.
pub const PROTO_HTTP: u8 = 0xFE;

/// Flow-table entry direction: client -> service, and backend -> client.
pub const DIR_FORWARD: u8 = 0;
pub const DIR_REPLY: u8 = 1;

/// Flow flag: a FIN or RST was seen, so a later SYN on the same tuple is a new
/// connection rather than a retransmission.
pub const FLOW_CLOSING: u8 = 1;
/// Reply-entry flag: the backend's SYN-ACK was seen (handshake counted once). Forward
/// entry: the client acknowledged it (a segment acked exactly the backend's next
/// sequence number), so its requests are counted.
pub const FLOW_ESTABLISHED: u8 = 2;
/// Flow flag: placed under `forward = "redirect"`, so the replies are rewritten and
/// redirected already at the TC ingress of the backend's interface, where the agent is
/// attached there. Kept for the flow's life: a connection is forwarded one way only.
pub const FLOW_REDIRECT: u8 = 4;

/// TCP header flags, as in the segment's flags byte.
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// Map names, shared so the agent finds the maps (and their bpffs pins) by name.
pub const MAP_SERVICES: &str = "CANARY_SERVICES";
pub const MAP_GROUPS: &str = "CANARY_GROUPS";
/// One u32 of node-wide switches ([`SETTING_REPLIES_AT_INGRESS`]).
pub const MAP_SETTINGS: &str = "CANARY_SETTINGS";
/// Some service forwards by redirect: TC ingress also looks for replies of its flows.
pub const SETTING_REPLIES_AT_INGRESS: u32 = 1;
pub const MAP_FLOWS: &str = "CANARY_FLOWS";
pub const MAP_STATS: &str = "CANARY_STATS";
pub const MAP_EXACT: &str = "CANARY_EXACT";
pub const MAP_TELEMETRY: &str = "CANARY_TELEMETRY";
pub const MAP_LATENCY: &str = "CANARY_LATENCY";
pub const MAP_CIDR: &str = "CANARY_CIDR";
pub const MAP_DECISIONS: &str = "CANARY_DECISIONS";
pub const MAP_ROUTE_LISTENERS: &str = "ROUTE_LISTENERS";
pub const MAP_ROUTE_SOCKS: &str = "ROUTE_SOCKS";
pub const MAP_ROUTE_PEERS: &str = "ROUTE_PEERS";
pub const MAP_ROUTE_STATE: &str = "ROUTE_STATE";
pub const MAP_ROUTE_BYTES: &str = "ROUTE_BYTES";
pub const MAP_ROUTE_ADDRS: &str = "ROUTE_ADDRS";
/// Per service: TCP segments that found no flow and could not be one (not a SYN, no
/// reply entry left to re-place them from), passed untouched.
pub const MAP_STRAY: &str = "CANARY_STRAY";
pub const PROG_ROUTE_LOOKUP: &str = "canary_route_lookup";
pub const PROG_ROUTE_VERDICT: &str = "canary_route_verdict";
pub const PROG_INGRESS: &str = "canary_ingress";
/// The ingress program for TC (virtual interfaces, where XDP costs a copy per packet).
pub const PROG_INGRESS_TC: &str = "canary_ingress_tc";
pub const PROG_EGRESS: &str = "canary_egress";

/// A service's virtual address: the lookup key for every packet entering the node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port: u16,
    /// Its counters' slot in CANARY_STATS (`1..MAX_BACKEND_SLOTS`), given out by the
    /// agent and kept across reloads while the backend stays.
    pub stats: u16,
}

/// What the datapath needs to place a new connection of a service: the split, and
/// the generation of its two [`Group`]s in force. The agent writes new groups under a
/// new generation and then this value, so one map update swaps weight and backends
/// together.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into the per-service counter maps.
    pub id: u32,
    pub weight_bp: u16,
    pub mode: u8,
    pub sticky: u8,
    /// Held the backend counts when the backends lived here; kept so the fields
    /// after it keep their offsets in a value carried over by an upgrade.
    pub _was_counts: [u8; 2],
    /// [`ROUTING_CIDR`]: new connections are decided by the client address
    /// (CANARY_CIDR) before the weight split; [`ROUTING_NONE`]: the weight split only.
    pub routing: u8,
    /// The generation of the service's CANARY_CIDR entries in force (0 or 1): the agent
    /// writes a changed table under the other one and switches with this value.
    pub cidr_gen: u8,
    /// 1 after a rollback: a cohort that would send a connection to canary sends it
    /// to stable (the weight split is at 0 then anyway).
    pub rolled_back: u8,
    /// [`FORWARD_REDIRECT`]: the TC ingress program sends a rewritten packet straight
    /// to the next hop's interface; [`FORWARD_STACK`]: the stack forwards it.
    pub forward: u8,
    pub _pad: [u8; 2],
    /// The [`GroupKey::gen`] of the service's groups in force; every install
    /// writes the next one, so a reader caching a group by key never sees it change.
    pub gen: u32,
}

impl Default for ServiceValue {
    fn default() -> Self {
        Self {
            id: 0,
            weight_bp: 0,
            mode: MODE_HASH,
            sticky: STICKY_CONNECTION,
            _was_counts: [0; 2],
            routing: ROUTING_NONE,
            cidr_gen: 0,
            rolled_back: 0,
            forward: FORWARD_STACK,
            _pad: [0; 2],
            gen: 0,
        }
    }
}

/// Key of one version's backends (CANARY_GROUPS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub service: u32,
    pub gen: u32,
    pub group: u8,
    pub _pad: [u8; 3],
}

/// One version's backends and the Maglev ring that picks among those up: a hash's
/// entry on the ring (its high 32 bits scaled to the ring) is an index into `backends`. Taking one of
/// N backends out moves only the hashes on its entries (about 1/N), so client-ip
/// sticky clients of the others stay where they are.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// Configured backends, in `backends[..count]`.
    pub count: u16,
    /// Backends on the ring: 0 when none is up (the ring is then unused).
    pub up: u16,
    pub _pad: u32,
    /// Bit `i` set: `backends[i]` failed its health checks and is off the ring.
    pub down: [u32; MAX_GROUP_BACKENDS / 32],
    pub backends: [Backend; MAX_GROUP_BACKENDS],
    pub ring: [u8; RING_SIZE],
    pub _tail: [u8; 3],
}

impl Default for Group {
    fn default() -> Self {
        Self {
            count: 0,
            up: 0,
            _pad: 0,
            down: [0; MAX_GROUP_BACKENDS / 32],
            backends: [Backend::default(); MAX_GROUP_BACKENDS],
            ring: [0; RING_SIZE],
            _tail: [0; 3],
        }
    }
}

impl Group {
    /// Whether `backends[i]` is marked down.
    #[inline(always)]
    pub fn is_down(&self, i: usize) -> bool {
        i < MAX_GROUP_BACKENDS && self.down[i / 32] & (1 << (i % 32)) != 0
    }

    /// The backend a placement hash picks among those up, and its index.
    #[inline(always)]
    pub fn pick(&self, hash: u64) -> Option<(u8, &Backend)> {
        if self.up == 0 {
            return None;
        }
        // Multiply-shift instead of `%`: the same uniform reduction, and a bound the
        // verifier can follow (a constant modulo compiles to arithmetic it cannot).
        let entry = ((hash >> 32) * RING_SIZE as u64) >> 32;
        let index = *self.ring.get(entry as usize)?;
        Some((index, self.backends.get(index as usize)?))
    }
}

pub const FORWARD_STACK: u8 = 0;
pub const FORWARD_REDIRECT: u8 = 1;

pub const ROUTING_NONE: u8 = 0;
pub const ROUTING_CIDR: u8 = 1;

/// Entries in CANARY_CIDR, all services and both generations together.
pub const MAX_CIDR_ENTRIES: u32 = 16_384;
/// Cohorts of a plan decided in the kernel; rule slot [`DECISION_SPLIT`] follows them.
pub const MAX_KERNEL_COHORTS: usize = 15;
/// Decision counter slots per service: one per cohort, then the weight split.
pub const DECISION_RULES: u32 = MAX_KERNEL_COHORTS as u32 + 1;
pub const DECISION_SPLIT: u8 = MAX_KERNEL_COHORTS as u8;
/// Bits of a [`CidrKey`] before the address: service, generation, family, padding.
pub const CIDR_KEY_FIXED_BITS: u32 = 64;
/// Prefix length of a lookup: the whole key.
pub const CIDR_KEY_BITS: u32 = CIDR_KEY_FIXED_BITS + 128;

/// [`CidrValue::action`]: what a cohort's members get.
pub const CIDR_STABLE: u8 = 0;
pub const CIDR_CANARY: u8 = 1;
/// Canary when the client address's bucket is below [`CidrValue::bp`].
pub const CIDR_PERCENT: u8 = 2;
/// The cohort has no assignment: the weight split decides, and counts the decision
/// (as the router counts a cohort that falls through).
pub const CIDR_SPLIT: u8 = 3;

/// Data of a CANARY_CIDR (LPM trie) key. The first [`CIDR_KEY_FIXED_BITS`] always
/// match in full, so a prefix never crosses services, generations or families;
/// the address is stored as loaded from the packet (network byte order), which is the
/// bit order the trie matches in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrKey {
    pub service: u32,
    pub gen: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub addr: [u32; 4],
}

/// What a client address range gets: its cohort (the index in `define-cohorts`) and
/// the cohort's assignment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrValue {
    pub cohort: u8,
    pub action: u8,
    /// [`CIDR_PERCENT`]: the share of client addresses sent to canary, in basis points.
    pub bp: u16,
}

/// Index of a kernel routing decision counter (CANARY_DECISIONS, per CPU):
/// `rule` is a cohort index or [`DECISION_SPLIT`], `version` 0 stable, 1 canary.
#[inline(always)]
pub fn decision_index(service: u32, rule: u8, version: u8) -> u32 {
    (service * DECISION_RULES + rule as u32) * 2 + version as u32
}

/// One direction of a connection as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub _pad: u8,
}

impl FlowKey {
    /// The key of the reply direction of the forward flow `self`, pinned to `fwd`'s
    /// backend: backend -> client.
    #[inline(always)]
    pub fn reply(&self, fwd: &FlowValue) -> FlowKey {
        FlowKey {
            src: fwd.addr,
            dst: self.src,
            sport: fwd.port,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            dir: DIR_REPLY,
            _pad: 0,
        }
    }
}

/// What to rewrite for a pinned flow: the backend for the forward direction, the
/// service address for replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub addr: [u32; 4],
    pub port: u16,
    /// The version the flow was placed on ([`GROUP_STABLE`] or [`GROUP_CANARY`]).
    pub group: u8,
    pub flags: u8,
    pub service: u32,
    /// Reply entry: when the pending request (or the SYN) was seen, 0 if none.
    pub ts_ns: u64,
    /// Sequence number of the last request (forward) or response (reply) counted,
    /// so a retransmitted segment is not counted twice.
    pub last_seq: u32,
    /// The backend's counter slot ([`Backend::stats`]).
    pub stats: u32,
    /// TCP: the sequence state of this direction's sender (forward: the client's,
    /// reply: the backend's), enough for the node to close the connection itself at a
    /// request boundary (drain). Written with one 8-byte store per segment.
    pub tcp: TcpSeq,
}

impl FlowValue {
    /// How the flow's packets are forwarded ([`FORWARD_REDIRECT`] or [`FORWARD_STACK`]),
    /// as fixed when it was placed.
    #[inline(always)]
    pub fn forwarding(&self) -> u8 {
        if self.flags & FLOW_REDIRECT != 0 {
            FORWARD_REDIRECT
        } else {
            FORWARD_STACK
        }
    }
}

/// One direction's TCP sequence state, in host byte order. Zero means "not seen yet".
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpSeq {
    /// The sender's next sequence number: seq + payload length (+1 for SYN, +1 for
    /// FIN) of the furthest segment it sent.
    pub next: u32,
    /// The furthest acknowledgment number the sender sent.
    pub ack: u32,
}

impl TcpSeq {
    /// The state after the sender sent a segment with sequence number `seq`,
    /// `payload_len` bytes of payload, `flags` and acknowledgment number `ack` (all in
    /// host byte order). Both numbers only move forward (modulo 2^32), so a
    /// retransmission, a keep-alive probe or a reordered segment never moves them back.
    #[inline(always)]
    pub fn advance(self, seq: u32, payload_len: u32, flags: u8, ack: u32) -> TcpSeq {
        let syn_fin = (flags & TCP_FLAG_SYN != 0) as u32 + (flags & TCP_FLAG_FIN) as u32;
        let next = seq.wrapping_add(payload_len).wrapping_add(syn_fin);
        TcpSeq {
            next: if self.next == 0 || seq_after(next, self.next) {
                next
            } else {
                self.next
            },
            ack: if flags & TCP_FLAG_ACK != 0 && (self.ack == 0 || seq_after(ack, self.ack)) {
                ack
            } else {
                self.ack
            },
        }
    }
}

/// `a` comes after `b` in TCP sequence space (RFC 9293 modulo-2^32 comparison).
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Per-backend counters, one copy per CPU; the agent sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// New connections placed on this backend.
    pub connections: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Non-SYN segments whose forward entry was gone (table eviction) while the reply
    /// entry remained: placed again on the backend it names.
    pub flow_misses: u64,
    /// TCP handshakes the backend answered (its SYN-ACK seen), once per connection.
    pub handshakes: u64,
    /// TCP connections the backend reset before answering the handshake (refused).
    pub refused: u64,
}

/// Per service and version (stable, canary) application signals, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VersionTelemetry {
    /// HTTP/1.x requests: a client segment starting with a method.
    pub requests: u64,
    /// HTTP/1.x responses by status class 1xx..5xx.
    pub responses: [u64; 5],
    /// Connections reset by the backend.
    pub resets: u64,
    /// Handshakes completed (backend SYN-ACK seen).
    pub handshakes: u64,
    /// Sum of SYN -> SYN-ACK times, for the mean handshake time.
    pub handshake_ns: u64,
}

/// An address the agent made local for its router (`ip route local`): the sk_lookup
/// program refuses every TCP and UDP lookup to it that is not a routed service's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteAddr {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Spliced connections (router): sockets are keyed by their socket cookie.
pub const MAX_SPLICED: u32 = 65_536;
/// [`SplicePeer::dir`]: bytes from the client (requests) or from the backend (responses).
pub const SPLICE_REQUESTS: u8 = 0;
pub const SPLICE_RESPONSES: u8 = 1;

/// One socket of a spliced pair, written by the agent before the socket joins the
/// splice: where its bytes go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplicePeer {
    /// Socket cookie of the other socket.
    pub peer: u64,
    pub service: u32,
    /// 0 stable, 1 canary (index `service * 2 + version` into the telemetry).
    pub version: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// One spliced socket's kernel-owned state (the agent only creates and deletes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceState {
    /// When the pending request started (client sockets), for the latency histogram
    /// (0: none pending).
    pub request_ns: u64,
    /// Bytes read from this socket and redirected to its peer. The redirected bytes
    /// are sent by a kernel worker a moment later, so the agent passes a close on to
    /// the peer only once the peer has written this many.
    pub carried: u64,
}

/// Index of a version's telemetry.
#[inline(always)]
pub fn telemetry_index(service: u32, group: u8) -> u32 {
    service * 2 + (group == GROUP_CANARY) as u32
}

/// Index of a latency histogram bucket for `telemetry_index` `version`.
#[inline(always)]
pub fn latency_index(version: u32, bucket: u32) -> u32 {
    version * crate::histogram::LATENCY_BUCKETS as u32 + bucket
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, and contain only integers with explicit padding.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::SplicePeer {}
    unsafe impl aya::Pod for super::SpliceState {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::GroupKey {}
    unsafe impl aya::Pod for super::Group {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::VersionTelemetry {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::CidrValue {}
    unsafe impl aya::Pod for super::RouteAddr {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_value_layout_is_padded_and_aligned() {
        assert_eq!(core::mem::size_of::<FlowValue>(), 48);
        assert_eq!(core::mem::align_of::<FlowValue>(), 8);
        // The kernel writes `tcp` with one aligned 8-byte store.
        assert_eq!(core::mem::offset_of!(FlowValue, tcp), 40);
        assert_eq!(core::mem::size_of::<TcpSeq>(), 8);
    }

    #[test]
    fn service_value_only_grew_at_its_end_and_cidr_key_keeps_its_fixed_prefix() {
        // A value carried over from an earlier layout keeps its fields' offsets.
        assert_eq!(core::mem::size_of::<ServiceValue>(), 20);
        assert_eq!(core::mem::offset_of!(ServiceValue, routing), 10);
        assert_eq!(core::mem::offset_of!(ServiceValue, forward), 13);
        assert_eq!(core::mem::size_of::<Group>() % 4, 0);
        assert_eq!(
            core::mem::offset_of!(CidrKey, addr) as u32 * 8,
            CIDR_KEY_FIXED_BITS
        );
        assert_eq!(core::mem::size_of::<CidrKey>() as u32 * 8, CIDR_KEY_BITS);
        assert_eq!(
            decision_index(1, DECISION_SPLIT, 1),
            (DECISION_RULES * 2) + 31
        );
    }

    #[test]
    fn sequence_state_follows_syn_data_ack_fin() {
        let syn = TcpSeq::default().advance(1000, 0, TCP_FLAG_SYN, 0);
        assert_eq!(
            syn,
            TcpSeq { next: 1001, ack: 0 },
            "SYN counts one, no ACK yet"
        );
        let data = syn.advance(1001, 100, TCP_FLAG_ACK, 5001);
        assert_eq!(
            data,
            TcpSeq {
                next: 1101,
                ack: 5001
            }
        );
        let fin = data.advance(1101, 0, TCP_FLAG_FIN | TCP_FLAG_ACK, 5050);
        assert_eq!(
            fin,
            TcpSeq {
                next: 1102,
                ack: 5050
            }
        );
    }

    #[test]
    fn sequence_state_never_moves_back() {
        let s = TcpSeq {
            next: 2000,
            ack: 9000,
        };
        // A retransmission and a keep-alive probe (seq = next - 1, no payload).
        assert_eq!(s.advance(1500, 500, TCP_FLAG_ACK, 8000), s);
        assert_eq!(s.advance(1999, 0, TCP_FLAG_ACK, 9000), s);
        // A segment without ACK (a SYN retransmission) keeps the ack.
        assert_eq!(s.advance(2000, 0, 0, 0).ack, 9000);
        // Across the 2^32 wrap.
        let w = TcpSeq {
            next: u32::MAX - 10,
            ack: u32::MAX,
        };
        assert_eq!(
            w.advance(u32::MAX - 10, 20, TCP_FLAG_ACK, 5),
            TcpSeq { next: 9, ack: 5 }
        );
        assert!(seq_after(9, u32::MAX - 10) && !seq_after(u32::MAX - 10, 9));
    }
}
