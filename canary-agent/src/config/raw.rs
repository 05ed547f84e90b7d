//! The config file's shapes as serde reads them, before validation.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) agent: Option<RawAgent>,
    pub(super) fleet: Option<RawFleet>,
    #[serde(default)]
    pub(super) service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) interface: Option<OneOrMany>,
    pub(super) ingress_hook: Option<String>,
    pub(super) forward: Option<String>,
    pub(super) control_socket: Option<PathBuf>,
    pub(super) bpffs_dir: Option<PathBuf>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) metrics_listen: Option<String>,
    pub(super) alert_webhook: Option<String>,
    pub(super) prometheus_url: Option<String>,
    pub(super) ui_listen: Option<String>,
    pub(super) ui_token_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) ui_hosts: Vec<String>,
    pub(super) node_name: Option<String>,
    pub(super) region: Option<String>,
    pub(super) zone: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    #[serde(default)]
    pub(super) dns: Vec<String>,
    pub(super) dns_min_ttl: Option<String>,
    pub(super) dns_max_ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) etcd: Vec<String>,
    pub(super) prefix: Option<String>,
    pub(super) lease: Option<u64>,
    pub(super) ca: Option<PathBuf>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: String,
    pub(super) listen: String,
    pub(super) protocol: Option<String>,
    pub(super) stable: Vec<String>,
    #[serde(default)]
    pub(super) canary: Vec<String>,
    #[serde(default)]
    pub(super) weight: f64,
    pub(super) mode: Option<String>,
    pub(super) sticky: Option<String>,
    pub(super) policy: Option<PathBuf>,
    pub(super) head_limit: Option<usize>,
    pub(super) head_timeout: Option<u64>,
    pub(super) backend_protocol: Option<String>,
    pub(super) max_connections: Option<u32>,
    pub(super) max_client_connections: Option<u32>,
    pub(super) forward: Option<String>,
    pub(super) health: Option<RawHealth>,
    pub(super) outlier: Option<RawOutlier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) check: Option<String>,
    pub(super) path: Option<String>,
    pub(super) status: Option<u16>,
    pub(super) port: Option<u16>,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) rise: Option<u32>,
    pub(super) fall: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutlier {
    pub(super) consecutive_failures: Option<u32>,
    pub(super) window: Option<String>,
    pub(super) min_connections: Option<u32>,
    pub(super) failure_ratio: Option<f64>,
    pub(super) ejection: Option<String>,
    pub(super) max_ejection: Option<String>,
}
