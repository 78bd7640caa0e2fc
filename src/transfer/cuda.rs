//! CUDA sink: file -> pinned staging ring -> GPU.
//!
//! - The driver is loaded at run time (cudarc `dynamic-loading`). cudarc panics when
//!   `libcuda` or a symbol is missing, so every entry point first checks that the library
//!   loads and runs the CUDA path inside `catch_unwind`: no panic reaches the caller. A
//!   driver failure becomes `Error::Cuda { call, .. }` naming the entry point; no driver,
//!   no device or a stub driver (`CUDA_ERROR_STUB_LIBRARY`) is `Error::CudaUnavailable`; a
//!   panic in our own code is `Error::Internal`, never blamed on the driver.
//! - We retain the device's *primary* context, the one PyTorch uses, so `data_ptr()`s of
//!   torch tensors are valid destinations. Contexts are retained once and kept for the
//!   life of the process; the calling thread's current context is restored on return
//!   (a failure to restore it is reported, not ignored).
//! - The process keeps one set of *staging resources*: a ring of pinned (page-locked,
//!   portable) host slabs, one non-blocking stream with an event per slab for each device
//!   used, and a pool of reader threads. They are created on first use and reused by every
//!   copy (a loop of `get_tensor` calls creates no stream, event or thread per call), the
//!   ring is reallocated only when the budget changes, and [`release_staging`] frees them
//!   all. If the full budget cannot be pinned (`CUDA_ERROR_OUT_OF_MEMORY`), a smaller ring
//!   is used and [`take_staging_warning`] says so once.
//! - One copy uses the resources at a time: a copy *checks them out* and gives them back
//!   when it is done; another copy waits for them. No lock is held while a copy runs, so
//!   the progress callback (which may need Python's GIL) never runs under our lock, and
//!   [`staging_allocated`] answers at once during a copy.
//! - Reader threads `pread` chunks of the file into free slabs (never DMA from the mmap:
//!   page faults would serialise the transfer). The calling thread issues one async
//!   host-to-device copy per destination piece on the stream, records the slab's event,
//!   and recycles slabs whose event completed. One stream synchronisation at the end.
//!   Progress counts bytes whose copy completed.
//! - Optional `O_DIRECT` reads for cold files (no page-cache pollution): chunks are read
//!   from 4 KiB-aligned offsets; if the filesystem refuses `O_DIRECT`, buffered reads are
//!   used.
//!
//! Tested without a GPU against `tests/fakecuda`, a fake driver that runs each stream on
//! its own thread after random delays and records every misuse (see `tests/cuda_engine.rs`
//! and `tests/test_cuda_engine.py`).

use std::collections::VecDeque;
use std::ffi::c_void;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use super::{
    pread_at_least, pread_exact, staging_budget, CopyRequest, Outcome, Plan, PlanOptions,
    ProgressFn, Reporter,
};
use crate::error::{panic_message, Error, Result};
use crate::mapping::Mapping;

/// Alignment of `O_DIRECT` reads (and of slab sizes).
const ALIGN: u64 = 4096;
/// Smallest staging budget: two slabs of 1 MiB.
pub const MIN_STAGING_BYTES: u64 = 2 << 20;
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

/// Whether a CUDA driver can be loaded and sees at least one device. Never panics.
pub fn is_available() -> bool {
    matches!(device_count(), Ok(n) if n > 0)
}

/// Number of visible CUDA devices; 0 when there is no driver, no device or a stub driver.
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

/// The staging ring's current geometry `(slab_bytes, slabs)`, if it is allocated. Answers
/// at once, also while a copy runs.
pub fn staging_allocated() -> Option<(u64, usize)> {
    *GEOMETRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frees the staging resources: the pinned ring, the streams and events, the reader
/// threads. Waits for a copy in progress to finish first. Returns whether there was
/// anything to free. The next copy allocates them again. If the driver refuses to free
/// something, the error names the call and the resource is kept to be freed next time.
pub fn release_staging() -> Result<bool> {
    guarded(|| {
        let mut staging = Staging::checkout()?;
        staging.release()
    })
}

/// The warning of the last staging fallback (the full budget could not be pinned), once:
/// the next call returns `None` until another fallback happens.
pub fn take_staging_warning() -> Option<String> {
    WARNING.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Copies each request's file bytes to its destination device address on `opts.device`.
///
/// Requests are checked first: ranges inside the file, destinations pairwise disjoint, and
/// each destination device memory of `opts.device` (through `cuPointerGetAttributes`,
/// walking the allocations or VMM mappings it spans). `progress` runs on the calling
/// thread, never under a lock of ours; returning `false` stops the copy
/// (`Outcome::Cancelled`). Whatever happens, all copies issued have completed and the
/// reader threads are idle when this returns.
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

/// Runs `f`, turning a panic into an error: cudarc's panics about a missing driver library
/// or symbol become `Error::Cuda`, any other panic is a bug of ours (`Error::Internal`).
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(panic_error(&panic_message(payload.as_ref()))),
    }
}

