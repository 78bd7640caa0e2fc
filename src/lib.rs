//! zeroload: load PyTorch checkpoints straight into tensors without holding them in CPU RAM.
//!
//! The core (everything but `py`) parses, maps, plans and copies; it knows nothing of torch.
//! `py` is the PyO3 layer that builds the `zeroload._core` extension module.

pub mod dlpack;
pub mod dtype;
pub mod error;
mod fileio;
pub mod format;
pub mod mapping;
pub mod transfer;

#[cfg(feature = "python")]
mod py;

pub use dtype::DType;
pub use error::{Error, Result};
pub use format::Checkpoint;
