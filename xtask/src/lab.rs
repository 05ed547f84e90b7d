//! `cargo xtask lab ...`: the local lab of network namespaces with stable and canary
//! backends and the real agent splitting live traffic (make deploy-canary,
//! make test-traffic-split).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use canary_lab::{
    agent::Agent,
    backend::{BANNER_PORT, HTTP_PORT},
    banner_connections, http_load,
    topology::{CANARY_V4, STABLE_V4},
    Topology, VIP_V4,
};

use crate::workspace_root;

pub fn release_bins() -> Result<(PathBuf, PathBuf)> {
    let target = workspace_root().join("target/release");
    let canary = target.join("canary");
    let backend = target.join("lab-backend");
    ensure!(
        canary.exists() && backend.exists(),
        "release binaries missing: run `make build` first"
    );
    // The lab's agent harness reads $CANARY_BIN.
    std::env::set_var("CANARY_BIN", &canary);
    Ok((canary, backend))
}

/// The seed's progression (1 % → 5 % after 5 min → 20 % → 50 % → 100 % after 1 h),
/// with the seed's four stages and an approval-free path so the demo runs unattended.
const SEED_POLICY: &str = r#"step = [
  { at = 0, weight = 1 },
  { at = "5m", weight = 5 },
  { at = "10m", weight = 20 },
  { at = "30m", weight = 50 },
  { at = "1h", weight = 100 },
]
"#;

fn http_service(extra: &str) -> String {
    format!(
        "[[service]]\nname = \"web\"\nlisten = \"{VIP_V4}:80\"\nstable = [\"{STABLE_V4}:{HTTP_PORT}\"]\ncanary = [\"{CANARY_V4}:{HTTP_PORT}\"]\n{extra}\n"
    )
}

/// A full time-scaled rollout under steady client load, with live status.
pub fn deploy() -> Result<()> {
    let (_, backend) = release_bins()?;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(&backend)?;
    let scale = "120";
    let agent = Agent::start_with_files(
        &topo.node,
        &http_service("policy = \"web-policy.toml\""),
        &[("web-policy.toml", SEED_POLICY)],
        &["--time-scale", scale],
    )?;
    println!("lab: agent running on the node namespace, rollout clock x{scale}");
    print!("{}", agent.cli(&["check", &agent.config.to_string_lossy()])?);
    let target = SocketAddr::new(VIP_V4.into(), 80);
    std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            topo.client
                .enter(|| http_load(target, "/", 200, Duration::from_secs(45), 16))
        });
        watch_rollout(&agent)?;
        let report = load.join().expect("load thread")?;
        println!(
            "client: {} requests, {} failed, by version {:?}, p99 {:.2} ms",
            report.sent,
            report.failures.values().sum::<u64>(),
            report.by_version,
            report.latency.p99_ms
        );
        Ok(())
    })
}

fn watch_rollout(agent: &Agent) -> Result<()> {
    agent.cli(&["rollout", "start", "web"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = agent.cli(&["status", "web"])?;
        println!("\n{status}");
        let json = agent.status()?;
        let state = json["services"][0]["rollout"]["state"].as_str().unwrap_or("").to_string();
        if state == "promoted" || state == "rolled-back" || Instant::now() > deadline {
            println!("lab: rollout {state}");
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    println!("\nhistory:\n{}", agent.cli(&["history", "web"])?);
    Ok(())
}

/// Target versus observed canary share at several weights, hash and exact mode.
pub fn traffic_split() -> Result<()> {
    let (_, backend) = release_bins()?;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(&backend)?;
    topo.client
        .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
    let services = ["hash", "exact"]
        .iter()
        .enumerate()
        .map(|(i, mode)| {
            format!(
                "[[service]]\nname = \"{mode}\"\nlisten = \"{VIP_V4}:{}\"\nstable = [\"{STABLE_V4}:{BANNER_PORT}\"]\ncanary = [\"{CANARY_V4}:{BANNER_PORT}\"]\nmode = \"{mode}\"\n",
                80 + i
            )
        })
        .collect::<String>();
    let agent = Agent::start(&topo.node, &services, &[])?;
    let sources = topo.add_client_addrs(16)?;
    let n = 5_000;
    println!("{:<6} {:>8} {:>10} {:>10} {:>8}", "mode", "target", "observed", "error", "conns");
    let mut round = 0;
    for weight in ["1", "5", "10", "25", "50", "90"] {
        for (i, mode) in ["hash", "exact"].iter().enumerate() {
            agent.cli(&["set-weight", mode, weight])?;
            // A fresh source address per round: no 5-tuple reuse across rounds.
            let source: IpAddr = sources[round % sources.len()];
            round += 1;
            let target = SocketAddr::new(VIP_V4.into(), 80 + i as u16);
            let r = topo.client.enter(|| {
                banner_connections(target, n, 32, &[source], Duration::from_secs(5))
            })?;
            ensure!(r.failed() == 0, "{mode} at {weight}%: {:?}", r.failures);
            let observed = 100.0 * r.count("canary") as f64 / n as f64;
            let target_pct: f64 = weight.parse()?;
            println!(
                "{mode:<6} {target_pct:>7.2}% {observed:>9.2}% {:>+9.2}  {n:>7}",
                observed - target_pct
            );
        }
    }
    Ok(())
}

pub fn needs_analysis(target: &str) -> Result<()> {
    anyhow::bail!(
        "`make {target}` injects canary faults and checks the automatic rollback, which \
         lands with the analysis/automatic-rollback issue; it is not available yet"
    )
}
