//! `zeroload._core.DLPackView`: an exportable view of mapped memory implementing the
//! `__dlpack__` protocol (versioned capsule when the consumer asks for >= 1.0).

use std::ffi::{c_void, CStr};

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::{ffi, IntoPyObjectExt};

use crate::dlpack::{self, Export, Owner};
use crate::dtype::DType;

const NAME_LEGACY: &CStr = c"dltensor";
const NAME_VERSIONED: &CStr = c"dltensor_versioned";

/// A CPU tensor view (dtype, shape, strides, offset) on memory owned by Rust.
#[pyclass(module = "zeroload._core", name = "DLPackView", frozen)]
pub struct DLPackView {
    owner: Owner,
    /// Base pointer as an address (raw pointers are not Send).
    base: usize,
    byte_offset: u64,
    dtype: DType,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

impl DLPackView {
    pub fn new(
        owner: Owner,
        data: *mut u8,
        dtype: DType,
        shape: Vec<i64>,
        strides: Vec<i64>,
    ) -> Self {
        DLPackView {
            owner,
            base: data as usize,
            byte_offset: 0,
            dtype,
            shape,
            strides,
        }
    }

    fn export(&self) -> Export<'_> {
        Export {
            owner: &self.owner,
            data: self.base as *mut u8,
            byte_offset: self.byte_offset,
            dtype: self.dtype,
            shape: &self.shape,
            strides: &self.strides,
        }
    }
}

/// A fresh DLPack capsule of `export`: `dltensor_versioned` or legacy `dltensor`.
pub fn capsule(py: Python<'_>, export: &Export<'_>, versioned: bool) -> PyResult<Py<PyAny>> {
    if versioned {
        let p = dlpack::export_versioned(export);
        // SAFETY: a fresh export handed to exactly one capsule, whose destructor frees it
        // only if no consumer took it.
        unsafe { new_capsule(py, p.cast(), NAME_VERSIONED, destroy_versioned) }
    } else {
        let p = dlpack::export_legacy(export);
        // SAFETY: as above.
        unsafe { new_capsule(py, p.cast(), NAME_LEGACY, destroy_legacy) }
    }
}

#[pymethods]
impl DLPackView {
    /// The DLPack protocol. Returns a `dltensor_versioned` capsule when `max_version`
    /// allows 1.0 or later, a legacy `dltensor` capsule otherwise. Never copies.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = stream; // CPU memory: no stream to synchronise with.
        if let Some((kind, _)) = dl_device {
            if kind != dlpack::DL_CPU {
                return Err(PyBufferError::new_err(
                    "zeroload DLPack views live on the CPU; copy them to a device with torch",
                ));
            }
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err(
                "zeroload DLPack views are zero-copy; let the consumer copy",
            ));
        }
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        capsule(py, &self.export(), versioned)
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (dlpack::DL_CPU, 0)
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.torch_name()
    }

    #[getter]
    fn shape(&self) -> Vec<i64> {
        self.shape.clone()
    }
}

/// Wraps `pointer` in a capsule named `name` whose destructor is `destructor`.
///
/// # Safety
/// `pointer` must be a fresh export that nothing else owns; on failure it is leaked
/// rather than double-freed.
unsafe fn new_capsule(
    py: Python<'_>,
    pointer: *mut c_void,
    name: &'static CStr,
    destructor: ffi::PyCapsule_Destructor,
) -> PyResult<Py<PyAny>> {
    // SAFETY: `name` is 'static (the capsule keeps the pointer), `pointer` is non-null.
    let raw = unsafe { ffi::PyCapsule_New(pointer, name.as_ptr(), Some(destructor)) };
    if raw.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `raw` is a new, owned reference.
    let obj = unsafe { Bound::from_owned_ptr(py, raw) };
    obj.into_py_any(py)
}

/// Capsule destructor: frees the export unless a consumer took it (renamed the capsule to
/// `used_dltensor_versioned`). Safe while an exception is pending: it only calls
/// `PyCapsule_IsValid`, which never raises, and `PyCapsule_GetPointer` on a name it has
/// just checked.
unsafe extern "C" fn destroy_versioned(capsule: *mut ffi::PyObject) {
    // SAFETY: called by CPython with the capsule being destroyed.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME_VERSIONED.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(capsule, NAME_VERSIONED.as_ptr());
            dlpack::free_versioned(p.cast());
        }
    }
}

/// As `destroy_versioned`, for legacy capsules.
unsafe extern "C" fn destroy_legacy(capsule: *mut ffi::PyObject) {
    // SAFETY: called by CPython with the capsule being destroyed.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME_LEGACY.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(capsule, NAME_LEGACY.as_ptr());
            dlpack::free_legacy(p.cast());
        }
    }
}

pub fn check_dims(shape: &[u64], strides: &[i64]) -> PyResult<(Vec<i64>, Vec<i64>)> {
    let shape = shape
        .iter()
        .map(|&d| i64::try_from(d).map_err(|_| PyValueError::new_err("dimension too large")))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((shape, strides.to_vec()))
}

/// A tensor borrowed from another DLPack producer (torch) as a copy destination: where its
/// bytes are, and the capsule that keeps them alive. Until the capsule is dropped the
/// producer holds a reference to the tensor's memory (torch keeps the storage alive while
/// any capsule of it exists), so the buffer stays valid however the caller's own
/// references change.
pub struct Borrowed {
    pub buffer: dlpack::Buffer,
    _capsule: Py<PyAny>,
}

/// Borrows `obj` (anything with `__dlpack__`, e.g. a torch tensor) as a copy destination.
/// Only dense (C-contiguous) tensors are accepted; `what` names it in errors.
pub fn borrow_dense(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Borrowed> {
    let capsule = obj.call_method0("__dlpack__").map_err(|e| {
        PyValueError::new_err(format!("{what} cannot be exported through DLPack: {e}"))
    })?;
    borrow_capsule(capsule, what)
}

/// Borrows an unused "dltensor" capsule (what `__dlpack__()` or
/// `torch.utils.dlpack.to_dlpack` returns) as `borrow_dense` does.
pub fn borrow_capsule(capsule: Bound<'_, PyAny>, what: &str) -> PyResult<Borrowed> {
    let raw = capsule.as_ptr();
    // SAFETY: `raw` is a live object (we hold `capsule`); PyCapsule_IsValid accepts any
    // object and only reads its type and name.
    if unsafe { ffi::PyCapsule_IsValid(raw, NAME_LEGACY.as_ptr()) } != 1 {
        return Err(PyValueError::new_err(format!(
            "{what}: __dlpack__() did not return an unused \"dltensor\" capsule"
        )));
    }
    // SAFETY: the capsule is valid with this name (checked above), so GetPointer returns
    // its non-null pointer without raising.
    let managed = unsafe { ffi::PyCapsule_GetPointer(raw, NAME_LEGACY.as_ptr()) }
        .cast::<dlpack::DLManagedTensor>();
    // SAFETY: a "dltensor" capsule holds a DLManagedTensor whose DLTensor the producer
    // keeps valid (with its shape and strides arrays) until the deleter runs, which cannot
    // happen before the capsule, which we hold, is destroyed.
    let buffer = unsafe { dlpack::dense_buffer(&(*managed).dl_tensor) }
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    Ok(Borrowed {
        buffer,
        _capsule: capsule.unbind(),
    })
}
