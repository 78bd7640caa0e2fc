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

/// A refusal of pickled code (a global outside the allow-list): a `CheckpointError` that is
/// also a `pickle.UnpicklingError`, which is what `torch.load(weights_only=True)` raises,
/// so existing `except pickle.UnpicklingError` clauses keep working. `create_exception!`
/// takes one base, so the type is made by calling `type(name, bases, namespace)` once.
#[repr(transparent)]
pub struct ForbiddenGlobalError(PyAny);

// SAFETY: `type_object_raw` returns a type object that lives for the rest of the process
// (owned by the static `PyOnceLock`), and it is an exception type (a subclass of
// `CheckpointError` and `pickle.UnpicklingError`), which is all `PyErr::new` relies on.
unsafe impl pyo3::type_object::PyTypeInfo for ForbiddenGlobalError {
    fn type_object_raw(py: Python<'_>) -> *mut pyo3::ffi::PyTypeObject {
        // `register` made the type when the module was imported; this cannot fail after.
        forbidden_global_type(py)
            .expect("zeroload.ForbiddenGlobalError is created when zeroload._core is imported")
            .as_ptr()
            .cast()
    }
}

static FORBIDDEN_GLOBAL_TYPE: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> =
    pyo3::sync::PyOnceLock::new();

fn forbidden_global_type(py: Python<'_>) -> PyResult<&Py<pyo3::types::PyType>> {
    FORBIDDEN_GLOBAL_TYPE.get_or_try_init(py, || make_forbidden_global_type(py))
}

impl ForbiddenGlobalError {
    pub fn new_err(msg: String) -> PyErr {
        PyErr::new::<ForbiddenGlobalError, _>(msg)
    }
}

fn make_forbidden_global_type(py: Python<'_>) -> PyResult<Py<pyo3::types::PyType>> {
    let unpickling = py.import("pickle")?.getattr("UnpicklingError")?;
    let bases = pyo3::types::PyTuple::new(
        py,
        [py.get_type::<CheckpointError>().into_any(), unpickling],
    )?;
    let namespace = pyo3::types::PyDict::new(py);
    namespace.set_item("__module__", "zeroload")?;
    namespace.set_item(
        "__doc__",
        "The checkpoint's pickle asks for a global outside zeroload's allow-list (code, or a \
         class that is not a tensor, container or plain value); nothing was executed. A \
         CheckpointError that is also a pickle.UnpicklingError, as torch.load raises.",
    )?;
    Ok(py
        .get_type::<pyo3::types::PyType>()
        .call1(("ForbiddenGlobalError", bases, namespace))?
        .cast_into::<pyo3::types::PyType>()?
        .unbind())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CheckpointError", m.py().get_type::<CheckpointError>())?;
    m.add("CudaError", m.py().get_type::<CudaError>())?;
    m.add(
        "ForbiddenGlobalError",
        forbidden_global_type(m.py())?.clone_ref(m.py()),
    )?;
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
            Error::ForbiddenGlobal { .. } => ForbiddenGlobalError::new_err(msg),
            Error::Malformed { .. } | Error::Unsupported { .. } => CheckpointError::new_err(msg),
            Error::Cuda { .. } | Error::CudaUnavailable(_) => CudaError::new_err(msg),
            Error::Internal(_) => PyRuntimeError::new_err(msg),
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
        }
    }
}

pub use crate::error::panic_message;

/// Runs `f`, turning a Rust panic into a `CheckpointError` naming `path` and `what` was
/// being done, so no panic reaches Python as a `PanicException` (a `BaseException` that
/// `except Exception` would not catch). Every entry point that parses or reads a file goes
/// through this; a panic here is a zeroload bug, and the message says so.
pub fn catch_panic<T>(
    path: &std::path::Path,
    what: &str,
    f: impl FnOnce() -> PyResult<T>,
) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(CheckpointError::new_err(panic_error_message(
            path,
            what,
            payload.as_ref(),
        ))),
    }
}

fn panic_error_message(
    path: &std::path::Path,
    what: &str,
    payload: &(dyn std::any::Any + Send),
) -> String {
    format!(
        "{}: internal error while {what}: {} (the file may be hostile or corrupt; this is a \
         zeroload bug, please report it)",
        path.display(),
        panic_message(payload)
    )
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests attach to an interpreter of their own; no locks
mod tests {
    use super::*;

    #[test]
    fn panic_messages_name_the_file_and_the_payload() {
        let path = std::path::Path::new("/x/model.pth");
        let caught = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        let msg = panic_error_message(path, "parsing", caught.as_ref());
        assert!(
            msg.starts_with("/x/model.pth: internal error while parsing: boom 7"),
            "{msg}"
        );
        let caught = std::panic::catch_unwind(|| panic!("literal")).unwrap_err();
        assert_eq!(panic_message(caught.as_ref()), "literal");
        let caught = std::panic::catch_unwind(|| std::panic::panic_any(5u8)).unwrap_err();
        assert_eq!(panic_message(caught.as_ref()), "unknown panic");
    }

    #[test]
    fn internal_errors_are_runtime_errors_not_blamed_on_the_file_or_driver() {
        Python::initialize();
        Python::attach(|py| {
            let err: PyErr = Error::Internal("a reader thread panicked: boom".into()).into();
            assert!(err.is_instance_of::<PyRuntimeError>(py), "{err}");
            assert!(!err.is_instance_of::<CudaError>(py));
            assert!(!err.is_instance_of::<CheckpointError>(py));
            let msg = err.value(py).to_string();
            assert!(
                msg.contains("boom") && msg.contains("bug in zeroload"),
                "{msg}"
            );
            let err: PyErr = Error::CudaUnavailable("stub".into()).into();
            assert!(err.is_instance_of::<CudaError>(py));
        });
    }

    #[test]
    fn a_panic_reaches_python_as_checkpoint_error_not_panic_exception() {
        Python::initialize();
        Python::attach(|py| {
            let path = std::path::Path::new("/x/model.pth");
            let err =
                catch_panic::<()>(path, "parsing", || panic!("index out of bounds")).unwrap_err();
            assert!(err.is_instance_of::<CheckpointError>(py), "{err}");
            assert!(!err.is_instance_of::<pyo3::panic::PanicException>(py));
            let msg = err.value(py).to_string();
            assert!(msg.contains("/x/model.pth") && msg.contains("index out of bounds"));
            // Errors pass through untouched.
            let err = catch_panic::<()>(path, "parsing", || {
                Err(pyo3::exceptions::PyKeyError::new_err("w"))
            })
            .unwrap_err();
            assert!(
                err.is_instance_of::<pyo3::exceptions::PyKeyError>(py),
                "{err}"
            );
        });
    }
}
