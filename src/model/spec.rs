//! Model spec files: a model's architecture as TOML, for the `kiln` command (`kiln train --model
//! net.toml`, `kiln summary net.toml`) and for sharing architectures without code. A spec holds
//! the input shape and the layers with their options; residual and concatenating blocks hold
//! their branches. [`ModelSpec::parse`] reads one (every error names the file, the line and the
//! field); [`Model::to_spec`] writes the spec of any model the builder can make.
//!
//! ```toml
//! input = [1, 28, 28]     # one sample: [C, H, W] or [features]
//! batch = 64              # optional (32): the batch size summaries use
//! seed = 1                # optional (0): initial weights
//!
//! [[layers]]
//! type = "conv2d"
//! name = "conv1"          # optional on every layer (else conv2d_1, relu_1, ...)
//! out_channels = 32
//! kernel = 3              # or [3, 5]; stride, dilation likewise
//! padding = "same"        # 1, [1, 2], "same" or "valid"
//!
//! [[layers]]
//! type = "relu"
//!
//! [[layers]]
//! type = "residual"       # y = main(x) + shortcut(x); no shortcut: the identity
//! [[layers.main]]
//! type = "conv2d"
//! out_channels = 32
//! kernel = 3
//! padding = 1
//!
//! [[layers]]
//! type = "concat"         # branches joined along channels
//! [[layers.branches]]
//! layers = [{ type = "conv2d", out_channels = 8, kernel = 1 }]
//! [[layers.branches]]
//! layers = [{ type = "max_pool2d", kernel = 3, stride = 1, padding = 1 }]
//!
//! [[layers]]
//! type = "checkpoint"     # recomputed in backward instead of kept (gradient checkpointing)
//! layers = [{ type = "conv2d", out_channels = 16, kernel = 3, padding = 1 }, { type = "relu" }]
//!
//! [[layers]]
//! type = "dense"
//! out_features = 10
//! ```
//!
//! Layer types and their fields (defaults are PyTorch's): `conv2d` (`out_channels`, `kernel`,
//! `stride` 1, `padding` 0, `dilation` 1, `groups` 1, `bias` true), `dense`/`linear`
//! (`out_features`, `bias`), `flatten`, `reshape` (`shape`), `relu`, `leaky_relu` (`slope` 0.01),
//! `elu` (`alpha` 1), `sigmoid`, `tanh`, `silu`/`swish`, `gelu`, `softmax` (`axis` -1),
//! `dropout` (`rate`), `batch_norm` (`eps`, `momentum`, `affine`, `track_running_stats`),
//! `group_norm` (`groups`, `eps` 1e-5, `affine` true), `conv_transpose2d` (`out_channels`,
//! `kernel`, `stride` 1, `padding` 0, `output_padding` 0, `dilation` 1, `groups` 1, `bias` true),
//! `max_pool2d`/`avg_pool2d` (`kernel`, `stride` = kernel, `padding` 0, `count_include_pad`),
//! `global_avg_pool`, `residual` (`main`, `shortcut`), `concat` (`branches`), `checkpoint`
//! (`layers`: a run of layers whose activations backward recomputes, `ModelBuilder::checkpoint`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Model;
use super::builder::ModelBuilder;
use super::layers::{Layer, Padding, SPEC_TYPES};
use crate::{Error, Result};

/// Largest value a size option may have in a spec (as in model files).
const MAX_OPTION: i64 = 1 << 24;

/// Batch size of a spec that names none.
pub const DEFAULT_SPEC_BATCH: usize = 32;

/// One entry of a spec's layer list.
#[derive(Clone, Debug, PartialEq)]
pub enum SpecItem {
    /// A single layer, with its name if the spec gives one.
    Layer {
        /// The layer's name (`None`: the automatic `{type}_{k}`).
        name: Option<String>,
        /// The layer kind and options.
        layer: Layer,
        /// 1-based line of its table in the file.
        line: usize,
    },
    /// Branches from the same input joined by `join` ([`Layer::Add`] for `residual`,
    /// [`Layer::Concat`] for `concat`); an empty branch is the identity.
    Block {
        /// The join's name, if given.
        name: Option<String>,
        /// `Layer::Add` or `Layer::Concat`.
        join: Layer,
        /// Each branch's items.
        branches: Vec<Vec<SpecItem>>,
        /// 1-based line of the block's table.
        line: usize,
    },
    /// A gradient-checkpointed run of items (`ModelBuilder::checkpoint`).
    Checkpoint {
        /// The items inside, in order (at least one).
        items: Vec<SpecItem>,
        /// 1-based line of the block's table.
        line: usize,
    },
}

