//! CUDA sink: file -> pinned staging ring -> GPU. This directory is the driver glue only;
//! reading, the reader threads, slab handout, cancellation and progress are the
//! driver-free pipeline's (`transfer/pipeline.rs`, which runs the staged loop on a
//! [`Stage`](crate::transfer::pipeline::Stage): here, a stream with an event per slab).
//!
//! - `driver.rs`: the driver is loaded at run time (cudarc `dynamic-loading`). cudarc
//!   panics when `libcuda` or a symbol is missing, so every entry point first checks that
//!   the library loads and runs the CUDA path inside `catch_unwind`: no panic reaches the
//!   caller. A driver failure becomes `Error::Cuda { call, .. }` naming the entry point; no
//!   driver, no device or a stub driver (`CUDA_ERROR_STUB_LIBRARY`) is
//!   `Error::CudaUnavailable`; a panic in our own code is `Error::Internal`, never blamed
//!   on the driver. We retain the device's *primary* context, the one PyTorch uses, so
//!   `data_ptr()`s of torch tensors are valid destinations; contexts are retained once and
//!   kept for the life of the process; the calling thread's current context is restored
//!   on return (a failure to restore it is reported, not ignored). Each destination buffer
//!   is checked to be memory of the device, once per buffer.
//! - `staging.rs`: what is CUDA's in the staging resources: pinned slabs
//!   (`cuMemHostAlloc`, portable; the ring itself, its budget, the fallback to a smaller
//!   ring with [`take_staging_warning`], the checkout and the shelf of refused frees are
//!   `transfer/staging/`'s), one non-blocking stream with an event per slab for each
//!   device used, and freeing each in its context. The process keeps one set (with the
//!   reader pool), created on first use and reused by every load and save; a copy checks
//!   it out and gives it back; [`release_staging`] frees it all.
//! - `save.rs`: the reverse path (GPU -> slab -> file) for saving: `cuMemcpyDtoHAsync_v2`
//!   into the same ring on the same stream, driven by `transfer/writeback.rs`.
//! - Here: one copy. Reader threads `pread` chunks into free slabs (never DMA from the
//!   mmap: page faults would serialise the transfer); the calling thread issues one async
//!   host-to-device copy per destination piece, records the slab's event, and recycles
//!   slabs whose event completed. One stream synchronisation at the end. Progress counts
//!   bytes whose copy completed. Optional `O_DIRECT` reads for cold files (no page-cache
//!   pollution): chunks are read from 4 KiB-aligned offsets; if the filesystem refuses
//!   `O_DIRECT`, buffered reads are used.
//!
//! Tested without a GPU against `tests/fakecuda`, a fake driver that runs each stream on
//! its own thread after random delays and records every misuse (see `tests/cuda_engine.rs`
//! and `tests/test_cuda_engine.py`).

mod driver;
mod save;
mod staging;

use std::sync::Arc;

pub use driver::{device_count, is_available};
// The staging budget is the driver-independent staging part's; re-exported for callers
// of the CUDA sink.
pub use crate::transfer::staging::{
    parse_bytes, ring_geometry, staging_budget, DEFAULT_STAGING_BYTES, MIN_STAGING_BYTES,
    STAGING_ENV,
};
pub use save::{write_from_cuda, CudaWriteOptions};
pub use staging::{release_staging, staging_allocated, take_staging_warning};

use super::pipeline::{default_threads, run_staged, Reporter, Slabs};
use super::plan::written_extents;
use super::{CopyRequest, Extent, Outcome, Plan, PlanOptions, ProgressFn};
use crate::error::Result;
use crate::fileio::{max_chunk, Source};
use crate::mapping::Mapping;
use driver::{check_destination, context, guarded, with_context};
use staging::Staging;

/// Environment variable overriding the number of reader threads.
pub const READERS_ENV: &str = "ZEROLOAD_READERS";
/// Most reader threads one copy uses.
const MAX_READERS: usize = 64;

