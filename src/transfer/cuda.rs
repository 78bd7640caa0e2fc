//! CUDA sink: file -> pinned staging ring -> GPU.
//!
//! - The driver is loaded at run time (cudarc `dynamic-loading`). cudarc panics when
//!   `libcuda` or a symbol is missing, so every entry point first checks that the library
//!   loads and runs the CUDA path inside `catch_unwind`: no panic reaches the caller, every
//!   driver failure becomes `Error::Cuda { call, .. }` (or `Error::CudaUnavailable`).
//! - We retain the device's *primary* context, the one PyTorch uses, so `data_ptr()`s of
//!   torch tensors are valid destinations. Contexts are retained once and kept for the
//!   life of the process; the calling thread's current context is restored on return so
//!   PyTorch's idea of the current device is left alone.
//! - A process-wide ring of pinned (page-locked, portable) host slabs is allocated once and
//!   reused; it is reallocated only when the budget changes. Its size is the whole host
//!   memory the copy uses, whatever the checkpoint size. Copies hold the ring's lock, so
//!   concurrent copies run one after the other.
//! - Reader threads `pread` chunks of the file into free slabs (never DMA from the mmap:
//!   page faults would serialise the transfer). The calling thread issues one async
//!   host-to-device copy per destination piece on a non-blocking stream, records the
//!   slab's event, and recycles slabs whose event completed. One stream synchronisation at
//!   the end. Progress counts bytes whose copy completed.
//! - Optional `O_DIRECT` reads for cold files (no page-cache pollution): chunks are read
//!   from 4 KiB-aligned offsets; if the filesystem refuses `O_DIRECT`, buffered reads are
//!   used.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::{sys, CudaContext};

use super::{
    pread_at_least, pread_exact, staging_budget, CopyRequest, Outcome, Plan, PlanOptions,
    ProgressFn, Reporter,
};
use crate::error::{Error, Result};
use crate::mapping::Mapping;

/// Alignment of `O_DIRECT` reads (and of slab sizes).
const ALIGN: u64 = 4096;
/// Smallest staging budget: two slabs of 1 MiB.
pub const MIN_STAGING_BYTES: u64 = 2 << 20;
/// Environment variable overriding the number of reader threads.
pub const READERS_ENV: &str = "ZEROLOAD_READERS";

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

/// Whether a CUDA driver can be loaded and sees at least one device. Never panics.
pub fn is_available() -> bool {
    matches!(device_count(), Ok(n) if n > 0)
}

/// Number of visible CUDA devices; 0 when there is no driver or no device.
pub fn device_count() -> Result<usize> {
    guarded(|| match init() {
        Ok(()) => {
            let n = result::device::get_count().map_err(cu("cuDeviceGetCount"))?;
            Ok(usize::try_from(n).unwrap_or(0))
        }
        Err(Error::CudaUnavailable(_)) => Ok(0),
        Err(e) => Err(e),
    })
}

/// The ring's current geometry `(slab_bytes, slabs)`, if it was allocated.
pub fn staging_allocated() -> Option<(u64, usize)> {
    let ring = RING.lock().unwrap_or_else(|e| e.into_inner());
    ring.as_ref().map(|r| (r.slab_bytes as u64, r.slabs.len()))
}

/// Copies each request's file bytes to its destination device address on `opts.device`.
///
/// Requests are checked first: ranges inside the file, destinations pairwise disjoint, and
/// each destination's first and last byte device memory of `opts.device` (a best-effort
/// check of the pointers, through `cuPointerGetAttributes`). `progress` runs on the calling
/// thread; returning `false` stops the copy (`Outcome::Cancelled`). Whatever happens, all
/// copies issued have completed when this returns.
///
/// # Safety
/// For every request, `dest .. dest + nbytes` must be device memory of `opts.device` in its
/// primary context, valid for writes for the whole call (for example the storage of a live
/// torch tensor), that no other work reads or writes until this returns (in particular no
/// kernel still pending on another stream).
pub unsafe fn copy_to_cuda(
    mapping: &Mapping,
    requests: &[CopyRequest],
    opts: CudaOptions,
    progress: ProgressFn<'_>,
) -> Result<Outcome> {
    // SAFETY: forwarded contract.
    guarded(|| unsafe { copy_inner(mapping, requests, opts, progress) })
}

