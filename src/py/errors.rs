//! Core `Error` -> Python exception.
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

pyo3::create_exception!(
    zeroload,
    CheckpointError,
    PyValueError,
    "A checkpoint file is malformed, truncated, hostile or unsupported."
);
pyo3::create_exception!(
    zeroload,
    CudaError,
    PyRuntimeError,
    "A CUDA driver call failed, or CUDA is not available."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CheckpointError", m.py().get_type::<CheckpointError>())?;
    m.add("CudaError", m.py().get_type::<CudaError>())?;
    Ok(())
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::Io { source, .. } => {
                // Keep the errno so FileNotFoundError/PermissionError come out, but with
                // a message that names the file.
                match source.raw_os_error() {
                    Some(errno) => PyOSError::new_err((errno, msg)),
                    None => match source.kind() {
                        std::io::ErrorKind::NotFound => {
                            pyo3::exceptions::PyFileNotFoundError::new_err(msg)
                        }
                        std::io::ErrorKind::PermissionDenied => {
                            pyo3::exceptions::PyPermissionError::new_err(msg)
                        }
                        std::io::ErrorKind::IsADirectory => {
                            pyo3::exceptions::PyIsADirectoryError::new_err(msg)
                        }
                        _ => PyOSError::new_err(msg),
                    },
                }
            }
            Error::Malformed { .. } | Error::ForbiddenGlobal { .. } | Error::Unsupported { .. } => {
                CheckpointError::new_err(msg)
            }
            Error::Cuda { .. } | Error::CudaUnavailable(_) => CudaError::new_err(msg),
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
            Error::KeyNotFound { .. } => pyo3::exceptions::PyKeyError::new_err(msg),
        }
    }
}
