//! The fake's state behind one lock, its configuration, the findings it records (see
//! [`Class`]), and what every entry point does first (`enter`, `need_context`, `guard`).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::*;

/// The rules the fake checks. Each finding names its class first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// An async copy whose source is not inside one live pinned allocation usable by the
    /// stream's context: the real driver silently makes it a synchronous copy.
    UnpinnedSource,
    /// A copy's device range is not inside live, accessible memory of the stream's device.
    BadDeviceRange,
    /// The source bytes of a copy changed between enqueue and execution.
    SourceChanged,
    /// A copy's destination overlaps another copy still in flight.
    OverlappingDestinations,
    /// A call that needs a current context made without one.
    NoContext,
    /// A stream or event used with another context than its own.
    WrongContext,
    /// Use of a destroyed / never-created handle, or a double free.
    InvalidHandle,
    /// Memory freed (host or device) while a copy that uses it is pending.
    FreedWhilePending,
    /// A driver call before `cuInit`.
    NotInitialized,
    /// Work still queued when a watched call returned (`fakecuda_leave`).
    PendingAtReturn,
    /// The calling thread's current context differs after a watched call.
    ContextNotRestored,
    /// Streams, events or allocations alive at `fakecuda_check_leaks`.
    Leak,
    /// A device-to-host read of memory that a pending copy writes.
    UnsynchronizedRead,
    /// An attribute or flag the fake does not emulate (so a test cannot pass by accident).
    Unsupported,
}

impl Class {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Class::UnpinnedSource => "unpinned-source",
            Class::BadDeviceRange => "bad-device-range",
            Class::SourceChanged => "source-changed",
            Class::OverlappingDestinations => "overlapping-destinations",
            Class::NoContext => "no-context",
            Class::WrongContext => "wrong-context",
            Class::InvalidHandle => "invalid-handle",
            Class::FreedWhilePending => "freed-while-pending",
            Class::NotInitialized => "not-initialized",
            Class::PendingAtReturn => "pending-at-return",
            Class::ContextNotRestored => "context-not-restored",
            Class::Leak => "leak",
            Class::UnsynchronizedRead => "unsynchronized-read",
            Class::Unsupported => "unsupported",
        }
    }
}

/// Behaviour knobs.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) seed: u64,
    pub(crate) min_delay_us: u64,
    pub(crate) max_delay_us: u64,
    pub(crate) devices: i32,
    /// Simulated link bandwidth per stream, bytes/s; 0 = unpaced.
    pub(crate) link_bytes_per_s: f64,
    /// Snapshot every async copy's source at enqueue and compare at execution.
    pub(crate) check_sources: bool,
    /// Keep device bytes (shadow buffers); off, copies land in a scratch buffer (benchmarks).
    pub(crate) backing: bool,
    /// Most pinned bytes `cuMemHostAlloc` hands out; 0 = unlimited.
    pub(crate) pinned_limit: u64,
    /// Report `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`/`_SIZE`; off, they read 0 (as a
    /// driver that does not know the range might).
    pub(crate) range_attributes: bool,
    /// Without backing, a copy memcpys its source into a scratch buffer; off, it reads one
    /// byte per page (a DMA engine's copy costs the host no CPU time).
    pub(crate) htod_memcpy: bool,
}

impl Config {
    pub(crate) fn defaults() -> Config {
        Config {
            seed: 1,
            min_delay_us: 0,
            max_delay_us: 200,
            devices: 2,
            link_bytes_per_s: 0.0,
            check_sources: true,
            backing: true,
            pinned_limit: 0,
            range_attributes: true,
            htod_memcpy: true,
        }
    }

    pub(crate) fn from_env() -> Config {
        let mut c = Config::defaults();
        for key in [
            "seed",
            "min_delay_us",
            "max_delay_us",
            "devices",
            "link_gbps",
            "check_sources",
            "backing",
            "pinned_limit",
            "range_attributes",
            "htod_memcpy",
        ] {
            let var = format!("FAKECUDA_{}", key.to_uppercase());
            if let Some(v) = std::env::var(&var).ok().and_then(|v| v.trim().parse().ok()) {
                c.set(key, v);
            }
        }
        c
    }

    /// Keys: `seed`, `min_delay_us`, `max_delay_us` (each stream operation waits a random
    /// delay between the two), `devices`, `link_gbps` (GB/s, 0 = unpaced),
    /// `check_sources` (0/1), `backing` (0/1), `pinned_limit` (bytes, 0 = unlimited),
    /// `range_attributes` (0/1), `htod_memcpy` (0/1).
    pub(crate) fn set(&mut self, key: &str, v: f64) -> bool {
        match key {
            "seed" => self.seed = v as u64,
            "min_delay_us" => self.min_delay_us = v as u64,
            "max_delay_us" => self.max_delay_us = v as u64,
            "devices" => self.devices = v as i32,
            "link_gbps" => self.link_bytes_per_s = v * 1e9,
            "check_sources" => self.check_sources = v != 0.0,
            "backing" => self.backing = v != 0.0,
            "pinned_limit" => self.pinned_limit = v as u64,
            "range_attributes" => self.range_attributes = v != 0.0,
            "htod_memcpy" => self.htod_memcpy = v != 0.0,
            _ => return false,
        }
        true
    }
}

