//! The etcd side of a fleet member: lease, leader election, the leader's writes and
//! telemetry sums, forwarded commands, and the watch that applies desired weights.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};

use super::{
    lock, trust, wall_ms, DesiredWeight, FleetClock, Link, NodeReport, SharedHost, StoredRollout,
    Write, ETCD_PAUSE,
};
use crate::{config::FleetConfig, controller::Clock};

/// Longest wait for one etcd request: past it etcd counts as unreachable.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the member loop runs (a queued write wakes it earlier).
const LOOP: Duration = Duration::from_millis(100);
/// How often a follower tries to take the leader key.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(500);
/// Node reports and the leader's sums.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// The leader pauses running rollouts after etcd has failed for this long.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// A new connection is made after etcd has failed this long (and again as often).
const RECONNECT_AFTER: Duration = Duration::from_secs(2);
/// Most operations in one transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;

/// The key layout under the fleet's prefix.
#[derive(Clone)]
pub(super) struct Keys(String);

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self(prefix.to_string())
    }
    pub(super) fn leader(&self) -> String {
        format!("{}/leader", self.0)
    }
    pub(super) fn nodes(&self) -> String {
        format!("{}/nodes/", self.0)
    }
    pub(super) fn weights(&self) -> String {
        format!("{}/weights/", self.0)
    }
    pub(super) fn rollouts(&self) -> String {
        format!("{}/rollouts/", self.0)
    }
    pub(super) fn history(&self, service: &str) -> String {
        format!("{}/history/{service}/", self.0)
    }
    pub(super) fn commands(&self) -> String {
        format!("{}/commands/", self.0)
    }
    pub(super) fn result(&self, id: &str) -> String {
        format!("{}/results/{id}", self.0)
    }
}

/// Runs one etcd request with [`OP_TIMEOUT`].
pub(super) async fn op<T>(
    what: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("{ETCD_PAUSE}: {what}: {e}")),
        Err(_) => Err(anyhow!(
            "{ETCD_PAUSE}: {what}: no answer in {} ms",
            OP_TIMEOUT.as_millis()
        )),
    }
}

/// How the agent connects to the configured endpoints.
fn options(cfg: &FleetConfig) -> Result<ConnectOptions> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(OP_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), OP_TIMEOUT)
        .with_keep_alive_while_idle(true);
    if let Some(ca) = &cfg.ca {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("[fleet] TLS file {}", p.display()))
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// One connection attempt, bounded by [`OP_TIMEOUT`].
async fn connect_once(cfg: &FleetConfig, options: &ConnectOptions) -> Result<Client> {
    match tokio::time::timeout(
        OP_TIMEOUT,
        Client::connect(cfg.etcd.clone(), Some(options.clone())),
    )
    .await
    {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(anyhow!("{ETCD_PAUSE}: connecting: {e}")),
        Err(_) => Err(anyhow!("{ETCD_PAUSE}: connecting: no answer")),
    }
}

