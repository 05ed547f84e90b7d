//! Control requests in a fleet: status gains the fleet's view, history comes from
//! etcd, and rollout commands given on a follower go to the leader through etcd.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use etcd_client::{Client, GetOptions};
use serde_json::Value;

use super::{
    etcd::{op, Keys},
    lock, wall_ms, FleetView, Link, NodeReport, SharedHost,
};
use crate::{
    api::{FleetNode, FleetStatus, Request},
    controller::Event,
};

/// How long `canary status` waits for etcd before it answers with the fleet as last
/// read: status must answer at once while etcd is away (that is when it is needed).
const STATUS_WAIT: Duration = Duration::from_millis(300);

/// How long a follower waits for the leader to carry out a forwarded command.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers one control request: directly without a fleet, else as described above.
pub async fn dispatch(agent: &SharedHost, request: Request) -> Result<Value> {
    let link = lock(agent)?.fleet_link();
    let Some(link) = link else {
        return lock(agent)?.handle(request);
    };
    match request {
        Request::Status { .. } => {
            let mut value = lock(agent)?.handle(request)?;
            let fleet = fleet_status(&link).await;
            value["fleet"] = serde_json::to_value(fleet)?;
            Ok(value)
        }
        Request::History { service } => {
            lock(agent)?.handle(Request::History {
                service: service.clone(),
            })?;
            let (client, keys) = connected(&link)?;
            Ok(serde_json::to_value(
                history(client, &keys, &service).await?,
            )?)
        }
        Request::SetWeight { .. } | Request::Rollout { .. } if !link.leading() => {
            forward(&link, &request).await
        }
        other => lock(agent)?.handle(other),
    }
}

fn connected(link: &Link) -> Result<(Client, Keys)> {
    link.client()
        .ok_or_else(|| anyhow!("etcd unreachable: not connected yet"))
}

/// The fleet's leader and every node's applied weights and heartbeat.
async fn fleet_status(link: &Link) -> FleetStatus {
    let mut status = FleetStatus {
        node: link.node().to_string(),
        leading: link.leading(),
        leader: None,
        nodes: Vec::new(),
        error: None,
        rejected: link.rejected(),
    };
    let read = async {
        let (mut client, keys) = connected(link)?;
        let leader = op("reading the leader", client.get(keys.leader(), None)).await?;
        let leader = match leader.kvs().first() {
            Some(kv) => Some(kv.value_str()?.to_string()),
            None => None,
        };
        let prefix = keys.nodes();
        let got = op(
            "reading nodes",
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let now = wall_ms();
        let mut nodes = Vec::new();
        for kv in got.kvs() {
            // A bad entry is left out (the leader reports it), not the whole view.
            let Ok(name) = super::trust::key_name(kv.key(), &prefix) else {
                continue;
            };
            let Ok(report) = serde_json::from_slice::<NodeReport>(kv.value()) else {
                continue;
            };
            nodes.push(FleetNode {
                name: name.to_string(),
                region: report.region,
                zone: report.zone,
                heartbeat_age_s: now.saturating_sub(report.at_ms) as f64 / 1000.0,
                weights: report.weights,
                weights_revision: report.weights_revision,
                apply_lag_ms: report.apply_lag_ms,
            });
        }
        anyhow::Ok((leader, nodes))
    };
    let read = match tokio::time::timeout(STATUS_WAIT, read).await {
        Ok(read) => read,
        Err(_) => Err(anyhow!(
            "etcd unreachable: no answer in {} ms",
            STATUS_WAIT.as_millis()
        )),
    };
    match read {
        Ok((leader, nodes)) => {
            link.set_view(FleetView {
                read_at: Instant::now(),
                leader: leader.clone(),
                nodes: nodes.clone(),
            });
            status.leader = leader;
            status.nodes = nodes;
        }
        Err(e) => {
            let mut error = format!("{e:#}");
            if let Some(view) = link.view() {
                error += &format!(
                    "; leader and nodes as read {:.1} s ago",
                    view.read_at.elapsed().as_secs_f64()
                );
                status.leader = view.leader;
                status.nodes = view.nodes;
            }
            status.error = Some(error);
        }
    }
    status
}

/// The rollout history of a service as the leaders recorded it, oldest first.
async fn history(mut client: Client, keys: &Keys, service: &str) -> Result<Vec<Event>> {
    let got = op(
        "reading history",
        client.get(keys.history(service), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    // An event that does not parse is left out, not the whole history.
    Ok(got
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect())
}

/// Puts the command under `PREFIX/commands/` and waits for the leader's answer.
async fn forward(link: &Link, request: &Request) -> Result<Value> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let (mut client, keys) = connected(link)?;
    let id = format!(
        "{}-{}-{}",
        link.node(),
        wall_ms(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let command = format!("{}{id}", keys.commands());
    op(
        "forwarding the command",
        client.put(command.as_str(), serde_json::to_vec(request)?, None),
    )
    .await?;
    let started = Instant::now();
    while started.elapsed() < FORWARD_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Ok(got) = op("waiting for the leader", client.get(keys.result(&id), None)).await else {
            continue;
        };
        let Some(kv) = got.kvs().first() else {
            continue;
        };
        let answer: Value = serde_json::from_slice(kv.value())?;
        let _ = op("cleaning up", client.delete(keys.result(&id), None)).await;
        if let Some(e) = answer.get("error").and_then(Value::as_str) {
            bail!("{e} (on the fleet's leader)");
        }
        return Ok(answer.get("ok").cloned().unwrap_or(Value::Null));
    }
    let _ = op("withdrawing the command", client.delete(command, None)).await;
    bail!(
        "the fleet's leader did not answer within {} s (is etcd reachable, is a leader elected?); \
         the command was withdrawn",
        FORWARD_TIMEOUT.as_secs()
    )
}
