//! Line charts of a run's timeline as a standalone SVG file (`--chart FILE.svg`).
//!
//! Hand-written rather than drawn with `plotters`: what a report needs is a few line series
//! over time in stacked panels with axes, ticks and a legend, about 150 lines of SVG text.
//! `plotters` with `default-features = false` and only `svg_backend` + `line_series` has no
//! font backend, so it cannot measure its own labels, and its font features pull in
//! font-kit or ab_glyph; either way it costs build time on a shared 2-core machine for a
//! chart that needs no layout engine. The SVG here has no dependencies and is checked by a
//! unit test.

use std::fmt::Write as _;

/// One line.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// CSS colour.
    pub color: &'static str,
    /// `(x, y)` points in x order; non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A line through per-second `points`: x from `x`, y from `y`.
    pub fn of<P>(
        name: &str,
        color: &'static str,
        points: &[P],
        x: impl Fn(&P) -> f64,
        y: impl Fn(&P) -> f64,
    ) -> Series {
        Series {
            name: name.into(),
            color,
            points: points.iter().map(|p| (x(p), y(p))).collect(),
        }
    }
}

/// A latency panel of per-second points: `us` gives p50, p99 and max in µs, drawn in ms.
/// Points where `sampled` is false are left out, so a second without samples is a gap in
/// the lines, not a zero.
pub fn latency_panel<P>(
    y_label: &str,
    points: &[P],
    x: fn(&P) -> f64,
    sampled: fn(&P) -> bool,
    us: [fn(&P) -> u64; 3],
) -> Panel {
    let with: Vec<&P> = points.iter().filter(|p| sampled(p)).collect();
    let names = ["p50", "p99", "max"];
    let colors = ["#1f77b4", "#ff7f0e", "#d62728"];
    Panel {
        y_label: y_label.into(),
        series: (0..3)
            .map(|k| Series {
                name: names[k].into(),
                color: colors[k],
                points: with
                    .iter()
                    .map(|p| (x(p), us[k](p) as f64 / 1000.0))
                    .collect(),
            })
            .collect(),
    }
}

/// One panel: a y axis shared by its series.
#[derive(Debug, Clone)]
pub struct Panel {
    pub y_label: String,
    pub series: Vec<Series>,
}

impl Panel {
    pub fn new(y_label: &str, series: Vec<Series>) -> Panel {
        Panel {
            y_label: y_label.into(),
            series,
        }
    }
}

/// A moment (`to: None`, a dashed line) or a span (a shaded band) marked across every
/// panel, e.g. when `rebalance --command` ran.
#[derive(Debug, Clone)]
pub struct Mark {
    pub label: String,
    pub from: f64,
    pub to: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub subtitle: String,
    pub x_label: String,
    pub panels: Vec<Panel>,
    /// Drawn behind the series; the x range is widened to show them.
    pub marks: Vec<Mark>,
}

