//! Dataset specs as written on the command line: `KIND:PATH`.

use super::cifar::{read_cifar, CifarLayout};
use super::folder::{ClassIndex, ImageFolder};
use super::idx::{read_idx, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC};
use super::{DataError, ImageSource, InMemoryDataset, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn idx_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Where a dataset lives and how to read it. Written `KIND:PATH`:
///
/// | kind | PATH |
/// |---|---|
/// | `idx` (aliases `mnist`, `fashion-mnist`) | folder with `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-…` |
/// | `cifar10` | folder with `data_batch_{1..5}.bin` / `test_batch.bin`, or one `.bin` file |
/// | `cifar100` | folder with `train.bin` / `test.bin` (2 label bytes), or one file |
/// | `cifar100-fine-only` | one `.bin` file in the CIFAR-10 record layout with fine labels |
/// | `folder` | image folder (sub-folder per class, sorted names); uses `train/` and `val/` if present |
/// | `imagenet-folder` | image folder whose sub-folder names are ImageNet class indices 0..999 |
/// | `bundled` | `mnist` or `fashion-mnist`: the subsets shipped in the repository's `data/` |
///
/// A spec that points at a single file or a folder without splits *is* one split: asking for
/// the train or test split of it returns the same images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub kind: DatasetKind,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Idx,
    Cifar(CifarLayout),
    Folder,
    ImagenetFolder,
}

/// Where `bundled:NAME` looks: `$GMPQ_DATA_DIR`, else the repository's `data/` folder.
pub fn bundled_data_dir() -> PathBuf {
    std::env::var_os("GMPQ_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("data"))
}

impl std::str::FromStr for DatasetSpec {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| DataError::BadSpec {
            spec: s.to_string(),
            reason: reason.to_string(),
        };
        let (kind, path) = s
            .split_once(':')
            .ok_or_else(|| bad("expected KIND:PATH, e.g. idx:data/fashion-mnist"))?;
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        let kind = match kind {
            "idx" | "mnist" | "fashion-mnist" => DatasetKind::Idx,
            "cifar10" => DatasetKind::Cifar(CifarLayout::Cifar10),
            "cifar100" => DatasetKind::Cifar(CifarLayout::Cifar100),
            "cifar100-fine-only" => DatasetKind::Cifar(CifarLayout::Cifar100FineOnly),
            "folder" => DatasetKind::Folder,
            "imagenet-folder" => DatasetKind::ImagenetFolder,
            "bundled" => {
                return match path {
                    "mnist" | "fashion-mnist" => Ok(DatasetSpec {
                        kind: DatasetKind::Idx,
                        path: bundled_data_dir().join(path),
                    }),
                    _ => Err(bad("bundled datasets are 'mnist' and 'fashion-mnist'")),
                }
            }
            _ => return Err(bad(
                "unknown kind (idx, mnist, fashion-mnist, cifar10, cifar100, cifar100-fine-only, folder, imagenet-folder, bundled)",
            )),
        };
        Ok(DatasetSpec {
            kind,
            path: PathBuf::from(path),
        })
    }
}

impl std::fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            DatasetKind::Idx => "idx",
            DatasetKind::Cifar(l) => l.name(),
            DatasetKind::Folder => "folder",
            DatasetKind::ImagenetFolder => "imagenet-folder",
        };
        write!(f, "{kind}:{}", self.path.display())
    }
}

/// Finds `stem` or `stem.gz` in `dir`.
fn find_idx(dir: &Path, stem: &str) -> Result<PathBuf> {
    [dir.join(stem), dir.join(format!("{stem}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| DataError::NotFound {
            path: dir.join(stem),
            what: format!("IDX file {stem} or {stem}.gz"),
        })
}

/// Reads an IDX images/labels pair into memory and checks it is consistent.
pub fn load_idx_pair(images: &Path, labels: &Path) -> Result<InMemoryDataset> {
    let img = read_idx(images, IDX_IMAGES_MAGIC)?;
    let lab = read_idx(labels, IDX_LABELS_MAGIC)?;
    if img.dims.len() != 3 {
        return Err(DataError::Corrupt {
            path: images.to_path_buf(),
            reason: format!("expected 3 dimensions (N, H, W), found {:?}", img.dims),
        });
    }
    if lab.dims.len() != 1 || lab.dims[0] != img.dims[0] {
        return Err(DataError::CountMismatch {
            path: labels.to_path_buf(),
            images: img.dims[0],
            labels: lab.dims.first().copied().unwrap_or(0),
        });
    }
    let labels_i64: Vec<i64> = lab.data.iter().map(|&l| l as i64).collect();
    // IDX has no class count; MNIST-likes use 10, and anything larger is a corrupt file.
    let num_classes = 10;
    if let Some((index, &label)) = labels_i64
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= num_classes)
    {
        return Err(DataError::LabelOutOfRange {
            path: labels.to_path_buf(),
            index,
            label,
            num_classes,
        });
    }
    Ok(InMemoryDataset {
        shape: [1, img.dims[1], img.dims[2]],
        pixels: img.data,
        labels: labels_i64,
        num_classes,
        description: format!("idx:{}", images.display()),
    })
}

