//! CIFAR binary files. The record layout is always explicit: the official CIFAR-100 files
//! carry two label bytes (coarse, fine) per record, CIFAR-10 and our 20-image CIFAR-100
//! sample carry one. Guessing from the file size would be silently wrong for files whose size
//! happens to fit both layouts.

use super::{DataError, InMemoryDataset, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

const PIXELS: usize = 3 * 32 * 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CifarLayout {
    /// 1 label byte (0..10) + 3072 pixel bytes.
    Cifar10,
    /// 2 label bytes (coarse 0..20, fine 0..100) + 3072 pixel bytes; the fine label is used.
    Cifar100,
    /// 1 label byte holding the fine CIFAR-100 label (0..100) + 3072 pixel bytes.
    Cifar100FineOnly,
}

impl CifarLayout {
    pub fn label_bytes(self) -> usize {
        match self {
            CifarLayout::Cifar100 => 2,
            _ => 1,
        }
    }
    pub fn record_size(self) -> usize {
        self.label_bytes() + PIXELS
    }
    pub fn num_classes(self) -> usize {
        match self {
            CifarLayout::Cifar10 => 10,
            _ => 100,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            CifarLayout::Cifar10 => "cifar10",
            CifarLayout::Cifar100 => "cifar100",
            CifarLayout::Cifar100FineOnly => "cifar100-fine-only",
        }
    }
}

/// Reads one or more CIFAR binary files with the given record layout.
pub fn read_cifar(paths: &[impl AsRef<Path>], layout: CifarLayout) -> Result<InMemoryDataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let record = layout.record_size();
    for path in paths {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(DataError::BadRecordSize {
                path: path.to_path_buf(),
                size: bytes.len(),
                record,
                layout: layout.name(),
            });
        }
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            let label = rec[layout.label_bytes() - 1] as i64;
            if label as usize >= layout.num_classes() {
                return Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    index: i,
                    label,
                    num_classes: layout.num_classes(),
                });
            }
            if layout == CifarLayout::Cifar100 && rec[0] >= 20 {
                return Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    index: i,
                    label: rec[0] as i64,
                    num_classes: 20,
                });
            }
            labels.push(label);
            pixels.extend_from_slice(&rec[layout.label_bytes()..]);
        }
    }
    let description = format!(
        "{}:{}",
        layout.name(),
        paths
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(InMemoryDataset {
        shape: [3, 32, 32],
        pixels,
        labels,
        num_classes: layout.num_classes(),
        description,
    })
}
