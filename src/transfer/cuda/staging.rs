//! The staging resources every CUDA copy reuses: the pinned ring, one non-blocking stream
//! with an event per slab for each device used, and the reader threads. They are created
//! on first use and kept for the process; a copy *checks them out* and gives them back
//! when it is done (another copy waits meanwhile). No lock is held while a copy runs, so
//! the progress callback (which may need Python's GIL) never runs under our lock, and
//! [`staging_allocated`] answers at once during a copy. What the driver refuses to free
//! is kept as an orphan and retried by the next [`release_staging`].

use std::cell::Cell;
use std::sync::{Condvar, Mutex};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use super::driver::{cu, guarded, with_context};
use super::ring::{ring_geometry, Ring};
use crate::error::{Error, Result};
use crate::transfer::pipeline::{ReaderPool, Stage};

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
    rings: Vec<Ring>,
    /// `(context, event)`.
    events: Vec<(usize, usize)>,
    /// `(context, stream)`.
    streams: Vec<(usize, usize)>,
}

impl Orphans {
    fn is_empty(&self) -> bool {
        self.rings.is_empty() && self.events.is_empty() && self.streams.is_empty()
    }

    /// Tries to free everything again, each in its own context; keeps what is refused
    /// again and returns the first error.
    fn retry(&mut self) -> Result<()> {
        let mut first = None;
        for mut ring in std::mem::take(&mut self.rings) {
            if let Err(e) = with_context(ring.ctx, || ring.free()) {
                first.get_or_insert(e);
                self.rings.push(ring);
            }
        }
        retry_each(&mut self.events, &mut first, |e| {
            // SAFETY: an event of ours whose destruction failed before; never used since;
            // its context is current.
            unsafe { result::event::destroy(e as sys::CUevent) }.map_err(cu("cuEventDestroy_v2"))
        });
        retry_each(&mut self.streams, &mut first, |s| {
            // SAFETY: a stream of ours whose destruction failed before; never used since;
            // its context is current.
            unsafe { result::stream::destroy(s as sys::CUstream) }.map_err(cu("cuStreamDestroy_v2"))
        });
        first.map_or(Ok(()), Err)
    }
}

/// Destroys each `(context, handle)` of `orphans` again with `destroy`, in its own
/// context; keeps the ones refused again and records the first error in `first`.
fn retry_each(
    orphans: &mut Vec<(usize, usize)>,
    first: &mut Option<Error>,
    destroy: impl Fn(usize) -> Result<()>,
) {
    for (ctx, handle) in std::mem::take(orphans) {
        if let Err(e) = with_context(ctx, || destroy(handle)) {
            first.get_or_insert(e);
            orphans.push((ctx, handle));
        }
    }
}

/// Everything a copy needs besides the request: kept for the process, used by one copy at
/// a time.
#[derive(Default)]
pub(crate) struct Staging {
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
    static HOLDING: Cell<bool> = const { Cell::new(false) };
}
static GEOMETRY: Mutex<Option<(u64, usize)>> = Mutex::new(None);
static WARNING: Mutex<Option<String>> = Mutex::new(None);

/// The staging resources, checked out: given back (and another copy woken) on drop.
pub(crate) struct StagingGuard(Option<Box<Staging>>);

impl Staging {
    /// Waits until no other copy uses the staging resources and takes them. The lock is
    /// held only to take or give back, never while a copy runs or Python is called.
    /// Refused on a thread that already has them (a progress callback starting another
    /// GPU load, or freeing the staging, would otherwise wait for itself forever).
    pub(crate) fn checkout() -> Result<StagingGuard> {
        if HOLDING.with(|h| h.get()) {
            return Err(Error::InvalidArgument(
                "a GPU load or save, or release_staging(), was started from inside a GPU load or save on the \
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
    pub(crate) fn ensure_ring(&mut self, budget: u64, ctx: usize) -> Result<&Ring> {
        if self
            .ring
            .as_ref()
            .is_none_or(|r| r.wanted != ring_geometry(budget))
        {
            if let Some(mut old) = self.ring.take() {
                // Free the old ring first: budgets are about peak memory. Its slabs are
                // portable, so the copy's context (current) frees them.
                *GEOMETRY.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if let Err(e) = old.free() {
                    // It keeps the slabs the driver refused, with their context.
                    self.orphans.rings.push(old);
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
        *GEOMETRY.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(mut ring) = self.ring.take() {
            if let Err(e) = with_context(ring.ctx, || ring.free()) {
                self.orphans.rings.push(ring);
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
