//! safetensors files, through the `safetensors` crate's header validation.
#![forbid(unsafe_code)]

use std::path::Path;

use safetensors::SafeTensors;

use super::{Format, ObjectGraph, Parsed, Storage, Tensor, Value};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Parses a whole safetensors file. Tensors come out sorted by name, the order of
/// `safetensors.safe_open(...).keys()`; each tensor is its own storage.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::Malformed {
        path: path.to_path_buf(),
        entry: "safetensors header".into(),
        offset: Some(0),
        message: e.to_string(),
    })?;
    // read_metadata checked 8 + header_len + data_len == file length, so this cannot overflow.
    let data_start = 8 + header_len as u64;

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
