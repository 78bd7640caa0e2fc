//! Copy-engine bindings. Copies run with the GIL released; the progress callback (and a
//! check for pending signals, so Ctrl-C works) re-acquires it on the calling thread only,
//! at most once per `transfer::PROGRESS_STEP` bytes. An exception raised there cancels
//! the copy and propagates unchanged.
//!
//! Lock order: the engine never calls the progress callback while holding a lock of its
//! own, and every binding that may wait for the engine's staging resources (a copy,
//! `release_staging`) or look at them (`cuda_staging_allocated`) detaches from the
//! interpreter first. So a copy whose progress callback waits for the GIL and a thread
//! holding the GIL that asks for the staging state never wait for each other.
//!
//! # Why the copies are sound
//! The copy bindings (here and in `slices.rs`) call the engine's `unsafe` copy functions
//! whoever called them: any Python code can import `zeroload._core`, so nothing here
//! relies on zeroload's own Python callers behaving.
//! - every destination range lies inside one borrowed destination (bounds checked by
//!   `destination_requests` or `plan_jobs`), and the destination's memory stays valid for
//!   the whole call: the DLPack capsule in `Borrowed` is held until after the call, and
//!   its producer (torch) keeps the storage alive while the capsule exists (a capsule's
//!   address and size are trusted as every DLPack consumer trusts its producer). The capsule's
//!   device was checked (`borrow_destinations`), and the CUDA engine checks once per
//!   destination that the memory is the device's;
//! - the plan refuses overlapping destinations and file ranges outside the file;
//! - the engine's other demand, that nothing else uses the destinations during the copy,
//!   cannot be enforced from here (another Python thread, or a kernel on another stream,
//!   may write the same tensor). It is not needed for soundness: destination bytes are
//!   written only by the kernel (`pread`/`preadv`) or the GPU's DMA engine and never read
//!   or referenced by Rust, so a concurrent user sees mixed values in its own tensor, as
//!   with two threads writing one tensor in torch, and no memory of ours is touched.

use std::ffi::CString;

use pyo3::exceptions::{PyRuntimeError, PyUserWarning, PyValueError};
use pyo3::prelude::*;

use crate::dlpack::{DL_CPU, DL_CUDA};
use crate::error::{panic_message, Error, Result};
use crate::py::checkpoint::PyCheckpoint;
use crate::py::dlpack::{borrow_dense, Borrowed};
use crate::transfer::{self, cuda, host, CopyRequest, Extent, Outcome};

/// Whether a CUDA driver is present and sees at least one device. Never raises.
#[pyfunction]
fn cuda_available(py: Python<'_>) -> bool {
    py.detach(cuda::is_available)
}

/// Number of CUDA devices the driver sees (0 without a driver).
#[pyfunction]
fn cuda_device_count(py: Python<'_>) -> PyResult<usize> {
    Ok(py.detach(cuda::device_count)?)
}

/// `(slab_bytes, slabs)` of the process-wide pinned staging ring, or None when it is not
/// allocated (before the first CUDA copy, after `release_staging`). Answers at once, also
/// while another thread copies.
#[pyfunction]
fn cuda_staging_allocated(py: Python<'_>) -> Option<(u64, usize)> {
    py.detach(cuda::staging_allocated)
}

/// Frees the pinned staging ring of GPU loads, with its streams, events and reader
/// threads; the next GPU load allocates them again. Waits for a load in progress on
/// another thread. Returns whether there was anything to free.
#[pyfunction]
fn release_staging(py: Python<'_>) -> PyResult<bool> {
    Ok(py.detach(cuda::release_staging)?)
}

/// Borrows each of `destinations` (dense tensors exporting DLPack) as a copy destination,
/// refusing any that does not live on `device` (a DLPack `(device_type, ordinal)`).
pub(crate) fn borrow_destinations(
    destinations: &Bound<'_, PyAny>,
    device: (i32, i32),
) -> PyResult<Vec<Borrowed>> {
    let mut borrowed = Vec::new();
    for (i, d) in destinations.try_iter()?.enumerate() {
        let b = borrow_dense(&d?, &format!("destination #{i}"))?;
        if b.buffer.device != device {
            return Err(PyValueError::new_err(format!(
                "destination #{i} is on DLPack device {:?}, not {device:?}",
                b.buffer.device
            )));
        }
        borrowed.push(b);
    }
    Ok(borrowed)
}

