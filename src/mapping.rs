//! The only place that maps files.
//!
//! A checkpoint is mapped copy-on-write (`MAP_PRIVATE`, read + write): tensors handed to
//! PyTorch point straight into the mapping, and PyTorch ignores DLPack's read-only flag, so
//! a write to a tensor must land in a private page and never reach the file.
//!
//! The mmap contract (memmap2's): if the file is truncated or rewritten by another process
//! while it is mapped, touching the lost pages raises SIGBUS, and changed bytes show through
//! untouched pages. zeroload maps only to hand out CPU tensors; parsing and every copy
//! read with `pread` (`Mapping::read_at`, `Mapping::reader`), which reports a short file as
//! an error instead, and no Rust reference into the mapping is ever made: the mapping is
//! held as a `memmap2::MmapRaw`, which hands out raw pointers only (no `Deref` to
//! `&[u8]`), so such a reference cannot be written by accident.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::fileio;

/// A whole file, opened once and mapped copy-on-write.
pub struct Mapping {
    path: PathBuf,
    file: File,
    /// `None` for an empty file (which cannot be mapped). Raw: no `&[u8]` into the file
    /// can be made from it (the file may change or shrink under the mapping).
    map: Option<MmapRaw>,
}

impl Mapping {
    /// Opens and maps `path` copy-on-write.
    ///
    /// Only regular files: on Unix the file is opened non-blocking, so a FIFO planted
    /// under a checkpoint's name is refused instead of blocking the open forever
    /// (O_NONBLOCK changes nothing for regular files).
    pub fn open(path: &Path) -> Result<Arc<Mapping>> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
        let file = options.open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
            ));
        }
        if !meta.is_file() {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                entry: "file".into(),
                what: "not a regular file (a FIFO, socket or device); checkpoints are read \
                       from regular files"
                    .into(),
            });
        }
        let map = if meta.len() == 0 {
            None
        } else {
            // SAFETY: memmap2 makes mapping unsafe because another process may change the
            // file while it is mapped: bytes behind a Rust reference would then change
            // under it (undefined behaviour), and pages past a truncation raise SIGBUS when
            // touched. The library never reads the mapping through Rust references: parsers
            // and copies `pread` the file, and the mapping's address only leaves as raw
            // pointers in DLPack exports (`base_ptr`), so no Rust invariant rests on the
            // mapped bytes. What remains is the hazard for the user's CPU tensors (SIGBUS
            // after a truncation, new bytes showing through untouched pages), stated in this
            // module's docs and the README. The mapping is private (copy-on-write), so
            // nothing we or PyTorch write reaches the file.
            let map =
                unsafe { MmapOptions::new().map_copy(&file) }.map_err(|e| Error::io(path, e))?;
            // Straight into the raw form, before anything could deref it to `&[u8]`.
            Some(MmapRaw::from(map))
        };
        Ok(Arc::new(Mapping {
            path: path.to_path_buf(),
            file,
            map,
        }))
    }

    /// An anonymous file holding what `fill` writes into it, which nothing else can
    /// change, mapped copy-on-write like a file on disk, so that everything downstream
    /// (parsers with `pread`, CPU views, the copy engine) treats in-memory checkpoints and
    /// files alike. `name` stands for the path in errors.
    ///
    /// Linux: a `memfd_create` file, sealed; the bytes live in shared memory (shmem) for as
    /// long as the mapping, counted in the process's RssShmem once touched. Elsewhere: a
    /// file in the temp dir, unlinked as soon as it is created, so that no name leads to
    /// it and it vanishes with its last descriptor.
    pub fn anonymous(
        name: &Path,
        fill: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Result<Arc<Mapping>> {
        let err = |e: std::io::Error| Error::io(name, e);
        let mut file = anonymous_file().map_err(err)?;
        fill(&mut file).map_err(err)?;
        seal(&file).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: a private (copy-on-write) mapping of a file no one else can reach
            // (sealed, or unlinked with its only descriptor ours), so nothing can write,
            // shrink or grow it: none of the hazards of mapping a shared file apply.
            Some(MmapRaw::from(
                unsafe { MmapOptions::new().map_copy(&file) }.map_err(err)?,
            ))
        };
        Ok(Arc::new(Mapping {
            path: name.to_path_buf(),
            file,
            map,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the file's bytes as mapped (tests only: the library never reads the
    /// mapping, see `open`). A copy, not a reference: no `&[u8]` into the mapping exists.
    #[cfg(test)]
    pub fn bytes(&self) -> Vec<u8> {
        match &self.map {
            // SAFETY: tests map files nothing else changes; the range is the mapping's own
            // and is copied out at once, so no reference outlives this call.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) }.to_vec(),
            None => Vec::new(),
        }
    }

    /// Base address of the mapping, for handing out tensors. Writable: pages are private.
    pub fn base_ptr(&self) -> *mut u8 {
        match &self.map {
            Some(m) => m.as_mut_ptr(),
            None => std::ptr::NonNull::<u8>::dangling().as_ptr(),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset` from the file with `pread` (never through
    /// the map, so a file truncated under us is an error, not a SIGBUS).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        fileio::read_exact_at(&self.file, &self.path, buf, offset)
    }

    /// A `Read + Seek` view of the file that reads with `pread`, never through the map.
    ///
    /// Parsers use it for structures scattered through the file (a torch zip has a local
    /// header before every storage): reading those through the map would fault in each
    /// header's page and, by the kernel's fault-around, tens of KiB of tensor data beside
    /// it, so the loader's RSS would grow with the number of tensors before any is touched.
    pub fn reader(&self) -> FileReader<'_> {
        FileReader {
            file: &self.file,
            pos: 0,
            len: self.len(),
            buf: Vec::new(),
            buf_at: 0,
            block: MIN_BLOCK,
        }
    }

    /// The open file, for readers that want their own `pread` loop.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Pieces of a readahead smaller than this are not worth a separate request: neighbouring
/// ranges closer than this are read as one (a torch zip's local headers lie between its
/// storages).
const READAHEAD_GAP: u64 = 1 << 20;

/// The kernel reads at most `max(read_ahead_kb, max_sectors_kb)` per `WILLNEED` call and
/// silently drops the rest, so the range is advised in pieces no larger than that; this is
/// the floor (the kernel's default window) when the device's settings cannot be read.
const READAHEAD_MIN_PIECE: u64 = 128 << 10;
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const READAHEAD_MAX_PIECE: u64 = 8 << 20;

impl Mapping {
    /// Starts reading `ranges` (`(offset, len)` pairs) of the file into the page cache on a
    /// background thread, in the order given (the order the caller expects them to be
    /// used in; neighbours are merged), so that touching the mapping afterwards finds its
    /// pages in memory instead of faulting them in from disk one readahead window at a
    /// time. Nothing is mapped into the process, so the RSS does not change until the
    /// pages are touched; each piece is a `posix_fadvise(POSIX_FADV_WILLNEED)`, which
    /// queues the reads and returns, unless both its ends are already cached. The thread reads through its own descriptor and
    /// never touches the mapping (a file truncated meanwhile only ends it early), and it
    /// does not keep the mapping alive. Nothing is scheduled when the (coalesced) ranges
    /// add up to more than `max_bytes`. Returns the bytes scheduled (0 if there was
    /// nothing to read, too much, or no thread could be started: advice only changes
    /// speed).
    pub fn readahead(&self, ranges: &[(u64, u64)], max_bytes: Option<u64>) -> u64 {
        let spans = coalesce(ranges, self.len(), READAHEAD_GAP);
        let total: u64 = spans.iter().map(|&(_, len)| len).sum();
        if total == 0 || max_bytes.is_some_and(|max| total > max) {
            return 0;
        }
        let Ok(file) = self.file.try_clone() else {
            return 0;
        };
        let piece = readahead_piece(&file);
        let spawned = std::thread::Builder::new()
            .name("zeroload-readahead".into())
            .spawn(move || {
                let mut scratch = Vec::new();
                for (offset, len) in spans {
                    let end = offset + len;
                    let mut at = offset;
                    while at < end {
                        let n = piece.min(end - at);
                        if cached(&file, at, n) {
                            at += n;
                            continue;
                        }
                        if !warm(&file, at, n, &mut scratch) {
                            return;
                        }
                        at += n;
                    }
                }
            });
        if spawned.is_ok() {
            total
        } else {
            0
        }
    }
}

/// Whether `[offset, offset + len)` is in the page cache. Linux 6.5 and later answer with
/// `cachestat` (whole range, reads nothing). Elsewhere, and where that call is refused: a
/// one-byte `preadv2(RWF_NOWAIT)` at each end, which fails rather than wait for the disk
/// but may start reading the page it probes; on a fast disk that read can finish first,
/// so a cold piece then passes for cached and is not read ahead (advice: its pages are
/// read when touched). Asking the kernel to read ahead a piece that is cached costs a
/// page-cache lookup per page (a warm 6 GiB file is 1.6M of them); either check costs one
/// or two system calls.
fn cached(file: &File, offset: u64, len: u64) -> bool {
    if let Some(all_in) = cachestat_all_cached(file, offset, len) {
        return all_in;
    }
    [offset, offset + len.saturating_sub(1)]
        .into_iter()
        .all(|at| matches!(read_byte_nowait(file, at), Ok(1)))
}

/// `cachestat(2)` of `[offset, offset + len)`: whether every page of it is cached; None
/// where the kernel lacks the call (before 6.5) or refuses it.
#[cfg(target_os = "linux")]
fn cachestat_all_cached(file: &File, offset: u64, len: u64) -> Option<bool> {
    use std::os::fd::AsRawFd;
    /// `struct cachestat_range` and `struct cachestat` of linux/mman.h.
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // Added in Linux 6.5 with the same number on every architecture.
    const SYS_CACHESTAT: libc::c_long = 451;
    if len == 0 {
        return Some(true);
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: the kernel reads one `Range` and writes one `Stat`, both live locals laid
    // out as linux/mman.h defines them; the descriptor is open; flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: sysconf only reads a system setting.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let pages = (offset + len).div_ceil(page) - offset / page;
    Some(stat.nr_cache >= pages)
}

#[cfg(not(target_os = "linux"))]
fn cachestat_all_cached(_file: &File, _offset: u64, _len: u64) -> Option<bool> {
    None
}

/// `preadv2(RWF_NOWAIT)` of the byte at `offset`: `Ok(1)` if it is in the page cache.
/// (Linux only: elsewhere every piece counts as uncached and is advised.)
#[cfg(not(target_os = "linux"))]
fn read_byte_nowait(_file: &File, _offset: u64) -> std::io::Result<usize> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(target_os = "linux")]
fn read_byte_nowait(file: &File, offset: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    let iov = libc::iovec {
        iov_base: std::ptr::addr_of_mut!(byte).cast(),
        iov_len: 1,
    };
    // SAFETY: one iovec describing one writable byte that outlives the call; the
    // descriptor is open.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// A new file that no name leads to (see `Mapping::anonymous`).
#[cfg(target_os = "linux")]
fn anonymous_file() -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor
    // or -1; it touches no memory of ours otherwise.
    let fd = unsafe {
        libc::memfd_create(
            c"zeroload".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it; the File closes it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(not(target_os = "linux"))]
fn anonymous_file() -> std::io::Result<File> {
    private_temp_file(&std::env::temp_dir())
}

/// A new, empty file in `dir` that only this process can reach and that vanishes with its
/// last handle (the non-Linux `anonymous_file`; tested on Linux too). Unix: created
/// readable by this user only and unlinked at once, so no name leads to it. Windows (which
/// cannot unlink an open file): opened delete-on-close and shared with no one, so its
/// name, while it lasts, opens nothing.
#[cfg_attr(target_os = "linux", allow(dead_code))]
fn private_temp_file(dir: &Path) -> std::io::Result<File> {
    private_temp_file_with(dir, |p| std::fs::remove_file(p))
}

/// `private_temp_file`, with the unlink it makes (tests stand a failing one in).
#[cfg_attr(target_os = "linux", allow(dead_code))]
fn private_temp_file_with(
    dir: &Path,
    #[cfg_attr(not(unix), allow(unused_variables, unused_mut))]
    mut remove: impl FnMut(&Path) -> std::io::Result<()>,
) -> std::io::Result<File> {
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!("zeroload-{}-{nanos}-{attempt}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        #[cfg(windows)]
        {
            use std::os::windows::fs::OpenOptionsExt;
            use windows_sys::Win32::Storage::FileSystem::{
                FILE_ATTRIBUTE_TEMPORARY, FILE_FLAG_DELETE_ON_CLOSE,
            };
            options
                .share_mode(0)
                .attributes(FILE_ATTRIBUTE_TEMPORARY)
                .custom_flags(FILE_FLAG_DELETE_ON_CLOSE);
        }
        match options.open(&path) {
            Ok(file) => {
                #[cfg(unix)]
                if let Err(e) = remove(&path) {
                    // Not left behind under its name: closed, and removed again (the
                    // first failure may have been transient); the error is the first one.
                    drop(file);
                    let _ = remove(&path);
                    return Err(e);
                }
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary file name"))
}

/// Makes "the bytes cannot change" a property of an `anonymous_file`. On Linux no one
/// else holds the descriptor either, but a sealed memfd refuses any write, resize or
/// later unsealing; an unlinked file elsewhere is reachable only through our descriptor.
#[cfg(target_os = "linux")]
fn seal(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) reads only its integer arguments; the descriptor is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn seal(_file: &File) -> std::io::Result<()> {
    Ok(())
}

/// Asks the kernel to start reading `[offset, offset + len)` of `file` into the page
/// cache and returns at once (`posix_fadvise(WILLNEED)`; macOS: `fcntl(F_RDADVISE)`;
/// Windows has no such advice for a file handle). Returns whether the advice was taken;
/// it only ever changes speed.
#[cfg(unix)]
pub(crate) fn advise_willneed(file: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return false;
    };
    #[cfg(not(target_vendor = "apple"))]
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, n, libc::POSIX_FADV_WILLNEED) };
    #[cfg(target_vendor = "apple")]
    let rc = {
        let Ok(count) = libc::c_int::try_from(n) else {
            return false;
        };
        let advice = libc::radvisory {
            ra_offset: off,
            ra_count: count,
        };
        // SAFETY: F_RDADVISE reads the radvisory it is given, which outlives the call.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_RDADVISE, &advice) }
    };
    rc == 0
}

#[cfg(windows)]
pub(crate) fn advise_willneed(_file: &File, _offset: u64, _len: u64) -> bool {
    false
}

/// Brings `[offset, offset + len)` of `file` into the page cache from the readahead
/// thread: the advice where the OS takes it, else (Windows) reading the bytes into
/// `scratch`, which is what the advice would have the kernel do. Returns false when
/// neither worked, to end the readahead.
fn warm(file: &File, offset: u64, len: u64, scratch: &mut Vec<u8>) -> bool {
    if !cfg!(windows) {
        return advise_willneed(file, offset, len);
    }
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    scratch.resize(len, 0);
    fileio::read_fully_at(file, scratch, offset).is_ok_and(|n| n > 0)
}

/// Clips `ranges` to `[0, file_len)`, drops empty ones and merges each into the one
/// before it when it starts at most `gap` bytes after it (or inside it). The order is
/// kept: it is the order the caller expects the bytes to be used in.
fn coalesce(ranges: &[(u64, u64)], file_len: u64, gap: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(offset, len) in ranges {
        let end = offset.saturating_add(len).min(file_len);
        if offset >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if offset >= last.0 && offset <= last.1.saturating_add(gap) => {
                last.1 = last.1.max(end)
            }
            _ => out.push((offset, end)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// The largest `WILLNEED` piece the kernel honours in full for `file`: the larger of the
/// block device's `read_ahead_kb` and `max_sectors_kb`, within
/// `[READAHEAD_MIN_PIECE, READAHEAD_MAX_PIECE]`. (Elsewhere than Linux, with no sysfs
/// to ask, the floor.)
#[cfg(not(target_os = "linux"))]
fn readahead_piece(_file: &File) -> u64 {
    READAHEAD_MIN_PIECE
}

#[cfg(target_os = "linux")]
fn readahead_piece(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return READAHEAD_MIN_PIECE;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let Ok(dir) = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")) else {
        return READAHEAD_MIN_PIECE;
    };
    // A partition's queue settings are its disk's.
    let queue = [dir.join("queue"), dir.join("../queue")]
        .into_iter()
        .find(|q| q.is_dir());
    let kib = |name: &str| -> Option<u64> {
        let q = queue.as_ref()?;
        std::fs::read_to_string(q.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let best = kib("read_ahead_kb")
        .into_iter()
        .chain(kib("max_sectors_kb"))
        .max()
        .map_or(READAHEAD_MIN_PIECE, |k| k.saturating_mul(1024));
    best.clamp(READAHEAD_MIN_PIECE, READAHEAD_MAX_PIECE)
}

/// See `Mapping::reader`. Reads stop at the length the file had when it was mapped.
///
/// Small reads are served from a block read ahead of them, kept across seeks: a zip
/// parser seeks to every local header, and a torch zip of 100k small tensors has 100k of
/// them a few hundred bytes apart, which would otherwise cost a `pread` each. The block
/// grows (to `MAX_BLOCK`) while reads land close together and shrinks back when they jump
/// far apart (headers between big tensors), so sparse files read little beyond what is
/// asked for.
pub struct FileReader<'a> {
    file: &'a File,
    pos: u64,
    len: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_at: u64,
    /// Size of the next block to read.
    block: usize,
}

const MIN_BLOCK: usize = 4 << 10;
const MAX_BLOCK: usize = 64 << 10;

impl FileReader<'_> {
    fn buffered(&self) -> Option<&[u8]> {
        let start = usize::try_from(self.pos.checked_sub(self.buf_at)?).ok()?;
        self.buf.get(start..).filter(|rest| !rest.is_empty())
    }

    /// Reads the block at `self.pos` into `buf`.
    fn fill(&mut self) -> std::io::Result<()> {
        // Close to the previous block: headers are dense here, read more at a time.
        let near = self.pos >= self.buf_at
            && self.pos - self.buf_at < 4 * self.buf.len().max(MIN_BLOCK) as u64;
        self.block = if near {
            (self.block * 2).min(MAX_BLOCK)
        } else {
            MIN_BLOCK
        };
        let left = usize::try_from(self.len - self.pos).unwrap_or(usize::MAX);
        self.buf.resize(self.block.min(left), 0);
        let n = fileio::read_fully_at(self.file, &mut self.buf, self.pos)?;
        self.buf.truncate(n);
        self.buf_at = self.pos;
        Ok(())
    }
}

impl std::io::Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let want = out.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        if self.buffered().is_none() {
            if want >= MAX_BLOCK {
                // A big entry (data.pkl): straight into the caller's buffer.
                let n = fileio::read_at(self.file, &mut out[..want], self.pos)?;
                self.pos += n as u64;
                return Ok(n);
            }
            self.fill()?;
        }
        let Some(avail) = self.buffered() else {
            return Ok(0); // the file shrank under us; the parser reports the short read
        };
        let n = want.min(avail.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for FileReader<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            std::io::SeekFrom::Start(n) => Some(n),
            std::io::SeekFrom::End(d) => self.len.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        self.pos = target;
        Ok(target)
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("path", &self.path)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_returns_the_files_bytes_whatever_the_seeks() {
        use std::io::{Read, Seek, SeekFrom};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let m = Mapping::open(&path).unwrap();
        let mut r = m.reader();
        let mut rng = 12345u64;
        for _ in 0..2000 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let near = rng >> 63 == 1;
            let at = if near {
                r.stream_position().unwrap() + (rng >> 40) % 600
            } else {
                (rng >> 20) % (data.len() as u64 + 10)
            };
            let len =
                ((rng >> 8) % 3000) as usize + if rng.is_multiple_of(17) { 100_000 } else { 0 };
            r.seek(SeekFrom::Start(at)).unwrap();
            let mut got = vec![0u8; len];
            let mut filled = 0;
            while filled < len {
                let n = r.read(&mut got[filled..]).unwrap();
                if n == 0 {
                    break;
                }
                filled += n;
            }
            let start = (at as usize).min(data.len());
            let end = (start + len).min(data.len());
            assert_eq!(&got[..filled], &data[start..end], "at {at} len {len}");
        }
        assert!(r.seek(SeekFrom::Current(-(1 << 40))).is_err());
    }

    #[test]
    fn an_anonymous_file_is_a_sealed_snapshot() {
        use std::io::Write;
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let m = Mapping::anonymous(Path::new("<bytes>"), |f| f.write_all(&data)).unwrap();
        assert_eq!(m.bytes(), data);
        assert_eq!(m.path(), Path::new("<bytes>"));
        let mut buf = vec![0u8; 10];
        m.read_at(&mut buf, 500).unwrap();
        assert_eq!(buf, &data[500..510]);
        // Sealed: the descriptor refuses writes and resizes.
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::FileExt;
            assert!(m.file().write_at(b"x", 0).is_err());
            assert!(m.file().set_len(5).is_err());
        }
        // Writes through the private mapping stay private.
        // SAFETY: the mapping is ours, writable (private) and at least one byte long.
        unsafe { *m.base_ptr() = 255 };
        m.read_at(&mut buf[..1], 0).unwrap();
        assert_eq!(buf[0], data[0]);
        let empty = Mapping::anonymous(Path::new("<empty>"), |_| Ok(())).unwrap();
        assert!(empty.is_empty());
        let failed = Mapping::anonymous(Path::new("<bad>"), |_| Err(std::io::Error::other("no")));
        assert!(failed.unwrap_err().to_string().contains("<bad>"));
    }

    #[test]
    fn private_temp_files_can_be_written_and_read_but_not_opened_and_leave_nothing() {
        use std::io::{Read, Seek, Write};
        let dir = tempfile::tempdir().unwrap();
        let mut f = private_temp_file(dir.path()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        if cfg!(unix) {
            assert!(names.is_empty(), "unlinked at once: {names:?}");
        } else {
            // Windows: the name lasts until the file is closed, but opens nothing.
            assert_eq!(names.len(), 1);
            assert!(File::open(&names[0]).is_err());
        }
        f.write_all(b"checkpoint bytes").unwrap();
        f.rewind().unwrap();
        let mut back = String::new();
        f.read_to_string(&mut back).unwrap();
        assert_eq!(back, "checkpoint bytes");
        drop(f);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[cfg(unix)]
    #[test]
    fn a_failed_unlink_leaves_no_temp_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut calls = 0;
        let err = private_temp_file_with(dir.path(), |p| {
            calls += 1;
            if calls == 1 {
                Err(std::io::Error::other("unlink refused"))
            } else {
                std::fs::remove_file(p)
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "unlink refused");
        assert_eq!(calls, 2);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn readahead_ranges_keep_their_order_and_merge_forward() {
        let ranges = [
            (500, 100),
            (0, 10),
            (20, 10),
            (90, 0),
            (990, 100),
            (2000, 5),
        ];
        assert_eq!(
            coalesce(&ranges, 1000, 15),
            vec![(500, 100), (0, 30), (990, 10)]
        );
        assert_eq!(coalesce(&ranges, 1000, 1000), vec![(500, 100), (0, 1000)]);
        assert_eq!(coalesce(&[(0, 10), (5, 3), (12, 4)], 100, 2), vec![(0, 16)]);
        assert!(coalesce(&[(5, 0), (2000, 1)], 1000, 0).is_empty());
        assert_eq!(coalesce(&[(0, u64::MAX)], 10, 0), vec![(0, 10)]);
    }

    #[test]
    fn readahead_schedules_the_planned_bytes_and_leaves_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
        let m = Mapping::open(&path).unwrap();
        assert_eq!(
            m.readahead(&[(0, 1 << 20), (2 << 20, 1 << 20)], None),
            3 << 20
        );
        assert_eq!(m.readahead(&[(0, 1 << 20)], Some(1 << 20)), 1 << 20);
        assert_eq!(m.readahead(&[(0, 1 << 20)], Some((1 << 20) - 1)), 0);
        assert_eq!(m.readahead(&[(1 << 30, 5)], None), 0);
        let piece = readahead_piece(m.file());
        assert!((READAHEAD_MIN_PIECE..=READAHEAD_MAX_PIECE).contains(&piece));
        // Just written, so in the page cache (unless the file system cannot say).
        let unsupported = read_byte_nowait(m.file(), 0).is_err_and(|e| {
            e.kind() == std::io::ErrorKind::Unsupported
                || (cfg!(unix) && e.raw_os_error() == Some(libc::EOPNOTSUPP))
        });
        assert!(unsupported || cached(m.file(), 0, 3 << 20));
        assert_eq!(m.bytes(), vec![7u8; 3 << 20]);
    }
}
