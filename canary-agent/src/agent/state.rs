//! What the agent keeps on disk in `state_dir`, so that a restarted (or killed) agent
//! resumes exactly where the last one was: each service's rollout, its event history,
//! the config weight last applied, and the controller clock.
//!
//! Every file is written atomically (temp file + rename): a kill at any moment leaves
//! the old or the new content, never a torn one.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::controller::{EventLog, Rollout};
use crate::policy::WeightBp;

/// Per service, what the configuration said when it was last applied. The live weight
/// in the pinned map is kept across a restart only while the config's own weight is
/// unchanged; a changed config weight is the operator asking for it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub services: BTreeMap<String, AppliedService>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AppliedService {
    pub config_weight_bp: WeightBp,
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state_dir {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn rollout_path(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}.rollout.json"))
    }

    fn applied_path(&self) -> PathBuf {
        self.dir.join("applied.json")
    }

    pub fn load_rollout(&self, service: &str) -> Result<Option<Rollout>> {
        read_json(&self.rollout_path(service))
    }

    pub fn save_rollout(&self, service: &str, rollout: &Rollout) -> Result<()> {
        write_atomic(&self.rollout_path(service), &serde_json::to_vec(rollout)?)
    }

    /// Forgets a service's rollout (its policy was removed or replaced).
    pub fn remove_rollout(&self, service: &str) -> Result<()> {
        remove_if_present(&self.rollout_path(service))
    }

    pub fn events(&self, service: &str) -> EventLog {
        events_log(&self.dir, service)
    }

    /// Moves a removed service's history aside, so a later service of the same name
    /// starts with an empty one (the old file is kept for audits).
    pub fn archive_events(&self, service: &str, now_ms: u64) -> Result<()> {
        let from = events_log(&self.dir, service).path().to_path_buf();
        let to = self
            .dir
            .join(format!("{service}.events.removed-{now_ms}.jsonl"));
        match std::fs::rename(&from, &to) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("archiving {}", from.display())),
        }
    }

    pub fn load_applied(&self) -> Result<Applied> {
        Ok(read_json(&self.applied_path())?.unwrap_or_default())
    }

    pub fn save_applied(&self, applied: &Applied) -> Result<()> {
        write_atomic(&self.applied_path(), &serde_json::to_vec_pretty(applied)?)
    }

    pub fn record_clock(&self, now_ms: u64) -> Result<()> {
        write_atomic(&clock_path(&self.dir), now_ms.to_string().as_bytes())
    }

    /// Deletes everything the agent wrote here (uninstall); archived histories too.
    pub fn remove_all(dir: &Path) -> Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let ours = name == "applied.json"
                || name == "clock_ms"
                || name.ends_with(".rollout.json")
                || name.ends_with(".jsonl")
                || name.ends_with(".tmp");
            if ours {
                remove_if_present(&path)?;
            }
        }
        Ok(())
    }
}

/// A service's rollout history in `state_dir` (also read by the dashboard and reports).
pub fn events_log(state_dir: &Path, service: &str) -> EventLog {
    EventLog::new(state_dir.join(format!("{service}.events.jsonl")))
}

fn clock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("clock_ms")
}

/// The controller clock's last recorded time, so a time-scaled clock (which runs
/// ahead of the wall clock) resumes where the previous agent left it.
pub fn last_clock_ms(state_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(clock_path(state_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}
