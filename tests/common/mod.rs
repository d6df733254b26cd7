//! Helpers shared by the `data_*` integration tests: temporary folders and small images.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh folder under the system temp dir, removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("kiln-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes an 8-bit image (`channels` 1 = grey, 3 = RGB, 4 = RGBA) from HWC bytes; the format
/// follows the extension (.png or .jpg).
pub fn write_image(path: &Path, w: u32, h: u32, channels: u8, hwc: &[u8]) {
    use image::ExtendedColorType as C;
    let colour = match channels {
        1 => C::L8,
        3 => C::Rgb8,
        4 => C::Rgba8,
        _ => panic!("channels {channels}"),
    };
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::save_buffer(path, hwc, w, h, colour).unwrap();
}

/// The project's shared data folder (`../shared/data` beside the repository), where present.
pub fn shared_data() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    p.is_dir().then_some(p)
}
