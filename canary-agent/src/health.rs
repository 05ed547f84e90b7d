//! Backend health from check results and from the kernel's handshake counters: plain
//! Rust with no I/O (the daemon's prober runs the checks and hands each result in; the
//! agent hands each second's per-backend counters in), so rise/fall counting, passive
//! ejection and what the datapath is told are unit-tested without sockets.
//!
//! Active checks: a backend starts up (an agent restart must not take every backend
//! out until its first checks pass), leaves the selection after `fall` consecutive
//! failures and returns after `rise` consecutive passes.
//!
//! Passive detection (`[service.outlier]`, Envoy's outlier detection on what the kernel
//! already sees), every [`PASSIVE_PERIOD`]: a connection the kernel placed on a backend
//! fails when the backend resets it instead of answering (counted at once) or sends no
//! SYN-ACK within [`ANSWER_LAG`]. Two rules eject: `consecutive_failures` failures in a
//! row (no handshake answered since they began: a dead or refusing backend, found
//! within a second), or over the last `window`, at least `min_connections` placed and
//! `failure_ratio` of them failed (a backend that fails some). An ejection lasts
//! `ejection`, doubled for each ejection in a row up to `max_ejection`; the backend then
//! returns on probation. Answers to connections placed in the last [`ANSWER_LAG`] count
//! too, so unanswered ones can only be under-estimated: a falling rate never ejects a
//! healthy backend.
//!
//! A backend is out of the selection when either says so. What it means for a version
//! to have no backend in is decided here too: canary's share then goes to stable (the
//! kernel falls back to the other group) and a rollout in progress is rolled back;
//! stable fails open: its backends stay in the selection and an alert says so, because
//! stable's traffic is never sent to canary.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use canary_common::{BackendStats, MAX_GROUP_BACKENDS};
use serde::Serialize;

use crate::config::{CheckKind, HealthCheck, OutlierDetection, ServiceConfig};

/// How long a SYN-ACK is awaited before a placed connection counts as unanswered (a
/// client retransmits its SYN after 1 s; a backend slower than that is failing).
pub const ANSWER_LAG: Duration = Duration::from_secs(1);
/// How often passive detection reads a service's per-backend counters.
pub const PASSIVE_PERIOD: Duration = Duration::from_millis(250);

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

/// A backend's cumulative handshake counters at one second, as the kernel counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Sample {
    at_ms: u64,
    placed: u64,
    answered: u64,
    refused: u64,
}

/// One backend's checks and passive record so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendHealth {
    pub addr: SocketAddr,
    /// What the active checks say.
    pub state: State,
    /// Consecutive passes (while down) or failures (while up) towards a change.
    pub streak: u32,
    /// The last check's failure, or why the backend is in its state.
    pub reason: String,
    /// When the state last changed (controller clock, ms); 0: never.
    pub since_ms: u64,
    pub checks: u64,
    pub failures: u64,
    /// Passive: out of the selection until then (controller clock, ms), and why.
    pub ejected_until_ms: Option<u64>,
    pub ejected_reason: String,
    /// Passive: ejections in a row (each doubles the next one's length), and in all.
    pub ejections: u32,
    pub ejected_total: u64,
    #[serde(skip)]
    returned_ms: u64,
    #[serde(skip)]
    samples: VecDeque<Sample>,
}

