//! Packet fixtures: each case runs the real kernel programs with BPF_PROG_TEST_RUN on
//! a hand-built packet and checks the verdict and the exact output packet, including
//! checksums recomputed from scratch by an independent implementation (etherparse).
//! Needs root (CAP_BPF, CAP_SYS_ADMIN).

use std::net::{IpAddr, SocketAddr};

use canary_agent::{
    config::Config,
    datapath::{encode_service, service_key, Datapath},
};
use canary_common::{
    FlowKey, FlowValue, TcpSeq, DIR_FORWARD, DIR_REPLY, FAMILY_V4, FAMILY_V6, FLOW_CLOSING,
    PROG_EGRESS, PROG_INGRESS, PROG_INGRESS_TC, PROTO_TCP,
};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

mod pins;
use pins::{Pins, Programs};

/// A loaded datapath with maps pinned in a private bpffs mount. Fields drop in order:
/// the datapath (closing the maps) before its mount.
struct Fixture {
    dp: Datapath,
    programs: std::cell::RefCell<Programs>,
    hook: Hook,
    config: Config,
    _pins: Pins,
}

/// The hook the ingress program runs at: every ingress case runs at both.
#[derive(Clone, Copy, Debug)]
enum Hook {
    Xdp,
    Tc,
}

/// Runs a fixture case once per ingress hook, as `NAME::xdp` and `NAME::tc`.
macro_rules! at_both_hooks {
    ($name:ident) => {
        mod $name {
            #[test]
            fn xdp() {
                super::$name(super::Hook::Xdp)
            }
            #[test]
            fn tc() {
                super::$name(super::Hook::Tc)
            }
        }
    };
}

impl Fixture {
    fn new(hook: Hook, services: &str) -> Fixture {
        let pins = Pins::new("fixture");
        let text = format!("[agent]\ninterface = \"lo\"\n{services}");
        let config = Config::parse(&text, std::path::Path::new("fixture.toml")).unwrap();
        let dp = pins.load_with_services(&config);
        Fixture {
            dp,
            programs: std::cell::RefCell::new(Programs::load(&pins.0)),
            hook,
            config,
            _pins: pins,
        }
    }

    fn dp(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    fn set_weight(&mut self, idx: usize, bp: u16) {
        let svc = self.config.services[idx].clone();
        self.dp()
            .install(&service_key(&svc), &encode_service(&svc, idx as u32, bp))
            .unwrap();
    }

    fn run(&self, prog: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let r = self.programs.borrow_mut().run(prog, packet, 1).unwrap();
        (r.retval, r.packet)
    }

    fn ingress(&self, packet: &[u8]) -> Vec<u8> {
        let (prog, pass) = match self.hook {
            Hook::Xdp => (PROG_INGRESS, XDP_PASS),
            Hook::Tc => (PROG_INGRESS_TC, TC_ACT_OK),
        };
        let (verdict, out) = self.run(prog, packet);
        assert_eq!(verdict, pass, "ingress at {:?} must never drop", self.hook);
        out
    }

    fn egress(&self, packet: &[u8]) -> Vec<u8> {
        let (verdict, out) = self.run(PROG_EGRESS, packet);
        assert_eq!(verdict, TC_ACT_OK, "TC must never drop");
        out
    }
}

const WEB: &str = r#"
[[service]]
name = "web"
listen = "198.19.0.10:80"
stable = ["198.18.2.2:8080"]
canary = ["198.18.3.2:9090"]
weight = 0
[[service]]
name = "web6"
listen = "[2001:db8:ffff::10]:80"
stable = ["[2001:db8:2::2]:8080"]
canary = ["[2001:db8:3::2]:9090"]
weight = 0
[[service]]
name = "dns"
listen = "198.19.0.53:53"
protocol = "udp"
stable = ["198.18.2.2:5353"]
canary = ["198.18.3.2:5353"]
weight = 0
"#;

fn tcp(src: SocketAddr, dst: SocketAddr, syn: bool, payload: &[u8]) -> Vec<u8> {
    tcp_seq(src, dst, syn, 1000, payload)
}

fn tcp_seq(src: SocketAddr, dst: SocketAddr, syn: bool, seq: u32, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let b = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!(),
    };
    let b = b.tcp(src.port(), dst.port(), seq, 64_000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        unreachable!()
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(s.octets(), d.octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut out, payload)
        .unwrap();
    out
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Source and destination of a packet, after checking every checksum from scratch.
fn endpoints(packet: &[u8]) -> (SocketAddr, SocketAddr) {
    let p = SlicedPacket::from_ethernet(packet).expect("output must still parse");
    let (src_ip, dst_ip): (IpAddr, IpAddr) = match p.net.as_ref().unwrap() {
        NetSlice::Ipv4(v4) => {
            let h = v4.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "IPv4 header checksum"
            );
            (h.source.into(), h.destination.into())
        }
        NetSlice::Ipv6(v6) => (
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        ),
    };
    let payload = p.transport.as_ref().map(|_| ()).and(Some(()));
    assert!(payload.is_some());
    let (sport, dport) = match p.transport.as_ref().unwrap() {
        TransportSlice::Tcp(t) => {
            let h = t.to_header();
            let want = match p.net.as_ref().unwrap() {
                NetSlice::Ipv4(v4) => h.calc_checksum_ipv4(&v4.header().to_header(), t.payload()),
                NetSlice::Ipv6(v6) => h.calc_checksum_ipv6(&v6.header().to_header(), t.payload()),
            }
            .unwrap();
            assert_eq!(h.checksum, want, "TCP checksum");
            (h.source_port, h.destination_port)
        }
        TransportSlice::Udp(u) => {
            let h = u.to_header();
            if h.checksum != 0 {
                let NetSlice::Ipv4(v4) = p.net.as_ref().unwrap() else {
                    unreachable!()
                };
                let want = h
                    .calc_checksum_ipv4(&v4.header().to_header(), u.payload())
                    .unwrap();
                assert_eq!(h.checksum, want, "UDP checksum");
            }
            (h.source_port, h.destination_port)
        }
        other => panic!("unexpected transport {other:?}"),
    };
    (
        SocketAddr::new(src_ip, sport),
        SocketAddr::new(dst_ip, dport),
    )
}

fn syn_to_service_is_rewritten_to_stable_with_valid_checksums(hook: Hook) {
    let f = Fixture::new(hook, WEB);
    let out = f.ingress(&tcp(
        sa("198.18.1.2:40000"),
        sa("198.19.0.10:80"),
        true,
        b"",
    ));
    assert_eq!(
        endpoints(&out),
        (sa("198.18.1.2:40000"), sa("198.18.2.2:8080"))
    );
}
at_both_hooks!(syn_to_service_is_rewritten_to_stable_with_valid_checksums);

fn at_weight_100_new_connections_go_to_canary(hook: Hook) {
    let mut f = Fixture::new(hook, WEB);
    f.set_weight(0, 10_000);
    for port in 40000..40020 {
        let out = f.ingress(&tcp(
            sa(&format!("198.18.1.2:{port}")),
            sa("198.19.0.10:80"),
            true,
            b"",
        ));
        assert_eq!(endpoints(&out).1, sa("198.18.3.2:9090"));
    }
}
at_both_hooks!(at_weight_100_new_connections_go_to_canary);

const THREE_STABLE: &str = r#"
[[service]]
name = "web"
listen = "198.19.0.10:80"
stable = ["198.18.2.2:8080", "198.18.2.3:8080", "198.18.2.4:8080"]
canary = ["198.18.3.2:9090"]
weight = 50
"#;

/// Where the SYNs of 60 client ports to the service go, with `down` (stable, canary)
/// out of the selection.
fn placements(f: &mut Fixture, down: [&[bool]; 2], first_port: u16) -> Vec<SocketAddr> {
    let svc = f.config.services[0].clone();
    let entry = encode_service(&svc, 0, svc.weight_bp).with_down(down.map(|d| d.to_vec()));
    f.dp().install(&service_key(&svc), &entry).unwrap();
    (first_port..first_port + 60)
        .map(|port| {
            let syn = tcp(
                sa(&format!("198.18.1.2:{port}")),
                sa("198.19.0.10:80"),
                true,
                b"",
            );
            endpoints(&f.ingress(&syn)).1
        })
        .collect()
}

fn a_backend_marked_down_gets_no_new_connection_and_a_dead_canary_falls_back(hook: Hook) {
    let mut f = Fixture::new(hook, THREE_STABLE);
    let all = placements(&mut f, [&[], &[]], 41000);
    assert!(all.contains(&sa("198.18.2.3:8080")) && all.contains(&sa("198.18.3.2:9090")));
    // Stable slot 1 down: every stable placement avoids it, canary is unchanged.
    let without = placements(&mut f, [&[false, true], &[]], 42000);
    assert!(!without.contains(&sa("198.18.2.3:8080")), "{without:?}");
    assert!(without.contains(&sa("198.18.2.2:8080")) && without.contains(&sa("198.18.2.4:8080")));
    assert!(without.contains(&sa("198.18.3.2:9090")));
    // The canary's only backend down: its share goes to stable.
    let no_canary = placements(&mut f, [&[], &[true]], 43000);
    assert!(
        no_canary
            .iter()
            .all(|b| b.ip().to_string().starts_with("198.18.2.")),
        "{no_canary:?}"
    );
    // Ports already placed keep their backend: pinned flows are not moved.
    let again = placements(&mut f, [&[false, true], &[]], 41000);
    assert_eq!(again, all, "open connections moved");
}
at_both_hooks!(a_backend_marked_down_gets_no_new_connection_and_a_dead_canary_falls_back);

/// `n` backends `198.18.{base}.x:8080`, as a TOML list.
fn backend_list(base: u8, n: usize) -> String {
    let list: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "\"198.18.{}.{}:8080\"",
                base as usize + i / 250,
                1 + i % 250
            )
        })
        .collect();
    format!("[{}]", list.join(", "))
}

