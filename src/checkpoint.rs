//! An open checkpoint: a file (or bytes in memory) opened, mapped, parsed and validated,
//! with what loads ask of it (storage sharing, alignment, readahead). The parsers and the
//! data model are `format`'s, which never touch the file system; this module does the
//! file's part: the mapping (`mapping.rs`), reads of the header and the scattered zip
//! entries with `pread` (`Mapping::read_at`, `Mapping::reader`), and readahead.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::format::{
    detect, flat_tensors, legacy, safetensors, single_tensor, torchzip, validate, Format,
    ObjectGraph, Parsed, Value, DETECT_BYTES,
};
use crate::mapping::Mapping;

/// `parse` for an open file. Everything is read with `pread`, never through the map: a
/// torch zip's scattered headers through `Mapping::reader` (faulting them in through the
/// map would drag in tensor data around each one), a safetensors header as one read. So a
/// file truncated while it is parsed gives an error rather than SIGBUS, and parsing leaves
/// the mapping untouched.
pub fn parse_mapped(path: &Path, mapping: &Mapping) -> Result<Parsed> {
    let mut head = vec![0u8; mapping.len().min(DETECT_BYTES) as usize];
    mapping.read_at(&mut head, 0)?;
    let parsed = match detect(path, &head)? {
        Format::Safetensors => {
            let n = safetensors::header_len(path, &head, mapping.len())?;
            // header_len bounds n by the file length and MAX_HEADER_LEN (100 MB).
            let mut json = vec![0u8; n as usize];
            mapping.read_at(&mut json, 8)?;
            safetensors::parse_header(path, &json, mapping.len())?
        }
        Format::TorchZip => torchzip::parse(path, mapping.reader(), mapping.len())?,
        Format::TorchLegacy => legacy::parse(path, mapping.reader(), mapping.len())?,
    };
    validate(path, mapping.len(), &parsed)?;
    Ok(parsed)
}

/// An open checkpoint: the parsed model plus the mapping its tensors point into.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub mapping: Arc<Mapping>,
    pub parsed: Parsed,
    /// How many tensors, and storage objects of the object tree, refer to each storage.
    storage_users: Vec<u32>,
    /// The storages whose bytes in the file are not aligned for a dtype of a tensor on
    /// them, by increasing index (see `unaligned_storages`).
    unaligned: Vec<usize>,
}

