//! Charts (SVG, plotters) and attribution heatmaps (PNG, image).

use crate::data::Normalize;
use crate::policy::Policy;
use plotters::prelude::*;
use std::path::Path;
use tch::{Kind, Tensor};

use super::{werr, ReportError};

/// One set of bars in [`grouped_bars_svg`]: a value per layer.
pub struct Bars {
    pub label: String,
    pub values: Vec<f64>,
    /// Red, green, blue and opacity.
    pub colour: (u8, u8, u8, f64),
}

fn rgba(c: RGBColor, alpha: f64) -> (u8, u8, u8, f64) {
    (c.0, c.1, c.2, alpha)
}

/// Grouped bars of weight and activation bits per quantized layer.
pub fn bit_allocation_svg(policies: &[(&str, &Policy)], path: &Path) -> Result<(), ReportError> {
    let Some((_, first)) = policies.first() else {
        return Ok(());
    };
    let names: Vec<String> = first.layers.iter().map(|l| l.name.clone()).collect();
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let mut bars = Vec::new();
    for (pi, (label, p)) in policies.iter().enumerate() {
        let colour = colours[(pi * 2) % colours.len()];
        bars.push(Bars {
            label: format!("{label} weights"),
            values: p.layers.iter().map(|l| l.w_bits as f64).collect(),
            colour: rgba(colour, 0.9),
        });
        bars.push(Bars {
            label: format!("{label} activations"),
            values: p.layers.iter().map(|l| l.a_bits as f64).collect(),
            colour: rgba(colour, 0.45),
        });
    }
    grouped_bars_svg("bits per layer", "bits", &names, &bars, path)
}

/// One group of bars per layer (one bar per [`Bars`]), layer names rotated underneath.
pub fn grouped_bars_svg(
    caption: &str,
    y_desc: &str,
    layers: &[String],
    bars: &[Bars],
    path: &Path,
) -> Result<(), ReportError> {
    let n_layers = layers.len().max(1);
    let width = (160 + n_layers * 18 * bars.len().max(1)).max(640) as u32;
    let max = bars
        .iter()
        .flat_map(|b| b.values.iter().copied())
        .fold(0.0f64, f64::max)
        .ceil()
        .max(1.0);
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| werr(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(130)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..n_layers as f64, 0.0..max + 3.0)
        .map_err(|e| werr(path, e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(max as usize + 4)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| werr(path, e))?;
    let width = 0.8 / bars.len().max(1) as f64;
    for (slot, b) in bars.iter().enumerate() {
        let (r, g, bl, alpha) = b.colour;
        let colour = RGBColor(r, g, bl).mix(alpha);
        chart
            .draw_series(b.values.iter().enumerate().map(|(i, &v)| {
                let x0 = i as f64 + 0.1 + slot as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, v)], colour.filled())
            }))
            .map_err(|e| werr(path, e))?
            .label(b.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| werr(path, e))?;
    let style = ("sans-serif", 11)
        .into_font()
        .transform(FontTransform::Rotate90)
        .color(&BLACK);
    for (i, name) in layers.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(name.clone(), (x - 6, y + 6), style.clone()))
            .map_err(|e| werr(path, e))?;
    }
    root.present().map_err(|e| werr(path, e))
}

/// A perceptual-ish blue→red ramp for maps in [0, 1] (plotters' ViridisRGB).
fn colour(v: f64) -> [u8; 3] {
    use plotters::style::colors::colormaps::{ColorMap, ViridisRGB};
    let c: RGBColor = ViridisRGB.get_color(v.clamp(0.0, 1.0));
    [c.0, c.1, c.2]
}

/// Height of the label row above a heatmap grid.
const LABEL_ROW: u32 = 12;

