//! Agent configuration (TOML), in three parts: the schema here (what a valid config
//! is, as the rest of the agent reads it), `raw` (the file's serde shapes), `parse`
//! (strict validation: unknown keys, bad values and conflicts are errors naming the
//! file, the field and the reason, and nothing is applied unless the whole file is
//! valid) and `host` (what is read from the host: its name, the dashboard token).

mod discovery;
mod health;
mod host;
mod parse;
mod raw;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use discovery::{BackendName, BackendSource, Resolved};
pub use health::{CheckKind, HealthCheck, OutlierDetection};
pub use host::{host_name, load_ui_token, MIN_UI_TOKEN};

pub const DEFAULT_SOCKET: &str = "/run/canary/agent.sock";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/canary";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/canary";

#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// HTTP/1.x over TCP, routed per request head by `crate::router`.
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Hash,
    Exact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sticky {
    Connection,
    ClientIp,
}

/// Where the client -> service program runs. XDP (native) is the cheapest hook on a
/// physical NIC; on a veth it makes the driver copy every packet into a new page and
/// takes GSO away from the peer, while TC ingress works on the skb as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IngressHook {
    /// XDP on interfaces backed by a device, TC on virtual ones (veth, bridges, lo).
    Auto,
    Xdp,
    Tc,
}

/// Where a client packet goes once its destination is a backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Forward {
    /// The stack's IP forwarding: routing, netfilter (FORWARD, POSTROUTING, conntrack).
    Stack,
    /// Straight to the next hop's interface from TC ingress, after a FIB lookup: no
    /// netfilter, no conntrack for the client's packets (the replies still go through
    /// the stack). Needs `ingress_hook = "tc"`.
    Redirect,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub interfaces: Vec<String>,
    pub ingress_hook: IngressHook,
    /// Default of every service's `forward`.
    pub forward: Forward,
    pub control_socket: PathBuf,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Where to serve Prometheus `/metrics`; none when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Where rollback and pause alerts are POSTed as JSON (http:// only).
    pub alert_webhook: Option<String>,
    /// Prometheus server that answers the policies' PromQL (business) metrics.
    pub prometheus_url: Option<String>,
    /// Where to serve the dashboard (`ui::serve`); none (off) when unset.
    pub ui_listen: Option<SocketAddr>,
    /// Root-only file holding the bearer token the dashboard's controls need; without
    /// it the dashboard is read-only. Resolved relative to the config file.
    pub ui_token_file: Option<PathBuf>,
    /// Host names the dashboard answers to besides IP addresses and `localhost`
    /// (a `Host` of any other name is refused: DNS rebinding).
    pub ui_hosts: Vec<String>,
    /// This node's name in a fleet (status, leader election); default: the host name.
    pub node_name: String,
    /// This node's region and zone (`[agent] region`, `zone`): a policy's waves roll
    /// out region by region; a node without a region joins the last wave.
    pub region: Option<String>,
    pub zone: Option<String>,
    /// How long SIGTERM waits for routed requests in flight before the agent exits.
    pub shutdown_grace: Duration,
    /// DNS servers for backend names (`[agent] dns`); empty: the system's.
    pub dns: Vec<SocketAddr>,
    /// Bounds on how soon a name is resolved again (its records' TTL, clamped).
    pub dns_min_ttl: Duration,
    pub dns_max_ttl: Duration,
}

/// Default of `[agent] shutdown_grace`: well inside the 30 s most supervisors (systemd,
/// Kubernetes) leave between SIGTERM and SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// `[fleet]`: agents on many nodes share one rollout per service through etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// etcd endpoints, `http://` or `https://` (then with `ca`, optionally `cert` + `key`).
    pub etcd: Vec<String>,
    /// Key prefix (starts with '/', no trailing '/'), so fleets can share an etcd.
    pub prefix: String,
    /// TTL of the leader's and each node's lease: how long a dead leader holds the
    /// controller, and after how long a silent node counts as gone.
    pub lease_s: u64,
    /// PEM files for TLS to etcd, resolved relative to the config file.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

pub const DEFAULT_FLEET_PREFIX: &str = "/canary";
pub const DEFAULT_LEASE_S: u64 = 5;

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// The addresses in force: `sources` with each name's latest answer in its place
    /// (`Config::with_resolved`), in slot order.
    pub stable: Vec<SocketAddr>,
    pub canary: Vec<SocketAddr>,
    /// Stable (`[0]`) and canary (`[1]`) backends as configured: addresses and names.
    pub sources: [Vec<BackendSource>; 2],
    /// Canary share when the service is first installed, in basis points.
    pub weight_bp: u16,
    pub mode: Mode,
    pub sticky: Sticky,
    /// Rollout policy file, resolved relative to the config file.
    pub policy: Option<PathBuf>,
    /// `http` services: limits of a request head the proxy reads.
    pub head_limit: usize,
    pub head_timeout_s: u64,
    /// `http` services: what the proxy speaks to the backends.
    pub backend_protocol: BackendProtocol,
    /// `http` services: open client connections, in all and from one client address.
    pub max_connections: u32,
    pub max_client_connections: u32,
    /// Its own `forward`, else the agent's.
    pub forward: Forward,
    /// `[service.health]`: none, every backend is taken to be up.
    pub health: Option<HealthCheck>,
    /// `[service.outlier]`: none, no passive detection.
    pub outlier: Option<OutlierDetection>,
}

impl ServiceConfig {
    /// The service once its release finished: the canary backends hold the stable role
    /// and the canary group is empty, so nothing new reaches the old version.
    pub fn released(&self) -> ServiceConfig {
        ServiceConfig {
            stable: self.canary.clone(),
            canary: Vec::new(),
            sources: [self.sources[1].clone(), Vec::new()],
            ..self.clone()
        }
    }
}

/// Defaults of `head_limit` (bytes) and `head_timeout` (seconds).
pub const DEFAULT_HEAD_LIMIT: usize = 16 * 1024;
pub const DEFAULT_HEAD_TIMEOUT_S: u64 = 10;
/// Defaults of `max_connections` and `max_client_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 20_000;
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: u32 = 1_000;

/// The protocol an `http` service's proxy speaks to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendProtocol {
    /// The client's: HTTP/1.1 for HTTP/1.x clients, h2c for h2c clients.
    #[default]
    Auto,
    Http1,
    H2c,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub agent: AgentConfig,
    pub services: Vec<ServiceConfig>,
    /// None: one node on its own, no etcd (as before fleets existed).
    pub fleet: Option<FleetConfig>,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Hash => "hash",
            Mode::Exact => "exact",
        })
    }
}
