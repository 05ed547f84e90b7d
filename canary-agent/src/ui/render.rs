//! HTML pieces shared by the live dashboard and `canary report`: the charts of a
//! service's per-second series, its history table and its live summary.

use crate::units::{bp_to_percent, format_ms, round};
use std::fmt::Write;

use super::svg::{self, esc, Chart, Line, Marker};
use crate::agent::series::Sample;
use crate::api::ServiceStatus;
use crate::controller::{Actor, Event, RolloutState};
use crate::units::percent;

/// Whether an event is a verdict change (analysis, within a state) rather than a
/// transition or step.
pub fn is_verdict(e: &Event) -> bool {
    e.actor == Actor::Analysis && e.from == e.to && e.reason.starts_with("verdict ")
}

fn state_color(state: RolloutState) -> &'static str {
    match state {
        RolloutState::RolledBack => svg::LIMIT,
        RolloutState::Promoted | RolloutState::Finished => svg::PASS,
        RolloutState::Paused
        | RolloutState::AwaitingApproval
        | RolloutState::Verifying
        | RolloutState::Retiring => "#b8860b",
        _ => svg::GREY,
    }
}

/// Steps and transitions as chart markers.
pub fn markers(events: &[Event]) -> Vec<Marker> {
    events
        .iter()
        .filter(|e| !is_verdict(e))
        .map(|e| Marker {
            x: e.at_ms as f64,
            label: if e.from != e.to {
                format!("{} ({})", e.to, e.actor)
            } else {
                format!(
                    "{}{}",
                    percent(e.weight_bp),
                    e.stage
                        .as_deref()
                        .map(|s| format!(" {s}"))
                        .unwrap_or_default()
                )
            },
            color: state_color(e.to),
        })
        .collect()
}

pub fn weight_chart(samples: &[Sample], events: &[Event], x_range: (f64, f64)) -> String {
    let mut points: Vec<(f64, Option<f64>)> = samples
        .iter()
        .map(|s| (s.t_ms as f64, Some(bp_to_percent(s.weight_bp))))
        .chain(
            events
                .iter()
                .map(|e| (e.at_ms as f64, Some(bp_to_percent(e.weight_bp)))),
        )
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    svg::render(&Chart {
        title: "canary weight".into(),
        y_format: svg::fmt_percent,
        x_range,
        lines: vec![Line {
            label: "canary %".into(),
            color: svg::CANARY,
            points,
            dashed: false,
            step: true,
        }],
        markers: markers(events),
        strip: Vec::new(),
        y_include: (0.0, 100.0),
    })
}

/// Metrics in the order they first appear in the samples.
pub fn metric_names(samples: &[Sample]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for v in samples.iter().flat_map(|s| &s.verdicts) {
        if !names.contains(&v.metric) {
            names.push(v.metric.clone());
        }
    }
    names
}

pub fn verdict_color(verdict: &str) -> &'static str {
    match verdict {
        "pass" => svg::PASS,
        "fail" => svg::LIMIT,
        _ => "#c5c9cf",
    }
}

