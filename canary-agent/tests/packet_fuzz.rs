//! Packet fuzz: seeded frames (valid, mutated, foreign, random) run through BOTH
//! kernel programs with BPF_PROG_TEST_RUN, each output checked against a decision the
//! test computes on its own (its own header parser and flow model, checksums
//! recomputed by etherparse). Every run is made twice, with the ingress program at
//! XDP and at TC (each on a datapath of its own). Needs root (CAP_BPF, CAP_SYS_ADMIN).
//!
//! Invariants checked per frame and per program:
//! * nothing is ever dropped: XDP_PASS from XDP ingress, TC_ACT_OK from TC ingress and
//!   egress;
//! * a frame that is not ours (not a plain Ethernet / IPv4 without options or
//!   fragments / IPv6 without extension headers + TCP or UDP frame with consistent
//!   lengths, or not to a configured service, or truncated) comes out byte for byte;
//! * a frame to a service is rewritten to the backend the model expects (the pinned
//!   one; without one, for a SYN or a UDP datagram the one placement picks, for any
//!   other TCP segment the one whose reply pin it matches), with only the destination
//!   address and port and the checksums changed, checksums that still verify, and no
//!   other byte moved;
//! * a TCP segment to a service that is not a SYN and matches no pin comes out byte for
//!   byte and pins nothing;
//! * a reply from a backend of a pinned flow gets the service address as its source,
//!   nothing else but checksums changed; any other reply passes untouched.
//!
//! `CANARY_FUZZ_FRAMES=N` sizes the ignored full run (default 1 000 000):
//! `cargo test -p canary-agent --test packet_fuzz -- --ignored --nocapture`.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use canary_agent::{
    config::{Config, Mode, Protocol, Sticky},
    datapath::Datapath,
};
use canary_common::{
    client_hash, flow_hash, hash_group, smooth_pick, GROUP_CANARY, PROG_EGRESS, PROG_INGRESS,
    PROG_INGRESS_TC,
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TCP: u8 = 6;
const UDP: u8 = 17;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
/// Frames per fresh datapath: at most two flow entries per frame, far below the flow
/// table's 131 072, so the LRU never evicts a flow the model still holds.
const EPOCH: usize = 25_000;

// ---------------------------------------------------------------------------------
// The datapath on a private bpffs mount (as in packet_fixtures.rs).

mod pins;
use pins::{Pins, Programs};

/// Fields drop in order: program fds and the datapath before the mount.
struct Fixture {
    programs: std::cell::RefCell<Programs>,
    ingress: &'static str,
    dp: Datapath,
    _pins: Pins,
}

/// Where the ingress program runs.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::Xdp => PROG_INGRESS,
            Hook::Tc => PROG_INGRESS_TC,
        }
    }

    fn pass(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::Tc => TC_ACT_OK,
        }
    }
}

/// An IP length field of 0: at XDP a malformed frame (not ours), at TC the kernel's BIG
/// TCP convention (length from the skb), which a test run's frame cannot stand for.
fn ip_length_zero(f: &[u8]) -> bool {
    match f.get(12..14) {
        Some([0x08, 0x00]) => f.len() >= 18 && be16(f, 16) == 0,
        Some([0x86, 0xDD]) => f.len() >= 20 && be16(f, 18) == 0,
        _ => false,
    }
}

/// What a test run gave: the verdict and the packet, or the kernel's refusal to build
/// a context from the frame (an error of the syscall, not of the program).
enum Outcome {
    Ran(u32, Vec<u8>),
    Refused(String),
}

impl Fixture {
    fn new(config: &Config) -> Fixture {
        Self::at(config, Hook::Xdp)
    }

    fn at(config: &Config, hook: Hook) -> Fixture {
        let pins = Pins::new("fuzz");
        let dp = pins.load_with_services(config);
        Fixture {
            programs: std::cell::RefCell::new(Programs::load(&pins.0)),
            ingress: hook.program(),
            dp,
            _pins: pins,
        }
    }

    fn run(&self, ingress: bool, frame: &[u8]) -> Outcome {
        let prog = if ingress { self.ingress } else { PROG_EGRESS };
        match self.programs.borrow_mut().run(prog, frame, 1) {
            Ok(r) => Outcome::Ran(r.retval, r.packet),
            Err(e) => Outcome::Refused(e),
        }
    }
}

