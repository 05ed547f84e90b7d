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
    backend::ECHO_PORT,
    topology::{CLIENT_V4, NODE_CLIENT_V4},
    webhook::approving_webhook,
    LongLived, Topology, VIP_V4,
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
