//! Calibration of activation clips from data: `max(x)` capped at the clip init, or, for
//! fewer than 5 bits (the reference's rule), the KL-divergence threshold search over a
//! histogram that TensorRT introduced.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum CalibrationMethod {
    /// The largest absolute value seen (`max x`), at every bitwidth.
    Max,
    /// KL search for `b < 5`, `max x` otherwise (the default).
    #[cfg_attr(feature = "cli", value(name = "kl"))]
    KlBelow5Bits,
    /// The reference's rule: KL search for `b < 5`, `min(max x, 6)` otherwise. The cap suits
    /// networks trained with clipped activations (init 6); a network trained with plain ReLUs
    /// has activations far above 6 (measured: up to 22 in a ResNet-20), and capping them
    /// costs accuracy even at 8 bits.
    Reference,
}

impl CalibrationMethod {
    /// Whether a layer with `a_bits` activation bits is calibrated by the KL search.
    pub fn uses_kl(self, a_bits: u32) -> bool {
        self != CalibrationMethod::Max && a_bits < 5
    }
    /// The clip chosen from the observed maximum when the KL search is not used.
    pub fn clip_from_max(self, max: f64) -> f64 {
        match self {
            CalibrationMethod::Reference => max.min(super::CLIP_INIT),
            _ => max,
        }
    }
}

/// Normalises `p` and moves `eps` of mass onto its empty bins (taken evenly from the others),
/// so KL stays finite where one histogram is sparse (MXNet's `_smooth_distribution`).
fn smooth(p: &[f64], eps: f64) -> Option<Vec<f64>> {
    let total: f64 = p.iter().sum();
    let zeros = p.iter().filter(|&&v| v == 0.0).count();
    let nonzeros = p.len() - zeros;
    if total <= 0.0 || nonzeros == 0 {
        return None;
    }
    let eps1 = eps * zeros as f64 / nonzeros as f64;
    if eps1 >= 1.0 {
        return None;
    }
    Some(
        p.iter()
            .map(|&v| if v == 0.0 { eps } else { v / total - eps1 })
            .collect(),
    )
}

/// KL(P‖Q) of two normalised, smoothed distributions.
fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(&a, _)| a > 0.0)
        .map(|(&a, &b)| {
            if b > 0.0 {
                a * (a / b).ln()
            } else {
                f64::INFINITY
            }
        })
        .sum()
}

/// The clip threshold minimising KL(P‖Q) (TensorRT's entropy calibration, as in MXNet):
/// P is the histogram cut at a candidate edge with the outliers folded into its last bin, Q
/// its `levels`-level quantization spread back over P's non-empty bins. The histogram covers
/// `[0, max]` in `histogram.len()` bins; the threshold is returned in the same units.
pub fn kl_threshold(histogram: &[f64], max: f64, levels: usize) -> f64 {
    const EPS: f64 = 1e-4;
    let bins = histogram.len();
    let width = max / bins as f64;
    if bins <= levels || histogram.iter().all(|&h| h == 0.0) {
        return max;
    }
    let mut best = (f64::INFINITY, bins);
    for i in levels..=bins {
        let sliced = &histogram[..i];
        let mut p = sliced.to_vec();
        p[i - 1] += histogram[i..].iter().sum::<f64>();
        // Merge the i bins into `levels` groups (the last takes the remainder), then spread
        // each group's mass evenly over the bins that are non-empty in P.
        let merged = i / levels;
        let mut q = vec![0.0; i];
        for g in 0..levels {
            let start = g * merged;
            let end = if g == levels - 1 { i } else { start + merged };
            let mass: f64 = sliced[start..end].iter().sum();
            let nonzero = p[start..end].iter().filter(|&&v| v != 0.0).count();
            if nonzero > 0 {
                for k in start..end {
                    if p[k] != 0.0 {
                        q[k] = mass / nonzero as f64;
                    }
                }
            }
        }
        let (Some(ps), Some(qs)) = (smooth(&p, EPS), smooth(&q, EPS)) else {
            continue;
        };
        let d = kl(&ps, &qs);
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1 as f64 * width
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
