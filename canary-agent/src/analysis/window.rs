//! Per-second cumulative counters, reset-safe accumulation and sliding windows.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use canary_common::histogram::LATENCY_BUCKETS;

/// Cumulative counters of one version (stable or canary), as summed from the kernel maps
/// (plus custom-metric counts from their queries). Also used for window deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionCounters {
    /// HTTP requests seen.
    pub requests: u64,
    /// Responses by status class: index 0 = 1xx … index 4 = 5xx.
    pub responses: [u64; 5],
    /// New TCP connections.
    pub conn_new: u64,
    /// Connections reset.
    pub conn_reset: u64,
    /// Connection attempts that never got a SYN-ACK.
    pub conn_failed: u64,
    /// Request→response latency histogram, `LATENCY_BUCKETS` cumulative counts (shorter
    /// vectors are zero-extended, entries past the end are folded into the last bucket).
    pub latency: Vec<u64>,
    /// Custom metrics by name: cumulative (events, trials).
    pub custom: BTreeMap<String, (u64, u64)>,
}

impl VersionCounters {
    /// All-zero counters with a full-size latency histogram.
    pub fn zero() -> Self {
        Self {
            latency: vec![0; LATENCY_BUCKETS],
            ..Self::default()
        }
    }

    /// Latency bucket `i`, folding any entries past the end into the last bucket.
    fn latency_at(&self, i: usize) -> u64 {
        if i + 1 < LATENCY_BUCKETS {
            self.latency.get(i).copied().unwrap_or(0)
        } else {
            self.latency
                .iter()
                .skip(i)
                .fold(0u64, |s, &v| s.saturating_add(v))
        }
    }

    /// True if any kernel counter went down since `prev`: the map was recreated or the
    /// datapath restarted, and every kernel counter restarted from zero.
    fn kernel_reset_since(&self, prev: &Self) -> bool {
        self.requests < prev.requests
            || self.conn_new < prev.conn_new
            || self.conn_reset < prev.conn_reset
            || self.conn_failed < prev.conn_failed
            || self
                .responses
                .iter()
                .zip(&prev.responses)
                .any(|(n, p)| n < p)
            || (0..LATENCY_BUCKETS).any(|i| self.latency_at(i) < prev.latency_at(i))
    }

    /// Adds what happened between the raw readings `prev` and `next` to `self`.
    ///
    /// Kernel counters restart together, so a decrease of any one of them means all of
    /// them restarted from zero and the new reading *is* the increase since the restart
    /// (what happened between the last reading and the restart is lost, which is the
    /// best that can be done). Custom metrics come from separate queries and are
    /// handled per name: a decrease restarts that name only, and a name seen for the
    /// first time only sets a baseline (its cumulative value may cover months).
    pub fn accumulate(&mut self, prev: &Self, next: &Self) {
        // Saturating: counters may come from other nodes (fleet reports), and overflow
        // checks are off in release builds.
        let reset = next.kernel_reset_since(prev);
        let inc = |n: u64, p: u64| if reset { n } else { n.saturating_sub(p) };
        let add = |acc: &mut u64, n: u64| *acc = acc.saturating_add(n);
        add(&mut self.requests, inc(next.requests, prev.requests));
        for (i, acc) in self.responses.iter_mut().enumerate() {
            add(acc, inc(next.responses[i], prev.responses[i]));
        }
        add(&mut self.conn_new, inc(next.conn_new, prev.conn_new));
        add(&mut self.conn_reset, inc(next.conn_reset, prev.conn_reset));
        add(
            &mut self.conn_failed,
            inc(next.conn_failed, prev.conn_failed),
        );
        self.latency.resize(LATENCY_BUCKETS, 0);
        for (i, acc) in self.latency.iter_mut().enumerate() {
            add(acc, inc(next.latency_at(i), prev.latency_at(i)));
        }
        for (name, &(ev, tr)) in &next.custom {
            let Some(&(pev, ptr)) = prev.custom.get(name) else {
                self.custom.entry(name.clone()).or_insert((0, 0));
                continue;
            };
            let (dev, dtr) = if ev < pev || tr < ptr {
                (ev, tr)
            } else {
                (ev - pev, tr - ptr)
            };
            let acc = self.custom.entry(name.clone()).or_insert((0, 0));
            add(&mut acc.0, dev);
            add(&mut acc.1, dtr);
        }
    }

