//! The restricted pickle VM (`format::pickle::unpickle`) on arbitrary bytes. Besides not
//! crashing, a successful result must be a graph the consumers can walk: ids in range,
//! acyclic, bounded depth, tensors pointing at listed storages.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(u) = _core::format::pickle::unpickle(data) {
        for t in &u.tensors {
            assert!(t.storage < u.storages.len(), "tensor on an unlisted storage");
            assert_eq!(t.shape.len(), t.strides.len(), "sizes and strides differ in length");
            let _ = t.byte_span();
        }
        for s in &u.storages {
            let _ = s.nbytes();
        }
        common::check_graph(&u.objects, u.tensors.len(), u.storages.len());
    }
});
