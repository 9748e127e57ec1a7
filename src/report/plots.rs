//! The training curves and the confusion matrix as PNG (plotters on an
//! in-memory bitmap, with an embedded DejaVu Sans, so they render on a
//! headless server with no fonts installed).

use crate::error::{Error, IoContext, Result};
use crate::report::history::EpochRecord;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn font() {
    REGISTER.call_once(|| {
        // The bytes are a valid TTF shipped in the crate; failure would be a
        // build defect, and plots then simply lack text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Renders `draw` on a w x h RGB canvas and writes it as PNG (atomically).
fn png(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    font();
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(root)?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| Error::invalid(path, "canvas size"))?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::invalid(path, format!("PNG encoding: {e}")))?;
    crate::atomic_write(path, |f| std::io::Write::write_all(f, &bytes)).at("cannot write", path)
}

fn err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Plot(format!("{e:?}"))
}

/// Loss and accuracy per epoch, train vs validation, both stages on one
/// epoch axis, with the start of fine-tuning marked.
pub fn plot_history(history: &[EpochRecord], path: &Path) -> Result<()> {
    let n = history.len();
    let xs: Vec<f64> = (1..=n).map(|i| i as f64).collect();
    let boundary = history.iter().position(|r| r.stage == 2).map(|i| i as f64 + 0.5);
    png(path, (1400, 560), |root| {
        root.fill(&WHITE).map_err(err)?;
        let (title, body) = root.split_vertically(50);
        title
            .draw(&Text::new(
                "vgg16-cpu: training history (stage 1: head only, stage 2: block5 + head)",
                (20, 15),
                ("sans-serif", 24).into_font(),
            ))
            .map_err(err)?;
        let (left, right) = body.split_horizontally(700);
        type Get = fn(&EpochRecord) -> f64;
        let panels: [(&str, Get, Get, bool); 2] = [
            ("loss", |r| r.train_loss, |r| r.val_loss, true),
            ("accuracy", |r| r.train_accuracy, |r| r.val_accuracy, false),
        ];
        for (area, (name, tr, va, log)) in [left, right].into_iter().zip(panels) {
            let vals: Vec<f64> = history
                .iter()
                .flat_map(|r| [tr(r), va(r)])
                .filter(|v| v.is_finite())
                .collect();
            let (mut lo, mut hi) = vals
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            if !lo.is_finite() {
                (lo, hi) = (0.0, 1.0);
            }
            let xr = 0.5..(n as f64 + 0.5);
            let series = |get: Get| -> Vec<(f64, f64)> {
                xs.iter()
                    .zip(history)
                    .map(|(&x, r)| (x, get(r)))
                    .filter(|p| p.1.is_finite())
                    .collect()
            };
            let mut b = ChartBuilder::on(&area);
            b.margin(20)
                .x_label_area_size(45)
                .y_label_area_size(70)
                .caption(name, ("sans-serif", 22));
            macro_rules! draw_panel {
                ($chart:expr, $lo:expr, $hi:expr) => {{
                    let mut chart = $chart;
                    chart
                        .configure_mesh()
                        .x_desc("epoch (across both stages)")
                        .y_desc(name)
                        .x_labels(n.min(20))
                        .x_label_formatter(&|v| format!("{:.0}", v))
                        .label_style(("sans-serif", 15))
                        .axis_desc_style(("sans-serif", 17))
                        .draw()
                        .map_err(err)?;
                    for (get, color, label) in [(tr, BLUE, "train"), (va, RED, "validation")] {
                        let pts = series(get);
                        chart
                            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))
                            .map_err(err)?
                            .label(label)
                            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 25, y)], color.stroke_width(3)));
                        chart
                            .draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
                            .map_err(err)?;
                    }
                    if let Some(bx) = boundary {
                        chart
                            .draw_series(std::iter::once(PathElement::new(
                                vec![(bx, $lo), (bx, $hi)],
                                BLACK.mix(0.6).stroke_width(2),
                            )))
                            .map_err(err)?
                            .label("fine-tuning (stage 2) starts")
                            .legend(|(x, y)| {
                                PathElement::new(vec![(x, y), (x + 25, y)], BLACK.mix(0.6).stroke_width(2))
                            });
                    }
                    chart
                        .configure_series_labels()
                        .position(if log {
                            SeriesLabelPosition::LowerLeft
                        } else {
                            SeriesLabelPosition::LowerRight
                        })
                        .label_font(("sans-serif", 15))
                        .background_style(WHITE.mix(0.85))
                        .border_style(BLACK)
                        .draw()
                        .map_err(err)?;
                }};
            }
            if log && lo > 0.0 && hi / lo > 8.0 {
                let (l, h) = (lo / 1.3, hi * 1.3);
                draw_panel!(b.build_cartesian_2d(xr, (l..h).log_scale()).map_err(err)?, l, h);
            } else {
                let pad = ((hi - lo) * 0.1).max(1e-3);
                // Losses are unbounded above; accuracies stop at 1.
                let (l, h) = ((lo - pad).max(0.0), if log { hi + pad } else { (hi + pad).min(1.0) });
                draw_panel!(b.build_cartesian_2d(xr, l..h).map_err(err)?, l, h);
            }
        }
        Ok(())
    })
}

