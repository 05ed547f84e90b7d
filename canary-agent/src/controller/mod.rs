//! The rollout state machine. It never reads a clock or touches the
//! datapath: callers pass `now_ms` and carry out the returned [`Effect`]s, so
//! the whole behaviour is testable with simulated time and can be persisted
//! (serde) and resumed after an agent restart.
//!
//! Semantics worth knowing:
//! - A step dwells `at[i+1] - at[i]` from when it was actually entered;
//!   time paused or awaiting approval does not count, and a late tick enters
//!   at most one step, starting the next dwell from then.
//! - Entering a step that opens a new stage with a gate waits in
//!   `awaiting-approval` at the previous weight; any `Approve` enters it. A
//!   gate's timeout only raises one `Alert`; the gate keeps waiting.
//! - `Promote` by an `Actor::Operator` passes gates (it is the approval);
//!   other actors are refused at a gate. At the last step it promotes fully.
//! - `SetWeight` pauses; `Resume` restores the step's weight and the
//!   remaining dwell (or reopens a pending gate).
//! - Resuming an analysis pause needs a non-empty reason; promoting out of
//!   one is refused.
//! - With a policy that finishes its releases (`Policy::finish`), reaching
//!   100 % is recorded as `promoted` and goes on to `verifying` (the rules
//!   still judge the canary for `verify_s`; an operator's promote skips it),
//!   then `retiring` (the agent closes the old version's connections and
//!   reports how many remain, [`Rollout::observe_retiring`]), then `finished`
//!   with one [`Effect::Released`] once none remain. Rollback stays possible
//!   until `finished`.

mod clock;
mod events;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::policy::{percent, Gate, Policy, RetireConnections, WaveRollback, WeightBp, FULL_BP};

pub use self::clock::{Clock, ScaledClock, SimClock, SystemClock};
pub use self::events::{EventLog, EventLogError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    Pending,
    Progressing,
    Paused,
    AwaitingApproval,
    Promoted,
    /// At 100 %, the rules still judging the canary before the old version goes.
    Verifying,
    /// The old version's open connections are being closed (or waited for).
    Retiring,
    /// The old version holds nothing: the canary is the service's stable version.
    Finished,
    RolledBack,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Progressing => "progressing",
            Self::Paused => "paused",
            Self::AwaitingApproval => "awaiting-approval",
            Self::Promoted => "promoted",
            Self::Verifying => "verifying",
            Self::Retiring => "retiring",
            Self::Finished => "finished",
            Self::RolledBack => "rolled-back",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Promoted | Self::Finished | Self::RolledBack)
    }

    /// Progressing, paused or at a gate: the rollout, not the config, sets the weight.
    pub fn is_running(self) -> bool {
        !self.is_terminal() && self != Self::Pending
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who or what caused a transition. Serialized as one compact string
/// (`operator:alice`, `schedule`, `analysis`, `webhook:URL`, `rule:NAME`, `fleet`) so
/// event lines stay greppable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Actor {
    Operator(String),
    Schedule,
    Analysis,
    Webhook(String),
    Rule(String),
    /// The fleet's leader, e.g. pausing while etcd is unreachable.
    Fleet,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Operator(who) => write!(f, "operator:{who}"),
            Self::Schedule => f.write_str("schedule"),
            Self::Analysis => f.write_str("analysis"),
            Self::Webhook(url) => write!(f, "webhook:{url}"),
            Self::Rule(name) => write!(f, "rule:{name}"),
            Self::Fleet => f.write_str("fleet"),
        }
    }
}

impl FromStr for Actor {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            _ if text == "schedule" => Ok(Self::Schedule),
            _ if text == "analysis" => Ok(Self::Analysis),
            _ if text == "fleet" => Ok(Self::Fleet),
            Some(("operator", who)) => Ok(Self::Operator(who.into())),
            Some(("webhook", url)) => Ok(Self::Webhook(url.into())),
            Some(("rule", name)) => Ok(Self::Rule(name.into())),
            _ => Err(format!("unknown actor `{text}`")),
        }
    }
}

impl From<Actor> for String {
    fn from(actor: Actor) -> Self {
        actor.to_string()
    }
}

impl TryFrom<String> for Actor {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

/// A request to the controller; JSON-tagged so the agent's API can pass
/// commands through unchanged (`{"command":"set-weight","bp":500}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    Start,
    Pause { reason: String },
    Resume { reason: String },
    Approve { by: String },
    Promote { full: bool },
    Rollback { reason: String },
    SetWeight { bp: WeightBp },
    AnalysisRollback { rule: String, detail: String },
    AnalysisPause { reason: String },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Pause { .. } => "pause",
            Self::Resume { .. } => "resume",
            Self::Approve { .. } => "approve",
            Self::Promote { full: false } => "promote",
            Self::Promote { full: true } => "promote --full",
            Self::Rollback { .. } => "rollback",
            Self::SetWeight { .. } => "set-weight",
            Self::AnalysisRollback { .. } => "analysis-rollback",
            Self::AnalysisPause { .. } => "analysis-pause",
        }
    }
}

