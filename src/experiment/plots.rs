//! PNG figures of an experiment, drawn with `plotters` on its bitmap backend. The font is
//! compiled in (DejaVu Sans, `assets/fonts`), so plotting needs no system font libraries.

use crate::{Error, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// One point of a series: `x`, `y`, and `y`'s interval (`lo == hi` draws no error bar).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Point {
    pub fn exact(x: f64, y: f64) -> Self {
        Self { x, y, lo: y, hi: y }
    }
}

/// A named line (or set of markers) in a figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

const SIZE: (u32, u32) = (800, 560);
const FONT: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| {
        ok = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../../assets/fonts/DejaVuSans.ttf"),
        )
        .is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid("the built-in plot font did not load".into()))
    }
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("plot {}: {e}", path.display()))
}

/// `[min, max]` of `values` widened by a margin (a flat or empty range gets a unit width).
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { 0.06 * (hi - lo) } else { 0.5 };
    (lo - pad, hi + pad)
}

/// Writes the PNG atomically: drawn into a temporary name, then renamed.
fn finish(path: &Path, tmp: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))
}

fn tmp_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("png.tmp.png")
}

/// The chart of a figure: caption, labelled axes spanning `x` and `y`, and the mesh.
type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn axes<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    x: (f64, f64),
    y: (f64, f64),
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(|e| err(path, e))?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).label_style((FONT, 14)).draw().map_err(|e| err(path, e))?;
    Ok(chart)
}

/// A line chart: one line with markers per series, vertical error bars where a point has an
/// interval; `connect = false` draws markers only.
pub fn lines(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series], connect: bool) -> Result<()> {
    register_font()?;
    let tmp = tmp_path(path);
    {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(path, e))?;
        let pts = || series.iter().flat_map(|s| s.points.iter());
        let (x0, x1) = range(pts().map(|p| p.x));
        let (y0, y1) = range(pts().flat_map(|p| [p.lo, p.hi, p.y]));
        let mut chart = axes(&root, path, title, (x_desc, y_desc), (x0, x1), (y0, y1))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let xy: Vec<(f64, f64)> = s.points.iter().map(|p| (p.x, p.y)).collect();
            let style = ShapeStyle::from(&color).stroke_width(2);
            if connect {
                chart.draw_series(LineSeries::new(xy.clone(), style)).map_err(|e| err(path, e))?;
            }
            chart
                .draw_series(xy.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled())))
                .map_err(|e| err(path, e))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart
                .draw_series(
                    s.points
                        .iter()
                        .filter(|p| p.hi > p.lo)
                        .map(|p| ErrorBar::new_vertical(p.x, p.lo, p.y, p.hi, ShapeStyle::from(&color), 8)),
                )
                .map_err(|e| err(path, e))?;
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(path, e))?;
        root.present().map_err(|e| err(path, e))?;
    }
    finish(path, &tmp)
}

