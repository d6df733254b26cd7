//! Helpers shared by the integration tests: temporary folders, small images, the MNIST files,
//! and rendezvous ports for the data-parallel tests.
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

/// A port for a test group's rendezvous (rank 0 listens on it on every address), free when
/// returned and chosen so that nothing else is likely to take it before rank 0 binds it.
///
/// Binding port 0 and closing the socket (what `free_port` did) hands back a port from the
/// system's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`, 32768-60999 by
/// default), the range every ring listener (bound to port 0) and every outgoing connection of
/// the tests running at the same time draws from: one of them could take it first, and rank 0
/// then failed with "address in use", or a rank reached another group's socket. The ports here
/// lie below that range, are handed out in turn within this process (never twice), and start at
/// an offset given by the process id, so two test processes do not walk the same ports.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32768);
    let lo = 20_000usize;
    if ephemeral_low < lo + 1000 {
        // An unusual range: fall back to a port the system picks (racy, as explained above).
        return std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    }
    let span = ephemeral_low - lo;
    let start = (std::process::id() as usize).wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = (lo + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {lo}..{ephemeral_low}");
}