/// A parsed model spec: see the module documentation.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Per-sample input shape: `[C, H, W]` or `[features]`.
    pub input: Vec<usize>,
    /// Batch size for summaries (a model runs at any batch size).
    pub batch: usize,
    /// Seed of the initial weights.
    pub seed: u64,
    /// The layers, in order.
    pub items: Vec<SpecItem>,
    /// The file the spec came from (errors name it).
    pub path: PathBuf,
}

/// Where a value sits: the file, its text (to turn byte offsets into lines) and what is being read.
struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text.as_bytes()[..offset.min(self.text.len())].iter().filter(|&&b| b == b'\n').count() + 1
    }
    fn err(&self, offset: usize, what: &str, reason: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("line {}: {what}: {reason}", self.line(offset)))
    }
}

type Table<'i> = DeTable<'i>;
type Value<'i> = Spanned<DeValue<'i>>;

/// The fields of one layer table, each read at most once; the rest are reported as unknown. A
/// layer's home reads its options with these (its [`SpecType::read`]).
pub(crate) struct Fields<'a, 'i> {
    ctx: &'a Ctx<'a>,
    table: &'a Table<'i>,
    /// The table's position (for missing fields).
    at: usize,
    /// `layer 3 (conv2d)`, for messages.
    what: String,
    used: HashSet<String>,
}

