//! The command-line form of a subset draw.

use super::{ImageSource as _, SubsetSpec};
use crate::flags::positive;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct SubsetArgs {
    /// Use a stratified subset of this many images (proportional per class).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub limit: Option<usize>,
    /// Use at most this many images per class.
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub per_class: Option<usize>,
    /// Seed of the subset draw.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub subset_seed: u64,
}

impl SubsetArgs {
    /// The subset these flags describe (nothing held out).
    pub fn spec(&self) -> SubsetSpec {
        SubsetSpec {
            limit: self.limit,
            per_class: self.per_class,
            seed: self.subset_seed,
            holdout: 0,
        }
    }
}

/// `gmpq subset`: a stratified, seeded subset of an IDX dataset, both splits.
#[derive(Debug, Args)]
pub struct SubsetCmdArgs {
    /// An IDX dataset, e.g. idx:../shared/datasets/mnist.
    #[arg(long)]
    pub data: String,
    /// Training images to keep (stratified).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub train: usize,
    /// Test images to keep (stratified).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub test: usize,
    /// Seed of the draw.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// The KIND:PATH given to `flag`, the flag named in the error.
pub fn parse_spec_flag(flag: &str, s: &str) -> Result<super::DatasetSpec, super::DataError> {
    s.parse().map_err(|e| match e {
        super::DataError::BadSpec { spec, reason } => super::DataError::BadSpec {
            spec: format!("{flag} {spec}"),
            reason,
        },
        e => e,
    })
}

/// One split `gmpq subset` wrote: its file prefix, the images kept and the images it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenSplit {
    pub prefix: &'static str,
    pub kept: usize,
    pub of: usize,
}

impl SubsetCmdArgs {
    /// Draws both splits, then writes them (gzipped IDX) into `out`: a bad `--test` leaves
    /// no half subset.
    pub fn write(&self) -> Result<Vec<WrittenSplit>, super::DataError> {
        let spec = parse_spec_flag("--data", &self.data)?;
        let mut drawn = Vec::new();
        for (split, n, flag, prefix) in [
            (super::Split::Train, self.train, "--train", "train"),
            (super::Split::Test, self.test, "--test", "t10k"),
        ] {
            let data = spec.load_idx(split)?;
            let idx = super::stratified_subset(&data, &SubsetSpec::limited(Some(n), self.seed))
                .map_err(|e| match e {
                    super::DataError::BadSubset(why) => {
                        super::DataError::BadSubset(format!("{flag} {n}: {why}"))
                    }
                    e => e,
                })?;
            drawn.push((data, idx, prefix));
        }
        let mut written = Vec::new();
        for (data, idx, prefix) in drawn {
            super::write_idx_split(&data, &idx, &self.out, prefix)?;
            written.push(WrittenSplit {
                prefix,
                kept: idx.len(),
                of: data.len(),
            });
        }
        Ok(written)
    }
}