/// Draws `text` in 8×8 glyphs (white on the grid's dark label row) at `(x, y)`, cut at
/// `max_width` pixels; characters without a glyph are left blank.
fn draw_label(out: &mut image::RgbImage, text: &str, x: u32, y: u32, max_width: u32) {
    use font8x8::UnicodeFonts;
    for (i, ch) in text.chars().take((max_width / 8) as usize).enumerate() {
        let Some(glyph) = font8x8::BASIC_FONTS.get(ch) else {
            continue;
        };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits & (1 << col) != 0 {
                    let (px, py) = (x + i as u32 * 8 + col, y + row as u32);
                    if px < out.width() && py < out.height() {
                        out.put_pixel(px, py, image::Rgb([255, 255, 255]));
                    }
                }
            }
        }
    }
}

/// Writes a grid: a row of column labels (`labels`: the input's, then each map set's), then
/// one row per image, columns = the input, then each map set (e.g. teacher, student), each
/// map scaled to the image size and to [0, 1] per map.
pub fn heatmaps_png(
    images: &Tensor,
    normalize: &Normalize,
    maps: &[&Tensor],
    labels: &[String],
    path: &Path,
) -> Result<(), ReportError> {
    let images = images
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float);
    let (n, c, h, w) = images.size4().map_err(|e| werr(path, e))?;
    let scale = (96 / h.max(1)).max(1);
    let (ch, cw) = ((h * scale) as u32, (w * scale) as u32);
    let cols = 1 + maps.len() as u32;
    let mut out = image::RgbImage::new(cols * cw, LABEL_ROW + n as u32 * ch);
    for (k, label) in labels.iter().take(cols as usize).enumerate() {
        draw_label(&mut out, label, k as u32 * cw + 2, 2, cw.saturating_sub(4));
    }
    let mean = Tensor::from_slice(&normalize.mean).view([1, c, 1, 1]);
    let std = Tensor::from_slice(&normalize.std).view([1, c, 1, 1]);
    let pixels = ((&images * std + mean) * 255.0).clamp(0.0, 255.0);
    let pixels = pixels
        .upsample_nearest2d([h * scale, w * scale], None, None)
        .to_kind(Kind::Uint8);
    let resized: Vec<Tensor> = maps
        .iter()
        .map(|m| {
            let m = m
                .detach()
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .unsqueeze(1);
            let m = m
                .upsample_bilinear2d([h * scale, w * scale], false, None, None)
                .squeeze_dim(1);
            let lo = m.amin([1i64, 2].as_slice(), true);
            let hi = m.amax([1i64, 2].as_slice(), true);
            (m - &lo) / (hi - lo).clamp_min(1e-12)
        })
        .collect();
    for i in 0..n {
        let px: Vec<u8> =
            Vec::try_from(&pixels.get(i).flatten(0, -1)).map_err(|e| werr(path, e))?;
        let plane = (ch * cw) as usize;
        for y in 0..ch {
            for x in 0..cw {
                let o = (y * cw + x) as usize;
                let rgb = if c == 1 {
                    [px[o]; 3]
                } else {
                    [px[o], px[plane + o], px[2 * plane + o]]
                };
                out.put_pixel(x, LABEL_ROW + i as u32 * ch + y, image::Rgb(rgb));
            }
        }
        for (k, m) in resized.iter().enumerate() {
            let v: Vec<f32> = Vec::try_from(&m.get(i).flatten(0, -1)).map_err(|e| werr(path, e))?;
            for y in 0..ch {
                for x in 0..cw {
                    let c = colour(v[(y * cw + x) as usize] as f64);
                    out.put_pixel(
                        (k as u32 + 1) * cw + x,
                        LABEL_ROW + i as u32 * ch + y,
                        image::Rgb(c),
                    );
                }
            }
        }
    }
    let mut bytes = Vec::new();
    out.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| werr(path, e))?;
    crate::files::write_atomic(path, &bytes).map_err(|e| werr(path, e))
}

/// A named series of (x, y) points, e.g. test top-1 per epoch.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const PALETTE: [RGBColor; 6] = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];