impl<'a, 'i> Fields<'a, 'i> {
    fn get(&mut self, key: &str) -> Option<&'a Value<'i>> {
        self.used.insert(key.to_string());
        self.table.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| v)
    }
    fn field_err(&self, v: &Value, key: &str, reason: impl std::fmt::Display) -> Error {
        self.ctx.err(v.span().start, &format!("{}, field `{key}`", self.what), reason)
    }
    fn int_of(&self, v: &Value, key: &str) -> Result<i64> {
        match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .map_err(|_| self.field_err(v, key, format!("integer {i} is out of range"))),
            other => Err(self.field_err(v, key, format!("expected an integer, got a {}", other.type_str()))),
        }
    }
    fn size_of(&self, v: &Value, key: &str, min: i64) -> Result<usize> {
        let n = self.int_of(v, key)?;
        if n < min || n > MAX_OPTION {
            return Err(self.field_err(v, key, format!("expected an integer in {min}..={MAX_OPTION}, got {n}")));
        }
        Ok(n as usize)
    }
    /// An integer `n` or a pair `[h, w]`.
    fn pair_of(&self, v: &Value, key: &str, min: i64) -> Result<(usize, usize)> {
        match v.get_ref() {
            DeValue::Array(a) if a.len() == 2 => Ok((self.size_of(&a[0], key, min)?, self.size_of(&a[1], key, min)?)),
            DeValue::Array(a) => Err(self.field_err(
                v,
                key,
                format!("expected an integer or a pair [height, width], got {} values", a.len()),
            )),
            _ => self.size_of(v, key, min).map(|n| (n, n)),
        }
    }
    fn required<T>(&mut self, key: &str, f: impl Fn(&Self, &Value, &str) -> Result<T>) -> Result<T> {
        match self.get(key) {
            Some(v) => f(self, v, key),
            None => Err(self.ctx.err(self.at, &self.what, format!("missing field `{key}`"))),
        }
    }
    fn optional<T>(&mut self, key: &str, default: T, f: impl Fn(&Self, &Value, &str) -> Result<T>) -> Result<T> {
        match self.get(key) {
            Some(v) => f(self, v, key),
            None => Ok(default),
        }
    }
    pub(crate) fn size(&mut self, key: &str, min: i64) -> Result<usize> {
        self.required(key, |s, v, k| s.size_of(v, k, min))
    }
    pub(crate) fn pair(&mut self, key: &str, min: i64) -> Result<(usize, usize)> {
        self.required(key, |s, v, k| s.pair_of(v, k, min))
    }
    pub(crate) fn pair_or(&mut self, key: &str, min: i64, default: (usize, usize)) -> Result<(usize, usize)> {
        self.optional(key, default, |s, v, k| s.pair_of(v, k, min))
    }
    pub(crate) fn bool_or(&mut self, key: &str, default: bool) -> Result<bool> {
        self.optional(key, default, |s, v, k| match v.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            other => Err(s.field_err(v, k, format!("expected true or false, got a {}", other.type_str()))),
        })
    }
    pub(crate) fn float_or(&mut self, key: &str, default: f32) -> Result<f32> {
        self.optional(key, default, |s, v, k| {
            let x = match v.get_ref() {
                DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
                DeValue::Integer(_) => Some(s.int_of(v, k)? as f64),
                other => return Err(s.field_err(v, k, format!("expected a number, got a {}", other.type_str()))),
            };
            match x {
                Some(x) if x.is_finite() => Ok(x as f32),
                _ => Err(s.field_err(v, k, "expected a finite number")),
            }
        })
    }
    pub(crate) fn float(&mut self, key: &str) -> Result<f32> {
        if self.get(key).is_none() {
            return Err(self.ctx.err(self.at, &self.what, format!("missing field `{key}`")));
        }
        self.float_or(key, 0.0)
    }
    pub(crate) fn padding(&mut self) -> Result<Padding> {
        self.optional("padding", Padding::Valid, |s, v, k| match v.get_ref() {
            DeValue::String(t) => match t.to_ascii_lowercase().as_str() {
                "same" => Ok(Padding::Same),
                "valid" => Ok(Padding::Valid),
                _ => Err(s.field_err(v, k, format!("expected \"same\", \"valid\", an integer or [h, w], got \"{t}\""))),
            },
            _ => s.pair_of(v, k, 0).map(|(h, w)| Padding::Explicit(h, w)),
        })
    }
    /// An optional size (at least `min`).
    pub(crate) fn size_or(&mut self, key: &str, min: i64, default: usize) -> Result<usize> {
        self.optional(key, default, |s, v, k| s.size_of(v, k, min))
    }
    /// An optional integer.
    pub(crate) fn int_or(&mut self, key: &str, default: i64) -> Result<i64> {
        self.optional(key, default, |s, v, k| s.int_of(v, k))
    }
    /// A required list of sizes (each at least `min`).
    pub(crate) fn sizes(&mut self, key: &str, min: i64) -> Result<Vec<usize>> {
        self.required(key, |s, v, k| match v.get_ref() {
            DeValue::Array(a) => a.iter().map(|d| s.size_of(d, k, min)).collect::<Result<Vec<_>>>(),
            other => Err(s.field_err(v, k, format!("expected a list of sizes, got a {}", other.type_str()))),
        })
    }
    /// An error at the table's line, naming the file.
    pub(crate) fn line_err(&self, reason: impl std::fmt::Display) -> Error {
        Error::format(self.ctx.path, format!("line {}: {reason}", self.ctx.line(self.at)))
    }
    fn name(&mut self) -> Result<Option<String>> {
        self.optional("name", None, |s, v, k| match v.get_ref() {
            DeValue::String(t) if !t.is_empty() => Ok(Some(t.to_string())),
            DeValue::String(_) => Err(s.field_err(v, k, "a layer name must not be empty")),
            other => Err(s.field_err(v, k, format!("expected a string, got a {}", other.type_str()))),
        })
    }
    /// Errors on the first field not read.
    fn finish(&self, expected: &[&str]) -> Result<()> {
        if let Some((k, _)) = self.table.iter().find(|(k, _)| !self.used.contains(k.get_ref().as_ref())) {
            let list = if expected.is_empty() { "none".to_string() } else { expected.join(", ") };
            return Err(self.ctx.err(
                k.span().start,
                &self.what,
                format!("unknown field `{}` (fields of this layer: name, {list})", k.get_ref()),
            ));
        }
        Ok(())
    }
}

/// One `type = "..."` of a spec file: its fields (besides `type` and `name`) and how its home
/// reads them into a [`Layer`]. Each home lists its own (`SPEC`); `layers::SPEC_TYPES` lists the
/// homes.
pub(crate) struct SpecType {
    /// The `type` string (`"conv2d"`, `"dense"`, ...).
    pub name: &'static str,
    /// Its fields besides `type` and `name`, in the order error messages list them.
    pub fields: &'static [&'static str],
    /// Reads the fields into the layer.
    pub read: fn(&mut Fields<'_, '_>) -> Result<Layer>,
}

/// Every layer type of a spec, its blocks last, for messages.
fn layer_types() -> String {
    let mut names: Vec<&str> = SPEC_TYPES.iter().flat_map(|t| t.iter().map(|t| t.name)).collect();
    names.extend(["residual", "concat", "checkpoint"]);
    names.join(", ")
}

fn spec_type(ty: &str) -> Option<&'static SpecType> {
    SPEC_TYPES.iter().flat_map(|t| t.iter()).find(|t| t.name == ty)
}

