//! Charts of a sweep, one question each: accuracy against forward passes (one point per
//! threshold, labelled, with 95% intervals), answer throughput against concurrency, latency
//! against offered rate (open loop), and the latency distribution (log scale). Drawn with
//! plotters as PNG (encoded with the `image` crate) or SVG; text uses the bundled DejaVu
//! Sans font. Legends sit to the right of the data area, and every series has its own
//! colour and marker pair.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::grid::Load;
use crate::stats::Summary;
use crate::{Result, SweepError};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Width of the data area; the legend panel is added to the right of it.
const PLOT_W: u32 = 760;
const H: u32 = 560;
/// Ten colours and seven markers: series `i` takes colour `i % 10` and marker `i % 7`, so
/// the first 70 series all differ in their pair, the first ten in colour alone, and
/// neighbours in both.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const MARKERS: usize = 7;

/// Image file formats for the charts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotFormat {
    Png,
    Svg,
}

impl PlotFormat {
    pub fn extension(self) -> &'static str {
        match self {
            PlotFormat::Png => "png",
            PlotFormat::Svg => "svg",
        }
    }
}

impl FromStr for PlotFormat {
    type Err = SweepError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "png" => Ok(PlotFormat::Png),
            "svg" => Ok(PlotFormat::Svg),
            other => Err(SweepError::Plot(format!(
                "format must be png or svg, got {other:?}"
            ))),
        }
    }
}

/// A chart a report can hold.
pub struct Plot {
    /// File name without extension.
    pub name: &'static str,
    pub title: &'static str,
    /// What the chart shows, for the report.
    pub about: &'static str,
    pub draw: fn(&Path, &[Summary], PlotFormat) -> Result<()>,
}

/// Every chart, in report order. Each returns an error when it has nothing to draw.
pub const PLOTS: &[Plot] = &[
    Plot {
        name: "accuracy_vs_nfe",
        title: "Accuracy vs forward passes",
        about: "Accuracy (unanswered items wrong) against mean forward passes per request: \
                one line per decoding setting, one labelled point per threshold, with the 95% \
                Wilson interval as a vertical bar. Up and to the left is better.",
        draw: accuracy_vs_nfe,
    },
    Plot {
        name: "throughput_vs_concurrency",
        title: "Throughput vs concurrency",
        about: "Answer tokens per second (end token and padding excluded) against the number \
                of requests in flight (closed loop), one line per setting.",
        draw: throughput_vs_concurrency,
    },
    Plot {
        name: "latency_vs_rate",
        title: "Latency vs offered rate",
        about: "Median and 99th-percentile latency against the offered Poisson arrival rate \
                (open loop), one pair of lines per setting.",
        draw: latency_vs_rate,
    },
    Plot {
        name: "latency_cdf",
        title: "Latency distribution",
        about: "Share of requests answered within a given latency (log scale), one line per \
                configuration.",
        draw: latency_cdf,
    },
];

fn perr(e: impl std::fmt::Display) -> SweepError {
    SweepError::Plot(e.to_string())
}

/// A named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// A text beside each point (empty: none).
    pub labels: Vec<String>,
    /// A vertical interval per point (empty: none).
    pub bars: Vec<Option<(f64, f64)>>,
}

impl Series {
    fn new(name: String, points: Vec<(f64, f64)>) -> Self {
        Self {
            name,
            points,
            labels: Vec::new(),
            bars: Vec::new(),
        }
    }
}

/// How the x axis is scaled.
pub enum XAxis {
    Linear,
    Log,
    /// Linear, with ticks only at these values (e.g. the concurrency levels).
    Ticks(Vec<f64>),
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x: XAxis,
    /// Fixed y range; from the data when `None`.
    pub y: Option<(f64, f64)>,
    /// Upper end of a y range taken from the data (e.g. 1 for a share).
    pub y_max: Option<f64>,
    pub series: &'a [Series],
}

fn legend_width(series: &[Series]) -> u32 {
    let chars = series
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0);
    (chars as u32 * 8 + 64).clamp(160, 520)
}

