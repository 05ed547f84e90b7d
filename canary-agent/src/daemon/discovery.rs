//! The resolver of backend names (hickory-resolver, on `[agent] dns` or the system's
//! servers): every name the agent's config holds is looked up again when its
//! records' TTL runs out (clamped to `dns_min_ttl`..`dns_max_ttl`), and each answer
//! is handed to the agent (`Agent::set_resolved`, `Agent::lookup_failed`).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, Result};
use hickory_resolver::{
    config::{NameServerConfigGroup, ResolverConfig},
    name_server::TokioConnectionProvider,
    TokioResolver,
};
use tokio::{sync::mpsc, time::Instant};

use crate::{
    agent::{lock, Agent},
    config::{AgentConfig, BackendName, Config, Resolved},
};

/// How long one lookup (an SRV name's targets included) may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

pub fn resolver(agent: &AgentConfig) -> Result<TokioResolver> {
    let mut builder = if agent.dns.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| anyhow!("reading the system's DNS configuration: {e}"))?
    } else {
        let mut servers = NameServerConfigGroup::new();
        for addr in &agent.dns {
            let one = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            servers.merge(one);
        }
        let config = ResolverConfig::from_parts(None, Vec::new(), servers);
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    let options = builder.options_mut();
    options.positive_max_ttl = Some(agent.dns_max_ttl);
    options.timeout = Duration::from_secs(1);
    options.attempts = 2;
    Ok(builder.build())
}

/// The addresses `name` answers (sorted) and until when they hold.
pub async fn lookup(
    resolver: &TokioResolver,
    name: &BackendName,
) -> Result<(Vec<SocketAddr>, Instant)> {
    let attempt = async {
        let mut addrs = Vec::new();
        let valid_until = match name {
            BackendName::Host { host, port } => {
                let answer = resolver.lookup_ip(host.as_str()).await?;
                addrs.extend(answer.iter().map(|ip| SocketAddr::new(ip, *port)));
                answer.valid_until()
            }
            BackendName::Srv(srv) => {
                let answer = resolver.srv_lookup(srv.as_str()).await?;
                let mut until = answer.as_lookup().valid_until();
                for record in answer.iter() {
                    let ips = resolver.lookup_ip(record.target().clone()).await?;
                    until = until.min(ips.valid_until());
                    addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, record.port())));
                }
                until
            }
        };
        addrs.sort();
        addrs.dedup();
        Ok::<_, hickory_resolver::ResolveError>((addrs, Instant::from_std(valid_until)))
    };
    tokio::time::timeout(LOOKUP_TIMEOUT, attempt)
        .await
        .map_err(|_| anyhow!("no answer within {LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| anyhow!("{e}"))
}

/// Answers for every name of `config`, before the agent starts (a name that fails
/// is left out: the agent starts without its addresses and keeps asking).
pub async fn resolve_all(resolver: &TokioResolver, config: &Config) -> Resolved {
    let mut resolved = Resolved::new();
    for name in config.backend_names() {
        match lookup(resolver, &name).await {
            Ok((addrs, _)) if !addrs.is_empty() => {
                resolved.insert(name, addrs);
            }
            Ok(_) => tracing::warn!(%name, "backend name has no address records yet"),
            Err(e) => {
                tracing::warn!(%name, error = %format!("{e:#}"), "backend name lookup failed")
            }
        }
    }
    resolved
}

pub async fn run(agent: Arc<Mutex<Agent>>, resolver: TokioResolver, min: Duration, max: Duration) {
    let resolver = Arc::new(resolver);
    let mut next_due: HashMap<BackendName, Instant> = HashMap::new();
    let mut in_flight: HashSet<BackendName> = HashSet::new();
    let (done, mut results) = mpsc::unbounded_channel();
    let mut round = tokio::time::interval(Duration::from_millis(100));
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = round.tick() => {
                let Ok(names) = lock(&agent).map(|a| a.backend_names()) else { continue };
                let now = Instant::now();
                next_due.retain(|n, _| names.contains(n));
                for name in names {
                    let due = next_due.entry(name.clone()).or_insert(now);
                    if in_flight.contains(&name) || *due > now {
                        continue;
                    }
                    in_flight.insert(name.clone());
                    let (done, resolver) = (done.clone(), resolver.clone());
                    tokio::spawn(async move {
                        let answer = lookup(&resolver, &name).await;
                        let _ = done.send((name, answer));
                    });
                }
            }
            Some((name, answer)) = results.recv() => {
                in_flight.remove(&name);
                let now = Instant::now();
                let Ok(mut a) = lock(&agent) else { continue };
                let wait = match answer {
                    Ok((addrs, until)) => {
                        if let Err(e) = a.set_resolved(&name, addrs) {
                            tracing::error!(%name, error = %format!("{e:#}"), "applying a backend name's answer");
                        }
                        until.saturating_duration_since(now).clamp(min, max)
                    }
                    Err(e) => {
                        a.lookup_failed(&name, format!("{e:#}"));
                        min.max(Duration::from_secs(1)).min(max)
                    }
                };
                next_due.insert(name, now + wait);
            }
        }
    }
}
