//! The driver-free half of the copy engine, shared by both sinks: handing units of work to
//! threads, cancelling, reporting progress on the calling thread, and the staged loop.
//! Nothing here knows CUDA, and nothing here reads a file itself: reads are `fileio`'s
//! (`Source`, `read_exact_at_raw`, ...). The CUDA sink adds only the driver glue
//! (`transfer/cuda/`).
//!
//! - [`Reporter`]: progress, throttled to one call per [`PROGRESS_STEP`] bytes; the
//!   callback may cancel. Called on the thread that started the copy, never under a lock.
//! - [`Claims`]: units of work claimed in order by any number of threads, with a stop flag
//!   that cancellation, errors and unwinding all set.
//! - [`run_scoped`]: scoped worker threads run units (the host sink: each unit reads
//!   straight into destination memory) and the calling thread counts what they deliver.
//! - [`run_staged`]: persistent reader threads ([`ReaderPool`]) read chunks into a ring of
//!   staging slabs handed out by [`FreeSlabs`]; the calling thread queues each filled slab's
//!   pieces on a [`Stage`] (a CUDA stream, or a fake in tests) and recycles slabs whose
//!   copies completed.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use super::Plan;
use crate::error::{panic_message, Error, Result};
use crate::fileio::Source;
// The staging ring sizes its slabs in `O_DIRECT`'s unit (transfer/cuda/ring.rs imports it
// from here; fileio.rs owns it).
pub(crate) use crate::fileio::ALIGN;

/// How a copy ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte reached its destination.
    Done,
    /// The progress callback asked to stop. Destinations hold partial data.
    Cancelled,
}

/// The progress callback: `(bytes_done, bytes_total)`; returning `false` cancels the copy.
/// Always called on the thread that started the copy.
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64) -> bool;

/// Bytes between two progress calls (the first call, `(0, total)`, and the last,
/// `(total, total)`, are always made).
pub const PROGRESS_STEP: u64 = 16 << 20;

/// Throttles progress calls to one per [`PROGRESS_STEP`] bytes.
pub(crate) struct Reporter<'a> {
    cb: ProgressFn<'a>,
    total: u64,
    done: u64,
    last: u64,
}

impl<'a> Reporter<'a> {
    /// Makes the first call, `(0, total)`. Returns `None` if it asked to cancel.
    pub(crate) fn start(cb: ProgressFn<'a>, total: u64) -> Option<Reporter<'a>> {
        if !cb(0, total) {
            return None;
        }
        Some(Reporter {
            cb,
            total,
            done: 0,
            last: 0,
        })
    }

    /// Counts `n` more bytes delivered; `false` means cancel.
    pub(crate) fn add(&mut self, n: u64) -> bool {
        self.done += n;
        if self.done - self.last >= PROGRESS_STEP
            || (self.done >= self.total && self.done != self.last)
        {
            self.last = self.done;
            return (self.cb)(self.done, self.total);
        }
        true
    }
}

/// Default number of reader threads: the machine's parallelism, at most 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
}

// ---------------------------------------------------------------------------------------
// Claiming work, stopping
// ---------------------------------------------------------------------------------------

/// Units `0..len` of a copy, claimed in order by whichever thread asks next, and the flag
/// that stops every thread (cancel, error, unwinding).
pub(crate) struct Claims {
    next: AtomicUsize,
    len: usize,
    stop: AtomicBool,
}

impl Claims {
    pub(crate) fn new(len: usize) -> Claims {
        Claims {
            next: AtomicUsize::new(0),
            len,
            stop: AtomicBool::new(false),
        }
    }

