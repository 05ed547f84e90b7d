//! A flood of spoofed TCP ACKs at a service address (1 000 000 segments from 198.18.64.0/18,
//! written to the client's veth with AF_PACKET) while 100 keep-alive echo connections
//! run through the datapath: the ACKs open no flow (only a SYN does), so they evict
//! nothing and every live connection keeps its backend. Run as root.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use canary_common::{FlowKey, FlowValue, DIR_FORWARD, MAP_FLOWS};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::ECHO_PORT,
    topology::{LEAF_IFACE, NODE_CLIENT_IFACE},
    LongLived, Topology, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const SPOOFED: u32 = 1_000_000;
/// Spoofed sources: 198.18.64.0/18, unused by the lab (16 384 addresses).
const SPOOF_BASE: u32 = u32::from_be_bytes([198, 18, 64, 0]);
const SPOOF_HOSTS: u32 = 1 << 14;

fn mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {text:?}"))
}

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Spoofed segment `i`: an ACK (with a made-up sequence and acknowledgment) from
/// 198.18.64.0/18 to `dst`, with valid IPv4 and TCP checksums.
fn spoofed_ack(frame: &mut [u8; 54], i: u32, dst: SocketAddr) {
    let IpAddr::V4(dst_ip) = dst.ip() else {
        unreachable!()
    };
    let src = (SPOOF_BASE + i % SPOOF_HOSTS).to_be_bytes();
    let sport = (1024 + i / SPOOF_HOSTS) as u16;
    let ip = &mut frame[14..34];
    ip.copy_from_slice(&[
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst_ip.octets());
    let c = csum(ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut frame[34..54];
    tcp.fill(0);
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
    tcp[8..12].copy_from_slice(&(!i).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10; // ACK
    tcp[14..16].copy_from_slice(&64_000u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst_ip.octets());
    pseudo[9] = 6;
    pseudo[11] = 20;
    let pseudo_sum = pseudo
        .chunks(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]) as u32)
        .sum();
    let c = csum(tcp, pseudo_sum);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

/// Writes the spoofed ACKs to `iface` of the calling thread's namespace; returns how
/// many were sent and how long it took.
fn flood(
    iface: &str,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    dst: SocketAddr,
) -> Result<(u32, Duration)> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: plain libc calls on a socket this function owns and closes.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        ensure!(index != 0, "no interface {iface}");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = index as i32;
        let bound = libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        ensure!(bound == 0, "bind: {}", std::io::Error::last_os_error());
        let mut frame = [0u8; 54];
        frame[0..6].copy_from_slice(&dst_mac);
        frame[6..12].copy_from_slice(&src_mac);
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let start = Instant::now();
        let mut sent = 0;
        let mut retries = 0u32;
        while sent < SPOOFED {
            spoofed_ack(&mut frame, sent, dst);
            let n = libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0);
            if n == frame.len() as isize {
                sent += 1;
                continue;
            }
            let err = std::io::Error::last_os_error();
            retries += 1;
            if err.raw_os_error() != Some(libc::ENOBUFS) || retries > 100_000 {
                bail!("send {sent}: {err} (after {retries} retries)");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok((sent, start.elapsed()))
    }
}

use std::os::fd::{AsRawFd, FromRawFd};

/// Every key in the agent's pinned flow table.
fn flow_keys(agent: &Agent) -> Result<Vec<FlowKey>> {
    let pin = agent.bpffs.join(MAP_FLOWS);
    let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let flows: HashMap<MapData, FlowKey, FlowValue> = HashMap::try_from(Map::LruHashMap(data))?;
    Ok(flows.keys().collect::<Result<_, _>>()?)
}

fn v4(word: u32) -> Ipv4Addr {
    Ipv4Addr::from(word.to_ne_bytes())
}

#[test]
fn a_million_spoofed_acks_open_no_flow_and_break_no_connection() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    // Exact mode at 50 %: a flow placed again by a new pick would move to the other
    // backend half of the time, and its echo connection would break.
    let agent = Agent::start(
        &topo.node,
        &lab_service("echo", 7001, ECHO_PORT, "weight = 50\nmode = \"exact\""),
        &[],
    )?;
    let target = SocketAddr::new(VIP_V4.into(), 7001);
    let client_mac = mac(&topo
        .client
        .run(&["cat", &format!("/sys/class/net/{LEAF_IFACE}/address")])?)?;
    let node_mac = mac(&topo.node.run(&[
        "cat",
        &format!("/sys/class/net/{NODE_CLIENT_IFACE}/address"),
    ])?)?;
    let (live, before, (sent, took)) = topo.client.enter(|| {
        let live = LongLived::open(target, 100, &[])?;
        std::thread::sleep(Duration::from_millis(300));
        let before = live.report();
        let flooded = flood(LEAF_IFACE, client_mac, node_mac, target)?;
        // Echoes go on for a while after the flood.
        std::thread::sleep(Duration::from_secs(1));
        Ok((live, before, flooded))
    })?;
    let report = live.stop();
    println!(
        "{sent} spoofed ACKs in {took:.2?} ({:.0} /s); live connections: {} by backend {:?}, \
         {} reset, {} ended, {} stalls, fewest echoes {} (before the flood {})",
        sent as f64 / took.as_secs_f64(),
        report.conns.len(),
        report.by_backend(),
        report.resets(),
        report.ended(),
        report.stalls(),
        report.min_messages_ok(),
        before.min_messages_ok(),
    );
    ensure!(report.conns.len() == 100);
    ensure!(
        report.resets() == 0 && report.ended() == 0,
        "broken connections: {:?}",
        report
            .conns
            .iter()
            .filter(|c| c.ended.is_some())
            .collect::<Vec<_>>()
    );
    ensure!(
        report.min_messages_ok() > before.min_messages_ok(),
        "a connection made no progress during the flood"
    );
    let keys = flow_keys(&agent)?;
    let spoofed = keys
        .iter()
        .filter(|k| {
            let (src, dst) = (v4(k.src[0]).octets(), v4(k.dst[0]).octets());
            let from = |a: [u8; 4]| a[..2] == [198, 18] && (64..128).contains(&a[2]);
            from(src) || from(dst)
        })
        .count();
    let live_forward = report
        .conns
        .iter()
        .filter(|c| {
            keys.iter().any(|k| {
                k.dir == DIR_FORWARD
                    && IpAddr::V4(v4(k.src[0])) == c.local.ip()
                    && u16::from_be(k.sport) == c.local.port()
            })
        })
        .count();
    println!(
        "flow table: {} entries, {spoofed} of spoofed tuples, forward entries of {live_forward} of the 100 live connections",
        keys.len()
    );
    ensure!(spoofed == 0, "{spoofed} flow entries for spoofed tuples");
    ensure!(
        live_forward == 100,
        "live flows lost: {live_forward} of 100 left"
    );
    let status = agent.status()?;
    let stray = status["services"][0]["stray_segments"]
        .as_u64()
        .context("stray_segments in status")?;
    println!("stray_segments in status: {stray}");
    // Every spoofed ACK that reached the node was counted (a veth may drop a few
    // under a burst before the program sees them).
    ensure!(
        stray <= sent as u64 && stray >= sent as u64 * 9 / 10,
        "stray_segments {stray} for {sent} sent"
    );
    Ok(())
}
