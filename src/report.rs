//! Pictures of a search: per-layer bit allocation (SVG, plotters) and teacher-vs-student
//! attribution heatmaps (PNG, image).

use crate::data::Normalize;
use crate::policy::Policy;
use plotters::prelude::*;
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {reason}")]
    Write { path: String, reason: String },
}

fn werr(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Grouped bars of weight and activation bits per quantized layer.
pub fn bit_allocation_svg(policies: &[(&str, &Policy)], path: &Path) -> Result<(), ReportError> {
    let Some((_, first)) = policies.first() else {
        return Ok(());
    };
    let layers = first.layers.len().max(1);
    let width = (160 + layers * 36 * policies.len().max(1)).max(640) as u32;
    let max_bits = policies
        .iter()
        .flat_map(|(_, p)| p.layers.iter().map(|l| l.w_bits.max(l.a_bits)))
        .max()
        .unwrap_or(8);
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| werr(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("bits per layer", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(130)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..layers as f64, 0.0..(max_bits + 3) as f64)
        .map_err(|e| werr(path, e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels((max_bits + 4) as usize)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE)
        .y_desc("bits")
        .draw()
        .map_err(|e| werr(path, e))?;
    let groups = policies.len() * 2;
    let bar = 0.8 / groups as f64;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (pi, (label, p)) in policies.iter().enumerate() {
        for (kind, k) in [("weights", 0usize), ("activations", 1)] {
            let slot = pi * 2 + k;
            let colour = colours[(pi * 2) % colours.len()].mix(if k == 0 { 0.9 } else { 0.45 });
            chart
                .draw_series(p.layers.iter().enumerate().map(|(i, l)| {
                    let b = if k == 0 { l.w_bits } else { l.a_bits } as f64;
                    let x0 = i as f64 + 0.1 + slot as f64 * bar;
                    Rectangle::new([(x0, 0.0), (x0 + bar, b)], colour.filled())
                }))
                .map_err(|e| werr(path, e))?
                .label(format!("{label} {kind}"))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| werr(path, e))?;
    // One rotated name under every layer's bar group.
    let style = ("sans-serif", 11)
        .into_font()
        .transform(FontTransform::Rotate90)
        .color(&BLACK);
    for (i, l) in first.layers.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(l.name.clone(), (x - 6, y + 6), style.clone()))
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

/// Writes a grid: one row per image, columns = the input, then each map set (e.g. teacher,
/// student), each map scaled to the image size and to [0, 1] per map.
pub fn heatmaps_png(
    images: &Tensor,
    normalize: &Normalize,
    maps: &[&Tensor],
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
    let mut out = image::RgbImage::new(cols * cw, n as u32 * ch);
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
                out.put_pixel(x, i as u32 * ch + y, image::Rgb(rgb));
            }
        }
        for (k, m) in resized.iter().enumerate() {
            let v: Vec<f32> = Vec::try_from(&m.get(i).flatten(0, -1)).map_err(|e| werr(path, e))?;
            for y in 0..ch {
                for x in 0..cw {
                    let c = colour(v[(y * cw + x) as usize] as f64);
                    out.put_pixel((k as u32 + 1) * cw + x, i as u32 * ch + y, image::Rgb(c));
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
    crate::checkpoint::write_atomic(path, &bytes).map_err(|e| werr(path, e))
}
