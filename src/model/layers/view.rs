//! Flatten and Reshape, whole: views of their input (the same buffer seen with another shape, so
//! their gradient is their input's too). Shape rules; no ops, no FLOPs, no memory of their own.

use crate::model::Layer;
use crate::model::lower::Forward;
use crate::model::shape::dims_str;
use crate::{Error, Result};

/// Whether a layer's output is its input's buffer seen with another shape.
pub(crate) fn is_view(layer: &Layer) -> bool {
    matches!(layer, Layer::Flatten | Layer::Reshape(_))
}

/// Flatten's shape rule: `[...] -> [product]`.
pub(crate) fn infer_flatten(input: &[usize]) -> Vec<usize> {
    vec![input.iter().product()]
}

/// Reshape's shape rule: `target`, when it has non-zero dimensions and as many values per
/// sample as the input.
pub(crate) fn infer_reshape(name: &str, target: &[usize], x: &[usize]) -> Result<Vec<usize>> {
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
    Ok(target.to_vec())
}

/// Lowering of the forward pass: the output is the input's buffer (backward has nothing to do:
/// the compiler gives a view the gradient buffer of its input).
pub(crate) fn forward(cx: &mut Forward<'_>) -> Result<()> {
    cx.alias_input();
    Ok(())
}
