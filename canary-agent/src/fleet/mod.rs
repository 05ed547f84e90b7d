//! One rollout per service across a fleet of agents, through etcd.
//!
//! Every agent keeps splitting with the weights in its own kernel maps; etcd only
//! carries decisions and telemetry between them:
//!
//! * one agent holds the controller: the one whose lease holds `PREFIX/leader`
//!   ([`run`]); it ticks the rollouts and runs the analysis on counters summed over
//!   every node, and writes rollout state, history and desired weights to etcd, each
//!   write guarded by "I am still the leader" in one transaction;
//! * every agent watches `PREFIX/weights/` and applies what the leader decided, and
//!   publishes its own counters and applied weights under `PREFIX/nodes/NAME` each
//!   second, on its lease (so a dead node's entry vanishes);
//! * rollout commands given on any node go to the leader through `PREFIX/commands/`
//!   ([`dispatch`]).
//!
//! Fail static: when etcd cannot be reached nobody changes a weight; the leader pauses
//! its running rollouts with a reason naming etcd and resumes them once etcd answers.
//!
//! The agent side of the interface is [`Link`] (no I/O: queued writes and the fleet's
//! summed counters) plus the `fleet_*` methods of `agent::Agent`.

mod dispatch;
mod etcd;
pub mod trust;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use serde::{Deserialize, Serialize};

pub use self::dispatch::dispatch;
pub use self::etcd::run;
use crate::{
    analysis::VersionCounters,
    api::Request,
    controller::{Clock, Event, Rollout},
};

/// What the fleet asks of the agent it runs in. The agent implements it, so the fleet
/// (a layer below the agent's core) never names the agent.
pub trait Host: Send {
    /// A control request, answered as the control socket would.
    fn handle(&mut self, request: Request) -> anyhow::Result<serde_json::Value>;
    fn fleet_link(&self) -> Option<Link>;
    /// Becoming leader: the rollouts stored in etcd replace this node's copies.
    fn fleet_adopt(&mut self, stored: std::collections::BTreeMap<String, Rollout>);
    /// The controller clock now, and how much faster than real time it runs.
    fn now_ms(&self) -> u64;
    fn clock_speed(&self) -> u32;
    /// A rollout read from etcd, checked against this node's own policy.
    fn fleet_check_rollout(&self, service: &str, rollout: Rollout) -> anyhow::Result<Rollout>;
    /// A follower keeps the leader's rollout.
    fn fleet_mirror(&mut self, service: &str, rollout: Rollout) -> anyhow::Result<()>;
    /// Applies the leader's desired weight to this node's map.
    /// `released`: the leader's release handed the stable role to these backends; a
    /// node whose canary they are does the same.
    fn fleet_apply_weight(
        &mut self,
        service: &str,
        weight_bp: u16,
        released: &[String],
    ) -> anyhow::Result<()>;
    /// This node's applied weights and cumulative counters.
    fn fleet_report(&self) -> NodeReport;
    /// etcd unreachable / reachable again: pauses or resumes the rollouts that would
    /// move. Return the services concerned.
    fn fleet_pause(&mut self, reason: &str) -> Vec<String>;
    fn fleet_resume(&mut self) -> Vec<String>;
}

/// The agent as the fleet's tasks share it.
pub type SharedHost = Arc<Mutex<dyn Host>>;

/// The host behind its mutex; a panic while it was held is an error here.
pub(crate) fn lock<'a>(
    host: &'a Mutex<dyn Host + 'static>,
) -> anyhow::Result<std::sync::MutexGuard<'a, dyn Host + 'static>> {
    host.lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned"))
}

/// Refused keys remembered for status (the oldest make room).
const MAX_REJECTED: usize = 64;

/// Reason prefix of the pause the leader makes when etcd is unreachable; only a
/// rollout paused with it is resumed automatically.
pub const ETCD_PAUSE: &str = "etcd unreachable";

/// A service's desired weight as the leader wrote it (`PREFIX/weights/SERVICE`); the
/// key's etcd mod revision is the weight's revision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DesiredWeight {
    /// The weight of nodes in no region of `regions`.
    pub weight_bp: u16,
    /// Leader's wall clock at the decision, for the apply lag each node reports.
    pub at_ms: u64,
    /// While a policy rolls out in waves: the weight of each region it names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, u16>,
    /// Set by a finished release: the backends that took the stable role (weight 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<String>,
}

