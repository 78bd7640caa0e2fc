//! Staging: the driver-independent half of a sink that copies through pinned host slabs
//! (the CUDA sink's loads and saves; GPUDirect Storage or another accelerator would reuse
//! it). A sink supplies a [`PinnedMemory`](ring::PinnedMemory) and its own stream type;
//! everything else is here.
//!
//! - `budget.rs`: the budget (`ZEROLOAD_STAGING_BYTES`, or explicit) and the ring geometry
//!   it gives.
//! - `ring.rs`: the ring of pinned slabs, generic over `PinnedMemory`; the fallback to a
//!   smaller ring when the full budget cannot be pinned; [`ensure_ring`](ring::ensure_ring)
//!   (reuse the ring for the same budget, else free the old one first); `RingNews`, the
//!   geometry and the fallback warning for readers that must not wait.
//! - `checkout.rs`: one process-wide set of staging resources per sink, used by one copy
//!   at a time (`Checkout::take` / the guard gives them back; a nested checkout on the
//!   same thread is refused, not deadlocked; after a panic the sink's `Settle` lets queued
//!   work finish first).
//! - `shelf.rs`: what the driver refused to free, kept and retried by the next release.
//!
//! The loops that run on the slabs are elsewhere: `pipeline::run_staged` (file -> slab
//! -> sink) and `writeback::run_writeback` (sink -> slab -> file).

pub(crate) mod budget;
pub(crate) mod checkout;
pub(crate) mod ring;
pub(crate) mod shelf;

pub use budget::{
    parse_bytes, ring_geometry, staging_budget, DEFAULT_STAGING_BYTES, MIN_STAGING_BYTES,
    STAGING_ENV,
};
