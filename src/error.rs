//! The one error type of the core. It knows nothing of Python: `py/errors.rs` maps each
//! variant to an exception (`CheckpointError` for anything wrong with a file).

use std::path::PathBuf;

/// Everything that can go wrong while opening, parsing or copying a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS refused a read, an open or a map. Maps to the matching built-in
    /// (`FileNotFoundError`, `PermissionError`, `OSError`).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not what it claims to be: truncated, corrupted, inconsistent.
    /// `entry` names the part of the file (a zip entry, a tensor, "header") and
    /// `offset` the byte position where known.
    #[error("{path}: {entry}{}: {message}", offset.map(|o| format!(" (at byte {o})")).unwrap_or_default())]
    Malformed {
        path: PathBuf,
        entry: String,
        offset: Option<u64>,
        message: String,
    },

    /// The pickle asks for a global outside the allow-list. Nothing was executed.
    #[error(
        "{path}: {entry}: refusing to load global `{module}.{name}`: it is not on zeroload's \
         allow-list (zeroload never executes code from a checkpoint; only tensors, containers \
         and plain values can be loaded)"
    )]
    ForbiddenGlobal {
        path: PathBuf,
        entry: String,
        module: String,
        name: String,
    },

    /// A valid file that zeroload does not read (yet): legacy formats, sparse tensors...
    #[error("{path}: {entry}: {what}")]
    Unsupported {
        path: PathBuf,
        entry: String,
        what: String,
    },

    /// A CUDA driver call failed.
    #[error("CUDA error in {call}: {message}")]
    Cuda { call: String, message: String },

    /// No usable CUDA driver or device.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),

    /// A bug in zeroload itself (a panic caught in our own code), with its message. Never
    /// blamed on the file or the driver.
    #[error("internal error: {0} (this is a bug in zeroload; please report it)")]
    Internal(String),

    /// The caller asked for something impossible (a key that does not exist, a bad slice).
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn malformed(
        path: impl Into<PathBuf>,
        entry: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Malformed {
            path: path.into(),
            entry: entry.into(),
            offset: None,
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The message of a caught panic payload (`panic!` with a literal or a formatted string).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
