//! Per-image transforms (all random choices drawn from a caller-supplied seeded RNG) and the
//! final conversion to a normalised `f32` CHW buffer.

use super::{DataError, ImageU8, Result};
use image::imageops::FilterType;
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// Resize so that the shorter side is `size` (bilinear), keeping the aspect ratio.
    Resize { size: usize },
    /// Crop the centre `size`×`size` square (zero-padding if the image is smaller).
    CenterCrop { size: usize },
    /// Zero-pad by `padding` on every side, then crop a random `size`×`size` square.
    RandomCrop { size: usize, padding: usize },
    /// Mirror left-right with probability ½.
    RandomHorizontalFlip,
    /// Repeat a single gray channel three times.
    GrayToRgb,
}

/// `(x/255 − mean[c]) / std[c]` per channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalize {
    pub fn identity(channels: usize) -> Self {
        Self {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }
}

/// The transforms applied to every sample, then normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub transforms: Vec<Transform>,
    pub normalize: Normalize,
}

fn crop(img: &ImageU8, top: isize, left: isize, size: usize) -> ImageU8 {
    let mut out = vec![0u8; img.channels * size * size];
    for c in 0..img.channels {
        for y in 0..size {
            let sy = top + y as isize;
            if sy < 0 || sy >= img.height as isize {
                continue;
            }
            for x in 0..size {
                let sx = left + x as isize;
                if sx < 0 || sx >= img.width as isize {
                    continue;
                }
                out[(c * size + y) * size + x] = img.at(c, sy as usize, sx as usize);
            }
        }
    }
    ImageU8::new(img.channels, size, size, out)
}

fn resize_short_side(img: &ImageU8, size: usize) -> Result<ImageU8> {
    let (h, w) = (img.height, img.width);
    let (nh, nw) = if h <= w {
        (size, (w * size + h / 2) / h)
    } else {
        ((h * size + w / 2) / w, size)
    };
    if (nh, nw) == (h, w) {
        return Ok(img.clone());
    }
    let plane = h * w;
    let mut out = vec![0u8; img.channels * nh * nw];
    // Channel by channel through `image`'s resampler (bilinear, as torchvision's default).
    for c in 0..img.channels {
        let buf = image::GrayImage::from_raw(
            w as u32,
            h as u32,
            img.data[c * plane..(c + 1) * plane].to_vec(),
        )
        .ok_or_else(|| DataError::BadImage {
            path: "<memory>".into(),
            reason: "inconsistent image buffer".into(),
        })?;
        let r = image::imageops::resize(&buf, nw as u32, nh as u32, FilterType::Triangle);
        out[c * nh * nw..(c + 1) * nh * nw].copy_from_slice(r.as_raw());
    }
    Ok(ImageU8::new(img.channels, nh, nw, out))
}

impl Transform {
    pub fn apply(&self, img: ImageU8, rng: &mut impl Rng) -> Result<ImageU8> {
        Ok(match *self {
            Transform::Resize { size } => resize_short_side(&img, size)?,
            Transform::CenterCrop { size } => {
                let top = (img.height as isize - size as isize) / 2;
                let left = (img.width as isize - size as isize) / 2;
                crop(&img, top, left, size)
            }
            Transform::RandomCrop { size, padding } => {
                let p = padding as isize;
                let max_top = img.height as isize + 2 * p - size as isize;
                let max_left = img.width as isize + 2 * p - size as isize;
                let top = rng.gen_range(0..=max_top.max(0)) - p;
                let left = rng.gen_range(0..=max_left.max(0)) - p;
                crop(&img, top, left, size)
            }
            Transform::RandomHorizontalFlip => {
                if rng.gen_bool(0.5) {
                    let mut out = img.clone();
                    for c in 0..img.channels {
                        for y in 0..img.height {
                            for x in 0..img.width {
                                out.data[(c * img.height + y) * img.width + x] =
                                    img.at(c, y, img.width - 1 - x);
                            }
                        }
                    }
                    out
                } else {
                    img
                }
            }
            Transform::GrayToRgb => {
                if img.channels == 1 {
                    let mut data = Vec::with_capacity(3 * img.data.len());
                    for _ in 0..3 {
                        data.extend_from_slice(&img.data);
                    }
                    ImageU8::new(3, img.height, img.width, data)
                } else {
                    img
                }
            }
        })
    }
}