impl DatasetSpec {
    /// Reads one split of an IDX dataset into memory.
    pub fn load_idx(&self, split: Split) -> Result<InMemoryDataset> {
        if self.kind != DatasetKind::Idx {
            return Err(DataError::BadSpec {
                spec: self.to_string(),
                reason: "expected an IDX dataset".into(),
            });
        }
        let pre = split.idx_prefix();
        let images = find_idx(&self.path, &format!("{pre}-images-idx3-ubyte"))?;
        let labels = find_idx(&self.path, &format!("{pre}-labels-idx1-ubyte"))?;
        load_idx_pair(&images, &labels)
    }

    /// The class names, by label, when the data states them: an image folder's sub-folder
    /// names, CIFAR-10's `batches.meta.txt`, or a `classes.txt` (one name a line) in the
    /// dataset's folder (the bundled subsets ship one).
    pub fn class_names(&self) -> Option<Vec<String>> {
        if self.kind == DatasetKind::ImagenetFolder {
            return Some(super::imagenet_classes());
        }
        let dir = if self.path.is_file() {
            self.path.parent()?.to_path_buf()
        } else {
            self.path.clone()
        };
        let read = |name: &str| -> Option<Vec<String>> {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            (!names.is_empty()).then_some(names)
        };
        match self.kind {
            DatasetKind::Folder => {
                let root = if dir.join("train").is_dir() {
                    dir.join("train")
                } else {
                    dir
                };
                let mut names: Vec<String> = std::fs::read_dir(root)
                    .ok()?
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                (!names.is_empty()).then_some(names)
            }
            DatasetKind::Cifar(CifarLayout::Cifar10) => {
                read("classes.txt").or_else(|| read("batches.meta.txt"))
            }
            _ => read("classes.txt"),
        }
    }

    /// Opens one split of the dataset.
    pub fn load(&self, split: Split) -> Result<Arc<dyn ImageSource>> {
        let p = &self.path;
        if !p.exists() {
            return Err(DataError::NotFound {
                path: p.clone(),
                what: format!("a {} dataset", self),
            });
        }
        match self.kind {
            DatasetKind::Idx => Ok(Arc::new(self.load_idx(split)?)),
            DatasetKind::Cifar(layout) => {
                let files: Vec<PathBuf> = if p.is_file() {
                    vec![p.clone()]
                } else {
                    let names: Vec<String> = match (layout, split) {
                        (CifarLayout::Cifar10, Split::Train) => {
                            (1..=5).map(|i| format!("data_batch_{i}.bin")).collect()
                        }
                        (CifarLayout::Cifar10, Split::Test) => vec!["test_batch.bin".into()],
                        (_, Split::Train) => vec!["train.bin".into()],
                        (_, Split::Test) => vec!["test.bin".into()],
                    };
                    let files: Vec<PathBuf> = names.iter().map(|n| p.join(n)).collect();
                    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                        return Err(DataError::NotFound {
                            path: missing.clone(),
                            what: format!("{} {:?} file", layout.name(), split),
                        });
                    }
                    files
                };
                Ok(Arc::new(read_cifar(&files, layout)?))
            }
            DatasetKind::Folder | DatasetKind::ImagenetFolder => {
                let class_index = if self.kind == DatasetKind::Folder {
                    ClassIndex::Sorted
                } else {
                    ClassIndex::NameIsIndex { num_classes: 1000 }
                };
                let sub = match split {
                    Split::Train => p.join("train"),
                    Split::Test => p.join("val"),
                };
                let root = if p.join("train").is_dir() && p.join("val").is_dir() {
                    sub
                } else {
                    p.clone()
                };
                Ok(Arc::new(ImageFolder::open(&root, class_index)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s: DatasetSpec = "cifar100:/x/y".parse().unwrap();
        assert_eq!(s.kind, DatasetKind::Cifar(CifarLayout::Cifar100));
        assert_eq!(s.to_string(), "cifar100:/x/y");
        assert!("nokind".parse::<DatasetSpec>().is_err());
        assert!("weird:/x".parse::<DatasetSpec>().is_err());
        let b: DatasetSpec = "bundled:mnist".parse().unwrap();
        assert!(b.path.ends_with("data/mnist"));
    }
}
