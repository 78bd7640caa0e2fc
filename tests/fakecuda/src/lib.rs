//! fakecuda: a fake CUDA driver (`libcuda.so`) that zeroload's real copy engine loads in CI,
//! where no machine has a GPU. It behaves like the driver where the engine can tell, and is
//! stricter than it everywhere else: it records every rule the real driver would break
//! silently or punish later ("findings"), and tests assert there are none.
//!
//! - **Asynchrony.** Each stream is a FIFO run by its own worker thread, which waits a random
//!   (seeded) delay before each operation and reads a copy's source *when it runs*. Events
//!   complete when the worker reaches them; `cuEventQuery` says `NOT_READY` until then.
//! - **Device memory is not host memory.** Device addresses are reserved with
//!   `mmap(PROT_NONE)`: a host read or write through one crashes, as on a GPU. The bytes
//!   live in a separate shadow buffer that copies write and `cuMemcpyDtoH_v2` reads.
//! - **Allocators.** `cuMemAlloc_v2` (the caching allocator's segments), VMM ranges
//!   (`cuMemAddressReserve`/`cuMemCreate`/`cuMemMap`/`cuMemSetAccess`: PyTorch's
//!   `expandable_segments`) and stream-ordered pool allocations (`cuMemAllocAsync`:
//!   `cudaMallocAsync`) each report pointer attributes as a real driver does.
//! - **Fault injection.** Fail the Nth call of any entry point with a chosen `CUresult`,
//!   fail the Nth copy *on the stream* (reported by the next query or synchronisation),
//!   turn the library into a stub (every call returns `CUDA_ERROR_STUB_LIBRARY`), or
//!   report no device.
//! - **Simulated link.** A per-stream bandwidth (`link_gbps`) paces copies, so benchmarks
//!   can ask whether the engine keeps a link of known speed busy.
//!
//! Finding classes (`fakecuda_findings`): see [`Class`]. Control functions are the
//! `fakecuda_*` exports at the end of this file; `tests/fakecuda/fakecuda.py` wraps them.
//! Configuration: `fakecuda_config(key, value)` or `FAKECUDA_<KEY>` environment variables
//! read when the library is first used (keys listed at [`Config::set`]).

#![allow(non_snake_case)] // driver entry points keep their C names
#![allow(clippy::missing_safety_doc)] // every export's contract is the CUDA driver's

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub type CUresult = c_uint;
pub type CUdevice = c_int;
pub type CUdeviceptr = c_ulonglong;
pub type CUcontext = *mut c_void;
pub type CUstream = *mut c_void;
pub type CUevent = *mut c_void;
pub type CUmemoryPool = *mut c_void;
pub type CUmemGenericAllocationHandle = c_ulonglong;

const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const NOT_INITIALIZED: CUresult = 3;
const NO_DEVICE: CUresult = 100;
const INVALID_DEVICE: CUresult = 101;
const INVALID_CONTEXT: CUresult = 201;
const INVALID_HANDLE: CUresult = 400;
const NOT_READY: CUresult = 600;
const UNKNOWN: CUresult = 999;

