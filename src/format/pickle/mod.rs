//! Restricted pickle VM: turns a torch.save `data.pkl` into zeroload's object model.
//!
//! Nothing in the pickle is ever executed or imported. `GLOBAL` resolves names against a
//! fixed allow-list (the one of torch's `weights_only` unpickler, see
//! `torch/_weights_only_unpickler.py`) and fails on the spot for anything else; the few
//! allowed callables (`OrderedDict`, `_rebuild_tensor_v2`, `torch.Size`, ...) are
//! interpreted here, on plain data, and produce nodes of an [`ObjectGraph`].
//!
//! Every object is a node; the stack and the memo hold node ids, so an object the pickle
//! references twice stays one object and later mutation (`SETITEMS` on a memoized dict,
//! `BUILD` on an `OrderedDict`) is visible through every reference. Globals are nodes too
//! (a `Value::None` placeholder plus an entry in a side table), so they can sit in tuples
//! (`_rebuild_from_type_v2(func, type, args, state)`) and in the memo; one that ends up
//! reachable from the result is refused.
//!
//! Hostile input: all reads are bounds-checked and lengths are checked against the bytes
//! left before anything is allocated; integer arithmetic is checked; there is no recursion.
//! Limits ([`MAX_NODES`], [`MAX_STACK`], [`MAX_MEMO`], [`MAX_DEPTH`], [`MAX_NDIM`],
//! [`MAX_INT_DIGITS`]) and a work budget linear in the input size (for opcodes that copy
//! existing data, like `OrderedDict(d)` or `_codecs.encode(s)` on a memoized object) keep
//! time and memory linear in the size of the pickle. The returned graph is acyclic and at
//! most [`MAX_DEPTH`] deep, so consumers may walk it recursively.
//!
//! Layout, in layers (a module imports only from the layers above it; a test checks it):
//! 1. [`limits`] the bounds on size and work, and [`allowlist`] which `module.name`
//!    globals exist and what each is (`resolve`): plain data, no VM.
//! 2. [`vm`] the machine (input, stack, memo, nodes, side tables) and its typed
//!    accessors; it enforces the limits (`Vm::limit`, `Vm::charge`).
//! 3. The handlers, each an `impl Vm` block: [`opcodes`] decodes and runs each opcode
//!    (`GLOBAL` asks the allow-list); [`calls`] interprets the allowed callables and
//!    `BUILD`; [`torch`] turns persistent ids and rebuild calls into storages, tensors and
//!    parameters.
#![forbid(unsafe_code)]

mod allowlist;
mod calls;
mod limits;
mod opcodes;
#[cfg(test)]
mod testutil;
mod torch;
mod vm;

use crate::dtype::DType;
use crate::format::ObjectGraph;

pub use limits::{MAX_DEPTH, MAX_INT_DIGITS, MAX_MEMO, MAX_NDIM, MAX_NODES, MAX_STACK};

/// A storage that the pickle refers to through a persistent id
/// `('storage', <storage class>, key, location, numel)` (legacy files add a sixth field,
/// `view_metadata`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    /// `None` for `torch.UntypedStorage` (numel counts bytes).
    pub dtype: Option<DType>,
    pub numel: u64,
    pub location: String,
    /// Legacy storage views (`view_metadata = (key, offset, size)`, written by torch
    /// before 1.0): `(index of the storage it views, byte offset in it)`. Such a storage
    /// has no data record of its own.
    pub view_of: Option<(usize, u64)>,
}

