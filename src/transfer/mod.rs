//! Copy engine: a plan of `(file range -> destination)` copies executed by a sink.
//!
//! - [`plan`]: requests sorted by file offset, coalesced into bounded reads that know where
//!   each of their bytes goes. Pure arithmetic, fully checked.
//! - [`slice`]: a rectangle of a strided tensor (a DTensor shard, a slice) as the fewest
//!   contiguous byte runs; they become copy requests like any other.
//! - [`write`]: the reverse direction for `zeroload.save`: host byte ranges written to a
//!   file with parallel positional writes, large ranges split across threads, CRC-32s
//!   computed on the way.
//! - [`pipeline`]: what both sinks share, with no driver in sight: `pread` (buffered or
//!   `O_DIRECT`), threads claiming units of work, cancellation, throttled progress on the
//!   calling thread, and the staged loop (reader threads fill slabs, the caller queues
//!   their copies on a `Stage` and recycles them).
//! - [`host`]: worker threads `pread` straight into destination host memory (existing CPU
//!   tensors: `load_into` on a materialised module); reads coalesced across small gaps
//!   scatter with one `preadv`, the gaps going to a scratch buffer.
//! - [`staging`]: the driver-independent part of staging through pinned slabs: the
//!   budget, the ring (generic over the memory that pins it), checkout of a sink's
//!   process-wide staging resources, the shelf of what the driver refused to free.
//! - [`writeback`]: the reverse of the staged loop (source memory -> slab -> file, with
//!   writer threads and a CRC32 per request), for saving.
//! - [`cuda`]: the driver glue of the CUDA sink: loading the driver, contexts, pinned
//!   memory, a stream with an event per slab; the staged loop of [`pipeline`] (loads) and
//!   the loop of [`writeback`] (saves) run on them. One synchronisation at the end.
//! - [`write`]: the reverse direction for `zeroload.save`: host byte ranges written to a
//!   file with parallel positional writes, large ranges split across threads, CRC-32s
//!   computed on the way.
//!
//! Both sinks read with `pread` (never through the mmap: a file truncated under us is an
//! error, not a SIGBUS, and DMA never has to fault pages in) and report progress through
//! a callback on the calling thread only, which may cancel the copy.

pub mod cuda;
pub mod host;
pub mod pipeline;
pub mod plan;
pub mod slice;
// The staging checkout (slot and condition variable) and the ring's geometry and warning
// are blocking locks (clippy.toml): they are checked out, looked at and released only by
// copies and queries that src/py runs detached from Python.
#[allow(clippy::disallowed_types)]
pub mod staging;
pub mod write;
pub mod writeback;

pub use pipeline::{Outcome, ProgressFn, PROGRESS_STEP};
pub use plan::{Chunk, CopyRequest, Extent, Piece, Plan, PlanOptions};
pub use writeback::WriteRequest;