/// Runs `f`, turning a panic (cudarc's reaction to a missing library or symbol) into an
/// error.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(Error::Cuda {
                call: "the CUDA driver library".into(),
                message: msg.to_string(),
            })
        }
    }
}

/// Turns a driver error into `Error::Cuda` naming the call.
fn cu(call: &'static str) -> impl Fn(DriverError) -> Error {
    move |e: DriverError| {
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Error::Cuda {
            call: call.into(),
            message: format!("{name} ({}): {text}", e.0 as u32),
        }
    }
}

fn culib_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: only tries to dlopen the driver library by its usual names (and closes
        // it again); loading libcuda runs no code of ours.
        catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
    })
}

/// Loads the driver and runs `cuInit`.
fn init() -> Result<()> {
    if !culib_present() {
        return Err(Error::CudaUnavailable(
            "no CUDA driver library (libcuda.so) could be loaded; is an NVIDIA driver \
             installed?"
                .into(),
        ));
    }
    match result::init() {
        Ok(()) => Ok(()),
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => {
            Err(Error::CudaUnavailable(format!(
                "the CUDA driver sees no device (CUDA_VISIBLE_DEVICES={:?})",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
            )))
        }
        Err(e) => Err(cu("cuInit")(e)),
    }
}

/// The primary context of `ordinal`, retained once per process.
fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    init()?;
    let n = result::device::get_count().map_err(cu("cuDeviceGetCount"))?;
    let n = usize::try_from(n).unwrap_or(0);
    if ordinal >= n {
        return Err(Error::InvalidArgument(format!(
            "CUDA device {ordinal} does not exist: {n} device(s) visible{}",
            if n > 0 {
                format!(" (cuda:0 to cuda:{})", n - 1)
            } else {
                String::new()
            }
        )));
    }
    static CONTEXTS: Mutex<Vec<(usize, Arc<CudaContext>)>> = Mutex::new(Vec::new());
    let mut ctxs = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = ctxs.iter().find(|(o, _)| *o == ordinal) {
        return Ok(c.clone());
    }
    // Restore whatever context the thread had: `CudaContext::new` makes its own current.
    let _restore = CurrentContext::save()?;
    let ctx = CudaContext::new(ordinal).map_err(cu("cuDevicePrimaryCtxRetain"))?;
    ctxs.push((ordinal, ctx.clone()));
    Ok(ctx)
}

/// Saves the calling thread's current context and restores it when dropped.
struct CurrentContext(sys::CUcontext);

impl CurrentContext {
    fn save() -> Result<CurrentContext> {
        let prev = result::ctx::get_current().map_err(cu("cuCtxGetCurrent"))?;
        Ok(CurrentContext(prev.unwrap_or(std::ptr::null_mut())))
    }

    fn bind(ctx: &CudaContext) -> Result<CurrentContext> {
        let saved = CurrentContext::save()?;
        // SAFETY: `ctx` is a retained primary context, alive for the process.
        unsafe { result::ctx::set_current(ctx.cu_ctx()) }.map_err(cu("cuCtxSetCurrent"))?;
        Ok(saved)
    }
}

impl Drop for CurrentContext {
    fn drop(&mut self) {
        // SAFETY: the saved context was current on this thread when we started (or null,
        // which unbinds); we never destroy contexts, so it is still valid unless its owner
        // destroyed it during our call, in which case the driver reports an error that we
        // have no way to surface from Drop and ignore.
        let _ = unsafe { result::ctx::set_current(self.0) };
    }
}

/// A pinned host allocation (`cuMemHostAlloc`, portable across contexts).
struct Slab(*mut u8);

/// The process-wide staging ring.
struct Ring {
    slabs: Vec<Slab>,
    slab_bytes: usize,
}

// SAFETY: the ring only holds addresses of pinned allocations; who may touch their bytes
// is governed by the RING mutex (one copy at a time) and, within a copy, by slab ownership
// passed over channels.
unsafe impl Send for Ring {}

static RING: Mutex<Option<Ring>> = Mutex::new(None);

