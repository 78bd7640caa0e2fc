//! Copy engine: a plan of `(file range -> destination)` copies executed by a sink.
//!
//! - [`plan`]: requests sorted by file offset, coalesced into bounded reads that know where
//!   each of their bytes goes. Pure arithmetic, fully checked.
//! - [`slice`]: a rectangle of a strided tensor (a DTensor shard, a slice) as the fewest
//!   contiguous byte runs; they become copy requests like any other.
//! - [`host`]: worker threads `pread` straight into destination host memory (existing CPU
//!   tensors: `load_into` on a materialised module); reads coalesced across small gaps
//!   scatter with one `preadv`, the gaps going to a scratch buffer.
//! - [`cuda`]: reader threads `pread` into a process-wide ring of pinned host slabs, each
//!   full slab goes to the GPU with an async copy on a non-blocking stream, an event per
//!   slab recycles it; one synchronisation at the end.
//!
//! Both sinks read with `pread` (never through the mmap: a file truncated under us is an
//! error, not a SIGBUS, and DMA never has to fault pages in) and report progress through
//! a callback on the calling thread only, which may cancel the copy.

pub mod cuda;
pub mod host;
pub mod plan;
pub mod slice;

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

pub use plan::{Chunk, CopyRequest, Piece, Plan, PlanOptions};

use crate::error::{Error, Result};

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

/// Reads exactly `len` bytes at `offset` of `file` into `dst` with `pread`, retrying on
/// `EINTR` and short reads. A file shorter than `offset + len` is reported as truncated.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes, and nothing else may read or write them
/// during the call. The bytes need not be initialised.
pub(crate) unsafe fn pread_exact(
    file: &File,
    path: &Path,
    dst: *mut u8,
    len: usize,
    offset: u64,
) -> Result<()> {
    // SAFETY: forwarded contract.
    unsafe { pread_at_least(file, path, dst, len, offset, len) }.map(|_| ())
}

/// Reads up to `cap` bytes at `offset` of `file` into `dst` with `pread`, retrying on
/// `EINTR` and short reads until at least `need` bytes (`need <= cap`) are in; returns how
/// many were read. End of file before `need` bytes is reported as truncation; after them
/// it just ends the read (an `O_DIRECT` read of a whole aligned span may run past it).
/// Each `pread` after the first starts where the previous one ended, so with `O_DIRECT`
/// an aligned `dst`, `offset` and `cap` keep every read aligned.
///
/// # Safety
/// `dst` must be valid for writes of `cap` bytes, and nothing else may read or write them
/// during the call. The bytes need not be initialised.
pub(crate) unsafe fn pread_at_least(
    file: &File,
    path: &Path,
    dst: *mut u8,
    cap: usize,
    offset: u64,
    need: usize,
) -> Result<usize> {
    debug_assert!(need <= cap);
    let fd = file.as_raw_fd();
    let mut done = 0usize;
    while done < need {
        let want = (cap - done).min(1 << 30);
        let at = offset + done as u64;
        let Ok(at_off) = libc::off_t::try_from(at) else {
            return Err(Error::InvalidArgument(format!(
                "{}: offset {at} is too large",
                path.display()
            )));
        };
        // SAFETY: `dst + done .. dst + done + want` lies inside the caller's buffer (valid
        // for writes of `cap` bytes, exclusively ours for the call); pread writes at most
        // `want` bytes there.
        let n = unsafe { libc::pread(fd, dst.add(done).cast(), want, at_off) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io(path, e));
        }
        if n == 0 {
            return Err(truncated(path, offset + need as u64));
        }
        done += n as usize;
    }
    Ok(done)
}

pub(crate) fn truncated(path: &Path, end: u64) -> Error {
    Error::malformed(
        path,
        "file",
        format!("file ended before byte {end} (was it truncated while loading?)"),
    )
}

/// Environment variable that sets the CUDA staging budget in bytes (plain integer, or with
/// a `K`/`M`/`G` suffix, powers of 1024).
pub const STAGING_ENV: &str = "ZEROLOAD_STAGING_BYTES";

/// Default pinned staging budget for CUDA copies.
pub const DEFAULT_STAGING_BYTES: u64 = 256 << 20;

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
    fn pread_exact_reads_and_reports_truncation() {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"hello world").unwrap();
        let file = f.reopen().unwrap();
        let mut buf = [0u8; 5];
        // SAFETY: `buf` is a live local array of 5 bytes.
        unsafe { pread_exact(&file, f.path(), buf.as_mut_ptr(), 5, 6) }.unwrap();
        assert_eq!(&buf, b"world");
        // SAFETY: as above.
        let e = unsafe { pread_exact(&file, f.path(), buf.as_mut_ptr(), 5, 8) }.unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
