//! `zeroload._core.Checkpoint`: an open, parsed checkpoint (placeholder: being written).
use std::sync::Arc;

use pyo3::prelude::*;

use crate::format::Checkpoint;

/// An open checkpoint. Holds the mapping alive for as long as Python refers to it or to
/// any tensor exported from it.
#[pyclass(module = "zeroload._core", name = "Checkpoint", frozen)]
pub struct PyCheckpoint {
    pub(crate) inner: Arc<Checkpoint>,
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCheckpoint>()?;
    Ok(())
}