/// `(slab_bytes, slabs)` for a budget: 16 slabs of budget/16, slabs between 1 and 64 MiB
/// (multiples of 4 KiB), at least 2 slabs. The ring never exceeds
/// `max(budget, MIN_STAGING_BYTES)`.
pub fn ring_geometry(budget: u64) -> (usize, usize) {
    let b = budget.max(MIN_STAGING_BYTES);
    let slab = ((b / 16).clamp(1 << 20, 64 << 20)) / ALIGN * ALIGN;
    let n = (b / slab).clamp(2, 4096);
    (slab as usize, n as usize)
}

impl Ring {
    /// Allocates `n` slabs of `slab_bytes` in the current context.
    fn alloc(slab_bytes: usize, n: usize) -> Result<Ring> {
        let mut ring = Ring {
            slabs: Vec::with_capacity(n),
            slab_bytes,
        };
        for _ in 0..n {
            // SAFETY: a context is current (the caller bound one); the memory returned is
            // uninitialised, which is fine: we only ever write it (pread) before reading
            // it (DMA).
            let p = unsafe { result::malloc_host(slab_bytes, sys::CU_MEMHOSTALLOC_PORTABLE) }
                .map_err(cu("cuMemHostAlloc"))?;
            ring.slabs.push(Slab(p.cast()));
        }
        Ok(ring)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for s in self.slabs.drain(..) {
            // SAFETY: allocated by `cuMemHostAlloc` and freed once; a ring is only dropped
            // while its lock is held and no copy uses it (all copies synchronise their
            // stream before releasing the lock).
            let _ = unsafe { result::free_host(s.0.cast()) };
        }
    }
}

/// What a reader hands the coordinator: chunk `chunk` now sits in slab `slab`, starting
/// `skew` bytes into it (non-zero for `O_DIRECT` reads from an aligned offset).
pub(crate) struct Filled {
    chunk: usize,
    slab: usize,
    skew: usize,
}

/// A stream and one event per slab, synchronised and destroyed on drop (so no DMA can
/// outlive a copy, even on error or panic).
struct Streams {
    stream: sys::CUstream,
    events: Vec<sys::CUevent>,
}

impl Streams {
    fn new(n_events: usize) -> Result<Streams> {
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(cu("cuStreamCreate"))?;
        let mut s = Streams {
            stream,
            events: Vec::with_capacity(n_events),
        };
        for _ in 0..n_events {
            let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(cu("cuEventCreate"))?;
            s.events.push(e);
        }
        Ok(s)
    }

    fn synchronize(&self) -> Result<()> {
        // SAFETY: the stream was created by us and is not destroyed before drop.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cu("cuStreamSynchronize"))
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        // SAFETY: stream and events were created by us, in the context still current on
        // this thread, and are destroyed exactly once, after all work on the stream ended.
        unsafe {
            let _ = result::stream::synchronize(self.stream);
            for e in self.events.drain(..) {
                let _ = result::event::destroy(e);
            }
            let _ = result::stream::destroy(self.stream);
        }
    }
}

/// Checks that `dest` and `dest + nbytes - 1` are device memory of `ordinal`.
fn check_destination(r: &CopyRequest, ordinal: usize) -> Result<()> {
    for addr in [r.dest, r.dest + (r.nbytes - 1)] {
        let mut mem_type: u32 = 0;
        let mut dev: i32 = -1;
        let mut attrs = [
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        ];
        let mut data: [*mut c_void; 2] = [
            (&mut mem_type as *mut u32).cast(),
            (&mut dev as *mut i32).cast(),
        ];
        // SAFETY: two attributes, each with a pointer to storage of the documented type
        // (`CUmemorytype` is an unsigned int, the ordinal an int); unknown pointers get
        // zeroed attributes instead of an error.
        unsafe { sys::cuPointerGetAttributes(2, attrs.as_mut_ptr(), data.as_mut_ptr(), addr) }
            .result()
            .map_err(cu("cuPointerGetAttributes"))?;
        if mem_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 || dev != ordinal as i32 {
            return Err(Error::InvalidArgument(format!(
                "destination {:#x}..+{} of the copy of file bytes {}..+{} is not memory of \
                 CUDA device {ordinal} (memory type {mem_type}, device {dev})",
                r.dest, r.nbytes, r.file_offset, r.nbytes
            )));
        }
    }
    Ok(())
}

