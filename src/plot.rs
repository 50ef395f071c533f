//! The sweep's plot: tokens/s against batch size on log axes, measured and at the roofline,
//! one pair of lines per context length, as SVG or PNG (chosen by the path's extension).

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::roofline::Point;

const SIZE: (u32, u32) = (960, 640);

/// The plot's file format, from the path's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotFormat {
    Svg,
    Png,
}

impl PlotFormat {
    pub fn of(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("svg") => Ok(Self::Svg),
            Some(e) if e.eq_ignore_ascii_case("png") => Ok(Self::Png),
            _ => bail!(
                "--plot writes SVG or PNG: give a path ending in .svg or .png, not {}",
                path.display()
            ),
        }
    }
}

/// Draws the roofline plot of `points` into `path` (.svg or .png).
pub fn roofline_plot(path: &Path, title: &str, points: &[Point]) -> Result<()> {
    let format = PlotFormat::of(path)?;
    ensure!(!points.is_empty(), "nothing to plot");
    register_font()?;
    let failed = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    match format {
        PlotFormat::Svg => draw(
            SVGBackend::new(path, SIZE).into_drawing_area(),
            title,
            points,
        )
        .map_err(|e| failed(&e)),
        PlotFormat::Png => draw(
            BitMapBackend::new(path, SIZE).into_drawing_area(),
            title,
            points,
        )
        .map_err(|e| failed(&e)),
    }
}

/// plotters measures (SVG) and draws (PNG) text with a registered font: DejaVu Sans, built in.
/// Registering again replaces the entry with the same font.
fn register_font() -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the built-in DejaVu Sans font did not load"))
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    points: &[Point],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let max_batch = points.iter().map(|p| p.batch).max().unwrap_or(1) as f64;
    let ys = points
        .iter()
        .flat_map(|p| [p.tokens_per_s, p.roofline_tokens_per_s()]);
    let (low, high) = ys.fold((f64::MAX, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));

    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (1.0..max_batch * 1.5).log_scale().base(2.0), // batches are powers of two
            (low / 1.5..high * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("batch size (sequences)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("tokens / s")
        .draw()?;

    let mut contexts: Vec<usize> = points.iter().map(|p| p.context).collect();
    contexts.sort_unstable();
    contexts.dedup();
    for (i, &context) in contexts.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut series: Vec<&Point> = points.iter().filter(|p| p.context == context).collect();
        series.sort_by_key(|p| p.batch);
        let measured: Vec<(f64, f64)> = series
            .iter()
            .map(|p| (p.batch as f64, p.tokens_per_s))
            .collect();
        let roof: Vec<(f64, f64)> = series
            .iter()
            .map(|p| (p.batch as f64, p.roofline_tokens_per_s()))
            .collect();
        chart
            .draw_series(LineSeries::new(measured.clone(), color.stroke_width(2)))?
            .label(format!("measured, context {context}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(measured.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        chart
            .draw_series(DashedLineSeries::new(roof, 6, 4, color.stroke_width(1)))?
            .label(format!("roofline, context {context}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()
}
