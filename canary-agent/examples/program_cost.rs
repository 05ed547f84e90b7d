//! ns/packet of the ingress program at XDP and at TC, measured by the kernel with
//! BPF_PROG_TEST_RUN (run by `make bench`). Needs root.
//!
//! Repeats of one frame time the steady paths (not ours, pinned flow). The placement
//! path (first SYN of a new tuple: hash, weight, two flow inserts) is timed over
//! distinct tuples, one run each, against the same loop over distinct frames that are
//! not ours, which carries the same per-run set-up; once with room in the flow table
//! and once with the table full, where every insert makes the LRU evict. Placement by
//! client address (a head-free routing plan: CANARY_CIDR lookup first) is timed the
//! same way on a second service, and placement among 256 backends per version on a
//! third (the first has 16 per version).

#[path = "../tests/pins/mod.rs"]
mod pins;

use std::{net::Ipv4Addr, process::Command};

use anyhow::Result;
use canary_agent::{
    config::Config,
    datapath::{encode_service, service_key, service_key_for, Datapath, KernelRouting},
};
use canary_common::{FLOW_TABLE_SIZE, PROG_INGRESS, PROG_INGRESS_TC};
use etherparse::PacketBuilder;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 99);
/// The service decided by client address.
const ROUTED: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
/// The service with 256 backends per version.
const WIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
const REPEAT: u32 = 1_000_000;
/// Distinct tuples per timed placement run (two flow entries each).
const TUPLES: u32 = 20_000;

fn main() -> Result<()> {
    let pins = std::env::temp_dir().join(format!("canary-bench-{}", std::process::id()));
    let result = run(&pins);
    let _ = std::fs::remove_dir_all(&pins);
    result
}

fn packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, syn: bool) -> Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, 80, 1, 64000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, &[0u8; 64])?;
    Ok(out)
}

/// The i-th distinct client tuple: addresses in 198.18.128.0/17, ports from 1024.
fn tuple(i: u32) -> (Ipv4Addr, u16) {
    let host = i / 60_000;
    let addr = Ipv4Addr::new(198, 18, 128 + (host / 256) as u8, (host % 256) as u8);
    (addr, 1024 + (i % 60_000) as u16)
}

fn run(pins: &std::path::Path) -> Result<()> {
    let mut rows: Vec<(String, [u64; 2])> = Vec::new();
    for (i, prog) in [PROG_INGRESS, PROG_INGRESS_TC].into_iter().enumerate() {
        // A fresh datapath (and flow table) per program.
        let dir = pins.join(prog);
        for (r, (name, ns)) in measure(&dir, prog)?.into_iter().enumerate() {
            if rows.len() <= r {
                rows.push((name, [0; 2]));
            }
            rows[r].1[i] = ns;
        }
        let _ = Command::new("umount").arg("-l").arg(&dir).status();
    }
    println!("\nIngress program, BPF_PROG_TEST_RUN (kernel-measured mean ns/packet)");
    println!("| path | XDP | TC |");
    println!("|---|---:|---:|");
    for (name, [xdp, tc]) in rows {
        println!("| {name} | {xdp} | {tc} |");
    }
    Ok(())
}

/// `n` backends `198.18.{net}.1..`, as a TOML list.
fn backends(net: u8, n: usize) -> String {
    let list: Vec<String> = (0..n)
        .map(|i| format!("\"198.18.{}.{}:8080\"", net as usize + i / 250, 1 + i % 250))
        .collect();
    format!("[{}]", list.join(", "))
}