/// Where each borrowed destination's bytes are.
pub(crate) fn extents(borrowed: &[Borrowed]) -> Vec<Extent> {
    borrowed
        .iter()
        .map(|b| Extent {
            addr: b.buffer.addr,
            nbytes: b.buffer.nbytes,
        })
        .collect()
}

/// Turns `(file_offset, nbytes, destination, byte offset in it)` requests into absolute
/// copy requests, refusing any that would write outside its destination.
fn destination_requests(
    borrowed: &[Borrowed],
    requests: Vec<(u64, u64, usize, u64)>,
) -> PyResult<Vec<CopyRequest>> {
    requests
        .into_iter()
        .map(|(file_offset, nbytes, dest, dest_offset)| {
            let Some(b) = borrowed.get(dest) else {
                return Err(PyValueError::new_err(format!(
                    "copy request names destination #{dest}; there are {}",
                    borrowed.len()
                )));
            };
            if dest_offset
                .checked_add(nbytes)
                .is_none_or(|end| end > b.buffer.nbytes)
            {
                return Err(PyValueError::new_err(format!(
                    "copy of {nbytes} bytes at byte {dest_offset} of destination #{dest} \
                     would write past its end ({} bytes)",
                    b.buffer.nbytes
                )));
            }
            Ok(CopyRequest {
                file_offset,
                nbytes,
                dest: b.buffer.addr + dest_offset,
            })
        })
        .collect()
}

/// Runs `copy` with the GIL released, handing it a progress function that takes the GIL
/// to check for signals (Ctrl-C cancels the copy and raises `KeyboardInterrupt`) and to
/// call `progress(done, total)` if given; an exception raised there cancels the copy and
/// propagates unchanged. A panic inside the copy is a zeroload bug: `RuntimeError` naming
/// the file, never a `PanicException`. Every copy binding goes through here.
pub(crate) fn run_copy<F>(
    py: Python<'_>,
    path: &std::path::Path,
    progress: Option<Py<PyAny>>,
    copy: F,
) -> PyResult<()>
where
    F: FnOnce(transfer::ProgressFn<'_>) -> Result<Outcome> + Send,
{
    let mut raised: Option<PyErr> = None;
    let outcome = py.detach(|| {
        // The one vetted attach (clippy.toml): on the calling thread, between reads, with
        // no lock of ours held (the staging resources are checked out, not locked).
        #[allow(clippy::disallowed_methods)]
        let mut cb = |done: u64, total: u64| -> bool {
            Python::attach(|py| {
                let r = py.check_signals().and_then(|()| match &progress {
                    Some(f) => f.call1(py, (done, total)).map(drop),
                    None => Ok(()),
                });
                match r {
                    Ok(()) => true,
                    Err(e) => {
                        raised = Some(e);
                        false
                    }
                }
            })
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| copy(&mut cb))).unwrap_or_else(
            |payload| {
                Err(Error::Internal(format!(
                    "{}: while copying from it: {}",
                    path.display(),
                    panic_message(payload.as_ref())
                )))
            },
        )
    });
    match outcome {
        Ok(Outcome::Done) => Ok(()),
        Ok(Outcome::Cancelled) => Err(raised
            .unwrap_or_else(|| PyRuntimeError::new_err("copy cancelled by its progress callback"))),
        Err(e) => Err(e.into()),
    }
}