impl BackendHealth {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            state: State::Up,
            streak: 0,
            reason: "up until its checks or handshakes fail (a backend starts up)".into(),
            since_ms: 0,
            checks: 0,
            failures: 0,
            ejected_until_ms: None,
            ejected_reason: String::new(),
            ejections: 0,
            ejected_total: 0,
            returned_ms: 0,
            samples: VecDeque::new(),
        }
    }

    /// Out of the selection: failed its checks or ejected.
    pub fn down(&self) -> bool {
        self.state == State::Down || self.ejected_until_ms.is_some()
    }

    /// Why the backend is where it is, as status shows it.
    pub fn why(&self) -> &str {
        let passive = self.ejected_until_ms.is_some()
            || (self.checks == 0 && !self.ejected_reason.is_empty());
        if self.state == State::Up && passive {
            &self.ejected_reason
        } else {
            &self.reason
        }
    }

    /// The passive counters now; `Some(reason)` when they eject the backend.
    fn observe(&mut self, spec: &OutlierDetection, now: Sample) -> Option<String> {
        if self.samples.back().is_some_and(|last| {
            now.placed < last.placed || now.answered < last.answered || now.refused < last.refused
        }) {
            // Its counters started over (a new counter slot, cleared stats).
            self.samples.clear();
        }
        self.samples.push_back(now);
        let lag = ANSWER_LAG.as_millis() as u64;
        let horizon = now
            .at_ms
            .saturating_sub(spec.window.as_millis() as u64 + lag);
        while self.samples.len() > 1 && self.samples[1].at_ms <= horizon {
            self.samples.pop_front();
        }
        let base = self.samples[0];
        let end = self
            .samples
            .iter()
            .rev()
            .find(|s| s.at_ms + lag <= now.at_ms)
            .copied()
            .unwrap_or(base);
        // Since the first sample that already had every answer seen so far, nothing
        // placed was answered: those connections failed in a row.
        let quiet = self
            .samples
            .iter()
            .find(|s| s.answered == now.answered)
            .copied()
            .unwrap_or(now);
        // Resets are failures at once; silence only after ANSWER_LAG.
        let in_a_row = end
            .placed
            .saturating_sub(quiet.placed)
            .max(now.refused - quiet.refused);
        let placed = end.placed.saturating_sub(base.placed);
        let answered = now.answered - base.answered;
        let refused = now.refused - base.refused;
        let failed = placed.saturating_sub(answered).max(refused);
        let what = if in_a_row >= u64::from(spec.consecutive_failures) {
            format!("{in_a_row} new connections in a row got no SYN-ACK")
        } else if placed >= u64::from(spec.min_connections)
            && failed as f64 >= spec.failure_ratio * placed as f64
        {
            format!(
                "{failed} of {placed} new connections in {:?} got no SYN-ACK",
                spec.window
            )
        } else {
            return None;
        };
        self.samples.clear();
        self.ejections += 1;
        self.ejected_total += 1;
        let length = spec
            .ejection
            .saturating_mul(1 << (self.ejections - 1).min(16))
            .min(spec.max_ejection);
        self.ejected_until_ms = Some(now.at_ms + length.as_millis() as u64);
        Some(format!(
            "ejected for {length:?} (ejection {} in a row): {what} (in {:?}: {refused} \
             refused by a reset, {} unanswered)",
            self.ejections,
            spec.window,
            failed - refused
        ))
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
    /// Every stable backend failed: they stay in (fail open).
    pub stable_fails_open: bool,
    /// Every canary backend failed (and there is at least one).
    pub canary_down: bool,
}

/// The checks of one service's backends: stable (`groups[0]`) and canary (`groups[1]`)
/// in config order, which is their slot order in the map.
#[derive(Debug, Clone)]
pub struct ServiceHealth {
    /// `[service.health]`: active checks.
    pub spec: Option<HealthCheck>,
    /// `[service.outlier]`: passive detection.
    pub outlier: Option<OutlierDetection>,
    pub groups: [Vec<BackendHealth>; 2],
    /// When passive detection last read the counters (controller clock, ms).
    pub observed_ms: Option<u64>,
}

/// The health state for `cfg` as it is now: `previous` when it judges the same
/// backends the same way, else rebuilt from it (a reload or a release changed them).
pub fn for_config(cfg: &ServiceConfig, previous: Option<&ServiceHealth>) -> Option<ServiceHealth> {
    if cfg.health.is_none() && cfg.outlier.is_none() {
        return None;
    }
    let same = |h: &&ServiceHealth| {
        h.spec == cfg.health
            && h.outlier == cfg.outlier
            && [&cfg.stable, &cfg.canary]
                .iter()
                .zip(&h.groups)
                .all(|(addrs, group)| addrs.iter().eq(group.iter().map(|b| &b.addr)))
    };
    match previous.filter(same) {
        Some(same) => Some(same.clone()),
        None => Some(ServiceHealth::new(
            cfg.health.clone(),
            cfg.outlier.clone(),
            &cfg.stable,
            &cfg.canary,
            previous,
        )),
    }
}

