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
pub(crate) fn init_param(spec: &ParamSpec, layer: &Layer, seed: u64, index: usize) -> Vec<f32> {
    let n = spec.len();
    match (layer, spec.role) {
        (Layer::BatchNorm(_), ParamRole::Weight) | (_, ParamRole::RunningVar) => vec![1.0; n],
        (Layer::BatchNorm(_), ParamRole::Bias) | (_, ParamRole::RunningMean) => vec![0.0; n],
        (Layer::GroupNorm(_), role) => super::layers::group_norm::init(role, n),
        _ => {
            let bound = if spec.fan_in > 0 { 1.0 / (spec.fan_in as f32).sqrt() } else { 0.0 };
            let mut rng = Rng::new(mix_seed(seed, index as u64));
            (0..n).map(|_| rng.uniform_range(-bound, bound)).collect()
        }
    }
}
