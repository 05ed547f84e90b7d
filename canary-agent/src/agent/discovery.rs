//! The agent's side of backend names: the names the daemon's resolver must answer,
//! and what an answer changes (the services that name it are applied again, like a
//! reload of backends: new connections only, all or nothing). A failed lookup keeps
//! the last answer (fail static) and raises one alert until the name answers again.

use anyhow::Result;

use super::Agent;
use crate::config::{BackendName, Resolved};

impl Agent {
    /// Every backend name of the config in force.
    pub fn backend_names(&self) -> Vec<BackendName> {
        self.config.backend_names()
    }

    /// The answers the config was started with (the daemon resolves before starting).
    pub fn seed_resolved(&mut self, resolved: Resolved) {
        self.resolved = resolved;
    }

    /// A name's new answer (sorted addresses). Applied at once when it changed; an
    /// error leaves the last answer in force.
    pub fn set_resolved(
        &mut self,
        name: &BackendName,
        addrs: Vec<std::net::SocketAddr>,
    ) -> Result<Vec<String>> {
        if self.lookup_errors.remove(name).is_some() {
            tracing::info!(%name, "backend name answers again");
        }
        if self.resolved.get(name) == Some(&addrs) {
            return Ok(Vec::new());
        }
        if addrs.is_empty() {
            // An empty answer is treated like a failure: the last addresses stay.
            self.lookup_failed(name, "the name has no address records".into());
            return Ok(Vec::new());
        }
        let before = self.resolved.insert(name.clone(), addrs.clone());
        let config = self.config.with_resolved(&self.resolved);
        match self.reload_config(config) {
            Ok(changes) => {
                tracing::info!(%name, ?addrs, "backend name resolved to new addresses");
                Ok(changes)
            }
            Err(e) => {
                match before {
                    Some(b) => self.resolved.insert(name.clone(), b),
                    None => self.resolved.remove(name),
                };
                Err(e.context(format!("applying the new answer for {name}")))
            }
        }
    }

    /// A lookup of `name` failed: its last answer stays; alerted once per outage.
    pub fn lookup_failed(&mut self, name: &BackendName, reason: String) {
        let first = !self.lookup_errors.contains_key(name);
        self.lookup_errors.insert(name.clone(), reason.clone());
        if first {
            let kept = self
                .resolved
                .get(name)
                .map(|a| format!("{} address(es) kept", a.len()))
                .unwrap_or_else(|| "no earlier answer".into());
            tracing::warn!(%name, %reason, kept, "backend name lookup failed");
            let services: Vec<String> = self
                .services
                .iter()
                .filter(|s| s.cfg.names().any(|n| n == name))
                .map(|s| s.cfg.name.clone())
                .collect();
            for service in services {
                self.alert(
                    &service,
                    "lookup-failed",
                    &format!("{name}: {reason} ({kept})"),
                );
            }
        }
    }

    /// Where backend `addr` of `group` came from: the address itself as configured, or
    /// the name whose answer holds it (status, metrics and the dashboard show it).
    pub(super) fn backend_source(
        &self,
        cfg: &crate::config::ServiceConfig,
        group: usize,
        addr: std::net::SocketAddr,
    ) -> String {
        use crate::config::BackendSource;
        let sources = &cfg.sources[group];
        if sources.contains(&BackendSource::Addr(addr)) {
            return addr.to_string();
        }
        sources
            .iter()
            .find_map(|s| match s {
                BackendSource::Name(n)
                    if self.resolved.get(n).is_some_and(|a| a.contains(&addr)) =>
                {
                    Some(n.to_string())
                }
                _ => None,
            })
            .unwrap_or_else(|| addr.to_string())
    }

    /// Status lines of `service`'s names: the answer in force and the last error.
    pub(super) fn discovery_status(
        &self,
        cfg: &crate::config::ServiceConfig,
    ) -> Vec<crate::api::NameStatus> {
        cfg.names()
            .map(|n| crate::api::NameStatus {
                name: n.to_string(),
                addresses: self
                    .resolved
                    .get(n)
                    .map(|a| a.iter().map(|a| a.to_string()).collect())
                    .unwrap_or_default(),
                error: self.lookup_errors.get(n).cloned(),
            })
            .collect()
    }
}
