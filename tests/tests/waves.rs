//! Region by region: three nodes in two regions (n1 in `a`; n2, n3 in `b`) and waves
//! `(a) (b)`, on the fleet lab with a real etcd.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Result};
use canary_lab::{
    agent::Agent,
    backend::{set_faults, ADMIN_PORT},
    fleet::{fleet_service, Etcd, FleetLab, NODES},
    http_load_until,
    topology::CANARY_V4,
    Faults, HttpReport, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const LEASE_S: u64 = 2;
const REGIONS: [&str; NODES] = ["a", "b", "b"];
const WAVES: &str = "[[wave]]\nregions = [\"a\"]\n[[wave]]\nregions = [\"b\"]\n";

struct Fleet {
    lab: FleetLab,
    _etcd: Etcd,
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
        for (i, region) in REGIONS.iter().enumerate() {
            let files = [("policy.toml", policy)];
            agents.push(lab.start_agent_in(i, Some(region), &services, &files, LEASE_S, args)?);
        }
        let fleet = Fleet {
            lab,
            _etcd: etcd,
            agents,
            _backends: backends,
        };
        // Every node has reported (with its region) before the rollout starts.
        fleet.until(
            "three nodes in the fleet view",
            Duration::from_secs(15),
            |f| {
                let status = f.agents[0].status()?;
                let nodes = status["fleet"]["nodes"].as_array().map_or(0, Vec::len);
                Ok((status["fleet"]["leader"].is_string() && nodes == NODES).then_some(()))
            },
        )?;
        Ok(fleet)
    }

    /// Each node's (applied weight, rollout state).
    fn observe(&self) -> Result<Vec<(u64, String)>> {
        self.agents
            .iter()
            .map(|a| {
                let s = a.status()?;
                let svc = &s["services"][0];
                Ok((
                    svc["weight_bp"].as_u64().unwrap_or(0),
                    svc["rollout"]["state"].as_str().unwrap_or("").to_string(),
                ))
            })
            .collect()
    }

    /// Polls `check` every 50 ms until it gives a value, at most `limit`.
    fn until<T>(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&Fleet) -> Result<Option<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(v) = check(self)? {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let rollout = &self.agents[0].status()?["services"][0]["rollout"];
        Err(anyhow!(
            "{what}: not within {limit:?}: {:?}; holding: {}",
            self.observe()?,
            rollout["holding"]
        ))
    }

    fn wave_index(&self) -> Result<Option<u64>> {
        Ok(self.agents[0].status()?["services"][0]["rollout"]["wave"]["index"].as_u64())
    }

    /// HTTP load through every node at once, `rps` per node over `conns` keep-alive
    /// connections (enough that hashing them splits near the weight), for `secs`
    /// or until `stop` is set.
    fn load(
        &self,
        rps: u32,
        secs: u64,
        conns: usize,
        stop: &Arc<AtomicBool>,
    ) -> Result<Vec<HttpReport>> {
        let vip = SocketAddr::new(VIP_V4.into(), 80);
        let limit = Duration::from_secs(secs);
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .lab
                .clients
                .iter()
                .map(|c| {
                    scope.spawn(move || {
                        c.enter(|| http_load_until(vip, "/", rps, limit, conns, stop))
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

fn history(agent: &Agent) -> Result<Vec<serde_json::Value>> {
    Ok(serde_json::from_str(
        &agent.cli(&["history", "web", "--json"])?,
    )?)
}

#[test]
fn waves_move_region_a_first_then_b_behind_its_gate_and_the_fleet_finishes() -> Result<()> {
    // At 10x: 2 s at 20 %, then 100 % verified for 2 s, per wave.
    let policy = format!(
        "step = [ {{ at = 0, weight = 20 }}, {{ at = \"20s\", weight = 100 }} ]\n\
         [verify]\nduration = \"20s\"\n{WAVES}gate = {{ approval = true }}\n"
    );
    let fleet = Fleet::start(&policy, &["--time-scale", "10"])?;
    fleet.agents[1].cli(&["rollout", "start", "web"])?;
    // Wave 1: n1 takes 20 % then 100 %; n2 and n3 stay at 0 % all along, until the
    // second wave's gate waits.
    let mut n1_weights = Vec::new();
    fleet.until("wave 2's gate", Duration::from_secs(20), |f| {
        let seen = f.observe()?;
        ensure!(
            seen[1].0 == 0 && seen[2].0 == 0,
            "region b moved in wave 1: {seen:?}"
        );
        if n1_weights.last() != Some(&seen[0].0) {
            n1_weights.push(seen[0].0);
        }
        Ok((seen[0].1 == "awaiting-approval" && f.wave_index()? == Some(1)).then_some(()))
    })?;
    println!("n1 during wave 1: {n1_weights:?}");
    ensure!(
        n1_weights.contains(&2_000) && n1_weights.last() == Some(&10_000),
        "{n1_weights:?}"
    );
    // The gate holds: nothing moves in region b until someone approves.
    std::thread::sleep(Duration::from_secs(2));
    let seen = fleet.observe()?;
    ensure!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>() == [10_000, 0, 0],
        "{seen:?}"
    );
    let status = fleet.agents[2].status()?;
    let rollout = &status["services"][0]["rollout"];
    ensure!(
        rollout["wave"]["of"] == 2 && rollout["wave"]["regions"][0] == "b",
        "{rollout}"
    );
    ensure!(rollout["waiting_gate"]["stage"] == "wave 2", "{rollout}");
    let regions: Vec<_> = status["fleet"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or("").to_string(),
                n["region"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    ensure!(
        regions
            == [
                ("n1".into(), "a".into()),
                ("n2".into(), "b".into()),
                ("n3".into(), "b".into())
            ],
        "{regions:?}"
    );
    println!("{}", fleet.agents[2].cli(&["status", "--fleet"])?);
    fleet.agents[2].cli(&["approve", "web", "--reason", "wave 1 looks good"])?;
    // Wave 2: n2 and n3 follow the schedule from its first step, through the same
    // weights (each node applies a step a few ms apart, so they are compared as
    // sequences, not sample by sample).
    let mut b_weights = [Vec::new(), Vec::new()];
    fleet.until("the whole fleet finished", Duration::from_secs(30), |f| {
        let seen = f.observe()?;
        for (weights, (weight, _)) in b_weights.iter_mut().zip(&seen[1..]) {
            if weights.last() != Some(weight) {
                weights.push(*weight);
            }
        }
        Ok(seen
            .iter()
            .all(|(_, state)| state == "finished")
            .then_some(()))
    })?;
    println!("n2, n3 during wave 2: {b_weights:?}");
    // Up to 100 %: the release to weight 0 may reach one node before the other.
    let up_to_full = |w: &Vec<u64>| {
        w.iter()
            .position(|&bp| bp == 10_000)
            .map(|i| w[..=i].to_vec())
    };
    ensure!(
        up_to_full(&b_weights[0]) == up_to_full(&b_weights[1])
            && b_weights[0].contains(&2_000)
            && b_weights[0].contains(&10_000),
        "{b_weights:?}"
    );
    // Every node handed the stable role to the new version: weight 0, one group.
    let canary = CANARY_V4.to_string();
    fleet.until("every node released", Duration::from_secs(10), |f| {
        for agent in &f.agents {
            let status = agent.status()?;
            let svc = &status["services"][0];
            let backends = svc["backends"].as_array().cloned().unwrap_or_default();
            let only_new = !backends.is_empty()
                && backends.iter().all(|b| {
                    b["group"] == "stable"
                        && b["address"].as_str().unwrap_or("").starts_with(&canary)
                });
            if svc["weight_bp"] != 0 || !only_new {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    let h = history(&fleet.agents[0])?;
    let reasons: Vec<&str> = h.iter().filter_map(|e| e["reason"].as_str()).collect();
    ensure!(
        reasons
            .iter()
            .any(|r| r.contains("wave 2/2 (b) waits for approval")),
        "{reasons:?}"
    );
    ensure!(
        reasons.iter().any(|r| r.contains("approved by")),
        "{reasons:?}"
    );
    Ok(())
}

#[test]
fn a_canary_failing_in_wave_2_returns_every_node_to_0_in_one_decision() -> Result<()> {
    let policy = format!(
        "step = [ {{ at = 0, weight = 50 }}, {{ at = \"4s\", weight = 100 }} ]\n\
         [verify]\nduration = \"4s\"\n\
         [[metric]]\nname = \"error-rate\"\nthreshold = 1.05\nwindow = \"30s\"\n\
         [[rule]]\nname = \"error-spike\"\nwhen = \"error-rate > baseline * 1.5\"\n\
         action = \"immediate-rollback\"\n{WAVES}"
    );
    let fleet = Fleet::start(&policy, &[])?;
    fleet.agents[0].cli(&["rollout", "start", "web"])?;
    let canary_admin = SocketAddr::new(CANARY_V4.into(), ADMIN_PORT);
    // Evidence accrues at the canary's request rate, which hashing 32 pinned
    // keep-alive connections makes uneven: the load runs until the test is done
    // (at most 120 s), not for a fixed time.
    let stop = Arc::new(AtomicBool::new(false));
    let result = std::thread::scope(|scope| -> Result<Duration> {
        let load = scope.spawn(|| fleet.load(100, 120, 32, &stop));
        let mut wave_2_load = None;
        let result = (|| {
            fleet.until("wave 2 started", Duration::from_secs(90), |f| {
                let seen = f.observe()?;
                ensure!(
                    seen[0].1 != "rolled-back",
                    "rolled back in wave 1: {seen:?}"
                );
                Ok((f.wave_index()? == Some(1) && seen[1].0 > 0).then_some(()))
            })?;
            // The load's keep-alive connections in region b were all placed on stable
            // while it stood at 0 %: new clients reach the canary there now.
            wave_2_load = Some(scope.spawn(|| fleet.load(100, 60, 32, &stop)));
            ensure!(fleet.observe()?[0].0 == 10_000, "{:?}", fleet.observe()?);
            fleet.lab.canary.enter(|| {
                set_faults(
                    canary_admin,
                    &Faults {
                        error_rate: 1.0,
                        ..Default::default()
                    },
                )
            })?;
            let faulted = Instant::now();
            fleet.until("every node back at 0 %", Duration::from_secs(15), |f| {
                let seen = f.observe()?;
                Ok(seen
                    .iter()
                    .all(|(w, s)| *w == 0 && s == "rolled-back")
                    .then_some(()))
            })?;
            Ok(faulted.elapsed())
        })();
        stop.store(true, Ordering::Relaxed);
        let _ = load.join().expect("load thread");
        if let Some(more) = wave_2_load {
            let _ = more.join().expect("load thread");
        }
        result
    });
    println!("every node at 0 % {:?} after the fault", result?);
    let h = history(&fleet.agents[1])?;
    let rollbacks: Vec<_> = h
        .iter()
        .filter(|e| e["to"] == "rolled-back" && e["from"] != "rolled-back")
        .collect();
    ensure!(rollbacks.len() == 1, "{h:?}");
    ensure!(
        rollbacks[0]["actor"]
            .as_str()
            .unwrap_or("")
            .starts_with("rule:"),
        "{}",
        rollbacks[0]
    );
    Ok(())
}
