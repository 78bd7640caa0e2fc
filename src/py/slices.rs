//! Sliced copies: rectangles of checkpoint tensors (DTensor shards, slices) straight into
//! destination tensors. One Python tuple per tensor; the runs (a `Shard(1)` of a
//! `[50000, 4096]` weight is 50,000 of them) are generated here, with the GIL released,
//! and go to the host or CUDA sink like any other copy requests.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::dlpack::{DL_CPU, DL_CUDA};
use crate::error::{Error, Result};
use crate::py::checkpoint::PyCheckpoint;
use crate::py::transfer::{borrow_destinations, extents, run_copy};
use crate::transfer::slice::{Rect, MAX_RUNS};
use crate::transfer::{self, cuda, host, CopyRequest, Extent, Plan};

/// `(name, destination, destination byte offset, destination element strides or None for
/// dense, file offset of element 0, bytes per element, shape, element strides in the file,
/// per-dimension lists of (start, stop) index ranges)`.
type SliceTuple = (
    String,
    usize,
    u64,
    Option<Vec<u64>>,
    u64,
    u64,
    Vec<u64>,
    Vec<u64>,
    Vec<Vec<(u64, u64)>>,
);

/// One slice, checked and resolved to its destination's address.
struct Job {
    name: String,
    /// One past the last file byte the tensor's rectangle can reach.
    src_end: u64,
    runs: Vec<transfer::slice::Run>,
    dest_addr: u64,
}

/// Checks every slice against the file and its destination and generates its runs.
fn plan_jobs(ckpt: &Checkpoint, slices: &[SliceTuple], dests: &[Extent]) -> Result<Vec<Job>> {
    let path = ckpt.path.display();
    let file_len = ckpt.mapping.len();
    slices
        .iter()
        .map(|s| {
            let (
                name,
                dest,
                dest_offset,
                dst_strides,
                file_offset,
                itemsize,
                shape,
                strides,
                ranges,
            ) = s;
            let fail =
                |msg: String| Error::InvalidArgument(format!("{path}: tensor {name:?}: {msg}"));
            let &Extent { addr, nbytes } = dests.get(*dest).ok_or_else(|| {
                fail(format!(
                    "destination #{dest} does not exist ({} given)",
                    dests.len()
                ))
            })?;
            let rect = Rect {
                itemsize: *itemsize,
                src_offset: *file_offset,
                src_shape: shape,
                src_strides: strides,
                ranges,
                dst_offset: *dest_offset,
                dst_strides: dst_strides.as_deref(),
            };
            let end = rect.dst_end().map_err(|e| fail(e.to_string()))?;
            if end > nbytes {
                return Err(fail(format!(
                    "the selection needs {end} bytes of destination #{dest}, which has {nbytes}"
                )));
            }
            let runs = rect.runs(MAX_RUNS).map_err(|e| fail(e.to_string()))?;
            // The tensor's whole byte range must lie in the file (runs lie inside it).
            let src_end = if shape.contains(&0) {
                *file_offset
            } else {
                shape
                    .iter()
                    .zip(strides.iter())
                    .try_fold(0u64, |acc, (&n, &st)| {
                        acc.checked_add((n - 1).checked_mul(st)?)
                    })
                    .and_then(|last| last.checked_add(1)?.checked_mul(*itemsize))
                    .and_then(|b| b.checked_add(*file_offset))
                    .ok_or_else(|| fail("the tensor's byte range overflows".into()))?
            };
            if src_end > file_len && !runs.is_empty() {
                return Err(Error::malformed(
                    &ckpt.path,
                    format!("tensor {name:?}"),
                    format!(
                        "its bytes end at {src_end}, past the end of the file ({file_len} bytes)"
                    ),
                ));
            }
            Ok(Job {
                name: name.clone(),
                src_end,
                runs,
                dest_addr: addr,
            })
        })
        .collect()
}

fn requests(jobs: &[Job]) -> Vec<CopyRequest> {
    jobs.iter()
        .flat_map(|j| {
            j.runs.iter().map(move |r| CopyRequest {
                file_offset: r.src,
                nbytes: r.len,
                dest: j.dest_addr + r.dst,
            })
        })
        .collect()
}

/// A read that failed part way (the file shrank under us, an I/O error): name the first
/// tensor that reaches past the file's current end, if one does.
fn attribute(e: Error, ckpt: &Checkpoint, jobs: &[Job]) -> Error {
    let now = std::fs::metadata(&ckpt.path).map(|m| m.len()).ok();
    let culprit = now.and_then(|len| jobs.iter().find(|j| !j.runs.is_empty() && j.src_end > len));
    match (culprit, now) {
        (Some(j), Some(len)) => Error::malformed(
            &ckpt.path,
            format!("tensor {:?}", j.name),
            format!(
                "the file now ends at byte {len}, before this tensor's data (bytes up to {}): \
                 was it truncated while loading? ({e})",
                j.src_end
            ),
        ),
        _ => e,
    }
}

