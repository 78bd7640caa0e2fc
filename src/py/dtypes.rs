//! The dtype table, for Python code that must not import torch (`zeroload inspect` and
//! `convert`): one row per dtype the core reads, so Python keeps no table of its own.
use pyo3::prelude::*;

use crate::dtype::DType;

/// Whether the safetensors format carries `d` under its safetensors name (the name parses
/// as a safetensors dtype that reads back as `d`).
fn in_safetensors(d: DType) -> bool {
    let name = serde_json::Value::String(d.safetensors_name().into());
    serde_json::from_value::<safetensors::Dtype>(name)
        .ok()
        .and_then(DType::from_safetensors)
        == Some(d)
}

/// Every dtype the core reads, as `(torch name, bytes per element, safetensors name or
/// None where the safetensors format has no such dtype)`: `("float32", 4, "F32")`.
#[pyfunction]
fn dtypes() -> Vec<(&'static str, usize, Option<&'static str>)> {
    DType::ALL
        .iter()
        .map(|&d| {
            (
                d.torch_name(),
                d.size(),
                in_safetensors(d).then(|| d.safetensors_name()),
            )
        })
        .collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dtypes, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_dtype_once_and_safetensors_names_round_trip() {
        let rows = dtypes();
        assert_eq!(rows.len(), DType::ALL.len());
        assert!(rows.contains(&("float32", 4, Some("F32"))));
        assert!(rows.contains(&("bfloat16", 2, Some("BF16"))));
        assert!(rows.contains(&("complex128", 16, None)), "{rows:?}");
        for (name, size, st) in rows {
            let d = DType::from_torch_name(name).unwrap();
            assert_eq!(d.size(), size);
            if let Some(st) = st {
                assert_eq!(st, d.safetensors_name());
            }
        }
    }
}
