//! Pooling, whole: the window options shared by MaxPool2d and AvgPool2d, and GlobalAvgPool;
//! shape rules, FLOPs, summary detail and lowering to ops. Their kernels are
//! `backend/cpu/pool2d.rs` and `backend/cuda/pool2d.rs`.

use serde::{Deserialize, Serialize};

use super::LayerKind;
use crate::model::Layer;
use crate::model::spec::{Fields, SpecTable, SpecType};

use crate::backend::{Op, PoolGeom, ops};
use crate::model::ModelBuilder;
use crate::model::lower::{Backward, Forward};
use crate::model::shape::{bounded, need_4d, positive, window_out};
use crate::{Error, Result};

/// Max or average pooling window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pool2d {
    /// Window `(height, width)`, each at least 1.
    pub kernel: (usize, usize),
    /// Defaults to the kernel size, as in PyTorch.
    pub stride: (usize, usize),
    /// Padding on each side `(vertical, horizontal)`, at most half the kernel (as PyTorch
    /// requires); max pooling never picks a padded value (default none).
    pub padding: (usize, usize),
    /// Average pooling only: count padded zeros in the divisor (PyTorch's default, true).
    pub count_include_pad: bool,
}

impl Pool2d {
    /// A `kernel x kernel` window with stride equal to the kernel and no padding.
    pub fn new(kernel: usize) -> Self {
        Pool2d { kernel: (kernel, kernel), stride: (kernel, kernel), padding: (0, 0), count_include_pad: true }
    }
    /// A non-square window `(height, width)`; the stride stays what it was.
    pub fn kernel_hw(mut self, kh: usize, kw: usize) -> Self {
        self.kernel = (kh, kw);
        self
    }
    /// The same stride `s` in both directions.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = (s, s);
        self
    }
    /// Vertical stride `sh` and horizontal stride `sw`.
    pub fn stride_hw(mut self, sh: usize, sw: usize) -> Self {
        self.stride = (sh, sw);
        self
    }
    /// The same padding `p` on every side.
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = (p, p);
        self
    }
    /// Padding `ph` above and below, `pw` left and right.
    pub fn padding_hw(mut self, ph: usize, pw: usize) -> Self {
        self.padding = (ph, pw);
        self
    }
    /// Sets [`Pool2d::count_include_pad`].
    pub fn count_include_pad(mut self, c: bool) -> Self {
        self.count_include_pad = c;
        self
    }
}