/// The reader's file: `O_DIRECT` when asked and allowed, else the mapping's file.
pub(crate) enum Source<'a> {
    Buffered(&'a File),
    Direct(File),
}

fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Reads `[off, off + len)` of the file into `slab` (capacity `cap`); returns the skew of
/// the first wanted byte inside the slab.
///
/// # Safety
/// `slab` must be valid for writes of `cap` bytes and owned by the calling reader.
unsafe fn read_chunk(
    src: &Source<'_>,
    path: &Path,
    slab: *mut u8,
    cap: usize,
    off: u64,
    len: u64,
) -> Result<usize> {
    match src {
        Source::Buffered(f) => {
            debug_assert!(len as usize <= cap);
            // SAFETY: `len <= cap` (chunks are planned no longer than a slab); the slab is
            // ours while we hold it.
            unsafe { pread_exact(f, path, slab, len as usize, off) }?;
            Ok(0)
        }
        Source::Direct(f) => {
            let start = off / ALIGN * ALIGN;
            let end = (off + len).div_ceil(ALIGN) * ALIGN;
            let total = (end - start) as usize;
            debug_assert!(total <= cap);
            // SAFETY: `total <= cap` (chunks are planned 2 * ALIGN shorter than a slab), so
            // the reads stay in the slab, which is ours while we hold it. Slab base,
            // `start` and `total` are multiples of ALIGN, as O_DIRECT wants; the span may
            // end past the end of the file, and only the wanted bytes must be there.
            unsafe { pread_at_least(f, path, slab, total, start, (off + len - start) as usize) }?;
            Ok((off - start) as usize)
        }
    }
}

fn reader_count(explicit: Option<usize>, slabs: usize, chunks: usize) -> usize {
    let n = explicit
        .or_else(|| {
            std::env::var(READERS_ENV)
                .ok()
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(8)
        });
    // Leave at least two slabs for copies in flight.
    n.clamp(1, 64)
        .min(slabs.saturating_sub(2).max(1))
        .min(chunks.max(1))
}

/// # Safety
/// See `copy_to_cuda`.
unsafe fn copy_inner(
    mapping: &Mapping,
    requests: &[CopyRequest],
    opts: CudaOptions,
    progress: ProgressFn<'_>,
) -> Result<Outcome> {
    let path = mapping.path();
    let budget = staging_budget(opts.budget)?;
    let (slab_bytes, n_slabs) = ring_geometry(budget);
    // O_DIRECT reads start up to ALIGN-1 bytes early and end up to ALIGN-1 bytes late.
    let direct = if opts.direct { open_direct(path) } else { None };
    let max_chunk = if direct.is_some() {
        slab_bytes as u64 - 2 * ALIGN
    } else {
        slab_bytes as u64
    };
    let plan = Plan::new(
        requests,
        mapping.len(),
        PlanOptions {
            max_chunk,
            max_gap: 256 << 10,
        },
        &path.display().to_string(),
    )?;

    let ctx = context(opts.device)?;
    let _restore = CurrentContext::bind(&ctx)?;
    for r in requests.iter().filter(|r| r.nbytes > 0) {
        check_destination(r, opts.device)?;
    }
    let Some(mut reporter) = Reporter::start(progress, plan.total_bytes) else {
        return Ok(Outcome::Cancelled);
    };
    if plan.chunks.is_empty() {
        return Ok(Outcome::Done);
    }

    let mut ring_guard = RING.lock().unwrap_or_else(|e| e.into_inner());
    if ring_guard
        .as_ref()
        .is_none_or(|r| r.slab_bytes != slab_bytes || r.slabs.len() != n_slabs)
    {
        *ring_guard = None; // free the old ring first: budgets are about peak memory
        *ring_guard = Some(Ring::alloc(slab_bytes, n_slabs)?);
    }
    let ring = ring_guard.as_ref().expect("ring allocated");
    let slab_ptrs: Vec<usize> = ring.slabs.iter().map(|s| s.0 as usize).collect();

    let mut streams = Streams::new(n_slabs)?;
    let source = match direct {
        Some(f) => Source::Direct(f),
        None => Source::Buffered(mapping.file()),
    };
    let readers = reader_count(opts.readers, n_slabs, plan.chunks.len());
    // SAFETY: the slabs are pinned allocations of `slab_bytes` that only this copy uses
    // (we hold the ring's lock); destinations per our caller's contract.
    let outcome = unsafe {
        pipeline(
            &mut streams,
            &plan,
            &source,
            path,
            &slab_ptrs,
            slab_bytes,
            readers,
            &mut reporter,
        )
    };
    drop(streams);
    drop(ring_guard);
    outcome
}

