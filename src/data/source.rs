//! The sample-level view of a dataset that the loader and transforms work on.

use super::Result;

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
