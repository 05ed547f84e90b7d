//! What a fleet costs etcd and the leader, measured with simulated members against a
//! real etcd (in a namespace made here) and the agent's own report format and
//! aggregation. Prints numbers; run by hand (ARCHITECTURE.md quotes them):
//!
//! ```sh
//! cargo test -p canary-lab --test fleet_scale -- --ignored --nocapture
//! FLEET_SIM_NODES=400 FLEET_SIM_SECS=30 cargo test -p canary-lab --test fleet_scale -- --ignored --nocapture
//! ```

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use canary_agent::{
    analysis::VersionCounters,
    fleet::{FleetTotals, NodeReport},
};
use canary_lab::{log_dir, NetNs};
use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};

const ETCD_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 250);
const PREFIX: &str = "/canary-sim";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A node's report as a busy node would publish it: one service, both versions, a
/// latency histogram with a realistic band of non-zero buckets.
fn report(node: u64, second: u64) -> NodeReport {
    let version = |scale: u64| {
        let requests = 1_000_000 + second * 150 * scale;
        // The kernel's 418 log-linear buckets (canary_common::histogram::LATENCY_BUCKETS).
        let mut latency = vec![0u64; 418];
        for (i, b) in latency.iter_mut().enumerate().skip(120).take(60) {
            *b = requests / (1 + (i as u64 % 17)) + node;
        }
        VersionCounters {
            requests,
            responses: [
                0,
                requests - requests / 100,
                0,
                requests / 200,
                requests / 200,
            ],
            conn_new: requests / 10,
            conn_reset: 3,
            conn_failed: 1,
            latency,
            custom: BTreeMap::new(),
        }
    };
    NodeReport {
        at_ms: 0,
        weights: [("web".to_string(), 500)].into(),
        weights_revision: 42,
        apply_lag_ms: Some(3),
        counters: [("web".to_string(), [version(9), version(1)])].into(),
        ..NodeReport::default()
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let p = entry.path();
        total += if p.is_dir() {
            dir_bytes(&p)
        } else {
            entry.metadata().map(|m| m.len()).unwrap_or(0)
        };
    }
    total
}

