//! [`ImageFolder`]: a class-per-folder tree of JPEG and PNG images, listed and checked when built,
//! decoded on demand.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use super::dataset::{Dataset, out_of_range};
use super::sample::{Image, Sample};
use super::transforms::grey_from_rgb;
use crate::{Error, Result};

/// What to do with a file that cannot be read or decoded when the dataset is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// Building fails with an error naming the file.
    #[default]
    Fail,
    /// The file is left out, with a warning on stderr, and listed by [`ImageFolder::skipped`].
    Skip,
}

/// How thoroughly each file is checked when the dataset is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Check {
    /// Read each file's header (format and size): finds unreadable, empty, non-image and
    /// mislabelled files at a small cost. A file whose pixel data is corrupt past a good header
    /// is found only when [`Dataset::get`] decodes it, and is then an error naming it.
    #[default]
    Header,
    /// Decode every image in full (on all cores): finds every bad file up front, at the cost of
    /// one decoding pass over the dataset.
    Decode,
}

/// A file left out under [`OnError::Skip`], and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The file left out.
    pub path: PathBuf,
    /// Why it could not be read or decoded.
    pub reason: String,
}

/// A tree of JPEG and PNG images with one folder per class, as torchvision's `ImageFolder` reads
/// it:
///
/// ```text
/// root/cat/001.png      label 0 ("cat": class folders sorted by name)
/// root/cat/x/002.jpg    label 0 (class folders are searched recursively)
/// root/dog/003.jpeg     label 1
/// ```
///
/// Hidden entries (".name") and files of other extensions are ignored. Files are listed and
/// checked ([`Check`]) when the dataset is built, and decoded by [`Dataset::get`] (in the loader's
/// workers). A file that cannot be read or decoded is never passed over silently: under
/// [`OnError::Fail`] building fails with its path; under [`OnError::Skip`] it is left out, a
/// warning is printed, and [`ImageFolder::skipped`] lists it with the reason.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    files: Vec<(PathBuf, u32)>,
    channels: usize,
    skipped: Vec<Skipped>,
}

/// Options for [`ImageFolder`]; [`ImageFolder::builder`] makes one.
#[derive(Clone, Debug)]
pub struct ImageFolderBuilder {
    root: PathBuf,
    channels: usize,
    on_error: OnError,
    check: Check,
}

impl ImageFolderBuilder {
    /// Channels of the images produced: 3 (RGB, the default; grey images are replicated) or 1
    /// (grey; colour images weighted 0.2989 R + 0.587 G + 0.114 B as torchvision does). An
    /// alpha channel is dropped.
    pub fn channels(mut self, channels: usize) -> Self {
        self.channels = channels;
        self
    }

    /// What to do with a bad file (default [`OnError::Fail`]).
    pub fn on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// How thoroughly files are checked when building (default [`Check::Header`]).
    pub fn check(mut self, check: Check) -> Self {
        self.check = check;
        self
    }

    /// Lists the class folders and their images, and checks each file.
    pub fn build(self) -> Result<ImageFolder> {
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::config(
                "ImageFolder channels",
                format!("must be 1 (grey) or 3 (RGB), got {}", self.channels),
            ));
        }
        let root = self.root;
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for dir in sorted_entries(&root)? {
            if !dir.is_dir() {
                continue;
            }
            let label = classes.len() as u32;
            let mut found = Vec::new();
            collect_images(&dir, &mut found)?;
            if found.is_empty() {
                return Err(Error::format(&dir, "class folder holds no .jpg, .jpeg or .png files"));
            }
            files.extend(found.into_iter().map(|p| (p, label)));
            classes.push(dir.file_name().unwrap_or_default().to_string_lossy().into());
        }
        if classes.is_empty() {
            return Err(Error::format(&root, "no class folders (expected root/<class>/<image>.png|jpg)"));
        }

        let problems = check_all(&files, self.check, self.channels);
        let mut skipped = Vec::new();
        let mut kept = Vec::with_capacity(files.len());
        for ((path, label), problem) in files.into_iter().zip(problems) {
            match problem {
                None => kept.push((path, label)),
                Some(err) if self.on_error == OnError::Fail => return Err(err),
                Some(err) => skipped.push(Skipped {
                    path,
                    reason: match err {
                        Error::Format { reason, .. } => reason,
                        Error::Io { source, .. } => source.to_string(),
                        other => other.to_string(),
                    },
                }),
            }
        }
        if kept.is_empty() {
            let first = &skipped[0];
            return Err(Error::format(
                &root,
                format!(
                    "every one of its {} image files is unreadable and was skipped (first: {}: {})",
                    skipped.len(),
                    first.path.display(),
                    first.reason
                ),
            ));
        }
        if !skipped.is_empty() {
            warn_skipped(&root, &skipped);
        }
        Ok(ImageFolder { root, classes, files: kept, channels: self.channels, skipped })
    }
}

