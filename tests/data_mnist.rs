//! MNIST / IDX loading: the committed 300-image fixture (gzip, and a raw copy made here), known
//! labels and pixel sums (tests/fixtures/mnist/README.md says how they were computed), and every
//! kind of broken file.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use common::TempDir;
use kiln::Error;
use kiln::data::{DataLoader, Dataset, Mnist, Split, read_idx};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist")
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(path).unwrap()).read_to_end(&mut out).unwrap();
    out
}

/// A raw (uncompressed) copy of the fixture, under the names of the test split.
fn raw_copy(dir: &Path) {
    for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        let bytes = gunzip(&fixture().join(format!("{name}.gz")));
        fs::write(dir.join(name), bytes).unwrap();
    }
}

fn pixel_sum(ds: &Mnist, i: usize) -> f64 {
    ds.get(i).unwrap().image.data().iter().map(|&v| v as f64).sum()
}

#[test]
fn fixture_has_known_labels_and_pixel_sums() {
    let ds = Mnist::new(fixture(), Split::Test).unwrap();
    assert_eq!(ds.len(), 300);
    let first: Vec<u32> = (0..10).map(|i| ds.get(i).unwrap().label).collect();
    assert_eq!(first, [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]);
    let s = ds.get(0).unwrap();
    assert_eq!(s.image.shape(), [1, 28, 28]);
    // Row 7 of the first image (a 7): its stroke starts at column 6.
    let row7: Vec<f32> = (0..12).map(|x| s.image.pixel(0, 7, x)).collect();
    assert_eq!(row7, [0., 0., 0., 0., 0., 0., 84., 185., 159., 151., 60., 36.]);
    assert_eq!(pixel_sum(&ds, 0), 18454.0);
    assert_eq!(pixel_sum(&ds, 1), 28850.0);
    assert_eq!(pixel_sum(&ds, 2), 9871.0);
    assert_eq!(pixel_sum(&ds, 299), 25582.0);
    let total: f64 = (0..300).map(|i| pixel_sum(&ds, i)).sum();
    assert_eq!(total, 7198101.0);
    let mut counts = [0; 10];
    for &l in ds.labels() {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [24, 41, 32, 24, 37, 29, 24, 34, 21, 34]);
    assert_eq!(ds.num_classes(), Some(10));
    assert_eq!(ds.classes().unwrap()[7], "7");
    assert!(matches!(ds.get(300), Err(Error::Sample { index: 300, .. })));
}

#[test]
fn raw_and_gzip_files_load_the_same() {
    let tmp = TempDir::new("mnist-raw");
    raw_copy(tmp.path());
    let raw = Mnist::new(tmp.path(), Split::Test).unwrap();
    let gz = Mnist::new(fixture(), Split::Test).unwrap();
    assert_eq!(raw.len(), gz.len());
    for i in [0, 1, 150, 299] {
        assert_eq!(raw.get(i).unwrap(), gz.get(i).unwrap());
    }
    // read_idx tells gzip by content, not by name.
    let a = read_idx(tmp.path().join("t10k-labels-idx1-ubyte")).unwrap();
    assert_eq!(a.dims, [300]);
    assert_eq!(&a.data[..3], &[7, 2, 1]);
}

#[test]
fn fashion_mnist_names_its_classes() {
    let ds = Mnist::fashion(fixture(), Split::Test).unwrap();
    assert_eq!(ds.classes().unwrap()[0], "T-shirt/top");
    assert_eq!(ds.classes().unwrap()[9], "Ankle boot");
}

#[test]
fn loads_through_the_loader_in_order() {
    let ds = Mnist::new(fixture(), Split::Test).unwrap();
    let loader = DataLoader::builder(ds).batch_size(128).workers(2).build().unwrap();
    let batches: Vec<_> = loader.epoch(0).map(Result::unwrap).collect();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0].inputs.shape(), &[128, 1, 28, 28]);
    assert_eq!(batches[2].inputs.shape(), &[44, 1, 28, 28]);
    assert_eq!(&batches[0].labels[..4], &[7, 2, 1, 0]);
    let total: f64 = batches.iter().flat_map(|b| b.inputs.data()).map(|&v| v as f64).sum();
    assert_eq!(total, 7198101.0);
}

