//! The sweep's plot: tokens/s against batch size on log axes, measured and at the roofline,
//! one pair of lines per context length, as SVG.

use std::path::Path;

use anyhow::{anyhow, ensure, Result};
use plotters::prelude::*;

use crate::roofline::Point;

pub fn roofline_svg(path: &Path, title: &str, points: &[Point]) -> Result<()> {
    ensure!(
        path.extension().and_then(|e| e.to_str()) == Some("svg"),
        "--plot writes SVG: give a path ending in .svg, not {}",
        path.display()
    );
    ensure!(!points.is_empty(), "nothing to plot");
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let max_batch = points.iter().map(|p| p.batch).max().unwrap_or(1) as f64;
    let ys = points
        .iter()
        .flat_map(|p| [p.tokens_per_s, p.roofline_tokens_per_s()]);
    let (low, high) = ys.fold((f64::MAX, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));

    let root = SVGBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (1.0..max_batch * 1.5).log_scale(),
            (low / 1.5..high * 1.5).log_scale(),
        )
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("batch size (sequences)")
        .y_desc("tokens / s")
        .draw()
        .map_err(|e| err(&e))?;

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
            .draw_series(LineSeries::new(measured.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("measured, context {context}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(measured.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(DashedLineSeries::new(roof, 6, 4, color.stroke_width(1)))
            .map_err(|e| err(&e))?
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
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