/// Draws `chart` into `path` as `format`.
pub fn draw(path: &Path, chart: &Chart<'_>, format: PlotFormat) -> Result<()> {
    REGISTER.call_once(|| {
        // The bundled font is valid TrueType; a failure would only drop the text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    if chart.series.iter().all(|s| s.points.is_empty()) {
        return Err(SweepError::Plot(format!(
            "{}: nothing to plot",
            chart.title
        )));
    }
    let w = PLOT_W + legend_width(chart.series);
    match format {
        PlotFormat::Png => {
            let mut buf = vec![0u8; (w * H * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut buf, (w, H)).into_drawing_area();
                draw_on(&root, chart)?;
                root.present().map_err(perr)?;
            }
            // Charts are flat colour: the strongest compression keeps them small.
            let file = std::fs::File::create(path).map_err(|e| crate::file_err(path, e))?;
            let encoder = image::codecs::png::PngEncoder::new_with_quality(
                std::io::BufWriter::new(file),
                image::codecs::png::CompressionType::Best,
                image::codecs::png::FilterType::Adaptive,
            );
            image::ImageEncoder::write_image(encoder, &buf, w, H, image::ExtendedColorType::Rgb8)
                .map_err(|e| crate::file_err(path, e))
        }
        PlotFormat::Svg => {
            let root = SVGBackend::new(path, (w, H)).into_drawing_area();
            draw_on(&root, chart)?;
            root.present().map_err(perr)
        }
    }
}

fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

fn pad(lo: f64, hi: f64) -> (f64, f64) {
    let d = if (hi - lo).abs() < 1e-12 {
        lo.abs().max(1.0) * 0.1
    } else {
        (hi - lo) * 0.08
    };
    (lo - d, hi + d)
}

fn draw_on<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &Chart<'_>) -> Result<()> {
    root.fill(&WHITE).map_err(perr)?;
    let root = root.titled(chart.title, ("sans-serif", 22)).map_err(perr)?;
    let (plot, legend) = root.split_horizontally(PLOT_W - 10);
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = bounds(points().map(|p| p.0)).ok_or_else(|| perr("no points"))?;
    let (y0, y1) = match chart.y {
        Some(r) => r,
        None => {
            let bars = chart.series.iter().flat_map(|s| s.bars.iter().flatten());
            let ys = points().map(|p| p.1).chain(bars.flat_map(|&(a, b)| [a, b]));
            let (lo, hi) = bounds(ys).ok_or_else(|| perr("no points"))?;
            let (lo, hi) = pad(lo, hi);
            // Quantities plotted here are never negative: start at zero when close.
            (
                if lo < 0.0 || lo < (hi - lo) * 0.5 {
                    lo.max(0.0)
                } else {
                    lo
                },
                hi,
            )
        }
    };
    match &chart.x {
        XAxis::Linear => {
            let (a, b) = pad(x0, x1);
            draw_xy(&plot, chart, a..b, y0..y1)?
        }
        XAxis::Log => {
            // Half a decade of room on each side; log axes need positive values.
            let (a, b) = (x0.max(1e-6) / 1.5, x1.max(1e-6) * 1.5);
            let axis = LogTicks((a..b).log_scale().into());
            draw_xy(&plot, chart, axis, y0..y1)?
        }
        XAxis::Ticks(ticks) => {
            let (a, b) = pad(x0, x1);
            let axis = TickedAxis {
                inner: (a..b).into(),
                ticks: ticks.clone(),
            };
            draw_xy(&plot, chart, axis, y0..y1)?
        }
    }
    draw_legend(&legend, chart.series)
}