/// Where staged chunks go: an in-order queue of copies with one completion marker per
/// slab (a CUDA stream with an event per slab; a fake in tests).
pub(crate) trait Stage {
    /// Queues a copy of `len` bytes from host `src` to destination `dest`.
    ///
    /// # Safety
    /// `src .. src + len` must stay valid and unchanged until the slab's next marker has
    /// completed; `dest .. dest + len` must be a valid destination.
    unsafe fn copy(&mut self, dest: u64, src: *const u8, len: usize) -> Result<()>;
    /// Marks the end of slab `slab`'s copies queued so far.
    fn record(&mut self, slab: usize) -> Result<()>;
    /// Whether slab `slab`'s last marker has completed (without waiting).
    fn is_done(&mut self, slab: usize) -> Result<bool>;
    /// Waits until slab `slab`'s last marker has completed.
    fn wait(&mut self, slab: usize) -> Result<()>;
    /// Waits until every queued copy has completed.
    fn synchronize(&mut self) -> Result<()>;
}

impl Stage for Streams {
    unsafe fn copy(&mut self, dest: u64, src: *const u8, len: usize) -> Result<()> {
        // SAFETY: forwarded contract; the stream is ours and alive.
        unsafe { sys::cuMemcpyHtoDAsync_v2(dest, src.cast(), len, self.stream) }
            .result()
            .map_err(cu("cuMemcpyHtoDAsync"))
    }

    fn record(&mut self, slab: usize) -> Result<()> {
        // SAFETY: our event and stream, both alive.
        unsafe { result::event::record(self.events[slab], self.stream) }
            .map_err(cu("cuEventRecord"))
    }

    fn is_done(&mut self, slab: usize) -> Result<bool> {
        // SAFETY: our event, alive.
        match unsafe { result::event::query(self.events[slab]) } {
            Ok(()) => Ok(true),
            Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(cu("cuEventQuery")(e)),
        }
    }

    fn wait(&mut self, slab: usize) -> Result<()> {
        // SAFETY: our event, alive.
        unsafe { result::event::synchronize(self.events[slab]) }.map_err(cu("cuEventSynchronize"))
    }

    fn synchronize(&mut self) -> Result<()> {
        Streams::synchronize(self)
    }
}