fn the_largest_service_uses_all_256_backends_of_each_version(hook: Hook) {
    let config = format!(
        "[[service]]\nname = \"big\"\nlisten = \"198.19.0.10:80\"\nstable = {}\n\
         canary = {}\nweight = 50\n",
        backend_list(2, 256),
        backend_list(4, 256)
    );
    let f = Fixture::new(hook, &config);
    let mut seen = std::collections::BTreeSet::new();
    for port in 0..8000u16 {
        let client = sa(&format!(
            "198.18.{}.{}:{}",
            100 + port / 4000,
            1 + port % 200,
            10_000 + port
        ));
        let out = f.ingress(&tcp(client, sa("198.19.0.10:80"), true, b""));
        seen.insert(endpoints(&out).1);
    }
    let stable = seen.iter().filter(|a| *a < &sa("198.18.4.0:0")).count();
    assert_eq!(
        (stable, seen.len() - stable),
        (256, 256),
        "backends reached"
    );
}
at_both_hooks!(the_largest_service_uses_all_256_backends_of_each_version);

fn a_thousand_services_are_installed_and_each_is_split(hook: Hook) {
    let config: String = (0..1024)
        .map(|i| {
            format!(
                "[[service]]\nname = \"s{i}\"\nlisten = \"198.19.{}.{}:80\"\n\
                 stable = [\"198.18.2.{}:8080\"]\ncanary = [\"198.18.3.{}:8080\"]\nweight = 50\n",
                i / 250,
                1 + i % 250,
                1 + i % 250,
                1 + i % 250
            )
        })
        .collect();
    let f = Fixture::new(hook, &config);
    for i in 0..1024usize {
        let vip = format!("198.19.{}.{}:80", i / 250, 1 + i % 250);
        let mut versions = std::collections::BTreeSet::new();
        for port in 0..40u16 {
            let b = f.syn_to(&format!("198.18.1.2:{}", 20_000 + port), &vip);
            let last = match b.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3] as usize,
                std::net::IpAddr::V6(_) => 0,
            };
            assert_eq!(last, 1 + i % 250, "service {i} went to {b}");
            versions.insert(b.ip().to_string().starts_with("198.18.3."));
        }
        assert_eq!(versions.len(), 2, "service {i} is split");
    }
}
at_both_hooks!(a_thousand_services_are_installed_and_each_is_split);

/// The share of 10 000 `client-ip` sticky clients that reach another backend after one
/// of 64 stable backends is taken out (a health check or a scale-down).
fn taking_one_of_64_backends_out_moves_few_sticky_clients(hook: Hook) {
    let config = format!(
        "[[service]]\nname = \"web\"\nlisten = \"198.19.0.10:80\"\nstable = {}\n\
         sticky = \"client-ip\"\nweight = 0\n",
        backend_list(2, 64)
    );
    let mut f = Fixture::new(hook, &config);
    let client = |c: u32, port: u16| {
        sa(&format!(
            "198.18.{}.{}:{}",
            100 + c / 250,
            1 + c % 250,
            port
        ))
    };
    let before: Vec<SocketAddr> = (0..10_000)
        .map(|c| f.syn_to(&client(c, 30_000).to_string(), VIP))
        .collect();
    let mut down = vec![false; 64];
    down[17] = true;
    let svc = f.config.services[0].clone();
    let entry = encode_service(&svc, 0, 0).with_down([down, Vec::new()]);
    f.dp().install(&service_key(&svc), &entry).unwrap();
    // New connections (other ports) of the same clients.
    let after: Vec<SocketAddr> = (0..10_000)
        .map(|c| f.syn_to(&client(c, 31_000).to_string(), VIP))
        .collect();
    let removed = sa("198.18.2.18:8080");
    assert!(after.iter().all(|b| *b != removed));
    let own = before.iter().filter(|b| **b == removed).count();
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    println!(
        "1 of 64 backends out: {moved} of 10000 client-ip sticky clients moved, {own} were on it"
    );
    assert!(
        moved as f64 / 10_000.0 <= 1.0 / 64.0 + 0.02,
        "{moved} of 10000 moved ({own} were on the removed backend)"
    );
}
at_both_hooks!(taking_one_of_64_backends_out_moves_few_sticky_clients);

fn reply_gets_the_service_address_back_as_source(hook: Hook) {
    let f = Fixture::new(hook, WEB);
    f.ingress(&tcp(
        sa("198.18.1.2:40001"),
        sa("198.19.0.10:80"),
        true,
        b"",
    ));
    let reply = tcp(
        sa("198.18.2.2:8080"),
        sa("198.18.1.2:40001"),
        false,
        b"HTTP/1.1 200 OK\r\n\r\n",
    );
    let out = f.egress(&reply);
    assert_eq!(
        endpoints(&out),
        (sa("198.19.0.10:80"), sa("198.18.1.2:40001"))
    );
    // Everything but addresses, ports and checksums is unchanged.
    assert_eq!(out.len(), reply.len());
    assert_eq!(out[54..], reply[54..]);
}
at_both_hooks!(reply_gets_the_service_address_back_as_source);

fn ipv6_is_rewritten_both_ways(hook: Hook) {
    let mut f = Fixture::new(hook, WEB);
    f.set_weight(1, 10_000);
    let out = f.ingress(&tcp(
        sa("[2001:db8:1::2]:40002"),
        sa("[2001:db8:ffff::10]:80"),
        true,
        b"",
    ));
    assert_eq!(
        endpoints(&out),
        (sa("[2001:db8:1::2]:40002"), sa("[2001:db8:3::2]:9090"))
    );
    let reply = tcp(
        sa("[2001:db8:3::2]:9090"),
        sa("[2001:db8:1::2]:40002"),
        false,
        b"hi",
    );
    let out = f.egress(&reply);
    assert_eq!(
        endpoints(&out),
        (sa("[2001:db8:ffff::10]:80"), sa("[2001:db8:1::2]:40002"))
    );
}
at_both_hooks!(ipv6_is_rewritten_both_ways);

fn udp_with_and_without_checksum(hook: Hook) {
    let f = Fixture::new(hook, WEB);
    let pkt = udp(sa("198.18.1.2:5000"), sa("198.19.0.53:53"), b"query");
    let out = f.ingress(&pkt);
    assert_eq!(
        endpoints(&out),
        (sa("198.18.1.2:5000"), sa("198.18.2.2:5353"))
    );
    // A zero UDP checksum means "none" over IPv4 and must stay zero.
    let mut none = udp(sa("198.18.1.2:5001"), sa("198.19.0.53:53"), b"query");
    none[40] = 0;
    none[41] = 0;
    let out = f.ingress(&none);
    assert_eq!(&out[40..42], &[0, 0]);
    assert_eq!(endpoints(&out).1, sa("198.18.2.2:5353"));
    let reply = udp(sa("198.18.2.2:5353"), sa("198.18.1.2:5000"), b"answer");
    assert_eq!(endpoints(&f.egress(&reply)).0, sa("198.19.0.53:53"));
}
at_both_hooks!(udp_with_and_without_checksum);

