//! The staging resources every CUDA copy (load or save) reuses: the pinned ring, one
//! non-blocking stream with an event per slab for each device used, and the reader
//! threads. The driver-independent parts (ring, budget, checkout, the shelf of what the
//! driver refused to free) are `transfer/staging/`'s; this file supplies what is CUDA's:
//! pinning (`cuMemHostAlloc`, portable), streams and events, and freeing each in its
//! context. The resources are created on first use and kept for the process; a copy
//! *checks them out* and gives them back when it is done (another copy waits meanwhile).
//! No lock is held while a copy runs, so the progress callback (which may need Python's
//! GIL) never runs under our lock, and [`staging_allocated`] answers at once during a
//! copy. What the driver refuses to free is shelved and retried by the next
//! [`release_staging`].

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use super::driver::{cu, guarded, with_context};
use crate::error::{Error, Result};
use crate::transfer::pipeline::{ReaderPool, Stage};
use crate::transfer::staging::checkout::{Checkout, Guard, Settle};
use crate::transfer::staging::ring::{ensure_ring, PinnedMemory, Ring, RingNews};
use crate::transfer::staging::shelf::Shelf;

/// The staging ring's current geometry `(slab_bytes, slabs)`, if it is allocated. Answers
/// at once, also while a copy runs.
pub fn staging_allocated() -> Option<(u64, usize)> {
    NEWS.geometry()
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
    NEWS.take_warning()
}

/// Pinned host memory from the driver (`cuMemHostAlloc`, portable across contexts),
/// allocated in context `ctx` (bound by the caller) and freed with a context current.
#[derive(Clone, Copy)]
pub(crate) struct CudaPinned {
    /// The context that was current when it was pinned (bound again to free it).
    pub(crate) ctx: usize,
}

impl PinnedMemory for CudaPinned {
    const REFUSAL: &'static str = "cuMemHostAlloc: CUDA_ERROR_OUT_OF_MEMORY";

    fn pin(&self, bytes: usize) -> Result<std::result::Result<*mut u8, Error>> {
        // SAFETY: a context is current (the caller bound `ctx`); the memory is
        // uninitialised, which is fine: a copy only ever writes it (pread, or DMA from
        // the device) before reading it (DMA to the device, or a write to the file).
        match unsafe { result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_PORTABLE) } {
            Ok(p) => Ok(Ok(p.cast())),
            Err(e @ DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                Ok(Err(cu("cuMemHostAlloc")(e)))
            }
            Err(e) => Err(cu("cuMemHostAlloc")(e)),
        }
    }

    unsafe fn unpin(&self, slab: *mut u8) -> Result<()> {
        // SAFETY: `slab` came from `cuMemHostAlloc` and is freed once (this function's
        // contract); a context is current (`Ring::free`'s contract for CUDA; the fake
        // driver records a finding otherwise).
        unsafe { result::free_host(slab.cast()) }.map_err(cu("cuMemFreeHost"))
    }

    fn exhausted(&self, message: String) -> Error {
        Error::Cuda {
            call: "cuMemHostAlloc".into(),
            message,
        }
    }
}

/// One device's stream and an event per slab, reused by every copy to that device.
pub(crate) struct Streams {
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

    /// The stream (alive until `destroy`).
    pub(crate) fn stream(&self) -> sys::CUstream {
        self.stream
    }

    fn synchronize(&self) -> Result<()> {
        // SAFETY: the stream was created by us and is destroyed only in `destroy`.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cu("cuStreamSynchronize"))
    }

    /// Waits for the stream, then destroys events and stream (the caller bound the
    /// stream's context); what the driver refuses to destroy goes to `orphans`, and the
    /// first error is returned.
    fn destroy(mut self, orphans: &mut Orphans) -> Result<()> {
        let mut first = self.synchronize().err();
        for e in self.events.drain(..) {
            // SAFETY: our event, destroyed once, after the stream's work completed.
            if let Err(err) = unsafe { result::event::destroy(e) } {
                first.get_or_insert_with(|| cu("cuEventDestroy_v2")(err));
                orphans.events.push((self.ctx, e as usize));
            }
        }
        // SAFETY: our stream, idle, destroyed once.
        if let Err(err) = unsafe { result::stream::destroy(self.stream) } {
            first.get_or_insert_with(|| cu("cuStreamDestroy_v2")(err));
            orphans.streams.push((self.ctx, self.stream as usize));
        }
        first.map_or(Ok(()), Err)
    }
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

/// Resources the driver refused to free, each with its context, retried by the next
/// `release_staging`.
#[derive(Default)]
struct Orphans {
    /// Slabs, kept as rings that remember their context.
    rings: Shelf<Ring<CudaPinned>>,
    /// `(context, event)`.
    events: Shelf<(usize, usize)>,
    /// `(context, stream)`.
    streams: Shelf<(usize, usize)>,
}

impl Orphans {
    fn is_empty(&self) -> bool {
        self.rings.is_empty() && self.events.is_empty() && self.streams.is_empty()
    }

