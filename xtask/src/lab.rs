//! `cargo xtask lab ...`: the local lab of network namespaces with stable and canary
//! backends and the real agent splitting live traffic (make deploy-canary,
//! make test-traffic-split).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use canary_lab::{
    agent::Agent,
    backend::BANNER_PORT,
    banner_connections,
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

fn banner_service(extra: &str) -> String {
    format!(
        "[[service]]\nname = \"web\"\nlisten = \"{VIP_V4}:80\"\nstable = [\"{STABLE_V4}:{BANNER_PORT}\"]\ncanary = [\"{CANARY_V4}:{BANNER_PORT}\"]\n{extra}\n"
    )
}

/// A full time-scaled rollout under steady client load (new connections, so each
/// one meets the current weight), with live status and the share the client saw.
pub fn deploy() -> Result<()> {
    let (_, backend) = release_bins()?;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(&backend)?;
    let scale = "120";
    let agent = Agent::start_with_files(
        &topo.node,
        &banner_service("policy = \"web-policy.toml\""),
        &[("web-policy.toml", SEED_POLICY)],
        &["--time-scale", scale],
    )?;
    println!("lab: agent running on the node namespace, rollout clock x{scale}");
    print!(
        "{}",
        agent.cli(&["check", &agent.config.to_string_lossy()])?
    );
    topo.client
        .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    let seen = Mutex::new((0usize, 0usize, 0usize));
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            // Bounded: stops when the rollout ends or after 400 batches.
            for _ in 0..400 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let r = topo
                    .client
                    .enter(|| banner_connections(target, 100, 8, &[], Duration::from_secs(5)))?;
                let mut s = seen.lock().unwrap();
                s.0 += r.count("stable");
                s.1 += r.count("canary");
                s.2 += r.failed();
                drop(s);
                std::thread::sleep(Duration::from_millis(100));
            }
            anyhow::Ok(())
        });
        let watched = watch_rollout(&agent, &seen);
        done.store(true, Ordering::Relaxed);
        load.join().expect("load thread")?;
        let (stable, canary, failed) = *seen.lock().unwrap();
        println!("client: {stable} connections to stable, {canary} to canary, {failed} failed");
        watched
    })
}

fn watch_rollout(agent: &Agent, seen: &Mutex<(usize, usize, usize)>) -> Result<()> {
    agent.cli(&["rollout", "start", "web"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (0, 0);
    loop {
        std::thread::sleep(Duration::from_secs(3));
        println!("\n{}", agent.cli(&["status", "web"])?);
        let (stable, canary, _) = *seen.lock().unwrap();
        let (ds, dc) = (stable - last.0, canary - last.1);
        last = (stable, canary);
        if ds + dc > 0 {
            println!(
                "  client, last 3 s: {} new connections, {:.1}% canary",
                ds + dc,
                100.0 * dc as f64 / (ds + dc) as f64
            );
        }
        let json = agent.status()?;
        let state = json["services"][0]["rollout"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if state == "promoted" || state == "rolled-back" || Instant::now() > deadline {
            println!("lab: rollout {state}");
            break;
        }
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
    println!(
        "{:<6} {:>8} {:>10} {:>10} {:>8}",
        "mode", "target", "observed", "error", "conns"
    );
    let mut round = 0;
    for weight in ["1", "5", "10", "25", "50", "90"] {
        for (i, mode) in ["hash", "exact"].iter().enumerate() {
            agent.cli(&["set-weight", mode, weight])?;
            // A fresh source address per round: no 5-tuple reuse across rounds.
            let source: IpAddr = sources[round % sources.len()];
            round += 1;
            let target = SocketAddr::new(VIP_V4.into(), 80 + i as u16);
            let r = topo
                .client
                .enter(|| banner_connections(target, n, 32, &[source], Duration::from_secs(5)))?;
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
