//! The reverse of the staged loop, with no driver in sight: source memory -> staging slab
//! -> file. Saving a checkpoint from a GPU runs it (`transfer/cuda/save.rs`), and so would
//! any other sink that can copy its memory into host slabs asynchronously.
//!
//! The requests are packed, in file order, into *loads* of at most one slab each (a large
//! request is split across loads, small ones share one). The calling thread queues each
//! load's copies into a free slab on a [`Drain`] (a CUDA stream) and marks the slab; once
//! the oldest mark has completed it hands that slab to a writer thread, which writes each
//! part with a positional write (`fileio::write_all_at`) and computes its CRC32, then
//! gives the slab back. So the
//! copy of the next load overlaps the write of the last, and host memory stays within the
//! slabs whatever the size of the data. One writer is the default (buffered writes into
//! one file take turns on its inode lock; see `transfer/write.rs`); more may be asked for. Progress counts bytes written, on the calling thread; it may cancel.
//! However the loop ends, every queued copy has completed and no writer touches a slab
//! when it returns.

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use super::pipeline::{Reporter, Slabs, Stage};
use super::Outcome;
use crate::error::{panic_message, Error, Result};
use crate::fileio;

/// One range to write: `nbytes` bytes at source address `src` go to byte `file_offset` of
/// the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteRequest {
    pub src: u64,
    pub nbytes: u64,
    pub file_offset: u64,
}

/// Where staged writes come from: a [`Stage`] (in-order queue with one completion marker
/// per slab) that can also copy source memory into a host slab.
pub(crate) trait Drain: Stage {
    /// Queues a copy of `len` bytes from source address `src` to host `dst`.
    ///
    /// # Safety
    /// `dst .. dst + len` must stay valid, and be neither read nor written by the host,
    /// until the slab's next marker has completed; `src .. src + len` must be a valid
    /// source that nothing writes meanwhile.
    unsafe fn copy_out(&mut self, dst: *mut u8, src: u64, len: usize) -> Result<()>;
}

/// A run of one request's bytes inside a load.
#[derive(Clone, Copy, Debug)]
struct Part {
    /// Offset in the slab.
    slab_off: usize,
    len: usize,
    src: u64,
    file_offset: u64,
}

/// The requests cut into slab loads. Parts are numbered in the order they are created
/// (request by request, in file order), so each request's parts are a range of numbers.
struct Loads {
    /// Each load's parts, with the number of its first part.
    loads: Vec<(usize, Vec<Part>)>,
    /// Each request's part numbers (empty for an empty request).
    parts_of: Vec<Range<usize>>,
    parts: usize,
    total_bytes: u64,
}

impl Loads {
    fn new(requests: &[WriteRequest], slab_bytes: usize) -> Loads {
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| requests[i].file_offset);
        let mut parts_of = vec![0..0; requests.len()];
        let mut loads: Vec<(usize, Vec<Part>)> = Vec::new();
        let mut used = slab_bytes; // start a load with the first part
        let mut n = 0usize;
        let mut total_bytes = 0u64;
        for i in order {
            let r = requests[i];
            let first = n;
            let mut done = 0u64;
            while done < r.nbytes {
                if used == slab_bytes {
                    loads.push((n, Vec::new()));
                    used = 0;
                }
                let len = (r.nbytes - done).min((slab_bytes - used) as u64) as usize;
                let load = &mut loads.last_mut().expect("a load").1;
                load.push(Part {
                    slab_off: used,
                    len,
                    src: r.src + done,
                    file_offset: r.file_offset + done,
                });
                used += len;
                done += len as u64;
                n += 1;
            }
            parts_of[i] = first..n;
            total_bytes += r.nbytes;
        }
        Loads {
            loads,
            parts_of,
            parts: n,
            total_bytes,
        }
    }
}

/// Total bytes `requests` write (what progress counts to).
pub(crate) fn total_bytes(requests: &[WriteRequest]) -> u64 {
    requests.iter().map(|r| r.nbytes).sum()
}

/// What a writer hands back: the slab it wrote from, the load, each part's CRC32.
type Written = Result<(usize, usize, Vec<u32>)>;

