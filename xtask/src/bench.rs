//! `cargo xtask bench`: on one lab topology, wrk straight to a backend, through the
//! XDP splitter and through an iptables `statistic` DNAT split, side by side; then
//! ns/packet of the XDP program from BPF_PROG_TEST_RUN repeats.

use std::process::Command;

use anyhow::{bail, Context, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::HTTP_PORT,
    topology::{CANARY_V4, STABLE_V4},
    Topology, VIP_V4,
};

use crate::lab::release_bins;

const IPTABLES_VIP: &str = "198.19.0.20";
const WRK_SECONDS: &str = "8";
const ROUNDS: usize = 3;

struct WrkResult {
    rps: f64,
    p99_ms: f64,
}

fn wrk(topo: &Topology, url: &str) -> Result<WrkResult> {
    let out = topo
        .client
        .run(&["wrk", "-t2", "-c32", "-d", WRK_SECONDS, "--latency", url])?;
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .context("wrk printed no Requests/sec")?
        .trim()
        .parse()?;
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .context("wrk printed no 99% latency")?
        .trim();
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw errors on {url}:\n{out}");
    }
    Ok(WrkResult {
        rps,
        p99_ms: parse_wrk_time(p99)?,
    })
}

fn parse_wrk_time(s: &str) -> Result<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).context("unit")?);
    let v: f64 = num.parse()?;
    Ok(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        other => bail!("unknown wrk time unit {other}"),
    })
}

pub fn run() -> Result<()> {
    let (_, backend) = release_bins()?;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(&backend)?;
    let service = lab_service("web", 80, HTTP_PORT, "weight = 10");
    let _agent = Agent::start(&topo.node, &service, &[])?;
    for rule in [
        format!("-t nat -A PREROUTING -d {IPTABLES_VIP} -p tcp --dport 80 -m statistic --mode random --probability 0.1 -j DNAT --to-destination {CANARY_V4}:{HTTP_PORT}"),
        format!("-t nat -A PREROUTING -d {IPTABLES_VIP} -p tcp --dport 80 -j DNAT --to-destination {STABLE_V4}:{HTTP_PORT}"),
    ] {
        let mut args = vec!["iptables"];
        args.extend(rule.split(' '));
        topo.node.run(&args)?;
    }
    let paths = [
        (
            "direct to backend",
            format!("http://{STABLE_V4}:{HTTP_PORT}/"),
        ),
        ("XDP splitter (10%)", format!("http://{VIP_V4}:80/")),
        ("iptables DNAT (10%)", format!("http://{IPTABLES_VIP}:80/")),
    ];
    // Interleaved rounds so drift on the machine hits every path alike.
    let mut sums = vec![(0.0, 0.0); paths.len()];
    for _ in 0..ROUNDS {
        for (i, (_, url)) in paths.iter().enumerate() {
            let r = wrk(&topo, url)?;
            sums[i].0 += r.rps / ROUNDS as f64;
            sums[i].1 += r.p99_ms / ROUNDS as f64;
        }
    }
    println!(
        "\nwrk -t2 -c32 -d{WRK_SECONDS}s, mean of {ROUNDS} interleaved rounds, keep-alive HTTP/1.1"
    );
    println!(
        "{:<22} {:>12} {:>10} {:>14}",
        "path", "requests/s", "p99 ms", "vs direct"
    );
    for ((name, _), (rps, p99)) in paths.iter().zip(&sums) {
        println!(
            "{name:<22} {rps:>12.0} {p99:>10.2} {:>13.1}%",
            100.0 * rps / sums[0].0
        );
    }
    println!(
        "XDP splitter / iptables: {:.3}x requests/s",
        sums[1].0 / sums[2].0
    );
    per_packet()
}

/// ns/packet of the XDP program: the agent crate's `xdp_cost` example (it needs the
/// embedded kernel object, which xtask itself must build without).
fn per_packet() -> Result<()> {
    let status = Command::new("cargo")
        .current_dir(crate::workspace_root())
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "canary-agent",
            "--example",
            "xdp_cost",
        ])
        .status()?;
    if !status.success() {
        bail!("xdp_cost failed ({status})");
    }
    Ok(())
}
