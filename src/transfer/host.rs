//! Host sink: worker threads `pread` file bytes straight into existing host memory.
//!
//! The threads, the claiming of work, cancellation and progress are the pipeline's
//! ([`super::pipeline::run_scoped`]); this file decides what one unit of work is (a batch
//! of chunks) and how a chunk is read.
//!
//! Every piece of the plan is read directly into its destination (no staging buffer, no
//! intermediate tensor), so a materialised CPU module is filled in place. A chunk is read
//! with one `preadv` (up to `IOV_MAX` pieces a call): its pieces scatter to their
//! destinations and the gaps between them, which a plan coalesced across small holes
//! holds, land in a per-thread scratch buffer. Whole-tensor copies are planned without
//! gaps (`max_gap = 0`); sliced reads ([`copy_planned`] with a [`Plan::bounded`] plan) read
//! through gaps of up to [`SLICE_MAX_GAP`] while that keeps them within twice the bytes
//! delivered.

use std::fs::File;
use std::path::Path;

use super::pipeline::{default_threads, run_scoped, Reporter};
use super::{Chunk, CopyRequest, Outcome, Plan, PlanOptions, ProgressFn};
use crate::error::Result;
use crate::fileio::{self, ReadBuf};
use crate::mapping::Mapping;

/// Largest unit of work for one thread.
pub const HOST_CHUNK: u64 = 16 << 20;

/// Largest hole a sliced read reads through (and throws away) rather than issuing another
/// read; the plan's 2x bound applies on top. A `pread` costs about as much as copying
/// 10-20 KiB from the page cache, so larger holes are cheaper skipped (and skipping them
/// keeps `Shard(0)` plans, whose holes are other ranks' shards, at 1x).
pub const SLICE_MAX_GAP: u64 = 16 << 10;

/// Threads claim chunks in batches of at least this many bytes (or [`BATCH_CHUNKS`]
/// chunks), so that plans of many small reads (a `Shard(1)` slice is one read per row)
/// do not pay a hand-off per read.
const BATCH_BYTES: u64 = 1 << 20;
const BATCH_CHUNKS: usize = 256;

/// The options of a sliced host copy's plan.
pub fn slice_plan_options() -> PlanOptions {
    PlanOptions {
        max_chunk: HOST_CHUNK,
        max_gap: SLICE_MAX_GAP,
    }
}

/// Copies each request's file bytes to its destination host address.
///
/// Requests are checked before anything is written: ranges must lie inside the file and
/// destinations must not overlap (exact duplicates are copied once). With `threads` > 1
/// the copies run on that many scoped threads; `progress` is called on the calling thread
/// only, and returning `false` from it stops the copy (`Outcome::Cancelled`; destinations
/// then hold partial data). On error, destinations may likewise hold partial data.
///
/// # Safety
/// For every request, `dest .. dest + nbytes` must be memory valid for writes for the whole
/// call (for example the storage of a live tensor that the caller keeps alive), and nothing
/// else may read or write it until this function returns. Its previous contents do not
/// matter and need not be initialised.
pub unsafe fn copy_to_host(
    mapping: &Mapping,
    requests: &[CopyRequest],
    threads: Option<usize>,
    progress: ProgressFn<'_>,
) -> Result<Outcome> {
    let plan = Plan::new(
        requests,
        mapping.len(),
        PlanOptions {
            max_chunk: HOST_CHUNK,
            max_gap: 0,
        },
        &mapping.path().display().to_string(),
    )?;
    // SAFETY: forwarded contract; the plan was built from the caller's requests.
    unsafe { copy_planned(mapping, &plan, threads, progress) }
}

/// Carries out a plan built (by [`Plan::new`] or [`Plan::bounded`]) from requests against
/// this mapping's length; see [`copy_to_host`]. Gaps between a chunk's pieces are read
/// into a scratch buffer and dropped.
///
/// # Safety
/// As [`copy_to_host`], for the requests the plan was built from: every piece's
/// destination must be valid for writes and used by nothing else during the call.
pub unsafe fn copy_planned(
    mapping: &Mapping,
    plan: &Plan,
    threads: Option<usize>,
    progress: ProgressFn<'_>,
) -> Result<Outcome> {
    let path = mapping.path();
    let Some(mut reporter) = Reporter::start(progress, plan.total_bytes) else {
        return Ok(Outcome::Cancelled);
    };
    let threads = threads.unwrap_or_else(default_threads).clamp(1, 64);
    let file = mapping.file();

    // Batches of consecutive chunks, `bounds[b]..bounds[b + 1]`: the units the threads
    // claim.
    let mut bounds = vec![0usize];
    let (mut bytes, mut count) = (0u64, 0usize);
    for (i, c) in plan.chunks.iter().enumerate() {
        bytes += c.len;
        count += 1;
        if bytes >= BATCH_BYTES || count >= BATCH_CHUNKS || i + 1 == plan.chunks.len() {
            bounds.push(i + 1);
            (bytes, count) = (0, 0);
        }
    }
    let run_batch = |b: usize, scratch: &mut Vec<u8>| -> Result<u64> {
        let chunks = &plan.chunks[bounds[b]..bounds[b + 1]];
        advise_readahead(file, chunks);
        let mut delivered = 0;
        for c in chunks {
            // SAFETY: every piece is part of one request (the plan only splits requests),
            // so `p.dest .. p.dest + p.len` lies inside a destination the caller vouched
            // for; destinations are pairwise disjoint (checked by the plan) and each batch
            // is claimed by exactly one thread, so no two writers touch the same bytes.
            unsafe { read_chunk(file, path, c, scratch) }?;
            delivered += c.delivered();
        }
        Ok(delivered)
    };
    run_scoped(threads, bounds.len() - 1, run_batch, &mut reporter)
}

