//! A batch loader that decodes and augments samples in parallel (rayon) on a background
//! thread and keeps the next batches ready while the current one trains.

use super::{DataError, ImageSource, Pipeline, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    /// Drop a last, smaller batch (training keeps batch-norm statistics clean this way).
    pub drop_last: bool,
    pub seed: u64,
    /// How many batches may wait ready ahead of the consumer.
    pub prefetch: usize,
    /// Data-parallel share: this rank's part of every batch (see [`Shard`]).
    pub shard: Shard,
}

/// Rank `rank` of `world` takes the `rank`-th of `world` equal parts of every batch of
/// `batch_size` images, so that the ranks together see exactly the batches one process would
/// (same order, same augmentation draws). `batch_size` must be a multiple of `world`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { rank: 0, world: 1 }
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            shuffle: false,
            drop_last: false,
            seed: 0,
            prefetch: 2,
            shard: Shard::default(),
        }
    }
}

impl LoaderConfig {
    /// Shuffled, full batches only, three batches prefetched: what every training loop uses.
    pub fn training(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            shuffle: true,
            drop_last: true,
            seed,
            prefetch: 3,
            shard: Shard::default(),
        }
    }

    /// The same batches, as this rank's share of each (see [`Shard`]).
    pub fn sharded(self, shard: Shard) -> Self {
        Self { shard, ..self }
    }
}

/// A batch: images `[N, C, H, W]` (f32) and labels `[N]` (i64), on the CPU.
#[derive(Debug)]
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
}

pub struct DataLoader {
    rx: Receiver<Result<Batch>>,
    batches: usize,
    samples: usize,
}

/// Mixes the run seed, epoch and sample position into one per-sample seed, so augmentation
/// does not depend on which thread handles which sample.
fn sample_seed(seed: u64, epoch: u64, position: u64) -> u64 {
    let mut z = seed
        ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ position.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl DataLoader {
    /// Starts producing the batches of one epoch over `indices` of `source`.
    pub fn new(
        source: Arc<dyn ImageSource>,
        indices: &[usize],
        pipeline: Arc<Pipeline>,
        config: LoaderConfig,
        epoch: u64,
    ) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(DataError::BadSubset("batch size must be positive".into()));
        }
        let Shard { rank, world } = config.shard;
        if world == 0
            || rank >= world
            || !config.batch_size.is_multiple_of(world)
            || (world > 1 && !config.drop_last)
        {
            return Err(DataError::BadSubset(format!(
                "a batch of {} cannot be split into {world} equal shares",
                config.batch_size
            )));
        }
        let input_shape = match source.native_shape() {
            Some(s) => s,
            None => {
                let first = indices.first().copied().unwrap_or(0);
                let img = source.image(first)?;
                [img.channels, img.height, img.width]
            }
        };
        let shape = pipeline.output_shape(input_shape);
        let mut order = indices.to_vec();
        if config.shuffle {
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(sample_seed(config.seed, epoch, u64::MAX));
            order.shuffle(&mut rng);
        }
        let batch_size = config.batch_size;
        let batches = if config.drop_last {
            order.len() / batch_size
        } else {
            order.len().div_ceil(batch_size)
        };
        let samples = if config.drop_last {
            batches * batch_size / world
        } else {
            order.len()
        };
        let (tx, rx) = sync_channel(config.prefetch.max(1));
        std::thread::Builder::new()
            .name("gmpq-loader".into())
            .spawn(move || {
                let sample_len: usize = shape.iter().product();
                for (b, batch) in order.chunks(batch_size).take(batches).enumerate() {
                    // Sharded batches are full (drop_last): each rank's share is equal.
                    let (first, chunk) = if world == 1 {
                        (0, batch)
                    } else {
                        let share = batch_size / world;
                        (rank * share, &batch[rank * share..(rank + 1) * share])
                    };
                    let mut pixels = vec![0f32; chunk.len() * sample_len];
                    let built: Result<()> = pixels
                        .par_chunks_mut(sample_len)
                        .zip(chunk.par_iter().enumerate())
                        .try_for_each(|(out, (j, &idx))| {
                            let pos = (b * batch_size + first + j) as u64;
                            let mut rng = rand::rngs::StdRng::seed_from_u64(sample_seed(
                                config.seed,
                                epoch,
                                pos,
                            ));
                            let img = source.image(idx)?;
                            pipeline
                                .apply_into(img, &mut rng, shape, out)
                                .map_err(|e| match e {
                                    DataError::ShapeMismatch {
                                        found, expected, ..
                                    } => DataError::ShapeMismatch {
                                        what: source.describe(),
                                        index: idx,
                                        found,
                                        expected,
                                    },
                                    other => other,
                                })
                        });
                    let item = built.map(|()| {
                        let labels: Vec<i64> = chunk.iter().map(|&i| source.label(i)).collect();
                        let dims = [
                            chunk.len() as i64,
                            shape[0] as i64,
                            shape[1] as i64,
                            shape[2] as i64,
                        ];
                        Batch {
                            images: Tensor::from_slice(&pixels).view(dims),
                            labels: Tensor::from_slice(&labels),
                        }
                    });
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return; // consumer gone, or the error has been handed over
                    }
                }
            })
            .map_err(|e| DataError::io("<loader thread>", e))?;
        Ok(Self {
            rx,
            batches,
            samples,
        })
    }

    /// Number of batches this epoch will yield.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Number of samples this epoch will yield.
    pub fn samples(&self) -> usize {
        self.samples
    }
}

impl Iterator for DataLoader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{InMemoryDataset, Normalize, Transform};

    fn toy(n: usize) -> Arc<dyn ImageSource> {
        Arc::new(InMemoryDataset {
            shape: [1, 4, 4],
            pixels: (0..n * 16).map(|v| (v % 251) as u8).collect(),
            labels: (0..n as i64).map(|i| i % 10).collect(),
            num_classes: 10,
            description: "toy".into(),
        })
    }

    #[test]
    fn yields_all_samples_deterministically() {
        let src = toy(10);
        let idx: Vec<usize> = (0..10).collect();
        let pipe = Arc::new(Pipeline {
            transforms: vec![
                Transform::RandomCrop {
                    size: 4,
                    padding: 1,
                },
                Transform::GrayToRgb,
            ],
            normalize: Normalize::identity(3),
        });
        let cfg = LoaderConfig {
            batch_size: 4,
            shuffle: true,
            seed: 3,
            ..Default::default()
        };
        let a: Vec<Batch> = DataLoader::new(src.clone(), &idx, pipe.clone(), cfg, 1)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].images.size(), vec![4, 3, 4, 4]);
        assert_eq!(a[2].images.size(), vec![2, 3, 4, 4]);
        let b: Vec<Batch> = DataLoader::new(src.clone(), &idx, pipe.clone(), cfg, 1)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        for (x, y) in a.iter().zip(&b) {
            assert!(x.images.equal(&y.images));
            assert!(x.labels.equal(&y.labels));
        }
        let dropped = DataLoader::new(
            src,
            &idx,
            pipe,
            LoaderConfig {
                drop_last: true,
                ..cfg
            },
            1,
        )
        .unwrap();
        assert_eq!(dropped.batches(), 2);
    }
}
