//! The reverse path of the CUDA sink: GPU -> pinned staging ring -> file, for saving.
//! The same staging resources as loads (the ring, the device's stream and its events,
//! checked out for the call), `cuMemcpyDtoHAsync_v2` into each slab, and the sink-agnostic
//! write loop of `transfer/writeback.rs`.

use std::fs::File;
use std::path::Path;

use super::driver::{check_device_memory, context, cu, guarded, with_context};
use super::staging::{Staging, Streams};
use super::staging_budget;
use crate::error::Result;
use crate::transfer::pipeline::{Reporter, Slabs};
use crate::transfer::plan::written_extents;
use crate::transfer::writeback::{run_writeback, total_bytes, Drain, WriteRequest};
use crate::transfer::{CopyRequest, Extent, Outcome, ProgressFn};

/// Options of one write from CUDA memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct CudaWriteOptions {
    /// CUDA device ordinal of every source.
    pub device: usize,
    /// Pinned staging budget in bytes; `None`: `ZEROLOAD_STAGING_BYTES` or 256 MiB.
    pub budget: Option<u64>,
    /// Writer threads; `None`: one.
    pub writers: Option<usize>,
}

impl Drain for Streams {
    unsafe fn copy_out(&mut self, dst: *mut u8, src: u64, len: usize) -> Result<()> {
        // SAFETY: forwarded contract; the stream is ours and alive.
        unsafe { cudarc::driver::sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, len, self.stream()) }
            .result()
            .map_err(cu("cuMemcpyDtoHAsync_v2"))
    }
}

/// Writes each request's bytes of device memory on `opts.device` to `file` at its file
/// offset, through the pinned staging ring (host memory stays within the staging
/// budget). Returns the outcome and, when done, each request's CRC32 (request order).
///
/// Requests are checked first: each inside one of `sources` (the device buffers, e.g.
/// tensors' storages, the requests read from), and each source a request reads device
/// memory of `opts.device` (once per buffer). `what` names the file in errors.
/// `progress` runs on the calling thread, never under a lock of ours; returning `false`
/// stops the write (`Outcome::Cancelled`; the file then holds part of the data). Whatever
/// happens, every copy issued has completed and the writer threads have stopped when
/// this returns.
///
/// # Safety
/// For every request, `src .. src + nbytes` must be device memory of `opts.device` in its
/// primary context, valid for reads for the whole call, that no other work writes until
/// this returns (in particular no kernel still pending on another stream).
pub unsafe fn write_from_cuda(
    file: &File,
    what: &Path,
    sources: &[Extent],
    requests: &[WriteRequest],
    opts: CudaWriteOptions,
    progress: ProgressFn<'_>,
) -> Result<(Outcome, Vec<u32>)> {
    guarded(|| {
        let budget = staging_budget(opts.budget)?;
        // The same containment check as a load's destinations, sources in their place.
        let as_copies: Vec<CopyRequest> = requests
            .iter()
            .map(|r| CopyRequest {
                file_offset: r.file_offset,
                nbytes: r.nbytes,
                dest: r.src,
            })
            .collect();
        let read = written_extents(&as_copies, sources, &what.display().to_string())?;
        let ctx = context(opts.device)?;
        with_context(ctx, || {
            for &s in &read {
                check_device_memory(s, opts.device, "source")?;
            }
            let Some(mut reporter) = Reporter::start(progress, total_bytes(requests)) else {
                return Ok((Outcome::Cancelled, Vec::new()));
            };
            if requests.iter().all(|r| r.nbytes == 0) {
                return Ok((Outcome::Done, vec![0; requests.len()]));
            }
            let mut guard = Staging::checkout()?;
            let staging: &mut Staging = &mut guard;
            let ring = staging.ensure_ring(budget, ctx)?;
            let slab_bytes = ring.slab_bytes;
            let slab_ptrs: Vec<usize> = ring.slabs.iter().map(|s| s.0 as usize).collect();
            let (stream, _) = staging.stage_for(opts.device, ctx, slab_ptrs.len())?;
            // One writer by default: buffered writes into one file take turns on its
            // inode lock (transfer/write.rs), so more would wait rather than write.
            let writers = opts
                .writers
                .unwrap_or(1)
                .min(slab_ptrs.len().saturating_sub(1).max(1));
            // SAFETY: the slabs are pinned allocations of `slab_bytes` that only this call
            // uses (the staging resources are checked out); sources per our caller's
            // contract, checked to be device memory of the device.
            unsafe {
                run_writeback(
                    stream,
                    file,
                    what,
                    requests,
                    Slabs {
                        ptrs: &slab_ptrs,
                        bytes: slab_bytes,
                    },
                    writers,
                    &mut reporter,
                )
            }
        })
    })
}
