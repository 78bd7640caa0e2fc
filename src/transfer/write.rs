//! Host memory -> file: the write half of the copy engine (`zeroload.save`).
//!
//! Each request names a host byte range and the file offset it goes to. Requests are
//! taken in file order and cut into units of work: a large range is split into pieces
//! of [`PIECE`] bytes, neighbouring small ranges are grouped into one unit, and ranges
//! that touch in the file go out with one `pwritev` (a zip record's local header and its
//! data, say).
//!
//! One thread writes, in file order. A buffered write into one file holds the file's
//! inode lock while it copies into the page cache (ext4, XFS and btrfs alike), so a second
//! writer thread only waits for it: on the 2-CPU VM of benchmarks/RESULTS.md two writers
//! took 2-5x the time of one (0.7 GB into the page cache: 0.36-1.2 s vs 0.15-0.21 s). The
//! disk works in parallel anyway: the kernel's writeback starts on its own once dirty
//! pages pass its background threshold. (Starting each unit's writeback ourselves with
//! `sync_file_range`, and waiting for the one 64 MiB back, was tried: no faster to a
//! durable file there, and slower in more runs.)
//!
//! With `crc`, other threads compute the CRC-32 of each unit's pieces meanwhile (crc32fast,
//! SIMD; running ahead of the writer, they also fault in sources that are cold file
//! mappings before the writer reaches them), and the pieces of a request are combined in
//! order: the zip records' checksums cost no second pass over the data.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::pipeline::{default_threads, Claims, Reporter};
use super::{Outcome, ProgressFn};
use crate::error::{Error, Result};
use crate::fileio::{self, WriteBuf};

/// Bytes of one unit of work: the size a large range is cut into, and what small ranges
/// are grouped up to.
pub const PIECE: u64 = 8 << 20;

/// Most ranges in one unit (a unit of tiny ranges is still one `pwritev` per run).
const MAX_SEGMENTS: usize = 1024;

/// `nbytes` bytes at host address `src` go to `file_offset` of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteRequest {
    pub src: usize,
    pub nbytes: u64,
    pub file_offset: u64,
}

/// A piece of one request: `len` bytes from byte `start` of request `req`.
#[derive(Clone, Copy, Debug)]
struct Segment {
    req: usize,
    start: u64,
    len: u64,
}

/// Units of work: `(first, end)` ranges of the segment list.
type Units = Vec<(usize, usize)>;

/// The segments of `reqs` in file order, and the units (ranges of segments) that the
/// threads claim. Refuses requests whose file ranges overlap or overflow.
fn plan_units(path: &Path, reqs: &[WriteRequest]) -> Result<(Vec<Segment>, Units)> {
    let mut order: Vec<usize> = (0..reqs.len()).filter(|&i| reqs[i].nbytes > 0).collect();
    order.sort_by_key(|&i| reqs[i].file_offset);
    let mut end_of_last = 0u64;
    for &i in &order {
        let r = reqs[i];
        let end = r.file_offset.checked_add(r.nbytes).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: write of {} bytes at byte {} runs past the largest file offset",
                path.display(),
                r.nbytes,
                r.file_offset
            ))
        })?;
        if r.file_offset < end_of_last {
            return Err(Error::InvalidArgument(format!(
                "{}: write request #{i} (bytes {}..{end}) overlaps another",
                path.display(),
                r.file_offset
            )));
        }
        end_of_last = end;
    }
    let mut segments = Vec::new();
    let mut units = Vec::new();
    let (mut unit_start, mut unit_bytes) = (0usize, 0u64);
    for &i in &order {
        let n = reqs[i].nbytes;
        if n > PIECE {
            if unit_start < segments.len() {
                units.push((unit_start, segments.len()));
            }
            let mut start = 0;
            while start < n {
                let len = PIECE.min(n - start);
                units.push((segments.len(), segments.len() + 1));
                segments.push(Segment { req: i, start, len });
                start += len;
            }
            unit_start = segments.len();
            unit_bytes = 0;
            continue;
        }
        segments.push(Segment {
            req: i,
            start: 0,
            len: n,
        });
        unit_bytes += n;
        if unit_bytes >= PIECE || segments.len() - unit_start >= MAX_SEGMENTS {
            units.push((unit_start, segments.len()));
            unit_start = segments.len();
            unit_bytes = 0;
        }
    }
    if unit_start < segments.len() {
        units.push((unit_start, segments.len()));
    }
    Ok((segments, units))
}

