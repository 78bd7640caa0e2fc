//! Streams, events and copies: each stream is a FIFO run by its own worker thread after
//! random delays, a copy reads its source when it runs, an event completes when the worker
//! reaches it. The `cuStream*`, `cuEvent*` and `cuMemcpy*` entry points.

use std::collections::VecDeque;
use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::*;

// ---------------------------------------------------------------------------------------
// Streams and events
// ---------------------------------------------------------------------------------------

pub(crate) enum Op {
    Copy(Copy),
    CopyOut(CopyOut),
    Mark { event: Arc<Event>, gen: u64 },
    Free { start: u64 },
}

pub(crate) struct Queue {
    pub(crate) ops: VecDeque<Op>,
    pub(crate) busy: bool,
    pub(crate) shutdown: bool,
    /// An asynchronous error, reported (once) by the next query or synchronisation.
    pub(crate) error: CUresult,
}

pub(crate) struct Stream {
    pub(crate) id: usize,
    pub(crate) ctx: usize,
    pub(crate) device: i32,
    pub(crate) q: Mutex<Queue>,
    pub(crate) cv: Condvar,
}

impl Stream {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn push(&self, op: Op) {
        PENDING.fetch_add(1, Ordering::SeqCst);
        self.lock().ops.push_back(op);
        self.cv.notify_all();
    }