/// Copies file bytes of `ckpt` into CUDA tensors on `cuda:device_index`.
/// `destinations`: dense tensors (anything exporting DLPack) on that device; `requests`:
/// `(file_offset, nbytes, destination index, byte offset in the destination)`, checked
/// against the destination's size. `budget`: pinned staging bytes (default
/// `ZEROLOAD_STAGING_BYTES` or 256 MiB). `direct`: read with O_DIRECT where possible.
/// Blocks until every copy has completed; no other work may use the destinations
/// meanwhile (torch's caller synchronises its streams first).
#[pyfunction]
#[pyo3(signature = (ckpt, destinations, requests, device_index, budget=None, progress=None, *, direct=false, readers=None))]
#[allow(clippy::too_many_arguments)]
fn copy_to_cuda(
    py: Python<'_>,
    ckpt: PyRef<'_, PyCheckpoint>,
    destinations: &Bound<'_, PyAny>,
    requests: Vec<(u64, u64, usize, u64)>,
    device_index: usize,
    budget: Option<u64>,
    progress: Option<Py<PyAny>>,
    direct: bool,
    readers: Option<usize>,
) -> PyResult<()> {
    let inner = ckpt.inner.clone();
    drop(ckpt);
    let ordinal = i32::try_from(device_index)
        .map_err(|_| PyValueError::new_err(format!("no CUDA device {device_index}")))?;
    let borrowed = borrow_destinations(destinations, (DL_CUDA, ordinal))?;
    let reqs = destination_requests(&borrowed, requests)?;
    let dests = extents(&borrowed);
    let opts = cuda::CudaOptions {
        device: device_index,
        budget,
        direct,
        readers,
    };
    let path = inner.path.clone();
    let copied = run_copy(py, &path, progress, move |cb| {
        // SAFETY: see "Why the copies are sound" at the top of this file: the destinations are the borrowed CUDA tensors,
        // alive until `borrowed` is dropped below.
        unsafe { cuda::copy_to_cuda(&inner.mapping, &dests, &reqs, opts, cb) }
    });
    drop(borrowed);
    with_staging_warning(py, copied)
}

/// `copied`, after warning (`UserWarning`) if the full staging budget could not be pinned
/// and a smaller ring is used (once per fallback), whether or not the copy then
/// succeeded. Every binding that copies through the staging ring ends here, so the
/// warning is taken by the copy that caused it, never left for a later one.
pub(crate) fn with_staging_warning<T>(py: Python<'_>, copied: PyResult<T>) -> PyResult<T> {
    if let Some(msg) = cuda::take_staging_warning() {
        let msg = CString::new(msg).unwrap_or_default();
        let warned = PyErr::warn(py, &py.get_type::<PyUserWarning>(), &msg, 1);
        let value = copied?;
        warned?;
        return Ok(value);
    }
    copied
}

/// Copies file bytes of `ckpt` into CPU tensors. `destinations`: dense CPU tensors
/// (anything exporting DLPack); `requests`: `(file_offset, nbytes, destination index,
/// byte offset in the destination)`, checked against the destination's size. Runs on
/// `threads` reader threads (default: up to 8) with the GIL released.
#[pyfunction]
#[pyo3(signature = (ckpt, destinations, requests, threads=None, progress=None))]
fn copy_to_host(
    py: Python<'_>,
    ckpt: PyRef<'_, PyCheckpoint>,
    destinations: &Bound<'_, PyAny>,
    requests: Vec<(u64, u64, usize, u64)>,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let inner = ckpt.inner.clone();
    drop(ckpt);
    let borrowed = borrow_destinations(destinations, (DL_CPU, 0))?;
    let reqs = destination_requests(&borrowed, requests)?;
    let path = inner.path.clone();
    let r = run_copy(py, &path, progress, move |cb| {
        // SAFETY: see "Why the copies are sound" at the top of this file: the destinations are the borrowed CPU tensors,
        // alive until `borrowed` is dropped below.
        unsafe { host::copy_to_host(&inner.mapping, &reqs, threads, cb) }
    });
    drop(borrowed);
    r
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_staging_allocated, m)?)?;
    m.add_function(wrap_pyfunction!(release_staging, m)?)?;
    m.add_function(wrap_pyfunction!(copy_to_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(copy_to_host, m)?)?;
    Ok(())
}