fn established_flow_keeps_its_backend_across_weight_changes(hook: Hook) {
    let mut f = Fixture::new(hook, WEB);
    let client = sa("198.18.1.2:40003");
    f.ingress(&tcp(client, sa("198.19.0.10:80"), true, b""));
    f.set_weight(0, 10_000);
    let out = f.ingress(&tcp(
        client,
        sa("198.19.0.10:80"),
        false,
        b"GET / HTTP/1.1\r\n\r\n",
    ));
    assert_eq!(
        endpoints(&out).1,
        sa("198.18.2.2:8080"),
        "pinned flow moved"
    );
    // A different connection follows the new weight.
    let out = f.ingress(&tcp(
        sa("198.18.1.2:40004"),
        sa("198.19.0.10:80"),
        true,
        b"",
    ));
    assert_eq!(endpoints(&out).1, sa("198.18.3.2:9090"));
}
at_both_hooks!(established_flow_keeps_its_backend_across_weight_changes);

fn traffic_that_is_not_ours_passes_untouched(hook: Hook) {
    let f = Fixture::new(hook, WEB);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "other address",
            tcp(sa("198.18.1.2:40000"), sa("198.19.0.11:80"), true, b""),
        ),
        (
            "other port",
            tcp(sa("198.18.1.2:40000"), sa("198.19.0.10:81"), true, b""),
        ),
        (
            "udp to a tcp service",
            udp(sa("198.18.1.2:40000"), sa("198.19.0.10:80"), b"x"),
        ),
        (
            "truncated tcp header",
            tcp(sa("198.18.1.2:40000"), sa("198.19.0.10:80"), true, b"")[..40].to_vec(),
        ),
        (
            "truncated ip header",
            tcp(sa("198.18.1.2:40000"), sa("198.19.0.10:80"), true, b"")[..30].to_vec(),
        ),
        ("arp", {
            let mut arp = vec![0xff; 6];
            arp.extend_from_slice(&MAC_A);
            arp.extend_from_slice(&[0x08, 0x06]);
            arp.extend_from_slice(&[0u8; 28]);
            arp
        }),
        ("fragment", {
            let mut p = tcp(sa("198.18.1.2:40000"), sa("198.19.0.10:80"), true, b"");
            p[20] |= 0x20; // more fragments
            p
        }),
        ("later fragment", {
            let mut p = tcp(sa("198.18.1.2:40000"), sa("198.19.0.10:80"), true, b"");
            p[21] = 0x10; // offset 16 * 8 bytes
            p
        }),
        ("ip options", {
            let mut p = tcp(sa("198.18.1.2:40000"), sa("198.19.0.10:80"), true, b"");
            p[14] = 0x46;
            p
        }),
        ("icmp", {
            let mut p = tcp(sa("198.18.1.2:40000"), sa("198.19.0.10:80"), true, b"");
            p[23] = 1;
            p
        }),
    ];
    for (name, pkt) in cases {
        // The kernel refuses to build an skb whose IPv4 header is cut short (the stack
        // never hands one to TC), so that case exists only at XDP.
        let at_tc = name != "truncated ip header";
        if matches!(hook, Hook::Xdp) || at_tc {
            assert_eq!(f.ingress(&pkt), pkt, "ingress changed: {name}");
        }
        if at_tc {
            assert_eq!(f.egress(&pkt), pkt, "egress changed: {name}");
        }
    }
    // A reply-looking packet with no pinned flow is not ours either.
    let stray = tcp(sa("198.18.2.2:8080"), sa("198.18.1.2:49999"), false, b"x");
    assert_eq!(f.egress(&stray), stray);
}
at_both_hooks!(traffic_that_is_not_ours_passes_untouched);

fn counters_count_connections_packets_and_bytes(hook: Hook) {
    let mut f = Fixture::new(hook, WEB);
    let syn = tcp(sa("198.18.1.2:40005"), sa("198.19.0.10:80"), true, b"");
    let data = tcp(
        sa("198.18.1.2:40005"),
        sa("198.19.0.10:80"),
        false,
        b"hello",
    );
    f.ingress(&syn);
    f.ingress(&syn); // a retransmitted SYN is the same connection
    f.ingress(&data);
    f.egress(&tcp(
        sa("198.18.2.2:8080"),
        sa("198.18.1.2:40005"),
        false,
        b"world!",
    ));
    let stats = f.dp().stats(0).unwrap();
    assert_eq!(stats[0].connections, 1);
    assert_eq!(stats[0].packets_in, 3);
    assert_eq!(stats[0].bytes_in, (2 * syn.len() + data.len()) as u64);
    assert_eq!(stats[0].packets_out, 1);
    assert_eq!(stats[16].connections, 0);
}
at_both_hooks!(counters_count_connections_packets_and_bytes);

