//! Writing a kiln model as an ONNX inference graph.
//!
//! One ONNX node per kiln layer where ONNX has the operator, named after the layer, and its
//! output tensor carries the layer's name too; a layer that needs several ONNX nodes (SiLU,
//! GELU before opset 20, global average pooling, group norm, a dense layer on a 4-D input) names the extra
//! nodes `{layer}/{part}`. Weights are initializers under their PyTorch `state_dict` names
//! (`conv1.weight`), as raw little-endian bytes. What evaluation does is what the graph does:
//! batch norm with its running statistics, dropout gone (its output is its input).

use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType, tensor_proto::DataType,
    tensor_shape_proto, type_proto,
};
use super::{OnnxOptions, ir_version_for};
use crate::model::shape::resolve_conv;
use crate::model::{Activation, GroupNorm, Layer, Model, ParamRole, Pool2d};
use crate::{Error, Result};

/// An attribute of a node, with its type written (proto3 writers such as go-metal omit it).
pub(super) fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub(super) fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

pub(super) fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub(super) fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

/// A float initializer as raw little-endian bytes.
pub(super) fn float_tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// An int64 initializer as raw little-endian bytes.
pub(super) fn int64_tensor(name: &str, dims: &[usize], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

pub(super) fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// A float tensor value description; `batch` is `None` for a symbolic batch dimension.
pub(super) fn value_info(name: &str, batch: Option<usize>, per_sample: &[usize]) -> ValueInfoProto {
    use tensor_shape_proto::{Dimension, dimension::Value};
    let mut dim = vec![Dimension {
        value: Some(match batch {
            Some(b) => Value::DimValue(b as i64),
            None => Value::DimParam("batch".into()),
        }),
        denotation: None,
    }];
    dim.extend(per_sample.iter().map(|&d| Dimension { value: Some(Value::DimValue(d as i64)), denotation: None }));
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

/// The graph being written: nodes, initializers, and for each kiln node the ONNX tensor that
/// holds its output (a dropout's is its input's).
struct Writer<'a> {
    model: &'a Model,
    opset: i64,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    tensor: Vec<String>,
}

impl Writer<'_> {
    fn param(&mut self, node: usize, role: ParamRole) -> Option<String> {
        let m = self.model;
        let i = m.params().iter().position(|p| p.node == node && p.role == role)?;
        let spec = &m.params()[i];
        self.inits.push(float_tensor(&spec.name, &spec.shape, &m.param_values()[i]));
        Some(spec.name.clone())
    }

    fn constant(&mut self, name: String, dims: &[usize], values: &[f32]) -> String {
        self.inits.push(float_tensor(&name, dims, values));
        name
    }

    fn pool_attrs(p: &Pool2d) -> Vec<AttributeProto> {
        let (ph, pw) = (p.padding.0 as i64, p.padding.1 as i64);
        vec![
            attr_ints("kernel_shape", &[p.kernel.0 as i64, p.kernel.1 as i64]),
            attr_ints("strides", &[p.stride.0 as i64, p.stride.1 as i64]),
            attr_ints("pads", &[ph, pw, ph, pw]),
            attr_int("ceil_mode", 0),
        ]
    }

    /// GroupNorm as PyTorch's exporters write it (both, opsets 13 to 20): `Reshape` to
    /// `[N, groups, -1]`, `InstanceNormalization` with unit scale and zero bias (each group is one
    /// "instance"), `Reshape` back, then the per-channel `Mul` and `Add` when affine. ONNX's own
    /// `GroupNormalization` (opset 18) has a per-group scale and bias, per-channel only from
    /// opset 21, so it cannot hold PyTorch's or kiln's affine parameters below that.
    fn group_norm(&mut self, i: usize, gn: &GroupNorm, x: &str, in_shape: &[usize]) -> Result<()> {
        let name = self.model.nodes()[i].name.clone();
        let p = |s: &str| format!("{name}/{s}");
        let (c, g) = (in_shape[0], gn.groups);
        let grouped = self.int64_constant(format!("{name}.group_shape"), &[0, g as i64, -1]);
        self.nodes.push(node("Reshape", &p("group"), &[x, &grouped], &[&p("group")], vec![]));
        let ones = self.constant(format!("{name}.group_scale"), &[g], &vec![1.0; g]);
        let zeros = self.constant(format!("{name}.group_bias"), &[g], &vec![0.0; g]);
        let attrs = vec![attr_float("epsilon", gn.eps)];
        self.nodes.push(node("InstanceNormalization", &p("norm"), &[&p("group"), &ones, &zeros], &[&p("norm")], attrs));
        // 0 keeps the batch dimension (Reshape's `allowzero` is 0).
        let mut back = vec![0i64];
        back.extend(in_shape.iter().map(|&d| d as i64));
        let back = self.int64_constant(format!("{name}.shape"), &back);
        if !gn.affine {
            self.nodes.push(node("Reshape", &name, &[&p("norm"), &back], &[&name], vec![]));
            return Ok(());
        }
        self.nodes.push(node("Reshape", &p("ungroup"), &[&p("norm"), &back], &[&p("ungroup")], vec![]));
        // The [C] parameters as [C, 1, 1] for a [N, C, H, W] input, so they broadcast per channel.
        let mut dims = vec![c];
        dims.extend(vec![1; in_shape.len() - 1]);
        let m = self.model;
        let mut param = |role| -> Result<String> {
            let k = m.params().iter().position(|s| s.node == i && s.role == role);
            let k = k.ok_or_else(|| Error::layer(&name, "an affine group norm has a weight and a bias"))?;
            self.inits.push(float_tensor(&m.params()[k].name, &dims, &m.param_values()[k]));
            Ok(m.params()[k].name.clone())
        };
        let (w, b) = (param(ParamRole::Weight)?, param(ParamRole::Bias)?);
        self.nodes.push(node("Mul", &p("scale"), &[&p("ungroup"), &w], &[&p("scale")], vec![]));
        self.nodes.push(node("Add", &name, &[&p("scale"), &b], &[&name], vec![]));
        Ok(())
    }

    fn int64_constant(&mut self, name: String, values: &[i64]) -> String {
        self.inits.push(int64_tensor(&name, &[values.len()], values));
        name
    }

    /// Appends the ONNX nodes for kiln node `i`; returns the tensor holding its output.
    fn layer(&mut self, i: usize) -> Result<String> {
        let m = self.model;
        let n = &m.nodes()[i];
        let name = n.name.as_str();
        let ins: Vec<String> = n.inputs.iter().map(|&j| self.tensor[j].clone()).collect();
        let x = ins[0].as_str();
        let in_shape = &m.nodes()[n.inputs[0]].shape;
        let out = name.to_string();
        let mut push = |op: &str, node_name: &str, inputs: &[&str], output: &str, attrs| {
            self.nodes.push(node(op, node_name, inputs, &[output], attrs));
        };
        match &n.layer {
            Layer::Input => unreachable!("node 0 is the only input and is not written as a layer"),
            Layer::Conv2d(c) => {
                let r = resolve_conv(name, c, in_shape)?;
                let w = self.param(i, ParamRole::Weight).expect("a convolution has a weight");
                let b = self.param(i, ParamRole::Bias);
                let mut inputs = vec![x, w.as_str()];
                if let Some(b) = &b {
                    inputs.push(b);
                }
                let (ph, pw) = (r.pad.0 as i64, r.pad.1 as i64);
                let attrs = vec![
                    attr_ints("kernel_shape", &[c.kernel.0 as i64, c.kernel.1 as i64]),
                    attr_ints("strides", &[c.stride.0 as i64, c.stride.1 as i64]),
                    attr_ints("pads", &[ph, pw, ph, pw]),
                    attr_ints("dilations", &[c.dilation.0 as i64, c.dilation.1 as i64]),
                    attr_int("group", c.groups as i64),
                ];
                self.nodes.push(node("Conv", name, &inputs, &[&out], attrs));
            }
            Layer::ConvTranspose2d(c) => {
                let w = self.param(i, ParamRole::Weight).expect("a transposed convolution has a weight");
                let b = self.param(i, ParamRole::Bias);
                let mut inputs = vec![x, w.as_str()];
                if let Some(b) = &b {
                    inputs.push(b);
                }
                let (ph, pw) = (c.padding.0 as i64, c.padding.1 as i64);
                let attrs = vec![
                    attr_ints("kernel_shape", &[c.kernel.0 as i64, c.kernel.1 as i64]),
                    attr_ints("strides", &[c.stride.0 as i64, c.stride.1 as i64]),
                    attr_ints("pads", &[ph, pw, ph, pw]),
                    attr_ints("output_padding", &[c.output_padding.0 as i64, c.output_padding.1 as i64]),
                    attr_ints("dilations", &[c.dilation.0 as i64, c.dilation.1 as i64]),
                    attr_int("group", c.groups as i64),
                ];
                self.nodes.push(node("ConvTranspose", name, &inputs, &[&out], attrs));
            }
            Layer::Linear(_) => {
                // kiln's dense layer flattens its input itself; Gemm needs a matrix.
                let flat = if in_shape.len() == 1 {
                    x.to_string()
                } else {
                    let f = format!("{name}/flatten");
                    self.nodes.push(node("Flatten", &f, &[x], &[&f], vec![attr_int("axis", 1)]));
                    f
                };
                let w = self.param(i, ParamRole::Weight).expect("a dense layer has a weight");
                let b = self.param(i, ParamRole::Bias);
                let mut inputs = vec![flat.as_str(), w.as_str()];
                if let Some(b) = &b {
                    inputs.push(b);
                }
                self.nodes.push(node("Gemm", name, &inputs, &[&out], vec![attr_int("transB", 1)]));
            }
            Layer::Flatten => push("Flatten", name, &[x], &out, vec![attr_int("axis", 1)]),
            Layer::Reshape(dims) => {
                let mut shape = vec![-1i64];
                shape.extend(dims.iter().map(|&d| d as i64));
                let s = format!("{name}.shape");
                self.inits.push(int64_tensor(&s, &[shape.len()], &shape));
                self.nodes.push(node("Reshape", name, &[x, &s], &[&out], vec![]));
            }
            Layer::Activation(a) => match *a {
                Activation::Relu => push("Relu", name, &[x], &out, vec![]),
                Activation::LeakyRelu { slope } => {
                    push("LeakyRelu", name, &[x], &out, vec![attr_float("alpha", slope)])
                }
                Activation::Elu { alpha } => push("Elu", name, &[x], &out, vec![attr_float("alpha", alpha)]),
                Activation::Sigmoid => push("Sigmoid", name, &[x], &out, vec![]),
                Activation::Tanh => push("Tanh", name, &[x], &out, vec![]),
                Activation::Silu => {
                    let s = format!("{name}/sigmoid");
                    push("Sigmoid", &s, &[x], &s, vec![]);
                    push("Mul", name, &[x, &s], &out, vec![]);
                }
                Activation::Gelu if self.opset >= 20 => {
                    push("Gelu", name, &[x], &out, vec![attr_string("approximate", "none")])
                }
                Activation::Gelu => {
                    // x * 0.5 * (1 + erf(x / sqrt(2))), the formula PyTorch's exporter writes
                    // below opset 20.
                    let sqrt2 = self.constant(format!("{name}.sqrt2"), &[], &[std::f32::consts::SQRT_2]);
                    let one = self.constant(format!("{name}.one"), &[], &[1.0]);
                    let half = self.constant(format!("{name}.half"), &[], &[0.5]);
                    let p = |s: &str| format!("{name}/{s}");
                    self.nodes.push(node("Div", &p("div"), &[x, &sqrt2], &[&p("div")], vec![]));
                    self.nodes.push(node("Erf", &p("erf"), &[&p("div")], &[&p("erf")], vec![]));
                    self.nodes.push(node("Add", &p("add"), &[&p("erf"), &one], &[&p("add")], vec![]));
                    self.nodes.push(node("Mul", &p("mul"), &[x, &p("add")], &[&p("mul")], vec![]));
                    self.nodes.push(node("Mul", name, &[&p("mul"), &half], &[&out], vec![]));
                }
            },
            Layer::Softmax { axis } => push("Softmax", name, &[x], &out, vec![attr_int("axis", *axis as i64)]),
            Layer::Dropout { .. } => return Ok(x.to_string()),
            Layer::BatchNorm(bn) => {
                if !bn.track_running_stats {
                    return Err(Error::layer(
                        name,
                        "batch norm without running statistics normalises with the batch's own statistics \
                         in evaluation, which ONNX's BatchNormalization (inference) cannot express",
                    ));
                }
                let c = in_shape[0];
                let scale = match self.param(i, ParamRole::Weight) {
                    Some(w) => w,
                    None => self.constant(format!("{name}.weight"), &[c], &vec![1.0; c]),
                };
                let bias = match self.param(i, ParamRole::Bias) {
                    Some(b) => b,
                    None => self.constant(format!("{name}.bias"), &[c], &vec![0.0; c]),
                };
                let mean = self.param(i, ParamRole::RunningMean).expect("running statistics are tracked");
                let var = self.param(i, ParamRole::RunningVar).expect("running statistics are tracked");
                // ONNX's momentum weighs the old statistic (1 - PyTorch's momentum).
                let attrs = vec![attr_float("epsilon", bn.eps), attr_float("momentum", 1.0 - bn.momentum)];
                self.nodes.push(node("BatchNormalization", name, &[x, &scale, &bias, &mean, &var], &[&out], attrs));
            }
            Layer::GroupNorm(gn) => self.group_norm(i, gn, x, in_shape)?,
            Layer::MaxPool2d(p) => push("MaxPool", name, &[x], &out, Self::pool_attrs(p)),
            Layer::AvgPool2d(p) => {
                let mut attrs = Self::pool_attrs(p);
                attrs.push(attr_int("count_include_pad", p.count_include_pad as i64));
                push("AveragePool", name, &[x], &out, attrs)
            }
            Layer::GlobalAvgPool => {
                let g = format!("{name}/pool");
                push("GlobalAveragePool", &g, &[x], &g, vec![]);
                push("Flatten", name, &[&g], &out, vec![attr_int("axis", 1)]);
            }
            Layer::Add => {
                let refs: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
                push(if refs.len() == 2 { "Add" } else { "Sum" }, name, &refs, &out, vec![])
            }
            Layer::Concat => {
                let refs: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
                push("Concat", name, &refs, &out, vec![attr_int("axis", 1)])
            }
            #[allow(unreachable_patterns)]
            other => {
                return Err(Error::layer(
                    name,
                    format!("ONNX export does not support {} layers yet", other.display_type()),
                ));
            }
        }
        Ok(out)
    }
}