/// Largest hole between the reads of a batch that still lets the batch's whole span be
/// announced to the kernel as one readahead.
const READAHEAD_HOLE: u64 = 128 << 10;

/// Tells the kernel (`POSIX_FADV_WILLNEED`) to read a batch's span ahead when its reads
/// are separated by small holes only (a `Shard(1)` slice: one read per row). Without it a
/// cold file is read row by row, each short read waiting for the disk: the kernel's
/// readahead does not follow reads that skip a few pages each time (measured 8x slower
/// than reading through the holes). The holes come from disk but are not copied; on a
/// warm page cache the advice costs a walk of the cached pages.
fn advise_readahead(file: &File, chunks: &[Chunk]) {
    let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
        return;
    };
    if chunks.len() < 2
        || chunks
            .windows(2)
            .any(|w| w[1].file_offset > w[0].file_offset + w[0].len + READAHEAD_HOLE)
    {
        return;
    }
    let end = last.file_offset + last.len;
    let len = end.saturating_sub(first.file_offset);
    // A hint whose failure changes nothing but speed: its result is ignored.
    let _ = crate::mapping::advise_willneed(file, first.file_offset, len);
}

/// Reads one chunk: its pieces in file order scatter with `preadv` (gaps into `scratch`);
/// a piece that overlaps bytes already read (two destinations of the same file bytes) is
/// read on its own.
///
/// # Safety
/// Every piece's destination range must be valid for writes and written by no one else
/// during the call.
unsafe fn read_chunk(file: &File, path: &Path, c: &Chunk, scratch: &mut Vec<u8>) -> Result<()> {
    let max_iov = fileio::max_read_bufs();
    let mut iov: Vec<ReadBuf> = Vec::new();
    let mut start = c.file_offset; // file offset of iov[0]
    let mut pos = 0u64; // chunk offset up to which the batch reads
    let mut overlapping = Vec::new();
    let flush = |iov: &mut Vec<ReadBuf>, start: u64| -> Result<()> {
        // SAFETY: each iovec is a piece's destination (valid per the caller's contract)
        // or the start of the thread's own scratch buffer, no longer than it (holes longer
        // than the buffer end the read instead), which is not reallocated while the batch
        // is pending (it is sized before the batch is built).
        let r = unsafe { fileio::read_vectored_exact(file, path, iov, start) };
        iov.clear();
        r
    };
    // Largest hole in the chunk, to size the scratch buffer once. Without vectored reads
    // (Windows) a hole costs a read of its own, so none is read: with no scratch, every
    // hole ends a read and the next starts at the piece after it.
    let gaps: u64 = if !fileio::VECTORED_READS {
        0
    } else {
        let mut end = 0u64;
        let mut largest = 0u64;
        for p in &c.pieces {
            if p.offset > end {
                largest = largest.max(p.offset - end);
            }
            end = end.max(p.offset + p.len);
        }
        largest
    };
    if scratch.len() < gaps as usize {
        scratch.resize(gaps as usize, 0);
    }
    let scratch_ptr = scratch.as_mut_ptr();
    let scratch_len = scratch.len() as u64;
    for p in &c.pieces {
        if p.offset < pos {
            overlapping.push(*p);
            continue;
        }
        // A full vector, or a hole larger than the planned ones (left where a piece that
        // overlaps others was set aside): end this read, start the next at the piece.
        if iov.len() + 2 > max_iov || p.offset - pos > scratch_len {
            if !iov.is_empty() {
                flush(&mut iov, start)?;
            }
            start = c.file_offset + p.offset;
            pos = p.offset;
        }
        if iov.is_empty() {
            start = c.file_offset + p.offset;
            pos = p.offset;
        }
        if p.offset > pos {
            debug_assert!(p.offset - pos <= scratch_len);
            iov.push(ReadBuf::new(scratch_ptr, (p.offset - pos) as usize));
        }
        iov.push(ReadBuf::new(p.dest as *mut u8, p.len as usize));
        pos = p.offset + p.len;
    }
    if !iov.is_empty() {
        flush(&mut iov, start)?;
    }
    for p in overlapping {
        // SAFETY: as for every piece, per the caller's contract.
        unsafe {
            fileio::read_exact_at_raw(
                file,
                path,
                p.dest as *mut u8,
                p.len as usize,
                c.file_offset + p.offset,
            )
        }?;
    }
    Ok(())
}
