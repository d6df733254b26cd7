//! Layouts of the small device buffers shared by Rust and the CUDA kernels (loss statistics,
//! optimizer hyper-parameters, the finite-step guard), each defined once.

/// Defines a buffer layout once: a module of `usize` constants for Rust, and the same values as
/// C `#define`s (`PREFIX_NAME`) that [`cuda_layouts`] hands the CUDA kernels, so no offset is
/// written twice.
macro_rules! layout {
    ($(#[$doc:meta])* $m:ident, $prefix:literal { $($(#[$d:meta])* $name:ident = $val:expr;)* }) => {
        $(#[$doc])*
        pub mod $m {
            $($(#[$d])* pub const $name: usize = $val;)*

            /// The layout as C `#define`s, for kernel sources.
            pub(crate) fn c_defines() -> String {
                let mut s = String::new();
                $(s += &format!("#define {}_{} {}\n", $prefix, stringify!($name), $name);)*
                s
            }
        }
    };
}

layout! {
    /// Layout of the loss op's statistics buffer: the batch's mean loss and correct counts, and
    /// sums over every batch since the buffer was last cleared (so an epoch's metrics need one
    /// read).
    stats, "STATS" {
        /// Mean loss of the last batch.
        LOSS = 0;
        /// Correct predictions in the last batch (top-1, or elements for binary scoring).
        CORRECT = 1;
        /// Targets among the top k outputs in the last batch.
        CORRECT_K = 2;
        /// Sum over batches of mean loss times samples.
        SUM_LOSS = 3;
        /// Sum over batches of [`CORRECT`].
        SUM_CORRECT = 4;
        /// Sum over batches of [`CORRECT_K`].
        SUM_CORRECT_K = 5;
        /// Samples seen.
        SUM_SAMPLES = 6;
        /// Predictions scored (samples, or elements under binary scoring).
        SUM_SCORED = 7;
        /// Number of values in the buffer.
        LEN = 8;
    }
}

layout! {
    /// Layout of the guard buffer of [`CheckFinite`](super::CheckFinite): whether this step's update is skipped,
    /// and what the checks found so far (counts are exact up to 2^24 steps).
    guard, "GUARD" {
        /// 1 when the current step's update is to be skipped (the optimizer kernels read it).
        SKIP = 0;
        /// Steps found non-finite (and not applied) since the buffer was cleared.
        BAD_STEPS = 1;
        /// 1 + the number of steps checked before the first bad one (0: none bad yet).
        FIRST_BAD = 2;
        /// What the first bad step had: 1 a non-finite loss, 2 a non-finite gradient norm, 3 both.
        WHAT = 3;
        /// The first bad step's loss.
        LOSS = 4;
        /// The first bad step's gradient norm.
        NORM = 5;
        /// Steps checked since the buffer was cleared.
        CHECKED = 6;
        /// Number of values in the buffer.
        LEN = 7;
    }
}

layout! {
    /// Layout of the loss scaler's state buffer ([`ScaleLoss`](super::ScaleLoss),
    /// [`UnscaleGrads`](super::UnscaleGrads)): PyTorch's `GradScaler` state plus a count of the
    /// steps it skipped (counts are exact up to 2^24).
    scaler, "SCALER" {
        /// The current loss scale (PyTorch's `_scale`, an f32 as there).
        SCALE = 0;
        /// Good steps in a row since the scale last changed (PyTorch's `_growth_tracker`).
        GOOD_STEPS = 1;
        /// Steps skipped because their gradients held inf or NaN.
        SKIPPED = 2;
        /// 1 while the current step's gradients were found to hold inf or NaN (0 between steps).
        FOUND_INF = 3;
        /// Number of values in the buffer.
        LEN = 4;
    }
}

/// Every buffer layout shared with the CUDA kernels, as C `#define`s ([`stats`], [`hyper`],
/// [`guard`], [`scaler`]).
pub(crate) fn cuda_layouts() -> String {
    stats::c_defines() + &hyper::c_defines() + &guard::c_defines() + &scaler::c_defines()
}

layout! {
    /// Indices into an optimizer's `hyper` buffer.
    hyper, "HYPER" {
        /// The learning rate.
        LR = 0;
        /// SGD/RMSprop momentum, or Adam/NAdam beta1.
        MOMENTUM = 1;
        /// Number of values in the buffer.
        LEN = 2;
    }
}