/// Writes every request's bytes to `file` (named `path` in errors), reporting progress
/// through `cb` on the calling thread, which does every write, in file order (see the
/// module docs for why one writer). With `crc`, `threads - 1` more threads (default: the
/// machine's parallelism, at most 8) compute the CRC-32s meanwhile. Returns the outcome
/// and, with `crc`, the CRC-32 of each request's bytes (in request order; empty
/// otherwise). A cancelled or failed write leaves the file partly written: the caller
/// writes to a temporary file and discards it.
///
/// # Safety
/// Each request's `src` must be valid for reads of `nbytes` bytes until the call returns.
/// The bytes are read by the OS (`pwrite`) and, with `crc`, by this function; another
/// thread writing them meanwhile makes the file (and its CRC) hold a mix of old and new
/// values, as with `torch.save`, so callers must not change them during the call.
pub unsafe fn write_from_host(
    file: &File,
    path: &Path,
    reqs: &[WriteRequest],
    crc: bool,
    threads: Option<usize>,
    cb: ProgressFn<'_>,
) -> Result<(Outcome, Vec<u32>)> {
    let (segments, units) = plan_units(path, reqs)?;
    let total: u64 = segments.iter().map(|s| s.len).sum();
    let Some(mut reporter) = Reporter::start(cb, total) else {
        return Ok((Outcome::Cancelled, Vec::new()));
    };
    let ptr = |s: &Segment| (reqs[s.req].src as *const u8).wrapping_add(s.start as usize);
    let crcs: Vec<AtomicU32> = if crc {
        segments.iter().map(|_| AtomicU32::new(0)).collect()
    } else {
        Vec::new()
    };
    // Each unit's CRCs are computed once, by whichever thread takes the unit first.
    let crc_taken: Vec<AtomicBool> = if crc {
        units.iter().map(|_| AtomicBool::new(false)).collect()
    } else {
        Vec::new()
    };
    let crc_unit = |u: usize| {
        if crc_taken[u].swap(true, Ordering::Relaxed) {
            return;
        }
        let (first, last) = units[u];
        for (k, s) in segments[first..last].iter().enumerate() {
            // SAFETY: the segment lies inside its request's source, valid for reads of
            // `nbytes` bytes until the call returns (caller's contract).
            let bytes = unsafe { std::slice::from_raw_parts(ptr(s), s.len as usize) };
            crcs[first + k].store(crc32fast::hash(bytes), Ordering::Relaxed);
        }
    };
    let max_bufs = fileio::max_read_bufs();
    let write_unit = |u: usize| -> Result<u64> {
        let (first, last) = units[u];
        let segs = &segments[first..last];
        // Runs of segments that touch in the file: one vectored write each.
        let mut k = 0;
        let mut bufs = Vec::new();
        while k < segs.len() {
            let at = reqs[segs[k].req].file_offset + segs[k].start;
            let mut end = at;
            bufs.clear();
            while k < segs.len()
                && bufs.len() < max_bufs
                && reqs[segs[k].req].file_offset + segs[k].start == end
            {
                bufs.push(WriteBuf::new(ptr(&segs[k]), segs[k].len as usize));
                end += segs[k].len;
                k += 1;
            }
            debug_assert!(!bufs.iter().any(WriteBuf::is_empty));
            let written = if let [one] = &bufs[..] {
                // SAFETY: a segment of a request's source (see `crc_unit`).
                let bytes = unsafe { std::slice::from_raw_parts(one.base(), one.len()) };
                fileio::write_all_at(file, bytes, at)
            } else {
                // SAFETY: each buffer is a segment of a request's source (see `crc_unit`).
                unsafe { fileio::write_all_vectored_at(file, &bufs, at) }
            };
            written.map_err(|e| Error::io(path, e))?;
        }
        Ok(segs.iter().map(|s| s.len).sum())
    };
    let helpers = if crc && units.len() > 1 {
        threads.unwrap_or_else(default_threads).max(1) - 1
    } else {
        0
    };
    let claims = Claims::new(units.len());
    let outcome = std::thread::scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|| {
                while let Some(u) = claims.claim() {
                    crc_unit(u);
                }
            });
        }
        let mut write_all = || -> Result<Outcome> {
            for u in 0..units.len() {
                if crc && helpers == 0 {
                    crc_unit(u); // while the unit's bytes are in the CPU's caches
                }
                if !reporter.add(write_unit(u)?) {
                    return Ok(Outcome::Cancelled);
                }
            }
            // Any CRCs the helpers have not reached yet (the helpers go on meanwhile).
            if crc {
                (0..units.len()).for_each(crc_unit);
            }
            Ok(Outcome::Done)
        };
        let r = write_all();
        if !matches!(r, Ok(Outcome::Done)) {
            claims.stop(); // the scope joins the helpers: they stop claiming first
        }
        r
    })?;
    if outcome != Outcome::Done || !crc {
        return Ok((outcome, Vec::new()));
    }
    // Combine each request's pieces in order (segments of a request are consecutive).
    let mut out: Vec<Option<crc32fast::Hasher>> = vec![None; reqs.len()];
    for (s, c) in segments.iter().zip(&crcs) {
        let piece = crc32fast::Hasher::new_with_initial_len(c.load(Ordering::Relaxed), s.len);
        match &mut out[s.req] {
            Some(h) => h.combine(&piece),
            slot => *slot = Some(piece),
        }
    }
    let crcs = out
        .into_iter()
        .map(|h| h.map_or(0, crc32fast::Hasher::finalize))
        .collect();
    Ok((outcome, crcs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(reqs: &[WriteRequest], threads: usize) -> (Vec<u8>, Vec<u32>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut calls = Vec::new();
        let mut cb = |done: u64, total: u64| {
            calls.push((done, total));
            true
        };
        // SAFETY: the tests' sources are live vectors of at least `nbytes` bytes.
        let (outcome, crcs) =
            unsafe { write_from_host(&file, &path, reqs, true, Some(threads), &mut cb) }.unwrap();
        assert_eq!(outcome, Outcome::Done);
        let total: u64 = reqs.iter().map(|r| r.nbytes).sum();
        assert_eq!(calls.first(), Some(&(0, total)));
        assert_eq!(calls.last(), Some(&(total, total)));
        (std::fs::read(&path).unwrap(), crcs)
    }

    #[test]
    fn large_and_small_ranges_land_where_asked_with_their_crcs() {
        let big: Vec<u8> = (0..(3 * PIECE + 12345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let small: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 256) as u8; (i % 7) as usize])
            .collect();
        let mut reqs = Vec::new();
        let mut expect = Vec::new();
        let mut at = 0u64;
        for s in &small {
            reqs.push(WriteRequest {
                src: s.as_ptr() as usize,
                nbytes: s.len() as u64,
                file_offset: at,
            });
            expect.extend_from_slice(s);
            at += s.len() as u64;
            expect.extend_from_slice(&[0, 0, 0]); // a hole between ranges
            at += 3;
        }
        reqs.push(WriteRequest {
            src: big.as_ptr() as usize,
            nbytes: big.len() as u64,
            file_offset: at,
        });
        expect.extend_from_slice(&big);
        reqs.reverse(); // request order does not matter
        for threads in [1, 4] {
            let (got, crcs) = write(&reqs, threads);
            assert_eq!(got, expect);
            assert_eq!(crcs[0], crc32fast::hash(&big));
            for (r, c) in reqs.iter().zip(&crcs) {
                // SAFETY: each request is a live vector above.
                let bytes =
                    unsafe { std::slice::from_raw_parts(r.src as *const u8, r.nbytes as usize) };
                assert_eq!(*c, crc32fast::hash(bytes));
            }
        }
    }

    #[test]
    fn overlapping_requests_are_refused_before_writing() {
        let a = [1u8; 10];
        let reqs = [
            WriteRequest {
                src: a.as_ptr() as usize,
                nbytes: 10,
                file_offset: 0,
            },
            WriteRequest {
                src: a.as_ptr() as usize,
                nbytes: 10,
                file_offset: 5,
            },
        ];
        let e = plan_units(Path::new("f"), &reqs).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }

    #[test]
    fn a_cancelled_write_reports_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create(&path).unwrap();
        let a = [1u8; 100];
        let reqs = [WriteRequest {
            src: a.as_ptr() as usize,
            nbytes: 100,
            file_offset: 0,
        }];
        let mut cb = |_: u64, _: u64| false;
        // SAFETY: a live vector of 100 bytes.
        let (outcome, crcs) =
            unsafe { write_from_host(&file, &path, &reqs, true, None, &mut cb) }.unwrap();
        assert_eq!(outcome, Outcome::Cancelled);
        assert!(crcs.is_empty());
    }
}
