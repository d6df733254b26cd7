//! The report's plots, drawn by plotters into an RGB buffer and encoded as PNG. Text uses the
//! DejaVu Sans Mono font embedded in the binary (`assets/fonts/`), registered with plotters'
//! `ab_glyph` renderer, so nothing is read from the system.

use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::{Error, Result};

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

fn fonts() {
    REGISTER.call_once(|| {
        for family in ["sans-serif", "serif", "monospace"] {
            // The font is a fixed, valid TTF: registering cannot fail (a test draws text).
            let _ = register_font(family, FontStyle::Normal, FONT);
        }
    });
}

fn fail(what: &str, e: impl std::fmt::Display) -> Error {
    Error::State(format!("drawing the {what} plot: {e}"))
}

/// Draws with `f` on a `w x h` white canvas and returns the PNG bytes.
fn png(
    what: &str,
    w: u32,
    h: u32,
    f: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<Vec<u8>> {
    fonts();
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(what, e))?;
        f(root.clone())?;
        root.present().map_err(|e| fail(what, e))?;
    }
    let img = image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| fail(what, "buffer size"))?;
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).map_err(|e| fail(what, e))?;
    Ok(out)
}

/// A named series of points.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// `(x, y)` points.
    pub points: Vec<(f64, f64)>,
}

fn bounds(series: &[Series]) -> ((f64, f64), (f64, f64)) {
    let pts = || series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        return ((0.0, 1.0), (0.0, 1.0));
    }
    let pad = |a: f64, b: f64| {
        if b - a < 1e-12 { (a - 0.5_f64.max(a.abs() * 0.1), b + 0.5_f64.max(b.abs() * 0.1)) } else { (a, b) }
    };
    let (x0, x1) = pad(x0, x1);
    let (y0, y1) = pad(y0, y1);
    let m = (y1 - y0) * 0.05;
    ((x0, x1), (y0 - m, y1 + m))
}

const COLOURS: [RGBColor; 10] = [
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

/// A line chart of `series`; `fixed` gives the axes' ranges (else they fit the data).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    fixed: Option<((f64, f64), (f64, f64))>,
    log_y: bool,
) -> Result<Vec<u8>> {
    png(title, 640, 400, |root| {
        let ((x0, x1), (y0, y1)) = fixed.unwrap_or_else(|| bounds(series));
        let mut b = ChartBuilder::on(&root);
        b.caption(title, ("sans-serif", 20)).margin(12).x_label_area_size(40).y_label_area_size(64);
        let points = |s: &Series| s.points.clone();
        let style = |i: usize| ShapeStyle::from(&COLOURS[i % COLOURS.len()]).stroke_width(2);
        if log_y && y0 > 0.0 {
            let mut chart = b.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(|e| fail(title, e))?;
            chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|e| fail(title, e))?;
            for (i, s) in series.iter().enumerate() {
                chart
                    .draw_series(LineSeries::new(points(s), style(i)))
                    .map_err(|e| fail(title, e))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style(i)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| fail(title, e))?;
        } else {
            let mut chart = b.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| fail(title, e))?;
            chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|e| fail(title, e))?;
            for (i, s) in series.iter().enumerate() {
                chart
                    .draw_series(LineSeries::new(points(s), style(i)))
                    .map_err(|e| fail(title, e))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style(i)));
                if s.points.len() <= 60 {
                    chart
                        .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, COLOURS[i % COLOURS.len()].filled())))
                        .map_err(|e| fail(title, e))?;
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| fail(title, e))?;
        }
        Ok(())
    })
}

/// The confusion matrix as a heat map with the count in each cell (rows: true class).
pub fn confusion(counts: &[u64], names: &[String]) -> Result<Vec<u8>> {
    let k = names.len();
    let size = (120 + 44 * k as u32).clamp(360, 900);
    png("confusion matrix", size, size, |root| {
        let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption("confusion matrix (rows: true, columns: predicted)", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d((0..k).into_segmented(), (0..k).into_segmented())
            .map_err(|e| fail("confusion", e))?;
        // Segmented axes put each label at its cell's centre; row 0 (the first class) at the top.
        let x_name = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) if *i < k => names[*i].clone(),
            _ => String::new(),
        };
        let y_name = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) if *i < k => names[k - 1 - *i].clone(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(k + 1)
            .y_labels(k + 1)
            .x_label_formatter(&x_name)
            .y_label_formatter(&y_name)
            .x_desc("predicted")
            .y_desc("true")
            .draw()
            .map_err(|e| fail("confusion", e))?;
        for t in 0..k {
            for p in 0..k {
                let v = counts[t * k + p];
                let a = v as f64 / max;
                let colour = RGBColor((255.0 - 225.0 * a) as u8, (255.0 - 160.0 * a) as u8, (255.0 - 60.0 * a) as u8);
                let row = k - 1 - t;
                let cell = [
                    (SegmentValue::Exact(p), SegmentValue::Exact(row)),
                    (SegmentValue::Exact(p + 1), SegmentValue::Exact(row + 1)),
                ];
                chart
                    .draw_series(std::iter::once(Rectangle::new(cell, colour.filled())))
                    .map_err(|e| fail("confusion", e))?;
            }
        }
        // Counts at the cell centres: the centre of each cell's corners as the chart maps them
        // to pixels (the segmented axes have a dummy last segment, so cells are not 1/k wide).
        let cell_px = |p: usize, row: usize| {
            let a = chart.backend_coord(&(SegmentValue::Exact(p), SegmentValue::Exact(row)));
            let b = chart.backend_coord(&(SegmentValue::Exact(p + 1), SegmentValue::Exact(row + 1)));
            ((a.0 + b.0) / 2, (a.1 + b.1) / 2, (b.1 - a.1).abs())
        };
        for t in 0..k {
            for p in 0..k {
                let v = counts[t * k + p];
                let (cx, cy, ch) = cell_px(p, k - 1 - t);
                let font_px = (ch as f64 * 0.35).clamp(9.0, 18.0);
                let colour = if (v as f64 / max) > 0.55 { &WHITE } else { &BLACK };
                let style =
                    ("sans-serif", font_px).into_font().color(colour).pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Center,
                    ));
                root.draw(&Text::new(v.to_string(), (cx, cy), style)).map_err(|e| fail("confusion", e))?;
            }
        }
        Ok(())
    })
}

/// `series` of curves on the unit square (ROC, precision-recall), with the diagonal for ROC.
pub fn unit_curves(title: &str, x_label: &str, y_label: &str, series: &[Series], diagonal: bool) -> Result<Vec<u8>> {
    png(title, 640, 520, |root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..1.0, 0.0..1.02)
            .map_err(|e| fail(title, e))?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|e| fail(title, e))?;
        if diagonal {
            chart
                .draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], ShapeStyle::from(&RGBColor(170, 170, 170))))
                .map_err(|e| fail(title, e))?;
        }
        for (i, s) in series.iter().enumerate() {
            let style = ShapeStyle::from(&COLOURS[i % COLOURS.len()]).stroke_width(2);
            chart
                .draw_series(LineSeries::new(s.points.clone(), style))
                .map_err(|e| fail(title, e))?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| fail(title, e))?;
        Ok(())
    })
}