/// What the agent must do after a command or tick, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    /// Program the datapath. Emitted whenever the controller sets a weight,
    /// even to the value it already has, so applying it is idempotent.
    SetWeight(WeightBp),
    /// Append to the event log.
    Transition(Event),
    /// A stage gate waits: call the webhook if there is one, tell operators.
    GateWaiting {
        stage: String,
        webhook: Option<String>,
    },
    Alert {
        /// `gate-timeout`, `max-hold` or `retire-timeout`, as sent to the alert webhook.
        kind: String,
        reason: String,
    },
    /// The old version holds no connection: hand the stable role to the canary
    /// backends and tell the pipeline the old version may be deleted.
    Released,
}

/// What the agent does with the old version's connections while retiring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetireAction {
    /// Close each at its next request boundary.
    AtBoundaries,
    /// Close every one now (the retirement timed out).
    CloseNow,
    /// Leave them until they close on their own (or the timeout).
    Wait,
}

/// One line of the rollout history. `from == to` for changes within a
/// state (a scheduled step advance, a weight override while paused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub service: String,
    pub at_ms: u64,
    pub from: RolloutState,
    pub to: RolloutState,
    /// Index into the policy's steps of the step the rollout is at.
    pub step: Option<usize>,
    pub stage: Option<String>,
    pub weight_bp: WeightBp,
    pub actor: Actor,
    pub reason: String,
}

/// The analysis verdict passed to [`Rollout::tick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnalysisHold {
    Clear,
    /// Data is inconclusive: do not advance to the next step yet.
    Hold(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("cannot {command} while the rollout is {state}: {why}")]
    NotAllowed {
        command: &'static str,
        state: RolloutState,
        why: String,
    },
    #[error(
        "cannot resume without a reason: the rollout was paused by analysis ({pause}) and \
         resuming overrides that decision"
    )]
    ReasonRequired { pause: String },
    #[error("weight {0} bp is above 100 % (10000 bp)")]
    WeightOutOfRange(WeightBp),
}

/// A snapshot for `canary status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub service: String,
    pub state: RolloutState,
    pub stage: Option<String>,
    /// Index into the policy's steps; `None` before step 0 is entered.
    pub step: Option<usize>,
    pub steps: usize,
    pub weight_bp: WeightBp,
    /// Only while progressing with a next step ahead: the schedule is frozen
    /// in every other state.
    pub next_step_in_s: Option<f64>,
    /// Reason of the last transition.
    pub reason: String,
    /// Why analysis is holding the next step back, when it is.
    pub holding: Option<String>,
    pub waiting_gate: Option<GateStatus>,
    /// While verifying: seconds left before the old version is retired (frozen
    /// while analysis holds).
    #[serde(default)]
    pub verify_left_s: Option<f64>,
    #[serde(default)]
    pub retiring: Option<RetireStatus>,
    /// The hand-over (`finished`).
    #[serde(default)]
    pub released: Option<Release>,
    /// While the policy rolls out region by region: the wave running.
    #[serde(default)]
    pub wave: Option<WaveStatus>,
}

/// The wave a rollout is in: `index` counts from 0, of `of` waves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveStatus {
    pub index: usize,
    pub of: usize,
    pub regions: Vec<String>,
}

/// A finished release: when the stable role went to the canary backends, and which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub at_ms: u64,
    /// The backends that became stable (the config's `canary` then); empty until the
    /// agent records them.
    pub backends: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetireStatus {
    pub connections: RetireConnections,
    /// The old version's connections still open at the last scan.
    pub remaining: u64,
    /// Seconds until the timeout acts (0 once it has).
    pub timeout_in_s: f64,
    pub timed_out: bool,
}

/// The retirement in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Retirement {
    since_ms: u64,
    remaining: u64,
    timed_out: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateStatus {
    pub stage: String,
    /// The step that is entered once the gate is approved.
    pub step: usize,
    pub approval: bool,
    pub webhook: Option<String>,
    /// Time waited so far in the current wait (0 while paused).
    pub waiting_s: f64,
    pub timed_out: bool,
}

/// A step held back behind its stage's gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PendingGate {
    step: usize,
    /// The gate of this wave (before its first step) rather than a stage's.
    #[serde(default)]
    wave: Option<usize>,
    /// `None` while the rollout is paused: the wait restarts on resume.
    since_ms: Option<u64>,
    alerted: bool,
}

/// Time spent progressing at the current step; pauses and gate waits stop
/// it, so resuming continues with the remaining dwell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Dwell {
    banked_ms: u64,
    running_since_ms: Option<u64>,
}

impl Dwell {
    fn elapsed_ms(&self, now_ms: u64) -> u64 {
        let running = self
            .running_since_ms
            .map_or(0, |since| now_ms.saturating_sub(since));
        self.banked_ms + running
    }

    fn restart(&mut self, now_ms: u64) {
        *self = Self {
            banked_ms: 0,
            running_since_ms: Some(now_ms),
        };
    }

    fn stop(&mut self, now_ms: u64) {
        self.banked_ms = self.elapsed_ms(now_ms);
        self.running_since_ms = None;
    }

