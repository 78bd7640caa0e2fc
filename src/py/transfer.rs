//! Copy-engine bindings. Copies run with the GIL released; the progress callback (and a
//! check for pending signals, so Ctrl-C works) re-acquires it on the calling thread only,
//! at most once per `transfer::PROGRESS_STEP` bytes. An exception raised there cancels
//! the copy and propagates unchanged.
use pyo3::prelude::*;

use crate::error::Result;
use crate::py::checkpoint::PyCheckpoint;
use crate::py::errors::catch_panic;
use crate::transfer::{self, cuda, host, CopyRequest, Outcome};

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

/// `(slab_bytes, slabs)` of the process-wide pinned staging ring, or None before the
/// first CUDA copy.
#[pyfunction]
fn cuda_staging_allocated() -> Option<(u64, usize)> {
    cuda::staging_allocated()
}

fn to_requests(requests: Vec<(u64, u64, u64)>) -> Vec<CopyRequest> {
    requests
        .into_iter()
        .map(|(file_offset, nbytes, dest)| CopyRequest {
            file_offset,
            nbytes,
            dest,
        })
        .collect()
}

/// Runs `copy` with the GIL released, handing it a progress function that calls
/// `progress(done, total)` (and checks for signals) with the GIL held.
fn run_copy<F>(
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
        catch_panic(path, "copying from it", || Ok(copy(&mut cb)))
    })?;
    match outcome {
        Ok(Outcome::Done) => Ok(()),
        Ok(Outcome::Cancelled) => Err(raised.unwrap_or_else(|| {
            pyo3::exceptions::PyRuntimeError::new_err("copy cancelled by its progress callback")
        })),
        Err(e) => Err(e.into()),
    }
}

/// Copies file bytes of `ckpt` to CUDA device memory. `requests`: `(file_offset, nbytes,
/// device_ptr)`, each pointer the `data_ptr()` of a live tensor on `cuda:device_index`
/// (checked best-effort). `budget`: pinned staging bytes (default `ZEROLOAD_STAGING_BYTES`
/// or 256 MiB). `direct`: read with O_DIRECT where possible. Blocks until every copy has
/// completed. Private: used by `zeroload._device`.
#[pyfunction]
#[pyo3(signature = (ckpt, requests, device_index, budget=None, progress=None, *, direct=false, readers=None))]
#[allow(clippy::too_many_arguments)]
fn copy_to_cuda(
    py: Python<'_>,
    ckpt: PyRef<'_, PyCheckpoint>,
    requests: Vec<(u64, u64, u64)>,
    device_index: usize,
    budget: Option<u64>,
    progress: Option<Py<PyAny>>,
    direct: bool,
    readers: Option<usize>,
) -> PyResult<()> {
    let inner = ckpt.inner.clone();
    drop(ckpt);
    let reqs = to_requests(requests);
    let opts = cuda::CudaOptions {
        device: device_index,
        budget,
        direct,
        readers,
    };
    let path = inner.path.clone();
    run_copy(py, &path, progress, move |cb| {
        // SAFETY: the Python caller (zeroload._device) passes `data_ptr()`s of tensors it
        // allocated on this device for exactly `nbytes` and keeps alive, untouched by any
        // other work, until this call returns; `copy_to_cuda` also checks each pointer is
        // device memory of that device.
        unsafe { cuda::copy_to_cuda(&inner.mapping, &reqs, opts, cb) }
    })
}

/// Copies file bytes of `ckpt` into host memory. `requests`: `(file_offset, nbytes,
/// host_ptr)`, each pointer the `data_ptr()` of a live, contiguous CPU tensor of at least
/// `nbytes` bytes that nothing else touches during the call. Private: used by
/// `zeroload._load_into`; a wrong pointer corrupts memory.
#[pyfunction]
#[pyo3(signature = (ckpt, requests, threads=None, progress=None))]
fn copy_to_host(
    py: Python<'_>,
    ckpt: PyRef<'_, PyCheckpoint>,
    requests: Vec<(u64, u64, u64)>,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let inner = ckpt.inner.clone();
    drop(ckpt);
    let reqs = to_requests(requests);
    let path = inner.path.clone();
    run_copy(py, &path, progress, move |cb| {
        // SAFETY: the caller's contract above (zeroload._load_into passes `data_ptr()`s
        // of live contiguous tensors it keeps referenced for the call, sized by their
        // `nbytes`); the plan rejects overlapping destinations and ranges outside the file.
        unsafe { host::copy_to_host(&inner.mapping, &reqs, threads, cb) }
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_staging_allocated, m)?)?;
    m.add_function(wrap_pyfunction!(copy_to_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(copy_to_host, m)?)?;
    Ok(())
}
