//! safetensors files: the header parsed and validated here, as the `safetensors` crate
//! (0.8) validates it, except that a tensor whose dtype torch cannot hold (a 6-bit float,
//! a name this version does not know) is listed rather than refused with the whole file.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::{Format, ObjectGraph, Parsed, Storage, Tensor, Unrepresentable, Value};
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

/// One tensor entry of the header, as written.
#[derive(Deserialize)]
struct Info {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The header: `__metadata__` (string to string, or null) and the tensors, in header
/// order. A name given twice is refused (a JSON map keeps one of them silently).
struct Header {
    metadata: Option<Vec<(String, String)>>,
    tensors: Vec<(String, Info)>,
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Header, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Header, A::Error> {
                let mut h = Header {
                    metadata: None,
                    tensors: Vec::new(),
                    duplicate: None,
                };
                let mut seen = HashSet::new();
                let mut seen_metadata = false;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        let m: Option<std::collections::HashMap<String, String>> =
                            map.next_value()?;
                        if seen_metadata && h.duplicate.is_none() {
                            h.duplicate = Some(key);
                        }
                        seen_metadata = true;
                        h.metadata = m.map(|m| m.into_iter().collect());
                        continue;
                    }
                    let info: Info = map.next_value()?;
                    if !seen.insert(key.clone()) {
                        h.duplicate.get_or_insert(key);
                        continue;
                    }
                    h.tensors.push((key, info));
                }
                Ok(h)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Header, A::Error> {
                // Drain, then refuse: a JSON array is not a header.
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Err(de::Error::invalid_type(de::Unexpected::Seq, &self))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses a safetensors header: `json` is the header after its 8-byte length prefix, in a
/// file `file_len` bytes long. The data section is never read, so an open file can be
/// parsed from the header alone, read with `pread`.
///
/// The checks are the `safetensors` crate's: valid UTF-8 JSON, string metadata, offsets
/// that tile the data section in order from its start with no gap or overlap, byte sizes
/// that match shape x dtype, and a data section that ends where the file ends. A dtype
/// torch cannot hold does not fail the file: the tensor is listed in
/// `Parsed::unrepresentable` (as a byte range standing in for it) and fails only when it
/// is loaded. For a dtype name zeroload does not know, the size cannot be checked against
/// the shape; its offsets still have to tile the data section.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Parsed> {
    let bad = |message: String| Error::Malformed {
        path: path.to_path_buf(),
        entry: "safetensors header".into(),
        offset: Some(8),
        message,
    };
    let text = std::str::from_utf8(json).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    let header: Header =
        serde_json::from_str(text).map_err(|e| bad(format!("invalid header: {e}")))?;
    if let Some(name) = &header.duplicate {
        return Err(bad(format!("the header names {name:?} twice")));
    }
    let data_start = 8 + json.len() as u64;

    // Validate in file order, as the crate does.
    let mut by_offset: Vec<&(String, Info)> = header.tensors.iter().collect();
    by_offset.sort_by_key(|(_, info)| info.data_offsets);
    let mut end = 0u64;
    for (name, info) in &by_offset {
        let bad_tensor = |message: String| Error::Malformed {
            path: path.to_path_buf(),
            entry: format!("tensor {name:?}"),
            offset: Some(8),
            message,
        };
        let (s, e) = info.data_offsets;
        if s != end || e < s {
            return Err(bad_tensor(format!(
                "data_offsets [{s}, {e}] do not continue the data section at byte {end} \
                 (tensors must tile it in order, without gaps or overlaps)"
            )));
        }
        end = e;
        let Some((bits, _)) = DType::from_safetensors_name(&info.dtype) else {
            continue; // unknown dtype: only its place in the file can be checked
        };
        let nbits = info
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(bits))
            .ok_or_else(|| {
                bad_tensor(format!(
                    "shape {:?} of {} overflows",
                    info.shape, info.dtype
                ))
            })?;
        if nbits % 8 != 0 {
            return Err(bad_tensor(format!(
                "shape {:?} of {} is {nbits} bits, not a whole number of bytes",
                info.shape, info.dtype
            )));
        }
        if nbits / 8 != e - s {
            return Err(bad_tensor(format!(
                "shape {:?} of {} is {} bytes, but data_offsets [{s}, {e}] hold {}",
                info.shape,
                info.dtype,
                nbits / 8,
                e - s
            )));
        }
    }
    if data_start.checked_add(end) != Some(file_len) {
        return Err(bad(format!(
            "the header's tensors take {end} bytes after the header, but the file has {} \
             (truncated, or trailing bytes)",
            file_len.saturating_sub(data_start)
        )));
    }

    let mut named: Vec<(String, Info)> = header.tensors;
    named.sort_by(|a, b| a.0.cmp(&b.0));