impl Checkpoint {
    /// Opens, maps and parses a checkpoint file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let mapping = Mapping::open(path)?;
        let parsed = parse_mapped(path, &mapping)?;
        Ok(Checkpoint::new(path, mapping, parsed))
    }

    /// A checkpoint held in memory: `fill` writes its bytes into an anonymous in-memory
    /// file (see `Mapping::anonymous`), which is then mapped, parsed and validated exactly
    /// as a file on disk would be. `name` stands for the path in errors (`<bytes>`).
    pub fn from_memory(
        name: &Path,
        fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> Result<Checkpoint> {
        let mapping = Mapping::anonymous(name, fill)?;
        let parsed = parse_mapped(name, &mapping)?;
        Ok(Checkpoint::new(name, mapping, parsed))
    }

    /// A checkpoint from a mapping and what was parsed from it (`validate`d). Nodes of
    /// the object graph that nothing returns are dropped (see `ObjectGraph::compact`).
    pub fn new(path: &Path, mapping: Arc<Mapping>, mut parsed: Parsed) -> Checkpoint {
        let unused = parsed.objects.compact();
        let count = unused.len();
        drop_soon(unused, count);
        let mut storage_users = vec![0u32; parsed.storages.len()];
        let refs =
            parsed
                .tensors
                .iter()
                .map(|t| t.storage)
                .chain(parsed.objects.nodes.iter().filter_map(|v| match v {
                    Value::Storage(i) => Some(*i),
                    _ => None,
                }));
        for i in refs {
            if let Some(n) = storage_users.get_mut(i) {
                *n = n.saturating_add(1);
            }
        }
        let unaligned = unaligned_storages(&parsed);
        Checkpoint {
            path: path.to_path_buf(),
            mapping,
            parsed,
            storage_users,
            unaligned,
        }
    }

    /// The storages whose first byte is not aligned for the dtype of some tensor on them
    /// (its size: complex128 needs 16 bytes) in the mapping, whose base is page-aligned.
    /// Safetensors and torch zip files align their data; legacy torch.save files do not.
    /// Loads must not hand out views of those bytes (a misaligned tensor is undefined
    /// behaviour for torch's kernels): they read them into memory of their own instead.
    pub fn unaligned_storages(&self) -> &[usize] {
        &self.unaligned
    }

    /// Whether storage `i`'s bytes can be handed out in place (see `unaligned_storages`).
    pub fn storage_aligned(&self, i: usize) -> bool {
        self.unaligned.binary_search(&i).is_err()
    }

    /// Whether tensor `i` is its storage, byte for byte: no offset, C-contiguous, and as
    /// long as the storage. Such a tensor can be exported with its own dtype and shape,
    /// and the storage its consumer makes for it is the one the file describes.
    pub fn covers_storage(&self, i: usize) -> bool {
        let Some(t) = self.parsed.tensors.get(i) else {
            return false;
        };
        let Some(s) = self.parsed.storages.get(t.storage) else {
            return false;
        };
        t.storage_offset == 0
            && t.is_contiguous()
            && t.numel()
                .and_then(|n| n.checked_mul(t.dtype.size() as u64))
                .is_some_and(|bytes| bytes == s.nbytes)
    }

    /// Whether anything besides one tensor refers to storage `i` (another tensor, or the
    /// storage itself as an object): then loads must make one storage object and share it.
    pub fn storage_shared(&self, i: usize) -> bool {
        self.storage_users.get(i).is_some_and(|&n| n > 1)
    }

    /// Starts reading the given storages (all when `None`, in table order: the order a
    /// load returns their tensors) into the page cache in the background, unless that is
    /// more than `max_bytes`; see `Mapping::readahead`. Returns the bytes scheduled.
    pub fn readahead(&self, storages: Option<&[usize]>, max_bytes: Option<u64>) -> u64 {
        let all = &self.parsed.storages;
        let ranges: Vec<(u64, u64)> = match storages {
            None => all.iter().map(|s| (s.offset, s.nbytes)).collect(),
            Some(ids) => ids
                .iter()
                .filter_map(|&i| all.get(i))
                .map(|s| (s.offset, s.nbytes))
                .collect(),
        };
        self.mapping.readahead(&ranges, max_bytes)
    }

    /// The `(name, tensor index)` pairs when the root is a flat dict of str to tensor (a
    /// state dict or a safetensors file), in the dict's order; `None` otherwise.
    pub fn flat_tensors(&self) -> Option<Vec<(String, usize)>> {
        flat_tensors(&self.parsed.objects)
    }

    /// The tensor index when the root is one tensor (or a `Parameter` wrapping one): a
    /// file written by `torch.save(tensor, path)`; `None` otherwise.
    pub fn single_tensor(&self) -> Option<usize> {
        single_tensor(&self.parsed.objects)
    }
}

/// See `Checkpoint::unaligned_storages`.
fn unaligned_storages(p: &Parsed) -> Vec<usize> {
    let mut align = vec![1u64; p.storages.len()];
    for t in &p.tensors {
        if let Some(a) = align.get_mut(t.storage) {
            *a = (*a).max(t.dtype.size() as u64);
        }
    }
    p.storages
        .iter()
        .zip(&align)
        .enumerate()
        .filter(|(_, (s, &a))| s.offset % a != 0)
        .map(|(i, _)| i)
        .collect()
}

/// Collections of at least this many objects are freed on a thread of their own.
const BACKGROUND_DROP_MIN: usize = 4096;

/// Drops a parse's objects, on a thread of its own when there are many: freeing them is
/// one `free` per object and takes a good part of the time parsing took, and loads drop
/// what they are done with on their way to returning. (If no thread can be started, the
/// closure, and the objects with it, are dropped here instead.)
fn drop_soon<T: Send + 'static>(objects: T, count: usize) {
    if count >= BACKGROUND_DROP_MIN {
        let _ = std::thread::Builder::new()
            .name("zeroload-drop".into())
            .spawn(move || drop(objects));
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        let parsed = std::mem::replace(&mut self.parsed, empty_parsed());
        let count = parsed.objects.nodes.len() + parsed.tensors.len();
        drop_soon(parsed, count);
    }
}

/// A parse with nothing in it, left in a dropped `Checkpoint`'s place.
fn empty_parsed() -> Parsed {
    Parsed {
        format: Format::Safetensors,
        storages: Vec::new(),
        tensors: Vec::new(),
        objects: ObjectGraph::default(),
        metadata: None,
        unrepresentable: Vec::new(),
    }
}
