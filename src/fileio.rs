//! Positional reads of a file: the one place that reads a checkpoint's bytes, and the one
//! place that knows how each OS does it.
//!
//! Unix: `pread` and `preadv`. Windows: `ReadFile` at an offset. Windows has no vectored
//! read of cached files (`ReadFileScatter` wants unbuffered, page-sized buffers), so there
//! a vector is read one buffer at a time. Linux also reads around the page cache
//! (`O_DIRECT`, [`Source`]); elsewhere such a read falls back to a buffered one.
//!
//! Every read names its offset. Nothing here uses a descriptor's file position, so one
//! descriptor serves any number of threads at once. (On Windows a positional read also
//! moves the position, which nothing reads.)
//!
//! Two levels: the system calls ([`read_at_raw`], [`read_vectored_at`]: one call, may
//! read less, `io::Result`) and the reads the loaders use, which retry interrupted and
//! short reads in the one loop here and call a file that ends early truncated, naming it
//! ([`read_exact_at`], [`read_at_least`], [`read_vectored_exact`], [`Source::read_into`]).
//! Nothing reads through the mmap, so a file truncated under us is an error, not a SIGBUS.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One buffer of a vectored read: `len` writable bytes at `base`. On Unix it is a
/// `struct iovec`, handed to `preadv` as is.
#[cfg(unix)]
#[repr(transparent)]
pub struct ReadBuf(libc::iovec);

/// One buffer of a vectored read: `len` writable bytes at `base`.
#[cfg(windows)]
pub struct ReadBuf {
    base: *mut u8,
    len: usize,
}

impl ReadBuf {
    /// A buffer of `len` bytes at `base`. Nothing is read or written here: the unsafe
    /// reads that take it state what it must point to.
    pub fn new(base: *mut u8, len: usize) -> ReadBuf {
        #[cfg(unix)]
        return ReadBuf(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
        #[cfg(windows)]
        return ReadBuf { base, len };
    }

    pub fn base(&self) -> *mut u8 {
        #[cfg(unix)]
        return self.0.iov_base.cast();
        #[cfg(windows)]
        return self.base;
    }

    pub fn len(&self) -> usize {
        #[cfg(unix)]
        return self.0.iov_len;
        #[cfg(windows)]
        return self.len;
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the first `n` bytes (`n <= len`), after a read filled them.
    pub fn advance(&mut self, n: usize) {
        assert!(n <= self.len(), "advance past the end of a read buffer");
        // `wrapping_add` because the address is only ever handed to the OS: it stays
        // inside (or one past) the same buffer since `n <= len`.
        *self = ReadBuf::new(self.base().wrapping_add(n), self.len() - n);
    }
}

/// Whether `read_vectored_at` fills all its buffers with one system call (Unix). Where it
/// does not (Windows), reading a hole between two wanted ranges costs a call of its own.
pub const VECTORED_READS: bool = cfg!(unix);

/// Most buffers one `read_vectored_at` takes.
pub fn max_read_bufs() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads a system limit.
        let n = unsafe { libc::sysconf(libc::_SC_IOV_MAX) };
        usize::try_from(n).unwrap_or(16).clamp(16, 1024)
    }
    #[cfg(windows)]
    {
        1024 // read one at a time: any number would do, this bounds the caller's vector
    }
}

/// The most bytes one read asks for (Windows' `ReadFile` counts in `u32`; Linux stops
/// just short of 2 GiB anyway).
const MAX_READ: usize = 1 << 30;

