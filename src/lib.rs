//! zeroload: load PyTorch checkpoints straight into tensors without holding them in CPU RAM.
//!
//! The core (everything but `py`) parses, maps, plans and copies; it knows nothing of torch.
//! `py` is the PyO3 layer that builds the `zeroload._core` extension module.

// Checkpoints are little-endian (safetensors by definition, torch files as every platform
// torch ships on writes them), and the core reads their numbers and hands out their
// tensor bytes as they lie in the file. A big-endian build would load garbage: refuse it.
#[cfg(not(target_endian = "little"))]
compile_error!(
    "zeroload supports little-endian targets only: checkpoints are little-endian and their \
     bytes are handed to tensors unconverted"
);

pub mod checkpoint;
pub mod dlpack;
pub mod dtype;
pub mod error;
mod fileio;
pub mod format;
pub mod mapping;
pub mod transfer;

#[cfg(feature = "python")]
mod py;

pub use checkpoint::Checkpoint;
pub use dtype::DType;
pub use error::{Error, Result};