impl StorageRef {
    pub fn nbytes(&self) -> Option<u64> {
        self.numel
            .checked_mul(self.dtype.map_or(1, |d| d.size() as u64))
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PickleError {
    #[error("{message}")]
    Malformed { offset: u64, message: String },
    #[error("forbidden global {module}.{name}")]
    Forbidden {
        offset: u64,
        module: String,
        name: String,
    },
    #[error("{what}")]
    Unsupported { offset: u64, what: String },
}

impl PickleError {
    /// Byte position in data.pkl of the opcode that failed.
    pub fn offset(&self) -> u64 {
        match self {
            PickleError::Malformed { offset, .. }
            | PickleError::Forbidden { offset, .. }
            | PickleError::Unsupported { offset, .. } => *offset,
        }
    }
}

/// The result of running a torch `data.pkl`.
#[derive(Clone, Debug, PartialEq)]
pub struct Unpickled {
    pub objects: ObjectGraph,
    /// Unique storages, de-duplicated by key, in order of first use.
    pub storages: Vec<StorageRef>,
    /// Tensors; `Tensor::storage` indexes `storages`.
    pub tensors: Vec<crate::format::Tensor>,
}

/// Runs `data` (a whole pickle, up to and including STOP; bytes after STOP are ignored, as
/// Python does) and returns the object it builds.
pub fn unpickle(data: &[u8]) -> Result<Unpickled, PickleError> {
    vm::Vm::new(data).run()
}

/// Why `unpickle_prefix` failed.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixError {
    pub error: PickleError,
    /// The pickle needed bytes past the end of the slice: with more bytes it may load.
    pub ran_out: bool,
}

/// Runs the pickle at the start of `data` (which may hold more after it: a legacy
/// `torch.save` file is several pickles and then raw storage bytes) and returns what it
/// builds and how many bytes it took, up to and including its STOP. With `legacy`,
/// storages are the persistent ids of legacy (pre-zip) `torch.save` files.
pub fn unpickle_prefix(data: &[u8], legacy: bool) -> Result<(Unpickled, usize), PrefixError> {
    let mut vm = vm::Vm::new(data);
    vm.legacy = legacy;
    // `new` sizes the node table for a pickle as long as `data`; this one may be a few
    // bytes at the head of a long file.
    vm.nodes = Vec::new();
    let root = match vm.run_to_stop() {
        Ok(root) => root,
        Err(error) => {
            return Err(PrefixError {
                error,
                ran_out: vm.ran_out,
            })
        }
    };
    let used = vm.pos;
    match vm.finish(root) {
        Ok(u) => Ok((u, used)),
        Err(error) => Err(PrefixError {
            error,
            ran_out: false,
        }),
    }
}

type Res<T> = Result<T, PickleError>;

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    /// The layering stated at the top of this file: no module imports from its own layer
    /// or a layer below it (no import cycles between `vm`, `limits`, `allowlist`, `torch`).
    #[test]
    fn modules_import_only_from_the_layers_above() {
        let layer = |m: &str| match m {
            "limits" | "allowlist" => 1,
            "vm" => 2,
            "opcodes" | "calls" | "torch" => 3,
            _ => unreachable!("a module the layering does not name: {m}"),
        };
        let sources = [
            ("limits", include_str!("limits.rs")),
            ("allowlist", include_str!("allowlist.rs")),
            ("vm", include_str!("vm.rs")),
            ("opcodes", include_str!("opcodes.rs")),
            ("calls", include_str!("calls.rs")),
            ("torch", include_str!("torch.rs")),
        ];
        for (name, src) in sources {
            // Only the module's own code: its tests may use anything.
            let code = src.split("#[cfg(test)]").next().unwrap();
            for line in code.lines() {
                let Some(rest) = line.trim().strip_prefix("use super::") else {
                    continue;
                };
                let dep: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !rest[dep.len()..].starts_with("::") {
                    continue; // `use super::{Res, ..}`: the parent's items, not a module
                }
                assert!(
                    layer(&dep) < layer(name),
                    "{name}.rs imports {dep} from its own layer or a lower one: {line}"
                );
            }
        }
    }

    // ----- real torch.save vectors -----

    const STATE_DICT: &[u8] = include_bytes!("../../../tests/data/pickle/state_dict.pkl");
    const PARAMETER: &[u8] = include_bytes!("../../../tests/data/pickle/parameter.pkl");
    const TIED: &[u8] = include_bytes!("../../../tests/data/pickle/tied.pkl");
    const V3: &[u8] = include_bytes!("../../../tests/data/pickle/v3.pkl");
    const CHECKPOINT: &[u8] = include_bytes!("../../../tests/data/pickle/checkpoint.pkl");
    const PROTOCOL4: &[u8] = include_bytes!("../../../tests/data/pickle/protocol4.pkl");
    const VECTORS: [&[u8]; 6] = [STATE_DICT, PARAMETER, TIED, V3, CHECKPOINT, PROTOCOL4];

