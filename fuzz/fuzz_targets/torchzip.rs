//! The torch zip reader (`format::torchzip::parse`: zip directory, byteorder, data.pkl,
//! storage records) on arbitrary bytes, read through a `Cursor` as the parser reads a file.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.pth");
    let cursor = std::io::Cursor::new(data);
    if let Ok(p) = _core::format::torchzip::parse(path, cursor, data.len() as u64) {
        // Records are checked against the file by the parser itself.
        for s in &p.storages {
            assert!(s.offset + s.nbytes <= data.len() as u64, "record outside the file");
        }
        if _core::format::validate(path, data.len() as u64, &p).is_ok() {
            common::check_parsed(data, &p);
        }
    }
});
