//! The rollout state machine driven by a simulated clock through the seed's
//! one-hour schedule and a gated policy.

use std::path::Path;

use canary_agent::controller::{
    Actor, AnalysisHold, Clock, Command, ControlError, Effect, Event, EventLog, Rollout,
    RolloutState, SimClock,
};
use canary_agent::policy::{load_policy, parse_toml, Policy};

use RolloutState::*;

/// Brings a fresh rollout into the state under test.
type Setup = fn(&mut Sim);

const T0: u64 = 1_700_000_000_000;
const S: u64 = 1_000;

fn fixture(name: &str) -> Policy {
    load_policy(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn alice() -> Actor {
    Actor::Operator("alice".into())
}

/// A rollout, its clock and every effect it produced.
struct Sim {
    clock: SimClock,
    rollout: Rollout,
    effects: Vec<Effect>,
}

impl Sim {
    fn new(policy: Policy) -> Self {
        Self {
            clock: SimClock::new(T0),
            rollout: Rollout::new("checkout", policy),
            effects: Vec::new(),
        }
    }

    fn seed() -> Self {
        Self::new(fixture("seed.scm"))
    }

    fn gated() -> Self {
        Self::new(fixture("gated.toml"))
    }

    /// Seconds since T0 on the simulated clock.
    fn at(&self, s: u64) {
        self.clock.set(T0 + s * S);
    }

    /// Applies a command that must succeed with exactly one transition.
    fn ok(&mut self, cmd: Command, actor: Actor) -> Vec<Effect> {
        let fx = self
            .rollout
            .apply(cmd.clone(), actor, self.clock.now_ms())
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert_eq!(events(&fx).len(), 1, "{cmd:?} -> {fx:?}");
        self.effects.extend(fx.clone());
        fx
    }

    /// Applies a command that must fail and leave the rollout unchanged.
    fn refused(&mut self, cmd: Command, actor: Actor) -> ControlError {
        let before = self.rollout.clone();
        let err = self
            .rollout
            .apply(cmd.clone(), actor, self.clock.now_ms())
            .expect_err(&format!(
                "{cmd:?} should be refused in {:?}",
                before.state()
            ));
        assert_eq!(self.rollout, before);
        err
    }

    fn tick(&mut self, hold: AnalysisHold) -> Vec<Effect> {
        let fx = self.rollout.tick(self.clock.now_ms(), hold);
        // One transition per tick, but reaching 100 % goes on to verifying or retiring.
        let ev = events(&fx);
        assert!(ev.len() <= 1 || ev[0].to == Promoted, "{fx:?}");
        self.effects.extend(fx.clone());
        fx
    }

    /// Ticks once a second up to and including second `until`.
    fn run(&mut self, until: u64) {
        let mut now = self.clock.now_ms();
        while now < T0 + until * S {
            now = (now / S + 1) * S;
            self.clock.set(now);
            self.tick(AnalysisHold::Clear);
        }
    }

    fn state(&self) -> RolloutState {
        self.rollout.state()
    }

    fn step(&self) -> Option<usize> {
        self.rollout.status(self.clock.now_ms()).step
    }

    fn weight(&self) -> u16 {
        self.rollout.weight_bp()
    }

    fn next_in(&self) -> Option<f64> {
        self.rollout.status(self.clock.now_ms()).next_step_in_s
    }

    /// (seconds since T0, step, weight) of every step entered so far.
    fn step_entries(&self) -> Vec<(u64, Option<usize>, u16)> {
        events(&self.effects)
            .iter()
            .filter(|e| matches!(e.to, Progressing | Promoted) && e.reason.contains(": step "))
            .map(|e| ((e.at_ms - T0) / S, e.step, e.weight_bp))
            .collect()
    }
}

fn events(fx: &[Effect]) -> Vec<&Event> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Transition(event) => Some(event),
            _ => None,
        })
        .collect()
}

fn last_event(fx: &[Effect]) -> &Event {
    events(fx).pop().expect("an event")
}

fn reason(text: &str) -> String {
    text.to_string()
}

#[test]
fn seed_schedule_promotes_after_one_hour() {
    let mut sim = Sim::seed();
    assert_eq!((sim.state(), sim.weight(), sim.step()), (Pending, 0, None));
    let fx = sim.ok(Command::Start, alice());
    assert_eq!(fx[0], Effect::SetWeight(100));
    let start = last_event(&fx);
    assert_eq!(
        (start.from, start.to, start.step),
        (Pending, Progressing, Some(0))
    );
    assert_eq!(start.stage.as_deref(), Some("beta-users"));
    assert_eq!(start.actor, alice());
    assert_eq!(sim.next_in(), Some(300.0));

    sim.run(299);
    assert_eq!((sim.step(), sim.weight()), (Some(0), 100));
    assert_eq!(sim.next_in(), Some(1.0));
    sim.run(3_600);
    assert_eq!(
        sim.step_entries(),
        [
            (0, Some(0), 100),
            (300, Some(1), 500),
            (600, Some(2), 2_000),
            (1_800, Some(3), 5_000),
            (3_600, Some(4), 10_000)
        ]
    );
    let done = events(&sim.effects).pop().unwrap().clone();
    assert_eq!(
        (done.from, done.to, done.actor),
        (Progressing, Promoted, Actor::Schedule)
    );
    assert_eq!(done.stage.as_deref(), Some("full-deployment"));
    assert!(done.reason.contains("promoted"), "{}", done.reason);
    let status = sim.rollout.status(sim.clock.now_ms());
    assert_eq!(
        (status.state, status.weight_bp, status.next_step_in_s),
        (Promoted, 10_000, None)
    );
    // Weights reach the datapath in order, one per step.
    let weights: Vec<u16> = sim
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::SetWeight(w) => Some(*w),
            _ => None,
        })
        .collect();
    assert_eq!(weights, [100, 500, 2_000, 5_000, 10_000]);
}

