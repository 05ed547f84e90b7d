//! Request routing rules of a policy (`define-header-routing`, `define-cohorts`,
//! `define-user-key`, `define-user-cohorts`, `define-feature-routing`, or the TOML
//! `[routing]` tables). Both formats build a [`Routing`] through the helpers here, so
//! they check the same things and normalise to equal values (cohort assignments in
//! cohort order, flags by name).

use std::fmt::Write;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::WeightBp;
use crate::units::percent;

/// A version a rule sends a request to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Version {
    Stable,
    Canary,
}

impl Version {
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "stable" => Ok(Self::Stable),
            "canary" => Ok(Self::Canary),
            other => Err(format!(
                "unknown version `{other}` (expected stable or canary)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stable => "stable",
            Self::Canary => "canary",
        }
    }
}

/// The routing part of a policy; empty when the policy has no request rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    pub header: Option<HeaderRule>,
    pub flags: Option<FlagRule>,
    /// In `define-cohorts` order: a request belongs to the first one it matches.
    pub cohorts: Vec<Cohort>,
    /// In cohort order.
    pub assignments: Vec<Assignment>,
    /// `None`: not given; percentage cohorts then key on the client address and the
    /// weight split stays the service's own (per connection or client address).
    pub user_key: Option<UserKey>,
}

/// `X-Canary: true|test|qa` → canary; other values and absence fall through to
/// the later rules, then to `default` when given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderRule {
    pub header: String,
    pub values: Vec<String>,
    pub default: Option<Version>,
}

/// A comma-separated flag header; the first known flag in the header decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagRule {
    pub header: String,
    /// Sorted by name.
    pub flags: Vec<(String, Version)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cohort {
    pub name: String,
    pub member: Membership,
}

/// Who belongs to a cohort. Header names compare case-insensitively, values exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Membership {
    Header {
        header: String,
        values: Vec<String>,
    },
    Suffix {
        header: String,
        suffix: String,
    },
    Cookie {
        cookie: String,
        values: Vec<String>,
    },
    ClientCidr(Vec<IpNet>),
    /// Everyone who matched no other cohort.
    Default,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Version(Version),
    /// This share of the cohort's users (by user key) goes to canary.
    Percent(WeightBp),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub cohort: String,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserKey {
    Header(String),
    Cookie(String),
    ClientIp,
}

/// Client address ranges in a head-free policy (each is a CANARY_CIDR entry).
pub const MAX_CIDRS: usize = 1024;

/// A head-free plan as the kernel decides it ([`Routing::kernel_table`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelTable {
    /// Client ranges and their cohort, without the ranges an earlier cohort shadows.
    pub ranges: Vec<(IpNet, KernelRule)>,
    /// The default cohort: every client no range holds.
    pub default: Option<KernelRule>,
    /// `define-user-key` is `client-ip`: the weight split is sticky per client address.
    pub client_key: bool,
}

/// A cohort (its index in `define-cohorts`) and its assignment; `None` falls through
/// to the weight split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRule {
    pub cohort: u8,
    pub target: Option<Target>,
}

/// A header or cookie name: an RFC 9110 token.
pub(crate) fn check_name(what: &str, name: &str) -> Result<String, String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(tchar) {
        return Err(format!("{what} {name:?} is not a valid name"));
    }
    Ok(name.to_string())
}

pub(crate) fn check_values(what: &str, values: Vec<String>) -> Result<Vec<String>, String> {
    if values.is_empty() {
        return Err(format!("{what}: give at least one value"));
    }
    Ok(values)
}

