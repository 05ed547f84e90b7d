//! Strict validation of the config file into [`Config`].

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use canary_common::{MAX_GROUP_BACKENDS, MAX_SERVICES};

use super::raw::{OneOrMany, RawConfig, RawFleet};
use super::*;

/// A region or zone: a name as a node's (waves and status show it).
fn checked_label(label: Option<String>, field: &str) -> Result<Option<String>, (String, String)> {
    match label {
        Some(l) if !valid_node_name(&l) => Err((
            field.to_string(),
            format!("{l:?}: 1 to 63 letters, digits, '-', '_' or '.'"),
        )),
        other => Ok(other),
    }
}

fn valid_node_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_fleet(
    raw: RawFleet,
    base: &Path,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<FleetConfig, ConfigError> {
    if raw.etcd.is_empty() {
        return Err(err(
            "fleet.etcd".into(),
            "name at least one etcd endpoint".into(),
        ));
    }
    let tls = raw.ca.is_some();
    for (i, url) in raw.etcd.iter().enumerate() {
        let host_port = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        if !host_port.is_some_and(|r| r.contains(':') && !r.contains('/')) {
            return Err(err(
                format!("fleet.etcd[{i}]"),
                format!("{url:?}: an endpoint is http://host:port or https://host:port"),
            ));
        }
        if url.starts_with("https://") != tls {
            return Err(err(
                format!("fleet.etcd[{i}]"),
                format!(
                    "{url:?}: {}",
                    if tls {
                        "with `ca` set, endpoints are https://"
                    } else {
                        "an https:// endpoint needs `ca` (the CA certificate file)"
                    }
                ),
            ));
        }
    }
    let prefix = raw.prefix.unwrap_or_else(|| DEFAULT_FLEET_PREFIX.into());
    if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
        return Err(err(
            "fleet.prefix".into(),
            format!("{prefix:?}: a key prefix starts with '/' and does not end with one"),
        ));
    }
    let lease_s = raw.lease.unwrap_or(DEFAULT_LEASE_S);
    if !(2..=60).contains(&lease_s) {
        return Err(err(
            "fleet.lease".into(),
            format!("{lease_s}: the lease is 2 to 60 seconds"),
        ));
    }
    if raw.cert.is_some() != raw.key.is_some() {
        return Err(err(
            if raw.cert.is_some() {
                "fleet.key"
            } else {
                "fleet.cert"
            }
            .into(),
            "a client certificate takes both `cert` and `key`".into(),
        ));
    }
    if raw.cert.is_some() && !tls {
        return Err(err(
            "fleet.cert".into(),
            "a client certificate is for TLS: set `ca` and https:// endpoints".into(),
        ));
    }
    let file = |f: Option<PathBuf>| f.map(|p| base.join(p));
    Ok(FleetConfig {
        etcd: raw.etcd,
        prefix,
        lease_s,
        ca: file(raw.ca),
        cert: file(raw.cert),
        key: file(raw.key),
    })
}

/// `forward` as written (`None`: `default`); redirecting is done at TC ingress only.
fn parse_forward(
    text: Option<&str>,
    default: Forward,
    hook: IngressHook,
) -> Result<Forward, String> {
    let forward = match text {
        None => default,
        Some("stack") => Forward::Stack,
        Some("redirect") => Forward::Redirect,
        Some(other) => return Err(format!("{other:?}: use \"stack\" or \"redirect\"")),
    };
    if forward == Forward::Redirect && hook != IngressHook::Tc {
        return Err(
            "\"redirect\" is done by the TC ingress program: it needs agent.ingress_hook = \"tc\""
                .into(),
        );
    }
    Ok(forward)
}

/// What the kernel accepts as a network device name (`dev_valid_name`): 1 to 15
/// bytes, not "." or "..", no '/', ':', NUL or byte the kernel's `isspace` matches
/// (which includes 0xA0, a byte of many UTF-8 characters).
fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| matches!(b, b'/' | b':' | 0 | b'\t'..=b'\r' | b' ' | 0xA0))
}