    /// Tries to free everything again, each in its own context; keeps what is refused
    /// again and returns the first error.
    fn retry(&mut self) -> Result<()> {
        let mut first = None;
        self.rings.retry(&mut first, |ring| {
            with_context(ring.mem.ctx, || ring.free())
        });
        self.events.retry(&mut first, |&mut (ctx, e)| {
            with_context(ctx, || {
                // SAFETY: an event of ours whose destruction failed before; never used
                // since; its context is current.
                unsafe { result::event::destroy(e as sys::CUevent) }
                    .map_err(cu("cuEventDestroy_v2"))
            })
        });
        self.streams.retry(&mut first, |&mut (ctx, s)| {
            with_context(ctx, || {
                // SAFETY: a stream of ours whose destruction failed before; never used
                // since; its context is current.
                unsafe { result::stream::destroy(s as sys::CUstream) }
                    .map_err(cu("cuStreamDestroy_v2"))
            })
        });
        first.map_or(Ok(()), Err)
    }
}

/// Everything a copy needs besides the request: kept for the process, used by one copy at
/// a time.
#[derive(Default)]
pub(crate) struct Staging {
    ring: Option<Ring<CudaPinned>>,
    /// `(device ordinal, its stream and events)`.
    streams: Vec<(usize, Streams)>,
    readers: ReaderPool,
    orphans: Orphans,
}

// SAFETY: the raw pointers inside (slabs, stream, events) are handles and addresses that
// any thread may use with the driver; who may touch the slabs' bytes is governed by the
// checkout (one copy at a time) and, within a copy, by slab ownership passed over channels.
unsafe impl Send for Staging {}

impl Settle for Staging {
    /// A copy panicked midway: let its queued work finish before anyone else touches the
    /// slabs.
    fn settle_after_panic(&mut self) {
        for (_, st) in &self.streams {
            let _ = st.synchronize();
        }
    }
}

static SLOT: Checkout<Staging> = Checkout::new();
static NEWS: RingNews = RingNews::new();

/// The staging resources, checked out: given back (and another copy woken) on drop.
pub(crate) type StagingGuard = Guard<Staging>;

impl Staging {
    /// Waits until no other copy uses the staging resources and takes them. The lock is
    /// held only to take or give back, never while a copy runs or Python is called.
    /// Refused on a thread that already has them (a progress callback starting another
    /// GPU load or save, or freeing the staging, would otherwise wait for itself forever).
    pub(crate) fn checkout() -> Result<StagingGuard> {
        SLOT.take(|| {
            Error::InvalidArgument(
                "a GPU load or save, or release_staging(), was started from inside a GPU \
                 load or save on the same thread (from its progress callback); finish the \
                 load first"
                    .into(),
            )
        })
    }

    /// A ring for `budget`, pinned in context `ctx` (bound by the caller) unless the
    /// current one was made for the same budget. An old ring's slabs are portable, so
    /// the copy's context (current) frees them.
    pub(crate) fn ensure_ring(&mut self, budget: u64, ctx: usize) -> Result<&Ring<CudaPinned>> {
        ensure_ring(
            &mut self.ring,
            budget,
            CudaPinned { ctx },
            &mut self.orphans.rings,
            &NEWS,
        )
    }

    /// The stream of `device` (context `ctx`, bound by the caller) with `events` events,
    /// created on first use, and the reader pool: what one copy runs on.
    pub(crate) fn stage_for(
        &mut self,
        device: usize,
        ctx: usize,
        events: usize,
    ) -> Result<(&mut Streams, &mut ReaderPool)> {
        let i = match self.streams.iter().position(|(d, _)| *d == device) {
            Some(i) => i,
            None => {
                self.streams.push((device, Streams::new(ctx)?));
                self.streams.len() - 1
            }
        };
        let s = &mut self.streams[i].1;
        s.ensure_events(events)?;
        Ok((s, &mut self.readers))
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
            let r = with_context(s.ctx, || s.destroy(&mut self.orphans));
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        NEWS.set_geometry(None);
        if let Some(mut ring) = self.ring.take() {
            if let Err(e) = with_context(ring.mem.ctx, || ring.free()) {
                self.orphans.rings.push(ring);
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(true), Err)
    }
}