#[test]
#[ignore = "a measurement (about a minute): run by hand, see the module docs"]
fn fleet_cost_against_a_real_etcd() -> Result<()> {
    let nodes = env("FLEET_SIM_NODES", 200);
    let secs = env("FLEET_SIM_SECS", 20);
    let ns = NetNs::new("etcdsim")?;
    ns.run(&[
        "ip", "link", "add", "sim0", "type", "veth", "peer", "name", "sim1",
    ])?;
    ns.run(&["ip", "link", "set", "sim1", "up"])?;
    ns.add_address(&format!("{ETCD_V4}/24"), "sim0")?;
    ns.run(&["ip", "link", "set", "sim0", "up"])?;
    let data = log_dir().join("etcd-sim");
    let _ = std::fs::remove_dir_all(&data);
    let client_url = format!("http://{ETCD_V4}:2379");
    let peer_url = format!("http://{ETCD_V4}:2380");
    let data_s = data.to_string_lossy().into_owned();
    let mut etcd = ns.spawn(
        "etcd",
        &[
            "--name",
            "sim",
            "--data-dir",
            &data_s,
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("sim={peer_url}"),
        ],
    )?;
    etcd.wait_for_log("ready to serve client requests", Duration::from_secs(20))?;
    let etcd_pid = etcd.pid();
    let report_bytes = serde_json::to_vec(&report(1, 1))?.len();

    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async {
            let put_latency = Arc::new(Mutex::new(Vec::new()));
            let fanout = Arc::new(Mutex::new(BTreeMap::<i64, Vec<Instant>>::new()));
            let received = Arc::new(AtomicU64::new(0));
            let stop_at = Instant::now() + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for node in 0..nodes {
                // One connection per node, as each agent has its own.
                let mut client = Client::connect([client_url.as_str()], None).await?;
                let lease = client.lease_grant(5, None).await?.id();
                let (mut keeper, mut keepalives) = client.lease_keep_alive(lease).await?;
                let mut watch = client
                    .watch(format!("{PREFIX}/weights/"), Some(WatchOptions::new().with_prefix()))
                    .await?;
                let (put_latency, fanout, received) =
                    (put_latency.clone(), fanout.clone(), received.clone());
                tasks.push(tokio::spawn(async move {
                    // Watchers note when each weight revision reached them.
                    let watcher = tokio::spawn(async move {
                        while let Ok(Some(resp)) = watch.message().await {
                            for ev in resp.events() {
                                if let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                                    fanout
                                        .lock()
                                        .unwrap()
                                        .entry(kv.mod_revision())
                                        .or_default()
                                        .push(Instant::now());
                                    received.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    });
                    // Spread over the second, as independent nodes are.
                    let phase = Duration::from_millis(node * 1000 / nodes.max(1));
                    tokio::time::sleep(phase).await;
                    let mut second = 0;
                    let mut every = tokio::time::interval(Duration::from_secs(1));
                    while Instant::now() < stop_at {
                        every.tick().await;
                        second += 1;
                        let body = serde_json::to_vec(&report(node, second)).unwrap();
                        let t = Instant::now();
                        let key = format!("{PREFIX}/nodes/n{node}");
                        if client
                            .put(key, body, Some(PutOptions::new().with_lease(lease)))
                            .await
                            .is_ok()
                        {
                            put_latency
                                .lock()
                                .unwrap()
                                .push(t.elapsed().as_micros() as u64);
                        }
                        if second.is_multiple_of(2) {
                            let _ = keeper.keep_alive().await;
                            let _ = keepalives.message().await;
                        }
                    }
                    watcher.abort();
                }));
            }
            // The leader: sums every report each second, and changes a weight every 2 s.
            let mut leader = Client::connect([client_url.as_str()], None).await?;
            let cpu_before = cpu_ticks(etcd_pid);
            let started = Instant::now();
            let mut sum_ms = Vec::new();
            let mut read_bytes = Vec::new();
            let mut sent_at = BTreeMap::new();
            let mut second = 0u64;
            let mut totals = FleetTotals::default();
            while Instant::now() < stop_at {
                tokio::time::sleep(Duration::from_secs(1)).await;
                second += 1;
                let t = Instant::now();
                let got = leader
                    .get(format!("{PREFIX}/nodes/"), Some(GetOptions::new().with_prefix()))
                    .await?;
                let reports = got
                    .kvs()
                    .iter()
                    .map(|kv| Ok((kv.key_str()?.to_string(), serde_json::from_slice(kv.value())?)))
                    .collect::<Result<Vec<(String, NodeReport)>>>()?;
                totals.update(reports.iter().map(|(n, r)| (n.as_str(), r)));
                let sums = totals.sums();
                std::hint::black_box(&sums);
                sum_ms.push(t.elapsed().as_micros() as u64);
                read_bytes.push(got.kvs().iter().map(|kv| kv.value().len()).sum::<usize>());
                if second.is_multiple_of(2) {
                    let put = leader
                        .put(
                            format!("{PREFIX}/weights/web"),
                            format!("{{\"weight_bp\":{second}}}"),
                            None,
                        )
                        .await?;
                    let rev = put.header().context("header")?.revision();
                    sent_at.insert(rev, Instant::now());
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = (cpu_ticks(etcd_pid) - cpu_before) as f64 / 100.0;
            tokio::time::sleep(Duration::from_millis(500)).await;
            for t in tasks {
                let _ = t.await;
            }
            let mut lat = put_latency.lock().unwrap().clone();
            lat.sort_unstable();
            sum_ms.sort_unstable();
            let mut spreads = Vec::new();
            for (rev, at) in &sent_at {
                if let Some(seen) = fanout.lock().unwrap().get(rev) {
                    if seen.len() as u64 == nodes {
                        let last = seen.iter().max().unwrap();
                        spreads.push(last.saturating_duration_since(*at).as_micros() as u64);
                    }
                }
            }
            spreads.sort_unstable();
            let db = dir_bytes(&data);
            println!("fleet simulation: {nodes} members, {secs} s, against etcd (pid {etcd_pid})");
            println!("  node report: {report_bytes} bytes JSON (1 service, 2 versions, 418-bucket histograms)");
            println!(
                "  report puts: {} ({:.0}/s); latency p50 {} µs, p99 {} µs",
                lat.len(),
                lat.len() as f64 / elapsed,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99)
            );
            println!(
                "  leader read + sum of all reports per second: p50 {} µs, p99 {} µs, {} KiB read",
                percentile(&sum_ms, 0.5),
                percentile(&sum_ms, 0.99),
                read_bytes.last().copied().unwrap_or(0) / 1024
            );
            println!(
                "  weight change to the last of {nodes} watchers: p50 {} µs, max {} µs ({} changes, {} deliveries)",
                percentile(&spreads, 0.5),
                spreads.last().copied().unwrap_or(0),
                spreads.len(),
                received.load(Ordering::Relaxed)
            );
            println!(
                "  etcd CPU {:.2} core-seconds per second; data dir {} MiB after the run (no compaction)",
                cpu / elapsed,
                db / (1024 * 1024)
            );
            anyhow::Ok(())
        })
    })?;
    drop(etcd);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