    fn resume(&mut self, now_ms: u64) {
        self.running_since_ms = Some(now_ms);
    }
}

/// One service's rollout. Serialize it after every change to resume after a
/// restart; timestamps are those of the clock the agent passes in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    service: String,
    policy: Policy,
    state: RolloutState,
    step: Option<usize>,
    weight_bp: WeightBp,
    gate: Option<PendingGate>,
    dwell: Dwell,
    /// Resuming then overrides an automatic decision and needs a reason.
    paused_by_analysis: bool,
    reason: String,
    holding: Option<String>,
    /// When the current hold began (controller clock), for `max-hold`.
    #[serde(default)]
    holding_since_ms: Option<u64>,
    /// The max-hold alert of the current hold was raised.
    #[serde(default)]
    hold_alerted: bool,
    #[serde(default)]
    retirement: Option<Retirement>,
    #[serde(default)]
    released: Option<Release>,
    /// Index into the policy's waves (0 without waves).
    #[serde(default)]
    wave: usize,
}

impl Rollout {
    /// Pending at weight 0: no canary traffic before an explicit start,
    /// whatever the policy's split says (the split only matters as the single
    /// step of a policy without a progression).
    pub fn new(service: &str, policy: Policy) -> Self {
        Self {
            service: service.to_string(),
            policy,
            state: RolloutState::Pending,
            step: None,
            weight_bp: 0,
            gate: None,
            dwell: Dwell::default(),
            paused_by_analysis: false,
            reason: "created".into(),
            holding: None,
            holding_since_ms: None,
            hold_alerted: false,
            retirement: None,
            released: None,
            wave: 0,
        }
    }

