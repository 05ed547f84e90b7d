//! Per-second series of each service, for the dashboard (`ui`) and `canary report`:
//! the weight, the rollout state, per version the requests, 5xx responses, new
//! connections and p99 latency of that second, and each policy metric's verdict with
//! canary and stable values and the limit the canary is held to.
//!
//! Fed from the agent's tick once per controller second (the same counters the
//! analysis reads). Kept in `state_dir` as JSON lines, `NAME.series.jsonl`; when that
//! file passes [`FILE_LIMIT`] bytes it becomes `NAME.series.1.jsonl` (replacing the
//! previous one) and a new file starts. So a service never uses more than twice
//! [`FILE_LIMIT`] on disk, and the retention is at least [`FILE_LIMIT`] worth of
//! samples: about 4 h at one second with three metrics (a line is ~0.3–0.5 KB).
//! The last [`MEMORY_SAMPLES`] samples are also kept in memory for the dashboard,
//! reloaded from disk when the agent restarts. A torn last line (a kill mid-write)
//! is skipped when read.

use std::{
    collections::{BTreeMap, VecDeque},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{service::LiveService, Agent};
use crate::analysis::{latency::quantile_ns, MetricName, VersionCounters};
use crate::controller::RolloutState;

/// Bytes of one series file before it is rotated (one older file is kept).
pub const FILE_LIMIT: u64 = 4 << 20;
/// Samples kept in memory per service for the dashboard: 15 minutes at one a second.
pub const MEMORY_SAMPLES: usize = 900;

/// One controller second of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Controller clock (the event log's `at_ms` clock).
    pub t_ms: u64,
    pub weight_bp: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RolloutState>,
    pub stable: VersionSample,
    pub canary: VersionSample,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<VerdictSample>,
}

/// What one version did in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionSample {
    pub requests: u64,
    /// 5xx responses.
    pub errors: u64,
    pub connections: u64,
    /// p99 of the requests answered in this second, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// A policy metric's verdict at that second, over the metric's window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictSample {
    pub metric: String,
    /// pass | fail | inconclusive
    pub verdict: String,
    pub canary: Option<f64>,
    pub stable: Option<f64>,
    /// The value the canary is held to: at most stable × threshold (error-rate,
    /// latency-p99), at least the threshold (success-rate) or stable × threshold
    /// (business metrics).
    pub limit: Option<f64>,
    /// true when the limit is a maximum.
    pub upper: bool,
}

#[derive(Default)]
struct Track {
    last_s: Option<u64>,
    previous: Option<[VersionCounters; 2]>,
    recent: VecDeque<Sample>,
    file_bytes: u64,
    loaded: bool,
}

/// The series of every service.
pub struct Series {
    dir: PathBuf,
    tracks: BTreeMap<String, Track>,
}

pub fn current_path(dir: &Path, service: &str) -> PathBuf {
    dir.join(format!("{service}.series.jsonl"))
}

fn rotated_path(dir: &Path, service: &str) -> PathBuf {
    dir.join(format!("{service}.series.1.jsonl"))
}

fn parse_lines(text: &str) -> impl Iterator<Item = Sample> + '_ {
    text.lines()
        .filter_map(|line| serde_json::from_str::<Sample>(line).ok())
}