fn panic_error(msg: &str) -> Error {
    // cudarc 0.19: `panic_no_lib_found` and `load` in driver/sys.
    if msg.starts_with("Unable to dynamically load") || msg.starts_with("Missing symbol") {
        Error::Cuda {
            call: "loading the CUDA driver library".into(),
            message: msg.to_string(),
        }
    } else {
        Error::Internal(msg.to_string())
    }
}

/// Turns a driver error into `Error::Cuda` naming the call.
fn cu(call: &'static str) -> impl Fn(DriverError) -> Error {
    move |e: DriverError| {
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "CUDA error".into());
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
        Err(DriverError(sys::CUresult::CUDA_ERROR_STUB_LIBRARY)) => Err(Error::CudaUnavailable(
            "the libcuda.so found is a stub library (CUDA_ERROR_STUB_LIBRARY), not an \
                 NVIDIA driver; is the driver installed, and is a CUDA toolkit's stubs \
                 directory on LD_LIBRARY_PATH?"
                .into(),
        )),
        Err(e) => Err(cu("cuInit")(e)),
    }
}

/// The primary context of `ordinal`, retained once per process (kept as an address:
/// `CUcontext` is a raw pointer).
fn context(ordinal: usize) -> Result<usize> {
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
    static CONTEXTS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
    let mut ctxs = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, c)) = ctxs.iter().find(|(o, _)| *o == ordinal) {
        return Ok(c);
    }
    let dev = result::device::get(ordinal as i32).map_err(cu("cuDeviceGet"))?;
    // SAFETY: `dev` is a valid device handle; the primary context stays retained for the
    // life of the process (never released), so the handle stays valid.
    let ctx =
        unsafe { result::primary_ctx::retain(dev) }.map_err(cu("cuDevicePrimaryCtxRetain"))?;
    ctxs.push((ordinal, ctx as usize));
    Ok(ctx as usize)
}

/// The calling thread's current context, saved when we bind ours and restored after.
struct CurrentContext {
    saved: usize,
    changed: bool,
}

impl CurrentContext {
    /// Makes `ctx` current on this thread (if it is not already).
    fn bind(ctx: usize) -> Result<CurrentContext> {
        let saved = result::ctx::get_current()
            .map_err(cu("cuCtxGetCurrent"))?
            .map_or(0, |c| c as usize);
        let mut guard = CurrentContext {
            saved,
            changed: false,
        };
        if saved != ctx {
            // SAFETY: `ctx` is a retained primary context, alive for the process.
            unsafe { result::ctx::set_current(ctx as sys::CUcontext) }
                .map_err(cu("cuCtxSetCurrent"))?;
            guard.changed = true;
        }
        Ok(guard)
    }

    /// Restores the saved context, reporting a failure.
    fn restore(mut self) -> Result<()> {
        if !std::mem::take(&mut self.changed) {
            return Ok(());
        }
        // SAFETY: the saved context was current on this thread when we started (or null,
        // which unbinds); we never destroy contexts, so it is still valid unless its owner
        // destroyed it during our call, in which case the driver reports an error.
        unsafe { result::ctx::set_current(self.saved as sys::CUcontext) }
            .map_err(cu("cuCtxSetCurrent"))
    }
}

impl Drop for CurrentContext {
    fn drop(&mut self) {
        if self.changed {
            // SAFETY: as in `restore`; reached only when unwinding or after an early
            // error, where a failure has nowhere to go.
            let _ = unsafe { result::ctx::set_current(self.saved as sys::CUcontext) };
        }
    }
}

/// A pinned host allocation (`cuMemHostAlloc`, portable across contexts).
struct Slab(*mut u8);

/// The ring of pinned slabs.
struct Ring {
    slabs: Vec<Slab>,
    slab_bytes: usize,
    /// The geometry asked for (the key: a ring that fell back is kept for the same ask).
    wanted: (usize, usize),
    /// The context that was current when it was pinned (bound again to free it).
    ctx: usize,
}

/// `(slab_bytes, slabs)` for a budget: 16 slabs of budget/16, slabs between 1 and 64 MiB
/// (multiples of 4 KiB), at least 2 slabs. The ring never exceeds
/// `max(budget, MIN_STAGING_BYTES)`.
pub fn ring_geometry(budget: u64) -> (usize, usize) {
    let b = budget.max(MIN_STAGING_BYTES);
    let slab = ((b / 16).clamp(1 << 20, 64 << 20)) / ALIGN * ALIGN;
    let n = (b / slab).clamp(2, 4096);
    (slab as usize, n as usize)
}