/// The fields of each layer type (besides `type` and `name`); `None` for an unknown type.
fn fields_of(ty: &str) -> Option<&'static [&'static str]> {
    match ty {
        "residual" => Some(&["main", "shortcut"]),
        "concat" => Some(&["branches"]),
        "checkpoint" => Some(&["layers"]),
        _ => spec_type(ty).map(|t| t.fields),
    }
}

fn parse_items(ctx: &Ctx, v: &Value, where_: &str) -> Result<Vec<SpecItem>> {
    let DeValue::Array(a) = v.get_ref() else {
        return Err(ctx.err(
            v.span().start,
            where_,
            format!("expected a list of layers, got a {}", v.get_ref().type_str()),
        ));
    };
    a.iter().enumerate().map(|(i, item)| parse_item(ctx, item, &format!("{where_}[{}]", i + 1))).collect()
}

fn parse_item(ctx: &Ctx, v: &Value, where_: &str) -> Result<SpecItem> {
    let DeValue::Table(table) = v.get_ref() else {
        return Err(ctx.err(
            v.span().start,
            where_,
            format!("expected a layer table, got a {}", v.get_ref().type_str()),
        ));
    };
    let at = v.span().start;
    let ty = match table.iter().find(|(k, _)| k.get_ref() == "type").map(|(_, t)| t) {
        Some(t) => match t.get_ref() {
            DeValue::String(s) => s.to_string(),
            other => {
                return Err(ctx.err(
                    t.span().start,
                    &format!("{where_}, field `type`"),
                    format!("expected a string, got a {}", other.type_str()),
                ));
            }
        },
        None => return Err(ctx.err(at, where_, format!("missing field `type` (one of: {})", layer_types()))),
    };
    let mut f = Fields { ctx, table, at, what: format!("{where_} ({ty})"), used: HashSet::from(["type".to_string()]) };
    if let Some(known) = fields_of(&ty) {
        // Unknown fields first: a misspelt option is reported as such, not as a missing one.
        let saved = std::mem::replace(&mut f.used, known.iter().map(|k| k.to_string()).collect());
        f.used.extend(["type".to_string(), "name".to_string()]);
        f.finish(known)?;
        f.used = saved;
    }
    let line = ctx.line(at);
    if ty == "checkpoint" {
        let items = f.required("layers", |s, v, _| parse_items(ctx, v, &format!("{}.layers", s.what)))?;
        f.finish(&["layers"])?;
        if items.is_empty() {
            return Err(ctx.err(at, where_, "a checkpoint block needs at least one layer in `layers`"));
        }
        return Ok(SpecItem::Checkpoint { items, line });
    }
    let name = f.name()?;
    match ty.as_str() {
        "residual" => {
            let main = f.required("main", |s, v, _| parse_items(ctx, v, &format!("{}.main", s.what)))?;
            let shortcut =
                f.optional("shortcut", vec![], |s, v, _| parse_items(ctx, v, &format!("{}.shortcut", s.what)))?;
            f.finish(&["main", "shortcut"])?;
            Ok(SpecItem::Block { name, join: Layer::Add, branches: vec![main, shortcut], line })
        }
        "concat" => {
            let branches = f.required("branches", |s, v, k| match v.get_ref() {
                DeValue::Array(a) if !a.is_empty() => a
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        let w = format!("{}.branches[{}]", s.what, i + 1);
                        match b.get_ref() {
                            DeValue::Table(t) => {
                                let mut bf =
                                    Fields { ctx, table: t, at: b.span().start, what: w.clone(), used: HashSet::new() };
                                let items =
                                    bf.required("layers", |_, lv, _| parse_items(ctx, lv, &format!("{w}.layers")))?;
                                bf.finish(&["layers"])
                                    .map_err(|_| ctx.err(b.span().start, &w, "a branch has only the field `layers`"))?;
                                Ok(items)
                            }
                            other => Err(ctx.err(
                                b.span().start,
                                &w,
                                format!("expected a table with `layers`, got a {}", other.type_str()),
                            )),
                        }
                    })
                    .collect::<Result<Vec<_>>>(),
                _ => Err(s.field_err(v, k, "expected a non-empty list of branches ([[layers.branches]] tables)")),
            })?;
            f.finish(&["branches"])?;
            Ok(SpecItem::Block { name, join: Layer::Concat, branches, line })
        }
        other => {
            let Some(t) = spec_type(other) else {
                let t = table.iter().find(|(k, _)| k.get_ref() == "type").map(|(_, t)| t.span().start).unwrap_or(at);
                return Err(ctx.err(
                    t,
                    &format!("{where_}, field `type`"),
                    format!("unknown layer type \"{other}\" (known: {})", layer_types()),
                ));
            };
            let layer = (t.read)(&mut f)?;
            f.finish(t.fields)?;
            Ok(SpecItem::Layer { name, layer, line })
        }
    }
}

