//! Bindings of the write path (`zeroload.save`): host byte ranges written to an open file
//! with the GIL released (`transfer::write`).
//!
//! # Why the writes are sound
//! Sources are `bytes` objects (immutable; we hold a reference for the whole call) or
//! dense CPU tensors borrowed through DLPack (`Borrowed` holds the capsule, and with it
//! the producer's storage, until the call returns). Every request is checked to lie inside
//! its source. The bytes are only read (by `pwrite`, and by the CRC): another Python thread
//! writing a source tensor meanwhile gives a file with mixed values, as with `torch.save`,
//! never a read outside memory we hold.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule};

use crate::dlpack::DL_CPU;
use crate::py::dlpack::{borrow_capsule, borrow_dense, Borrowed};
use crate::py::transfer::run_copy;
use crate::transfer::write::{write_from_host, WriteRequest};

/// A source's bytes and what keeps them alive.
enum Source<'py> {
    Bytes(Bound<'py, PyBytes>),
    Tensor(Borrowed),
}

impl Source<'_> {
    fn addr_len(&self) -> (usize, u64) {
        match self {
            Source::Bytes(b) => {
                let s = b.as_bytes();
                (s.as_ptr() as usize, s.len() as u64)
            }
            Source::Tensor(t) => (t.buffer.addr as usize, t.buffer.nbytes),
        }
    }
}

/// The file behind descriptor `fd`, borrowed (never closed here).
fn borrow_fd(fd: i32) -> PyResult<ManuallyDrop<File>> {
    if fd < 0 {
        return Err(PyValueError::new_err(format!("bad file descriptor {fd}")));
    }
    #[cfg(unix)]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` is an open descriptor of the caller's; ManuallyDrop never closes it.
        Ok(ManuallyDrop::new(unsafe { File::from_raw_fd(fd) }))
    }
    #[cfg(windows)]
    {
        use std::os::windows::io::FromRawHandle;
        // SAFETY: get_osfhandle only looks the descriptor up in the C runtime's table.
        let handle = unsafe { libc::get_osfhandle(fd) };
        if handle == -1 {
            return Err(PyValueError::new_err(format!("bad file descriptor {fd}")));
        }
        // SAFETY: the handle of the caller's open descriptor; ManuallyDrop never closes it.
        Ok(ManuallyDrop::new(unsafe {
            File::from_raw_handle(handle as _)
        }))
    }
}

/// Writes byte ranges of `sources` to the open file `fd` with positional writes in file
/// order and the GIL released (`transfer::write`; `threads`: the writer plus CRC threads). `sources`: `bytes` objects, dense CPU tensors (anything
/// exporting DLPack) or unused "dltensor" capsules of them (`to_dlpack`): zero-copy, so a
/// tensor viewing a zeroload mapping is written straight from the mapping; `requests`: `(source index, byte offset in the source, nbytes,
/// file offset)`, checked against the source's size; file ranges must not overlap.
/// `path` names the file in errors. Returns the CRC-32 of each request's bytes when
/// `crc`, else an empty list. Ctrl-C and exceptions raised by `progress(done, total)`
/// stop the write and propagate (the file is then partly written).
#[pyfunction]
#[pyo3(signature = (fd, path, sources, requests, progress=None, crc=true, threads=None))]
#[allow(clippy::too_many_arguments)]
fn write_host(
    py: Python<'_>,
    fd: i32,
    path: PathBuf,
    sources: &Bound<'_, PyAny>,
    requests: Vec<(usize, u64, u64, u64)>,
    progress: Option<Py<PyAny>>,
    crc: bool,
    threads: Option<usize>,
) -> PyResult<Vec<u32>> {
    let mut held = Vec::new();
    for (i, s) in sources.try_iter()?.enumerate() {
        let s = s?;
        if let Ok(b) = s.cast::<PyBytes>() {
            held.push(Source::Bytes(b.clone()));
            continue;
        }
        let what = format!("source #{i}");
        let b = if s.cast::<PyCapsule>().is_ok() {
            borrow_capsule(s, &what)?
        } else {
            borrow_dense(&s, &what)?
        };
        if b.buffer.device != (DL_CPU, 0) {
            return Err(PyValueError::new_err(format!(
                "source #{i} is on DLPack device {:?}, not the CPU",
                b.buffer.device
            )));
        }
        held.push(Source::Tensor(b));
    }
    let extents: Vec<(usize, u64)> = held.iter().map(Source::addr_len).collect();
    let reqs = requests
        .into_iter()
        .map(|(src, offset, nbytes, file_offset)| {
            let Some(&(addr, len)) = extents.get(src) else {
                return Err(PyValueError::new_err(format!(
                    "write request names source #{src}; there are {}",
                    extents.len()
                )));
            };
            if offset.checked_add(nbytes).is_none_or(|end| end > len) {
                return Err(PyValueError::new_err(format!(
                    "write of {nbytes} bytes at byte {offset} of source #{src} would read \
                     past its end ({len} bytes)"
                )));
            }
            Ok(WriteRequest {
                src: addr + offset as usize,
                nbytes,
                file_offset,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let file = borrow_fd(fd)?;
    let mut crcs = Vec::new();
    let out = &mut crcs;
    let file_ref: &File = &file;
    let where_ = path.clone();
    let r = run_copy(py, &path, progress, move |cb| {
        // SAFETY: see "Why the writes are sound" at the top of this file: every request
        // lies inside a source held by `held` until after this call.
        let (outcome, c) = unsafe { write_from_host(file_ref, &where_, &reqs, crc, threads, cb) }?;
        *out = c;
        Ok(outcome)
    });
    drop(held);
    r.map(|()| crcs)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_host, m)?)?;
    Ok(())
}