    let mut objects = ObjectGraph::default();
    let mut storages = Vec::with_capacity(named.len());
    let mut tensors = Vec::with_capacity(named.len());
    let mut items = Vec::with_capacity(named.len());
    let mut unrepresentable = Vec::new();
    for (name, info) in named {
        let (start, end) = info.data_offsets;
        let nbytes = end - start;
        storages.push(Storage {
            key: name.clone(),
            location: "cpu".into(),
            offset: data_start + start,
            nbytes,
        });
        let index = tensors.len();
        let tensor = match torch_view(&info) {
            Ok((dtype, shape)) => Tensor {
                storage: storages.len() - 1,
                dtype,
                strides: contiguous_strides(&shape),
                shape,
                storage_offset: 0,
                requires_grad: false,
            },
            Err(why) => {
                unrepresentable.push(Unrepresentable {
                    tensor: index,
                    dtype: info.dtype.clone(),
                    shape: info.shape.clone(),
                    why,
                });
                // Its bytes, so that byte ranges and offsets still describe it.
                Tensor {
                    storage: storages.len() - 1,
                    dtype: DType::U8,
                    shape: vec![nbytes],
                    strides: vec![1],
                    storage_offset: 0,
                    requires_grad: false,
                }
            }
        };
        tensors.push(tensor);
        let key = objects.push(Value::Str(name));
        let value = objects.push(Value::Tensor(index));
        items.push((key, value));
    }
    objects.root = objects.push(Value::Dict(items));

    let metadata = header.metadata.map(|mut pairs| {
        pairs.sort();
        pairs
    });
    Ok(Parsed {
        format: Format::Safetensors,
        storages,
        tensors,
        objects,
        metadata,
        unrepresentable,
    })
}

/// The torch dtype and shape of a validated header entry, or why torch cannot hold it.
fn torch_view(info: &Info) -> std::result::Result<(DType, Vec<u64>), String> {
    let Some((_, dtype)) = DType::from_safetensors_name(&info.dtype) else {
        return Err(format!(
            "dtype {:?} is unknown to this version of zeroload",
            info.dtype
        ));
    };
    let Some(dtype) = dtype else {
        return Err(format!(
            "dtype {} has no torch equivalent (torch has no 6-bit float types)",
            info.dtype
        ));
    };
    let per = dtype.values_per_element();
    let mut shape = info.shape.clone();
    if per > 1 {
        match shape.last_mut() {
            Some(last) if *last % per == 0 => *last /= per,
            _ => {
                return Err(format!(
                    "dtype {} is torch.{}, which packs {per} values per element along the \
                     last dimension; shape {:?} does not divide",
                    info.dtype,
                    dtype.torch_name(),
                    info.shape
                ))
            }
        }
    }
    Ok((dtype, shape))
}

