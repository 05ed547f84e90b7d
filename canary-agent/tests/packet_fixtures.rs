//! Packet fixtures: each case runs the real kernel programs with BPF_PROG_TEST_RUN on
//! a hand-built packet and checks the verdict and the exact output packet, including
//! checksums recomputed from scratch by an independent implementation (etherparse).
//! Needs root (CAP_BPF, CAP_SYS_ADMIN).

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use canary_agent::{
    config::Config,
    datapath::{encode_service, service_key, test_run, Datapath},
};
use canary_common::{PROG_EGRESS, PROG_INGRESS};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// The private bpffs mount of a fixture, unmounted on drop, even when loading failed
/// after the mount was made.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: valid path; unmounting our own private bpffs mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loaded datapath with maps pinned in a private bpffs mount. Fields drop in order:
/// the datapath (closing the maps) before its mount.
struct Fixture {
    dp: Datapath,
    config: Config,
    _pins: Pins,
}

impl Fixture {
    fn new(services: &str) -> Fixture {
        static N: AtomicU32 = AtomicU32::new(0);
        let pins = Pins(std::env::temp_dir().join(format!(
            "canary-fixture-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )));
        let text = format!("[agent]\ninterface = \"lo\"\n{services}");
        let config = Config::parse(&text, std::path::Path::new("fixture.toml")).unwrap();
        let mut dp = Datapath::load(&pins.0).expect("loading the datapath (run as root)");
        for (id, svc) in config.services.iter().enumerate() {
            dp.install(
                &service_key(svc),
                &encode_service(svc, id as u32, svc.weight_bp),
            )
            .unwrap();
        }
        Fixture {
            dp,
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
        let fd = self.dp.program_fd(prog).unwrap();
        let r = test_run::run(fd.as_fd(), packet, 1).unwrap();
        (r.retval, r.packet)
    }

    fn ingress(&self, packet: &[u8]) -> Vec<u8> {
        let (verdict, out) = self.run(PROG_INGRESS, packet);
        assert_eq!(verdict, XDP_PASS, "XDP must never drop");
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

#[test]
fn syn_to_service_is_rewritten_to_stable_with_valid_checksums() {
    let f = Fixture::new(WEB);
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

#[test]
fn at_weight_100_new_connections_go_to_canary() {
    let mut f = Fixture::new(WEB);
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

#[test]
fn reply_gets_the_service_address_back_as_source() {
    let f = Fixture::new(WEB);
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

#[test]
fn ipv6_is_rewritten_both_ways() {
    let mut f = Fixture::new(WEB);
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

#[test]
fn udp_with_and_without_checksum() {
    let f = Fixture::new(WEB);
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

#[test]
fn established_flow_keeps_its_backend_across_weight_changes() {
    let mut f = Fixture::new(WEB);
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

#[test]
fn traffic_that_is_not_ours_passes_untouched() {
    let f = Fixture::new(WEB);
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
        assert_eq!(f.ingress(&pkt), pkt, "ingress changed: {name}");
        // The kernel refuses to build an skb whose IPv4 header is cut short (the stack
        // never hands one to TC), so that case exists only at XDP.
        if name != "truncated ip header" {
            assert_eq!(f.egress(&pkt), pkt, "egress changed: {name}");
        }
    }
    // A reply-looking packet with no pinned flow is not ours either.
    let stray = tcp(sa("198.18.2.2:8080"), sa("198.18.1.2:49999"), false, b"x");
    assert_eq!(f.egress(&stray), stray);
}

#[test]
fn counters_count_connections_packets_and_bytes() {
    let mut f = Fixture::new(WEB);
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

#[test]
fn http_and_handshake_telemetry_is_counted_once_per_segment() {
    let mut f = Fixture::new(WEB);
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
    let request = tcp_seq(
        client,
        vip,
        false,
        1001,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    f.ingress(&request);
    f.ingress(&request); // retransmission: one request
    f.ingress(&tcp_seq(client, vip, false, 1030, b"not a request start"));
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
}