    /// Every count multiplied by `f` (rounded): the same rates with `f` times the data,
    /// for projecting how much more traffic a test needs.
    pub fn scaled(&self, f: f64) -> Self {
        let m = |v: u64| (v as f64 * f).round() as u64;
        let mut responses = self.responses;
        responses.iter_mut().for_each(|r| *r = m(*r));
        Self {
            requests: m(self.requests),
            responses,
            conn_new: m(self.conn_new),
            conn_reset: m(self.conn_reset),
            conn_failed: m(self.conn_failed),
            latency: self.latency.iter().map(|&v| m(v)).collect(),
            custom: self
                .custom
                .iter()
                .map(|(k, &(e, t))| (k.clone(), (m(e), m(t))))
                .collect(),
        }
    }

    /// `self − base` for two accumulated (hence monotone) snapshots.
    fn minus(&self, base: &Self) -> Self {
        let sub = |a: u64, b: u64| a.saturating_sub(b);
        let mut responses = [0; 5];
        for (i, r) in responses.iter_mut().enumerate() {
            *r = sub(self.responses[i], base.responses[i]);
        }
        Self {
            requests: sub(self.requests, base.requests),
            responses,
            conn_new: sub(self.conn_new, base.conn_new),
            conn_reset: sub(self.conn_reset, base.conn_reset),
            conn_failed: sub(self.conn_failed, base.conn_failed),
            latency: (0..LATENCY_BUCKETS)
                .map(|i| sub(self.latency_at(i), base.latency_at(i)))
                .collect(),
            custom: self
                .custom
                .iter()
                .map(|(name, &(ev, tr))| {
                    let (bev, btr) = base.custom.get(name).copied().unwrap_or((0, 0));
                    (name.clone(), (sub(ev, bev), sub(tr, btr)))
                })
                .collect(),
        }
    }
}

/// Counter deltas of both versions over one common interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Seconds actually covered (shorter than asked while history is still filling).
    pub span_s: u64,
    pub stable: VersionCounters,
    pub canary: VersionCounters,
}

impl Window {
    /// Both versions' counts multiplied by `f` over the same span.
    pub fn scaled(&self, f: f64) -> Self {
        Self {
            span_s: self.span_s,
            stable: self.stable.scaled(f),
            canary: self.canary.scaled(f),
        }
    }
}

/// The base of a cumulative window: everything after it, however long ago, for tests
/// whose data only accumulate (see [`History::since`]).
#[derive(Debug, Clone)]
pub enum Mark {
    /// Before the first reading: everything ever recorded.
    Start,
    At(Box<Snapshot>),
}

/// One accumulated (reset-free, monotone) reading of both versions.
#[derive(Debug, Clone)]
pub struct Snapshot {
    t_s: u64,
    stable: VersionCounters,
    canary: VersionCounters,
}

/// Ring of per-second snapshots of both versions.
///
/// Both versions are stored in the same snapshot, so every window covers exactly the
/// same interval for canary and stable. Snapshots hold *accumulated* counters (see
/// [`VersionCounters`] resets), so a window delta is never negative or inflated by a
/// counter reset.
#[derive(Debug, Clone)]
pub struct History {
    retain_s: u64,
    snaps: VecDeque<Snapshot>,
    last_raw: Option<(VersionCounters, VersionCounters)>,
    /// Newest snapshot already handed out by [`History::take_step`].
    stepped: Option<Snapshot>,
    /// Time of the first reading ever (the ring forgets it).
    first_s: Option<u64>,
}

impl History {
    /// Keeps enough snapshots to answer windows of up to `retain_s` seconds.
    pub fn new(retain_s: u64) -> Self {
        Self {
            retain_s: retain_s.max(1),
            snaps: VecDeque::new(),
            last_raw: None,
            stepped: None,
            first_s: None,
        }
    }

    /// Records the raw cumulative readings taken at `t_s`.
    ///
    /// A reading whose time is not after the newest one (a duplicate tick or a clock
    /// step back) updates the newest snapshot instead of adding one, so time in the
    /// ring never goes backwards.
    pub fn push(&mut self, t_s: u64, stable: &VersionCounters, canary: &VersionCounters) {
        let (mut acc_s, mut acc_c) = match self.snaps.back() {
            Some(s) => (s.stable.clone(), s.canary.clone()),
            None => (VersionCounters::zero(), VersionCounters::zero()),
        };
        match &self.last_raw {
            Some((prev_s, prev_c)) => {
                acc_s.accumulate(prev_s, stable);
                acc_c.accumulate(prev_c, canary);
            }
            None => {
                // The first reading is the baseline: nothing is known about when its
                // counts happened. Custom names get their baseline entry.
                acc_s.accumulate(stable, stable);
                acc_c.accumulate(canary, canary);
            }
        }
        self.last_raw = Some((stable.clone(), canary.clone()));
        self.first_s.get_or_insert(t_s);
        match self.snaps.back_mut() {
            Some(last) if t_s <= last.t_s => {
                last.stable = acc_s;
                last.canary = acc_c;
            }
            _ => self.snaps.push_back(Snapshot {
                t_s,
                stable: acc_s,
                canary: acc_c,
            }),
        }
        // Drop snapshots no longer needed as the base of the longest window: keep the
        // newest one at or before `newest − retain_s`.
        let horizon = t_s.saturating_sub(self.retain_s);
        while self.snaps.len() > 1 && self.snaps[1].t_s <= horizon {
            self.snaps.pop_front();
        }
    }

