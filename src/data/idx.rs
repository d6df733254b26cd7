//! The IDX file format (LeCun's, used by MNIST and Fashion-MNIST), raw or gzip-compressed, and the
//! [`Mnist`] dataset built on it.
//!
//! An IDX file is a 4-byte magic number (two zero bytes, a data-type byte, the number of
//! dimensions), one big-endian u32 per dimension, then the data in row-major order. Only the
//! unsigned-byte type (0x08) is read: it is the one every MNIST-like dataset uses.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::dataset::{Dataset, out_of_range};
use super::sample::{Image, Sample};
use crate::{Error, Result};

/// The contents of an IDX file of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first (MNIST images: `[n, 28, 28]`; labels: `[n]`).
    pub dims: Vec<usize>,
    /// `dims.iter().product()` bytes in row-major order.
    pub data: Vec<u8>,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const IDX_UBYTE: u8 = 0x08;
const MAX_DIMS: usize = 4;

/// Reads an IDX file of unsigned bytes, gzip-compressed or not (told by its first bytes, not its
/// name). A bad magic number, an unsupported type, or data shorter or longer than the dimensions
/// say is an [`Error::Format`] naming the path.
///
/// A compressed file is decompressed only as far as its header declares (plus one byte, to tell
/// "too long"): a small file that would expand to gigabytes (a gzip bomb) is refused after reading
/// what its header promises, not after filling memory.
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut file = std::io::BufReader::new(file);
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut file, &mut magic).map_err(|e| Error::io(path, e))?;
    let prefix = std::io::Cursor::new(magic[..n].to_vec());
    if magic[..n] == GZIP_MAGIC {
        let gz = flate2::read::MultiGzDecoder::new(prefix.chain(file));
        read_body(path, gz, true)
    } else {
        read_body(path, prefix.chain(file), false)
    }
}

/// Fills `buf` as far as the reader goes; the number of bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The header and then at most the declared data (plus one byte) from `r`.
fn read_body(path: &Path, mut r: impl Read, gzip: bool) -> Result<IdxArray> {
    let read_err = |e: std::io::Error| {
        if gzip { Error::format(path, format!("gzip data is corrupt or truncated: {e}")) } else { Error::io(path, e) }
    };
    let mut head = vec![0u8; 4];
    let n = read_up_to(&mut r, &mut head).map_err(read_err)?;
    head.truncate(n);
    if n == 4 && head[0] == 0 && head[1] == 0 && head[2] == IDX_UBYTE {
        let ndim = (head[3] as usize).min(MAX_DIMS);
        let mut dims = vec![0u8; 4 * ndim];
        let k = read_up_to(&mut r, &mut dims).map_err(read_err)?;
        head.extend_from_slice(&dims[..k]);
    }
    let (dims, _, expected) = parse_header(&head).map_err(|reason| Error::format(path, reason))?;
    let mut data = Vec::new();
    // Reserve what the header declares when that is possible; a header declaring more memory
    // than there is is refused here rather than aborting the process.
    if data.try_reserve_exact(expected).is_err() {
        return Err(Error::format(
            path,
            format!("dimensions {dims:?} declare {expected} bytes, more than can be allocated"),
        ));
    }
    let limit = u64::try_from(expected).unwrap_or(u64::MAX).saturating_add(1);
    r.take(limit).read_to_end(&mut data).map_err(read_err)?;
    let got = data.len();
    if got != expected {
        let what = if got < expected { "truncated" } else { "too long" };
        let got = if got > expected { format!("more than {expected}") } else { got.to_string() };
        return Err(Error::format(
            path,
            format!("{what}: dimensions {dims:?} need {expected} data bytes, the file has {got}"),
        ));
    }
    Ok(IdxArray { dims, data })
}

