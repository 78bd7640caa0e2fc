//! The whole open path on arbitrary bytes: `format::parse` (detection, either parser,
//! `validate`), then a transfer plan for every storage, as `zeroload.load` would make.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.bin");
    if let Ok(p) = _core::format::parse(path, data) {
        common::check_parsed(data, &p);
    }
});
