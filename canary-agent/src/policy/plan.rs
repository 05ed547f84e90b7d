//! Human-readable rendering of a policy, for `canary plan` and error texts.

use std::fmt::Write;

use super::{Gate, MetricName, OnRollback, Policy, RetireConnections, Stage, FULL_BP};
use crate::analysis::check::fraction_as_percent;
use crate::units::percent;

/// "+0s", "+90s", "+5m", "+1h": the largest unit that divides exactly.
pub fn offset(seconds: u64) -> String {
    format!("+{}", duration(seconds))
}

pub fn duration(seconds: u64) -> String {
    match seconds {
        s if s > 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

pub fn band(stage: &Stage) -> String {
    format!("{}–{}", percent(stage.min_bp), percent(stage.max_bp))
}

fn gate_text(gate: &Gate) -> String {
    let mut who = Vec::new();
    if gate.approval {
        who.push("operator approval".to_string());
    }
    if let Some(url) = &gate.webhook {
        who.push(format!("webhook {}", crate::webhook::redact_url(url)));
    }
    let mut text = who.join(" or ");
    if gate.timeout_s > 0 {
        let _ = write!(text, ", alert after {}", duration(gate.timeout_s));
    }
    text
}

impl Policy {
    /// A plan an operator can read before starting: every step with its time,
    /// weight, stage and gate, then stages, metrics, rules, analysis settings and
    /// what a rollback does to open connections.
    pub fn render_plan(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Progression ({} steps):", self.steps.len());
        for (i, step) in self.steps.iter().enumerate() {
            let stage = self.stage_of_step(i).map_or("-", |s| s.name.as_str());
            let _ = write!(
                out,
                "  {:>2}. {:>7}  {:>7}  {stage}",
                i + 1,
                offset(step.at_s),
                percent(step.weight_bp)
            );
            if let Some((_, gate)) = self.gate_before(i) {
                let _ = write!(out, "  [gate waits first: {}]", gate_text(gate));
            }
            out.push('\n');
        }
        match self.steps.last() {
            Some(last) if last.weight_bp == FULL_BP => {
                out.push_str("  Reaching the last step promotes the canary.\n")
            }
            _ => out.push_str("  The last step is below 100%: promote by hand to finish.\n"),
        }
        if let Some(split) = self.initial_split {
            let _ = writeln!(
                out,
                "Split: {} canary / {} stable{}",
                percent(split),
                percent(FULL_BP - split),
                if self.steps.len() == 1 && self.steps[0].weight_bp == split {
                    ""
                } else {
                    " (the progression sets the weights)"
                }
            );
        }
        out.push_str("Stages:\n");
        for stage in &self.stages {
            let gate = stage
                .gate
                .as_ref()
                .map_or("no gate".to_string(), |g| format!("gate: {}", gate_text(g)));
            let _ = writeln!(out, "  {:<18} {:<12} {gate}", stage.name, band(stage));
        }
        out.push_str("Metrics:\n");
        if self.metrics.is_empty() {
            out.push_str("  none\n");
        }
        for m in &self.metrics {
            let test = match &m.name {
                MetricName::ErrorRate | MetricName::LatencyP99 => {
                    format!("canary/stable <= {}", m.threshold)
                }
                MetricName::SuccessRate => format!("canary >= {}", m.threshold),
                MetricName::Custom(_) => format!("canary/stable events/trials >= {}", m.threshold),
            };
            let _ = writeln!(
                out,
                "  {:<18} {test} over {}, on fail: {}",
                m.name.as_str(),
                duration(m.window_s),
                m.on_fail.as_str()
            );
            if let Some(q) = &m.query {
                let _ = writeln!(out, "    events: {}\n    trials: {}", q.events, q.trials);
            }
        }
        out.push_str("Rules:\n");
        if self.rules.is_empty() {
            out.push_str("  none\n");
        }
        for r in &self.rules {
            let _ = writeln!(
                out,
                "  {:<22} {} {} baseline * {} -> {}",
                r.name,
                r.metric,
                r.cmp.as_str(),
                r.factor,
                r.action.as_str()
            );
        }
        let a = &self.analysis;
        let hold = match a.max_hold_s {
            0 => "never alert while analysis holds a step".to_string(),
            s => format!("alert when analysis holds a step for {}", duration(s)),
        };
        let _ = writeln!(
            out,
            "Analysis: error floor {} (error-rate passes below it while stable has too few \
             errors to compare), {hold}",
            fraction_as_percent(a.error_floor)
        );
        let _ = writeln!(
            out,
            "On rollback: {}",
            match self.on_rollback {
                OnRollback::Drain => "drain the canary's open connections (closed at request boundaries)",
                OnRollback::Keep => "keep the canary's open connections until they close (only new ones go to stable)",
            }
        );
        match &self.finish {
            None => out
                .push_str("Finish: ends at promoted; the old version keeps its open connections\n"),
            Some(f) => {
                let verify = match f.verify_s {
                    0 => "no verification".to_string(),
                    s => format!(
                        "verify {} at 100% (rules judge the canary against stable's baseline)",
                        duration(s)
                    ),
                };
                let retire = match f.retire.connections {
                    RetireConnections::Drain => format!("drain the old version's connections at request boundaries, close the rest after {}", duration(f.retire.timeout_s)),
                    RetireConnections::Keep => format!("keep the old version's connections until they close (alert after {})", duration(f.retire.timeout_s)),
                    RetireConnections::CloseAfter => format!("close the old version's connections after {}", duration(f.retire.timeout_s)),
                };
                let _ = writeln!(out, "Finish: {verify}; then {retire}; then finished (the canary becomes stable, `released` is sent)");
            }
        }
        if !self.waves.is_empty() {
            let waves: Vec<String> = self
                .waves
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let gate = match &w.gate {
                        Some(g) if g.approval => " after approval",
                        Some(_) => " after the webhook approves",
                        None => "",
                    };
                    format!("{}. {}{gate}", i + 1, w.regions.join(", "))
                })
                .collect();
            let _ = writeln!(
                out,
                "Waves: {} (unlisted regions join the last); a rollback resets {}",
                waves.join("; "),
                match self.wave_rollback {
                    crate::policy::WaveRollback::All => "every wave",
                    crate::policy::WaveRollback::Wave => "only the running wave",
                }
            );
        }
        if !self.routing.is_empty() {
            out += &self.routing.render();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(percent(1), "0.01%");
        assert_eq!(percent(1250), "12.5%");
        assert_eq!(percent(10_000), "100%");
        assert_eq!(offset(0), "+0s");
        assert_eq!(offset(300), "+5m");
        assert_eq!(offset(3_600), "+1h");
        assert_eq!(offset(90), "+90s");
    }
}
