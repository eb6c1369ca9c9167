//! Bad input gets a one-line error that names the file — from the library and the CLI.

mod common;

use common::{run, stderr};
use gmpq::data::{
    read_cifar, write_idx, CifarLayout, ClassIndex, DataError, DatasetSpec, ImageFolder,
    ImageSource, Split, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC,
};
use std::path::Path;

fn write_mnist_like(dir: &Path, images: &[u8], n: usize) {
    std::fs::write(dir.join("train-images-idx3-ubyte"), images).unwrap();
    write_idx(
        &dir.join("train-labels-idx1-ubyte"),
        IDX_LABELS_MAGIC,
        &[n],
        &vec![1; n],
    )
    .unwrap();
    std::fs::copy(
        dir.join("train-images-idx3-ubyte"),
        dir.join("t10k-images-idx3-ubyte"),
    )
    .unwrap();
    std::fs::copy(
        dir.join("train-labels-idx1-ubyte"),
        dir.join("t10k-labels-idx1-ubyte"),
    )
    .unwrap();
}

fn idx_images(n: usize, keep: usize, magic: u32) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in [n as u32, 8, 8] {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend(std::iter::repeat_n(7u8, n * 64));
    v.truncate(16 + keep);
    v
}

fn assert_one_line_naming(out: &std::process::Output, file: &str, words: &str) {
    assert!(!out.status.success());
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(file), "error does not name {file}: {err}");
    assert!(
        lines[0].contains(words),
        "error does not say '{words}': {err}"
    );
}

#[test]
fn truncated_idx_is_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist_like(dir.path(), &idx_images(10, 300, IDX_IMAGES_MAGIC), 10);
    let spec = format!("idx:{}", dir.path().display());
    let out = run(&[
        "train",
        "--data",
        &spec,
        "--epochs",
        "1",
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_one_line_naming(&out, "train-images-idx3-ubyte", "truncated");
    // The library says the same thing, typed.
    let e = spec
        .parse::<DatasetSpec>()
        .unwrap()
        .load(Split::Train)
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            DataError::Truncated {
                expected: 640,
                found: 300,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn wrong_magic_is_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist_like(dir.path(), &idx_images(10, 640, 0x0000_0804), 10);
    let spec = format!("idx:{}", dir.path().display());
    let out = run(&[
        "train",
        "--data",
        &spec,
        "--epochs",
        "1",
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_one_line_naming(
        &out,
        "train-images-idx3-ubyte",
        "wrong magic number 0x00000804",
    );
}

#[test]
fn corrupt_gzip_and_label_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("train-images-idx3-ubyte.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
    let e = gmpq::data::read_idx(&gz, IDX_IMAGES_MAGIC).unwrap_err();
    assert!(e.to_string().contains("gzip"), "{e}");
    // Label 12 in an MNIST-like file.
    let d2 = tempfile::tempdir().unwrap();
    write_idx(
        &d2.path().join("train-images-idx3-ubyte"),
        IDX_IMAGES_MAGIC,
        &[2, 2, 2],
        &[0; 8],
    )
    .unwrap();
    write_idx(
        &d2.path().join("train-labels-idx1-ubyte"),
        IDX_LABELS_MAGIC,
        &[2],
        &[3, 12],
    )
    .unwrap();
    let spec: DatasetSpec = format!("idx:{}", d2.path().display()).parse().unwrap();
    let e = spec.load(Split::Train).err().unwrap();
    assert!(
        matches!(
            e,
            DataError::LabelOutOfRange {
                index: 1,
                label: 12,
                ..
            }
        ),
        "{e}"
    );
    // Image and label counts that disagree.
    write_idx(
        &d2.path().join("train-labels-idx1-ubyte"),
        IDX_LABELS_MAGIC,
        &[3],
        &[3, 1, 2],
    )
    .unwrap();
    let e = spec.load(Split::Train).err().unwrap();
    assert!(
        matches!(
            e,
            DataError::CountMismatch {
                images: 2,
                labels: 3,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn cifar_of_wrong_size_is_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("batch.bin");
    std::fs::write(&f, vec![0u8; 3073 * 2 + 5]).unwrap();
    let out = run(&[
        "train",
        "--data",
        &format!("cifar10:{}", f.display()),
        "--epochs",
        "1",
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_one_line_naming(
        &out,
        "batch.bin",
        "not a multiple of the cifar10 record size (3073 bytes)",
    );
    // The same bytes are a valid length for no layout; the 2-label-byte layout has 3074-byte records.
    let e = read_cifar(&[&f], CifarLayout::Cifar100).unwrap_err();
    assert!(e.to_string().contains("3074"), "{e}");
}

#[test]
fn cifar_layouts_are_explicit_and_labels_checked() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c100.bin");
    // Two records in the official CIFAR-100 layout: (coarse, fine) then pixels.
    let mut bytes = vec![3u8, 42];
    bytes.extend(vec![9u8; 3072]);
    bytes.extend([19u8, 99]);
    bytes.extend(vec![1u8; 3072]);
    std::fs::write(&f, &bytes).unwrap();
    let d = read_cifar(&[&f], CifarLayout::Cifar100).unwrap();
    assert_eq!(d.labels, vec![42, 99]);
    assert_eq!(d.num_classes(), 100);
    // Read as CIFAR-10, the record size does not fit: an error, not a silent misread.
    assert!(read_cifar(&[&f], CifarLayout::Cifar10).is_err());
    // A fine label of 100 is out of range.
    bytes[1] = 100;
    std::fs::write(&f, &bytes).unwrap();
    let e = read_cifar(&[&f], CifarLayout::Cifar100).unwrap_err();
    assert!(
        matches!(e, DataError::LabelOutOfRange { label: 100, .. }),
        "{e}"
    );
}

#[test]
fn image_folder_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = ImageFolder::open(dir.path(), ClassIndex::Sorted).unwrap_err();
    assert!(matches!(e, DataError::NoClasses { .. }), "{e}");
    std::fs::create_dir(dir.path().join("cat")).unwrap();
    let e = ImageFolder::open(dir.path(), ClassIndex::Sorted).unwrap_err();
    assert!(
        matches!(e, DataError::EmptyClass { .. }) && e.to_string().contains("cat"),
        "{e}"
    );
    std::fs::write(dir.path().join("cat/broken.jpg"), b"not a jpeg").unwrap();
    let folder = ImageFolder::open(dir.path(), ClassIndex::Sorted).unwrap();
    let e = folder.image(0).unwrap_err();
    assert!(
        matches!(e, DataError::BadImage { .. }) && e.to_string().contains("broken.jpg"),
        "{e}"
    );
    let out = run(&[
        "train",
        "--data",
        &format!("folder:{}", dir.path().display()),
        "--input-size",
        "32",
        "--epochs",
        "1",
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_one_line_naming(&out, "broken.jpg", "unreadable image");
}

#[test]
fn missing_data_and_bad_spec_are_clear() {
    let out = run(&["train", "--data", "idx:/nonexistent/mnist", "--epochs", "1"]);
    assert_one_line_naming(&out, "/nonexistent/mnist", "not found");
    let out = run(&["train", "--data", "mnist-without-kind", "--epochs", "1"]);
    assert_one_line_naming(&out, "mnist-without-kind", "KIND:PATH");
}
