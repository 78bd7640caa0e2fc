//! Legacy `torch.save` files: what torch < 1.6 wrote, and what
//! `torch.save(obj, f, _use_new_zipfile_serialization=False)` still writes (many older
//! `pytorch_model.bin` on the Hub). No archive: five pickles back to back, then the
//! storages' bytes:
//!
//! 1. the magic number `0x1950a86a20f9469cfc6c` (a LONG);
//! 2. the protocol version, `1001`;
//! 3. `sys_info`, a dict (`little_endian`, `type_sizes`, ...);
//! 4. the object itself, whose storages are persistent ids
//!    `('storage', storage class, key, location, numel, view_metadata)`;
//! 5. the sorted list of the keys of the storages whose bytes follow;
//!
//! then for each key of that list, in its order: the storage's size in elements of its
//! storage class as a little-endian u64, and its bytes. `torch.load` reads them the same
//! way (`torch/serialization.py: _legacy_load`); objects are built by the same restricted
//! pickle VM as the zip format's `data.pkl`, refusing the same globals.
//!
//! Storage bytes start wherever the pickles end, so they are usually not aligned for
//! their dtype: loads copy those (see `Checkpoint::unaligned_storages`).
//!
//! The parser reads through any `Read + Seek` source, never through the mapping, like
//! `torchzip`: `Checkpoint::open` passes a `pread` reader, the fuzzer a `Cursor`.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::pickle::{self, PrefixError, Unpickled};
use super::{pickle_error, Format, Parsed, Storage, Value};
use crate::error::{Error, Result};

/// The magic number `0x1950a86a20f9469cfc6c`, as pickle's LONG1 stores it (little-endian
/// two's complement).
pub const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The only protocol version torch ever wrote (and the only one it reads).
pub const PROTOCOL_VERSION: i64 = 1001;

/// The first read of the pickles; doubled (and more) until the pickles fit.
const FIRST_READ: u64 = 64 << 10;

/// Whether `head` (the first bytes of a file) starts with a pickle of the magic number.
pub fn is_legacy(head: &[u8]) -> bool {
    match pickle::unpickle_prefix(head, false) {
        Ok((u, _)) => matches!(
            u.objects.nodes.get(u.objects.root),
            Some(Value::BigInt(b)) if b.as_slice() == MAGIC
        ),
        Err(_) => false,
    }
}

/// What the pickles say: the object, the storage keys whose bytes follow, and where the
/// first of those starts.
struct Pickles {
    main: Unpickled,
    keys: Vec<String>,
    data_start: u64,
}

/// Why the pickles did not parse: an error, or the bytes read so far end inside them.
enum Failure {
    Error(Error),
    NeedMore,
}

/// Parses a legacy checkpoint of `file_len` bytes read from `source`.
pub fn parse<R: Read + Seek>(path: &Path, mut source: R, file_len: u64) -> Result<Parsed> {
    // The pickles come first; how long they are shows only by running them. Read a
    // prefix, and a longer one whenever they run past its end.
    let mut want = FIRST_READ.min(file_len);
    let pickles = loop {
        let head = read_exact_at(path, &mut source, 0, want, "file")?;
        match read_pickles(path, &head, want < file_len) {
            Ok(p) => break p,
            Err(Failure::Error(e)) => return Err(e),
            Err(Failure::NeedMore) => want = want.saturating_mul(4).min(file_len),
        }
    };
    let Pickles {
        main,
        keys,
        data_start,
    } = pickles;

    let malformed = |entry: String, offset: Option<u64>, message: String| Error::Malformed {
        path: path.to_path_buf(),
        entry,
        offset,
        message,
    };
    // The storages with bytes of their own (not views), by key.
    let mut by_key: HashMap<&str, usize> = HashMap::with_capacity(main.storages.len());
    for (i, s) in main.storages.iter().enumerate() {
        if s.view_of.is_none() {
            by_key.insert(&s.key, i);
        }
    }
    let mut offsets: Vec<Option<u64>> = vec![None; main.storages.len()];
    let mut pos = data_start;
    for key in &keys {
        let entry = || format!("storage {key:?}");
        let Some(&i) = by_key.get(key.as_str()) else {
            return Err(malformed(
                entry(),
                Some(pos),
                "the storage list names a storage that the object pickle never uses".into(),
            ));
        };
        if offsets[i].is_some() {
            return Err(malformed(
                entry(),
                Some(pos),
                "the storage list names this storage twice".into(),
            ));
        }
        let s = &main.storages[i];
        let record = read_exact_at(path, &mut source, pos, 8, &entry())?;
        let numel = u64::from_le_bytes(record.try_into().expect("8 bytes"));
        let elem = s.dtype.map_or(1, |d| d.size() as u64);
        let nbytes = s.nbytes().unwrap_or(u64::MAX);
        if numel.checked_mul(elem) != Some(nbytes) {
            return Err(malformed(
                entry(),
                Some(pos),
                format!(
                    "the record holds {numel} elements of {elem} bytes, but the object pickle \
                     says the storage has {nbytes} bytes"
                ),
            ));
        }
        let start = pos + 8;
        let end = start.checked_add(nbytes).filter(|&e| e <= file_len);
        let Some(end) = end else {
            return Err(malformed(
                entry(),
                Some(start),
                format!(
                    "{nbytes} bytes from byte {start} run past the end of the file ({file_len} \
                     bytes): is it truncated?"
                ),
            ));
        };
        offsets[i] = Some(start);
        pos = end;
    }

    let mut storages: Vec<Storage> = Vec::with_capacity(main.storages.len());
    for (i, s) in main.storages.iter().enumerate() {
        let nbytes = s.nbytes().unwrap_or(u64::MAX);
        let offset = match s.view_of {
            // A view comes after the storage it views (it is registered first).
            Some((root, off)) => storages.get(root).map(|r| r.offset + off),
            None => offsets[i],
        };
        let Some(offset) = offset else {
            return Err(malformed(
                format!("storage {:?}", s.key),
                None,
                "the object pickle uses this storage but the file holds no bytes for it \
                 (it is missing from the storage list)"
                    .into(),
            ));
        };
        storages.push(Storage {
            key: s.key.clone(),
            location: s.location.clone(),
            offset,
            nbytes,
        });
    }

    Ok(Parsed {
        format: Format::TorchLegacy,
        storages,
        tensors: main.tensors,
        objects: main.objects,
        metadata: None,
        unrepresentable: Vec::new(),
    })
}

