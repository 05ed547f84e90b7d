//! The daemon: owns the datapath, reconciles the configured services with what the
//! pinned maps already hold, and answers control requests.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context, Result};
use canary_common::{ServiceKey, ServiceValue, MAX_GROUP_BACKENDS, MAX_SERVICES};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

use crate::{
    api::{BackendStatus, Request, Response, ServiceStatus, Status},
    config::{bp_to_percent, Config, ServiceConfig},
    datapath::{encode_service, service_key, Datapath},
};

/// A configured service as installed in the kernel.
pub struct LiveService {
    pub cfg: ServiceConfig,
    pub id: u32,
    pub key: ServiceKey,
    pub weight_bp: u16,
}

pub struct Agent {
    datapath: Datapath,
    services: Vec<LiveService>,
}

/// How the configured services map onto kernel state left by a previous agent.
#[derive(Debug, PartialEq)]
pub struct Reconcile {
    /// Per configured service: (id, weight in bp, whether the id's counters must be reset).
    pub placed: Vec<(u32, u16, bool)>,
    /// Installed services that are no longer configured.
    pub stale: Vec<ServiceKey>,
}

/// Keeps the id and live weight of every service the maps already hold (an agent
/// restart must not move weights or orphan pinned flows); new services get free ids
/// and their configured weight.
pub fn reconcile(
    configured: &[ServiceConfig],
    installed: &[(ServiceKey, ServiceValue)],
) -> Reconcile {
    let keys: Vec<ServiceKey> = configured.iter().map(service_key).collect();
    let stale: Vec<ServiceKey> = installed
        .iter()
        .filter(|(k, _)| !keys.contains(k))
        .map(|(k, _)| *k)
        .collect();
    let kept: Vec<u32> = installed
        .iter()
        .filter(|(k, _)| keys.contains(k))
        .map(|(_, v)| v.id)
        .collect();
    let mut free = (0..MAX_SERVICES).filter(|id| !kept.contains(id));
    let placed = configured
        .iter()
        .zip(&keys)
        .map(
            |(svc, key)| match installed.iter().find(|(k, _)| k == key) {
                Some((_, v)) => (v.id, v.weight_bp, false),
                None => (
                    free.next().expect("config holds at most MAX_SERVICES"),
                    svc.weight_bp,
                    true,
                ),
            },
        )
        .collect();
    Reconcile { placed, stale }
}

