//! One rollout across a fleet: three nodes with their own clients and agents, shared
//! backends and a real etcd (started here), on the fleet lab of `canary_lab::fleet`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{set_faults, ADMIN_PORT, BANNER_PORT},
    banner_connections,
    fleet::{client_v4, fleet_service, probe_addr, Etcd, FleetLab, NODES},
    http_load, http_request,
    topology::CANARY_V4,
    BannerReport, Faults, HttpReport, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
/// Agents run their rollout clocks this much faster than real time.
const SCALE: &str = "10";
/// The fleet's lease: a dead leader is replaced within about this long.
const LEASE_S: u64 = 2;

/// Four steps, 20 s apart on the rollout clock (2 s real at `SCALE`).
const STEPS: &str = r#"step = [ { at = 0, weight = 10 }, { at = "20s", weight = 30 }, { at = "40s", weight = 60 }, { at = "60s", weight = 100 } ]
"#;

struct Fleet {
    lab: FleetLab,
    etcd: Etcd,
    agents: Vec<Agent>,
    _backends: canary_lab::Backends,
}

impl Fleet {
    fn start(policy: &str, args: &[&str]) -> Result<Fleet> {
        let lab = FleetLab::build()?;
        let backends = lab.start_backends(Path::new(BACKEND_BIN))?;
        let etcd = lab.start_etcd()?;
        let services = fleet_service("mode = \"hash\"\npolicy = \"policy.toml\"");
        let mut agents = Vec::new();
        for i in 0..NODES {
            agents.push(lab.start_agent(
                i,
                &services,
                &[("policy.toml", policy)],
                LEASE_S,
                args,
            )?);
        }
        let fleet = Fleet {
            lab,
            etcd,
            agents,
            _backends: backends,
        };
        fleet.wait_for_leader(None, Duration::from_secs(10))?;
        Ok(fleet)
    }