/// The size options against `MAX_OPTION`.
pub(crate) fn check_options(name: &str, p: &Pool2d) -> Result<()> {
    bounded(name, "pool kernel", &[p.kernel.0, p.kernel.1])?;
    bounded(name, "pool stride", &[p.stride.0, p.stride.1])?;
    bounded(name, "pool padding", &[p.padding.0, p.padding.1])
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

/// Shape rule of MaxPool2d and AvgPool2d: `[C, H, W] -> [C, oh, ow]`.
pub(crate) fn infer(name: &str, p: &Pool2d, input: &[usize]) -> Result<Vec<usize>> {
    let (oh, ow) = resolve_pool(name, p, input)?;
    Ok(vec![input[0], oh, ow])
}

/// Shape rule of GlobalAvgPool: `[C, H, W] -> [C]`.
pub(crate) fn infer_global(name: &str, input: &[usize]) -> Result<Vec<usize>> {
    let (c, _, _) = need_4d(name, "global_avg_pool", input)?;
    Ok(vec![c])
}

/// Forward FLOPs per sample of a window: one per output and window element.
pub(crate) fn flops(p: &Pool2d, out: u64) -> u64 {
    out * (p.kernel.0 * p.kernel.1) as u64
}

/// Forward FLOPs per sample of GlobalAvgPool: one per input value.
pub(crate) fn global_flops(input: &[usize]) -> u64 {
    input.iter().product::<usize>() as u64
}

/// The summary's detail column: kernel and stride.
pub(crate) fn detail(p: &Pool2d) -> String {
    format!("k{}x{} s{}x{}", p.kernel.0, p.kernel.1, p.stride.0, p.stride.1)
}

fn geom(
    ins: &[usize],
    out: &[usize],
    batch: usize,
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
) -> PoolGeom {
    PoolGeom {
        n: batch,
        c: ins[0],
        h: ins[1],
        w: ins[2],
        kh: k.0,
        kw: k.1,
        sh: s.0,
        sw: s.1,
        ph: p.0,
        pw: p.1,
        oh: out.get(1).copied().unwrap_or(1),
        ow: out.get(2).copied().unwrap_or(1),
    }
}

fn window_geom(p: &Pool2d, ins: &[usize], out: &[usize], batch: usize) -> PoolGeom {
    geom(ins, out, batch, p.kernel, p.stride, p.padding)
}

/// GlobalAvgPool is an average pool whose window is the whole image.
fn global_geom(ins: &[usize], batch: usize) -> PoolGeom {
    geom(ins, &[], batch, (ins[1], ins[2]), (1, 1), (0, 0))
}

/// MaxPool2d forward: one [`Op::MaxPool`], saving the argmax of each window.
pub(crate) fn max_forward(p: &Pool2d, cx: &mut Forward<'_>) -> Result<()> {
    let g = window_geom(p, cx.in_shapes[0], &cx.node.shape, cx.batch);
    let (x, y) = (cx.input(0), cx.output());
    let argmax = cx.save(cx.numel(), "argmax");
    cx.push(Op::MaxPool(ops::MaxPool { g, x, y, argmax }));
    Ok(())
}

/// MaxPool2d backward: one [`Op::MaxPoolBackward`] scattering through the saved argmax.
pub(crate) fn max_backward(p: &Pool2d, cx: &mut Backward<'_>) -> Result<()> {
    if let Some(dx) = cx.dx(0) {
        let g = window_geom(p, cx.in_shapes[0], &cx.node.shape, cx.batch);
        cx.push(Op::MaxPoolBackward(ops::MaxPoolBackward { g, argmax: cx.saved(0), dy: cx.dy(), dx }));
    }
    Ok(())
}

/// AvgPool2d forward: one [`Op::AvgPool`].
pub(crate) fn avg_forward(p: &Pool2d, cx: &mut Forward<'_>) -> Result<()> {
    let g = window_geom(p, cx.in_shapes[0], &cx.node.shape, cx.batch);
    let (x, y) = (cx.input(0), cx.output());
    cx.push(Op::AvgPool(ops::AvgPool { g, count_include_pad: p.count_include_pad, x, y }));
    Ok(())
}

/// AvgPool2d backward: one [`Op::AvgPoolBackward`].
pub(crate) fn avg_backward(p: &Pool2d, cx: &mut Backward<'_>) -> Result<()> {
    if let Some(dx) = cx.dx(0) {
        let g = window_geom(p, cx.in_shapes[0], &cx.node.shape, cx.batch);
        let count_include_pad = p.count_include_pad;
        cx.push(Op::AvgPoolBackward(ops::AvgPoolBackward { g, count_include_pad, dy: cx.dy(), dx }));
    }
    Ok(())
}

/// GlobalAvgPool forward: an [`Op::AvgPool`] over the whole image.
pub(crate) fn global_forward(cx: &mut Forward<'_>) -> Result<()> {
    let g = global_geom(cx.in_shapes[0], cx.batch);
    let (x, y) = (cx.input(0), cx.output());
    cx.push(Op::AvgPool(ops::AvgPool { g, count_include_pad: true, x, y }));
    Ok(())
}

/// GlobalAvgPool backward: an [`Op::AvgPoolBackward`] over the whole image.
pub(crate) fn global_backward(cx: &mut Backward<'_>) -> Result<()> {
    if let Some(dx) = cx.dx(0) {
        let g = global_geom(cx.in_shapes[0], cx.batch);
        cx.push(Op::AvgPoolBackward(ops::AvgPoolBackward { g, count_include_pad: true, dy: cx.dy(), dx }));
    }
    Ok(())
}

/// MaxPool2d's kind: its window.
pub(crate) struct Max<'a>(pub(crate) &'a Pool2d);

/// AvgPool2d's kind: its window.
pub(crate) struct Avg<'a>(pub(crate) &'a Pool2d);

/// GlobalAvgPool's kind.
pub(crate) struct GlobalAvg;

fn read_window(f: &mut Fields<'_, '_>, count_include_pad: bool) -> Result<Pool2d> {
    let kernel = f.pair("kernel", 1)?;
    Ok(Pool2d {
        kernel,
        stride: f.pair_or("stride", 1, kernel)?,
        padding: f.pair_or("padding", 0, (0, 0))?,
        count_include_pad: if count_include_pad { f.bool_or("count_include_pad", true)? } else { true },
    })
}

