//! torch.save zip archives (torch >= 1.6): `<archive>/data.pkl` describes the objects,
//! `<archive>/data/<key>` holds one storage each, stored uncompressed, so storages are
//! sliced straight out of the mapping at the entry's `data_start`.
//!
//! The archive is read through any `Read + Seek` source: `Checkpoint::open` passes a
//! `pread` reader so that parsing never faults pages of the mapping in (see
//! `Mapping::reader`); the fuzzers pass the bytes.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use zip::read::{ArchiveOffset, Config};
use zip::{CompressionMethod, ZipArchive};

use super::pickle;
use super::{pickle_error, Format, Parsed, Storage};
use crate::error::{Error, Result};

/// Where an entry's bytes are in the file.
#[derive(Clone, Copy, Debug)]
struct EntrySpan {
    offset: u64,
    len: u64,
}

/// Parses a torch zip checkpoint of `file_len` bytes read from `source`.
pub fn parse<R: Read + Seek>(path: &Path, source: R, file_len: u64) -> Result<Parsed> {
    let malformed = |entry: &str, message: String| Error::Malformed {
        path: path.to_path_buf(),
        entry: entry.to_string(),
        offset: None,
        message,
    };
    // torch.save archives start at byte 0. The zip crate's default (`Detect`) guesses
    // prepended data from where the central directory "should" end, and is fooled by
    // torch's zip64 end records (76 bytes) when the first central header is also 76 bytes
    // long (an archive name of 21 characters: `torch.save(t, "<21 chars>.pt")`).
    let config = Config {
        archive_offset: ArchiveOffset::Known(0),
    };
    let mut zip = ZipArchive::with_config(config, source)
        .map_err(|e| malformed("zip directory", format!("not a readable zip archive: {e}")))?;
    // The zip crate keeps one entry per name; readers disagree on which duplicate wins
    // (first or last), so an archive that names an entry twice is ambiguous: refuse it.
    if zip.has_duplicate_names() {
        return Err(malformed(
            "zip directory",
            "the central directory lists an entry name twice; torch.save never does".into(),
        ));
    }

    // The archive name is the folder every record lives in (torch uses the file stem).
    let pkl_names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(|n| n.to_string())
        .collect();
    let pkl_name = match pkl_names.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(malformed(
                "zip directory",
                "no `<archive>/data.pkl` entry: this zip was not written by torch.save".into(),
            ))
        }
        _ => {
            return Err(malformed(
                "zip directory",
                format!(
                    "several data.pkl entries ({}); expected one",
                    pkl_names.join(", ")
                ),
            ))
        }
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];

    if let Some(order) = read_small_entry(path, &mut zip, file_len, &format!("{prefix}byteorder"))?
    {
        if order.trim_ascii() != b"little" {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                entry: format!("{prefix}byteorder"),
                what: format!(
                    "byte order {:?}: only little-endian checkpoints are supported",
                    String::from_utf8_lossy(&order)
                ),
            });
        }
    }

    let pkl_span = entry_span(path, &mut zip, file_len, &pkl_name)?
        .ok_or_else(|| malformed(&pkl_name, "missing".into()))?;
    let pkl = read_span(path, &mut zip, &pkl_name, pkl_span)?;
    let unpickled =
        pickle::unpickle(&pkl).map_err(|e| pickle_error(path, &pkl_name, pkl_span.offset, e))?;

    let mut storages = Vec::with_capacity(unpickled.storages.len());
    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(unpickled.storages.len());
    for s in &unpickled.storages {
        if seen.insert(&s.key, ()).is_some() {
            return Err(malformed(
                &pkl_name,
                format!("storage key {:?} listed twice", s.key),
            ));
        }
        let entry = format!("{prefix}data/{}", s.key);
        let span = entry_span(path, &mut zip, file_len, &entry)?.ok_or_else(|| {
            malformed(
                &entry,
                "missing: data.pkl refers to a storage record the archive does not hold".into(),
            )
        })?;
        let nbytes = s.nbytes().ok_or_else(|| {
            malformed(
                &entry,
                format!("storage size {} elements overflows", s.numel),
            )
        })?;
        if nbytes > span.len {
            return Err(malformed(
                &entry,
                format!(
                    "record holds {} bytes but data.pkl needs {nbytes}",
                    span.len
                ),
            ));
        }
        storages.push(Storage {
            key: s.key.clone(),
            location: s.location.clone(),
            offset: span.offset,
            nbytes,
        });
    }

    Ok(Parsed {
        format: Format::TorchZip,
        storages,
        tensors: unpickled.tensors,
        objects: unpickled.objects,
        metadata: None,
        unrepresentable: Vec::new(),
    })
}

