//! What a scenario hands back: a table for people, a JSON document for
//! machines and a bar plot as SVG (written by hand: a few rectangles do not
//! need a plotting crate).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A horizontal bar chart.
pub struct Plot {
    /// Title line.
    pub title: String,
    /// Unit of the values.
    pub unit: String,
    /// (label, value) per bar.
    pub bars: Vec<(String, f64)>,
}

/// One scenario's results.
pub struct Report {
    /// Scenario name, used for file names.
    pub scenario: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows of cells (a short row is allowed: a failed measurement).
    pub rows: Vec<Vec<String>>,
    /// Lines printed under the table.
    pub notes: Vec<String>,
    /// The machine-readable report.
    pub json: serde_json::Value,
    /// The plot.
    pub plot: Plot,
}

impl Report {
    /// The table, aligned, with the notes under it.
    pub fn table(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            if row.len() == columns {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.len());
                }
            }
        }
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let width = if cells.len() == columns { widths[i] } else { 0 };
                let _ = write!(text, "{cell:<width$}  ");
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&self.header, &mut out);
        line(
            &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
            &mut out,
        );
        for row in &self.rows {
            line(row, &mut out);
        }
        for note in &self.notes {
            let _ = writeln!(out, "* {note}");
        }
        out
    }

    /// Writes `<dir>/<scenario>.json` and `<dir>/<scenario>.svg`.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        self.write_with_svg(dir, &self.svg())
    }

    /// Writes `<dir>/<scenario>.json`, and `svg` as `<dir>/<scenario>.svg`
    /// (a scenario whose plot is not [`Report::svg`]'s bars).
    pub fn write_with_svg(&self, dir: &Path, svg_text: &str) -> Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot make the output dir {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.scenario));
        let text = serde_json::to_string_pretty(&self.json)?;
        std::fs::write(&json, text + "\n")
            .with_context(|| format!("cannot write {}", json.display()))?;
        let svg = dir.join(format!("{}.svg", self.scenario));
        std::fs::write(&svg, svg_text)
            .with_context(|| format!("cannot write {}", svg.display()))?;
        Ok((json, svg))
    }

    /// The plot as an SVG document.
    pub fn svg(&self) -> String {
        let bars = &self.plot.bars;
        let (left, bar_h, gap, width) = (260.0, 18.0, 6.0, 800.0);
        let height = 60.0 + bars.len() as f64 * (bar_h + gap);
        let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"20\" font-size=\"14\">{}</text>\n",
            escape(&self.plot.title)
        );
        for (i, (label, value)) in bars.iter().enumerate() {
            let y = 40.0 + i as f64 * (bar_h + gap);
            let w = (width - left - 120.0) * value / max;
            let color = if label.contains("chatmesh") {
                "#2b7bb9"
            } else {
                "#999999"
            };
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
                 <rect x=\"{left}\" y=\"{y}\" width=\"{w:.1}\" height=\"{bar_h}\" fill=\"{color}\"/>\
                 <text x=\"{:.1}\" y=\"{}\">{value:.1} {}</text>",
                left - 8.0,
                y + 13.0,
                escape(label),
                left + w + 6.0,
                y + 13.0,
                escape(&self.plot.unit)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The value at quantile `q` (0..=1) of sorted `values` (0 if empty).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// p50, p99 and max of latencies given in microseconds, in milliseconds
/// (zeros if there are none).
pub fn latency_ms(micros: &[u32]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = micros.iter().map(|&m| f64::from(m) / 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    (quantile(&ms, 0.5), quantile(&ms, 0.99), quantile(&ms, 1.0))
}

/// The lowest and highest ratio of one of `ours` to one of `theirs` over
/// every pair ((0, 0) when either is empty or a rate of theirs is not
/// positive).
pub fn ratio_range(ours: &[f64], theirs: &[f64]) -> (f64, f64) {
    let span = |rates: &[f64]| {
        rates.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), &r| {
            (lo.min(r), hi.max(r))
        })
    };
    let ((o_lo, o_hi), (t_lo, t_hi)) = (span(ours), span(theirs));
    if ours.is_empty() || theirs.is_empty() || t_lo <= 0.0 {
        return (0.0, 0.0);
    }
    (o_lo / t_hi, o_hi / t_lo)
}

/// `x / y` as "1.23x", or "-" when `y` is not positive.
pub fn ratio(x: f64, y: f64) -> String {
    if y > 0.0 {
        format!("{:.2}x", x / y)
    } else {
        "-".to_owned()
    }
}

/// One of the targets, checked: `{"target", "met", "verdict"}`, the
/// verdict reading "met (detail)" or "NOT met (detail)".
pub fn target(
    name: impl Into<String>,
    met: bool,
    detail: impl std::fmt::Display,
) -> serde_json::Value {
    serde_json::json!({
        "target": name.into(),
        "met": met,
        "verdict": format!("{} ({detail})", if met { "met" } else { "NOT met" }),
    })
}

