//! What the agent keeps on disk in `state_dir`, so that a restarted (or killed) agent
//! resumes exactly where the last one was: each service's rollout, its event history,
//! the config weight last applied, and the controller clock.
//!
//! Every file is written atomically (temp file + fsync + rename + directory fsync): a
//! kill or power loss at any moment leaves the old or the new content, never a torn
//! one. A file that does not parse is set aside with a warning. Only root can read
//! the directory (0700) or the files (0600).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::controller::{Clock, EventLog, Rollout};
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
    /// Creates the directory if needed and makes it root's alone (0700): rollouts,
    /// histories and series name services, weights and operators.
    pub fn open(dir: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state_dir {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making state_dir {} private (0700)", dir.display()))?;
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
                || name.ends_with(".tmp")
                || name.contains(".corrupt-");
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

/// A state file's content; one that does not parse is moved aside (kept for a look)
/// with a warning, and the agent starts without it rather than failing every start.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match serde_json::from_slice(&bytes) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let aside = path.with_extension(format!(
                "corrupt-{}",
                crate::controller::SystemClock.now_ms()
            ));
            tracing::warn!(
                file = %path.display(),
                moved_to = %aside.display(),
                error = %e,
                "state file unreadable: starting without it"
            );
            std::fs::rename(path, &aside)
                .with_context(|| format!("moving the unreadable {} aside", path.display()))?;
            Ok(None)
        }
    }
}

/// Replaces `path` so that a crash at any moment leaves the old or the new content:
/// a temp file of a name no other writer uses (created, never followed or reused),
/// root-only, synced before the rename, and the directory synced after it.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("canary-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn state_is_root_only_and_never_written_through_a_planted_link() {
        let dir = scratch("private");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        // The temp name the agent used to write through.
        std::os::unix::fs::symlink(&victim, dir.join("applied.tmp")).unwrap();
        let state = StateDir::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let mut applied = Applied::default();
        applied.services.insert(
            "web".into(),
            AppliedService {
                config_weight_bp: 500,
            },
        );
        state.save_applied(&applied).unwrap();
        state.record_clock(42).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(mode(&dir.join("applied.json")), 0o600);
        assert_eq!(mode(&dir.join("clock_ms")), 0o600);
        assert_eq!(state.load_applied().unwrap(), applied);
        // No temp file is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_state_file_is_set_aside_and_the_agent_starts_fresh() {
        let dir = scratch("corrupt");
        let state = StateDir::open(&dir).unwrap();
        std::fs::write(dir.join("applied.json"), "{\"services\": {\"web\"").unwrap();
        std::fs::write(dir.join("web.rollout.json"), "not json").unwrap();
        assert_eq!(state.load_applied().unwrap(), Applied::default());
        assert!(state.load_rollout("web").unwrap().is_none());
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("applied.corrupt-")),
            "{names:?}"
        );
        assert!(!dir.join("applied.json").exists());
        StateDir::remove_all(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