/// Writes each request's source bytes to `file` through the staging `slabs`, with
/// `writers` writer threads. Returns the outcome and, when done, the CRC32 of each
/// request's bytes (in request order; 0 for an empty request). `what` names the file in
/// errors. However it ends, every copy queued on `drain` has completed and the writers
/// have stopped on return.
///
/// # Safety
/// Each slab must be valid for reads and writes of `slabs.bytes` bytes and used by
/// nothing else during the call; every request's source must be valid for `drain` and
/// written by nothing else until this returns.
// A blocking lock (clippy.toml): the writers' shared job queue, taken by writer threads
// only (never attached to Python) for one receive.
#[allow(clippy::disallowed_types)]
pub(crate) unsafe fn run_writeback<D: Drain>(
    drain: &mut D,
    file: &File,
    what: &Path,
    requests: &[WriteRequest],
    slabs: Slabs<'_>,
    writers: usize,
    reporter: &mut Reporter<'_>,
) -> Result<(Outcome, Vec<u32>)> {
    let plan = Loads::new(requests, slabs.bytes);
    debug_assert_eq!(plan.total_bytes, total_bytes(requests));
    let n_loads = plan.loads.len();
    let mut crcs = vec![0u32; plan.parts];
    let stop = AtomicBool::new(false);
    let (job_tx, job_rx) = mpsc::channel::<(usize, usize)>();
    // A blocking lock (clippy.toml), taken by the writer threads only, which never attach
    // to Python (the copy runs inside run_copy's `py.detach`).
    #[allow(clippy::disallowed_types)]
    let job_rx = std::sync::Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<Written>();
    let writers = writers
        .clamp(1, slabs.ptrs.len().max(1))
        .min(n_loads.max(1));

    let outcome = std::thread::scope(|s| {
        for _ in 0..if n_loads == 0 { 0 } else { writers } {
            let (done_tx, job_rx, stop, plan) = (done_tx.clone(), &job_rx, &stop, &plan);
            let ptrs = slabs.ptrs;
            s.spawn(move || loop {
                let job = job_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((slab, load)) = job else { break };
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = catch_unwind(AssertUnwindSafe(|| {
                    write_load(file, what, ptrs[slab], &plan.loads[load].1)
                }))
                .unwrap_or_else(|p| {
                    Err(Error::Internal(format!(
                        "a writer thread panicked: {}",
                        panic_message(p.as_ref())
                    )))
                });
                let failed = r.is_err();
                if done_tx.send(r.map(|c| (slab, load, c))).is_err() || failed {
                    break;
                }
            });
        }
        drop(done_tx);

        let mut free: Vec<usize> = (0..slabs.ptrs.len()).rev().collect();
        let mut inflight: VecDeque<(usize, usize)> = VecDeque::new();
        let mut next = 0usize;
        let mut written = 0usize;
        let mut at_writers = 0usize;
        let mut finish = |msg: Written,
                          free: &mut Vec<usize>,
                          at_writers: &mut usize,
                          written: &mut usize|
         -> Result<bool> {
            let (slab, load, part_crcs) = msg?;
            free.push(slab);
            *at_writers -= 1;
            *written += 1;
            let (first, parts) = &plan.loads[load];
            crcs[*first..*first + parts.len()].copy_from_slice(&part_crcs);
            Ok(reporter.add(parts.iter().map(|p| p.len as u64).sum()))
        };
        let mut run = || -> Result<Outcome> {
            loop {
                // Slabs the writers are done with.
                while let Ok(msg) = done_rx.try_recv() {
                    if !finish(msg, &mut free, &mut at_writers, &mut written)? {
                        return Ok(Outcome::Cancelled);
                    }
                }
                if written == n_loads {
                    return Ok(Outcome::Done);
                }
                // Loads whose copies completed go to the writers, oldest first.
                while let Some(&(slab, load)) = inflight.front() {
                    if !drain.is_done(slab)? {
                        break;
                    }
                    inflight.pop_front();
                    job_tx.send((slab, load)).map_err(|_| gone())?;
                    at_writers += 1;
                }
                // The next load into a free slab.
                if next < n_loads {
                    if let Some(slab) = free.pop() {
                        let base = slabs.ptrs[slab];
                        for p in &plan.loads[next].1 {
                            // SAFETY: the part lies in the slab (`slab_off + len <=
                            // slabs.bytes`, by construction of `Loads`); the slab is ours
                            // until its marker completes and a writer gives it back; the
                            // source per this function's contract.
                            unsafe {
                                drain.copy_out((base + p.slab_off) as *mut u8, p.src, p.len)
                            }?;
                        }
                        drain.record(slab)?;
                        inflight.push_back((slab, next));
                        next += 1;
                        continue;
                    }
                }
                // Nothing to queue: wait for the oldest copy, else for a writer.
                if let Some(&(slab, _)) = inflight.front() {
                    drain.wait(slab)?;
                } else {
                    debug_assert!(at_writers > 0);
                    let msg = done_rx.recv().map_err(|_| gone())?;
                    if !finish(msg, &mut free, &mut at_writers, &mut written)? {
                        return Ok(Outcome::Cancelled);
                    }
                }
            }
        };
        let r = run();
        // Stop the writers (they finish the part they are writing and leave), then wait
        // for every queued copy, whatever happened; the scope joins the writers.
        stop.store(true, Ordering::Relaxed);
        drop(job_tx);
        let synced = drain.synchronize();
        let out = r?;
        synced?;
        Ok::<Outcome, Error>(out)
    })?;
    if outcome == Outcome::Cancelled {
        return Ok((outcome, Vec::new()));
    }
    let per_request = plan
        .parts_of
        .iter()
        .zip(requests)
        .map(|(parts, r)| {
            let mut h = crc32fast::Hasher::new();
            let mut left = r.nbytes;
            for i in parts.clone() {
                let len = part_len(&plan, i).min(left);
                left -= len;
                h.combine(&crc32fast::Hasher::new_with_initial_len(crcs[i], len));
            }
            h.finalize()
        })
        .collect();
    Ok((outcome, per_request))
}