pub(crate) struct Fault {
    pub(crate) name: String,
    pub(crate) from: u64,
    pub(crate) nth: u64,
    pub(crate) count: u64,
    pub(crate) code: CUresult,
}

pub(crate) struct State {
    pub(crate) cfg: Config,
    pub(crate) initialized: bool,
    pub(crate) stub: CUresult,
    pub(crate) faults: Vec<Fault>,
    pub(crate) async_fault: Option<(u64, CUresult)>,
    pub(crate) calls: HashMap<&'static str, u64>,
    pub(crate) findings: Vec<(Class, String)>,
    pub(crate) primary_refs: HashMap<i32, u32>,
    pub(crate) pinned: BTreeMap<usize, Arc<Pinned>>,
    pub(crate) pinned_bytes: u64,
    pub(crate) regions: BTreeMap<u64, Region>,
    /// VMM reservations: aligned start -> (length, the address space behind it).
    pub(crate) reservations: BTreeMap<u64, (u64, Arc<HostMap>)>,
    pub(crate) phys: HashMap<u64, Phys>,
    pub(crate) streams: HashMap<usize, Arc<Stream>>,
    pub(crate) events: HashMap<usize, Arc<Event>>,
    /// Destinations of copies in flight: start -> [(end, op id)].
    pub(crate) inflight: BTreeMap<u64, Vec<(u64, u64)>>,
    pub(crate) next_id: u64,
}

impl State {
    pub(crate) fn new() -> State {
        State {
            cfg: Config::from_env(),
            initialized: false,
            stub: 0,
            faults: Vec::new(),
            async_fault: None,
            calls: HashMap::new(),
            findings: Vec::new(),
            primary_refs: HashMap::new(),
            pinned: BTreeMap::new(),
            pinned_bytes: 0,
            regions: BTreeMap::new(),
            reservations: BTreeMap::new(),
            phys: HashMap::new(),
            streams: HashMap::new(),
            events: HashMap::new(),
            inflight: BTreeMap::new(),
            next_id: 1,
        }
    }

    pub(crate) fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn find(&mut self, class: Class, message: String) {
        FINDINGS.fetch_add(1, Ordering::Relaxed);
        if self.findings.len() < 10_000 {
            self.findings.push((class, message));
        }
    }

    /// The pinned allocation holding all of `[addr, addr + len)`.
    pub(crate) fn pinned_containing(&self, addr: usize, len: usize) -> Option<Arc<Pinned>> {
        let (_, p) = self.pinned.range(..=addr).next_back()?;
        (addr + len <= p.map.addr + p.len).then(|| p.clone())
    }

    pub(crate) fn region_at(&self, addr: u64) -> Option<&Region> {
        let (_, r) = self.regions.range(..=addr).next_back()?;
        (addr < r.start + r.len).then_some(r)
    }

    /// Resolves `[addr, addr + len)` to live, accessible memory of `device` (contiguous
    /// regions may be chained: a tensor can span two VMM mappings).
    pub(crate) fn cover(&self, addr: u64, len: u64, device: i32) -> Result<Vec<Piece>, String> {
        let end = addr
            .checked_add(len)
            .ok_or_else(|| format!("range {addr:#x}+{len} overflows"))?;
        let mut at = addr;
        let mut pieces = Vec::new();
        while at < end {
            let Some(r) = self.region_at(at) else {
                return Err(format!(
                    "byte {at:#x} of {addr:#x}+{len} is not in any live device allocation"
                ));
            };
            if r.device != device {
                return Err(format!(
                    "byte {at:#x} of {addr:#x}+{len} is memory of device {}, not {device}",
                    r.device
                ));
            }
            if !r.accessible {
                return Err(format!(
                    "byte {at:#x} of {addr:#x}+{len} is mapped but not made accessible \
                     (cuMemSetAccess)"
                ));
            }
            let n = (r.start + r.len).min(end) - at;
            pieces.push(Piece {
                shadow: r.shadow.clone(),
                off: r.shadow_off + (at - r.start),
                len: n,
            });
            at += n;
        }
        Ok(pieces)
    }

    /// Start addresses of the VMM mappings (`cuMemMap`) that begin in `[a, b)`.
    pub(crate) fn mappings_in(&self, a: u64, b: u64) -> Vec<u64> {
        self.regions
            .range(a..b)
            .filter(|(_, r)| r.kind == Kind::Mapped)
            .map(|(&k, _)| k)
            .collect()
    }