fn draw_xy<DB, X>(
    area: &DrawingArea<DB, Shift>,
    chart: &Chart<'_>,
    x: X,
    y: std::ops::Range<f64>,
) -> Result<()>
where
    DB: DrawingBackend,
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let mut ctx = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(perr)?;
    let fmt = |v: &f64| {
        if (v - v.round()).abs() < 1e-9 && v.abs() < 1e6 {
            format!("{}", v.round())
        } else if v.abs() >= 0.01 {
            let s = format!("{v:.3}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            format!("{v:.1e}")
        }
    };
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .x_label_formatter(&fmt)
        .y_label_formatter(&fmt)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(perr)?;
    // Series that share a point and its label (two settings with equal results) print the
    // label once.
    let mut labelled: Vec<((f64, f64), &str)> = Vec::new();
    for (i, s) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        ctx.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(perr)?;
        for (p, bar) in s.points.iter().zip(&s.bars) {
            if let Some((lo, hi)) = *bar {
                ctx.draw_series(std::iter::once(PathElement::new(
                    vec![(p.0, lo), (p.0, hi)],
                    color.stroke_width(1),
                )))
                .map_err(perr)?;
            }
        }
        // Long series (a CDF) get a marker every few points: enough to tell them apart
        // without hiding the line.
        let every = s.points.len().div_ceil(10).max(1);
        let marked: Vec<(f64, f64)> = s.points.iter().copied().step_by(every).collect();
        draw_markers(&mut ctx, &marked, i, color)?;
        // Labels take turns among four places around their points, so that neighbours
        // (close thresholds often give close NFE) do not print over each other.
        let mut texts = Vec::new();
        for (j, (&p, text)) in s.points.iter().zip(&s.labels).enumerate() {
            if labelled.contains(&(p, text.as_str())) {
                continue;
            }
            labelled.push((p, text.as_str()));
            let dy = [-20, 8, -34, 22][j % 4];
            texts.push(EmptyElement::at(p) + Text::new(text.clone(), (6, dy), ("sans-serif", 13)));
        }
        ctx.draw_series(texts).map_err(perr)?;
    }
    Ok(())
}

/// Draws the marker of series `i` at each point. (One arm per shape: the element types
/// differ, and boxed elements would need a `'static` backend.)
fn draw_markers<DB, X, Y>(
    ctx: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    points: &[(f64, f64)],
    i: usize,
    color: RGBColor,
) -> Result<()>
where
    DB: DrawingBackend,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let fill = color.filled();
    let pts = points.iter().copied();
    match i % MARKERS {
        0 => ctx
            .draw_series(pts.map(|p| EmptyElement::at(p) + Circle::new((0, 0), 5, fill)))
            .map(|_| ()),
        1 => ctx
            .draw_series(pts.map(|p| EmptyElement::at(p) + TriangleMarker::new((0, 0), 7, fill)))
            .map(|_| ()),
        2 => ctx
            .draw_series(
                pts.map(|p| EmptyElement::at(p) + Rectangle::new([(-5, -5), (5, 5)], fill)),
            )
            .map(|_| ()),
        3 => ctx
            .draw_series(pts.map(|p| EmptyElement::at(p) + Polygon::new(DIAMOND.to_vec(), fill)))
            .map(|_| ()),
        4 => ctx
            .draw_series(pts.map(|p| EmptyElement::at(p) + Polygon::new(DOWN.to_vec(), fill)))
            .map(|_| ()),
        5 => ctx
            .draw_series(
                pts.map(|p| EmptyElement::at(p) + Circle::new((0, 0), 5, color.stroke_width(2))),
            )
            .map(|_| ()),
        _ => ctx
            .draw_series(
                pts.map(|p| EmptyElement::at(p) + Cross::new((0, 0), 6, color.stroke_width(3))),
            )
            .map(|_| ()),
    }
    .map_err(perr)
}

const DIAMOND: [(i32, i32); 4] = [(0, -7), (7, 0), (0, 7), (-7, 0)];
/// A downward triangle.
const DOWN: [(i32, i32); 3] = [(-6, -4), (6, -4), (0, 7)];

/// The legend's copy of [`draw_markers`], in pixel coordinates.
fn draw_legend_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    i: usize,
    color: RGBColor,
) -> Result<()> {
    let fill = color.filled();
    match i % MARKERS {
        0 => area.draw(&(EmptyElement::at(at) + Circle::new((0, 0), 5, fill))),
        1 => area.draw(&(EmptyElement::at(at) + TriangleMarker::new((0, 0), 7, fill))),
        2 => area.draw(&(EmptyElement::at(at) + Rectangle::new([(-5, -5), (5, 5)], fill))),
        3 => area.draw(&(EmptyElement::at(at) + Polygon::new(DIAMOND.to_vec(), fill))),
        4 => area.draw(&(EmptyElement::at(at) + Polygon::new(DOWN.to_vec(), fill))),
        5 => area.draw(&(EmptyElement::at(at) + Circle::new((0, 0), 5, color.stroke_width(2)))),
        _ => area.draw(&(EmptyElement::at(at) + Cross::new((0, 0), 6, color.stroke_width(3)))),
    }
    .map_err(perr)
}