impl ServiceHealth {
    /// The backends of `stable` and `canary`, each keeping what `previous` knew of
    /// the same address (a reload must not bring a down backend back unchecked).
    pub fn new(
        spec: Option<HealthCheck>,
        outlier: Option<OutlierDetection>,
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
            outlier,
            observed_ms: previous.and_then(|p| p.observed_ms),
            groups: [
                stable.iter().map(known).collect(),
                canary.iter().map(known).collect(),
            ],
        }
    }

    /// Where `addr` is checked: its own address, on the check's port if one is set.
    pub fn target(&self, addr: SocketAddr) -> SocketAddr {
        let port = self.spec.as_ref().and_then(|s| s.port);
        SocketAddr::new(addr.ip(), port.unwrap_or(addr.port()))
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

    /// Counts one check of `addr`; returns the backends that entered or left the
    /// selection.
    pub fn record(
        &mut self,
        addr: SocketAddr,
        outcome: Result<(), String>,
        now_ms: u64,
    ) -> Vec<Change> {
        let Some(spec) = &self.spec else {
            return Vec::new();
        };
        let (rise, fall) = (spec.rise, spec.fall);
        let mut changes = Vec::new();
        for (group, backends) in self.groups.iter_mut().enumerate() {
            for b in backends.iter_mut().filter(|b| b.addr == addr) {
                let was_down = b.down();
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
                }
                if b.down() != was_down {
                    changes.push(Change {
                        group,
                        addr,
                        state: if b.down() { State::Down } else { State::Up },
                        reason: b.why().to_string(),
                    });
                }
            }
        }
        changes
    }

    /// The kernel's per-backend counters now (backend `i` of version `g` at position
    /// `g * MAX_GROUP_BACKENDS + i`): ejects backends whose handshakes fail and returns
    /// those whose ejection is over. Returns the backends that entered or left the
    /// selection.
    pub fn observe(&mut self, stats: &[BackendStats], now_ms: u64) -> Vec<Change> {
        let Some(spec) = &self.outlier else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        for (group, backends) in self.groups.iter_mut().enumerate() {
            for (i, b) in backends.iter_mut().enumerate() {
                let was_down = b.down();
                if b.ejected_until_ms.is_some_and(|until| now_ms >= until) {
                    b.ejected_until_ms = None;
                    b.returned_ms = now_ms;
                    b.ejected_reason = format!(
                        "back from its ejection {} in a row, on probation",
                        b.ejections
                    );
                }
                if b.ejections > 0
                    && b.ejected_until_ms.is_none()
                    && now_ms.saturating_sub(b.returned_ms) >= spec.max_ejection.as_millis() as u64
                {
                    b.ejections = 0;
                }
                let Some(s) = stats.get(group * MAX_GROUP_BACKENDS + i) else {
                    continue;
                };
                if b.ejected_until_ms.is_none() {
                    let sample = Sample {
                        at_ms: now_ms,
                        placed: s.connections,
                        answered: s.handshakes,
                        refused: s.refused,
                    };
                    if let Some(reason) = b.observe(spec, sample) {
                        b.ejected_reason = reason;
                        b.since_ms = now_ms;
                    }
                }
                if b.down() != was_down {
                    changes.push(Change {
                        group,
                        addr: b.addr,
                        state: if b.down() { State::Down } else { State::Up },
                        reason: b.why().to_string(),
                    });
                }
            }
        }
        changes
    }

    /// Backends in the selection in `group`.
    pub fn up(&self, group: usize) -> usize {
        self.groups[group].iter().filter(|b| !b.down()).count()
    }

    /// The selection the datapath is told.
    pub fn selection(&self) -> Selection {
        let down = |group: usize| -> Vec<bool> {
            self.groups[group].iter().map(BackendHealth::down).collect()
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

    /// What is checked, as status shows it ("tcp connect every 1s …; passive: …").
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(spec) = &self.spec {
            let what = match &spec.kind {
                CheckKind::Tcp => "tcp connect".to_string(),
                CheckKind::Http { path, status } => format!("http GET {path} -> {status}"),
            };
            let port = spec
                .port
                .map(|p| format!(" on port {p}"))
                .unwrap_or_default();
            parts.push(format!(
                "{what}{port} every {:?} (timeout {:?}, rise {}, fall {})",
                spec.interval, spec.timeout, spec.rise, spec.fall
            ));
        }
        if let Some(o) = &self.outlier {
            parts.push(format!(
                "passive: ejected when {} new connections in a row, or {:.0} % of at least {} \
                 in {:?}, get no SYN-ACK, for {:?} doubling up to {:?}",
                o.consecutive_failures,
                o.failure_ratio * 100.0,
                o.min_connections,
                o.window,
                o.ejection,
                o.max_ejection
            ));
        }
        parts.join("; ")
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
        let mut h = ServiceHealth::new(Some(spec()), None, &[addr(2), addr(3)], &[addr(9)], None);
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
        let mut h = ServiceHealth::new(Some(spec()), None, &[addr(2)], &[addr(9), addr(10)], None);
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
        let mut h = ServiceHealth::new(Some(spec()), None, &[addr(2), addr(3)], &[], None);
        for _ in 0..3 {
            h.record(addr(3), fail(), 1);
        }
        // addr(3) moves to slot 0; a new backend starts up.
        let next = ServiceHealth::new(Some(spec()), None, &[addr(3), addr(4)], &[], Some(&h));
        assert_eq!(next.selection().down, [vec![true, false], vec![]]);
        assert_eq!(next.groups[0][1].state, State::Up);
        assert_eq!(next.addrs(), vec![addr(3), addr(4)]);
    }

    /// Per-backend counters as the kernel would hold them after `placed` new
    /// connections of which `answered` got a SYN-ACK and `refused` a reset.
    fn counters(per_backend: &[(usize, u64, u64, u64)]) -> Vec<BackendStats> {
        let mut out = vec![BackendStats::default(); 2 * MAX_GROUP_BACKENDS];
        for &(position, placed, answered, refused) in per_backend {
            out[position] = BackendStats {
                connections: placed,
                handshakes: answered,
                refused,
                ..Default::default()
            };
        }
        out
    }

    #[test]
    fn a_backend_whose_handshakes_fail_is_ejected_longer_each_time_and_returns() {
        let mut h = ServiceHealth::new(
            None,
            Some(OutlierDetection::default()),
            &[addr(2), addr(3)],
            &[],
            None,
        );
        // 10 new connections a second each; addr(3) refuses 8 of every 10 from t = 5 s.
        let mut refused_from = None;
        let mut ejected_at = None;
        for t in 0..20u64 {
            let bad = t.saturating_sub(5);
            let stats = counters(&[
                (0, 10 * t, 10 * t, 0),
                (1, 10 * t, 10 * t - 8 * bad, 8 * bad),
            ]);
            let changes = h.observe(&stats, t * 1000);
            if bad > 0 && refused_from.is_none() {
                refused_from = Some(t);
            }
            if let Some(c) = changes.first() {
                assert_eq!((c.group, c.addr, c.state), (0, addr(3), State::Down));
                assert!(c.reason.contains("got no SYN-ACK"), "{}", c.reason);
                assert!(c.reason.contains("refused by a reset"), "{}", c.reason);
                assert!(c.reason.contains("ejected for 30s"), "{}", c.reason);
                ejected_at = Some(t);
                break;
            }
        }
        let ejected_at = ejected_at.expect("ejected");
        // Answered 1 in 5: never 5 in a row; the window's share must reach 50 %.
        assert!(
            ejected_at <= refused_from.unwrap() + 8,
            "ejected at {ejected_at} s"
        );
        assert_eq!(h.selection().down, [vec![false, true], vec![]]);
        // Out for 30 s; no new connections reach it meanwhile.
        let frozen = counters(&[(0, 1000, 1000, 0), (1, 200, 104, 96)]);
        assert!(h.observe(&frozen, (ejected_at + 29) * 1000).is_empty());
        let back = h.observe(&frozen, (ejected_at + 30) * 1000);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].state, State::Up);
        assert!(back[0].reason.contains("probation"), "{}", back[0].reason);
        // Failing again at once: the next ejection is twice as long.
        let t0 = ejected_at + 30;
        let mut second = None;
        for dt in 1..10u64 {
            let stats = counters(&[(0, 1000, 1000, 0), (1, 200 + 10 * dt, 104, 96)]);
            if let Some(c) = h.observe(&stats, (t0 + dt) * 1000).first() {
                assert!(c.reason.contains("ejected for 60s"), "{}", c.reason);
                assert!(c.reason.contains("in a row got no SYN-ACK"), "{}", c.reason);
                assert!(c.reason.contains("unanswered"), "{}", c.reason);
                second = Some(dt);
                break;
            }
        }
        // 10 unanswered a second: 5 in a row as soon as they are ANSWER_LAG old.
        assert!(
            second.is_some_and(|dt| dt <= 2),
            "ejected again: {second:?}"
        );
    }

    #[test]
    fn a_healthy_backend_is_never_ejected_by_timing_or_a_falling_rate() {
        let mut h = ServiceHealth::new(
            None,
            Some(OutlierDetection::default()),
            &[addr(2)],
            &[addr(9)],
            None,
        );
        // A burst of 500 connections in one second, answered in the next, then silence;
        // answers arriving up to ANSWER_LAG late; too few placed to judge (canary).
        let mut placed = 0;
        for t in 0..40u64 {
            let answered = placed;
            if t < 20 {
                placed += if t == 10 { 500 } else { 40 };
            }
            let stats = counters(&[(0, placed, answered, 0), (MAX_GROUP_BACKENDS, 4, 0, 4)]);
            assert!(h.observe(&stats, t * 1000).is_empty(), "t = {t}");
        }
        // Counters that start over (a new slot) begin a new window.
        let stats = counters(&[(0, 3, 0, 0)]);
        assert!(h.observe(&stats, 41_000).is_empty());
        assert_eq!(h.selection().down, [vec![false], vec![false]]);
    }

    #[test]
    fn every_canary_backend_ejected_is_a_canary_down_and_both_kinds_must_agree_to_return() {
        let mut h = ServiceHealth::new(
            Some(spec()),
            Some(OutlierDetection::default()),
            &[addr(2)],
            &[addr(9)],
            None,
        );
        let dead = |t: u64| counters(&[(0, 10 * t, 10 * t, 0), (MAX_GROUP_BACKENDS, 10 * t, 0, 0)]);
        let mut t = 0;
        while h.observe(&dead(t), t * 1000).is_empty() {
            t += 1;
            assert!(t < 10, "not ejected");
        }
        assert!(h.selection().canary_down);
        // Its active checks fail too, then the ejection ends: still out (checks).
        for _ in 0..3 {
            assert!(h.record(addr(9), fail(), t * 1000).is_empty());
        }
        assert!(h.observe(&dead(t), (t + 31) * 1000).is_empty());
        assert!(h.selection().canary_down);
        // Checks pass `rise` times: back.
        assert!(h.record(addr(9), Ok(()), (t + 32) * 1000).is_empty());
        assert_eq!(
            h.record(addr(9), Ok(()), (t + 33) * 1000)[0].state,
            State::Up
        );
        assert!(!h.selection().canary_down);
    }
}
