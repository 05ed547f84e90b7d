//! The rollout history as JSON lines, one [`Event`] per line, so it can be
//! appended without rewriting and read with ordinary tools.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{Effect, Event};

/// An append-only event file (one per service, or shared: events name
/// their service).
#[derive(Debug, Clone)]
pub struct EventLog {
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}:{line}: not an event: {source}")]
    Parse {
        path: String,
        line: usize,
        source: serde_json::Error,
    },
}

impl EventLog {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line, written with a single call so concurrent appenders
    /// do not interleave within a line.
    pub fn append(&self, event: &Event) -> Result<(), EventLogError> {
        let mut line = serde_json::to_string(event).map_err(|e| self.io(e.into()))?;
        line.push('\n');
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .and_then(|mut file| file.write_all(line.as_bytes()))
            .map_err(|e| self.io(e))
    }

    /// Appends the events among a command's or tick's effects, in order.
    pub fn append_effects(&self, effects: &[Effect]) -> Result<(), EventLogError> {
        effects.iter().try_for_each(|effect| match effect {
            Effect::Transition(event) => self.append(event),
            _ => Ok(()),
        })
    }

    /// All events in file order; a missing file is an empty history.
    pub fn read(&self) -> Result<Vec<Event>, EventLogError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line).map_err(|source| EventLogError::Parse {
                    path: self.path.display().to_string(),
                    line: i + 1,
                    source,
                })
            })
            .collect()
    }

    fn io(&self, source: io::Error) -> EventLogError {
        EventLogError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }
}
