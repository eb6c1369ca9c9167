//! Image-classification data: readers for IDX, CIFAR binary and image folders, seeded
//! transforms, stratified subsets and a parallel, prefetching batch loader.

#[cfg(feature = "cli")]
mod args;
mod cifar;
mod folder;
mod idx;
mod loader;
mod source;
mod spec;
mod subset;
mod transform;

#[cfg(feature = "cli")]
pub use args::{parse_spec_flag, SubsetArgs, SubsetCmdArgs, WrittenSplit};
pub use cifar::{read_cifar, CifarLayout};
pub use folder::{ClassIndex, ImageFolder};
pub use idx::{read_idx, write_idx, IdxArray, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC};
pub use loader::{Batch, DataLoader, LoaderConfig, Shard};
pub use source::{ConcatDataset, ImageSource, ImageU8, InMemoryDataset};
pub use spec::{bundled_data_dir, load_idx_pair, DatasetKind, DatasetSpec, Split};
pub use subset::{holdout_indices, stratified_subset, SubsetSpec, HOLDOUT_SEED};
pub use transform::{Normalize, Pipeline, Transform};

use std::path::PathBuf;

/// Everything that can go wrong reading data. Each variant names the file, so the CLI can
/// print one line that tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: truncated: expected {expected} bytes of data, found {found}")]
    Truncated {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("{path}: wrong magic number 0x{found:08x} (expected 0x{expected:08x}: {what})")]
    BadMagic {
        path: PathBuf,
        found: u32,
        expected: u32,
        what: &'static str,
    },
    #[error("{path}: corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path}: size {size} bytes is not a multiple of the {layout} record size ({record} bytes)"
    )]
    BadRecordSize {
        path: PathBuf,
        size: usize,
        record: usize,
        layout: &'static str,
    },
    #[error("{path}: label {label} at record {index} is out of range (expected < {num_classes})")]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: i64,
        num_classes: usize,
    },
    #[error("{path}: {images} images but {labels} labels")]
    CountMismatch {
        path: PathBuf,
        images: usize,
        labels: usize,
    },
    #[error("{path}: class folder is empty (no .jpg/.jpeg/.png files)")]
    EmptyClass { path: PathBuf },
    #[error("{path}: no class sub-folders")]
    NoClasses { path: PathBuf },
    #[error("{path}: unreadable image: {reason}")]
    BadImage { path: PathBuf, reason: String },
    #[error("{path}: not found (expected {what})")]
    NotFound { path: PathBuf, what: String },
    #[error("invalid dataset spec '{spec}': {reason}")]
    BadSpec { spec: String, reason: String },
    #[error("invalid subset: {0}")]
    BadSubset(String),
    #[error("image {index} of {what} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        what: String,
        index: usize,
        found: [usize; 3],
        expected: [usize; 3],
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;

/// Writes `indices` of an in-memory gray dataset as a gzipped IDX pair
/// (`{prefix}-images-idx3-ubyte.gz`, `{prefix}-labels-idx1-ubyte.gz`) in `dir`.
pub fn write_idx_split(
    data: &InMemoryDataset,
    indices: &[usize],
    dir: &std::path::Path,
    prefix: &str,
) -> Result<()> {
    let [c, h, w] = data.shape;
    if c != 1 {
        return Err(DataError::BadSubset(format!(
            "IDX output holds gray images; {} has {c} channels",
            data.description
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let sel = data.select(indices);
    let labels: Vec<u8> = sel.labels.iter().map(|&l| l as u8).collect();
    write_idx(
        &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
        IDX_IMAGES_MAGIC,
        &[indices.len(), h, w],
        &sel.pixels,
    )?;
    write_idx(
        &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
        IDX_LABELS_MAGIC,
        &[indices.len()],
        &labels,
    )
}

/// The 1,000 ImageNet-1k class names by label, as torchvision ships them
/// (`data/imagenet/README.md` says where they come from).
pub const IMAGENET_CLASSES: &str = include_str!("../../data/imagenet/classes.txt");

/// [`IMAGENET_CLASSES`] as a list.
pub fn imagenet_classes() -> Vec<String> {
    IMAGENET_CLASSES.lines().map(String::from).collect()
}

#[cfg(test)]
mod imagenet_tests {
    #[test]
    fn imagenet_names_are_the_thousand_by_label() {
        let names = super::imagenet_classes();
        assert_eq!(names.len(), 1000);
        assert_eq!(names[0], "tench");
        assert_eq!(names[853], "thatch");
        assert_eq!(names[999], "toilet tissue");
    }
}
