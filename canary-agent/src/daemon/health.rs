//! The health prober: checks every backend the agent names (`Agent::health_targets`,
//! re-read each round, so a reload or a release is followed) on its service's
//! interval, one check in flight per backend, and hands each result to the agent.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};

use crate::{
    agent::{lock, Agent, HealthTarget},
    config::CheckKind,
};

/// How often the list of targets is read and due checks started.
const ROUND: Duration = Duration::from_millis(50);

pub async fn run(agent: Arc<Mutex<Agent>>) {
    let mut next_due: HashMap<(String, SocketAddr), Instant> = HashMap::new();
    let mut in_flight: HashSet<(String, SocketAddr)> = HashSet::new();
    let (done, mut results) = mpsc::unbounded_channel();
    let mut round = tokio::time::interval(ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = round.tick() => {
                let Ok(targets) = lock(&agent).map(|a| a.health_targets()) else { continue };
                let now = Instant::now();
                next_due.retain(|key, _| targets.iter().any(|t| t.service == key.0 && t.backend == key.1));
                for target in targets {
                    let key = (target.service.clone(), target.backend);
                    let due = next_due.entry(key.clone()).or_insert(now);
                    if in_flight.contains(&key) || *due > now {
                        continue;
                    }
                    *due = now + target.check.interval;
                    in_flight.insert(key);
                    let done = done.clone();
                    tokio::spawn(async move {
                        let outcome = check(&target).await;
                        let _ = done.send((target, outcome));
                    });
                }
            }
            Some((target, outcome)) = results.recv() => {
                in_flight.remove(&(target.service.clone(), target.backend));
                let recorded = lock(&agent)
                    .and_then(|mut a| a.record_health(&target.service, target.backend, outcome));
                if let Err(e) = recorded {
                    tracing::error!(service = %target.service, backend = %target.backend, error = %format!("{e:#}"), "recording a health check");
                }
            }
        }
    }
}

/// One check of one backend, bounded by the check's timeout.
async fn check(target: &HealthTarget) -> Result<(), String> {
    let timeout = target.check.timeout;
    let attempt = async {
        match &target.check.kind {
            CheckKind::Tcp => tokio::net::TcpStream::connect(target.target)
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect to {}: {e}", target.target)),
            CheckKind::Http { path, status } => {
                match crate::webhook::get_status(target.target, path).await {
                    Ok(got) if got == *status => Ok(()),
                    Ok(got) => Err(format!(
                        "GET {path} on {} answered {got}, expected {status}",
                        target.target
                    )),
                    Err(e) => Err(format!("GET {path} on {}: {e:#}", target.target)),
                }
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("{}: no answer within {timeout:?}", target.target)))
}
