//! Binding of the CUDA sink's reverse path: writes byte ranges of CUDA memory to an open
//! file through the pinned staging ring (`transfer::cuda::write_from_cuda`), for
//! `zeroload.save`. Runs with the GIL released; progress, Ctrl-C and exceptions from the
//! callback work as in loads (`transfer::run_copy`).
//!
//! # Why the call is sound
//! Any Python code can call it with any integers. The host memory written is only the
//! staging slabs (ours, checked out for the call) and the file; the device ranges read are
//! checked first to lie inside the given sources, and each source to be device memory of
//! `device` (`cuPointerGetAttributes`), so a wrong address is an error, not a stray read.
//! That no kernel writes the sources meanwhile cannot be enforced here; it is not needed
//! for soundness (the file then holds mixed values, nothing of ours is touched).

use std::fs::File;
use std::path::PathBuf;

use pyo3::exceptions::{PyUserWarning, PyValueError};
use pyo3::prelude::*;

use crate::py::transfer::run_copy;
use crate::transfer::{cuda, Extent, Outcome, WriteRequest};

/// A descriptor of our own for the caller's `fd` (so a close of `fd` during the call
/// cannot pull the file from under the writers).
fn own_fd(fd: i32) -> std::io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: `dup` only reads its argument; a bad descriptor is EBADF.
        let new = unsafe { libc::dup(fd) };
        if new < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `new` is a fresh descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(new) })
    }
    #[cfg(windows)]
    {
        use std::os::windows::io::{BorrowedHandle, RawHandle};
        // SAFETY: `_get_osfhandle` only looks the descriptor up (-1 if it is not open).
        let h = unsafe { libc::get_osfhandle(fd) };
        if h == -1 {
            return Err(std::io::Error::from_raw_os_error(6)); // ERROR_INVALID_HANDLE
        }
        // SAFETY: the CRT's handle of an open descriptor, open at least until it is
        // duplicated on the next line.
        let b = unsafe { BorrowedHandle::borrow_raw(h as RawHandle) };
        Ok(File::from(b.try_clone_to_owned()?))
    }
}

/// What errors call the file: its path where the OS says it, else the descriptor.
fn fd_name(fd: i32) -> PathBuf {
    #[cfg(target_os = "linux")]
    if let Ok(p) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        return p;
    }
    PathBuf::from(format!("file descriptor {fd}"))
}

/// Writes byte ranges of CUDA memory on `cuda:device` to the open file `fd` (opened for
/// writing; its offset is not used or moved) and returns each request's CRC32.
/// `sources`: `(device address, nbytes)` buffers (e.g. tensors' storages); `requests`:
/// `(source index, byte offset in the source, nbytes, file offset)`. Host memory stays
/// within the pinned staging budget (`budget`, default `ZEROLOAD_STAGING_BYTES` or
/// 256 MiB): device -> pinned slab -> positional write, the copy of the next slab
/// overlapping the writes of the last. No other work may write the sources meanwhile
/// (synchronise torch's streams first).
#[pyfunction]
#[pyo3(signature = (fd, sources, requests, device, budget=None, progress=None))]
fn write_from_cuda(
    py: Python<'_>,
    fd: i32,
    sources: Vec<(u64, u64)>,
    requests: Vec<(usize, u64, u64, u64)>,
    device: usize,
    budget: Option<u64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Vec<u32>> {
    let reqs = requests
        .into_iter()
        .map(|(source, src_offset, nbytes, file_offset)| {
            let Some(&(addr, len)) = sources.get(source) else {
                return Err(PyValueError::new_err(format!(
                    "write request names source #{source}; there are {}",
                    sources.len()
                )));
            };
            if src_offset.checked_add(nbytes).is_none_or(|end| end > len) {
                return Err(PyValueError::new_err(format!(
                    "write of {nbytes} bytes at byte {src_offset} of source #{source} would \
                     read past its end ({len} bytes)"
                )));
            }
            if file_offset.checked_add(nbytes).is_none() {
                return Err(PyValueError::new_err(format!(
                    "write of {nbytes} bytes at file offset {file_offset} overflows"
                )));
            }
            Ok(WriteRequest {
                src: addr + src_offset,
                nbytes,
                file_offset,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let sources: Vec<Extent> = sources
        .iter()
        .map(|&(addr, nbytes)| Extent { addr, nbytes })
        .collect();
    let path = fd_name(fd);
    let file = own_fd(fd).map_err(|e| crate::error::Error::io(&path, e))?;
    let opts = cuda::CudaWriteOptions {
        device,
        budget,
        writers: None,
    };
    let mut crcs = Vec::new();
    let out = &mut crcs;
    let copied = run_copy(py, &path, progress, |cb| {
        // SAFETY: see "Why the call is sound" at the top of this file.
        let (outcome, c) =
            unsafe { cuda::write_from_cuda(&file, &path, &sources, &reqs, opts, cb) }?;
        *out = c;
        Ok::<Outcome, crate::error::Error>(outcome)
    });
    if let Some(msg) = cuda::take_staging_warning() {
        let msg = std::ffi::CString::new(msg).unwrap_or_default();
        let warned = PyErr::warn(py, &py.get_type::<PyUserWarning>(), &msg, 1);
        copied?;
        warned?;
        return Ok(crcs);
    }
    copied?;
    Ok(crcs)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_from_cuda, m)?)?;
    Ok(())
}
