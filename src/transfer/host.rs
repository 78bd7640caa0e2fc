//! Host sink: worker threads `pread` file bytes straight into existing host memory.
//!
//! Every piece of the plan is read directly into its destination (no staging buffer, no
//! intermediate tensor), so a materialised CPU module is filled in place. The plan is built
//! without gaps (`max_gap = 0`); its chunks are just units of work for the threads and of
//! progress.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use super::{pread_exact, CopyRequest, Outcome, Plan, PlanOptions, ProgressFn, Reporter};
use crate::error::Result;
use crate::mapping::Mapping;

/// Largest unit of work for one thread.
const HOST_CHUNK: u64 = 16 << 20;

/// Default number of reader threads: the machine's parallelism, at most 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
}

/// Copies each request's file bytes to its destination host address.
///
/// Requests are checked before anything is written: ranges must lie inside the file and
/// destinations must not overlap (exact duplicates are copied once). With `threads` > 1
/// the copies run on that many scoped threads; `progress` is called on the calling thread
/// only, and returning `false` from it stops the copy (`Outcome::Cancelled`; destinations
/// then hold partial data). On error, destinations may likewise hold partial data.
///
/// # Safety
/// For every request, `dest .. dest + nbytes` must be memory valid for writes for the whole
/// call (for example the storage of a live tensor that the caller keeps alive), and nothing
/// else may read or write it until this function returns. Its previous contents do not
/// matter and need not be initialised.
pub unsafe fn copy_to_host(
    mapping: &Mapping,
    requests: &[CopyRequest],
    threads: Option<usize>,
    progress: ProgressFn<'_>,
) -> Result<Outcome> {
    let path = mapping.path();
    let plan = Plan::new(
        requests,
        mapping.len(),
        PlanOptions {
            max_chunk: HOST_CHUNK,
            max_gap: 0,
        },
        &path.display().to_string(),
    )?;
    let Some(mut reporter) = Reporter::start(progress, plan.total_bytes) else {
        return Ok(Outcome::Cancelled);
    };
    let threads = threads
        .unwrap_or_else(default_threads)
        .clamp(1, 64)
        .min(plan.chunks.len());
    let file = mapping.file();

    let run_chunk = |i: usize| -> Result<u64> {
        let c = &plan.chunks[i];
        for p in &c.pieces {
            // SAFETY: the piece is part of one request (the plan only splits requests),
            // so `p.dest .. p.dest + p.len` lies inside a destination the caller vouched
            // for; destinations are pairwise disjoint (checked by the plan) and each piece
            // is read by exactly one thread, so no two writers touch the same bytes.
            unsafe {
                pread_exact(
                    file,
                    path,
                    p.dest as *mut u8,
                    p.len as usize,
                    c.file_offset + p.offset,
                )
            }?;
        }
        Ok(c.delivered())
    };

    if threads <= 1 {
        for i in 0..plan.chunks.len() {
            let n = run_chunk(i)?;
            if !reporter.add(n) {
                return Ok(Outcome::Cancelled);
            }
        }
        return Ok(Outcome::Done);
    }

    let n_chunks = plan.chunks.len();
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Result<u64>>();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, abort, run_chunk) = (&next, &abort, &run_chunk);
            s.spawn(move || {
                while !abort.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n_chunks {
                        break;
                    }
                    let r = run_chunk(i);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        // Stop the workers however this scope is left (error, cancel, panic).
        let _stop = SetOnDrop(&abort);
        let mut outcome = Ok(Outcome::Done);
        for msg in rx {
            match msg {
                Ok(n) => {
                    if !reporter.add(n) {
                        abort.store(true, Ordering::Relaxed);
                        outcome = Ok(Outcome::Cancelled);
                        break;
                    }
                }
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    outcome = Err(e);
                    break;
                }
            }
        }
        outcome
    })
}

/// Sets the flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