/// The byte range of a stored (uncompressed, unencrypted) entry, checked to lie inside
/// the file; `None` if the archive has no such entry.
fn entry_span<R: Read + Seek>(
    path: &Path,
    zip: &mut ZipArchive<R>,
    file_len: u64,
    name: &str,
) -> Result<Option<EntrySpan>> {
    let Some(index) = zip.index_for_name(name) else {
        return Ok(None);
    };
    let malformed = |message: String| Error::Malformed {
        path: path.to_path_buf(),
        entry: name.to_string(),
        offset: None,
        message,
    };
    let entry = zip
        .by_index_raw(index)
        .map_err(|e| malformed(format!("unreadable zip entry: {e}")))?;
    if entry.encrypted() {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            entry: name.to_string(),
            what: "the entry is encrypted; torch.save never encrypts".into(),
        });
    }
    if entry.compression() != CompressionMethod::Stored {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            entry: name.to_string(),
            what: format!(
                "the entry is compressed ({}); torch.save stores entries uncompressed, and \
                 zeroload maps them in place",
                entry.compression()
            ),
        });
    }
    let offset = entry
        .data_start()
        .ok_or_else(|| malformed("no data offset for the entry".into()))?;
    let len = entry.size();
    if entry.compressed_size() != len {
        return Err(malformed(format!(
            "stored entry with compressed size {} != size {len}",
            entry.compressed_size()
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(Some(EntrySpan { offset, len })),
        _ => Err(Error::Malformed {
            path: path.to_path_buf(),
            entry: name.to_string(),
            offset: Some(offset),
            message: format!(
                "{len} bytes from byte {offset} run past the end of the file ({file_len} bytes)"
            ),
        }),
    }
}

/// A short metadata entry (`byteorder`, `version`), at most 64 bytes.
fn read_small_entry<R: Read + Seek>(
    path: &Path,
    zip: &mut ZipArchive<R>,
    file_len: u64,
    name: &str,
) -> Result<Option<Vec<u8>>> {
    let Some(span) = entry_span(path, zip, file_len, name)? else {
        return Ok(None);
    };
    if span.len > 64 {
        return Err(Error::malformed(
            path,
            name,
            format!("{} bytes; expected a short word", span.len),
        ));
    }
    read_span(path, zip, name, span).map(Some)
}

/// The bytes of an entry already checked to lie inside the file.
fn read_span<R: Read + Seek>(
    path: &Path,
    zip: &mut ZipArchive<R>,
    name: &str,
    span: EntrySpan,
) -> Result<Vec<u8>> {
    let len = usize::try_from(span.len)
        .map_err(|_| Error::malformed(path, name, format!("{} bytes is too large", span.len)))?;
    let mut buf = vec![0u8; len];
    let index = zip
        .index_for_name(name)
        .ok_or_else(|| Error::malformed(path, name, "missing"))?;
    // entry_span checked the entry is stored (uncompressed, unencrypted): the raw bytes
    // are the contents.
    zip.by_index_raw(index)
        .and_then(|mut entry| entry.read_exact(&mut buf).map_err(Into::into))
        .map_err(|e| Error::malformed(path, name, format!("unreadable entry: {e}")))?;
    Ok(buf)
}