/// Copies rectangles of `ckpt`'s tensors into CPU tensors. `slices`: one tuple per tensor
/// (see `SliceTuple`); `destinations`: dense CPU tensors (anything exporting DLPack).
/// Reads are planned across all slices, coalesced over small gaps while they read at
/// most twice the bytes delivered, and run on `threads` threads (default: up to 8).
/// `max_gap`: the largest hole read through (default `host::SLICE_MAX_GAP`).
/// Returns `(bytes delivered, bytes read from the file)`.
#[pyfunction]
#[pyo3(signature = (ckpt, destinations, slices, threads=None, max_gap=None))]
fn copy_slices_to_host(
    py: Python<'_>,
    ckpt: PyRef<'_, PyCheckpoint>,
    destinations: &Bound<'_, PyAny>,
    slices: Vec<SliceTuple>,
    threads: Option<usize>,
    max_gap: Option<u64>,
) -> PyResult<(u64, u64)> {
    let inner = ckpt.inner.clone();
    drop(ckpt);
    let borrowed = borrow_destinations(destinations, (DL_CPU, 0))?;
    let dests = extents(&borrowed);
    let path = inner.path.clone();
    let (jobs, plan) = py.detach(|| -> Result<_> {
        let jobs = plan_jobs(&inner, &slices, &dests)?;
        let mut opts = host::slice_plan_options();
        if let Some(g) = max_gap {
            opts.max_gap = g;
        }
        let plan = Plan::bounded(
            &requests(&jobs),
            inner.mapping.len(),
            opts,
            &path.display().to_string(),
        )?;
        Ok((jobs, plan))
    })?;
    let stats = (plan.total_bytes, plan.read_bytes);
    let r = run_copy(py, &path, None, |cb| {
        // SAFETY: see "Why the copies are sound" in `transfer.rs`: every run lies inside
        // its destination (`plan_jobs` checked the rectangle's extent against the
        // destination's size), a borrowed CPU tensor alive until `borrowed` is dropped
        // below.
        unsafe { host::copy_planned(&inner.mapping, &plan, threads, cb) }
            .map_err(|e| attribute(e, &inner, &jobs))
    });
    drop(borrowed);
    r.map(|()| stats)
}

/// Copies rectangles of `ckpt`'s tensors into CUDA tensors of `cuda:device_index` through
/// the pinned staging ring (see `copy_to_cuda`). Returns the bytes delivered.
#[pyfunction]
#[pyo3(signature = (ckpt, destinations, slices, device_index, budget=None))]
fn copy_slices_to_cuda(
    py: Python<'_>,
    ckpt: PyRef<'_, PyCheckpoint>,
    destinations: &Bound<'_, PyAny>,
    slices: Vec<SliceTuple>,
    device_index: usize,
    budget: Option<u64>,
) -> PyResult<u64> {
    let inner = ckpt.inner.clone();
    drop(ckpt);
    let ordinal = i32::try_from(device_index)
        .map_err(|_| PyValueError::new_err(format!("no CUDA device {device_index}")))?;
    let borrowed = borrow_destinations(destinations, (DL_CUDA, ordinal))?;
    let dests = extents(&borrowed);
    let path = inner.path.clone();
    let (jobs, reqs) = py.detach(|| -> Result<_> {
        let jobs = plan_jobs(&inner, &slices, &dests)?;
        let reqs = requests(&jobs);
        Ok((jobs, reqs))
    })?;
    let delivered = reqs.iter().map(|r| r.nbytes).sum();
    let opts = cuda::CudaOptions {
        device: device_index,
        budget,
        ..Default::default()
    };
    let r = run_copy(py, &path, None, |cb| {
        // SAFETY: see "Why the copies are sound" in `transfer.rs`: every request lies
        // inside its destination (checked in `plan_jobs`), a borrowed CUDA tensor of this
        // device alive until `borrowed` is dropped below.
        unsafe { cuda::copy_to_cuda(&inner.mapping, &dests, &reqs, opts, cb) }
            .map_err(|e| attribute(e, &inner, &jobs))
    });
    drop(borrowed);
    super::transfer::with_staging_warning(py, r.map(|()| delivered))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(copy_slices_to_host, m)?)?;
    m.add_function(wrap_pyfunction!(copy_slices_to_cuda, m)?)?;
    Ok(())
}