/// The copy loop. Reader threads take chunks in file order, wait for a free slab, `pread`
/// the chunk into it and hand it over; this thread queues the chunk's pieces on `stage`,
/// marks the slab, and returns slabs to the readers once their marker completed. Progress
/// counts completed bytes. However it ends, the readers are stopped and every queued copy
/// has completed on return.
///
/// # Safety
/// Each `slab_ptrs[i]` must be valid for writes of `slab_bytes` bytes and used by nothing
/// else during the call; every piece's destination must be valid for `stage`; chunks must
/// fit a slab (`len <= slab_bytes`, or `slab_bytes - 2 * ALIGN` for `O_DIRECT`).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pipeline<S: Stage>(
    stage: &mut S,
    plan: &Plan,
    source: &Source<'_>,
    path: &Path,
    slab_ptrs: &[usize],
    slab_bytes: usize,
    readers: usize,
    reporter: &mut Reporter<'_>,
) -> Result<Outcome> {
    let n_chunks = plan.chunks.len();
    if n_chunks == 0 {
        return Ok(Outcome::Done);
    }
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let (free_tx, free_rx) = mpsc::channel::<usize>();
    for i in 0..slab_ptrs.len() {
        free_tx.send(i).expect("receiver alive");
    }
    let free_rx = Mutex::new(free_rx);
    let (filled_tx, filled_rx) = mpsc::channel::<Result<Filled>>();

    std::thread::scope(|s| -> Result<Outcome> {
        for _ in 0..readers.max(1) {
            let filled_tx = filled_tx.clone();
            let (next, abort, free_rx) = (&next, &abort, &free_rx);
            s.spawn(move || {
                while !abort.load(Ordering::Relaxed) {
                    let chunk = next.fetch_add(1, Ordering::Relaxed);
                    let Some(c) = plan.chunks.get(chunk) else {
                        break;
                    };
                    let slab = match free_rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(slab) => slab,
                        Err(_) => break, // the coordinator stopped
                    };
                    // SAFETY: slab `slab` was handed to this reader alone through the free
                    // channel (its previous copies completed: the coordinator saw its
                    // marker complete), and it is `slab_bytes` long.
                    let r = unsafe {
                        read_chunk(
                            source,
                            path,
                            slab_ptrs[slab] as *mut u8,
                            slab_bytes,
                            c.file_offset,
                            c.len,
                        )
                    };
                    let failed = r.is_err();
                    let msg = r.map(|skew| Filled { chunk, slab, skew });
                    if filled_tx.send(msg).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(filled_tx);
        let mut free_tx = Some(free_tx);

        let mut inflight: VecDeque<(usize, u64)> = VecDeque::new();
        let mut completed = 0usize;
        let mut run = |stage: &mut S| -> Result<Outcome> {
            while completed < n_chunks {
                // Recycle slabs whose copies are done, without waiting.
                while let Some(&(slab, bytes)) = inflight.front() {
                    if !stage.is_done(slab)? {
                        break;
                    }
                    inflight.pop_front();
                    completed += 1;
                    if let Some(tx) = &free_tx {
                        let _ = tx.send(slab);
                    }
                    if !reporter.add(bytes) {
                        return Ok(Outcome::Cancelled);
                    }
                }
                if completed == n_chunks {
                    break;
                }
                let msg = if inflight.is_empty() {
                    Some(filled_rx.recv().map_err(|_| Error::Cuda {
                        call: "reader thread".into(),
                        message: "readers stopped before reading every chunk".into(),
                    })?)
                } else {
                    filled_rx.try_recv().ok()
                };
                match msg {
                    Some(filled) => {
                        let f = filled?;
                        let c = &plan.chunks[f.chunk];
                        let base = slab_ptrs[f.slab] + f.skew;
                        for p in &c.pieces {
                            // SAFETY: the source lies in the slab (piece inside the chunk,
                            // chunk read at `skew` in a slab of `slab_bytes`); readers do
                            // not touch the slab until its marker completes; destinations
                            // per this function's contract.
                            unsafe {
                                stage.copy(
                                    p.dest,
                                    (base + p.offset as usize) as *const u8,
                                    p.len as usize,
                                )
                            }?;
                        }
                        stage.record(f.slab)?;
                        inflight.push_back((f.slab, c.delivered()));
                    }
                    None => {
                        // Nothing new to send: wait for the oldest copy in flight.
                        let &(slab, _) = inflight.front().expect("copies in flight");
                        stage.wait(slab)?;
                    }
                }
            }
            Ok(Outcome::Done)
        };
        let r = run(stage);
        // Stop the readers: set the flag and close the free channel (a reader waiting for
        // a slab then wakes up and leaves). Then wait for every queued copy, whatever
        // happened, before the slabs and destinations are handed back.
        abort.store(true, Ordering::Relaxed);
        free_tx.take();
        let synced = stage.synchronize();
        let out = r?;
        synced?;
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::PROGRESS_STEP;

    /// A stand-in for a CUDA stream: copies queue up and run only when a marker is
    /// waited for (or, now and then, when one is polled), in order. If the pipeline ever
    /// handed a slab back to the readers before its copies ran, a reader would overwrite
    /// it first and the destination would get the wrong bytes.
    struct FakeStage {
        ops: VecDeque<(u64, usize, usize, u64)>, // (dest, src, len, mark; 0 = a copy)
        seq: u64,
        done: u64,
        last: Vec<u64>,
        polls: u64,
    }

    impl FakeStage {
        fn new(slabs: usize) -> FakeStage {
            FakeStage {
                ops: VecDeque::new(),
                seq: 0,
                done: 0,
                last: vec![0; slabs],
                polls: 0,
            }
        }

        fn run_through(&mut self, seq: u64) {
            while self.done < seq {
                let (dest, src, len, mark) = self.ops.pop_front().expect("queued");
                if mark > 0 {
                    self.done = mark;
                } else {
                    // SAFETY: test buffers: `src` is in a live slab, `dest` in a live
                    // destination Vec of at least `len` bytes; they never overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(src as *const u8, dest as *mut u8, len)
                    };
                }
            }
        }
    }

    impl Stage for FakeStage {
        unsafe fn copy(&mut self, dest: u64, src: *const u8, len: usize) -> Result<()> {
            self.ops.push_back((dest, src as usize, len, 0));
            Ok(())
        }
        fn record(&mut self, slab: usize) -> Result<()> {
            self.seq += 1;
            self.ops.push_back((0, 0, 0, self.seq));
            self.last[slab] = self.seq;
            Ok(())
        }
        fn is_done(&mut self, slab: usize) -> Result<bool> {
            self.polls += 1;
            if self.polls.is_multiple_of(3) {
                let target = self.last[slab];
                self.run_through(target);
            }
            Ok(self.done >= self.last[slab])
        }
        fn wait(&mut self, slab: usize) -> Result<()> {
            let target = self.last[slab];
            self.run_through(target);
            Ok(())
        }
        fn synchronize(&mut self) -> Result<()> {
            let target = self.seq;
            self.run_through(target);
            Ok(())
        }
    }

    fn test_file(len: usize) -> (tempfile::TempDir, Arc<Mapping>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        let data: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let m = Mapping::open(&p).unwrap();
        (dir, m, data)
    }

    /// What `run_fake` returns: the outcome, the destinations, the progress calls.
    type FakeRun = (Result<Outcome>, Vec<Vec<u8>>, Vec<(u64, u64)>);

    /// Runs the pipeline with the fake stage; returns the destinations and progress calls.
    fn run_fake(
        m: &Mapping,
        ranges: &[(u64, u64)],
        slab_bytes: usize,
        n_slabs: usize,
        readers: usize,
        direct: bool,
        cancel_after: Option<usize>,
    ) -> FakeRun {
        let mut dests: Vec<Vec<u8>> = ranges.iter().map(|&(_, n)| vec![0u8; n as usize]).collect();
        let reqs: Vec<CopyRequest> = ranges
            .iter()
            .zip(dests.iter_mut())
            .filter(|((_, n), _)| *n > 0)
            .map(|(&(file_offset, nbytes), d)| CopyRequest {
                file_offset,
                nbytes,
                dest: d.as_mut_ptr() as u64,
            })
            .collect();
        let source = if direct {
            match open_direct(m.path()) {
                Some(f) => Source::Direct(f),
                None => Source::Buffered(m.file()),
            }
        } else {
            Source::Buffered(m.file())
        };
        let max_chunk = match source {
            Source::Direct(_) => slab_bytes as u64 - 2 * ALIGN,
            Source::Buffered(_) => slab_bytes as u64,
        };
        let plan = Plan::new(
            &reqs,
            m.len(),
            PlanOptions {
                max_chunk,
                max_gap: 1000,
            },
            "t",
        )
        .unwrap();
        // Slabs as u64 vectors so that they are 8-byte aligned; O_DIRECT wants 4 KiB, so
        // over-allocate and align by hand.
        let mut backing: Vec<Vec<u8>> =
            (0..n_slabs).map(|_| vec![0u8; slab_bytes + 4096]).collect();
        let slab_ptrs: Vec<usize> = backing
            .iter_mut()
            .map(|b| {
                let p = b.as_mut_ptr() as usize;
                p.div_ceil(4096) * 4096
            })
            .collect();
        let mut calls = Vec::new();
        let mut cb = |d: u64, t: u64| {
            calls.push((d, t));
            cancel_after.is_none_or(|n| calls.len() <= n)
        };
        let mut reporter = Reporter::start(&mut cb, plan.total_bytes).unwrap();
        let mut stage = FakeStage::new(n_slabs);
        // SAFETY: slabs are live, aligned, `slab_bytes` long and private to this call;
        // destinations are live Vecs sized to their requests.
        let r = unsafe {
            pipeline(
                &mut stage,
                &plan,
                &source,
                m.path(),
                &slab_ptrs,
                slab_bytes,
                readers,
                &mut reporter,
            )
        };
        assert!(stage.ops.is_empty(), "copies left queued after return");
        drop(backing);
        (r, dests, calls)
    }

    #[test]
    fn pipeline_delivers_every_byte_and_never_recycles_a_busy_slab() {
        let (_d, m, data) = test_file(3 * 1024 * 1024 + 999);
        let ranges: Vec<(u64, u64)> = vec![
            (0, 100),
            (100, 70_000),
            (70_100, 1),
            (70_200, 1_000_000),
            (5, 300_000), // overlaps others: same bytes, another destination
            (2 * 1024 * 1024, 1024 * 1024 + 999),
            (1_500_000, 0),
        ];
        for &(slab, n_slabs, readers) in &[(64 << 10, 3, 1), (64 << 10, 4, 2), (256 << 10, 8, 5)] {
            for direct in [false, true] {
                let (r, dests, calls) = run_fake(&m, &ranges, slab, n_slabs, readers, direct, None);
                assert_eq!(r.unwrap(), Outcome::Done);
                for (&(off, n), d) in ranges.iter().zip(&dests) {
                    assert!(
                        d[..] == data[off as usize..(off + n) as usize],
                        "range {off}+{n}"
                    );
                }
                let total: u64 = ranges.iter().map(|r| r.1).sum();
                assert_eq!(calls.first(), Some(&(0, total)));
                assert_eq!(calls.last(), Some(&(total, total)));
            }
        }
    }

    #[test]
    fn pipeline_cancels_and_reports_read_errors_without_hanging() {
        let (_d, m, _data) = test_file(4 * PROGRESS_STEP as usize);
        let ranges = [(0u64, 4 * PROGRESS_STEP)];
        let (r, _, _) = run_fake(&m, &ranges, 1 << 20, 4, 2, false, Some(2));
        assert_eq!(r.unwrap(), Outcome::Cancelled);

        std::fs::OpenOptions::new()
            .write(true)
            .open(m.path())
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let (r, _, _) = run_fake(&m, &ranges, 1 << 20, 4, 3, false, None);
        assert!(r.unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn ring_geometry_respects_the_budget() {
        for budget in [
            0u64,
            1,
            1 << 20,
            2 << 20,
            3 << 20,
            100 << 20,
            256 << 20,
            1 << 30,
            64 << 30,
        ] {
            let (slab, n) = ring_geometry(budget);
            assert!(n >= 2);
            assert_eq!(slab as u64 % ALIGN, 0);
            assert!((1 << 20..=64 << 20).contains(&(slab as u64)));
            assert!(
                slab as u64 * n as u64 <= budget.max(MIN_STAGING_BYTES),
                "{budget}"
            );
        }
        assert_eq!(ring_geometry(256 << 20), (16 << 20, 16));
    }

    #[test]
    fn no_driver_means_unavailable_not_panic() {
        // On machines without a driver this exercises the guard; with one it must agree
        // with the device count.
        let n = device_count().unwrap_or(0);
        assert_eq!(is_available(), n > 0);
    }

    #[test]
    fn copy_without_cuda_is_a_clean_error() {
        if is_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        std::fs::write(&p, [1u8; 64]).unwrap();
        let m = Mapping::open(&p).unwrap();
        let mut cb = |_: u64, _: u64| true;
        let reqs = [CopyRequest {
            file_offset: 0,
            nbytes: 8,
            dest: 0x1000,
        }];
        // SAFETY: fails before any copy is issued (no CUDA here).
        let e = unsafe { copy_to_cuda(&m, &reqs, CudaOptions::default(), &mut cb) }.unwrap_err();
        assert!(matches!(e, Error::CudaUnavailable(_)), "{e}");
    }
}