/// Reads up to `len` bytes (at most 1 GiB) of `file` at `offset` into `dst`, with one
/// system call: `Ok(0)` only at the end of the file, and possibly fewer bytes than asked
/// for otherwise. Unix may fail with `Interrupted`: the caller retries.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes, and nothing else may read or write them
/// during the call. They need not be initialised.
pub unsafe fn read_at_raw(file: &File, dst: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    let len = len.min(MAX_READ);
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let at = libc::off_t::try_from(offset).map_err(|_| too_far(offset))?;
        // SAFETY: `dst` is valid for writes of `len` bytes (caller's contract); pread
        // writes at most that many.
        let n = unsafe { libc::pread(file.as_raw_fd(), dst.cast(), len, at) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    #[cfg(windows)]
    {
        // SAFETY: forwarded contract.
        unsafe { windows::read_file_at(file, dst, len, offset) }
    }
}

/// Fills the buffers of `bufs` in turn from the bytes of `file` starting at `offset`,
/// with one `preadv` on Unix (on Windows, each buffer read whole in turn). Returns the bytes
/// read: fewer than the buffers hold where the file ends or the OS reads less, and `0`
/// only at the end of the file (or when every buffer is empty). Unix may fail with
/// `Interrupted`: the caller retries.
///
/// # Safety
/// Each buffer must be valid for writes of its length, by no one else during the call;
/// at most `max_read_bufs()` of them.
pub unsafe fn read_vectored_at(file: &File, bufs: &[ReadBuf], offset: u64) -> io::Result<usize> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let at = libc::off_t::try_from(offset).map_err(|_| too_far(offset))?;
        let count = libc::c_int::try_from(bufs.len()).map_err(|_| too_many())?;
        // SAFETY: `ReadBuf` is a transparent `iovec`; each is valid for writes of its
        // length (caller's contract) and `bufs` is a live slice of `count` of them.
        let n = unsafe { libc::preadv(file.as_raw_fd(), bufs.as_ptr().cast(), count, at) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    #[cfg(windows)]
    {
        let mut done = 0usize;
        for buf in bufs {
            // SAFETY: the buffer is valid for writes of its length (caller's contract).
            let n = unsafe {
                fill_at_raw(file, buf.base(), buf.len(), offset + done as u64, buf.len())
            }?;
            done += n;
            if n < buf.len() {
                break; // the end of the file
            }
        }
        Ok(done)
    }
}

/// Reads up to `buf.len()` bytes at `offset` (see `read_at_raw`).
pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    // SAFETY: a live, exclusively borrowed slice of `buf.len()` bytes.
    unsafe { read_at_raw(file, buf.as_mut_ptr(), buf.len(), offset) }
}

/// Reads until `buf` is full or the file ends, retrying interrupted and short reads;
/// returns the bytes read.
pub fn read_fully_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    // SAFETY: a live, exclusively borrowed slice of `buf.len()` bytes.
    unsafe { fill_at_raw(file, buf.as_mut_ptr(), buf.len(), offset, buf.len()) }
}

