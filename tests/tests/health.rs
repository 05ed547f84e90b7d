//! Health checks end to end: real backends killed and restarted under a stream of new
//! connections, the agent's checks taking them out of the selection and back.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Result};
use canary_lab::{
    agent::Agent,
    backend::{self, BANNER_PORT},
    banner_connections,
    topology::{CANARY_V4, LEAF_IFACE, STABLE_V4},
    Backends, BannerReport, ChildGuard, Topology, Version, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
/// A second stable backend, beside STABLE_V4 in the stable namespace.
const STABLE_B: &str = "198.18.2.3";
const HEALTH: &str = "[service.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\n\
                      timeout = \"150ms\"\nfall = 2\nrise = 2\n";

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), 80)
}

/// A banner backend named `stable-b` on [`STABLE_B`].
fn start_stable_b(topo: &Topology) -> Result<ChildGuard> {
    let addr = format!("{STABLE_B}:{BANNER_PORT}");
    let mut child = topo
        .stable
        .spawn(BACKEND_BIN, &["--name", "stable-b", "--banner", &addr])?;
    child.wait_for_log(backend::READY_LINE, Duration::from_secs(10))?;
    Ok(child)
}

/// The lab with its backends and a second stable backend, [`STABLE_B`], beside them.
fn lab_with_stable_b() -> Result<(Topology, Backends, ChildGuard)> {
    let topo = Topology::build()?;
    topo.stable
        .add_address(&format!("{STABLE_B}/24"), LEAF_IFACE)?;
    let backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let b = start_stable_b(&topo)?;
    Ok((topo, backends, b))
}

/// New connections at about 50 per second for `secs` seconds, from the client.
fn connections(topo: &Topology, secs: u64) -> Result<BannerReport> {
    let mut total = BannerReport::default();
    for _ in 0..secs * 5 {
        let started = Instant::now();
        let report = topo
            .client
            .enter(|| banner_connections(vip(), 10, 2, &[], Duration::from_secs(2)))?;
        for (name, n) in report.by_name {
            *total.by_name.entry(name).or_default() += n;
        }
        for (why, n) in report.failures {
            *total.failures.entry(why).or_default() += n;
        }
        std::thread::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()));
    }
    Ok(total)
}