#[test]
fn a_late_tick_starts_the_next_dwell_from_when_the_step_was_entered() {
    let mut sim = Sim::seed();
    sim.ok(Command::Start, alice());
    sim.at(450); // agent was busy: step 1 is due since +300
    sim.tick(AnalysisHold::Clear);
    assert_eq!(sim.step(), Some(1));
    assert_eq!(sim.next_in(), Some(300.0), "step 1 dwells 5m from +450");
    sim.run(749);
    assert_eq!(sim.step(), Some(1));
    sim.run(750);
    assert_eq!(sim.step(), Some(2));
}

#[test]
fn pause_shifts_the_schedule_by_the_paused_time() {
    let mut sim = Sim::seed();
    sim.ok(Command::Start, alice());
    sim.run(100);
    let fx = sim.ok(
        Command::Pause {
            reason: reason("investigating"),
        },
        alice(),
    );
    assert_eq!(fx.len(), 1, "pausing keeps the weight: {fx:?}");
    let ev = last_event(&fx);
    assert_eq!(
        (ev.from, ev.to, ev.reason.as_str()),
        (Progressing, Paused, "investigating")
    );
    assert_eq!(sim.next_in(), None);
    sim.run(1_000);
    assert_eq!((sim.state(), sim.step()), (Paused, Some(0)));
    let fx = sim.ok(
        Command::Resume {
            reason: String::new(),
        },
        alice(),
    );
    assert_eq!(fx[0], Effect::SetWeight(100));
    assert_eq!(last_event(&fx).to, Progressing);
    assert_eq!(
        sim.next_in(),
        Some(200.0),
        "remaining dwell, not a fresh one"
    );
    sim.run(1_199);
    assert_eq!(sim.step(), Some(0));
    sim.run(1_200);
    assert_eq!(sim.step(), Some(1));
    // Pausing again in the next step shifts it the same way.
    sim.run(1_300);
    sim.ok(
        Command::Pause {
            reason: String::new(),
        },
        alice(),
    );
    assert_eq!(sim.rollout.status(sim.clock.now_ms()).reason, "paused");
    sim.at(2_000);
    sim.ok(
        Command::Resume {
            reason: reason("all good"),
        },
        alice(),
    );
    assert_eq!(sim.next_in(), Some(200.0));
}

#[test]
fn analysis_hold_keeps_the_step_until_data_is_conclusive() {
    let mut sim = Sim::seed();
    sim.ok(Command::Start, alice());
    sim.at(100);
    assert!(sim
        .tick(AnalysisHold::Hold(reason("too few requests")))
        .is_empty());
    assert_eq!(
        sim.rollout.status(sim.clock.now_ms()).holding,
        None,
        "not due yet"
    );
    sim.at(300);
    assert!(sim
        .tick(AnalysisHold::Hold(reason("too few requests")))
        .is_empty());
    let status = sim.rollout.status(sim.clock.now_ms());
    assert_eq!(
        (status.state, status.step, status.next_step_in_s),
        (Progressing, Some(0), Some(0.0))
    );
    assert_eq!(status.holding.as_deref(), Some("too few requests"));
    sim.at(350);
    assert!(sim
        .tick(AnalysisHold::Hold(reason("still inconclusive")))
        .is_empty());
    let fx = sim.tick(AnalysisHold::Clear);
    assert_eq!(fx[0], Effect::SetWeight(500));
    assert_eq!(last_event(&fx).actor, Actor::Schedule);
    let status = sim.rollout.status(sim.clock.now_ms());
    assert_eq!((status.step, status.holding), (Some(1), None));
    assert_eq!(
        status.next_step_in_s,
        Some(300.0),
        "dwell runs from the real entry"
    );
}