    /// The newest reading as the base of a cumulative window.
    pub fn mark(&self) -> Mark {
        self.snaps
            .back()
            .map_or(Mark::Start, |s| Mark::At(Box::new(s.clone())))
    }

    /// Delta between the newest snapshot at or before `now_s` and `mark`, however old
    /// `mark` is (snapshots are accumulated, so the difference needs no ring entry).
    /// `None` before any reading after the mark.
    pub fn since(&self, mark: &Mark, now_s: u64) -> Option<Window> {
        let end_idx = self
            .snaps
            .partition_point(|s| s.t_s <= now_s)
            .checked_sub(1)?;
        let end = &self.snaps[end_idx];
        let zero = VersionCounters::zero();
        let (t0, stable, canary) = match mark {
            Mark::Start => (self.first_s?, &zero, &zero),
            Mark::At(base) => (base.t_s, &base.stable, &base.canary),
        };
        Some(Window {
            span_s: end.t_s.saturating_sub(t0),
            stable: end.stable.minus(stable),
            canary: end.canary.minus(canary),
        })
    }

    /// Time of the newest reading.
    pub fn newest_s(&self) -> Option<u64> {
        self.snaps.back().map(|s| s.t_s)
    }

    /// What was added since the previous call (the first call: since the first
    /// reading), as a window ending at the newest snapshot; `None` before any reading.
    /// A duplicate tick that updated the newest snapshot yields only its new counts.
    pub fn take_step(&mut self) -> Option<Window> {
        let newest = self.snaps.back()?.clone();
        let base = self.stepped.replace(newest.clone()).unwrap_or(Snapshot {
            t_s: newest.t_s,
            stable: VersionCounters::zero(),
            canary: VersionCounters::zero(),
        });
        Some(Window {
            span_s: newest.t_s.saturating_sub(base.t_s),
            stable: newest.stable.minus(&base.stable),
            canary: newest.canary.minus(&base.canary),
        })
    }

