//! End-to-end rollout driven through the CLI on a real agent: schedule, pause/resume,
//! an approval gate, an agent restart in the middle, a webhook gate, an operator
//! override and a rollback, with long-lived connections that must never break.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{set_faults, ADMIN_PORT, ECHO_PORT, HTTP_PORT},
    http_load,
    topology::{CANARY_V4, CLIENT_V4, NODE_CLIENT_V4, STABLE_V4},
    webhook::approving_webhook,
    Faults, LongLived, Topology, VIP_V4,
};
use serde_json::Value;

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const WEBHOOK_PORT: u16 = 9977;

fn rollout(agent: &Agent) -> Result<Value> {
    Ok(agent.status()?["services"][0]["rollout"].clone())
}

/// Polls until the rollout reaches `state` (bounded).
fn wait_for(agent: &Agent, state: &str, limit: Duration) -> Result<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let r = rollout(agent)?;
        if r["state"] == state {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("rollout never reached {state}: {r}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rollout_through_the_cli_with_gates_restart_and_rollback() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let webhook = approving_webhook(
        &topo.node,
        SocketAddr::new(NODE_CLIENT_V4.into(), WEBHOOK_PORT),
    )?;
    let policy = format!(
        r#"step = [
  {{ at = 0, weight = 1 }},
  {{ at = "2s", weight = 5 }},
  {{ at = "3s", weight = 20 }},
  {{ at = "4s", weight = 50 }},
  {{ at = "60s", weight = 100 }},
]
[[stage]]
name = "beta"
weights = [1, 5]
[[stage]]
name = "gradual"
weights = [5, 20]
gate = {{ approval = true }}
[[stage]]
name = "full"
weights = [20, 100]
gate = {{ webhook = "http://{NODE_CLIENT_V4}:{WEBHOOK_PORT}/approve" }}
"#
    );
    let services = lab_service("web", 80, ECHO_PORT, "policy = \"web-policy.toml\"");
    let mut agent =
        Agent::start_with_files(&topo.node, &services, &[("web-policy.toml", &policy)], &[])?;
    let conns = topo
        .client
        .enter(|| LongLived::open(SocketAddr::new(VIP_V4.into(), 80), 60, &[CLIENT_V4.into()]))?;

    ensure!(rollout(&agent)?["state"] == "pending");
    let err = agent.cli(&["approve", "web"]).unwrap_err().to_string();
    ensure!(err.contains("pending"), "{err}");

    agent.cli(&["rollout", "start", "web"])?;
    let r = rollout(&agent)?;
    ensure!(r["state"] == "progressing" && r["weight_bp"] == 100, "{r}");

    // Paused: the schedule freezes.
    agent.cli(&["pause", "web", "--reason", "looking at dashboards"])?;
    std::thread::sleep(Duration::from_millis(2500));
    let r = rollout(&agent)?;
    ensure!(r["state"] == "paused" && r["weight_bp"] == 100, "{r}");
    agent.cli(&["resume", "web"])?;

    // 5 %, then the gradual stage's approval gate holds 20 % back.
    let r = wait_for(&agent, "awaiting-approval", Duration::from_secs(10))?;
    ensure!(
        r["weight_bp"] == 500 && r["waiting_gate"]["stage"] == "gradual",
        "{r}"
    );

    // An agent restart in the middle changes nothing.
    agent.restart(&topo.node, &[])?;
    ensure!(
        agent.log().contains("took over"),
        "no take-over:\n{}",
        agent.log()
    );
    let r = rollout(&agent)?;
    ensure!(
        r["state"] == "awaiting-approval" && r["weight_bp"] == 500,
        "after restart: {r}"
    );
    ensure!(agent.status()?["services"][0]["weight_bp"] == 500);

    agent.cli(&["approve", "web"])?;
    let r = rollout(&agent)?;
    ensure!(r["state"] == "progressing" && r["weight_bp"] == 2000, "{r}");

    // Operator override pauses; resume returns to the schedule.
    agent.cli(&["set-weight", "web", "30"])?;
    let r = rollout(&agent)?;
    ensure!(r["state"] == "paused" && r["weight_bp"] == 3000, "{r}");
    agent.cli(&["resume", "web"])?;

    // The full stage's gate is a webhook that approves.
    let deadline = Instant::now() + Duration::from_secs(15);
    while rollout(&agent)?["weight_bp"] != 5000 {
        ensure!(
            Instant::now() < deadline,
            "webhook gate never approved: {}",
            rollout(&agent)?
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(webhook.bodies().iter().any(|b| b.contains("confirm-stage")));

    agent.cli(&["rollback", "web", "--reason", "test done"])?;
    let r = rollout(&agent)?;
    ensure!(r["state"] == "rolled-back" && r["weight_bp"] == 0, "{r}");
    ensure!(agent.status()?["services"][0]["weight_bp"] == 0);
    let err = agent.cli(&["resume", "web"]).unwrap_err().to_string();
    ensure!(err.contains("rolled-back"), "{err}");

    let history: Vec<Value> = serde_json::from_str(&agent.cli(&["history", "web", "--json"])?)?;
    let actors: Vec<&str> = history.iter().filter_map(|e| e["actor"].as_str()).collect();
    ensure!(
        actors.iter().any(|a| a.starts_with("webhook:")),
        "{actors:?}"
    );
    ensure!(actors.contains(&"schedule"), "{actors:?}");
    ensure!(history.last().unwrap()["to"] == "rolled-back");
    println!("{}", agent.cli(&["history", "web"])?);

    let report = conns.stop();
    ensure!(
        report.resets() == 0 && report.stalls() == 0,
        "connections broke: {} resets, {} stalls",
        report.resets(),
        report.stalls()
    );
    ensure!(
        report.min_messages_ok() > 50,
        "a connection stopped exchanging data"
    );
    Ok(())
}

/// The seed's kernel metrics as a fast pipeline would set them up: 20 s windows,
/// 30 s steps (schedule 90 s).
const FAST_PIPELINE: &str = r#"step = [ { at = 0, weight = 10 }, { at = "30s", weight = 20 }, { at = "60s", weight = 50 }, { at = "90s", weight = 100 } ]
[[metric]]
name = "error-rate"
threshold = 1.05
window = "20s"
[[metric]]
name = "success-rate"
threshold = 0.95
window = "20s"
[[metric]]
name = "latency-p99"
threshold = 1.2
window = "20s"
[[rule]]
name = "error-spike"
when = "error-rate > baseline * 1.5"
action = "immediate-rollback"
"#;

/// Runs 100 req/s through the VIP in 5 s rounds, calling `each_round` with the
/// seconds since the start and the rollout after every round, until it returns
/// `Some` or `limit_s` passes.
fn under_load<T>(
    topo: &Topology,
    agent: &Agent,
    limit_s: u64,
    mut each_round: impl FnMut(u64, &Value) -> Result<Option<T>>,
) -> Result<Option<T>> {
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(limit_s) {
        let report = topo
            .client
            .enter(|| http_load(vip, "/", 100, Duration::from_secs(5), 8))?;
        ensure!(report.failures.is_empty(), "{:?}", report.failures);
        if let Some(done) = each_round(started.elapsed().as_secs(), &rollout(agent)?)? {
            return Ok(Some(done));
        }
    }
    Ok(None)
}

#[test]
#[ignore = "a live run of up to 270 s that passed at its bound once: too long and too \
            close for make test (cargo test -p canary-lab --features netns --test rollout -- --ignored)"]
fn a_healthy_canary_at_10_percent_of_100_rps_is_promoted_on_its_steps_data() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service("web", 80, HTTP_PORT, "policy = \"policy.toml\"");
    let agent = Agent::start_with_files(
        &topo.node,
        &services,
        &[("policy.toml", FAST_PIPELINE)],
        &[],
    )?;
    agent.cli(&["rollout", "start", "web"])?;
    // 3 × the 90 s schedule. Windows alone held this at 10 % for good: 20 s hold 200
    // canary requests, and a pass against the 1 % error floor needs 497.
    let mut holds = Vec::new();
    let promoted = under_load(&topo, &agent, 270, |at, r| {
        if let Some(h) = r["holding"].as_str() {
            holds.push(format!("{at} s at {}: {h}", r["weight_bp"]));
        }
        ensure!(
            r["state"] == "progressing" || r["state"] == "promoted",
            "{r}\n{}",
            holds.join("\n")
        );
        Ok((r["state"] == "promoted").then_some(at))
    })?;
    let Some(at) = promoted else {
        bail!("not promoted within 270 s:\n{}", holds.join("\n"));
    };
    println!("promoted after {at} s; last holds:");
    for h in holds.iter().rev().take(3) {
        println!("  {h}");
    }
    // The hold says what it waits for.
    ensure!(
        holds.iter().any(|h| h.contains("a pass needs ≈")),
        "{holds:?}"
    );
    Ok(())
}