/// A linear f64 axis with ticks at given values only (plotters' own key-point wrapper
/// loses the default number formatting).
struct TickedAxis {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ranged for TickedAxis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, _: Hint) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }
}

/// A log-scaled f64 axis with ticks at 1, 2, 3 and 5 times each power of ten in range.
/// plotters' own log ticks start at the first power of ten inside the range, which leaves
/// an axis from 1.1 to 22 (confident decoding to a 16-slot response) labelled at 10 and 20
/// only.
struct LogTicks(LogCoord<f64>);

impl Ranged for LogTicks {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.0.map(value, limit)
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, _: Hint) -> Vec<f64> {
        log_ticks(self.0.range())
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.0.range()
    }
}

fn log_ticks(range: std::ops::Range<f64>) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(range.start.log10().floor());
    while decade <= range.end {
        for m in [1.0, 2.0, 3.0, 5.0] {
            let v = m * decade;
            if (range.start..=range.end).contains(&v) {
                ticks.push(v);
            }
        }
        decade *= 10.0;
    }
    ticks
}

fn draw_legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, series: &[Series]) -> Result<()> {
    let row = 20;
    let rows = (area.dim_in_pixel().1 as i32 - 60) / row;
    for (i, s) in series.iter().enumerate() {
        let y = 40 + i as i32 * row;
        if i as i32 >= rows {
            area.draw(&Text::new(
                format!("... and {} more", series.len() - i),
                (10, y - 7),
                ("sans-serif", 13),
            ))
            .map_err(perr)?;
            break;
        }
        let color = COLORS[i % COLORS.len()];
        area.draw(&PathElement::new(
            vec![(8, y), (40, y)],
            color.stroke_width(2),
        ))
        .map_err(perr)?;
        draw_legend_marker(area, (24, y), i, color)?;
        area.draw(&Text::new(s.name.clone(), (48, y - 7), ("sans-serif", 13)))
            .map_err(perr)?;
    }
    Ok(())
}

/// The parts of a configuration that can tell series apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    Pipeline,
    Alg,
    Threshold,
    Cache,
    Length,
    Block,
    Steps,
    Load,
}

fn field(s: &Summary, f: Field) -> String {
    let c = &s.config;
    match f {
        Field::Pipeline => c.pipeline.to_string(),
        Field::Alg => c.alg.to_string(),
        Field::Threshold => format!(
            "thr {}",
            c.threshold.map_or("none".into(), |t| t.to_string())
        ),
        Field::Cache => format!("cache {}", c.cache_mode),
        Field::Length => format!("n {}", c.max_new_tokens),
        Field::Block => format!("block {}", c.slots_per_block()),
        Field::Steps => format!("steps {}", c.steps),
        Field::Load => match c.load {
            Load::Concurrency(n) => format!("c {n}"),
            Load::Rate(r) => format!("rate {r}/s"),
        },
    }
}

const FIELDS: [Field; 8] = [
    Field::Pipeline,
    Field::Alg,
    Field::Threshold,
    Field::Cache,
    Field::Length,
    Field::Block,
    Field::Steps,
    Field::Load,
];

/// A series name from the fields (other than `except`) that differ between `summaries`:
/// names stay short and say only what tells the lines apart.
fn namer(summaries: &[Summary], except: &[Field]) -> impl Fn(&Summary) -> String {
    let varying: Vec<Field> = FIELDS
        .iter()
        .copied()
        .filter(|f| !except.contains(f))
        .filter(|&f| {
            summaries
                .iter()
                .map(|s| field(s, f))
                .collect::<BTreeSet<_>>()
                .len()
                > 1
        })
        .collect();
    move |s: &Summary| {
        if varying.is_empty() {
            // Nothing varies: name the setting in full.
            FIELDS
                .iter()
                .filter(|f| !except.contains(f) && **f != Field::Steps)
                .map(|&f| field(s, f))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            varying
                .iter()
                .map(|&f| field(s, f))
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// `items` grouped by name, the groups in the order of their first item. Summaries come in
/// grid order, so legends list settings as the grid does (blocks of 16, 8, 4 rather than
/// 16, 4, 8 as text sorts them).
fn grouped<T>(items: impl IntoIterator<Item = (String, T)>) -> Vec<(String, Vec<T>)> {
    let mut out: Vec<(String, Vec<T>)> = Vec::new();
    for (name, item) in items {
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, group)) => group.push(item),
            None => out.push((name, vec![item])),
        }
    }
    out
}

