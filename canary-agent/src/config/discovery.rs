//! Backends named in DNS: a `host:port` entry (A/AAAA records) or an SRV name
//! (`_service._proto.domain`, which gives addresses and ports). The config holds the
//! names; the daemon's resolver answers them, and [`Config::with_resolved`] puts
//! each name's latest answer in its place, so a changed answer is applied like a
//! reload of backends.

use std::{collections::BTreeMap, fmt, net::SocketAddr};

use canary_common::MAX_GROUP_BACKENDS;

use super::{Config, ServiceConfig};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendName {
    /// A/AAAA records of `host`, each on `port`.
    Host { host: String, port: u16 },
    /// SRV records of the name: each target's addresses on its port.
    Srv(String),
}

impl fmt::Display for BackendName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host { host, port } => write!(f, "{host}:{port}"),
            Self::Srv(name) => f.write_str(name),
        }
    }
}

/// One configured backend entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSource {
    Addr(SocketAddr),
    Name(BackendName),
}

/// Each name's latest answer (sorted, so a rotating answer keeps its slots).
pub type Resolved = BTreeMap<BackendName, Vec<SocketAddr>>;

fn dns_name(text: &str) -> bool {
    let name = text.strip_suffix('.').unwrap_or(text);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A backend entry that is not `addr:port`: an SRV name or `host:port`.
pub(super) fn parse_name(text: &str) -> Result<BackendName, String> {
    if text.starts_with('_') {
        let srv = text.contains("._tcp.") || text.contains("._udp.");
        if !srv || !dns_name(text) {
            return Err(format!(
                "{text:?}: an SRV name looks like _service._tcp.domain (no port)"
            ));
        }
        return Ok(BackendName::Srv(text.to_string()));
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not addr:port, host:port or an SRV name"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{text:?}: port must be 1 to 65535"))?;
    if !dns_name(host) || host.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{text:?}: {host:?} is not a host name"));
    }
    // No top-level domain is all digits (RFC 3696): this is a mistyped address.
    if host
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "{text:?}: {host:?} is neither an IP address nor a host name"
        ));
    }
    Ok(BackendName::Host {
        host: host.to_string(),
        port,
    })
}

impl ServiceConfig {
    /// The names among the service's backends.
    pub fn names(&self) -> impl Iterator<Item = &BackendName> {
        self.sources.iter().flatten().filter_map(|s| match s {
            BackendSource::Name(n) => Some(n),
            BackendSource::Addr(_) => None,
        })
    }

    /// `stable` and `canary` from the sources, each name replaced by its answer in
    /// `resolved` (addresses of the service's family only; none yet: nothing). At
    /// most [`MAX_GROUP_BACKENDS`] per group; the rest are left out.
    fn expand(&mut self, resolved: &Resolved) {
        let v6 = self.listen.is_ipv6();
        for (group, sources) in self.sources.iter().enumerate() {
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for source in sources {
                let answer = match source {
                    BackendSource::Addr(a) => vec![*a],
                    BackendSource::Name(n) => resolved.get(n).cloned().unwrap_or_default(),
                };
                for a in answer.into_iter().filter(|a| a.is_ipv6() == v6) {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
            if addrs.len() > MAX_GROUP_BACKENDS {
                tracing::warn!(service = %self.name, group, found = addrs.len(), "more backends than a group holds: the first {MAX_GROUP_BACKENDS} are used");
                addrs.truncate(MAX_GROUP_BACKENDS);
            }
            match group {
                0 => self.stable = addrs,
                _ => self.canary = addrs,
            }
        }
    }
}

impl Config {
    /// Every backend name of every service.
    pub fn backend_names(&self) -> Vec<BackendName> {
        let mut names: Vec<BackendName> = self
            .services
            .iter()
            .flat_map(|s| s.names().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The config with each backend name's answer from `resolved` in its place.
    pub fn with_resolved(&self, resolved: &Resolved) -> Config {
        let mut config = self.clone();
        for svc in &mut config.services {
            svc.expand(resolved);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const TEXT: &str = "[agent]\ninterface = \"cli0\"\n[[service]]\nname = \"web\"\n\
        listen = \"198.19.0.10:80\"\n\
        stable = [\"web-stable.lab:8080\", \"198.18.2.3:8080\"]\n\
        canary = [\"_http._tcp.web-canary.lab\"]\nweight = 10\n";

    #[test]
    fn names_and_addresses_mix_and_answers_take_the_names_place() {
        let config = Config::parse(TEXT, Path::new("a.toml")).unwrap();
        let stable = BackendName::Host {
            host: "web-stable.lab".into(),
            port: 8080,
        };
        let canary = BackendName::Srv("_http._tcp.web-canary.lab".into());
        assert_eq!(config.backend_names(), vec![stable.clone(), canary.clone()]);
        // Unresolved names give no address yet.
        let svc = &config.services[0];
        assert_eq!(svc.stable, vec!["198.18.2.3:8080".parse().unwrap()]);
        assert!(svc.canary.is_empty());
        let mut resolved = Resolved::new();
        resolved.insert(
            stable,
            vec![
                "198.18.2.2:8080".parse().unwrap(),
                "198.18.2.3:8080".parse().unwrap(),
                "[2001:db8:2::2]:8080".parse().unwrap(),
            ],
        );
        resolved.insert(canary, vec!["198.18.3.2:9090".parse().unwrap()]);
        let svc = &config.with_resolved(&resolved).services[0];
        let addrs =
            |v: &[&str]| -> Vec<SocketAddr> { v.iter().map(|a| a.parse().unwrap()).collect() };
        // In order, once each, of the service's family.
        assert_eq!(svc.stable, addrs(&["198.18.2.2:8080", "198.18.2.3:8080"]));
        assert_eq!(svc.canary, addrs(&["198.18.3.2:9090"]));
        let released = svc.released();
        assert_eq!(released.sources[0], svc.sources[1]);
    }

    #[test]
    fn bad_names_are_refused() {
        for (entry, reason) in [
            ("web stable:80", "not a host name"),
            ("web.lab:0", "port must be 1 to 65535"),
            ("web.lab", "not addr:port, host:port or an SRV name"),
            ("_http.web.lab", "SRV name looks like"),
            ("1198.18.3.2:8080", "neither an IP address nor a host name"),
        ] {
            let text = TEXT.replace("web-stable.lab:8080", entry);
            let e = Config::parse(&text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("stable[0]") && e.contains(reason),
                "{entry}: {e}"
            );
        }
    }
}