/// Pads a data range so points do not sit on the frame.
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = (hi - lo).abs().max(1e-9);
    (lo - 0.05 * span)..(hi + 0.05 * span)
}

/// Pads a value range with headroom on top, where the legend goes, so it hides no point.
fn with_headroom(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = (hi - lo).abs().max(1e-9);
    (lo - 0.05 * span)..(hi + 0.45 * span)
}

/// One line (with markers) per series.
pub fn line_chart_svg(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    path: &Path,
) -> Result<(), ReportError> {
    let pts = || series.iter().flat_map(|s| s.points.iter().copied());
    let (x_lo, x_hi) = pts().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(x), b.max(x)));
    let (y_lo, y_hi) = pts().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(y), b.max(y)));
    if x_lo > x_hi {
        return Err(werr(path, "no points to draw"));
    }
    let root = SVGBackend::new(path, (640, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| werr(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(padded(x_lo, x_hi), with_headroom(y_lo, y_hi))
        .map_err(|e| werr(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| werr(path, e))?;
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(|e| werr(path, e))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
            .map_err(|e| werr(path, e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| werr(path, e))?;
    root.present().map_err(|e| werr(path, e))
}

/// One labelled point of an accuracy-vs-cost chart.
#[derive(Debug, Clone)]
pub struct CostPoint {
    pub label: String,
    /// Policy BOPs (quantized layers).
    pub bops: f64,
    pub top1: f64,
}

/// Top-1 against policy BOPs (in G) for every arm; the full-precision model's top-1 as a
/// dashed line (its BOPs would squash the quantized points into a corner).
pub fn accuracy_vs_bops_svg(
    points: &[CostPoint],
    fp_top1: Option<f64>,
    path: &Path,
) -> Result<(), ReportError> {
    if points.is_empty() {
        return Err(werr(path, "no points to draw"));
    }
    let xs = points.iter().map(|p| p.bops / 1e9);
    let (x_lo, x_hi) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let ys = points.iter().map(|p| p.top1).chain(fp_top1);
    let (y_lo, y_hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let x_range = if x_hi - x_lo < 1e-6 {
        (x_lo * 0.5)..(x_hi * 1.5)
    } else {
        padded(x_lo, x_hi)
    };
    let y_range = with_headroom(y_lo - 0.5, y_hi + 0.5);
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| werr(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("target top-1 vs policy BOPs", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x_range.clone(), y_range)
        .map_err(|e| werr(path, e))?;
    chart
        .configure_mesh()
        .x_desc("policy BOPs (G)")
        .y_desc("top-1 (%)")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| werr(path, e))?;
    if let Some(fp) = fp_top1 {
        let dashed = BLACK.mix(0.6).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(
                [(x_range.start, fp), (x_range.end, fp)],
                6,
                4,
                dashed,
            ))
            .map_err(|e| werr(path, e))?
            .label(format!("full precision {fp:.2}%"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], dashed));
    }
    // One colour per distinct label, so repeated seeds of an arm share it.
    let mut labels: Vec<&str> = Vec::new();
    for p in points {
        if !labels.contains(&p.label.as_str()) {
            labels.push(&p.label);
        }
    }
    for (i, label) in labels.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mine: Vec<&CostPoint> = points.iter().filter(|p| p.label == *label).collect();
        chart
            .draw_series(
                mine.iter()
                    .map(|p| Circle::new((p.bops / 1e9, p.top1), 5, colour.filled())),
            )
            .map_err(|e| werr(path, e))?
            .label(label.to_string())
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, colour.filled()));
        chart
            .draw_series(mine.iter().map(|p| {
                Text::new(
                    format!("{:.2}%", p.top1),
                    (p.bops / 1e9, p.top1),
                    ("sans-serif", 12).into_font().color(&colour),
                )
            }))
            .map_err(|e| werr(path, e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| werr(path, e))?;
    root.present().map_err(|e| werr(path, e))
}