impl DesiredWeight {
    /// The weight a node of `region` splits with.
    pub fn for_region(&self, region: Option<&str>) -> u16 {
        region_weight(&self.regions, self.weight_bp, region)
    }
}

/// The weight of `region` in per-region weights: its own, else that of the regions
/// not listed (`others`).
pub fn region_weight(regions: &BTreeMap<String, u16>, others: u16, region: Option<&str>) -> u16 {
    region
        .and_then(|r| regions.get(r))
        .copied()
        .unwrap_or(others)
}

/// A service's rollout as the leader stored it (`PREFIX/rollouts/SERVICE`), with the
/// controller clock it was saved at, so a new leader's clock never runs behind it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRollout {
    pub clock_ms: u64,
    pub rollout: Rollout,
}

/// What a node publishes each second (`PREFIX/nodes/NAME`, on the node's lease).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeReport {
    /// Wall clock of the report: the heartbeat.
    pub at_ms: u64,
    /// `[agent] region` and `zone`, for the waves and status.
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// While a service retires its old version: that version's connections still
    /// open on this node at the last scan.
    #[serde(default)]
    pub retiring: BTreeMap<String, u64>,
    /// Weight applied to each service's map, in basis points.
    pub weights: BTreeMap<String, u16>,
    /// Highest weight revision applied, and how long after the leader's decision the
    /// last one reached this node's map.
    pub weights_revision: i64,
    pub apply_lag_ms: Option<u64>,
    /// Cumulative kernel counters per service: [stable, canary].
    pub counters: BTreeMap<String, [VersionCounters; 2]>,
}

/// A write the agent queued for etcd; the leader flushes them in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Weight {
        service: String,
        weight_bp: u16,
        /// Per region while waves run (see [`DesiredWeight`]).
        regions: BTreeMap<String, u16>,
        released: Vec<String>,
    },
    Rollout {
        service: String,
        rollout: Box<Rollout>,
    },
    Event(Box<Event>),
}

/// The agent's side of the fleet: shared with the etcd task, never doing I/O.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

struct Shared {
    node: String,
    region: Option<String>,
    leading: AtomicBool,
    /// The fleet's weights were read and applied at least once.
    synced: AtomicBool,
    outbox: Mutex<Vec<Write>>,
    /// Per service, per region (`None`: no region): the fleet's totals.
    sums: Mutex<BTreeMap<String, RegionTotals>>,
    /// What the nodes reported last: each one's region and old-version connections.
    nodes: Mutex<BTreeMap<String, NodeReport>>,
    wake: tokio::sync::Notify,
    /// Highest weight revision applied here and its lag from the leader's decision.
    applied: Mutex<(i64, Option<u64>)>,
    /// Set once connected: for status, history and forwarded commands.
    etcd: Mutex<Option<(etcd_client::Client, etcd::Keys)>>,
    /// Counts connections made, so the watch notices a replaced one.
    generation: AtomicU64,
    /// Keys read from etcd and refused, with why (status shows them).
    rejected: Mutex<BTreeMap<String, String>>,
    /// The fleet's leader and nodes as `canary status` last read them, and when.
    view: Mutex<Option<FleetView>>,
}

/// What `canary status` last read of the fleet: shown, with its age, while etcd does
/// not answer.
#[derive(Debug, Clone)]
pub(crate) struct FleetView {
    pub read_at: std::time::Instant,
    pub leader: Option<String>,
    pub nodes: Vec<crate::api::FleetNode>,
}

impl Link {
    pub fn new(node: &str, region: Option<&str>) -> Self {
        Self {
            shared: Arc::new(Shared {
                node: node.into(),
                region: region.map(str::to_string),
                leading: AtomicBool::new(false),
                synced: AtomicBool::new(false),
                outbox: Mutex::new(Vec::new()),
                sums: Mutex::new(BTreeMap::new()),
                nodes: Mutex::new(BTreeMap::new()),
                wake: tokio::sync::Notify::new(),
                applied: Mutex::new((0, None)),
                etcd: Mutex::new(None),
                generation: AtomicU64::new(0),
                rejected: Mutex::new(BTreeMap::new()),
                view: Mutex::new(None),
            }),
        }
    }