/// A bar chart of `(label, value, lo, hi)` with error bars and a dashed line at `reference`.
pub fn bars(path: &Path, title: &str, y_desc: &str, items: &[(String, f64, f64, f64)], reference: f64) -> Result<()> {
    register_font()?;
    let tmp = tmp_path(path);
    {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(path, e))?;
        let (y0, y1) = range(items.iter().flat_map(|&(_, v, lo, hi)| [v, lo, hi, reference]));
        let n = items.len().max(1);
        let labels: Vec<String> = items.iter().map(|(l, ..)| l.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, y0.min(0.0)..y1)
            .map_err(|e| err(path, e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(y_desc)
            .label_style((FONT, 14))
            .draw()
            .map_err(|e| err(path, e))?;
        for (i, &(_, v, lo, hi)) in items.iter().enumerate() {
            let x = i as f64;
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(std::iter::once(Rectangle::new([(x - 0.3, 0.0), (x + 0.3, v)], color.mix(0.7).filled())))
                .map_err(|e| err(path, e))?;
            chart
                .draw_series(std::iter::once(ErrorBar::new_vertical(x, lo, v, hi, BLACK.stroke_width(2), 12)))
                .map_err(|e| err(path, e))?;
        }
        chart
            .draw_series(DashedLineSeries::new(
                vec![(-0.5, reference), (n as f64 - 0.5, reference)],
                6,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(|e| err(path, e))?;
        root.present().map_err(|e| err(path, e))?;
    }
    finish(path, &tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixels of the colour `rgb` in the PNG at `path`.
    fn count(path: &Path, rgb: [u8; 3]) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), SIZE);
        img.pixels().filter(|p| p.0 == rgb).count()
    }

    fn dark(path: &Path) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count()
    }

    #[test]
    fn figures_draw_their_series_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let s = vec![
            Series {
                name: "sft".into(),
                points: vec![Point { x: 0.25, y: 0.1, lo: 0.0, hi: 0.2 }, Point::exact(1.0, 0.4)],
            },
            Series { name: "meet".into(), points: vec![Point::exact(0.25, -0.1), Point::exact(1.0, 0.6)] },
        ];
        let a = dir.path().join("lines.png");
        lines(&a, "score vs temperature", "temperature", "score", &s, true).unwrap();
        let first = Palette99::pick(0).to_rgba();
        let c0 = [first.0, first.1, first.2];
        // The first series' line and markers are drawn in its colour; a frame without series
        // has none of it, and less text (no legend).
        let frame = dir.path().join("frame.png");
        lines(&frame, "score vs temperature", "temperature", "score", &[], true).unwrap();
        assert!(count(&a, c0) > 500, "{}", count(&a, c0));
        assert_eq!(count(&frame, c0), 0);
        assert!(dark(&frame) > 1000, "captions and tick labels are drawn");
        let b = dir.path().join("bars.png");
        bars(&b, "win rate", "win rate", &[("sft".into(), 0.6, 0.5, 0.7), ("dpo".into(), 0.4, 0.3, 0.5)], 0.5).unwrap();
        assert!(dark(&b) > 1000);
        assert!(!dir.path().join("lines.png.tmp.png").exists());
    }
}

/// A point with intervals on both axes and a label drawn beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct XyPoint {
    pub x: crate::eval::stats::Estimate,
    pub y: crate::eval::stats::Estimate,
    pub label: String,
}

/// A named set of [`XyPoint`]s.
#[derive(Debug, Clone, PartialEq)]
pub struct XySeries {
    pub name: String,
    pub points: Vec<XyPoint>,
}

/// A scatter of points with horizontal and vertical error bars and labels; `connect` joins each
/// series' points in order (a front).
pub fn xy_errors(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[XySeries],
    connect: bool,
) -> Result<()> {
    register_font()?;
    let tmp = tmp_path(path);
    {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(path, e))?;
        let pts = || series.iter().flat_map(|s| s.points.iter());
        let (x0, x1) = range(pts().flat_map(|p| [p.x.lo, p.x.hi, p.x.value]));
        let (y0, y1) = range(pts().flat_map(|p| [p.y.lo, p.y.hi, p.y.value]));
        let mut chart = axes(&root, path, title, (x_desc, y_desc), (x0, x1), (y0, y1))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let style = ShapeStyle::from(&color).stroke_width(2);
            let xy: Vec<(f64, f64)> = s.points.iter().map(|p| (p.x.value, p.y.value)).collect();
            if connect {
                chart.draw_series(LineSeries::new(xy.clone(), style)).map_err(|e| err(path, e))?;
            }
            chart
                .draw_series(xy.iter().map(|&(x, y)| Circle::new((x, y), 5, color.filled())))
                .map_err(|e| err(path, e))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            let thin = ShapeStyle::from(&color);
            chart
                .draw_series(
                    s.points.iter().map(|p| ErrorBar::new_vertical(p.x.value, p.y.lo, p.y.value, p.y.hi, thin, 8)),
                )
                .map_err(|e| err(path, e))?;
            chart
                .draw_series(
                    s.points.iter().map(|p| ErrorBar::new_horizontal(p.y.value, p.x.lo, p.x.value, p.x.hi, thin, 8)),
                )
                .map_err(|e| err(path, e))?;
            chart
                .draw_series(s.points.iter().map(|p| {
                    Text::new(format!(" {}", p.label), (p.x.value, p.y.value), (FONT, 13).into_font().color(&BLACK))
                }))
                .map_err(|e| err(path, e))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .label_font((FONT, 14))
            .draw()
            .map_err(|e| err(path, e))?;
        root.present().map_err(|e| err(path, e))?;
    }
    finish(path, &tmp)
}