/// Accuracy against mean NFE: one line per setting, one labelled point per threshold.
pub fn accuracy_vs_nfe(path: &Path, summaries: &[Summary], format: PlotFormat) -> Result<()> {
    let scored: Vec<Summary> = summaries
        .iter()
        .filter(|s| s.accuracy.is_some())
        .cloned()
        .collect();
    let name = namer(&scored, &[Field::Threshold, Field::Load]);
    // Accuracy does not depend on the load: one point per threshold, from the first load.
    let series: Vec<Series> = grouped(scored.iter().map(|s| (name(s), s)))
        .into_iter()
        .map(|(name, all)| {
            let mut points: BTreeMap<String, &Summary> = BTreeMap::new();
            for s in all {
                points.entry(field(s, Field::Threshold)).or_insert(s);
            }
            let mut pts: Vec<&Summary> = points.into_values().collect();
            pts.sort_by(|a, b| a.nfe_mean.total_cmp(&b.nfe_mean));
            Series {
                name,
                points: pts
                    .iter()
                    .map(|s| (s.nfe_mean, s.accuracy.unwrap_or(0.0)))
                    .collect(),
                labels: pts
                    .iter()
                    .map(|s| s.config.threshold.map_or("none".into(), |t| t.to_string()))
                    .collect(),
                bars: pts.iter().map(|s| s.accuracy_ci95).collect(),
            }
        })
        .collect();
    draw(
        path,
        &Chart {
            title: "Accuracy vs forward passes (labels: threshold)",
            x_label: "mean forward passes per request (NFE, log scale)",
            y_label: "accuracy (95% interval)",
            // NFE runs from 1 to the response length, and confident decoding crowds its
            // points near 1: a log scale keeps them apart.
            x: XAxis::Log,
            y: None,
            y_max: Some(1.04),
            series: &series,
        },
        format,
    )
}

/// Answer tokens per second against concurrency (closed-loop points only).
pub fn throughput_vs_concurrency(
    path: &Path,
    summaries: &[Summary],
    format: PlotFormat,
) -> Result<()> {
    let closed: Vec<Summary> = summaries
        .iter()
        .filter(|s| matches!(s.config.load, Load::Concurrency(_)))
        .cloned()
        .collect();
    let name = namer(&closed, &[Field::Load]);
    let mut points = Vec::new();
    let mut ticks = BTreeSet::new();
    for s in &closed {
        if let Load::Concurrency(c) = s.config.load {
            ticks.insert(c);
            points.push((name(s), (c as f64, s.answer_tokens_per_s)));
        }
    }
    let series: Vec<Series> = grouped(points)
        .into_iter()
        .map(|(name, mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series::new(name, points)
        })
        .collect();
    draw(
        path,
        &Chart {
            title: "Answer throughput vs concurrency",
            x_label: "concurrent requests",
            y_label: "answer tokens / s",
            x: XAxis::Ticks(ticks.into_iter().map(|c| c as f64).collect()),
            y: None,
            y_max: None,
            series: &series,
        },
        format,
    )
}

/// Median and p99 latency against the offered rate (open-loop points only).
pub fn latency_vs_rate(path: &Path, summaries: &[Summary], format: PlotFormat) -> Result<()> {
    let open: Vec<Summary> = summaries
        .iter()
        .filter(|s| matches!(s.config.load, Load::Rate(_)))
        .cloned()
        .collect();
    let name = namer(&open, &[Field::Load]);
    let mut points = Vec::new();
    let mut ticks: Vec<f64> = Vec::new();
    for s in &open {
        if let Load::Rate(r) = s.config.load {
            if !ticks.contains(&r) {
                ticks.push(r);
            }
            points.push((name(s), s));
        }
    }
    ticks.sort_by(f64::total_cmp);
    let rate = |s: &Summary| match s.config.load {
        Load::Rate(r) => r,
        Load::Concurrency(c) => c as f64,
    };
    let mut series = Vec::new();
    for (name, mut pts) in grouped(points) {
        pts.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
        series.push(Series::new(
            format!("{name} p50"),
            pts.iter().map(|s| (rate(s), s.latency_p50_s)).collect(),
        ));
        series.push(Series::new(
            format!("{name} p99"),
            pts.iter().map(|s| (rate(s), s.latency_p99_s)).collect(),
        ));
    }
    draw(
        path,
        &Chart {
            title: "Latency vs offered rate (open loop)",
            x_label: "offered rate (requests / s)",
            y_label: "latency (s)",
            x: XAxis::Ticks(ticks),
            y: None,
            y_max: None,
            series: &series,
        },
        format,
    )
}

