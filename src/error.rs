//! The crate's error type. Every fallible public function returns [`Result`].

use std::path::{Path, PathBuf};

/// Everything that can go wrong in cellmorph, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op was called with tensors whose shapes do not fit together.
    #[error("{op}: {msg}")]
    Shape {
        /// The op that rejected its arguments, e.g. `conv2d`.
        op: &'static str,
        /// What is wrong, naming the shapes involved.
        msg: String,
    },
    /// A value or argument is invalid (NaN, out of range, unknown name, ...).
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file was read but its contents are not what they should be.
    #[error("{path}: {msg}")]
    Format {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A CUDA device was requested but this build carries no kernels.
    #[error("CUDA kernels were not compiled into this build (build with nvcc available: set NVCC or CUDA_HOME, see scripts/install-cuda-toolchain.sh)")]
    NoKernels,
    /// No usable CUDA driver or device.
    #[error("no CUDA device: {0}")]
    NoCudaDevice(String),
    /// A CUDA driver call failed (including out-of-memory).
    #[error("CUDA error in {context}: {msg}")]
    Cuda {
        /// What was being done.
        context: String,
        /// The driver's message.
        msg: String,
    },
    /// A kernel run under the CPU emulation failed (bad launch, divergent barrier, ...).
    #[error("emulated kernel {kernel}: {msg}")]
    Emulation {
        /// Kernel name.
        kernel: String,
        /// What went wrong.
        msg: String,
    },
    /// Tensors from different devices were mixed in one op.
    #[error("{op}: tensors live on different devices ({a} and {b})")]
    DeviceMismatch {
        /// The op.
        op: &'static str,
        /// Device of the first tensor.
        a: String,
        /// Device of the other tensor.
        b: String,
    },
}

/// Shorthand for `std::result::Result<T, cellmorph::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A shape error for `op`.
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    /// An invalid-argument or invalid-data error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    /// A file whose contents are wrong.
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    /// A failed CUDA driver call.
    pub fn cuda(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Cuda {
            context: context.into(),
            msg: err.to_string(),
        }
    }
}
