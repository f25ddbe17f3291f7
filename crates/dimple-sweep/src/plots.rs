//! PNG charts of a sweep: accuracy against forward passes per threshold, throughput against
//! concurrency, and the latency distribution. Drawn with plotters into a memory buffer and
//! encoded as PNG with the `image` crate; text uses the bundled DejaVu Sans font.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::grid::Load;
use crate::stats::Summary;
use crate::{Result, SweepError};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

const W: u32 = 900;
const H: u32 = 600;
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn perr(e: impl std::fmt::Display) -> SweepError {
    SweepError::Plot(e.to_string())
}

/// A named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws line+point series into a PNG file.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    REGISTER.call_once(|| {
        // The bundled font is valid TrueType; a failure would only drop the text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(SweepError::Plot(format!("{title}: nothing to plot")));
    }
    let pad = |a: f64, b: f64| {
        let d = if (b - a).abs() < 1e-12 {
            a.abs().max(1.0) * 0.1
        } else {
            (b - a) * 0.08
        };
        (a - d, b + d)
    };
    let (x0, x1) = pad(x0, x1);
    let (y0, y1) = pad(y0, y1);
    let mut buf = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(perr)?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(perr)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(perr)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(perr)?;
        root.present().map_err(perr)?;
    }
    let img = image::RgbImage::from_raw(W, H, buf).ok_or_else(|| perr("buffer size"))?;
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| crate::file_err(path, e))
}

fn setting_name(s: &Summary) -> String {
    let c = &s.config;
    format!(
        "{} {} cache {}",
        c.pipeline,
        c.alg,
        if c.use_cache { "on" } else { "off" }
    )
}

/// Accuracy against mean NFE: one line per setting, one point per threshold.
pub fn accuracy_vs_nfe(path: &Path, summaries: &[Summary]) -> Result<()> {
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in summaries {
        if let Some(acc) = s.accuracy {
            lines
                .entry(setting_name(s))
                .or_default()
                .push((s.nfe_mean, acc));
        }
    }
    let series: Vec<Series> = lines
        .into_iter()
        .map(|(name, mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points.dedup();
            Series { name, points }
        })
        .collect();
    line_chart(
        path,
        "Accuracy vs forward passes (one point per threshold)",
        "mean NFE",
        "accuracy",
        &series,
    )
}

/// Tokens per second against concurrency (closed-loop points only).
pub fn throughput_vs_concurrency(path: &Path, summaries: &[Summary]) -> Result<()> {
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in summaries {
        if let Load::Concurrency(c) = s.config.load {
            let thr = s.config.threshold.map_or("none".into(), |t| t.to_string());
            lines
                .entry(format!("{} thr {thr}", setting_name(s)))
                .or_default()
                .push((c as f64, s.tokens_per_s));
        }
    }
    let series: Vec<Series> = lines
        .into_iter()
        .map(|(name, mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series { name, points }
        })
        .collect();
    line_chart(
        path,
        "Throughput vs concurrency",
        "concurrent requests",
        "tokens / s",
        &series,
    )
}

/// Empirical latency CDF per configuration.
pub fn latency_cdf(path: &Path, summaries: &[Summary]) -> Result<()> {
    let series: Vec<Series> = summaries
        .iter()
        .filter(|s| !s.latencies_s.is_empty())
        .map(|s| {
            let n = s.latencies_s.len() as f64;
            Series {
                name: s.key.clone(),
                points: s
                    .latencies_s
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (l, (i + 1) as f64 / n))
                    .collect(),
            }
        })
        .collect();
    line_chart(
        path,
        "Latency CDF",
        "latency (s)",
        "fraction of requests",
        &series,
    )
}