const MIB: f64 = (1u64 << 20) as f64;

impl Ring {
    /// Pins a ring for `budget` in the current context (`ctx`). If the driver runs out of
    /// pinnable memory, keeps the slabs it got (two or more), else retries with half the
    /// budget, down to `MIN_STAGING_BYTES`; the second value is the warning to give then.
    fn alloc(budget: u64, ctx: usize) -> Result<(Ring, Option<String>)> {
        let wanted = ring_geometry(budget);
        let mut ask = budget.max(MIN_STAGING_BYTES);
        loop {
            let (slab_bytes, n) = ring_geometry(ask);
            let mut ring = Ring {
                slabs: Vec::with_capacity(n),
                slab_bytes,
                wanted,
                ctx,
            };
            let mut oom = None;
            for _ in 0..n {
                // SAFETY: a context is current (the caller bound `ctx`); the memory is
                // uninitialised, which is fine: we only ever write it (pread) before
                // reading it (DMA).
                match unsafe { result::malloc_host(slab_bytes, sys::CU_MEMHOSTALLOC_PORTABLE) } {
                    Ok(p) => ring.slabs.push(Slab(p.cast())),
                    Err(e @ DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                        oom = Some(e);
                        break;
                    }
                    Err(e) => {
                        let err = cu("cuMemHostAlloc")(e);
                        ring.free().map_err(|(_, e)| e)?;
                        return Err(err);
                    }
                }
            }
            let Some(e) = oom else {
                let warn =
                    (ask < budget.max(MIN_STAGING_BYTES)).then(|| ring.fallback_note(budget));
                return Ok((ring, warn));
            };
            if ring.slabs.len() >= 2 {
                let warn = ring.fallback_note(budget);
                return Ok((ring, Some(warn)));
            }
            ring.free().map_err(|(_, e)| e)?;
            if ask <= MIN_STAGING_BYTES {
                return Err(Error::Cuda {
                    call: "cuMemHostAlloc".into(),
                    message: format!(
                        "could not pin even {} MiB of host memory for staging: {}",
                        MIN_STAGING_BYTES >> 20,
                        cu("cuMemHostAlloc")(e)
                    ),
                });
            }
            ask = (ask / 2).max(MIN_STAGING_BYTES);
        }
    }

    fn bytes(&self) -> u64 {
        self.slab_bytes as u64 * self.slabs.len() as u64
    }

    fn fallback_note(&self, budget: u64) -> String {
        format!(
            "zeroload could pin only {:.0} MiB of the {:.0} MiB GPU staging budget \
             (cuMemHostAlloc: CUDA_ERROR_OUT_OF_MEMORY); GPU loads use this smaller \
             staging ring, which may be slower. Pass staging_bytes= or set \
             ZEROLOAD_STAGING_BYTES to choose a budget that can be pinned.",
            self.bytes() as f64 / MIB,
            budget.max(MIN_STAGING_BYTES) as f64 / MIB
        )
    }

    /// Frees every slab; the ones the driver refuses to free are handed back with the
    /// first error.
    fn free(&mut self) -> std::result::Result<(), (Vec<Slab>, Error)> {
        let mut kept = Vec::new();
        let mut first = None;
        for s in self.slabs.drain(..) {
            // SAFETY: allocated by `cuMemHostAlloc` and freed once; the ring is freed only
            // while checked out and idle (every copy synchronises its stream and stops its
            // readers before giving the ring back).
            if let Err(e) = unsafe { result::free_host(s.0.cast()) } {
                first.get_or_insert_with(|| cu("cuMemFreeHost")(e));
                kept.push(s);
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err((kept, e)),
        }
    }
}

/// One device's stream and an event per slab, reused by every copy to that device.
struct Streams {
    ctx: usize,
    stream: sys::CUstream,
    events: Vec<sys::CUevent>,
}

impl Streams {
    /// A non-blocking stream in the current context (`ctx`).
    fn new(ctx: usize) -> Result<Streams> {
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(cu("cuStreamCreate"))?;
        Ok(Streams {
            ctx,
            stream,
            events: Vec::new(),
        })
    }

