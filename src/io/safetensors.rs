//! The safetensors format as kiln reads and writes it: parsing with every bound checked before
//! the `safetensors` crate sees the bytes, tensors decoded to host values, a checksum over
//! everything kiln writes, and atomic file replacement.
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
//! dtype, shape, byte offsets into the data; plus a `__metadata__` string map), and the data.
//! The `safetensors` crate lays files out and checks offsets against shapes, but its reader adds
//! header length and offsets unchecked (a crafted header can overflow that sum: a panic in debug
//! builds, see `tests/checkpoint/corruption.rs`), so [`parse`] checks every offset against the
//! real data length first.
//!
//! The format has no checksum, so a flipped bit in tensor data would load as a different weight.
//! Every file kiln writes carries one in `__metadata__["kiln.checksum"]` (see [`Checksum`]) next
//! to `kiln.format_version`; files without either (PyTorch's) load unverified.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ::safetensors::{Dtype, SafeTensors, View};

use crate::{Error, Result};

/// Metadata key of the checksum of a file written by kiln.
pub(crate) const CHECKSUM_KEY: &str = "kiln.checksum";

/// Metadata key of kiln's file format version. A file with it must have the checksum too, so a
/// flipped bit in the checksum's key cannot make a kiln file pass as an unchecked one.
pub(crate) const VERSION_KEY: &str = "kiln.format_version";

/// A tensor to write: dtype, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Entry {
    pub fn f32(shape: Vec<usize>, v: &[f32]) -> Entry {
        Entry { dtype: Dtype::F32, shape, bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }

    pub fn f64(shape: Vec<usize>, v: &[f64]) -> Entry {
        Entry { dtype: Dtype::F64, shape, bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }

    pub fn i64(shape: Vec<usize>, v: &[i64]) -> Entry {
        Entry { dtype: Dtype::I64, shape, bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }
}

impl View for &Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// One tensor of a parsed file: its bytes are a slice of the file.
pub(crate) struct Raw<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value = m * 2^-24, exactly representable in f32.
            let v = m as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

impl Raw<'_> {
    /// The values as f32: F32 as is, F16 and BF16 widened exactly, F64 rounded.
    pub fn to_f32(&self) -> std::result::Result<Vec<f32>, String> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F64 => {
                b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect()
            }
            Dtype::F16 => b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            Dtype::BF16 => {
                b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            d => return Err(format!("dtype {d:?} where a floating-point tensor (F32, F64, F16, BF16) is expected")),
        })
    }

    /// The values as f32, exactly: F32 only.
    pub fn to_f32_exact(&self) -> std::result::Result<Vec<f32>, String> {
        match self.dtype {
            Dtype::F32 => self.to_f32(),
            d => Err(format!("dtype {d:?}, expected F32")),
        }
    }

    /// The values as f64: F64 only.
    pub fn to_f64_exact(&self) -> std::result::Result<Vec<f64>, String> {
        match self.dtype {
            Dtype::F64 => {
                Ok(self.bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
            }
            d => Err(format!("dtype {d:?}, expected F64")),
        }
    }

    /// Whether this is one integer (shape `[]` or `[1]`), as PyTorch's `num_batches_tracked`.
    pub fn is_integer_scalar(&self) -> bool {
        let int = matches!(
            self.dtype,
            Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::I8 | Dtype::U64 | Dtype::U32 | Dtype::U16 | Dtype::U8
        );
        int && (self.shape.is_empty() || self.shape == [1])
    }
}

/// A parsed file.
pub(crate) struct Parsed<'a> {
    pub tensors: BTreeMap<String, Raw<'a>>,
    pub metadata: BTreeMap<String, String>,
}

/// A 64-bit checksum, not cryptographic: it detects accidental corruption (a torn write, a
/// flipped bit), not tampering. Each step `h = rotl((h ^ w) * P, 29)` is a bijection of `h` for a
/// fixed word `w` and of `w` for a fixed `h`, so changing any single 8-byte word of the input
/// always changes the result.
pub(crate) struct Checksum(u64);

impl Checksum {
    const P: u64 = 0x9E37_79B9_7F4A_7C15;

    fn new() -> Self {
        Checksum(0xCBF2_9CE4_8422_2325)
    }

    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(Self::P).rotate_left(29);
    }

    /// Hashes a length-prefixed byte string.
    fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(w));
        }
    }

    fn tensor(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) {
        self.bytes(name.as_bytes());
        self.bytes(format!("{dtype:?}").as_bytes());
        self.word(shape.len() as u64);
        for &d in shape {
            self.word(d as u64);
        }
        self.bytes(data);
    }

    /// The checksum of a file's content: metadata (but the checksum) and tensors, by name.
    fn of<'b>(
        metadata: &BTreeMap<String, String>,
        tensors: impl Iterator<Item = (&'b str, Dtype, &'b [usize], &'b [u8])>,
    ) -> String {
        let mut h = Checksum::new();
        for (k, v) in metadata.iter().filter(|(k, _)| *k != CHECKSUM_KEY) {
            h.bytes(k.as_bytes());
            h.bytes(v.as_bytes());
        }
        h.word(u64::MAX);
        for (name, dtype, shape, data) in tensors {
            h.tensor(name, dtype, shape, data);
        }
        format!("{:016x}", h.0)
    }
}

/// Serialises tensors and metadata, adding the checksum.
pub(crate) fn encode(tensors: &BTreeMap<String, Entry>, mut metadata: BTreeMap<String, String>) -> Result<Vec<u8>> {
    metadata.remove(CHECKSUM_KEY);
    let sum = Checksum::of(&metadata, tensors.iter().map(|(n, e)| (n.as_str(), e.dtype, &e.shape[..], &e.bytes[..])));
    metadata.insert(CHECKSUM_KEY.into(), sum);
    let metadata = metadata.into_iter().collect();
    ::safetensors::serialize(tensors.iter().map(|(n, e)| (n.as_str(), e)), Some(metadata))
        .map_err(|e| Error::State(format!("could not serialise tensors: {e}")))
}