/// Exact mode keeps its smooth counter per CPU; running every test run on one CPU
/// makes it a single sequence the model can follow.
fn pin_to_one_cpu() {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned by this frame.
    unsafe {
        let cpu = libc::sched_getcpu().max(0) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// Two services per family, TCP and UDP, hash (per connection and per client) and
/// exact, one without canary backends.
const SERVICES: &str = r#"
[agent]
interface = "lo"
[[service]]
name = "web4"
listen = "198.19.0.10:80"
stable = ["198.18.2.2:8080", "198.18.2.3:8080"]
canary = ["198.18.3.2:9090"]
weight = 50
[[service]]
name = "tls4"
listen = "198.19.0.10:443"
stable = ["198.18.2.2:8443"]
[[service]]
name = "dns4"
listen = "198.19.0.53:53"
protocol = "udp"
stable = ["198.18.2.2:5353"]
canary = ["198.18.3.2:5353", "198.18.3.3:5353"]
weight = 25
mode = "exact"
[[service]]
name = "web6"
listen = "[2001:db8:ffff::10]:80"
stable = ["[2001:db8:2::2]:8080"]
canary = ["[2001:db8:3::2]:9090", "[2001:db8:3::3]:9090"]
weight = 30
mode = "exact"
[[service]]
name = "dns6"
listen = "[2001:db8:ffff::53]:53"
protocol = "udp"
stable = ["[2001:db8:2::2]:5353", "[2001:db8:2::3]:5353"]
canary = ["[2001:db8:3::2]:5353"]
weight = 60
sticky = "client-ip"
"#;

fn config() -> Config {
    Config::parse(SERVICES, std::path::Path::new("fuzz.toml")).unwrap()
}

// ---------------------------------------------------------------------------------
// Addresses as the test handles them: 16 bytes (IPv4 in the first four) and a port.

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Ep {
    addr: [u8; 16],
    port: u16,
}

impl Ep {
    fn of(sa: SocketAddr) -> Ep {
        let mut addr = [0; 16];
        match sa.ip() {
            IpAddr::V4(v4) => addr[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => addr = v6.octets(),
        }
        Ep {
            addr,
            port: sa.port(),
        }
    }

    /// The address as the kernel loads it: four native-endian words of packet bytes.
    fn words(&self) -> [u32; 4] {
        core::array::from_fn(|i| {
            u32::from_ne_bytes(self.addr[4 * i..4 * i + 4].try_into().unwrap())
        })
    }

    fn wire_port(&self) -> u16 {
        u16::from_ne_bytes(self.port.to_be_bytes())
    }
}

/// One direction of a connection as it appears in a frame.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Tuple {
    v6: bool,
    proto: u8,
    src: Ep,
    dst: Ep,
}

// ---------------------------------------------------------------------------------
// The test's own parser: what the datapath may treat as its own.

fn be16(f: &[u8], off: usize) -> usize {
    u16::from_be_bytes([f[off], f[off + 1]]) as usize
}

/// A frame whose headers the datapath may act on.
#[derive(Debug, Clone, Copy)]
struct Spec {
    tuple: Tuple,
    l4: usize,
    /// End of the IP packet as its header claims; `None` when the length field is 0
    /// (the kernel's BIG TCP convention: length from the skb).
    ip_end: Option<usize>,
    tcp_flags: u8,
    /// Headers consistent and the whole IP packet present in the frame: the only
    /// frames that may be rewritten.
    complete: bool,
}

/// Plain Ethernet II, IPv4 (IHL 5, no MF, no offset) or IPv6 (TCP or UDP as next
/// header), lengths that hold the L4 header, TCP data offset within 5..=segment, UDP
/// length within 8..=IP payload. Anything else is not ours.
fn spec_parse(f: &[u8]) -> Option<Spec> {
    if f.len() < 14 {
        return None;
    }
    // The IP length field, the header bytes it counts, and where it counts from.
    let (v6, proto, src, dst, l4, len_field, hdr, base) = match be16(f, 12) {
        0x0800 => {
            if f.len() < 34 || f[14] != 0x45 || be16(f, 20) & 0x3FFF != 0 {
                return None;
            }
            let mut src = [0; 16];
            let mut dst = [0; 16];
            src[..4].copy_from_slice(&f[26..30]);
            dst[..4].copy_from_slice(&f[30..34]);
            (false, f[23], src, dst, 34, be16(f, 16), 20, 14)
        }
        0x86DD => {
            if f.len() < 54 || f[14] >> 4 != 6 {
                return None;
            }
            let src: [u8; 16] = f[22..38].try_into().unwrap();
            let dst: [u8; 16] = f[38..54].try_into().unwrap();
            (true, f[20], src, dst, 54, be16(f, 18), 0, 54)
        }
        _ => return None,
    };
    let l4_min = match proto {
        TCP => 20,
        UDP => 8,
        _ => return None,
    };
    if f.len() < l4 + l4_min {
        return None;
    }
    let ip_end = if len_field == 0 {
        None
    } else if len_field < hdr + l4_min {
        return None;
    } else {
        Some(base + len_field)
    };
    let mut tcp_flags = 0;
    if proto == TCP {
        let doff = (f[l4 + 12] >> 4) as usize;
        if doff < 5 || ip_end.is_some_and(|e| l4 + doff * 4 > e) {
            return None;
        }
        tcp_flags = f[l4 + 13];
    } else if let Some(e) = ip_end {
        let ulen = be16(f, l4 + 4);
        if ulen < 8 || ulen > e - l4 {
            return None;
        }
    }
    let tuple = Tuple {
        v6,
        proto,
        src: Ep {
            addr: src,
            port: be16(f, l4) as u16,
        },
        dst: Ep {
            addr: dst,
            port: be16(f, l4 + 2) as u16,
        },
    };
    Some(Spec {
        tuple,
        l4,
        ip_end,
        tcp_flags,
        complete: ip_end.is_some_and(|e| e <= f.len()),
    })
}

// ---------------------------------------------------------------------------------
// Checksums: the test's own one's-complement residuals, and etherparse's recompute.

fn ones_sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

fn fold(mut s: u64) -> u16 {
    while s > 0xFFFF {
        s = (s & 0xFFFF) + (s >> 16);
    }
    s as u16
}

/// One's-complement sums over the IPv4 header and over the L4 pseudo header and
/// segment, checksum fields included: 0xFFFF (or its twin 0) means "verifies".
fn residuals(f: &[u8], s: &Spec) -> (Option<u16>, u16) {
    let end = s.ip_end.unwrap();
    let ip = (!s.tuple.v6).then(|| fold(ones_sum(&f[14..34], 0)));
    let seg_len = if s.tuple.proto == UDP {
        be16(f, s.l4 + 4)
    } else {
        end - s.l4
    };
    let mut acc = if s.tuple.v6 {
        ones_sum(&f[22..54], 0)
    } else {
        ones_sum(&f[26..34], 0)
    };
    acc += s.tuple.proto as u64 + seg_len as u64;
    (ip, fold(ones_sum(&f[s.l4..s.l4 + seg_len], acc)))
}

fn same_residual(a: u16, b: u16) -> bool {
    a == b || (a == 0 && b == 0xFFFF) || (a == 0xFFFF && b == 0)
}

/// Every checksum of a complete frame recomputed from scratch by etherparse.
/// `Err` says which one is wrong.
fn etherparse_verify(f: &[u8]) -> Result<(), String> {
    let p = SlicedPacket::from_ethernet(f).map_err(|e| format!("etherparse: {e}"))?;
    let net = p.net.as_ref().ok_or("no network layer")?;
    if let NetSlice::Ipv4(v4) = net {
        let h = v4.header().to_header();
        // Only where etherparse's header struct holds every bit (it has no field for
        // the reserved flag); the test's own residual check covers the rest.
        let representable = h.to_bytes().as_slice() == v4.header().slice();
        if representable && h.header_checksum != h.calc_header_checksum() {
            return Err("IPv4 header checksum".into());
        }
    }
    let equal = |got: u16, want: u16| got == want || (got | want == 0xFFFF && got & want == 0);
    match p.transport.as_ref().ok_or("no transport layer")? {
        TransportSlice::Tcp(t) => {
            // From the raw slice: a header struct would drop the reserved bits.
            let want = match net {
                NetSlice::Ipv4(v4) => {
                    t.calc_checksum_ipv4(v4.header().source(), v4.header().destination())
                }
                NetSlice::Ipv6(v6) => {
                    t.calc_checksum_ipv6(v6.header().source(), v6.header().destination())
                }
            }
            .map_err(|e| e.to_string())?;
            if !equal(t.checksum(), want) {
                return Err(format!(
                    "TCP checksum {:#06x}, want {want:#06x}",
                    t.checksum()
                ));
            }
        }
        TransportSlice::Udp(u) => {
            let h = u.to_header();
            let want = match net {
                NetSlice::Ipv4(_) if h.checksum == 0 => return Ok(()),
                NetSlice::Ipv4(v4) => h.calc_checksum_ipv4(&v4.header().to_header(), u.payload()),
                NetSlice::Ipv6(v6) => h.calc_checksum_ipv6(&v6.header().to_header(), u.payload()),
            }
            .map_err(|e| e.to_string())?;
            if !equal(h.checksum, want) {
                return Err(format!(
                    "UDP checksum {:#06x}, want {want:#06x}",
                    h.checksum
                ));
            }
        }
        other => return Err(format!("unexpected transport {other:?}")),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The flow model: services, pinned flows in both directions, exact-mode counters.

struct Service {
    listen: Ep,
    v6: bool,
    proto: u8,
    exact: bool,
    client_ip: bool,
    weight_bp: u16,
    stable: Vec<Ep>,
    canary: Vec<Ep>,
    /// Stable's and canary's rings, built as the agent builds them.
    rings: [Box<canary_common::Group>; 2],
    /// Exact mode's smooth counter on the one CPU the test runs on.
    acc: u32,
}

#[derive(Clone, Copy, Debug)]
struct Pin {
    to: Ep,
    closing: bool,
}

struct Model {
    services: Vec<Service>,
    forward: HashMap<Tuple, Pin>,
    reply: HashMap<Tuple, Pin>,
    /// Reply keys in the order they were first pinned (for seeded picks).
    reply_keys: Vec<Tuple>,
}

/// What a program must do with one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Unchanged,
    /// Destination (ingress) or source (egress) becomes this endpoint.
    Rewrite(Ep),
    /// A reply of a pinned flow whose headers are ours but whose IP length is 0 (BIG
    /// TCP inside the stack: a rewrite is right, and so is leaving a frame that is not
    /// really one alone). Either outcome is accepted and counted.
    UnchangedOrRewrite(Ep),
}

fn reply_key(fwd: &Tuple, backend: Ep) -> Tuple {
    Tuple {
        v6: fwd.v6,
        proto: fwd.proto,
        src: backend,
        dst: fwd.src,
    }
}

impl Model {
    fn new(config: &Config) -> Model {
        let services = config
            .services
            .iter()
            .map(|s| Service {
                listen: Ep::of(s.listen),
                v6: s.listen.is_ipv6(),
                proto: match s.protocol {
                    Protocol::Tcp => TCP,
                    Protocol::Udp => UDP,
                    Protocol::Http => unreachable!("the fuzz configs have no http service"),
                },
                exact: s.mode == Mode::Exact,
                client_ip: s.sticky == Sticky::ClientIp,
                weight_bp: s.weight_bp,
                stable: s.stable.iter().map(|a| Ep::of(*a)).collect(),
                canary: s.canary.iter().map(|a| Ep::of(*a)).collect(),
                rings: [&s.stable, &s.canary].map(|list| {
                    let spec = canary_agent::datapath::GroupSpec {
                        backends: list.clone(),
                        down: vec![false; list.len()],
                    };
                    Box::new(spec.encode(&[]))
                }),
                acc: 0,
            })
            .collect();
        Model {
            services,
            forward: HashMap::new(),
            reply: HashMap::new(),
            reply_keys: Vec::new(),
        }
    }

    fn hash(&self, svc: usize, t: &Tuple) -> u64 {
        if self.services[svc].client_ip {
            client_hash(&t.src.words())
        } else {
            flow_hash(
                &t.src.words(),
                &t.dst.words(),
                t.src.wire_port(),
                t.dst.wire_port(),
                t.proto,
            )
        }
    }

    /// Where a non-SYN segment without a forward pin is placed again: the hash's
    /// backend in the weight's group, else in the other group, whichever has a reply
    /// pin for this connection (to this service address); none: it passes untouched.
    fn replace(&self, svc: usize, t: &Tuple) -> Option<Ep> {
        let s = &self.services[svc];
        let hash = self.hash(svc, t);
        let first = hash_group(hash, s.weight_bp);
        [first, 1 - first].into_iter().find_map(|group| {
            let list = if group == GROUP_CANARY {
                &s.canary
            } else {
                &s.stable
            };
            let (i, _) = s.rings[group as usize].pick(hash)?;
            let b = list[i as usize];
            let pin = self.reply.get(&reply_key(t, b))?;
            (pin.to == t.dst).then_some(b)
        })
    }

    /// The backend a new flow is placed on (mirrors the documented placement:
    /// hash or exact group, fallback to the non-empty group, backend by hash).
    fn place(&mut self, svc: usize, t: &Tuple) -> Ep {
        let hash = self.hash(svc, t);
        let s = &mut self.services[svc];
        let mut group = if s.exact {
            smooth_pick(&mut s.acc, s.weight_bp)
        } else {
            hash_group(hash, s.weight_bp)
        };
        if group == GROUP_CANARY && s.canary.is_empty() {
            group = 1 - GROUP_CANARY;
        }
        let list = if group == GROUP_CANARY {
            &s.canary
        } else {
            &s.stable
        };
        let (i, _) = s.rings[group as usize].pick(hash).expect("a backend");
        list[i as usize]
    }

    /// Ingress decision for `f`; updates pins as the datapath does.
    fn ingress(&mut self, f: &[u8]) -> Expect {
        let Some(s) = spec_parse(f) else {
            return Expect::Unchanged;
        };
        let t = s.tuple;
        let Some(svc) = self
            .services
            .iter()
            .position(|v| v.v6 == t.v6 && v.proto == t.proto && v.listen == t.dst)
        else {
            return Expect::Unchanged;
        };
        if !s.complete {
            // Cut short (or without an IP length): the kernel drops it; XDP neither
            // places nor counts it.
            return Expect::Unchanged;
        }
        let tcp = t.proto == TCP;
        // Only a SYN (alone among SYN, ACK, FIN, RST) or a UDP datagram opens a flow.
        let opens = !tcp || s.tcp_flags & (SYN | ACK | FIN | RST) == SYN;
        let syn = tcp && opens;
        let fin_rst = tcp && s.tcp_flags & (FIN | RST) != 0;
        let reply_closing =
            |m: &Model, p: &Pin| m.reply.get(&reply_key(&t, p.to)).is_some_and(|r| r.closing);
        let backend = match self.forward.get(&t).copied() {
            Some(p) if !(syn && (p.closing || reply_closing(self, &p))) => {
                if fin_rst {
                    self.forward.get_mut(&t).unwrap().closing = true;
                }
                p.to
            }
            _ if !opens => {
                // Not a SYN and no forward pin: placed again only from a reply pin;
                // otherwise not ours, untouched, and nothing is pinned.
                let Some(b) = self.replace(svc, &t) else {
                    return Expect::Unchanged;
                };
                self.forward.insert(
                    t,
                    Pin {
                        to: b,
                        closing: false,
                    },
                );
                b
            }
            _ => {
                let b = self.place(svc, &t);
                let rk = reply_key(&t, b);
                let pin = Pin {
                    to: t.dst,
                    closing: false,
                };
                if self.reply.insert(rk, pin).is_none() {
                    self.reply_keys.push(rk);
                }
                self.forward.insert(
                    t,
                    Pin {
                        to: b,
                        closing: false,
                    },
                );
                b
            }
        };
        Expect::Rewrite(backend)
    }

    /// Egress decision for `f` (the closing flag is applied by `egress_done`).
    fn egress(&self, f: &[u8]) -> Expect {
        let Some(s) = spec_parse(f) else {
            return Expect::Unchanged;
        };
        match self.reply.get(&s.tuple) {
            None => Expect::Unchanged,
            Some(p) if s.complete => Expect::Rewrite(p.to),
            // An IP length of 0 is BIG TCP's convention inside the stack: TC may
            // rewrite it. A reply cut short is left alone.
            Some(p) if s.ip_end.is_none() => Expect::UnchangedOrRewrite(p.to),
            Some(_) => Expect::Unchanged,
        }
    }

    /// A backend FIN or RST marks the reply entry closing (when egress handled it).
    fn egress_done(&mut self, f: &[u8]) {
        if let Some(s) = spec_parse(f) {
            if s.tuple.proto == TCP && s.tcp_flags & (FIN | RST) != 0 {
                if let Some(p) = self.reply.get_mut(&s.tuple) {
                    p.closing = true;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Checking one output.

/// Byte ranges a rewrite may touch: (address, port, IPv4 header checksum, L4 checksum).
fn allowed(s: &Spec, ingress: bool) -> Vec<std::ops::Range<usize>> {
    let l4 = s.l4;
    let mut r = vec![];
    match (s.tuple.v6, ingress) {
        (false, true) => r.extend([30..34, 24..26]),
        (false, false) => r.extend([26..30, 24..26]),
        (true, true) => r.push(38..54),
        (true, false) => r.push(22..38),
    }
    r.push(if ingress { l4 + 2..l4 + 4 } else { l4..l4 + 2 });
    r.push(if s.tuple.proto == TCP {
        l4 + 16..l4 + 18
    } else {
        l4 + 6..l4 + 8
    });
    r
}

/// Checks a rewritten frame; `Err` describes the violation.
fn check_rewrite(input: &[u8], out: &[u8], to: Ep, ingress: bool) -> Result<(), String> {
    let s = spec_parse(input).unwrap();
    if out.len() != input.len() {
        return Err(format!("length {} -> {}", input.len(), out.len()));
    }
    let ranges = allowed(&s, ingress);
    for (i, (a, b)) in input.iter().zip(out).enumerate() {
        if a != b && !ranges.iter().any(|r| r.contains(&i)) {
            return Err(format!("byte {i} changed {a:#04x} -> {b:#04x}"));
        }
    }
    let o = spec_parse(out).ok_or("output no longer parses")?;
    let got = if ingress { o.tuple.dst } else { o.tuple.src };
    if got != to {
        return Err(format!("rewritten to {got:?}, expected {to:?}"));
    }
    if !s.complete {
        return Ok(());
    }
    let (ip_in, l4_in) = residuals(input, &s);
    let (ip_out, l4_out) = residuals(out, &o);
    if let (Some(a), Some(b)) = (ip_in, ip_out) {
        if !same_residual(a, b) {
            return Err(format!(
                "IPv4 header checksum residual {a:#06x} -> {b:#06x}"
            ));
        }
    }
    let c = if s.tuple.proto == TCP { 16 } else { 6 };
    let no_udp_csum =
        !s.tuple.v6 && s.tuple.proto == UDP && input[s.l4 + c..s.l4 + c + 2] == [0, 0];
    if no_udp_csum {
        if out[s.l4 + c..s.l4 + c + 2] != [0, 0] {
            return Err("IPv4 UDP without checksum got one".into());
        }
    } else if !same_residual(l4_in, l4_out) {
        return Err(format!(
            "L4 checksum residual {l4_in:#06x} -> {l4_out:#06x}"
        ));
    }
    let valid_in = ip_in.is_none_or(|r| same_residual(r, 0xFFFF))
        && (no_udp_csum || same_residual(l4_in, 0xFFFF));
    if valid_in {
        etherparse_verify(input).map_err(|e| format!("model/etherparse disagree on input: {e}"))?;
        etherparse_verify(out)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Frames.

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

struct L4 {
    proto: u8,
    flags: u8,
    seq: u32,
    /// TCP option words (4 bytes each) beyond the 20-byte header.
    opt_words: usize,
    /// IPv4 UDP sent without a checksum.
    no_csum: bool,
}

/// A well-formed frame from `src` to `dst` (same family) with valid checksums.
fn build(src: Ep, dst: Ep, v6: bool, l4: &L4, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend(src.port.to_be_bytes());
    seg.extend(dst.port.to_be_bytes());
    if l4.proto == TCP {
        seg.extend(l4.seq.to_be_bytes());
        seg.extend(if l4.flags & ACK != 0 { 7u32 } else { 0 }.to_be_bytes());
        seg.push(((5 + l4.opt_words) as u8) << 4);
        seg.push(l4.flags);
        seg.extend(64_000u16.to_be_bytes());
        seg.extend([0, 0, 0, 0]);
        for w in 0..l4.opt_words {
            seg.extend(if w == 0 {
                [2, 4, 5, 0xB4]
            } else {
                [1, 1, 1, 1]
            });
        }
    } else {
        seg.extend(((8 + payload.len()) as u16).to_be_bytes());
        seg.extend([0, 0]);
    }
    seg.extend_from_slice(payload);
    let mut acc = if v6 {
        ones_sum(&src.addr, ones_sum(&dst.addr, 0))
    } else {
        ones_sum(&src.addr[..4], ones_sum(&dst.addr[..4], 0))
    };
    acc += l4.proto as u64 + seg.len() as u64;
    let mut c = !fold(ones_sum(&seg, acc));
    let at = if l4.proto == TCP { 16 } else { 6 };
    if l4.proto == UDP {
        if c == 0 {
            c = 0xFFFF;
        }
        if l4.no_csum && !v6 {
            c = 0;
        }
    }
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(seg.len() + 54);
    f.extend(MAC_B);
    f.extend(MAC_A);
    if v6 {
        f.extend([0x86, 0xDD, 0x60, 0, 0, 0]);
        f.extend((seg.len() as u16).to_be_bytes());
        f.extend([l4.proto, 64]);
        f.extend(src.addr);
        f.extend(dst.addr);
    } else {
        f.extend([0x08, 0x00, 0x45, 0]);
        f.extend(((20 + seg.len()) as u16).to_be_bytes());
        f.extend([0x12, 0x34, 0x40, 0, 64, l4.proto, 0, 0]);
        f.extend(&src.addr[..4]);
        f.extend(&dst.addr[..4]);
        fix_ipv4_checksum(&mut f, 14);
    }
    f.extend(seg);
    f
}

fn fix_ipv4_checksum(f: &mut [u8], ip: usize) {
    let ihl = ((f[ip] & 0x0F) as usize * 4).max(20);
    if f.len() < ip + ihl {
        return;
    }
    f[ip + 10] = 0;
    f[ip + 11] = 0;
    let c = !fold(ones_sum(&f[ip..ip + ihl], 0));
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
}

/// Offset and ethertype of the L3 header after any VLAN tags.
fn l3(f: &[u8]) -> Option<(usize, usize)> {
    let mut off = 12;
    while f.len() >= off + 2 {
        let et = be16(f, off);
        if et == 0x8100 || et == 0x88A8 {
            off += 4;
            continue;
        }
        return Some((off + 2, et));
    }
    None
}

const PAYLOADS: [&[u8]; 7] = [
    b"",
    b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
    b"POST /checkout HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HEAD",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
];

const FLAG_SETS: [u8; 8] = [
    SYN,
    SYN,
    ACK,
    PSH | ACK,
    PSH | ACK,
    FIN | ACK,
    RST,
    SYN | ACK,
];

/// The classes of generated frames, for the figures.
const CLASSES: [&str; 9] = [
    "random bytes",
    "to a service",
    "reply of a pinned flow",
    "mutated to-service",
    "mutated reply",
    "other address/port/protocol",
    "ARP",
    "ICMP/ICMPv6",
    "truncation sweep",
];

struct Gen {
    rng: ChaCha8Rng,
}

impl Gen {
    fn payload(&mut self) -> Vec<u8> {
        if self.rng.gen_bool(0.15) {
            let n = self.rng.gen_range(0..1400);
            (0..n).map(|_| self.rng.gen()).collect()
        } else {
            PAYLOADS.choose(&mut self.rng).unwrap().to_vec()
        }
    }

    fn l4(&mut self, proto: u8) -> L4 {
        L4 {
            proto,
            flags: *FLAG_SETS.choose(&mut self.rng).unwrap(),
            seq: self.rng.gen_range(0..5),
            opt_words: if self.rng.gen_bool(0.2) {
                self.rng.gen_range(1..=10)
            } else {
                0
            },
            no_csum: self.rng.gen_bool(0.2),
        }
    }

    /// A client from a small pool, so tuples repeat and flows get reused and closed.
    fn client(&mut self, v6: bool) -> Ep {
        let host = self.rng.gen_range(1..=6u8);
        let sa: SocketAddr = if v6 {
            format!("[2001:db8:1::{host}]:1").parse().unwrap()
        } else {
            format!("198.18.1.{host}:1").parse().unwrap()
        };
        Ep {
            port: 40_000 + self.rng.gen_range(0..40),
            ..Ep::of(sa)
        }
    }

    fn request(&mut self, m: &Model) -> Vec<u8> {
        let s = m.services.choose(&mut self.rng).unwrap();
        let client = self.client(s.v6);
        let l4 = self.l4(s.proto);
        let payload = self.payload();
        let mut f = build(client, s.listen, s.v6, &l4, &payload);
        if self.rng.gen_bool(0.1) {
            // Ethernet padding past the IP packet is still a valid frame.
            f.resize(f.len().max(60) + self.rng.gen_range(0..8), 0);
        }
        f
    }

    /// A reply from the backend of a flow the model holds (or a near miss of one).
    fn reply(&mut self, m: &Model) -> Vec<u8> {
        let Some(&(mut t)) = m.reply_keys.choose(&mut self.rng) else {
            return self.request(m);
        };
        match self.rng.gen_range(0..10) {
            0 => t.src.port ^= 1,
            1 => t.dst.port = t.dst.port.wrapping_add(1),
            _ => {}
        }
        let l4 = self.l4(t.proto);
        let payload = self.payload();
        build(t.src, t.dst, t.v6, &l4, &payload)
    }

    fn other(&mut self, m: &Model) -> Vec<u8> {
        let s = m.services.choose(&mut self.rng).unwrap();
        let client = self.client(s.v6);
        let mut dst = s.listen;
        let mut proto = s.proto;
        match self.rng.gen_range(0..4) {
            0 => dst.port = self.rng.gen(),
            1 => dst.addr[if s.v6 { 15 } else { 3 }] ^= self.rng.gen_range(1..=255),
            2 => proto = if proto == TCP { UDP } else { TCP },
            _ => {
                // Another transport protocol (SCTP, GRE, ESP) to the service address.
                let mut f = build(client, dst, s.v6, &self.l4(UDP), b"other protocol");
                let p = *[132u8, 47, 50].choose(&mut self.rng).unwrap();
                if s.v6 {
                    f[20] = p;
                } else {
                    f[23] = p;
                    fix_ipv4_checksum(&mut f, 14);
                }
                return f;
            }
        }
        let l4 = self.l4(proto);
        let payload = self.payload();
        build(client, dst, s.v6, &l4, &payload)
    }

    fn arp(&mut self) -> Vec<u8> {
        let mut f = vec![0xFF; 6];
        f.extend(MAC_A);
        f.extend([
            0x08,
            0x06,
            0,
            1,
            0x08,
            0,
            6,
            4,
            0,
            self.rng.gen_range(1..=2),
        ]);
        f.extend(MAC_A);
        f.extend([198, 18, 1, 2]);
        f.extend([0; 6]);
        f.extend([198, 19, 0, 10]);
        f
    }

    /// Echo requests, and errors quoting a packet to a service.
    fn icmp(&mut self, m: &Model) -> Vec<u8> {
        let v6 = self.rng.gen_bool(0.5);
        let s = m.services.iter().filter(|s| s.v6 == v6).collect::<Vec<_>>();
        let s = s.choose(&mut self.rng).unwrap();
        let client = self.client(v6);
        let quoted = build(s.listen, client, v6, &self.l4(s.proto), b"");
        let (ty, body): (u8, Vec<u8>) = if self.rng.gen_bool(0.5) {
            (if v6 { 128 } else { 8 }, b"ping".to_vec())
        } else {
            (if v6 { 1 } else { 3 }, quoted[14..].to_vec())
        };
        let proto = if v6 { 58 } else { 1 };
        let mut f = build(client, s.listen, v6, &self.l4(UDP), &[0; 0]);
        let l4 = if v6 { 54 } else { 34 };
        f.truncate(l4);
        f.extend([ty, 0, 0, 0, 0, 0, 0, 0]);
        f.extend(body);
        let len = f.len() - l4;
        if v6 {
            f[20] = proto;
            f[18..20].copy_from_slice(&(len as u16).to_be_bytes());
        } else {
            f[23] = proto;
            f[16..18].copy_from_slice(&((len + 20) as u16).to_be_bytes());
            fix_ipv4_checksum(&mut f, 14);
        }
        f
    }

    fn random_bytes(&mut self) -> Vec<u8> {
        let n = self.rng.gen_range(0..160);
        let mut f: Vec<u8> = (0..n).map(|_| self.rng.gen()).collect();
        if n >= 15 && self.rng.gen_bool(0.6) {
            let v6 = self.rng.gen_bool(0.5);
            f[12..14].copy_from_slice(if v6 { &[0x86, 0xDD] } else { &[0x08, 0x00] });
            f[14] = if v6 { 0x60 } else { 0x45 };
            if n >= 24 && self.rng.gen_bool(0.5) {
                f[if v6 { 20 } else { 23 }] = *[TCP, UDP].choose(&mut self.rng).unwrap();
            }
        }
        f
    }

    /// One to three of the mutations a datapath meets on real or hostile networks.
    fn mutate(&mut self, mut f: Vec<u8>) -> Vec<u8> {
        for _ in 0..self.rng.gen_range(1..=3) {
            let Some((ip, et)) = l3(&f) else { break };
            let v4 = et == 0x0800 && f.len() >= ip + 20;
            let v6 = et == 0x86DD && f.len() >= ip + 40;
            let l4 = if v4 {
                ip + (f[ip] & 0x0F) as usize * 4
            } else {
                ip + 40
            };
            let proto = if v4 {
                f[ip + 9]
            } else if v6 {
                f[ip + 6]
            } else {
                0
            };
            match self.rng.gen_range(0..14) {
                0 => {
                    let n = self.rng.gen_range(0..f.len().max(1));
                    f.truncate(n);
                }
                1 if v4 => {
                    let tot = be16(&f, ip + 2) as i32;
                    let new = match self.rng.gen_range(0..4) {
                        0 => self.rng.gen::<u16>() as i32,
                        1 => 0,
                        _ => tot + self.rng.gen_range(-40..=40),
                    };
                    f[ip + 2..ip + 4].copy_from_slice(&(new.clamp(0, 0xFFFF) as u16).to_be_bytes());
                    if self.rng.gen_bool(0.7) {
                        fix_ipv4_checksum(&mut f, ip);
                    }
                }
                2 if v4 => {
                    if self.rng.gen_bool(0.5) {
                        // A bare IHL change: header and payload now disagree.
                        f[ip] = (f[ip] & 0xF0) | self.rng.gen_range(0..16);
                    } else {
                        // Well-formed options (NOP..., EOL), lengths and checksum fixed.
                        let words = self.rng.gen_range(1..=10usize);
                        let mut opts = vec![1u8; words * 4];
                        *opts.last_mut().unwrap() = 0;
                        let at = ip + 20;
                        f.splice(at..at, opts);
                        f[ip] = 0x40 | (5 + words as u8);
                        let tot = be16(&f, ip + 2) + words * 4;
                        f[ip + 2..ip + 4].copy_from_slice(&(tot as u16).to_be_bytes());
                    }
                    fix_ipv4_checksum(&mut f, ip);
                }
                3 if v4 => {
                    let frag = match self.rng.gen_range(0..3) {
                        0 => 0x2000,
                        1 => self.rng.gen_range(1..0x2000),
                        _ => 0x2000 | self.rng.gen_range(1..0x2000),
                    };
                    f[ip + 6..ip + 8].copy_from_slice(&(frag as u16).to_be_bytes());
                    fix_ipv4_checksum(&mut f, ip);
                }
                4 => {
                    let tci = self.rng.gen::<u16>().to_be_bytes();
                    let tags: Vec<u8> = if self.rng.gen_bool(0.5) {
                        vec![0x81, 0x00, tci[0], tci[1]]
                    } else {
                        vec![0x88, 0xA8, tci[0], tci[1], 0x81, 0x00, 0, 7]
                    };
                    if f.len() >= 12 {
                        f.splice(12..12, tags);
                    }
                }
                5 if v6 => {
                    // An extension header between IPv6 and L4, lengths fixed.
                    let kind = *[0u8, 43, 44, 60].choose(&mut self.rng).unwrap();
                    let units = if kind == 44 {
                        0
                    } else {
                        self.rng.gen_range(0..3usize)
                    };
                    let mut ext = vec![0u8; 8 * (units + 1)];
                    ext[0] = f[ip + 6];
                    ext[1] = units as u8;
                    if kind == 44 {
                        ext[2..4].copy_from_slice(&self.rng.gen::<u16>().to_be_bytes());
                    } else if kind != 43 {
                        // PadN filling the options area.
                        ext[2] = 1;
                        ext[3] = (ext.len() - 4) as u8;
                    }
                    f.splice(ip + 40..ip + 40, ext.iter().copied());
                    f[ip + 6] = kind;
                    let plen = be16(&f, ip + 4) + ext.len();
                    f[ip + 4..ip + 6].copy_from_slice(&(plen as u16).to_be_bytes());
                }
                6 if v6 => {
                    let plen = be16(&f, ip + 4) as i32;
                    let new = match self.rng.gen_range(0..3) {
                        0 => self.rng.gen::<u16>() as i32,
                        1 => 0,
                        _ => plen + self.rng.gen_range(-30..=30),
                    };
                    f[ip + 4..ip + 6].copy_from_slice(&(new.clamp(0, 0xFFFF) as u16).to_be_bytes());
                }
                7 if proto == TCP && f.len() > l4 + 12 => {
                    f[l4 + 12] = (self.rng.gen_range(0..16u8) << 4) | (f[l4 + 12] & 0x0F);
                }
                8 if proto == UDP && f.len() > l4 + 5 => {
                    let ulen = be16(&f, l4 + 4) as i32;
                    let new = match self.rng.gen_range(0..3) {
                        0 => self.rng.gen::<u16>() as i32,
                        1 => self.rng.gen_range(0..8),
                        _ => ulen + self.rng.gen_range(-10..=10),
                    };
                    f[l4 + 4..l4 + 6].copy_from_slice(&(new.clamp(0, 0xFFFF) as u16).to_be_bytes());
                }
                9 if f.len() >= 14 => {
                    f[12..14].copy_from_slice(&self.rng.gen::<u16>().to_be_bytes());
                }
                10 if v4 || v6 => {
                    let at = if v4 { ip + 9 } else { ip + 6 };
                    f[at] = self.rng.gen();
                    if v4 {
                        fix_ipv4_checksum(&mut f, ip);
                    }
                }
                11 if v4 || v6 => {
                    // Version nibble.
                    f[ip] = (self.rng.gen_range(0..16u8) << 4) | (f[ip] & 0x0F);
                }
                12 => {
                    // Trailing bytes past the IP packet.
                    let n = self.rng.gen_range(1..64);
                    f.extend((0..n).map(|_| self.rng.gen::<u8>()));
                }
                _ => {
                    for _ in 0..self.rng.gen_range(1..=8) {
                        if f.is_empty() {
                            break;
                        }
                        let i = self.rng.gen_range(0..f.len());
                        f[i] ^= 1 << self.rng.gen_range(0..8);
                    }
                }
            }
        }
        f
    }

    /// A frame and its class index in `CLASSES`.
    fn frame(&mut self, m: &Model) -> (usize, Vec<u8>) {
        match self.rng.gen_range(0..100) {
            0..=4 => (0, self.random_bytes()),
            5..=29 => (1, self.request(m)),
            30..=44 => (2, self.reply(m)),
            45..=69 => {
                let f = self.request(m);
                (3, self.mutate(f))
            }
            70..=84 => {
                let f = self.reply(m);
                (4, self.mutate(f))
            }
            85..=91 => (5, self.other(m)),
            92..=94 => (6, self.arp()),
            _ => (7, self.icmp(m)),
        }
    }
}

// ---------------------------------------------------------------------------------
// The run.

#[derive(Default)]
struct Figures {
    frames: [u64; CLASSES.len()],
    /// Runs per program (ingress, egress).
    runs: [u64; 2],
    modified: [u64; 2],
    dropped: [u64; 2],
    /// Frames the kernel would not build a context from (not a program decision).
    refused: [u64; 2],
    /// Replies of pinned flows with an IP length of 0 that egress rewrote: the
    /// kernel's BIG TCP convention (length from the skb), accepted at TC.
    egress_no_length_rewritten: u64,
    /// Frames with an IP length of 0 not given to TC ingress ([`ip_length_zero`]).
    tc_length_zero: u64,
    /// Why the kernel refused to build a context, per program.
    refusals: std::collections::BTreeMap<String, u64>,
    violations: u64,
    first: Vec<String>,
}

fn hex(f: &[u8]) -> String {
    f.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

struct Runner {
    hook: Hook,
    config: Config,
    fixture: Fixture,
    model: Model,
    figures: Figures,
}

impl Runner {
    fn new(hook: Hook) -> Runner {
        pin_to_one_cpu();
        let config = config();
        Runner {
            hook,
            fixture: Fixture::at(&config, hook),
            model: Model::new(&config),
            config,
            figures: Figures::default(),
        }
    }

    /// A fresh datapath and model (flow table and exact counters empty).
    fn reset(&mut self) {
        self.fixture = Fixture::at(&self.config, self.hook);
        self.model = Model::new(&self.config);
    }

    fn violation(&mut self, what: String, frame: &[u8]) {
        self.figures.violations += 1;
        if self.figures.first.len() < 20 {
            self.figures
                .first
                .push(format!("{what}\n  frame {}", hex(frame)));
        }
    }

    /// Runs one frame through ingress and egress and checks both.
    fn frame(&mut self, class: usize, f: &[u8]) {
        self.figures.frames[class] += 1;
        for (i, ingress) in [(0, true), (1, false)] {
            if ingress && self.hook == Hook::Tc && ip_length_zero(f) {
                self.figures.tc_length_zero += 1;
                continue;
            }
            let expect = if ingress {
                self.model.ingress(f)
            } else {
                self.model.egress(f)
            };
            let name = if ingress { "ingress" } else { "egress" };
            let (verdict, out) = match self.fixture.run(ingress, f) {
                Outcome::Ran(v, out) => (v, out),
                Outcome::Refused(e) => {
                    self.figures.refused[i] += 1;
                    let why = match (f.len(), f.get(12..14)) {
                        (0..14, _) => "frame shorter than an Ethernet header".to_string(),
                        (0..34, Some([0x08, 0x00])) => "IPv4 header cut short".to_string(),
                        (0..54, Some([0x86, 0xDD])) => "IPv6 header cut short".to_string(),
                        _ => format!("other: {e}"),
                    };
                    *self
                        .figures
                        .refusals
                        .entry(format!("{name}: {why}"))
                        .or_default() += 1;
                    // The kernel builds no context from a frame shorter than an
                    // Ethernet header (nor, for TC, from a cut IPv4 header): only
                    // frames that are not ours may be refused.
                    if expect != Expect::Unchanged {
                        self.violation(format!("{name}: refused a frame that is ours: {e}"), f);
                    }
                    continue;
                }
            };
            self.figures.runs[i] += 1;
            let pass = if ingress { self.hook.pass() } else { TC_ACT_OK };
            if verdict != pass {
                self.figures.dropped[i] += 1;
                self.violation(format!("{name}: verdict {verdict}, expected {pass}"), f);
                continue;
            }
            let changed = out != f;
            if changed {
                self.figures.modified[i] += 1;
            }
            let result = match expect {
                Expect::Unchanged if changed => Err(format!(
                    "{name}: not ours but changed\n  out   {}",
                    hex(&out)
                )),
                Expect::Unchanged => Ok(()),
                Expect::Rewrite(to) => check_rewrite(f, &out, to, ingress),
                Expect::UnchangedOrRewrite(_) if !changed => Ok(()),
                Expect::UnchangedOrRewrite(to) => {
                    self.figures.egress_no_length_rewritten += 1;
                    check_rewrite(f, &out, to, ingress)
                }
            };
            if !ingress && changed {
                self.model.egress_done(f);
            }
            if let Err(e) = result {
                self.violation(format!("{name} (class {}): {e}", CLASSES[class]), f);
            }
        }
    }

    fn report(&self, elapsed: std::time::Duration) -> String {
        let f = &self.figures;
        let mut s = String::new();
        let total: u64 = f.frames.iter().sum();
        let _ = writeln!(s, "frames: {total} in {:.1} s", elapsed.as_secs_f64());
        for (name, n) in CLASSES.iter().zip(f.frames) {
            let _ = writeln!(s, "  {name}: {n}");
        }
        let ingress = format!("ingress ({:?})", self.hook);
        for (i, name) in [ingress.as_str(), "egress (TC)"].iter().enumerate() {
            let _ = writeln!(
                s,
                "{name}: run {}, modified {}, dropped {}, refused by the kernel {}",
                f.runs[i], f.modified[i], f.dropped[i], f.refused[i]
            );
        }
        for (why, n) in &f.refusals {
            let _ = writeln!(s, "  refused, {why}: {n}");
        }
        let _ = writeln!(
            s,
            "egress rewrote a reply of a pinned flow with IP length 0 (BIG TCP, accepted): {}",
            f.egress_no_length_rewritten
        );
        if self.hook == Hook::Tc {
            let _ = writeln!(
                s,
                "frames with IP length 0 left out at TC ingress (BIG TCP): {}",
                f.tc_length_zero
            );
        }
        let _ = writeln!(s, "violations: {}", f.violations);
        for v in &f.first {
            let _ = writeln!(s, "  {v}");
        }
        s
    }
}

fn fuzz(seed: u64, frames: usize, hook: Hook) -> (String, u64) {
    let start = Instant::now();
    let mut r = Runner::new(hook);
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(seed),
    };
    for n in 0..frames {
        if n > 0 && n % EPOCH == 0 {
            r.reset();
        }
        let (class, f) = g.frame(&r.model);
        r.frame(class, &f);
    }
    (r.report(start.elapsed()), r.figures.violations)
}

#[test]
fn seeded_fuzz_of_both_programs() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let (report, violations) = fuzz(0x00C0_FFEE, 20_000, hook);
        println!("{report}");
        assert_eq!(violations, 0, "{report}");
    }
}

/// The full run: `CANARY_FUZZ_FRAMES` frames (default 1 000 000), seed from
/// `CANARY_FUZZ_SEED` (default 1).
#[test]
#[ignore = "long (about 30 s, both hooks): CANARY_FUZZ_FRAMES=1000000 cargo test -p canary-agent --test packet_fuzz -- --ignored --nocapture"]
fn full_fuzz_of_both_programs() {
    let frames = std::env::var("CANARY_FUZZ_FRAMES")
        .ok()
        .map(|v| v.parse().expect("CANARY_FUZZ_FRAMES"))
        .unwrap_or(1_000_000);
    let seed = std::env::var("CANARY_FUZZ_SEED")
        .ok()
        .map(|v| v.parse().expect("CANARY_FUZZ_SEED"))
        .unwrap_or(1);
    for hook in [Hook::Xdp, Hook::Tc] {
        let (report, violations) = fuzz(seed, frames, hook);
        println!("seed {seed}\n{report}");
        assert_eq!(violations, 0, "{report}");
    }
}

/// Frames of every kind (v4/v6, TCP/UDP, to a service and a pinned reply, with
/// payload) cut at every length from 0 to their full size.
#[test]
fn every_truncation_of_every_kind_of_frame() {
    let mut r = Runner::new(Hook::Xdp);
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(7),
    };
    let services: Vec<(Ep, bool, u8)> = r
        .model
        .services
        .iter()
        .map(|s| (s.listen, s.v6, s.proto))
        .collect();
    for (listen, v6, proto) in services {
        let client = g.client(v6);
        let l4 = L4 {
            proto,
            flags: if proto == TCP { SYN } else { 0 },
            seq: 1,
            opt_words: if proto == TCP { 3 } else { 0 },
            no_csum: false,
        };
        let request = build(
            client,
            listen,
            v6,
            &l4,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        // The whole frame first: it pins the flow the replies below belong to.
        r.frame(8, &request);
        let backend = r.model.forward[&spec_parse(&request).unwrap().tuple].to;
        let reply = build(
            backend,
            client,
            v6,
            &L4 {
                flags: PSH | ACK,
                ..l4
            },
            b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
        );
        for f in [&request, &reply] {
            for len in (0..=f.len()).rev() {
                r.frame(8, &f[..len]);
            }
        }
    }
    let report = r.report(std::time::Duration::ZERO);
    println!("{report}");
    assert_eq!(r.figures.violations, 0, "{report}");
    assert_eq!(r.figures.dropped, [0, 0]);
}

// ---------------------------------------------------------------------------------
// Regression cases for what the fuzz found.

fn ep(s: &str) -> Ep {
    Ep::of(s.parse().unwrap())
}

/// Runs one program and insists on the never-drop verdict.
fn ran(fx: &Fixture, ingress: bool, f: &[u8]) -> Vec<u8> {
    match fx.run(ingress, f) {
        Outcome::Ran(v, out) => {
            assert_eq!(v, if ingress { XDP_PASS } else { TC_ACT_OK }, "verdict");
            out
        }
        Outcome::Refused(e) => panic!("test run refused: {e}"),
    }
}

/// (client, service, IPv6, protocol) for each configured service kind.
fn kinds() -> [(Ep, Ep, bool, u8); 4] {
    [
        (ep("198.18.1.2:40000"), ep("198.19.0.10:80"), false, TCP),
        (
            ep("[2001:db8:1::2]:40000"),
            ep("[2001:db8:ffff::10]:80"),
            true,
            TCP,
        ),
        (ep("198.18.1.2:5000"), ep("198.19.0.53:53"), false, UDP),
        (
            ep("[2001:db8:1::2]:5000"),
            ep("[2001:db8:ffff::53]:53"),
            true,
            UDP,
        ),
    ]
}

fn syn(proto: u8) -> L4 {
    L4 {
        proto,
        flags: if proto == TCP { SYN } else { 0 },
        seq: 1,
        opt_words: 0,
        no_csum: false,
    }
}

fn set16(f: &mut [u8], off: usize, v: usize) {
    f[off..off + 2].copy_from_slice(&(v as u16).to_be_bytes());
}

/// Found by the fuzz: ingress rewrote frames whose IP packet runs past the end of the
/// frame (a frame cut anywhere in its payload), rewriting a packet the kernel drops.
#[test]
fn truncated_frames_to_a_service_pass_untouched() {
    pin_to_one_cpu();
    let fx = Fixture::new(&config());
    let payload = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";
    for (client, service, v6, proto) in kinds() {
        let f = build(client, service, v6, &syn(proto), payload);
        for cut in [1, 2, 17, payload.len()] {
            let t = &f[..f.len() - cut];
            assert_eq!(ran(&fx, true, t), t, "{service:?} cut by {cut} was changed");
        }
        // Also when the header claims more than the frame without a cut.
        let mut long = f.clone();
        let (at, len) = if v6 {
            (18, f.len() - 54)
        } else {
            (16, f.len() - 14)
        };
        set16(&mut long, at, len + 1);
        if !v6 {
            fix_ipv4_checksum(&mut long, 14);
        }
        assert_eq!(
            ran(&fx, true, &long),
            long,
            "{service:?}: length past the frame"
        );
        // The whole frame is still rewritten.
        assert_ne!(
            ran(&fx, true, &f),
            f,
            "{service:?}: complete frame not rewritten"
        );
    }
}

/// Found by the fuzz: lengths that contradict each other were rewritten in both
/// directions (IP length shorter than the L4 header, TCP data offset below 5 or past
/// the segment, UDP length below 8 or past the IP payload), and an IP length of 0
/// was rewritten at XDP.
#[test]
fn inconsistent_lengths_pass_untouched_both_ways() {
    pin_to_one_cpu();
    let fx = Fixture::new(&config());
    let payload = b"HTTP/1.1 503 Service Unavailable\r\n\r\n";
    for (client, service, v6, proto) in kinds() {
        let request = build(client, service, v6, &syn(proto), payload);
        let out = ran(&fx, true, &request);
        let backend = spec_parse(&out).unwrap().tuple.dst;
        assert_ne!(backend, service, "{service:?}: request not rewritten");
        let reply = build(backend, client, v6, &syn(proto), payload);
        assert_ne!(
            ran(&fx, false, &reply),
            reply,
            "{service:?}: reply not rewritten"
        );
        let l4 = if v6 { 54 } else { 34 };
        let l4_min = if proto == TCP { 20 } else { 8 };
        let seg = request.len() - l4;
        type Mutation = (&'static str, bool, Box<dyn Fn(&mut Vec<u8>)>);
        let mut cases: Vec<Mutation> = vec![(
            "IP length 0",
            false,
            Box::new(move |f| set16(f, if v6 { 18 } else { 16 }, 0)),
        )];
        cases.push((
            "IP length shorter than the L4 header",
            true,
            Box::new(move |f| {
                let hdr = if v6 { 0 } else { 20 };
                set16(f, if v6 { 18 } else { 16 }, hdr + l4_min - 1)
            }),
        ));
        if proto == TCP {
            cases.push((
                "TCP data offset 4",
                true,
                Box::new(move |f| f[l4 + 12] = 0x40),
            ));
            cases.push((
                "TCP data offset past the segment",
                true,
                Box::new(move |f| f[l4 + 12] = 0xF0),
            ));
            assert!(seg < 60);
        } else {
            cases.push(("UDP length 7", true, Box::new(move |f| set16(f, l4 + 4, 7))));
            cases.push((
                "UDP length past the IP payload",
                true,
                Box::new(move |f| set16(f, l4 + 4, seg + 1)),
            ));
        }
        for (name, both, mutate) in cases {
            for (ingress, base) in [(true, &request), (false, &reply)] {
                if !ingress && !both {
                    // IP length 0 at TC is BIG TCP inside the stack: rewriting is right.
                    continue;
                }
                let mut f = base.clone();
                mutate(&mut f);
                if !v6 {
                    fix_ipv4_checksum(&mut f, 14);
                }
                let dir = if ingress { "ingress" } else { "egress" };
                assert_eq!(ran(&fx, ingress, &f), f, "{dir} {service:?}: {name}");
            }
        }
    }
}

/// The fixes must not turn away valid frames: TCP options, Ethernet padding past the
/// IP packet, IPv4 UDP without a checksum, a UDP length shorter than the IP payload.
#[test]
fn valid_frames_at_the_edges_are_rewritten() {
    let mut r = Runner::new(Hook::Xdp);
    let mut frames = vec![];
    for (client, service, v6, proto) in kinds() {
        let l4 = L4 {
            opt_words: if proto == TCP { 10 } else { 0 },
            no_csum: true,
            ..syn(proto)
        };
        let mut f = build(client, service, v6, &l4, b"GET / HTTP/1.1\r\n\r\n");
        frames.push(f.clone());
        f.resize(f.len() + 7, 0);
        frames.push(f);
        let short = build(client, service, v6, &syn(proto), b"");
        let mut padded = short.clone();
        padded.resize(60.max(short.len() + 1), 0);
        frames.push(padded);
        if proto == UDP {
            // UDP length 8 inside a longer IP payload: the kernel trims to it.
            let mut f = build(client, service, v6, &syn(proto), b"");
            let plen = 4;
            f.extend([0xAA; 4]);
            let at = if v6 { 18 } else { 16 };
            let len = be16(&f, at) + plen;
            set16(&mut f, at, len);
            if !v6 {
                fix_ipv4_checksum(&mut f, 14);
            }
            frames.push(f);
        }
    }
    for f in &frames {
        r.frame(1, f);
    }
    let report = r.report(std::time::Duration::ZERO);
    assert_eq!(r.figures.violations, 0, "{report}");
    assert_eq!(r.figures.modified[0], frames.len() as u64, "{report}");
}

/// Found by the fuzz (egress.rs): TC cannot judge truncation from `data_end`, which only
/// ends the linear part of the skb; a reply of a pinned flow whose IP packet runs past
/// the end of the skb (`ctx.len()`) must be left alone.
#[test]
fn egress_leaves_a_truncated_reply_untouched() {
    pin_to_one_cpu();
    let fx = Fixture::new(&config());
    for (client, service, v6, proto) in kinds() {
        let request = build(client, service, v6, &syn(proto), b"");
        let backend = spec_parse(&ran(&fx, true, &request)).unwrap().tuple.dst;
        let reply = build(backend, client, v6, &syn(proto), b"HTTP/1.1 200 OK\r\n\r\n");
        let cut = &reply[..reply.len() - 3];
        assert_eq!(
            ran(&fx, false, cut),
            cut,
            "egress {service:?}: reply cut short"
        );
    }
}

/// Found by the fuzz (ingress.rs): a frame to a service whose IP packet runs past the
/// end of the frame is dropped by the kernel, so ingress must neither place and pin a
/// flow for it nor count a connection or an HTTP request.
#[test]
fn a_truncated_frame_to_a_service_places_and_counts_nothing() {
    pin_to_one_cpu();
    let fx = Fixture::new(&config());
    let (client, service, v6, proto) = kinds()[0];
    let f = build(client, service, v6, &syn(proto), b"GET / HTTP/1.1\r\n\r\n");
    let t = &f[..f.len() - 1];
    assert_eq!(ran(&fx, true, t), t);
    let stats = fx.dp.stats(0).unwrap();
    let placed: u64 = stats.iter().map(|s| s.connections + s.flow_misses).sum();
    let [stable, canary] = fx.dp.signals(0).unwrap();
    assert_eq!(placed, 0, "connections placed by a truncated SYN");
    assert_eq!(
        stable.counters.requests + canary.counters.requests,
        0,
        "requests counted from a truncated segment"
    );
}