/// Options of one CUDA copy.
#[derive(Clone, Copy, Debug, Default)]
pub struct CudaOptions {
    /// CUDA device ordinal of every destination.
    pub device: usize,
    /// Pinned staging budget in bytes; `None`: `ZEROLOAD_STAGING_BYTES` or 256 MiB.
    pub budget: Option<u64>,
    /// Read with `O_DIRECT` (bypass the page cache) where the filesystem allows it.
    pub direct: bool,
    /// Reader threads; `None`: `ZEROLOAD_READERS` or up to 8.
    pub readers: Option<usize>,
}

/// Copies each request's file bytes to its destination device address on `opts.device`.
///
/// Requests are checked first: ranges inside the file, destinations pairwise disjoint,
/// each request inside one of `destinations` (the device buffers, e.g. tensors' storages,
/// the requests write into), and each destination buffer a request writes into device
/// memory of `opts.device` (through `cuPointerGetAttributes`, walking the allocations or
/// VMM mappings it spans; once per buffer, however many requests write into it).
/// `progress` runs on the calling thread, never under a lock of ours; returning `false`
/// stops the copy (`Outcome::Cancelled`). Whatever happens, all copies issued have
/// completed and the reader threads are idle when this returns.
///
/// # Safety
/// For every request, `dest .. dest + nbytes` must be device memory of `opts.device` in its
/// primary context, valid for writes for the whole call (for example the storage of a live
/// torch tensor), that no other work reads or writes until this returns (in particular no
/// kernel still pending on another stream).
pub unsafe fn copy_to_cuda(
    mapping: &Mapping,
    destinations: &[Extent],
    requests: &[CopyRequest],
    opts: CudaOptions,
    progress: ProgressFn<'_>,
) -> Result<Outcome> {
    guarded(|| {
        let budget = staging_budget(opts.budget)?;
        let source = Source::open(mapping.file(), mapping.path(), opts.direct)?;
        let what = mapping.path().display().to_string();
        let direct = source.direct;
        let plan_for = |slab_bytes: usize| {
            Plan::new(
                requests,
                mapping.len(),
                PlanOptions {
                    max_chunk: max_chunk(direct, slab_bytes),
                    max_gap: 256 << 10,
                },
                &what,
            )
        };
        let plan = plan_for(ring_geometry(budget).0)?;
        let written = written_extents(requests, destinations, &what)?;

        let ctx = context(opts.device)?;
        with_context(ctx, || {
            for &d in &written {
                check_destination(d, opts.device)?;
            }
            let Some(mut reporter) = Reporter::start(progress, plan.total_bytes) else {
                return Ok(Outcome::Cancelled);
            };
            if plan.chunks.is_empty() {
                return Ok(Outcome::Done);
            }
            let mut guard = Staging::checkout()?;
            let staging: &mut Staging = &mut guard;
            let ring = staging.ensure_ring(budget, ctx)?;
            let slab_bytes = ring.slab_bytes;
            let slab_ptrs: Vec<usize> = ring.slabs.iter().map(|s| s.0 as usize).collect();
            let plan = if slab_bytes == ring_geometry(budget).0 {
                plan
            } else {
                plan_for(slab_bytes)?
            };
            let readers = reader_count(opts.readers, slab_ptrs.len(), plan.chunks.len());
            let (stage, pool) = staging.stage_for(opts.device, ctx, slab_ptrs.len())?;
            // SAFETY: the slabs are pinned allocations of `slab_bytes` (4 KiB multiples,
            // page-aligned) that only this copy uses (the staging resources are checked out);
            // chunks fit them (planned with `max_chunk`); destinations per our caller's
            // contract.
            unsafe {
                run_staged(
                    stage,
                    Arc::new(plan),
                    Arc::new(source),
                    Slabs {
                        ptrs: &slab_ptrs,
                        bytes: slab_bytes,
                    },
                    readers,
                    pool,
                    &mut reporter,
                )
            }
        })
    })
}

fn reader_count(explicit: Option<usize>, slabs: usize, chunks: usize) -> usize {
    let n = explicit
        .or_else(|| {
            std::env::var(READERS_ENV)
                .ok()
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(default_threads);
    // Leave at least two slabs for copies in flight.
    n.clamp(1, MAX_READERS)
        .min(slabs.saturating_sub(2).max(1))
        .min(chunks.max(1))
}