#[test]
fn gates_wait_for_approval_and_alert_on_timeout() {
    let mut sim = Sim::gated();
    let fx = sim.ok(Command::Start, alice());
    assert_eq!(fx[0], Effect::SetWeight(0));
    assert_eq!(last_event(&fx).stage.as_deref(), Some("internal-testing"));
    sim.run(60);
    let gate_fx = sim.effects.split_off(sim.effects.len() - 2);
    let ev = last_event(&gate_fx);
    assert_eq!(
        (ev.from, ev.to, ev.step, ev.weight_bp),
        (Progressing, AwaitingApproval, Some(0), 0)
    );
    assert!(
        ev.reason
            .contains("waiting for approval to enter stage beta-users"),
        "{}",
        ev.reason
    );
    assert_eq!(
        gate_fx[1],
        Effect::GateWaiting {
            stage: "beta-users".into(),
            webhook: None
        }
    );
    // Waiting does not advance, whatever the schedule says.
    sim.run(1_000);
    let status = sim.rollout.status(sim.clock.now_ms());
    let gate = status.waiting_gate.clone().unwrap();
    assert_eq!(
        (status.state, status.weight_bp, status.next_step_in_s),
        (AwaitingApproval, 0, None)
    );
    assert_eq!(
        (
            gate.stage.as_str(),
            gate.step,
            gate.approval,
            gate.waiting_s
        ),
        ("beta-users", 1, true, 940.0)
    );
    assert!(!gate.timed_out, "no timeout on this gate");

    let fx = sim.ok(Command::Approve { by: "alice".into() }, alice());
    assert_eq!(fx[0], Effect::SetWeight(50));
    let ev = last_event(&fx);
    assert_eq!(
        (ev.from, ev.to, ev.step),
        (AwaitingApproval, Progressing, Some(1))
    );
    assert!(ev.reason.starts_with("approved by alice"), "{}", ev.reason);
    assert_eq!(
        sim.next_in(),
        Some(240.0),
        "step 1 dwells from its approval"
    );

    // Step 2 (5%) stays in beta-users: no gate. Step 3 opens gradual-rollout.
    sim.run(1_240);
    assert_eq!((sim.state(), sim.step()), (Progressing, Some(2)));
    sim.run(1_540);
    assert_eq!(sim.state(), AwaitingApproval);
    assert_eq!(
        sim.effects.last(),
        Some(&Effect::GateWaiting {
            stage: "gradual-rollout".into(),
            webhook: Some("http://hooks.example/approve".into())
        })
    );
    sim.run(1_569);
    let alerts = |sim: &Sim| {
        sim.effects
            .iter()
            .filter(|e| matches!(e, Effect::Alert { .. }))
            .count()
    };
    assert_eq!(alerts(&sim), 0);
    sim.run(1_570);
    assert_eq!(alerts(&sim), 1, "timeout of 30s");
    assert!(
        sim.rollout
            .status(sim.clock.now_ms())
            .waiting_gate
            .unwrap()
            .timed_out
    );
    sim.run(1_700);
    assert_eq!(alerts(&sim), 1, "the alert is raised once");
    assert_eq!(
        sim.state(),
        AwaitingApproval,
        "a timed-out gate keeps waiting"
    );

    let hook = Actor::Webhook("http://hooks.example/approve".into());
    let fx = sim.ok(Command::Approve { by: "ci".into() }, hook.clone());
    assert_eq!(last_event(&fx).actor, hook);
    assert_eq!((sim.step(), sim.weight()), (Some(3), 2_500));
    // 25% -> 100% dwell is 50m; the last gate waits, approval promotes.
    sim.run(1_700 + 3_000);
    assert_eq!(sim.state(), AwaitingApproval);
    let fx = sim.ok(
        Command::Approve { by: "bob".into() },
        Actor::Operator("bob".into()),
    );
    assert_eq!(fx[0], Effect::SetWeight(10_000));
    assert_eq!(last_event(&fx).to, Promoted);
}

#[test]
fn a_gate_on_the_first_stage_waits_before_any_traffic() {
    let policy = parse_toml(
        "[[step]]\nat = 0\nweight = 1\n[[step]]\nat = 60\nweight = 100\n\
         [[stage]]\nname = \"all\"\nweights = [0, 100]\ngate = { approval = true }\n",
        "first.toml",
    )
    .unwrap();
    let mut sim = Sim::new(policy);
    let fx = sim.ok(Command::Start, alice());
    assert_eq!(fx[0], Effect::SetWeight(0));
    let ev = last_event(&fx);
    assert_eq!(
        (ev.from, ev.to, ev.step, ev.stage.as_deref()),
        (Pending, AwaitingApproval, None, None)
    );
    sim.at(30);
    // Pausing while waiting, then resuming, reopens the gate.
    sim.ok(
        Command::Pause {
            reason: String::new(),
        },
        alice(),
    );
    assert_eq!(
        sim.rollout
            .status(sim.clock.now_ms())
            .waiting_gate
            .unwrap()
            .waiting_s,
        0.0
    );
    sim.at(90);
    let fx = sim.ok(
        Command::Resume {
            reason: String::new(),
        },
        alice(),
    );
    assert_eq!(last_event(&fx).to, AwaitingApproval);
    assert!(matches!(fx.last(), Some(Effect::GateWaiting { .. })));
    sim.ok(Command::Approve { by: "alice".into() }, alice());
    assert_eq!(
        (sim.state(), sim.step(), sim.weight()),
        (Progressing, Some(0), 100)
    );
    assert_eq!(sim.next_in(), Some(60.0));
}

#[test]
fn promote_moves_to_the_next_step_now() {
    let mut sim = Sim::seed();
    sim.ok(Command::Start, alice());
    sim.at(10);
    let fx = sim.ok(Command::Promote { full: false }, alice());
    assert_eq!(fx[0], Effect::SetWeight(500));
    assert_eq!(
        last_event(&fx).reason,
        "promoted by operator:alice: step 2/5 at 5%"
    );
    assert_eq!(
        sim.next_in(),
        Some(300.0),
        "the promoted step dwells in full"
    );
    for _ in 0..2 {
        sim.ok(Command::Promote { full: false }, alice());
    }
    assert_eq!((sim.step(), sim.state()), (Some(3), Progressing));
    let fx = sim.ok(Command::Promote { full: false }, alice());
    assert_eq!(last_event(&fx).to, Promoted);
    assert_eq!(sim.weight(), 10_000);
}