/// Runs the five pickles at the start of `head`. `more`: the file goes on after `head`,
/// so a pickle that runs past its end asks for more instead of failing.
fn read_pickles(path: &Path, head: &[u8], more: bool) -> std::result::Result<Pickles, Failure> {
    let mut pos = 0usize;
    let mut next = |entry: &'static str, legacy: bool| {
        let at = pos;
        match pickle::unpickle_prefix(&head[at..], legacy) {
            Ok((u, used)) => {
                pos = at + used;
                Ok((u, at))
            }
            Err(PrefixError { ran_out: true, .. }) if more => Err(Failure::NeedMore),
            Err(PrefixError { error, .. }) => {
                Err(Failure::Error(pickle_error(path, entry, at as u64, error)))
            }
        }
    };
    let bad = |entry: &str, at: usize, message: String| {
        Failure::Error(Error::Malformed {
            path: path.to_path_buf(),
            entry: entry.to_string(),
            offset: Some(at as u64),
            message,
        })
    };
    let root = |u: &Unpickled| u.objects.nodes[u.objects.root].clone();

    let (magic, at) = next("magic number", false)?;
    if !matches!(root(&magic), Value::BigInt(b) if b.as_slice() == MAGIC) {
        return Err(bad(
            "magic number",
            at,
            "not a legacy torch.save file: invalid magic number".into(),
        ));
    }
    let (version, at) = next("protocol version", false)?;
    if root(&version) != Value::Int(PROTOCOL_VERSION) {
        return Err(bad(
            "protocol version",
            at,
            format!(
                "protocol version {:?}; torch only ever wrote {PROTOCOL_VERSION}",
                root(&version)
            ),
        ));
    }
    let (sys_info, at) = next("sys_info", false)?;
    check_sys_info(path, &sys_info, at).map_err(Failure::Error)?;
    let (main, _) = next("object pickle", true)?;
    let (keys, at) = next("storage list", false)?;
    let g = &keys.objects;
    let Value::List(items) = &g.nodes[g.root] else {
        return Err(bad(
            "storage list",
            at,
            "the storage list is not a list".into(),
        ));
    };
    let keys = items
        .iter()
        .map(|&k| match &g.nodes[k] {
            Value::Str(s) => Ok(s.clone()),
            Value::Bytes(b) if b.is_ascii() => Ok(String::from_utf8_lossy(b).into_owned()),
            _ => Err(bad("storage list", at, "a storage key is not a str".into())),
        })
        .collect::<std::result::Result<Vec<String>, Failure>>()?;
    Ok(Pickles {
        main,
        keys,
        data_start: pos as u64,
    })
}

/// `sys_info`: torch itself ignores it, but a big-endian file's storages would load as
/// garbage, so `little_endian: False` is refused.
fn check_sys_info(path: &Path, u: &Unpickled, at: usize) -> Result<()> {
    let g = &u.objects;
    let Value::Dict(items) = &g.nodes[g.root] else {
        return Err(Error::Malformed {
            path: path.to_path_buf(),
            entry: "sys_info".into(),
            offset: Some(at as u64),
            message: "sys_info is not a dict".into(),
        });
    };
    for &(k, v) in items {
        if matches!(&g.nodes[k], Value::Str(s) if s == "little_endian")
            && g.nodes[v] == Value::Bool(false)
        {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                entry: "sys_info".into(),
                what: "the file was saved on a big-endian machine; only little-endian \
                       checkpoints are supported"
                    .into(),
            });
        }
    }
    Ok(())
}