/// The retry loop of every read: reads up to `cap` bytes at `offset` into `dst` until at
/// least `need` (`<= cap`) are in or the file ends, retrying interrupted and short reads;
/// returns the bytes read. Each read after the first starts where the previous one
/// ended, so with `O_DIRECT` an aligned `dst`, `offset` and `cap` keep every read aligned.
///
/// # Safety
/// As `read_at_raw` for `cap` bytes.
unsafe fn fill_at_raw(
    file: &File,
    dst: *mut u8,
    cap: usize,
    offset: u64,
    need: usize,
) -> io::Result<usize> {
    debug_assert!(need <= cap);
    let mut done = 0;
    while done < need {
        // SAFETY: `dst + done .. dst + cap` lies inside the caller's buffer.
        match unsafe { read_at_raw(file, dst.add(done), cap - done, offset + done as u64) } {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------------------------
// Reads of a checkpoint: errors name the file, a short file is truncated
// ---------------------------------------------------------------------------------------

/// The error for a file that ended before byte `end` of a read that needed it.
pub fn truncated(path: &Path, end: u64) -> Error {
    Error::malformed(
        path,
        "file",
        format!("file ended before byte {end} (was it truncated while loading?)"),
    )
}

/// Fills `buf` from the bytes of `file` (at `path`) at `offset`, retrying interrupted and
/// short reads; a file that ends first is [`truncated`].
pub fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    // SAFETY: a live, exclusively borrowed slice of `buf.len()` bytes.
    unsafe { read_exact_at_raw(file, path, buf.as_mut_ptr(), buf.len(), offset) }
}

/// [`read_exact_at`] into `len` bytes at `dst`.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes, and nothing else may read or write them
/// during the call. The bytes need not be initialised.
pub unsafe fn read_exact_at_raw(
    file: &File,
    path: &Path,
    dst: *mut u8,
    len: usize,
    offset: u64,
) -> Result<()> {
    // SAFETY: forwarded contract.
    unsafe { read_at_least(file, path, dst, len, offset, len) }.map(|_| ())
}

/// Reads up to `cap` bytes at `offset` of `file` into `dst` until at least `need` bytes
/// (`need <= cap`) are in (see `fill_at_raw`); returns how many were read. End of file
/// before `need` bytes is [`truncated`]; after them it just ends the read (an `O_DIRECT`
/// read of a whole aligned span may run past it).
///
/// # Safety
/// `dst` must be valid for writes of `cap` bytes, and nothing else may read or write them
/// during the call. The bytes need not be initialised.
pub unsafe fn read_at_least(
    file: &File,
    path: &Path,
    dst: *mut u8,
    cap: usize,
    offset: u64,
    need: usize,
) -> Result<usize> {
    // SAFETY: forwarded contract.
    let done =
        unsafe { fill_at_raw(file, dst, cap, offset, need) }.map_err(|e| Error::io(path, e))?;
    if done < need {
        return Err(truncated(path, offset + need as u64));
    }
    Ok(done)
}

/// Fills every buffer of `bufs` in turn from the bytes of `file` starting at `offset`
/// (one `preadv` a try on Unix), retrying interrupted and short reads (the vector is
/// consumed as it goes); a file that ends first is [`truncated`].
///
/// # Safety
/// Each buffer must be valid for writes of its length, by no one else during the call;
/// at most `max_read_bufs()` of them.
pub unsafe fn read_vectored_exact(
    file: &File,
    path: &Path,
    bufs: &mut [ReadBuf],
    offset: u64,
) -> Result<()> {
    let total: u64 = bufs.iter().map(|v| v.len() as u64).sum();
    let mut at = offset;
    let mut first = 0usize;
    while first < bufs.len() {
        if bufs[first].is_empty() {
            first += 1;
            continue;
        }
        // SAFETY: the buffers are valid for writes and at most `max_read_bufs()` (the
        // caller's contract).
        let mut n = match unsafe { read_vectored_at(file, &bufs[first..], at) } {
            Ok(0) => return Err(truncated(path, offset + total)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        at += n as u64;
        // Skip the buffers filled, shorten the one filled in part.
        while n > 0 {
            let v = &mut bufs[first];
            let step = n.min(v.len());
            v.advance(step);
            n -= step;
            if v.is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reading around the page cache (O_DIRECT)
// ---------------------------------------------------------------------------------------

/// Alignment of `O_DIRECT` reads (and of staging slab sizes).
pub const ALIGN: u64 = 4096;

/// The file staged reads come from: a duplicate of an open file's descriptor (reader
/// threads outlive one copy) or an `O_DIRECT` descriptor of its path.
pub struct Source {
    file: File,
    /// Whether reads bypass the page cache (`O_DIRECT`), so must be aligned.
    pub direct: bool,
    pub path: PathBuf,
}

impl Source {
    /// Opens `path` (open as `file`) again, with `O_DIRECT` if `direct` and the filesystem
    /// allows it (else buffered, as if `direct` were false).
    pub fn open(file: &File, path: &Path, direct: bool) -> Result<Source> {
        let path = path.to_path_buf();
        if direct {
            if let Some(file) = open_direct(&path) {
                return Ok(Source {
                    file,
                    direct: true,
                    path,
                });
            }
        }
        let file = file.try_clone().map_err(|e| Error::io(&path, e))?;
        Ok(Source {
            file,
            direct: false,
            path,
        })
    }

    /// Reads `[off, off + len)` of the file into `slab` (capacity `cap`); returns the skew
    /// of the first wanted byte inside the slab (non-zero only for `O_DIRECT` reads, which
    /// start at an aligned offset).
    ///
    /// # Safety
    /// `slab` must be valid for writes of `cap` bytes and used by no one else during the
    /// call; for `O_DIRECT` it must be `ALIGN`-aligned. `len <= max_chunk(self.direct, cap)`.
    pub unsafe fn read_into(&self, slab: *mut u8, cap: usize, off: u64, len: u64) -> Result<usize> {
        if !self.direct {
            debug_assert!(len as usize <= cap);
            // SAFETY: `len <= cap` (the caller's contract); the slab is ours for the call.
            unsafe { read_exact_at_raw(&self.file, &self.path, slab, len as usize, off) }?;
            return Ok(0);
        }
        let start = off / ALIGN * ALIGN;
        let end = (off + len).div_ceil(ALIGN) * ALIGN;
        let total = (end - start) as usize;
        debug_assert!(total <= cap);
        // SAFETY: `total <= cap` (`len` is 2 * ALIGN shorter than the slab), so the reads
        // stay in the slab, which is ours for the call. Slab base, `start` and `total` are
        // multiples of ALIGN, as O_DIRECT wants; the span may end past the end of the
        // file, and only the wanted bytes must be there.
        unsafe {
            read_at_least(
                &self.file,
                &self.path,
                slab,
                total,
                start,
                (off + len - start) as usize,
            )
        }?;
        Ok((off - start) as usize)
    }
}

/// Longest chunk that fits a slab of `slab_bytes` (`O_DIRECT` reads start up to ALIGN-1
/// bytes early and end up to ALIGN-1 bytes late).
pub fn max_chunk(direct: bool, slab_bytes: usize) -> u64 {
    if direct {
        slab_bytes as u64 - 2 * ALIGN
    } else {
        slab_bytes as u64
    }
}

/// `path` opened for reads that bypass the page cache (`O_DIRECT`); None where that is
/// refused (tmpfs, some file systems) or not offered (macOS has no `O_DIRECT`): the
/// caller then reads through the page cache.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// The most bytes one write hands the OS (as `MAX_READ`).
const MAX_WRITE: usize = 1 << 30;

/// One buffer of a vectored write: `len` readable bytes at `base`. On Unix it is a
/// `struct iovec`, handed to `pwritev` as is.
#[cfg(unix)]
#[repr(transparent)]
pub struct WriteBuf(libc::iovec);

/// One buffer of a vectored write: `len` readable bytes at `base`.
#[cfg(windows)]
pub struct WriteBuf {
    base: *const u8,
    len: usize,
}

impl WriteBuf {
    /// A buffer of `len` bytes at `base`. Nothing is read here: the unsafe writes that
    /// take it state what it must point to.
    pub fn new(base: *const u8, len: usize) -> WriteBuf {
        #[cfg(unix)]
        return WriteBuf(libc::iovec {
            iov_base: base.cast_mut().cast(),
            iov_len: len,
        });
        #[cfg(windows)]
        return WriteBuf { base, len };
    }

    pub fn base(&self) -> *const u8 {
        #[cfg(unix)]
        return self.0.iov_base.cast_const().cast();
        #[cfg(windows)]
        return self.base;
    }

    pub fn len(&self) -> usize {
        #[cfg(unix)]
        return self.0.iov_len;
        #[cfg(windows)]
        return self.len;
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes the buffers of `bufs` one after the other from `offset` (one `pwritev` per
/// round on Unix, each buffer in turn on Windows), retrying interrupted and short writes
/// until every byte is written. At most `max_read_bufs()` buffers.
///
/// # Safety
/// Each buffer must be valid for reads of its length for the duration of the call.
pub unsafe fn write_all_vectored_at(file: &File, bufs: &[WriteBuf], offset: u64) -> io::Result<()> {
    let total: usize = bufs.iter().map(WriteBuf::len).sum();
    let mut done = 0usize; // bytes written so far, counted from `offset`
    let mut first = 0usize; // the first buffer not yet written whole
    let mut skip = 0usize; // bytes of `bufs[first]` already written
    while done < total {
        while bufs[first].len() == skip {
            first += 1;
            skip = 0;
        }
        let at = offset + done as u64;
        #[cfg(unix)]
        let n = {
            use std::os::fd::AsRawFd;
            let pos = libc::off_t::try_from(at).map_err(|_| too_far(at))?;
            let mut rest: Vec<libc::iovec> = bufs[first..].iter().map(|b| b.0).collect();
            rest[0] = libc::iovec {
                iov_base: bufs[first].base().wrapping_add(skip).cast_mut().cast(),
                iov_len: bufs[first].len() - skip,
            };
            let count = libc::c_int::try_from(rest.len()).map_err(|_| too_many())?;
            // SAFETY: each iovec describes (the unwritten tail of) a caller's buffer,
            // valid for reads of its length (caller's contract); `rest` is live.
            let n = unsafe { libc::pwritev(file.as_raw_fd(), rest.as_ptr(), count, pos) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        };
        #[cfg(windows)]
        // SAFETY: the unwritten tail of a caller's buffer, valid for reads.
        let n = unsafe {
            write_at_raw(
                file,
                bufs[first].base().wrapping_add(skip),
                bufs[first].len() - skip,
                at,
            )
        };
        match n {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                done += n;
                while n > 0 {
                    let left = bufs[first].len() - skip;
                    if n < left {
                        skip += n;
                        n = 0;
                    } else {
                        n -= left;
                        first += 1;
                        skip = 0;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes up to `len` bytes (at most 1 GiB) from `src` to `file` at `offset` with one
/// system call; returns how many were written (possibly fewer). Unix may fail with
/// `Interrupted`: the caller retries.
///
/// # Safety
/// `src` must be valid for reads of `len` bytes for the duration of the call.
pub unsafe fn write_at_raw(
    file: &File,
    src: *const u8,
    len: usize,
    offset: u64,
) -> io::Result<usize> {
    let len = len.min(MAX_WRITE);
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let at = libc::off_t::try_from(offset).map_err(|_| too_far(offset))?;
        // SAFETY: `src` is valid for reads of `len` bytes (caller's contract); pwrite
        // reads at most that many.
        let n = unsafe { libc::pwrite(file.as_raw_fd(), src.cast(), len, at) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    #[cfg(windows)]
    {
        // SAFETY: forwarded contract.
        unsafe { windows::write_file_at(file, src, len, offset) }
    }
}

/// Writes all of `buf` at `offset`, retrying interrupted and short writes. A write that
/// makes no progress is `WriteZero`.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: `rest` is a live slice of `rest.len()` bytes.
        match unsafe { write_at_raw(file, rest.as_ptr(), rest.len(), offset + done as u64) } {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(unix)]
fn too_far(offset: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("offset {offset} is past what a file offset can hold"),
    )
}

#[cfg(unix)]
fn too_many() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "too many buffers for one read")
}

#[cfg(windows)]
mod windows {
    use std::fs::File;
    use std::io;
    use std::os::windows::io::AsRawHandle;

    use windows_sys::Win32::Foundation::{ERROR_HANDLE_EOF, FALSE};
    use windows_sys::Win32::Storage::FileSystem::{ReadFile, WriteFile};
    use windows_sys::Win32::System::IO::OVERLAPPED;

    /// `WriteFile` of up to `len` (at most 1 GiB) bytes at `offset` (synchronous handle,
    /// as `read_file_at`).
    ///
    /// # Safety
    /// As `write_at_raw`.
    pub(super) unsafe fn write_file_at(
        file: &File,
        src: *const u8,
        len: usize,
        offset: u64,
    ) -> io::Result<usize> {
        // SAFETY: OVERLAPPED is plain data; all zeroes is a valid (empty) value.
        let mut at: OVERLAPPED = unsafe { std::mem::zeroed() };
        at.Anonymous.Anonymous.Offset = offset as u32;
        at.Anonymous.Anonymous.OffsetHigh = (offset >> 32) as u32;
        let mut written = 0u32;
        // SAFETY: `src` is valid for reads of `len` bytes (caller's contract), `len` fits
        // a u32 (at most 1 GiB), and `written` and `at` outlive the synchronous call.
        let ok = unsafe { WriteFile(file.as_raw_handle(), src, len as u32, &mut written, &mut at) };
        if ok == FALSE {
            return Err(io::Error::last_os_error());
        }
        Ok(written as usize)
    }

    /// `ReadFile` of up to `len` (at most 1 GiB) bytes at `offset`. The handle is
    /// synchronous (std opens files without `FILE_FLAG_OVERLAPPED`), so the OVERLAPPED
    /// only carries the offset and the call returns when the read is done.
    ///
    /// # Safety
    /// As `read_at_raw`.
    pub(super) unsafe fn read_file_at(
        file: &File,
        dst: *mut u8,
        len: usize,
        offset: u64,
    ) -> io::Result<usize> {
        // SAFETY: OVERLAPPED is plain data; all zeroes is a valid (empty) value.
        let mut at: OVERLAPPED = unsafe { std::mem::zeroed() };
        at.Anonymous.Anonymous.Offset = offset as u32;
        at.Anonymous.Anonymous.OffsetHigh = (offset >> 32) as u32;
        let mut read = 0u32;
        // SAFETY: `dst` is valid for writes of `len` bytes (caller's contract), `len` fits
        // a u32 (at most 1 GiB), and `read` and `at` outlive the synchronous call.
        let ok = unsafe { ReadFile(file.as_raw_handle(), dst, len as u32, &mut read, &mut at) };
        if ok == FALSE {
            let e = io::Error::last_os_error();
            // A read that starts at or past the end of the file.
            if e.raw_os_error() == Some(ERROR_HANDLE_EOF as i32) {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(read as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_reads_read_and_report_truncation() {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"hello world").unwrap();
        let file = f.reopen().unwrap();
        let mut buf = [0u8; 5];
        read_exact_at(&file, f.path(), &mut buf, 6).unwrap();
        assert_eq!(&buf, b"world");
        let e = read_exact_at(&file, f.path(), &mut buf, 8).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(e.to_string().contains("before byte 13"), "{e}");
        let mut bufs = [ReadBuf::new(buf.as_mut_ptr(), 5)];
        // SAFETY: `buf` is a live local array of 5 bytes.
        let e = unsafe { read_vectored_exact(&file, f.path(), &mut bufs, 8) }.unwrap_err();
        assert!(e.to_string().contains("before byte 13"), "{e}");
    }

    fn file_of(data: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let file = File::open(&path).unwrap();
        (dir, file)
    }

    #[test]
    fn positional_reads_return_the_bytes_at_the_offset_and_zero_at_the_end() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (_dir, file) = file_of(&data);
        let mut buf = [0u8; 16];
        assert_eq!(read_at(&file, &mut buf, 1000).unwrap(), 16);
        assert_eq!(buf, data[1000..1016]);
        assert_eq!(read_at(&file, &mut buf, 9_990).unwrap(), 10);
        assert_eq!(buf[..10], data[9_990..]);
        assert_eq!(read_at(&file, &mut buf, 10_000).unwrap(), 0);
        assert_eq!(read_at(&file, &mut buf, 1 << 40).unwrap(), 0);
        assert_eq!(read_fully_at(&file, &mut buf, 9_999).unwrap(), 1);
        assert_eq!(buf[0], data[9_999]);
        // The file position is not used: interleaved reads at other offsets don't matter.
        assert_eq!(read_at(&file, &mut buf[..4], 5).unwrap(), 4);
        assert_eq!(buf[..4], data[5..9]);
    }

    #[test]
    fn vectored_reads_fill_each_buffer_in_turn_and_stop_at_the_end() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let (_dir, file) = file_of(&data);
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 0], [0u8; 5000]);
        let bufs = [
            ReadBuf::new(a.as_mut_ptr(), a.len()),
            ReadBuf::new(b.as_mut_ptr(), b.len()),
            ReadBuf::new(c.as_mut_ptr(), c.len()),
        ];
        // SAFETY: three live local arrays, each described by its own length.
        let n = unsafe { read_vectored_at(&file, &bufs, 100) }.unwrap();
        assert_eq!(n, 5003);
        assert_eq!(a, data[100..103]);
        assert_eq!(c[..], data[103..5103]);
        // Past the end: only what the file holds.
        let bufs = [
            ReadBuf::new(a.as_mut_ptr(), a.len()),
            ReadBuf::new(c.as_mut_ptr(), c.len()),
        ];
        // SAFETY: as above.
        let n = unsafe { read_vectored_at(&file, &bufs, 9_000) }.unwrap();
        assert_eq!(n, 1000);
        assert_eq!(a, data[9_000..9_003]);
        assert_eq!(c[..997], data[9_003..]);
        // SAFETY: as above.
        let at_the_end = unsafe { read_vectored_at(&file, &bufs, 10_000) };
        assert_eq!(at_the_end.unwrap(), 0);
    }

    #[test]
    fn a_read_buffer_advances_within_itself() {
        let mut bytes = [0u8; 10];
        let mut buf = ReadBuf::new(bytes.as_mut_ptr(), 10);
        buf.advance(4);
        assert_eq!(buf.len(), 6);
        assert_eq!(buf.base(), bytes[4..].as_mut_ptr());
        buf.advance(6);
        assert!(buf.is_empty());
        assert!(std::panic::catch_unwind(move || buf.advance(1)).is_err());
    }

    #[test]
    fn positional_writes_land_at_their_offsets_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        write_all_at(&file, b"world", 6).unwrap();
        write_all_at(&file, b"hello ", 0).unwrap();
        let (a, b, c) = (b"ab".to_vec(), Vec::<u8>::new(), vec![7u8; 100_000]);
        let bufs = [
            WriteBuf::new(a.as_ptr(), a.len()),
            WriteBuf::new(b.as_ptr(), b.len()),
            WriteBuf::new(c.as_ptr(), c.len()),
        ];
        // SAFETY: three live vectors, each described by its own length.
        unsafe { write_all_vectored_at(&file, &bufs, 11) }.unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..13], b"hello worldab");
        assert_eq!(got.len(), 13 + 100_000);
        assert!(got[13..].iter().all(|&x| x == 7));
    }
}