/// Their spec-file types.
pub(crate) const SPEC: &[SpecType] = &[
    SpecType {
        name: "max_pool2d",
        fields: &["kernel", "stride", "padding"],
        read: |f| Ok(Layer::MaxPool2d(read_window(f, false)?)),
    },
    SpecType {
        name: "avg_pool2d",
        fields: &["kernel", "stride", "padding", "count_include_pad"],
        read: |f| Ok(Layer::AvgPool2d(read_window(f, true)?)),
    },
    SpecType { name: "global_avg_pool", fields: &[], read: |_| Ok(Layer::GlobalAvgPool) },
];

fn write_window(p: &Pool2d, t: &mut SpecTable) {
    t.pair("kernel", p.kernel);
    t.pair("stride", p.stride);
    t.pair("padding", p.padding);
}

/// The builder methods of this home's layers.
impl ModelBuilder {
    /// Max pooling with a `kernel x kernel` window and stride equal to the kernel.
    pub fn max_pool2d(self, kernel: usize) -> Self {
        self.layer(Layer::MaxPool2d(Pool2d::new(kernel)))
    }

    /// Max pooling with options: `max_pool2d_with(Pool2d::new(3).stride(2).padding(1))`.
    pub fn max_pool2d_with(self, pool: Pool2d) -> Self {
        self.layer(Layer::MaxPool2d(pool))
    }

    /// Average pooling with a `kernel x kernel` window and stride equal to the kernel.
    pub fn avg_pool2d(self, kernel: usize) -> Self {
        self.layer(Layer::AvgPool2d(Pool2d::new(kernel)))
    }

    /// Average pooling with options (stride, padding, `count_include_pad`).
    pub fn avg_pool2d_with(self, pool: Pool2d) -> Self {
        self.layer(Layer::AvgPool2d(pool))
    }

    /// Mean over height and width: `[batch, C, H, W] -> [batch, C]`.
    pub fn global_avg_pool(self) -> Self {
        self.layer(Layer::GlobalAvgPool)
    }
}

impl LayerKind for Max<'_> {
    fn type_name(&self) -> &'static str {
        "max_pool2d"
    }
    fn display_type(&self) -> String {
        "MaxPool2d".into()
    }
    fn check_options(&self, name: &str) -> Result<()> {
        check_options(name, self.0)
    }
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        infer(name, self.0, input)
    }
    fn flops(&self, _input: &[usize], out: u64, _inputs: usize) -> u64 {
        flops(self.0, out)
    }
    fn detail(&self, _name: &str, _input: &[usize]) -> Option<String> {
        Some(detail(self.0))
    }
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        max_forward(self.0, cx)
    }
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        max_backward(self.0, cx)
    }
    fn write_spec(&self, t: &mut SpecTable) {
        write_window(self.0, t);
    }
}

impl LayerKind for Avg<'_> {
    fn type_name(&self) -> &'static str {
        "avg_pool2d"
    }
    fn display_type(&self) -> String {
        "AvgPool2d".into()
    }
    fn check_options(&self, name: &str) -> Result<()> {
        check_options(name, self.0)
    }
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        infer(name, self.0, input)
    }
    fn flops(&self, _input: &[usize], out: u64, _inputs: usize) -> u64 {
        flops(self.0, out)
    }
    fn detail(&self, _name: &str, _input: &[usize]) -> Option<String> {
        Some(detail(self.0))
    }
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        avg_forward(self.0, cx)
    }
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        avg_backward(self.0, cx)
    }
    fn write_spec(&self, t: &mut SpecTable) {
        write_window(self.0, t);
        t.bool("count_include_pad", self.0.count_include_pad);
    }
}

impl LayerKind for GlobalAvg {
    fn type_name(&self) -> &'static str {
        "global_avg_pool"
    }
    fn display_type(&self) -> String {
        "GlobalAvgPool".into()
    }
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        infer_global(name, input)
    }
    fn flops(&self, input: &[usize], _out: u64, _inputs: usize) -> u64 {
        global_flops(input)
    }
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        global_forward(cx)
    }
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        global_backward(cx)
    }
}
