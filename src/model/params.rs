//! Parameters: which tensors each layer owns, their PyTorch names and layouts, and their PyTorch
//! default initialisation from a seed.

use super::layers::Layer;
use crate::rng::{Rng, mix_seed};
use serde::{Deserialize, Serialize};

/// What a parameter tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamRole {
    /// A weight: a convolution's filters, a dense layer's matrix, a norm layer's scale.
    Weight,
    /// A bias: added per output channel or feature (a norm layer's shift too).
    Bias,
    /// Batch-norm running mean: state, not trained.
    RunningMean,
    /// Batch-norm running variance: state, not trained.
    RunningVar,
}

/// One parameter (or running-statistic) tensor of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// PyTorch `state_dict` name: `"{layer}.weight"`, `"{layer}.running_mean"`, ...
    pub name: String,
    /// Index of the owning node in the model graph.
    pub node: usize,
    /// What the tensor is for.
    pub role: ParamRole,
    /// The tensor's shape, as in PyTorch's `state_dict`.
    pub shape: Vec<usize>,
    /// Whether the optimizer updates it (false for running statistics).
    pub trainable: bool,
    /// Fan-in used by the initialiser (inputs per output unit).
    pub fan_in: usize,
}

impl ParamSpec {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One parameter as a layer declares it (its home in `model/layers/` says which it has); the
/// model makes a [`ParamSpec`] of it by prefixing the layer's name.
pub(crate) struct ParamDecl {
    /// The name after the layer's: `weight`, `bias`, `running_mean`, ...
    pub suffix: &'static str,
    pub role: ParamRole,
    pub shape: Vec<usize>,
    /// Whether the optimizer updates it.
    pub trainable: bool,
    /// Fan-in used by the default initialiser.
    pub fan_in: usize,
}

impl ParamDecl {
    /// A trained parameter.
    pub(crate) fn trained(suffix: &'static str, role: ParamRole, shape: Vec<usize>, fan_in: usize) -> Self {
        ParamDecl { suffix, role, shape, trainable: true, fan_in }
    }
    /// State the optimizer does not touch (running statistics).
    pub(crate) fn state(suffix: &'static str, role: ParamRole, shape: Vec<usize>) -> Self {
        ParamDecl { suffix, role, shape, trainable: false, fan_in: 1 }
    }
}

/// The parameters of node `node` named `name`, given its per-sample input shape: the layer's
/// declarations (from its home in `model/layers/`), named.
pub(crate) fn param_specs(node: usize, name: &str, layer: &Layer, input: &[usize]) -> Vec<ParamSpec> {
    let decls = layer.with_kind(|k| k.params(input));
    decls
        .into_iter()
        .map(|d| ParamSpec {
            name: format!("{name}.{}", d.suffix),
            node,
            role: d.role,
            shape: d.shape,
            trainable: d.trainable,
            fan_in: d.fan_in,
        })
        .collect()
}

/// PyTorch's default initial values for `spec`, drawn from a stream that depends only on `seed`
/// and the parameter's index in the model, so the same seed always gives the same weights.
///
/// `nn.Conv2d` and `nn.Linear` use `kaiming_uniform_(a=sqrt(5))` for weights, which is
/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, and the same bound for biases: that is the default
/// here. Layers that start from constants (the norms) say so in their homes' `init`.
///
/// The memory is reserved fallibly: a parameter too large for the machine is an error (saying
/// how many bytes it needs), never an aborted process.
pub(crate) fn init_param(spec: &ParamSpec, layer: &Layer, seed: u64, index: usize) -> Result<Vec<f32>, String> {
    let n = spec.len();
    let mut v: Vec<f32> = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        let bytes = n as u128 * std::mem::size_of::<f32>() as u128;
        return Err(format!(
            "parameter {} of shape {:?} needs {bytes} bytes, which cannot be allocated",
            spec.name, spec.shape
        ));
    }
    match layer.with_kind(|k| k.init(spec.role, n)) {
        Some(values) => v.extend(values),
        None => {
            let bound = if spec.fan_in > 0 { 1.0 / (spec.fan_in as f32).sqrt() } else { 0.0 };
            let mut rng = Rng::new(mix_seed(seed, index as u64));
            v.extend((0..n).map(|_| rng.uniform_range(-bound, bound)));
        }
    }
    Ok(v)
}

/// The most values a model's parameters may have, one tensor or all together (2^40: 4 TiB of
/// f32, beyond any machine; the limit keeps the counts far from overflowing).
pub(crate) const MAX_PARAM_VALUES: usize = 1 << 40;