/// `(dims, header length, data length)`, or why the header is invalid.
fn parse_header(bytes: &[u8]) -> std::result::Result<(Vec<usize>, usize, usize), String> {
    if bytes.len() < 4 {
        return Err(format!("truncated: {} bytes, an IDX header needs at least 4", bytes.len()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!("not an IDX file: magic number starts {:02x} {:02x}, expected 00 00", bytes[0], bytes[1]));
    }
    if bytes[2] != IDX_UBYTE {
        return Err(format!("IDX data type 0x{:02x} is not supported (only 0x08, unsigned bytes)", bytes[2]));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 || ndim > MAX_DIMS {
        return Err(format!("IDX file with {ndim} dimensions (expected 1 to {MAX_DIMS})"));
    }
    let header_len = 4 + 4 * ndim;
    if bytes.len() < header_len {
        return Err(format!("truncated: {} bytes, the header of {ndim} dimensions needs {header_len}", bytes.len()));
    }
    let dims: Vec<usize> =
        bytes[4..header_len].chunks_exact(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize).collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    Ok((dims, header_len, expected))
}

/// Which part of a dataset: the training set or the test set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training set (`train-*` files, `data_batch_*.bin`).
    Train,
    /// The test set (`t10k-*` files, `test_batch.bin`).
    Test,
}

/// MNIST or Fashion-MNIST: 28x28 grey-scale images (1 channel, 0..=255) with labels 0..=9, held
/// in memory as bytes (47 MB for the 60,000 training images).
#[derive(Clone, Debug)]
pub struct Mnist {
    images: Vec<u8>,
    labels: Vec<u8>,
    height: usize,
    width: usize,
    classes: Vec<String>,
}

const FASHION_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

impl Mnist {
    /// MNIST from `dir`, which holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    /// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each raw or with `.gz` (the
    /// `*-images.idx3-ubyte` spelling of some mirrors is accepted too).
    pub fn new(dir: impl AsRef<Path>, split: Split) -> Result<Self> {
        let (images, labels) = find_files(dir.as_ref(), split)?;
        let digits = (0..10).map(|d| d.to_string()).collect();
        Mnist::load(&images, &labels, digits)
    }

    /// Fashion-MNIST from `dir`: the same file names and format as MNIST, other class names.
    pub fn fashion(dir: impl AsRef<Path>, split: Split) -> Result<Self> {
        let (images, labels) = find_files(dir.as_ref(), split)?;
        let names = FASHION_CLASSES.iter().map(|s| s.to_string()).collect();
        Mnist::load(&images, &labels, names)
    }

    /// From an images file and a labels file given by path (raw or gzip-compressed).
    pub fn from_files(images: impl AsRef<Path>, labels: impl AsRef<Path>) -> Result<Self> {
        let digits = (0..10).map(|d| d.to_string()).collect();
        Mnist::load(images.as_ref(), labels.as_ref(), digits)
    }

    fn load(images_path: &Path, labels_path: &Path, classes: Vec<String>) -> Result<Self> {
        let images = read_idx(images_path)?;
        let labels = read_idx(labels_path)?;
        let [n, height, width] = images.dims[..] else {
            return Err(Error::format(
                images_path,
                format!("an images file has 3 dimensions [n, height, width], this one {:?}", images.dims),
            ));
        };
        if n == 0 || height == 0 || width == 0 {
            return Err(Error::format(
                images_path,
                format!("holds no images (dimensions [n, height, width] = {:?})", images.dims),
            ));
        }
        if labels.dims.len() != 1 {
            return Err(Error::format(
                labels_path,
                format!("a labels file has 1 dimension [n], this one {:?}", labels.dims),
            ));
        }
        if labels.dims[0] != n {
            return Err(Error::format(
                labels_path,
                format!("holds {} labels but {} holds {n} images", labels.dims[0], images_path.display()),
            ));
        }
        if let Some((i, &l)) = labels.data.iter().enumerate().find(|&(_, &l)| l as usize >= classes.len()) {
            return Err(Error::format(
                labels_path,
                format!("label {l} of item {i} is not a class (0..={})", classes.len() - 1),
            ));
        }
        Ok(Mnist { images: images.data, labels: labels.data, height, width, classes })
    }

    /// The labels, in sample order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
}

impl Dataset for Mnist {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get(&self, index: usize) -> Result<Sample> {
        let label = *self.labels.get(index).ok_or_else(|| out_of_range(index, self.labels.len()))?;
        let n = self.height * self.width;
        let image = Image::from_chw_u8(1, self.height, self.width, &self.images[index * n..(index + 1) * n])?;
        Ok(Sample { image, label: label as u32 })
    }

    fn classes(&self) -> Option<&[String]> {
        Some(&self.classes)
    }
}

/// The (images, labels) files of `split` in `dir`, raw or gzip-compressed.
fn find_files(dir: &Path, split: Split) -> Result<(PathBuf, PathBuf)> {
    if !dir.is_dir() {
        return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory")));
    }
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let find = |kind: &str, rank: u8| -> Result<PathBuf> {
        let names = [format!("{prefix}-{kind}-idx{rank}-ubyte"), format!("{prefix}-{kind}.idx{rank}-ubyte")];
        for name in &names {
            for candidate in [name.clone(), format!("{name}.gz")] {
                let p = dir.join(candidate);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(Error::io(
            dir.join(&names[0]),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "not found, nor {0}.gz, {1} or {1}.gz (scripts/fetch-mnist.sh downloads MNIST)",
                    names[0], names[1]
                ),
            ),
        ))
    };
    Ok((find("images", 3)?, find("labels", 1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(dims: &[u32]) -> Vec<u8> {
        let mut b = vec![0, 0, IDX_UBYTE, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn an_endless_stream_is_read_only_as_far_as_the_header_declares() {
        // A header declaring 6 bytes, then zeros without end: reading stops after 7.
        let endless = std::io::Cursor::new(header(&[2, 3])).chain(std::io::repeat(0));
        let err = read_body(Path::new("endless"), endless, true).unwrap_err().to_string();
        assert!(err.contains("too long") && err.contains("more than 6"), "{err}");
    }

    #[test]
    fn headers_are_validated() {
        let mut ok = header(&[2, 3]);
        ok.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        let (dims, len, n) = parse_header(&ok).unwrap();
        assert_eq!((dims, len, n), (vec![2, 3], 12, 6));

        assert!(parse_header(&[0, 0, 8]).unwrap_err().contains("truncated"));
        assert!(parse_header(&[0x1f, 0, 8, 1, 0, 0, 0, 1]).unwrap_err().contains("not an IDX"));
        assert!(parse_header(&[0, 0, 0x0d, 1, 0, 0, 0, 1]).unwrap_err().contains("0x0d"));
        assert!(parse_header(&[0, 0, 8, 0]).unwrap_err().contains("0 dimensions"));
        assert!(parse_header(&[0, 0, 8, 2, 0, 0, 0, 1]).unwrap_err().contains("header"));
        let huge = header(&[u32::MAX, u32::MAX, u32::MAX]);
        if usize::BITS == 64 {
            assert!(parse_header(&huge).unwrap_err().contains("overflow"));
        }
    }
}