#[test]
fn promote_passes_a_gate_only_for_an_operator() {
    let mut sim = Sim::gated();
    sim.ok(Command::Start, alice());
    let hook = Actor::Webhook("http://hooks.example/approve".into());
    let err = sim.refused(Command::Promote { full: false }, hook.clone());
    assert_eq!(
        err.to_string(),
        "cannot promote while the rollout is progressing: only an operator may promote past \
         the gate of stage beta-users"
    );
    sim.refused(Command::Promote { full: true }, hook.clone());
    let fx = sim.ok(Command::Promote { full: false }, alice());
    let ev = last_event(&fx);
    assert_eq!((ev.to, ev.step), (Progressing, Some(1)));
    assert!(
        ev.reason.contains("passing the gate of stage beta-users"),
        "{}",
        ev.reason
    );
    // Within a stage anyone may promote; at a waiting gate only an operator.
    sim.ok(Command::Promote { full: false }, hook.clone());
    sim.run(300);
    assert_eq!(sim.state(), AwaitingApproval);
    sim.refused(Command::Promote { full: false }, hook);
    sim.ok(Command::Promote { full: false }, alice());
    assert_eq!((sim.state(), sim.step()), (Progressing, Some(3)));
}

#[test]
fn promote_full_goes_straight_to_100_percent_from_any_running_state() {
    let setups: [(&str, Setup); 3] = [
        ("progressing", |_| {}),
        ("paused", |sim| {
            sim.ok(
                Command::Pause {
                    reason: String::new(),
                },
                alice(),
            );
        }),
        ("awaiting-approval", |sim| sim.run(60)),
    ];
    for (name, setup) in setups {
        let mut sim = Sim::gated();
        sim.ok(Command::Start, alice());
        setup(&mut sim);
        assert_eq!(sim.state().as_str(), name);
        let fx = sim.ok(Command::Promote { full: true }, alice());
        assert_eq!(fx[0], Effect::SetWeight(10_000));
        let ev = last_event(&fx);
        assert_eq!(
            (ev.from.as_str(), ev.to, ev.weight_bp),
            (name, Promoted, 10_000)
        );
        assert_eq!(sim.rollout.status(sim.clock.now_ms()).waiting_gate, None);
    }
}

#[test]
fn set_weight_overrides_and_pauses_until_resume() {
    let mut sim = Sim::seed();
    sim.ok(Command::Start, alice());
    sim.run(120);
    let fx = sim.ok(Command::SetWeight { bp: 300 }, alice());
    assert_eq!(fx[0], Effect::SetWeight(300));
    let ev = last_event(&fx);
    assert_eq!(
        (ev.from, ev.to, ev.weight_bp, ev.step),
        (Progressing, Paused, 300, Some(0))
    );
    assert!(
        ev.reason.starts_with("operator override: weight set to 3%"),
        "{}",
        ev.reason
    );
    sim.run(2_000);
    assert_eq!(
        (sim.state(), sim.weight(), sim.step()),
        (Paused, 300, Some(0))
    );
    // A second override while paused is logged as paused -> paused.
    let fx = sim.ok(Command::SetWeight { bp: 250 }, alice());
    assert_eq!((last_event(&fx).from, last_event(&fx).to), (Paused, Paused));
    assert_eq!(
        sim.refused(Command::SetWeight { bp: 10_001 }, alice()),
        ControlError::WeightOutOfRange(10_001)
    );
    let fx = sim.ok(
        Command::Resume {
            reason: reason("back to plan"),
        },
        alice(),
    );
    assert_eq!(
        fx[0],
        Effect::SetWeight(100),
        "the schedule owns the weight again"
    );
    assert_eq!(sim.next_in(), Some(180.0));
}

#[test]
fn rollback_from_every_non_terminal_state() {
    let setups: [(RolloutState, Setup); 4] = [
        (Pending, |_| {}),
        (Progressing, |sim| {
            sim.ok(Command::Start, alice());
        }),
        (Paused, |sim| {
            sim.ok(Command::Start, alice());
            sim.ok(Command::SetWeight { bp: 40 }, alice());
        }),
        (AwaitingApproval, |sim| {
            sim.ok(Command::Start, alice());
            sim.ok(Command::Promote { full: false }, alice());
            sim.run(600);
        }),
    ];
    for (state, setup) in setups {
        for by_rule in [false, true] {
            let mut sim = Sim::gated();
            setup(&mut sim);
            assert_eq!(sim.state(), state);
            let fx = if by_rule {
                let cmd = Command::AnalysisRollback {
                    rule: "error-spike".into(),
                    detail: "canary 4.1% vs stable 1.2%".into(),
                };
                sim.ok(cmd, Actor::Analysis)
            } else {
                sim.ok(
                    Command::Rollback {
                        reason: reason("bad deploy"),
                    },
                    alice(),
                )
            };
            assert_eq!(fx[0], Effect::SetWeight(0));
            let ev = last_event(&fx);
            assert_eq!((ev.from, ev.to, ev.weight_bp), (state, RolledBack, 0));
            if by_rule {
                assert_eq!(ev.actor, Actor::Rule("error-spike".into()));
                assert_eq!(
                    ev.reason,
                    "rule error-spike fired: canary 4.1% vs stable 1.2%"
                );
            } else {
                assert_eq!(
                    (ev.actor.clone(), ev.reason.as_str()),
                    (alice(), "bad deploy")
                );
            }
            let status = sim.rollout.status(sim.clock.now_ms());
            assert_eq!((status.next_step_in_s, status.waiting_gate), (None, None));
        }
    }
}

