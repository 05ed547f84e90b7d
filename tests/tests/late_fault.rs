//! A canary that turns bad late: healthy for two minutes at 10 % of the traffic (stable
//! and canary both answer 1 % of requests with 503), then several times stable's rate.
//! The windowed test dilutes such a fault in minutes of healthy history; the analysis's
//! change detector judges it on its own data. The real agent must roll it back within
//! the bound of the fault and not before it.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{set_faults, ADMIN_PORT, HTTP_PORT},
    http_load,
    topology::{CANARY_V4, STABLE_V4},
    Faults, Topology, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const HEALTHY: Duration = Duration::from_secs(120);

/// The seed's error-rate metric (300 s window) and error-spike rule.
const POLICY: &str = r#"step = [ { at = 0, weight = 10 }, { at = "30m", weight = 100 } ]
[[metric]]
name = "error-rate"
threshold = 1.05
window = "300s"
on_fail = "immediate-rollback"
[[rule]]
name = "error-spike"
when = "error-rate > baseline * 1.5"
action = "immediate-rollback"
"#;

/// A canary that turns 20× worse (20 % 503s against stable's 1 %) after two healthy
/// minutes: the analysis (change detector or windowed rules) must roll it back within 20 s. Fast and certain
/// enough for every `make test` (simulated p90 at 5× is 28 s, at 20× a few seconds).
#[test]
fn late_twenty_fold_fault_is_rolled_back() -> Result<()> {
    late_fault(0.20, Duration::from_secs(20))
}

/// Issue 12's goal case: 5× (5 % against 1 %), median ≤ 12 s. The simulated median
/// is 16 s and p90 28 s, so a fixed bound in a test would be flaky; run it by hand:
/// `cargo test -p canary-lab --test late_fault -- --ignored --nocapture`.
#[test]
#[ignore = "measurement (about 3 min): 5x late fault, see BENCHMARKS.md"]
fn late_five_fold_fault_is_rolled_back_quickly() -> Result<()> {
    late_fault(0.05, Duration::from_secs(60))
}

fn late_fault(canary_error_rate: f64, bound: Duration) -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service(
        "web",
        80,
        HTTP_PORT,
        "policy = \"policy.toml\"\nmode = \"exact\"",
    );
    let agent = Agent::start_with_files(&topo.node, &services, &[("policy.toml", POLICY)], &[])?;
    let faults = |error_rate| Faults {
        error_rate,
        ..Default::default()
    };
    let stable_admin = SocketAddr::new(STABLE_V4.into(), ADMIN_PORT);
    let canary_admin = SocketAddr::new(CANARY_V4.into(), ADMIN_PORT);
    topo.client
        .enter(|| set_faults(stable_admin, &faults(0.01)))?;
    topo.client
        .enter(|| set_faults(canary_admin, &faults(0.01)))?;
    agent.cli(&["rollout", "start", "web"])?;
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let (report, rolled_back_after) = std::thread::scope(|scope| -> Result<_> {
        // 200 req/s over 40 keep-alive connections: exact mode puts 4 of them (10 %)
        // on canary.
        let load = scope.spawn(|| {
            topo.client
                .enter(|| http_load(vip, "/", 200, HEALTHY + bound + Duration::from_secs(5), 40))
        });
        let started = Instant::now();
        while started.elapsed() < HEALTHY {
            let r = &agent.status()?["services"][0];
            ensure!(
                r["rollout"]["state"] != "rolled-back",
                "healthy canary rolled back: {r}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        topo.client
            .enter(|| set_faults(canary_admin, &faults(canary_error_rate)))?;
        let after = agent.wait_for_rollout("rolled-back", bound)?;
        Ok((load.join().expect("load thread")?, after))
    })?;
    let status = agent.status()?;
    let rollout = &status["services"][0]["rollout"];
    println!("{}", agent.cli(&["history", "web"])?);
    let after = rolled_back_after.ok_or_else(|| {
        anyhow::anyhow!("not rolled back within {bound:?} of the fault: {status}")
    })?;
    println!(
        "late fault ({canary_error_rate} errors) rolled back {after:?} after the fault: {}",
        rollout["reason"]
    );
    ensure!(
        rollout["reason"].as_str().unwrap_or("").contains("error"),
        "reason does not name the metric: {rollout}"
    );
    ensure!(report.status(503) > 0, "no 503s seen");
    ensure!(
        report.failures.is_empty(),
        "failed requests: {:?}",
        report.failures
    );
    Ok(())
}