#[test]
#[ignore = "a live run of up to 300 s, not yet seen passing: run it by hand \
            (cargo test -p canary-lab --features netns --test rollout -- --ignored)"]
fn a_shared_outage_pauses_alerts_and_resumes_instead_of_rolling_back() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service("web", 80, HTTP_PORT, "policy = \"policy.toml\"");
    let agent = Agent::start_with_files(
        &topo.node,
        &services,
        &[("policy.toml", FAST_PIPELINE)],
        &[],
    )?;
    agent.cli(&["rollout", "start", "web"])?;
    let faults = |rate: f64| -> Result<()> {
        for (ns, addr) in [(&topo.stable, STABLE_V4), (&topo.canary, CANARY_V4)] {
            ns.enter(|| {
                set_faults(
                    SocketAddr::new(addr.into(), ADMIN_PORT),
                    &Faults {
                        error_rate: rate,
                        ..Default::default()
                    },
                )
            })?;
        }
        Ok(())
    };
    let mut outage = (None, None);
    let mut holds = Vec::new();
    let promoted = under_load(&topo, &agent, 300, |at, r| {
        ensure!(
            r["state"] == "progressing" || r["state"] == "promoted",
            "{r}\n{}",
            holds.join("\n")
        );
        if let Some(h) = r["holding"].as_str() {
            holds.push(format!("{at} s at {}: {h}", r["weight_bp"]));
        }
        // Every backend at 25 % errors for 20 s, from 15 s into the rollout.
        if at >= 15 && outage.0.is_none() {
            faults(0.25)?;
            outage.0 = Some(at);
        } else if outage.0.is_some_and(|from| at >= from + 20) && outage.1.is_none() {
            faults(0.0)?;
            outage.1 = Some(at);
        }
        Ok((r["state"] == "promoted").then_some(at))
    })?;
    let history: Vec<Value> = serde_json::from_str(&agent.cli(&["history", "web", "--json"])?)?;
    let Some(at) = promoted else {
        bail!(
            "not promoted within 300 s:\n{}\n{history:?}",
            holds.join("\n")
        );
    };
    println!("outage {outage:?}, promoted after {at} s");
    ensure!(
        holds.iter().any(|h| h.contains("shared outage")),
        "{holds:?}"
    );
    let outage_event = history
        .iter()
        .find(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("shared outage: canary"))
        })
        .ok_or_else(|| anyhow::anyhow!("no outage in the history: {history:?}"))?;
    println!("{outage_event}");
    ensure!(
        !history.iter().any(|e| e["to"] == "rolled-back"),
        "{history:?}"
    );
    ensure!(
        agent.log().contains("shared-outage"),
        "no alert logged:\n{}",
        agent.log()
    );
    Ok(())
}
