//! Small, dependency-free SVG charts with axes and labels, for reports that must open anywhere
//! (the HTML page inlines them; the same text is written as `.svg` files).

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
pub const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// A point with an optional vertical interval.
#[derive(Debug, Clone)]
pub struct Point {
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub y_low: Option<f64>,
    pub y_high: Option<f64>,
}

/// A named line.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn new(xs: impl Iterator<Item = f64> + Clone, ys: impl Iterator<Item = f64> + Clone, y_from_zero: bool) -> Self {
        let range = |it: &mut dyn Iterator<Item = f64>| {
            it.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
        };
        let (mut x0, mut x1) = range(&mut xs.clone());
        let (mut y0, mut y1) = range(&mut ys.clone());
        if !x0.is_finite() {
            (x0, x1) = (0.0, 1.0);
        }
        if !y0.is_finite() {
            (y0, y1) = (0.0, 1.0);
        }
        if y_from_zero {
            y0 = y0.min(0.0);
        }
        let pad = |lo: f64, hi: f64| {
            if hi - lo < 1e-12 {
                (lo - 0.5, hi + 0.5)
            } else {
                (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
            }
        };
        let (x0, x1) = pad(x0, x1);
        let (y0, y1) = if y_from_zero { (y0, y1 + 0.05 * (y1 - y0).max(1e-12)) } else { pad(y0, y1) };
        Frame { x: (x0, x1), y: (y0, y1) }
    }

    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0) * (W - LEFT - RIGHT)
    }

    fn py(&self, y: f64) -> f64 {
        H - BOTTOM - (y - self.y.0) / (self.y.1 - self.y.0) * (H - TOP - BOTTOM)
    }

    fn axes(&self, out: &mut String, title: &str, x_label: &str, y_label: &str) {
        let _ = write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ =
            write!(out, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, W / 2.0, escape(title));
        let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
        let _ = write!(out, r##"<path d="M{x0},{y0} V{y1} H{x1}" stroke="#333" fill="none"/>"##);
        for i in 0..=4 {
            let fx = self.x.0 + (self.x.1 - self.x.0) * i as f64 / 4.0;
            let fy = self.y.0 + (self.y.1 - self.y.0) * i as f64 / 4.0;
            let (px, py) = (self.px(fx), self.py(fy));
            let _ = write!(out, r##"<line x1="{px}" y1="{y1}" x2="{px}" y2="{}" stroke="#333"/>"##, y1 + 5.0);
            let _ = write!(out, r#"<text x="{px}" y="{}" text-anchor="middle">{}</text>"#, y1 + 18.0, tick(fx));
            let _ = write!(out, r##"<line x1="{x0}" y1="{py}" x2="{x1}" y2="{py}" stroke="#eee"/>"##);
            let _ = write!(out, r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#, x0 - 6.0, py + 4.0, tick(fy));
        }
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            H - 12.0,
            escape(x_label)
        );
        let _ = write!(
            out,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
            (y0 + y1) / 2.0,
            (y0 + y1) / 2.0,
            escape(y_label)
        );
    }
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

fn legend(out: &mut String, labels: &[(String, &str)]) {
    for (i, (label, color)) in labels.iter().enumerate() {
        let y = TOP + 8.0 + 16.0 * i as f64;
        let x = W - RIGHT - 180.0;
        let _ = write!(out, r#"<rect x="{x}" y="{}" width="10" height="10" fill="{color}"/>"#, y - 9.0);
        let _ = write!(out, r#"<text x="{}" y="{y}">{}</text>"#, x + 15.0, escape(label));
    }
}

/// Labelled points with vertical interval whiskers (success with its 95% interval).
pub fn scatter(title: &str, x_label: &str, y_label: &str, points: &[Point], y_from_zero: bool) -> String {
    let xs = points.iter().map(|p| p.x);
    let ys = points.iter().flat_map(|p| [Some(p.y), p.y_low, p.y_high]).flatten();
    let frame = Frame::new(xs, ys, y_from_zero);
    let mut out = String::new();
    frame.axes(&mut out, title, x_label, y_label);
    let mut labels = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let (x, y) = (frame.px(p.x), frame.py(p.y));
        if let (Some(lo), Some(hi)) = (p.y_low, p.y_high) {
            let (a, b) = (frame.py(lo), frame.py(hi));
            let _ = write!(
                out,
                r#"<path d="M{x},{a} V{b} M{},{a} H{} M{},{b} H{}" stroke="{color}" stroke-width="2"/>"#,
                x - 6.0,
                x + 6.0,
                x - 6.0,
                x + 6.0
            );
        }
        if x.is_finite() && y.is_finite() {
            let _ = write!(out, r#"<circle cx="{x}" cy="{y}" r="5" fill="{color}"/>"#);
        }
        labels.push((p.label.clone(), color));
    }
    legend(&mut out, &labels);
    out.push_str("</svg>");
    out
}

/// Lines (training curves).
pub fn lines(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect::<Vec<_>>();
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect::<Vec<_>>();
    let frame = Frame::new(xs.iter().copied(), ys.iter().copied(), false);
    let mut out = String::new();
    frame.axes(&mut out, title, x_label, y_label);
    let mut labels = Vec::new();
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .enumerate()
            .map(|(j, &(x, y))| format!("{}{:.1},{:.1}", if j == 0 { "M" } else { "L" }, frame.px(x), frame.py(y)))
            .collect();
        let dash = if s.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = write!(out, r#"<path d="{}" stroke="{color}" stroke-width="2" fill="none"{dash}/>"#, path.join(" "));
        labels.push((s.label.clone(), color));
    }
    legend(&mut out, &labels);
    out.push_str("</svg>");
    out
}
