//! Parameters: which tensors each layer owns, their PyTorch names and layouts, and their PyTorch
//! default initialisation from a seed.

use super::layers::Layer;
use crate::rng::{Rng, mix_seed};
use serde::{Deserialize, Serialize};

/// What a parameter tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamRole {
    Weight,
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
    pub role: ParamRole,
    pub shape: Vec<usize>,
    /// Whether the optimizer updates it (false for running statistics).
    pub trainable: bool,
    /// Fan-in used by the initialiser (inputs per output unit).
    pub fan_in: usize,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parameters of node `node` named `name`, given its per-sample input shape.
pub(crate) fn param_specs(node: usize, name: &str, layer: &Layer, input: &[usize]) -> Vec<ParamSpec> {
    let spec = |suffix: &str, role, shape: Vec<usize>, trainable, fan_in| ParamSpec {
        name: format!("{name}.{suffix}"),
        node,
        role,
        shape,
        trainable,
        fan_in,
    };
    match layer {
        Layer::Conv2d(c) => {
            let cin = input[0] / c.groups;
            let fan_in = cin * c.kernel.0 * c.kernel.1;
            let mut v = vec![spec(
                "weight",
                ParamRole::Weight,
                vec![c.out_channels, cin, c.kernel.0, c.kernel.1],
                true,
                fan_in,
            )];
            if c.bias {
                v.push(spec("bias", ParamRole::Bias, vec![c.out_channels], true, fan_in));
            }
            v
        }
        Layer::Linear(l) => {
            let fan_in: usize = input.iter().product();
            let mut v = vec![spec("weight", ParamRole::Weight, vec![l.out_features, fan_in], true, fan_in)];
            if l.bias {
                v.push(spec("bias", ParamRole::Bias, vec![l.out_features], true, fan_in));
            }
            v
        }
        Layer::BatchNorm(bn) => {
            let c = input[0];
            let mut v = Vec::new();
            if bn.affine {
                v.push(spec("weight", ParamRole::Weight, vec![c], true, 1));
                v.push(spec("bias", ParamRole::Bias, vec![c], true, 1));
            }
            if bn.track_running_stats {
                v.push(spec("running_mean", ParamRole::RunningMean, vec![c], false, 1));
                v.push(spec("running_var", ParamRole::RunningVar, vec![c], false, 1));
            }
            v
        }
        Layer::GroupNorm(gn) => super::layers::group_norm::params(gn, input)
            .into_iter()
            .map(|(suffix, role, shape)| spec(suffix, role, shape, true, 1))
            .collect(),
        _ => Vec::new(),
    }
}

/// PyTorch's default initial values for `spec`, drawn from a stream that depends only on `seed`
/// and the parameter's index in the model, so the same seed always gives the same weights.
///
/// `nn.Conv2d` and `nn.Linear` use `kaiming_uniform_(a=sqrt(5))` for weights, which is
/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, and the same bound for biases. Batch norm starts at
/// weight 1, bias 0, running mean 0, running variance 1.
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
    match (layer, spec.role) {
        (Layer::BatchNorm(_), ParamRole::Weight) | (_, ParamRole::RunningVar) => v.resize(n, 1.0),
        (Layer::BatchNorm(_), ParamRole::Bias) | (_, ParamRole::RunningMean) => v.resize(n, 0.0),
        (Layer::GroupNorm(_), role) => v.extend(super::layers::group_norm::init(role, n)),
        _ => {
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
