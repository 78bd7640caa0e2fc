//! The PyO3 layer: thin wrappers that turn core results into Python objects and core
//! errors into exceptions. Split by concern: errors, checkpoint (open/parse/objects),
//! transfer and slices (copies, GIL released), dlpack, dtypes (the dtype table).

mod checkpoint;
mod cuda_save;
mod dlpack;
mod dtypes;
mod errors;
mod save;
mod slices;
mod transfer;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    checkpoint::register(m)?;
    transfer::register(m)?;
    slices::register(m)?;
    dtypes::register(m)?;
    save::register(m)?;
    cuda_save::register(m)?;
    Ok(())
}