pub(crate) fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .parse()
        .map_err(|_| format!("client-cidr {text:?} is not ADDRESS/PREFIX (e.g. \"10.0.0.0/8\")"))?;
    if net.trunc() != net {
        return Err(format!(
            "client-cidr {text:?} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Flags sorted by name; a flag named twice is an error.
pub(crate) fn check_flags(
    mut flags: Vec<(String, Version)>,
) -> Result<Vec<(String, Version)>, String> {
    if flags.is_empty() {
        return Err("give at least one flag".into());
    }
    flags.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = flags.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("flag `{}` given twice", w[0].0));
    }
    for (name, _) in &flags {
        if name.is_empty() || name.contains(',') || name.trim() != name {
            return Err(format!("flag {name:?}: no commas or surrounding spaces"));
        }
    }
    Ok(flags)
}

impl Routing {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Cohorts must be unique with at most one default; assignments must name
    /// defined cohorts, once each. Returns the reason and whether it concerns the
    /// assignments (so the caller can point at that form).
    pub(crate) fn check(&mut self) -> Result<(), (bool, String)> {
        for (i, c) in self.cohorts.iter().enumerate() {
            if self.cohorts[..i].iter().any(|p| p.name == c.name) {
                return Err((false, format!("cohort `{}` defined twice", c.name)));
            }
            if c.member == Membership::Default
                && self.cohorts[..i]
                    .iter()
                    .any(|p| p.member == Membership::Default)
            {
                return Err((
                    false,
                    format!("cohort `{}`: only one cohort can be the default", c.name),
                ));
            }
        }
        for (i, a) in self.assignments.iter().enumerate() {
            if self.assignments[..i].iter().any(|p| p.cohort == a.cohort) {
                return Err((true, format!("cohort `{}` assigned twice", a.cohort)));
            }
            if !self.cohorts.iter().any(|c| c.name == a.cohort) {
                let known: Vec<&str> = self.cohorts.iter().map(|c| c.name.as_str()).collect();
                return Err((
                    true,
                    format!(
                        "unknown cohort `{}` (defined: {})",
                        a.cohort,
                        if known.is_empty() {
                            "none; define it in define-cohorts / [[routing.cohort]]".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        if self.head_free() && self.cohorts.len() > canary_common::MAX_KERNEL_COHORTS {
            return Err((
                false,
                format!(
                    "{} cohorts: a plan of client-cidr and default cohorts is decided in the \
                     kernel, which counts at most {} of them",
                    self.cohorts.len(),
                    canary_common::MAX_KERNEL_COHORTS
                ),
            ));
        }
        let nets: usize = self
            .cohorts
            .iter()
            .map(|c| match &c.member {
                Membership::ClientCidr(nets) => nets.len(),
                _ => 0,
            })
            .sum();
        if self.head_free() && nets > MAX_CIDRS {
            return Err((
                false,
                format!(
                    "{nets} client-cidr ranges: a plan decided in the kernel holds at most \
                     {MAX_CIDRS}"
                ),
            ));
        }
        let order = |name: &str| self.cohorts.iter().position(|c| c.name == name);
        let mut assignments = std::mem::take(&mut self.assignments);
        assignments.sort_by_key(|a| order(&a.cohort));
        self.assignments = assignments;
        Ok(())
    }

    /// Whether the plan needs nothing from the request head: no header rule, no
    /// feature flags, only `client-cidr` and default cohorts, and the client address as
    /// the user key. Such a plan (an empty one too) is decided by the ingress program at
    /// the first packet, and its service never goes through the router.
    pub fn head_free(&self) -> bool {
        self.header.is_none()
            && self.flags.is_none()
            && self
                .cohorts
                .iter()
                .all(|c| matches!(c.member, Membership::ClientCidr(_) | Membership::Default))
            && matches!(self.user_key, None | Some(UserKey::ClientIp))
    }

    /// The table the kernel decides a head-free plan with; `None` when the plan is not
    /// head-free or empty (then the service's own weight split alone decides).
    pub fn kernel_table(&self) -> Option<KernelTable> {
        if !self.head_free() || self.is_empty() {
            return None;
        }
        let rule = |index: usize, name: &str| KernelRule {
            cohort: index as u8,
            target: self.assignment(name),
        };
        let mut ranges: Vec<(IpNet, KernelRule)> = Vec::new();
        let mut default = None;
        for (i, c) in self.cohorts.iter().enumerate() {
            match &c.member {
                Membership::ClientCidr(nets) => {
                    for net in nets {
                        // First match wins: a range inside one of an earlier cohort (or
                        // an earlier range of this one) never decides. Ranges either nest
                        // or are disjoint, so the longest-prefix match over the rest is
                        // the first matching cohort.
                        if !ranges.iter().any(|(r, _)| r.contains(net)) {
                            ranges.push((*net, rule(i, &c.name)));
                        }
                    }
                }
                Membership::Default => default = Some(rule(i, &c.name)),
                _ => return None,
            }
        }
        Some(KernelTable {
            ranges,
            default,
            client_key: self.user_key == Some(UserKey::ClientIp),
        })
    }

    pub fn assignment(&self, cohort: &str) -> Option<Target> {
        self.assignments
            .iter()
            .find(|a| a.cohort == cohort)
            .map(|a| a.target)
    }

    /// The routing section of `canary check`: rules in the order they are applied.
    pub fn render(&self) -> String {
        let mut out = String::from(if self.head_free() {
            "Routing (decided in the kernel at the first packet of each connection, by the \
             client address):\n"
        } else {
            "Routing (decided per request, by the proxy; HTTP/1.x and h2c):\n"
        });
        let mut n = 0;
        let mut line = |out: &mut String, text: String| {
            n += 1;
            let _ = writeln!(out, "  {n}. {text}");
        };
        if let Some(h) = &self.header {
            line(
                &mut out,
                format!("header {}: {} -> canary", h.header, quoted(&h.values)),
            );
        }
        if let Some(f) = &self.flags {
            let flags: Vec<String> = f
                .flags
                .iter()
                .map(|(name, v)| format!("{name} -> {}", v.as_str()))
                .collect();
            line(
                &mut out,
                format!(
                    "feature flags in {} (first known flag in the header): {}",
                    f.header,
                    flags.join(", ")
                ),
            );
        }
        if !self.cohorts.is_empty() {
            line(
                &mut out,
                "cohorts (first match, else the default cohort):".into(),
            );
            for c in &self.cohorts {
                let who = match &c.member {
                    Membership::Header { header, values } => {
                        format!("header {header} is {}", quoted(values))
                    }
                    Membership::Suffix { header, suffix } => {
                        format!("header {header} ends with {suffix:?}")
                    }
                    Membership::Cookie { cookie, values } => {
                        format!("cookie {cookie} is {}", quoted(values))
                    }
                    Membership::ClientCidr(nets) => {
                        let nets: Vec<String> = nets.iter().map(IpNet::to_string).collect();
                        format!("client address in {}", nets.join(", "))
                    }
                    Membership::Default => "everyone else (default)".into(),
                };
                let to = match self.assignment(&c.name) {
                    Some(Target::Version(v)) => v.as_str().to_string(),
                    Some(Target::Percent(bp)) => {
                        format!(
                            "{} of its users to canary (sticky by user key)",
                            percent(bp)
                        )
                    }
                    None => "no assignment: falls through".into(),
                };
                let _ = writeln!(out, "       {:<16} {who} -> {to}", c.name);
            }
        }
        if let Some(v) = self.header.as_ref().and_then(|h| h.default) {
            line(&mut out, format!("header rule default -> {}", v.as_str()));
        }
        let split = match &self.user_key {
            Some(UserKey::Header(h)) => format!(
                "the rollout's weight, sticky per user (header {h}; the client address without it)"
            ),
            Some(UserKey::Cookie(c)) => format!(
                "the rollout's weight, sticky per user (cookie {c}; the client address without it)"
            ),
            Some(UserKey::ClientIp) => "the rollout's weight, sticky per client address".into(),
            None => "the rollout's weight (the service's mode and stickiness)".into(),
        };
        line(&mut out, split);
        let key = match &self.user_key {
            Some(UserKey::Header(h)) => format!("header {h}"),
            Some(UserKey::Cookie(c)) => format!("cookie {c}"),
            _ => "client address".into(),
        };
        let _ = writeln!(
            out,
            "  User key: {key}; users hash into the same 10000 buckets as hash mode."
        );
        out
    }
}

fn quoted(values: &[String]) -> String {
    let v: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    v.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(name: &str, nets: &[&str]) -> Cohort {
        Cohort {
            name: name.into(),
            member: Membership::ClientCidr(nets.iter().map(|n| parse_cidr(n).unwrap()).collect()),
        }
    }

    fn assign(cohort: &str, target: Target) -> Assignment {
        Assignment {
            cohort: cohort.into(),
            target,
        }
    }

    fn cidr_plan() -> Routing {
        Routing {
            cohorts: vec![
                cidr("internal", &["10.1.0.0/16", "fd00::/8"]),
                cidr("office", &["10.0.0.0/8", "10.1.2.0/24", "198.18.5.0/24"]),
                cidr("lab", &["10.1.0.0/16", "198.18.5.128/25", "198.18.0.0/15"]),
                Cohort {
                    name: "everyone".into(),
                    member: Membership::Default,
                },
            ],
            assignments: vec![
                assign("internal", Target::Version(Version::Canary)),
                assign("lab", Target::Version(Version::Stable)),
                assign("everyone", Target::Percent(1_000)),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn head_free_needs_only_the_client_address() {
        let mut r = cidr_plan();
        assert!(r.head_free());
        assert!(Routing::default().head_free(), "no rules: the weight split");
        r.user_key = Some(UserKey::ClientIp);
        assert!(r.head_free());
        let not = |change: &dyn Fn(&mut Routing)| {
            let mut r = cidr_plan();
            change(&mut r);
            assert!(!r.head_free(), "{r:?}");
            assert_eq!(r.kernel_table(), None);
        };
        not(&|r| r.user_key = Some(UserKey::Header("X-User-Id".into())));
        not(&|r| r.user_key = Some(UserKey::Cookie("uid".into())));
        not(&|r| {
            r.header = Some(HeaderRule {
                header: "X-Canary".into(),
                values: vec!["1".into()],
                default: None,
            })
        });
        not(&|r| {
            r.flags = Some(FlagRule {
                header: "X-Features".into(),
                flags: vec![("a".into(), Version::Canary)],
            })
        });
        not(&|r| {
            r.cohorts.push(Cohort {
                name: "beta".into(),
                member: Membership::Cookie {
                    cookie: "plan".into(),
                    values: vec!["beta".into()],
                },
            })
        });
    }

    #[test]
    fn kernel_table_keeps_first_match_under_longest_prefix() {
        let t = cidr_plan().kernel_table().unwrap();
        let ranges: Vec<(String, u8)> = t
            .ranges
            .iter()
            .map(|(n, r)| (n.to_string(), r.cohort))
            .collect();
        // 10.1.2.0/24 (office) and 10.1.0.0/16 (lab) sit inside internal's 10.1.0.0/16,
        // and 198.18.5.128/25 (lab) inside office's 198.18.5.0/24: they never decide.
        // 198.18.0.0/15 (lab) holds office's range but does not shadow it: the longer
        // prefix, from the earlier cohort, wins in the trie, as first match does.
        assert_eq!(
            ranges,
            [
                ("10.1.0.0/16".into(), 0),
                ("fd00::/8".into(), 0),
                ("10.0.0.0/8".into(), 1),
                ("198.18.5.0/24".into(), 1),
                ("198.18.0.0/15".into(), 2),
            ]
        );
        assert_eq!(t.ranges[0].1.target, Some(Target::Version(Version::Canary)));
        assert_eq!(t.ranges[2].1.target, None, "office has no assignment");
        assert_eq!(
            t.default,
            Some(KernelRule {
                cohort: 3,
                target: Some(Target::Percent(1_000))
            })
        );
        assert!(!t.client_key);
        assert_eq!(Routing::default().kernel_table(), None);
    }

    #[test]
    fn a_kernel_plan_is_bounded() {
        let mut r = Routing {
            cohorts: (0..16)
                .map(|i| cidr(&format!("c{i}"), &[&format!("198.18.{i}.0/24")]))
                .collect(),
            ..Default::default()
        };
        let err = r.check().unwrap_err().1;
        assert!(err.contains("at most 15"), "{err}");
        r.cohorts.truncate(15);
        r.check().unwrap();
    }
}
