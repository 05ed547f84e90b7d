//! Control API: one JSON request line, one JSON response line, over a Unix socket that
//! only root may use. Shared by the agent (server) and the CLI (client).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status {
        service: Option<String>,
    },
    SetWeight {
        service: String,
        weight_bp: u16,
        by: String,
        /// Why, for the history (added to the override's event while a rollout runs).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    Rollout {
        service: String,
        action: RolloutAction,
        by: String,
    },
    History {
        service: String,
    },
    /// Re-read the config file and apply it (as SIGHUP does).
    Reload,
    /// Detach the datapath, remove its pins and the agent's state, and exit.
    Uninstall,
}

/// Who sends requests from the dashboard: history records its actions as `operator:ui`.
pub const UI_ACTOR: &str = "ui";

/// Operator commands on a service's rollout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum RolloutAction {
    Start,
    Pause {
        reason: String,
    },
    Resume {
        reason: String,
    },
    Approve {
        /// Why, for the history (added to the approval's event).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    Promote {
        full: bool,
        /// Why, for the history (added to the promotion's events).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    Rollback {
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    /// Only with a `[fleet]` section: the fleet's leader and every node's weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
}

/// `canary status` in a fleet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetStatus {
    /// The node that answered, and whether it holds the controller.
    pub node: String,
    pub leading: bool,
    pub leader: Option<String>,
    pub nodes: Vec<FleetNode>,
    /// Why the fleet's view could not be read (etcd unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Keys read from etcd that this node refused (bad or out of bounds), with why.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rejected: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetNode {
    pub name: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// Weight applied to each service's map on that node, in basis points.
    pub weights: std::collections::BTreeMap<String, u16>,
    pub heartbeat_age_s: f64,
    /// Highest desired-weight revision the node applied, and how long after the
    /// leader's decision it reached the node's map.
    pub weights_revision: i64,
    pub apply_lag_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: String,
    pub protocol: String,
    /// Canary share in percent.
    pub weight: f64,
    pub weight_bp: u16,
    pub mode: String,
    pub sticky: String,
    pub backends: Vec<BackendStatus>,
    /// Present when the service has a rollout policy.
    pub rollout: Option<crate::controller::RolloutStatus>,
    /// Canary connections are being closed at request boundaries (after a rollback).
    #[serde(default)]
    pub draining: bool,
    /// `http` services: `{"header", "flag", "cohort": {NAME: n}, "split"}` decisions,
    /// bytes copied by the agent vs carried in the kernel, bad heads, splice map sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<serde_json::Value>,
    /// TCP segments to the service that were neither a SYN nor of a connection the
    /// node holds (spoofed or stray): passed untouched, no flow created.
    #[serde(default)]
    pub stray_segments: u64,
    /// While verifying at 100 %: what stands in for stable in the analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// Backend names (DNS) and what they answer now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<NameStatus>,
    /// What the backends' health checks are, when the service has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    /// Latest verdict per analysis metric (empty without metrics in the policy).
    /// (`metric`, `verdict`, `canary`, `stable`, `confidence`, `reason`); values that
    /// are not numbers yet are null.
    pub analysis: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub group: String,
    pub address: String,
    /// Where the address came from: itself as configured, or the backend name
    /// (`host:port` or SRV) whose answer holds it.
    pub source: String,
    pub connections: u64,
    /// TCP handshakes the backend answered, and connections it refused with a reset.
    pub handshakes: u64,
    pub refused: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub flow_misses: u64,
    /// With `[service.health]`: "up" or "down", why, and since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<BackendHealthStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NameStatus {
    pub name: String,
    pub addresses: Vec<String>,
    /// The last lookup's failure, while it fails (the addresses are the last answer).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendHealthStatus {
    /// "up" or "down": in the selection or not, by its checks and passive detection.
    pub state: String,
    pub reason: String,
    /// Controller clock (ms) of the last change; 0: never changed.
    pub since_ms: u64,
    pub checks: u64,
    pub failures: u64,
    /// Passive detection: ejected until then (controller clock, ms); none: not ejected.
    #[serde(default)]
    pub ejected_until_ms: Option<u64>,
    #[serde(default)]
    pub ejections: u64,
}

/// Sends one request to the agent and returns the `ok` payload.
pub fn call(socket: &Path, request: &Request) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is `canary agent` running, and are you root?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    if reply.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    match serde_json::from_str(&reply).context("decoding the agent's reply")? {
        Response::Ok(v) => Ok(v),
        Response::Error(e) => bail!("{e}"),
    }
}
