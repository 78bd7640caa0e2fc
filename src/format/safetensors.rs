//! safetensors files, through the `safetensors` crate's header validation.
#![forbid(unsafe_code)]

use std::path::Path;

use safetensors::tensor::Metadata;

use super::{Format, ObjectGraph, Parsed, Storage, Tensor, Value};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The largest header the `safetensors` crate (and so the Python package) accepts.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Reads the 8-byte little-endian header length at the start of `prefix` and checks that
/// the header fits in a file of `file_len` bytes. Returns the header's length in bytes.
pub fn header_len(path: &Path, prefix: &[u8], file_len: u64) -> Result<u64> {
    let bad = |message: String| Error::Malformed {
        path: path.to_path_buf(),
        entry: "safetensors header".into(),
        offset: Some(0),
        message,
    };
    let Some(first8) = prefix.get(..8) else {
        return Err(bad(format!("the file is only {file_len} bytes long")));
    };
    let n = u64::from_le_bytes(first8.try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(bad(format!(
            "the header length prefix says {n} bytes, over the {MAX_HEADER_LEN}-byte limit"
        )));
    }
    if n > file_len.saturating_sub(8) {
        return Err(bad(format!(
            "the header length prefix says {n} bytes but the file is only {file_len} bytes long"
        )));
    }
    Ok(n)
}

/// Parses a whole safetensors file held in memory. Tensors come out sorted by name, the
/// order of `safetensors.safe_open(...).keys()`; each tensor is its own storage.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let n = header_len(path, bytes, bytes.len() as u64)?;
    // header_len checked 8 + n <= bytes.len().
    parse_header(path, &bytes[8..8 + n as usize], bytes.len() as u64)
}

/// Parses a safetensors header: `json` is the header after its 8-byte length prefix, in a
/// file `file_len` bytes long. The data section is never read, so an open file can be
/// parsed from the header alone, read with `pread`.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Parsed> {
    let bad = |message: String| Error::Malformed {
        path: path.to_path_buf(),
        entry: "safetensors header".into(),
        offset: Some(8),
        message,
    };
    let text = std::str::from_utf8(json).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    // Deserialising `Metadata` runs the crate's own checks: known dtypes, offsets that
    // tile the data section in order, and byte sizes that match shape x dtype.
    let meta: Metadata =
        serde_json::from_str(text).map_err(|e| bad(format!("invalid header: {e}")))?;
    let data_start = 8 + json.len() as u64;
    let data_end = data_start.checked_add(meta.data_len() as u64);
    if data_end != Some(file_len) {
        return Err(bad(format!(
            "the header's tensors take {} bytes after the header, but the file has {} \
             (truncated, or trailing bytes)",
            meta.data_len(),
            file_len.saturating_sub(data_start)
        )));
    }

    let mut named: Vec<(String, &safetensors::tensor::TensorInfo)> =
        meta.tensors().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));

    let mut objects = ObjectGraph::default();
    let mut storages = Vec::with_capacity(named.len());
    let mut tensors = Vec::with_capacity(named.len());
    let mut items = Vec::with_capacity(named.len());
    for (name, info) in named {
        let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| Error::Unsupported {
            path: path.to_path_buf(),
            entry: format!("tensor {name:?}"),
            what: format!(
                "dtype {:?} has no torch equivalent zeroload supports",
                info.dtype
            ),
        })?;
        let (start, end) = info.data_offsets;
        storages.push(Storage {
            key: name.clone(),
            location: "cpu".into(),
            offset: data_start + start as u64,
            nbytes: (end - start) as u64,
        });
        let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
        tensors.push(Tensor {
            storage: storages.len() - 1,
            dtype,
            strides: contiguous_strides(&shape),
            shape,
            storage_offset: 0,
            requires_grad: false,
        });
        let key = objects.push(Value::Str(name));
        let value = objects.push(Value::Tensor(tensors.len() - 1));
        items.push((key, value));
    }
    objects.root = objects.push(Value::Dict(items));

    let metadata = meta.metadata().as_ref().map(|m| {
        let mut pairs: Vec<(String, String)> =
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        pairs.sort();
        pairs
    });
    Ok(Parsed {
        format: Format::Safetensors,
        storages,
        tensors,
        objects,
        metadata,
    })
}

/// Row-major strides in elements. Saturates instead of overflowing; `validate` rejects
/// any tensor whose extent does not fit its storage anyway.
pub fn contiguous_strides(shape: &[u64]) -> Vec<i64> {
    let mut strides = vec![0i64; shape.len()];
    let mut acc: i64 = 1;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.saturating_mul(i64::try_from(d).unwrap_or(i64::MAX));
    }
    strides
}
