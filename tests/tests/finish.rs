//! Finishing a release end to end: 50 keep-alive HTTP/1 clients pinned to the old
//! stable while a rollout reaches 100 %, verifies and retires it. Every one of them is
//! moved off the old version at a request boundary with no request failing, the
//! rollout ends `finished`, the `released` webhook arrives, and the map holds the new
//! version as stable. The next config (the released version as stable, another as
//! canary) starts a pending rollout and moves no open connection. A canary that turns
//! bad while verifying is rolled back.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{metric_value, scrape_metrics, set_faults, ADMIN_PORT, HTTP_PORT},
    client::http_load_with_retries,
    topology::{CANARY_V4, NODE_CLIENT_V4, STABLE_V4},
    webhook::approving_webhook,
    Faults, HttpReport, Topology, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const ALERT_PORT: u16 = 9979;
const FINISH: &str = r#"step = [ { at = 0, weight = 20 }, { at = "2s", weight = 100 } ]
[verify]
duration = "3s"
[retire]
connections = "drain"
timeout = "30s"
"#;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn summary(name: &str, r: &HttpReport) -> String {
    format!(
        "{name}: {} requests, by version {:?}, failures {:?}, retried {} {:?}, closed idle replaced {}",
        r.sent, r.by_version, r.failures, r.retried(), r.retries, r.closed_idle
    )
}

#[test]
fn a_finished_release_moves_every_old_connection_and_hands_over() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let alerts = approving_webhook(
        &topo.node,
        SocketAddr::new(NODE_CLIENT_V4.into(), ALERT_PORT),
    )?;
    // The first line continues the harness's [agent] table.
    let services = format!("alert_webhook = \"http://{NODE_CLIENT_V4}:{ALERT_PORT}/alerts\"\n")
        + &lab_service("web", 80, HTTP_PORT, "weight = 0\npolicy = \"policy.toml\"");
    let agent = Agent::start_with_files(&topo.node, &services, &[("policy.toml", FINISH)], &[])?;
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let admin = |ip: std::net::Ipv4Addr| SocketAddr::new(ip.into(), ADMIN_PORT);
    let scrape =
        |addr: SocketAddr| -> Result<String> { topo.client.enter(|| scrape_metrics(addr)) };
    let value = |text: &str, name: &str, version: &str| {
        metric_value(text, name, &[("version", version)]).unwrap_or(0.0)
    };

    let (load, finished_after, at_start) = std::thread::scope(|s| -> Result<_> {
        // 50 keep-alive connections at 250 req/s, all opened at weight 0: on stable.
        let load = s.spawn(|| {
            topo.client
                .enter(|| http_load_with_retries(vip, "/", 250, Duration::from_secs(16), 50))
        });
        std::thread::sleep(Duration::from_secs(2));
        let at_start = scrape(admin(STABLE_V4))?;
        agent.cli(&["rollout", "start", "web"])?;
        let finished = agent.wait_for_rollout("finished", Duration::from_secs(13))?;
        let finished_at = unix_now();
        Ok((
            load.join().expect("load thread")?,
            finished.map(|d| (d, finished_at)),
            at_start,
        ))
    })?;
    println!("{}", summary("50 keep-alive clients", &load));
    println!("{}", agent.cli(&["history", "web"])?);
    let status = agent.status()?;
    let (after, finished_at) = finished_after.with_context(|| format!("not finished: {status}"))?;
    println!("finished {after:?} after the start");

    // The old stable had the 50 connections, and has none after the hand-over; its last
    // request came before the release.
    let open_before = value(&at_start, "lab_http_connections_open", "stable");
    ensure!(
        open_before >= 50.0,
        "{open_before} stable connections at the start"
    );
    let stable = scrape(admin(STABLE_V4))?;
    ensure!(
        value(&stable, "lab_http_connections_open", "stable") == 0.0,
        "old stable connections still open:\n{stable}"
    );
    let last = value(&stable, "lab_last_request_timestamp_seconds", "stable");
    ensure!(
        last <= finished_at,
        "a request reached the old stable after finishing"
    );
    // Moved at request boundaries: nothing failed, (almost) nothing needed a retry.
    ensure!(load.failed() == 0, "failed requests: {:?}", load.failures);
    ensure!(
        load.retried() <= 5,
        "{} retried: {:?}",
        load.retried(),
        load.retries
    );
    ensure!(
        load.version("canary") > 0 && load.version("stable") > 0,
        "{load:?}"
    );

    // The hand-over: status, history, webhook.
    let svc = &status["services"][0];
    ensure!(svc["weight_bp"] == 0, "{svc}");
    let backends = svc["backends"].as_array().context("backends")?;
    ensure!(
        backends.len() == 1
            && backends[0]["group"] == "stable"
            && backends[0]["address"] == format!("{CANARY_V4}:{HTTP_PORT}"),
        "{svc}"
    );
    let release = &svc["rollout"]["released"];
    ensure!(
        release["backends"][0] == format!("{CANARY_V4}:{HTTP_PORT}"),
        "{svc}"
    );
    let history = agent.cli(&["history", "web"])?;
    for state in ["verifying", "retiring", "finished"] {
        ensure!(history.contains(state), "{state} missing:\n{history}");
    }
    let mut released = None;
    for _ in 0..50 {
        released = alerts
            .bodies()
            .into_iter()
            .find(|b| b.contains("\"released\""));
        if released.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let released: serde_json::Value =
        serde_json::from_str(&released.context("no released webhook")?)?;
    ensure!(
        released["retired"][0] == format!("{STABLE_V4}:{HTTP_PORT}")
            && released["summary"]["finished_at_ms"].is_u64(),
        "{released}"
    );

    // The next release: the released version is stable, the old host carries the next
    // canary. Connections open on the new stable stay where they are.
    let next = format!(
        "[[service]]\nname = \"web\"\nlisten = \"{VIP_V4}:80\"\nstable = [\"{CANARY_V4}:{HTTP_PORT}\"]\ncanary = [\"{STABLE_V4}:{HTTP_PORT}\"]\nweight = 0\npolicy = \"policy.toml\"\n"
    );
    let (load, open) = std::thread::scope(|s| -> Result<_> {
        let load = s.spawn(|| {
            topo.client
                .enter(|| http_load_with_retries(vip, "/", 100, Duration::from_secs(5), 20))
        });
        std::thread::sleep(Duration::from_secs(2));
        let open = value(
            &scrape(admin(CANARY_V4))?,
            "lab_http_connections_open",
            "canary",
        );
        agent.write_services(&next)?;
        println!("{}", agent.cli(&["reload"])?);
        Ok((load.join().expect("load thread")?, open))
    })?;
    println!("{}", summary("20 clients across the next config", &load));
    let status = agent.status()?;
    let rollout = &status["services"][0]["rollout"];
    ensure!(
        rollout["state"] == "pending" && rollout["weight_bp"] == 0,
        "{status}"
    );
    ensure!(
        open >= 20.0,
        "{open} connections on the new stable before the reload"
    );
    // No connection moved: every response from the released version, none closed.
    ensure!(
        load.failed() == 0 && load.retried() == 0 && load.closed_idle == 0,
        "{load:?}"
    );
    ensure!(
        load.version("stable") == 0 && load.version("canary") == load.sent,
        "{load:?}"
    );
    Ok(())
}