/// Writes the raw fixture with `edit` applied to the (images, labels) bytes, and returns the
/// error of loading it.
fn broken(edit: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>)) -> (TempDir, Error) {
    let tmp = TempDir::new("mnist-broken");
    raw_copy(tmp.path());
    let ip = tmp.path().join("t10k-images-idx3-ubyte");
    let lp = tmp.path().join("t10k-labels-idx1-ubyte");
    let (mut images, mut labels) = (fs::read(&ip).unwrap(), fs::read(&lp).unwrap());
    edit(&mut images, &mut labels);
    fs::write(&ip, images).unwrap();
    fs::write(&lp, labels).unwrap();
    let err = Mnist::new(tmp.path(), Split::Test).unwrap_err();
    (tmp, err)
}

fn assert_format_error(err: &Error, file: &str, words: &str) {
    match err {
        Error::Format { path, reason } => {
            assert!(path.ends_with(file), "{err}");
            assert!(reason.contains(words), "{err}");
        }
        other => panic!("expected a format error about {file}, got {other}"),
    }
}

#[test]
fn truncated_files_are_format_errors_naming_the_path() {
    let (_t, err) = broken(|images, _| images.truncate(16 + 299 * 784 + 10));
    assert_format_error(&err, "t10k-images-idx3-ubyte", "truncated");
    assert!(err.to_string().contains("235200"), "{err}");

    let (_t, err) = broken(|images, _| images.push(0));
    assert_format_error(&err, "t10k-images-idx3-ubyte", "too long");

    let (_t, err) = broken(|_, labels| labels.truncate(6));
    assert_format_error(&err, "t10k-labels-idx1-ubyte", "truncated");

    // A gzip stream cut short.
    let tmp = TempDir::new("mnist-gz-cut");
    let gz = fs::read(fixture().join("t10k-images-idx3-ubyte.gz")).unwrap();
    fs::write(tmp.path().join("t10k-images-idx3-ubyte.gz"), &gz[..gz.len() / 2]).unwrap();
    fs::copy(fixture().join("t10k-labels-idx1-ubyte.gz"), tmp.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let err = Mnist::new(tmp.path(), Split::Test).unwrap_err();
    assert_format_error(&err, "t10k-images-idx3-ubyte.gz", "gzip");
}

#[test]
fn bad_magic_dimensions_counts_and_labels_are_errors() {
    let (_t, err) = broken(|images, _| images[0] = 0x50);
    assert_format_error(&err, "t10k-images-idx3-ubyte", "not an IDX file");

    let (_t, err) = broken(|images, _| images[2] = 0x0c);
    assert_format_error(&err, "t10k-images-idx3-ubyte", "0x0c");

    // Images and labels swapped: the images file must have 3 dimensions.
    let (_t, err) = broken(std::mem::swap);
    assert_format_error(&err, "t10k-images-idx3-ubyte", "3 dimensions");

    // 299 labels for 300 images.
    let (_t, err) = broken(|_, labels| {
        labels[7] = 43; // count 300 = 0x012c -> 0x012b
        labels.pop();
    });
    assert_format_error(&err, "t10k-labels-idx1-ubyte", "holds 299 labels");
    assert!(err.to_string().contains("300 images"), "{err}");

    let (_t, err) = broken(|_, labels| labels[8 + 5] = 10);
    assert_format_error(&err, "t10k-labels-idx1-ubyte", "label 10 of item 5");
}

#[test]
fn missing_files_name_what_was_looked_for() {
    let tmp = TempDir::new("mnist-missing");
    let err = Mnist::new(tmp.path(), Split::Train).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("train-images-idx3-ubyte") && msg.contains(".gz"), "{msg}");

    let err = Mnist::new(tmp.path().join("nope"), Split::Test).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

/// The full data set in the project's shared folder, where this checkout has it beside it.
#[test]
fn full_mnist_from_shared_data_when_present() {
    let Some(data) = common::shared_data() else {
        eprintln!("shared/data not beside the repository: full-MNIST check not run");
        return;
    };
    let test = Mnist::new(data.join("mnist"), Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    let fixture = Mnist::new(fixture(), Split::Test).unwrap();
    for i in [0, 123, 299] {
        assert_eq!(test.get(i).unwrap(), fixture.get(i).unwrap());
    }
    let train = Mnist::new(data.join("mnist"), Split::Train).unwrap();
    assert_eq!(train.len(), 60_000);
    // The first training labels: 5, 0, 4, 1, 9.
    assert_eq!(&train.labels()[..5], &[5, 0, 4, 1, 9]);
}