    /// At least `n` events (created in the current context, the stream's).
    fn ensure_events(&mut self, n: usize) -> Result<()> {
        while self.events.len() < n {
            let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(cu("cuEventCreate"))?;
            self.events.push(e);
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        // SAFETY: the stream was created by us and is destroyed only in `destroy`.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cu("cuStreamSynchronize"))
    }

    /// Waits for the stream, then destroys events and stream; what the driver refuses to
    /// destroy goes to `orphans`, and the first error is returned.
    fn destroy(mut self, orphans: &mut Orphans) -> Result<()> {
        let mut first = self.synchronize().err();
        for e in self.events.drain(..) {
            // SAFETY: our event, destroyed once, after the stream's work completed.
            if let Err(err) = unsafe { result::event::destroy(e) } {
                first.get_or_insert_with(|| cu("cuEventDestroy_v2")(err));
                orphans.events.push(e as usize);
            }
        }
        // SAFETY: our stream, idle, destroyed once.
        if let Err(err) = unsafe { result::stream::destroy(self.stream) } {
            first.get_or_insert_with(|| cu("cuStreamDestroy_v2")(err));
            orphans.streams.push(self.stream as usize);
        }
        first.map_or(Ok(()), Err)
    }
}

/// The stream of `device` (context `ctx`, bound by the caller) with `events` events,
/// created on first use.
fn streams_for(
    streams: &mut Vec<(usize, Streams)>,
    device: usize,
    ctx: usize,
    events: usize,
) -> Result<&mut Streams> {
    let i = match streams.iter().position(|(d, _)| *d == device) {
        Some(i) => i,
        None => {
            streams.push((device, Streams::new(ctx)?));
            streams.len() - 1
        }
    };
    let s = &mut streams[i].1;
    s.ensure_events(events)?;
    Ok(s)
}

/// Resources the driver refused to free, retried by the next `release_staging`.
#[derive(Default)]
struct Orphans {
    slabs: Vec<Slab>,
    events: Vec<usize>,
    streams: Vec<usize>,
}

impl Orphans {
    fn is_empty(&self) -> bool {
        self.slabs.is_empty() && self.events.is_empty() && self.streams.is_empty()
    }

    fn retry(&mut self) -> Result<()> {
        let mut first = None;
        let mut ring = Ring {
            slabs: std::mem::take(&mut self.slabs),
            slab_bytes: 0,
            wanted: (0, 0),
            ctx: 0,
        };
        if let Err((kept, e)) = ring.free() {
            self.slabs = kept;
            first.get_or_insert(e);
        }
        let mut kept = Vec::new();
        for e in self.events.drain(..) {
            // SAFETY: an event of ours whose destruction failed before; never used since.
            if let Err(err) = unsafe { result::event::destroy(e as sys::CUevent) } {
                first.get_or_insert_with(|| cu("cuEventDestroy_v2")(err));
                kept.push(e);
            }
        }
        self.events = kept;
        let mut kept = Vec::new();
        for s in self.streams.drain(..) {
            // SAFETY: a stream of ours whose destruction failed before; never used since.
            if let Err(err) = unsafe { result::stream::destroy(s as sys::CUstream) } {
                first.get_or_insert_with(|| cu("cuStreamDestroy_v2")(err));
                kept.push(s);
            }
        }
        self.streams = kept;
        first.map_or(Ok(()), Err)
    }
}

/// A persistent reader thread.
struct Reader {
    jobs: mpsc::Sender<ReadJob>,
    thread: std::thread::JoinHandle<()>,
}

/// Reader threads kept across copies.
#[derive(Default)]
pub(crate) struct ReaderPool {
    readers: Vec<Reader>,
}

impl ReaderPool {
    /// Hands `job` to `n` readers, starting threads as needed.
    fn dispatch(&mut self, n: usize, job: &ReadJob) -> Result<()> {
        for i in 0..n {
            if i == self.readers.len() {
                let (jobs, rx) = mpsc::channel::<ReadJob>();
                let thread = std::thread::Builder::new()
                    .name(format!("zeroload-reader-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            let tx = job.filled.clone();
                            if let Err(p) = catch_unwind(AssertUnwindSafe(move || job.run())) {
                                let _ = tx.send(Err(Error::Internal(format!(
                                    "a reader thread panicked: {}",
                                    panic_message(p.as_ref())
                                ))));
                            }
                        }
                    })
                    .map_err(|e| Error::io(&*job.source.path, e))?;
                self.readers.push(Reader { jobs, thread });
            }
            if self.readers[i].jobs.send(job.clone()).is_err() {
                return Err(Error::Internal("a reader thread is gone".into()));
            }
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.readers.is_empty()
    }

