//! The ring of pinned slabs, generic over the [`PinnedMemory`] that pins them (CUDA:
//! `cuMemHostAlloc`), with the fallback to a smaller ring when the full budget cannot be
//! pinned, and [`RingNews`]: the ring's geometry and the last fallback warning, readable
//! at once by anyone (also while a copy has the ring checked out).

use std::sync::Mutex;

use super::budget::{ring_geometry, MIN_STAGING_BYTES};
use super::shelf::Shelf;
use crate::error::{Error, Result};

/// What pins host memory for a sink's DMA engine. The sink implements it; the ring only
/// asks for slabs and gives them back.
pub(crate) trait PinnedMemory {
    /// The refusal that makes the ring fall back, as the warning names it (e.g.
    /// `cuMemHostAlloc: CUDA_ERROR_OUT_OF_MEMORY`).
    const REFUSAL: &'static str;

    /// Pins `bytes` (a multiple of 4 KiB) of page-aligned host memory. `Ok(Err(e))`: out of
    /// pinnable memory (`e` says so), and the ring makes do with fewer slabs; `Err`: any
    /// other failure, which ends the allocation.
    fn pin(&self, bytes: usize) -> Result<std::result::Result<*mut u8, Error>>;

    /// Frees a slab.
    ///
    /// # Safety
    /// `slab` came from `pin` of this memory, is freed once, and no copy uses it any more.
    unsafe fn unpin(&self, slab: *mut u8) -> Result<()>;

    /// The error for a budget of which not even `MIN_STAGING_BYTES` could be pinned.
    fn exhausted(&self, message: String) -> Error;
}

/// A pinned host allocation of the ring's `slab_bytes`.
pub(crate) struct Slab(pub(crate) *mut u8);

/// The ring of pinned slabs.
pub(crate) struct Ring<M> {
    pub(crate) slabs: Vec<Slab>,
    pub(crate) slab_bytes: usize,
    /// The geometry asked for (the key: a ring that fell back is kept for the same ask).
    pub(crate) wanted: (usize, usize),
    /// What pinned it (and frees it).
    pub(crate) mem: M,
}

const MIB: f64 = (1u64 << 20) as f64;

impl<M: PinnedMemory + Clone> Ring<M> {
    /// Pins a ring for `budget`. If `mem` runs out of pinnable memory, keeps the slabs it
    /// got (two or more), else retries with half the budget, down to `MIN_STAGING_BYTES`;
    /// the second value is the warning to give then.
    pub(crate) fn alloc(budget: u64, mem: M) -> Result<(Ring<M>, Option<String>)> {
        let wanted = ring_geometry(budget);
        let mut ask = budget.max(MIN_STAGING_BYTES);
        loop {
            let (slab_bytes, n) = ring_geometry(ask);
            let mut ring = Ring {
                slabs: Vec::with_capacity(n),
                slab_bytes,
                wanted,
                mem: mem.clone(),
            };
            let mut oom = None;
            for _ in 0..n {
                match ring.mem.pin(slab_bytes) {
                    Ok(Ok(p)) => ring.slabs.push(Slab(p)),
                    Ok(Err(e)) => {
                        oom = Some(e);
                        break;
                    }
                    Err(e) => {
                        ring.free()?;
                        return Err(e);
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
            ring.free()?;
            if ask <= MIN_STAGING_BYTES {
                return Err(mem.exhausted(format!(
                    "could not pin even {} MiB of host memory for staging: {e}",
                    MIN_STAGING_BYTES >> 20,
                )));
            }
            ask = (ask / 2).max(MIN_STAGING_BYTES);
        }
    }
}

impl<M: PinnedMemory> Ring<M> {
    fn bytes(&self) -> u64 {
        self.slab_bytes as u64 * self.slabs.len() as u64
    }

    fn fallback_note(&self, budget: u64) -> String {
        format!(
            "zeroload could pin only {:.0} MiB of the {:.0} MiB GPU staging budget \
             ({}); GPU loads and saves use this smaller staging ring, which may be slower. \
             Pass staging_bytes= or set ZEROLOAD_STAGING_BYTES to choose a budget that can \
             be pinned.",
            self.bytes() as f64 / MIB,
            budget.max(MIN_STAGING_BYTES) as f64 / MIB,
            M::REFUSAL,
        )
    }

    /// Frees every slab; the ones `mem` refuses to free stay in the ring, and the first
    /// refusal is returned. (CUDA: a context must be current on this thread.)
    pub(crate) fn free(&mut self) -> Result<()> {
        let mut kept = Vec::new();
        let mut first = None;
        for s in self.slabs.drain(..) {
            // SAFETY: `s` was pinned by `mem` and is freed once (drained from the ring; a
            // refused free hands it back instead of keeping it here). No copy reads it
            // any more: a ring is freed only when a pin attempt failed before any copy, or
            // while the staging resources are checked out and idle (every copy waits for
            // its queued work and stops its threads before giving them back).
            if let Err(e) = unsafe { self.mem.unpin(s.0) } {
                first.get_or_insert(e);
                kept.push(s);
            }
        }
        self.slabs = kept;
        first.map_or(Ok(()), Err)
    }
}

/// A ring for `budget` in `slot`, pinned by `mem` unless the one there was made for the
/// same budget. The old ring is freed first (budgets are about peak memory); if that is
/// refused, it goes to `orphans` with the slabs it kept, and the error is returned.
/// `news` learns the new geometry and any fallback warning.
pub(crate) fn ensure_ring<'a, M: PinnedMemory + Clone>(
    slot: &'a mut Option<Ring<M>>,
    budget: u64,
    mem: M,
    orphans: &mut Shelf<Ring<M>>,
    news: &RingNews,
) -> Result<&'a Ring<M>> {
    if slot
        .as_ref()
        .is_none_or(|r| r.wanted != ring_geometry(budget))
    {
        if let Some(mut old) = slot.take() {
            news.set_geometry(None);
            if let Err(e) = old.free() {
                orphans.push(old);
                return Err(e);
            }
        }
        let (ring, warning) = Ring::alloc(budget, mem)?;
        news.set_geometry(Some((ring.slab_bytes as u64, ring.slabs.len())));
        if let Some(w) = warning {
            news.warn(w);
        }
        *slot = Some(ring);
    }
    Ok(slot.as_ref().expect("ring allocated"))
}

/// The ring's geometry and the last fallback warning, published for readers that must
/// not wait for a copy (each behind its own short lock, never held while a copy runs).
pub(crate) struct RingNews {
    geometry: Mutex<Option<(u64, usize)>>,
    warning: Mutex<Option<String>>,
}

impl RingNews {
    pub(crate) const fn new() -> RingNews {
        RingNews {
            geometry: Mutex::new(None),
            warning: Mutex::new(None),
        }
    }