    pub(crate) fn wait_idle(&self) -> CUresult {
        let mut q = self.lock();
        while !q.ops.is_empty() || q.busy {
            q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        std::mem::take(&mut q.error)
    }
}

pub(crate) struct Event {
    pub(crate) id: usize,
    pub(crate) ctx: usize,
    pub(crate) recorded: AtomicU64,
    pub(crate) done: AtomicU64,
    pub(crate) last: Mutex<Option<Arc<Stream>>>,
}

impl Event {
    pub(crate) fn stream(&self) -> Option<Arc<Stream>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

pub(crate) fn worker(s: Arc<Stream>, seed: u64) {
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
            pause(Duration::from_micros(d));
        }
        let error = match op {
            Op::Copy(c) => {
                let t0 = Instant::now();
                let e = run_copy(&s, c, (check, full, bps), &mut link_free, &mut scratch);
                BUSY_NS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                e
            }
            Op::CopyOut(c) => {
                let t0 = Instant::now();
                let e = run_copy_out(&s, c, (check, bps), &mut link_free);
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
pub(crate) struct Copy {
    pub(crate) id: u64,
    pub(crate) dst: u64,
    pub(crate) len: usize,
    /// The pinned source, kept alive until the copy ran.
    pub(crate) src: Option<(usize, Arc<Pinned>)>,
    /// The source as it was at enqueue: compared at execution (pinned sources), or the
    /// data itself (unpinned sources, which the driver consumes at once).
    pub(crate) snapshot: Option<Vec<u8>>,
    /// When it was queued: a paced link starts it then at the earliest.
    pub(crate) queued: Instant,
}

/// Executes one host-to-device copy on the stream's thread; returns an async error code.
/// `(check, full, bps)`: compare the source with its snapshot, memcpy it whole without
/// backing, link bandwidth.
pub(crate) fn run_copy(
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
            pause(*link_free - now);
        }
    }
    state().inflight_remove(dst, id);
    drop(src);
    0
}

/// A queued device-to-host copy.
pub(crate) struct CopyOut {
    pub(crate) id: u64,
    pub(crate) src: u64,
    pub(crate) len: usize,
    /// The host destination.
    pub(crate) dst: usize,
    /// Its pinned allocation, kept alive until the copy ran (`None`: unpinned, a finding).
    pub(crate) pinned: Option<Arc<Pinned>>,
    /// Whether the destination was poisoned at enqueue (checked untouched at execution).
    pub(crate) poisoned: bool,
    pub(crate) queued: Instant,
}

/// What an async device-to-host copy's destination holds from enqueue until the copy
/// runs: a client that reads it before the copy's event completed reads this, not the
/// device's bytes.
pub(crate) const POISON: u8 = 0xdb;

/// Executes one device-to-host copy on the stream's thread; returns an async error code.
/// The device bytes are read *now*, as the DMA engine would.
pub(crate) fn run_copy_out(
    s: &Stream,
    c: CopyOut,
    (check, bps): (bool, f64),
    link_free: &mut Instant,
) -> CUresult {
    let CopyOut {
        id,
        src,
        len,
        dst,
        pinned,
        poisoned,
        queued,
    } = c;
    let n = COPIES.fetch_add(1, Ordering::SeqCst) + 1;
    let pieces = {
        let mut st = state();
        if let Some((nth, code)) = st.async_fault {
            if nth == n {
                st.async_fault = None;
                st.inflight_remove(dst as u64, id);
                return code;
            }
        }
        match st.cover(src, len as u64, s.device) {
            Ok(p) => Some(p),
            Err(why) => {
                st.find(
                    Class::FreedWhilePending,
                    format!("async copy from {src:#x}+{len}: source freed before it ran: {why}"),
                );
                None
            }
        }
    };
    if bps > 0.0 {
        if *link_free < queued {
            *link_free = queued;
        }
        *link_free += Duration::from_secs_f64(len as f64 / bps);
    }
    if check && poisoned {
        // SAFETY: the destination is inside a live pinned allocation (we hold its Arc)
        // of at least `len` bytes from `dst` (checked at enqueue).
        let now = unsafe { std::slice::from_raw_parts(dst as *const u8, len) };
        if let Some(at) = now.iter().position(|&b| b != POISON) {
            state().find(
                Class::SourceChanged,
                format!(
                    "async copy {src:#x}+{len} -> {dst:#x}: host byte {at} was written between \
                     enqueue and execution (buffer reused before the copy completed)"
                ),
            );
        }
    }
    if let Some(pieces) = pieces {
        let mut done = 0usize;
        for p in &pieces {
            match &p.shadow {
                // SAFETY: the shadow holds `[off, off + len)`; the destination holds `len`
                // bytes (pinned, alive: we hold its Arc; or the client's, per contract).
                Some(sh) => unsafe {
                    memcpy(dst + done, sh.0.addr + p.off as usize, p.len as usize)
                },
                // SAFETY: as above.
                None => unsafe {
                    libc::memset((dst + done) as *mut c_void, 0, p.len as usize);
                },
            };
            done += p.len as usize;
        }
        BYTES.fetch_add(len as u64, Ordering::Relaxed);
    }
    if bps > 0.0 {
        let now = Instant::now();
        if *link_free > now {
            pause(*link_free - now);
        }
    }
    state().inflight_remove(dst as u64, id);
    drop(pinned);
    0
}

pub(crate) fn lookup_stream(
    st: &mut State,
    name: &str,
    h: CUstream,
) -> Result<Arc<Stream>, CUresult> {
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

pub(crate) fn lookup_event(st: &mut State, name: &str, h: CUevent) -> Result<Arc<Event>, CUresult> {
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
// Copies
// ---------------------------------------------------------------------------------------

/// The stream `h` of an async copy, which must belong to the current context (a copy on
/// another context's stream is a finding and `INVALID_CONTEXT`).
fn stream_of_current_context(
    st: &mut State,
    name: &str,
    h: CUstream,
) -> Result<Arc<Stream>, CUresult> {
    let (ctx, _) = need_context(st, name)?;
    let s = lookup_stream(st, name, h)?;
    if s.ctx != ctx {
        st.find(
            Class::WrongContext,
            format!(
                "{name}: stream {:#x} belongs to context {:#x}, but {ctx:#x} is current",
                s.id, s.ctx
            ),
        );
        return Err(INVALID_CONTEXT);
    }
    Ok(s)
}

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
        let s = stream_of_current_context(&mut st, NAME, stream)?;
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

/// Asynchronous device-to-host copy into pinned memory: the reverse of
/// `cuMemcpyHtoDAsync_v2`, with the same checks (stream and context, a device range of
/// the stream's device, a pinned host buffer, no overlap with a copy in flight) plus two
/// of its own: the host buffer is poisoned at enqueue (a client that reads it before the
/// copy's event completed gets `POISON`, not the device's bytes) and must be untouched
/// when the copy runs; and the device range must not be written by a copy in flight.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    len: usize,
    stream: CUstream,
) -> CUresult {
    const NAME: &str = "cuMemcpyDtoHAsync_v2";
    guard(NAME, || {
        let mut st = enter(NAME, true)?;
        let s = stream_of_current_context(&mut st, NAME, stream)?;
        if len == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(INVALID_VALUE);
        }
        if let Err(why) = st.cover(src, len as u64, s.device) {
            st.find(
                Class::BadDeviceRange,
                format!("{NAME} from {src:#x}+{len}: {why}"),
            );
            return Err(INVALID_VALUE);
        }
        let addr = dst as usize;
        let pinned = st
            .pinned_containing(addr, len)
            .filter(|p| p.portable || p.ctx == s.ctx);
        if pinned.is_none() {
            st.find(
                Class::UnpinnedSource,
                format!(
                    "{NAME} to {addr:#x}+{len}: the host buffer is not inside one pinned \
                     allocation usable by this context; the driver would copy synchronously"
                ),
            );
        }
        if let Some((a, b)) = st.inflight_overlap(src, src + len as u64) {
            st.find(
                Class::UnsynchronizedRead,
                format!("{NAME} from {src:#x}+{len} while a copy into {a:#x}..{b:#x} is pending"),
            );
        }
        let (lo, hi) = (addr as u64, (addr + len) as u64);
        // Overlapping another copy in flight is one finding: that copy's bytes land in
        // this one's buffer, so this one is not poisoned (its check would fire too).
        let overlaps = st.inflight_overlap(lo, hi);
        if let Some((a, b)) = overlaps {
            st.find(
                Class::OverlappingDestinations,
                format!("{NAME} to {addr:#x}+{len} overlaps a copy in flight to {a:#x}..{b:#x}"),
            );
        }
        let id = st.id();
        st.inflight.entry(lo).or_default().push((hi, id));
        let check = st.cfg.check_sources;
        drop(st);
        let poisoned = check && pinned.is_some() && overlaps.is_none();
        if poisoned {
            // SAFETY: the host buffer holds `len` bytes inside a live pinned allocation.
            unsafe { libc::memset(dst, POISON as i32, len) };
        }
        s.push(Op::CopyOut(CopyOut {
            id,
            src,
            len,
            dst: addr,
            pinned,
            poisoned,
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

/// Waits `d`. Windows rounds a sleep up to its timer tick (a millisecond or more), which
/// would stretch the fake's microsecond delays a thousandfold; there a short wait yields
/// until its deadline instead.
fn pause(d: Duration) {
    if cfg!(windows) && d < Duration::from_millis(2) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            std::thread::yield_now();
        }
    } else {
        std::thread::sleep(d);
    }
}
