//! Invariants every successful parse must satisfy, shared by the targets. A violated
//! invariant panics, which libFuzzer reports as a crash.
#![allow(dead_code)]

use _core::format::{self, ObjectGraph, Parsed, Value};
use _core::transfer::{CopyRequest, Plan, PlanOptions};

/// How deep `zeroload._core.Checkpoint.build` recurses before refusing; the object graph
/// must be acyclic, and walking it this deep must be safe.
const PY_MAX_NESTING: usize = 1000;

/// Checks a parse of `data` the way the Python layer will use it: every index in range,
/// every tensor inside its storage, every storage inside the file, a transfer plan for all
/// storages that reads only bytes of the file.
pub fn check_parsed(data: &[u8], p: &Parsed) {
    let path = std::path::Path::new("fuzz");
    format::validate(path, data.len() as u64, p).expect("a returned parse validates");
    for s in &p.storages {
        let end = s.offset.checked_add(s.nbytes).expect("storage end overflows");
        assert!(end <= data.len() as u64, "storage outside the file");
    }
    for t in &p.tensors {
        let s = &p.storages[t.storage];
        let (start, end) = t.byte_span().expect("validated span");
        assert!(start <= end && end <= s.nbytes.max(start), "tensor outside its storage");
        let _ = t.numel();
        let _ = t.is_contiguous();
    }
    check_graph(&p.objects, p.tensors.len(), p.storages.len());
    let _ = format::flat_tensors(&p.objects);
    plan_all_storages(data, p);
}

/// Builds copy plans for every storage into disjoint fake destinations, with the default
/// options and with tiny chunks, and checks every read lies inside the file.
pub fn plan_all_storages(data: &[u8], p: &Parsed) {
    let mut dest = 0x1000u64;
    let mut reqs = Vec::with_capacity(p.storages.len());
    for s in &p.storages {
        reqs.push(CopyRequest {
            file_offset: s.offset,
            nbytes: s.nbytes,
            dest,
        });
        dest = dest
            .checked_add(s.nbytes)
            .and_then(|d| d.checked_add(1))
            .expect("destination addresses overflow");
    }
    let total: u64 = p.storages.iter().map(|s| s.nbytes).sum();
    for opts in [
        PlanOptions::default(),
        PlanOptions {
            max_chunk: 7,
            max_gap: 3,
        },
    ] {
        let plan = Plan::new(&reqs, data.len() as u64, opts, "fuzz")
            .expect("storages of a validated parse always plan");
        assert_eq!(plan.total_bytes, total, "plan loses or adds bytes");
        let mut delivered = 0u64;
        for c in &plan.chunks {
            assert!(c.len <= opts.max_chunk);
            let end = (c.file_offset + c.len) as usize;
            let bytes = &data[c.file_offset as usize..end];
            for piece in &c.pieces {
                assert!(piece.offset + piece.len <= c.len);
                let _ = &bytes[piece.offset as usize..(piece.offset + piece.len) as usize];
                delivered += piece.len;
            }
        }
        assert_eq!(delivered, total);
    }
}

/// Walks the object graph recursively as the Python converter does: ids in range, no
/// cycle, depth bounded.
pub fn check_graph(g: &ObjectGraph, n_tensors: usize, n_storages: usize) {
    assert!(g.root < g.nodes.len(), "root out of range");
    let mut state = vec![0u8; g.nodes.len()]; // 0 new, 1 on path, 2 done
    walk(g, g.root, 0, &mut state, n_tensors, n_storages);
}

fn walk(
    g: &ObjectGraph,
    id: usize,
    depth: usize,
    state: &mut [u8],
    n_tensors: usize,
    n_storages: usize,
) {
    assert!(id < g.nodes.len(), "object id out of range");
    assert!(depth <= PY_MAX_NESTING, "graph deeper than the converter allows");
    match state[id] {
        1 => panic!("cycle in the object graph"),
        2 => return,
        _ => {}
    }
    state[id] = 1;
    let mut kids: Vec<usize> = Vec::new();
    match &g.nodes[id] {
        Value::Tuple(x) | Value::List(x) | Value::Set(x) | Value::FrozenSet(x) => {
            kids.extend(x)
        }
        Value::Dict(p) | Value::Counter(p) => p.iter().for_each(|&(k, v)| kids.extend([k, v])),
        Value::OrderedDict { items, attrs } => {
            items.iter().for_each(|&(k, v)| kids.extend([k, v]));
            kids.extend(attrs.iter().map(|(_, v)| *v));
        }
        Value::Parameter { tensor, .. } => {
            assert!(
                matches!(g.nodes.get(*tensor), Some(Value::Tensor(_))),
                "Parameter wraps a non-tensor"
            );
            kids.push(*tensor);
        }
        Value::Tensor(i) => assert!(*i < n_tensors, "tensor index out of range"),
        Value::Storage(i) => assert!(*i < n_storages, "storage index out of range"),
        _ => {}
    }
    for k in kids {
        walk(g, k, depth + 1, state, n_tensors, n_storages);
    }
    state[id] = 2;
}
