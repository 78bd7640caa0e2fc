//! The safetensors header parser (`format::safetensors::parse` + `validate`).
//!
//! Two input shapes, so mutations reach the JSON directly: an input that starts with `{` is
//! a header, up to the first NUL byte (which JSON text never holds), then the data
//! section; the file is the header's length (8 bytes, little-endian), the header and the
//! data. Any other input is a whole file as is.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|input: &[u8]| {
    let owned;
    let file: &[u8] = if input.first() == Some(&b'{') {
        let end = input.iter().position(|&b| b == 0).unwrap_or(input.len());
        let mut f = Vec::with_capacity(8 + input.len());
        f.extend_from_slice(&(end as u64).to_le_bytes());
        f.extend_from_slice(&input[..end]);
        f.extend_from_slice(input.get(end + 1..).unwrap_or_default());
        owned = f;
        &owned
    } else {
        input
    };
    let path = std::path::Path::new("fuzz.safetensors");
    if let Ok(p) = _core::format::safetensors::parse(path, file) {
        if _core::format::validate(path, file.len() as u64, &p).is_ok() {
            common::check_parsed(file, &p);
        }
    }
});