/// The shape safetensors gives a tensor of `dtype` and torch shape `shape` (the packed
/// 4-bit float counts values, twice torch's last dimension).
pub fn logical_shape(dtype: DType, shape: &[u64]) -> Vec<u64> {
    let mut out = shape.to_vec();
    if let Some(last) = out.last_mut() {
        *last = last.saturating_mul(dtype.values_per_element());
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data_len));
        out
    }

    fn parse_ok(header: &str, data_len: usize) -> Parsed {
        parse(Path::new("t.safetensors"), &file(header, data_len)).unwrap()
    }

    fn parse_err(header: &str, data_len: usize) -> String {
        parse(Path::new("t.safetensors"), &file(header, data_len))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn tensors_torch_cannot_hold_are_listed_not_refused() {
        let p = parse_ok(
            r#"{"b": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]},
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [3, 7]},
                "c": {"dtype": "Q7", "shape": [2, 5], "data_offsets": [7, 9]},
                "d": {"dtype": "F4", "shape": [2, 3], "data_offsets": [9, 12]},
                "e": {"dtype": "F4", "shape": [2, 4], "data_offsets": [12, 16]}}"#,
            16,
        );
        let names: Vec<&str> = p.storages.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
        let listed: Vec<(usize, &str, &[u64])> = p
            .unrepresentable
            .iter()
            .map(|u| (u.tensor, u.dtype.as_str(), &u.shape[..]))
            .collect();
        assert_eq!(
            listed,
            [
                (1, "F6_E2M3", &[4][..]),
                (2, "Q7", &[2, 5][..]),
                (3, "F4", &[2, 3][..])
            ]
        );
        assert!(p.unrepresentable[2].why.contains("packs 2 values"));
        // Stand-ins are their bytes.
        assert_eq!(p.tensors[2].dtype, DType::U8);
        assert_eq!(p.tensors[2].shape, [2]);
        // The packed 4-bit float: torch's last dimension is half the header's.
        assert_eq!(p.tensors[4].dtype, DType::F4E2M1FNX2);
        assert_eq!(p.tensors[4].shape, [2, 2]);
        assert_eq!(
            logical_shape(p.tensors[4].dtype, &p.tensors[4].shape),
            [2, 4]
        );
    }

    #[test]
    fn the_crates_checks_still_apply() {
        let one = |dtype: &str, shape: &str, off: &str| {
            format!(r#"{{"w": {{"dtype": "{dtype}", "shape": {shape}, "data_offsets": {off}}}}}"#)
        };
        assert!(parse_err(&one("F32", "[3]", "[0, 8]"), 8).contains("is 12 bytes"));
        assert!(parse_err(&one("F4", "[3]", "[0, 2]"), 2).contains("not a whole number"));
        assert!(parse_err(&one("F6_E3M2", "[3]", "[0, 3]"), 3).contains("not a whole number"));
        assert!(parse_err(&one("Q7", "[3]", "[1, 3]"), 3).contains("do not continue"));
        assert!(parse_err(&one("Q7", "[3]", "[0, 3]"), 4).contains("trailing"));
        assert!(parse_err(&one("F64", "[4611686018427387905]", "[0, 8]"), 8).contains("overflows"));
        assert!(parse_err(
            r#"{"w": {"dtype": 7, "shape": [], "data_offsets": [0, 1]}}"#,
            1
        )
        .contains("invalid header"));
        assert!(parse_err(r#"[1, 2]"#, 0).contains("invalid header"));
        let twice = r#"{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                        "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}"#;
        assert!(parse_err(twice, 2).contains("names \"w\" twice"));
        assert!(parse_err(r#"{"__metadata__": {"a": 1}}"#, 0).contains("invalid header"));
        let p = parse_ok(r#"{"__metadata__": null}"#, 0);
        assert!(p.metadata.is_none() && p.tensors.is_empty());
    }

    /// Differential check against the `safetensors` crate: on headers it accepts, the
    /// same tensors; on headers it refuses, a refusal, unless the only problem is a dtype
    /// name it does not know (which we list instead).
    #[test]
    fn agrees_with_the_safetensors_crate() {
        let dtypes = ["F32", "F4", "F6_E2M3", "BOOL", "F8_E8M0", "I64", "Q7"];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut outcomes = [0usize; 3]; // both accept, both refuse, only we accept
        for _ in 0..3000 {
            let count = next(4);
            let mut entries = Vec::new();
            let mut at = 0u64;
            let mut known = true;
            for k in 0..count {
                let dtype = dtypes[next(dtypes.len() as u64) as usize];
                known &= dtype != "Q7";
                let shape: Vec<u64> = (0..next(3)).map(|_| next(5)).collect();
                let bits = DType::from_safetensors_name(dtype).map_or(8, |(b, _)| b);
                let numel: u64 = shape.iter().product();
                let mut size = numel * bits / 8;
                if next(8) == 0 {
                    size += 1; // a lie about the size
                }
                let start = if next(10) == 0 { at + 1 } else { at };
                entries.push(format!(
                    r#""t{k}": {{"dtype": "{dtype}", "shape": {shape:?}, "data_offsets": [{start}, {}]}}"#,
                    start + size
                ));
                at = start + size;
            }
            let header = format!("{{{}}}", entries.join(", "));
            let bytes = file(&header, at as usize);
            let ours = parse(Path::new("x"), &bytes);
            let theirs = safetensors::SafeTensors::read_metadata(&bytes);
            match (&ours, &theirs) {
                (Ok(p), Ok((_, m))) => {
                    for (name, info) in m.tensors() {
                        let i = p.storages.iter().position(|s| s.key == name).unwrap();
                        assert_eq!(
                            p.storages[i].nbytes as usize,
                            info.data_offsets.1 - info.data_offsets.0
                        );
                        let listed = p.unrepresentable.iter().find(|u| u.tensor == i);
                        let shape = match listed {
                            Some(u) => u.shape.clone(),
                            None => logical_shape(p.tensors[i].dtype, &p.tensors[i].shape),
                        };
                        let want: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
                        assert_eq!(shape, want, "{header}");
                        assert_eq!(
                            info.dtype.to_string(),
                            listed.map_or_else(
                                || p.tensors[i].dtype.safetensors_name().unwrap().to_string(),
                                |u| u.dtype.clone()
                            )
                        );
                    }
                }
                (Err(_), Err(_)) => {}
                (Ok(_), Err(_)) => {
                    assert!(!known, "we accepted what the crate refuses: {header}")
                }
                (Err(e), Ok(_)) => panic!("we refused what the crate accepts: {header}: {e}"),
            }
            outcomes[match (&ours, &theirs) {
                (Ok(_), Ok(_)) => 0,
                (Err(_), _) => 1,
                (Ok(_), Err(_)) => 2,
            }] += 1;
        }
        assert!(outcomes.iter().all(|&n| n > 100), "{outcomes:?}");
    }
}