fn http_and_handshake_telemetry_is_counted_once_per_segment(hook: Hook) {
    let mut f = Fixture::new(hook, WEB);
    let (client, vip, backend) = (
        sa("198.18.1.2:40006"),
        sa("198.19.0.10:80"),
        sa("198.18.2.2:8080"),
    );
    f.ingress(&tcp(client, vip, true, b""));
    let mut syn_ack = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([198, 18, 2, 2], [198, 18, 1, 2], 64)
        .tcp(8080, 40006, 5000, 64_000)
        .syn()
        .ack(1001)
        .write(&mut syn_ack, b"")
        .unwrap();
    f.egress(&syn_ack);
    f.egress(&syn_ack); // retransmitted SYN-ACK: one handshake
    let request = seg(
        client,
        vip,
        "A",
        1001,
        5001,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    f.ingress(&request);
    f.ingress(&request); // retransmission: one request
    f.ingress(&seg(client, vip, "A", 1030, 5001, b"not a request start"));
    let response = tcp_seq(
        backend,
        client,
        false,
        5001,
        b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
    );
    f.egress(&response);
    f.egress(&response);
    f.egress(&tcp_seq(
        backend,
        client,
        false,
        5040,
        b"HTTP/1.1 200 OK\r\n\r\n",
    ));
    let [stable, canary] = f.dp().signals(0).unwrap();
    assert_eq!(stable.counters.handshakes, 1);
    assert_eq!(stable.counters.requests, 1);
    assert_eq!(stable.counters.responses, [0, 1, 0, 0, 1]);
    // Only the first response answered a pending request.
    assert_eq!(stable.latency.iter().sum::<u64>(), 1);
    assert_eq!(canary.counters, Default::default());
    let mut rst = tcp_seq(backend, client, false, 5060, b"");
    rst[47] |= 0x04;
    f.egress(&rst);
    assert_eq!(f.dp().signals(0).unwrap()[0].counters.resets, 1);
    // Per backend (passive health): one answered handshake; a reset after it is no
    // refusal.
    let stats = f.dp().stats(0).unwrap();
    assert_eq!((stats[0].handshakes, stats[0].refused), (1, 0));
}
at_both_hooks!(http_and_handshake_telemetry_is_counted_once_per_segment);

/// Passive health's counters: a SYN answered by a reset is a refused connection of
/// that backend, once per connection, and no handshake; a SYN left unanswered is
/// neither (the agent counts it as placed without a SYN-ACK).
fn a_reset_instead_of_a_syn_ack_is_a_refused_connection(hook: Hook) {
    let mut f = Fixture::new(hook, WEB);
    let (vip, backend) = (sa("198.19.0.10:80"), sa("198.18.2.2:8080"));
    let refused = sa("198.18.1.2:40010");
    f.ingress(&seg(refused, vip, "S", 1000, 0, b""));
    let rst = seg(backend, refused, "RA", 0, 1001, b"");
    f.egress(&rst);
    f.egress(&rst); // a second reset of the same connection
    f.ingress(&seg(sa("198.18.1.2:40011"), vip, "S", 1000, 0, b""));
    let stats = f.dp().stats(0).unwrap();
    assert_eq!(stats[0].connections, 2);
    assert_eq!((stats[0].handshakes, stats[0].refused), (0, 1));
}
at_both_hooks!(a_reset_instead_of_a_syn_ack_is_a_refused_connection);

/// A TCP segment with explicit flags ("S", "SA", "A", "FA", "R"), sequence and
/// acknowledgment numbers.
fn seg(
    src: SocketAddr,
    dst: SocketAddr,
    flags: &str,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let b = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!(),
    };
    let mut b = b.tcp(src.port(), dst.port(), seq, 64_000);
    for flag in flags.chars() {
        b = match flag {
            'S' => b.syn(),
            'A' => b.ack(ack),
            'F' => b.fin(),
            'R' => b.rst(),
            other => panic!("flag {other}"),
        };
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// The flow-table key of `src` -> `dst` in direction `dir` (addresses and ports as
/// the datapath stores them: in packet byte order).
fn flow_key(src: SocketAddr, dst: SocketAddr, dir: u8) -> FlowKey {
    let words = |ip: IpAddr| -> [u32; 4] {
        let mut w = [0u32; 4];
        let bytes = match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        for (word, chunk) in w.iter_mut().zip(bytes.chunks(4)) {
            *word = u32::from_ne_bytes(chunk.try_into().unwrap());
        }
        w
    };
    FlowKey {
        src: words(src.ip()),
        dst: words(dst.ip()),
        sport: u16::from_ne_bytes(src.port().to_be_bytes()),
        dport: u16::from_ne_bytes(dst.port().to_be_bytes()),
        proto: PROTO_TCP,
        family: if src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
        dir,
        _pad: 0,
    }
}

/// (forward, reply) entries of the connection client -> vip on `backend`.
fn entries(
    f: &Fixture,
    client: SocketAddr,
    vip: SocketAddr,
    backend: SocketAddr,
) -> (FlowValue, FlowValue) {
    let fwd = f.dp.flow(&flow_key(client, vip, DIR_FORWARD)).unwrap();
    let reply = f.dp.flow(&flow_key(backend, client, DIR_REPLY)).unwrap();
    (
        fwd.expect("forward entry pinned"),
        reply.expect("reply entry pinned"),
    )
}

fn seq(next: u32, ack: u32) -> TcpSeq {
    TcpSeq { next, ack }
}

/// Runs a keep-alive HTTP exchange and both FINs through ingress and egress, checking
/// each direction's tracked sequence state after every segment.
fn check_sequence_tracking(f: &Fixture, client: SocketAddr, vip: SocketAddr, backend: SocketAddr) {
    let state = |f: &Fixture| {
        let (fwd, reply) = entries(f, client, vip, backend);
        (fwd.tcp, reply.tcp)
    };
    f.ingress(&seg(client, vip, "S", 1000, 0, b""));
    assert_eq!(
        state(f),
        (seq(1001, 0), seq(0, 0)),
        "SYN counts one, no ACK"
    );
    f.egress(&seg(backend, client, "SA", 5000, 1001, b""));
    assert_eq!(state(f).1, seq(5001, 1001), "SYN-ACK");
    f.ingress(&seg(client, vip, "A", 1001, 5001, b""));
    assert_eq!(state(f).0, seq(1001, 5001), "handshake ACK");
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let after_request = 1001 + request.len() as u32;
    f.ingress(&seg(client, vip, "A", 1001, 5001, request));
    assert_eq!(state(f).0, seq(after_request, 5001), "request");
    assert_ne!(
        entries(f, client, vip, backend).1.ts_ns,
        0,
        "request pending"
    );
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let after_response = 5001 + response.len() as u32;
    f.egress(&seg(backend, client, "A", 5001, after_request, response));
    assert_eq!(state(f).1, seq(after_response, after_request), "response");
    assert_eq!(
        entries(f, client, vip, backend).1.ts_ns,
        0,
        "response started"
    );
    f.ingress(&seg(client, vip, "A", after_request, after_response, b""));
    let idle = (
        seq(after_request, after_response),
        seq(after_response, after_request),
    );
    assert_eq!(state(f), idle, "client ACK of the response");
    // A retransmitted request, an old ACK and a keep-alive probe (seq - 1) move
    // nothing back.
    f.ingress(&seg(client, vip, "A", 1001, 5001, request));
    f.ingress(&seg(
        client,
        vip,
        "A",
        after_request - 1,
        after_response,
        b"",
    ));
    f.egress(&seg(backend, client, "A", 5001, after_request, response));
    assert_eq!(state(f), idle, "retransmissions and probes");
    if client.is_ipv4() {
        // A short frame padded to the Ethernet minimum: the length comes from the IP
        // header, so the padding is not taken for payload.
        let mut padded = seg(client, vip, "A", after_request, after_response, b"");
        padded.resize(60, 0);
        f.ingress(&padded);
        assert_eq!(state(f), idle, "Ethernet padding is not payload");
    }
    f.ingress(&seg(client, vip, "FA", after_request, after_response, b""));
    assert_eq!(
        state(f).0,
        seq(after_request + 1, after_response),
        "client FIN"
    );
    f.egress(&seg(
        backend,
        client,
        "FA",
        after_response,
        after_request + 1,
        b"",
    ));
    assert_eq!(
        state(f).1,
        seq(after_response + 1, after_request + 1),
        "backend FIN"
    );
    let (fwd, reply) = entries(f, client, vip, backend);
    assert_ne!(fwd.flags & FLOW_CLOSING, 0);
    assert_ne!(reply.flags & FLOW_CLOSING, 0);
}

fn tcp_sequence_state_is_tracked_in_both_directions(hook: Hook) {
    let f = Fixture::new(hook, WEB);
    check_sequence_tracking(
        &f,
        sa("198.18.1.2:40100"),
        sa("198.19.0.10:80"),
        sa("198.18.2.2:8080"),
    );
    check_sequence_tracking(
        &f,
        sa("[2001:db8:1::2]:40100"),
        sa("[2001:db8:ffff::10]:80"),
        sa("[2001:db8:2::2]:8080"),
    );
}
at_both_hooks!(tcp_sequence_state_is_tracked_in_both_directions);

/// Deletes one flow-table entry, as an LRU eviction would.
fn evict(f: &Fixture, key: &FlowKey) {
    use aya::maps::{HashMap, Map, MapData};
    let pin = f._pins.0.join(canary_common::MAP_FLOWS);
    let mut flows: HashMap<MapData, FlowKey, FlowValue> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(pin).unwrap())).unwrap();
    flows.remove(key).unwrap();
}

fn a_non_syn_segment_without_a_flow_passes_untouched_and_pins_nothing(hook: Hook) {
    // Spoofed or stray segments: they create no flow (a flood of them evicts nothing)
    // and reach the stack as they came.
    let f = Fixture::new(hook, WEB);
    let vip = sa("198.19.0.10:80");
    let cases: [(&str, &str, &[u8]); 7] = [
        ("ACK", "A", b""),
        ("ACK with a request", "A", b"GET / HTTP/1.1\r\n\r\n"),
        ("FIN", "FA", b""),
        ("RST", "R", b""),
        ("SYN-ACK", "SA", b""),
        ("SYN with FIN", "SF", b""),
        ("SYN with RST", "SR", b""),
    ];
    for (i, (name, flags, payload)) in cases.iter().enumerate() {
        let client = SocketAddr::new(sa("198.18.200.1:1").ip(), 41000 + i as u16);
        let pkt = seg(client, vip, flags, 7000, 9000, payload);
        assert_eq!(f.ingress(&pkt), pkt, "{name} rewritten");
        assert_eq!(
            f.dp.flow(&flow_key(client, vip, DIR_FORWARD)).unwrap(),
            None,
            "{name}"
        );
        for backend in [sa("198.18.2.2:8080"), sa("198.18.3.2:9090")] {
            let reply = f.dp.flow(&flow_key(backend, client, DIR_REPLY)).unwrap();
            assert_eq!(reply, None, "{name}: reply entry");
        }
    }
    let six = (sa("[2001:db8:1::99]:41000"), sa("[2001:db8:ffff::10]:80"));
    let pkt = seg(six.0, six.1, "A", 7000, 9000, b"");
    assert_eq!(f.ingress(&pkt), pkt, "IPv6 ACK rewritten");
    let stats = f.dp.stats(0).unwrap();
    let placed: u64 = stats.iter().map(|s| s.connections + s.flow_misses).sum();
    assert_eq!(placed, 0, "nothing placed");
    assert_eq!(f.dp.stray(0).unwrap(), cases.len() as u64, "stray count");
    assert_eq!(f.dp.stray(1).unwrap(), 1, "IPv6 stray count");
    assert_eq!(f.dp.signals(0).unwrap()[0].counters.requests, 0);
    // A UDP datagram still places a flow: UDP has no handshake to wait for.
    let out = f.ingress(&udp(sa("198.18.200.1:5000"), sa("198.19.0.53:53"), b"q"));
    assert_eq!(endpoints(&out).1, sa("198.18.2.2:5353"));
}
at_both_hooks!(a_non_syn_segment_without_a_flow_passes_untouched_and_pins_nothing);

