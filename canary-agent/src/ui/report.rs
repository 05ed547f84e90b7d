//! `canary report SERVICE --out FILE.html`: one self-contained HTML file (inline CSS
//! and SVG, no script, nothing fetched) for a service's latest rollout, from its event
//! log and stored per-second series: outcome, timeline of every transition with its
//! actor and reason, the weight over time, each metric canary vs stable with its limit
//! and verdicts, traffic and latency.

use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Result};

use super::render::{self, is_verdict};
use super::svg::esc;
use crate::agent::series::{self, Sample};
use crate::controller::{Actor, Event, RolloutState};
use crate::units::format_ms;
use crate::units::percent;

/// Most points drawn per line; longer series are thinned evenly.
const MAX_POINTS: usize = 1500;

const STYLE: &str = "body{font-family:sans-serif;margin:24px auto;max-width:1000px;color:#222}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;font-size:12px;width:100%}td,th{border-bottom:1px solid #eee;\
padding:3px 6px;text-align:left;vertical-align:top}tr.verdict{color:#666}\
tr.transition td{font-weight:bold}.outcome{font-size:16px;padding:10px;border-radius:4px}\
.outcome.rolled-back{background:#fbe9e7}.outcome.promoted{background:#e8f5e9}\
.outcome.other{background:#f1f3f4}svg.chart{width:100%;height:auto;margin:8px 0}\
.fired{color:#b3261e;font-weight:bold}dl{display:grid;grid-template-columns:max-content auto;\
gap:4px 16px}dt{color:#666}dd{margin:0}";

/// The events of the service's latest rollout: from its last start (pending →
/// progressing) on; everything when there is no start in the log.
pub fn latest_rollout(events: &[Event]) -> &[Event] {
    let start = events
        .iter()
        .rposition(|e| e.from == RolloutState::Pending && e.to != RolloutState::Pending)
        .unwrap_or(0);
    &events[start..]
}

/// Evenly thins `samples` to at most [`MAX_POINTS`].
fn thin(samples: &[Sample]) -> Vec<Sample> {
    let stride = samples.len().div_ceil(MAX_POINTS).max(1);
    samples.iter().step_by(stride).cloned().collect()
}

/// Reads the service's event log and series from `state_dir` and renders the report.
pub fn from_state_dir(state_dir: &Path, service: &str, generated_ms: u64) -> Result<String> {
    let log = crate::agent::state::events_log(state_dir, service);
    let events = log.read()?;
    let samples = series::read_all(state_dir, service)?;
    if events.is_empty() && samples.is_empty() {
        bail!(
            "no history and no series for service {service:?} in {} (is it the agent's \
             state_dir, and has the service run?)",
            state_dir.display()
        );
    }
    Ok(render(service, &events, &samples, generated_ms))
}

