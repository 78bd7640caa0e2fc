//! The only place that maps files.
//!
//! A checkpoint is mapped copy-on-write (`MAP_PRIVATE`, read + write): tensors handed to
//! PyTorch point straight into the mapping, and PyTorch ignores DLPack's read-only flag, so
//! a write to a tensor must land in a private page and never reach the file.
//!
//! The mmap contract (memmap2's): if the file is truncated or rewritten by another process
//! while it is mapped, touching the lost pages raises SIGBUS, and changed bytes show through
//! untouched pages. zeroload maps only to parse headers and to hand out CPU tensors; GPU
//! and host-sink copies read with `pread` (`Mapping::read_at`), which reports a short file as
//! an error instead.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};

/// A whole file, opened once and mapped copy-on-write.
pub struct Mapping {
    path: PathBuf,
    file: File,
    /// `None` for an empty file (which cannot be mapped).
    map: Option<MmapMut>,
}

impl Mapping {
    /// Opens and maps `path` copy-on-write.
    ///
    /// Only regular files: the file is opened non-blocking, so a FIFO planted under a
    /// checkpoint's name is refused instead of blocking the open forever (O_NONBLOCK
    /// changes nothing for regular files).
    pub fn open(path: &Path) -> Result<Arc<Mapping>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
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
            // SAFETY: the mapping is private (copy-on-write), so nothing we or PyTorch write
            // reaches the file. The remaining hazard is another process truncating the file
            // while mapped (SIGBUS on access); that is memmap2's documented contract, stated
            // in this module's docs and the README, and copies to devices avoid it by
            // reading with pread instead of through the map.
            let map =
                unsafe { MmapOptions::new().map_copy(&file) }.map_err(|e| Error::io(path, e))?;
            Some(map)
        };
        Ok(Arc::new(Mapping {
            path: path.to_path_buf(),
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

    /// The file's bytes as mapped at open time. Used by the parsers before any tensor is
    /// handed out.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Base address of the mapping, for handing out tensors. Writable: pages are private.
    pub fn base_ptr(&self) -> *mut u8 {
        match &self.map {
            Some(m) => m.as_ptr() as *mut u8,
            None => std::ptr::NonNull::<u8>::dangling().as_ptr(),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset` from the file with `pread` (never through
    /// the map, so a file truncated under us is an error, not a SIGBUS).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::malformed(
                    &self.path,
                    "file",
                    format!(
                        "file ended before byte {} (was it truncated while loading?)",
                        offset + buf.len() as u64
                    ),
                )
            } else {
                Error::io(&self.path, e)
            }
        })
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
        }
    }

    /// The open file, for readers that want their own `pread` loop.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Hints the kernel about how a byte range will be read. Failures are ignored: advice
    /// only changes speed.
    pub fn advise(&self, advice: Advice, offset: u64, len: u64) {
        let Some(map) = &self.map else { return };
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        if end > map.len() as u64 || len == 0 {
            return;
        }
        let a = match advice {
            Advice::Sequential => memmap2::Advice::Sequential,
            Advice::WillNeed => memmap2::Advice::WillNeed,
            Advice::Random => memmap2::Advice::Random,
        };
        let _ = map.advise_range(a, offset as usize, len as usize);
    }
}

/// See `Mapping::reader`. Reads stop at the length the file had when it was mapped.
pub struct FileReader<'a> {
    file: &'a File,
    pos: u64,
    len: u64,
}

impl std::io::Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
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

/// Access patterns worth telling the kernel about.
#[derive(Clone, Copy, Debug)]
pub enum Advice {
    Sequential,
    WillNeed,
    Random,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("path", &self.path)
            .field("len", &self.len())
            .finish()
    }
}