    /// The next unclaimed unit; `None` once all are claimed or the copy stopped.
    pub(crate) fn claim(&self) -> Option<usize> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.len).then_some(i)
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Stops the claims when dropped: however the coordinator leaves (error, cancel, panic),
/// the workers stop claiming.
struct StopOnDrop<'a>(&'a Claims);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Runs units `0..units` on `threads` scoped threads (on the calling thread alone when
/// `threads <= 1`), each with its own `S` (a scratch buffer); `work` returns the bytes a
/// unit delivered. The calling thread counts them into `reporter`, so progress and
/// cancellation happen there. The first error stops the other threads and is returned.
pub(crate) fn run_scoped<S, W>(
    threads: usize,
    units: usize,
    work: W,
    reporter: &mut Reporter<'_>,
) -> Result<Outcome>
where
    S: Default,
    W: Fn(usize, &mut S) -> Result<u64> + Sync,
{
    let claims = Claims::new(units);
    let threads = threads.min(units);
    if threads <= 1 {
        let mut state = S::default();
        while let Some(i) = claims.claim() {
            if !reporter.add(work(i, &mut state)?) {
                return Ok(Outcome::Cancelled);
            }
        }
        return Ok(Outcome::Done);
    }
    let (tx, rx) = mpsc::channel::<Result<u64>>();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (claims, work) = (&claims, &work);
            s.spawn(move || {
                let mut state = S::default();
                while let Some(i) = claims.claim() {
                    let r = work(i, &mut state);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let _stop = StopOnDrop(&claims);
        for msg in rx {
            match msg {
                Ok(n) => {
                    if !reporter.add(n) {
                        return Ok(Outcome::Cancelled);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Outcome::Done)
    })
}

// ---------------------------------------------------------------------------------------
// Staged copies: reader threads, slab handout, the copy loop
// ---------------------------------------------------------------------------------------

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

type Job = Box<dyn FnOnce() + Send>;

/// A persistent reader thread.
struct Reader {
    jobs: mpsc::Sender<Job>,
    thread: std::thread::JoinHandle<()>,
}

/// Reader threads kept across copies (a loop of small copies starts no thread per copy).
#[derive(Default)]
pub(crate) struct ReaderPool {
    readers: Vec<Reader>,
}

impl ReaderPool {
    /// Gives `n` readers a job each (`job(i)` for reader `i`), starting threads as needed.
    fn dispatch(&mut self, n: usize, path: &Path, job: impl Fn(usize) -> Job) -> Result<()> {
        for i in 0..n {
            if i == self.readers.len() {
                let (jobs, rx) = mpsc::channel::<Job>();
                let thread = std::thread::Builder::new()
                    .name(format!("zeroload-reader-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })
                    .map_err(|e| Error::io(path, e))?;
                self.readers.push(Reader { jobs, thread });
            }
            if self.readers[i].jobs.send(job(i)).is_err() {
                return Err(Error::Internal("a reader thread is gone".into()));
            }
        }
        Ok(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.readers.is_empty()
    }

    /// Stops and joins every reader.
    pub(crate) fn shutdown(&mut self) {
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

/// What a reader hands the coordinator: chunk `chunk` now sits in slab `slab`, starting
/// `skew` bytes into it (non-zero for `O_DIRECT` reads from an aligned offset).
struct Filled {
    chunk: usize,
    slab: usize,
    skew: usize,
}

/// The slabs free for reading: a stack, so that the slab freed last (its pages warm in the
/// caches and TLB) is read into first, and the ring's memory is walked only as far as the
/// copies lag behind the reads. Closing it dismisses the readers waiting for a slab.
// A blocking lock (clippy.toml): taken by reader threads and by the coordinator, which runs
// detached from Python (src/py runs every copy inside `py.detach`), and held for a push
// or a pop only.
#[allow(clippy::disallowed_types)]
struct FreeSlabs {
    state: std::sync::Mutex<(Vec<usize>, bool)>,
    cv: std::sync::Condvar,
}

#[allow(clippy::disallowed_types)] // as `FreeSlabs`
impl FreeSlabs {
    fn new(n: usize) -> FreeSlabs {
        FreeSlabs {
            state: std::sync::Mutex::new(((0..n).rev().collect(), false)),
            cv: std::sync::Condvar::new(),
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

/// One copy's work for a reader thread. Everything is owned (the threads outlive the
/// copy); the coordinator does not return before every reader has dropped its job.
struct ReadJob {
    plan: Arc<Plan>,
    source: Arc<Source>,
    slabs: Arc<[usize]>,
    slab_bytes: usize,
    claims: Arc<Claims>,
    free: Arc<FreeSlabs>,
    filled: mpsc::Sender<Result<Filled>>,
}

impl ReadJob {
    /// Claims chunks in file order, waits for a free slab, reads the chunk into it and hands
    /// it over; stops at the end of the plan, when the claims stop or the free slabs close,
    /// or after a read error (which it hands over).
    fn run(self) {
        while let Some(chunk) = self.claims.claim() {
            let c = &self.plan.chunks[chunk];
            let Some(slab) = self.free.take() else {
                break; // the coordinator stopped
            };
            // SAFETY: slab `slab` was handed to this reader alone by the free stack
            // (its previous copies completed: the coordinator saw its marker complete),
            // and it is `slab_bytes` long (aligned, for O_DIRECT: the caller's contract);
            // the coordinator keeps the slabs alive until every reader has dropped this
            // job; chunks were planned to fit a slab.
            let r = unsafe {
                self.source.read_into(
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

    /// The job as a reader thread runs it: a panic is reported to the coordinator as an
    /// internal error instead of ending the thread silently.
    fn boxed(self) -> Job {
        Box::new(move || {
            let tx = self.filled.clone();
            if let Err(p) = catch_unwind(AssertUnwindSafe(move || self.run())) {
                let _ = tx.send(Err(Error::Internal(format!(
                    "a reader thread panicked: {}",
                    panic_message(p.as_ref())
                ))));
            }
        })
    }
}

/// Stops a copy's readers and waits until each has dropped its job (so no reader touches
/// a slab after the copy returns), on every path out of `run_staged`, unwinding included.
struct StopReaders<'a> {
    claims: Arc<Claims>,
    free: Arc<FreeSlabs>,
    filled: &'a mpsc::Receiver<Result<Filled>>,
}

impl StopReaders<'_> {
    /// Stops the claims and closes the free slabs: a reader waiting for a slab wakes up
    /// and leaves; one in the middle of a read leaves after it.
    fn stop(&mut self) {
        self.claims.stop();
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

/// The staging slabs of one copy: `ptrs[i]` is the address of slab `i`, `bytes` long.
pub(crate) struct Slabs<'a> {
    pub(crate) ptrs: &'a [usize],
    pub(crate) bytes: usize,
}

/// The staged copy loop. `readers` threads from `pool` claim chunks in file order, wait
/// for a free slab, read the chunk into it and hand it over; this thread queues the
/// chunk's pieces on `stage`, marks the slab, and returns slabs to the readers once their
/// marker completed. Progress counts completed bytes. However it ends, the readers have
/// stopped touching the slabs and every queued copy has completed on return.
///
/// # Safety
/// Each slab must be valid for writes of `slabs.bytes` bytes (`fileio::ALIGN`-aligned if
/// `source.direct`) and used by nothing else during the call; every piece's destination
/// must be valid for `stage`; chunks must fit a slab
/// (`len <= fileio::max_chunk(source.direct, slabs.bytes)`).
pub(crate) unsafe fn run_staged<S: Stage>(
    stage: &mut S,
    plan: Arc<Plan>,
    source: Arc<Source>,
    slabs: Slabs<'_>,
    readers: usize,
    pool: &mut ReaderPool,
    reporter: &mut Reporter<'_>,
) -> Result<Outcome> {
    let n_chunks = plan.chunks.len();
    if n_chunks == 0 {
        return Ok(Outcome::Done);
    }
    let free = Arc::new(FreeSlabs::new(slabs.ptrs.len()));
    let claims = Arc::new(Claims::new(n_chunks));
    let (filled_tx, filled_rx) = mpsc::channel::<Result<Filled>>();
    let mut stop = StopReaders {
        claims: claims.clone(),
        free: free.clone(),
        filled: &filled_rx,
    };
    let path = source.path.clone();
    let shared: Arc<[usize]> = slabs.ptrs.into();
    let dispatched = pool.dispatch(readers.max(1), &path, |_| {
        ReadJob {
            plan: plan.clone(),
            source: source.clone(),
            slabs: shared.clone(),
            slab_bytes: slabs.bytes,
            claims: claims.clone(),
            free: free.clone(),
            filled: filled_tx.clone(),
        }
        .boxed()
    });
    drop(filled_tx); // the readers hold the only senders now
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
                    let base = slabs.ptrs[f.slab] + f.skew;
                    for p in &c.pieces {
                        // SAFETY: the source lies in the slab (piece inside the chunk, chunk
                        // read at `skew` in a slab of `slabs.bytes`); readers do not touch
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
    use crate::fileio::max_chunk;
    use crate::mapping::Mapping;
    use crate::transfer::{CopyRequest, PlanOptions};

    #[test]
    fn reporter_throttles_and_always_reports_the_end() {
        let mut calls = Vec::new();
        let mut cb = |d: u64, t: u64| {
            calls.push((d, t));
            true
        };
        let total = 3 * PROGRESS_STEP + 10;
        let mut r = Reporter::start(&mut cb, total).unwrap();
        for _ in 0..(total / 1024) {
            assert!(r.add(1024));
        }
        assert!(r.add(total % 1024));
        assert_eq!(calls.first(), Some(&(0, total)));
        assert_eq!(calls.last(), Some(&(total, total)));
        assert!(calls.len() <= 6, "{calls:?}");
    }

    #[test]
    fn reporter_cancels() {
        let mut cb = |d: u64, _t: u64| d == 0;
        let mut r = Reporter::start(&mut cb, 100).unwrap();
        assert!(!r.add(100));
        let mut no = |_d: u64, _t: u64| false;
        assert!(Reporter::start(&mut no, 100).is_none());
    }

    #[test]
    fn claims_hand_out_each_unit_once_until_stopped() {
        let c = Claims::new(3);
        assert_eq!((c.claim(), c.claim()), (Some(0), Some(1)));
        c.stop();
        assert_eq!(c.claim(), None);
        let c = Claims::new(1);
        assert_eq!((c.claim(), c.claim()), (Some(0), None));
    }

    #[test]
    #[allow(clippy::disallowed_types)] // a test's record of the units run; no Python here
    fn scoped_workers_count_every_unit_and_stop_on_error_or_cancel() {
        for threads in [1, 2, 5] {
            let mut calls = Vec::new();
            let mut cb = |d: u64, t: u64| {
                calls.push((d, t));
                true
            };
            let total = 100 * PROGRESS_STEP;
            let mut rep = Reporter::start(&mut cb, total).unwrap();
            let seen = std::sync::Mutex::new(Vec::new());
            let out = run_scoped(
                threads,
                100,
                |i, n: &mut u64| {
                    *n += 1; // per-thread state
                    seen.lock().unwrap().push(i);
                    Ok(PROGRESS_STEP)
                },
                &mut rep,
            );
            assert_eq!(out.unwrap(), Outcome::Done);
            let mut seen = seen.into_inner().unwrap();
            seen.sort_unstable();
            assert_eq!(seen, (0..100).collect::<Vec<_>>(), "each unit once");
            assert_eq!(calls.last(), Some(&(total, total)));

            // The callback cancels at the third unit. Units from 10 on wait until it has,
            // so however the threads are scheduled, no worker can race through every
            // unit before the cancel is seen: at most one more unit per worker runs.
            let cancelled = AtomicBool::new(false);
            let mut cb = |d: u64, _| {
                let go_on = d < 3 * PROGRESS_STEP;
                cancelled.fetch_or(!go_on, Ordering::Release);
                go_on
            };
            let mut rep = Reporter::start(&mut cb, total).unwrap();
            let ran = AtomicUsize::new(0);
            let out = run_scoped(
                threads,
                100_000,
                |i, _: &mut ()| {
                    while i >= 10 && !cancelled.load(Ordering::Acquire) {
                        std::thread::yield_now();
                    }
                    ran.fetch_add(1, Ordering::Relaxed);
                    Ok(PROGRESS_STEP)
                },
                &mut rep,
            );
            assert_eq!(out.unwrap(), Outcome::Cancelled);
            assert!(
                ran.load(Ordering::Relaxed) <= 10 + threads,
                "workers stopped"
            );

            let mut cb = |_, _| true;
            let mut rep = Reporter::start(&mut cb, total).unwrap();
            let out = run_scoped(
                threads,
                100_000,
                |i, _: &mut ()| match i {
                    7 => Err(Error::InvalidArgument("unit 7".into())),
                    _ => Ok(1),
                },
                &mut rep,
            );
            assert!(out.unwrap_err().to_string().contains("unit 7"));
        }
    }

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

    /// Runs the staged pipeline with the fake stage; returns the destinations and progress
    /// calls.
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
        let source = Source::open(m.file(), m.path(), direct).unwrap();
        let plan = Plan::new(
            &reqs,
            m.len(),
            PlanOptions {
                max_chunk: max_chunk(source.direct, slab_bytes),
                max_gap: 1000,
            },
            "t",
        )
        .unwrap();
        // O_DIRECT wants 4 KiB-aligned slabs: over-allocate and align by hand.
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
            run_staged(
                &mut stage,
                Arc::new(plan),
                Arc::new(source),
                Slabs {
                    ptrs: &slab_ptrs,
                    bytes: slab_bytes,
                },
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
    fn staged_copies_deliver_every_byte_and_never_recycle_a_busy_slab() {
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
    fn staged_copies_cancel_and_report_read_errors_without_hanging() {
        let (_d, m, _data) = test_file(4 * PROGRESS_STEP as usize);
        let ranges = [(0u64, 4 * PROGRESS_STEP)];
        let (r, _, _) = run_fake(&m, &ranges, 1 << 20, 4, 2, false, Some(2));
        assert_eq!(r.unwrap(), Outcome::Cancelled);

        let cut = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path())
            .unwrap()
            .set_len(1 << 20);
        if cfg!(windows) {
            // Windows refuses to shrink a mapped file (ERROR_USER_MAPPED_FILE): the
            // hazard cannot arise there.
            assert_eq!(cut.unwrap_err().raw_os_error(), Some(1224));
            return;
        }
        cut.unwrap();
        let (r, _, _) = run_fake(&m, &ranges, 1 << 20, 4, 3, false, None);
        assert!(r.unwrap_err().to_string().contains("truncated"));
    }
}
