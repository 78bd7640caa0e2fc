//! Test helpers shared by the VM's unit tests: a tiny pickle assembler and renderers.

pub(super) use super::opcodes::op;
use super::*;
use crate::format::{ObjId, Tensor, Value};

// ----- a tiny pickle assembler -----

/// Builds a pickle opcode by opcode.
#[derive(Clone, Default)]
pub(crate) struct P(pub(crate) Vec<u8>);

impl P {
    /// Starts with `PROTO 2`, as torch.save writes.
    pub(crate) fn new() -> P {
        P(vec![op::PROTO, 2])
    }
    /// Starts with nothing (protocol 0/1 pickles have no PROTO).
    pub(crate) fn bare() -> P {
        P(Vec::new())
    }
    pub(crate) fn op(mut self, code: u8) -> P {
        self.0.push(code);
        self
    }
    pub(crate) fn raw(mut self, b: &[u8]) -> P {
        self.0.extend_from_slice(b);
        self
    }
    pub(crate) fn op_arg(self, code: u8, arg: &[u8]) -> P {
        self.op(code).raw(arg)
    }
    /// An int the way CPython's pickler writes it.
    pub(crate) fn int(self, v: i64) -> P {
        if (0..256).contains(&v) {
            self.op_arg(op::BININT1, &[v as u8])
        } else if (0..65536).contains(&v) {
            self.op_arg(op::BININT2, &(v as u16).to_le_bytes())
        } else if i32::try_from(v).is_ok() {
            self.op_arg(op::BININT, &(v as i32).to_le_bytes())
        } else {
            let b = v.to_le_bytes();
            self.op_arg(op::LONG1, &[8]).raw(&b)
        }
    }
    pub(crate) fn str(self, s: &str) -> P {
        self.op_arg(op::BINUNICODE, &(s.len() as u32).to_le_bytes())
            .raw(s.as_bytes())
    }
    pub(crate) fn float(self, f: f64) -> P {
        self.op_arg(op::BINFLOAT, &f.to_be_bytes())
    }
    pub(crate) fn global(self, module: &str, name: &str) -> P {
        self.op(op::GLOBAL)
            .raw(module.as_bytes())
            .raw(b"\n")
            .raw(name.as_bytes())
            .raw(b"\n")
    }
    pub(crate) fn put(self, i: u8) -> P {
        self.op_arg(op::BINPUT, &[i])
    }
    pub(crate) fn get(self, i: u8) -> P {
        self.op_arg(op::BINGET, &[i])
    }
    pub(crate) fn none(self) -> P {
        self.op(op::NONE)
    }
    pub(crate) fn mark(self) -> P {
        self.op(op::MARK)
    }
    pub(crate) fn tuple(self) -> P {
        self.op(op::TUPLE)
    }
    pub(crate) fn reduce(self) -> P {
        self.op(op::REDUCE)
    }
    pub(crate) fn empty_tuple(self) -> P {
        self.op(op::EMPTY_TUPLE)
    }
    pub(crate) fn ordered_dict(self) -> P {
        self.global("collections", "OrderedDict")
            .empty_tuple()
            .reduce()
    }
    /// `('storage', torch.<class>, key, 'cpu', numel)` then BINPERSID.
    pub(crate) fn storage(self, class: &str, key: &str, numel: i64) -> P {
        let (module, name) = class.rsplit_once('.').unwrap();
        self.mark()
            .str("storage")
            .global(module, name)
            .str(key)
            .str("cpu")
            .int(numel)
            .tuple()
            .op(op::BINPERSID)
    }
    pub(crate) fn ints(mut self, v: &[i64]) -> P {
        self = self.mark();
        for &i in v {
            self = self.int(i);
        }
        self.tuple()
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
    pub(crate) fn tensor_v2(
        self,
        class: &str,
        key: &str,
        numel: i64,
        off: i64,
        size: &[i64],
        stride: &[i64],
    ) -> P {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .storage(class, key, numel)
            .int(off)
            .ints(size)
            .ints(stride)
            .op(op::NEWFALSE)
            .ordered_dict()
            .tuple()
            .reduce()
    }
    pub(crate) fn stop(self) -> Vec<u8> {
        self.op(op::STOP).0
    }
}

pub(crate) fn ok(p: &[u8]) -> Unpickled {
    match unpickle(p) {
        Ok(u) => u,
        Err(e) => panic!("unpickle failed: {e:?}"),
    }
}

pub(crate) fn err(p: &[u8]) -> PickleError {
    match unpickle(p) {
        Ok(u) => panic!("unpickle succeeded: {}", show_root(&u)),
        Err(e) => e,
    }
}

pub(crate) fn malformed(p: &[u8]) -> (u64, String) {
    match err(p) {
        PickleError::Malformed { offset, message } => (offset, message),
        e => panic!("expected Malformed, got {e:?}"),
    }
}

pub(crate) fn unsupported(p: &[u8]) -> String {
    match err(p) {
        PickleError::Unsupported { what, .. } => what,
        e => panic!("expected Unsupported, got {e:?}"),
    }
}

/// A Python-like rendering of a node (tests only: small graphs, recursion is fine).
pub(crate) fn show(u: &Unpickled, id: ObjId) -> String {
    let g = &u.objects;
    let list = |ids: &[ObjId]| {
        ids.iter()
            .map(|&i| show(u, i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let pairs = |p: &[(ObjId, ObjId)]| {
        p.iter()
            .map(|&(k, v)| format!("{}: {}", show(u, k), show(u, v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &g.nodes[id] {
        Value::None => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Int(i) => i.to_string(),
        Value::BigInt(b) => format!("big{b:02x?}"),
        Value::Float(f) => format!("{f:?}"),
        Value::Complex(r, i) => format!("({r:?}+{i:?}j)"),
        Value::Str(s) => format!("'{s}'"),
        Value::Bytes(b) => format!("b'{}'", b.escape_ascii()),
        Value::ByteArray(b) => format!("bytearray(b'{}')", b.escape_ascii()),
        Value::Tuple(x) if x.len() == 1 => format!("({},)", list(x)),
        Value::Tuple(x) => format!("({})", list(x)),
        Value::List(x) => format!("[{}]", list(x)),
        Value::Set(x) => format!("set{{{}}}", list(x)),
        Value::FrozenSet(x) => format!("frozenset{{{}}}", list(x)),
        Value::Dict(p) => format!("{{{}}}", pairs(p)),
        Value::OrderedDict { items, attrs } if attrs.is_empty() => {
            format!("OrderedDict{{{}}}", pairs(items))
        }
        Value::OrderedDict { items, attrs } => format!(
            "OrderedDict{{{}}}@{{{}}}",
            pairs(items),
            attrs
                .iter()
                .map(|(k, v)| format!("{k}={}", show(u, *v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Counter(p) => format!("Counter{{{}}}", pairs(p)),
        Value::Size(s) => format!("Size{s:?}"),
        Value::Device(d) => format!("device({d})"),
        Value::DType(d) => d.to_string(),
        Value::Storage(i) => format!("S{i}"),
        Value::Tensor(i) => format!("T{i}"),
        Value::Parameter {
            tensor,
            requires_grad,
        } => format!("Param({}, {requires_grad})", show(u, *tensor)),
    }
}

pub(crate) fn show_root(u: &Unpickled) -> String {
    show(u, u.objects.root)
}

pub(crate) fn run(p: &[u8]) -> String {
    show_root(&ok(p))
}

pub(crate) fn t(
    dtype: DType,
    storage: usize,
    shape: &[u64],
    strides: &[i64],
    off: u64,
    rg: bool,
) -> Tensor {
    Tensor {
        storage,
        dtype,
        shape: shape.to_vec(),
        strides: strides.to_vec(),
        storage_offset: off,
        requires_grad: rg,
    }
}

pub(crate) fn sref(key: &str, dtype: Option<DType>, numel: u64) -> StorageRef {
    StorageRef {
        key: key.into(),
        dtype,
        numel,
        location: "cpu".into(),
        view_of: None,
    }
}

pub(crate) fn forbidden(p: &[u8]) -> (u64, String, String) {
    match err(p) {
        PickleError::Forbidden {
            offset,
            module,
            name,
        } => (offset, module, name),
        e => panic!("expected Forbidden, got {e:?}"),
    }
}