/// `n` bytes at `offset`, or an error naming `entry` if the file ends first.
fn read_exact_at<R: Read + Seek>(
    path: &Path,
    source: &mut R,
    offset: u64,
    n: u64,
    entry: &str,
) -> Result<Vec<u8>> {
    let truncated = || Error::Malformed {
        path: path.to_path_buf(),
        entry: entry.to_string(),
        offset: Some(offset),
        message: format!("the file ends before byte {}: is it truncated?", offset + n),
    };
    let len = usize::try_from(n).map_err(|_| truncated())?;
    let mut buf = vec![0u8; len];
    source
        .seek(SeekFrom::Start(offset))
        .and_then(|_| source.read_exact(&mut buf))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => truncated(),
            _ => Error::io(path, e),
        })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::format::{flat_tensors, validate};

    /// `tests/data/legacy/generate.py`: views of one storage, a Parameter, a 3-byte
    /// storage first (so the others start at odd offsets), an empty tensor.
    const TIED: &[u8] = include_bytes!("../../tests/data/legacy/tied.legacy");

    fn parse_bytes(b: &[u8]) -> Result<Parsed> {
        parse(Path::new("t.pt"), std::io::Cursor::new(b), b.len() as u64)
    }

    #[test]
    fn real_file() {
        let p = parse_bytes(TIED).unwrap();
        validate(Path::new("t.pt"), TIED.len() as u64, &p).unwrap();
        assert_eq!(p.format, Format::TorchLegacy);
        let names: Vec<String> = flat_tensors(&p.objects)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["odd", "a", "b", "t", "row", "p", "x"]);
        let sizes: Vec<u64> = p.storages.iter().map(|s| s.nbytes).collect();
        assert_eq!(sizes, [3, 24, 16, 0]);
        // Every record is an 8-byte element count, then the bytes; the storage table
        // points past the count.
        for s in &p.storages {
            let at = s.offset as usize;
            let elem = if s.nbytes == 16 {
                8
            } else if s.nbytes == 3 {
                1
            } else {
                4
            };
            let numel = u64::from_le_bytes(TIED[at - 8..at].try_into().unwrap());
            assert_eq!(numel * elem, s.nbytes, "{s:?}");
        }
        let w = &p.storages[1];
        let floats: Vec<f32> = TIED[w.offset as usize..(w.offset + w.nbytes) as usize]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_ne!(w.offset % 4, 0, "this vector's float storage is unaligned");
        // a and b are one tensor; t and row view its storage.
        assert_eq!(p.tensors.len(), 6);
        assert_eq!(p.tensors[2].strides, [1, 3]);
        assert_eq!((p.tensors[3].storage, p.tensors[3].storage_offset), (1, 3));
        assert_eq!(p.tensors[4].dtype, DType::F64);
    }

    #[test]
    fn detection() {
        assert!(is_legacy(TIED));
        assert!(is_legacy(&TIED[..15])); // the magic number pickle alone
        assert!(!is_legacy(&TIED[..14]));
        assert!(!is_legacy(&TIED[15..]));
        assert!(!is_legacy(b"PK\x03\x04"));
        assert!(!is_legacy(b""));
    }

    #[test]
    fn truncation_at_every_position_fails_cleanly() {
        for n in 0..TIED.len() {
            match parse_bytes(&TIED[..n]) {
                Err(Error::Malformed { path, .. }) => assert_eq!(path, Path::new("t.pt")),
                other => panic!("{n}: {other:?}"),
            }
        }
    }

    #[test]
    fn byte_flips_never_panic() {
        let mut buf = TIED.to_vec();
        for i in 0..buf.len() {
            let orig = buf[i];
            for x in [0x00u8, 0x01, 0x7f, 0x80, 0xff, orig ^ 0x01, orig ^ 0x20] {
                buf[i] = x;
                if let Ok(p) = parse_bytes(&buf) {
                    let _ = validate(Path::new("t.pt"), buf.len() as u64, &p);
                }
            }
            buf[i] = orig;
        }
    }

    #[test]
    fn a_record_of_the_wrong_size_is_refused() {
        let p = parse_bytes(TIED).unwrap();
        let mut buf = TIED.to_vec();
        let at = p.storages[1].offset as usize - 8;
        buf[at..at + 8].copy_from_slice(&7u64.to_le_bytes());
        let e = parse_bytes(&buf).unwrap_err().to_string();
        assert!(e.contains("7 elements of 4 bytes"), "{e}");
    }
}