impl Pipeline {
    /// Applies the transforms and normalisation, writing CHW `f32` values into `out`.
    /// `expected` is the (C, H, W) every sample of a batch must end up with.
    pub fn apply_into(
        &self,
        img: ImageU8,
        rng: &mut impl Rng,
        expected: [usize; 3],
        out: &mut [f32],
    ) -> Result<()> {
        let mut img = img;
        for t in &self.transforms {
            img = t.apply(img, rng)?;
        }
        let shape = [img.channels, img.height, img.width];
        if shape != expected || self.normalize.mean.len() != img.channels {
            return Err(DataError::ShapeMismatch {
                what: "the transformed batch".into(),
                index: 0,
                found: shape,
                expected,
            });
        }
        let plane = img.height * img.width;
        for c in 0..img.channels {
            let (m, s) = (self.normalize.mean[c], self.normalize.std[c]);
            for (o, &v) in out[c * plane..(c + 1) * plane]
                .iter_mut()
                .zip(&img.data[c * plane..(c + 1) * plane])
            {
                *o = (v as f32 / 255.0 - m) / s;
            }
        }
        Ok(())
    }

    /// The (C, H, W) this pipeline produces from inputs of shape `input`, if fixed.
    pub fn output_shape(&self, input: [usize; 3]) -> [usize; 3] {
        let [mut c, mut h, mut w] = input;
        for t in &self.transforms {
            match *t {
                Transform::Resize { size } => {
                    if h <= w {
                        w = (w * size + h / 2) / h;
                        h = size;
                    } else {
                        h = (h * size + w / 2) / w;
                        w = size;
                    }
                }
                Transform::CenterCrop { size } | Transform::RandomCrop { size, .. } => {
                    h = size;
                    w = size;
                }
                Transform::RandomHorizontalFlip => {}
                Transform::GrayToRgb => c = 3,
            }
        }
        [c, h, w]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp(c: usize, h: usize, w: usize) -> ImageU8 {
        ImageU8::new(c, h, w, (0..c * h * w).map(|v| v as u8).collect())
    }

    #[test]
    fn crop_flip_gray_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let img = ramp(1, 4, 4);
        let f = Transform::RandomHorizontalFlip;
        // Over many draws both outcomes appear, and a flip mirrors each row.
        let outs: Vec<ImageU8> = (0..20)
            .map(|_| f.apply(img.clone(), &mut rng).unwrap())
            .collect();
        assert!(outs.iter().any(|o| o == &img));
        let flipped = outs.iter().find(|o| *o != &img).unwrap();
        assert_eq!(flipped.at(0, 0, 0), img.at(0, 0, 3));
        let cc = Transform::CenterCrop { size: 2 }
            .apply(img.clone(), &mut rng)
            .unwrap();
        assert_eq!(cc.data, vec![5, 6, 9, 10]);
        let rc = Transform::RandomCrop {
            size: 4,
            padding: 2,
        }
        .apply(img.clone(), &mut rng)
        .unwrap();
        assert_eq!((rc.height, rc.width), (4, 4));
        let rgb = Transform::GrayToRgb.apply(img.clone(), &mut rng).unwrap();
        assert_eq!(rgb.channels, 3);
        assert_eq!(rgb.at(2, 1, 1), img.at(0, 1, 1));
        let r = Transform::Resize { size: 2 }
            .apply(ramp(3, 4, 8), &mut rng)
            .unwrap();
        assert_eq!((r.channels, r.height, r.width), (3, 2, 4));
    }

    #[test]
    fn normalizes() {
        let p = Pipeline {
            transforms: vec![],
            normalize: Normalize {
                mean: vec![0.5],
                std: vec![0.25],
            },
        };
        let mut out = vec![0.0; 2];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        p.apply_into(
            ImageU8::new(1, 1, 2, vec![0, 255]),
            &mut rng,
            [1, 1, 2],
            &mut out,
        )
        .unwrap();
        assert!((out[0] + 2.0).abs() < 1e-6 && (out[1] - 2.0).abs() < 1e-6);
    }
}
