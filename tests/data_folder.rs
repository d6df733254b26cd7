//! ImageFolder on a tree of PNG and JPEG files written here: class order, grey/RGB conversion,
//! and corrupt files skipped (and listed) or fatal, always named.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{TempDir, write_image};
use kiln::Error;
use kiln::data::{Check, DataLoader, Dataset, ImageFolder, OnError};

/// A 3x2 RGB image whose HWC bytes are 10, 20, ... 180.
fn rgb_bytes() -> Vec<u8> {
    (1..=18).map(|v| v * 10).collect()
}

/// root/
///   bird/b0.png       RGB 3 wide x 2 high (rgb_bytes)
///   bird/notes.txt    ignored (not an image)
///   cat/c0.png        grey 3x2, values 0, 50, 100, 150, 200, 250
///   cat/sub/c1.jpg    uniform RGB (200, 100, 50), JPEG
///   cat/.hidden.png   ignored (hidden)
///   dog/d0.png        RGBA 3x2 (alpha dropped)
///   dog/d1.png        garbage bytes            <- corrupt (bad header)
///   dog/d2.png        a valid PNG cut short    <- corrupt past its header
struct Tree {
    tmp: TempDir,
}

impl Tree {
    fn new() -> Tree {
        let tmp = TempDir::new("folder");
        let r = tmp.path();
        write_image(&r.join("bird/b0.png"), 3, 2, 3, &rgb_bytes());
        fs::write(r.join("bird/notes.txt"), "not an image").unwrap();
        write_image(&r.join("cat/c0.png"), 3, 2, 1, &[0, 50, 100, 150, 200, 250]);
        write_image(&r.join("cat/sub/c1.jpg"), 8, 8, 3, &[200, 100, 50].repeat(64));
        fs::write(r.join("cat/.hidden.png"), "hidden").unwrap();
        let rgba: Vec<u8> = (0..6).flat_map(|i| [i * 40, 1, 2, 128]).collect();
        write_image(&r.join("dog/d0.png"), 3, 2, 4, &rgba);
        fs::write(r.join("dog/d1.png"), b"this is not a png at all").unwrap();
        let noise: Vec<u8> = (0..64 * 64 * 3).map(|i| (i * 7919 % 251) as u8).collect();
        write_image(&r.join("dog/d2.png"), 64, 64, 3, &noise);
        let full = fs::read(r.join("dog/d2.png")).unwrap();
        fs::write(r.join("dog/d2.png"), &full[..full.len() / 2]).unwrap();
        Tree { tmp }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }
}

#[test]
fn fail_mode_names_the_corrupt_file() {
    let t = Tree::new();
    let err = ImageFolder::new(t.root()).unwrap_err();
    match &err {
        Error::Format { path, .. } => assert_eq!(path, &t.path("dog/d1.png")),
        other => panic!("expected a format error, got {other}"),
    }
    assert!(err.to_string().contains("d1.png"), "{err}");
}

#[test]
fn skip_mode_lists_what_it_left_out() {
    let t = Tree::new();
    let ds = ImageFolder::builder(t.root()).on_error(OnError::Skip).build().unwrap();
    assert_eq!(ds.classes().unwrap(), ["bird", "cat", "dog"]);
    let skipped: Vec<&Path> = ds.skipped().iter().map(|s| s.path.as_path()).collect();
    assert_eq!(skipped, [t.path("dog/d1.png")]);
    assert!(!ds.skipped()[0].reason.is_empty());
    // The header check passes the cut PNG: it is kept, and decoding it is an error naming it.
    let files: Vec<(&Path, u32)> = ds.files().iter().map(|(p, l)| (p.as_path(), *l)).collect();
    let (b0, c0, c1, d0, d2) = (
        t.path("bird/b0.png"),
        t.path("cat/c0.png"),
        t.path("cat/sub/c1.jpg"),
        t.path("dog/d0.png"),
        t.path("dog/d2.png"),
    );
    assert_eq!(files, [(&*b0, 0), (&*c0, 1), (&*c1, 1), (&*d0, 2), (&*d2, 2)]);
    let err = ds.get(4).unwrap_err();
    assert!(err.to_string().contains("d2.png"), "{err}");
    assert_eq!(ds.path(4), Some(d2.as_path()));
}