    /// `(slab_bytes, slabs)` of the ring, if one is allocated.
    pub(crate) fn geometry(&self) -> Option<(u64, usize)> {
        *self.geometry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_geometry(&self, g: Option<(u64, usize)>) {
        *self.geometry.lock().unwrap_or_else(|e| e.into_inner()) = g;
    }

    fn warn(&self, w: String) {
        *self.warning.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
    }

    /// The last fallback warning, once.
    pub(crate) fn take_warning(&self) -> Option<String> {
        self.warning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// Pins from the C heap, refusing once `limit` slabs are out; counts what is out.
    #[derive(Clone)]
    struct Heap {
        limit: usize,
        out: Rc<Cell<usize>>,
    }

    impl PinnedMemory for Heap {
        const REFUSAL: &'static str = "heap: out of memory";
        fn pin(&self, bytes: usize) -> Result<std::result::Result<*mut u8, Error>> {
            if self.out.get() == self.limit {
                return Ok(Err(Error::Internal("no more".into())));
            }
            self.out.set(self.out.get() + 1);
            // SAFETY: plain allocation; freed by `unpin`.
            Ok(Ok(unsafe { libc::malloc(bytes) }.cast()))
        }
        unsafe fn unpin(&self, slab: *mut u8) -> Result<()> {
            self.out.set(self.out.get() - 1);
            // SAFETY: `slab` came from `malloc` in `pin` and is freed once (contract).
            unsafe { libc::free(slab.cast()) };
            Ok(())
        }
        fn exhausted(&self, message: String) -> Error {
            Error::InvalidArgument(message)
        }
    }

    #[test]
    fn a_ring_falls_back_warns_once_and_is_kept_for_the_same_budget() {
        let out = Rc::new(Cell::new(0));
        let mem = Heap {
            limit: 5,
            out: out.clone(),
        };
        let news = RingNews::new();
        let mut slot = None;
        let mut orphans = Shelf::default();
        let ring = ensure_ring(&mut slot, 64 << 20, mem.clone(), &mut orphans, &news).unwrap();
        assert_eq!(ring.slabs.len(), 5);
        assert_eq!(news.geometry(), Some((4 << 20, 5)));
        let w = news.take_warning().expect("a warning");
        assert!(
            w.contains("20 MiB of the 64 MiB") && w.contains("heap: out of memory"),
            "{w}"
        );
        assert_eq!(news.take_warning(), None);
        ensure_ring(&mut slot, 64 << 20, mem.clone(), &mut orphans, &news).unwrap();
        assert_eq!(news.take_warning(), None, "the same ask keeps the ring");
        ensure_ring(&mut slot, 4 << 20, mem.clone(), &mut orphans, &news).unwrap();
        assert_eq!(out.get(), 4, "the old ring was freed first");
        slot.take().unwrap().free().unwrap();
        assert_eq!(out.get(), 0);

        let none = Heap { limit: 1, out };
        let e = Ring::alloc(64 << 20, none).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("could not pin even 2 MiB"), "{e}");
    }
}
