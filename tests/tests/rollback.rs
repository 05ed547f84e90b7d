//! Automatic rollback end to end: a rollout under steady HTTP load, a fault injected
//! into the canary at run time, the kernel telemetry and the analysis detect it, and
//! the agent rolls back in one map write. Stable never fails a request and no
//! connection is broken by the rollback itself.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{ensure, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{metric_value, scrape_metrics, set_faults, ADMIN_PORT, HTTP_PORT},
    http_load,
    topology::{CANARY_V4, NODE_CLIENT_V4, STABLE_V4},
    webhook::approving_webhook,
    Faults, Topology, VIP_V4,
};

const METRICS_PORT: u16 = 9464;
const ALERT_PORT: u16 = 9978;
const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");

const POLICY: &str = r#"step = [ { at = 0, weight = 50 }, { at = "10m", weight = 100 } ]
[[metric]]
name = "error-rate"
threshold = 1.05
window = "60s"
[[rule]]
name = "error-spike"
when = "error-rate > baseline * 1.5"
action = "immediate-rollback"
"#;

#[test]
fn canary_fault_is_rolled_back_automatically() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    // The first line continues the harness's [agent] table.
    let alerts = approving_webhook(
        &topo.node,
        SocketAddr::new(NODE_CLIENT_V4.into(), ALERT_PORT),
    )?;
    let services = format!(
        "metrics_listen = \"{NODE_CLIENT_V4}:{METRICS_PORT}\"\nalert_webhook = \"http://{NODE_CLIENT_V4}:{ALERT_PORT}/alerts\"\n"
    )
        + &lab_service("web", 80, HTTP_PORT, "policy = \"policy.toml\"");
    let agent = Agent::start_with_files(&topo.node, &services, &[("policy.toml", POLICY)], &[])?;
    agent.cli(&["rollout", "start", "web"])?;
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let canary_admin = SocketAddr::new(CANARY_V4.into(), ADMIN_PORT);
    let (report, rolled_back_after) = std::thread::scope(|scope| -> Result<_> {
        let load = scope.spawn(|| {
            topo.client
                .enter(|| http_load(vip, "/", 200, Duration::from_secs(12), 32))
        });
        std::thread::sleep(Duration::from_secs(3));
        topo.client.enter(|| {
            set_faults(
                canary_admin,
                &Faults {
                    error_rate: 1.0,
                    ..Default::default()
                },
            )
        })?;
        let after = agent.wait_for_rollout("rolled-back", Duration::from_secs(8))?;
        Ok((load.join().expect("load thread")?, after))
    })?;
    let status = agent.status()?;
    ensure!(status["services"][0]["weight_bp"] == 0, "{status}");
    let rollout = &status["services"][0]["rollout"];
    let after = rolled_back_after.ok_or_else(|| anyhow::anyhow!("no rollback: {status}"))?;
    println!(
        "rolled back {after:?} after the fault: {}",
        rollout["reason"]
    );
    println!("{}", agent.cli(&["history", "web"])?);
    ensure!(
        rollout["reason"].as_str().unwrap_or("").contains("error"),
        "reason does not name the rule: {rollout}"
    );
    // No request failed at the connection level: the rollback broke nothing.
    ensure!(
        report.failures.is_empty(),
        "failed requests: {:?}",
        report.failures
    );
    ensure!(report.status(503) > 0, "the fault never showed");
    // Stable never answered with an error.
    let stable_metrics = topo
        .client
        .enter(|| scrape_metrics(SocketAddr::new(STABLE_V4.into(), ADMIN_PORT)))?;
    let stable_503 = metric_value(&stable_metrics, "lab_requests_total", &[("code", "503")]);
    ensure!(
        stable_503.unwrap_or(0.0) == 0.0,
        "stable answered 503s: {stable_503:?}"
    );
    // History shows the verdict changes as well as the transition.
    let history = agent.cli(&["history", "web"])?;
    ensure!(history.contains("verdict error-rate"), "{history}");
    // The alert webhook was told, naming the rule.
    let bodies = alerts.bodies();
    ensure!(
        bodies
            .iter()
            .any(|b| b.contains("immediate-rollback") && b.contains("error")),
        "alerts: {bodies:?}"
    );
    // The agent's Prometheus endpoint shows the same story.
    let metrics = topo
        .client
        .enter(|| scrape_metrics(SocketAddr::new(NODE_CLIENT_V4.into(), METRICS_PORT)))?;
    let canary_5xx = metric_value(
        &metrics,
        "canary_http_responses_total",
        &[("service", "web"), ("version", "canary"), ("class", "5xx")],
    );
    ensure!(
        canary_5xx.unwrap_or(0.0) > 0.0,
        "no canary 5xx in /metrics:\n{metrics}"
    );
    let state = metric_value(
        &metrics,
        "canary_rollout_state",
        &[("service", "web"), ("state", "rolled-back")],
    );
    ensure!(
        state == Some(1.0),
        "rollout state missing from /metrics:\n{metrics}"
    );
    let latency = metric_value(
        &metrics,
        "canary_request_duration_seconds_count",
        &[("service", "web"), ("version", "stable")],
    );
    ensure!(
        latency.unwrap_or(0.0) > 0.0,
        "no stable latency in /metrics:\n{metrics}"
    );
    // New connections now all reach stable.
    let after = topo
        .client
        .enter(|| http_load(vip, "/", 100, Duration::from_secs(2), 8))?;
    ensure!(
        after.version("canary") == 0 && after.failures.is_empty(),
        "{after:?}"
    );
    Ok(())
}