impl ModelSpec {
    /// Reads and checks a spec file (syntax and options; shapes are checked by
    /// [`ModelSpec::build`]).
    pub fn read(path: impl AsRef<Path>) -> Result<ModelSpec> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        ModelSpec::parse(&text, path)
    }

    /// Parses a spec's text; `path` names the file in errors.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<ModelSpec> {
        let path = path.as_ref();
        let ctx = Ctx { path, text };
        let doc = DeTable::parse(text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            ctx.err(at, "TOML syntax", e.message())
        })?;
        let table = doc.get_ref();
        let mut f = Fields { ctx: &ctx, table, at: 0, what: "top level".into(), used: HashSet::new() };
        let input = f.required("input", |s, v, k| match v.get_ref() {
            DeValue::Array(a) if a.len() == 1 || a.len() == 3 => a.iter().map(|d| s.size_of(d, k, 1)).collect(),
            _ => Err(s.field_err(v, k, "expected [channels, height, width] or [features]")),
        })?;
        let batch = f.optional("batch", DEFAULT_SPEC_BATCH, |s, v, k| s.size_of(v, k, 1))?;
        let seed = f.optional("seed", 0u64, |s, v, k| {
            let n = s.int_of(v, k)?;
            u64::try_from(n).map_err(|_| s.field_err(v, k, "expected an integer >= 0"))
        })?;
        let items = f.required("layers", |_, v, _| parse_items(&ctx, v, "layers"))?;
        if let Some((k, _)) = table.iter().find(|(k, _)| !f.used.contains(k.get_ref().as_ref())) {
            return Err(ctx.err(
                k.span().start,
                "top level",
                format!("unknown field `{}` (expected input, batch, seed, layers)", k.get_ref()),
            ));
        }
        Ok(ModelSpec { input, batch, seed, items, path: path.to_path_buf() })
    }

    /// A builder for the spec's model with batch size `batch` (the spec's when `None`).
    pub fn builder(&self, batch: Option<usize>) -> ModelBuilder {
        let mut shape = vec![batch.unwrap_or(self.batch)];
        shape.extend_from_slice(&self.input);
        add_items(ModelBuilder::new(&shape).seed(self.seed), &self.items)
    }

    /// Builds the model (batch size `batch`, or the spec's). A layer that does not fit its input
    /// is an error naming the file, the layer's line and the layer.
    pub fn build(&self, batch: Option<usize>) -> Result<Model> {
        self.builder(batch).build().map_err(|e| match &e {
            Error::Layer { layer, reason } => {
                let lines = self.lines_by_name();
                match lines.get(layer) {
                    Some(line) => Error::format(&self.path, format!("line {line}: layer '{layer}': {reason}")),
                    None => Error::format(&self.path, e.to_string()),
                }
            }
            _ => Error::format(&self.path, e.to_string()),
        })
    }

    /// Every layer's name (given or automatic, as the builder assigns them) and line.
    fn lines_by_name(&self) -> HashMap<String, usize> {
        fn flatten(items: &[SpecItem], out: &mut Vec<(&'static str, Option<String>, usize)>) {
            for it in items {
                match it {
                    SpecItem::Layer { name, layer, line } => out.push((layer.type_name(), name.clone(), *line)),
                    SpecItem::Block { name, join, branches, line } => {
                        branches.iter().for_each(|b| flatten(b, out));
                        out.push((join.type_name(), name.clone(), *line));
                    }
                    SpecItem::Checkpoint { items, .. } => flatten(items, out),
                }
            }
        }
        let mut flat = vec![("input", Some("input".to_string()), 1)];
        flatten(&self.items, &mut flat);
        // The builder's naming rule (builder.rs, `assign_names`): the k-th layer of a type is
        // `{type}_{k}`, skipping names taken by the user.
        let taken: HashSet<String> = flat.iter().filter_map(|(_, n, _)| n.clone()).collect();
        let mut counts = HashMap::<&str, usize>::new();
        let mut used = taken.clone();
        let mut out = HashMap::new();
        for (t, name, line) in flat {
            let k = counts.entry(t).or_insert(0);
            *k += 1;
            let name = name.unwrap_or_else(|| {
                let mut c = format!("{t}_{k}");
                while used.contains(&c) {
                    *k += 1;
                    c = format!("{t}_{k}");
                }
                used.insert(c.clone());
                c
            });
            out.insert(name, line);
        }
        out
    }
}

