//! The dtype table, for Python code that must not import torch (`zeroload inspect` and
//! `convert`): one row per dtype the core reads, so Python keeps no table of its own.
use pyo3::prelude::*;

use crate::dtype::DType;

/// The safetensors name of `d`, if the safetensors format carries it (the name is in the
/// format's table and reads back as `d`).
fn safetensors_name(d: DType) -> Option<&'static str> {
    let name = d.safetensors_name()?;
    (DType::from_safetensors_name(name)?.1 == Some(d)).then_some(name)
}

/// A dtype table row: torch name, bytes per element, safetensors name (None where the
/// format has no such dtype), values per element in safetensors' shapes.
type Row = (&'static str, usize, Option<&'static str>, u64);

/// Every dtype the core reads, as `(torch name, bytes per element, safetensors name or
/// None where the safetensors format has no such dtype, safetensors values per torch
/// element)`: `("float32", 4, "F32", 1)`, `("float4_e2m1fn_x2", 1, "F4", 2)` (a packed
/// type's last dimension counts twice as many values in a safetensors header).
#[pyfunction]
fn dtypes() -> Vec<Row> {
    DType::ALL
        .iter()
        .map(|&d| {
            (
                d.torch_name(),
                d.size(),
                safetensors_name(d),
                d.values_per_element(),
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
        assert!(rows.contains(&("float32", 4, Some("F32"), 1)));
        assert!(rows.contains(&("bfloat16", 2, Some("BF16"), 1)));
        assert!(rows.contains(&("float4_e2m1fn_x2", 1, Some("F4"), 2)));
        assert!(rows.contains(&("complex128", 16, None, 1)), "{rows:?}");
        assert!(rows.contains(&("bits8", 1, None, 1)), "{rows:?}");
        for (name, size, st, _) in rows {
            let d = DType::from_torch_name(name).unwrap();
            assert_eq!(d.size(), size);
            if let Some(st) = st {
                assert_eq!(Some(st), d.safetensors_name());
            }
        }
    }
}
