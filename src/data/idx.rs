//! IDX files (MNIST and its relatives), raw or gzip-compressed.

use super::{DataError, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::Path;

/// A parsed IDX array of unsigned bytes.
#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads a whole file, transparently gunzipping it when it starts with the gzip magic.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
        let mut out = Vec::with_capacity(raw.len() * 4);
        GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Reads an IDX file of `u8` data and checks its magic number against `expected_magic`.
pub fn read_idx(path: &Path, expected_magic: u32) -> Result<IdxArray> {
    let bytes = read_maybe_gz(path)?;
    parse_idx(path, &bytes, expected_magic)
}

/// Writes a `u8` IDX file (gzip-compressed when `path` ends in `.gz`), atomically.
pub fn write_idx(path: &Path, magic: u32, dims: &[usize], data: &[u8]) -> Result<()> {
    use flate2::write::GzEncoder;
    use std::io::Write;
    let mut raw = magic.to_be_bytes().to_vec();
    for &d in dims {
        raw.extend_from_slice(&(d as u32).to_be_bytes());
    }
    raw.extend_from_slice(data);
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&raw).map_err(|e| DataError::io(path, e))?;
        enc.finish().map_err(|e| DataError::io(path, e))?
    } else {
        raw
    };
    crate::files::write_atomic(path, &bytes).map_err(|e| DataError::io(path, e))
}

fn parse_idx(path: &Path, bytes: &[u8], expected_magic: u32) -> Result<IdxArray> {
    let what = if expected_magic == IDX_IMAGES_MAGIC {
        "IDX u8 images"
    } else {
        "IDX u8 labels"
    };
    if bytes.len() < 4 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: 4,
            found: bytes.len(),
        });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != expected_magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            found: magic,
            expected: expected_magic,
            what,
        });
    }
    let ndims = (magic & 0xff) as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header,
            found: bytes.len(),
        });
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("dimensions {dims:?} overflow"),
        })?;
    let found = bytes.len() - header;
    if found < expected {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected,
            found,
        });
    }
    if found > expected {
        return Err(DataError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "{} trailing bytes after {expected} bytes of data",
                found - expected
            ),
        });
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_valid_images() {
        let b = idx_bytes(IDX_IMAGES_MAGIC, &[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let a = parse_idx(Path::new("x"), &b, IDX_IMAGES_MAGIC).unwrap();
        assert_eq!(a.dims, vec![2, 2, 2]);
        assert_eq!(a.data[7], 8);
    }

    #[test]
    fn rejects_truncated_and_bad_magic() {
        let b = idx_bytes(IDX_IMAGES_MAGIC, &[2, 2, 2], &[1, 2, 3]);
        let e = parse_idx(Path::new("t.idx"), &b, IDX_IMAGES_MAGIC).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::Truncated {
                    expected: 8,
                    found: 3,
                    ..
                }
            ),
            "{e}"
        );
        let b = idx_bytes(IDX_LABELS_MAGIC, &[2], &[1, 2]);
        let e = parse_idx(Path::new("m.idx"), &b, IDX_IMAGES_MAGIC).unwrap_err();
        assert!(e.to_string().contains("m.idx"));
        assert!(matches!(e, DataError::BadMagic { .. }));
    }
}
