//! The pinned staging ring: its budget (`ZEROLOAD_STAGING_BYTES`), its geometry, and the
//! slabs themselves (`cuMemHostAlloc`, portable), with the fallback to a smaller ring
//! when the full budget cannot be pinned.

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use super::driver::cu;
use crate::error::{Error, Result};
use crate::transfer::pipeline::ALIGN;

/// Environment variable that sets the CUDA staging budget in bytes (plain integer, or with
/// a `K`/`M`/`G` suffix, powers of 1024).
pub const STAGING_ENV: &str = "ZEROLOAD_STAGING_BYTES";

/// Default pinned staging budget for CUDA copies.
pub const DEFAULT_STAGING_BYTES: u64 = 256 << 20;

/// Smallest staging budget: two slabs of 1 MiB.
pub const MIN_STAGING_BYTES: u64 = 2 << 20;

/// Parses a byte count such as `268435456`, `256M`, `1G`, `512k`.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// The staging budget: the explicit value, else `ZEROLOAD_STAGING_BYTES`, else 256 MiB.
pub fn staging_budget(explicit: Option<u64>) -> Result<u64> {
    if let Some(b) = explicit {
        return Ok(b);
    }
    match std::env::var(STAGING_ENV) {
        Ok(v) => parse_bytes(&v).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{STAGING_ENV}={v:?} is not a byte count (examples: 268435456, 256M, 1G)"
            ))
        }),
        Err(_) => Ok(DEFAULT_STAGING_BYTES),
    }
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

/// A pinned host allocation (`cuMemHostAlloc`, portable across contexts).
pub(crate) struct Slab(pub(crate) *mut u8);

/// The ring of pinned slabs.
pub(crate) struct Ring {
    pub(crate) slabs: Vec<Slab>,
    pub(crate) slab_bytes: usize,
    /// The geometry asked for (the key: a ring that fell back is kept for the same ask).
    pub(crate) wanted: (usize, usize),
    /// The context that was current when it was pinned (bound again to free it).
    pub(crate) ctx: usize,
}

const MIB: f64 = (1u64 << 20) as f64;

impl Ring {
    /// Pins a ring for `budget` in the current context (`ctx`, bound by the caller). If
    /// the driver runs out of pinnable memory, keeps the slabs it got (two or more), else
    /// retries with half the budget, down to `MIN_STAGING_BYTES`; the second value is the
    /// warning to give then.
    pub(crate) fn alloc(budget: u64, ctx: usize) -> Result<(Ring, Option<String>)> {
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
                        ring.free()?;
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
            ring.free()?;
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

    /// Frees every slab; the ones the driver refuses to free stay in the ring, and the
    /// first refusal is returned. The caller must have a context current on this thread (`cuMemFreeHost`
    /// fails without one): the ring's own `ctx`, or any context for a portable ring.
    pub(crate) fn free(&mut self) -> Result<()> {
        let mut kept = Vec::new();
        let mut first = None;
        for s in self.slabs.drain(..) {
            // SAFETY: `s` was allocated by `cuMemHostAlloc` and is freed once (drained from
            // the ring; a refused free hands it back instead of keeping it here). A
            // context is current (this function's contract; the fake driver records a
            // finding otherwise). No copy reads it any more: a ring is freed only when a
            // pin attempt failed before any copy, or while the staging resources are
            // checked out and idle (every copy synchronises its stream and stops its
            // readers before giving them back).
            if let Err(e) = unsafe { result::free_host(s.0.cast()) } {
                first.get_or_insert_with(|| cu("cuMemFreeHost")(e));
                kept.push(s);
            }
        }
        self.slabs = kept;
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_byte_counts() {
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes("256M"), Some(256 << 20));
        assert_eq!(parse_bytes(" 1g "), Some(1 << 30));
        assert_eq!(parse_bytes("64k"), Some(64 << 10));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_bytes(""), None);
        assert_eq!(parse_bytes("99999999999999999999G"), None);
    }

    #[test]
    fn explicit_budget_wins() {
        assert_eq!(staging_budget(Some(5)).unwrap(), 5);
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
}
