//! The analysis' questions, a leaf of it: one comparison of the canary with its bound
//! (against stable's rate or a fixed rate) and which direction is bad. The decisions
//! (`check`) and the change detector (`detector`) both ask them.

use super::stats::Tail;

/// Which direction of the canary's value is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worse {
    Higher,
    Lower,
}

impl Worse {
    pub(super) fn fail_tail(self) -> Tail {
        match self {
            Worse::Higher => Tail::Upper,
            Worse::Lower => Tail::Lower,
        }
    }

    pub(super) fn pass_tail(self) -> Tail {
        match self {
            Worse::Higher => Tail::Lower,
            Worse::Lower => Tail::Upper,
        }
    }

    /// Moves a boundary `slack` times further in the bad direction.
    pub(super) fn widen(self, boundary: f64, slack: f64) -> f64 {
        match self {
            Worse::Higher => boundary * slack,
            Worse::Lower => boundary / slack,
        }
    }
}

/// `events` out of `trials` for one version over the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rate {
    pub events: u64,
    pub trials: u64,
}

impl Rate {
    /// Events per trial; NaN (serialized as `null`) without trials.
    pub fn value(self) -> f64 {
        if self.trials == 0 {
            f64::NAN
        } else {
            self.events as f64 / self.trials as f64
        }
    }
}

/// A comparison of the canary with its bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Question {
    /// Canary rate against `factor` × stable rate.
    Ratio {
        canary: Rate,
        stable: Rate,
        factor: f64,
        /// Absolute canary rate in (0, 1) that suffices for a Pass when stable has fewer
        /// events than [`Needs::min_events`], so that the ratio cannot be decided (see the
        /// module docs). Only used when higher is worse; never causes a Fail.
        floor: Option<f64>,
    },
    /// Canary rate against the fixed rate `p0`.
    Absolute { canary: Rate, p0: f64 },
}

impl Question {
    /// `(k, n, π0)` of the binomial question with the bound set to `boundary` (a ratio
    /// for [`Question::Ratio`], a rate for [`Question::Absolute`]).
    pub(super) fn binomial(&self, boundary: f64) -> (u64, u64, f64) {
        match *self {
            Question::Ratio { canary, stable, .. } => {
                let weighted = boundary * canary.trials as f64;
                (
                    canary.events,
                    canary.events + stable.events,
                    weighted / (weighted + stable.trials as f64),
                )
            }
            Question::Absolute { canary, .. } => (canary.events, canary.trials, boundary),
        }
    }

    pub(super) fn boundary(&self) -> f64 {
        match *self {
            Question::Ratio { factor, .. } => factor,
            Question::Absolute { p0, .. } => p0,
        }
    }
}