/// The ONNX model of `model`'s inference graph.
pub(super) fn to_proto(model: &Model, options: &OnnxOptions) -> Result<ModelProto> {
    let ir = ir_version_for(options.opset)?;
    let nodes = model.nodes();
    let input = nodes[0].name.clone();
    let mut w =
        Writer { model, opset: options.opset, nodes: Vec::new(), inits: Vec::new(), tensor: vec![input.clone()] };
    for i in 1..nodes.len() {
        let t = w.layer(i)?;
        w.tensor.push(t);
    }
    let last = nodes.len() - 1;
    let mut output = w.tensor[last].clone();
    if output == input {
        // A model of dropouts only: ONNX needs the output to be a tensor of its own.
        let name = nodes[last].name.clone();
        w.nodes.push(node("Identity", &name, &[&input], &[&name], vec![]));
        output = name;
    }
    let batch = if options.dynamic_batch { None } else { Some(model.batch_size()) };
    let mut metadata = vec![StringStringEntryProto {
        key: Some("kiln.version".into()),
        value: Some(env!("CARGO_PKG_VERSION").into()),
    }];
    if let Some(names) = &options.class_names {
        let json = serde_json::to_string(names).map_err(|e| Error::Model(format!("class names: {e}")))?;
        metadata.push(StringStringEntryProto { key: Some("kiln.class_names".into()), value: Some(json) });
    }
    for (k, v) in &options.metadata {
        metadata.push(StringStringEntryProto { key: Some(k.clone()), value: Some(v.clone()) });
    }
    let graph = GraphProto {
        name: Some(options.graph_name.clone()),
        node: w.nodes,
        initializer: w.inits,
        input: vec![value_info(&input, batch, &nodes[0].shape)],
        output: vec![value_info(&output, batch, &nodes[last].shape)],
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: Some(ir),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(options.opset) }],
        producer_name: Some("kiln".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        model_version: Some(1),
        graph: Some(graph),
        metadata_props: metadata,
        ..Default::default()
    })
}