/// The line under the table for each of `targets` (made by [`target`]).
pub fn target_notes(targets: &[serde_json::Value]) -> Vec<String> {
    targets
        .iter()
        .map(|t| {
            format!(
                "target {}: {}",
                t["target"].as_str().unwrap_or_default(),
                t["verdict"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// One line plot of a grid drawn by [`line_plots_svg`].
pub struct LinePanel {
    /// Panel title (the metric).
    pub title: String,
    /// Unit, written along the y axis.
    pub y_label: String,
    /// (legend name, points) per measured series; the first is drawn
    /// filled, the others hollow. An empty name is left out of the legend.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    /// The fitted curve, as (its description, sampled points), drawn dashed.
    pub fit: Option<(String, Vec<(f64, f64)>)>,
}

/// About five round tick values from 0 to at least `max`.
fn ticks(max: f64) -> Vec<f64> {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let count = (max / step).ceil() as usize;
    (0..=count).map(|i| i as f64 * step).collect()
}

/// A tick label: no decimals for large values.
fn tick_label(v: f64) -> String {
    if v == 0.0 || v.abs() >= 10.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Line plots in a grid of two columns, each with x (servers) and y axes,
/// ticks, the measured points joined by lines, and the fitted curve dashed
/// with its formula under the title. Hand-written SVG, like [`Report::svg`].
pub fn line_plots_svg(title: &str, panels: &[LinePanel]) -> String {
    const PANEL_W: f64 = 480.0;
    const PANEL_H: f64 = 320.0;
    const COLORS: [&str; 2] = ["#2b7bb9", "#d95f02"];
    let rows = panels.len().div_ceil(2).max(1);
    let (width, height) = (2.0 * PANEL_W, 40.0 + rows as f64 * PANEL_H);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"24\" font-size=\"15\">{}</text>\n",
        escape(title)
    );
    for (index, panel) in panels.iter().enumerate() {
        let ox = (index % 2) as f64 * PANEL_W;
        let oy = 40.0 + (index / 2) as f64 * PANEL_H;
        // Plot area inside the panel.
        let (left, right, top, bottom) = (
            ox + 70.0,
            ox + PANEL_W - 20.0,
            oy + 50.0,
            oy + PANEL_H - 45.0,
        );
        let every = panel
            .series
            .iter()
            .flat_map(|s| s.1.iter())
            .chain(panel.fit.iter().flat_map(|f| f.1.iter()));
        let (x_max, y_max) = every.fold((0.0_f64, 0.0_f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
        let xs = ticks(x_max);
        let ys = ticks(y_max * 1.05);
        let (x_top, y_top) = (*xs.last().unwrap_or(&1.0), *ys.last().unwrap_or(&1.0));
        let px = |x: f64| left + (right - left) * x / x_top;
        let py = |y: f64| bottom - (bottom - top) * y.max(0.0) / y_top;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" font-size=\"13\" font-weight=\"bold\">{}</text>",
            ox + 12.0,
            oy + 18.0,
            escape(&panel.title)
        );
        if let Some((text, _)) = &panel.fit {
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" fill=\"#555\">{}</text>",
                ox + 12.0,
                oy + 34.0,
                escape(text)
            );
        }
        // Axes, grid and ticks.
        let _ = writeln!(
            out,
            "<path d=\"M{left:.1},{top:.1} V{bottom:.1} H{right:.1}\" stroke=\"black\" fill=\"none\"/>"
        );
        for &x in &xs {
            let _ = writeln!(
                out,
                "<line x1=\"{0:.1}\" y1=\"{bottom:.1}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"black\"/>\
                 <text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
                px(x),
                bottom + 5.0,
                bottom + 18.0,
                tick_label(x)
            );
        }
        for &y in &ys {
            let _ = writeln!(
                out,
                "<line x1=\"{left:.1}\" y1=\"{0:.1}\" x2=\"{right:.1}\" y2=\"{0:.1}\" stroke=\"#e5e5e5\"/>\
                 <text x=\"{1:.1}\" y=\"{2:.1}\" text-anchor=\"end\">{3}</text>",
                py(y),
                left - 6.0,
                py(y) + 4.0,
                tick_label(y)
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">servers (N)</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 {:.1} {:.1})\">{}</text>",
            (left + right) / 2.0,
            bottom + 34.0,
            ox + 16.0,
            (top + bottom) / 2.0,
            ox + 16.0,
            (top + bottom) / 2.0,
            escape(&panel.y_label)
        );
        if let Some((_, curve)) = &panel.fit {
            let path: Vec<String> = curve
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"#888\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>",
                path.join(" ")
            );
        }
        for (i, (name, points)) in panel.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let path: Vec<String> = points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
                path.join(" ")
            );
            let fill = if i == 0 { color } else { "white" };
            for &(x, y) in points {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{fill}\" stroke=\"{color}\" stroke-width=\"2\"><title>N={x}: {}</title></circle>",
                    px(x),
                    py(y),
                    tick_label(y)
                );
            }
            if !name.is_empty() {
                let (lx, ly) = (right - 90.0, top + 4.0 + 16.0 * i as f64);
                let _ = writeln!(
                    out,
                    "<circle cx=\"{lx:.1}\" cy=\"{ly:.1}\" r=\"4\" fill=\"{fill}\" stroke=\"{color}\" stroke-width=\"2\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                    lx + 10.0,
                    ly + 4.0,
                    escape(name)
                );
            }
        }
        if panel.fit.is_some() {
            let (lx, ly) = (right - 90.0, top + 4.0 + 16.0 * panel.series.len() as f64);
            let _ = writeln!(
                out,
                "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"#888\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\">fit</text>",
                lx - 8.0,
                lx + 6.0,
                lx + 10.0,
                ly + 4.0
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_plots_have_axes_points_and_the_fit() {
        assert_eq!(ticks(10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(23.0), vec![0.0, 5.0, 10.0, 15.0, 20.0, 25.0]);
        let svg = line_plots_svg(
            "t <1>",
            &[LinePanel {
                title: "cpu".to_owned(),
                y_label: "%".to_owned(),
                series: vec![(String::new(), vec![(3.0, 1.0), (5.0, 2.0), (10.0, 4.0)])],
                fit: Some(("fit: y = 0.4*N".to_owned(), vec![(3.0, 1.2), (10.0, 4.0)])),
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert_eq!(svg.matches("<circle").count(), 3, "one per point");
        assert!(svg.contains("stroke-dasharray") && svg.contains("fit: y = 0.4*N"));
        assert!(svg.contains("servers (N)"));
    }
}
