//! The routing decision for one request, from its head: plain Rust, no I/O. Precedence: header rule → feature flags → cohorts (first membership in
//! order, else the default cohort) → the header rule's default → the rollout's weight.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use canary_common::{bucket, client_hash, key_hash, smooth_pick, GROUP_CANARY, WEIGHT_SCALE};
use hyper::header::HeaderMap;

use crate::datapath::encode::encode_addr;
use crate::policy::routing::{Membership, Routing, Target, UserKey, Version};

/// The parts of a request head the rules read.
pub struct Head<'a> {
    pub headers: &'a HeaderMap,
    pub client: IpAddr,
}

/// Which rule decided: the label of `canary_routing_decisions_total{rule}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    Header,
    Flag,
    Cohort(String),
    Split,
}

impl Rule {
    pub fn label(&self) -> String {
        match self {
            Self::Header => "header".into(),
            Self::Flag => "flag".into(),
            Self::Cohort(name) => format!("cohort:{name}"),
            Self::Split => "split".into(),
        }
    }
}

/// How the weight split is taken when no rule decides and no user key is defined.
pub enum Split<'a> {
    /// `sticky = "client-ip"`: the client's hash, as the XDP program takes it.
    Hash(u64),
    /// Per request: the service's smooth counter, shared by every connection, so over
    /// any N requests the canary gets N·w within one.
    Exact(&'a AtomicU32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub version: Version,
    pub rule: Rule,
}

impl<'a> Head<'a> {
    /// Every value of a header, in order (names are case-insensitive).
    fn values(&self, name: &str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.get_all(name).iter().map(|v| v.as_bytes())
    }

    fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.values(name).next()
    }

    /// A cookie's value, from any `Cookie:` header (`a=1; b=2`).
    fn cookie(&self, name: &str) -> Option<&'a [u8]> {
        self.values("cookie").find_map(|line| {
            line.split(|&b| b == b';').find_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = pair.iter().position(|&b| b == b'=')?;
                (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
            })
        })
    }

    /// The user key's hash; a request without the header or cookie is keyed by its
    /// client address (the same hash as `sticky = "client-ip"`).
    fn user_hash(&self, key: Option<&UserKey>) -> u64 {
        let value = match key {
            Some(UserKey::Header(h)) => self.header(h),
            Some(UserKey::Cookie(c)) => self.cookie(c),
            Some(UserKey::ClientIp) | None => None,
        };
        match value {
            Some(v) if !v.is_empty() => key_hash(v),
            _ => client_hash(&encode_addr(self.client)),
        }
    }

    fn member(&self, m: &Membership) -> bool {
        match m {
            Membership::Header { header, values } => self
                .values(header)
                .any(|v| values.iter().any(|x| x.as_bytes() == v)),
            Membership::Suffix { header, suffix } => {
                self.values(header).any(|v| v.ends_with(suffix.as_bytes()))
            }
            Membership::Cookie { cookie, values } => self
                .cookie(cookie)
                .is_some_and(|v| values.iter().any(|x| x.as_bytes() == v)),
            Membership::ClientCidr(nets) => nets.iter().any(|n| n.contains(&self.client)),
            Membership::Default => false,
        }
    }
}

fn canary_if(yes: bool) -> Version {
    if yes {
        Version::Canary
    } else {
        Version::Stable
    }
}

