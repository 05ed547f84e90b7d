//! Time-series line charts as standalone SVG, drawn on the server (no script, no
//! font download): used live by the dashboard and inline by `canary report`.

use std::fmt::Write;

/// Escapes text for HTML and SVG content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub const STABLE: &str = "#2f6fb3";
pub const CANARY: &str = "#d9822b";
pub const LIMIT: &str = "#b3261e";
pub const GREY: &str = "#8a8f98";
pub const PASS: &str = "#3a9b4a";

pub struct Line {
    pub label: String,
    pub color: &'static str,
    /// (time in ms, value); `None` breaks the line.
    pub points: Vec<(f64, Option<f64>)>,
    pub dashed: bool,
    /// Hold each value until the next point (weights).
    pub step: bool,
}

/// A vertical line at a moment (a step, a transition).
pub struct Marker {
    pub x: f64,
    pub label: String,
    pub color: &'static str,
}

pub struct Chart {
    pub title: String,
    /// Formats a y value for the axis.
    pub y_format: fn(f64) -> String,
    pub x_range: (f64, f64),
    pub lines: Vec<Line>,
    pub markers: Vec<Marker>,
    /// Coloured spans along the bottom edge: (from ms, to ms, colour, label).
    pub strip: Vec<(f64, f64, &'static str, String)>,
    /// The y axis always includes this range (e.g. 0..100 for weights).
    pub y_include: (f64, f64),
}

const W: f64 = 760.0;
const H: f64 = 210.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / n;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// UTC time of day of a controller-clock millisecond, as the history prints it.
pub fn clock_label(ms: f64) -> String {
    let s = (ms / 1000.0).floor().max(0.0) as u64;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

pub fn render(chart: &Chart) -> String {
    let (x0, mut x1) = chart.x_range;
    if x1 <= x0 {
        x1 = x0 + 1000.0;
    }
    let (mut y0, mut y1) = chart.y_include;
    for line in &chart.lines {
        for (x, y) in &line.points {
            if let Some(y) = y.filter(|y| y.is_finite()) {
                if *x >= x0 && *x <= x1 {
                    y0 = y0.min(y);
                    y1 = y1.max(y);
                }
            }
        }
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let ystep = nice_step(y1 - y0, 4.0);
    let y0 = (y0 / ystep).floor() * ystep;
    let y1 = (y1 / ystep).ceil() * ystep;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" font-family="sans-serif" font-size="11"><title>{}</title>"#,
        esc(&chart.title)
    );
    let _ = write!(
        s,
        r##"<text x="{LEFT}" y="16" font-size="13" font-weight="bold" fill="#222">{}</text>"##,
        esc(&chart.title)
    );
    // Legend, right-aligned on the title line.
    let mut lx = W - RIGHT;
    for line in chart.lines.iter().rev() {
        let w = 26.0 + 6.5 * line.label.chars().count() as f64;
        lx -= w;
        let dash = if line.dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r##"<line x1="{lx:.1}" y1="12" x2="{:.1}" y2="12" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="16" fill="#333">{}</text>"##,
            lx + 16.0,
            line.color,
            lx + 20.0,
            esc(&line.label)
        );
    }
    // Grid and axes.
    let mut y = y0;
    while y <= y1 + ystep * 0.001 {
        let py = sy(y);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e3e5e8"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            esc(&(chart.y_format)(y))
        );
        y += ystep;
    }
    let xstep = nice_step((x1 - x0) / 1000.0, 6.0).max(1.0) * 1000.0;
    let mut x = (x0 / xstep).ceil() * xstep;
    while x <= x1 {
        let px = sx(x);
        let _ = write!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#f0f1f3"/><text x="{px:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            TOP + ph,
            TOP + ph + 26.0,
            clock_label(x)
        );
        x += xstep;
    }
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#b9bdc4"/>"##
    );
    // Verdict strip under the plot area.
    for (a, b, color, label) in &chart.strip {
        let (a, b) = (a.max(x0), b.min(x1));
        if b <= a {
            continue;
        }
        let _ = write!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="6" fill="{color}"><title>{}</title></rect>"#,
            sx(a),
            TOP + ph + 3.0,
            (sx(b) - sx(a)).max(0.5),
            esc(label)
        );
    }
    // Markers.
    // Labels of nearby markers go on staggered rows so they do not overprint.
    let mut row = 0usize;
    let mut last_px = f64::NEG_INFINITY;
    for m in &chart.markers {
        if m.x < x0 || m.x > x1 {
            continue;
        }
        let px = sx(m.x);
        row = if px - last_px < 120.0 {
            (row + 1) % 4
        } else {
            0
        };
        last_px = px;
        let _ = write!(
            s,
            r#"<line class="marker" x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="{}" stroke-dasharray="2 2"><title>{}</title></line><text x="{:.1}" y="{:.1}" fill="{}" font-size="10">{}</text>"#,
            TOP + ph,
            m.color,
            esc(&m.label),
            px + 3.0,
            TOP + 10.0 + 11.0 * row as f64,
            m.color,
            esc(&short(&m.label, 24))
        );
    }
    // Lines.
    for line in &chart.lines {
        let dash = if line.dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let mut segment: Vec<(f64, f64)> = Vec::new();
        let mut segments = Vec::new();
        let mut last: Option<(f64, f64)> = None;
        for (x, y) in &line.points {
            match y.filter(|y| y.is_finite()) {
                Some(y) => {
                    let p = (sx(x.clamp(x0, x1)), sy(y));
                    if let (true, Some(prev)) = (line.step, last) {
                        segment.push((p.0, prev.1));
                    }
                    segment.push(p);
                    last = Some(p);
                }
                None => {
                    segments.push(std::mem::take(&mut segment));
                    last = None;
                }
            }
        }
        segments.push(segment);
        for seg in segments.into_iter().filter(|s| !s.is_empty()) {
            let pts: Vec<String> = seg.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = write!(
                s,
                r#"<polyline class="series" data-series="{}" fill="none" stroke="{}" stroke-width="1.8"{dash} points="{}"/>"#,
                esc(&line.label),
                line.color,
                pts.join(" ")
            );
            if seg.len() == 1 {
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2" fill="{}"/>"#,
                    seg[0].0, seg[0].1, line.color
                );
            }
        }
    }
    s.push_str("</svg>");
    s
}

