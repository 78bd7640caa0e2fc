//! The staging budget (`ZEROLOAD_STAGING_BYTES`, or an explicit value) and the ring
//! geometry it gives: pure arithmetic, shared by every sink that stages through pinned
//! slabs.

use crate::error::{Error, Result};
use crate::transfer::pipeline::ALIGN;

/// Environment variable that sets the staging budget in bytes (plain integer, or with
/// a `K`/`M`/`G` suffix, powers of 1024).
pub const STAGING_ENV: &str = "ZEROLOAD_STAGING_BYTES";

/// Default pinned staging budget.
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