#[test]
fn resuming_an_analysis_pause_requires_a_reason() {
    let mut sim = Sim::seed();
    sim.ok(Command::Start, alice());
    sim.run(200);
    let fx = sim.ok(
        Command::AnalysisPause {
            reason: reason("p99 2.3x stable"),
        },
        alice(),
    );
    let ev = last_event(&fx);
    assert_eq!((ev.to, ev.actor.clone()), (Paused, Actor::Analysis));
    assert_eq!(ev.reason, "analysis paused the rollout: p99 2.3x stable");
    for blank in ["", "   "] {
        let err = sim.refused(
            Command::Resume {
                reason: blank.into(),
            },
            alice(),
        );
        assert!(matches!(err, ControlError::ReasonRequired { .. }), "{err}");
        assert!(err.to_string().contains("p99 2.3x stable"), "{err}");
    }
    sim.refused(Command::Promote { full: false }, alice());
    sim.refused(Command::Promote { full: true }, alice());
    sim.refused(
        Command::AnalysisPause {
            reason: reason("again"),
        },
        Actor::Analysis,
    );
    sim.at(500);
    let fx = sim.ok(
        Command::Resume {
            reason: reason(" GC pause, known "),
        },
        alice(),
    );
    let ev = last_event(&fx);
    assert_eq!(
        (ev.from, ev.to, ev.actor.clone()),
        (Paused, Progressing, alice())
    );
    assert_eq!(ev.reason, "override of the analysis pause: GC pause, known");
    assert_eq!(sim.next_in(), Some(100.0));
    // An operator pause is taken over by analysis, which then guards resume.
    sim.ok(
        Command::Pause {
            reason: String::new(),
        },
        alice(),
    );
    let fx = sim.ok(
        Command::AnalysisPause {
            reason: reason("errors"),
        },
        Actor::Analysis,
    );
    assert_eq!((last_event(&fx).from, last_event(&fx).to), (Paused, Paused));
    sim.refused(
        Command::Resume {
            reason: String::new(),
        },
        alice(),
    );
}

#[test]
fn illegal_commands_name_state_and_command_and_change_nothing() {
    let all = || {
        vec![
            Command::Start,
            Command::Pause {
                reason: reason("x"),
            },
            Command::Resume {
                reason: reason("x"),
            },
            Command::Approve { by: "alice".into() },
            Command::Promote { full: false },
            Command::Promote { full: true },
            Command::Rollback {
                reason: reason("x"),
            },
            Command::SetWeight { bp: 10 },
            Command::AnalysisRollback {
                rule: "r".into(),
                detail: "d".into(),
            },
            Command::AnalysisPause {
                reason: reason("x"),
            },
        ]
    };
    let setups: [(RolloutState, Setup, &[&str]); 6] = [
        (Pending, |_| {}, &["start", "rollback", "analysis-rollback"]),
        (
            Progressing,
            |sim| {
                sim.ok(Command::Start, alice());
            },
            &[
                "pause",
                "promote",
                "promote --full",
                "rollback",
                "set-weight",
                "analysis-rollback",
                "analysis-pause",
            ],
        ),
        (
            Paused,
            |sim| {
                sim.ok(Command::Start, alice());
                sim.ok(
                    Command::Pause {
                        reason: String::new(),
                    },
                    alice(),
                );
            },
            &[
                "resume",
                "promote",
                "promote --full",
                "rollback",
                "set-weight",
                "analysis-rollback",
                "analysis-pause",
            ],
        ),
        (
            AwaitingApproval,
            |sim| {
                sim.ok(Command::Start, alice());
                sim.run(60);
            },
            &[
                "pause",
                "approve",
                "promote",
                "promote --full",
                "rollback",
                "set-weight",
                "analysis-rollback",
                "analysis-pause",
            ],
        ),
        (
            Promoted,
            |sim| {
                sim.ok(Command::Start, alice());
                sim.ok(Command::Promote { full: true }, alice());
            },
            &["start"],
        ),
        (
            RolledBack,
            |sim| {
                sim.ok(
                    Command::Rollback {
                        reason: String::new(),
                    },
                    alice(),
                );
            },
            &["start"],
        ),
    ];
    for (state, setup, legal) in setups {
        for cmd in all() {
            let mut sim = Sim::gated();
            setup(&mut sim);
            assert_eq!(sim.state(), state);
            let name = cmd.name();
            if legal.contains(&name) {
                sim.ok(cmd, alice());
                continue;
            }
            let err = sim.refused(cmd, alice());
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("cannot {name} while the rollout is {state}: ")),
                "{text}"
            );
        }
    }
}

#[test]
fn start_after_the_end_begins_a_fresh_rollout() {
    let mut sim = Sim::seed();
    sim.ok(Command::Start, alice());
    sim.run(4_000);
    assert_eq!(sim.state(), Promoted);
    let fx = sim.ok(Command::Start, alice());
    assert_eq!(fx[0], Effect::SetWeight(100));
    let ev = last_event(&fx);
    assert_eq!((ev.from, ev.to, ev.step), (Promoted, Progressing, Some(0)));
    assert_eq!(sim.next_in(), Some(300.0));
    sim.ok(
        Command::Rollback {
            reason: String::new(),
        },
        alice(),
    );
    let fx = sim.ok(Command::Start, alice());
    assert_eq!(
        (last_event(&fx).from, last_event(&fx).to),
        (RolledBack, Progressing)
    );
}