fn measure(pins: &std::path::Path, prog: &str) -> Result<Vec<(String, u64)>> {
    let text = format!(
        "[agent]\ninterface = \"lo\"\n\
         [[service]]\nname = \"web\"\nlisten = \"198.19.0.10:80\"\nstable = {}\ncanary = {}\nweight = 10\n\
         [[service]]\nname = \"routed\"\nlisten = \"198.19.0.11:80\"\nprotocol = \"http\"\nstable = [\"198.18.2.2:8080\"]\ncanary = [\"198.18.3.2:8080\"]\nweight = 10\n\
         [[service]]\nname = \"wide\"\nlisten = \"198.19.0.12:80\"\nstable = {}\ncanary = {}\nweight = 10\n",
        backends(2, 16),
        backends(3, 16),
        backends(4, 256),
        backends(6, 256),
    );
    let config = Config::parse(&text, std::path::Path::new("bench.toml"))?;
    let mut dp = Datapath::load(pins)?;
    let svc = &config.services[0];
    dp.install(&service_key(svc), &encode_service(svc, 0, svc.weight_bp))?;
    let wide = &config.services[2];
    dp.install(&service_key(wide), &encode_service(wide, 2, wide.weight_bp))?;
    // 100 client ranges (the timed clients are in the first) to canary, 10 % of the
    // rest by client address.
    let ranges: Vec<String> = (0..100)
        .map(|i| format!("\"198.18.{}.0/24\"", 128 + i))
        .collect();
    let policy = format!(
        "(define-progression '((0 . 1)))\n\
         (define-cohorts '((internal (client-cidr . ({}))) (rest (default . #t))))\n\
         (define-user-cohorts '((internal . canary) (percentage . ((rest . 10)))))\n",
        ranges.join(" ")
    );
    let routing = canary_agent::policy::parse_scheme(&policy, "bench.scm")?.routing;
    let table = routing.kernel_table().expect("a head-free plan");
    let routed = &config.services[1];
    dp.write_cidr(1, 0, &table)?;
    let mut entry = encode_service(routed, 1, routed.weight_bp);
    KernelRouting {
        gen: 0,
        client_key: false,
        rolled_back: false,
    }
    .apply(&mut entry.value);
    dp.install(&service_key_for(routed, &routing), &entry)?;
    let mut programs = pins::Programs::load(pins);
    let client = Ipv4Addr::new(198, 18, 1, 2);
    let mut rows = Vec::new();
    for (name, pkt) in [
        (
            "not ours (other address), × 10⁶",
            packet(client, 40000, OTHER, false)?,
        ),
        (
            "pinned flow, SYN repeated, × 10⁶",
            packet(client, 40000, VIP, true)?,
        ),
        (
            "pinned flow, data packet, × 10⁶",
            packet(client, 40000, VIP, false)?,
        ),
    ] {
        let ns = programs
            .run(prog, &pkt, REPEAT)
            .map_err(anyhow::Error::msg)?
            .duration_ns;
        rows.push((name.to_string(), ns));
    }
    // Distinct tuples, one run each: mean ns over `range`.
    let mut each = |range: std::ops::Range<u32>, dst: Ipv4Addr| -> Result<u64> {
        let n = range.len() as u64;
        let mut total = 0u64;
        for i in range {
            let (src, sport) = tuple(i);
            let packet = packet(src, sport, dst, true)?;
            total += programs
                .run(prog, &packet, 1)
                .map_err(anyhow::Error::msg)?
                .duration_ns;
        }
        Ok(total / n)
    };
    rows.push((
        format!("not ours, {TUPLES} distinct tuples × 1"),
        each(0..TUPLES, OTHER)?,
    ));
    rows.push((
        format!("placement, 16 backends per version, {TUPLES} new tuples × 1, table with room"),
        each(0..TUPLES, VIP)?,
    ));
    rows.push((
        format!("placement, 256 backends per version, {TUPLES} new tuples × 1, table with room"),
        each(TUPLES..2 * TUPLES, WIDE)?,
    ));
    rows.push((
        format!("placement by client cidr (100 ranges), {TUPLES} new tuples × 1, room"),
        each(2 * TUPLES..3 * TUPLES, ROUTED)?,
    ));
    // Fill the table past its size (two entries per flow), then time placement while
    // the LRU evicts, as on a busy node whose table has filled.
    let full = FLOW_TABLE_SIZE / 2;
    each(3 * TUPLES..full, VIP)?;
    rows.push((
        format!("placement, {TUPLES} new tuples × 1, full table (LRU evicts)"),
        each(full..full + TUPLES, VIP)?,
    ));
    Ok(rows)
}