/// Every stored sample of a service, oldest first (both files).
pub fn read_all(dir: &Path, service: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for path in [rotated_path(dir, service), current_path(dir, service)] {
        match std::fs::read_to_string(&path) {
            Ok(text) => out.extend(parse_lines(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(out)
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn delta(now: &VersionCounters, before: &VersionCounters) -> VersionSample {
    // A counter that went backwards was cleared (service re-created): count nothing.
    let d = |a: u64, b: u64| a.saturating_sub(b);
    let latency: Vec<u64> = now
        .latency
        .iter()
        .enumerate()
        .map(|(i, n)| d(*n, before.latency.get(i).copied().unwrap_or(0)))
        .collect();
    VersionSample {
        requests: d(now.requests, before.requests),
        errors: d(now.responses[4], before.responses[4]),
        connections: d(now.conn_new, before.conn_new),
        p99_ms: quantile_ns(&latency, 0.99).map(|ns| ns / 1e6),
    }
}

impl Series {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            tracks: BTreeMap::new(),
        }
    }

    /// Whether this second of `service` is still to be recorded.
    pub fn due(&self, service: &str, now_s: u64) -> bool {
        self.tracks
            .get(service)
            .and_then(|t| t.last_s)
            .is_none_or(|last| now_s > last)
    }

    fn track(&mut self, service: &str) -> &mut Track {
        let dir = self.dir.clone();
        let track = self.tracks.entry(service.to_string()).or_default();
        if !track.loaded {
            track.loaded = true;
            let path = current_path(&dir, service);
            if let Ok(text) = std::fs::read_to_string(&path) {
                track.file_bytes = text.len() as u64;
                let samples: Vec<Sample> = parse_lines(&text).collect();
                let skip = samples.len().saturating_sub(MEMORY_SAMPLES);
                track.recent = samples.into_iter().skip(skip).collect();
            }
        }
        track
    }

    /// Records one second of `svc` from its cumulative counters (the first call only
    /// remembers them: a second needs a previous reading).
    pub fn record(
        &mut self,
        svc: &LiveService,
        now_ms: u64,
        stable: &VersionCounters,
        canary: &VersionCounters,
    ) -> Result<()> {
        let name = svc.cfg.name.clone();
        let dir = self.dir.clone();
        let track = self.track(&name);
        track.last_s = Some(now_ms / 1000);
        let Some([s0, c0]) = track.previous.replace([stable.clone(), canary.clone()]) else {
            return Ok(());
        };
        let thresholds: BTreeMap<String, (MetricName, f64)> = svc
            .policy
            .iter()
            .flat_map(|p| &p.metrics)
            .map(|m| (m.name.to_string(), (m.name.clone(), m.threshold)))
            .collect();
        let verdicts = svc
            .verdicts()
            .iter()
            .map(|v| {
                let (stable_v, canary_v) = (finite(v.stable), finite(v.canary));
                let (limit, upper) = match thresholds.get(&v.metric) {
                    Some((MetricName::ErrorRate | MetricName::LatencyP99, t)) => {
                        (stable_v.map(|s| s * t), true)
                    }
                    Some((MetricName::SuccessRate, t)) => (Some(*t), false),
                    Some((MetricName::Custom(_), t)) => (stable_v.map(|s| s * t), false),
                    None => (None, true),
                };
                VerdictSample {
                    metric: v.metric.clone(),
                    verdict: serde_json::to_value(v.verdict)
                        .ok()
                        .and_then(|x| x.as_str().map(String::from))
                        .unwrap_or_default(),
                    canary: canary_v,
                    stable: stable_v,
                    limit,
                    upper,
                }
            })
            .collect();
        let sample = Sample {
            t_ms: now_ms,
            weight_bp: svc.weight_bp,
            state: svc.rollout.as_ref().map(|r| r.state()),
            stable: delta(stable, &s0),
            canary: delta(canary, &c0),
            verdicts,
        };
        let mut line = serde_json::to_string(&sample)?;
        line.push('\n');
        if track.recent.len() >= MEMORY_SAMPLES {
            track.recent.pop_front();
        }
        track.recent.push_back(sample);
        let path = current_path(&dir, &name);
        if track.file_bytes + line.len() as u64 > FILE_LIMIT {
            std::fs::rename(&path, rotated_path(&dir, &name))
                .with_context(|| format!("rotating {}", path.display()))?;
            track.file_bytes = 0;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        track.file_bytes += line.len() as u64;
        Ok(())
    }

    /// The samples kept in memory for `service`, oldest first.
    pub fn recent(&self, service: &str) -> Vec<Sample> {
        self.tracks
            .get(service)
            .map(|t| t.recent.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Agent {
    /// The last [`MEMORY_SAMPLES`] seconds of `service`, oldest first.
    pub fn recent_samples(&self, service: &str) -> Vec<Sample> {
        self.series.recent(service)
    }

    /// The agent's state directory (event logs and series files).
    pub fn state_dir(&self) -> &Path {
        &self.config.agent.state_dir
    }

    /// The dashboard's token file in the configuration in force.
    pub fn ui_token_file(&self) -> Option<PathBuf> {
        self.config.agent.ui_token_file.clone()
    }

    /// The controller clock, for the dashboard's time axis.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::datapath::service_key;

    fn service() -> LiveService {
        let text = "[agent]\ninterface = \"x\"\n[[service]]\nname = \"web\"\nlisten = \"198.19.0.10:80\"\nstable = [\"198.18.2.2:80\"]\ncanary = [\"198.18.3.2:80\"]\n";
        let cfg = Config::parse(text, Path::new("t.toml")).unwrap().services[0].clone();
        LiveService {
            key: service_key(&cfg),
            cfg,
            id: 0,
            weight_bp: 500,
            rollout: None,
            analysis: None,
            policy: None,
            custom: BTreeMap::new(),
            draining: false,
            kernel: None,
            retiring: None,
            health: None,
        }
    }

    fn counters(requests: u64, errors: u64) -> VersionCounters {
        let mut c = VersionCounters::zero();
        c.requests = requests;
        c.responses = [0, requests - errors, 0, 0, errors];
        c.conn_new = requests;
        c.latency[40] = requests;
        c
    }

    #[test]
    fn records_per_second_deltas_rotates_and_reloads() {
        let dir = std::env::temp_dir().join(format!("canary-series-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let svc = service();
        let mut series = Series::new(&dir);
        assert!(series.due("web", 1));
        series
            .record(&svc, 1_000, &counters(10, 0), &counters(1, 0))
            .unwrap();
        assert!(!series.due("web", 1) && series.due("web", 2));
        // The first second only sets the baseline.
        assert!(series.recent("web").is_empty());
        series
            .record(&svc, 2_000, &counters(110, 0), &counters(11, 4))
            .unwrap();
        let got = series.recent("web");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].stable.requests, got[0].stable.errors), (100, 0));
        assert_eq!((got[0].canary.requests, got[0].canary.errors), (10, 4));
        assert!(got[0].canary.p99_ms.is_some());
        assert_eq!(got[0].weight_bp, 500);
        // A restarted agent sees what was stored, and a torn line is skipped.
        let path = current_path(&dir, "web");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"t_ms\":3")
            .unwrap();
        let mut again = Series::new(&dir);
        assert_eq!(again.track("web").recent.len(), 1);
        assert_eq!(read_all(&dir, "web").unwrap().len(), 1);
        // Past the limit the file rotates: at most two files' worth is kept.
        let mut n = 3_000;
        while std::fs::metadata(rotated_path(&dir, "web")).is_err() {
            again
                .record(&svc, n, &counters(n, 0), &counters(n, 0))
                .unwrap();
            n += 1_000;
            assert!(n < 100_000_000, "never rotated");
        }
        let size = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        assert!(size(rotated_path(&dir, "web")) <= FILE_LIMIT);
        assert!(size(current_path(&dir, "web")) <= FILE_LIMIT);
        assert!(again.recent("web").len() <= MEMORY_SAMPLES);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
