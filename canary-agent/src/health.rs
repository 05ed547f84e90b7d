//! Backend health from check results: plain Rust with no I/O (the daemon's prober
//! runs the checks and hands each result in), so rise/fall counting and what the
//! datapath is told are unit-tested without sockets.
//!
//! A backend starts up (an agent restart must not take every backend out until its
//! first checks pass), leaves the selection after `fall` consecutive failures and
//! returns after `rise` consecutive passes. What it means for a version to have no
//! backend up is decided here too: canary's share then goes to stable (the kernel
//! falls back to the other group) and a rollout in progress is rolled back; stable
//! fails open: its backends stay in the selection and an alert says so, because
//! stable's traffic is never sent to canary.

use std::net::SocketAddr;

use serde::Serialize;

use crate::config::{CheckKind, HealthCheck, ServiceConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Up,
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
        }
    }
}

/// One backend's checks so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendHealth {
    pub addr: SocketAddr,
    pub state: State,
    /// Consecutive passes (while down) or failures (while up) towards a change.
    pub streak: u32,
    /// The last check's failure, or why the backend is in its state.
    pub reason: String,
    /// When the state last changed (controller clock, ms); 0: never.
    pub since_ms: u64,
    pub checks: u64,
    pub failures: u64,
}

impl BackendHealth {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            state: State::Up,
            streak: 0,
            reason: "not checked yet (a backend starts up)".into(),
            since_ms: 0,
            checks: 0,
            failures: 0,
        }
    }
}

/// A backend that changed state, for the log, the alert and the map write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub group: usize,
    pub addr: SocketAddr,
    pub state: State,
    pub reason: String,
}

/// What the datapath and the rollout are told after the changes of a check round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// `down[g][i]`: backend `i` of version `g` is out of the selection.
    pub down: [Vec<bool>; 2],
    /// Every stable backend failed its checks: they stay in (fail open).
    pub stable_fails_open: bool,
    /// Every canary backend failed its checks (and there is at least one).
    pub canary_down: bool,
}

/// The checks of one service's backends: stable (`groups[0]`) and canary (`groups[1]`)
/// in config order, which is their slot order in the map.
#[derive(Debug, Clone)]
pub struct ServiceHealth {
    pub spec: HealthCheck,
    pub groups: [Vec<BackendHealth>; 2],
}

/// The health state for `cfg` as it is now: `previous` when it checks the same
/// backends the same way, else rebuilt from it (a reload or a release changed them).
pub fn for_config(cfg: &ServiceConfig, previous: Option<&ServiceHealth>) -> Option<ServiceHealth> {
    let spec = cfg.health.clone()?;
    let same = |h: &&ServiceHealth| {
        h.spec == spec
            && [&cfg.stable, &cfg.canary]
                .iter()
                .zip(&h.groups)
                .all(|(addrs, group)| addrs.iter().eq(group.iter().map(|b| &b.addr)))
    };
    match previous.filter(same) {
        Some(same) => Some(same.clone()),
        None => Some(ServiceHealth::new(spec, &cfg.stable, &cfg.canary, previous)),
    }
}

impl ServiceHealth {
    /// The backends of `stable` and `canary`, each keeping what `previous` knew of
    /// the same address (a reload must not bring a down backend back unchecked).
    pub fn new(
        spec: HealthCheck,
        stable: &[SocketAddr],
        canary: &[SocketAddr],
        previous: Option<&ServiceHealth>,
    ) -> Self {
        let known = |addr: &SocketAddr| {
            previous
                .and_then(|p| p.groups.iter().flatten().find(|b| b.addr == *addr))
                .cloned()
                .unwrap_or_else(|| BackendHealth::new(*addr))
        };
        Self {
            spec,
            groups: [
                stable.iter().map(known).collect(),
                canary.iter().map(known).collect(),
            ],
        }
    }

    /// Where `addr` is checked: its own address, on the check's port if one is set.
    pub fn target(&self, addr: SocketAddr) -> SocketAddr {
        SocketAddr::new(addr.ip(), self.spec.port.unwrap_or(addr.port()))
    }