/// Names and descriptions of the codes the fake returns or tests inject.
const ERRORS: &[(CUresult, &CStr, &CStr)] = &[
    (0, c"CUDA_SUCCESS", c"no error"),
    (1, c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
    (2, c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
    (3, c"CUDA_ERROR_NOT_INITIALIZED", c"initialization error"),
    (4, c"CUDA_ERROR_DEINITIALIZED", c"driver shutting down"),
    (
        34,
        c"CUDA_ERROR_STUB_LIBRARY",
        c"CUDA driver is a stub library",
    ),
    (
        100,
        c"CUDA_ERROR_NO_DEVICE",
        c"no CUDA-capable device is detected",
    ),
    (101, c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
    (
        201,
        c"CUDA_ERROR_INVALID_CONTEXT",
        c"invalid device context",
    ),
    (
        400,
        c"CUDA_ERROR_INVALID_HANDLE",
        c"invalid resource handle",
    ),
    (600, c"CUDA_ERROR_NOT_READY", c"device not ready"),
    (
        700,
        c"CUDA_ERROR_ILLEGAL_ADDRESS",
        c"an illegal memory access was encountered",
    ),
    (
        719,
        c"CUDA_ERROR_LAUNCH_FAILED",
        c"unspecified launch failure",
    ),
    (801, c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
    (999, c"CUDA_ERROR_UNKNOWN", c"unknown error"),
];

// Handles are tagged, non-canonical addresses: a client that dereferences one crashes.
const TAG_MASK: usize = 0xff00_0000_0000_0000;
const TAG_CTX: usize = 0xdc00_0000_0000_0000;
const TAG_STREAM: usize = 0xd500_0000_0000_0000;
const TAG_EVENT: usize = 0xde00_0000_0000_0000;
const TAG_POOL: usize = 0xd900_0000_0000_0000;

/// Physical allocation granularity of VMM allocations (as on current GPUs).
const GRANULARITY: u64 = 2 << 20;
const PAGE: usize = 4096;

/// The rules the fake checks. Each finding names its class first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
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
    fn name(self) -> &'static str {
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
struct Config {
    seed: u64,
    min_delay_us: u64,
    max_delay_us: u64,
    devices: i32,
    /// Simulated link bandwidth per stream, bytes/s; 0 = unpaced.
    link_bytes_per_s: f64,
    /// Snapshot every async copy's source at enqueue and compare at execution.
    check_sources: bool,
    /// Keep device bytes (shadow buffers); off, copies land in a scratch buffer (benchmarks).
    backing: bool,
    /// Most pinned bytes `cuMemHostAlloc` hands out; 0 = unlimited.
    pinned_limit: u64,
    /// Report `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`/`_SIZE`; off, they read 0 (as a
    /// driver that does not know the range might).
    range_attributes: bool,
    /// Without backing, a copy memcpys its source into a scratch buffer; off, it reads one
    /// byte per page (a DMA engine's copy costs the host no CPU time).
    htod_memcpy: bool,
}

impl Config {
    fn defaults() -> Config {
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

    fn from_env() -> Config {
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
    fn set(&mut self, key: &str, v: f64) -> bool {
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

/// A host mapping owned by the fake, unmapped on drop.
struct HostMap {
    addr: usize,
    len: usize,
}

impl HostMap {
    fn new(len: usize, readable: bool) -> Option<HostMap> {
        let len = len.max(1).div_ceil(PAGE) * PAGE;
        let prot = if readable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_NONE
        };
        // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(HostMap {
            addr: p as usize,
            len,
        })
    }
}

impl Drop for HostMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; whoever could still use it holds an Arc.
        unsafe { libc::munmap(self.addr as *mut c_void, self.len) };
    }
}

/// A pinned host allocation (`cuMemHostAlloc`). Pending copies hold an `Arc`, so freeing
/// it early is recorded but never makes the fake itself read unmapped memory.
struct Pinned {
    map: HostMap,
    len: usize,
    portable: bool,
    ctx: usize,
}

/// Device bytes: a readable buffer beside the (unreadable) device addresses.
struct Shadow(HostMap);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `cuMemAlloc_v2`.
    Alloc,
    /// A `cuMemMap` of a `cuMemCreate` handle inside a reserved range.
    Mapped,
    /// `cuMemAllocAsync` from the device's default pool.
    Pool,
}

/// A live range of device memory.
#[derive(Clone)]
struct Region {
    start: u64,
    len: u64,
    device: i32,
    kind: Kind,
    /// `None` with `backing` off.
    shadow: Option<Arc<Shadow>>,
    shadow_off: u64,
    buffer_id: u64,
    /// VMM mappings need `cuMemSetAccess` before use.
    accessible: bool,
    /// The address reservation of `Alloc`/`Pool` regions (VMM reservations are separate).
    _va: Option<Arc<HostMap>>,
}

/// A `cuMemCreate` handle.
struct Phys {
    len: u64,
    device: i32,
    shadow: Option<Arc<Shadow>>,
}

/// One piece of a resolved device range: where its bytes live.
struct Piece {
    shadow: Option<Arc<Shadow>>,
    off: u64,
    len: u64,
}

struct Fault {
    name: String,
    from: u64,
    nth: u64,
    count: u64,
    code: CUresult,
}

struct State {
    cfg: Config,
    initialized: bool,
    stub: CUresult,
    faults: Vec<Fault>,
    async_fault: Option<(u64, CUresult)>,
    calls: HashMap<&'static str, u64>,
    findings: Vec<(Class, String)>,
    primary_refs: HashMap<i32, u32>,
    pinned: BTreeMap<usize, Arc<Pinned>>,
    pinned_bytes: u64,
    regions: BTreeMap<u64, Region>,
    /// VMM reservations: aligned start -> (length, the address space behind it).
    reservations: BTreeMap<u64, (u64, Arc<HostMap>)>,
    phys: HashMap<u64, Phys>,
    streams: HashMap<usize, Arc<Stream>>,
    events: HashMap<usize, Arc<Event>>,
    /// Destinations of copies in flight: start -> [(end, op id)].
    inflight: BTreeMap<u64, Vec<(u64, u64)>>,
    next_id: u64,
}

impl State {
    fn new() -> State {
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

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn find(&mut self, class: Class, message: String) {
        FINDINGS.fetch_add(1, Ordering::Relaxed);
        if self.findings.len() < 10_000 {
            self.findings.push((class, message));
        }
    }

    /// The pinned allocation holding all of `[addr, addr + len)`.
    fn pinned_containing(&self, addr: usize, len: usize) -> Option<Arc<Pinned>> {
        let (_, p) = self.pinned.range(..=addr).next_back()?;
        (addr + len <= p.map.addr + p.len).then(|| p.clone())
    }

    fn region_at(&self, addr: u64) -> Option<&Region> {
        let (_, r) = self.regions.range(..=addr).next_back()?;
        (addr < r.start + r.len).then_some(r)
    }

    /// Resolves `[addr, addr + len)` to live, accessible memory of `device` (contiguous
    /// regions may be chained: a tensor can span two VMM mappings).
    fn cover(&self, addr: u64, len: u64, device: i32) -> Result<Vec<Piece>, String> {
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

    /// Whether `[a, b)` overlaps a destination in flight.
    fn inflight_overlap(&self, a: u64, b: u64) -> Option<(u64, u64)> {
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

    fn inflight_remove(&mut self, start: u64, op: u64) {
        if let Some(v) = self.inflight.get_mut(&start) {
            v.retain(|&(_, o)| o != op);
            if v.is_empty() {
                self.inflight.remove(&start);
            }
        }
    }

    fn ctx_device(&self, ctx: usize) -> Option<i32> {
        if ctx & TAG_MASK != TAG_CTX {
            return None;
        }
        let d = (ctx & !TAG_MASK) as i32;
        (d < self.cfg.devices && self.primary_refs.get(&d).copied().unwrap_or(0) > 0).then_some(d)
    }
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();
/// Operations queued on any stream and not yet completed.
static PENDING: AtomicU64 = AtomicU64::new(0);
static COPIES: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static FINDINGS: AtomicU64 = AtomicU64::new(0);
static STREAM_THREADS: AtomicU64 = AtomicU64::new(0);
/// Time stream threads spent executing copies (pacing included), nanoseconds.
static BUSY_NS: AtomicU64 = AtomicU64::new(0);

fn state() -> MutexGuard<'static, State> {
    STATE
        .get_or_init(|| Mutex::new(State::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The calling thread's current context (0: none).
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    /// Contexts current at each open `fakecuda_enter`.
    static WATCH: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

fn current() -> usize {
    CURRENT.with(|c| c.get())
}

/// The common start of every entry point: counts the call, applies the stub mode and
/// injected faults, checks initialisation.
fn enter(name: &'static str, needs_init: bool) -> Result<MutexGuard<'static, State>, CUresult> {
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
fn need_context(st: &mut State, name: &str) -> Result<(usize, i32), CUresult> {
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
fn guard(name: &'static str, f: impl FnOnce() -> Result<(), CUresult>) -> CUresult {
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
unsafe fn out<T>(p: *mut T, v: T) -> Result<(), CUresult> {
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
unsafe fn memcpy(dst: usize, src: usize, n: usize) {
    // SAFETY: caller's contract.
    unsafe { libc::memcpy(dst as *mut c_void, src as *const c_void, n) };
}

// ---------------------------------------------------------------------------------------
// Streams and events
// ---------------------------------------------------------------------------------------

enum Op {
    Copy(Copy),
    Mark { event: Arc<Event>, gen: u64 },
    Free { start: u64 },
}

struct Queue {
    ops: VecDeque<Op>,
    busy: bool,
    shutdown: bool,
    /// An asynchronous error, reported (once) by the next query or synchronisation.
    error: CUresult,
}

struct Stream {
    id: usize,
    ctx: usize,
    device: i32,
    q: Mutex<Queue>,
    cv: Condvar,
}

impl Stream {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, op: Op) {
        PENDING.fetch_add(1, Ordering::SeqCst);
        self.lock().ops.push_back(op);
        self.cv.notify_all();
    }

    fn wait_idle(&self) -> CUresult {
        let mut q = self.lock();
        while !q.ops.is_empty() || q.busy {
            q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        std::mem::take(&mut q.error)
    }
}

struct Event {
    id: usize,
    ctx: usize,
    recorded: AtomicU64,
    done: AtomicU64,
    last: Mutex<Option<Arc<Stream>>>,
}

impl Event {
    fn stream(&self) -> Option<Arc<Stream>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn worker(s: Arc<Stream>, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut link_free = Instant::now();
    let mut scratch: Vec<u8> = Vec::new();
    loop {
        let op = {
            let mut q = s.lock();
            loop {
                if let Some(op) = q.ops.pop_front() {
                    q.busy = true;
                    break Some(op);
                }
                if q.shutdown {
                    break None;
                }
                q = s.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(op) = op else { break };
        let (min_delay, max_delay, bps, check, full) = {
            let st = state();
            (
                st.cfg.min_delay_us,
                st.cfg.max_delay_us.max(st.cfg.min_delay_us),
                st.cfg.link_bytes_per_s,
                st.cfg.check_sources,
                st.cfg.htod_memcpy,
            )
        };
        if max_delay > 0 {
            let d = min_delay + rng.next() % (max_delay - min_delay + 1);
            std::thread::sleep(Duration::from_micros(d));
        }
        let error = match op {
            Op::Copy(c) => {
                let t0 = Instant::now();
                let e = run_copy(&s, c, (check, full, bps), &mut link_free, &mut scratch);
                BUSY_NS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                e
            }
            Op::Mark { event, gen } => {
                event.done.fetch_max(gen, Ordering::SeqCst);
                0
            }
            Op::Free { start } => {
                let mut st = state();
                let len = st.regions.get(&start).map_or(1, |r| r.len);
                if st.inflight_overlap(start, start + len).is_some() {
                    st.find(
                        Class::FreedWhilePending,
                        format!("cuMemFreeAsync({start:#x}) ran while a copy into it was pending"),
                    );
                }
                st.regions.remove(&start);
                0
            }
        };
        {
            // Done, under the lock: whoever sees the stream idle also sees PENDING drop.
            let mut q = s.lock();
            q.busy = false;
            if error != 0 && q.error == 0 {
                q.error = error;
            }
            PENDING.fetch_sub(1, Ordering::SeqCst);
        }
        s.cv.notify_all();
    }
    STREAM_THREADS.fetch_sub(1, Ordering::SeqCst);
}

/// A queued host-to-device copy.
struct Copy {
    id: u64,
    dst: u64,
    len: usize,
    /// The pinned source, kept alive until the copy ran.
    src: Option<(usize, Arc<Pinned>)>,
    /// The source as it was at enqueue: compared at execution (pinned sources), or the
    /// data itself (unpinned sources, which the driver consumes at once).
    snapshot: Option<Vec<u8>>,
    /// When it was queued: a paced link starts it then at the earliest.
    queued: Instant,
}

/// Executes one host-to-device copy on the stream's thread; returns an async error code.
/// `(check, full, bps)`: compare the source with its snapshot, memcpy it whole without
/// backing, link bandwidth.
fn run_copy(
    s: &Stream,
    c: Copy,
    (check, full, bps): (bool, bool, f64),
    link_free: &mut Instant,
    scratch: &mut Vec<u8>,
) -> CUresult {
    let Copy {
        id,
        dst,
        len,
        src,
        snapshot,
        queued,
    } = c;
    let n = COPIES.fetch_add(1, Ordering::SeqCst) + 1;
    let pieces = {
        let mut st = state();
        if let Some((nth, code)) = st.async_fault {
            if nth == n {
                st.async_fault = None;
                st.inflight_remove(dst, id);
                return code;
            }
        }
        match st.cover(dst, len as u64, s.device) {
            Ok(p) => Some(p),
            Err(why) => {
                st.find(
                    Class::FreedWhilePending,
                    format!("async copy to {dst:#x}+{len}: destination freed before it ran: {why}"),
                );
                None
            }
        }
    };
    if bps > 0.0 {
        // The link is busy from when the copy could start (queued, and the link free) for
        // len / bandwidth; the thread then sleeps until that time. Late wake-ups of this
        // thread do not idle the simulated link: a copy queued behind another starts when
        // the other ends.
        if *link_free < queued {
            *link_free = queued;
        }
        *link_free += Duration::from_secs_f64(len as f64 / bps);
    }
    if let Some(pieces) = pieces {
        // Where the bytes come from: the pinned source as it is *now*, or the snapshot of
        // an unpinned source the driver consumed at enqueue.
        let (from, keep): (usize, Option<Vec<u8>>) = match (&src, snapshot) {
            (Some((addr, _)), Some(snap)) if check => {
                if scratch.len() < len {
                    scratch.resize(len, 0);
                }
                // SAFETY: the pinned allocation is alive (we hold its Arc) and holds
                // `[addr, addr + len)` (checked at enqueue); scratch has `len` bytes.
                unsafe { memcpy(scratch.as_mut_ptr() as usize, *addr, len) };
                if scratch[..len] != snap[..] {
                    let at = scratch[..len]
                        .iter()
                        .zip(&snap)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    state().find(
                        Class::SourceChanged,
                        format!(
                            "async copy {addr:#x} -> {dst:#x}+{len}: source byte {at} changed \
                             between enqueue and execution (buffer reused too early)"
                        ),
                    );
                }
                (scratch.as_ptr() as usize, None)
            }
            (Some((addr, _)), _) => (*addr, None),
            (None, Some(snap)) => (snap.as_ptr() as usize, Some(snap)),
            (None, None) => return 0,
        };
        let mut done = 0usize;
        for p in &pieces {
            match &p.shadow {
                Some(sh) => {
                    // SAFETY: the shadow holds `[off, off + len)` (regions never exceed
                    // it); `from` holds `len` bytes: pinned source, scratch or snapshot.
                    unsafe { memcpy(sh.0.addr + p.off as usize, from + done, p.len as usize) }
                }
                None if full => {
                    // No backing (benchmarks): the DMA still reads every byte.
                    let k = p.len as usize;
                    if scratch.len() < k {
                        scratch.resize(k, 0);
                    }
                    if scratch.as_ptr() as usize != from {
                        // SAFETY: scratch holds `k` bytes, `from + done` holds them too.
                        unsafe { memcpy(scratch.as_mut_ptr() as usize, from + done, k) };
                    }
                }
                None => {
                    // One byte per page: the source is still read, at no CPU cost.
                    let mut b = 0u8;
                    for off in (0..p.len as usize).step_by(PAGE) {
                        // SAFETY: the byte lies in the source (`off < p.len`).
                        unsafe { memcpy(&mut b as *mut u8 as usize, from + done + off, 1) };
                    }
                }
            }
            done += p.len as usize;
        }
        drop(keep);
        BYTES.fetch_add(len as u64, Ordering::Relaxed);
    }
    if bps > 0.0 {
        let now = Instant::now();
        if *link_free > now {
            std::thread::sleep(*link_free - now);
        }
    }
    state().inflight_remove(dst, id);
    drop(src);
    0
}

fn lookup_stream(st: &mut State, name: &str, h: CUstream) -> Result<Arc<Stream>, CUresult> {
    match st.streams.get(&(h as usize)) {
        Some(s) => Ok(s.clone()),
        None => {
            st.find(
                Class::InvalidHandle,
                format!(
                    "{name}: stream {:#x} is not a live stream (destroyed, never created, or \
                     the legacy default stream, which the fake does not emulate)",
                    h as usize
                ),
            );
            Err(INVALID_HANDLE)
        }
    }
}

fn lookup_event(st: &mut State, name: &str, h: CUevent) -> Result<Arc<Event>, CUresult> {
    match st.events.get(&(h as usize)) {
        Some(e) => Ok(e.clone()),
        None => {
            st.find(
                Class::InvalidHandle,
                format!("{name}: event {:#x} is not a live event", h as usize),
            );
            Err(INVALID_HANDLE)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Initialisation, devices, contexts
// ---------------------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    guard("cuInit", || {
        let mut st = enter("cuInit", false)?;
        if flags != 0 {
            return Err(INVALID_VALUE);
        }
        if st.cfg.devices <= 0 {
            return Err(NO_DEVICE);
        }
        st.initialized = true;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    guard("cuDriverGetVersion", || {
        let _st = enter("cuDriverGetVersion", false)?;
        // SAFETY: driver contract: an int out-pointer.
        unsafe { out(version, 12080) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    guard("cuDeviceGetCount", || {
        let st = enter("cuDeviceGetCount", true)?;
        // SAFETY: driver contract: an int out-pointer.
        unsafe { out(count, st.cfg.devices.max(0)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    guard("cuDeviceGet", || {
        let st = enter("cuDeviceGet", true)?;
        if ordinal < 0 || ordinal >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        // SAFETY: driver contract: a CUdevice out-pointer.
        unsafe { out(device, ordinal) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    dev: CUdevice,
) -> CUresult {
    guard("cuDeviceGetAttribute", || {
        let st = enter("cuDeviceGetAttribute", true)?;
        if dev < 0 || dev >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        let v = match attrib {
            1 => 1024, // MAX_THREADS_PER_BLOCK
            16 => 132, // MULTIPROCESSOR_COUNT
            19 => 1,   // CAN_MAP_HOST_MEMORY
            40 => 2,   // ASYNC_ENGINE_COUNT
            41 => 1,   // UNIFIED_ADDRESSING
            75 => 9,   // COMPUTE_CAPABILITY_MAJOR
            76 => 0,   // COMPUTE_CAPABILITY_MINOR
            102 => 1,  // VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
            115 => 1,  // MEMORY_POOLS_SUPPORTED
            _ => 0,
        };
        // SAFETY: driver contract: an int out-pointer.
        unsafe { out(pi, v) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    guard("cuDeviceGetName", || {
        let st = enter("cuDeviceGetName", true)?;
        if dev < 0 || dev >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        if name.is_null() || len <= 0 {
            return Err(INVALID_VALUE);
        }
        let s = format!("fakecuda device {dev}\0");
        let n = s.len().min(len as usize);
        // SAFETY: `name` holds `len` bytes (driver contract); we write at most that,
        // NUL-terminated.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), name.cast(), n);
            *name.add(n - 1) = 0;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    guard("cuDeviceTotalMem_v2", || {
        let st = enter("cuDeviceTotalMem_v2", true)?;
        if dev < 0 || dev >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        // SAFETY: driver contract: a size_t out-pointer.
        unsafe { out(bytes, 80usize << 30) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRetain", || {
        let mut st = enter("cuDevicePrimaryCtxRetain", true)?;
        if dev < 0 || dev >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        // SAFETY: driver contract: a CUcontext out-pointer.
        unsafe { out(pctx, (TAG_CTX | dev as usize) as CUcontext) }?;
        *st.primary_refs.entry(dev).or_insert(0) += 1;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRelease_v2", || {
        let mut st = enter("cuDevicePrimaryCtxRelease_v2", true)?;
        match st.primary_refs.get_mut(&dev) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Ok(())
            }
            _ => {
                st.find(
                    Class::InvalidHandle,
                    format!("cuDevicePrimaryCtxRelease_v2({dev}) without a matching retain"),
                );
                Err(INVALID_CONTEXT)
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    guard("cuCtxGetCurrent", || {
        let _st = enter("cuCtxGetCurrent", true)?;
        // SAFETY: driver contract: a CUcontext out-pointer.
        unsafe { out(pctx, current() as CUcontext) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    guard("cuCtxSetCurrent", || {
        let mut st = enter("cuCtxSetCurrent", true)?;
        let c = ctx as usize;
        if c != 0 && st.ctx_device(c).is_none() {
            st.find(
                Class::InvalidHandle,
                format!("cuCtxSetCurrent({c:#x}): not a retained context"),
            );
            return Err(INVALID_CONTEXT);
        }
        CURRENT.with(|cur| cur.set(c));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    guard("cuCtxGetDevice", || {
        let mut st = enter("cuCtxGetDevice", true)?;
        let (_, d) = need_context(&mut st, "cuCtxGetDevice")?;
        // SAFETY: driver contract: a CUdevice out-pointer.
        unsafe { out(device, d) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    guard("cuCtxSynchronize", || {
        let mut st = enter("cuCtxSynchronize", true)?;
        let (ctx, _) = need_context(&mut st, "cuCtxSynchronize")?;
        let streams: Vec<_> = st
            .streams
            .values()
            .filter(|s| s.ctx == ctx)
            .cloned()
            .collect();
        drop(st);
        let mut err = 0;
        for s in streams {
            let e = s.wait_idle();
            if err == 0 {
                err = e;
            }
        }
        if err != 0 {
            return Err(err);
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Host (pinned) memory
// ---------------------------------------------------------------------------------------

fn host_alloc(
    name: &'static str,
    pp: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> Result<(), CUresult> {
    let mut st = enter(name, true)?;
    let (ctx, _) = need_context(&mut st, name)?;
    if pp.is_null() || size == 0 {
        return Err(INVALID_VALUE);
    }
    if flags & !0x7 != 0 {
        st.find(
            Class::Unsupported,
            format!("{name}: flags {flags:#x} are not emulated"),
        );
        return Err(INVALID_VALUE);
    }
    let limit = st.cfg.pinned_limit;
    if limit > 0 && st.pinned_bytes + size as u64 > limit {
        return Err(OUT_OF_MEMORY);
    }
    let map = HostMap::new(size, true).ok_or(OUT_OF_MEMORY)?;
    let addr = map.addr;
    st.pinned.insert(
        addr,
        Arc::new(Pinned {
            map,
            len: size,
            portable: flags & 1 != 0,
            ctx,
        }),
    );
    st.pinned_bytes += size as u64;
    // SAFETY: checked non-null above; driver contract: a pointer out-pointer.
    unsafe { pp.write(addr as *mut c_void) };
    Ok(())
}

#[no_mangle]
pub extern "C" fn cuMemHostAlloc(pp: *mut *mut c_void, size: usize, flags: c_uint) -> CUresult {
    guard("cuMemHostAlloc", || {
        host_alloc("cuMemHostAlloc", pp, size, flags)
    })
}

#[no_mangle]
pub extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, size: usize) -> CUresult {
    guard("cuMemAllocHost_v2", || {
        host_alloc("cuMemAllocHost_v2", pp, size, 0)
    })
}

#[no_mangle]
pub extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    guard("cuMemFreeHost", || {
        let mut st = enter("cuMemFreeHost", true)?;
        let Some(pin) = st.pinned.remove(&(p as usize)) else {
            st.find(
                Class::InvalidHandle,
                format!(
                    "cuMemFreeHost({:#x}): not the start of a live pinned allocation (double \
                     free?)",
                    p as usize
                ),
            );
            return Err(INVALID_VALUE);
        };
        st.pinned_bytes -= pin.len as u64;
        if Arc::strong_count(&pin) > 1 {
            st.find(
                Class::FreedWhilePending,
                format!(
                    "cuMemFreeHost({:#x}) while an async copy from it is pending",
                    p as usize
                ),
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Device memory: cuMemAlloc, pools, VMM
// ---------------------------------------------------------------------------------------

fn new_region(st: &mut State, size: u64, device: i32, kind: Kind) -> Result<u64, CUresult> {
    // A guard page after each allocation: a copy that runs past its end is caught.
    let va = HostMap::new(size as usize + PAGE, false).ok_or(OUT_OF_MEMORY)?;
    let shadow = if st.cfg.backing {
        Some(Arc::new(Shadow(
            HostMap::new(size as usize, true).ok_or(OUT_OF_MEMORY)?,
        )))
    } else {
        None
    };
    let start = va.addr as u64;
    let buffer_id = st.id();
    st.regions.insert(
        start,
        Region {
            start,
            len: size,
            device,
            kind,
            shadow,
            shadow_off: 0,
            buffer_id,
            accessible: true,
            _va: Some(Arc::new(va)),
        },
    );
    Ok(start)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    guard("cuMemAlloc_v2", || {
        let mut st = enter("cuMemAlloc_v2", true)?;
        let (_, dev) = need_context(&mut st, "cuMemAlloc_v2")?;
        if dptr.is_null() || size == 0 {
            return Err(INVALID_VALUE);
        }
        let p = new_region(&mut st, size as u64, dev, Kind::Alloc)?;
        // SAFETY: checked non-null; driver contract: a CUdeviceptr out-pointer.
        unsafe { out(dptr, p) }
    })
}

fn free_region(st: &mut State, name: &str, p: CUdeviceptr, kinds: &[Kind]) -> Result<(), CUresult> {
    match st.regions.get(&p) {
        Some(r) if kinds.contains(&r.kind) => {}
        _ => {
            st.find(
                Class::InvalidHandle,
                format!("{name}({p:#x}): not the start of a live allocation (double free?)"),
            );
            return Err(INVALID_VALUE);
        }
    }
    let r = st.regions.remove(&p).expect("checked");
    if let Some((s, e)) = st.inflight_overlap(r.start, r.start + r.len) {
        st.find(
            Class::FreedWhilePending,
            format!("{name}({p:#x}) while an async copy into {s:#x}..{e:#x} is pending"),
        );
    }
    Ok(())
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(p: CUdeviceptr) -> CUresult {
    guard("cuMemFree_v2", || {
        let mut st = enter("cuMemFree_v2", true)?;
        need_context(&mut st, "cuMemFree_v2")?;
        free_region(&mut st, "cuMemFree_v2", p, &[Kind::Alloc, Kind::Pool])
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    size: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemAllocAsync", || {
        let mut st = enter("cuMemAllocAsync", true)?;
        let (_, dev) = need_context(&mut st, "cuMemAllocAsync")?;
        if !stream.is_null() {
            lookup_stream(&mut st, "cuMemAllocAsync", stream)?;
        }
        if dptr.is_null() || size == 0 {
            return Err(INVALID_VALUE);
        }
        let p = new_region(&mut st, size as u64, dev, Kind::Pool)?;
        // SAFETY: checked non-null; driver contract: a CUdeviceptr out-pointer.
        unsafe { out(dptr, p) }
    })
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(p: CUdeviceptr, stream: CUstream) -> CUresult {
    guard("cuMemFreeAsync", || {
        let mut st = enter("cuMemFreeAsync", true)?;
        need_context(&mut st, "cuMemFreeAsync")?;
        if stream.is_null() {
            return free_region(&mut st, "cuMemFreeAsync", p, &[Kind::Pool, Kind::Alloc]);
        }
        let s = lookup_stream(&mut st, "cuMemFreeAsync", stream)?;
        if !st.regions.get(&p).is_some_and(|r| r.kind == Kind::Pool) {
            st.find(
                Class::InvalidHandle,
                format!("cuMemFreeAsync({p:#x}): not a live pool allocation"),
            );
            return Err(INVALID_VALUE);
        }
        drop(st);
        s.push(Op::Free { start: p });
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(
    base: *mut CUdeviceptr,
    size: *mut usize,
    p: CUdeviceptr,
) -> CUresult {
    guard("cuMemGetAddressRange_v2", || {
        let st = enter("cuMemGetAddressRange_v2", true)?;
        let r = st.region_at(p).ok_or(INVALID_VALUE)?;
        let (b, n) = (r.start, r.len as usize);
        // SAFETY: driver contract: out-pointers (either may be null).
        unsafe {
            if !base.is_null() {
                base.write(b);
            }
            if !size.is_null() {
                size.write(n);
            }
        }
        Ok(())
    })
}

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemLocation {
    pub type_: c_uint,
    pub id: c_int,
}

/// `CUmemAllocationProp`.
#[repr(C)]
pub struct MemAllocationProp {
    pub type_: c_uint,
    pub requested_handle_types: c_uint,
    pub location: MemLocation,
    pub win32_handle_meta_data: *mut c_void,
    pub alloc_flags: [u8; 8],
}

/// `CUmemAccessDesc`.
#[repr(C)]
pub struct MemAccessDesc {
    pub location: MemLocation,
    pub flags: c_uint,
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(
    granularity: *mut usize,
    _prop: *const MemAllocationProp,
    _option: c_uint,
) -> CUresult {
    guard("cuMemGetAllocationGranularity", || {
        let _st = enter("cuMemGetAllocationGranularity", true)?;
        // SAFETY: driver contract: a size_t out-pointer.
        unsafe { out(granularity, GRANULARITY as usize) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut CUdeviceptr,
    size: usize,
    _alignment: usize,
    addr: CUdeviceptr,
    _flags: c_ulonglong,
) -> CUresult {
    guard("cuMemAddressReserve", || {
        let mut st = enter("cuMemAddressReserve", true)?;
        if ptr.is_null() || size == 0 || !(size as u64).is_multiple_of(GRANULARITY) {
            return Err(INVALID_VALUE);
        }
        if addr != 0 {
            st.find(
                Class::Unsupported,
                "cuMemAddressReserve at a fixed address is not emulated".into(),
            );
            return Err(INVALID_VALUE);
        }
        // Aligned to the granularity, as the driver's are (mappings must be).
        let va = HostMap::new(size + GRANULARITY as usize, false).ok_or(OUT_OF_MEMORY)?;
        let start = (va.addr as u64).div_ceil(GRANULARITY) * GRANULARITY;
        st.reservations.insert(start, (size as u64, Arc::new(va)));
        // SAFETY: checked non-null; driver contract: a CUdeviceptr out-pointer.
        unsafe { out(ptr, start) }
    })
}

#[no_mangle]
pub extern "C" fn cuMemAddressFree(ptr: CUdeviceptr, size: usize) -> CUresult {
    guard("cuMemAddressFree", || {
        let mut st = enter("cuMemAddressFree", true)?;
        let ok = st
            .reservations
            .get(&ptr)
            .is_some_and(|(len, _)| *len == size as u64);
        if !ok {
            st.find(
                Class::InvalidHandle,
                format!("cuMemAddressFree({ptr:#x}, {size}): not a live reservation"),
            );
            return Err(INVALID_VALUE);
        }
        if st
            .regions
            .range(ptr..ptr + size as u64)
            .any(|(_, r)| r.kind == Kind::Mapped)
        {
            st.find(
                Class::Leak,
                format!("cuMemAddressFree({ptr:#x}): the range still has mappings"),
            );
            return Err(INVALID_VALUE);
        }
        st.reservations.remove(&ptr);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const MemAllocationProp,
    _flags: c_ulonglong,
) -> CUresult {
    guard("cuMemCreate", || {
        let mut st = enter("cuMemCreate", true)?;
        if handle.is_null()
            || prop.is_null()
            || size == 0
            || !(size as u64).is_multiple_of(GRANULARITY)
        {
            return Err(INVALID_VALUE);
        }
        // SAFETY: driver contract: `prop` points to a CUmemAllocationProp.
        let prop = unsafe { &*prop };
        // type PINNED (1), location DEVICE (1).
        if prop.type_ != 1 || prop.location.type_ != 1 {
            return Err(INVALID_VALUE);
        }
        let device = prop.location.id;
        if device < 0 || device >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        let shadow = if st.cfg.backing {
            Some(Arc::new(Shadow(
                HostMap::new(size, true).ok_or(OUT_OF_MEMORY)?,
            )))
        } else {
            None
        };
        let h = st.id();
        st.phys.insert(
            h,
            Phys {
                len: size as u64,
                device,
                shadow,
            },
        );
        // SAFETY: checked non-null; driver contract: a handle out-pointer.
        unsafe { out(handle, h) }
    })
}

#[no_mangle]
pub extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult {
    guard("cuMemRelease", || {
        let mut st = enter("cuMemRelease", true)?;
        if st.phys.remove(&handle).is_none() {
            st.find(
                Class::InvalidHandle,
                format!("cuMemRelease({handle}): not a live allocation handle"),
            );
            return Err(INVALID_VALUE);
        }
        // Mappings keep the memory alive until unmapped, as in the driver.
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuMemMap(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: CUmemGenericAllocationHandle,
    _flags: c_ulonglong,
) -> CUresult {
    guard("cuMemMap", || {
        let mut st = enter("cuMemMap", true)?;
        let size = size as u64;
        let inside = st
            .reservations
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&s, (len, _))| ptr + size <= s + len);
        let Some(ph) = st.phys.get(&handle) else {
            st.find(
                Class::InvalidHandle,
                format!("cuMemMap: {handle} is not a live allocation handle"),
            );
            return Err(INVALID_HANDLE);
        };
        if !inside || size == 0 || offset as u64 + size > ph.len || !ptr.is_multiple_of(GRANULARITY)
        {
            return Err(INVALID_VALUE);
        }
        if st
            .regions
            .range(..ptr + size)
            .next_back()
            .is_some_and(|(_, r)| r.start + r.len > ptr)
        {
            return Err(INVALID_VALUE); // already mapped
        }
        let (device, shadow) = (ph.device, ph.shadow.clone());
        let buffer_id = st.id();
        st.regions.insert(
            ptr,
            Region {
                start: ptr,
                len: size,
                device,
                kind: Kind::Mapped,
                shadow,
                shadow_off: offset as u64,
                buffer_id,
                accessible: false,
                _va: None,
            },
        );
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemSetAccess(
    ptr: CUdeviceptr,
    size: usize,
    desc: *const MemAccessDesc,
    count: usize,
) -> CUresult {
    guard("cuMemSetAccess", || {
        let mut st = enter("cuMemSetAccess", true)?;
        if desc.is_null() || count == 0 {
            return Err(INVALID_VALUE);
        }
        // SAFETY: driver contract: `count` descriptors.
        let descs = unsafe { std::slice::from_raw_parts(desc, count) };
        let end = ptr + size as u64;
        let keys: Vec<u64> = st
            .regions
            .range(ptr..end)
            .filter(|(_, r)| r.kind == Kind::Mapped)
            .map(|(&k, _)| k)
            .collect();
        if keys.is_empty() {
            return Err(INVALID_VALUE);
        }
        for k in keys {
            let r = st.regions.get_mut(&k).expect("listed");
            // Read-write (3) for the memory's own device.
            r.accessible = descs
                .iter()
                .any(|d| d.location.type_ == 1 && d.location.id == r.device && d.flags == 3);
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    guard("cuMemUnmap", || {
        let mut st = enter("cuMemUnmap", true)?;
        let end = ptr + size as u64;
        let keys: Vec<u64> = st
            .regions
            .range(ptr..end)
            .filter(|(_, r)| r.kind == Kind::Mapped)
            .map(|(&k, _)| k)
            .collect();
        if keys.is_empty() {
            return Err(INVALID_VALUE);
        }
        if let Some((s, e)) = st.inflight_overlap(ptr, end) {
            st.find(
                Class::FreedWhilePending,
                format!("cuMemUnmap({ptr:#x}) while an async copy into {s:#x}..{e:#x} is pending"),
            );
        }
        for k in keys {
            st.regions.remove(&k);
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Copies
// ---------------------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    len: usize,
    stream: CUstream,
) -> CUresult {
    const NAME: &str = "cuMemcpyHtoDAsync_v2";
    guard(NAME, || {
        let mut st = enter(NAME, true)?;
        let (ctx, _) = need_context(&mut st, NAME)?;
        let s = lookup_stream(&mut st, NAME, stream)?;
        if s.ctx != ctx {
            st.find(
                Class::WrongContext,
                format!(
                    "{NAME}: stream {:#x} belongs to context {:#x}, but {ctx:#x} is current",
                    s.id, s.ctx
                ),
            );
            return Err(INVALID_CONTEXT);
        }
        if len == 0 {
            return Ok(());
        }
        if src.is_null() {
            return Err(INVALID_VALUE);
        }
        if let Err(why) = st.cover(dst, len as u64, s.device) {
            st.find(
                Class::BadDeviceRange,
                format!("{NAME} to {dst:#x}+{len}: {why}"),
            );
            return Err(INVALID_VALUE);
        }
        let addr = src as usize;
        let pinned = st
            .pinned_containing(addr, len)
            .filter(|p| p.portable || p.ctx == s.ctx);
        if pinned.is_none() {
            st.find(
                Class::UnpinnedSource,
                format!(
                    "{NAME} from {addr:#x}+{len}: the source is not inside one pinned \
                     allocation usable by this context; the driver would copy synchronously"
                ),
            );
        }
        if let Some((a, b)) = st.inflight_overlap(dst, dst + len as u64) {
            st.find(
                Class::OverlappingDestinations,
                format!("{NAME} to {dst:#x}+{len} overlaps a copy in flight to {a:#x}..{b:#x}"),
            );
        }
        let id = st.id();
        st.inflight
            .entry(dst)
            .or_default()
            .push((dst + len as u64, id));
        let check = st.cfg.check_sources;
        drop(st);
        let snapshot = if pinned.is_none() || check {
            let mut v = vec![0u8; len];
            // SAFETY: the client's source holds `len` bytes (driver contract).
            unsafe { memcpy(v.as_mut_ptr() as usize, addr, len) };
            Some(v)
        } else {
            None
        };
        s.push(Op::Copy(Copy {
            id,
            dst,
            len,
            src: pinned.map(|p| (addr, p)),
            snapshot,
            queued: Instant::now(),
        }));
        Ok(())
    })
}

/// Synchronous device-to-host copy (tests read results back with it).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    len: usize,
) -> CUresult {
    const NAME: &str = "cuMemcpyDtoH_v2";
    guard(NAME, || {
        let mut st = enter(NAME, true)?;
        let (_, dev) = need_context(&mut st, NAME)?;
        if len == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(INVALID_VALUE);
        }
        let device = st.region_at(src).map(|r| r.device).unwrap_or(dev);
        let pieces = match st.cover(src, len as u64, device) {
            Ok(p) => p,
            Err(why) => {
                st.find(
                    Class::BadDeviceRange,
                    format!("{NAME} from {src:#x}+{len}: {why}"),
                );
                return Err(INVALID_VALUE);
            }
        };
        if let Some((a, b)) = st.inflight_overlap(src, src + len as u64) {
            st.find(
                Class::UnsynchronizedRead,
                format!("{NAME} from {src:#x}+{len} while a copy into {a:#x}..{b:#x} is pending"),
            );
        }
        drop(st);
        let mut done = 0usize;
        for p in pieces {
            match p.shadow {
                // SAFETY: the shadow holds the piece; `dst` holds `len` bytes (driver
                // contract).
                Some(sh) => unsafe {
                    memcpy(
                        dst as usize + done,
                        sh.0.addr + p.off as usize,
                        p.len as usize,
                    )
                },
                // SAFETY: as above.
                None => unsafe {
                    libc::memset(dst.cast::<u8>().add(done).cast(), 0, p.len as usize);
                },
            };
            done += p.len as usize;
        }
        Ok(())
    })
}

/// Synchronous host-to-device copy (tests fill memory with it).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    len: usize,
) -> CUresult {
    const NAME: &str = "cuMemcpyHtoD_v2";
    guard(NAME, || {
        let mut st = enter(NAME, true)?;
        let (_, dev) = need_context(&mut st, NAME)?;
        if len == 0 {
            return Ok(());
        }
        if src.is_null() {
            return Err(INVALID_VALUE);
        }
        let device = st.region_at(dst).map(|r| r.device).unwrap_or(dev);
        let pieces = match st.cover(dst, len as u64, device) {
            Ok(p) => p,
            Err(why) => {
                st.find(
                    Class::BadDeviceRange,
                    format!("{NAME} to {dst:#x}+{len}: {why}"),
                );
                return Err(INVALID_VALUE);
            }
        };
        drop(st);
        let mut done = 0usize;
        for p in pieces {
            if let Some(sh) = p.shadow {
                // SAFETY: the shadow holds the piece; `src` holds `len` bytes.
                unsafe {
                    memcpy(
                        sh.0.addr + p.off as usize,
                        src as usize + done,
                        p.len as usize,
                    )
                };
            }
            done += p.len as usize;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Streams and events: entry points
// ---------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ph: *mut CUstream, flags: c_uint) -> CUresult {
    guard("cuStreamCreate", || {
        let mut st = enter("cuStreamCreate", true)?;
        let (ctx, device) = need_context(&mut st, "cuStreamCreate")?;
        if ph.is_null() || flags > 1 {
            return Err(INVALID_VALUE);
        }
        let id = TAG_STREAM | st.id() as usize;
        let s = Arc::new(Stream {
            id,
            ctx,
            device,
            q: Mutex::new(Queue {
                ops: VecDeque::new(),
                busy: false,
                shutdown: false,
                error: 0,
            }),
            cv: Condvar::new(),
        });
        let seed = st.cfg.seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let w = s.clone();
        std::thread::Builder::new()
            .name("fakecuda-stream".into())
            .spawn(move || worker(w, seed))
            .map_err(|_| OUT_OF_MEMORY)?;
        STREAM_THREADS.fetch_add(1, Ordering::SeqCst);
        st.streams.insert(id, s);
        // SAFETY: checked non-null; driver contract: a CUstream out-pointer.
        unsafe { out(ph, id as CUstream) }
    })
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(stream: CUstream) -> CUresult {
    guard("cuStreamSynchronize", || {
        let mut st = enter("cuStreamSynchronize", true)?;
        let s = lookup_stream(&mut st, "cuStreamSynchronize", stream)?;
        drop(st);
        match s.wait_idle() {
            0 => Ok(()),
            e => Err(e),
        }
    })
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(stream: CUstream) -> CUresult {
    guard("cuStreamQuery", || {
        let mut st = enter("cuStreamQuery", true)?;
        let s = lookup_stream(&mut st, "cuStreamQuery", stream)?;
        drop(st);
        let mut q = s.lock();
        if !q.ops.is_empty() || q.busy {
            return Err(NOT_READY);
        }
        match std::mem::take(&mut q.error) {
            0 => Ok(()),
            e => Err(e),
        }
    })
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(stream: CUstream) -> CUresult {
    guard("cuStreamDestroy_v2", || {
        let mut st = enter("cuStreamDestroy_v2", true)?;
        let s = lookup_stream(&mut st, "cuStreamDestroy_v2", stream)?;
        st.streams.remove(&s.id);
        drop(st);
        // As in the driver: queued work still runs; the worker leaves when it is done.
        s.lock().shutdown = true;
        s.cv.notify_all();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ph: *mut CUevent, flags: c_uint) -> CUresult {
    guard("cuEventCreate", || {
        let mut st = enter("cuEventCreate", true)?;
        let (ctx, _) = need_context(&mut st, "cuEventCreate")?;
        if ph.is_null() || flags & !0x7 != 0 {
            return Err(INVALID_VALUE);
        }
        let id = TAG_EVENT | st.id() as usize;
        st.events.insert(
            id,
            Arc::new(Event {
                id,
                ctx,
                recorded: AtomicU64::new(0),
                done: AtomicU64::new(0),
                last: Mutex::new(None),
            }),
        );
        // SAFETY: checked non-null; driver contract: a CUevent out-pointer.
        unsafe { out(ph, id as CUevent) }
    })
}

#[no_mangle]
pub extern "C" fn cuEventRecord(event: CUevent, stream: CUstream) -> CUresult {
    guard("cuEventRecord", || {
        let mut st = enter("cuEventRecord", true)?;
        let e = lookup_event(&mut st, "cuEventRecord", event)?;
        let s = lookup_stream(&mut st, "cuEventRecord", stream)?;
        if e.ctx != s.ctx {
            st.find(
                Class::WrongContext,
                format!(
                    "cuEventRecord: event {:#x} (context {:#x}) on stream {:#x} (context {:#x})",
                    e.id, e.ctx, s.id, s.ctx
                ),
            );
            return Err(INVALID_HANDLE);
        }
        drop(st);
        let gen = e.recorded.fetch_add(1, Ordering::SeqCst) + 1;
        *e.last.lock().unwrap_or_else(|x| x.into_inner()) = Some(s.clone());
        s.push(Op::Mark { event: e, gen });
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuEventQuery(event: CUevent) -> CUresult {
    guard("cuEventQuery", || {
        let mut st = enter("cuEventQuery", true)?;
        let e = lookup_event(&mut st, "cuEventQuery", event)?;
        drop(st);
        if e.done.load(Ordering::SeqCst) < e.recorded.load(Ordering::SeqCst) {
            return Err(NOT_READY);
        }
        match e.stream().map(|s| std::mem::take(&mut s.lock().error)) {
            Some(code) if code != 0 => Err(code),
            _ => Ok(()),
        }
    })
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(event: CUevent) -> CUresult {
    guard("cuEventSynchronize", || {
        let mut st = enter("cuEventSynchronize", true)?;
        let e = lookup_event(&mut st, "cuEventSynchronize", event)?;
        drop(st);
        let target = e.recorded.load(Ordering::SeqCst);
        let Some(s) = e.stream() else { return Ok(()) };
        let mut q = s.lock();
        while e.done.load(Ordering::SeqCst) < target {
            q = s.cv.wait(q).unwrap_or_else(|x| x.into_inner());
        }
        match std::mem::take(&mut q.error) {
            0 => Ok(()),
            code => Err(code),
        }
    })
}

#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(event: CUevent) -> CUresult {
    guard("cuEventDestroy_v2", || {
        let mut st = enter("cuEventDestroy_v2", true)?;
        let e = lookup_event(&mut st, "cuEventDestroy_v2", event)?;
        st.events.remove(&e.id);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Pointer attributes, errors
// ---------------------------------------------------------------------------------------

/// What `cuPointerGetAttributes` reports for one address.
#[derive(Default)]
struct Attrs {
    context: usize,
    memory_type: u32,
    device_pointer: u64,
    host_pointer: usize,
    buffer_id: u64,
    device_ordinal: i32,
    range_start: u64,
    range_size: usize,
    mempool: usize,
}

fn attrs_of(st: &State, p: u64) -> Attrs {
    let mut a = attrs_with_range(st, p);
    if !st.cfg.range_attributes {
        a.range_start = 0;
        a.range_size = 0;
    }
    a
}

fn attrs_with_range(st: &State, p: u64) -> Attrs {
    if let Some(r) = st.region_at(p) {
        // As a real driver: memory from cuMemAlloc belongs to the allocating (primary)
        // context; VMM mappings and pool allocations belong to no context. All are device
        // memory of their device; the range is the allocation, or the one mapping.
        return Attrs {
            context: if r.kind == Kind::Alloc {
                TAG_CTX | r.device as usize
            } else {
                0
            },
            memory_type: 2, // CU_MEMORYTYPE_DEVICE
            device_pointer: p,
            host_pointer: 0,
            buffer_id: r.buffer_id,
            device_ordinal: r.device,
            range_start: r.start,
            range_size: r.len as usize,
            mempool: if r.kind == Kind::Pool {
                TAG_POOL | r.device as usize
            } else {
                0
            },
        };
    }
    if let Some(pin) = st.pinned_containing(p as usize, 1) {
        return Attrs {
            context: pin.ctx,
            memory_type: 1, // CU_MEMORYTYPE_HOST
            device_pointer: p,
            host_pointer: p as usize,
            buffer_id: 0,
            device_ordinal: (pin.ctx & !TAG_MASK) as i32,
            range_start: pin.map.addr as u64,
            range_size: pin.len,
            mempool: 0,
        };
    }
    // Unknown (or reserved but unmapped): null values, no error.
    Attrs {
        device_ordinal: -2,
        ..Attrs::default()
    }
}

/// Writes attribute `a` of `v` through `data`.
///
/// # Safety
/// `data` must point to storage of the attribute's documented type.
unsafe fn write_attr(a: c_uint, v: &Attrs, data: *mut c_void) -> bool {
    // SAFETY: caller's contract: `data` has the documented type for `a`.
    unsafe {
        match a {
            1 => data.cast::<usize>().write(v.context),
            2 => data.cast::<u32>().write(v.memory_type),
            3 => data.cast::<u64>().write(v.device_pointer),
            4 => data.cast::<usize>().write(v.host_pointer),
            7 => data.cast::<u64>().write(v.buffer_id),
            9 => data.cast::<i32>().write(v.device_ordinal),
            11 => data.cast::<u64>().write(v.range_start),
            12 => data.cast::<usize>().write(v.range_size),
            17 => data.cast::<usize>().write(v.mempool),
            _ => return false,
        }
    }
    true
}

#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttributes(
    n: c_uint,
    attributes: *const c_uint,
    data: *mut *mut c_void,
    p: CUdeviceptr,
) -> CUresult {
    guard("cuPointerGetAttributes", || {
        let mut st = enter("cuPointerGetAttributes", true)?;
        if n == 0 || attributes.is_null() || data.is_null() {
            return Err(INVALID_VALUE);
        }
        let v = attrs_of(&st, p);
        for i in 0..n as usize {
            // SAFETY: driver contract: `n` attributes and `n` data pointers.
            let (a, d) = unsafe { (*attributes.add(i), *data.add(i)) };
            // SAFETY: driver contract: each data pointer has its attribute's type.
            if d.is_null() || !unsafe { write_attr(a, &v, d) } {
                st.find(
                    Class::Unsupported,
                    format!("cuPointerGetAttributes: attribute {a} is not emulated"),
                );
                return Err(INVALID_VALUE);
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttribute(
    data: *mut c_void,
    a: c_uint,
    p: CUdeviceptr,
) -> CUresult {
    guard("cuPointerGetAttribute", || {
        let mut st = enter("cuPointerGetAttribute", true)?;
        let v = attrs_of(&st, p);
        if v.memory_type == 0 || data.is_null() {
            return Err(INVALID_VALUE); // the singular form fails on unknown pointers
        }
        // SAFETY: driver contract: `data` has the attribute's type.
        if !unsafe { write_attr(a, &v, data) } {
            st.find(
                Class::Unsupported,
                format!("cuPointerGetAttribute: attribute {a} is not emulated"),
            );
            return Err(INVALID_VALUE);
        }
        Ok(())
    })
}

fn error_text(name: &'static str, code: CUresult, text: bool, p: *mut *const c_char) -> CUresult {
    guard(name, || {
        let _st = enter(name, false)?;
        let Some(&(_, n, s)) = ERRORS.iter().find(|(c, _, _)| *c == code) else {
            // SAFETY: driver contract: an out-pointer (null is refused).
            unsafe { out(p, std::ptr::null()) }?;
            return Err(INVALID_VALUE);
        };
        // SAFETY: driver contract: an out-pointer; the strings are 'static.
        unsafe { out(p, if text { s.as_ptr() } else { n.as_ptr() }) }
    })
}

#[no_mangle]
pub extern "C" fn cuGetErrorName(code: CUresult, p: *mut *const c_char) -> CUresult {
    error_text("cuGetErrorName", code, false, p)
}

#[no_mangle]
pub extern "C" fn cuGetErrorString(code: CUresult, p: *mut *const c_char) -> CUresult {
    error_text("cuGetErrorString", code, true, p)
}

// ---------------------------------------------------------------------------------------
// Test control: fakecuda_*
// ---------------------------------------------------------------------------------------

/// # Safety
/// `s` must be null or a NUL-terminated string.
unsafe fn cstr<'a>(s: *const c_char) -> Option<&'a str> {
    if s.is_null() {
        return None;
    }
    // SAFETY: caller's contract.
    unsafe { CStr::from_ptr(s) }.to_str().ok()
}

/// Clears injected faults, the stub mode, findings and call counts (live objects stay:
/// they belong to the process, like the engine's cached ring).
#[no_mangle]
pub extern "C" fn fakecuda_reset() {
    let mut st = state();
    st.faults.clear();
    st.async_fault = None;
    st.stub = 0;
    st.findings.clear();
    st.calls.clear();
    FINDINGS.store(0, Ordering::SeqCst);
}

/// Sets a configuration key (see `Config::set`; also `initialized` = 0 to forget `cuInit`).
/// Returns 0, or -1 for an unknown key.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_config(key: *const c_char, value: f64) -> c_int {
    // SAFETY: caller passes a C string.
    let Some(key) = (unsafe { cstr(key) }) else {
        return -1;
    };
    let mut st = state();
    if key == "initialized" {
        st.initialized = value != 0.0;
        return 0;
    }
    if st.cfg.set(key, value) {
        0
    } else {
        -1
    }
}

/// Makes calls `nth .. nth + count` (1-based, counted from now; `count` 0 = all from the
/// nth on) of entry point `name` fail with `code`.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_fail(
    name: *const c_char,
    nth: u64,
    code: CUresult,
    count: u64,
) -> c_int {
    // SAFETY: caller passes a C string.
    let Some(name) = (unsafe { cstr(name) }) else {
        return -1;
    };
    let mut st = state();
    let from = st.calls.get(name).copied().unwrap_or(0);
    st.faults.push(Fault {
        name: name.to_string(),
        from,
        nth: nth.max(1),
        count,
        code,
    });
    0
}

/// Makes the `nth` async copy executed from now fail on its stream with `code`: it copies
/// nothing, and the next query or synchronisation of that stream returns `code`.
#[no_mangle]
pub extern "C" fn fakecuda_fail_async(nth: u64, code: CUresult) {
    let base = COPIES.load(Ordering::SeqCst);
    state().async_fault = Some((base + nth.max(1), code));
}

/// Every entry point returns `code` (34: a stub driver); 0 turns it off.
#[no_mangle]
pub extern "C" fn fakecuda_stub(code: CUresult) {
    state().stub = code;
}

/// Calls of entry point `name` since the last reset.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_calls(name: *const c_char) -> u64 {
    // SAFETY: caller passes a C string.
    let Some(name) = (unsafe { cstr(name) }) else {
        return 0;
    };
    state().calls.get(name).copied().unwrap_or(0)
}

/// Counters: `streams`, `events`, `pinned`, `pinned_bytes`, `device_allocs` (cuMemAlloc
/// and pool allocations), `mappings`, `reservations`, `handles`, `pending`, `copies`,
/// `bytes_copied`, `findings`, `stream_threads`, `busy_us` (time stream threads spent
/// executing copies). Unknown names give `u64::MAX`.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_stat(name: *const c_char) -> u64 {
    // SAFETY: caller passes a C string.
    let Some(name) = (unsafe { cstr(name) }) else {
        return u64::MAX;
    };
    let st = state();
    match name {
        "streams" => st.streams.len() as u64,
        "events" => st.events.len() as u64,
        "pinned" => st.pinned.len() as u64,
        "pinned_bytes" => st.pinned_bytes,
        "device_allocs" => st
            .regions
            .values()
            .filter(|r| r.kind != Kind::Mapped)
            .count() as u64,
        "mappings" => st
            .regions
            .values()
            .filter(|r| r.kind == Kind::Mapped)
            .count() as u64,
        "reservations" => st.reservations.len() as u64,
        "handles" => st.phys.len() as u64,
        "pending" => PENDING.load(Ordering::SeqCst),
        "copies" => COPIES.load(Ordering::SeqCst),
        "bytes_copied" => BYTES.load(Ordering::SeqCst),
        "findings" => FINDINGS.load(Ordering::SeqCst),
        "stream_threads" => STREAM_THREADS.load(Ordering::SeqCst),
        "busy_us" => BUSY_NS.load(Ordering::SeqCst) / 1000,
        _ => u64::MAX,
    }
}

/// Writes the findings, one `class: message` per line, into `buf` (at most `cap` bytes,
/// NUL-terminated when there is room); returns the length of the whole text.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_findings(buf: *mut c_char, cap: usize) -> usize {
    let text: String = state()
        .findings
        .iter()
        .map(|(c, m)| format!("{}: {m}\n", c.name()))
        .collect();
    if !buf.is_null() && cap > 0 {
        let n = text.len().min(cap - 1);
        // SAFETY: caller's buffer holds `cap` bytes; we write `n + 1 <= cap`.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast(), n);
            *buf.add(n) = 0;
        }
    }
    text.len()
}

/// Number of findings of `class` (null: all).
#[no_mangle]
pub unsafe extern "C" fn fakecuda_count_findings(class: *const c_char) -> u64 {
    // SAFETY: caller passes a C string or null.
    let class = unsafe { cstr(class) };
    state()
        .findings
        .iter()
        .filter(|(c, _)| class.is_none_or(|k| k == c.name()))
        .count() as u64
}

#[no_mangle]
pub extern "C" fn fakecuda_clear_findings() {
    state().findings.clear();
    FINDINGS.store(0, Ordering::SeqCst);
}

/// Marks the start of a watched call on this thread: remembers the current context.
#[no_mangle]
pub extern "C" fn fakecuda_enter() {
    let c = current();
    WATCH.with(|w| w.borrow_mut().push(c));
}

/// Marks the end of a watched call: the current context must be the one at
/// `fakecuda_enter`, and no work may be pending on any stream. Returns the number of
/// findings this recorded.
#[no_mangle]
pub extern "C" fn fakecuda_leave() -> u64 {
    let expected = WATCH.with(|w| w.borrow_mut().pop()).unwrap_or(0);
    let now = current();
    let pending = PENDING.load(Ordering::SeqCst);
    let mut st = state();
    let mut n = 0;
    if now != expected {
        st.find(
            Class::ContextNotRestored,
            format!("the current context was {expected:#x} before the call and {now:#x} after"),
        );
        n += 1;
    }
    if pending > 0 {
        st.find(
            Class::PendingAtReturn,
            format!("{pending} stream operation(s) still pending when the call returned"),
        );
        n += 1;
    }
    n
}

/// Records a `leak` finding for every live stream, event, pinned allocation, device
/// allocation, mapping, reservation and allocation handle; returns how many.
#[no_mangle]
pub extern "C" fn fakecuda_check_leaks() -> u64 {
    let mut st = state();
    let mut found = Vec::new();
    for (what, n) in [
        ("stream", st.streams.len()),
        ("event", st.events.len()),
        ("pinned allocation", st.pinned.len()),
        (
            "device allocation",
            st.regions
                .values()
                .filter(|r| r.kind != Kind::Mapped)
                .count(),
        ),
        (
            "VMM mapping",
            st.regions
                .values()
                .filter(|r| r.kind == Kind::Mapped)
                .count(),
        ),
        ("address reservation", st.reservations.len()),
        ("allocation handle", st.phys.len()),
    ] {
        if n > 0 {
            found.push(format!("{n} {what}(s) still alive"));
        }
    }
    let k = found.len() as u64;
    for f in found {
        st.find(Class::Leak, f);
    }
    k
}

/// Waits until every stream is idle (tests that provoke misuse let the work drain).
#[no_mangle]
pub extern "C" fn fakecuda_wait_idle() {
    let streams: Vec<_> = state().streams.values().cloned().collect();
    for s in streams {
        let mut q = s.lock();
        while !q.ops.is_empty() || q.busy {
            q = s.cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
    // Destroyed streams drain on their own; wait for those too.
    while PENDING.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
}
