//! The router's shared state: each routed service (its rules, caps, counts, pools and
//! split counter) and what every task of the proxy shares (the splice maps, the stop
//! signal, the hand-over record).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{anyhow, Result};
use canary_common::{Group, ServiceKey, ServiceValue};

use super::counts::Counts;
use super::handover::Record;
use super::pool::Clients;
use crate::config::ServiceConfig;
use crate::datapath::{service_key, Splicer};
use crate::policy::routing::Routing;

/// Limits of a request head, per service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// A routed service as the proxy sees it.
pub struct RoutedService {
    pub id: u32,
    pub cfg: ServiceConfig,
    pub routing: Routing,
    pub limits: HeadLimits,
}

pub(super) struct Service {
    pub id: u32,
    pub cfg: ServiceConfig,
    pub key: ServiceKey,
    /// The rules and head limits in force (a reload replaces them).
    rules: RwLock<(Arc<Routing>, HeadLimits)>,
    pub counts: Arc<Counts>,
    /// The smooth counter of the per-request split.
    pub exact: AtomicU32,
    /// Round-robin position on each version's ring.
    pub next: [AtomicUsize; 2],
    /// Both versions' backends of the generation last seen in the services map: a
    /// generation never changes, so they are read from the kernel once per install.
    groups: Mutex<Option<(u32, Arc<[Group; 2]>)>>,
    /// Set by the agent each tick from the rollout state (the services map's own flag
    /// is read per request too).
    pub rolled_back: AtomicBool,
    pub clients: Clients,
    /// Open connections per client address (for `max_client_connections`).
    per_client: Mutex<HashMap<IpAddr, u32>>,
}

pub(super) struct Shared {
    splicer: RwLock<Splicer>,
    pub services: Vec<Arc<Service>>,
    /// Raised by a hand-over or a stop: accept loops give up their listeners,
    /// connections finish their requests in flight and close (or are handed over).
    stop: tokio::sync::watch::Sender<bool>,
    /// A hand-over (not a stop): idle connections and listeners go to the next image.
    handing: AtomicBool,
    handed: Mutex<Record>,
    /// Tasks (accept loops and connections) that have not yet ended or handed over.
    tasks: AtomicU64,
}

impl Service {
    /// The backends `value` names, from the cache or the kernel.
    pub fn groups(&self, splicer: &Splicer, value: &ServiceValue) -> Option<Arc<[Group; 2]>> {
        let mut cache = self.groups.lock().ok()?;
        if let Some((gen, groups)) = cache.as_ref().filter(|(gen, _)| *gen == value.gen) {
            debug_assert_eq!(*gen, value.gen);
            return Some(groups.clone());
        }
        let groups = Arc::new([
            splicer.group(value.id, value.gen, 0)?,
            splicer.group(value.id, value.gen, 1)?,
        ]);
        *cache = Some((value.gen, groups.clone()));
        Some(groups)
    }

    pub fn new(routed: RoutedService) -> Result<Self> {
        let counts = Arc::new(Counts::default());
        Ok(Self {
            id: routed.id,
            key: service_key(&routed.cfg),
            clients: Clients::new(&counts, routed.cfg.backend_protocol)?,
            cfg: routed.cfg,
            rules: RwLock::new((Arc::new(routed.routing), routed.limits)),
            counts,
            exact: AtomicU32::new(0),
            next: Default::default(),
            groups: Mutex::new(None),
            rolled_back: AtomicBool::new(false),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    pub fn rules(&self) -> (Arc<Routing>, HeadLimits) {
        let rules = self.rules.read().unwrap_or_else(|e| e.into_inner());
        (rules.0.clone(), rules.1)
    }

    /// New rules and limits for requests decided from now on.
    pub fn set_rules(&self, routing: Routing, limits: HeadLimits) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(routing), limits);
    }

    /// Takes a place for a connection from `ip`, or says which cap refused it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let mut per = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let open = self.counts.open.load(Ordering::Relaxed);
        let mine = per.get(&ip).copied().unwrap_or(0);
        if open >= self.cfg.max_connections as u64 || mine >= self.cfg.max_client_connections {
            return None;
        }
        per.insert(ip, mine + 1);
        self.counts.open.fetch_add(1, Ordering::Relaxed);
        Some(Admitted {
            svc: self.clone(),
            ip,
        })
    }
}

/// A connection's place under the caps, given back when it ends.
pub(super) struct Admitted {
    svc: Arc<Service>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per = self
            .svc
            .per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
        self.svc.counts.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    pub fn new(splicer: Splicer, services: Vec<Arc<Service>>) -> Self {
        Self {
            splicer: RwLock::new(splicer),
            services,
            stop: tokio::sync::watch::Sender::new(false),
            handing: AtomicBool::new(false),
            handed: Mutex::new(Record::default()),
            tasks: AtomicU64::new(0),
        }
    }

    /// Raises the stop (or hand-over, `hand_over`) for every task.
    pub fn begin_stop(&self, hand_over: bool) {
        self.handing.store(hand_over, Ordering::SeqCst);
        self.stop.send_replace(true);
    }

    /// Tasks that have not ended or handed over yet.
    pub fn tasks_left(&self) -> u64 {
        self.tasks.load(Ordering::SeqCst)
    }

    /// What the stopped tasks left for the next agent image.
    pub fn take_record(&self) -> Result<Record> {
        let mut handed = self
            .handed
            .lock()
            .map_err(|_| anyhow!("hand-over record poisoned"))?;
        Ok(std::mem::take(&mut *handed))
    }

    pub fn splicer(&self) -> Result<std::sync::RwLockReadGuard<'_, Splicer>> {
        self.splicer
            .read()
            .map_err(|_| anyhow!("router splicer poisoned"))
    }

    pub fn splicer_mut(&self) -> Result<std::sync::RwLockWriteGuard<'_, Splicer>> {
        self.splicer
            .write()
            .map_err(|_| anyhow!("router splicer poisoned"))
    }

    /// Runs a task counted in `tasks` (so a hand-over knows when all have ended).
    pub fn spawn(self: &Arc<Self>, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.fetch_add(1, Ordering::SeqCst);
        let shared = self.clone();
        tokio::spawn(async move {
            task.await;
            shared.tasks.fetch_sub(1, Ordering::SeqCst);
        });
    }

    pub fn hand(&self, f: impl FnOnce(&mut Record) -> Result<()>) {
        let kept = self
            .handed
            .lock()
            .map_err(|_| anyhow!("hand-over record poisoned"))
            .and_then(|mut r| f(&mut r));
        if let Err(e) = kept {
            tracing::warn!(error = %format!("{e:#}"), "a routed socket could not be kept for the next agent");
        }
    }

    pub async fn stopping(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|h| *h).await;
    }

    pub fn handing_over(&self) -> bool {
        self.handing.load(Ordering::SeqCst)
    }
}