impl ImageFolder {
    /// The images under `root` as RGB, failing on any bad file; see [`ImageFolder::builder`].
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        ImageFolder::builder(root).build()
    }

    /// Options: channel count, what to do with bad files, how to check them.
    pub fn builder(root: impl AsRef<Path>) -> ImageFolderBuilder {
        ImageFolderBuilder {
            root: root.as_ref().to_path_buf(),
            channels: 3,
            on_error: OnError::default(),
            check: Check::default(),
        }
    }

    /// The folder the classes were listed from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The files kept, with their labels, in sample order.
    pub fn files(&self) -> &[(PathBuf, u32)] {
        &self.files
    }

    /// The files left out under [`OnError::Skip`], in path order.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn get(&self, index: usize) -> Result<Sample> {
        let (path, label) = self.files.get(index).ok_or_else(|| out_of_range(index, self.files.len()))?;
        let image = decode(path, self.channels)?;
        Ok(Sample { image, label: *label })
    }

    fn classes(&self) -> Option<&[String]> {
        Some(&self.classes)
    }

    fn path(&self, index: usize) -> Option<&Path> {
        self.files.get(index).map(|(p, _)| p.as_path())
    }
}

/// Decodes one JPEG or PNG file into a `channels`-channel image of 0..=255 values.
pub(crate) fn decode(path: &Path, channels: usize) -> Result<Image> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::format(path, format!("cannot decode image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let colour = img.color().has_color();
    if channels == 1 && !colour {
        return Image::from_hwc_u8(h, w, 1, img.to_luma8().as_raw());
    }
    let rgb = Image::from_hwc_u8(h, w, 3, img.to_rgb8().as_raw())?;
    Ok(if channels == 1 { grey_from_rgb(&rgb) } else { rgb })
}

/// What [`Check::Header`] reads: the format and the dimensions.
fn check_header(path: &Path) -> Result<()> {
    image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .into_dimensions()
        .map_err(|e| Error::format(path, format!("not a readable image: {e}")))?;
    Ok(())
}

/// Checks every file, spread over the machine's cores; `None` where a file is good.
fn check_all(files: &[(PathBuf, u32)], check: Check, channels: usize) -> Vec<Option<Error>> {
    let one = |path: &Path| match check {
        Check::Header => check_header(path).err(),
        Check::Decode => decode(path, channels).err(),
    };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if threads < 2 || files.len() < 64 {
        return files.iter().map(|(p, _)| one(p)).collect();
    }
    let chunk = files.len().div_ceil(threads);
    std::thread::scope(|s| {
        let check_part = |part: &[(PathBuf, u32)]| part.iter().map(|(p, _)| one(p)).collect();
        // Spawn one checker per chunk; where the OS refuses a thread, that chunk is checked
        // here after the others are started.
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                let spawned = std::thread::Builder::new()
                    .name("kiln-folder-check".into())
                    .spawn_scoped(s, move || check_part(part));
                (part, spawned.ok())
            })
            .collect();
        let mut out: Vec<Option<Error>> = Vec::with_capacity(files.len());
        for (part, handle) in handles {
            let results: Vec<Option<Error>> = match handle {
                None => check_part(part),
                // A checker only panics on a decoder bug: report it against the chunk's files.
                Some(h) => h.join().unwrap_or_else(|_| {
                    part.iter().map(|(p, _)| Some(Error::format(p, "the image decoder panicked"))).collect()
                }),
            };
            out.extend(results);
        }
        out
    })
}

fn warn_skipped(root: &Path, skipped: &[Skipped]) {
    const SHOWN: usize = 5;
    eprintln!(
        "kiln: warning: ImageFolder {}: skipped {} unreadable file(s) (ImageFolder::skipped lists them):",
        root.display(),
        skipped.len()
    );
    for s in skipped.iter().take(SHOWN) {
        eprintln!("kiln: warning:   {}: {}", s.path.display(), s.reason);
    }
    if skipped.len() > SHOWN {
        eprintln!("kiln: warning:   ... and {} more", skipped.len() - SHOWN);
    }
}

/// The entries of `dir`, hidden ones (".name") left out, sorted by path.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["png", "jpg", "jpeg"].iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Appends the image files under `dir`, recursively, in sorted order.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for path in sorted_entries(dir)? {
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if is_image_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_matched_without_case() {
        assert!(is_image_file(Path::new("a/b.PNG")));
        assert!(is_image_file(Path::new("a/b.jpeg")));
        assert!(is_image_file(Path::new("b.Jpg")));
        assert!(!is_image_file(Path::new("b.txt")));
        assert!(!is_image_file(Path::new("png")));
    }

    #[test]
    fn bad_channel_count_is_a_config_error() {
        let err = ImageFolder::builder(".").channels(2).build().unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
    }
}