    pub fn node(&self) -> &str {
        &self.shared.node
    }

    pub fn region(&self) -> Option<&str> {
        self.shared.region.as_deref()
    }

    /// The region of every node that reported last second (this one included, once
    /// its own report was read), by node name.
    pub fn regions(&self) -> BTreeMap<String, Option<String>> {
        let Ok(nodes) = self.shared.nodes.lock() else {
            return BTreeMap::new();
        };
        nodes
            .iter()
            .map(|(n, r)| (n.clone(), r.region.clone()))
            .collect()
    }

    /// The old version's connections the other nodes still hold for `service`, or
    /// `None` while one of the nodes that have the service has not begun retiring.
    pub fn retiring_elsewhere(&self, service: &str) -> Option<u64> {
        let nodes = self.shared.nodes.lock().ok()?;
        let mut sum = 0u64;
        for (node, report) in nodes.iter() {
            if *node == self.shared.node || !report.counters.contains_key(service) {
                continue;
            }
            sum = sum.saturating_add(*report.retiring.get(service)?);
        }
        Some(sum)
    }

    fn set_nodes(&self, reports: BTreeMap<String, NodeReport>) {
        if let Ok(mut nodes) = self.shared.nodes.lock() {
            *nodes = reports;
        }
    }

    /// Whether this agent holds the fleet's controller.
    pub fn leading(&self) -> bool {
        self.shared.leading.load(Ordering::SeqCst)
    }

    fn set_leading(&self, leading: bool) {
        self.shared.leading.store(leading, Ordering::SeqCst);
    }

    /// Whether this node has applied the fleet's weights since it started.
    pub fn synced(&self) -> bool {
        self.shared.synced.load(Ordering::SeqCst)
    }

    fn set_synced(&self) {
        self.shared.synced.store(true, Ordering::SeqCst);
    }

    /// Queues a write for etcd (only the leader's are flushed).
    pub fn push(&self, write: Write) {
        if let Ok(mut outbox) = self.shared.outbox.lock() {
            outbox.push(write);
        }
        self.shared.wake.notify_one();
    }

    fn take_outbox(&self) -> Vec<Write> {
        self.shared
            .outbox
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default()
    }

    /// Puts back writes that could not be flushed, ahead of newer ones.
    fn requeue(&self, mut writes: Vec<Write>) {
        if let Ok(mut outbox) = self.shared.outbox.lock() {
            writes.append(&mut outbox);
            *outbox = writes;
        }
    }

    /// The cumulative counters of a service, [stable, canary], summed over the nodes
    /// of the regions `include` accepts, once the leader has read every report.
    pub fn summed(
        &self,
        service: &str,
        include: impl Fn(Option<&str>) -> bool,
    ) -> Option<[VersionCounters; 2]> {
        let sums = self.shared.sums.lock().ok()?;
        let mut total = [VersionCounters::zero(), VersionCounters::zero()];
        let zero = VersionCounters::zero();
        for (region, counters) in sums.get(service)? {
            if include(region.as_deref()) {
                for (t, c) in total.iter_mut().zip(counters) {
                    t.accumulate(&zero, c);
                }
            }
        }
        Some(total)
    }

    fn set_applied(&self, revision: i64, lag_ms: u64) {
        if let Ok(mut a) = self.shared.applied.lock() {
            if revision > a.0 {
                *a = (revision, Some(lag_ms));
            }
        }
    }

    fn applied(&self) -> (i64, Option<u64>) {
        self.shared.applied.lock().map_or((0, None), |a| *a)
    }