const WIDTH: f64 = 960.0;
const PANEL_H: f64 = 260.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 60.0;
const GAP: f64 = 50.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `n` ticks over `span`.
pub fn nice_step(span: f64, n: f64) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let raw = span / n.max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Chart {
    /// The whole SVG document.
    pub fn to_svg(&self) -> String {
        let panels = self.panels.len().max(1) as f64;
        let height = TOP + panels * PANEL_H + (panels - 1.0) * GAP + 60.0;
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{}</text>"#,
            esc(&self.title)
        );
        let _ = writeln!(
            out,
            r##"<text x="{LEFT}" y="42" fill="#555">{}</text>"##,
            esc(&self.subtitle)
        );
        // One x range for every panel so they line up.
        let xs = self
            .panels
            .iter()
            .flat_map(|p| p.series.iter())
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .chain(
                self.marks
                    .iter()
                    .flat_map(|m| [Some(m.from), m.to])
                    .flatten(),
            )
            .filter(|x| x.is_finite());
        let (mut x0, mut x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        if x0 > x1 {
            (x0, x1) = (0.0, 1.0);
        }
        if x1 - x0 < 1e-9 {
            x1 = x0 + 1.0;
        }
        let plot_w = WIDTH - LEFT - RIGHT;
        for (i, panel) in self.panels.iter().enumerate() {
            let top = TOP + i as f64 * (PANEL_H + GAP);
            self.marks(&mut out, top, (x0, x1), plot_w, i == 0);
            self.panel(
                &mut out,
                panel,
                top,
                (x0, x1),
                plot_w,
                i + 1 == self.panels.len(),
            );
        }
        out.push_str("</svg>\n");
        out
    }

    /// The marks on one panel; their labels on the first only.
    fn marks(&self, out: &mut String, top: f64, (x0, x1): (f64, f64), plot_w: f64, label: bool) {
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * plot_w;
        for m in self.marks.iter().filter(|m| m.from.is_finite()) {
            let a = sx(m.from);
            match m.to.filter(|t| t.is_finite()) {
                Some(to) => {
                    let w = (sx(to) - a).max(1.0);
                    let _ = writeln!(
                        out,
                        r##"<rect x="{a:.1}" y="{top:.1}" width="{w:.1}" height="{PANEL_H}" fill="#ffd54f" fill-opacity="0.3"/>"##
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        r##"<line x1="{a:.1}" y1="{top:.1}" x2="{a:.1}" y2="{:.1}" stroke="#b8860b" stroke-dasharray="4 3"/>"##,
                        top + PANEL_H
                    );
                }
            }
            if label {
                // Right of the mark, or left of it in the plot's right half so the label
                // stays clear of the legend.
                let (x, anchor) = if a > LEFT + plot_w / 2.0 {
                    (a - 3.0, "end")
                } else {
                    (a + 3.0, "start")
                };
                let _ = writeln!(
                    out,
                    r##"<text x="{x:.1}" y="{:.1}" text-anchor="{anchor}" fill="#8a6d00">{}</text>"##,
                    top + 12.0,
                    esc(&m.label)
                );
            }
        }
    }

    fn panel(
        &self,
        out: &mut String,
        panel: &Panel,
        top: f64,
        (x0, x1): (f64, f64),
        plot_w: f64,
        last: bool,
    ) {
        let ymax = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|y| y.is_finite())
            .fold(0.0f64, f64::max);
        let ystep = nice_step(if ymax > 0.0 { ymax } else { 1.0 }, 5.0);
        let ytop = ((ymax / ystep).ceil().max(1.0)) * ystep;
        let bottom = top + PANEL_H;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * plot_w;
        let sy = |y: f64| bottom - (y / ytop) * PANEL_H;
        // Grid and y ticks.
        let mut y = 0.0;
        while y <= ytop + ystep * 1e-6 {
            let py = sy(y);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                py + 4.0,
                fmt_tick(y)
            );
            y += ystep;
        }
        // X ticks.
        let xstep = nice_step(x1 - x0, 10.0);
        let mut x = (x0 / xstep).ceil() * xstep;
        while x <= x1 + xstep * 1e-6 {
            let px = sx(x);
            let _ = writeln!(
                out,
                r##"<line x1="{px:.1}" y1="{bottom:.1}" x2="{px:.1}" y2="{:.1}" stroke="#999"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                bottom + 4.0,
                bottom + 17.0,
                fmt_tick(x)
            );
            x += xstep;
        }
        // Axes and labels.
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{top:.1}" width="{plot_w:.1}" height="{PANEL_H}" fill="none" stroke="#333"/>"##
        );
        let cy = top + PANEL_H / 2.0;
        let _ = writeln!(
            out,
            r#"<text transform="translate(18 {cy:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            esc(&panel.y_label)
        );
        if last {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                LEFT + plot_w / 2.0,
                bottom + 36.0,
                esc(&self.x_label)
            );
        }
        // Series and legend.
        for (k, s) in panel.series.iter().enumerate() {
            let pts: Vec<String> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            if !pts.is_empty() {
                let _ = writeln!(
                    out,
                    r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
                    s.color,
                    pts.join(" ")
                );
            }
            let ly = top + 14.0 + k as f64 * 18.0;
            let lx = LEFT + plot_w + 12.0;
            let _ = writeln!(
                out,
                r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                ly - 4.0,
                lx + 18.0,
                ly - 4.0,
                s.color,
                lx + 24.0,
                ly,
                esc(&s.name)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(100.0, 10.0), 10.0);
        assert_eq!(nice_step(7.0, 5.0), 2.0);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
        assert!((nice_step(0.3, 5.0) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn svg_has_one_polyline_per_series_and_escapes_text() {
        let c = Chart {
            title: "fanout <1 room>".into(),
            subtitle: "a & b".into(),
            x_label: "seconds".into(),
            panels: vec![
                Panel {
                    y_label: "ms".into(),
                    series: vec![
                        Series {
                            name: "p50".into(),
                            color: "#1f77b4",
                            points: vec![(0.0, 1.0), (1.0, 2.0), (2.0, f64::NAN)],
                        },
                        Series {
                            name: "p99".into(),
                            color: "#d62728",
                            points: vec![(0.0, 3.0), (1.0, 4.0)],
                        },
                    ],
                },
                Panel {
                    y_label: "msg/s".into(),
                    series: vec![Series {
                        name: "deliveries/s".into(),
                        color: "#2ca02c",
                        points: vec![],
                    }],
                },
            ],
            marks: Vec::new(),
        };
        let svg = c.to_svg();
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("fanout &lt;1 room&gt;") && svg.contains("a &amp; b"));
        assert!(!svg.contains("NaN"));
        for name in ["p50", "p99", "deliveries/s", "msg/s", "seconds"] {
            assert!(svg.contains(name), "{name}");
        }
        assert!(!svg.contains("#ffd54f") && !svg.contains("stroke-dasharray"));
    }

    #[test]
    fn marks_are_drawn_on_every_panel_and_widen_the_x_range() {
        let panel = |name: &str| Panel {
            y_label: name.into(),
            series: vec![Series {
                name: name.into(),
                color: "#1f77b4",
                points: vec![(0.0, 1.0), (10.0, 2.0)],
            }],
        };
        let c = Chart {
            title: "t".into(),
            panels: vec![panel("a"), panel("b")],
            marks: vec![
                Mark {
                    label: "command <kill -9>".into(),
                    from: 2.0,
                    to: Some(4.5),
                },
                Mark {
                    label: "end".into(),
                    from: 20.0,
                    to: None,
                },
            ],
            ..Default::default()
        };
        let svg = c.to_svg();
        assert_eq!(svg.matches(r##"fill="#ffd54f""##).count(), 2);
        assert_eq!(svg.matches("stroke-dasharray").count(), 2);
        assert_eq!(svg.matches("command &lt;kill -9&gt;").count(), 1);
        // The line at x = 20 is the right edge of the plot: the range reaches it.
        let right = LEFT + (WIDTH - LEFT - RIGHT);
        assert!(
            svg.contains(&format!(r#"x1="{right:.1}" y1="{TOP:.1}""#)),
            "{svg}"
        );
    }
}