    /// The leader every running agent names, once they agree on one other than `not`.
    fn wait_for_leader(&self, not: Option<&str>, limit: Duration) -> Result<String> {
        let started = Instant::now();
        while started.elapsed() < limit {
            let mut names = Vec::new();
            for agent in self.agents.iter().filter(|a| a.running()) {
                names.push(
                    agent.status()?["fleet"]["leader"]
                        .as_str()
                        .map(String::from),
                );
            }
            if let Some(Some(first)) = names.first() {
                if names.iter().all(|n| n.as_deref() == Some(first)) && Some(first.as_str()) != not
                {
                    return Ok(first.clone());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(anyhow!("no leader agreed on within {limit:?}"))
    }

    fn index_of(name: &str) -> usize {
        name.trim_start_matches('n').parse::<usize>().unwrap() - 1
    }

    /// Each running node's applied weight and rollout state.
    fn observe(&self) -> Result<Vec<Option<(u64, String)>>> {
        Ok(self
            .observe_at(Instant::now())?
            .into_iter()
            .map(|o| o.map(|(w, s, _)| (w, s)))
            .collect())
    }

    /// [`Fleet::observe`], with when each node answered (since `base`).
    fn observe_at(&self, base: Instant) -> Result<Vec<Option<(u64, String, Duration)>>> {
        self.agents
            .iter()
            .map(|a| {
                if !a.running() {
                    return Ok(None);
                }
                let s = a.status()?;
                let at = base.elapsed();
                let svc = &s["services"][0];
                Ok(Some((
                    svc["weight_bp"].as_u64().unwrap_or(0),
                    svc["rollout"]["state"].as_str().unwrap_or("").to_string(),
                    at,
                )))
            })
            .collect()
    }

    /// HTTP load through every node at once, `rps` per node.
    fn load(&self, rps: u32, secs: u64) -> Result<Vec<HttpReport>> {
        let vip = SocketAddr::new(VIP_V4.into(), 80);
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .lab
                .clients
                .iter()
                .map(|c| {
                    scope.spawn(move || {
                        c.enter(|| http_load(vip, "/", rps, Duration::from_secs(secs), 8))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("load thread"))
                .collect()
        })
    }
}

/// What a poll of the whole fleet saw over time.
#[derive(Default)]
struct Timeline {
    /// For each weight, when each node first showed it.
    first_seen: BTreeMap<u64, BTreeMap<usize, Duration>>,
    decreases: Vec<String>,
    last: BTreeMap<usize, u64>,
}

impl Timeline {
    fn record(&mut self, seen: &[Option<(u64, String, Duration)>]) {
        for (node, obs) in seen.iter().enumerate() {
            let Some((weight, _, at)) = obs else { continue };
            let at = *at;
            if let Some(&before) = self.last.get(&node) {
                if *weight < before {
                    self.decreases
                        .push(format!("n{}: {before} -> {weight} at {at:?}", node + 1));
                }
            }
            self.last.insert(node, *weight);
            self.first_seen
                .entry(*weight)
                .or_default()
                .entry(node)
                .or_insert(at);
        }
    }

    /// The largest gap between nodes in taking up the same weight.
    fn worst_spread(&self) -> Duration {
        self.first_seen
            .values()
            .filter(|nodes| nodes.len() == NODES)
            .map(|nodes| {
                let min = nodes.values().min().copied().unwrap_or_default();
                let max = nodes.values().max().copied().unwrap_or_default();
                max - min
            })
            .max()
            .unwrap_or_default()
    }
}

/// Polls until every running node's rollout is `state` and its map holds `weight`,
/// recording the timeline.
fn poll_until(
    fleet: &Fleet,
    (state, weight): (&str, u64),
    limit: Duration,
    timeline: &mut Timeline,
    started: Instant,
) -> Result<()> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let seen = fleet.observe_at(started)?;
        timeline.record(&seen);
        if seen
            .iter()
            .flatten()
            .all(|(w, s, _)| s == state && *w == weight)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(anyhow!(
        "not all nodes {state} within {limit:?}: {:?}",
        fleet.observe()?
    ))
}

fn history(agent: &Agent) -> Result<Vec<serde_json::Value>> {
    Ok(serde_json::from_str(
        &agent.cli(&["history", "web", "--json"])?,
    )?)
}

fn transitions_to(history: &[serde_json::Value], to: &str) -> usize {
    history
        .iter()
        .filter(|e| e["to"] == to && e["from"] != to)
        .count()
}

#[test]
fn rollout_started_on_the_second_node_moves_all_three_and_promotes() -> Result<()> {
    let fleet = Fleet::start(STEPS, &["--time-scale", SCALE])?;
    let leader = fleet.wait_for_leader(None, Duration::from_secs(5))?;
    println!("leader: {leader}");
    let started = Instant::now();
    // n2 forwards the command to the leader when it is not the leader itself.
    fleet.agents[1].cli(&["rollout", "start", "web"])?;
    let mut timeline = Timeline::default();
    poll_until(
        &fleet,
        ("promoted", 10000),
        Duration::from_secs(30),
        &mut timeline,
        started,
    )?;
    println!("weights first seen per node: {:?}", timeline.first_seen);
    let spread = timeline.worst_spread();
    println!("worst spread between nodes taking up a weight: {spread:?}");
    ensure!(timeline.decreases.is_empty(), "{:?}", timeline.decreases);
    for weight in [1000, 3000, 6000, 10000] {
        ensure!(
            timeline
                .first_seen
                .get(&weight)
                .is_some_and(|n| n.len() == NODES),
            "weight {weight} not seen on every node: {:?}",
            timeline.first_seen
        );
    }
    ensure!(spread <= Duration::from_secs(1), "spread {spread:?}");
    // Each node reports what it applied (published at once after applying).
    let asked = Instant::now();
    loop {
        let status = fleet.agents[2].status()?;
        let nodes = status["fleet"]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let done = nodes.len() == NODES
            && nodes.iter().all(|n| {
                n["weights"]["web"] == 10000 && n["heartbeat_age_s"].as_f64().unwrap_or(99.0) < 3.0
            });
        if done {
            break;
        }
        ensure!(asked.elapsed() < Duration::from_secs(3), "{status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("{}", fleet.agents[2].cli(&["status", "--fleet"])?);
    // Recorded once, whichever node is asked.
    for agent in &fleet.agents {
        let h = history(agent)?;
        ensure!(transitions_to(&h, "progressing") == 1, "{h:?}");
        ensure!(transitions_to(&h, "promoted") == 1, "{h:?}");
    }
    // Hash mode splits the same way on every node: the fleet now sends all to canary.
    let reports = fleet.load(50, 2)?;
    for r in &reports {
        ensure!(r.failures.is_empty() && r.version("stable") == 0, "{r:?}");
    }
    Ok(())
}

const FAILING: &str = r#"step = [ { at = 0, weight = 50 }, { at = "10m", weight = 100 } ]
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
fn a_canary_failing_30_percent_is_rolled_back_on_all_three() -> Result<()> {
    let fleet = Fleet::start(FAILING, &[])?;
    let canary_admin = SocketAddr::new(CANARY_V4.into(), ADMIN_PORT);
    fleet.lab.canary.enter(|| {
        set_faults(
            canary_admin,
            &Faults {
                error_rate: 0.3,
                ..Default::default()
            },
        )
    })?;
    fleet.agents[2].cli(&["rollout", "start", "web"])?;
    let started = Instant::now();
    let (reports, result) = std::thread::scope(|scope| {
        let load = scope.spawn(|| fleet.load(60, 8));
        let mut timeline = Timeline::default();
        let result = poll_until(
            &fleet,
            ("rolled-back", 0),
            Duration::from_secs(8),
            &mut timeline,
            started,
        );
        (load.join().expect("load thread"), result)
    });
    result?;
    println!("rolled back on all nodes after {:?}", started.elapsed());
    for (i, obs) in fleet.observe()?.into_iter().enumerate() {
        ensure!(
            obs.as_ref().is_some_and(|(w, _)| *w == 0),
            "n{}: {obs:?}",
            i + 1
        );
    }
    let h = history(&fleet.agents[0])?;
    ensure!(transitions_to(&h, "rolled-back") == 1, "{h:?}");
    let rollback = h.iter().find(|e| e["to"] == "rolled-back").unwrap();
    println!("{rollback}");
    ensure!(
        rollback["actor"]
            .as_str()
            .unwrap_or("")
            .starts_with("rule:"),
        "{rollback}"
    );
    // Every node carried canary traffic: the decision came from all three.
    for r in reports? {
        ensure!(r.status(503) > 0, "a node saw no canary errors: {r:?}");
    }
    Ok(())
}

#[test]
fn leader_killed_mid_rollout_is_replaced_and_the_rollout_promotes() -> Result<()> {
    let mut fleet = Fleet::start(STEPS, &["--time-scale", SCALE])?;
    let leader = fleet.wait_for_leader(None, Duration::from_secs(5))?;
    fleet.agents[1].cli(&["rollout", "start", "web"])?;
    let started = Instant::now();
    let mut timeline = Timeline::default();
    // Mid-rollout: every node at 30 %.
    while started.elapsed() < Duration::from_secs(10) {
        let seen = fleet.observe_at(started)?;
        timeline.record(&seen);
        if seen.iter().flatten().all(|(w, _, _)| *w == 3000) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Fleet::index_of(&leader);
    fleet.agents[killed].signal_and_wait(libc::SIGKILL);
    let killed_at = Instant::now();
    let next = fleet.wait_for_leader(Some(&leader), Duration::from_secs(LEASE_S + 5))?;
    let failover = killed_at.elapsed();
    println!("{leader} killed; {next} leads after {failover:?}");
    ensure!(
        failover <= Duration::from_secs(LEASE_S) + Duration::from_millis(1500),
        "failover took {failover:?}"
    );
    poll_until(
        &fleet,
        ("promoted", 10000),
        Duration::from_secs(30),
        &mut timeline,
        started,
    )?;
    ensure!(timeline.decreases.is_empty(), "{:?}", timeline.decreases);
    // No step ran twice.
    let h = history(&fleet.agents[Fleet::index_of(&next)])?;
    let mut steps: Vec<u64> = h
        .iter()
        .filter(|e| e["to"] == "progressing" && e["actor"] == "schedule")
        .filter_map(|e| e["step"].as_u64())
        .collect();
    let n = steps.len();
    steps.dedup();
    ensure!(steps.len() == n, "a step was entered twice: {h:?}");
    // The killed agent rejoins and applies the fleet's weight.
    let node = fleet.lab.nodes[killed].name().to_string();
    let ns = fleet.lab.nodes.iter().find(|n| n.name() == node).unwrap();
    fleet.agents[killed].relaunch(ns, &["--time-scale", SCALE])?;
    let back = Instant::now();
    loop {
        let s = fleet.agents[killed].status()?;
        let nodes = s["fleet"]["nodes"].as_array().cloned().unwrap_or_default();
        if s["services"][0]["weight_bp"] == 10000 && nodes.len() == NODES {
            break;
        }
        ensure!(
            back.elapsed() < Duration::from_secs(10),
            "did not rejoin: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for probe in ["/healthz", "/readyz"] {
        let r = fleet.lab.clients[killed].enter(|| {
            http_request(
                probe_addr(killed),
                "GET",
                probe,
                None,
                Duration::from_secs(3),
            )
        })?;
        println!("{probe}: {} {}", r.status, r.body.trim());
        ensure!(r.status == 200, "{probe}: {r:?}");
    }
    Ok(())
}

#[test]
fn etcd_down_for_10_s_keeps_weights_pauses_and_resumes() -> Result<()> {
    let fleet = Fleet::start(STEPS, &["--time-scale", SCALE])?;
    let leader = fleet.wait_for_leader(None, Duration::from_secs(5))?;
    fleet.agents[0].cli(&["rollout", "start", "web"])?;
    let started = Instant::now();
    let mut timeline = Timeline::default();
    let (reports, outcome) = std::thread::scope(|scope| {
        let load = scope.spawn(|| fleet.load(40, 22));
        let outcome = (|| -> Result<(Vec<u64>, String)> {
            while started.elapsed() < Duration::from_secs(10) {
                let seen = fleet.observe_at(started)?;
                timeline.record(&seen);
                if seen.iter().flatten().all(|(w, _, _)| *w == 3000) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            fleet.etcd.kill();
            let down = Instant::now();
            let before: Vec<u64> = fleet.observe()?.iter().flatten().map(|(w, _)| *w).collect();
            let mut pause_reason = String::new();
            while down.elapsed() < Duration::from_secs(10) {
                let seen = fleet.observe()?;
                let now: Vec<u64> = seen.iter().flatten().map(|(w, _)| *w).collect();
                ensure!(
                    now == before,
                    "weights changed without etcd: {before:?} -> {now:?}"
                );
                let s = fleet.agents[Fleet::index_of(&leader)].status()?;
                let rollout = &s["services"][0]["rollout"];
                if rollout["state"] == "paused" {
                    pause_reason = rollout["reason"].as_str().unwrap_or("").to_string();
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            fleet.etcd.restart(&fleet.lab.fabric)?;
            Ok((before, pause_reason))
        })();
        (load.join().expect("load thread"), outcome)
    });
    let (before, pause_reason) = outcome?;
    println!("weights kept while etcd was down: {before:?}; leader paused: {pause_reason}");
    ensure!(
        pause_reason.contains("etcd"),
        "no pause naming etcd: {pause_reason:?}"
    );
    poll_until(
        &fleet,
        ("promoted", 10000),
        Duration::from_secs(30),
        &mut timeline,
        started,
    )?;
    ensure!(timeline.decreases.is_empty(), "{:?}", timeline.decreases);
    for r in reports? {
        ensure!(r.failures.is_empty(), "failed requests: {:?}", r.failures);
    }
    let h = history(&fleet.agents[2])?;
    ensure!(
        h.iter()
            .any(|e| e["to"] == "paused" && e["actor"] == "fleet"),
        "{h:?}"
    );
    Ok(())
}

#[test]
fn a_slow_or_flapping_etcd_never_changes_a_weight() -> Result<()> {
    let fleet = Fleet::start(STEPS, &[])?;
    fleet.agents[1].cli(&["set-weight", "web", "25"])?;
    let weights = |fleet: &Fleet| -> Result<Vec<u64>> {
        Ok(fleet.observe()?.iter().flatten().map(|(w, _)| *w).collect())
    };
    let settled = Instant::now();
    while weights(&fleet)? != vec![2500; NODES] {
        ensure!(
            settled.elapsed() < Duration::from_secs(5),
            "{:?}",
            weights(&fleet)?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let watch = |fleet: &Fleet, secs: u64| -> Result<()> {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            let now = weights(fleet)?;
            ensure!(now == vec![2500; NODES], "a weight changed: {now:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    // Slow: etcd accepts connections but answers nothing for longer than the lease.
    fleet.etcd.signal(libc::SIGSTOP);
    watch(&fleet, LEASE_S + 2)?;
    fleet.etcd.signal(libc::SIGCONT);
    watch(&fleet, 2)?;
    // Dropping connections: killed and restarted three times.
    for _ in 0..3 {
        fleet.etcd.kill();
        watch(&fleet, 1)?;
        fleet.etcd.restart(&fleet.lab.fabric)?;
        watch(&fleet, 1)?;
    }
    // The fleet works again: a new weight reaches every node.
    let leader = fleet.wait_for_leader(None, Duration::from_secs(LEASE_S + 5))?;
    println!("leader after the flaps: {leader}");
    fleet.agents[2].cli(&["set-weight", "web", "30"])?;
    let changed = Instant::now();
    while weights(&fleet)? != vec![3000; NODES] {
        ensure!(
            changed.elapsed() < Duration::from_secs(5),
            "{:?}",
            weights(&fleet)?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One weight, set on one node, splits the fleet's traffic as one node would: a second
/// service (TCP banners, no policy) at 20 % through `set-weight` on n3; 6,000 new
/// connections from each node's client; the fleet-wide canary share must be within
/// ±1 point of 20 % (standard error 0.3 points at 18,000 connections), and so must
/// each node's own share within ±2.5 points (0.52 points each).
#[test]
fn one_weight_splits_the_whole_fleet_within_one_point() -> Result<()> {
    // 30 000 connections in all: one point is 4.3 standard deviations of a 20 % share
    // (with 18 000 it was 3.4, and a CI run once landed at 21.09 %); per node, 2 points
    // are 5 of them.
    const PER_NODE: usize = 10_000;
    let lab = FleetLab::build()?;
    let _backends = lab.start_backends(Path::new(BACKEND_BIN))?;
    let _etcd = lab.start_etcd()?;
    let services = format!(
        "{}{}",
        fleet_service("mode = \"hash\""),
        lab_service("banner", 81, BANNER_PORT, "mode = \"hash\"")
    );
    let agents = (0..NODES)
        .map(|i| lab.start_agent(i, &services, &[], LEASE_S, &[]))
        .collect::<Result<Vec<_>>>()?;
    agents[2].cli(&["set-weight", "banner", "20"])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut applied = 0;
        for agent in &agents {
            let status = agent.status()?;
            let banner = status["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "banner"))
                .map(|s| s["weight_bp"].clone());
            if banner == Some(serde_json::json!(2000)) {
                applied += 1;
            }
        }
        if applied == NODES {
            break;
        }
        ensure!(Instant::now() < deadline, "20 % not applied on every node");
        std::thread::sleep(Duration::from_millis(50));
    }
    let target = SocketAddr::new(VIP_V4.into(), 81);
    let reports: Vec<BannerReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = lab
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                scope.spawn(move || {
                    c.enter(|| {
                        banner_connections(
                            target,
                            PER_NODE,
                            32,
                            &[client_v4(i).into()],
                            Duration::from_secs(5),
                        )
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    let (mut canary, mut total) = (0, 0);
    for (i, r) in reports.iter().enumerate() {
        ensure!(r.ok() == PER_NODE, "n{}: {r:?}", i + 1);
        let share = r.count("canary") as f64 / r.ok() as f64;
        println!("n{}: canary share {:.2} %", i + 1, share * 100.0);
        ensure!((share - 0.2).abs() <= 0.02, "n{}: share {share:.4}", i + 1);
        canary += r.count("canary");
        total += r.ok();
    }
    let share = canary as f64 / total as f64;
    println!("fleet: canary share {:.2} % of {total}", share * 100.0);
    ensure!((share - 0.2).abs() <= 0.01, "fleet-wide share {share:.4}");
    Ok(())
}
