//! What the proxy counts, per service and version, in the kernel's units: a leaf the
//! rest of the router writes into and the agent reads.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use canary_common::{histogram::LATENCY_BUCKETS, MAX_BACKENDS};

/// Per-version counts of the proxy, in the kernel's units: every request and response
/// (by class) and the latency from the request to its response head, as the analysis
/// reads them; the backend connections it opened or failed to open; and the requests
/// it answered 502 (backend refused or timed out), each a failed request of the version.
pub struct VersionCounts {
    pub requests: AtomicU64,
    pub responses: [AtomicU64; 5],
    pub latency: Box<[AtomicU64]>,
    pub connections: AtomicU64,
    pub connected: AtomicU64,
    pub failed: AtomicU64,
}

impl Default for VersionCounts {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            responses: Default::default(),
            latency: (0..LATENCY_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            connections: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

/// Decisions by rule and version: the fixed rules in atomics, cohorts by name.
#[derive(Default)]
pub struct Decisions {
    /// `[header, flag, split][version]`.
    pub fixed: [[AtomicU64; 2]; 3],
    pub cohorts: Mutex<HashMap<(String, usize), u64>>,
}

/// One counter per backend position of a service (`MAX_BACKENDS`).
pub struct PerBackend(Box<[AtomicU64]>);

impl Default for PerBackend {
    fn default() -> Self {
        Self((0..MAX_BACKENDS).map(|_| AtomicU64::new(0)).collect())
    }
}

impl std::ops::Deref for PerBackend {
    type Target = [AtomicU64];
    fn deref(&self) -> &[AtomicU64] {
        &self.0
    }
}

#[derive(Default)]
pub struct Counts {
    pub versions: [VersionCounts; 2],
    /// Requests sent to each backend position.
    pub backends: PerBackend,
    pub decisions: Decisions,
    /// Bytes of upgraded connections the agent copied (the kernel carries the rest).
    pub userspace_bytes: AtomicU64,
    pub bad_requests: AtomicU64,
    pub too_large: AtomicU64,
    pub timeouts: AtomicU64,
    /// Connections closed at accept: over `max_connections` or `max_client_connections`.
    pub refused: AtomicU64,
    pub open: AtomicU64,
    pub upgrades: AtomicU64,
}