impl Agent {
    /// Loads the datapath, installs the configured services and attaches to the
    /// configured interfaces.
    pub fn start(config: &Config) -> Result<Self> {
        let mut datapath = Datapath::load(&config.agent.bpffs_dir)?;
        let installed = datapath.installed()?;
        let plan = reconcile(&config.services, &installed);
        let mut services = Vec::new();
        for (svc, (id, weight_bp, fresh)) in config.services.iter().zip(plan.placed) {
            if fresh {
                datapath.clear_stats(id)?;
            }
            let key = service_key(svc);
            datapath.install(&key, &encode_service(svc, id, weight_bp))?;
            tracing::info!(service = %svc.name, id, weight_bp, restored = !fresh, "service installed");
            services.push(LiveService {
                cfg: svc.clone(),
                id,
                key,
                weight_bp,
            });
        }
        for key in plan.stale {
            datapath.uninstall(&key)?;
            tracing::info!(?key, "removed service no longer in the config");
        }
        for iface in &config.agent.interfaces {
            datapath.attach(iface)?;
            tracing::info!(%iface, "datapath attached");
        }
        Ok(Self { datapath, services })
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut LiveService> {
        self.services
            .iter_mut()
            .find(|s| s.cfg.name == name)
            .ok_or_else(|| anyhow!("no service named {name:?}"))
    }

    /// Changes a service's canary weight with one map write.
    pub fn set_weight(&mut self, name: &str, weight_bp: u16) -> Result<()> {
        if weight_bp > canary_common::WEIGHT_SCALE {
            bail!("weight {weight_bp} bp is above 100 %");
        }
        let svc = self.service_mut(name)?;
        if weight_bp > 0 && svc.cfg.canary.is_empty() {
            bail!("service {name:?} has no canary backends");
        }
        let (key, value) = (svc.key, encode_service(&svc.cfg, svc.id, weight_bp));
        self.datapath.install(&key, &value)?;
        let svc = self.service_mut(name)?;
        tracing::info!(
            service = name,
            from = svc.weight_bp,
            to = weight_bp,
            "weight changed"
        );
        svc.weight_bp = weight_bp;
        Ok(())
    }

    pub fn status(&self, name: Option<&str>) -> Result<Status> {
        if let Some(n) = name {
            if !self.services.iter().any(|s| s.cfg.name == n) {
                bail!("no service named {n:?}");
            }
        }
        let mut services = Vec::new();
        for svc in self
            .services
            .iter()
            .filter(|s| name.is_none_or(|n| s.cfg.name == n))
        {
            let stats = self.datapath.stats(svc.id)?;
            let groups = [
                ("stable", 0, &svc.cfg.stable),
                ("canary", MAX_GROUP_BACKENDS, &svc.cfg.canary),
            ];
            let backends = groups
                .into_iter()
                .flat_map(|(group, base, list)| {
                    list.iter()
                        .enumerate()
                        .map(move |(i, addr)| (group, addr, base + i))
                })
                .map(|(group, addr, slot)| {
                    let s = &stats[slot];
                    BackendStatus {
                        group: group.into(),
                        address: addr.to_string(),
                        connections: s.connections,
                        packets_in: s.packets_in,
                        packets_out: s.packets_out,
                        bytes_in: s.bytes_in,
                        bytes_out: s.bytes_out,
                        flow_misses: s.flow_misses,
                    }
                })
                .collect();
            services.push(ServiceStatus {
                name: svc.cfg.name.clone(),
                listen: svc.cfg.listen.to_string(),
                protocol: serde_json::to_value(svc.cfg.protocol)?
                    .as_str()
                    .unwrap_or("")
                    .into(),
                weight: bp_to_percent(svc.weight_bp),
                weight_bp: svc.weight_bp,
                mode: svc.cfg.mode.to_string(),
                sticky: serde_json::to_value(svc.cfg.sticky)?
                    .as_str()
                    .unwrap_or("")
                    .into(),
                backends,
            });
        }
        Ok(Status { services })
    }

    pub fn handle(&mut self, request: Request) -> Result<serde_json::Value> {
        match request {
            Request::Status { service } => {
                Ok(serde_json::to_value(self.status(service.as_deref())?)?)
            }
            Request::SetWeight { service, weight_bp } => {
                self.set_weight(&service, weight_bp)?;
                Ok(serde_json::to_value(self.status(Some(&service))?)?)
            }
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT, then detaches and removes the socket.
pub async fn run(config: Config) -> Result<()> {
    let agent = Arc::new(Mutex::new(Agent::start(&config)?));
    let socket = config.agent.control_socket.clone();
    let listener = bind_control_socket(&socket)?;
    tracing::info!(socket = %socket.display(), "control API listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_client(stream, agent).await {
                        tracing::warn!(error = %e, "control client failed");
                    }
                });
            }
        }
    }
    tracing::info!("stopping: detaching the datapath (maps and flows stay pinned)");
    drop(agent);
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another agent is already serving {}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn serve_client(stream: UnixStream, agent: Arc<Mutex<Agent>>) -> Result<()> {
    // The socket mode already limits access to root; the credential check also covers
    // a socket directory with looser permissions.
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = if uid != 0 {
        Response::Error(format!("permission denied: uid {uid} is not root"))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error(format!("bad request: {e}")),
            Ok(req) => {
                let result = agent
                    .lock()
                    .map_err(|_| anyhow!("agent state poisoned"))?
                    .handle(req);
                match result {
                    Ok(v) => Response::Ok(v),
                    Err(e) => Response::Error(format!("{e:#}")),
                }
            }
        }
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn services(n: usize) -> Vec<ServiceConfig> {
        let mut text = String::from("[agent]\ninterface = \"x\"\n");
        for i in 0..n {
            text += &format!(
                "[[service]]\nname = \"s{i}\"\nlisten = \"198.19.0.{i}:80\"\nstable = [\"198.18.2.2:80\"]\ncanary = [\"198.18.3.2:80\"]\nweight = 10\n"
            );
        }
        Config::parse(&text, Path::new("t.toml")).unwrap().services
    }

    #[test]
    fn fresh_services_get_config_weights_and_ids() {
        let cfg = services(3);
        let r = reconcile(&cfg, &[]);
        assert_eq!(
            r.placed,
            vec![(0, 1000, true), (1, 1000, true), (2, 1000, true)]
        );
        assert!(r.stale.is_empty());
    }

    #[test]
    fn restart_keeps_ids_and_live_weights_and_drops_stale() {
        let cfg = services(3);
        let installed = vec![
            (service_key(&cfg[1]), encode_service(&cfg[1], 0, 5000)),
            (
                service_key(&services(5)[4]),
                encode_service(&services(5)[4], 1, 100),
            ),
        ];
        let r = reconcile(&cfg, &installed);
        // s1 keeps id 0 and its live 50 %; the others take ids not kept (1 was stale).
        assert_eq!(
            r.placed,
            vec![(1, 1000, true), (0, 5000, false), (2, 1000, true)]
        );
        assert_eq!(r.stale, vec![service_key(&services(5)[4])]);
    }
}
