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
    agent::{lab_service, Agent},
    backend::{metric_value, scrape_metrics, set_faults, ADMIN_PORT, BANNER_PORT, HTTP_PORT},
    banner_connections, http_load,
    topology::{CANARY_V4, STABLE_V4},
    Faults, Topology, VIP_V4,
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

/// A full time-scaled rollout under steady client load (new connections, so each
/// one meets the current weight), with live status and the share the client saw.
pub fn deploy() -> Result<()> {
    let (_, backend) = release_bins()?;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(&backend)?;
    let scale = "120";
    let agent = Agent::start_with_files(
        &topo.node,
        &lab_service("web", 80, BANNER_PORT, "policy = \"web-policy.toml\""),
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
            lab_service(
                mode,
                80 + i as u16,
                BANNER_PORT,
                &format!("mode = \"{mode}\""),
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

/// The seed's rollback check: a rollout under steady HTTP load, a 5xx fault injected
/// into canary at the second step, then what the agent did. With `verify`, the run
/// fails unless the canary was rolled back by a named rule, stable answered every
/// request without error, and no request failed at the connection level.
pub fn failures(verify: bool) -> Result<()> {
    let (_, backend) = release_bins()?;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(&backend)?;
    let policy = r#"step = [ { at = 0, weight = 10 }, { at = "5s", weight = 50 }, { at = "10m", weight = 100 } ]
[[metric]]
name = "error-rate"
threshold = 1.05
window = "60s"
[[metric]]
name = "latency-p99"
threshold = 1.2
window = "60s"
[[rule]]
name = "error-spike"
when = "error-rate > baseline * 1.5"
action = "immediate-rollback"
"#;
    let service = lab_service("web", 80, HTTP_PORT, "policy = \"policy.toml\"");
    let agent = Agent::start_with_files(&topo.node, &service, &[("policy.toml", policy)], &[])?;
    agent.cli(&["rollout", "start", "web"])?;
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let canary_admin = SocketAddr::new(CANARY_V4.into(), ADMIN_PORT);
    let report = std::thread::scope(|scope| -> Result<_> {
        let load = scope.spawn(|| {
            topo.client
                .enter(|| http_load(vip, "/", 300, Duration::from_secs(25), 64))
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut injected = None;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let status = agent.status()?;
            let r = &status["services"][0]["rollout"];
            if injected.is_none() && r["step"] == 1 {
                println!(
                    "lab: rollout at step 2 ({}); injecting 50 % 5xx into canary",
                    r["weight_bp"]
                );
                topo.client.enter(|| {
                    set_faults(
                        canary_admin,
                        &Faults {
                            error_rate: 0.5,
                            ..Default::default()
                        },
                    )
                })?;
                injected = Some(Instant::now());
            }
            if r["state"] == "rolled-back" || Instant::now() > deadline {
                if let Some(t) = injected {
                    println!(
                        "lab: {} {:.1} s after the fault",
                        r["state"],
                        t.elapsed().as_secs_f64()
                    );
                }
                break;
            }
        }
        println!("{}", agent.cli(&["status", "web"])?);
        load.join().expect("load thread")
    })?;
    println!("history:\n{}", agent.cli(&["history", "web"])?);
    let stable = topo
        .client
        .enter(|| scrape_metrics(SocketAddr::new(STABLE_V4.into(), ADMIN_PORT)))?;
    let stable_errors =
        metric_value(&stable, "lab_requests_total", &[("code", "503")]).unwrap_or(0.0);
    let failed: u64 = report.failures.values().sum();
    println!(
        "client: {} requests, by status {:?}, by version {:?}, {failed} failed at the connection level; stable 503s: {stable_errors}",
        report.sent, report.by_status, report.by_version
    );
    if verify {
        let status = agent.status()?;
        let r = &status["services"][0]["rollout"];
        ensure!(
            r["state"] == "rolled-back",
            "canary was not rolled back: {r}"
        );
        ensure!(
            r["reason"].as_str().unwrap_or("").contains("fired"),
            "no rule named: {r}"
        );
        ensure!(
            stable_errors == 0.0,
            "stable answered {stable_errors} errors"
        );
        ensure!(
            failed == 0,
            "{failed} requests failed at the connection level"
        );
        println!("verify-rollback: OK");
    }
    Ok(())
}
