//! kiln's one error type.
//!
//! Every user mistake (a bad layer option, a shape that does not fit, a label out of range, an
//! unreadable file, an invalid config field) comes back as one of these variants, naming the layer,
//! sample, field or path and saying what was expected. Nothing a user can pass in makes kiln panic.

use std::path::PathBuf;

/// kiln's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kiln.
///
/// `Debug` prints the same readable message as `Display` (as `anyhow::Error` does), so
/// `fn main() -> kiln::Result<()>` reports `Error: layer 'conv2d_2': ...`, not the variant's
/// fields; match on the variant to take the fields apart.
#[derive(thiserror::Error)]
pub enum Error {
    /// A layer's specification is invalid (bad option, or it does not fit its input shape).
    #[error("layer '{layer}': {reason}")]
    Layer {
        /// The layer's name (`conv2d_1`, or the name given with `.name(..)`).
        layer: String,
        /// What is wrong and what was expected.
        reason: String,
    },

    /// The model as a whole is invalid (empty, bad input shape, duplicate names, ...).
    #[error("model: {0}")]
    Model(String),

    /// Data handed to kiln does not have the shape or length that was expected.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        /// What had the wrong shape (`inputs`, `targets`, a tensor's name).
        what: String,
        /// The shape or length expected.
        expected: String,
        /// The shape or length given.
        got: String,
    },

    /// A configuration field is invalid.
    #[error("config field '{field}': {reason}")]
    Config {
        /// The field's path (`learning_rate`, `optimizer.beta1`, `schedule.gamma`).
        field: String,
        /// What is wrong and what is accepted.
        reason: String,
    },

    /// A label (target) is invalid for the loss in use.
    #[error("label of sample {sample}: {reason}")]
    Label {
        /// The sample's index in the batch.
        sample: usize,
        /// What is wrong with its label.
        reason: String,
    },

    /// One sample of a dataset could not be produced: an index out of range, a transform that does
    /// not fit the image, an image whose shape differs from the rest of its batch.
    #[error("sample {index}: {reason}")]
    Sample {
        /// The sample's index in its dataset.
        index: usize,
        /// What went wrong.
        reason: String,
    },

    /// A parameter name that the model does not have, or data of the wrong size for it.
    #[error("parameter '{name}': {reason}")]
    Param {
        /// The parameter's PyTorch name (`conv1.weight`).
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// A file was read but its content is not valid.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is invalid in it.
        reason: String,
    },

    /// The requested device cannot be used (no GPU, no driver, a missing library, ...).
    #[error("device {device}: {reason}")]
    Device {
        /// The device asked for (`cuda:0`).
        device: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A call into a device library failed.
    #[error("{call} failed: {status}")]
    DeviceCall {
        /// The library function (`cuLaunchKernel`, `cudnnConvolutionForward`).
        call: String,
        /// The status it returned, by name where known.
        status: String,
    },

    /// The device ran out of memory.
    #[error(
        "out of memory: {model} at batch size {batch} needs {needed} bytes{}; try a smaller batch",
        free_note(*free)
    )]
    OutOfMemory {
        /// The model (its summary line).
        model: String,
        /// The batch size the plan was made for.
        batch: usize,
        /// Bytes the plan needs.
        needed: u64,
        /// Bytes free on the device when it was refused (0: unknown).
        free: u64,
    },

    /// Data-parallel training: a group that could not form (rendezvous), a collective that failed
    /// (a peer exited, timed out or ran a different collective), or a worker that a launcher saw
    /// fail. `context` names the rank and the operation.
    #[error("data-parallel {context}: {reason}")]
    Dist {
        /// The rank and the operation.
        context: String,
        /// What went wrong.
        reason: String,
    },

    /// A training step's loss or gradient norm was not finite (NaN or infinite): the step's
    /// update was not applied, so the weights and optimizer state are those from before it
    /// ([`crate::train::NonFinite`] chooses this error, skipping, or no check).
    #[error("training step {step}: non-finite {what}; its update was not applied")]
    NonFinite {
        /// The optimizer step (1 for the first) whose loss or gradient norm was not finite.
        step: u64,
        /// What was not finite, with its value, and a hint where one is known.
        what: String,
    },

    /// A request that kiln cannot honour in its current state (for example asking for gradients
    /// before a backward pass).
    #[error("{0}")]
    State(String),
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn free_note(free: u64) -> String {
    if free > 0 { format!(" ({free} bytes free on the device)") } else { String::new() }
}

impl Error {
    pub(crate) fn layer(layer: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Layer { layer: layer.into(), reason: reason.into() }
    }

    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        Error::Shape { what: what.into(), expected: expected.to_string(), got: got.to_string() }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config { field: field.into(), reason: reason.into() }
    }

    pub(crate) fn sample(index: usize, reason: impl Into<String>) -> Self {
        Error::Sample { index, reason: reason.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn dist(context: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Dist { context: context.into(), reason: reason.into() }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format { path: path.into(), reason: reason.into() }
    }
}