/// The report for the latest rollout in `events`, with the samples of its time span.
pub fn render(service: &str, events: &[Event], samples: &[Sample], generated_ms: u64) -> String {
    let rollout = latest_rollout(events);
    let begin = rollout.first().map(|e| e.at_ms);
    let end = rollout.last().map(|e| e.at_ms);
    let last_sample = samples.last().map(|s| s.t_ms);
    // From 30 s before the start to a minute past the last event (or the last sample).
    let from = begin
        .map(|b| b.saturating_sub(30_000))
        .or(samples.first().map(|s| s.t_ms))
        .unwrap_or(0);
    let to = match (end, last_sample) {
        (Some(e), Some(l)) => l.min(e + 60_000).max(e),
        (Some(e), None) => e,
        (None, Some(l)) => l,
        (None, None) => from + 1000,
    };
    let span: Vec<Sample> = samples
        .iter()
        .filter(|s| s.t_ms >= from && s.t_ms <= to)
        .cloned()
        .collect();
    let span = thin(&span);
    let range = (from as f64, to.max(from + 1000) as f64);

    let transitions: Vec<&Event> = rollout.iter().filter(|e| !is_verdict(e)).collect();
    let last = transitions.last();
    let final_state = last.map(|e| e.to);
    let fired: Vec<&Event> = rollout
        .iter()
        .filter(|e| matches!(e.actor, Actor::Rule(_)))
        .collect();

    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>canary report: {}</title><style>{STYLE}</style></head><body>",
        esc(service)
    );
    let _ = write!(out, "<h1>Canary report: {}</h1>", esc(service));
    let (class, headline) = match (final_state, last) {
        (Some(state), Some(e)) => (
            match state {
                RolloutState::RolledBack => "rolled-back",
                RolloutState::Promoted | RolloutState::Finished => "promoted",
                _ => "other",
            },
            format!(
                "{} at {} (weight {}), by {}: {}",
                state,
                format_ms(e.at_ms),
                percent(e.weight_bp),
                e.actor,
                e.reason
            ),
        ),
        _ => ("other", "no rollout transitions recorded".to_string()),
    };
    let _ = write!(
        out,
        "<section id=\"outcome\"><h2>Outcome</h2><div class=\"outcome {class}\" data-state=\"{}\">{}</div>",
        final_state.map(|s| s.as_str()).unwrap_or("none"),
        esc(&headline)
    );
    out.push_str("<dl>");
    let mut row = |k: &str, v: String| {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", esc(k), v);
    };
    row("started", begin.map_or("-".into(), |b| esc(&format_ms(b))));
    row("last event", end.map_or("-".into(), |e| esc(&format_ms(e))));
    row(
        "duration",
        match (begin, end) {
            (Some(b), Some(e)) => format!("{:.1} s", (e - b) as f64 / 1000.0),
            _ => "-".into(),
        },
    );
    row(
        "final weight",
        last.map_or("-".into(), |e| esc(&percent(e.weight_bp))),
    );
    row(
        "rules fired",
        if fired.is_empty() {
            "none".into()
        } else {
            fired
                .iter()
                .map(|e| {
                    format!(
                        "<span class=\"fired\" data-rule=\"{}\">{}</span>: {}",
                        esc(&e.actor.to_string()["rule:".len()..]),
                        esc(&e.actor.to_string()),
                        esc(&e.reason)
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>")
        },
    );
    row(
        "series",
        format!(
            "{} seconds stored in this span{}",
            span.len(),
            if span.is_empty() {
                " (the agent keeps the series in state_dir; older seconds may have been rotated out)"
            } else {
                ""
            }
        ),
    );
    out.push_str("</dl></section>");

    out.push_str("<section id=\"timeline\"><h2>Timeline: every transition, with who and why</h2>");
    let steps: Vec<Event> = transitions.iter().map(|e| (*e).clone()).collect();
    out.push_str(&render::history_table(&steps, false, usize::MAX));
    out.push_str("</section>");

    out.push_str("<section id=\"weights\"><h2>Weight</h2>");
    out.push_str(&render::weight_chart(&span, rollout, range));
    out.push_str("</section>");

    out.push_str("<section id=\"metrics\"><h2>Metrics: canary vs stable, limits and verdicts</h2>");
    let charts = render::metric_charts(&span, rollout, range);
    if charts.is_empty() {
        out.push_str("<p>No analysis metrics recorded for this span.</p>");
    }
    for (metric, chart) in charts {
        let _ = write!(
            out,
            "<div class=\"metric\" data-metric=\"{}\"><h3>{}</h3>{chart}",
            esc(&metric),
            esc(&metric)
        );
        let changes: Vec<&Event> = rollout
            .iter()
            .filter(|e| is_verdict(e) && e.reason.starts_with(&format!("verdict {metric}:")))
            .collect();
        out.push_str("<ul class=\"verdicts\">");
        for e in changes {
            let _ = write!(
                out,
                "<li>{}: {}</li>",
                esc(&format_ms(e.at_ms)),
                esc(&e.reason)
            );
        }
        out.push_str("</ul></div>");
    }
    out.push_str("</section>");

    out.push_str("<section id=\"traffic\"><h2>Traffic and latency</h2>");
    for chart in render::traffic_charts(&span, rollout, range) {
        out.push_str(&chart);
    }
    out.push_str("</section>");

    out.push_str("<section id=\"events\"><h2>All events of this rollout</h2>");
    out.push_str(&render::history_table(rollout, false, usize::MAX));
    let _ = write!(
        out,
        "</section><p><small>Generated by canary {} at {} (controller clock, UTC) from the \
         event log and the per-second series in the agent's state_dir.</small></p></body></html>",
        env!("CARGO_PKG_VERSION"),
        esc(&format_ms(generated_ms))
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::series::{VerdictSample, VersionSample};

    fn event(
        at_ms: u64,
        from: RolloutState,
        to: RolloutState,
        actor: Actor,
        reason: &str,
    ) -> Event {
        Event {
            service: "web".into(),
            at_ms,
            from,
            to,
            step: Some(0),
            stage: None,
            weight_bp: if to == RolloutState::RolledBack {
                0
            } else {
                5000
            },
            actor,
            reason: reason.into(),
        }
    }

    #[test]
    fn report_shows_the_latest_rollout_its_rule_and_plots() {
        use RolloutState::*;
        let events = vec![
            event(
                1_000,
                Pending,
                Progressing,
                Actor::Operator("a".into()),
                "old",
            ),
            event(
                2_000,
                Progressing,
                RolledBack,
                Actor::Operator("a".into()),
                "old one",
            ),
            event(
                10_000,
                Pending,
                Progressing,
                Actor::Operator("bob".into()),
                "started",
            ),
            event(
                20_000,
                Progressing,
                Progressing,
                Actor::Analysis,
                "verdict error-rate: pass -> fail: canary 0.5 vs stable 0",
            ),
            event(
                20_000,
                Progressing,
                RolledBack,
                Actor::Rule("error-spike".into()),
                "rule error-spike fired: error-rate 0.5 > baseline * 1.5",
            ),
        ];
        let samples: Vec<Sample> = (5..40)
            .map(|s| Sample {
                t_ms: s * 1000,
                weight_bp: if s < 20 { 5000 } else { 0 },
                state: None,
                stable: VersionSample {
                    requests: 100,
                    ..Default::default()
                },
                canary: VersionSample {
                    requests: 100,
                    errors: if s >= 15 { 50 } else { 0 },
                    ..Default::default()
                },
                verdicts: vec![VerdictSample {
                    metric: "error-rate".into(),
                    verdict: if s < 20 { "pass" } else { "fail" }.into(),
                    canary: Some(0.1),
                    stable: Some(0.0),
                    limit: Some(0.0),
                    upper: true,
                }],
            })
            .collect();
        let html = render("web", &events, &samples, 50_000);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(!html.contains("<script"));
        assert!(html.contains("data-state=\"rolled-back\""));
        assert!(html.contains("data-rule=\"error-spike\""));
        assert!(!html.contains("old one"), "only the latest rollout");
        assert!(html.contains("data-metric=\"error-rate\""));
        assert!(html.matches("<svg").count() >= 4);
        assert!(html.contains("pass -&gt; fail"));
    }
}
