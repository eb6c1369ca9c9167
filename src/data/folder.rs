//! torchvision-style image folders: one sub-folder per class holding JPEG/PNG files.

use super::{DataError, ImageSource, ImageU8, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How a class folder's name maps to a class index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClassIndex {
    /// Index = position of the folder name in sorted order (torchvision's `ImageFolder`).
    Sorted,
    /// The folder name *is* the class index (e.g. ImageNet samples named `0`..`999`).
    NameIsIndex { num_classes: usize },
}

#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    files: Vec<(PathBuf, i64)>,
    classes: Vec<String>,
    num_classes: usize,
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("jpg" | "jpeg" | "png")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| DataError::io(dir, e)))
        .collect::<Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}

impl ImageFolder {
    pub fn open(root: &Path, class_index: ClassIndex) -> Result<Self> {
        let class_dirs: Vec<PathBuf> = sorted_entries(root)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        if class_dirs.is_empty() {
            return Err(DataError::NoClasses {
                path: root.to_path_buf(),
            });
        }
        let mut files = Vec::new();
        let mut classes = Vec::new();
        for (pos, dir) in class_dirs.iter().enumerate() {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let label = match class_index {
                ClassIndex::Sorted => pos as i64,
                ClassIndex::NameIsIndex { num_classes } => {
                    let idx: usize = name.parse().map_err(|_| DataError::Corrupt {
                        path: dir.clone(),
                        reason: "folder name is not a class index".into(),
                    })?;
                    if idx >= num_classes {
                        return Err(DataError::LabelOutOfRange {
                            path: dir.clone(),
                            index: pos,
                            label: idx as i64,
                            num_classes,
                        });
                    }
                    idx as i64
                }
            };
            let images: Vec<PathBuf> = sorted_entries(dir)?
                .into_iter()
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            if images.is_empty() {
                return Err(DataError::EmptyClass { path: dir.clone() });
            }
            files.extend(images.into_iter().map(|p| (p, label)));
            classes.push(name);
        }
        let num_classes = match class_index {
            ClassIndex::Sorted => classes.len(),
            ClassIndex::NameIsIndex { num_classes } => num_classes,
        };
        Ok(Self {
            root: root.to_path_buf(),
            files,
            classes,
            num_classes,
        })
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn path(&self, index: usize) -> &Path {
        &self.files[index].0
    }
}

impl ImageSource for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn label(&self, index: usize) -> i64 {
        self.files[index].1
    }
    fn image(&self, index: usize) -> Result<ImageU8> {
        let path = &self.files[index].0;
        let img = image::open(path)
            .map_err(|e| DataError::BadImage {
                path: path.clone(),
                reason: e.to_string(),
            })?
            .to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let hwc = img.into_raw();
        let mut chw = vec![0u8; 3 * h * w];
        for (p, px) in hwc.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * h * w + p] = px[c];
            }
        }
        Ok(ImageU8::new(3, h, w, chw))
    }
    fn describe(&self) -> String {
        format!("folder:{}", self.root.display())
    }
    fn native_shape(&self) -> Option<[usize; 3]> {
        None
    }
}
