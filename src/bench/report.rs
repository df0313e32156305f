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
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot make the output dir {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.scenario));
        let text = serde_json::to_string_pretty(&self.json)?;
        std::fs::write(&json, text + "\n")
            .with_context(|| format!("cannot write {}", json.display()))?;
        let svg = dir.join(format!("{}.svg", self.scenario));
        std::fs::write(&svg, self.svg())
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