/// Empirical latency CDF per configuration, log-scaled latency.
pub fn latency_cdf(path: &Path, summaries: &[Summary], format: PlotFormat) -> Result<()> {
    let with: Vec<Summary> = summaries
        .iter()
        .filter(|s| !s.latencies_s.is_empty())
        .cloned()
        .collect();
    let name = namer(&with, &[]);
    let series: Vec<Series> = with
        .iter()
        .map(|s| {
            let n = s.latencies_s.len() as f64;
            Series::new(
                name(s),
                s.latencies_s
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (l, (i + 1) as f64 / n))
                    .collect(),
            )
        })
        .collect();
    draw(
        path,
        &Chart {
            title: "Latency distribution",
            x_label: "latency (s, log scale)",
            y_label: "share of requests answered",
            x: XAxis::Log,
            y: Some((0.0, 1.02)),
            y_max: None,
            series: &series,
        },
        format,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_styles_are_distinct() {
        let pairs: BTreeSet<(usize, usize)> =
            (0..70).map(|i| (i % COLORS.len(), i % MARKERS)).collect();
        assert_eq!(pairs.len(), 70);
        let colors: BTreeSet<(u8, u8, u8)> = COLORS.iter().map(|c| (c.0, c.1, c.2)).collect();
        assert_eq!(colors.len(), COLORS.len());
    }

    #[test]
    fn log_axes_have_ticks_inside_a_decade() {
        assert_eq!(log_ticks(1.007..22.5), vec![2.0, 3.0, 5.0, 10.0, 20.0]);
        assert_eq!(log_ticks(0.7..3.0), vec![1.0, 2.0, 3.0]);
        let ticks = log_ticks(0.004..0.2);
        assert_eq!(ticks.len(), 7, "{ticks:?}");
        assert!((ticks[0] - 0.005).abs() < 1e-12 && (ticks[6] - 0.2).abs() < 1e-12);
    }

    #[test]
    fn legends_keep_the_grid_order() {
        let groups = grouped(
            [("b16", 1), ("b8", 2), ("b4", 3), ("b16", 4)].map(|(n, v)| (n.to_string(), v)),
        );
        let names: Vec<&str> = groups.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b16", "b8", "b4"]);
        assert_eq!(groups[0].1, [1, 4]);
    }

    #[test]
    fn formats_parse() {
        assert_eq!("PNG".parse::<PlotFormat>().unwrap(), PlotFormat::Png);
        assert_eq!("svg".parse::<PlotFormat>().unwrap(), PlotFormat::Svg);
        assert!("gif".parse::<PlotFormat>().is_err());
    }

    #[test]
    fn series_names_tell_cache_modes_and_block_lengths_apart() {
        let summaries: Vec<Summary> = crate::Grid {
            cache_mode: vec!["exact".into(), "dual".into()],
            block_length: vec![None, Some(4)],
            threshold: vec![0.0, 0.9],
            ..crate::Grid::default()
        }
        .configs(16)
        .unwrap()
        .iter()
        .map(|c| Summary::from_records(c, &[], 1.0, None))
        .collect();
        let name = namer(&summaries, &[Field::Threshold, Field::Load]);
        let names: BTreeSet<String> = summaries.iter().map(&name).collect();
        let expected: BTreeSet<String> = [
            "cache exact, block 16",
            "cache exact, block 4",
            "cache dual, block 16",
            "cache dual, block 4",
        ]
        .map(String::from)
        .into();
        assert_eq!(names, expected);
    }
}