#[test]
fn full_decode_check_finds_corruption_past_the_header() {
    let t = Tree::new();
    let ds = ImageFolder::builder(t.root()).on_error(OnError::Skip).check(Check::Decode).build().unwrap();
    let skipped: Vec<&Path> = ds.skipped().iter().map(|s| s.path.as_path()).collect();
    assert_eq!(skipped, [t.path("dog/d1.png"), t.path("dog/d2.png")]);
    assert_eq!(ds.len(), 4);
    for i in 0..ds.len() {
        ds.get(i).unwrap();
    }
    // Under Fail, the first bad file in path order is the error.
    fs::remove_file(t.path("dog/d1.png")).unwrap();
    let err = ImageFolder::builder(t.root()).check(Check::Decode).build().unwrap_err();
    assert!(err.to_string().contains("d2.png"), "{err}");
}

#[test]
fn grey_and_rgb_convert_to_the_requested_channels() {
    let t = Tree::new();
    fs::remove_file(t.path("dog/d1.png")).unwrap();
    fs::remove_file(t.path("dog/d2.png")).unwrap();
    let rgb = ImageFolder::new(t.root()).unwrap();
    let grey = ImageFolder::builder(t.root()).channels(1).build().unwrap();

    // RGB PNG, kept as RGB: CHW planes of the HWC bytes.
    let b0 = rgb.get(0).unwrap();
    assert_eq!(b0.image.shape(), [3, 2, 3]);
    assert_eq!(b0.image.plane(0), &[10., 40., 70., 100., 130., 160.]);
    assert_eq!(b0.image.plane(2), &[30., 60., 90., 120., 150., 180.]);
    // ... and as grey: 0.2989 R + 0.587 G + 0.114 B.
    let g = grey.get(0).unwrap().image;
    assert_eq!(g.shape(), [1, 2, 3]);
    let expect = 0.2989 * 10.0 + 0.587 * 20.0 + 0.114 * 30.0;
    assert!((g.pixel(0, 0, 0) - expect).abs() < 1e-4, "{}", g.pixel(0, 0, 0));

    // Grey PNG: replicated into three planes, or kept as one.
    let c0 = rgb.get(1).unwrap();
    assert_eq!(c0.label, 1);
    let values = [0., 50., 100., 150., 200., 250.];
    for c in 0..3 {
        assert_eq!(c0.image.plane(c), &values);
    }
    assert_eq!(grey.get(1).unwrap().image.data(), &values);

    // JPEG (lossy): close to the uniform colour written.
    let c1 = rgb.get(2).unwrap().image;
    assert_eq!(c1.shape(), [3, 8, 8]);
    for (c, want) in [200.0f32, 100.0, 50.0].into_iter().enumerate() {
        let mean = c1.plane(c).iter().sum::<f32>() / 64.0;
        assert!((mean - want).abs() < 4.0, "channel {c}: {mean} vs {want}");
    }

    // RGBA PNG: alpha dropped.
    let d0 = rgb.get(3).unwrap();
    assert_eq!(d0.label, 2);
    assert_eq!(d0.image.shape(), [3, 2, 3]);
    assert_eq!(d0.image.plane(0), &[0., 40., 80., 120., 160., 200.]);
    assert_eq!(d0.image.plane(1), &[1.; 6]);
}

#[test]
fn loader_reports_a_file_corrupt_past_its_header_and_goes_on() {
    let t = Tree::new();
    let ds = ImageFolder::builder(t.root()).on_error(OnError::Skip).build().unwrap();
    // Samples 0..5: b0, c0, c1, d0, d2 (the cut PNG); batches of one, so only batch 4 fails.
    let loader =
        DataLoader::builder(ds).batch_size(1).workers(2).transform(kiln::data::CenterCrop::new(2, 2)).build().unwrap();
    let results: Vec<_> = loader.epoch(0).collect();
    assert_eq!(results.len(), 5);
    for (k, r) in results.iter().enumerate() {
        match (k, r) {
            (4, Err(e)) => assert!(e.to_string().contains("d2.png"), "{e}"),
            (4, Ok(_)) => panic!("the cut PNG decoded"),
            (_, Err(e)) => panic!("batch {k}: {e}"),
            (_, Ok(b)) => assert_eq!(b.indices, [k]),
        }
    }
}

#[test]
fn layout_problems_are_errors() {
    let tmp = TempDir::new("folder-empty");
    let err = ImageFolder::new(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("no class folders"), "{err}");

    fs::create_dir_all(tmp.path().join("a")).unwrap();
    fs::write(tmp.path().join("a/readme.txt"), "x").unwrap();
    let err = ImageFolder::new(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("a") && err.to_string().contains("no .jpg"), "{err}");

    let err = ImageFolder::new(tmp.path().join("missing")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}