fn add_items(mut b: ModelBuilder, items: &[SpecItem]) -> ModelBuilder {
    for it in items {
        b = match it {
            SpecItem::Layer { name, layer, .. } => {
                let b = b.layer(layer.clone());
                match name {
                    Some(n) => b.name(n),
                    None => b,
                }
            }
            SpecItem::Checkpoint { items, .. } => b.checkpoint(|c| add_items(c, items)),
            SpecItem::Block { name, join, branches, .. } => {
                let b = match join {
                    Layer::Add if branches.len() == 2 => {
                        b.residual_with(|m| add_items(m, &branches[0]), |s| add_items(s, &branches[1]))
                    }
                    _ => b.concat(branches.iter().map(|br| super::builder::branch(move |x| add_items(x, br)))),
                };
                match name {
                    Some(n) => b.name(n),
                    None => b,
                }
            }
        };
    }
    b
}

// ---- writing ----

/// A number as TOML writes it, from the shortest decimal that reads back as the same f32.
fn float(x: f32) -> toml::Value {
    toml::Value::Float(format!("{x}").parse::<f64>().unwrap_or(x as f64))
}

fn int(n: usize) -> toml::Value {
    toml::Value::Integer(n as i64)
}

fn pair(p: (usize, usize)) -> toml::Value {
    if p.0 == p.1 { int(p.0) } else { toml::Value::Array(vec![int(p.0), int(p.1)]) }
}

/// A layer's spec-file table being written; its home's `LayerKind::write_spec` puts its
/// options (numbers as TOML writes them, pairs as one number when both sides agree).
pub(crate) struct SpecTable(toml::Table);

impl SpecTable {
    /// Any value.
    pub(crate) fn put(&mut self, key: &str, v: toml::Value) {
        self.0.insert(key.into(), v);
    }
    /// A size.
    pub(crate) fn int(&mut self, key: &str, n: usize) {
        self.put(key, int(n));
    }
    /// A signed integer.
    pub(crate) fn signed(&mut self, key: &str, n: i64) {
        self.put(key, toml::Value::Integer(n));
    }
    /// An `(h, w)` pair.
    pub(crate) fn pair(&mut self, key: &str, p: (usize, usize)) {
        self.put(key, pair(p));
    }
    /// A number.
    pub(crate) fn float(&mut self, key: &str, x: f32) {
        self.put(key, float(x));
    }
    /// A flag.
    pub(crate) fn bool(&mut self, key: &str, b: bool) {
        self.put(key, toml::Value::Boolean(b));
    }
    /// A list of sizes.
    pub(crate) fn sizes(&mut self, key: &str, v: &[usize]) {
        self.put(key, toml::Value::Array(v.iter().map(|&d| int(d)).collect()));
    }
    /// A convolution's padding: `"same"`, `"valid"` or a pair.
    pub(crate) fn padding(&mut self, key: &str, p: Padding) {
        let v = match p {
            Padding::Same => toml::Value::String("same".into()),
            Padding::Valid => toml::Value::String("valid".into()),
            Padding::Explicit(h, w) => pair((h, w)),
        };
        self.put(key, v);
    }
}

fn layer_table(name: &str, layer: &Layer) -> Result<toml::Table> {
    if matches!(layer, Layer::Input | Layer::Add | Layer::Concat) {
        return Err(Error::layer(name, "an input or join node is not a layer of a spec's list"));
    }
    let mut t = SpecTable(toml::Table::new());
    t.put("type", toml::Value::String(layer.type_name().into()));
    t.put("name", toml::Value::String(name.into()));
    layer.with_kind(|k| k.write_spec(&mut t));
    Ok(t.0)
}

/// Recovers the builder's block structure from a model's graph.
struct Writer<'m> {
    model: &'m Model,
    forks: HashMap<usize, usize>,
}

