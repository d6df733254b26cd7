//! Kernel choices the backend makes by itself and that tests and tuning can force: the matrix
//! products' workgroup tile (chosen per shape by `gemm::plan`, forced with
//! `KILN_WGPU_GEMM_TILE=128x128` or [`WgpuBackend::force_gemm_tile`]) and whether reductions use
//! subgroup operations (on where the adapter offers `Features::SUBGROUP`; `KILN_WGPU_SUBGROUPS=0`
//! or [`WgpuBackend::use_subgroups`] turns them off, so both paths can be tested on one adapter).

use super::WgpuBackend;
use super::gemm::{TILES, Tile};
use crate::{Error, Result};

/// The choices in force for the kernels recorded next.
#[derive(Clone, Debug, Default)]
pub(super) struct Choice {
    /// A tile every matrix product uses instead of its own choice.
    pub gemm_tile: Option<Tile>,
    /// Reductions with subgroup operations (only where the device has `SUBGROUP`).
    pub subgroups: bool,
}

/// A tile's name: its rows x columns (`64x64`, `128x128`, ...).
fn tile_name(t: Tile) -> String {
    format!("{}x{}", t.wy * t.tm, (256 / t.wy) * t.tn)
}

fn parse_tile(name: &str) -> Result<Tile> {
    TILES.iter().copied().find(|&t| tile_name(t) == name.trim()).ok_or_else(|| {
        Error::State(format!(
            "wgpu: no matrix-product tile {name:?} (there are {})",
            TILES.iter().map(|&t| tile_name(t)).collect::<Vec<_>>().join(", ")
        ))
    })
}

impl Choice {
    /// The choices from the environment, on a device that has subgroups or not; a tile that is
    /// not one of [`TILES`] is an error.
    pub fn from_env(has_subgroups: bool) -> Result<Choice> {
        let gemm_tile = match std::env::var("KILN_WGPU_GEMM_TILE") {
            Ok(v) if !v.is_empty() => Some(parse_tile(&v)?),
            _ => None,
        };
        let off = std::env::var("KILN_WGPU_SUBGROUPS").is_ok_and(|v| v == "0");
        Ok(Choice { gemm_tile, subgroups: has_subgroups && !off })
    }
}

impl WgpuBackend {
    /// The matrix-product tiles there are, by name (`64x64`, `128x64`, ...).
    pub fn gemm_tiles() -> Vec<String> {
        TILES.iter().map(|&t| tile_name(t)).collect()
    }

    /// Makes every matrix product recorded from now on use tile `name` (one of
    /// [`gemm_tiles`](Self::gemm_tiles)), or (`None`) its own choice per shape again.
    pub fn force_gemm_tile(&mut self, name: Option<&str>) -> Result<()> {
        self.choice.gemm_tile = name.map(parse_tile).transpose()?;
        self.cached.clear();
        Ok(())
    }

    /// Turns subgroup reductions on or off for the kernels recorded from now on; returns whether
    /// they are in use (never where the adapter has no subgroup operations).
    pub fn use_subgroups(&mut self, on: bool) -> bool {
        self.choice.subgroups = on && self.has_subgroups;
        self.cached.clear();
        self.choice.subgroups
    }
}
