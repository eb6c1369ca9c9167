//! The sample-level view of a dataset that the loader and transforms work on.

use super::Result;
use std::sync::Arc;

/// One decoded image, `u8` in CHW layout (channels, height, width).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageU8 {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

impl ImageU8 {
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), channels * height * width);
        Self {
            channels,
            height,
            width,
            data,
        }
    }

    pub fn at(&self, c: usize, y: usize, x: usize) -> u8 {
        self.data[(c * self.height + y) * self.width + x]
    }
}

/// A labelled collection of images, decoded on demand. Implementations must be cheap to
/// share between the loader's worker threads.
pub trait ImageSource: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn num_classes(&self) -> usize;
    fn label(&self, index: usize) -> i64;
    fn image(&self, index: usize) -> Result<ImageU8>;
    /// A one-line description for logs and checkpoints (kind and path).
    fn describe(&self) -> String;
    /// Native (channels, height, width) if every image has the same shape.
    fn native_shape(&self) -> Option<[usize; 3]>;
    /// (channels, height, width): the native shape, else the first image's.
    fn shape(&self) -> Result<[usize; 3]> {
        Ok(match self.native_shape() {
            Some(s) => s,
            None => {
                let img = self.image(0)?;
                [img.channels, img.height, img.width]
            }
        })
    }
}

/// Images held decoded in memory (IDX and CIFAR files are small enough).
#[derive(Debug, Clone)]
pub struct InMemoryDataset {
    pub shape: [usize; 3],
    pub pixels: Vec<u8>,
    pub labels: Vec<i64>,
    pub num_classes: usize,
    pub description: String,
}

impl InMemoryDataset {
    fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Keep only `indices`, in that order (used to cut bundled subsets).
    pub fn select(&self, indices: &[usize]) -> InMemoryDataset {
        let n = self.sample_len();
        let mut pixels = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            pixels.extend_from_slice(&self.pixels[i * n..(i + 1) * n]);
            labels.push(self.labels[i]);
        }
        InMemoryDataset {
            shape: self.shape,
            pixels,
            labels,
            num_classes: self.num_classes,
            description: format!("{} ({} selected)", self.description, indices.len()),
        }
    }
}

impl ImageSource for InMemoryDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn label(&self, index: usize) -> i64 {
        self.labels[index]
    }
    fn image(&self, index: usize) -> Result<ImageU8> {
        let n = self.sample_len();
        let [c, h, w] = self.shape;
        Ok(ImageU8::new(
            c,
            h,
            w,
            self.pixels[index * n..(index + 1) * n].to_vec(),
        ))
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
    fn native_shape(&self) -> Option<[usize; 3]> {
        Some(self.shape)
    }
}

/// Two sources one after the other: index `i < a.len()` reads `a`, the rest read `b`.
pub struct ConcatDataset {
    a: Arc<dyn ImageSource>,
    b: Arc<dyn ImageSource>,
}

impl ConcatDataset {
    pub fn new(a: Arc<dyn ImageSource>, b: Arc<dyn ImageSource>) -> Self {
        Self { a, b }
    }
}

impl ImageSource for ConcatDataset {
    fn len(&self) -> usize {
        self.a.len() + self.b.len()
    }
    fn num_classes(&self) -> usize {
        self.a.num_classes().max(self.b.num_classes())
    }
    fn label(&self, i: usize) -> i64 {
        if i < self.a.len() {
            self.a.label(i)
        } else {
            self.b.label(i - self.a.len())
        }
    }
    fn image(&self, i: usize) -> Result<ImageU8> {
        if i < self.a.len() {
            self.a.image(i)
        } else {
            self.b.image(i - self.a.len())
        }
    }
    fn describe(&self) -> String {
        format!("{} + {}", self.a.describe(), self.b.describe())
    }
    fn native_shape(&self) -> Option<[usize; 3]> {
        match (self.a.native_shape(), self.b.native_shape()) {
            (Some(x), Some(y)) if x == y => Some(x),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(label: i64, n: usize) -> Arc<dyn ImageSource> {
        Arc::new(InMemoryDataset {
            shape: [1, 1, 1],
            pixels: (0..n as u8).collect(),
            labels: vec![label; n],
            num_classes: 10,
            description: format!("toy{label}"),
        })
    }

    #[test]
    fn concat_reads_second_source_after_first() {
        let c = ConcatDataset::new(toy(1, 3), toy(2, 2));
        assert_eq!(c.len(), 5);
        assert_eq!((c.label(2), c.label(3)), (1, 2));
        assert_eq!(c.image(4).unwrap().data, vec![1]);
        assert_eq!(c.native_shape(), Some([1, 1, 1]));
    }
}
