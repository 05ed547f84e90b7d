//! Time sources. The controller itself only takes `now_ms` arguments; the
//! agent reads one of these clocks so tests and demos can bend time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock-like milliseconds (Unix epoch for the real clocks).
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;

    /// How many times faster than real time it runs (bounds what a fleet accepts as
    /// another node's clock).
    fn speed(&self) -> u32 {
        1
    }
}

/// Real time, so persisted timestamps stay meaningful across restarts.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Time that moves only when told to: for tests.
#[derive(Debug, Default)]
pub struct SimClock(AtomicU64);

impl SimClock {
    pub fn new(start_ms: u64) -> Self {
        Self(AtomicU64::new(start_ms))
    }

    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance_ms(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn advance_s(&self, s: u64) {
        self.advance_ms(s * 1_000);
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Runs `factor` times faster than real time from `start_ms`, so a one-hour
/// policy can be demonstrated in a minute. Reading it after a restart with
/// `starting_at(last persisted now, factor)` keeps a persisted rollout's
/// timeline continuous.
#[derive(Debug, Clone)]
pub struct ScaledClock {
    start_ms: u64,
    origin: Instant,
    factor: u32,
}

impl ScaledClock {
    /// Starts at the current wall-clock time.
    pub fn new(factor: u32) -> Self {
        Self::starting_at(SystemClock.now_ms(), factor)
    }

    pub fn starting_at(start_ms: u64, factor: u32) -> Self {
        Self {
            start_ms,
            origin: Instant::now(),
            factor,
        }
    }
}

impl Clock for ScaledClock {
    fn now_ms(&self) -> u64 {
        let real = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.start_ms
            .saturating_add(real.saturating_mul(u64::from(self.factor)))
    }

    fn speed(&self) -> u32 {
        self.factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_clock_moves_only_when_told() {
        let clock = SimClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance_s(2);
        clock.advance_ms(5);
        assert_eq!(clock.now_ms(), 3_005);
        clock.set(10);
        assert_eq!(clock.now_ms(), 10);
    }

    #[test]
    fn scaled_clock_runs_faster() {
        let clock = ScaledClock::starting_at(0, 1_000);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(clock.now_ms() >= 20_000);
        assert!(SystemClock.now_ms() > 1_600_000_000_000);
    }
}
