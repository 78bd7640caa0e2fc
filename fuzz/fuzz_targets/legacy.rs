//! The legacy torch.save reader (`format::legacy::parse`: magic number, protocol version
//! and sys_info pickles, the object pickle with legacy persistent ids, the storage list,
//! then the storage records) on arbitrary bytes, read through a `Cursor` as the parser
//! reads a file; plus `legacy::is_legacy`, which format detection runs on every file.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.pt");
    let _ = _core::format::legacy::is_legacy(&data[..data.len().min(512)]);
    let cursor = std::io::Cursor::new(data);
    if let Ok(p) = _core::format::legacy::parse(path, cursor, data.len() as u64) {
        // Records are checked against the file by the parser itself.
        for s in &p.storages {
            assert!(s.offset + s.nbytes <= data.len() as u64, "record outside the file");
        }
        if _core::format::validate(path, data.len() as u64, &p).is_ok() {
            common::check_parsed(data, &p);
        }
    }
});