fn a_lost_forward_entry_is_placed_again_from_its_reply_entry(hook: Hook) {
    // The table lost the forward entry of an open connection (eviction): its next
    // segment is placed again on the backend its reply entry names, even after the
    // weight moved every new connection to the other group, and its state starts from
    // that segment.
    let mut f = Fixture::new(hook, WEB);
    let (client, vip, backend) = (
        sa("198.18.1.2:40101"),
        sa("198.19.0.10:80"),
        sa("198.18.2.2:8080"),
    );
    let (c, b) = exchange(&f, (client, vip, backend), true, true);
    f.set_weight(0, 10_000);
    evict(&f, &flow_key(client, vip, DIR_FORWARD));
    let request = b"GET /again HTTP/1.1\r\n\r\n";
    let out = f.ingress(&seg(client, vip, "A", c, b, request));
    assert_eq!(
        endpoints(&out),
        (client, backend),
        "re-placed on its backend"
    );
    let c2 = c + request.len() as u32;
    let (fwd, reply) = entries(&f, client, vip, backend);
    assert_eq!(fwd.tcp, seq(c2, b), "state from the first segment");
    assert_ne!(reply.ts_ns, 0, "the request is pending: it was counted");
    let stats = f.dp().stats(0).unwrap();
    assert_eq!((stats[0].connections, stats[0].flow_misses), (1, 1));
    assert_eq!(f.dp().signals(0).unwrap()[0].counters.requests, 2);
    assert_eq!(f.dp().stray(0).unwrap(), 0);
    // Both entries gone: nothing to place it from, it passes untouched.
    evict(&f, &flow_key(client, vip, DIR_FORWARD));
    evict(&f, &flow_key(backend, client, DIR_REPLY));
    let ack = seg(client, vip, "A", c2, b, b"");
    assert_eq!(f.ingress(&ack), ack);
    assert_eq!(
        f.dp.flow(&flow_key(client, vip, DIR_FORWARD)).unwrap(),
        None
    );
    assert_eq!(f.dp().stray(0).unwrap(), 1);
}
at_both_hooks!(a_lost_forward_entry_is_placed_again_from_its_reply_entry);

const SHARED_BACKEND: &str = r#"
[[service]]
name = "web"
listen = "198.19.0.10:80"
stable = ["198.18.2.2:8080"]
canary = ["198.18.3.2:9090"]
weight = 0
[[service]]
name = "other"
listen = "198.19.0.11:80"
stable = ["198.18.2.2:8080"]
canary = ["198.18.3.2:9090"]
weight = 0
"#;

fn a_reply_entry_of_another_service_places_nothing(hook: Hook) {
    // The reply entry backend -> client:port belongs to a connection to another
    // service address: a segment to this one is not that connection's.
    let f = Fixture::new(hook, SHARED_BACKEND);
    let client = sa("198.18.1.2:40102");
    let (c, b) = exchange(
        &f,
        (client, sa("198.19.0.10:80"), sa("198.18.2.2:8080")),
        true,
        true,
    );
    let other = sa("198.19.0.11:80");
    let pkt = seg(client, other, "A", c, b, b"");
    assert_eq!(f.ingress(&pkt), pkt);
    assert_eq!(
        f.dp.flow(&flow_key(client, other, DIR_FORWARD)).unwrap(),
        None
    );
    assert_eq!(f.dp.stray(1).unwrap(), 1);
}
at_both_hooks!(a_reply_entry_of_another_service_places_nothing);

fn requests_count_only_once_the_client_acked_the_syn_ack(hook: Hook) {
    // A spoofed SYN places a flow (the backend's SYN-ACK goes to the spoofed address),
    // but a blind sender cannot acknowledge the SYN-ACK: its "requests" count nothing.
    let f = Fixture::new(hook, WEB);
    let (client, vip, backend) = (
        sa("198.18.1.2:40103"),
        sa("198.19.0.10:80"),
        sa("198.18.2.2:8080"),
    );
    let request = b"GET / HTTP/1.1\r\n\r\n";
    f.ingress(&seg(client, vip, "S", 999, 0, b""));
    let out = f.ingress(&seg(client, vip, "A", 1000, 1, request));
    assert_eq!(
        endpoints(&out).1,
        backend,
        "a pinned flow is still forwarded"
    );
    f.egress(&seg(backend, client, "SA", 5000, 1000, b""));
    f.ingress(&seg(client, vip, "A", 1000, 77_777, request));
    assert_eq!(f.dp.signals(0).unwrap()[0].counters.requests, 0, "unacked");
    assert_eq!(
        entries(&f, client, vip, backend).1.ts_ns,
        0,
        "nothing pending"
    );
    f.ingress(&seg(client, vip, "A", 1000, 5001, request));
    assert_eq!(f.dp.signals(0).unwrap()[0].counters.requests, 1);
    let (fwd, _) = entries(&f, client, vip, backend);
    assert_ne!(fwd.flags & canary_common::FLOW_ESTABLISHED, 0);
}
at_both_hooks!(requests_count_only_once_the_client_acked_the_syn_ack);

/// Opens client -> vip (on `backend`) through the programs: handshake, one request
/// and, unless `answer` is false, its response; the client acks the response when
/// `ack` is true. Returns the client's and the backend's next sequence numbers.
fn exchange(
    f: &Fixture,
    (client, vip, backend): (SocketAddr, SocketAddr, SocketAddr),
    answer: bool,
    ack: bool,
) -> (u32, u32) {
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let (c, b) = (100_000u32, 700_000u32);
    f.ingress(&seg(client, vip, "S", c - 1, 0, b""));
    f.egress(&seg(backend, client, "SA", b - 1, c, b""));
    f.ingress(&seg(client, vip, "A", c, b, b""));
    f.ingress(&seg(client, vip, "A", c, b, request));
    let c = c + request.len() as u32;
    if !answer {
        return (c, b);
    }
    f.egress(&seg(backend, client, "A", b, c, response));
    let b = b + response.len() as u32;
    if ack {
        f.ingress(&seg(client, vip, "A", c, b, b""));
    }
    (c, b)
}

/// Captures what leaves a device in a private network namespace.
struct Capture(std::os::fd::OwnedFd);

impl Capture {
    /// Every TCP segment sent out so far, as (src, dst, seq, ack, flags), waiting
    /// up to 200 ms for the next one.
    fn tcp_segments(&self) -> Vec<(SocketAddr, SocketAddr, u32, u32, u8)> {
        use std::os::fd::AsRawFd;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: reading into a live buffer of the given length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return out; // SO_RCVTIMEO: nothing more
            }
            let Ok(p) = SlicedPacket::from_ip(&buf[..n as usize]) else {
                continue;
            };
            let Some(TransportSlice::Tcp(t)) = &p.transport else {
                continue; // neighbour discovery, MLD
            };
            let (src, dst): (IpAddr, IpAddr) = match p.net.as_ref().unwrap() {
                NetSlice::Ipv4(v4) => (
                    v4.header().source_addr().into(),
                    v4.header().destination_addr().into(),
                ),
                NetSlice::Ipv6(v6) => (
                    v6.header().source_addr().into(),
                    v6.header().destination_addr().into(),
                ),
            };
            let h = t.to_header();
            let flags =
                (h.fin as u8) | (h.syn as u8) << 1 | (h.rst as u8) << 2 | (h.ack as u8) << 4;
            out.push((
                SocketAddr::new(src, h.source_port),
                SocketAddr::new(dst, h.destination_port),
                h.sequence_number,
                h.acknowledgment_number,
                flags,
            ));
        }
    }
}