#[test]
fn a_canary_that_turns_bad_while_verifying_is_rolled_back() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let policy = r#"step = [ { at = 0, weight = 50 }, { at = "4s", weight = 100 } ]
[verify]
duration = "5m"
[[metric]]
name = "error-rate"
threshold = 1.05
window = "30s"
[[rule]]
name = "error-spike"
when = "error-rate > baseline * 1.5"
action = "immediate-rollback"
"#;
    let services = lab_service("web", 80, HTTP_PORT, "policy = \"policy.toml\"");
    let agent = Agent::start_with_files(&topo.node, &services, &[("policy.toml", policy)], &[])?;
    agent.cli(&["rollout", "start", "web"])?;
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let rolled_back = std::thread::scope(|s| -> Result<_> {
        let load = s.spawn(|| {
            topo.client
                .enter(|| canary_lab::http_load(vip, "/", 200, Duration::from_secs(30), 32))
        });
        let verifying = agent.wait_for_rollout("verifying", Duration::from_secs(30))?;
        let status = agent.status()?;
        ensure!(verifying.is_some(), "never verifying: {status}");
        let baseline = status["services"][0]["baseline"].as_str().unwrap_or("");
        ensure!(baseline.contains("stable's baseline"), "{status}");
        topo.client.enter(|| {
            set_faults(
                SocketAddr::new(CANARY_V4.into(), ADMIN_PORT),
                &Faults {
                    error_rate: 1.0,
                    ..Default::default()
                },
            )
        })?;
        let after = agent.wait_for_rollout("rolled-back", Duration::from_secs(15))?;
        let _ = load.join().expect("load thread")?;
        Ok(after)
    })?;
    let status = agent.status()?;
    let after = rolled_back.with_context(|| format!("not rolled back: {status}"))?;
    println!(
        "rolled back {after:?} after the fault: {}",
        status["services"][0]["rollout"]["reason"]
    );
    ensure!(status["services"][0]["weight_bp"] == 0, "{status}");
    let history = agent.cli(&["history", "web"])?;
    ensure!(history.contains("rolled-back"), "{history}");
    Ok(())
}