/// One chart per policy metric: canary and stable over the metric's window, the limit
/// the canary is held to, and the verdict along the bottom.
pub fn metric_charts(
    samples: &[Sample],
    events: &[Event],
    x_range: (f64, f64),
) -> Vec<(String, String)> {
    metric_names(samples)
        .into_iter()
        .map(|metric| {
            let of = |s: &Sample| s.verdicts.iter().find(|v| v.metric == metric).cloned();
            let series = |pick: fn(&crate::agent::series::VerdictSample) -> Option<f64>| {
                samples
                    .iter()
                    .map(|s| (s.t_ms as f64, of(s).and_then(|v| pick(&v))))
                    .collect::<Vec<_>>()
            };
            let upper = samples.iter().rev().find_map(of).is_none_or(|v| v.upper);
            let mut strip: Vec<(f64, f64, &'static str, String)> = Vec::new();
            for (i, s) in samples.iter().enumerate() {
                let Some(v) = of(s) else { continue };
                let end = samples
                    .get(i + 1)
                    .map_or(s.t_ms as f64 + 1000.0, |n| n.t_ms as f64);
                match strip.last_mut() {
                    Some(last) if last.3 == v.verdict && last.1 >= s.t_ms as f64 - 1500.0 => {
                        last.1 = end
                    }
                    _ => strip.push((s.t_ms as f64, end, verdict_color(&v.verdict), v.verdict)),
                }
            }
            let y_format = match metric.as_str() {
                "error-rate" | "success-rate" => svg::fmt_fraction_percent,
                "latency-p99" => svg::fmt_ms,
                _ => svg::fmt_plain,
            };
            let chart = Chart {
                title: format!("{metric}: canary vs stable (window), verdict below"),
                y_format,
                x_range,
                lines: vec![
                    Line {
                        label: "stable".into(),
                        color: svg::STABLE,
                        points: series(|v| v.stable),
                        dashed: false,
                        step: false,
                    },
                    Line {
                        label: "canary".into(),
                        color: svg::CANARY,
                        points: series(|v| v.canary),
                        dashed: false,
                        step: false,
                    },
                    Line {
                        label: if upper {
                            "limit (max)".into()
                        } else {
                            "limit (min)".into()
                        },
                        color: svg::LIMIT,
                        points: series(|v| v.limit),
                        dashed: true,
                        step: false,
                    },
                ],
                markers: markers(events),
                strip,
                y_include: (0.0, 0.0),
            };
            (metric, svg::render(&chart))
        })
        .collect()
}

/// Requests and 5xx per second, and the p99 latency of each second, per version.
pub fn traffic_charts(samples: &[Sample], events: &[Event], x_range: (f64, f64)) -> [String; 2] {
    let pts = |f: &dyn Fn(&Sample) -> Option<f64>| {
        samples
            .iter()
            .map(|s| (s.t_ms as f64, f(s)))
            .collect::<Vec<_>>()
    };
    let line = |label: &str, color, points, dashed| Line {
        label: label.into(),
        color,
        points,
        dashed,
        step: false,
    };
    let traffic = svg::render(&Chart {
        title: "requests and 5xx responses per second".into(),
        y_format: svg::fmt_plain,
        x_range,
        lines: vec![
            line(
                "stable req",
                svg::STABLE,
                pts(&|s| Some(s.stable.requests as f64)),
                false,
            ),
            line(
                "canary req",
                svg::CANARY,
                pts(&|s| Some(s.canary.requests as f64)),
                false,
            ),
            line(
                "stable 5xx",
                svg::STABLE,
                pts(&|s| Some(s.stable.errors as f64)),
                true,
            ),
            line(
                "canary 5xx",
                svg::CANARY,
                pts(&|s| Some(s.canary.errors as f64)),
                true,
            ),
        ],
        markers: markers(events),
        strip: Vec::new(),
        y_include: (0.0, 1.0),
    });
    let latency = svg::render(&Chart {
        title: "p99 latency of each second".into(),
        y_format: svg::fmt_ms,
        x_range,
        lines: vec![
            line("stable", svg::STABLE, pts(&|s| s.stable.p99_ms), false),
            line("canary", svg::CANARY, pts(&|s| s.canary.p99_ms), false),
        ],
        markers: markers(events),
        strip: Vec::new(),
        y_include: (0.0, 0.0),
    });
    [traffic, latency]
}

/// The events as a table (newest first when `newest_first`), at most `limit` rows.
pub fn history_table(events: &[Event], newest_first: bool, limit: usize) -> String {
    let mut out = String::from(
        "<table class=\"history\"><thead><tr><th>time</th><th>transition</th><th>weight</th>\
         <th>stage</th><th>by</th><th>reason</th></tr></thead><tbody>",
    );
    let rows: Box<dyn Iterator<Item = &Event>> = if newest_first {
        Box::new(events.iter().rev())
    } else {
        Box::new(events.iter())
    };
    for e in rows.take(limit) {
        let class = if is_verdict(e) {
            "verdict"
        } else if e.from != e.to {
            "transition"
        } else {
            "step"
        };
        let _ = write!(
            out,
            "<tr class=\"{class}\"><td>{}</td><td>{} → {}</td><td>{}</td><td>{}</td><td class=\"actor\">{}</td><td class=\"reason\">{}</td></tr>",
            format_ms(e.at_ms),
            e.from,
            e.to,
            percent(e.weight_bp),
            esc(e.stage.as_deref().unwrap_or("-")),
            esc(&e.actor.to_string()),
            esc(&e.reason)
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// The live part of a service's panel: summary, analysis, charts, backends, history.
pub fn live_panel(
    status: &ServiceStatus,
    samples: &[Sample],
    events: &[Event],
    now_ms: u64,
) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<div class=\"summary\"><div><span class=\"label\">canary weight</span> <span class=\"weight\" data-weight-bp=\"{}\">{}%</span></div>",
        status.weight_bp, status.weight
    );
    let _ = write!(
        out,
        "<div><span class=\"label\">service</span> {} / {}, {} {}</div>",
        esc(&status.listen),
        esc(&status.protocol),
        esc(&status.mode),
        esc(&status.sticky)
    );
    match &status.rollout {
        Some(r) => {
            let step = r
                .step
                .map(|i| format!("{}/{}", i + 1, r.steps))
                .unwrap_or("-".into());
            let _ = write!(
                out,
                "<div><span class=\"label\">rollout</span> <span class=\"state state-{}\">{}</span> stage <span class=\"stage\">{}</span> step {step}{}</div>",
                r.state,
                r.state,
                esc(r.stage.as_deref().unwrap_or("-")),
                r.next_step_in_s
                    .map(|t| format!(", next step in {t:.0}s"))
                    .unwrap_or_default()
            );
            let _ = write!(
                out,
                "<div class=\"why\"><span class=\"label\">reason</span> {}</div>",
                esc(&r.reason)
            );
            if let Some(w) = &r.wave {
                let _ = write!(
                    out,
                    "<div class=\"wave\"><span class=\"label\">wave</span> {}/{}: regions {}</div>",
                    w.index + 1,
                    w.of,
                    esc(&w.regions.join(", "))
                );
            }
            if let Some(left) = r.verify_left_s {
                let judged = status.baseline.as_deref().map(esc).unwrap_or_default();
                let _ = write!(
                    out,
                    "<div class=\"verify\"><span class=\"label\">verifying</span> {left:.0}s left at 100 %; judged against {judged}</div>"
                );
            }
            if let Some(ret) = &r.retiring {
                let _ = write!(
                    out,
                    "<div class=\"retiring\"><span class=\"label\">retiring</span> {} old-version connections open ({}, {:.0}s to the timeout)</div>",
                    ret.remaining,
                    ret.connections.as_str(),
                    ret.timeout_in_s
                );
            }
            if let Some(rel) = &r.released {
                let _ = write!(
                    out,
                    "<div class=\"released\"><span class=\"label\">released</span> stable is now {}: the old version may be deleted</div>",
                    esc(&rel.backends.join(", "))
                );
            }
            if let Some(g) = &r.waiting_gate {
                let _ = write!(
                    out,
                    "<div class=\"gate\"><span class=\"label\">gate</span> {} waits for approval{} ({:.0}s)</div>",
                    esc(&if g.stage.starts_with("wave ") { g.stage.clone() } else { format!("stage {}", g.stage) }),
                    g.webhook
                        .as_deref()
                        .map(|w| format!(" or webhook {}", esc(w)))
                        .unwrap_or_default(),
                    g.waiting_s
                );
            }
            if let Some(h) = &r.holding {
                let _ = write!(
                    out,
                    "<div class=\"holding\"><span class=\"label\">holding</span> {}</div>",
                    esc(h)
                );
            }
        }
        None => out.push_str("<div><span class=\"label\">rollout</span> none (no policy)</div>"),
    }
    if status.draining {
        out.push_str("<div class=\"draining\">draining: closing canary connections at request boundaries</div>");
    }
    out.push_str("</div>");
    if !status.analysis.is_empty() {
        out.push_str("<table class=\"analysis\"><thead><tr><th>metric</th><th>verdict</th><th>canary</th><th>stable</th><th>confidence</th><th>reason</th></tr></thead><tbody>");
        for v in &status.analysis {
            let verdict = v["verdict"].as_str().unwrap_or("?");
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"verdict verdict-{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"reason\">{}</td></tr>",
                esc(v["metric"].as_str().unwrap_or("?")),
                esc(verdict),
                esc(verdict),
                round(&v["canary"]),
                round(&v["stable"]),
                round(&v["confidence"]),
                esc(v["reason"].as_str().unwrap_or(""))
            );
        }
        out.push_str("</tbody></table>");
    }
    // Up to the last five minutes of the controller clock, at least one.
    let oldest = now_ms.saturating_sub(300_000);
    let first = samples.partition_point(|s| s.t_ms < oldest);
    let shown = &samples[first..];
    let start = shown
        .first()
        .map_or(oldest, |s| s.t_ms)
        .min(now_ms.saturating_sub(60_000));
    let range = (start as f64, now_ms as f64);
    out.push_str("<div class=\"charts\">");
    out.push_str(&weight_chart(shown, events, range));
    for (_, chart) in metric_charts(shown, events, range) {
        out.push_str(&chart);
    }
    for chart in traffic_charts(shown, events, range) {
        out.push_str(&chart);
    }
    out.push_str("</div>");
    out.push_str("<table class=\"backends\"><thead><tr><th>group</th><th>backend</th><th>source</th><th>connections</th><th>packets in</th><th>packets out</th><th>bytes in</th><th>bytes out</th><th>flow misses</th><th>health</th></tr></thead><tbody>");
    for b in &status.backends {
        let health = b.health.as_ref().map_or_else(
            || "not checked".to_string(),
            |h| {
                format!(
                    "<span title=\"{}\">{}</span>",
                    esc(&h.reason),
                    esc(&h.state)
                )
            },
        );
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&b.group),
            esc(&b.address),
            esc(&b.source),
            b.connections,
            b.packets_in,
            b.packets_out,
            b.bytes_in,
            b.bytes_out,
            b.flow_misses,
            health
        );
    }
    out.push_str("</tbody></table>");
    out.push_str("<h3>history (newest first)</h3>");
    out.push_str(&history_table(events, true, 40));
    out
}