/// The confusion matrix as a heat map (colour = fraction of the true class)
/// with the counts written in the cells.
pub fn plot_confusion(cm: &[Vec<usize>], names: &[String], title: &str, path: &Path) -> Result<()> {
    let k = names.len();
    if k >= crate::report::metrics::MANY_CLASSES {
        return plot_confusion_many(cm, names, title, path);
    }
    png(path, (1000, 900), |root| {
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(110)
            .y_label_area_size(120)
            .build_cartesian_2d(-0.5f64..(k as f64 - 0.5), (k as f64 - 0.5)..-0.5f64)
            .map_err(err)?;
        let name_at = |v: &f64| class_at(names, *v);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(k)
            .y_labels(k)
            .x_label_formatter(&name_at)
            .y_label_formatter(&name_at)
            .x_desc("predicted class")
            .y_desc("true class")
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .draw()
            .map_err(err)?;
        for (r, row) in cm.iter().enumerate() {
            let total: usize = row.iter().sum();
            for (c, &v) in row.iter().enumerate() {
                let f = if total > 0 { v as f64 / total as f64 } else { 0.0 };
                let color = RGBColor(
                    (255.0 - 225.0 * f) as u8,
                    (255.0 - 160.0 * f) as u8,
                    (255.0 - 60.0 * f) as u8,
                );
                let (x, y) = (c as f64, r as f64);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                        color.filled(),
                    )))
                    .map_err(err)?;
                let text_color = if f > 0.5 { WHITE } else { BLACK };
                let style =
                    ("sans-serif", 17)
                        .into_font()
                        .color(&text_color)
                        .pos(plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Center,
                            plotters::style::text_anchor::VPos::Center,
                        ));
                chart
                    .draw_series(std::iter::once(Text::new(v.to_string(), (x, y), style)))
                    .map_err(err)?;
            }
        }
        Ok(())
    })
}

/// The colour of a row-normalised fraction f in [0, 1] (white to blue).
fn heat(f: f64) -> RGBColor {
    let f = f.clamp(0.0, 1.0);
    RGBColor(
        (255.0 - 225.0 * f) as u8,
        (255.0 - 160.0 * f) as u8,
        (255.0 - 60.0 * f) as u8,
    )
}

/// The confusion matrix of many classes (20 or more): cells coloured by
/// the fraction of the true class's images, no per-cell numbers, every
/// class named on both axes in a font sized to fit, and a colour bar.
fn plot_confusion_many(cm: &[Vec<usize>], names: &[String], title: &str, path: &Path) -> Result<()> {
    let k = names.len();
    let side = 1400u32;
    png(path, (side + 160, side), |root| {
        root.fill(&WHITE).map_err(err)?;
        let (main, bar) = root.split_horizontally(side);
        let label_px = ((1000.0 / k as f64) as u32).clamp(6, 16);
        let longest = names.iter().map(|n| n.chars().count()).max().unwrap_or(4) as u32;
        let area = (longest * label_px * 6 / 10 + 30).min(260);
        let mut chart = ChartBuilder::on(&main)
            .caption(title, ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(area)
            .y_label_area_size(area)
            .build_cartesian_2d(-0.5f64..(k as f64 - 0.5), (k as f64 - 0.5)..-0.5f64)
            .map_err(err)?;
        let name_at = |v: &f64| class_at(names, *v);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(k)
            .y_labels(k)
            .x_label_formatter(&name_at)
            .y_label_formatter(&name_at)
            .x_label_style(
                ("sans-serif", label_px)
                    .into_font()
                    .transform(plotters::style::FontTransform::Rotate90),
            )
            .y_label_style(("sans-serif", label_px))
            .x_desc("predicted class")
            .y_desc("true class")
            .axis_desc_style(("sans-serif", 18))
            .draw()
            .map_err(err)?;
        let cells = cm.iter().enumerate().flat_map(|(r, row)| {
            let total: usize = row.iter().sum();
            row.iter().enumerate().map(move |(c, &v)| {
                let f = if total > 0 { v as f64 / total as f64 } else { 0.0 };
                let (x, y) = (c as f64, r as f64);
                Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], heat(f).filled())
            })
        });
        chart.draw_series(cells).map_err(err)?;
        // Colour bar: fraction of the true class's images, 0 at the bottom.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(80)
            .margin_bottom(80)
            .margin_right(60)
            .y_label_area_size(0)
            .right_y_label_area_size(50)
            .build_cartesian_2d(0.0f64..1.0, 0.0f64..1.0)
            .map_err(err)?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&|v| format!("{:.0}%", 100.0 * v))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        let steps = 100;
        cb.draw_series((0..steps).map(|i| {
            let (a, b) = (i as f64 / steps as f64, (i + 1) as f64 / steps as f64);
            Rectangle::new([(0.0, a), (1.0, b)], heat((a + b) / 2.0).filled())
        }))
        .map_err(err)?;
        Ok(())
    })
}

/// The class name at an integer axis position (ticks elsewhere are blank).
fn class_at(names: &[String], v: f64) -> String {
    let i = v.round();
    if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
        names[i as usize].clone()
    } else {
        String::new()
    }
}