    fn set_client(&self, client: etcd_client::Client, keys: etcd::Keys) {
        if let Ok(mut e) = self.shared.etcd.lock() {
            *e = Some((client, keys));
        }
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    fn client(&self) -> Option<(etcd_client::Client, etcd::Keys)> {
        self.shared.etcd.lock().ok()?.clone()
    }

    /// Records a key refused (logged once per reason); the others go on applying.
    fn reject(&self, key: &[u8], why: &anyhow::Error) {
        let key = trust::show_key(key);
        let why = format!("{why:#}");
        let Ok(mut rejected) = self.shared.rejected.lock() else {
            return;
        };
        if rejected.get(&key) != Some(&why) {
            tracing::warn!(%key, reason = %why, "fleet: refused a value from etcd");
            if rejected.len() >= MAX_REJECTED && !rejected.contains_key(&key) {
                rejected.pop_first();
            }
            rejected.insert(key, why);
        }
    }

    /// A key accepted again (a good value replaced a refused one).
    fn accept(&self, key: &[u8]) {
        if let Ok(mut rejected) = self.shared.rejected.lock() {
            rejected.remove(&trust::show_key(key));
        }
    }

    /// The keys refused lately, with why.
    pub fn rejected(&self) -> BTreeMap<String, String> {
        self.shared
            .rejected
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    fn set_view(&self, view: FleetView) {
        if let Ok(mut v) = self.shared.view.lock() {
            *v = Some(view);
        }
    }

    fn view(&self) -> Option<FleetView> {
        self.shared.view.lock().ok()?.clone()
    }

    fn set_sums(&self, sums: BTreeMap<String, RegionTotals>) {
        if let Ok(mut s) = self.shared.sums.lock() {
            *s = sums;
        }
    }
}

/// Fleet totals per service, [stable, canary], built from each node's own increments
/// (the leader's aggregation each second).
///
/// Summing the nodes' cumulative counters would make the total jump whenever the set
/// of reports changes: a node that leaves (lease expired) or restarts takes its whole
/// history out of the sum, which the analysis must read as a counter reset (the whole
/// fleet's history then enters as one second's increment), and a node that joins adds
/// its whole history at once. Instead each node's report is differenced against that
/// node's previous report, with that node's own reset detection (a datapath restarted
/// on one node restarts only its counters), and the totals are the running sum of those
/// increments: monotone, and a node adds only what it saw since its last report. A node
/// seen for the first time (or again after its report vanished) sets a baseline.
#[derive(Debug, Default, Clone)]
pub struct FleetTotals {
    /// Each reporting node's latest raw counters, per service.
    last: BTreeMap<String, BTreeMap<String, [VersionCounters; 2]>>,
    /// Per service and region: the sum of all increments since this leader began
    /// summing (a wave's analysis sums its regions).
    totals: BTreeMap<String, RegionTotals>,
}

/// [stable, canary] totals per region (`None`: nodes without one).
pub type RegionTotals = BTreeMap<Option<String>, [VersionCounters; 2]>;

impl FleetTotals {
    /// Takes the reports present now, by node name; nodes missing from them are
    /// forgotten (their increments so far stay in the totals).
    pub fn update<'a>(&mut self, reports: impl IntoIterator<Item = (&'a str, &'a NodeReport)>) {
        let mut last = BTreeMap::new();
        for (node, report) in reports {
            let prev = self.last.remove(node).unwrap_or_default();
            for (service, next) in &report.counters {
                let total = self
                    .totals
                    .entry(service.clone())
                    .or_default()
                    .entry(report.region.clone())
                    .or_insert_with(|| [VersionCounters::zero(), VersionCounters::zero()]);
                // A service new on this node sets its baseline.
                let base = prev.get(service).unwrap_or(next);
                for ((total, base), next) in total.iter_mut().zip(base).zip(next) {
                    total.accumulate(base, next);
                }
            }
            last.insert(node.to_string(), report.counters.clone());
        }
        self.last = last;
    }

    /// The fleet's totals, [stable, canary] per service and region.
    pub fn sums(&self) -> BTreeMap<String, RegionTotals> {
        self.totals.clone()
    }
}

/// The controller clock of a fleet member: the agent's clock, moved forward when this
/// agent takes over a rollout saved by a leader whose clock ran ahead (scaled clocks
/// of agents started at different times disagree), so dwell never runs backwards.
pub struct FleetClock {
    inner: Arc<dyn Clock>,
    offset_ms: AtomicU64,
}

impl FleetClock {
    pub fn new(inner: Arc<dyn Clock>) -> Self {
        Self {
            inner,
            offset_ms: AtomicU64::new(0),
        }
    }

    /// Makes `now_ms()` at least `at_least_ms` from now on.
    pub fn catch_up(&self, at_least_ms: u64) {
        let now = self.now_ms();
        if at_least_ms > now {
            self.offset_ms
                .fetch_add(at_least_ms - now, Ordering::SeqCst);
        }
    }
}

impl Clock for FleetClock {
    fn now_ms(&self) -> u64 {
        self.inner
            .now_ms()
            .saturating_add(self.offset_ms.load(Ordering::SeqCst))
    }