/// Runs `test` on a thread moved into a fresh, unnamed network namespace (it goes away
/// with the thread, on every exit path) where the lab ranges 198.18.0.0/15 and
/// 2001:db8::/32 route to a veth whose outgoing packets are captured.
fn in_private_netns(test: impl FnOnce(&Capture) + Send) {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: affects only this thread, which ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            for cmd in [
                "link add d0 type veth peer name d1",
                // No neighbour resolution: packets leave d0 at once.
                "link set d0 arp off up",
                "link set d1 up",
                "route add 198.18.0.0/15 dev d0",
                "-6 route add 2001:db8::/32 dev d0",
            ] {
                let ok = std::process::Command::new("ip")
                    .args(cmd.split(' '))
                    .status()
                    .unwrap();
                assert!(ok.success(), "ip {cmd}");
            }
            // SAFETY: plain socket calls on values we own.
            let fd = unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                );
                assert!(fd >= 0, "AF_PACKET socket");
                let mut ll: libc::sockaddr_ll = std::mem::zeroed();
                ll.sll_family = libc::AF_PACKET as u16;
                ll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                ll.sll_ifindex = libc::if_nametoindex(c"d0".as_ptr()) as i32;
                let rc = libc::bind(
                    fd,
                    (&ll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of_val(&ll) as u32,
                );
                assert_eq!(rc, 0, "bind to d0");
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 200_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of_val(&tv) as u32,
                );
                std::os::fd::FromRawFd::from_raw_fd(fd)
            };
            let capture = Capture(fd);
            // Anything sent while the device came up (IPv6 MLD) is not ours.
            capture.tcp_segments();
            test(&capture);
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    });
}

fn drain_closes_idle_canary_flows_of_the_service_only_with_exact_segments(hook: Hook) {
    in_private_netns(|capture| {
        let mut f = Fixture::new(hook, WEB);
        let (vip, vip6) = (sa("198.19.0.10:80"), sa("[2001:db8:ffff::10]:80"));
        let (stable, canary, canary6) = (
            sa("198.18.2.2:8080"),
            sa("198.18.3.2:9090"),
            sa("[2001:db8:3::2]:9090"),
        );
        let idle_stable = (sa("198.18.1.2:41000"), vip, stable);
        exchange(&f, idle_stable, true, true);
        f.set_weight(0, 10_000);
        f.set_weight(1, 10_000);
        let idle = (sa("198.18.1.2:41001"), vip, canary);
        let pending = (sa("198.18.1.2:41002"), vip, canary);
        let unacked = (sa("198.18.1.2:41003"), vip, canary);
        let idle6 = (sa("[2001:db8:1::2]:41004"), vip6, canary6);
        let (c, b) = exchange(&f, idle, true, true);
        exchange(&f, pending, false, false);
        let (uc, ub) = exchange(&f, unacked, true, false);
        let (c6, b6) = exchange(&f, idle6, true, true);
        // Rollback: new connections go to stable, these stay pinned.
        f.set_weight(0, 0);
        f.set_weight(1, 0);

        let t0 = std::time::Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let progress = |p: canary_agent::datapath::DrainProgress| (p.closed, p.remaining);
        assert_eq!(
            progress(f.dp().drain_idle(0, ms(0)).unwrap()),
            (0, 3),
            "first sight"
        );
        assert_eq!(
            progress(f.dp().drain_idle(0, ms(50)).unwrap()),
            (0, 3),
            "too soon"
        );
        // The unacked flow's client acks now: its state changed, its quiet time restarts.
        f.ingress(&seg(unacked.0, vip, "A", uc, ub, b""));
        assert_eq!(progress(f.dp().drain_idle(0, ms(100)).unwrap()), (1, 2));
        assert_eq!(
            capture.tcp_segments(),
            vec![
                (idle.0, canary, c, b, 0x14), // RST|ACK to the backend, as the client
                (vip, idle.0, b, c, 0x11),    // FIN|ACK to the client, as the service
            ]
        );
        let closing = |f: &Fixture, flow: (SocketAddr, SocketAddr, SocketAddr)| {
            let (fwd, reply) = entries(f, flow.0, flow.1, flow.2);
            (
                fwd.flags & FLOW_CLOSING != 0,
                reply.flags & FLOW_CLOSING != 0,
            )
        };
        assert_eq!(closing(&f, idle), (true, true));
        for other in [pending, unacked, idle6, idle_stable] {
            assert_eq!(closing(&f, other), (false, false), "{other:?} untouched");
        }
        assert_eq!(progress(f.dp().drain_idle(0, ms(200)).unwrap()), (1, 1));
        assert_eq!(
            capture.tcp_segments(),
            vec![
                (unacked.0, canary, uc, ub, 0x14),
                (vip, unacked.0, ub, uc, 0x11)
            ]
        );
        // The pending request is never cut.
        assert_eq!(progress(f.dp().drain_idle(0, ms(900)).unwrap()), (0, 1));
        // IPv6, another service.
        assert_eq!(progress(f.dp().drain_idle(1, ms(900)).unwrap()), (0, 1));
        assert_eq!(progress(f.dp().drain_idle(1, ms(1000)).unwrap()), (1, 0));
        assert_eq!(
            capture.tcp_segments(),
            vec![
                (idle6.0, canary6, c6, b6, 0x14),
                (vip6, idle6.0, b6, c6, 0x11)
            ]
        );
        assert_eq!(
            closing(&f, idle_stable),
            (false, false),
            "stable flows are not drained"
        );

        // What follows on a drained flow: the client's FIN|ACK still reaches the canary
        // backend, whose reset is not counted as a canary reset (the flow is closing),
        // and a new connection on the tuple is placed by the current weight.
        let out = f.ingress(&seg(idle.0, vip, "FA", c, b + 1, b""));
        assert_eq!(endpoints(&out).1, canary);
        f.egress(&seg(canary, idle.0, "R", b + 1, 0, b""));
        assert_eq!(f.dp().signals(0).unwrap()[1].counters.resets, 0);
        let out = f.ingress(&seg(idle.0, vip, "S", 5, 0, b""));
        assert_eq!(endpoints(&out).1, stable);
    });
}
at_both_hooks!(drain_closes_idle_canary_flows_of_the_service_only_with_exact_segments);

// Client-address routing decided in the kernel (head-free plans): the ingress program
// looks the client up in CANARY_CIDR at the first packet of a new connection.