impl Writer<'_> {
    /// The node before `i` on its path: its input, or for a join, the block's fork.
    fn pred(&self, i: usize) -> usize {
        match self.forks.get(&i) {
            Some(&f) => f,
            None => self.model.nodes()[i].inputs.first().copied().unwrap_or(0),
        }
    }
    fn chain(&self, mut i: usize) -> Vec<usize> {
        let mut c = vec![i];
        while i != 0 {
            i = self.pred(i);
            c.push(i);
        }
        c
    }
    /// The items from after `stop` to `end` (inclusive), following predecessors back; `inside`:
    /// the checkpoint segment being written (its end is not a new checkpoint block).
    fn items(&self, end: usize, stop: usize, inside: Option<usize>) -> Result<Vec<toml::Value>> {
        let nodes = self.model.nodes();
        let mut out = Vec::new();
        let mut x = end;
        while x != stop {
            if x == 0 {
                return Err(Error::Model("the graph is not a chain of layers and blocks".into()));
            }
            let node = &nodes[x];
            let mut t;
            let segment = self.model.checkpoints().iter().position(|s| s.end == x + 1);
            if let Some(s) = segment.filter(|&s| inside != Some(s)) {
                // A checkpoint block: the segment's items, back to what precedes its first layer.
                let first = self.model.checkpoints()[s].start;
                let before = self.pred(first);
                let layers = self.items(x, before, Some(s))?;
                if layers.len() > x + 1 - first {
                    return Err(Error::Model("a checkpoint segment is not a run of layers and blocks".into()));
                }
                t = toml::Table::new();
                t.insert("type".into(), toml::Value::String("checkpoint".into()));
                t.insert("layers".into(), toml::Value::Array(layers));
                out.push(toml::Value::Table(t));
                x = before;
                continue;
            }
            if let Some(&fork) = self.forks.get(&x) {
                t = toml::Table::new();
                let branches: Vec<Vec<toml::Value>> =
                    node.inputs.iter().map(|&e| self.items(e, fork, inside)).collect::<Result<_>>()?;
                match node.layer {
                    Layer::Add if branches.len() == 2 => {
                        t.insert("type".into(), toml::Value::String("residual".into()));
                        t.insert("name".into(), toml::Value::String(node.name.clone()));
                        let mut it = branches.into_iter();
                        t.insert("main".into(), toml::Value::Array(it.next().unwrap_or_default()));
                        let short = it.next().unwrap_or_default();
                        if !short.is_empty() {
                            t.insert("shortcut".into(), toml::Value::Array(short));
                        }
                    }
                    Layer::Concat => {
                        t.insert("type".into(), toml::Value::String("concat".into()));
                        t.insert("name".into(), toml::Value::String(node.name.clone()));
                        let bs = branches
                            .into_iter()
                            .map(|b| {
                                let mut bt = toml::Table::new();
                                bt.insert("layers".into(), toml::Value::Array(b));
                                toml::Value::Table(bt)
                            })
                            .collect();
                        t.insert("branches".into(), toml::Value::Array(bs));
                    }
                    _ => {
                        return Err(Error::layer(&node.name, "an addition of other than two inputs has no spec form"));
                    }
                }
            } else {
                t = layer_table(&node.name, &node.layer)?;
            }
            out.push(toml::Value::Table(t));
            x = self.pred(x);
        }
        out.reverse();
        Ok(out)
    }
}

impl Model {
    /// The model's spec as TOML (see [`crate::model::spec`]): input shape, batch, seed and every
    /// layer with its name and options, residual and concatenating blocks as blocks. Reading it
    /// back with [`ModelSpec::parse`] and building gives the same graph (and, with the same
    /// seed, the same initial weights; trained weights are not in a spec).
    pub fn to_spec(&self) -> Result<String> {
        let nodes = self.nodes();
        let mut w = Writer { model: self, forks: HashMap::new() };
        for (i, n) in nodes.iter().enumerate() {
            if matches!(n.layer, Layer::Add | Layer::Concat) {
                let chains: Vec<HashSet<usize>> = n.inputs.iter().map(|&e| w.chain(e).into_iter().collect()).collect();
                let first = w.chain(n.inputs[0]);
                let fork = first.into_iter().find(|c| chains.iter().all(|s| s.contains(c))).unwrap_or(0);
                w.forks.insert(i, fork);
            }
        }
        let items = w.items(nodes.len() - 1, 0, None)?;
        let mut doc = toml::Table::new();
        doc.insert("input".into(), toml::Value::Array(nodes[0].shape.iter().map(|&d| int(d)).collect()));
        doc.insert("batch".into(), int(self.batch_size()));
        doc.insert("seed".into(), toml::Value::Integer(self.seed() as i64));
        doc.insert("layers".into(), toml::Value::Array(items));
        let body = toml::to_string(&doc).map_err(|e| Error::Model(format!("cannot write the spec: {e}")))?;
        Ok(format!("# kiln model spec (`kiln summary FILE`, `kiln train --model FILE`)\n{body}"))
    }