    /// Every backend to check, once each (an address may be in both groups).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for b in self.groups.iter().flatten() {
            if !out.contains(&b.addr) {
                out.push(b.addr);
            }
        }
        out
    }

    /// Counts one check of `addr`; returns the backends that changed state.
    pub fn record(
        &mut self,
        addr: SocketAddr,
        outcome: Result<(), String>,
        now_ms: u64,
    ) -> Vec<Change> {
        let (rise, fall) = (self.spec.rise, self.spec.fall);
        let mut changes = Vec::new();
        for (group, backends) in self.groups.iter_mut().enumerate() {
            for b in backends.iter_mut().filter(|b| b.addr == addr) {
                b.checks += 1;
                let passed = outcome.is_ok();
                if !passed {
                    b.failures += 1;
                }
                let towards_change = match b.state {
                    State::Up => !passed,
                    State::Down => passed,
                };
                b.streak = if towards_change { b.streak + 1 } else { 0 };
                let (needed, next) = match b.state {
                    State::Up => (fall, State::Down),
                    State::Down => (rise, State::Up),
                };
                match &outcome {
                    Err(reason) => b.reason = reason.clone(),
                    Ok(()) if b.state == State::Up => b.reason = "passing".into(),
                    Ok(()) => {}
                }
                if towards_change && b.streak >= needed {
                    b.reason = match &outcome {
                        Err(reason) => {
                            format!("{needed} checks failed in a row, the last: {reason}")
                        }
                        Ok(()) => format!("{needed} checks passed in a row"),
                    };
                    b.state = next;
                    b.streak = 0;
                    b.since_ms = now_ms;
                    changes.push(Change {
                        group,
                        addr,
                        state: next,
                        reason: b.reason.clone(),
                    });
                }
            }
        }
        changes
    }

    /// Backends up in `group`.
    pub fn up(&self, group: usize) -> usize {
        self.groups[group]
            .iter()
            .filter(|b| b.state == State::Up)
            .count()
    }

    /// The selection the datapath is told.
    pub fn selection(&self) -> Selection {
        let down = |group: usize| -> Vec<bool> {
            self.groups[group]
                .iter()
                .map(|b| b.state == State::Down)
                .collect()
        };
        let stable_fails_open = !self.groups[0].is_empty() && self.up(0) == 0;
        let stable = if stable_fails_open {
            vec![false; self.groups[0].len()]
        } else {
            down(0)
        };
        Selection {
            down: [stable, down(1)],
            stable_fails_open,
            canary_down: !self.groups[1].is_empty() && self.up(1) == 0,
        }
    }

    /// What is checked, as status shows it ("http GET /healthz → 200 every 1s").
    pub fn describe(&self) -> String {
        let what = match &self.spec.kind {
            CheckKind::Tcp => "tcp connect".to_string(),
            CheckKind::Http { path, status } => format!("http GET {path} -> {status}"),
        };
        let port = self
            .spec
            .port
            .map(|p| format!(" on port {p}"))
            .unwrap_or_default();
        format!(
            "{what}{port} every {:?} (timeout {:?}, rise {}, fall {})",
            self.spec.interval, self.spec.timeout, self.spec.rise, self.spec.fall
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec() -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 2, last], 7000))
    }

    fn fail() -> Result<(), String> {
        Err("connection refused".into())
    }

    #[test]
    fn a_backend_leaves_after_fall_failures_in_a_row_and_returns_after_rise_passes() {
        let mut h = ServiceHealth::new(spec(), &[addr(2), addr(3)], &[addr(9)], None);
        let none = [vec![false, false], vec![false]];
        assert_eq!(h.selection().down, none);
        // A pass between failures restarts the count.
        for outcome in [fail(), fail(), Ok(()), fail(), fail()] {
            assert!(h.record(addr(3), outcome, 1).is_empty());
        }
        let changes = h.record(addr(3), fail(), 7);
        assert_eq!(changes.len(), 1);
        assert_eq!((changes[0].group, changes[0].state), (0, State::Down));
        assert!(changes[0]
            .reason
            .contains("3 checks failed in a row, the last: connection refused"));
        assert_eq!(h.selection().down, [vec![false, true], vec![false]]);
        assert_eq!(h.groups[0][1].since_ms, 7);
        assert!(h.record(addr(3), Ok(()), 8).is_empty());
        assert_eq!(h.record(addr(3), Ok(()), 9)[0].state, State::Up);
        assert_eq!(h.selection().down, none);
        assert_eq!((h.groups[0][1].checks, h.groups[0][1].failures), (8, 5));
    }

    #[test]
    fn canary_with_none_up_is_reported_and_stable_fails_open() {
        let mut h = ServiceHealth::new(spec(), &[addr(2)], &[addr(9), addr(10)], None);
        for _ in 0..3 {
            h.record(addr(9), fail(), 1);
            h.record(addr(10), fail(), 1);
        }
        let s = h.selection();
        assert_eq!(s.down, [vec![false], vec![true, true]]);
        assert!(s.canary_down && !s.stable_fails_open);
        for _ in 0..3 {
            h.record(addr(2), fail(), 2);
        }
        let s = h.selection();
        assert!(s.stable_fails_open);
        assert_eq!(s.down[0], [false], "stable stays in the selection");
    }

    #[test]
    fn a_reload_keeps_what_was_known_of_an_address() {
        let mut h = ServiceHealth::new(spec(), &[addr(2), addr(3)], &[], None);
        for _ in 0..3 {
            h.record(addr(3), fail(), 1);
        }
        // addr(3) moves to slot 0; a new backend starts up.
        let next = ServiceHealth::new(spec(), &[addr(3), addr(4)], &[], Some(&h));
        assert_eq!(next.selection().down, [vec![true, false], vec![]]);
        assert_eq!(next.groups[0][1].state, State::Up);
        assert_eq!(next.addrs(), vec![addr(3), addr(4)]);
    }
}