fn short(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        text.to_string()
    } else {
        text.chars().take(n - 1).collect::<String>() + "…"
    }
}

/// y-axis formats.
pub fn fmt_percent(y: f64) -> String {
    format!("{}%", trim(y))
}

pub fn fmt_fraction_percent(y: f64) -> String {
    format!("{}%", trim(y * 100.0))
}

pub fn fmt_ms(y: f64) -> String {
    format!("{} ms", trim(y))
}

pub fn fmt_plain(y: f64) -> String {
    trim(y)
}

fn trim(y: f64) -> String {
    if y == 0.0 {
        return "0".into();
    }
    let digits = (2 - y.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{y:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_lines_markers_and_escapes() {
        let chart = Chart {
            title: "weight <canary>".into(),
            y_format: fmt_percent,
            x_range: (0.0, 60_000.0),
            lines: vec![Line {
                label: "canary".into(),
                color: CANARY,
                points: vec![
                    (0.0, Some(5.0)),
                    (30_000.0, Some(20.0)),
                    (40_000.0, None),
                    (50_000.0, Some(0.0)),
                ],
                dashed: false,
                step: true,
            }],
            markers: vec![Marker {
                x: 30_000.0,
                label: "step 2 & more".into(),
                color: GREY,
            }],
            strip: vec![(0.0, 60_000.0, PASS, "pass".into())],
            y_include: (0.0, 100.0),
        };
        let svg = render(&chart);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("weight &lt;canary&gt;"));
        assert!(svg.contains("step 2 &amp; more"));
        // A gap splits the line in two polylines.
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("100%"));
        assert_eq!(nice_step(100.0, 4.0), 50.0);
        assert_eq!(trim(0.0125), "0.0125");
        assert_eq!(trim(12.0), "12");
    }
}