/// Parses a safetensors file held in `bytes` (`path` only names it in errors), checking every
/// bound, and the checksum where the file has one.
pub(crate) fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<Parsed<'a>> {
    let fail = |reason: String| Error::format(path, reason);
    let len = bytes.len();
    let Some(head) = bytes.get(..8) else {
        return Err(fail(format!("{len} bytes is too short for a safetensors file (it starts with an 8-byte length)")));
    };
    let n = u64::from_le_bytes(head.try_into().unwrap_or([0; 8]));
    if n > (len - 8) as u64 {
        return Err(fail(format!(
            "header length {n} runs past the end of the file ({len} bytes): truncated or not safetensors"
        )));
    }
    let header = &bytes[8..8 + n as usize];
    let data_len = len - 8 - n as usize;
    let json: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| fail(format!("header is not valid JSON: {e}")))?;
    let Some(obj) = json.as_object() else {
        return Err(fail("header is not a JSON object".into()));
    };
    for (name, info) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        let (s, e) = match offsets.map(|o| o.as_slice()) {
            Some([s, e]) => (s.as_u64(), e.as_u64()),
            _ => (None, None),
        };
        match (s, e) {
            (Some(s), Some(e)) if s <= e && e <= data_len as u64 => {}
            _ => {
                return Err(fail(format!(
                    "tensor '{name}': data_offsets {} are not within the {data_len} data bytes",
                    info.get("data_offsets").map(|o| o.to_string()).unwrap_or_else(|| "(missing)".into())
                )));
            }
        }
    }
    // The crate checks the offsets against each other and the shapes, and that the data is exactly
    // as long as they say.
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| fail(format!("invalid safetensors file: {e}")))?;
    let metadata: BTreeMap<String, String> =
        meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    let data = &bytes[8 + n as usize..];
    let mut tensors = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        let Some(bytes) = data.get(s..e) else {
            return Err(fail(format!("tensor '{name}': data_offsets [{s}, {e}] out of bounds")));
        };
        tensors.insert(name, Raw { dtype: info.dtype, shape: info.shape.clone(), bytes });
    }
    if metadata.contains_key(VERSION_KEY) && !metadata.contains_key(CHECKSUM_KEY) {
        return Err(fail(format!("a kiln file without its checksum ('{CHECKSUM_KEY}'): corrupt or altered")));
    }
    if let Some(expected) = metadata.get(CHECKSUM_KEY) {
        let got =
            Checksum::of(&metadata, tensors.iter().map(|(n, r)| (n.as_str(), r.dtype, r.shape.as_slice(), r.bytes)));
        if *expected != got {
            return Err(fail(format!(
                "checksum mismatch (stored {expected}, computed {got}): the file is corrupt or was altered"
            )));
        }
    }
    Ok(Parsed { tensors, metadata })
}

/// Reads a whole file.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io(path, e))
}

/// Replaces `path` with `bytes` atomically: a temporary file in the same directory is written,
/// flushed to disk, renamed over `path`, and the directory is flushed, so a crash or kill at any
/// moment leaves either the old file or the new one, never a mix. A temporary file left by a
/// killed process is named `.{file name}.tmp-{pid}-{k}`; each write removes those of `path` whose
/// writer is no longer running (as [`crate::io::CheckpointManager`] does for its directory), so
/// saving to one path again and again after kills does not pile them up.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io = |e| Error::io(path, e);
    let Some(name) = path.file_name() else {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path")));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    sweep_dead_writers(dir, &name.to_string_lossy());
    let k = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{k}", name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    sync_dir(dir).map_err(io)
}

/// Removes `dir/.{name}.tmp-{pid}-{k}` files whose process `pid` has exited. A file of this
/// process or of a live one (another writer of the same path, mid-write) is left alone; where
/// liveness cannot be told (not unix), nothing is removed. Failures are ignored: sweeping is
/// housekeeping, the write itself does not depend on it.
fn sweep_dead_writers(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else { continue };
        let Some(pid) = rest.split_once('-').and_then(|(pid, k)| {
            (k.bytes().all(|b| b.is_ascii_digit()) && !k.is_empty()).then(|| pid.parse::<u32>().ok()).flatten()
        }) else {
            continue;
        };
        if pid != std::process::id() && process_is_gone(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Whether no process `pid` exists (signal 0 checks without sending anything).
#[cfg(unix)]
fn process_is_gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists; it takes no pointers.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

#[cfg(not(unix))]
fn process_is_gone(_pid: u32) -> bool {
    false
}

/// Flushes a directory's entries (the rename) to disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_widens_exactly() {
        for (h, f) in [(0x3c00u16, 1.0f32), (0xc000, -2.0), (0x0001, 5.960_464_5e-8), (0x7bff, 65504.0), (0, 0.0)] {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn the_checksum_sees_every_single_word_change() {
        let data: Vec<u8> = (0..64u8).collect();
        let base = Checksum::of(&BTreeMap::new(), [("w", Dtype::F32, &[16usize][..], &data[..])].into_iter());
        for i in 0..data.len() {
            let mut d = data.clone();
            d[i] ^= 0x10;
            let s = Checksum::of(&BTreeMap::new(), [("w", Dtype::F32, &[16usize][..], &d[..])].into_iter());
            assert_ne!(s, base, "byte {i}");
        }
    }
}
