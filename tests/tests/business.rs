//! Business metrics end to end: a real Prometheus server (in the node namespace)
//! scrapes the lab backends' conversion counters; the agent's PromQL metric compares
//! canary's conversion rate with stable's, and the seed's `business-impact` rule
//! pauses the rollout and alerts when canary converts worse.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{set_faults, ADMIN_PORT, HTTP_PORT},
    http_load, log_dir,
    topology::{CANARY_V4, NODE_CLIENT_V4, STABLE_V4},
    webhook::approving_webhook,
    Faults, Topology, Version, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const PROMETHEUS_PORT: u16 = 9090;
const ALERT_PORT: u16 = 9979;

const POLICY: &str = r#"step = [ { at = 0, weight = 50 }, { at = "10m", weight = 100 } ]
[[metric]]
name = "conversion-rate"
threshold = 0.9
window = "5m"
on_fail = "pause-and-alert"
events = 'sum(lab_conversions_total{version="{version}"})'
trials = 'sum(lab_checkout_attempts_total{version="{version}"})'
[[rule]]
name = "business-impact"
when = "conversion-rate < baseline * 0.9"
action = "pause-and-alert"
"#;

#[test]
fn worse_conversion_on_canary_pauses_and_alerts() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    for (version, rate) in [(Version::Stable, 0.5), (Version::Canary, 0.1)] {
        let admin = SocketAddr::new(version.v4().into(), ADMIN_PORT);
        topo.client.enter(|| {
            set_faults(
                admin,
                &Faults {
                    conversion_rate: rate,
                    ..Default::default()
                },
            )
        })?;
    }
    let dir = log_dir().join("prometheus");
    std::fs::create_dir_all(dir.join("data"))?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lab\n    static_configs:\n      - targets: ['{STABLE_V4}:{ADMIN_PORT}', '{CANARY_V4}:{ADMIN_PORT}']\n"
        ),
    )?;
    let mut prometheus = topo.node.spawn(
        "prometheus",
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address={NODE_CLIENT_V4}:{PROMETHEUS_PORT}"),
        ],
    )?;
    prometheus.wait_for_log(
        "Server is ready to receive web requests",
        Duration::from_secs(30),
    )?;

    let alerts = approving_webhook(
        &topo.node,
        SocketAddr::new(NODE_CLIENT_V4.into(), ALERT_PORT),
    )?;
    let services = format!(
        "prometheus_url = \"http://{NODE_CLIENT_V4}:{PROMETHEUS_PORT}\"\nalert_webhook = \"http://{NODE_CLIENT_V4}:{ALERT_PORT}/alerts\"\n"
    ) + &lab_service("shop", 80, HTTP_PORT, "policy = \"policy.toml\"");
    let agent = Agent::start_with_files(&topo.node, &services, &[("policy.toml", POLICY)], &[])?;
    agent.cli(&["rollout", "start", "shop"])?;
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let paused = std::thread::scope(|scope| -> Result<Option<serde_json::Value>> {
        let load = scope.spawn(|| {
            topo.client
                .enter(|| http_load(vip, "/checkout", 200, Duration::from_secs(20), 16))
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut paused = None;
        while Instant::now() < deadline {
            let s = agent.status()?;
            if s["services"][0]["rollout"]["state"] == "paused" {
                paused = Some(s["services"][0].clone());
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        load.join().expect("load thread")?;
        Ok(paused)
    })?;
    let Some(service) = paused else {
        bail!(
            "never paused: {}\nagent log:\n{}",
            agent.status()?,
            agent.log()
        );
    };
    println!("{}", agent.cli(&["history", "shop"])?);
    let reason = service["rollout"]["reason"].as_str().unwrap_or("");
    ensure!(
        reason.contains("conversion-rate") || reason.contains("business-impact"),
        "{reason}"
    );
    // Paused, not rolled back: the canary keeps its weight until an operator decides.
    ensure!(service["weight_bp"] == 5000, "{service}");
    ensure!(
        alerts
            .bodies()
            .iter()
            .any(|b| b.contains("pause-and-alert")),
        "alerts: {:?}",
        alerts.bodies()
    );
    // Resuming overrides the automatic decision and needs a reason.
    let err = agent.cli(&["resume", "shop"]).unwrap_err().to_string();
    ensure!(err.contains("reason"), "{err}");
    agent.cli(&["resume", "shop", "--reason", "campaign ended, expected dip"])?;
    Ok(())
}