    #[test]
    fn real_state_dict() {
        let u = ok(STATE_DICT);
        assert_eq!(
            show_root(&u),
            "OrderedDict{'0.weight': T0, '0.bias': T1, '1.weight': T2, '1.bias': T3, \
             '1.running_mean': T4, '1.running_var': T5, '1.num_batches_tracked': T6}@{\
             _metadata=OrderedDict{'': {'version': 1}, '0': {'version': 1}, \
             '1': {'version': 2}}}"
        );
        let f = |s, shape: &[u64], strides: &[i64]| t(DType::F32, s, shape, strides, 0, false);
        assert_eq!(
            u.tensors,
            vec![
                f(0, &[2, 2], &[2, 1]),
                f(1, &[2], &[1]),
                f(2, &[2], &[1]),
                f(3, &[2], &[1]),
                f(4, &[2], &[1]),
                f(5, &[2], &[1]),
                t(DType::I64, 6, &[], &[], 0, false),
            ]
        );
        let keys: Vec<&str> = u.storages.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["0", "1", "2", "3", "4", "5", "6"]);
        assert_eq!(u.storages[0], sref("0", Some(DType::F32), 4));
        assert_eq!(u.storages[6], sref("6", Some(DType::I64), 1));
        assert_eq!(
            crate::format::flat_tensors(&u.objects).map(|v| v.len()),
            Some(7)
        );
    }

    #[test]
    fn real_parameters() {
        let u = ok(PARAMETER);
        assert_eq!(
            show_root(&u),
            "{'p': Param(T0, true), 'frozen': Param(T1, false)}"
        );
        assert_eq!(u.tensors[0], t(DType::F32, 0, &[2, 2], &[2, 1], 0, false));
        assert_eq!(u.tensors[1], t(DType::F32, 1, &[3], &[1], 0, false));
    }

    #[test]
    fn real_tied() {
        let u = ok(TIED);
        assert_eq!(
            show_root(&u),
            "{'a': T0, 'b': T0, 't': T1, 'row': T2, 'x': T3}"
        );
        assert_eq!(
            u.storages,
            vec![
                sref("0", Some(DType::F32), 6),
                sref("1", Some(DType::F32), 0)
            ]
        );
        assert_eq!(
            u.tensors,
            vec![
                t(DType::F32, 0, &[2, 3], &[3, 1], 0, false),
                t(DType::F32, 0, &[3, 2], &[1, 3], 0, false),
                t(DType::F32, 0, &[3], &[1], 3, false),
                t(DType::F32, 1, &[0], &[1], 0, false),
            ]
        );
    }

    #[test]
    fn real_v3() {
        let u = ok(V3);
        assert_eq!(
            show_root(&u),
            "{'f8': T0, 'f8_tail': T1, 'u16': T2, 'bf16': T3}"
        );
        assert_eq!(
            u.storages,
            vec![
                sref("0", None, 6),
                sref("1", None, 6),
                sref("2", Some(DType::BF16), 2)
            ]
        );
        assert_eq!(
            u.tensors,
            vec![
                t(DType::F8E4M3FN, 0, &[2, 3], &[3, 1], 0, false),
                t(DType::F8E4M3FN, 0, &[3], &[1], 3, false),
                t(DType::U16, 1, &[3], &[1], 0, false),
                t(DType::BF16, 2, &[2], &[1], 0, false),
            ]
        );
    }

    #[test]
    fn real_checkpoint() {
        let u = ok(CHECKPOINT);
        assert_eq!(
            show_root(&u),
            "{'epoch': 3, 'lr': 0.001, 'neg': -70000, 'name': 'run-é', \
             'blob': b'\\x00\\xffab', 'size': Size[2, 3], 'tup': (1, 'a', None), \
             'nested': {'a': {'b': [1, 2.5]}, 7: 'int key'}, \
             'big': big[00, 00, 00, 00, 00, 00, 00, 00, 00, 00, 00, 00, 10], \
             'neg_big': big[00, 00, 00, 00, 00, 00, 00, 00, c0], 'set': set{1, 2}, \
             'flags': [None, True, False], 'device': device(cuda:0), 'cpu': device(cpu), \
             'dtype': torch.bfloat16, 'complex': (1.0+2.0j), 'bytearray': bytearray(b'xy'), \
             'counter': Counter{'a': 2}, 'step': T0}"
        );
        assert_eq!(u.tensors, vec![t(DType::I64, 0, &[], &[], 0, false)]);
    }

    #[test]
    fn real_protocol4() {
        let u = ok(PROTOCOL4);
        assert_eq!(
            show_root(&u),
            "{'w': T0, 'blob': b'\\x01\\x02', 's': set{3}, 'fs': frozenset{4}, \
             'big': big[00, 00, 00, 00, 00, 00, 00, 00, 00, 00, 00, 00, 10]}"
        );
        assert_eq!(u.tensors, vec![t(DType::F16, 0, &[2], &[1], 0, false)]);
    }

    #[test]
    fn truncation_at_every_position_fails_cleanly() {
        for v in VECTORS {
            for n in 0..v.len() {
                let e = unpickle(&v[..n]).expect_err("a truncated pickle must not load");
                assert!(e.offset() <= n as u64, "{e:?} at {n}");
            }
        }
    }

    #[test]
    fn byte_flips_never_panic() {
        // Every position of every vector, a handful of values; plus all 256 values on the
        // head of the state dict (its OrderedDict and first tensor). The result may load (a
        // flipped digit) or not; it must not panic. (The fuzz targets go much further.)
        for v in VECTORS {
            let mut buf = v.to_vec();
            for i in 0..buf.len() {
                let orig = buf[i];
                for x in [0x00u8, 0x01, 0x7f, 0x80, 0xff, orig ^ 0x01, orig ^ 0x20] {
                    buf[i] = x;
                    let _ = unpickle(&buf);
                }
                buf[i] = orig;
            }
        }
        let mut buf = STATE_DICT.to_vec();
        for i in 0..160 {
            let orig = buf[i];
            for x in 0..=255u8 {
                buf[i] = x;
                let _ = unpickle(&buf);
            }
            buf[i] = orig;
        }
    }
}
