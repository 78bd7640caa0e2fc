//! Restricted pickle VM (placeholder: being written).
use crate::dtype::DType;
use crate::format::ObjectGraph;

/// A storage that the pickle refers to through a persistent id
/// `('storage', <storage class>, key, location, numel)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    /// `None` for `torch.UntypedStorage` (numel counts bytes).
    pub dtype: Option<DType>,
    pub numel: u64,
    pub location: String,
}

impl StorageRef {
    pub fn nbytes(&self) -> Option<u64> {
        self.numel.checked_mul(self.dtype.map_or(1, |d| d.size() as u64))
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PickleError {
    #[error("{message}")]
    Malformed { offset: u64, message: String },
    #[error("forbidden global {module}.{name}")]
    Forbidden { offset: u64, module: String, name: String },
    #[error("{what}")]
    Unsupported { offset: u64, what: String },
}

/// The result of running a torch `data.pkl`.
#[derive(Clone, Debug, PartialEq)]
pub struct Unpickled {
    pub objects: ObjectGraph,
    /// Unique storages, de-duplicated by key, in order of first use.
    pub storages: Vec<StorageRef>,
    /// Tensors; `Tensor::storage` indexes `storages`.
    pub tensors: Vec<crate::format::Tensor>,
}

pub fn unpickle(_data: &[u8]) -> Result<Unpickled, PickleError> {
    Err(PickleError::Unsupported { offset: 0, what: "pickle VM not written yet".into() })
}
