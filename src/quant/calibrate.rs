//! Calibration of activation clips from data: `max(x)` capped at the clip init, or, for
//! fewer than 5 bits (the reference's rule), the KL-divergence threshold search over a
//! histogram that TensorRT introduced.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationMethod {
    /// `min(max x, 6)` for every layer.
    Max,
    /// KL search for `b < 5`, `min(max x, 6)` otherwise (the reference's rule).
    KlBelow5Bits,
}

/// KL(P‖Q) of two unnormalised histograms (P's zero bins contribute nothing).
fn kl(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if sp <= 0.0 || sq <= 0.0 {
        return f64::INFINITY;
    }
    let mut d = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        if a > 0.0 {
            if b <= 0.0 {
                return f64::INFINITY;
            }
            d += (a / sp) * ((a / sp) / (b / sq)).ln();
        }
    }
    d
}

/// The clip threshold minimising KL(P‖Q) between the histogram clipped at a candidate edge
/// (outliers folded into the last bin) and its `levels`-level quantization, over `[0, max]`
/// split into `histogram.len()` bins. Returns the threshold in the histogram's units.
pub fn kl_threshold(histogram: &[f64], max: f64, levels: usize) -> f64 {
    let bins = histogram.len();
    let width = max / bins as f64;
    if bins <= levels || histogram.iter().all(|&h| h == 0.0) {
        return max;
    }
    let mut best = (f64::INFINITY, bins);
    for i in levels..=bins {
        let mut p: Vec<f64> = histogram[..i].to_vec();
        p[i - 1] += histogram[i..].iter().sum::<f64>();
        // Merge the i reference bins into `levels` groups, then spread each group's mass
        // evenly over its non-empty bins.
        let mut q = vec![0.0; i];
        for g in 0..levels {
            let start = g * i / levels;
            let end = ((g + 1) * i / levels).max(start + 1);
            let mass: f64 = histogram[start..end].iter().sum();
            let nonzero = histogram[start..end].iter().filter(|&&h| h > 0.0).count();
            if nonzero > 0 {
                for k in start..end {
                    if histogram[k] > 0.0 {
                        q[k] = mass / nonzero as f64;
                    }
                }
            }
        }
        // The last group also carries the folded outliers in P; give Q the same total.
        let d = kl(&p, &q);
        if d < best.0 {
            best = (d, i);
        }
    }
    (best.1 as f64 + 0.5).min(bins as f64) * width
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_data_keeps_its_range_and_outliers_are_clipped() {
        // Uniform mass on [0, 1] of a [0, 1] histogram: no reason to clip.
        let h = vec![1.0; 256];
        let t = kl_threshold(&h, 1.0, 16);
        assert!(t > 0.9, "{t}");
        // A bulk on [0, 0.25) and a few far outliers: the threshold lands near the bulk.
        let mut h = vec![0.0; 512];
        for (i, v) in h.iter_mut().enumerate().take(128) {
            *v = 1000.0 - i as f64;
        }
        h[511] = 1.0;
        let t = kl_threshold(&h, 4.0, 4);
        assert!(t < 2.0, "{t}");
    }
}
