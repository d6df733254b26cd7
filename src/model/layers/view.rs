//! Flatten and Reshape, whole: views of their input (the same buffer seen with another shape, so
//! their gradient is their input's too). Shape rules; no ops, no FLOPs, no memory of their own.

use super::LayerKind;
use crate::model::Layer;
use crate::model::ModelBuilder;
use crate::model::lower::{Backward, Forward};
use crate::model::shape::dims_str;
use crate::model::spec::{SpecTable, SpecType};
use crate::{Error, Result};

/// Flatten's kind.
pub(crate) struct Flatten;

/// Reshape's kind: its target shape.
pub(crate) struct Reshape<'a>(pub(crate) &'a [usize]);

/// Their spec-file types.
pub(crate) const SPEC: &[SpecType] = &[
    SpecType { name: "flatten", fields: &[], read: |_| Ok(Layer::Flatten) },
    SpecType { name: "reshape", fields: &["shape"], read: |f| Ok(Layer::Reshape(f.sizes("shape", 1)?)) },
];

/// The builder methods of this home's layers.
impl ModelBuilder {
    /// Flattens each sample: `[batch, ...] -> [batch, product]`.
    pub fn flatten(self) -> Self {
        self.layer(Layer::Flatten)
    }

    /// Reshapes each sample to `shape` (same number of values).
    pub fn reshape(self, shape: &[usize]) -> Self {
        self.layer(Layer::Reshape(shape.to_vec()))
    }
}

impl LayerKind for Flatten {
    fn type_name(&self) -> &'static str {
        "flatten"
    }
    fn display_type(&self) -> String {
        "Flatten".into()
    }
    fn infer(&self, _name: &str, input: &[usize]) -> Result<Vec<usize>> {
        Ok(infer_flatten(input))
    }
    fn flops(&self, _input: &[usize], _out: u64, _inputs: usize) -> u64 {
        0
    }
    fn is_view(&self) -> bool {
        true
    }
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        forward(cx)
    }
    fn backward(&self, _cx: &mut Backward<'_>) -> Result<()> {
        Ok(())
    }
}

impl LayerKind for Reshape<'_> {
    fn type_name(&self) -> &'static str {
        "reshape"
    }
    fn display_type(&self) -> String {
        "Reshape".into()
    }
    fn check_options(&self, name: &str) -> Result<()> {
        crate::model::shape::bounded(name, "reshape dimension", self.0)
    }
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        infer_reshape(name, self.0, input)
    }
    fn flops(&self, _input: &[usize], _out: u64, _inputs: usize) -> u64 {
        0
    }
    fn is_view(&self) -> bool {
        true
    }
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        forward(cx)
    }
    fn backward(&self, _cx: &mut Backward<'_>) -> Result<()> {
        Ok(())
    }
    fn write_spec(&self, t: &mut SpecTable) {
        t.sizes("shape", self.0);
    }
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