/// The health state of backend `address` in `status`.
fn health_of(agent: &Agent, address: &str) -> Result<String> {
    let status = agent.status()?;
    let backends = status["services"][0]["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let b = backends
        .iter()
        .find(|b| b["address"] == address)
        .ok_or_else(|| anyhow!("{address} not in status: {status}"))?;
    Ok(b["health"]["state"].as_str().unwrap_or("").to_string())
}

/// Polls until `address`'s health is `state`; the time it took.
fn wait_health(agent: &Agent, address: &str, state: &str) -> Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if health_of(agent, address)? == state {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(anyhow!(
        "{address} not {state} within 10 s: {}",
        agent.status()?
    ))
}

#[test]
fn a_dead_stable_backend_leaves_the_selection_and_returns_after_rise_passes() -> Result<()> {
    let (topo, _backends, b) = lab_with_stable_b()?;
    let stable_b = format!("{STABLE_B}:{BANNER_PORT}");
    let services = format!(
        "[[service]]\nname = \"web\"\nlisten = \"{VIP_V4}:80\"\n\
         stable = [\"{STABLE_V4}:{BANNER_PORT}\", \"{stable_b}\"]\n\
         canary = [\"{CANARY_V4}:{BANNER_PORT}\"]\n{HEALTH}"
    );
    let agent = Agent::start(&topo.node, &services, &[])?;
    let before = connections(&topo, 2)?;
    println!("both up: {:?}", before.by_name);
    ensure!(
        before.failed() == 0 && before.count("stable") > 0 && before.count("stable-b") > 0,
        "{before:?}"
    );
    // Killed: out of the selection after `fall` failed checks.
    let killed = Instant::now();
    drop(b);
    let took = wait_health(&agent, &stable_b, "down")?;
    println!("stable-b down {took:?} after the kill");
    let status = agent.status()?;
    let reason = status["services"][0]["backends"][1]["health"]["reason"].to_string();
    ensure!(reason.contains("2 checks failed in a row"), "{reason}");
    let while_down = connections(&topo, 3)?;
    println!("while down: {while_down:?}");
    ensure!(
        while_down.failed() == 0 && while_down.count("stable-b") == 0 && while_down.ok() >= 140,
        "{while_down:?}"
    );
    ensure!(killed.elapsed() < Duration::from_secs(10));
    // Restarted: back after `rise` passes.
    let _b = start_stable_b(&topo)?;
    let took = wait_health(&agent, &stable_b, "up")?;
    println!("stable-b up {took:?} after the restart");
    let after = connections(&topo, 2)?;
    println!("back: {:?}", after.by_name);
    ensure!(
        after.failed() == 0 && after.count("stable-b") > 0,
        "{after:?}"
    );
    let metrics = agent.cli(&["status", "web"])?;
    println!("{metrics}");
    Ok(())
}

#[test]
fn a_canary_with_no_healthy_backend_is_rolled_back_naming_the_check() -> Result<()> {
    let topo = Topology::build()?;
    let _stable = backend::start(&topo.stable, Path::new(BACKEND_BIN), Version::Stable)?;
    let canary = backend::start(&topo.canary, Path::new(BACKEND_BIN), Version::Canary)?;
    let services = format!(
        "[[service]]\nname = \"web\"\nlisten = \"{VIP_V4}:80\"\n\
         stable = [\"{STABLE_V4}:{BANNER_PORT}\"]\ncanary = [\"{CANARY_V4}:{BANNER_PORT}\"]\n\
         policy = \"policy.toml\"\n{HEALTH}"
    );
    let policy = "step = [ { at = 0, weight = 50 }, { at = \"10m\", weight = 100 } ]\n";
    let agent = Agent::start_with_files(&topo.node, &services, &[("policy.toml", policy)], &[])?;
    agent.cli(&["rollout", "start", "web"])?;
    let split = connections(&topo, 1)?;
    ensure!(
        split.count("canary") > 0 && split.failed() == 0,
        "{split:?}"
    );
    drop(canary);
    let after = agent
        .wait_for_rollout("rolled-back", Duration::from_secs(10))?
        .ok_or_else(|| anyhow!("not rolled back: {}", agent.status().unwrap_or_default()))?;
    println!("rolled back {after:?} after the canary was killed");
    let status = agent.status()?;
    let rollout = &status["services"][0]["rollout"];
    let reason = rollout["reason"].as_str().unwrap_or("");
    ensure!(
        reason.contains("rule health-check fired")
            && reason.contains(&format!("{CANARY_V4}:{BANNER_PORT}")),
        "{rollout}"
    );
    ensure!(status["services"][0]["weight_bp"] == 0, "{status}");
    let stable_only = connections(&topo, 2)?;
    println!("after the rollback: {stable_only:?}");
    ensure!(
        stable_only.failed() == 0 && stable_only.count("stable") == stable_only.ok(),
        "{stable_only:?}"
    );
    println!("{}", agent.cli(&["history", "web"])?);
    Ok(())
}

#[test]
fn passive_detection_ejects_a_killed_backend_from_its_refused_handshakes() -> Result<()> {
    let (topo, _backends, b) = lab_with_stable_b()?;
    let stable_b = format!("{STABLE_B}:{BANNER_PORT}");
    // No active checks: only what the kernel sees of the handshakes.
    let services = format!(
        "[[service]]\nname = \"web\"\nlisten = \"{VIP_V4}:80\"\n\
         stable = [\"{STABLE_V4}:{BANNER_PORT}\", \"{stable_b}\"]\n\
         canary = [\"{CANARY_V4}:{BANNER_PORT}\"]\n\
         [service.outlier]\nejection = \"3s\"\n"
    );
    let agent = Agent::start(&topo.node, &services, &[])?;
    let before = connections(&topo, 2)?;
    ensure!(
        before.failed() == 0 && before.count("stable-b") > 0,
        "{before:?}"
    );
    // Killed: its port answers SYNs with resets; new connections keep coming.
    let killed = Instant::now();
    drop(b);
    let mut refused_meanwhile = 0;
    while health_of(&agent, &stable_b)? != "down" {
        ensure!(
            killed.elapsed() < Duration::from_secs(10),
            "not ejected within 10 s: {}",
            agent.status()?
        );
        refused_meanwhile += connections(&topo, 1)?.failed();
    }
    let took = killed.elapsed();
    println!(
        "stable-b ejected {took:?} after the kill; {refused_meanwhile} connections failed before"
    );
    let status = agent.status()?;
    let backend = &status["services"][0]["backends"][1];
    let reason = backend["health"]["reason"].to_string();
    ensure!(
        reason.contains("got no SYN-ACK") && reason.contains("refused by a reset"),
        "{reason}"
    );
    ensure!(backend["refused"].as_u64() > Some(0), "{backend}");
    let while_out = connections(&topo, 2)?;
    println!("while ejected: {while_out:?}");
    ensure!(
        while_out.failed() == 0 && while_out.count("stable-b") == 0 && while_out.ok() >= 90,
        "{while_out:?}"
    );
    // Restarted: back when its ejection ends, and it answers again.
    let _b = start_stable_b(&topo)?;
    let took = wait_health(&agent, &stable_b, "up")?;
    println!("stable-b back {took:?} after the restart");
    let after = connections(&topo, 2)?;
    ensure!(
        after.failed() == 0 && after.count("stable-b") > 0,
        "{after:?}"
    );
    let status = agent.status()?;
    let backend = &status["services"][0]["backends"][1];
    ensure!(
        backend["source"] == stable_b.as_str() && backend["health"]["ejections"] == 1,
        "{backend}"
    );
    Ok(())
}