    /// Stops and joins every reader.
    fn shutdown(&mut self) {
        for r in self.readers.drain(..) {
            drop(r.jobs);
            let _ = r.thread.join();
        }
    }
}

impl Drop for ReaderPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Everything a copy needs besides the request: kept for the process, used by one copy at
/// a time.
#[derive(Default)]
struct Staging {
    ring: Option<Ring>,
    /// `(device ordinal, its stream and events)`.
    streams: Vec<(usize, Streams)>,
    readers: ReaderPool,
    orphans: Orphans,
}

// SAFETY: the raw pointers inside (slabs, stream, events) are handles and addresses that
// any thread may use with the driver; who may touch the slabs' bytes is governed by the
// checkout (one copy at a time) and, within a copy, by slab ownership passed over channels.
unsafe impl Send for Staging {}

/// The staging resources, or `None` while a copy has them checked out.
struct Slot {
    staging: Option<Box<Staging>>,
    busy: bool,
}

static SLOT: Mutex<Slot> = Mutex::new(Slot {
    staging: None,
    busy: false,
});
static SLOT_FREE: Condvar = Condvar::new();
thread_local! {
    /// Whether this thread has the staging resources checked out.
    static HOLDING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
static GEOMETRY: Mutex<Option<(u64, usize)>> = Mutex::new(None);
static WARNING: Mutex<Option<String>> = Mutex::new(None);

/// The staging resources, checked out: given back (and another copy woken) on drop.
struct StagingGuard(Option<Box<Staging>>);

impl Staging {
    /// Waits until no other copy uses the staging resources and takes them. The lock is
    /// held only to take or give back, never while a copy runs or Python is called.
    /// Refused on a thread that already has them (a progress callback starting another
    /// GPU load, or freeing the staging, would otherwise wait for itself forever).
    fn checkout() -> Result<StagingGuard> {
        if HOLDING.with(|h| h.get()) {
            return Err(Error::InvalidArgument(
                "a GPU load, or release_staging(), was started from inside a GPU load on the \
                 same thread (from its progress callback); finish the load first"
                    .into(),
            ));
        }
        let mut slot = SLOT.lock().unwrap_or_else(|e| e.into_inner());
        while slot.busy {
            slot = SLOT_FREE.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
        slot.busy = true;
        HOLDING.with(|h| h.set(true));
        Ok(StagingGuard(Some(slot.staging.take().unwrap_or_default())))
    }

    /// A ring for `budget`, pinned in context `ctx` (bound by the caller) unless the
    /// current one was made for the same budget.
    fn ensure_ring(&mut self, budget: u64, ctx: usize) -> Result<&Ring> {
        if self
            .ring
            .as_ref()
            .is_none_or(|r| r.wanted != ring_geometry(budget))
        {
            if let Some(mut old) = self.ring.take() {
                // Free the old ring first: budgets are about peak memory.
                *GEOMETRY.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if let Err((kept, e)) = old.free() {
                    self.orphans.slabs.extend(kept);
                    return Err(e);
                }
            }
            let (ring, warning) = Ring::alloc(budget, ctx)?;
            *GEOMETRY.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((ring.slab_bytes as u64, ring.slabs.len()));
            if let Some(w) = warning {
                *WARNING.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
            }
            self.ring = Some(ring);
        }
        Ok(self.ring.as_ref().expect("ring allocated"))
    }

    /// Frees everything (see `release_staging`).
    fn release(&mut self) -> Result<bool> {
        let had = self.ring.is_some()
            || !self.streams.is_empty()
            || !self.readers.is_empty()
            || !self.orphans.is_empty();
        if !had {
            return Ok(false);
        }
        self.readers.shutdown();
        // What the driver refused to free last time first; today's refusals wait for the
        // next call.
        let mut first = self.orphans.retry().err();
        for (_, s) in self.streams.drain(..) {
            let r = CurrentContext::bind(s.ctx).and_then(|bound| {
                let r = s.destroy(&mut self.orphans);
                r.and(bound.restore())
            });
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        *GEOMETRY.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(mut ring) = self.ring.take() {
            let r = CurrentContext::bind(ring.ctx).and_then(|bound| {
                let r = ring.free().map_err(|(kept, e)| {
                    self.orphans.slabs.extend(kept);
                    e
                });
                r.and(bound.restore())
            });
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(true), Err)
    }
}

impl std::ops::Deref for StagingGuard {
    type Target = Staging;
    fn deref(&self) -> &Staging {
        self.0.as_ref().expect("checked out")
    }
}

impl std::ops::DerefMut for StagingGuard {
    fn deref_mut(&mut self) -> &mut Staging {
        self.0.as_mut().expect("checked out")
    }
}

impl Drop for StagingGuard {
    fn drop(&mut self) {
        let staging = self.0.take();
        if std::thread::panicking() {
            // A copy panicked midway: let its queued work finish before anyone else
            // touches the slabs.
            if let Some(s) = &staging {
                for (_, st) in &s.streams {
                    let _ = st.synchronize();
                }
            }
        }
        let mut slot = SLOT.lock().unwrap_or_else(|e| e.into_inner());
        slot.staging = staging;
        slot.busy = false;
        drop(slot);
        HOLDING.with(|h| h.set(false));
        SLOT_FREE.notify_one();
    }
}

/// Checks that `[dest, dest + nbytes)` is device memory of `ordinal`: the attributes of
/// its first byte, then of the start of every further allocation or VMM mapping it spans
/// (`CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`/`_SIZE` give each one's extent; PyTorch's
/// `expandable_segments` maps a segment piece by piece, and a tensor may span pieces).
/// Memory from `cudaMalloc`, VMM mappings and `cudaMallocAsync` pools all report memory
/// type `DEVICE` and the device's ordinal. If the driver reports no range, the last byte
/// is checked instead.
fn check_destination(r: &CopyRequest, ordinal: usize) -> Result<()> {
    let end = r.dest + r.nbytes; // the plan checked that this does not overflow
    let mut at = r.dest;
    let mut steps = 0u32;
    loop {
        let (mem_type, dev, range_start, range_size) = pointer_attributes(at)?;
        if mem_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 || dev != ordinal as i32 {
            return Err(Error::InvalidArgument(format!(
                "destination {:#x}..+{} of the copy of file bytes {}..+{} is not memory of \
                 CUDA device {ordinal} (at byte {}: memory type {mem_type}, device {dev})",
                r.dest,
                r.nbytes,
                r.file_offset,
                r.nbytes,
                at - r.dest
            )));
        }
        steps += 1;
        match range_start.checked_add(range_size) {
            Some(next) if next > at && steps < 1 << 16 => {
                if next >= end {
                    return Ok(());
                }
                at = next;
            }
            _ if at == end - 1 => return Ok(()),
            _ => at = end - 1,
        }
    }
}

/// `(memory type, device ordinal, range start, range size)` of `addr`; unknown pointers
/// get zeroed attributes instead of an error.
fn pointer_attributes(addr: u64) -> Result<(u32, i32, u64, u64)> {
    let mut mem_type: u32 = 0;
    let mut dev: i32 = -1;
    let mut start: u64 = 0;
    let mut size: usize = 0;
    let mut attrs = [
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
    ];
    let mut data: [*mut c_void; 4] = [
        (&mut mem_type as *mut u32).cast(),
        (&mut dev as *mut i32).cast(),
        (&mut start as *mut u64).cast(),
        (&mut size as *mut usize).cast(),
    ];
    // SAFETY: four attributes, each with a pointer to storage of the documented type
    // (`CUmemorytype`: unsigned int; ordinal: int; range start: CUdeviceptr; range size:
    // size_t), all alive for the call.
    unsafe { sys::cuPointerGetAttributes(4, attrs.as_mut_ptr(), data.as_mut_ptr(), addr) }
        .result()
        .map_err(cu("cuPointerGetAttributes"))?;
    Ok((mem_type, dev, start, size as u64))
}

/// The file the readers read: the mapping's file (a duplicate descriptor: readers outlive
/// one copy) or an `O_DIRECT` descriptor.
pub(crate) struct Source {
    file: File,
    direct: bool,
    path: PathBuf,
}

impl Source {
    fn open(mapping: &Mapping, direct: bool) -> Result<Source> {
        let path = mapping.path().to_path_buf();
        if direct {
            if let Some(file) = open_direct(&path) {
                return Ok(Source {
                    file,
                    direct: true,
                    path,
                });
            }
        }
        let file = mapping
            .file()
            .try_clone()
            .map_err(|e| Error::io(&path, e))?;
        Ok(Source {
            file,
            direct: false,
            path,
        })
    }
}

/// Longest chunk that fits a slab of `slab_bytes` (`O_DIRECT` reads start up to ALIGN-1
/// bytes early and end up to ALIGN-1 bytes late).
fn max_chunk(direct: bool, slab_bytes: usize) -> u64 {
    if direct {
        slab_bytes as u64 - 2 * ALIGN
    } else {
        slab_bytes as u64
    }
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
unsafe fn read_chunk(src: &Source, slab: *mut u8, cap: usize, off: u64, len: u64) -> Result<usize> {
    if !src.direct {
        debug_assert!(len as usize <= cap);
        // SAFETY: `len <= cap` (chunks are planned no longer than a slab); the slab is
        // ours while we hold it.
        unsafe { pread_exact(&src.file, &src.path, slab, len as usize, off) }?;
        return Ok(0);
    }
    let start = off / ALIGN * ALIGN;
    let end = (off + len).div_ceil(ALIGN) * ALIGN;
    let total = (end - start) as usize;
    debug_assert!(total <= cap);
    // SAFETY: `total <= cap` (chunks are planned 2 * ALIGN shorter than a slab), so the
    // reads stay in the slab, which is ours while we hold it. Slab base, `start` and
    // `total` are multiples of ALIGN, as O_DIRECT wants; the span may end past the end of
    // the file, and only the wanted bytes must be there.
    unsafe {
        pread_at_least(
            &src.file,
            &src.path,
            slab,
            total,
            start,
            (off + len - start) as usize,
        )
    }?;
    Ok((off - start) as usize)
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
    n.clamp(1, MAX_READERS)
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
    let budget = staging_budget(opts.budget)?;
    let source = Source::open(mapping, opts.direct)?;
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

    let ctx = context(opts.device)?;
    let bound = CurrentContext::bind(ctx)?;
    let copied = (|| {
        for r in requests.iter().filter(|r| r.nbytes > 0) {
            check_destination(r, opts.device)?;
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
        let Staging {
            streams,
            readers: pool,
            ..
        } = staging;
        let stage = streams_for(streams, opts.device, ctx, slab_ptrs.len())?;
        // SAFETY: the slabs are pinned allocations of `slab_bytes` that only this copy
        // uses (the staging resources are checked out); chunks fit them (planned with
        // `max_chunk`); destinations per our caller's contract.
        unsafe {
            pipeline(
                stage,
                Arc::new(plan),
                Arc::new(source),
                &slab_ptrs,
                slab_bytes,
                readers,
                pool,
                &mut reporter,
            )
        }
    })();
    let restored = bound.restore();
    let outcome = copied?;
    restored?;
    Ok(outcome)
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
            .map_err(cu("cuMemcpyHtoDAsync_v2"))
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

/// What a reader hands the coordinator: chunk `chunk` now sits in slab `slab`, starting
/// `skew` bytes into it (non-zero for `O_DIRECT` reads from an aligned offset).
pub(crate) struct Filled {
    chunk: usize,
    slab: usize,
    skew: usize,
}

/// One copy's work for the reader threads. Everything is owned (the threads outlive the
/// copy); the coordinator does not return before every reader has dropped its job.
#[derive(Clone)]
struct ReadJob {
    plan: Arc<Plan>,
    source: Arc<Source>,
    slabs: Arc<[usize]>,
    slab_bytes: usize,
    next: Arc<AtomicUsize>,
    abort: Arc<AtomicBool>,
    free: Arc<FreeSlabs>,
    filled: mpsc::Sender<Result<Filled>>,
}

/// The slabs free for reading: a stack, so that the slab freed last (its pages warm in the
/// caches and TLB) is read into first, and the ring's memory is walked only as far as the
/// copies lag behind the reads. Closing it dismisses the readers waiting for a slab.
struct FreeSlabs {
    state: Mutex<(Vec<usize>, bool)>,
    cv: Condvar,
}

impl FreeSlabs {
    fn new(n: usize) -> FreeSlabs {
        FreeSlabs {
            state: Mutex::new(((0..n).rev().collect(), false)),
            cv: Condvar::new(),
        }
    }

    /// Waits for a free slab; `None` once closed.
    fn take(&self) -> Option<usize> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.1 {
                return None;
            }
            if let Some(slab) = st.0.pop() {
                return Some(slab);
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn give(&self, slab: usize) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .push(slab);
        self.cv.notify_one();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cv.notify_all();
    }
}

impl ReadJob {
    /// Takes chunks in file order, waits for a free slab, reads the chunk into it and hands
    /// it over; stops at the end of the plan, on `abort`, when the free slabs are closed, or
    /// after a read error (which it hands over).
    fn run(self) {
        while !self.abort.load(Ordering::Relaxed) {
            let chunk = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(c) = self.plan.chunks.get(chunk) else {
                break;
            };
            let Some(slab) = self.free.take() else {
                break; // the coordinator stopped
            };
            // SAFETY: slab `slab` was handed to this reader alone by the free stack
            // (its previous copies completed: the coordinator saw its marker complete),
            // and it is `slab_bytes` long; the coordinator keeps the slabs alive until
            // every reader has dropped this job.
            let r = unsafe {
                read_chunk(
                    &self.source,
                    self.slabs[slab] as *mut u8,
                    self.slab_bytes,
                    c.file_offset,
                    c.len,
                )
            };
            let failed = r.is_err();
            let msg = r.map(|skew| Filled { chunk, slab, skew });
            if self.filled.send(msg).is_err() || failed {
                break;
            }
        }
    }
}

/// Stops a copy's readers and waits until each has dropped its job (so no reader touches
/// a slab after the copy returns), on every path out of `pipeline`, unwinding included.
struct StopReaders<'a> {
    abort: Arc<AtomicBool>,
    free: Arc<FreeSlabs>,
    filled: &'a mpsc::Receiver<Result<Filled>>,
}

impl StopReaders<'_> {
    /// Sets the flag and closes the free slabs: a reader waiting for a slab wakes up and
    /// leaves; one in the middle of a read leaves after it.
    fn stop(&mut self) {
        self.abort.store(true, Ordering::Relaxed);
        self.free.close();
    }
}

impl Drop for StopReaders<'_> {
    fn drop(&mut self) {
        self.stop();
        // Every reader holds a sender; the channel disconnects when the last one is done.
        while self.filled.recv().is_ok() {}
    }
}

/// The copy loop. Reader threads from `pool` take chunks in file order, wait for a free
/// slab, `pread` the chunk into it and hand it over; this thread queues the chunk's pieces
/// on `stage`, marks the slab, and returns slabs to the readers once their marker
/// completed. Progress counts completed bytes. However it ends, the readers have stopped
/// touching the slabs and every queued copy has completed on return.
///
/// # Safety
/// Each `slab_ptrs[i]` must be valid for writes of `slab_bytes` bytes and used by nothing
/// else during the call; every piece's destination must be valid for `stage`; chunks must
/// fit a slab (`len <= max_chunk(source.direct, slab_bytes)`).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pipeline<S: Stage>(
    stage: &mut S,
    plan: Arc<Plan>,
    source: Arc<Source>,
    slab_ptrs: &[usize],
    slab_bytes: usize,
    readers: usize,
    pool: &mut ReaderPool,
    reporter: &mut Reporter<'_>,
) -> Result<Outcome> {
    let n_chunks = plan.chunks.len();
    if n_chunks == 0 {
        return Ok(Outcome::Done);
    }
    let free = Arc::new(FreeSlabs::new(slab_ptrs.len()));
    let (filled_tx, filled_rx) = mpsc::channel::<Result<Filled>>();
    let abort = Arc::new(AtomicBool::new(false));
    let mut stop = StopReaders {
        abort: abort.clone(),
        free: free.clone(),
        filled: &filled_rx,
    };
    let job = ReadJob {
        plan: plan.clone(),
        source,
        slabs: slab_ptrs.into(),
        slab_bytes,
        next: Arc::new(AtomicUsize::new(0)),
        abort,
        free,
        filled: filled_tx,
    };
    let dispatched = pool.dispatch(readers.max(1), &job);
    drop(job); // the readers hold the only senders now
    dispatched?;

    let mut inflight: VecDeque<(usize, u64)> = VecDeque::new();
    let mut completed = 0usize;
    let mut run = |stage: &mut S, stop: &StopReaders<'_>| -> Result<Outcome> {
        while completed < n_chunks {
            // Recycle slabs whose copies are done, without waiting.
            while let Some(&(slab, bytes)) = inflight.front() {
                if !stage.is_done(slab)? {
                    break;
                }
                inflight.pop_front();
                completed += 1;
                stop.free.give(slab);
                if !reporter.add(bytes) {
                    return Ok(Outcome::Cancelled);
                }
            }
            if completed == n_chunks {
                break;
            }
            let msg = if inflight.is_empty() {
                Some(filled_rx.recv().map_err(|_| {
                    Error::Internal("the reader threads stopped before reading every chunk".into())
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
                        // SAFETY: the source lies in the slab (piece inside the chunk, chunk
                        // read at `skew` in a slab of `slab_bytes`); readers do not touch
                        // the slab until its marker completes; destinations per this
                        // function's contract.
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
    let r = run(stage, &stop);
    // Stop the readers, then wait for every queued copy, whatever happened, before the
    // slabs and destinations are handed back; dropping `stop` waits for the readers.
    stop.stop();
    let synced = stage.synchronize();
    drop(stop);
    let out = r?;
    synced?;
    Ok(out)
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
        let source = Source::open(m, direct).unwrap();
        let max_chunk = max_chunk(source.direct, slab_bytes);
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
        let mut pool = ReaderPool::default();
        // SAFETY: slabs are live, aligned, `slab_bytes` long and private to this call;
        // destinations are live Vecs sized to their requests.
        let r = unsafe {
            pipeline(
                &mut stage,
                Arc::new(plan),
                Arc::new(source),
                &slab_ptrs,
                slab_bytes,
                readers,
                &mut pool,
                &mut reporter,
            )
        };
        assert!(stage.ops.is_empty(), "copies left queued after return");
        assert_eq!(pool.readers.len(), readers.max(1), "one thread per reader");
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
    fn a_panic_of_ours_is_an_internal_error_and_cudarcs_a_driver_error() {
        let e = guarded::<()>(|| panic!("index out of bounds: the len is 3")).unwrap_err();
        assert!(
            matches!(&e, Error::Internal(m) if m.contains("index out of bounds")),
            "{e}"
        );
        assert!(e.to_string().contains("bug in zeroload"), "{e}");
        let e =
            guarded::<()>(|| panic!("Missing symbol cuMemcpyHtoDAsync_v2: undefined")).unwrap_err();
        assert!(
            matches!(&e, Error::Cuda { call, message }
                if call.contains("driver library") && message.contains("cuMemcpyHtoDAsync_v2")),
            "{e}"
        );
        let e = guarded::<()>(|| panic!("Unable to dynamically load the \"cuda\" shared library"))
            .unwrap_err();
        assert!(matches!(e, Error::Cuda { .. }), "{e}");
        assert_eq!(guarded(|| Ok(5)).unwrap(), 5);
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