#[test]
fn a_persisted_rollout_resumes_with_the_same_schedule() {
    let mut sim = Sim::seed();
    sim.ok(Command::Start, alice());
    sim.run(700); // step 2, entered at +600
    sim.ok(
        Command::Pause {
            reason: String::new(),
        },
        alice(),
    );
    sim.at(1_000);
    sim.ok(
        Command::Resume {
            reason: String::new(),
        },
        alice(),
    );
    sim.run(1_100);
    let now = sim.clock.now_ms();
    let saved = serde_json::to_string(&sim.rollout).unwrap();
    let restored: Rollout = serde_json::from_str(&saved).unwrap();
    assert_eq!(restored, sim.rollout);
    assert_eq!(restored.status(now), sim.rollout.status(now));
    assert_eq!(
        restored.status(now).next_step_in_s,
        Some(1_000.0),
        "20m dwell - 100s - 100s"
    );

    let mut resumed = Sim {
        rollout: restored,
        clock: SimClock::new(now),
        effects: Vec::new(),
    };
    resumed.run(2_200);
    assert_eq!(resumed.step_entries(), [(2_100, Some(3), 5_000)]);
}

#[test]
fn events_and_status_serialize_for_the_agent() {
    let mut sim = Sim::gated();
    sim.ok(Command::Start, alice());
    sim.run(60);
    let status = serde_json::to_value(sim.rollout.status(sim.clock.now_ms())).unwrap();
    assert_eq!(status["state"], "awaiting-approval");
    assert_eq!(status["waiting_gate"]["stage"], "beta-users");
    let line = serde_json::to_string(events(&sim.effects).last().unwrap()).unwrap();
    assert!(line.starts_with(r#"{"service":"checkout","at_ms":1700000060000,"from":"progressing","to":"awaiting-approval","step":0,"stage":"internal-testing","weight_bp":0,"actor":"schedule","reason":"#), "{line}");
    for actor in [
        alice(),
        Actor::Schedule,
        Actor::Analysis,
        Actor::Webhook("http://h:1/x".into()),
        Actor::Rule("r".into()),
    ] {
        let json = serde_json::to_string(&actor).unwrap();
        assert_eq!(
            serde_json::from_str::<Actor>(&json).unwrap(),
            actor,
            "{json}"
        );
    }
    assert_eq!(
        serde_json::to_string(&RolloutState::RolledBack).unwrap(),
        r#""rolled-back""#
    );
    let cmd: Command = serde_json::from_str(r#"{"command":"set-weight","bp":500}"#).unwrap();
    assert_eq!(cmd, Command::SetWeight { bp: 500 });
}

#[test]
fn event_log_appends_and_reads_back_json_lines() {
    let dir = std::env::temp_dir().join(format!("canary-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = EventLog::new(dir.join("checkout.jsonl"));
    let _ = std::fs::remove_file(log.path());
    assert!(log.read().unwrap().is_empty(), "no file yet: empty history");

    let mut sim = Sim::seed();
    let started = sim.ok(Command::Start, alice());
    log.append_effects(&started).unwrap();
    sim.run(300);
    log.append_effects(&sim.effects[started.len()..]).unwrap();
    let read = log.read().unwrap();
    let expected: Vec<Event> = events(&sim.effects).into_iter().cloned().collect();
    assert_eq!(read, expected);
    assert_eq!(read.len(), 2);
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(text.lines().count(), 2);

    std::fs::write(log.path(), format!("{text}not json\n")).unwrap();
    let err = log.read().unwrap_err().to_string();
    assert!(err.contains("checkout.jsonl:3: not an event"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Three steps to 100 % in 20 s, then `extra` (the finish tables).
fn finishing(extra: &str) -> Sim {
    let text = format!(
        "step = [{{ at = 0, weight = 10 }}, {{ at = \"10s\", weight = 50 }}, \
         {{ at = \"20s\", weight = 100 }}]\n{extra}"
    );
    Sim::new(parse_toml(&text, "finish.toml").unwrap())
}

/// The rollout's own events (`Effect::Transition`) as (seconds, from, to).
fn path(sim: &Sim) -> Vec<(u64, RolloutState, RolloutState)> {
    events(&sim.effects)
        .iter()
        .filter(|e| e.from != e.to)
        .map(|e| ((e.at_ms - T0) / S, e.from, e.to))
        .collect()
}

fn observe(sim: &mut Sim, remaining: u64) -> Vec<Effect> {
    let fx = sim.rollout.observe_retiring(sim.clock.now_ms(), remaining);
    sim.effects.extend(fx.clone());
    fx
}

#[test]
fn a_finishing_release_verifies_retires_and_hands_over() {
    let mut sim = finishing("[verify]\nduration = \"30s\"\n[retire]\ntimeout = \"1m\"\n");
    sim.ok(Command::Start, alice());
    sim.run(20);
    assert_eq!((sim.state(), sim.weight()), (Verifying, 10_000));
    let status = sim.rollout.status(sim.clock.now_ms());
    assert_eq!(status.verify_left_s, Some(30.0));
    assert_eq!(sim.rollout.retire_action(), None);
    // Inconclusive analysis holds the verification past its time.
    sim.at(50);
    sim.tick(AnalysisHold::Hold("inconclusive".into()));
    assert_eq!(sim.state(), Verifying);
    sim.run(51);
    assert_eq!(sim.state(), Retiring);
    assert_eq!(
        sim.rollout.retire_action(),
        Some(canary_agent::controller::RetireAction::AtBoundaries)
    );
    // Retiring refuses what would move traffic; rollback still works (tested below).
    sim.refused(
        Command::Pause {
            reason: reason("x"),
        },
        alice(),
    );
    sim.refused(Command::Promote { full: true }, alice());
    sim.refused(Command::SetWeight { bp: 5000 }, alice());
    assert!(observe(&mut sim, 12).is_empty());
    let retiring = sim.rollout.status(sim.clock.now_ms()).retiring.unwrap();
    assert_eq!((retiring.remaining, retiring.timed_out), (12, false));
    sim.at(60);
    let fx = observe(&mut sim, 0);
    assert_eq!(fx.last(), Some(&Effect::Released));
    assert_eq!(sim.state(), Finished);
    assert!(sim.state().is_terminal() && !sim.state().is_running());
    assert_eq!(
        path(&sim),
        [
            (0, Pending, Progressing),
            (20, Progressing, Promoted),
            (20, Promoted, Verifying),
            (51, Verifying, Retiring),
            (60, Retiring, Finished),
        ]
    );
    let released = sim.rollout.status(sim.clock.now_ms()).released.unwrap();
    assert_eq!(released.at_ms, T0 + 60 * S);
    sim.rollout.record_release(vec!["198.18.3.2:80".into()]);
    assert_eq!(sim.rollout.released().unwrap().backends, ["198.18.3.2:80"]);
    // Serialized and read back (a restart), the release is still there.
    let text = serde_json::to_string(&sim.rollout).unwrap();
    let back: Rollout = serde_json::from_str(&text).unwrap();
    assert_eq!(back, sim.rollout);
    // No second release: it is over.
    assert!(observe(&mut sim, 0).is_empty());
}

#[test]
fn a_release_without_finish_tables_ends_at_promoted() {
    let mut sim = finishing("");
    sim.ok(Command::Start, alice());
    sim.run(25);
    assert_eq!(sim.state(), Promoted);
    assert_eq!(sim.rollout.retire_action(), None);
    assert!(observe(&mut sim, 0).is_empty());
}

#[test]
fn verification_can_be_skipped_paused_and_rolled_back() {
    let mut sim = finishing("[verify]\nduration = \"5m\"\n");
    sim.ok(Command::Start, alice());
    sim.run(20);
    assert_eq!(sim.state(), Verifying);
    // A pause stops the verification clock; resuming continues it.
    sim.at(80);
    sim.ok(
        Command::Pause {
            reason: reason("look"),
        },
        alice(),
    );
    sim.at(500);
    sim.ok(
        Command::Resume {
            reason: reason("ok"),
        },
        alice(),
    );
    assert_eq!(sim.state(), Verifying);
    let left = sim.rollout.status(sim.clock.now_ms()).verify_left_s;
    assert_eq!(left, Some(240.0));
    // An operator's promote skips the rest.
    let fx = sim.ok(Command::Promote { full: false }, alice());
    assert_eq!(last_event(&fx).to, Retiring);
    assert!(last_event(&fx)
        .reason
        .contains("verification skipped by operator:alice"));
    // A rollback while retiring returns to the old version.
    let fx = sim.ok(
        Command::Rollback {
            reason: reason("no"),
        },
        alice(),
    );
    assert_eq!(fx[0], Effect::SetWeight(0));
    assert_eq!(
        (sim.state(), sim.rollout.retire_action()),
        (RolledBack, None)
    );

    // A rule firing during verification rolls back like at any step.
    let mut sim = finishing("[verify]\nduration = \"5m\"\n");
    sim.ok(Command::Start, alice());
    sim.run(30);
    let rule = Command::AnalysisRollback {
        rule: "error-spike".into(),
        detail: "canary 5xx 8 %".into(),
    };
    let fx = sim.ok(rule, Actor::Analysis);
    assert_eq!(last_event(&fx).to, RolledBack);
    assert_eq!(sim.weight(), 0);
}

#[test]
fn retirement_timeouts_close_the_rest_or_alert_once() {
    use canary_agent::controller::RetireAction::*;
    for (mode, before, after) in [
        ("drain", AtBoundaries, CloseNow),
        ("close-after", Wait, CloseNow),
        ("keep", Wait, Wait),
    ] {
        let mut sim = finishing(&format!(
            "[retire]\nconnections = \"{mode}\"\ntimeout = \"30s\"\n"
        ));
        sim.ok(Command::Start, alice());
        sim.run(20);
        // No verification time: straight to retiring at 100 %.
        assert_eq!(sim.state(), Retiring, "{mode}");
        assert_eq!(sim.rollout.retire_action(), Some(before), "{mode}");
        sim.at(49);
        assert!(observe(&mut sim, 3).is_empty(), "{mode}");
        sim.at(50);
        let fx = observe(&mut sim, 3);
        assert_eq!(sim.rollout.retire_action(), Some(after), "{mode}");
        match mode {
            "keep" => {
                let [Effect::Alert { kind, reason }] = &fx[..] else {
                    panic!("{mode}: {fx:?}")
                };
                assert_eq!(kind, "retire-timeout");
                assert!(reason.contains("3 connections"), "{reason}");
            }
            _ => assert!(
                last_event(&fx).reason.contains("closing the 3 remaining"),
                "{fx:?}"
            ),
        }
        sim.at(55);
        assert!(observe(&mut sim, 1).is_empty(), "{mode}: acts once");
        sim.at(90);
        observe(&mut sim, 0);
        assert_eq!(sim.state(), Finished, "{mode}");
    }
}

/// `finishing` with waves `(a) (b c)`, the second behind an approval gate.
fn in_waves(extra: &str) -> Sim {
    finishing(&format!(
        "[verify]\nduration = \"10s\"\n[[wave]]\nregions = [\"a\"]\n\
         [[wave]]\nregions = [\"b\", \"c\"]\ngate = {{ approval = true }}\n{extra}"
    ))
}

fn wave_weights(sim: &Sim) -> [u16; 2] {
    [sim.rollout.wave_weight(0), sim.rollout.wave_weight(1)]
}

#[test]
fn waves_run_the_progression_region_by_region() {
    let mut sim = in_waves("");
    sim.ok(Command::Start, alice());
    assert_eq!(sim.rollout.wave(), Some(0));
    sim.run(10);
    assert_eq!((sim.state(), wave_weights(&sim)), (Progressing, [5_000, 0]));
    sim.run(20);
    // The first wave at 100 % verifies; the second stays at 0 meanwhile.
    assert_eq!((sim.state(), wave_weights(&sim)), (Verifying, [10_000, 0]));
    sim.run(30);
    assert_eq!(sim.state(), AwaitingApproval);
    assert_eq!(wave_weights(&sim), [10_000, 0]);
    let status = sim.rollout.status(sim.clock.now_ms());
    let wave = status.wave.unwrap();
    assert_eq!(
        (wave.index, wave.of, wave.regions),
        (1, 2, vec!["b".into(), "c".into()])
    );
    assert_eq!(status.waiting_gate.unwrap().stage, "wave 2");
    assert!(sim
        .effects
        .iter()
        .any(|e| matches!(e, Effect::GateWaiting { stage, .. } if stage == "wave 2")));
    // Nothing moves until approved; then the second wave starts from the first step.
    sim.run(100);
    assert_eq!(sim.state(), AwaitingApproval);
    sim.ok(Command::Approve { by: "bob".into() }, alice());
    assert_eq!(
        (sim.state(), sim.step(), wave_weights(&sim)),
        (Progressing, Some(0), [10_000, 1_000])
    );
    sim.run(120);
    assert_eq!(
        (sim.state(), wave_weights(&sim)),
        (Verifying, [10_000, 10_000])
    );
    sim.run(130);
    assert_eq!(sim.state(), Retiring);
    assert_eq!(
        path(&sim),
        [
            (0, Pending, Progressing),
            (20, Progressing, Verifying),
            (30, Verifying, AwaitingApproval),
            (100, AwaitingApproval, Progressing),
            (120, Progressing, Promoted),
            (120, Promoted, Verifying),
            (130, Verifying, Retiring),
        ]
    );
    // A restart keeps the wave.
    let back: Rollout =
        serde_json::from_str(&serde_json::to_string(&sim.rollout).unwrap()).unwrap();
    assert_eq!(back, sim.rollout);
}

#[test]
fn a_rollback_in_a_later_wave_resets_every_wave_or_only_that_one() {
    for (choice, after) in [("all", [0, 0]), ("wave", [10_000, 0])] {
        let mut sim = in_waves(&format!("[rollback]\nwaves = \"{choice}\"\n"));
        sim.ok(Command::Start, alice());
        sim.run(30);
        sim.ok(Command::Approve { by: "bob".into() }, alice());
        sim.run(40);
        assert_eq!(wave_weights(&sim), [10_000, 5_000], "{choice}");
        let fx = sim.ok(
            Command::AnalysisRollback {
                rule: "error-spike".into(),
                detail: "5xx".into(),
            },
            alice(),
        );
        assert_eq!(sim.state(), RolledBack);
        assert_eq!(wave_weights(&sim), after, "{choice}");
        // One decision: one weight effect.
        let weights = fx
            .iter()
            .filter(|e| matches!(e, Effect::SetWeight(_)))
            .count();
        assert_eq!(weights, 1, "{fx:?}");
    }
}

#[test]
fn waves_without_nodes_are_skipped_with_an_event() {
    // Only region c has nodes: wave 1 (a) is skipped at the start; wave 2 waits at
    // its gate as usual.
    let mut sim = in_waves("");
    sim.ok(Command::Start, alice());
    let fx = sim.rollout.skip_empty_waves(sim.clock.now_ms(), |w| w == 1);
    let skipped: Vec<_> = events(&fx).iter().map(|e| e.reason.clone()).collect();
    assert!(
        skipped[0].contains("wave 1/2 (a) has no node: skipped"),
        "{skipped:?}"
    );
    assert_eq!(
        (sim.state(), sim.rollout.wave()),
        (AwaitingApproval, Some(1))
    );
    // A wave past its first step is not skipped when its nodes go away for a while.
    sim.ok(Command::Approve { by: "bob".into() }, alice());
    sim.run(10);
    assert_eq!(sim.step(), Some(1));
    assert!(sim
        .rollout
        .skip_empty_waves(sim.clock.now_ms(), |_| false)
        .is_empty());
    // No node at all in the remaining waves: the progression ends as at 100 %.
    let mut sim = in_waves("");
    sim.ok(Command::Start, alice());
    sim.rollout.skip_empty_waves(sim.clock.now_ms(), |_| false);
    assert_eq!((sim.state(), sim.weight()), (Verifying, 10_000));
}