/// The length of part number `i`.
fn part_len(plan: &Loads, i: usize) -> u64 {
    let k = plan.loads.partition_point(|(first, _)| *first <= i) - 1;
    let (first, parts) = &plan.loads[k];
    parts[i - first].len as u64
}

fn gone() -> Error {
    Error::Internal("the writer threads stopped before writing every load".into())
}

/// Writes each part of a load from the slab at `base` and returns each part's CRC32.
fn write_load(file: &File, what: &Path, base: usize, parts: &[Part]) -> Result<Vec<u32>> {
    parts
        .iter()
        .map(|p| {
            // SAFETY: the slab was handed to this writer alone after its copies completed
            // (the coordinator saw its marker), it stays alive until `run_writeback`
            // returns, and the part lies inside it.
            let buf =
                unsafe { std::slice::from_raw_parts((base + p.slab_off) as *const u8, p.len) };
            fileio::write_all_at(file, buf, p.file_offset).map_err(|e| Error::io(what, e))?;
            Ok(crc32fast::hash(buf))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::PROGRESS_STEP;

    /// A stand-in for a CUDA stream, copying from host "sources": copies queue up and run
    /// only when a marker is waited for (or now and then polled), in order; a slab's bytes
    /// are scribbled over when a copy into it is queued, so a writer that wrote a slab
    /// before its copies ran would write the scribble, not the data.
    struct FakeDrain {
        ops: VecDeque<(usize, u64, usize, u64)>, // (dst, src, len, mark; 0 = a copy)
        seq: u64,
        done: u64,
        last: Vec<u64>,
        polls: u64,
        fail_at: Option<usize>,
        copies: usize,
    }

    impl FakeDrain {
        fn new(slabs: usize) -> FakeDrain {
            FakeDrain {
                ops: VecDeque::new(),
                seq: 0,
                done: 0,
                last: vec![0; slabs],
                polls: 0,
                fail_at: None,
                copies: 0,
            }
        }

        fn run_through(&mut self, seq: u64) {
            while self.done < seq {
                let (dst, src, len, mark) = self.ops.pop_front().expect("queued");
                if mark > 0 {
                    self.done = mark;
                } else {
                    // SAFETY: test buffers: `src` in a live source Vec, `dst` in a live
                    // slab; they never overlap.
                    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
                }
            }
        }
    }

    impl Stage for FakeDrain {
        unsafe fn copy(&mut self, _dest: u64, _src: *const u8, _len: usize) -> Result<()> {
            unreachable!("a drain only copies out")
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

    impl Drain for FakeDrain {
        unsafe fn copy_out(&mut self, dst: *mut u8, src: u64, len: usize) -> Result<()> {
            self.copies += 1;
            if self.fail_at == Some(self.copies) {
                return Err(Error::Internal("copy failed".into()));
            }
            // SAFETY: `dst` holds `len` bytes of a live test slab.
            unsafe { std::ptr::write_bytes(dst, 0xdb, len) };
            self.ops.push_back((dst as usize, src, len, 0));
            Ok(())
        }
    }

    type Run = (Result<(Outcome, Vec<u32>)>, Vec<u8>, Vec<(u64, u64)>);

    /// Writes `ranges` `(offset in data, len, file offset)` of `data` through the fake
    /// drain; returns the result, the file and the progress calls.
    fn run_fake(
        data: &[u8],
        ranges: &[(usize, usize, u64)],
        slab_bytes: usize,
        n_slabs: usize,
        writers: usize,
        cancel_after: Option<usize>,
        fail_at: Option<usize>,
    ) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        let file = File::create(&path).unwrap();
        let reqs: Vec<WriteRequest> = ranges
            .iter()
            .map(|&(at, len, file_offset)| WriteRequest {
                src: data[at..].as_ptr() as u64,
                nbytes: len as u64,
                file_offset,
            })
            .collect();
        let mut backing: Vec<Vec<u8>> = (0..n_slabs).map(|_| vec![0u8; slab_bytes]).collect();
        let ptrs: Vec<usize> = backing
            .iter_mut()
            .map(|b| b.as_mut_ptr() as usize)
            .collect();
        let mut calls = Vec::new();
        let mut cb = |d: u64, t: u64| {
            calls.push((d, t));
            cancel_after.is_none_or(|n| calls.len() <= n)
        };
        let mut reporter = Reporter::start(&mut cb, total_bytes(&reqs)).unwrap();
        let mut drain = FakeDrain::new(n_slabs);
        drain.fail_at = fail_at;
        // SAFETY: slabs are live Vecs of `slab_bytes`, private to the call; sources are
        // slices of `data`, alive and unchanged.
        let r = unsafe {
            run_writeback(
                &mut drain,
                &file,
                &path,
                &reqs,
                Slabs {
                    ptrs: &ptrs,
                    bytes: slab_bytes,
                },
                writers,
                &mut reporter,
            )
        };
        assert!(drain.ops.is_empty(), "copies left queued after return");
        drop(backing);
        let got = std::fs::read(&path).unwrap();
        (r, got, calls)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn every_byte_lands_at_its_offset_with_its_crc() {
        let d = data(3 * 1024 * 1024 + 999);
        // (source offset, length, file offset): out of file order, sizes from 0 bytes to
        // several slabs, gaps between records, the same source bytes written twice.
        let ranges = [
            (5, 300_000, 1_100_000),
            (0, 100, 0),
            (100, 0, 64),
            (70_200, 1_000_000, 2_000_000),
            (1, 1, 128),
            (2 * 1024 * 1024, 1024 * 1024 + 999, 200),
            (5, 300_000, 3_100_000),
        ];
        let end = ranges.iter().map(|r| r.2 + r.1 as u64).max().unwrap() as usize;
        for &(slab, n_slabs, writers) in &[(64 << 10, 2, 1), (64 << 10, 4, 3), (1 << 20, 8, 8)] {
            let (r, got, calls) = run_fake(&d, &ranges, slab, n_slabs, writers, None, None);
            let (out, crcs) = r.unwrap();
            assert_eq!(out, Outcome::Done);
            assert_eq!(got.len(), end);
            for (&(at, len, off), crc) in ranges.iter().zip(&crcs) {
                let want = &d[at..at + len];
                assert!(
                    got[off as usize..off as usize + len] == *want,
                    "range {at}+{len}"
                );
                assert_eq!(*crc, crc32fast::hash(want), "crc of {at}+{len}");
            }
            let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
            assert_eq!(calls.first(), Some(&(0, total)));
            assert_eq!(calls.last(), Some(&(total, total)));
        }
    }

    #[test]
    fn a_failing_copy_or_a_cancel_ends_cleanly() {
        let d = data(8 * PROGRESS_STEP as usize);
        let ranges = [(0usize, d.len(), 0u64)];
        for fail_at in [1, 2, 7] {
            let (r, _, _) = run_fake(&d, &ranges, 1 << 20, 3, 2, None, Some(fail_at));
            assert!(r.unwrap_err().to_string().contains("copy failed"));
        }
        let (r, _, calls) = run_fake(&d, &ranges, 1 << 20, 3, 2, Some(2), None);
        assert_eq!(r.unwrap().0, Outcome::Cancelled);
        assert!(calls.len() <= 3, "{calls:?}");
    }

    #[test]
    fn a_failing_write_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.bin");
        std::fs::write(&path, b"x").unwrap();
        let file = File::open(&path).unwrap(); // read-only: writes fail
        let d = data(4096);
        let reqs = [WriteRequest {
            src: d.as_ptr() as u64,
            nbytes: 4096,
            file_offset: 0,
        }];
        let mut slab = vec![0u8; 1 << 16];
        let ptrs = [slab.as_mut_ptr() as usize];
        let mut cb = |_, _| true;
        let mut reporter = Reporter::start(&mut cb, 4096).unwrap();
        let mut drain = FakeDrain::new(1);
        // SAFETY: as in `run_fake`.
        let r = unsafe {
            run_writeback(
                &mut drain,
                &file,
                &path,
                &reqs,
                Slabs {
                    ptrs: &ptrs,
                    bytes: 1 << 16,
                },
                2,
                &mut reporter,
            )
        };
        let e = r.unwrap_err();
        assert!(e.to_string().contains("ro.bin"), "{e}");
        assert!(drain.ops.is_empty());
    }
}