/// A TOML syntax or type error, located by line (and column), with a reason even
/// where the TOML parser gives none (a stray control character, an unexpected end).
fn syntax_error(
    text: &str,
    e: &toml::de::Error,
    err: &impl Fn(String, String) -> ConfigError,
) -> ConfigError {
    let Some(span) = e.span() else {
        return err("(document)".into(), e.message().trim().replace('\n', ": "));
    };
    // Byte-wise, so a span that does not fall on a character boundary cannot panic.
    let start = span.start.min(text.len());
    let before = &text.as_bytes()[..start];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    let message = e.message().trim().replace('\n', ": ");
    let reason = if !message.is_empty() {
        message
    } else {
        match text.get(start..).and_then(|rest| rest.chars().next()) {
            Some(c) if c.is_control() => format!("control character {c:?} is not allowed here"),
            Some(c) => format!("unexpected {c:?}"),
            None if start >= text.len() => "unexpected end of file".into(),
            None => "invalid TOML".into(),
        }
    };
    err(format!("line {line}"), format!("column {column}: {reason}"))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            field: "(file)".into(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let err = |field: String, reason: String| ConfigError {
            file: file.clone(),
            field,
            reason,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(text, &e, &err))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let agent_forward = raw.agent.as_ref().and_then(|a| a.forward.clone());
        let mut agent = match raw.agent {
            Some(a) => AgentConfig {
                forward: Forward::Stack,
                prometheus_url: match a.prometheus_url {
                    Some(url) if !url.starts_with("http://") => {
                        return Err(err(
                            "agent.prometheus_url".into(),
                            format!("{url:?}: only http:// URLs are supported"),
                        ))
                    }
                    other => other,
                },
                alert_webhook: match a.alert_webhook {
                    Some(url) if !url.starts_with("http://") => {
                        return Err(err(
                            "agent.alert_webhook".into(),
                            format!("{url:?}: only http:// URLs are supported"),
                        ))
                    }
                    other => other,
                },
                metrics_listen: match &a.metrics_listen {
                    Some(l) => Some(l.parse().map_err(|_| {
                        err(
                            "agent.metrics_listen".into(),
                            format!("{l:?} is not addr:port"),
                        )
                    })?),
                    None => None,
                },
                ui_listen: match &a.ui_listen {
                    Some(l) => {
                        let addr: SocketAddr = l.parse().map_err(|_| {
                            err("agent.ui_listen".into(), format!("{l:?} is not addr:port"))
                        })?;
                        if addr.port() == 0 {
                            return Err(err(
                                "agent.ui_listen".into(),
                                "port 0: name the port the dashboard listens on".into(),
                            ));
                        }
                        Some(addr)
                    }
                    None => None,
                },
                ui_token_file: match a.ui_token_file {
                    Some(p) if a.ui_listen.is_none() => {
                        return Err(err(
                            "agent.ui_token_file".into(),
                            format!(
                                "{}: the token is for the dashboard's controls: set ui_listen too",
                                p.display()
                            ),
                        ))
                    }
                    Some(p) if p.as_os_str().is_empty() => {
                        return Err(err("agent.ui_token_file".into(), "empty path".into()))
                    }
                    Some(p) => Some(base.join(p)),
                    None => None,
                },
                ui_hosts: {
                    for h in &a.ui_hosts {
                        let name = h.strip_suffix('.').unwrap_or(h);
                        let ok = !name.is_empty()
                            && name.len() <= 253
                            && name.split('.').all(|l| {
                                !l.is_empty()
                                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                            });
                        if !ok {
                            return Err(err(
                                "agent.ui_hosts".into(),
                                format!("{h:?} is not a host name (no port, no scheme)"),
                            ));
                        }
                    }
                    a.ui_hosts
                        .iter()
                        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                        .collect()
                },
                ingress_hook: match a.ingress_hook.as_deref() {
                    None | Some("auto") => IngressHook::Auto,
                    Some("xdp") => IngressHook::Xdp,
                    Some("tc") => IngressHook::Tc,
                    Some(other) => {
                        return Err(err(
                            "agent.ingress_hook".into(),
                            format!("{other:?}: use \"auto\", \"xdp\" or \"tc\""),
                        ))
                    }
                },
                interfaces: match a.interface {
                    Some(OneOrMany::One(i)) => vec![i],
                    Some(OneOrMany::Many(v)) => v,
                    None => vec![],
                },
                control_socket: a.control_socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
                bpffs_dir: a.bpffs_dir.unwrap_or_else(|| DEFAULT_BPFFS_DIR.into()),
                state_dir: a.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
                node_name: match a.node_name {
                    Some(n) if !valid_node_name(&n) => {
                        return Err(err(
                            "agent.node_name".into(),
                            format!("{n:?}: 1 to 63 letters, digits, '-', '_' or '.'"),
                        ))
                    }
                    Some(n) => n,
                    None => host_name(),
                },
                region: checked_label(a.region, "agent.region").map_err(|(f, r)| err(f, r))?,
                zone: checked_label(a.zone, "agent.zone").map_err(|(f, r)| err(f, r))?,
                dns: a
                    .dns
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        d.parse::<SocketAddr>()
                            .or_else(|_| {
                                d.parse::<std::net::IpAddr>()
                                    .map(|ip| SocketAddr::new(ip, 53))
                            })
                            .map_err(|_| {
                                err(
                                    format!("agent.dns[{i}]"),
                                    format!("{d:?} is not addr or addr:port"),
                                )
                            })
                    })
                    .collect::<Result<_, _>>()?,
                dns_min_ttl: super::health::ttl_bound(
                    a.dns_min_ttl.as_deref(),
                    "agent.dns_min_ttl",
                    super::health::DEFAULT_MIN_TTL,
                )
                .map_err(|(f, r)| err(f, r))?,
                dns_max_ttl: super::health::ttl_bound(
                    a.dns_max_ttl.as_deref(),
                    "agent.dns_max_ttl",
                    super::health::DEFAULT_MAX_TTL,
                )
                .map_err(|(f, r)| err(f, r))?,
                shutdown_grace: match a.shutdown_grace.as_deref() {
                    None => DEFAULT_SHUTDOWN_GRACE,
                    Some(text) => match crate::policy::parse_duration(text) {
                        Ok(s) if (1..=3600).contains(&s) => Duration::from_secs(s),
                        Ok(s) => {
                            return Err(err(
                                "agent.shutdown_grace".into(),
                                format!("{s} s: use 1 s to 1 h"),
                            ))
                        }
                        Err(e) => return Err(err("agent.shutdown_grace".into(), e)),
                    },
                },
            },
            None => return Err(err("agent".into(), "missing [agent] table".into())),
        };
        if agent.dns_min_ttl > agent.dns_max_ttl {
            return Err(err(
                "agent.dns_min_ttl".into(),
                format!(
                    "{:?} is above dns_max_ttl {:?}",
                    agent.dns_min_ttl, agent.dns_max_ttl
                ),
            ));
        }
        agent.forward = parse_forward(agent_forward.as_deref(), Forward::Stack, agent.ingress_hook)
            .map_err(|r| err("agent.forward".into(), r))?;
        if agent.interfaces.is_empty() {
            return Err(err(
                "agent.interface".into(),
                "name at least one interface".into(),
            ));
        }
        for (i, name) in agent.interfaces.iter().enumerate() {
            if !valid_interface_name(name) {
                return Err(err(
                    format!("agent.interface[{i}]"),
                    format!("{name:?} is not a valid interface name"),
                ));
            }
        }
        if raw.service.len() > MAX_SERVICES as usize {
            return Err(err(
                "service".into(),
                format!(
                    "{} services, at most {MAX_SERVICES} are supported",
                    raw.service.len()
                ),
            ));
        }
        let fleet = match raw.fleet {
            Some(f) => Some(parse_fleet(f, base, &err)?),
            None => None,
        };
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        let mut services = Vec::new();
        for (i, s) in raw.service.into_iter().enumerate() {
            let at = |f: &str| format!("service[{i}] ({}).{f}", s.name);
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(
                    format!("service[{i}].name"),
                    format!("{:?}: use letters, digits, '-' and '_'", s.name),
                ));
            }
            if !names.insert(s.name.clone()) {
                return Err(err(at("name"), "duplicate service name".into()));
            }
            let listen: SocketAddr = s
                .listen
                .parse()
                .map_err(|_| err(at("listen"), format!("{:?} is not addr:port", s.listen)))?;
            if listen.port() == 0 {
                return Err(err(at("listen"), "port 0 is not a service port".into()));
            }
            let protocol = match s.protocol.as_deref().unwrap_or("tcp") {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "http" => Protocol::Http,
                other => {
                    return Err(err(
                        at("protocol"),
                        format!("{other:?}: expected tcp, udp or http"),
                    ))
                }
            };
            if !listens.insert((listen, protocol)) {
                return Err(err(
                    at("listen"),
                    format!("{listen}/{protocol:?} is already used by another service"),
                ));
            }
            let backends = |field: &str,
                            list: &[String]|
             -> Result<Vec<BackendSource>, ConfigError> {
                if list.len() > MAX_GROUP_BACKENDS {
                    return Err(err(
                        at(field),
                        format!("{} backends, at most {MAX_GROUP_BACKENDS}", list.len()),
                    ));
                }
                list.iter()
                    .enumerate()
                    .map(|(j, a)| {
                        let Ok(addr) = a.parse::<SocketAddr>() else {
                            return super::discovery::parse_name(a)
                                .map(BackendSource::Name)
                                .map_err(|r| err(format!("{}[{j}]", at(field)), r));
                        };
                        if addr.is_ipv4() != listen.is_ipv4() {
                            return Err(err(
                                format!("{}[{j}]", at(field)),
                                "address family differs from listen (no 4<->6 translation)".into(),
                            ));
                        }
                        if addr.port() == 0 {
                            return Err(err(format!("{}[{j}]", at(field)), "port 0".into()));
                        }
                        Ok(BackendSource::Addr(addr))
                    })
                    .collect()
            };
            let sources = [
                backends("stable", &s.stable)?,
                backends("canary", &s.canary)?,
            ];
            let literal = |group: &[BackendSource]| -> Vec<SocketAddr> {
                group
                    .iter()
                    .filter_map(|b| match b {
                        BackendSource::Addr(a) => Some(*a),
                        BackendSource::Name(_) => None,
                    })
                    .collect()
            };
            let (stable, canary) = (literal(&sources[0]), literal(&sources[1]));
            if sources[0].is_empty() {
                return Err(err(
                    at("stable"),
                    "at least one stable backend is required".into(),
                ));
            }
            let weight_bp =
                crate::units::percent_to_bp(s.weight).map_err(|r| err(at("weight"), r))?;
            if sources[1].is_empty() && weight_bp > 0 {
                return Err(err(
                    at("weight"),
                    "a non-zero weight needs canary backends".into(),
                ));
            }
            let mode = match s.mode.as_deref().unwrap_or("hash") {
                "hash" => Mode::Hash,
                "exact" => Mode::Exact,
                other => {
                    return Err(err(
                        at("mode"),
                        format!("{other:?}: expected hash or exact"),
                    ))
                }
            };
            let sticky = match s.sticky.as_deref().unwrap_or("connection") {
                "connection" => Sticky::Connection,
                "client-ip" => Sticky::ClientIp,
                other => {
                    return Err(err(
                        at("sticky"),
                        format!("{other:?}: expected connection or client-ip"),
                    ))
                }
            };
            if mode == Mode::Exact && sticky == Sticky::ClientIp {
                return Err(err(
                    at("sticky"),
                    "client-ip stickiness needs mode = \"hash\" (exact mode counts connections)"
                        .into(),
                ));
            }
            if protocol != Protocol::Http {
                for (field, given) in [
                    ("head_limit", s.head_limit.is_some()),
                    ("head_timeout", s.head_timeout.is_some()),
                    ("backend_protocol", s.backend_protocol.is_some()),
                    ("max_connections", s.max_connections.is_some()),
                    ("max_client_connections", s.max_client_connections.is_some()),
                ] {
                    if given {
                        return Err(err(
                            at(field),
                            "only for protocol = \"http\" services (the router reads their heads)"
                                .into(),
                        ));
                    }
                }
            }
            let head_limit = s.head_limit.unwrap_or(DEFAULT_HEAD_LIMIT);
            if !(1024..=1024 * 1024).contains(&head_limit) {
                return Err(err(
                    at("head_limit"),
                    format!("{head_limit} bytes: use 1024 to 1048576"),
                ));
            }
            let head_timeout_s = s.head_timeout.unwrap_or(DEFAULT_HEAD_TIMEOUT_S);
            if !(1..=3600).contains(&head_timeout_s) {
                return Err(err(
                    at("head_timeout"),
                    format!("{head_timeout_s} s: use 1 to 3600 seconds"),
                ));
            }
            let backend_protocol = match s.backend_protocol.as_deref() {
                None | Some("auto") => BackendProtocol::Auto,
                Some("http1") => BackendProtocol::Http1,
                Some("h2c") => BackendProtocol::H2c,
                Some(other) => {
                    return Err(err(
                        at("backend_protocol"),
                        format!("{other:?}: use \"auto\", \"http1\" or \"h2c\""),
                    ))
                }
            };
            let mut caps = [0u32; 2];
            for (cap, (field, given, default)) in caps.iter_mut().zip([
                (
                    "max_connections",
                    s.max_connections,
                    DEFAULT_MAX_CONNECTIONS,
                ),
                (
                    "max_client_connections",
                    s.max_client_connections,
                    DEFAULT_MAX_CLIENT_CONNECTIONS,
                ),
            ]) {
                *cap = given.unwrap_or(default);
                if !(1..=1_000_000).contains(cap) {
                    return Err(err(at(field), format!("{cap}: use 1 to 1000000")));
                }
            }
            let forward = parse_forward(s.forward.as_deref(), agent.forward, agent.ingress_hook)
                .map_err(|r| err(at("forward"), r))?;
            let health = match s.health {
                Some(h) => {
                    Some(super::health::parse(h, protocol).map_err(|(f, r)| err(at(&f), r))?)
                }
                None => None,
            };
            let outlier = match s.outlier {
                Some(o) => Some(
                    super::health::parse_outlier(o, protocol).map_err(|(f, r)| err(at(&f), r))?,
                ),
                None => None,
            };
            services.push(ServiceConfig {
                sources,
                health,
                outlier,
                backend_protocol,
                max_connections: caps[0],
                max_client_connections: caps[1],
                forward,
                name: s.name,
                listen,
                protocol,
                stable,
                canary,
                weight_bp,
                mode,
                sticky,
                policy: s.policy.map(|p| base.join(p)),
                head_limit,
                head_timeout_s,
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            agent,
            services,
            fleet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
interface = ["cli0", "eth1"]
control_socket = "/tmp/x.sock"

[[service]]
name = "web"
listen = "198.19.0.10:80"
stable = ["198.18.2.2:8080", "198.18.2.3:8080"]
canary = ["198.18.3.2:8080"]
weight = 12.5
mode = "exact"
policy = "web.scm"

[[service]]
name = "dns"
listen = "[2001:db8:ffff::10]:53"
protocol = "udp"
stable = ["[2001:db8:2::2]:5353"]
canary = ["[2001:db8:3::2]:5353"]
sticky = "client-ip"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/canary/agent.toml"))
    }

    #[test]
    fn parses_a_full_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.agent.interfaces, ["cli0", "eth1"]);
        assert_eq!(c.agent.bpffs_dir, Path::new(DEFAULT_BPFFS_DIR));
        let web = &c.services[0];
        assert_eq!(web.weight_bp, 1250);
        assert_eq!(web.mode, Mode::Exact);
        assert_eq!(web.stable.len(), 2);
        assert_eq!(
            web.policy.as_deref(),
            Some(Path::new("/etc/canary/web.scm"))
        );
        let dns = &c.services[1];
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.sticky, Sticky::ClientIp);
        assert_eq!(dns.weight_bp, 0);
    }

    #[test]
    fn http_services_have_head_limits() {
        let http = |extra: &str| {
            format!(
                "[agent]\ninterface = \"eth0\"\n[[service]]\nname = \"web\"\n\
                 listen = \"198.19.0.10:80\"\nstable = [\"198.18.2.2:8080\"]\n{extra}\n"
            )
        };
        let c = parse(&http("protocol = \"http\"")).unwrap();
        assert_eq!(c.services[0].protocol, Protocol::Http);
        assert_eq!(c.services[0].head_limit, DEFAULT_HEAD_LIMIT);
        assert_eq!(c.services[0].head_timeout_s, DEFAULT_HEAD_TIMEOUT_S);
        let c = parse(&http(
            "protocol = \"http\"\nhead_limit = 4096\nhead_timeout = 2",
        ))
        .unwrap();
        assert_eq!(
            (c.services[0].head_limit, c.services[0].head_timeout_s),
            (4096, 2)
        );
        expect_err(
            &http("head_limit = 4096"),
            ".head_limit",
            "only for protocol = \"http\"",
        );
        expect_err(
            &http("protocol = \"http\"\nhead_limit = 10"),
            ".head_limit",
            "use 1024 to 1048576",
        );
        expect_err(
            &http("protocol = \"http\"\nhead_timeout = 0"),
            ".head_timeout",
            "use 1 to 3600",
        );
        let c = parse(&http(
            "protocol = \"http\"\nbackend_protocol = \"h2c\"\nmax_client_connections = 5",
        ))
        .unwrap();
        assert_eq!(
            (
                c.services[0].backend_protocol,
                c.services[0].max_connections,
                c.services[0].max_client_connections
            ),
            (BackendProtocol::H2c, DEFAULT_MAX_CONNECTIONS, 5)
        );
        expect_err(
            &http("protocol = \"http\"\nbackend_protocol = \"h3\""),
            ".backend_protocol",
            "use \"auto\", \"http1\" or \"h2c\"",
        );
        expect_err(
            &http("protocol = \"http\"\nmax_connections = 0"),
            ".max_connections",
            "use 1 to 1000000",
        );
        expect_err(
            &http("backend_protocol = \"h2c\""),
            ".backend_protocol",
            "only for protocol = \"http\"",
        );
    }

    fn expect_err(text: &str, field: &str, reason: &str) {
        let e = parse(text).expect_err("config should be rejected");
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/canary/agent.toml: "), "{msg}");
        assert!(
            e.field.contains(field),
            "field {:?} lacks {field:?}",
            e.field
        );
        assert!(msg.contains(reason), "{msg:?} lacks {reason:?}");
    }

    #[test]
    fn shutdown_grace_is_a_duration() {
        let base = "[agent]\ninterface = \"cli0\"\n";
        assert_eq!(
            parse(base).unwrap().agent.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE
        );
        let grace = |v: &str| format!("{base}shutdown_grace = {v}\n");
        assert_eq!(
            parse(&grace("\"2m\"")).unwrap().agent.shutdown_grace,
            Duration::from_secs(120)
        );
        expect_err(
            &grace("\"30 seconds\""),
            "agent.shutdown_grace",
            "bad duration",
        );
        expect_err(&grace("\"0s\""), "agent.shutdown_grace", "use 1 s to 1 h");
        expect_err(&grace("\"2h\""), "agent.shutdown_grace", "use 1 s to 1 h");
        expect_err(&grace("30"), "line 3", "string");
    }

    #[test]
    fn fleet_section_is_optional_and_validated() {
        let base = "[agent]\ninterface = \"cli0\"\n";
        let c = parse(base).unwrap();
        assert_eq!(c.fleet, None);
        assert_eq!(c.agent.node_name, host_name());
        let c = parse(
            "[agent]\ninterface = \"cli0\"\nnode_name = \"n1\"\n[fleet]\netcd = [\"http://198.18.100.250:2379\"]\n"
        )
        .unwrap();
        assert_eq!(c.agent.node_name, "n1");
        let fleet = c.fleet.unwrap();
        assert_eq!(fleet.prefix, DEFAULT_FLEET_PREFIX);
        assert_eq!(fleet.lease_s, DEFAULT_LEASE_S);
        let tls = parse(&format!(
            "{base}[fleet]\netcd = [\"https://e1:2379\"]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\nprefix = \"/a/b\"\nlease = 3\n"
        ))
        .unwrap()
        .fleet
        .unwrap();
        assert_eq!(tls.ca.as_deref(), Some(Path::new("/etc/canary/ca.pem")));
        assert_eq!(tls.lease_s, 3);
        let fleet = |body: &str| format!("{base}[fleet]\n{body}\n");
        expect_err(
            &format!("{base}node_name = \"a b\""),
            "agent.node_name",
            "letters",
        );
        expect_err(&fleet("etcd = []"), "fleet.etcd", "at least one");
        expect_err(
            &fleet("etcd = [\"e1:2379\"]"),
            "fleet.etcd[0]",
            "http://host:port",
        );
        expect_err(
            &fleet("etcd = [\"https://e1:2379\"]"),
            "fleet.etcd[0]",
            "needs `ca`",
        );
        expect_err(
            &fleet("etcd = [\"http://e1:2379\"]\nca = \"ca.pem\""),
            "fleet.etcd[0]",
            "https://",
        );
        expect_err(
            &fleet("etcd = [\"http://e1:2379\"]\nprefix = \"canary/\""),
            "fleet.prefix",
            "starts with '/'",
        );
        expect_err(
            &fleet("etcd = [\"http://e1:2379\"]\nlease = 1"),
            "fleet.lease",
            "2 to 60",
        );
        expect_err(
            &fleet("etcd = [\"https://e1:2379\"]\nca = \"ca.pem\"\ncert = \"c.pem\""),
            "fleet.key",
            "both",
        );
        expect_err(
            &fleet("etcd = [\"http://e1:2379\"]\nttl = 3"),
            "line",
            "unknown field `ttl`",
        );
    }

    #[test]
    fn bad_fields_are_located_errors() {
        let svc = |extra: &str| {
            format!(
                "[agent]\ninterface = \"cli0\"\n[[service]]\nname = \"web\"\nlisten = \"198.19.0.10:80\"\nstable = [\"198.18.2.2:80\"]\ncanary = [\"198.18.3.2:80\"]\n{extra}"
            )
        };
        expect_err(
            &svc("weight = 101"),
            "service[0] (web).weight",
            "between 0 and 100",
        );
        expect_err(&svc("weight = 12.345"), ".weight", "two decimals");
        expect_err(&svc("mode = \"random\""), ".mode", "expected hash or exact");
        expect_err(
            &svc("sticky = \"cookie\""),
            ".sticky",
            "expected connection",
        );
        expect_err(
            &svc("protocol = \"sctp\""),
            ".protocol",
            "expected tcp, udp or http",
        );
        expect_err(&svc("colour = 1"), "line 8", "unknown field `colour`");
        expect_err(
            &svc("mode = \"exact\"\nsticky = \"client-ip\""),
            ".sticky",
            "needs mode",
        );
        expect_err(
            &svc("").replace("198.18.3.2:80", "[2001:db8:3::2]:80"),
            "canary[0]",
            "address family",
        );
        expect_err(
            &svc("").replace("198.19.0.10:80", "198.19.0.10"),
            ".listen",
            "addr:port",
        );
        expect_err(
            &format!(
                "{}\n{}",
                svc(""),
                svc("").replace("[agent]\ninterface = \"cli0\"\n", "")
            ),
            "service[1] (web).name",
            "duplicate",
        );
        expect_err(
            "[[service]]\nname=\"a\"\nlisten=\"1.2.3.4:1\"\nstable=[]",
            "agent",
            "missing",
        );
        expect_err(
            &svc("").replace("\"cli0\"", "[]"),
            "agent.interface",
            "at least one",
        );
        expect_err(
            &svc("").replace("canary = [\"198.18.3.2:80\"]", "weight = 5"),
            ".weight",
            "needs canary",
        );
    }

    #[test]
    fn dashboard_settings_are_validated() {
        let agent = |extra: &str| format!("[agent]\ninterface = \"cli0\"\n{extra}\n");
        let c = parse(&agent("")).unwrap();
        assert_eq!((c.agent.ui_listen, c.agent.ui_token_file), (None, None));
        let c = parse(&agent(
            "ui_listen = \"198.18.1.1:9480\"\nui_token_file = \"ui.token\"",
        ))
        .unwrap();
        assert_eq!(c.agent.ui_listen, Some("198.18.1.1:9480".parse().unwrap()));
        assert_eq!(
            c.agent.ui_token_file.as_deref(),
            Some(Path::new("/etc/canary/ui.token"))
        );
        expect_err(
            &agent("ui_listen = \"localhost\""),
            "agent.ui_listen",
            "addr:port",
        );
        expect_err(
            &agent("ui_listen = \"127.0.0.1:0\""),
            "agent.ui_listen",
            "port 0",
        );
        expect_err(
            &agent("ui_token_file = \"/etc/canary/ui.token\""),
            "agent.ui_token_file",
            "set ui_listen",
        );
        expect_err(&agent("ui_tokn = 1"), "line 3", "unknown field");
    }

    #[test]
    fn ingress_hook_is_auto_xdp_or_tc() {
        let agent = |extra: &str| format!("[agent]\ninterface = \"cli0\"\n{extra}\n");
        assert_eq!(
            parse(&agent("")).unwrap().agent.ingress_hook,
            IngressHook::Auto
        );
        for (text, hook) in [
            ("auto", IngressHook::Auto),
            ("xdp", IngressHook::Xdp),
            ("tc", IngressHook::Tc),
        ] {
            let c = parse(&agent(&format!("ingress_hook = \"{text}\""))).unwrap();
            assert_eq!(c.agent.ingress_hook, hook);
        }
        expect_err(
            &agent("ingress_hook = \"XDP\""),
            "agent.ingress_hook",
            "use \"auto\"",
        );
    }

    #[test]
    fn forward_defaults_to_the_stack_and_redirect_needs_tc_ingress() {
        let config = |agent: &str, service: &str| {
            format!(
                "[agent]\ninterface = \"cli0\"\n{agent}\n[[service]]\nname = \"web\"\n\
                 listen = \"198.19.0.10:80\"\nstable = [\"198.18.2.2:8080\"]\n{service}\n"
            )
        };
        let c = parse(&config("", "")).unwrap();
        assert_eq!(
            (c.agent.forward, c.services[0].forward),
            (Forward::Stack, Forward::Stack)
        );
        let tc = "ingress_hook = \"tc\"";
        let c = parse(&config(&format!("{tc}\nforward = \"redirect\""), "")).unwrap();
        assert_eq!(
            c.services[0].forward,
            Forward::Redirect,
            "the agent's default"
        );
        let c = parse(&config(
            &format!("{tc}\nforward = \"redirect\""),
            "forward = \"stack\"",
        ))
        .unwrap();
        assert_eq!(c.services[0].forward, Forward::Stack, "the service's own");
        let c = parse(&config(tc, "forward = \"redirect\"")).unwrap();
        assert_eq!(c.services[0].forward, Forward::Redirect);
        expect_err(
            &config("forward = \"redirect\"", ""),
            "agent.forward",
            "needs agent.ingress_hook = \"tc\"",
        );
        expect_err(
            &config("ingress_hook = \"xdp\"", "forward = \"redirect\""),
            "service[0] (web).forward",
            "needs agent.ingress_hook",
        );
        expect_err(
            &config(tc, "forward = \"fast\""),
            "service[0] (web).forward",
            "use \"stack\"",
        );
    }

    #[test]
    fn dashboard_token_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("canary-ui-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_ui_token(&path).unwrap_err();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_ui_token(&path).unwrap(), "0123456789abcdef0123");
        std::fs::write(&path, "short\n").unwrap();
        let e = load_ui_token(&path).unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
        let e = load_ui_token(&dir.join("missing")).unwrap_err();
        assert!(e.contains("missing"), "{e}");
        let e = load_ui_token(&dir).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        // A link to a good token file is not followed.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        let e = load_ui_token(&link).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