    fn speed(&self) -> u32 {
        self.inner.speed()
    }
}

/// Wall-clock milliseconds, for heartbeats and apply lag (not the controller clock).
fn wall_ms() -> u64 {
    crate::controller::SystemClock.now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::SimClock;

    fn report(node_requests: &[(&str, u64, u64)]) -> Vec<(String, NodeReport)> {
        node_requests
            .iter()
            .map(|&(node, requests, errors)| {
                let c = VersionCounters {
                    requests,
                    responses: [0, requests - errors, 0, 0, errors],
                    ..VersionCounters::zero()
                };
                let mut r = NodeReport::default();
                r.counters.insert("web".into(), [c.clone(), c]);
                (node.to_string(), r)
            })
            .collect()
    }

    #[test]
    fn fleet_totals_add_each_nodes_own_increments() {
        let mut totals = FleetTotals::default();
        let mut feed = |reports: Vec<(String, NodeReport)>| {
            totals.update(reports.iter().map(|(n, r)| (n.as_str(), r)));
            let [stable, _] = totals.sums()["web"][&None].clone();
            (stable.requests, stable.responses[4])
        };
        // Two nodes with long histories: the first reading is a baseline.
        assert_eq!(
            feed(report(&[("a", 1_000_000, 900), ("b", 500_000, 400)])),
            (0, 0)
        );
        assert_eq!(
            feed(report(&[("a", 1_000_100, 900), ("b", 500_050, 401)])),
            (150, 1)
        );
        // b restarts: its counters begin again at 30; only those 30 are new. A node
        // joins with a long history: it sets its baseline and adds nothing.
        assert_eq!(
            feed(report(&[
                ("a", 1_000_200, 900),
                ("b", 30, 0),
                ("c", 7_000_000, 7_000)
            ])),
            (280, 1)
        );
        // a's report vanishes (lease expired): the totals keep what it added, and
        // nothing goes backwards.
        assert_eq!(
            feed(report(&[("b", 80, 2), ("c", 7_000_010, 7_000)])),
            (340, 3)
        );
        // a comes back with its whole history: a baseline again, not a burst.
        assert_eq!(
            feed(report(&[
                ("a", 1_000_900, 905),
                ("b", 90, 2),
                ("c", 7_000_020, 7_000)
            ])),
            (360, 3)
        );
        assert_eq!(
            feed(report(&[
                ("a", 1_001_000, 905),
                ("b", 100, 2),
                ("c", 7_000_030, 7_000)
            ])),
            (480, 3)
        );
    }

    #[test]
    fn totals_saturate_instead_of_wrapping() {
        let mut totals = FleetTotals::default();
        let at = |requests| {
            let c = VersionCounters {
                requests,
                ..VersionCounters::zero()
            };
            let mut r = NodeReport::default();
            r.counters.insert("web".into(), [c.clone(), c]);
            r
        };
        for (a, b) in [(0, 0), (u64::MAX - 1, 0), (u64::MAX, u64::MAX)] {
            let (ra, rb) = (at(a), at(b));
            totals.update([("a", &ra), ("b", &rb)]);
        }
        assert_eq!(totals.sums()["web"][&None][0].requests, u64::MAX);
    }

    #[test]
    fn fleet_clock_only_moves_forward() {
        let sim = Arc::new(SimClock::new(1_000));
        let clock = FleetClock::new(sim.clone());
        clock.catch_up(500);
        assert_eq!(clock.now_ms(), 1_000);
        clock.catch_up(5_000);
        assert_eq!(clock.now_ms(), 5_000);
        sim.advance_ms(10);
        assert_eq!(clock.now_ms(), 5_010);
    }

    #[test]
    fn requeued_writes_stay_ahead_of_newer_ones() {
        let link = Link::new("n1", None);
        let w = |bp| Write::Weight {
            service: "web".into(),
            weight_bp: bp,
            regions: BTreeMap::new(),
            released: Vec::new(),
        };
        link.push(w(1));
        let taken = link.take_outbox();
        link.push(w(2));
        link.requeue(taken);
        assert_eq!(link.take_outbox(), [w(1), w(2)]);
    }
}