/// Connects, retrying until etcd answers.
async fn connect(cfg: &FleetConfig, options: &ConnectOptions) -> Client {
    let mut backoff = Duration::from_millis(100);
    loop {
        match connect_once(cfg, options).await {
            Ok(client) => return client,
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "fleet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Runs this agent's fleet membership until the process exits.
pub async fn run(
    cfg: FleetConfig,
    link: Link,
    agent: SharedHost,
    clock: Arc<FleetClock>,
) -> Result<()> {
    let options = options(&cfg)?;
    let client = connect(&cfg, &options).await;
    link.set_client(client.clone(), Keys::new(&cfg.prefix));
    tokio::spawn(watch_weights(
        Keys::new(&cfg.prefix),
        link.clone(),
        agent.clone(),
    ));
    let mut member = Member {
        last_connect: Instant::now(),
        keys: Keys::new(&cfg.prefix),
        lease_ttl: cfg.lease_s,
        client,
        link,
        agent,
        clock,
        lease: None,
        last_keepalive: Instant::now(),
        last_campaign: None,
        last_publish: None,
        unreachable_since: None,
        paused: false,
        seen: BTreeMap::new(),
        totals: super::FleetTotals::default(),
        history_seq: 0,
        published_revision: 0,
    };
    loop {
        let outcome = member.step().await;
        let failure = outcome.as_ref().err().map(|e| format!("{e:#}"));
        member.outcome(outcome);
        // A channel can stay wedged after etcd stopped answering (a stopped process
        // accepts connections it never serves): start over with a new one.
        let stuck = member
            .unreachable_since
            .is_some_and(|t| t.elapsed() >= RECONNECT_AFTER);
        if stuck && member.last_connect.elapsed() >= RECONNECT_AFTER {
            member.last_connect = Instant::now();
            if let Ok(client) = connect_once(&cfg, &options).await {
                tracing::info!(last_error = ?failure, "fleet: new etcd connection");
                member.client = client.clone();
                member.link.set_client(client, Keys::new(&cfg.prefix));
                if let Some(lease) = member.lease.as_mut() {
                    lease.stream = None;
                }
            }
        }
        let wake = member.link.shared.wake.notified();
        let _ = tokio::time::timeout(LOOP, wake).await;
    }
}

struct Lease {
    id: i64,
    /// The keep-alive stream, reopened after an error.
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

struct Member {
    /// When the etcd connection was last (re)made.
    last_connect: Instant,
    keys: Keys,
    lease_ttl: u64,
    client: Client,
    link: Link,
    agent: SharedHost,
    clock: Arc<FleetClock>,
    lease: Option<Lease>,
    last_keepalive: Instant,
    last_campaign: Option<Instant>,
    last_publish: Option<Instant>,
    unreachable_since: Option<Instant>,
    /// The leader paused running rollouts because etcd failed.
    paused: bool,
    /// Every node's latest accepted report and when it was read: what the next one is
    /// checked against (a node's counters may only grow so fast).
    seen: BTreeMap<String, (NodeReport, Instant)>,
    /// The fleet's counters from each node's own increments.
    totals: super::FleetTotals,
    history_seq: u64,
    /// The weight revision in the last report published.
    published_revision: i64,
}

impl Member {
    fn node(&self) -> String {
        self.link.node().to_string()
    }

    /// One round; `Ok(true)` when etcd answered something in it.
    async fn step(&mut self) -> Result<bool> {
        let lease = self.ensure_lease().await?;
        let mut answered = false;
        if !self.link.leading()
            && self
                .last_campaign
                .is_none_or(|t| t.elapsed() >= CAMPAIGN_EVERY)
        {
            self.last_campaign = Some(Instant::now());
            self.campaign(lease).await?;
            answered = true;
        }
        if self.link.leading() {
            self.flush().await?;
            self.commands(lease).await?;
            answered = true;
        }
        // Also at once after a new weight was applied, so the fleet sees it.
        let applied = self.link.applied().0;
        if applied != self.published_revision
            || self
                .last_publish
                .is_none_or(|t| t.elapsed() >= PUBLISH_EVERY)
        {
            self.last_publish = Some(Instant::now());
            self.published_revision = applied;
            self.publish(lease).await?;
            if self.link.leading() {
                self.sum_counters().await?;
            }
            answered = true;
        }
        Ok(answered)
    }

    /// Pauses (leader) after etcd failed for a while; resumes once it answers again.
    fn outcome(&mut self, outcome: Result<bool>) {
        match outcome {
            Ok(false) => {}
            Ok(true) => {
                if let Some(since) = self.unreachable_since.take() {
                    tracing::info!(
                        after_ms = since.elapsed().as_millis() as u64,
                        "etcd reachable again"
                    );
                }
                if self.paused && self.link.leading() {
                    self.paused = false;
                    match lock(&self.agent).map(|mut a| a.fleet_resume()) {
                        Ok(resumed) => tracing::info!(?resumed, "rollouts resumed: etcd is back"),
                        Err(e) => tracing::error!(error = %e, "resuming after etcd"),
                    }
                }
            }
            Err(e) => {
                let since = *self.unreachable_since.get_or_insert_with(|| {
                    tracing::warn!(error = %format!("{e:#}"), "fleet: weights stay as they are");
                    Instant::now()
                });
                if self.link.leading() && !self.paused && since.elapsed() >= PAUSE_AFTER {
                    self.paused = true;
                    let reason = format!("{e:#}");
                    match lock(&self.agent).map(|mut a| a.fleet_pause(&reason)) {
                        Ok(paused) => tracing::warn!(?paused, %reason, "rollouts paused"),
                        Err(e) => tracing::error!(error = %e, "pausing for etcd"),
                    }
                }
            }
        }
    }

    /// This node's lease (granted if missing, kept alive every third of its TTL). A
    /// failed keep-alive keeps the lease: a restarted etcd restores it, and only etcd
    /// saying it expired (or another node holding the leader key) ends leadership.
    async fn ensure_lease(&mut self) -> Result<i64> {
        let every = Duration::from_millis(self.lease_ttl * 1000 / 3);
        if let Some(lease) = self.lease.as_mut() {
            if self.last_keepalive.elapsed() < every {
                return Ok(lease.id);
            }
            let id = lease.id;
            let mut client = self.client.clone();
            let answer = tokio::time::timeout(OP_TIMEOUT, async {
                if lease.stream.is_none() {
                    lease.stream = Some(client.lease_keep_alive(id).await?);
                }
                let (keeper, stream) = lease.stream.as_mut().expect("just opened");
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
            // etcd answering "lease not found" is an expired lease, not an outage.
            let answer = match answer {
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m == "lease not found" => {
                    Ok(None)
                }
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(anyhow!("{ETCD_PAUSE}: lease keep-alive: {e}")),
                Err(_) => Err(anyhow!("{ETCD_PAUSE}: lease keep-alive: no answer")),
            };
            match answer {
                Ok(Some(r)) if r.ttl() > 0 => {
                    self.last_keepalive = Instant::now();
                    return Ok(id);
                }
                Ok(_) => {
                    tracing::warn!(lease = id, "lease expired");
                    self.lease = None;
                    self.step_down("its lease expired");
                }
                Err(e) => {
                    lease.stream = None;
                    return Err(e);
                }
            }
        }
        let mut client = self.client.clone();
        let ttl = self.lease_ttl as i64;
        let granted = op("lease grant", client.lease_grant(ttl, None)).await?;
        self.lease = Some(Lease {
            id: granted.id(),
            stream: None,
        });
        self.last_keepalive = Instant::now();
        Ok(granted.id())
    }

    fn step_down(&mut self, why: &str) {
        if self.link.leading() {
            tracing::warn!(why, "no longer the fleet's leader");
            self.link.set_leading(false);
            self.link.take_outbox();
            self.paused = false;
        }
    }

    /// Takes the leader key if nobody holds it.
    async fn campaign(&mut self, lease: i64) -> Result<()> {
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                self.node(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut client = self.client.clone();
        if !op("campaign", client.txn(txn)).await?.succeeded() {
            return Ok(());
        }
        self.take_over().await
    }

    /// Loads the fleet's rollouts as they were stored and starts leading from them.
    async fn take_over(&mut self) -> Result<()> {
        let mut client = self.client.clone();
        let prefix = self.keys.rollouts();
        let got = op(
            "reading rollouts",
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await;
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                // Give the key up rather than lead without the stored state.
                let _ = op("resigning", client.delete(self.keys.leader(), None)).await;
                return Err(e);
            }
        };
        let mut stored = BTreeMap::new();
        for kv in got.kvs() {
            let checked = trust::key_name(kv.key(), &prefix).and_then(|service| {
                let s = trust::stored_rollout(
                    service,
                    kv.value(),
                    self.clock.now_ms(),
                    self.clock.speed(),
                )?;
                let rollout = lock(&self.agent)?.fleet_check_rollout(service, s.rollout)?;
                Ok((service.to_string(), s.clock_ms, rollout))
            });
            match checked {
                Ok((service, clock_ms, rollout)) => {
                    self.link.accept(kv.key());
                    self.clock.catch_up(clock_ms);
                    stored.insert(service, rollout);
                }
                Err(e) => self.link.reject(kv.key(), &e),
            }
        }
        let mut agent = lock(&self.agent)?;
        self.link.take_outbox();
        agent.fleet_adopt(stored);
        self.link.set_leading(true);
        tracing::info!(node = %self.node(), "this agent is the fleet's leader now");
        Ok(())
    }

    /// Writes the agent's queued rollout state, history and weights, guarded by the
    /// leader key still being ours.
    async fn flush(&mut self) -> Result<()> {
        let writes = self.link.take_outbox();
        if writes.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::new();
        let now = self.clock.now_ms();
        for write in &writes {
            let (key, value) = match write {
                Write::Weight {
                    service,
                    weight_bp,
                    regions,
                    released,
                } => (
                    format!("{}{service}", self.keys.weights()),
                    serde_json::to_vec(&DesiredWeight {
                        weight_bp: *weight_bp,
                        at_ms: wall_ms(),
                        regions: regions.clone(),
                        released: released.clone(),
                    })?,
                ),
                Write::Rollout { service, rollout } => (
                    format!("{}{service}", self.keys.rollouts()),
                    // Without webhook secrets: every node has the policy itself.
                    serde_json::to_vec(&StoredRollout {
                        clock_ms: now,
                        rollout: rollout.redacted(),
                    })?,
                ),
                Write::Event(event) => {
                    self.history_seq += 1;
                    let key = format!(
                        "{}{:013}-{}-{:06}",
                        self.keys.history(&event.service),
                        event.at_ms,
                        self.node(),
                        self.history_seq
                    );
                    (key, serde_json::to_vec(event)?)
                }
            };
            ops.push((key, value));
        }
        // etcd refuses a key twice in one transaction: only a key's last value counts.
        let last: BTreeMap<&str, usize> = ops
            .iter()
            .enumerate()
            .map(|(i, (key, _))| (key.as_str(), i))
            .collect();
        let ops: Vec<TxnOp> = ops
            .iter()
            .enumerate()
            .filter(|(i, (key, _))| last[key.as_str()] == *i)
            .map(|(_, (key, value))| TxnOp::put(key.as_str(), value.clone(), None))
            .collect();
        for chunk in ops.chunks(TXN_OPS) {
            let txn = Txn::new()
                .when([Compare::value(
                    self.keys.leader(),
                    CompareOp::Equal,
                    self.node(),
                )])
                .and_then(chunk.to_vec());
            let mut client = self.client.clone();
            match op("writing rollout state", client.txn(txn)).await {
                Ok(r) if r.succeeded() => {}
                Ok(_) => {
                    self.step_down("another node holds the leader key");
                    return Ok(());
                }
                Err(e) => {
                    self.link.requeue(writes);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Carries out rollout commands other nodes forwarded, and answers them.
    async fn commands(&mut self, lease: i64) -> Result<()> {
        let prefix = self.keys.commands();
        let mut client = self.client.clone();
        let got = op(
            "reading commands",
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        for kv in got.kvs() {
            let Ok(id) = trust::key_name(kv.key(), &prefix) else {
                // No answer can be addressed to it: it only goes.
                self.link
                    .reject(kv.key(), &anyhow!("not a command key: deleted"));
                let txn = Txn::new()
                    .when([Compare::value(
                        self.keys.leader(),
                        CompareOp::Equal,
                        self.node(),
                    )])
                    .and_then([TxnOp::delete(kv.key(), None)]);
                op("deleting a bad command", client.txn(txn)).await?;
                continue;
            };
            let answer = match trust::forwarded(kv.value()) {
                Ok(request) => {
                    tracing::info!(%id, ?request, "forwarded command");
                    match lock(&self.agent)?.handle(request) {
                        Ok(v) => serde_json::json!({ "ok": v }),
                        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
                    }
                }
                Err(e) => {
                    self.link.reject(kv.key(), &e);
                    serde_json::json!({ "error": format!("refused forwarded request: {e:#}") })
                }
            };
            // The command's effects are in etcd before the requester hears back.
            self.flush().await?;
            let txn = Txn::new()
                .when([Compare::value(
                    self.keys.leader(),
                    CompareOp::Equal,
                    self.node(),
                )])
                .and_then([
                    TxnOp::put(
                        self.keys.result(id),
                        serde_json::to_vec(&answer)?,
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::delete(kv.key(), None),
                ]);
            op("answering a command", client.txn(txn)).await?;
        }
        Ok(())
    }

    /// Publishes this node's applied weights and counters on its lease.
    async fn publish(&mut self, lease: i64) -> Result<()> {
        let mut report = lock(&self.agent)?.fleet_report();
        report.at_ms = wall_ms();
        (report.weights_revision, report.apply_lag_ms) = self.link.applied();
        let key = format!("{}{}", self.keys.nodes(), self.node());
        let mut client = self.client.clone();
        op(
            "publishing counters",
            client.put(
                key,
                serde_json::to_vec(&report)?,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }

    /// Sums every node's counters for the leader's analysis.
    async fn sum_counters(&mut self) -> Result<()> {
        let prefix = self.keys.nodes();
        let mut client = self.client.clone();
        let got = op(
            "reading node counters",
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut reports = BTreeMap::new();
        for kv in got.kvs() {
            let checked = trust::key_name(kv.key(), &prefix).and_then(|node| {
                let previous = self.seen.get(node);
                let elapsed = previous.map_or(1.0, |(_, at)| at.elapsed().as_secs_f64());
                let report =
                    trust::node_report(kv.value(), kv.lease(), previous.map(|p| &p.0), elapsed)?;
                Ok((node.to_string(), report))
            });
            match checked {
                Ok((node, report)) => {
                    self.link.accept(kv.key());
                    self.seen
                        .insert(node.clone(), (report.clone(), Instant::now()));
                    reports.insert(node, report);
                }
                Err(e) => self.link.reject(kv.key(), &e),
            }
        }
        self.totals
            .update(reports.iter().map(|(n, r)| (n.as_str(), r)));
        self.link.set_sums(self.totals.sums());
        self.link.set_nodes(reports);
        Ok(())
    }
}

/// Applies desired weights as the leader writes them, and mirrors the stored rollouts
/// on followers (for status, and so a new leader has them). Re-reads everything after
/// an error: a watch that missed events while etcd was away starts from the state.
async fn watch_weights(keys: Keys, link: Link, agent: SharedHost) {
    loop {
        // The member loop replaces a wedged connection; use the current one.
        let Some((client, _)) = link.client() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if let Err(e) = watch_once(client, &keys, &link, &agent).await {
            tracing::debug!(error = %format!("{e:#}"), "weight watch restarts");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn watch_once(
    mut client: Client,
    keys: &Keys,
    link: &Link,
    agent: &SharedHost,
) -> Result<()> {
    let generation = link.generation();
    let mut revision = 0;
    for prefix in [keys.weights(), keys.rollouts()] {
        let got = op(
            "reading weights",
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        revision = got.header().map_or(0, |h| h.revision());
        for kv in got.kvs() {
            apply(keys, link, agent, kv);
        }
    }
    link.set_synced();
    let options = |rev: i64| {
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(rev + 1),
        )
    };
    let mut stream = op(
        "watching weights",
        client.watch(keys.weights(), options(revision)),
    )
    .await?;
    stream.watch(keys.rollouts(), options(revision)).await?;
    loop {
        let Ok(message) = tokio::time::timeout(Duration::from_secs(1), stream.message()).await
        else {
            if link.generation() != generation {
                bail!("the etcd connection was replaced");
            }
            continue;
        };
        let Some(response) = message? else {
            bail!("watch closed");
        };
        if response.canceled() {
            bail!("watch cancelled: {}", response.cancel_reason());
        }
        for event in response.events() {
            if let (EventType::Put, Some(kv)) = (event.event_type(), event.kv()) {
                apply(keys, link, agent, kv);
            }
        }
    }
}

/// Applies one weight or mirrors one rollout; a bad one is refused and reported, and
/// the watch goes on with the others.
fn apply(keys: &Keys, link: &Link, agent: &SharedHost, kv: &etcd_client::KeyValue) {
    let result = if kv.key().starts_with(keys.weights().as_bytes()) {
        apply_weight(keys, link, agent, kv)
    } else if kv.key().starts_with(keys.rollouts().as_bytes()) {
        mirror_rollout(keys, link, agent, kv)
    } else {
        Ok(())
    };
    match result {
        Ok(()) => link.accept(kv.key()),
        Err(e) => link.reject(kv.key(), &e),
    }
}

fn apply_weight(
    keys: &Keys,
    link: &Link,
    agent: &SharedHost,
    kv: &etcd_client::KeyValue,
) -> Result<()> {
    let service = trust::key_name(kv.key(), &keys.weights())?;
    let desired = trust::weight(kv.value())?;
    let weight_bp = desired.for_region(link.region());
    lock(agent)?.fleet_apply_weight(service, weight_bp, &desired.released)?;
    let lag = wall_ms().saturating_sub(desired.at_ms);
    link.set_applied(kv.mod_revision(), lag);
    link.shared.wake.notify_one();
    Ok(())
}

/// A follower keeps the leader's rollout; the leader ignores its own echo.
fn mirror_rollout(
    keys: &Keys,
    link: &Link,
    agent: &SharedHost,
    kv: &etcd_client::KeyValue,
) -> Result<()> {
    if link.leading() {
        return Ok(());
    }
    let service = trust::key_name(kv.key(), &keys.rollouts())?;
    let mut agent = lock(agent)?;
    let stored = trust::stored_rollout(service, kv.value(), agent.now_ms(), agent.clock_speed())?;
    let rollout = agent.fleet_check_rollout(service, stored.rollout)?;
    agent.fleet_mirror(service, rollout)
}