    /// Delta between the newest snapshot at or before `now_s` and the newest one at or
    /// before `now_s − window_s` (or the oldest available). `None` when there is no
    /// snapshot at or before `now_s`.
    pub fn window(&self, now_s: u64, window_s: u64) -> Option<Window> {
        let end_idx = self
            .snaps
            .partition_point(|s| s.t_s <= now_s)
            .checked_sub(1)?;
        let start_t = now_s.saturating_sub(window_s);
        let base_idx = self
            .snaps
            .partition_point(|s| s.t_s <= start_t)
            .saturating_sub(1);
        let (end, base) = (&self.snaps[end_idx], &self.snaps[base_idx.min(end_idx)]);
        Some(Window {
            span_s: end.t_s - base.t_s,
            stable: end.stable.minus(&base.stable),
            canary: end.canary.minus(&base.canary),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(requests: u64, errors: u64, lat: &[(usize, u64)]) -> VersionCounters {
        let mut c = VersionCounters::zero();
        c.requests = requests;
        c.responses[1] = requests - errors;
        c.responses[4] = errors;
        for &(i, n) in lat {
            c.latency[i] = n;
        }
        c
    }

    #[test]
    fn window_is_delta_over_same_interval() {
        let mut h = History::new(10);
        for t in 0..=20u64 {
            h.push(t, &reading(100 * t, t, &[]), &reading(10 * t, 2 * t, &[]));
        }
        let w = h.window(20, 5).unwrap();
        assert_eq!(w.span_s, 5);
        assert_eq!(w.stable.requests, 500);
        assert_eq!(w.canary.requests, 50);
        assert_eq!(w.canary.responses[4], 10);
        // Longer than retained: the oldest available snapshot is the base.
        let w = h.window(20, 100).unwrap();
        assert_eq!(w.span_s, 10);
        assert_eq!(w.stable.requests, 1000);
        // Before any data.
        assert!(History::new(5).window(3, 2).is_none());
    }

    #[test]
    fn counter_reset_is_not_negative_or_huge() {
        let mut h = History::new(60);
        h.push(
            1,
            &reading(1000, 10, &[(5, 1000)]),
            &reading(100, 1, &[(5, 100)]),
        );
        h.push(
            2,
            &reading(1200, 12, &[(5, 1200)]),
            &reading(120, 1, &[(5, 120)]),
        );
        // Map recreated between t=2 and t=3: counters restart from zero.
        h.push(
            3,
            &reading(150, 3, &[(5, 150)]),
            &reading(15, 0, &[(5, 15)]),
        );
        h.push(
            4,
            &reading(350, 5, &[(5, 350)]),
            &reading(35, 1, &[(5, 35)]),
        );
        let w = h.window(4, 60).unwrap();
        assert_eq!(w.stable.requests, 200 + 150 + 200);
        assert_eq!(w.stable.responses[4], 2 + 3 + 2);
        assert_eq!(w.stable.latency[5], 200 + 150 + 200);
        assert_eq!(w.canary.requests, 20 + 15 + 20);
        assert_eq!(w.canary.responses[4], 1);
    }

    #[test]
    fn partial_reset_of_one_field_resets_the_group() {
        let mut h = History::new(60);
        let mut a = reading(1000, 10, &[]);
        h.push(1, &a, &a);
        // Requests went down (restart) while 5xx is numerically higher: after a restart
        // the 5xx reading is the count since the restart, not a difference.
        a = reading(100, 20, &[]);
        h.push(2, &a, &a);
        let w = h.window(2, 60).unwrap();
        assert_eq!(w.stable.requests, 100);
        assert_eq!(w.stable.responses[4], 20);
    }

    #[test]
    fn custom_metrics_reset_independently_and_new_names_baseline() {
        let mut h = History::new(60);
        let mut s = VersionCounters::zero();
        s.custom.insert("conv".into(), (5_000_000, 90_000_000));
        h.push(1, &s, &s);
        s.custom.insert("conv".into(), (5_000_010, 90_000_100));
        s.custom.insert("late".into(), (77, 777));
        h.push(2, &s, &s);
        s.custom.insert("conv".into(), (4, 50)); // query source restarted
        s.custom.insert("late".into(), (80, 800));
        h.push(3, &s, &s);
        let w = h.window(3, 60).unwrap();
        assert_eq!(w.stable.custom["conv"], (14, 150));
        assert_eq!(w.stable.custom["late"], (3, 23));
    }

    #[test]
    fn short_and_long_latency_vectors() {
        let mut h = History::new(60);
        let mut a = VersionCounters::default(); // empty histogram
        h.push(1, &a, &a);
        a.latency = vec![0; LATENCY_BUCKETS + 3];
        a.latency[2] = 4;
        a.latency[LATENCY_BUCKETS + 1] = 5; // folded into the last bucket
        h.push(2, &a, &a);
        let w = h.window(2, 60).unwrap();
        assert_eq!(w.canary.latency.len(), LATENCY_BUCKETS);
        assert_eq!(w.canary.latency[2], 4);
        assert_eq!(w.canary.latency[LATENCY_BUCKETS - 1], 5);
    }

    #[test]
    fn duplicate_or_backwards_time_updates_newest() {
        let mut h = History::new(60);
        h.push(5, &reading(10, 0, &[]), &reading(1, 0, &[]));
        h.push(6, &reading(20, 0, &[]), &reading(2, 0, &[]));
        h.push(6, &reading(30, 0, &[]), &reading(3, 0, &[]));
        h.push(4, &reading(40, 0, &[]), &reading(4, 0, &[]));
        let w = h.window(6, 60).unwrap();
        assert_eq!(w.span_s, 1);
        assert_eq!(w.stable.requests, 30);
    }

    #[test]
    fn since_a_mark_outlives_the_ring() {
        let mut h = History::new(10);
        let start = h.mark();
        h.push(0, &reading(0, 0, &[]), &reading(0, 0, &[]));
        for t in 1..=5u64 {
            h.push(t, &reading(100 * t, 0, &[]), &reading(10 * t, t, &[]));
        }
        let mark = h.mark();
        for t in 6..=100u64 {
            h.push(t, &reading(100 * t, 0, &[]), &reading(10 * t, t, &[]));
        }
        let w = h.since(&mark, 100).unwrap();
        assert_eq!(
            (w.span_s, w.stable.requests, w.canary.responses[4]),
            (95, 9500, 95)
        );
        let w = h.since(&start, 100).unwrap();
        assert_eq!((w.span_s, w.stable.requests), (100, 10_000));
        // Scaling keeps the rates.
        let s = w.scaled(2.5);
        assert_eq!((s.stable.requests, s.canary.responses[4]), (25_000, 250));
    }

    #[test]
    fn retention_keeps_a_base_for_the_longest_window() {
        let mut h = History::new(30);
        for t in 0..1000u64 {
            h.push(t, &reading(t, 0, &[]), &reading(t, 0, &[]));
        }
        assert!(h.snaps.len() <= 32);
        let w = h.window(999, 30).unwrap();
        assert_eq!((w.span_s, w.stable.requests), (30, 30));
    }
}