    /// Whether `[a, b)` overlaps a destination in flight.
    pub(crate) fn inflight_overlap(&self, a: u64, b: u64) -> Option<(u64, u64)> {
        if let Some((&s, v)) = self.inflight.range(..=a).next_back() {
            if let Some(&(e, _)) = v.iter().find(|(e, _)| *e > a) {
                return Some((s, e));
            }
        }
        self.inflight
            .range(a..b)
            .next()
            .and_then(|(&s, v)| v.first().map(|&(e, _)| (s, e)))
    }

    pub(crate) fn inflight_remove(&mut self, start: u64, op: u64) {
        if let Some(v) = self.inflight.get_mut(&start) {
            v.retain(|&(_, o)| o != op);
            if v.is_empty() {
                self.inflight.remove(&start);
            }
        }
    }

    pub(crate) fn ctx_device(&self, ctx: usize) -> Option<i32> {
        if ctx & TAG_MASK != TAG_CTX {
            return None;
        }
        let d = (ctx & !TAG_MASK) as i32;
        (d < self.cfg.devices && self.primary_refs.get(&d).copied().unwrap_or(0) > 0).then_some(d)
    }
}

pub(crate) static STATE: OnceLock<Mutex<State>> = OnceLock::new();
/// Operations queued on any stream and not yet completed.
pub(crate) static PENDING: AtomicU64 = AtomicU64::new(0);
pub(crate) static COPIES: AtomicU64 = AtomicU64::new(0);
pub(crate) static BYTES: AtomicU64 = AtomicU64::new(0);
pub(crate) static FINDINGS: AtomicU64 = AtomicU64::new(0);
pub(crate) static STREAM_THREADS: AtomicU64 = AtomicU64::new(0);
/// Time stream threads spent executing copies (pacing included), nanoseconds.
pub(crate) static BUSY_NS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn state() -> MutexGuard<'static, State> {
    STATE
        .get_or_init(|| Mutex::new(State::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The calling thread's current context (0: none).
    pub(crate) static CURRENT: Cell<usize> = const { Cell::new(0) };
    /// Contexts current at each open `fakecuda_enter`.
    pub(crate) static WATCH: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn current() -> usize {
    CURRENT.with(|c| c.get())
}

/// The common start of every entry point: counts the call, applies the stub mode and
/// injected faults, checks initialisation.
pub(crate) fn enter(
    name: &'static str,
    needs_init: bool,
) -> Result<MutexGuard<'static, State>, CUresult> {
    let mut st = state();
    let n = {
        let c = st.calls.entry(name).or_insert(0);
        *c += 1;
        *c
    };
    if st.stub != 0 {
        return Err(st.stub);
    }
    if let Some(f) = st.faults.iter().find(|f| {
        f.name == name && {
            let k = n - f.from;
            k >= f.nth && (f.count == 0 || k < f.nth + f.count)
        }
    }) {
        return Err(f.code);
    }
    if needs_init && !st.initialized {
        st.find(
            Class::NotInitialized,
            format!("{name} called before cuInit"),
        );
        return Err(NOT_INITIALIZED);
    }
    Ok(st)
}

/// The current context's device, or a `no-context` finding.
pub(crate) fn need_context(st: &mut State, name: &str) -> Result<(usize, i32), CUresult> {
    let ctx = current();
    if ctx == 0 {
        st.find(
            Class::NoContext,
            format!("{name} called without a current context"),
        );
        return Err(INVALID_CONTEXT);
    }
    match st.ctx_device(ctx) {
        Some(d) => Ok((ctx, d)),
        None => {
            st.find(
                Class::InvalidHandle,
                format!("{name}: the current context {ctx:#x} is not a live context"),
            );
            Err(INVALID_CONTEXT)
        }
    }
}

/// Runs an entry point's body; a panic in the fake becomes `CUDA_ERROR_UNKNOWN` plus a
/// finding (an `extern "C"` function must not unwind).
pub(crate) fn guard(name: &'static str, f: impl FnOnce() -> Result<(), CUresult>) -> CUresult {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => {
            state().find(
                Class::Unsupported,
                format!("{name}: the fake panicked (a bug in fakecuda)"),
            );
            UNKNOWN
        }
    }
}

/// Writes `v` through an out-pointer, refusing null.
///
/// # Safety
/// `p` must be null or valid for a write of `T`.
pub(crate) unsafe fn out<T>(p: *mut T, v: T) -> Result<(), CUresult> {
    if p.is_null() {
        return Err(INVALID_VALUE);
    }
    // SAFETY: non-null, and valid for writes per the caller's contract.
    unsafe { p.write(v) };
    Ok(())
}

/// Copies `n` bytes with libc's memcpy. Client memory may be written concurrently by a
/// buggy client (that is what the fake detects): the copy goes through C, outside Rust's
/// memory model, and only whole byte values are ever observed.
///
/// # Safety
/// Both ranges must be mapped for `n` bytes.
pub(crate) unsafe fn memcpy(dst: usize, src: usize, n: usize) {
    // SAFETY: caller's contract.
    unsafe { libc::memcpy(dst as *mut c_void, src as *const c_void, n) };
}