    /// Continues a running rollout under a changed policy (a config reload): state,
    /// weight and dwell are kept, the step index is clamped to the new progression,
    /// and the new steps, stages, metrics and rules apply from now on.
    pub fn adopt_policy(&mut self, policy: Policy, now_ms: u64) {
        let last = policy.steps.len().saturating_sub(1);
        self.step = self.step.map(|s| s.min(last));
        if let Some(gate) = &mut self.gate {
            gate.step = gate.step.min(last);
            if gate.since_ms.is_some() {
                gate.since_ms = Some(now_ms);
            }
        }
        self.wave = self.wave.min(policy.waves.len().saturating_sub(1));
        self.policy = policy;
        self.holding_since_ms = None;
        self.hold_alerted = false;
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// The rollout as it may leave this node (etcd): its policy's webhook URLs
    /// without their secrets. [`Rollout::with_policy`] gives it the real one back.
    pub fn redacted(&self) -> Rollout {
        Rollout {
            policy: self.policy.redacted(),
            ..self.clone()
        }
    }

    /// The same rollout under `policy` (the local config's, for one read from etcd).
    pub fn with_policy(self, policy: Policy) -> Rollout {
        Rollout { policy, ..self }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn state(&self) -> RolloutState {
        self.state
    }

    pub fn weight_bp(&self) -> WeightBp {
        self.weight_bp
    }

    /// The weight the nodes of `wave` split with: the finished waves at 100 % (0 after
    /// a rollback of every wave), the running one at the rollout's weight, the later
    /// ones at 0. Without waves, the rollout's weight.
    pub fn wave_weight(&self, wave: usize) -> WeightBp {
        if self.policy.waves.is_empty() || wave == self.wave {
            return self.weight_bp;
        }
        let all_back = self.state == RolloutState::RolledBack
            && self.policy.wave_rollback == WaveRollback::All;
        if wave < self.wave && !all_back {
            FULL_BP
        } else {
            0
        }
    }

    /// Skips the waves ahead that no node is in (`has_nodes(wave)` says), each with an
    /// event, while the current one is at its first step or gate. Skipping the last wave
    /// finishes the progression as reaching 100 % would.
    pub fn skip_empty_waves(
        &mut self,
        now_ms: u64,
        has_nodes: impl Fn(usize) -> bool,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        let waves = self.policy.waves.len();
        for _ in 0..waves {
            let starting = self.step.is_none_or(|s| s == 0)
                && matches!(
                    self.state,
                    RolloutState::Progressing | RolloutState::AwaitingApproval
                );
            if !starting || has_nodes(self.wave) {
                break;
            }
            let why = format!(
                "wave {}/{waves} ({}) has no node: skipped",
                self.wave + 1,
                self.policy.waves[self.wave].regions.join(", ")
            );
            if self.wave + 1 < waves {
                self.begin_wave(self.wave + 1, Actor::Schedule, &why, now_ms, &mut fx);
            } else {
                self.gate = None;
                self.step = Some(self.policy.steps.len() - 1);
                self.set_weight(FULL_BP, &mut fx);
                self.promoted(Actor::Schedule, why, now_ms, &mut fx);
            }
        }
        fx
    }

    /// The wave running, when the policy has waves.
    pub fn wave(&self) -> Option<usize> {
        (!self.policy.waves.is_empty()).then_some(self.wave)
    }

    /// The hand-over of a finished release.
    pub fn released(&self) -> Option<&Release> {
        self.released.as_ref()
    }

    /// Records which backends took the stable role at [`Effect::Released`].
    pub fn record_release(&mut self, backends: Vec<String>) {
        if let Some(release) = &mut self.released {
            release.backends = backends;
        }
    }

    /// Carries out an operator or analysis command. An illegal command leaves
    /// the rollout unchanged and says why.
    ///
    /// For `AnalysisRollback` the event's actor is `Actor::Rule(rule)` and for
    /// `AnalysisPause` it is `Actor::Analysis`, whatever `actor` is passed.
    pub fn apply(
        &mut self,
        cmd: Command,
        actor: Actor,
        now_ms: u64,
    ) -> Result<Vec<Effect>, ControlError> {
        self.check(&cmd, &actor)?;
        let mut fx = Vec::new();
        match cmd {
            Command::Start => self.start(actor, now_ms, &mut fx),
            Command::Pause { reason } => {
                self.dwell.stop(now_ms);
                self.stop_gate_wait();
                let reason = or_default(reason, "paused");
                self.transition(RolloutState::Paused, actor, reason, now_ms, &mut fx);
            }
            Command::AnalysisPause { reason } => {
                self.dwell.stop(now_ms);
                self.stop_gate_wait();
                self.paused_by_analysis = true;
                let reason = format!("analysis paused the rollout: {reason}");
                self.transition(
                    RolloutState::Paused,
                    Actor::Analysis,
                    reason,
                    now_ms,
                    &mut fx,
                );
            }
            Command::Resume { reason } => self.resume(reason, actor, now_ms, &mut fx),
            Command::Approve { by } => {
                let (step, wave) = self.gate.as_ref().map_or((0, None), |g| (g.step, g.wave));
                let why = format!("approved by {by}");
                if wave.is_some() {
                    // The wave's gate passed: its first step may wait at a stage's.
                    self.gate = None;
                    self.advance_to(step, actor, false, &why, now_ms, &mut fx);
                } else {
                    self.enter_step(step, actor, &why, now_ms, &mut fx);
                }
            }
            Command::Promote { .. } if self.state == RolloutState::Verifying => {
                let reason = format!("verification skipped by {actor}");
                self.verified(actor, reason, now_ms, &mut fx);
            }
            Command::Promote { full: false } => {
                let target = self
                    .gate
                    .as_ref()
                    .map_or_else(|| self.step.map_or(0, |s| s + 1), |gate| gate.step);
                if target >= self.policy.steps.len() {
                    self.promote_full(actor, now_ms, &mut fx);
                } else {
                    let operator = matches!(actor, Actor::Operator(_));
                    let why = format!("promoted by {actor}");
                    self.advance_to(target, actor, operator, &why, now_ms, &mut fx);
                }
            }
            Command::Promote { full: true } => self.promote_full(actor, now_ms, &mut fx),
            Command::Rollback { reason } => {
                let reason = or_default(reason, "rolled back");
                self.roll_back(actor, reason, now_ms, &mut fx);
            }
            Command::AnalysisRollback { rule, detail } => {
                let reason = format!("rule {rule} fired: {detail}");
                self.roll_back(Actor::Rule(rule), reason, now_ms, &mut fx);
            }
            Command::SetWeight { bp } => {
                self.dwell.stop(now_ms);
                self.stop_gate_wait();
                self.set_weight(bp, &mut fx);
                let reason = format!(
                    "operator override: weight set to {}; automatic progression paused until resume",
                    percent(bp)
                );
                self.transition(RolloutState::Paused, actor, reason, now_ms, &mut fx);
            }
        }
        Ok(fx)
    }

    /// Advances the schedule: enters the next step once the current one has
    /// dwelt long enough and analysis does not hold it back, at most one step
    /// per tick (a late tick starts the next dwell from now); raises the gate
    /// timeout alert once.
    pub fn tick(&mut self, now_ms: u64, analysis: AnalysisHold) -> Vec<Effect> {
        let mut fx = Vec::new();
        match self.state {
            RolloutState::Progressing => {
                let Some(due) = self.next_step_due_in_ms(now_ms) else {
                    return fx;
                };
                match analysis {
                    AnalysisHold::Hold(why) if due == 0 => {
                        self.check_max_hold(&why, now_ms, &mut fx);
                        self.holding = Some(why);
                    }
                    AnalysisHold::Hold(_) => {}
                    AnalysisHold::Clear => {
                        self.holding = None;
                        self.holding_since_ms = None;
                        self.hold_alerted = false;
                        if due == 0 {
                            let next = self.step.map_or(0, |s| s + 1);
                            let why = "dwell time elapsed";
                            self.advance_to(next, Actor::Schedule, false, why, now_ms, &mut fx);
                        }
                    }
                }
            }
            RolloutState::AwaitingApproval => {
                if let Some(status) = self.gate_status(now_ms) {
                    let gate = self.gate.as_mut().filter(|g| !g.alerted);
                    if let (true, Some(gate)) = (status.timed_out, gate) {
                        gate.alerted = true;
                        fx.push(Effect::Alert {
                            kind: "gate-timeout".into(),
                            reason: format!(
                                "{}: stage {} gate has waited {:.0}s for approval",
                                self.service, status.stage, status.waiting_s
                            ),
                        });
                    }
                }
            }
            RolloutState::Verifying => {
                if self.verify_left_ms(now_ms) > 0 {
                    return fx;
                }
                match analysis {
                    AnalysisHold::Hold(why) => {
                        self.check_max_hold(&why, now_ms, &mut fx);
                        self.holding = Some(why);
                    }
                    AnalysisHold::Clear => {
                        self.holding = None;
                        let reason =
                            format!("verification passed: {}s at 100%", self.finish().verify_s);
                        self.verified(Actor::Schedule, reason, now_ms, &mut fx);
                    }
                }
            }
            _ => {}
        }
        fx
    }

    /// What to do with the old version's connections now; `None` unless retiring.
    pub fn retire_action(&self) -> Option<RetireAction> {
        let retirement = self.retirement.as_ref()?;
        Some(
            match (self.finish().retire.connections, retirement.timed_out) {
                (RetireConnections::Keep, _) => RetireAction::Wait,
                (_, true) => RetireAction::CloseNow,
                (RetireConnections::Drain, false) => RetireAction::AtBoundaries,
                (RetireConnections::CloseAfter, false) => RetireAction::Wait,
            },
        )
    }

    /// Reports how many of the old version's connections are still open while
    /// retiring: none finishes the release ([`Effect::Released`]); past the timeout,
    /// `drain` and `close-after` turn to closing the rest and `keep` raises one alert.
    pub fn observe_retiring(&mut self, now_ms: u64, remaining: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        let timeout_s = self.finish().retire.timeout_s;
        let mode = self.finish().retire.connections;
        let Some(retirement) = self.retirement.as_mut() else {
            return fx;
        };
        retirement.remaining = remaining;
        let waited_ms = now_ms.saturating_sub(retirement.since_ms);
        if remaining == 0 {
            self.retirement = None;
            self.released = Some(Release {
                at_ms: now_ms,
                backends: Vec::new(),
            });
            let reason = format!(
                "the old version holds no connection ({:.0}s after retiring began): released",
                waited_ms as f64 / 1_000.0
            );
            self.transition(
                RolloutState::Finished,
                Actor::Schedule,
                reason,
                now_ms,
                &mut fx,
            );
            fx.push(Effect::Released);
        } else if !retirement.timed_out && waited_ms >= timeout_s * 1_000 {
            retirement.timed_out = true;
            if mode == RetireConnections::Keep {
                fx.push(Effect::Alert {
                    kind: "retire-timeout".into(),
                    reason: format!(
                        "{}: {remaining} connections of the old version still open after \
                         {timeout_s}s (retire = keep: they stay until they close)",
                        self.service
                    ),
                });
            } else {
                let reason = format!(
                    "retire timeout ({timeout_s}s, {}): closing the {remaining} remaining \
                     connections of the old version",
                    mode.as_str()
                );
                self.transition(
                    RolloutState::Retiring,
                    Actor::Schedule,
                    reason,
                    now_ms,
                    &mut fx,
                );
            }
        }
        fx
    }

    /// The policy's finish, or retiring at once with the default retirement (a
    /// policy reloaded without one while verifying or retiring).
    fn finish(&self) -> crate::policy::Finish {
        self.policy.finish.unwrap_or(crate::policy::Finish {
            verify_s: 0,
            retire: crate::policy::Retire::default(),
        })
    }

    fn verify_left_ms(&self, now_ms: u64) -> u64 {
        (self.finish().verify_s * 1_000).saturating_sub(self.dwell.elapsed_ms(now_ms))
    }

    /// Whether a wave follows the current one.
    fn wave_ahead(&self) -> bool {
        self.wave + 1 < self.policy.waves.len()
    }

    /// Reaching 100 %: `promoted`, then on to verifying when the policy finishes
    /// its releases. A wave with others after it verifies (when the policy does) and
    /// hands on to the next.
    fn promoted(&mut self, actor: Actor, reason: String, now_ms: u64, fx: &mut Vec<Effect>) {
        self.dwell.stop(now_ms);
        if !self.wave_ahead() {
            self.transition(RolloutState::Promoted, actor, reason, now_ms, fx);
            if self.policy.finish.is_some() {
                self.begin_verifying(now_ms, fx);
            }
            return;
        }
        match self.policy.finish {
            Some(f) if f.verify_s > 0 => {
                self.dwell.restart(now_ms);
                let reason = format!(
                    "{reason}; wave {}/{} verifying for {}s before the next wave",
                    self.wave + 1,
                    self.policy.waves.len(),
                    f.verify_s
                );
                self.transition(RolloutState::Verifying, actor, reason, now_ms, fx);
            }
            _ => self.begin_wave(self.wave + 1, actor, &reason, now_ms, fx),
        }
    }

    /// Verification passed (or was skipped): the next wave begins, or the last one
    /// retires the old version.
    fn verified(&mut self, actor: Actor, reason: String, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.wave_ahead() {
            self.begin_wave(self.wave + 1, actor, &reason, now_ms, fx);
        } else {
            self.begin_retiring(actor, reason, now_ms, fx);
        }
    }

    /// Starts wave `wave` from the first step (its nodes at 0 % until then), behind
    /// the wave's gate when it has one.
    fn begin_wave(
        &mut self,
        wave: usize,
        actor: Actor,
        why: &str,
        now_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        self.wave = wave;
        self.step = None;
        self.holding = None;
        self.holding_since_ms = None;
        self.hold_alerted = false;
        self.dwell = Dwell::default();
        let Some(w) = self.policy.waves.get(wave) else {
            return self.advance_to(0, actor, false, why, now_ms, fx);
        };
        let why = format!(
            "{why}; wave {}/{} ({})",
            wave + 1,
            self.policy.waves.len(),
            w.regions.join(", ")
        );
        let gated = w.gate.is_some();
        self.set_weight(0, fx);
        if !gated {
            return self.advance_to(0, actor, false, &why, now_ms, fx);
        }
        self.gate = Some(PendingGate {
            step: 0,
            wave: Some(wave),
            since_ms: Some(now_ms),
            alerted: false,
        });
        let reason = format!("{why} waits for approval to begin");
        self.transition(RolloutState::AwaitingApproval, actor, reason, now_ms, fx);
        self.push_gate_waiting(fx);
    }

    fn begin_verifying(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let verify_s = self.finish().verify_s;
        if verify_s == 0 {
            let reason = "no verification configured".to_string();
            return self.begin_retiring(Actor::Schedule, reason, now_ms, fx);
        }
        self.dwell.restart(now_ms);
        let reason = format!(
            "verifying for {verify_s}s at 100% (against stable's baseline from before \
             promotion) before retiring the old version"
        );
        self.transition(RolloutState::Verifying, Actor::Schedule, reason, now_ms, fx);
    }

    fn begin_retiring(&mut self, actor: Actor, why: String, now_ms: u64, fx: &mut Vec<Effect>) {
        self.dwell.stop(now_ms);
        self.holding = None;
        self.holding_since_ms = None;
        self.hold_alerted = false;
        self.retirement = Some(Retirement {
            since_ms: now_ms,
            remaining: 0,
            timed_out: false,
        });
        let retire = self.finish().retire;
        let reason = format!(
            "{why}; retiring the old version's connections ({}, timeout {}s)",
            retire.connections.as_str(),
            retire.timeout_s
        );
        self.transition(RolloutState::Retiring, actor, reason, now_ms, fx);
    }

    /// Raises one alert (and a history event) when inconclusive analysis has held the
    /// due step back longer than the policy's `max-hold`; the hold continues.
    fn check_max_hold(&mut self, why: &str, now_ms: u64, fx: &mut Vec<Effect>) {
        let since = *self.holding_since_ms.get_or_insert(now_ms);
        let max_s = self.policy.analysis.max_hold_s;
        let held_ms = now_ms.saturating_sub(since);
        if max_s == 0 || self.hold_alerted || held_ms < max_s * 1_000 {
            return;
        }
        self.hold_alerted = true;
        let reason = format!(
            "analysis has held the next step for {:.0}s (max-hold {max_s}s): {why}",
            held_ms as f64 / 1_000.0
        );
        fx.push(Effect::Alert {
            kind: "max-hold".into(),
            reason: format!("{}: {reason}", self.service),
        });
        self.transition(self.state, Actor::Analysis, reason, now_ms, fx);
    }

    pub fn status(&self, now_ms: u64) -> RolloutStatus {
        RolloutStatus {
            service: self.service.clone(),
            state: self.state,
            stage: self.stage_name(),
            step: self.step,
            steps: self.policy.steps.len(),
            weight_bp: self.weight_bp,
            next_step_in_s: self
                .next_step_due_in_ms(now_ms)
                .map(|ms| ms as f64 / 1_000.0),
            reason: self.reason.clone(),
            holding: self.holding.clone(),
            waiting_gate: self.gate_status(now_ms),
            verify_left_s: (self.state == RolloutState::Verifying)
                .then(|| self.verify_left_ms(now_ms) as f64 / 1_000.0),
            retiring: self.retirement.as_ref().map(|r| {
                let retire = self.finish().retire;
                let timeout_ms =
                    (retire.timeout_s * 1_000).saturating_sub(now_ms.saturating_sub(r.since_ms));
                RetireStatus {
                    connections: retire.connections,
                    remaining: r.remaining,
                    timeout_in_s: timeout_ms as f64 / 1_000.0,
                    timed_out: r.timed_out,
                }
            }),
            released: self.released.clone(),
            wave: self.policy.waves.get(self.wave).map(|w| WaveStatus {
                index: self.wave,
                of: self.policy.waves.len(),
                regions: w.regions.clone(),
            }),
        }
    }

    /// Refuses commands that make no sense in the current state.
    fn check(&self, cmd: &Command, actor: &Actor) -> Result<(), ControlError> {
        use RolloutState::*;
        let refuse = |why: &str| {
            Err(ControlError::NotAllowed {
                command: cmd.name(),
                state: self.state,
                why: why.to_string(),
            })
        };
        let state = self.state;
        let rollback = matches!(
            cmd,
            Command::Rollback { .. } | Command::AnalysisRollback { .. }
        );
        match (cmd, state) {
            (Command::Start, Pending) => return Ok(()),
            (Command::Start, s) if s.is_terminal() => return Ok(()),
            (Command::Start, _) => {
                return refuse("it is already running; roll back or promote it first")
            }
            (_, s) if s.is_terminal() => return refuse("it has finished; start a new rollout"),
            (_, Pending) if !rollback => return refuse("it has not started"),
            _ => {}
        }
        let analysis_pause = state == Paused && self.paused_by_analysis;
        match cmd {
            Command::Promote { .. } | Command::Pause { .. } | Command::SetWeight { .. }
                if state == Retiring =>
            {
                refuse("it is retiring the old version; roll back to return to it")
            }
            Command::Pause { .. } if state == Paused => refuse("it is already paused"),
            Command::AnalysisPause { .. } if analysis_pause => refuse("analysis already paused it"),
            Command::Resume { .. } if state != Paused => refuse("it is not paused"),
            Command::Resume { reason } if analysis_pause && reason.trim().is_empty() => {
                Err(ControlError::ReasonRequired {
                    pause: self.reason.clone(),
                })
            }
            Command::Approve { .. } if state != AwaitingApproval => {
                refuse("no stage gate is waiting for approval")
            }
            Command::Promote { .. } if analysis_pause => {
                refuse("analysis paused it; resume with a reason first")
            }
            Command::Promote { full } if !matches!(actor, Actor::Operator(_)) => {
                match self.gate_ahead(*full) {
                    Some(stage) => refuse(&format!(
                        "only an operator may promote past the gate of stage {stage}"
                    )),
                    None => Ok(()),
                }
            }
            Command::SetWeight { bp } if *bp > FULL_BP => Err(ControlError::WeightOutOfRange(*bp)),
            _ => Ok(()),
        }
    }

    /// The first stage gate a promotion would cross.
    fn gate_ahead(&self, full: bool) -> Option<String> {
        let first = self
            .gate
            .as_ref()
            .map_or_else(|| self.step.map_or(0, |s| s + 1), |g| g.step);
        let last = if full {
            self.policy.steps.len()
        } else {
            first + 1
        };
        (first..last.min(self.policy.steps.len()))
            .find_map(|i| self.policy.gate_before(i).map(|(s, _)| s.name.clone()))
    }

    fn start(&mut self, actor: Actor, now_ms: u64, fx: &mut Vec<Effect>) {
        let fresh = Self::new(&self.service, self.policy.clone());
        let from = self.state;
        *self = Self {
            state: from,
            ..fresh
        };
        self.begin_wave(0, actor, "rollout started", now_ms, fx);
        if self.state == RolloutState::AwaitingApproval {
            fx.insert(0, Effect::SetWeight(0));
        }
    }

    fn resume(&mut self, reason: String, actor: Actor, now_ms: u64, fx: &mut Vec<Effect>) {
        let reason = if self.paused_by_analysis {
            format!("override of the analysis pause: {}", reason.trim())
        } else {
            or_default(reason, "resumed")
        };
        self.paused_by_analysis = false;
        self.holding_since_ms = None;
        self.hold_alerted = false;
        let step_weight = self.step.map_or(0, |s| self.policy.steps[s].weight_bp);
        self.set_weight(step_weight, fx);
        if let Some(gate) = &mut self.gate {
            gate.since_ms = Some(now_ms);
            gate.alerted = false;
            self.transition(RolloutState::AwaitingApproval, actor, reason, now_ms, fx);
            self.push_gate_waiting(fx);
        } else {
            self.dwell.resume(now_ms);
            let verifying = self.policy.finish.is_some()
                && self.step == Some(self.policy.steps.len() - 1)
                && step_weight == FULL_BP;
            let to = if verifying {
                RolloutState::Verifying
            } else {
                RolloutState::Progressing
            };
            self.transition(to, actor, reason, now_ms, fx);
        }
    }

    /// Enters `step`, or waits at its stage's gate first unless `pass_gate`.
    fn advance_to(
        &mut self,
        step: usize,
        actor: Actor,
        pass_gate: bool,
        why: &str,
        now_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        let gate = self
            .policy
            .gate_before(step)
            .map(|(stage, _)| stage.name.clone());
        match gate {
            Some(stage) if !pass_gate => {
                self.dwell.stop(now_ms);
                self.holding = None;
                self.gate = Some(PendingGate {
                    step,
                    wave: None,
                    since_ms: Some(now_ms),
                    alerted: false,
                });
                let reason = format!(
                    "{why}; waiting for approval to enter stage {stage} (step {}, {})",
                    step + 1,
                    percent(self.policy.steps[step].weight_bp)
                );
                self.transition(RolloutState::AwaitingApproval, actor, reason, now_ms, fx);
                self.push_gate_waiting(fx);
            }
            Some(stage) => {
                let why = format!("{why}, passing the gate of stage {stage}");
                self.enter_step(step, actor, &why, now_ms, fx);
            }
            None => self.enter_step(step, actor, why, now_ms, fx),
        }
    }

    fn enter_step(
        &mut self,
        step: usize,
        actor: Actor,
        why: &str,
        now_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        let steps = &self.policy.steps;
        let weight = steps[step].weight_bp;
        let promotes = step + 1 == steps.len() && weight == FULL_BP;
        let reason = format!(
            "{why}: step {}/{} at {}",
            step + 1,
            steps.len(),
            percent(weight)
        );
        self.gate = None;
        self.holding = None;
        self.holding_since_ms = None;
        self.hold_alerted = false;
        self.step = Some(step);
        self.dwell.restart(now_ms);
        self.set_weight(weight, fx);
        if promotes {
            let reason = format!("{reason}; last step reached, promoted");
            self.promoted(actor, reason, now_ms, fx);
        } else {
            self.transition(RolloutState::Progressing, actor, reason, now_ms, fx);
        }
    }

    fn promote_full(&mut self, actor: Actor, now_ms: u64, fx: &mut Vec<Effect>) {
        self.gate = None;
        self.holding = None;
        self.step = Some(self.policy.steps.len() - 1);
        self.set_weight(FULL_BP, fx);
        let reason = format!("promoted to 100% by {actor}");
        self.promoted(actor, reason, now_ms, fx);
    }

    fn roll_back(&mut self, actor: Actor, reason: String, now_ms: u64, fx: &mut Vec<Effect>) {
        self.gate = None;
        self.holding = None;
        self.paused_by_analysis = false;
        self.retirement = None;
        self.dwell.stop(now_ms);
        self.set_weight(0, fx);
        self.transition(RolloutState::RolledBack, actor, reason, now_ms, fx);
    }

    fn stop_gate_wait(&mut self) {
        if let Some(gate) = &mut self.gate {
            gate.since_ms = None;
        }
    }

    fn set_weight(&mut self, bp: WeightBp, fx: &mut Vec<Effect>) {
        self.weight_bp = bp;
        fx.push(Effect::SetWeight(bp));
    }

    /// Records the change as one event; call after updating step and weight.
    fn transition(
        &mut self,
        to: RolloutState,
        actor: Actor,
        reason: String,
        now_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        fx.push(Effect::Transition(Event {
            service: self.service.clone(),
            at_ms: now_ms,
            from: self.state,
            to,
            step: self.step,
            stage: self.stage_name(),
            weight_bp: self.weight_bp,
            actor,
            reason: reason.clone(),
        }));
        self.state = to;
        self.reason = reason;
    }

    fn push_gate_waiting(&self, fx: &mut Vec<Effect>) {
        if let Some((stage, gate)) = self.gate.as_ref().and_then(|g| self.pending_gate(g)) {
            fx.push(Effect::GateWaiting {
                stage,
                webhook: gate.webhook.clone(),
            });
        }
    }

    /// The gate a rollout waits at, and its name: a wave's (`wave 2`) or a stage's.
    fn pending_gate(&self, pending: &PendingGate) -> Option<(String, &Gate)> {
        match pending.wave {
            Some(w) => {
                let gate = self.policy.waves.get(w)?.gate.as_ref()?;
                Some((format!("wave {}", w + 1), gate))
            }
            None => {
                let (stage, gate) = self.policy.gate_before(pending.step)?;
                Some((stage.name.clone(), gate))
            }
        }
    }

    fn stage_name(&self) -> Option<String> {
        self.step
            .and_then(|s| self.policy.stage_of_step(s))
            .map(|s| s.name.clone())
    }

    /// Milliseconds until the next step is due (0 = due now); `None` unless
    /// progressing with a step ahead.
    fn next_step_due_in_ms(&self, now_ms: u64) -> Option<u64> {
        if self.state != RolloutState::Progressing {
            return None;
        }
        let step = self.step?;
        let next = self.policy.steps.get(step + 1)?;
        let dwell_ms = (next.at_s - self.policy.steps[step].at_s) * 1_000;
        Some(dwell_ms.saturating_sub(self.dwell.elapsed_ms(now_ms)))
    }

    fn gate_status(&self, now_ms: u64) -> Option<GateStatus> {
        let pending = self.gate.as_ref()?;
        let (stage, gate) = self.pending_gate(pending)?;
        let waited_ms = pending
            .since_ms
            .map_or(0, |since| now_ms.saturating_sub(since));
        Some(GateStatus {
            stage,
            step: pending.step,
            approval: gate.approval,
            webhook: gate.webhook.as_deref().map(crate::webhook::redact_url),
            waiting_s: waited_ms as f64 / 1_000.0,
            timed_out: gate.timeout_s > 0 && waited_ms >= gate.timeout_s * 1_000,
        })
    }
}

fn or_default(reason: String, default: &str) -> String {
    if reason.trim().is_empty() {
        default.to_string()
    } else {
        reason
    }
}