const CIDR_POLICY: &str = r#"
(define-progression '((0 . 1)))
(define-cohorts '((internal-users (client-cidr . ("198.18.7.0/24" "2001:db8:7::/48")))
                  (regular-users (default . #t))))
(define-user-cohorts '((internal-users . canary)))
"#;

const ROUTED: &str = r#"
[[service]]
name = "web"
listen = "198.19.0.10:80"
protocol = "http"
stable = ["198.18.2.2:8080"]
canary = ["198.18.3.2:9090"]
weight = 0
[[service]]
name = "web6"
listen = "[2001:db8:ffff::10]:80"
stable = ["[2001:db8:2::2]:8080"]
canary = ["[2001:db8:3::2]:9090"]
weight = 0
"#;

impl Fixture {
    /// Installs service `idx` as the agent does for a head-free plan: its table under
    /// generation `gen`, then its value switched to that generation.
    fn install_routed(&mut self, idx: usize, policy: &str, gen: u8, rolled_back: bool) {
        use canary_agent::datapath::{service_key_for, KernelRouting};
        let svc = self.config.services[idx].clone();
        let routing = canary_agent::policy::parse_scheme(policy, "fixture.scm")
            .unwrap()
            .routing;
        let table = routing.kernel_table().expect("a head-free plan");
        self.dp().write_cidr(idx as u32, gen, &table).unwrap();
        let mut entry = encode_service(&svc, idx as u32, svc.weight_bp);
        KernelRouting {
            gen,
            client_key: table.client_key,
            rolled_back,
        }
        .apply(&mut entry.value);
        self.dp()
            .install(&service_key_for(&svc, &routing), &entry)
            .unwrap();
    }

    fn syn_to(&self, client: &str, vip: &str) -> SocketAddr {
        let client = sa(client);
        let out = self.ingress(&tcp(client, sa(vip), true, b""));
        let (src, dst) = endpoints(&out);
        assert_eq!(src, client, "the source is never rewritten");
        dst
    }
}

const VIP: &str = "198.19.0.10:80";
const STABLE: &str = "198.18.2.2:8080";
const CANARY: &str = "198.18.3.2:9090";
const VIP6: &str = "[2001:db8:ffff::10]:80";
const STABLE6: &str = "[2001:db8:2::2]:8080";

fn cidr_cohort_is_decided_at_the_first_syn(hook: Hook) {
    let mut f = Fixture::new(hook, ROUTED);
    f.install_routed(0, CIDR_POLICY, 0, false);
    // Inside the cohort's range: canary at weight 0; outside: the weight split.
    for port in 40000..40010 {
        assert_eq!(f.syn_to(&format!("198.18.7.9:{port}"), VIP), sa(CANARY));
        assert_eq!(f.syn_to(&format!("198.18.1.2:{port}"), VIP), sa(STABLE));
    }
    let d = f.dp().decisions(0).unwrap();
    assert_eq!(d[0], [0, 10], "internal-users: 10 to canary");
    assert_eq!(d[canary_common::DECISION_SPLIT as usize], [10, 0], "split");
    // The rest of the connection follows the pinned flow.
    let out = f.ingress(&tcp(
        sa("198.18.7.9:40000"),
        sa(VIP),
        false,
        b"GET / HTTP/1.1\r\n\r\n",
    ));
    assert_eq!(endpoints(&out).1, sa(CANARY));
    // A rollback (one write of the value) closes the cohort's way to canary.
    f.install_routed(0, CIDR_POLICY, 0, true);
    assert_eq!(f.syn_to("198.18.7.9:41000", VIP), sa(STABLE));
    assert_eq!(f.dp().decisions(0).unwrap()[0], [1, 10]);
}
at_both_hooks!(cidr_cohort_is_decided_at_the_first_syn);

fn cidr_cohort_over_ipv6(hook: Hook) {
    let mut f = Fixture::new(hook, ROUTED);
    f.install_routed(1, CIDR_POLICY, 0, false);
    let vip = "[2001:db8:ffff::10]:80";
    assert_eq!(
        f.syn_to("[2001:db8:7:1::5]:40000", vip),
        sa("[2001:db8:3::2]:9090")
    );
    assert_eq!(
        f.syn_to("[2001:db8:8::5]:40000", vip),
        sa("[2001:db8:2::2]:8080")
    );
    // An IPv4 range never matches an IPv6 client whose first bytes look alike.
    assert_eq!(
        f.syn_to("[c612:709::1]:40000", vip),
        sa("[2001:db8:2::2]:8080")
    );
    let d = f.dp().decisions(1).unwrap();
    assert_eq!(d[0], [0, 1]);
    assert_eq!(d[canary_common::DECISION_SPLIT as usize], [2, 0]);
}
at_both_hooks!(cidr_cohort_over_ipv6);

fn a_changed_table_switches_in_one_write(hook: Hook) {
    let mut f = Fixture::new(hook, ROUTED);
    f.install_routed(0, CIDR_POLICY, 0, false);
    let moved = CIDR_POLICY.replace("198.18.7.0/24", "198.18.8.0/24");
    // The new generation is written while the old one is in force.
    let table = canary_agent::policy::parse_scheme(&moved, "fixture.scm")
        .unwrap()
        .routing
        .kernel_table()
        .unwrap();
    f.dp().write_cidr(0, 1, &table).unwrap();
    assert_eq!(f.syn_to("198.18.7.9:40000", VIP), sa(CANARY));
    assert_eq!(f.syn_to("198.18.8.9:40000", VIP), sa(STABLE));
    f.install_routed(0, &moved, 1, false);
    assert_eq!(f.syn_to("198.18.7.9:40001", VIP), sa(STABLE));
    assert_eq!(f.syn_to("198.18.8.9:40001", VIP), sa(CANARY));
    // Two ranges (IPv4 and IPv6) per generation; the old one is removed.
    let keep = [(0u32, 1u8)].into_iter().collect();
    assert_eq!(f.dp().retain_cidr(&keep).unwrap(), 2);
    assert_eq!(f.syn_to("198.18.8.9:40002", VIP), sa(CANARY));
    assert_eq!(f.dp().retain_cidr(&Default::default()).unwrap(), 2);
}
at_both_hooks!(a_changed_table_switches_in_one_write);

fn default_cohort_percentage_is_sticky_per_client_address(hook: Hook) {
    let mut f = Fixture::new(hook, ROUTED);
    let policy = r#"
(define-progression '((0 . 1)))
(define-cohorts '((internal-users (client-cidr . ("198.18.7.0/24")))
                  (regular-users (default . #t))))
(define-user-cohorts '((internal-users . stable) (percentage . ((regular-users . 30)))))
"#;
    f.install_routed(0, policy, 0, false);
    let mut canary = 0;
    for host in 1..=200u32 {
        let ip =
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 16, 0)) + host);
        let want = canary_common::bucket(canary_common::client_hash(&[
            u32::from_ne_bytes(ip.octets()),
            0,
            0,
            0,
        ])) < 3_000;
        canary += want as u32;
        // Every connection of a client lands on the same version, the one the
        // agent's router would pick for that client address.
        for port in [40000, 40001, 40002] {
            let to = f.syn_to(&format!("{ip}:{port}"), VIP);
            assert_eq!(to, sa(if want { CANARY } else { STABLE }), "{ip}:{port}");
        }
    }
    assert!(
        (30..=90).contains(&canary),
        "{canary} of 200 clients at 30 %"
    );
    assert_eq!(f.syn_to("198.18.7.1:40000", VIP), sa(STABLE));
    let d = f.dp().decisions(0).unwrap();
    assert_eq!(d[0], [1, 0]);
    assert_eq!(d[1], [3 * (200 - canary as u64), 3 * canary as u64]);
}
at_both_hooks!(default_cohort_percentage_is_sticky_per_client_address);

/// Runs `test` on a thread moved into a fresh, unnamed network namespace (gone with the
/// thread on every exit path) that routes like a node: clients on r0 (198.18.1.0/24,
/// 2001:db8:1::/64), backends one hop away through s0 (198.18.2.0/24, 2001:db8:2::/64)
/// with permanent neighbour entries for the client (198.18.1.2, 2001:db8:1::2) and the
/// backend (198.18.2.2, 2001:db8:2::2), forwarding on.
fn in_router_netns(test: impl FnOnce(&Router) + Send) {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: affects only this thread, which ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            for cmd in [
                "ip link add r0 type veth peer name r1",
                "ip link add s0 type veth peer name s1",
                "ip link set r0 up",
                "ip link set r1 up",
                "ip link set s0 up",
                "ip link set s1 up",
                "ip addr add 198.18.1.1/24 dev r0",
                "ip addr add 198.18.2.1/24 dev s0",
                "ip -6 addr add 2001:db8:1::1/64 dev r0 nodad",
                "ip -6 addr add 2001:db8:2::1/64 dev s0 nodad",
                "ip neigh add 198.18.2.2 lladdr 02:00:00:00:02:02 dev s0 nud permanent",
                "ip -6 neigh add 2001:db8:2::2 lladdr 02:00:00:00:02:02 dev s0 nud permanent",
                "ip neigh add 198.18.1.2 lladdr 02:00:00:00:01:02 dev r0 nud permanent",
                "ip -6 neigh add 2001:db8:1::2 lladdr 02:00:00:00:01:02 dev r0 nud permanent",
                "sysctl -qw net.ipv4.conf.all.forwarding=1",
                "sysctl -qw net.ipv6.conf.all.forwarding=1",
            ] {
                sh(cmd);
            }
            let link = |name: &str| -> (u32, [u8; 6]) {
                let line = sh(&format!("ip -br link show dev {name}"));
                let mac: Vec<u8> = line
                    .split_whitespace()
                    .nth(2)
                    .unwrap_or_default()
                    .split(':')
                    .map(|b| u8::from_str_radix(b, 16).unwrap())
                    .collect();
                let name = std::ffi::CString::new(name).unwrap();
                // SAFETY: a NUL-terminated name.
                let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
                assert_ne!(index, 0, "{name:?}");
                (index, mac.try_into().expect("a MAC address"))
            };
            let ((r0, r0_mac), (s0, s0_mac)) = (link("r0"), link("s0"));
            test(&Router {
                r0,
                r0_mac,
                s0,
                s0_mac,
            });
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    });
}

/// The interfaces of [`in_router_netns`]: clients behind r0, backends behind s0.
struct Router {
    r0: u32,
    r0_mac: [u8; 6],
    s0: u32,
    s0_mac: [u8; 6],
}

/// Runs a command (split at spaces) and returns its stdout; panics naming it on failure.
fn sh(cmd: &str) -> String {
    let mut argv = cmd.split(' ');
    let out = std::process::Command::new(argv.next().unwrap())
        .args(argv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const TC_ACT_REDIRECT: u32 = 7;
const NEIGHBOUR_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];

/// A packet with its TTL (IPv4) or hop limit (IPv6) set to `ttl`.
fn with_ttl(mut packet: Vec<u8>, ttl: u8) -> Vec<u8> {
    if packet[12..14] == [0x08, 0x00] {
        let old = u16::from_ne_bytes([packet[22], packet[23]]);
        packet[22] = ttl;
        let new = u16::from_ne_bytes([packet[22], packet[23]]);
        let check = u16::from_ne_bytes([packet[24], packet[25]]);
        let check = canary_common::csum::replace16(check, old, new);
        packet[24..26].copy_from_slice(&check.to_ne_bytes());
    } else {
        packet[21] = ttl;
    }
    packet
}

/// TTL or hop limit of an Ethernet frame's IP packet.
fn ttl(packet: &[u8]) -> u8 {
    if packet[12..14] == [0x08, 0x00] {
        packet[22]
    } else {
        packet[21]
    }
}

#[test]
fn forward_redirect_sends_the_rewritten_packet_to_the_next_hop_with_one_hop_less() {
    in_router_netns(|router| {
        let Router { r0, s0, s0_mac, .. } = *router;
        let mut f = Fixture::new(
            Hook::Tc,
            r#"ingress_hook = "tc"
[[service]]
name = "web"
listen = "198.19.0.10:80"
stable = ["198.18.2.2:8080"]
forward = "redirect"
[[service]]
name = "web6"
listen = "[2001:db8:ffff::10]:80"
stable = ["[2001:db8:2::2]:8080"]
forward = "redirect"
[[service]]
name = "kept"
listen = "198.19.0.11:80"
stable = ["198.18.2.2:8080"]
[[service]]
name = "dns"
listen = "198.19.0.53:53"
protocol = "udp"
stable = ["198.18.2.2:5353"]
forward = "redirect"
"#,
        );
        f.dp().set_replies_at_ingress(true).unwrap();
        let run_on = |ifindex: u32, packet: &[u8]| {
            let r = f
                .programs
                .borrow_mut()
                .run_arriving_on(PROG_INGRESS_TC, packet, ifindex)
                .unwrap();
            (r.retval, r.packet)
        };
        let run = |packet: &[u8]| run_on(r0, packet);
        for (client, vip, backend) in [
            ("198.18.1.2:40000", VIP, STABLE),
            ("[2001:db8:1::2]:40000", VIP6, STABLE6),
        ] {
            let (verdict, out) = run(&tcp(sa(client), sa(vip), true, b""));
            assert_eq!(verdict, TC_ACT_REDIRECT, "{client} -> {vip}");
            assert_eq!(endpoints(&out), (sa(client), sa(backend)));
            assert_eq!(out[0..6], NEIGHBOUR_MAC, "the neighbour's MAC");
            assert_eq!(out[6..12], s0_mac, "s0's MAC");
            assert_eq!(ttl(&out), 63);
            // Its reply, arriving on the backend's interface: rewritten there and
            // redirected to the client's next hop.
            let (verdict, out) = run_on(
                s0,
                &tcp(sa(backend), sa(client), false, b"HTTP/1.1 200 OK\r\n"),
            );
            assert_eq!(verdict, TC_ACT_REDIRECT, "reply {backend} -> {client}");
            assert_eq!(endpoints(&out), (sa(vip), sa(client)));
            assert_eq!(out[0..6], CLIENT_MAC, "the client's MAC");
            assert_eq!(out[6..12], router.r0_mac, "r0's MAC");
            assert_eq!(ttl(&out), 63);
        }
        // A connection keeps the way it was placed with: "web" switched to the stack
        // redirects its open flow still (and that flow's replies), not a new one.
        let mut web = f.config.services[0].clone();
        web.forward = canary_agent::config::Forward::Stack;
        f.dp.install(&service_key(&web), &encode_service(&web, 0, 0))
            .unwrap();
        let (verdict, _) = run(&tcp(
            sa("198.18.1.2:40000"),
            sa(VIP),
            false,
            b"GET / HTTP/1.1\r\n",
        ));
        assert_eq!(verdict, TC_ACT_REDIRECT, "the open flow after the switch");
        let (verdict, out) = run(&tcp(sa("198.18.1.2:40010"), sa(VIP), true, b""));
        assert_eq!(
            (verdict, ttl(&out)),
            (TC_ACT_OK, 64),
            "a new flow after the switch"
        );
        // The reply of a flow forwarded by the stack is left to the egress program.
        let (_, kept) = run(&tcp(
            sa("198.18.1.2:40009"),
            sa("198.19.0.11:80"),
            true,
            b"",
        ));
        assert_eq!(endpoints(&kept).1, sa(STABLE));
        let reply = tcp(sa(STABLE), sa("198.18.1.2:40009"), false, b"");
        assert_eq!(
            run_on(s0, &reply),
            (TC_ACT_OK, reply.clone()),
            "a stack flow's reply"
        );
        // A frame shorter than the 54 bytes of an Ethernet, IPv4 and TCP header.
        let (verdict, out) = run(&udp(sa("198.18.1.2:5000"), sa("198.19.0.53:53"), b"q"));
        assert_eq!(verdict, TC_ACT_REDIRECT, "a short UDP datagram");
        assert_eq!(endpoints(&out).1, sa("198.18.2.2:5353"));
        assert_eq!((out[0..6] == NEIGHBOUR_MAC, ttl(&out)), (true, 63));
        // Each case the FIB or the TTL cannot take goes to the stack: rewritten, with
        // the rest as it came.
        let to_stack = |packet: Vec<u8>, why: &str| {
            let (verdict, out) = run(&packet);
            assert_eq!(verdict, TC_ACT_OK, "{why}");
            assert_eq!(out[0..14], packet[0..14], "{why}: Ethernet header");
            assert_eq!(ttl(&out), ttl(&packet), "{why}: TTL");
            endpoints(&out)
        };
        let syn = |client: &str, vip: &str| tcp(sa(client), sa(vip), true, b"");
        assert_eq!(
            to_stack(syn("198.18.1.2:40001", "198.19.0.11:80"), "forward = stack"),
            (sa("198.18.1.2:40001"), sa(STABLE))
        );
        assert_eq!(
            to_stack(with_ttl(syn("198.18.1.2:40002", VIP), 1), "TTL 1"),
            (sa("198.18.1.2:40002"), sa(STABLE))
        );
        assert_eq!(
            to_stack(
                with_ttl(syn("[2001:db8:1::2]:40002", VIP6), 1),
                "hop limit 1"
            )
            .1,
            sa(STABLE6)
        );
        // No service redirects: TC ingress does not look for replies at all (the
        // egress program rewrites them, as for any flow).
        f.dp.set_replies_at_ingress(false).unwrap();
        let reply = tcp(sa(STABLE), sa("198.18.1.2:40000"), false, b"");
        assert_eq!(
            run_on(s0, &reply),
            (TC_ACT_OK, reply.clone()),
            "switched off"
        );
        sh("ip neigh del 198.18.2.2 dev s0");
        to_stack(syn("198.18.1.2:40003", VIP), "no neighbour entry");
        sh("sysctl -qw net.ipv6.conf.all.forwarding=0");
        to_stack(syn("[2001:db8:1::2]:40003", VIP6), "forwarding off");
    });
}
