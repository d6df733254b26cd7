//! Shape inference and validation: what each layer makes of its input's shape, and every rule
//! that makes a layer invalid, with an error naming the layer and the reason.
//!
//! Shapes here are per sample (no batch axis): `[C, H, W]` for images, `[F]` for features.

use super::layers::Layer;
use crate::{Error, Result};

pub use super::layers::conv2d::{ConvResolved, resolve_conv};
pub use super::layers::pool::resolve_pool;

pub(crate) fn dims_str(s: &[usize]) -> String {
    format!("{s:?}")
}

/// `(C, H, W)` of a per-sample image shape, or an error saying `what` needs one.
pub(crate) fn need_4d(name: &str, what: &str, input: &[usize]) -> Result<(usize, usize, usize)> {
    match input {
        [c, h, w] => Ok((*c, *h, *w)),
        _ => Err(Error::layer(
            name,
            format!("{what} needs a [batch, C, H, W] input, got per-sample shape {}", dims_str(input)),
        )),
    }
}

/// An error unless `v` is at least 1.
pub(crate) fn positive(name: &str, what: &str, v: usize) -> Result<()> {
    if v == 0 { Err(Error::layer(name, format!("{what} must be at least 1, got 0"))) } else { Ok(()) }
}

/// Output length of a window of extent `eff` sliding with `stride` over `len + 2 * pad`.
pub(crate) fn window_out(name: &str, axis: &str, len: usize, pad: usize, eff: usize, stride: usize) -> Result<usize> {
    let padded = len + 2 * pad;
    if eff > padded {
        return Err(Error::layer(
            name,
            format!("kernel extent {eff} along {axis} is larger than the padded input ({len} + 2*{pad} = {padded})"),
        ));
    }
    Ok((padded - eff) / stride + 1)
}

/// Largest value a size option (channels, kernel, stride, padding, dilation, ...) may have, in
/// the builder and in a model file alike: far beyond real models, small enough that no shape
/// arithmetic on it can overflow or make a kernel index out of range.
pub(crate) const MAX_OPTION: usize = 1 << 24;

/// An error naming the first of `vs` larger than [`MAX_OPTION`].
pub(crate) fn bounded(name: &str, what: &str, vs: &[usize]) -> Result<()> {
    match vs.iter().find(|&&v| v > MAX_OPTION) {
        Some(&v) => Err(Error::layer(name, format!("{what} = {v} is larger than {MAX_OPTION}"))),
        None => Ok(()),
    }
}

/// Checks a layer's size options against [`MAX_OPTION`]: the one check the builder
/// ([`infer`]) and the loader (`restore.rs`) share.
pub(crate) fn check_options(name: &str, layer: &Layer) -> Result<()> {
    layer.with_kind(|k| k.check_options(name))
}

/// The per-sample output shape of `layer` (named `name`) for the given per-sample input shapes,
/// or the reason the layer cannot take them.
pub fn infer(name: &str, layer: &Layer, inputs: &[&[usize]]) -> Result<Vec<usize>> {
    check_options(name, layer)?;
    layer.with_kind(|k| k.infer_inputs(name, inputs))
}
