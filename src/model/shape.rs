//! Shape inference and validation: what each layer makes of its input's shape, and every rule
//! that makes a layer invalid, with an error naming the layer and the reason.
//!
//! Shapes here are per sample (no batch axis): `[C, H, W]` for images, `[F]` for features.

use super::layers::{Activation, Conv2d, Layer, Linear, Padding, Pool2d};
use crate::{Error, Result};

/// A convolution's geometry resolved against its input: symmetric padding and output size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvResolved {
    pub pad: (usize, usize),
    pub out_hw: (usize, usize),
}

pub(crate) fn dims_str(s: &[usize]) -> String {
    format!("{s:?}")
}

fn need_4d(name: &str, what: &str, input: &[usize]) -> Result<(usize, usize, usize)> {
    match input {
        [c, h, w] => Ok((*c, *h, *w)),
        _ => Err(Error::layer(
            name,
            format!("{what} needs a [batch, C, H, W] input, got per-sample shape {}", dims_str(input)),
        )),
    }
}

fn positive(name: &str, what: &str, v: usize) -> Result<()> {
    if v == 0 { Err(Error::layer(name, format!("{what} must be at least 1, got 0"))) } else { Ok(()) }
}

/// Output length of a window of extent `eff` sliding with `stride` over `len + 2 * pad`.
fn window_out(name: &str, axis: &str, len: usize, pad: usize, eff: usize, stride: usize) -> Result<usize> {
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

/// Checks a layer's size options against [`MAX_OPTION`]: the one check the builder
/// ([`infer`]) and the loader (`restore.rs`) share.
pub(crate) fn check_options(name: &str, layer: &Layer) -> Result<()> {
    let bounded = |what: &str, vs: &[usize]| -> Result<()> {
        match vs.iter().find(|&&v| v > MAX_OPTION) {
            Some(&v) => Err(Error::layer(name, format!("{what} = {v} is larger than {MAX_OPTION}"))),
            None => Ok(()),
        }
    };
    let pool = |p: &Pool2d| {
        bounded("pool kernel", &[p.kernel.0, p.kernel.1])?;
        bounded("pool stride", &[p.stride.0, p.stride.1])?;
        bounded("pool padding", &[p.padding.0, p.padding.1])
    };
    match layer {
        Layer::Conv2d(c) => {
            bounded("out_channels", &[c.out_channels])?;
            bounded("kernel", &[c.kernel.0, c.kernel.1])?;
            bounded("stride", &[c.stride.0, c.stride.1])?;
            bounded("dilation", &[c.dilation.0, c.dilation.1])?;
            bounded("groups", &[c.groups])?;
            // usize::MAX marks a padding string that was not understood (resolve_conv says so).
            if let Padding::Explicit(h, w) = c.padding
                && h != usize::MAX
                && w != usize::MAX
            {
                bounded("padding", &[h, w])?;
            }
            Ok(())
        }
        Layer::Linear(l) => bounded("out_features", &[l.out_features]),
        Layer::Reshape(dims) => bounded("reshape dimension", dims),
        Layer::MaxPool2d(p) | Layer::AvgPool2d(p) => pool(p),
        _ => Ok(()),
    }
}

/// Resolves a convolution's padding and output size for a `[C, H, W]` input.
pub fn resolve_conv(name: &str, conv: &Conv2d, input: &[usize]) -> Result<ConvResolved> {
    let (c, h, w) = need_4d(name, "conv2d", input)?;
    positive(name, "out_channels", conv.out_channels)?;
    positive(name, "kernel height", conv.kernel.0)?;
    positive(name, "kernel width", conv.kernel.1)?;
    positive(name, "stride", conv.stride.0.min(conv.stride.1))?;
    positive(name, "dilation", conv.dilation.0.min(conv.dilation.1))?;
    positive(name, "groups", conv.groups)?;
    if !c.is_multiple_of(conv.groups) || !conv.out_channels.is_multiple_of(conv.groups) {
        return Err(Error::layer(
            name,
            format!(
                "groups = {} must divide both input channels ({c}) and out_channels ({})",
                conv.groups, conv.out_channels
            ),
        ));
    }
    let eff = (conv.dilation.0 * (conv.kernel.0 - 1) + 1, conv.dilation.1 * (conv.kernel.1 - 1) + 1);
    let pad = match conv.padding {
        Padding::Valid => (0, 0),
        Padding::Explicit(ph, pw) => {
            if ph == usize::MAX || pw == usize::MAX {
                return Err(Error::layer(name, "padding must be \"same\", \"valid\" or a number"));
            }
            (ph, pw)
        }
        Padding::Same => {
            if conv.stride != (1, 1) {
                return Err(Error::layer(
                    name,
                    format!("padding \"same\" needs stride 1, got stride {:?}", conv.stride),
                ));
            }
            let (th, tw) = (eff.0 - 1, eff.1 - 1);
            if th % 2 == 1 || tw % 2 == 1 {
                return Err(Error::layer(
                    name,
                    format!(
                        "padding \"same\" with kernel {:?} and dilation {:?} needs uneven padding \
                         (kiln pads symmetrically); use an odd kernel or explicit padding",
                        conv.kernel, conv.dilation
                    ),
                ));
            }
            (th / 2, tw / 2)
        }
    };
    let oh = window_out(name, "height", h, pad.0, eff.0, conv.stride.0)?;
    let ow = window_out(name, "width", w, pad.1, eff.1, conv.stride.1)?;
    Ok(ConvResolved { pad, out_hw: (oh, ow) })
}

/// Output `(oh, ow)` of a pooling window over a `[C, H, W]` input.
pub fn resolve_pool(name: &str, pool: &Pool2d, input: &[usize]) -> Result<(usize, usize)> {
    let (_, h, w) = need_4d(name, "pooling", input)?;
    positive(name, "kernel height", pool.kernel.0)?;
    positive(name, "kernel width", pool.kernel.1)?;
    positive(name, "stride", pool.stride.0.min(pool.stride.1))?;
    if pool.padding.0 > pool.kernel.0 / 2 || pool.padding.1 > pool.kernel.1 / 2 {
        return Err(Error::layer(
            name,
            format!("padding {:?} must be at most half the kernel {:?} (as in PyTorch)", pool.padding, pool.kernel),
        ));
    }
    let oh = window_out(name, "height", h, pool.padding.0, pool.kernel.0, pool.stride.0)?;
    let ow = window_out(name, "width", w, pool.padding.1, pool.kernel.1, pool.stride.1)?;
    Ok((oh, ow))
}

fn check_activation(name: &str, a: &Activation) -> Result<()> {
    match *a {
        Activation::LeakyRelu { slope } if !slope.is_finite() => {
            Err(Error::layer(name, format!("leaky_relu slope must be finite, got {slope}")))
        }
        Activation::Elu { alpha } if !alpha.is_finite() => {
            Err(Error::layer(name, format!("elu alpha must be finite, got {alpha}")))
        }
        _ => Ok(()),
    }
}

/// The per-sample output shape of `layer` (named `name`) for the given per-sample input shapes,
/// or the reason the layer cannot take them.
pub fn infer(name: &str, layer: &Layer, inputs: &[&[usize]]) -> Result<Vec<usize>> {
    check_options(name, layer)?;
    let one = || -> Result<&[usize]> {
        match inputs {
            [x] => Ok(x),
            _ => Err(Error::layer(name, format!("expects one input, got {}", inputs.len()))),
        }
    };
    match layer {
        Layer::Input => Err(Error::layer(name, "an input layer can only be the first node")),
        Layer::Conv2d(conv) => {
            let r = resolve_conv(name, conv, one()?)?;
            Ok(vec![conv.out_channels, r.out_hw.0, r.out_hw.1])
        }
        Layer::Linear(Linear { out_features, .. }) => {
            one()?;
            positive(name, "out_features", *out_features)?;
            Ok(vec![*out_features])
        }
        Layer::Flatten => Ok(vec![one()?.iter().product()]),
        Layer::Reshape(target) => {
            let x = one()?;
            if target.is_empty() || target.contains(&0) {
                return Err(Error::layer(name, format!("reshape target {target:?} must have non-zero dimensions")));
            }
            let a: usize = x.iter().product();
            // Checked: a target whose count overflows must not wrap to a small number.
            let Some(b) = target.iter().try_fold(1usize, |p, &d| p.checked_mul(d)) else {
                return Err(Error::layer(
                    name,
                    format!(
                        "cannot reshape {} ({a} values per sample) into {target:?} (more than {} values)",
                        dims_str(x),
                        usize::MAX
                    ),
                ));
            };
            if a != b {
                return Err(Error::layer(
                    name,
                    format!("cannot reshape {} ({a} values per sample) into {target:?} ({b} values)", dims_str(x)),
                ));
            }
            Ok(target.clone())
        }
        Layer::Activation(a) => {
            check_activation(name, a)?;
            Ok(one()?.to_vec())
        }
        Layer::Softmax { axis } => {
            let x = one()?;
            let rank = x.len() as isize + 1;
            if *axis < -rank || *axis >= rank {
                return Err(Error::layer(
                    name,
                    format!("softmax axis {axis} is out of range for a rank-{rank} tensor (batch included)"),
                ));
            }
            Ok(x.to_vec())
        }
        Layer::Dropout { rate } => {
            if !(0.0..1.0).contains(rate) {
                return Err(Error::layer(name, format!("dropout rate must be in [0, 1), got {rate}")));
            }
            Ok(one()?.to_vec())
        }
        Layer::GroupNorm(gn) => super::layers::group_norm::infer(name, gn, one()?),
        Layer::BatchNorm(bn) => super::layers::batch_norm::infer(name, bn, one()?),
        Layer::MaxPool2d(p) | Layer::AvgPool2d(p) => {
            let x = one()?;
            let (oh, ow) = resolve_pool(name, p, x)?;
            Ok(vec![x[0], oh, ow])
        }
        Layer::GlobalAvgPool => {
            let (c, _, _) = need_4d(name, "global_avg_pool", one()?)?;
            Ok(vec![c])
        }
        Layer::Add => {
            if inputs.len() < 2 {
                return Err(Error::layer(name, format!("add needs at least two inputs, got {}", inputs.len())));
            }
            for x in &inputs[1..] {
                if *x != inputs[0] {
                    return Err(Error::layer(
                        name,
                        format!(
                            "cannot add branches of shapes {} and {} (per sample); \
                             a projection shortcut can match them",
                            dims_str(inputs[0]),
                            dims_str(x)
                        ),
                    ));
                }
            }
            Ok(inputs[0].to_vec())
        }
        Layer::Concat => {
            if inputs.len() < 2 {
                return Err(Error::layer(name, format!("concat needs at least two inputs, got {}", inputs.len())));
            }
            let first = inputs[0];
            let mut channels = 0;
            for x in inputs {
                if x.len() != first.len() || x[1..] != first[1..] {
                    return Err(Error::layer(
                        name,
                        format!(
                            "cannot concatenate branches of shapes {} and {} along channels: \
                             all other dimensions must match",
                            dims_str(first),
                            dims_str(x)
                        ),
                    ));
                }
                channels += x[0];
            }
            let mut out = first.to_vec();
            out[0] = channels;
            Ok(out)
        }
    }
}