/// Decides one request. `weight_bp` is the rollout's current weight.
pub fn decide(routing: &Routing, head: &Head<'_>, weight_bp: u16, split: Split<'_>) -> Decision {
    let decided = |version, rule| Decision { version, rule };
    if let Some(h) = &routing.header {
        let hit = head
            .values(&h.header)
            .any(|v| h.values.iter().any(|x| x.as_bytes() == v));
        if hit {
            return decided(Version::Canary, Rule::Header);
        }
    }
    if let Some(f) = &routing.flags {
        let flag = head
            .values(&f.header)
            .flat_map(|line| line.split(|&b| b == b','))
            .find_map(|flag| {
                let flag = flag.trim_ascii();
                f.flags
                    .iter()
                    .find(|(name, _)| name.as_bytes() == flag)
                    .map(|(_, v)| *v)
            });
        if let Some(version) = flag {
            return decided(version, Rule::Flag);
        }
    }
    let cohort = routing
        .cohorts
        .iter()
        .find(|c| head.member(&c.member))
        .or_else(|| {
            routing
                .cohorts
                .iter()
                .find(|c| c.member == Membership::Default)
        });
    if let Some(c) = cohort {
        match routing.assignment(&c.name) {
            Some(Target::Version(v)) => return decided(v, Rule::Cohort(c.name.clone())),
            Some(Target::Percent(bp)) => {
                let h = head.user_hash(routing.user_key.as_ref());
                return decided(canary_if(bucket(h) < bp), Rule::Cohort(c.name.clone()));
            }
            None => {}
        }
    }
    if let Some(v) = routing.header.as_ref().and_then(|h| h.default) {
        return decided(v, Rule::Header);
    }
    let canary = match (&routing.user_key, split) {
        (Some(key), _) => bucket(head.user_hash(Some(key))) < weight_bp,
        (None, Split::Hash(h)) => bucket(h) < weight_bp,
        (None, Split::Exact(acc)) => {
            let mut group = 0;
            // The closure always returns Some, so the update always lands.
            let _ = acc.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mut a| {
                group = smooth_pick(&mut a, weight_bp.min(WEIGHT_SCALE));
                Some(a)
            });
            group == GROUP_CANARY
        }
    };
    decided(canary_if(canary), Rule::Split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load_policy;

    fn routing() -> Routing {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/routing.scm");
        load_policy(&path).unwrap().routing
    }

    fn run(routing: &Routing, headers: &[(&str, &str)], client: &str, weight: u16) -> Decision {
        let mut hs = HeaderMap::new();
        for (n, v) in headers {
            hs.append(
                hyper::header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let head = Head {
            headers: &hs,
            client: client.parse().unwrap(),
        };
        decide(routing, &head, weight, Split::Hash(0))
    }

    const OUTSIDE: &str = "198.18.1.2";

    #[test]
    fn precedence_header_flags_cohorts_default() {
        let r = routing();
        let d = |h: &[(&str, &str)], c: &str| {
            let d = run(&r, h, c, 0);
            (d.version, d.rule)
        };
        use Version::*;
        for v in ["true", "test", "qa"] {
            assert_eq!(d(&[("x-canary", v)], OUTSIDE), (Canary, Rule::Header));
        }
        // Values are exact; a non-matching header falls through to flags.
        assert_eq!(
            d(
                &[("X-Canary", "TRUE"), ("X-Features", "a, legacy-cart")],
                OUTSIDE
            ),
            (Stable, Rule::Flag)
        );
        assert_eq!(
            d(&[("X-Features", " new-checkout ,x")], OUTSIDE),
            (Canary, Rule::Flag)
        );
        // The first known flag in the header decides.
        assert_eq!(
            d(&[("X-Features", "legacy-cart,new-checkout")], OUTSIDE),
            (Stable, Rule::Flag)
        );
        let cohort = |n: &str| Rule::Cohort(n.into());
        assert_eq!(
            d(&[("X-User-Group", "beta")], OUTSIDE),
            (Canary, cohort("beta-users"))
        );
        assert_eq!(d(&[], "10.1.2.3"), (Canary, cohort("internal-users")));
        assert_eq!(d(&[], "fd00::1"), (Canary, cohort("internal-users")));
        // premium-users and staff have no assignment: the header default applies.
        assert_eq!(
            d(&[("Cookie", "a=1; plan=premium")], OUTSIDE),
            (Stable, Rule::Header)
        );
        assert_eq!(
            d(&[("X-User-Email", "ann@example.com")], OUTSIDE),
            (Stable, Rule::Header)
        );
        // The header rule precedes cohorts.
        assert_eq!(
            d(&[("X-Canary", "qa"), ("X-User-Group", "x")], "10.0.0.1"),
            (Canary, Rule::Header)
        );
    }

    #[test]
    fn percentage_cohort_is_sticky_per_user_and_monotone() {
        let r = routing();
        let share = |pct: u16| -> Vec<bool> {
            let mut r = r.clone();
            r.assignments.last_mut().unwrap().target = Target::Percent(pct);
            (0..2000)
                .map(|i| {
                    let id = format!("user-{i}");
                    let d = run(&r, &[("X-User-Id", &id)], OUTSIDE, 0);
                    assert_eq!(d.rule, Rule::Cohort("regular-users".into()));
                    d.version == Version::Canary
                })
                .collect()
        };
        let at10 = share(1_000);
        let n = at10.iter().filter(|c| **c).count();
        assert!((170..=230).contains(&n), "{n} of 2000 at 10 %");
        assert_eq!(at10, share(1_000), "same user, same version");
        let at20 = share(2_000);
        assert!(
            at10.iter().zip(&at20).all(|(a, b)| !a || *b),
            "canary set grows"
        );
    }

    #[test]
    fn split_uses_the_weight_and_the_user_key() {
        let mut r = Routing::default();
        assert_eq!(run(&r, &[], OUTSIDE, 10_000).version, Version::Canary);
        assert_eq!(run(&r, &[], OUTSIDE, 0).rule, Rule::Split);
        r.user_key = Some(UserKey::Cookie("uid".into()));
        let on = |w| {
            (0..500)
                .filter(|i| {
                    let c = format!("uid={i}");
                    run(&r, &[("cookie", &c)], OUTSIDE, w).version == Version::Canary
                })
                .count()
        };
        assert_eq!(on(0), 0);
        assert_eq!(on(10_000), 500);
        assert!((200..300).contains(&on(5_000)));
        let acc = AtomicU32::new(0);
        let empty = HeaderMap::new();
        let head = Head {
            headers: &empty,
            client: OUTSIDE.parse().unwrap(),
        };
        // Over every prefix of the sequence the canary count is within one of N·w.
        let mut on = 0;
        for n in 1..=1000u32 {
            on += (decide(&Routing::default(), &head, 2_500, Split::Exact(&acc)).version
                == Version::Canary) as u32;
            assert!(on.abs_diff(n / 4) <= 1, "{on} of {n} at 25 %");
        }
        assert_eq!(on, 250);
    }
}