    /// Builds the model described by the spec file at `path` (see [`crate::model::spec`]).
    pub fn from_spec_file(path: impl AsRef<Path>) -> Result<Model> {
        ModelSpec::read(path)?.build(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConvTranspose2d, GroupNorm};
    use crate::zoo;

    fn roundtrip(model: &Model) {
        let text = model.to_spec().unwrap();
        let back = ModelSpec::parse(&text, "roundtrip.toml").unwrap().build(None).unwrap();
        assert_eq!(back.nodes(), model.nodes(), "{text}");
        assert_eq!(back.checkpoints(), model.checkpoints(), "{text}");
        assert_eq!(back.param_values(), model.param_values());
    }

    #[test]
    fn zoo_models_roundtrip_through_specs() {
        roundtrip(&zoo::resnet18(2, 10).seed(3).build().unwrap());
        roundtrip(&zoo::inception_block(2, 10).build().unwrap());
        roundtrip(&zoo::mnist_cnn(4).build().unwrap());
        roundtrip(&zoo::advanced_cnn(4).build().unwrap());
        let gn = crate::model::ModelBuilder::new(&[2, 4, 8, 8])
            .layer(Layer::GroupNorm(GroupNorm { groups: 2, eps: 1e-3, affine: false }))
            .dense(3)
            .build()
            .unwrap();
        roundtrip(&gn);
        let convt = ConvTranspose2d::new(6, 3).stride_hw(2, 3).padding_hw(1, 0).output_padding_hw(1, 2);
        let ct = crate::model::ModelBuilder::new(&[2, 4, 5, 5])
            .conv_transpose2d_with(convt.dilation_hw(1, 2).groups(2).bias(false))
            .conv_transpose2d(2, 2)
            .build()
            .unwrap();
        roundtrip(&ct);
        let ck = crate::model::ModelBuilder::new(&[2, 4, 8, 8])
            .checkpoint(|b| b.conv2d(4, 1).batch_norm().residual(|m| m.conv2d(4, 1).relu()))
            .relu()
            .checkpoint(|b| b.concat([crate::model::branch(|x| x.conv2d(2, 1)), crate::model::branch(|x| x)]))
            .flatten()
            .checkpoint(|b| b.dropout(0.5))
            .dense(3)
            .build()
            .unwrap();
        assert_eq!(ck.checkpoints().len(), 3);
        roundtrip(&ck);
    }

    #[test]
    fn module_example_parses_and_builds() {
        let doc = include_str!("spec.rs");
        let text: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let m = ModelSpec::parse(&text, "doc.toml").unwrap().build(None).unwrap();
        assert_eq!(m.output_shape(), vec![64, 10]);
        assert!(m.node("conv1").is_some());
        assert!(matches!(m.nodes()[m.nodes().len() - 4].layer, Layer::Concat));
        assert_eq!(m.checkpoints().len(), 1);
        let e = err("input = [4]\n[[layers]]\ntype = \"checkpoint\"\nlayers = []\n");
        assert!(e.contains("line 2") && e.contains("a checkpoint block needs at least one layer"), "{e}");
    }

    fn err(text: &str) -> String {
        match ModelSpec::parse(text, "net.toml").and_then(|s| s.build(None)) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let base = "input = [1, 8, 8]\n\n[[layers]]\ntype = \"conv2d\"\nout_channels = 4\n";
        let e = err(&format!("{base}kernal = 3\n"));
        assert!(e.starts_with("net.toml: line 6:") && e.contains("unknown field `kernal`"), "{e}");
        let e = err(&format!("{base}kernel = \"x\"\n"));
        assert!(e.contains("line 6") && e.contains("field `kernel`") && e.contains("expected an integer"), "{e}");
        let e = err(&format!("{base}kernel = 3\n\n[[layers]]\ntype = \"conv3d\"\n"));
        assert!(e.contains("line 9") && e.contains("unknown layer type \"conv3d\""), "{e}");
        let e = err("input = [1, 8, 8]\n[[layers]]\ntype = \"conv2d\"\nkernel = 3\n");
        assert!(e.contains("line 2") && e.contains("missing field `out_channels`"), "{e}");
        // A shape error from the build names the layer's line.
        let e = err(
            "input = [1, 8, 8]\n[[layers]]\ntype = \"relu\"\n[[layers]]\ntype = \"conv2d\"\nout_channels = 2\nkernel = 9\n",
        );
        assert!(e.contains("line 4: layer 'conv2d_1'"), "{e}");
        let e = err("input = [1, 8\n");
        assert!(e.contains("net.toml: line 1: TOML syntax"), "{e}");
        let e = err("input = [1, 8, 8]\nlayer = []\n");
        assert!(
            e.contains("line 1") && e.contains("missing field `layers`") || e.contains("unknown field `layer`"),
            "{e}"
        );
    }
}
