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
#![forbid(unsafe_code)]

use std::collections::HashMap;

use crate::dtype::DType;
use crate::format::{ObjId, ObjectGraph, Tensor, Value};

/// Most nodes (objects) a pickle may create.
pub const MAX_NODES: usize = 1 << 24;
/// Most entries on the VM stack at once.
pub const MAX_STACK: usize = 1 << 24;
/// Most memo entries.
pub const MAX_MEMO: usize = 1 << 24;
/// Deepest MARK nesting, and deepest nesting of containers in the result.
pub const MAX_DEPTH: usize = 512;
/// Most dimensions of a tensor.
pub const MAX_NDIM: usize = 64;
/// Longest decimal integer (INT / LONG opcodes), Python's own default limit.
pub const MAX_INT_DIGITS: usize = 4300;
/// Work budget for opcodes that copy existing data: this many units per input byte...
const WORK_PER_BYTE: usize = 16;
/// ...plus this many.
const WORK_BASE: usize = 1 << 20;
/// Longest module or name quoted in an error message.
const MAX_QUOTED: usize = 200;

/// A storage that the pickle refers to through a persistent id
/// `('storage', <storage class>, key, location, numel)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    /// `None` for `torch.UntypedStorage` (numel counts bytes).
    pub dtype: Option<DType>,
    pub numel: u64,
    pub location: String,
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
    Vm::new(data).run()
}

type Res<T> = Result<T, PickleError>;

/// Opcode bytes (CPython `Lib/pickle.py`).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    // Protocol 2.
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    // Protocol 3.
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    // Protocol 4.
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    // Protocol 5.
    pub const BYTEARRAY8: u8 = 0x96;
    pub const NEXT_BUFFER: u8 = 0x97;
    pub const READONLY_BUFFER: u8 = 0x98;
}

/// The pickle name of an opcode we refuse, for error messages.
fn refused_opcode_name(code: u8) -> Option<&'static str> {
    Some(match code {
        op::PERSID => "PERSID (text persistent id)",
        op::STRING => "STRING (protocol 0 quoted string)",
        op::INST => "INST",
        op::OBJ => "OBJ",
        op::EXT1 => "EXT1",
        op::EXT2 => "EXT2",
        op::EXT4 => "EXT4",
        op::NEXT_BUFFER => "NEXT_BUFFER (out-of-band buffer)",
        op::READONLY_BUFFER => "READONLY_BUFFER",
        _ => return None,
    })
}

/// A tensor rebuild function of `torch._utils`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rebuild {
    /// `_rebuild_tensor(storage, offset, size, stride)`.
    V1,
    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    V2,
    /// `_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, md])`.
    V3,
    /// `_rebuild_parameter(tensor, requires_grad, hooks)`.
    Parameter,
    /// `_rebuild_parameter_with_state(tensor, requires_grad, hooks, state)`.
    ParameterWithState,
}

/// An allowed global, as the VM interprets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    Counter,
    Rebuild(Rebuild),
    RebuildFromTypeV2,
    /// `torch.Tensor` (the class).
    TensorType,
    /// `torch.nn.parameter.Parameter` (the class).
    ParameterType,
    Size,
    Device,
    /// A storage class; `None` is `torch.storage.UntypedStorage`.
    StorageClass(Option<DType>),
    /// `_codecs.encode`.
    Encode,
    Set,
    FrozenSet,
    Complex,
    ByteArray,
    Bytes,
}

impl Global {
    fn name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::Counter => "collections.Counter".into(),
            Global::Rebuild(r) => format!(
                "torch._utils.{}",
                match r {
                    Rebuild::V1 => "_rebuild_tensor",
                    Rebuild::V2 => "_rebuild_tensor_v2",
                    Rebuild::V3 => "_rebuild_tensor_v3",
                    Rebuild::Parameter => "_rebuild_parameter",
                    Rebuild::ParameterWithState => "_rebuild_parameter_with_state",
                }
            ),
            Global::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2".into(),
            Global::TensorType => "torch.Tensor".into(),
            Global::ParameterType => "torch.nn.parameter.Parameter".into(),
            Global::Size => "torch.Size".into(),
            Global::Device => "torch.device".into(),
            Global::StorageClass(None) => "torch.storage.UntypedStorage".into(),
            Global::StorageClass(Some(d)) => format!("the storage class of {d}"),
            Global::Encode => "_codecs.encode".into(),
            Global::Set => "builtins.set".into(),
            Global::FrozenSet => "builtins.frozenset".into(),
            Global::Complex => "builtins.complex".into(),
            Global::ByteArray => "builtins.bytearray".into(),
            Global::Bytes => "builtins.bytes".into(),
        }
    }
}

/// What a GLOBAL resolves to.
#[derive(Debug, PartialEq)]
enum Resolved {
    Global(Global),
    /// `torch.float32` and friends are plain values.
    DType(DType),
}

/// Why a GLOBAL is refused.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// Not on the allow-list.
    Forbidden,
    /// A torch object we recognize but do not load; the message says what it is.
    Unsupported(&'static str),
}

/// Dtype names torch allow-lists that zeroload has no `DType` for.
const UNSUPPORTED_DTYPES: &[&str] = &[
    "qint8",
    "qint32",
    "quint8",
    "quint4x2",
    "quint2x4",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "bcomplex32",
    "float4_e2m1fn_x2",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
];

/// Resolves `module.name` against the allow-list. Never imports or calls anything.
fn resolve(module: &str, name: &str) -> Result<Resolved, Refusal> {
    use Refusal::Unsupported as U;
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("collections", "Counter") => Global::Counter,
        ("torch._utils", n) => {
            match n {
                "_rebuild_tensor" => Global::Rebuild(Rebuild::V1),
                "_rebuild_tensor_v2" => Global::Rebuild(Rebuild::V2),
                "_rebuild_tensor_v3" => Global::Rebuild(Rebuild::V3),
                "_rebuild_parameter" => Global::Rebuild(Rebuild::Parameter),
                "_rebuild_parameter_with_state" => Global::Rebuild(Rebuild::ParameterWithState),
                "_rebuild_sparse_tensor" | "_rebuild_sparse_csr" => {
                    return Err(U("sparse tensors are not supported"))
                }
                "_rebuild_qtensor" => return Err(U("quantized tensors are not supported")),
                "_rebuild_nested_tensor" => return Err(U("nested tensors are not supported")),
                "_rebuild_meta_tensor_no_storage" => return Err(U(
                    "tensors saved from the meta device (shape only, no data) are not supported",
                )),
                "_rebuild_wrapper_subclass" => {
                    return Err(U(
                        "tensor subclasses without storage (wrapper subclasses, DTensor, \
                     FakeTensor) are not supported",
                    ))
                }
                "_rebuild_device_tensor_from_numpy" | "_rebuild_device_tensor_from_cpu_tensor" => {
                    return Err(U(
                        "tensors saved from devices without storage (XLA, MTIA, ...) are not \
                     supported",
                    ))
                }
                _ => return Err(Refusal::Forbidden),
            }
        }
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch._tensor", "Tensor") | ("torch", "Tensor") => Global::TensorType,
        ("torch.nn.parameter", "Parameter") => Global::ParameterType,
        ("torch", "Size") => Global::Size,
        ("torch", "device") => Global::Device,
        ("torch.storage", "UntypedStorage") | ("torch", "UntypedStorage") => {
            Global::StorageClass(None)
        }
        ("torch.storage", "TypedStorage") | ("torch", "TypedStorage") => {
            return Err(U(
                "a persistent id naming torch.storage.TypedStorage (not a concrete storage \
                 class) is not supported",
            ))
        }
        ("torch" | "torch.cuda", n) if n.ends_with("Storage") => {
            if let Some(d) = DType::from_storage_class(n) {
                Global::StorageClass(Some(d))
            } else if n.starts_with("QInt") || n.starts_with("QUInt") {
                return Err(U("quantized tensors are not supported"));
            } else {
                return Err(Refusal::Forbidden);
            }
        }
        ("torch", n) => {
            if let Some(d) = DType::ALL.into_iter().find(|d| d.torch_name() == n) {
                return Ok(Resolved::DType(d));
            }
            if UNSUPPORTED_DTYPES.contains(&n) {
                return Err(U(
                    "this dtype (quantized, bits, sub-byte or float4) is not supported",
                ));
            }
            match n {
                "per_tensor_affine"
                | "per_tensor_symmetric"
                | "per_channel_affine"
                | "per_channel_symmetric"
                | "per_channel_affine_float_qparams" => {
                    return Err(U("quantized tensors are not supported"))
                }
                _ if n.ends_with("Tensor")
                    && DType::from_storage_class(&format!(
                        "{}Storage",
                        &n[..n.len() - "Tensor".len()]
                    ))
                    .is_some() =>
                {
                    return Err(U(
                        "legacy tensor type objects (torch.FloatTensor, ...) are not supported",
                    ))
                }
                _ => return Err(Refusal::Forbidden),
            }
        }
        ("torch.serialization", "_get_layout") => {
            return Err(U("sparse tensors are not supported"))
        }
        (m, _) if m == "torch.distributed.tensor" || m.starts_with("torch.distributed.") => {
            if m.starts_with("torch.distributed.tensor") || m == "torch.distributed.device_mesh" {
                return Err(U("DTensors (torch.distributed.tensor) are not supported"));
            }
            return Err(Refusal::Forbidden);
        }
        ("_codecs", "encode") => Global::Encode,
        ("builtins", "set") => Global::Set,
        ("builtins", "frozenset") => Global::FrozenSet,
        ("builtins", "complex") => Global::Complex,
        ("builtins", "bytearray") => Global::ByteArray,
        ("builtins", "bytes") => Global::Bytes,
        _ => return Err(Refusal::Forbidden),
    };
    Ok(Resolved::Global(g))
}

/// Cuts a string quoted in an error message to a sane length.
fn clip(s: &str) -> String {
    if s.len() <= MAX_QUOTED {
        return s.to_string();
    }
    let mut end = MAX_QUOTED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The pickle memo: dense for the sequential indices every writer uses, sparse otherwise
/// (a LONG_BINPUT index may be anything up to 2^32; PUT's even more).
#[derive(Default)]
struct Memo {
    dense: Vec<Option<ObjId>>,
    sparse: HashMap<u64, ObjId>,
    count: usize,
}

impl Memo {
    fn get(&self, i: u64) -> Option<ObjId> {
        match usize::try_from(i) {
            Ok(u) if u < self.dense.len() => self.dense.get(u).copied().flatten(),
            _ => self.sparse.get(&i).copied(),
        }
    }

    /// Whether `i` holds nothing yet.
    fn is_free(&self, i: u64) -> bool {
        self.get(i).is_none()
    }

    fn put(&mut self, i: u64, v: ObjId) {
        let len = self.dense.len() as u64;
        if i < len {
            // `i < len <= usize::MAX`.
            let slot = &mut self.dense[i as usize];
            if slot.is_none() {
                self.count += 1;
            }
            *slot = Some(v);
        } else if i == len {
            self.dense.push(Some(v));
            self.count += 1;
            // Sparse keys are always above the dense length; pull in the ones that now fit.
            while !self.sparse.is_empty() {
                match self.sparse.remove(&(self.dense.len() as u64)) {
                    Some(next) => self.dense.push(Some(next)),
                    None => break,
                }
            }
        } else if self.sparse.insert(i, v).is_none() {
            self.count += 1;
        }
    }
}

/// Extra facts about some nodes, keyed by node id. Ids are handed out in increasing order
/// and facts are recorded right when a node is made, so a sorted `Vec` does (no hashing).
struct SideTable<T>(Vec<(ObjId, T)>);

impl<T> Default for SideTable<T> {
    fn default() -> Self {
        SideTable(Vec::new())
    }
}

impl<T> SideTable<T> {
    /// Records a fact about `id`, which must be newer than every id recorded so far.
    fn insert(&mut self, id: ObjId, v: T) {
        debug_assert!(self.0.last().is_none_or(|&(last, _)| last < id));
        self.0.push((id, v));
    }

    fn get(&self, id: &ObjId) -> Option<&T> {
        self.0
            .binary_search_by_key(id, |&(k, _)| k)
            .ok()
            .map(|i| &self.0[i].1)
    }
}

/// One BINPERSID reference to a storage: which storage, and with which dtype this
/// reference views it (torch re-wraps a cached storage in the dtype each reference asks
/// for, so a `_rebuild_tensor_v2` uses the dtype of its own persistent id).
#[derive(Clone, Copy, Debug)]
struct StorageUse {
    index: usize,
    /// `None`: `UntypedStorage` (a v2 tensor on it is uint8).
    dtype: Option<DType>,
}

/// Whether torch lets a tensor of this dtype require gradients.
fn can_require_grad(d: DType) -> bool {
    d.is_floating_point() || matches!(d, DType::C32 | DType::C64 | DType::C128)
}

/// The i-th child of a node, in a fixed order, for walking the graph without recursion.
fn child(v: &Value, i: usize) -> Option<ObjId> {
    match v {
        Value::Tuple(x) | Value::List(x) | Value::Set(x) | Value::FrozenSet(x) => x.get(i).copied(),
        Value::Dict(p) | Value::Counter(p) => {
            p.get(i / 2)
                .map(|&(k, v)| if i.is_multiple_of(2) { k } else { v })
        }
        Value::OrderedDict { items, attrs } => {
            let n = items.len().saturating_mul(2);
            if i < n {
                items
                    .get(i / 2)
                    .map(|&(k, v)| if i.is_multiple_of(2) { k } else { v })
            } else {
                attrs.get(i - n).map(|(_, v)| *v)
            }
        }
        Value::Parameter { tensor, .. } => (i == 0).then_some(*tensor),
        _ => None,
    }
}

/// A short name of a node's type for error messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) | Value::BigInt(_) => "int",
        Value::Float(_) => "float",
        Value::Complex(..) => "complex",
        Value::Str(_) => "str",
        Value::Bytes(_) => "bytes",
        Value::ByteArray(_) => "bytearray",
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Set(_) => "set",
        Value::FrozenSet(_) => "frozenset",
        Value::Dict(_) => "dict",
        Value::OrderedDict { .. } => "OrderedDict",
        Value::Counter(_) => "Counter",
        Value::Size(_) => "torch.Size",
        Value::Device(_) => "torch.device",
        Value::DType(_) => "torch.dtype",
        Value::Storage(_) => "storage",
        Value::Tensor(_) => "tensor",
        Value::Parameter { .. } => "Parameter",
    }
}

/// Minimal little-endian two's complement form (at least one byte unless empty).
fn minimal_le(b: &[u8]) -> &[u8] {
    let mut n = b.len();
    while n > 1 {
        let (last, prev) = (b[n - 1], b[n - 2]);
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            n -= 1;
        } else {
            break;
        }
    }
    &b[..n]
}

/// An int from little-endian two's complement bytes (LONG1 / LONG4).
fn int_from_le(bytes: &[u8]) -> Value {
    let b = minimal_le(bytes);
    match b.last() {
        None => Value::Int(0),
        Some(&last) if b.len() <= 8 => {
            let mut buf = [if last & 0x80 != 0 { 0xff } else { 0 }; 8];
            buf[..b.len()].copy_from_slice(b);
            Value::Int(i64::from_le_bytes(buf))
        }
        Some(_) => Value::BigInt(b.to_vec()),
    }
}

/// Parses a decimal integer as Python's `int()` would for what pickle writers produce
/// (optional surrounding whitespace, optional sign, digits). `None` if it is not one.
fn parse_decimal(text: &[u8]) -> Option<Value> {
    let t = text.trim_ascii();
    let (neg, digits) = match t.first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || digits.len() > MAX_INT_DIGITS || !digits.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    if digits.len() <= 18 {
        let v = digits
            .iter()
            .fold(0i64, |acc, &d| acc * 10 + i64::from(d - b'0'));
        return Some(Value::Int(if neg { -v } else { v }));
    }
    // Base 2^32 limbs, little-endian; 9 decimal digits at a time.
    let mut limbs: Vec<u32> = Vec::with_capacity(digits.len() / 9 + 2);
    for chunk in digits.chunks(9) {
        let mut mul: u64 = 1;
        let mut add: u64 = 0;
        for &d in chunk {
            mul *= 10;
            add = add * 10 + u64::from(d - b'0');
        }
        let mut carry = add;
        for limb in limbs.iter_mut() {
            let v = u64::from(*limb) * mul + carry;
            *limb = v as u32;
            carry = v >> 32;
        }
        if carry != 0 {
            limbs.push(carry as u32);
        }
    }
    let mut bytes: Vec<u8> = limbs.iter().flat_map(|l| l.to_le_bytes()).collect();
    bytes.push(0); // room for the sign bit
    if neg {
        let mut carry = true;
        for b in bytes.iter_mut() {
            let (v, c) = (!*b).overflowing_add(u8::from(carry));
            *b = v;
            carry = c;
        }
    }
    Some(int_from_le(&bytes))
}

/// Decodes Python's `raw-unicode-escape` (the UNICODE opcode): bytes are Latin-1 code
/// points, except `\uXXXX` and `\UXXXXXXXX` after an odd run of backslashes.
fn decode_raw_unicode_escape(b: &[u8]) -> Result<String, String> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c != b'\\' {
            out.push(char::from(c));
            i += 1;
            continue;
        }
        let run = b[i..].iter().take_while(|&&x| x == b'\\').count();
        let after = i + run;
        let kind = b.get(after).copied();
        if run % 2 == 1 && matches!(kind, Some(b'u' | b'U')) {
            for _ in 0..run - 1 {
                out.push('\\');
            }
            let n = if kind == Some(b'u') { 4 } else { 8 };
            let hex = b
                .get(after + 1..after + 1 + n)
                .ok_or_else(|| "truncated \\u escape in UNICODE".to_string())?;
            let hex = std::str::from_utf8(hex).map_err(|_| "bad \\u escape in UNICODE")?;
            let cp = u32::from_str_radix(hex, 16)
                .ok()
                .filter(|_| hex.bytes().all(|x| x.is_ascii_hexdigit()))
                .ok_or_else(|| "bad \\u escape in UNICODE".to_string())?;
            out.push(char::from_u32(cp).ok_or_else(|| {
                format!("UNICODE escape U+{cp:X} is a lone surrogate or out of range")
            })?);
            i = after + 1 + n;
        } else {
            for _ in 0..run {
                out.push('\\');
            }
            i = after;
        }
    }
    Ok(out)
}

/// Whether `s` looks like a torch device string ("cpu", "cuda", "cuda:0").
fn valid_device(s: &str) -> bool {
    let (ty, idx) = match s.split_once(':') {
        Some((t, i)) => (t, Some(i)),
        None => (s, None),
    };
    !ty.is_empty()
        && ty.len() <= 32
        && ty
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && idx
            .is_none_or(|i| !i.is_empty() && i.len() <= 9 && i.bytes().all(|b| b.is_ascii_digit()))
}

struct Vm<'a> {
    data: &'a [u8],
    /// Next byte to read.
    pos: usize,
    /// Offset of the opcode being run (what errors report).
    at: usize,
    nodes: Vec<Value>,
    stack: Vec<ObjId>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: Memo,
    /// Nodes that stand for a global (their `Value` is a `None` placeholder).
    globals: SideTable<Global>,
    /// Nodes made by BINPERSID.
    storage_uses: SideTable<StorageUse>,
    storages: Vec<StorageRef>,
    storage_by_key: HashMap<String, usize>,
    tensors: Vec<Tensor>,
    /// Work units left for opcodes that copy existing data.
    work_left: usize,
}

impl<'a> Vm<'a> {
    fn new(data: &'a [u8]) -> Self {
        Vm {
            data,
            pos: 0,
            at: 0,
            // torch's data.pkl makes about one node per 6 bytes.
            nodes: Vec::with_capacity((data.len() / 8).min(MAX_NODES)),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: Memo::default(),
            globals: SideTable::default(),
            storage_uses: SideTable::default(),
            storages: Vec::new(),
            storage_by_key: HashMap::new(),
            tensors: Vec::new(),
            work_left: data
                .len()
                .saturating_mul(WORK_PER_BYTE)
                .saturating_add(WORK_BASE),
        }
    }

    // ----- errors -----

    fn malformed(&self, message: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            offset: self.at as u64,
            message: message.into(),
        }
    }

    fn unsupported(&self, what: impl Into<String>) -> PickleError {
        PickleError::Unsupported {
            offset: self.at as u64,
            what: what.into(),
        }
    }

    fn limit(&self, what: &str, limit: usize) -> PickleError {
        self.malformed(format!(
            "the pickle exceeds zeroload's limit of {limit} {what}"
        ))
    }

    fn charge(&mut self, units: usize) -> Res<()> {
        match self.work_left.checked_sub(units) {
            Some(left) => {
                self.work_left = left;
                Ok(())
            }
            None => {
                Err(self.malformed("the pickle copies more data than its size allows (memo abuse)"))
            }
        }
    }

    // ----- reading -----

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The next `n` bytes; checks the length against what is left before anything else.
    fn take(&mut self, n: usize, what: &str) -> Res<&'a [u8]> {
        let data = self.data;
        match self.pos.checked_add(n) {
            Some(end) if end <= data.len() => {
                let s = &data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(self.malformed(format!(
                "truncated pickle: {what} needs {n} bytes but only {} are left",
                self.remaining()
            ))),
        }
    }

    /// `take` with a length read from the file (may claim anything up to 2^64).
    fn take_len(&mut self, n: u64, what: &str) -> Res<&'a [u8]> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => self.take(n, what),
            _ => Err(self.malformed(format!(
                "{what} claims {n} bytes but only {} are left in the pickle",
                self.remaining()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Res<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Res<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A newline-terminated argument (without the newline).
    fn line(&mut self, what: &str) -> Res<&'a [u8]> {
        let data = self.data;
        let rest = &data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            None => Err(self.malformed(format!(
                "truncated pickle: {what} argument has no terminating newline"
            ))),
        }
    }

    fn utf8(&self, b: &'a [u8], what: &str) -> Res<&'a str> {
        std::str::from_utf8(b).map_err(|e| {
            self.malformed(format!(
                "{what} is not valid UTF-8 ({e}; lone surrogates are not supported)"
            ))
        })
    }

    // ----- nodes and stack -----

    fn node(&mut self, v: Value) -> Res<ObjId> {
        if self.nodes.len() >= MAX_NODES {
            return Err(self.limit("objects", MAX_NODES));
        }
        self.nodes.push(v);
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, id: ObjId) -> Res<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.limit("stack entries", MAX_STACK));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, v: Value) -> Res<()> {
        let id = self.node(v)?;
        self.push(id)
    }

    /// Where the current MARK frame starts.
    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, what: &str) -> Res<ObjId> {
        if self.stack.len() <= self.base() {
            return Err(self.malformed(format!("stack underflow in {what}")));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed(format!("stack underflow in {what}")))
    }

    fn top(&self, what: &str) -> Res<ObjId> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.base() => Ok(id),
            _ => Err(self.malformed(format!("stack underflow in {what}"))),
        }
    }

    /// Closes the innermost MARK; its items are `stack[start..]`.
    fn pop_mark(&mut self, what: &str) -> Res<usize> {
        self.marks
            .pop()
            .ok_or_else(|| self.malformed(format!("{what} without a MARK")))
    }

    /// After `pop_mark`: the object just below the marked items (the container that
    /// APPENDS / SETITEMS / ADDITEMS extend).
    fn target_below(&self, start: usize, what: &str) -> Res<ObjId> {
        if start <= self.base() || start > self.stack.len() {
            return Err(self.malformed(format!("stack underflow in {what}")));
        }
        Ok(self.stack[start - 1])
    }

    fn val(&self, id: ObjId) -> &Value {
        // Every id on the stack, in the memo or in a container was returned by `node`.
        &self.nodes[id]
    }

    fn memo_put(&mut self, i: u64, what: &str) -> Res<()> {
        let top = self.top(what)?;
        if self.memo.is_free(i) && self.memo.count >= MAX_MEMO {
            return Err(self.limit("memo entries", MAX_MEMO));
        }
        self.memo.put(i, top);
        Ok(())
    }

    fn memo_get(&mut self, i: u64, what: &str) -> Res<()> {
        let id = self
            .memo
            .get(i)
            .ok_or_else(|| self.malformed(format!("{what} of memo entry {i}, which is empty")))?;
        self.push(id)
    }

    // ----- typed views of nodes -----

    fn int(&self, id: ObjId, what: &str) -> Res<i64> {
        match self.val(id) {
            Value::Int(i) => Ok(*i),
            Value::BigInt(_) => Err(self.malformed(format!("{what} is out of range"))),
            v => Err(self.malformed(format!("{what} must be an int, not {}", type_name(v)))),
        }
    }

    fn nonneg(&self, id: ObjId, what: &str) -> Res<u64> {
        let i = self.int(id, what)?;
        u64::try_from(i).map_err(|_| self.malformed(format!("{what} is negative ({i})")))
    }

    fn bool(&self, id: ObjId, what: &str) -> Res<bool> {
        match self.val(id) {
            Value::Bool(b) => Ok(*b),
            v => Err(self.malformed(format!("{what} must be a bool, not {}", type_name(v)))),
        }
    }

    fn str(&self, id: ObjId, what: &str) -> Res<&str> {
        match self.val(id) {
            Value::Str(s) => Ok(s),
            v => Err(self.malformed(format!("{what} must be a str, not {}", type_name(v)))),
        }
    }

    /// A str, or ASCII bytes (torch's `_maybe_decode_ascii`).
    fn str_or_ascii(&self, id: ObjId, what: &str) -> Res<&str> {
        match self.val(id) {
            Value::Str(s) => Ok(s),
            Value::Bytes(b) if b.is_ascii() => Ok(std::str::from_utf8(b).unwrap_or_default()),
            v => Err(self.malformed(format!("{what} must be a str, not {}", type_name(v)))),
        }
    }

    fn tuple(&self, id: ObjId, what: &str) -> Res<&[ObjId]> {
        match self.val(id) {
            Value::Tuple(items) => Ok(items),
            v => Err(self.malformed(format!("{what} must be a tuple, not {}", type_name(v)))),
        }
    }

    /// Items of a tuple, list, set or frozenset.
    fn seq(&self, id: ObjId) -> Option<&[ObjId]> {
        match self.val(id) {
            Value::Tuple(x) | Value::List(x) | Value::Set(x) | Value::FrozenSet(x) => Some(x),
            _ => None,
        }
    }

    /// Shape / stride: a tuple, list or torch.Size of ints.
    fn int_seq(&mut self, id: ObjId, what: &str) -> Res<Vec<i64>> {
        if let Value::Size(s) = self.val(id) {
            if s.len() > MAX_NDIM {
                return Err(self.unsupported(format!(
                    "{what} has {} dimensions; at most {MAX_NDIM} are supported",
                    s.len()
                )));
            }
            let s = s.clone();
            self.charge(s.len())?;
            return Ok(s);
        }
        let Some(items) = self.seq(id) else {
            return Err(self.malformed(format!(
                "{what} must be a tuple of ints, not {}",
                type_name(self.val(id))
            )));
        };
        if items.len() > MAX_NDIM {
            return Err(self.unsupported(format!(
                "{what} has {} dimensions; at most {MAX_NDIM} are supported",
                items.len()
            )));
        }
        let out = items
            .iter()
            .map(|&i| self.int(i, what))
            .collect::<Res<Vec<i64>>>()?;
        self.charge(out.len())?;
        Ok(out)
    }

    /// `backward_hooks`: must be empty (torch never saves hooks).
    fn check_hooks(&self, id: ObjId) -> Res<()> {
        match self.val(id) {
            Value::OrderedDict { items, .. } | Value::Dict(items) if items.is_empty() => Ok(()),
            Value::None => Ok(()),
            Value::OrderedDict { .. } | Value::Dict(_) => {
                Err(self.unsupported("tensors with saved backward hooks are not supported"))
            }
            v => Err(self.malformed(format!(
                "backward_hooks must be an OrderedDict, not {}",
                type_name(v)
            ))),
        }
    }

    /// Python object state that is "nothing": None, `{}`, or a `(dict, slots)` pair of those.
    fn is_empty_state(&self, id: ObjId) -> bool {
        let empty = |id: ObjId| match self.val(id) {
            Value::None => true,
            Value::Dict(x) | Value::OrderedDict { items: x, .. } => x.is_empty(),
            _ => false,
        };
        match self.val(id) {
            Value::Tuple(x) if x.len() == 2 => x.iter().all(|&i| empty(i)),
            _ => empty(id),
        }
    }

    // ----- the loop -----

    fn run(mut self) -> Res<Unpickled> {
        loop {
            self.at = self.pos;
            let Some(&code) = self.data.get(self.pos) else {
                return Err(self.malformed("truncated pickle: it ends without STOP"));
            };
            self.pos += 1;
            match code {
                op::PROTO => {
                    let v = self.u8("PROTO")?;
                    if v > 5 {
                        return Err(self.malformed(format!("unsupported pickle protocol {v}")));
                    }
                }
                op::FRAME => {
                    let n = self.u64("FRAME")?;
                    if usize::try_from(n).map_or(true, |n| n > self.remaining()) {
                        return Err(self.malformed(format!(
                            "FRAME claims {n} bytes but only {} are left",
                            self.remaining()
                        )));
                    }
                }
                op::STOP => {
                    let root = self.pop("STOP")?;
                    return self.finish(root);
                }
                op::MARK => {
                    if self.marks.len() >= MAX_DEPTH {
                        return Err(self.limit("nested MARKs", MAX_DEPTH));
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    if self.stack.len() > self.base() {
                        self.stack.pop();
                    } else if self.marks.pop().is_none() {
                        // Python's POP on an empty frame discards the MARK instead.
                        return Err(self.malformed("stack underflow in POP"));
                    }
                }
                op::POP_MARK => {
                    let start = self.pop_mark("POP_MARK")?;
                    self.stack.truncate(start);
                }
                op::DUP => {
                    let t = self.top("DUP")?;
                    self.push(t)?;
                }
                op::GLOBAL => {
                    let module = self.line("GLOBAL")?;
                    let name = self.line("GLOBAL")?;
                    let module = self.utf8(module, "GLOBAL module")?;
                    let name = self.utf8(name, "GLOBAL name")?;
                    self.global(module, name)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop("STACK_GLOBAL")?;
                    let module = self.pop("STACK_GLOBAL")?;
                    let module = self.str(module, "STACK_GLOBAL module")?.to_string();
                    let name = self.str(name, "STACK_GLOBAL name")?.to_string();
                    self.charge(module.len() + name.len())?;
                    self.global(&module, &name)?;
                }
                op::PUT => {
                    let l = self.line("PUT")?;
                    let i = self.text_index(l, "PUT")?;
                    self.memo_put(i, "PUT")?;
                }
                op::BINPUT => {
                    let i = self.u8("BINPUT")?;
                    self.memo_put(u64::from(i), "BINPUT")?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32("LONG_BINPUT")?;
                    self.memo_put(u64::from(i), "LONG_BINPUT")?;
                }
                op::MEMOIZE => {
                    let i = self.memo.count as u64;
                    self.memo_put(i, "MEMOIZE")?;
                }
                op::GET => {
                    let l = self.line("GET")?;
                    let i = self.text_index(l, "GET")?;
                    self.memo_get(i, "GET")?;
                }
                op::BINGET => {
                    let i = self.u8("BINGET")?;
                    self.memo_get(u64::from(i), "BINGET")?;
                }
                op::LONG_BINGET => {
                    let i = self.u32("LONG_BINGET")?;
                    self.memo_get(u64::from(i), "LONG_BINGET")?;
                }
                op::EMPTY_TUPLE => self.push_new(Value::Tuple(Vec::new()))?,
                op::TUPLE => {
                    let start = self.pop_mark("TUPLE")?;
                    let items = self.stack.split_off(start);
                    self.push_new(Value::Tuple(items))?;
                }
                op::TUPLE1 => {
                    let a = self.pop("TUPLE1")?;
                    self.push_new(Value::Tuple(vec![a]))?;
                }
                op::TUPLE2 => {
                    let b = self.pop("TUPLE2")?;
                    let a = self.pop("TUPLE2")?;
                    self.push_new(Value::Tuple(vec![a, b]))?;
                }
                op::TUPLE3 => {
                    let c = self.pop("TUPLE3")?;
                    let b = self.pop("TUPLE3")?;
                    let a = self.pop("TUPLE3")?;
                    self.push_new(Value::Tuple(vec![a, b, c]))?;
                }
                op::EMPTY_LIST => self.push_new(Value::List(Vec::new()))?,
                op::LIST => {
                    let start = self.pop_mark("LIST")?;
                    let items = self.stack.split_off(start);
                    self.push_new(Value::List(items))?;
                }
                op::APPEND => {
                    let v = self.pop("APPEND")?;
                    let target = self.top("APPEND")?;
                    let at = self.at;
                    match &mut self.nodes[target] {
                        Value::List(items) => items.push(v),
                        other => return Err(append_error(at, "APPEND", other)),
                    }
                }
                op::APPENDS => {
                    let start = self.pop_mark("APPENDS")?;
                    let target = self.target_below(start, "APPENDS")?;
                    let at = self.at;
                    let Vm { stack, nodes, .. } = &mut self;
                    match &mut nodes[target] {
                        Value::List(items) => items.extend(stack.drain(start..)),
                        other => return Err(append_error(at, "APPENDS", other)),
                    }
                }
                op::EMPTY_DICT => self.push_new(Value::Dict(Vec::new()))?,
                op::DICT => {
                    let start = self.pop_mark("DICT")?;
                    if !(self.stack.len() - start).is_multiple_of(2) {
                        return Err(self.malformed("DICT with an odd number of items"));
                    }
                    let pairs = self.stack[start..]
                        .chunks_exact(2)
                        .map(|c| (c[0], c[1]))
                        .collect();
                    self.stack.truncate(start);
                    self.push_new(Value::Dict(pairs))?;
                }
                op::SETITEM => {
                    let v = self.pop("SETITEM")?;
                    let k = self.pop("SETITEM")?;
                    let target = self.top("SETITEM")?;
                    let at = self.at;
                    match &mut self.nodes[target] {
                        Value::Dict(p)
                        | Value::OrderedDict { items: p, .. }
                        | Value::Counter(p) => p.push((k, v)),
                        other => return Err(setitem_error(at, "SETITEM", other)),
                    }
                }
                op::SETITEMS => {
                    let start = self.pop_mark("SETITEMS")?;
                    let target = self.target_below(start, "SETITEMS")?;
                    if !(self.stack.len() - start).is_multiple_of(2) {
                        return Err(self.malformed("SETITEMS with an odd number of items"));
                    }
                    let at = self.at;
                    let Vm { stack, nodes, .. } = &mut self;
                    match &mut nodes[target] {
                        Value::Dict(p)
                        | Value::OrderedDict { items: p, .. }
                        | Value::Counter(p) => {
                            p.extend(stack[start..].chunks_exact(2).map(|c| (c[0], c[1])))
                        }
                        other => return Err(setitem_error(at, "SETITEMS", other)),
                    }
                    stack.truncate(start);
                }
                op::EMPTY_SET => self.push_new(Value::Set(Vec::new()))?,
                op::ADDITEMS => {
                    let start = self.pop_mark("ADDITEMS")?;
                    let target = self.target_below(start, "ADDITEMS")?;
                    let at = self.at;
                    let Vm { stack, nodes, .. } = &mut self;
                    match &mut nodes[target] {
                        Value::Set(items) => items.extend(stack.drain(start..)),
                        other => {
                            return Err(PickleError::Malformed {
                                offset: at as u64,
                                message: format!(
                                    "ADDITEMS can only add to a set, not a {}",
                                    type_name(other)
                                ),
                            })
                        }
                    }
                }
                op::FROZENSET => {
                    let start = self.pop_mark("FROZENSET")?;
                    let items = self.stack.split_off(start);
                    self.push_new(Value::FrozenSet(items))?;
                }
                op::NONE => self.push_new(Value::None)?,
                op::NEWTRUE => self.push_new(Value::Bool(true))?,
                op::NEWFALSE => self.push_new(Value::Bool(false))?,
                op::INT => {
                    let l = self.line("INT")?;
                    let v = match l {
                        b"00" => Value::Bool(false),
                        b"01" => Value::Bool(true),
                        _ => parse_decimal(l).ok_or_else(|| {
                            self.malformed(format!(
                                "INT argument is not a decimal integer of at most \
                                 {MAX_INT_DIGITS} digits"
                            ))
                        })?,
                    };
                    self.push_new(v)?;
                }
                op::LONG => {
                    let l = self.line("LONG")?;
                    let l = l.strip_suffix(b"L").unwrap_or(l);
                    let v = parse_decimal(l).ok_or_else(|| {
                        self.malformed(format!(
                            "LONG argument is not a decimal integer of at most \
                             {MAX_INT_DIGITS} digits"
                        ))
                    })?;
                    self.push_new(v)?;
                }
                op::BININT => {
                    let v = i32::from_le_bytes(self.array("BININT")?);
                    self.push_new(Value::Int(i64::from(v)))?;
                }
                op::BININT1 => {
                    let v = self.u8("BININT1")?;
                    self.push_new(Value::Int(i64::from(v)))?;
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.array("BININT2")?);
                    self.push_new(Value::Int(i64::from(v)))?;
                }
                op::LONG1 => {
                    let n = self.u8("LONG1")?;
                    let b = self.take(usize::from(n), "LONG1")?;
                    self.push_new(int_from_le(b))?;
                }
                op::LONG4 => {
                    let n = i32::from_le_bytes(self.array("LONG4")?);
                    let n = u64::try_from(n)
                        .map_err(|_| self.malformed(format!("LONG4 with negative length {n}")))?;
                    let b = self.take_len(n, "LONG4")?;
                    self.push_new(int_from_le(b))?;
                }
                op::FLOAT => {
                    let l = self.line("FLOAT")?;
                    let v = std::str::from_utf8(l)
                        .ok()
                        .and_then(|s| s.trim_ascii().parse::<f64>().ok())
                        .ok_or_else(|| self.malformed("FLOAT argument is not a number"))?;
                    self.push_new(Value::Float(v))?;
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.array("BINFLOAT")?);
                    self.push_new(Value::Float(v))?;
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8("SHORT_BINUNICODE")?;
                    let b = self.take(usize::from(n), "SHORT_BINUNICODE")?;
                    self.push_str(b, "SHORT_BINUNICODE")?;
                }
                op::BINUNICODE => {
                    let n = self.u32("BINUNICODE")?;
                    let b = self.take_len(u64::from(n), "BINUNICODE")?;
                    self.push_str(b, "BINUNICODE")?;
                }
                op::BINUNICODE8 => {
                    let n = self.u64("BINUNICODE8")?;
                    let b = self.take_len(n, "BINUNICODE8")?;
                    self.push_str(b, "BINUNICODE8")?;
                }
                op::UNICODE => {
                    let l = self.line("UNICODE")?;
                    let s = decode_raw_unicode_escape(l).map_err(|m| self.malformed(m))?;
                    self.push_new(Value::Str(s))?;
                }
                // Python 2 `str`: torch.load decodes it with encoding="utf-8".
                op::SHORT_BINSTRING => {
                    let n = self.u8("SHORT_BINSTRING")?;
                    let b = self.take(usize::from(n), "SHORT_BINSTRING")?;
                    self.push_str(b, "SHORT_BINSTRING")?;
                }
                op::BINSTRING => {
                    let n = i32::from_le_bytes(self.array("BINSTRING")?);
                    let n = u64::try_from(n).map_err(|_| {
                        self.malformed(format!("BINSTRING with negative length {n}"))
                    })?;
                    let b = self.take_len(n, "BINSTRING")?;
                    self.push_str(b, "BINSTRING")?;
                }
                op::SHORT_BINBYTES => {
                    let n = self.u8("SHORT_BINBYTES")?;
                    let b = self.take(usize::from(n), "SHORT_BINBYTES")?;
                    self.push_new(Value::Bytes(b.to_vec()))?;
                }
                op::BINBYTES => {
                    let n = self.u32("BINBYTES")?;
                    let b = self.take_len(u64::from(n), "BINBYTES")?;
                    self.push_new(Value::Bytes(b.to_vec()))?;
                }
                op::BINBYTES8 => {
                    let n = self.u64("BINBYTES8")?;
                    let b = self.take_len(n, "BINBYTES8")?;
                    self.push_new(Value::Bytes(b.to_vec()))?;
                }
                op::BYTEARRAY8 => {
                    let n = self.u64("BYTEARRAY8")?;
                    let b = self.take_len(n, "BYTEARRAY8")?;
                    self.push_new(Value::ByteArray(b.to_vec()))?;
                }
                op::REDUCE => {
                    let args = self.pop("REDUCE")?;
                    let func = self.top("REDUCE")?;
                    let Some(&g) = self.globals.get(&func) else {
                        return Err(self.malformed(format!(
                            "REDUCE calls a {}, which is not an allowed callable",
                            type_name(self.val(func))
                        )));
                    };
                    let args = self.tuple(args, "REDUCE arguments")?.to_vec();
                    let result = self.call(g, &args)?;
                    if let Some(top) = self.stack.last_mut() {
                        *top = result;
                    }
                }
                op::NEWOBJ => {
                    let args = self.pop("NEWOBJ")?;
                    let cls = self.pop("NEWOBJ")?;
                    let result = self.newobj(cls, args, None)?;
                    self.push(result)?;
                }
                op::NEWOBJ_EX => {
                    let kwargs = self.pop("NEWOBJ_EX")?;
                    let args = self.pop("NEWOBJ_EX")?;
                    let cls = self.pop("NEWOBJ_EX")?;
                    let result = self.newobj(cls, args, Some(kwargs))?;
                    self.push(result)?;
                }
                op::BUILD => {
                    let state = self.pop("BUILD")?;
                    let inst = self.top("BUILD")?;
                    self.build(inst, state)?;
                }
                op::BINPERSID => {
                    let pid = self.pop("BINPERSID")?;
                    let id = self.persistent_load(pid)?;
                    self.push(id)?;
                }
                _ => {
                    return Err(match refused_opcode_name(code) {
                        Some(name) => self.unsupported(format!(
                            "pickle opcode {name} (0x{code:02x}) is not supported"
                        )),
                        None => self.malformed(format!("unknown pickle opcode 0x{code:02x}")),
                    })
                }
            }
        }
    }

    fn push_str(&mut self, b: &'a [u8], what: &str) -> Res<()> {
        let s = self.utf8(b, what)?;
        self.push_new(Value::Str(s.to_string()))
    }

    /// The decimal memo index of PUT / GET.
    fn text_index(&self, l: &[u8], what: &str) -> Res<u64> {
        let t = l.trim_ascii();
        if t.first() == Some(&b'-') {
            return Err(self.malformed(format!("negative {what} argument")));
        }
        std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| self.malformed(format!("{what} argument is not a memo index")))
    }

    fn global(&mut self, module: &str, name: &str) -> Res<()> {
        // fix_imports: protocol 2 pickles written by Python 3 use Python 2 module names.
        let module = match module {
            "__builtin__" => "builtins",
            "copy_reg" => "copyreg",
            m => m,
        };
        match resolve(module, name) {
            Ok(Resolved::DType(d)) => self.push_new(Value::DType(d)),
            Ok(Resolved::Global(g)) => {
                let id = self.node(Value::None)?;
                self.globals.insert(id, g);
                self.push(id)
            }
            Err(Refusal::Forbidden) => Err(PickleError::Forbidden {
                offset: self.at as u64,
                module: clip(module),
                name: clip(name),
            }),
            Err(Refusal::Unsupported(why)) => Err(self.unsupported(format!(
                "{why} (the pickle refers to {}.{})",
                clip(module),
                clip(name)
            ))),
        }
    }

    // ----- persistent ids -----

    fn persistent_load(&mut self, pid: ObjId) -> Res<ObjId> {
        let shape = "a persistent id must be ('storage', storage class, key, location, numel)";
        let Value::Tuple(items) = self.val(pid) else {
            return Err(self.malformed(format!("{shape}, not a {}", type_name(self.val(pid)))));
        };
        let &[tag, cls, key, location, numel] = items.as_slice() else {
            return Err(self.malformed(format!("{shape}; this one has {} fields", items.len())));
        };
        if self.str_or_ascii(tag, "persistent id type")? != "storage" {
            return Err(self.malformed(format!("{shape}; its first field is not 'storage'")));
        }
        let Some(&Global::StorageClass(dtype)) = self.globals.get(&cls) else {
            return Err(self.malformed(format!("{shape}; its second field is not a storage class")));
        };
        let numel = self.nonneg(numel, "storage numel")?;
        let elem = dtype.map_or(1, |d| d.size() as u64);
        let nbytes = numel
            .checked_mul(elem)
            .ok_or_else(|| self.malformed(format!("storage size {numel} x {elem} overflows")))?;
        let key_str = self.str_or_ascii(key, "storage key")?;
        self.str_or_ascii(location, "storage location")?;
        if key_str.is_empty() {
            return Err(self.malformed("empty storage key"));
        }
        let key_len = key_str.len();
        let known = self.storage_by_key.get(key_str).copied();
        self.charge(key_len)?;
        let index = match known {
            Some(i) => {
                let first = self.storages[i].nbytes();
                if first != Some(nbytes) {
                    return Err(self.malformed(format!(
                        "storage {:?} is referenced with {nbytes} bytes here but {} bytes \
                         before",
                        clip(&self.storages[i].key),
                        first.unwrap_or(0)
                    )));
                }
                i
            }
            None => {
                let key = self.str_or_ascii(key, "storage key")?.to_string();
                let location = self.str_or_ascii(location, "storage location")?.to_string();
                self.charge(location.len())?;
                let i = self.storages.len();
                self.storage_by_key.insert(key.clone(), i);
                self.storages.push(StorageRef {
                    key,
                    dtype,
                    numel,
                    location,
                });
                i
            }
        };
        let id = self.node(Value::Storage(index))?;
        self.storage_uses.insert(id, StorageUse { index, dtype });
        Ok(id)
    }

    // ----- calls -----

    fn arity(&self, g: Global, args: &[ObjId], min: usize, max: usize) -> Res<()> {
        if args.len() < min || args.len() > max {
            let want = if min == max {
                format!("{min}")
            } else {
                format!("{min} to {max}")
            };
            return Err(self.malformed(format!(
                "{} takes {want} arguments, got {}",
                g.name(),
                args.len()
            )));
        }
        Ok(())
    }

    /// Interprets a call of an allowed global on plain data; returns the result node.
    fn call(&mut self, g: Global, args: &[ObjId]) -> Res<ObjId> {
        let v = match g {
            Global::Rebuild(r @ (Rebuild::V1 | Rebuild::V2 | Rebuild::V3)) => {
                return self.rebuild_tensor(r, args)
            }
            Global::Rebuild(Rebuild::Parameter) => return self.rebuild_parameter(g, args, false),
            Global::Rebuild(Rebuild::ParameterWithState) => {
                return self.rebuild_parameter(g, args, true)
            }
            Global::RebuildFromTypeV2 => return self.rebuild_from_type_v2(args),
            Global::ParameterType => {
                // nn.Parameter(data, requires_grad=True)
                self.arity(g, args, 1, 2)?;
                let tensor = args[0];
                let Value::Tensor(t) = *self.val(tensor) else {
                    return Err(self.malformed("nn.Parameter wraps something that is not a tensor"));
                };
                let requires_grad = match args.get(1) {
                    Some(&r) => self.bool(r, "requires_grad")?,
                    None => true,
                };
                self.check_grad(t, requires_grad)?;
                Value::Parameter {
                    tensor,
                    requires_grad,
                }
            }
            Global::TensorType => {
                return Err(
                    self.unsupported("constructing a torch.Tensor directly is not supported")
                )
            }
            Global::StorageClass(_) => {
                return Err(self.unsupported(
                    "constructing a storage directly is not supported (storages come from \
                     persistent ids)",
                ))
            }
            Global::OrderedDict => {
                self.arity(g, args, 0, 1)?;
                let items = match args.first() {
                    None => Vec::new(),
                    Some(&a) => self.pairs_of(a, "OrderedDict")?,
                };
                Value::OrderedDict {
                    items,
                    attrs: Vec::new(),
                }
            }
            Global::Counter => {
                self.arity(g, args, 0, 1)?;
                let items = match args.first() {
                    None => Vec::new(),
                    Some(&a) => match self.val(a) {
                        Value::Dict(p)
                        | Value::OrderedDict { items: p, .. }
                        | Value::Counter(p) => {
                            let p = p.clone();
                            self.charge(p.len())?;
                            p
                        }
                        v => {
                            return Err(self.unsupported(format!(
                                "collections.Counter of a {} is not supported (only of a dict)",
                                type_name(v)
                            )))
                        }
                    },
                };
                Value::Counter(items)
            }
            Global::Size => {
                self.arity(g, args, 0, 1)?;
                match args.first() {
                    None => Value::Size(Vec::new()),
                    Some(&a) => Value::Size(self.size_items(a)?),
                }
            }
            Global::Device => self.device(args)?,
            Global::Encode => self.encode(args)?,
            Global::Set | Global::FrozenSet => {
                self.arity(g, args, 0, 1)?;
                let items = match args.first() {
                    None => Vec::new(),
                    Some(&a) => {
                        let Some(items) = self.seq(a) else {
                            return Err(self.unsupported(format!(
                                "{} of a {} is not supported",
                                g.name(),
                                type_name(self.val(a))
                            )));
                        };
                        let items = items.to_vec();
                        self.charge(items.len())?;
                        items
                    }
                };
                if g == Global::Set {
                    Value::Set(items)
                } else {
                    Value::FrozenSet(items)
                }
            }
            Global::Complex => {
                self.arity(g, args, 0, 2)?;
                let re = match args.first() {
                    Some(&a) => self.real(a)?,
                    None => 0.0,
                };
                let im = match args.get(1) {
                    Some(&a) => self.real(a)?,
                    None => 0.0,
                };
                Value::Complex(re, im)
            }
            Global::ByteArray | Global::Bytes => {
                self.arity(g, args, 0, 1)?;
                let bytes = match args.first() {
                    None => Vec::new(),
                    Some(&a) => self.bytes_of(g, a)?,
                };
                if g == Global::Bytes {
                    Value::Bytes(bytes)
                } else {
                    Value::ByteArray(bytes)
                }
            }
        };
        self.node(v)
    }

    /// `cls.__new__(cls, *args)` as torch's weights_only unpickler runs NEWOBJ.
    fn newobj(&mut self, cls: ObjId, args: ObjId, kwargs: Option<ObjId>) -> Res<ObjId> {
        let Some(&g) = self.globals.get(&cls) else {
            return Err(self.malformed(format!(
                "NEWOBJ on a {}, which is not an allowed class",
                type_name(self.val(cls))
            )));
        };
        let args = self.tuple(args, "NEWOBJ arguments")?.to_vec();
        if let Some(kw) = kwargs {
            match self.val(kw) {
                Value::Dict(p) if p.is_empty() => {}
                Value::Dict(_) => {
                    return Err(
                        self.unsupported("NEWOBJ_EX with keyword arguments is not supported")
                    )
                }
                v => {
                    return Err(self.malformed(format!(
                        "NEWOBJ_EX keyword arguments must be a dict, not {}",
                        type_name(v)
                    )))
                }
            }
        }
        match g {
            // `__new__` of these ignores its arguments (`__init__` would fill them).
            Global::OrderedDict => self.node(Value::OrderedDict {
                items: Vec::new(),
                attrs: Vec::new(),
            }),
            Global::Counter => self.node(Value::Counter(Vec::new())),
            Global::Set => self.node(Value::Set(Vec::new())),
            Global::ByteArray => self.node(Value::ByteArray(Vec::new())),
            // `__new__` of these builds the value.
            Global::ParameterType
            | Global::FrozenSet
            | Global::Complex
            | Global::Bytes
            | Global::Size => self.call(g, &args),
            _ => Err(self.unsupported(format!("NEWOBJ of {} is not supported", g.name()))),
        }
    }

    fn real(&self, id: ObjId) -> Res<f64> {
        match self.val(id) {
            Value::Float(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            Value::Bool(b) => Ok(f64::from(u8::from(*b))),
            v => Err(self.unsupported(format!("complex() of a {} is not supported", type_name(v)))),
        }
    }

    /// Items of `OrderedDict(x)`: a dict, or a sequence of (key, value) pairs.
    fn pairs_of(&mut self, id: ObjId, what: &str) -> Res<Vec<(ObjId, ObjId)>> {
        let pairs = match self.val(id) {
            Value::Dict(p) | Value::OrderedDict { items: p, .. } | Value::Counter(p) => p.clone(),
            Value::List(x) | Value::Tuple(x) => {
                let mut out = Vec::with_capacity(x.len());
                for &item in x {
                    match self.seq(item) {
                        Some(&[k, v])
                            if matches!(self.val(item), Value::Tuple(_) | Value::List(_)) =>
                        {
                            out.push((k, v))
                        }
                        _ => {
                            return Err(self.malformed(format!(
                                "{what}() of a sequence whose items are not (key, value) pairs"
                            )))
                        }
                    }
                }
                out
            }
            v => {
                return Err(
                    self.unsupported(format!("{what}() of a {} is not supported", type_name(v)))
                )
            }
        };
        self.charge(pairs.len())?;
        Ok(pairs)
    }

    fn size_items(&mut self, id: ObjId) -> Res<Vec<i64>> {
        let items: Vec<ObjId> = match self.val(id) {
            Value::Size(s) => {
                let s = s.clone();
                self.charge(s.len())?;
                return Ok(s);
            }
            Value::Tuple(x) | Value::List(x) => x.clone(),
            v => {
                return Err(self.malformed(format!(
                    "torch.Size() of a {}, not a tuple of ints",
                    type_name(v)
                )))
            }
        };
        self.charge(items.len())?;
        items
            .iter()
            .map(|&i| self.int(i, "torch.Size entry"))
            .collect()
    }

    fn bytes_of(&mut self, g: Global, id: ObjId) -> Res<Vec<u8>> {
        let out = match self.val(id) {
            Value::Bytes(b) | Value::ByteArray(b) => b.clone(),
            Value::List(x) | Value::Tuple(x) => x
                .iter()
                .map(|&i| match self.val(i) {
                    Value::Int(v) => u8::try_from(*v).map_err(|_| {
                        self.malformed(format!("{}() item {v} is not in 0..256", g.name()))
                    }),
                    v => Err(self.malformed(format!(
                        "{}() item is a {}, not an int",
                        g.name(),
                        type_name(v)
                    ))),
                })
                .collect::<Res<Vec<u8>>>()?,
            // bytes(n) / bytearray(n) would allocate n zero bytes on the file's say-so.
            v => {
                return Err(self.unsupported(format!(
                    "{}() of a {} is not supported",
                    g.name(),
                    type_name(v)
                )))
            }
        };
        self.charge(out.len())?;
        Ok(out)
    }

    /// `torch.device("cuda:0")`, `torch.device("cuda", 0)`, `torch.device("cpu")`.
    fn device(&mut self, args: &[ObjId]) -> Res<Value> {
        self.arity(Global::Device, args, 1, 2)?;
        let ty =
            match self.val(args[0]) {
                Value::Str(s) => s.as_str(),
                Value::Int(_) => return Err(self.unsupported(
                    "torch.device(<int>) (an accelerator index without a type) is not supported",
                )),
                v => {
                    return Err(
                        self.malformed(format!("torch.device() of a {}, not a str", type_name(v)))
                    )
                }
            };
        if !valid_device(ty) || (args.len() == 2 && ty.contains(':')) {
            return Err(self.malformed(format!("invalid torch.device string {:?}", clip(ty))));
        }
        let s = match args.get(1).map(|&i| self.val(i)) {
            None | Some(Value::None) => ty.to_string(),
            Some(Value::Int(i)) if (0..=i64::from(i32::MAX)).contains(i) => format!("{ty}:{i}"),
            Some(v) => {
                return Err(self.malformed(format!(
                    "torch.device index must be a non-negative int, not {}",
                    match v {
                        Value::Int(i) => i.to_string(),
                        v => type_name(v).to_string(),
                    }
                )))
            }
        };
        Ok(Value::Device(s))
    }

    /// `_codecs.encode(str, encoding="utf-8", errors="strict")`: how protocol 2 stores bytes.
    fn encode(&mut self, args: &[ObjId]) -> Res<Value> {
        self.arity(Global::Encode, args, 1, 3)?;
        let enc = match args.get(1) {
            Some(&e) => self
                .str(e, "_codecs.encode encoding")?
                .to_ascii_lowercase()
                .replace('-', "_"),
            None => "utf_8".into(),
        };
        if let Some(&e) = args.get(2) {
            if self.str(e, "_codecs.encode errors")? != "strict" {
                return Err(self.unsupported("_codecs.encode with errors other than 'strict'"));
            }
        }
        let s = self.str(args[0], "_codecs.encode argument")?;
        let len = s.len();
        let out: Vec<u8> = match enc.as_str() {
            "latin1" | "latin_1" | "iso_8859_1" | "iso8859_1" | "l1" => s
                .chars()
                .map(|c| u8::try_from(u32::from(c)))
                .collect::<Result<_, _>>()
                .map_err(|_| self.malformed("_codecs.encode: a character is not latin-1"))?,
            "ascii" | "us_ascii" => {
                if !s.is_ascii() {
                    return Err(self.malformed("_codecs.encode: a character is not ASCII"));
                }
                s.as_bytes().to_vec()
            }
            "utf_8" | "utf8" => s.as_bytes().to_vec(),
            _ => {
                return Err(self.unsupported(format!(
                    "_codecs.encode with encoding {:?} is not supported",
                    clip(&enc)
                )))
            }
        };
        self.charge(len)?;
        Ok(Value::Bytes(out))
    }

    fn check_grad(&self, tensor: usize, requires_grad: bool) -> Res<()> {
        let dtype = self.tensors[tensor].dtype;
        if requires_grad && !can_require_grad(dtype) {
            return Err(self.malformed(format!(
                "a {dtype} tensor cannot require gradients (only floating point and complex)"
            )));
        }
        Ok(())
    }

    /// `_rebuild_tensor`, `_rebuild_tensor_v2`, `_rebuild_tensor_v3`.
    fn rebuild_tensor(&mut self, r: Rebuild, args: &[ObjId]) -> Res<ObjId> {
        let g = Global::Rebuild(r);
        match r {
            Rebuild::V1 => self.arity(g, args, 4, 4)?,
            Rebuild::V2 => self.arity(g, args, 6, 7)?,
            _ => self.arity(g, args, 7, 8)?,
        }
        let Some(&StorageUse {
            index,
            dtype: storage_dtype,
        }) = self.storage_uses.get(&args[0])
        else {
            return Err(self.malformed(format!(
                "the first argument of {} is a {}, not a storage",
                g.name(),
                type_name(self.val(args[0]))
            )));
        };
        let storage_offset = self.nonneg(args[1], "storage_offset")?;
        let sizes = self.int_seq(args[2], "size")?;
        let strides = self.int_seq(args[3], "stride")?;
        if sizes.len() != strides.len() {
            return Err(self.malformed(format!(
                "tensor with {} sizes but {} strides",
                sizes.len(),
                strides.len()
            )));
        }
        let shape = sizes
            .iter()
            .map(|&s| u64::try_from(s))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|_| self.malformed(format!("negative tensor size in {sizes:?}")))?;
        if strides.iter().any(|&s| s < 0) {
            return Err(self.malformed(format!("negative tensor stride in {strides:?}")));
        }
        let (requires_grad, metadata) = match r {
            Rebuild::V1 => (false, None),
            _ => {
                self.check_hooks(args[5])?;
                let md = if r == Rebuild::V2 {
                    args.get(6)
                } else {
                    args.get(7)
                };
                (self.bool(args[4], "requires_grad")?, md.copied())
            }
        };
        let dtype = if r == Rebuild::V3 {
            match self.val(args[6]) {
                Value::DType(d) => *d,
                v => {
                    return Err(self.malformed(format!(
                        "the dtype argument of _rebuild_tensor_v3 is a {}",
                        type_name(v)
                    )))
                }
            }
        } else {
            // torch wraps an UntypedStorage in a uint8 TypedStorage.
            storage_dtype.unwrap_or(DType::U8)
        };
        if let Some(md) = metadata {
            self.check_metadata(md)?;
        }
        let t = self.tensors.len();
        self.tensors.push(Tensor {
            storage: index,
            dtype,
            shape,
            strides,
            storage_offset,
            requires_grad,
        });
        self.check_grad(t, requires_grad)?;
        self.node(Value::Tensor(t))
    }

    /// Tensor metadata (`{"conj": True}`, `{"neg": True}`): only "no bits set" is loadable.
    fn check_metadata(&self, id: ObjId) -> Res<()> {
        let items = match self.val(id) {
            Value::None => return Ok(()),
            Value::Dict(p) | Value::OrderedDict { items: p, .. } => p,
            v => {
                return Err(self.malformed(format!(
                    "tensor metadata must be a dict, not {}",
                    type_name(v)
                )))
            }
        };
        for &(k, v) in items {
            let key = self.str(k, "tensor metadata key")?;
            match self.val(v) {
                Value::Bool(false) => {}
                Value::Bool(true) => {
                    return Err(self.unsupported(format!(
                        "tensors with the {:?} bit set (lazy conjugate / negative views) are \
                         not supported; save `t.resolve_conj().resolve_neg()` instead",
                        clip(key)
                    )))
                }
                v => {
                    return Err(self.malformed(format!(
                        "tensor metadata value is a {}, not a bool",
                        type_name(v)
                    )))
                }
            }
        }
        Ok(())
    }

    /// `_rebuild_parameter(data, requires_grad, hooks)` and `..._with_state(..., state)`.
    fn rebuild_parameter(&mut self, g: Global, args: &[ObjId], with_state: bool) -> Res<ObjId> {
        let n = if with_state { 4 } else { 3 };
        self.arity(g, args, n, n)?;
        let tensor = args[0];
        let Value::Tensor(t) = *self.val(tensor) else {
            return Err(self.malformed(format!(
                "{} wraps a {}, not a tensor",
                g.name(),
                type_name(self.val(tensor))
            )));
        };
        let requires_grad = self.bool(args[1], "requires_grad")?;
        self.check_hooks(args[2])?;
        if with_state && !self.is_empty_state(args[3]) {
            return Err(self.unsupported(
                "nn.Parameter with Python attributes (_rebuild_parameter_with_state with a \
                 non-empty state) is not supported",
            ));
        }
        self.check_grad(t, requires_grad)?;
        self.node(Value::Parameter {
            tensor,
            requires_grad,
        })
    }

    /// `_rebuild_from_type_v2(func, new_type, args, state)`: `func(*args)` cast to
    /// `new_type` with `state` set as attributes. Only plain Tensor / Parameter types and
    /// an empty state can be represented.
    fn rebuild_from_type_v2(&mut self, args: &[ObjId]) -> Res<ObjId> {
        self.arity(Global::RebuildFromTypeV2, args, 4, 4)?;
        let func = match self.globals.get(&args[0]) {
            Some(&g @ Global::Rebuild(_)) => g,
            _ => {
                return Err(self.unsupported(
                    "_rebuild_from_type_v2 with a function other than a torch tensor rebuild \
                     function is not supported",
                ))
            }
        };
        let new_type = match self.globals.get(&args[1]) {
            Some(&t @ (Global::TensorType | Global::ParameterType)) => t,
            _ => {
                return Err(self.unsupported(
                    "tensor subclasses (_rebuild_from_type_v2 with a type other than \
                     torch.Tensor / nn.Parameter) are not supported",
                ))
            }
        };
        if !self.is_empty_state(args[3]) {
            return Err(self.unsupported(
                "tensors with Python attributes (_rebuild_from_type_v2 with a non-empty state) \
                 are not supported",
            ));
        }
        let inner = self
            .tuple(args[2], "_rebuild_from_type_v2 arguments")?
            .to_vec();
        let result = self.call(func, &inner)?;
        match (new_type, self.val(result)) {
            (Global::TensorType, Value::Tensor(_))
            | (Global::ParameterType, Value::Parameter { .. }) => Ok(result),
            (Global::ParameterType, &Value::Tensor(t)) => {
                let requires_grad = self.tensors[t].requires_grad;
                self.node(Value::Parameter {
                    tensor: result,
                    requires_grad,
                })
            }
            _ => Err(self.unsupported(
                "_rebuild_from_type_v2 casting a Parameter to a plain Tensor is not supported",
            )),
        }
    }

    // ----- BUILD -----

    fn build(&mut self, inst: ObjId, state: ObjId) -> Res<()> {
        match self.val(inst) {
            Value::OrderedDict { .. } => self.build_ordered_dict(inst, state),
            Value::Parameter { tensor, .. } => {
                // Tensor.__setstate__: (requires_grad, _, backward_hooks).
                let tensor = *tensor;
                if self.is_empty_state(state) {
                    return Ok(());
                }
                let requires_grad =
                    match self.val(state) {
                        Value::Tuple(x) if x.len() == 3 => {
                            let (rg, hooks) = (x[0], x[2]);
                            self.check_hooks(hooks)?;
                            self.bool(rg, "requires_grad")?
                        }
                        _ => return Err(self.unsupported(
                            "BUILD on an nn.Parameter with a legacy or non-trivial state is not \
                             supported",
                        )),
                    };
                if let Value::Tensor(t) = *self.val(tensor) {
                    self.check_grad(t, requires_grad)?;
                }
                if let Value::Parameter {
                    requires_grad: rg, ..
                } = &mut self.nodes[inst]
                {
                    *rg = requires_grad;
                }
                Ok(())
            }
            Value::Tensor(_) => {
                Err(self
                    .unsupported("BUILD on a tensor (legacy `Tensor.set_` state) is not supported"))
            }
            v => {
                if let Some(g) = self.globals.get(&inst) {
                    return Err(self.malformed(format!("BUILD on the global {}", g.name())));
                }
                Err(self.unsupported(format!(
                    "BUILD on a {} is not supported (only OrderedDict and nn.Parameter)",
                    type_name(v)
                )))
            }
        }
    }

    /// `OrderedDict.__dict__.update(state)`: sets attributes such as `_metadata`.
    fn build_ordered_dict(&mut self, inst: ObjId, state: ObjId) -> Res<()> {
        let pairs = match self.val(state) {
            Value::Dict(p) | Value::OrderedDict { items: p, .. } => p.clone(),
            v => {
                return Err(self.malformed(format!(
                    "BUILD state for an OrderedDict must be a dict, not {}",
                    type_name(v)
                )))
            }
        };
        let mut new: Vec<(String, ObjId)> = Vec::with_capacity(pairs.len());
        let mut chars = 0usize;
        for (k, v) in pairs {
            let name = match self.val(k) {
                Value::Str(s) => s.clone(),
                other => {
                    return Err(self.unsupported(format!(
                        "OrderedDict attribute names must be str, not {}",
                        type_name(other)
                    )))
                }
            };
            chars = chars.saturating_add(name.len());
            new.push((name, v));
        }
        let existing = match self.val(inst) {
            Value::OrderedDict { attrs, .. } => attrs.len(),
            _ => 0,
        };
        self.charge(chars.saturating_add(new.len()).saturating_add(existing))?;
        if let Value::OrderedDict { attrs, .. } = &mut self.nodes[inst] {
            let mut index: HashMap<String, usize> = attrs
                .iter()
                .enumerate()
                .map(|(i, (n, _))| (n.clone(), i))
                .collect();
            for (name, v) in new {
                match index.get(&name) {
                    Some(&i) => attrs[i].1 = v,
                    None => {
                        index.insert(name.clone(), attrs.len());
                        attrs.push((name, v));
                    }
                }
            }
        }
        Ok(())
    }

    // ----- the end -----

    /// Checks what consumers rely on: the result is acyclic, at most `MAX_DEPTH` deep, and
    /// holds no global (class or function) as a value. Walks without recursion.
    fn finish(self, root: ObjId) -> Res<Unpickled> {
        const OPEN: u32 = u32::MAX;
        // 0: not seen; OPEN: on the walk's path; else the height of the node's subtree.
        let mut height = vec![0u32; self.nodes.len()];
        // (node, next child, tallest child so far)
        let mut path: Vec<(ObjId, usize, u32)> = Vec::new();
        self.enter(root, &mut height, &mut path)?;
        while let Some(&mut (id, ref mut next, tallest)) = path.last_mut() {
            match child(self.val(id), *next) {
                Some(c) => {
                    *next += 1;
                    match height[c] {
                        0 => self.enter(c, &mut height, &mut path)?,
                        OPEN => {
                            return Err(self.unsupported(
                                "the pickle builds a container that contains itself (a cycle); \
                                 zeroload only loads acyclic data",
                            ))
                        }
                        h => {
                            if let Some(top) = path.last_mut() {
                                top.2 = top.2.max(h);
                            }
                        }
                    }
                }
                None => {
                    path.pop();
                    let h = tallest + 1;
                    if h as usize > MAX_DEPTH {
                        return Err(self.unsupported(format!(
                            "containers nested more than {MAX_DEPTH} deep are not supported"
                        )));
                    }
                    height[id] = h;
                    if let Some(parent) = path.last_mut() {
                        parent.2 = parent.2.max(h);
                    }
                }
            }
        }
        Ok(Unpickled {
            objects: ObjectGraph {
                nodes: self.nodes,
                root,
            },
            storages: self.storages,
            tensors: self.tensors,
        })
    }

    fn enter(&self, id: ObjId, height: &mut [u32], path: &mut Vec<(ObjId, usize, u32)>) -> Res<()> {
        if let Some(g) = self.globals.get(&id) {
            return Err(self.unsupported(format!(
                "the pickle returns {} itself (a class or function) as a value, which zeroload \
                 does not load",
                g.name()
            )));
        }
        if path.len() >= MAX_DEPTH {
            return Err(self.unsupported(format!(
                "containers nested more than {MAX_DEPTH} deep are not supported"
            )));
        }
        height[id] = u32::MAX;
        path.push((id, 0, 0));
        Ok(())
    }
}

fn append_error(at: usize, what: &str, target: &Value) -> PickleError {
    PickleError::Malformed {
        offset: at as u64,
        message: format!("{what} can only add to a list, not a {}", type_name(target)),
    }
}

fn setitem_error(at: usize, what: &str, target: &Value) -> PickleError {
    PickleError::Malformed {
        offset: at as u64,
        message: format!(
            "{what} can only set items of a dict, OrderedDict or Counter, not a {}",
            type_name(target)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ----- a tiny pickle assembler -----

    /// Builds a pickle opcode by opcode.
    #[derive(Clone, Default)]
    struct P(Vec<u8>);

    impl P {
        /// Starts with `PROTO 2`, as torch.save writes.
        fn new() -> P {
            P(vec![op::PROTO, 2])
        }
        /// Starts with nothing (protocol 0/1 pickles have no PROTO).
        fn bare() -> P {
            P(Vec::new())
        }
        fn op(mut self, code: u8) -> P {
            self.0.push(code);
            self
        }
        fn raw(mut self, b: &[u8]) -> P {
            self.0.extend_from_slice(b);
            self
        }
        fn op_arg(self, code: u8, arg: &[u8]) -> P {
            self.op(code).raw(arg)
        }
        /// An int the way CPython's pickler writes it.
        fn int(self, v: i64) -> P {
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
        fn str(self, s: &str) -> P {
            self.op_arg(op::BINUNICODE, &(s.len() as u32).to_le_bytes())
                .raw(s.as_bytes())
        }
        fn float(self, f: f64) -> P {
            self.op_arg(op::BINFLOAT, &f.to_be_bytes())
        }
        fn global(self, module: &str, name: &str) -> P {
            self.op(op::GLOBAL)
                .raw(module.as_bytes())
                .raw(b"\n")
                .raw(name.as_bytes())
                .raw(b"\n")
        }
        fn put(self, i: u8) -> P {
            self.op_arg(op::BINPUT, &[i])
        }
        fn get(self, i: u8) -> P {
            self.op_arg(op::BINGET, &[i])
        }
        fn none(self) -> P {
            self.op(op::NONE)
        }
        fn mark(self) -> P {
            self.op(op::MARK)
        }
        fn tuple(self) -> P {
            self.op(op::TUPLE)
        }
        fn reduce(self) -> P {
            self.op(op::REDUCE)
        }
        fn empty_tuple(self) -> P {
            self.op(op::EMPTY_TUPLE)
        }
        fn ordered_dict(self) -> P {
            self.global("collections", "OrderedDict")
                .empty_tuple()
                .reduce()
        }
        /// `('storage', torch.<class>, key, 'cpu', numel)` then BINPERSID.
        fn storage(self, class: &str, key: &str, numel: i64) -> P {
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
        fn ints(mut self, v: &[i64]) -> P {
            self = self.mark();
            for &i in v {
                self = self.int(i);
            }
            self.tuple()
        }
        /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
        fn tensor_v2(
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
        fn stop(self) -> Vec<u8> {
            self.op(op::STOP).0
        }
    }

    fn ok(p: &[u8]) -> Unpickled {
        match unpickle(p) {
            Ok(u) => u,
            Err(e) => panic!("unpickle failed: {e:?}"),
        }
    }

    fn err(p: &[u8]) -> PickleError {
        match unpickle(p) {
            Ok(u) => panic!("unpickle succeeded: {}", show_root(&u)),
            Err(e) => e,
        }
    }

    fn malformed(p: &[u8]) -> (u64, String) {
        match err(p) {
            PickleError::Malformed { offset, message } => (offset, message),
            e => panic!("expected Malformed, got {e:?}"),
        }
    }

    fn unsupported(p: &[u8]) -> String {
        match err(p) {
            PickleError::Unsupported { what, .. } => what,
            e => panic!("expected Unsupported, got {e:?}"),
        }
    }

    /// A Python-like rendering of a node (tests only: small graphs, recursion is fine).
    fn show(u: &Unpickled, id: ObjId) -> String {
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

    fn show_root(u: &Unpickled) -> String {
        show(u, u.objects.root)
    }

    fn run(p: &[u8]) -> String {
        show_root(&ok(p))
    }

    fn t(
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

    fn sref(key: &str, dtype: Option<DType>, numel: u64) -> StorageRef {
        StorageRef {
            key: key.into(),
            dtype,
            numel,
            location: "cpu".into(),
        }
    }

    // ----- framing -----

    #[test]
    fn proto_and_stop() {
        assert_eq!(run(&P::new().none().stop()), "None");
        assert_eq!(run(&P::bare().none().stop()), "None");
        for v in 0..=5u8 {
            assert_eq!(
                run(&P::bare().op_arg(op::PROTO, &[v]).none().stop()),
                "None"
            );
        }
        let (off, m) = malformed(&P::bare().op_arg(op::PROTO, &[6]).none().stop());
        assert_eq!(off, 0);
        assert!(m.contains("protocol 6"), "{m}");
    }

    #[test]
    fn data_after_stop_is_ignored() {
        let mut p = P::new().int(1).stop();
        p.extend_from_slice(b"garbage \xff\xff");
        assert_eq!(run(&p), "1");
    }

    #[test]
    fn no_stop_is_malformed() {
        let (_, m) = malformed(&P::new().int(1).0);
        assert!(m.contains("without STOP"), "{m}");
        let (off, _) = malformed(b"");
        assert_eq!(off, 0);
    }

    #[test]
    fn stop_on_empty_stack() {
        let (off, m) = malformed(&P::new().stop());
        assert_eq!(off, 2);
        assert!(m.contains("underflow"), "{m}");
    }

    #[test]
    fn frame() {
        let body = P::bare().int(7).stop();
        let p = P::bare()
            .op_arg(op::PROTO, &[4])
            .op_arg(op::FRAME, &(body.len() as u64).to_le_bytes())
            .raw(&body)
            .0;
        assert_eq!(run(&p), "7");
        let p = P::bare()
            .op_arg(op::PROTO, &[4])
            .op_arg(op::FRAME, &(1u64 << 63).to_le_bytes())
            .raw(&body)
            .0;
        let (off, m) = malformed(&p);
        assert_eq!(off, 2);
        assert!(m.contains("FRAME claims"), "{m}");
        let p = P::bare()
            .op_arg(op::PROTO, &[4])
            .op_arg(op::FRAME, &[1, 0, 0])
            .0;
        assert!(malformed(&p).1.contains("truncated"));
    }

    // ----- scalars -----

    #[test]
    fn none_and_bools() {
        assert_eq!(
            run(&P::new()
                .mark()
                .none()
                .op(op::NEWTRUE)
                .op(op::NEWFALSE)
                .tuple()
                .stop()),
            "(None, True, False)"
        );
    }

    #[test]
    fn binints() {
        assert_eq!(run(&P::new().op_arg(op::BININT1, &[255]).stop()), "255");
        assert_eq!(
            run(&P::new().op_arg(op::BININT2, &[0xff, 0xff]).stop()),
            "65535"
        );
        assert_eq!(
            run(&P::new()
                .op_arg(op::BININT, &(-70000i32).to_le_bytes())
                .stop()),
            "-70000"
        );
        assert_eq!(
            run(&P::new().op_arg(op::BININT, &i32::MIN.to_le_bytes()).stop()),
            "-2147483648"
        );
    }

    #[test]
    fn long1_and_long4() {
        assert_eq!(run(&P::new().op_arg(op::LONG1, &[0]).stop()), "0");
        assert_eq!(run(&P::new().op_arg(op::LONG1, &[1, 0xff]).stop()), "-1");
        assert_eq!(
            run(&P::new().op_arg(op::LONG1, &[2, 0x80, 0x00]).stop()),
            "128"
        );
        let max = P::new()
            .op_arg(op::LONG1, &[8])
            .raw(&i64::MAX.to_le_bytes())
            .stop();
        assert_eq!(run(&max), i64::MAX.to_string());
        let min = P::new()
            .op_arg(op::LONG1, &[8])
            .raw(&i64::MIN.to_le_bytes())
            .stop();
        assert_eq!(run(&min), i64::MIN.to_string());
        // 2**63 needs 9 bytes.
        let p = P::new()
            .op_arg(op::LONG1, &[9, 0, 0, 0, 0, 0, 0, 0, 0x80, 0])
            .stop();
        assert_eq!(
            ok(&p).objects.nodes[0],
            Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0x80, 0])
        );
        // Redundant sign bytes are dropped: 5 as 12 bytes is still Int(5).
        let mut five = vec![12u8, 5];
        five.extend([0u8; 11]);
        assert_eq!(run(&P::new().op_arg(op::LONG1, &five).stop()), "5");
        // -2**70 as LONG4.
        let mut b = vec![0u8; 9];
        b[8] = 0xc0;
        let p = P::new()
            .op_arg(op::LONG4, &9i32.to_le_bytes())
            .raw(&b)
            .stop();
        assert_eq!(ok(&p).objects.nodes[0], Value::BigInt(b));
        let (_, m) = malformed(&P::new().op_arg(op::LONG4, &(-1i32).to_le_bytes()).stop());
        assert!(m.contains("negative"), "{m}");
        let (_, m) = malformed(&P::new().op_arg(op::LONG4, &i32::MAX.to_le_bytes()).stop());
        assert!(m.contains("claims"), "{m}");
    }

    #[test]
    fn text_ints() {
        assert_eq!(run(&P::bare().raw(b"I42\n.").0), "42");
        assert_eq!(run(&P::bare().raw(b"I-7\n.").0), "-7");
        assert_eq!(run(&P::bare().raw(b"I01\n.").0), "True");
        assert_eq!(run(&P::bare().raw(b"I00\n.").0), "False");
        assert_eq!(run(&P::bare().raw(b"L123L\n.").0), "123");
        assert_eq!(
            run(&P::bare().raw(b"L-9223372036854775808L\n.").0),
            i64::MIN.to_string()
        );
        // 2**100 and -2**70, as LONG1 writes them.
        let big = ok(&P::bare().raw(b"L1267650600228229401496703205376L\n.").0);
        let mut want = vec![0u8; 13];
        want[12] = 0x10;
        assert_eq!(big.objects.nodes[0], Value::BigInt(want));
        let neg = ok(&P::bare().raw(b"I-1180591620717411303424\n.").0);
        let mut want = vec![0u8; 9];
        want[8] = 0xc0;
        assert_eq!(neg.objects.nodes[0], Value::BigInt(want));
        // 2**64 - 1 is positive: needs a zero sign byte.
        let u = ok(&P::bare().raw(b"I18446744073709551615\n.").0);
        assert_eq!(
            u.objects.nodes[0],
            Value::BigInt(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0])
        );
        for bad in [&b"Ix\n."[..], b"I\n.", b"I1.5\n.", b"I--1\n.", b"I12"] {
            malformed(bad);
        }
        let mut huge = b"I".to_vec();
        huge.extend(std::iter::repeat_n(b'9', MAX_INT_DIGITS + 1));
        huge.extend(b"\n.");
        assert!(malformed(&huge).1.contains("digits"));
    }

    #[test]
    fn floats() {
        assert_eq!(run(&P::new().float(1.5).stop()), "1.5");
        assert_eq!(run(&P::new().float(-0.001).stop()), "-0.001");
        assert_eq!(run(&P::bare().raw(b"F2.25\n.").0), "2.25");
        malformed(b"Fabc\n.");
        assert!(malformed(&P::new().op_arg(op::BINFLOAT, &[0; 7]).0)
            .1
            .contains("truncated"));
    }

    // ----- strings and bytes -----

    #[test]
    fn unicode_strings() {
        assert_eq!(run(&P::new().str("héllo").stop()), "'héllo'");
        assert_eq!(
            run(&P::new()
                .op_arg(op::SHORT_BINUNICODE, &[2])
                .raw(b"ab")
                .stop()),
            "'ab'"
        );
        let p = P::new()
            .op_arg(op::BINUNICODE8, &3u64.to_le_bytes())
            .raw(b"xyz")
            .stop();
        assert_eq!(run(&p), "'xyz'");
        assert_eq!(
            run(&P::bare().raw(b"Vab\\u00e9\\U0001F600\\x\n.").0),
            "'abé😀\\x'"
        );
        // An even run of backslashes does not start an escape.
        assert_eq!(run(&P::bare().raw(b"V\\\\u0041\n.").0), "'\\\\u0041'");
        malformed(b"V\\u12\n.");
        malformed(b"V\\ud800\n.");
        let (_, m) = malformed(
            &P::new()
                .op_arg(op::SHORT_BINUNICODE, &[2])
                .raw(b"\xff\xfe")
                .stop(),
        );
        assert!(m.contains("UTF-8"), "{m}");
        // A lone surrogate, as Python's surrogatepass would write it.
        malformed(
            &P::new()
                .op_arg(op::SHORT_BINUNICODE, &[3])
                .raw(b"\xed\xa0\x80")
                .stop(),
        );
    }

    #[test]
    fn python2_strings() {
        assert_eq!(
            run(&P::new().op_arg(op::SHORT_BINSTRING, &[2]).raw(b"hi").stop()),
            "'hi'"
        );
        let p = P::new()
            .op_arg(op::BINSTRING, &2i32.to_le_bytes())
            .raw(b"yo")
            .stop();
        assert_eq!(run(&p), "'yo'");
        let p = P::new()
            .op_arg(op::BINSTRING, &(-2i32).to_le_bytes())
            .raw(b"yo")
            .stop();
        assert!(malformed(&p).1.contains("negative"));
    }

    #[test]
    fn bytes_opcodes() {
        assert_eq!(
            run(&P::new().op_arg(op::SHORT_BINBYTES, &[2, 0, 0xff]).stop()),
            "b'\\x00\\xff'"
        );
        let p = P::new()
            .op_arg(op::BINBYTES, &1u32.to_le_bytes())
            .raw(b"a")
            .stop();
        assert_eq!(run(&p), "b'a'");
        let p = P::new()
            .op_arg(op::BINBYTES8, &1u64.to_le_bytes())
            .raw(b"b")
            .stop();
        assert_eq!(run(&p), "b'b'");
        let p = P::new()
            .op_arg(op::BYTEARRAY8, &2u64.to_le_bytes())
            .raw(b"cd")
            .stop();
        assert_eq!(run(&p), "bytearray(b'cd')");
    }

    #[test]
    fn huge_length_claims_fail_before_allocating() {
        let claims: Vec<Vec<u8>> = vec![
            P::new()
                .op_arg(op::BINUNICODE, &u32::MAX.to_le_bytes())
                .raw(b"abc")
                .stop(),
            P::new()
                .op_arg(op::BINUNICODE8, &(1u64 << 63).to_le_bytes())
                .raw(b"abc")
                .stop(),
            P::new()
                .op_arg(op::BINUNICODE8, &u64::MAX.to_le_bytes())
                .stop(),
            P::new()
                .op_arg(op::BINBYTES, &u32::MAX.to_le_bytes())
                .stop(),
            P::new()
                .op_arg(op::BINBYTES8, &u64::MAX.to_le_bytes())
                .stop(),
            P::new()
                .op_arg(op::BYTEARRAY8, &(1u64 << 62).to_le_bytes())
                .stop(),
            P::new()
                .op_arg(op::BINSTRING, &i32::MAX.to_le_bytes())
                .stop(),
            P::new().op_arg(op::SHORT_BINBYTES, &[200]).stop(),
            P::new().op_arg(op::LONG1, &[255, 1]).stop(),
            P::new().op_arg(op::LONG4, &i32::MAX.to_le_bytes()).stop(),
        ];
        for p in claims {
            let (off, m) = malformed(&p);
            assert_eq!(off, 2, "{m}");
        }
    }

    // ----- containers -----

    #[test]
    fn tuples() {
        assert_eq!(run(&P::new().empty_tuple().stop()), "()");
        assert_eq!(run(&P::new().int(1).op(op::TUPLE1).stop()), "(1,)");
        assert_eq!(run(&P::new().int(1).int(2).op(op::TUPLE2).stop()), "(1, 2)");
        assert_eq!(
            run(&P::new().int(1).int(2).int(3).op(op::TUPLE3).stop()),
            "(1, 2, 3)"
        );
        assert_eq!(
            run(&P::new().mark().int(1).int(2).int(3).int(4).tuple().stop()),
            "(1, 2, 3, 4)"
        );
        assert_eq!(run(&P::new().mark().tuple().stop()), "()");
        assert!(malformed(&P::new().int(1).op(op::TUPLE2).stop())
            .1
            .contains("underflow"));
        assert!(malformed(&P::new().int(1).tuple().stop())
            .1
            .contains("MARK"));
        // TUPLE1 cannot reach below a MARK.
        assert!(malformed(&P::new().int(1).mark().op(op::TUPLE1).stop())
            .1
            .contains("underflow"));
    }

    #[test]
    fn lists() {
        let p = P::new()
            .op(op::EMPTY_LIST)
            .int(1)
            .op(op::APPEND)
            .mark()
            .int(2)
            .int(3)
            .op(op::APPENDS)
            .mark()
            .op(op::APPENDS)
            .stop();
        assert_eq!(run(&p), "[1, 2, 3]");
        assert_eq!(
            run(&P::new().mark().int(1).str("a").op(op::LIST).stop()),
            "[1, 'a']"
        );
        let (off, m) = malformed(&P::new().op(op::EMPTY_DICT).int(1).op(op::APPEND).stop());
        assert_eq!(off, 5);
        assert!(m.contains("list"), "{m}");
        assert!(
            malformed(&P::new().empty_tuple().mark().int(1).op(op::APPENDS).stop())
                .1
                .contains("list")
        );
        assert!(malformed(&P::new().mark().int(1).op(op::APPENDS).stop())
            .1
            .contains("underflow"));
        assert!(malformed(&P::new().op(op::APPEND).stop())
            .1
            .contains("underflow"));
    }

    #[test]
    fn dicts() {
        let p = P::new()
            .op(op::EMPTY_DICT)
            .str("a")
            .int(1)
            .op(op::SETITEM)
            .mark()
            .int(2)
            .none()
            .empty_tuple()
            .float(0.5)
            .op(op::SETITEMS)
            .stop();
        assert_eq!(run(&p), "{'a': 1, 2: None, (): 0.5}");
        assert_eq!(
            run(&P::new().mark().str("k").str("v").op(op::DICT).stop()),
            "{'k': 'v'}"
        );
        assert!(malformed(&P::new().mark().str("k").op(op::DICT).stop())
            .1
            .contains("odd"));
        let p = P::new()
            .op(op::EMPTY_DICT)
            .mark()
            .str("k")
            .op(op::SETITEMS)
            .stop();
        assert!(malformed(&p).1.contains("odd"));
        let p = P::new()
            .op(op::EMPTY_LIST)
            .str("k")
            .int(1)
            .op(op::SETITEM)
            .stop();
        assert!(malformed(&p).1.contains("dict"));
        let p = P::new()
            .empty_tuple()
            .mark()
            .str("k")
            .int(1)
            .op(op::SETITEMS)
            .stop();
        assert!(malformed(&p).1.contains("dict"));
    }

    #[test]
    fn sets() {
        let p = P::new()
            .op(op::EMPTY_SET)
            .mark()
            .int(1)
            .int(2)
            .op(op::ADDITEMS)
            .stop();
        assert_eq!(run(&p), "set{1, 2}");
        assert_eq!(
            run(&P::new().mark().int(3).op(op::FROZENSET).stop()),
            "frozenset{3}"
        );
        let p = P::new()
            .op(op::EMPTY_LIST)
            .mark()
            .int(1)
            .op(op::ADDITEMS)
            .stop();
        assert!(malformed(&p).1.contains("set"));
        // Protocol 2 spelling: builtins.set([1, 2]) / frozenset([3]).
        let p = P::new()
            .global("__builtin__", "set")
            .mark()
            .int(1)
            .int(2)
            .op(op::LIST)
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert_eq!(run(&p), "set{1, 2}");
        let p = P::new()
            .global("builtins", "frozenset")
            .mark()
            .int(3)
            .op(op::LIST)
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert_eq!(run(&p), "frozenset{3}");
        assert_eq!(
            run(&P::new()
                .global("builtins", "set")
                .empty_tuple()
                .reduce()
                .stop()),
            "set{}"
        );
    }

    // ----- memo and stack -----

    #[test]
    fn memo_shares_objects() {
        // l = []; t = (l, l); l.append(1)  -> ([1], [1]) with one list node.
        let p = P::new()
            .op(op::EMPTY_LIST)
            .put(0)
            .get(0)
            .op(op::TUPLE2)
            .put(1)
            .op(op::POP)
            .get(0)
            .int(1)
            .op(op::APPEND)
            .op(op::POP)
            .get(1)
            .stop();
        let u = ok(&p);
        assert_eq!(show_root(&u), "([1], [1])");
        let Value::Tuple(x) = &u.objects.nodes[u.objects.root] else {
            panic!()
        };
        assert_eq!(x[0], x[1]);
    }

    #[test]
    fn memo_opcodes() {
        let p = P::new()
            .str("a")
            .op_arg(op::LONG_BINPUT, &70000u32.to_le_bytes())
            .op(op::POP)
            .op_arg(op::LONG_BINGET, &70000u32.to_le_bytes())
            .stop();
        assert_eq!(run(&p), "'a'");
        // Sparse then dense indices.
        let p = P::new()
            .int(5)
            .op_arg(op::LONG_BINPUT, &u32::MAX.to_le_bytes())
            .put(0)
            .op(op::POP)
            .op_arg(op::LONG_BINGET, &u32::MAX.to_le_bytes())
            .get(0)
            .op(op::TUPLE2)
            .stop();
        assert_eq!(run(&p), "(5, 5)");
        assert_eq!(run(&P::bare().raw(b"I3\np12\n0g12\n.").0), "3");
        assert!(malformed(&P::bare().raw(b"I3\np-1\n.").0)
            .1
            .contains("negative"));
        // MEMOIZE puts at len(memo).
        let p = P::bare()
            .op_arg(op::PROTO, &[4])
            .int(1)
            .op(op::MEMOIZE)
            .int(2)
            .op(op::MEMOIZE)
            .get(1)
            .get(0)
            .op(op::TUPLE2)
            .stop();
        assert_eq!(run(&p), "(2, 1)");
        let p = P::new()
            .int(1)
            .op_arg(op::LONG_BINPUT, &9u32.to_le_bytes())
            .op(op::MEMOIZE)
            .get(1)
            .stop();
        assert_eq!(run(&p), "1");
    }

    #[test]
    fn memo_errors() {
        let (off, m) = malformed(&P::new().get(3).stop());
        assert_eq!(off, 2);
        assert!(m.contains("memo entry 3"), "{m}");
        assert!(malformed(
            &P::new()
                .op_arg(op::LONG_BINGET, &u32::MAX.to_le_bytes())
                .stop()
        )
        .1
        .contains("empty"));
        assert!(malformed(&P::new().put(0).none().stop())
            .1
            .contains("underflow"));
        assert!(malformed(&P::new().int(1).mark().put(0).stop())
            .1
            .contains("underflow"));
        assert!(malformed(&P::bare().raw(b"I1\np\n.").0)
            .1
            .contains("memo index"));
    }

    #[test]
    fn stack_opcodes() {
        assert_eq!(
            run(&P::new().int(1).op(op::DUP).op(op::TUPLE2).stop()),
            "(1, 1)"
        );
        assert_eq!(run(&P::new().int(1).int(2).op(op::POP).stop()), "1");
        assert_eq!(
            run(&P::new().int(1).mark().int(2).int(3).op(op::POP_MARK).stop()),
            "1"
        );
        // POP on an empty frame discards the MARK (as Python does).
        assert_eq!(
            run(&P::new().int(1).mark().op(op::POP).op(op::TUPLE1).stop()),
            "(1,)"
        );
        assert!(malformed(&P::new().op(op::POP).int(1).stop())
            .1
            .contains("underflow"));
        assert!(malformed(&P::new().op(op::DUP).stop())
            .1
            .contains("underflow"));
        assert!(malformed(&P::new().op(op::POP_MARK).stop())
            .1
            .contains("MARK"));
    }

    // ----- opcodes we refuse -----

    #[test]
    fn refused_and_unknown_opcodes() {
        for (code, name) in [
            (op::INST, "INST"),
            (op::OBJ, "OBJ"),
            (op::EXT1, "EXT1"),
            (op::EXT2, "EXT2"),
            (op::EXT4, "EXT4"),
            (op::PERSID, "PERSID"),
            (op::STRING, "STRING"),
            (op::NEXT_BUFFER, "NEXT_BUFFER"),
            (op::READONLY_BUFFER, "READONLY_BUFFER"),
        ] {
            match err(&P::new().none().op(code).raw(b"x\ny\n").stop()) {
                PickleError::Unsupported { offset, what } => {
                    assert_eq!(offset, 3);
                    assert!(what.contains(name), "{what}");
                }
                e => panic!("{e:?}"),
            }
        }
        for code in [0xffu8, 0x00, 0x99, b'z', b'A'] {
            let (off, m) = malformed(&P::new().op(code).stop());
            assert_eq!(off, 2);
            assert!(m.contains("unknown pickle opcode"), "{m}");
        }
    }

    // ----- globals -----

    fn forbidden(p: &[u8]) -> (u64, String, String) {
        match err(p) {
            PickleError::Forbidden {
                offset,
                module,
                name,
            } => (offset, module, name),
            e => panic!("expected Forbidden, got {e:?}"),
        }
    }

    #[test]
    fn forbidden_globals_fail_at_the_global() {
        for (module, name) in [
            ("os", "system"),
            ("posix", "system"),
            ("nt", "system"),
            ("builtins", "eval"),
            ("builtins", "exec"),
            ("builtins", "getattr"),
            ("builtins", "__import__"),
            ("builtins", "open"),
            ("builtins", "slice"),
            ("builtins", "dict"),
            ("subprocess", "Popen"),
            ("copyreg", "_reconstructor"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy", "dtype"),
            ("torch", "load"),
            ("torch.nn.modules.linear", "Linear"),
            ("torch._utils", "_import_dotted_name"),
            ("torch.serialization", "load"),
            ("collections", "defaultdict"),
            ("torch", "FooStorage"),
            ("torch", "float"),
            ("", ""),
        ] {
            // os.system("echo pwned") in protocol 2 form: GLOBAL, args, REDUCE.
            let p = P::new()
                .global(module, name)
                .str("echo pwned")
                .op(op::TUPLE1)
                .reduce()
                .stop();
            let (off, m, n) = forbidden(&p);
            assert_eq!((off, m.as_str(), n.as_str()), (2, module, name));
        }
        // Python 2 module names are mapped first.
        let p = P::new().global("__builtin__", "eval").stop();
        assert_eq!(forbidden(&p).1, "builtins");
        let p = P::new().global("copy_reg", "_reconstructor").stop();
        assert_eq!(forbidden(&p).1, "copyreg");
        // STACK_GLOBAL: protocol 4's spelling.
        let p = P::bare()
            .op_arg(op::PROTO, &[4])
            .op_arg(op::SHORT_BINUNICODE, &[2])
            .raw(b"os")
            .op_arg(op::SHORT_BINUNICODE, &[6])
            .raw(b"system")
            .op(op::STACK_GLOBAL)
            .stop();
        assert_eq!(forbidden(&p), (14, "os".into(), "system".into()));
        // STACK_GLOBAL needs two strings.
        let p = P::new().int(1).str("system").op(op::STACK_GLOBAL).stop();
        assert!(malformed(&p).1.contains("str"));
    }

    #[test]
    fn forbidden_names_are_clipped() {
        let long = "m".repeat(5000);
        let (_, m, _) = forbidden(&P::new().global(&long, "x").stop());
        assert!(m.len() < 300);
        // Non-UTF-8 global names are malformed.
        assert!(malformed(&P::new().op(op::GLOBAL).raw(b"\xff\nx\n").stop())
            .1
            .contains("UTF-8"));
        assert!(malformed(&P::new().op(op::GLOBAL).raw(b"os\nsystem").0)
            .1
            .contains("newline"));
    }

    #[test]
    fn recognized_torch_globals_are_unsupported() {
        for (module, name, what) in [
            ("torch._utils", "_rebuild_sparse_tensor", "sparse"),
            ("torch._utils", "_rebuild_sparse_csr", "sparse"),
            ("torch._utils", "_rebuild_qtensor", "quantized"),
            ("torch._utils", "_rebuild_nested_tensor", "nested"),
            ("torch._utils", "_rebuild_meta_tensor_no_storage", "meta"),
            ("torch._utils", "_rebuild_wrapper_subclass", "subclass"),
            ("torch._utils", "_rebuild_device_tensor_from_numpy", "XLA"),
            (
                "torch._utils",
                "_rebuild_device_tensor_from_cpu_tensor",
                "XLA",
            ),
            ("torch.serialization", "_get_layout", "sparse"),
            ("torch", "qint8", "dtype"),
            ("torch", "uint4", "dtype"),
            ("torch", "QInt8Storage", "quantized"),
            ("torch", "per_tensor_affine", "quantized"),
            ("torch", "FloatTensor", "legacy"),
            ("torch.storage", "TypedStorage", "TypedStorage"),
            ("torch.distributed.tensor", "DTensor", "DTensor"),
        ] {
            let what_got = unsupported(&P::new().global(module, name).stop());
            assert!(what_got.contains(what), "{module}.{name}: {what_got}");
            assert!(what_got.contains(name), "{what_got}");
        }
    }

    #[test]
    fn dtype_globals() {
        for d in DType::ALL {
            assert_eq!(
                run(&P::new().global("torch", d.torch_name()).stop()),
                d.to_string()
            );
        }
    }

    #[test]
    fn globals_as_values_are_refused() {
        let w = unsupported(
            &P::new()
                .ordered_dict()
                .op(op::POP)
                .global("collections", "OrderedDict")
                .stop(),
        );
        assert!(w.contains("collections.OrderedDict"), "{w}");
        let p = P::new()
            .global("torch", "FloatStorage")
            .op(op::TUPLE1)
            .stop();
        assert!(unsupported(&p).contains("class or function"));
    }

    #[test]
    fn reduce_and_newobj_need_allowed_callables() {
        let (_, m) = malformed(&P::new().str("x").empty_tuple().reduce().stop());
        assert!(m.contains("not an allowed callable"), "{m}");
        let (_, m) = malformed(&P::new().global("torch", "Size").int(1).reduce().stop());
        assert!(m.contains("tuple"), "{m}");
        let (_, m) = malformed(&P::new().str("x").empty_tuple().op(op::NEWOBJ).stop());
        assert!(m.contains("not an allowed class"), "{m}");
        assert!(unsupported(
            &P::new()
                .global("torch", "device")
                .empty_tuple()
                .op(op::NEWOBJ)
                .stop()
        )
        .contains("NEWOBJ"));
        assert!(malformed(&P::new().reduce().stop()).1.contains("underflow"));
    }

    // ----- allowed callables -----

    #[test]
    fn ordered_dict_with_metadata() {
        // OrderedDict() ; setitems ; BUILD {'_metadata': OrderedDict({'': {'version': 1}})}
        let p = P::new()
            .ordered_dict()
            .mark()
            .str("w")
            .int(1)
            .op(op::SETITEMS)
            .op(op::EMPTY_DICT)
            .str("_metadata")
            .ordered_dict()
            .str("")
            .op(op::EMPTY_DICT)
            .str("version")
            .int(1)
            .op(op::SETITEM)
            .op(op::SETITEM)
            .op(op::SETITEM)
            .op(op::BUILD)
            .stop();
        assert_eq!(
            run(&p),
            "OrderedDict{'w': 1}@{_metadata=OrderedDict{'': {'version': 1}}}"
        );
        // A second BUILD replaces an attribute in place.
        let p = P::new()
            .ordered_dict()
            .mark()
            .str("a")
            .int(1)
            .str("b")
            .int(2)
            .op(op::DICT)
            .op(op::BUILD)
            .mark()
            .str("a")
            .int(3)
            .op(op::DICT)
            .op(op::BUILD)
            .stop();
        assert_eq!(run(&p), "OrderedDict{}@{a=3, b=2}");
        let p = P::new()
            .ordered_dict()
            .mark()
            .int(1)
            .int(2)
            .op(op::DICT)
            .op(op::BUILD)
            .stop();
        assert!(unsupported(&p).contains("str"));
        let p = P::new().ordered_dict().none().op(op::BUILD).stop();
        assert!(malformed(&p).1.contains("dict"));
        // OrderedDict(dict) and OrderedDict([(k, v)]).
        let p = P::new()
            .global("collections", "OrderedDict")
            .mark()
            .str("k")
            .int(1)
            .op(op::DICT)
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert_eq!(run(&p), "OrderedDict{'k': 1}");
        let p = P::new()
            .global("collections", "OrderedDict")
            .mark()
            .str("k")
            .int(1)
            .op(op::TUPLE2)
            .op(op::LIST)
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert_eq!(run(&p), "OrderedDict{'k': 1}");
    }

    #[test]
    fn build_on_other_objects_is_refused() {
        assert!(unsupported(
            &P::new()
                .op(op::EMPTY_DICT)
                .op(op::EMPTY_DICT)
                .op(op::BUILD)
                .stop()
        )
        .contains("BUILD on a dict"));
        assert!(unsupported(
            &P::new()
                .op(op::EMPTY_LIST)
                .op(op::EMPTY_DICT)
                .op(op::BUILD)
                .stop()
        )
        .contains("list"));
        let p = P::new()
            .global("collections", "OrderedDict")
            .op(op::EMPTY_DICT)
            .op(op::BUILD)
            .stop();
        assert!(malformed(&p).1.contains("global"));
    }

    #[test]
    fn counter() {
        let p = P::new()
            .global("collections", "Counter")
            .op(op::EMPTY_DICT)
            .str("a")
            .int(2)
            .op(op::SETITEM)
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert_eq!(run(&p), "Counter{'a': 2}");
        assert_eq!(
            run(&P::new()
                .global("collections", "Counter")
                .empty_tuple()
                .reduce()
                .stop()),
            "Counter{}"
        );
        let p = P::new()
            .global("collections", "Counter")
            .str("aab")
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert!(unsupported(&p).contains("Counter"));
    }

    #[test]
    fn torch_size() {
        let p = P::new()
            .global("torch", "Size")
            .ints(&[2, 3])
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert_eq!(run(&p), "Size[2, 3]");
        assert_eq!(
            run(&P::new()
                .global("torch", "Size")
                .empty_tuple()
                .reduce()
                .stop()),
            "Size[]"
        );
        let p = P::new()
            .global("torch", "Size")
            .mark()
            .str("x")
            .tuple()
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert!(malformed(&p).1.contains("int"));
    }

    #[test]
    fn torch_device() {
        let dev = |args: P| run(&args.op(op::REDUCE).stop());
        let g = || P::new().global("torch", "device");
        assert_eq!(dev(g().str("cuda").int(0).op(op::TUPLE2)), "device(cuda:0)");
        assert_eq!(dev(g().str("cpu").op(op::TUPLE1)), "device(cpu)");
        assert_eq!(dev(g().str("cuda:1").op(op::TUPLE1)), "device(cuda:1)");
        assert_eq!(dev(g().str("cuda").none().op(op::TUPLE2)), "device(cuda)");
        for bad in [
            g().str("cuda:0").int(1).op(op::TUPLE2),
            g().str("cuda").int(-1).op(op::TUPLE2),
            g().str("CU DA").op(op::TUPLE1),
            g().str("cuda:").op(op::TUPLE1),
            g().str("").op(op::TUPLE1),
            g().empty_tuple(),
        ] {
            malformed(&bad.op(op::REDUCE).stop());
        }
    }

    #[test]
    fn codecs_encode_bytes() {
        let enc = |s: &str, e: &str| {
            P::new()
                .global("_codecs", "encode")
                .str(s)
                .str(e)
                .op(op::TUPLE2)
                .reduce()
                .stop()
        };
        assert_eq!(run(&enc("\u{0}ÿab", "latin1")), "b'\\x00\\xffab'");
        assert_eq!(run(&enc("é", "utf-8")), "b'\\xc3\\xa9'");
        assert_eq!(run(&enc("ab", "ascii")), "b'ab'");
        assert!(malformed(&enc("€", "latin1")).1.contains("latin-1"));
        assert!(unsupported(&enc("ab", "rot13")).contains("rot13"));
        let p = P::new()
            .global("_codecs", "encode")
            .int(1)
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert!(malformed(&p).1.contains("str"));
    }

    #[test]
    fn builtins_values() {
        let p = P::new()
            .global("__builtin__", "complex")
            .float(1.0)
            .float(2.0)
            .op(op::TUPLE2)
            .reduce()
            .stop();
        assert_eq!(run(&p), "(1.0+2.0j)");
        let p = P::new()
            .global("builtins", "complex")
            .mark()
            .int(1)
            .tuple()
            .op(op::NEWOBJ)
            .stop();
        assert_eq!(run(&p), "(1.0+0.0j)");
        // bytearray(_codecs.encode('xy', 'latin1')), as protocol 2 writes it.
        let p = P::new()
            .global("__builtin__", "bytearray")
            .global("_codecs", "encode")
            .str("xy")
            .str("latin1")
            .op(op::TUPLE2)
            .reduce()
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert_eq!(run(&p), "bytearray(b'xy')");
        // bytes() is how protocol 2 writes b''.
        assert_eq!(
            run(&P::new()
                .global("__builtin__", "bytes")
                .empty_tuple()
                .reduce()
                .stop()),
            "b''"
        );
        let p = P::new()
            .global("builtins", "bytes")
            .ints(&[104, 105])
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert_eq!(run(&p), "b'hi'");
        // bytearray(n) would allocate n bytes on the file's say-so.
        let p = P::new()
            .global("builtins", "bytearray")
            .int(1 << 40)
            .op(op::TUPLE1)
            .reduce()
            .stop();
        assert!(unsupported(&p).contains("bytearray"));
        let p = P::new()
            .global("builtins", "bytes")
            .ints(&[256])
            .op(op::TUPLE1)
            .reduce()
            .stop();
        malformed(&p);
    }

    // ----- tensors -----

    #[test]
    fn tensor_v2() {
        let p = P::new()
            .tensor_v2("torch.FloatStorage", "0", 6, 0, &[2, 3], &[3, 1])
            .stop();
        let u = ok(&p);
        assert_eq!(show_root(&u), "T0");
        assert_eq!(
            u.tensors,
            vec![t(DType::F32, 0, &[2, 3], &[3, 1], 0, false)]
        );
        assert_eq!(u.storages, vec![sref("0", Some(DType::F32), 6)]);
        // The CUDA storage classes carry the same dtype.
        let p = P::new()
            .tensor_v2("torch.cuda.HalfStorage", "k", 4, 1, &[3], &[1])
            .stop();
        let u = ok(&p);
        assert_eq!(u.tensors, vec![t(DType::F16, 0, &[3], &[1], 1, false)]);
        assert_eq!(u.storages[0].nbytes(), Some(8));
        // 0-dim and empty tensors.
        let p = P::new()
            .tensor_v2("torch.LongStorage", "0", 1, 0, &[], &[])
            .stop();
        assert_eq!(ok(&p).tensors, vec![t(DType::I64, 0, &[], &[], 0, false)]);
        let p = P::new()
            .tensor_v2("torch.FloatStorage", "0", 0, 0, &[0, 4], &[4, 1])
            .stop();
        assert_eq!(ok(&p).tensors[0].shape, vec![0, 4]);
    }

    #[test]
    fn tensor_v2_on_untyped_storage_is_uint8() {
        let p = P::new()
            .tensor_v2("torch.storage.UntypedStorage", "0", 8, 2, &[4], &[1])
            .stop();
        let u = ok(&p);
        assert_eq!(u.tensors, vec![t(DType::U8, 0, &[4], &[1], 2, false)]);
        assert_eq!(u.storages, vec![sref("0", None, 8)]);
    }

    /// `_rebuild_tensor_v3` on `(class, key, numel)` with `(offset, size, stride)`.
    fn tensor_v3(p: P, storage: (&str, &str, i64), view: (i64, &[i64], &[i64]), dtype: &str) -> P {
        let (class, key, numel) = storage;
        let (off, size, stride) = view;
        p.global("torch._utils", "_rebuild_tensor_v3")
            .mark()
            .storage(class, key, numel)
            .int(off)
            .ints(size)
            .ints(stride)
            .op(op::NEWFALSE)
            .ordered_dict()
            .global("torch", dtype)
            .tuple()
            .reduce()
    }

    #[test]
    fn tensor_v3_uses_its_dtype() {
        let p = tensor_v3(
            P::new(),
            ("torch.storage.UntypedStorage", "0", 6),
            (0, &[2, 3], &[3, 1]),
            "float8_e4m3fn",
        )
        .stop();
        let u = ok(&p);
        assert_eq!(
            u.tensors,
            vec![t(DType::F8E4M3FN, 0, &[2, 3], &[3, 1], 0, false)]
        );
        assert_eq!(u.storages, vec![sref("0", None, 6)]);
        // uint16: offsets are in elements of the tensor's dtype; numel stays bytes.
        let p = tensor_v3(
            P::new(),
            ("torch.storage.UntypedStorage", "0", 6),
            (1, &[2], &[1]),
            "uint16",
        )
        .stop();
        let u = ok(&p);
        assert_eq!(u.tensors, vec![t(DType::U16, 0, &[2], &[1], 1, false)]);
        // A v3 tensor on a typed storage of another dtype views its bytes.
        let p = tensor_v3(
            P::new(),
            ("torch.FloatStorage", "0", 2),
            (0, &[4], &[1]),
            "bfloat16",
        )
        .stop();
        let u = ok(&p);
        assert_eq!(u.tensors[0].dtype, DType::BF16);
        assert_eq!(u.storages[0].nbytes(), Some(8));
        let p = P::new()
            .global("torch._utils", "_rebuild_tensor_v3")
            .mark()
            .storage("torch.storage.UntypedStorage", "0", 6)
            .int(0)
            .ints(&[1])
            .ints(&[1])
            .op(op::NEWFALSE)
            .ordered_dict()
            .str("float32")
            .tuple()
            .reduce()
            .stop();
        assert!(malformed(&p).1.contains("dtype"));
    }

    #[test]
    fn tensor_v1() {
        let p = P::new()
            .global("torch._utils", "_rebuild_tensor")
            .mark()
            .storage("torch.DoubleStorage", "s", 3)
            .int(0)
            .ints(&[3])
            .ints(&[1])
            .tuple()
            .reduce()
            .stop();
        assert_eq!(ok(&p).tensors, vec![t(DType::F64, 0, &[3], &[1], 0, false)]);
    }

    #[test]
    fn storages_dedupe_by_key() {
        // Two tensors on key "0", one on "1": first dtype wins; each tensor keeps its own.
        let p = P::new()
            .mark()
            .tensor_v2("torch.FloatStorage", "0", 4, 0, &[4], &[1])
            .tensor_v2("torch.FloatStorage", "1", 2, 0, &[2], &[1])
            .tensor_v2("torch.IntStorage", "0", 4, 1, &[2], &[2])
            .tensor_v2("torch.ByteStorage", "0", 16, 0, &[16], &[1])
            .op(op::LIST)
            .stop();
        let u = ok(&p);
        assert_eq!(show_root(&u), "[T0, T1, T2, T3]");
        assert_eq!(
            u.storages,
            vec![
                sref("0", Some(DType::F32), 4),
                sref("1", Some(DType::F32), 2)
            ]
        );
        assert_eq!(
            u.tensors,
            vec![
                t(DType::F32, 0, &[4], &[1], 0, false),
                t(DType::F32, 1, &[2], &[1], 0, false),
                t(DType::I32, 0, &[2], &[2], 1, false),
                t(DType::U8, 0, &[16], &[1], 0, false),
            ]
        );
        // The same key with another byte length is inconsistent.
        let p = P::new()
            .mark()
            .tensor_v2("torch.FloatStorage", "0", 4, 0, &[4], &[1])
            .tensor_v2("torch.FloatStorage", "0", 5, 0, &[4], &[1])
            .op(op::LIST)
            .stop();
        assert!(malformed(&p).1.contains("16 bytes before"));
    }

    #[test]
    fn storage_as_a_value() {
        let p = P::new()
            .storage("torch.storage.UntypedStorage", "0", 10)
            .stop();
        let u = ok(&p);
        assert_eq!(show_root(&u), "S0");
        assert_eq!(u.storages, vec![sref("0", None, 10)]);
        assert!(u.tensors.is_empty());
    }

    #[test]
    fn bad_persistent_ids() {
        let pid = |p: P| p.op(op::BINPERSID).stop();
        for bad in [
            pid(P::new().str("storage")),
            pid(P::new().int(0)),
            pid(P::new()
                .mark()
                .str("storage")
                .global("torch", "FloatStorage")
                .str("0")
                .str("cpu")
                .tuple()),
            pid(P::new()
                .mark()
                .str("module")
                .global("torch", "FloatStorage")
                .str("0")
                .str("cpu")
                .int(1)
                .tuple()),
            pid(P::new()
                .mark()
                .str("storage")
                .str("FloatStorage")
                .str("0")
                .str("cpu")
                .int(1)
                .tuple()),
            pid(P::new()
                .mark()
                .str("storage")
                .global("torch", "FloatStorage")
                .int(0)
                .str("cpu")
                .int(1)
                .tuple()),
            pid(P::new()
                .mark()
                .str("storage")
                .global("torch", "FloatStorage")
                .str("")
                .str("cpu")
                .int(1)
                .tuple()),
            pid(P::new()
                .mark()
                .str("storage")
                .global("torch", "FloatStorage")
                .str("0")
                .str("cpu")
                .int(-1)
                .tuple()),
            pid(P::new()
                .mark()
                .str("storage")
                .global("torch", "DoubleStorage")
                .str("0")
                .str("cpu")
                .int(i64::MAX)
                .tuple()),
            pid(P::new()),
        ] {
            malformed(&bad);
        }
        // Bytes fields are decoded as ASCII, as torch does.
        let p = pid(P::new()
            .mark()
            .op_arg(op::SHORT_BINBYTES, &[7])
            .raw(b"storage")
            .global("torch", "FloatStorage")
            .op_arg(op::SHORT_BINBYTES, &[1])
            .raw(b"0")
            .str("cuda:0")
            .int(1)
            .tuple());
        let u = ok(&p);
        assert_eq!(u.storages[0].location, "cuda:0");
    }

    #[test]
    fn bad_tensor_arguments() {
        let tensor = |off: i64, size: &[i64], stride: &[i64], rg: bool| {
            P::new()
                .global("torch._utils", "_rebuild_tensor_v2")
                .mark()
                .storage("torch.IntStorage", "0", 4)
                .int(off)
                .ints(size)
                .ints(stride)
                .op(if rg { op::NEWTRUE } else { op::NEWFALSE })
                .ordered_dict()
                .tuple()
                .reduce()
                .stop()
        };
        assert!(malformed(&tensor(0, &[2], &[-1], false))
            .1
            .contains("negative tensor stride"));
        assert!(malformed(&tensor(0, &[-2], &[1], false))
            .1
            .contains("negative tensor size"));
        assert!(malformed(&tensor(-1, &[2], &[1], false))
            .1
            .contains("negative"));
        assert!(malformed(&tensor(0, &[2, 2], &[1], false))
            .1
            .contains("sizes but"));
        assert!(malformed(&tensor(0, &[2], &[1], true))
            .1
            .contains("gradients"));
        let dims: Vec<i64> = vec![1; MAX_NDIM + 1];
        assert!(unsupported(&tensor(0, &dims, &dims, false)).contains("dimensions"));
        // Wrong arity, non-storage first argument, non-bool requires_grad.
        let p = P::new()
            .global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .int(1)
            .tuple()
            .reduce()
            .stop();
        assert!(malformed(&p).1.contains("takes 6 to 7 arguments"));
        let p = P::new()
            .global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .int(0)
            .int(0)
            .ints(&[1])
            .ints(&[1])
            .op(op::NEWFALSE)
            .ordered_dict()
            .tuple()
            .reduce()
            .stop();
        assert!(malformed(&p).1.contains("not a storage"));
        let p = P::new()
            .global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .storage("torch.FloatStorage", "0", 4)
            .int(0)
            .ints(&[1])
            .ints(&[1])
            .int(0)
            .ordered_dict()
            .tuple()
            .reduce()
            .stop();
        assert!(malformed(&p).1.contains("bool"));
    }

    #[test]
    fn hooks_and_metadata() {
        let tensor = |hooks: P, metadata: Option<P>| {
            let p = P::new()
                .global("torch._utils", "_rebuild_tensor_v2")
                .mark()
                .storage("torch.ComplexFloatStorage", "0", 4)
                .int(0)
                .ints(&[4])
                .ints(&[1])
                .op(op::NEWFALSE)
                .raw(&hooks.0);
            let p = match metadata {
                Some(m) => p.raw(&m.0),
                None => p,
            };
            p.tuple().reduce().stop()
        };
        let hooks = || {
            P::bare()
                .global("collections", "OrderedDict")
                .empty_tuple()
                .reduce()
        };
        let with_hook = P::bare()
            .global("collections", "OrderedDict")
            .empty_tuple()
            .reduce()
            .int(0)
            .str("hook")
            .op(op::SETITEM);
        assert_eq!(ok(&tensor(hooks(), None)).tensors[0].dtype, DType::C64);
        assert!(unsupported(&tensor(with_hook, None)).contains("hooks"));
        malformed(&tensor(P::bare().int(0), None));
        let md = |bit: u8| {
            P::bare()
                .op(op::EMPTY_DICT)
                .str("conj")
                .op(bit)
                .op(op::SETITEM)
        };
        assert_eq!(
            ok(&tensor(hooks(), Some(md(op::NEWFALSE)))).tensors.len(),
            1
        );
        assert_eq!(
            ok(&tensor(hooks(), Some(P::bare().op(op::EMPTY_DICT))))
                .tensors
                .len(),
            1
        );
        assert!(unsupported(&tensor(hooks(), Some(md(op::NEWTRUE)))).contains("conj"));
        malformed(&tensor(hooks(), Some(P::bare().int(1))));
    }

    fn parameter(requires_grad: bool) -> P {
        P::new()
            .global("torch._utils", "_rebuild_parameter")
            .tensor_v2("torch.FloatStorage", "0", 2, 0, &[2], &[1])
            .op(if requires_grad {
                op::NEWTRUE
            } else {
                op::NEWFALSE
            })
            .ordered_dict()
            .op(op::TUPLE3)
            .reduce()
    }

    #[test]
    fn parameters() {
        let u = ok(&parameter(true).stop());
        assert_eq!(show_root(&u), "Param(T0, true)");
        assert!(!u.tensors[0].requires_grad);
        assert_eq!(run(&parameter(false).stop()), "Param(T0, false)");
        // With an empty state (None, {}, or (None, {})) it is the same Parameter.
        for state in [
            P::bare().none(),
            P::bare().op(op::EMPTY_DICT),
            P::bare().none().op(op::EMPTY_DICT).op(op::TUPLE2),
        ] {
            let p = P::new()
                .global("torch._utils", "_rebuild_parameter_with_state")
                .mark()
                .tensor_v2("torch.FloatStorage", "0", 2, 0, &[2], &[1])
                .op(op::NEWTRUE)
                .ordered_dict()
                .raw(&state.0)
                .tuple()
                .reduce()
                .stop();
            assert_eq!(run(&p), "Param(T0, true)");
        }
        let p = P::new()
            .global("torch._utils", "_rebuild_parameter_with_state")
            .mark()
            .tensor_v2("torch.FloatStorage", "0", 2, 0, &[2], &[1])
            .op(op::NEWTRUE)
            .ordered_dict()
            .op(op::EMPTY_DICT)
            .str("attr")
            .int(1)
            .op(op::SETITEM)
            .tuple()
            .reduce()
            .stop();
        assert!(unsupported(&p).contains("Python attributes"));
        // An int Parameter cannot require grad.
        let p = P::new()
            .global("torch._utils", "_rebuild_parameter")
            .tensor_v2("torch.LongStorage", "0", 2, 0, &[2], &[1])
            .op(op::NEWTRUE)
            .ordered_dict()
            .op(op::TUPLE3)
            .reduce()
            .stop();
        assert!(malformed(&p).1.contains("gradients"));
        let p = P::new()
            .global("torch._utils", "_rebuild_parameter")
            .int(1)
            .op(op::NEWTRUE)
            .ordered_dict()
            .op(op::TUPLE3)
            .reduce()
            .stop();
        assert!(malformed(&p).1.contains("not a tensor"));
    }

    #[test]
    fn parameter_class_and_build() {
        // nn.Parameter(t, False) via NEWOBJ and REDUCE.
        for code in [op::NEWOBJ, op::REDUCE] {
            let p = P::new()
                .global("torch.nn.parameter", "Parameter")
                .tensor_v2("torch.FloatStorage", "0", 2, 0, &[2], &[1])
                .op(op::NEWFALSE)
                .op(op::TUPLE2)
                .op(code)
                .stop();
            assert_eq!(run(&p), "Param(T0, false)");
        }
        // BUILD with Tensor.__setstate__'s (requires_grad, _, hooks).
        let p = parameter(false)
            .op(op::NEWTRUE)
            .none()
            .ordered_dict()
            .op(op::TUPLE3)
            .op(op::BUILD)
            .stop();
        assert_eq!(run(&p), "Param(T0, true)");
        assert_eq!(
            run(&parameter(true).none().op(op::BUILD).stop()),
            "Param(T0, true)"
        );
        let p = parameter(false).ints(&[1, 2, 3, 4]).op(op::BUILD).stop();
        assert!(unsupported(&p).contains("Parameter"));
        let p = P::new()
            .tensor_v2("torch.FloatStorage", "0", 2, 0, &[2], &[1])
            .empty_tuple()
            .op(op::BUILD)
            .stop();
        assert!(unsupported(&p).contains("tensor"));
    }

    #[test]
    fn rebuild_from_type_v2() {
        let call = |ty: (&str, &str), state: P| {
            P::new()
                .global("torch._tensor", "_rebuild_from_type_v2")
                .mark()
                .global("torch._utils", "_rebuild_tensor_v2")
                .global(ty.0, ty.1)
                .mark()
                .storage("torch.FloatStorage", "0", 2)
                .int(0)
                .ints(&[2])
                .ints(&[1])
                .op(op::NEWTRUE)
                .ordered_dict()
                .tuple()
                .raw(&state.0)
                .tuple()
                .reduce()
                .stop()
        };
        let u = ok(&call(("torch", "Tensor"), P::bare().op(op::EMPTY_DICT)));
        assert_eq!(show_root(&u), "T0");
        assert!(u.tensors[0].requires_grad);
        assert_eq!(
            run(&call(("torch.nn.parameter", "Parameter"), P::bare().none())),
            "Param(T0, true)"
        );
        let state = P::bare().op(op::EMPTY_DICT).str("x").int(1).op(op::SETITEM);
        assert!(unsupported(&call(("torch", "Tensor"), state)).contains("Python attributes"));
        let (_, m, n) = forbidden(&call(("my.module", "MyTensor"), P::bare().none()));
        assert_eq!((m.as_str(), n.as_str()), ("my.module", "MyTensor"));
        assert!(unsupported(&call(("torch", "Size"), P::bare().none())).contains("subclass"));
    }

    // ----- limits and hostile input -----

    #[test]
    fn mark_nesting_is_limited() {
        let mut p = P::new();
        for _ in 0..MAX_DEPTH {
            p = p.mark();
        }
        for _ in 0..MAX_DEPTH {
            p = p.tuple();
        }
        // MAX_DEPTH MARKs are fine: ((((...)))) is MAX_DEPTH deep.
        ok(&p.clone().stop());
        let (off, m) = malformed(&P::new().raw(&vec![op::MARK; MAX_DEPTH + 1]).stop());
        assert_eq!(off as usize, 2 + MAX_DEPTH);
        assert!(m.contains("limit"), "{m}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        // [[[[...]]]] built without MARKs: EMPTY_LIST x n, then APPEND x (n-1).
        let n = MAX_DEPTH + 1;
        let mut p = P::new();
        for _ in 0..n {
            p = p.op(op::EMPTY_LIST);
        }
        for _ in 1..n {
            p = p.op(op::APPEND);
        }
        assert!(unsupported(&p.stop()).contains("nested"));
        // Depth through shared nodes counts too: a chain of tuples each holding the previous
        // one twice is as deep as it is long.
        let mut p = P::new().empty_tuple();
        for _ in 0..n {
            p = p.op(op::DUP).op(op::TUPLE2);
        }
        assert!(unsupported(&p.stop()).contains("nested"));
        let mut p = P::new().empty_tuple();
        for _ in 0..MAX_DEPTH - 1 {
            p = p.op(op::DUP).op(op::TUPLE2);
        }
        ok(&p.stop());
    }

    #[test]
    fn cycles_are_refused() {
        // l = []; l.append(l)
        let p = P::new()
            .op(op::EMPTY_LIST)
            .put(0)
            .get(0)
            .op(op::APPEND)
            .stop();
        assert!(unsupported(&p).contains("cycle"));
        // d = {}; d['self'] = (d,)
        let p = P::new()
            .op(op::EMPTY_DICT)
            .put(0)
            .str("self")
            .get(0)
            .op(op::TUPLE1)
            .op(op::SETITEM)
            .stop();
        assert!(unsupported(&p).contains("cycle"));
    }

    #[test]
    fn memo_abuse_is_bounded() {
        // Build a dict with 2000 entries, then copy it with OrderedDict(d) over and over.
        let mut p = P::new().op(op::EMPTY_DICT).put(0).mark();
        for i in 0..2000 {
            p = p.int(i).none();
        }
        p = p
            .op(op::SETITEMS)
            .op(op::POP)
            .global("collections", "OrderedDict")
            .put(1)
            .op(op::POP);
        let copy = P::bare()
            .get(1)
            .get(0)
            .op(op::TUPLE1)
            .reduce()
            .op(op::POP)
            .0;
        for _ in 0..20_000 {
            p = p.raw(&copy);
        }
        let (_, m) = malformed(&p.none().stop());
        assert!(m.contains("memo abuse"), "{m}");
        // A few copies are fine.
        let mut p = P::new().op(op::EMPTY_DICT).put(0).mark();
        for i in 0..10 {
            p = p.int(i).none();
        }
        p = p
            .op(op::SETITEMS)
            .op(op::POP)
            .global("collections", "OrderedDict")
            .put(1)
            .op(op::POP);
        for _ in 0..3 {
            p = p.raw(&copy);
        }
        assert_eq!(run(&p.none().stop()), "None");
    }

    #[test]
    fn big_memo_and_stack_are_linear() {
        // 100k DUPs of one object and 100k memo entries: fine, and fast.
        let mut p = P::new().none();
        for i in 0..100_000u32 {
            p = p.op(op::DUP).op_arg(op::LONG_BINPUT, &i.to_le_bytes());
        }
        let p = p.op(op::LIST).stop();
        assert!(matches!(unpickle(&p), Err(PickleError::Malformed { .. })));
        let mut p = P::new().mark().none();
        for i in 0..100_000u32 {
            p = p.op(op::DUP).op_arg(op::LONG_BINPUT, &i.to_le_bytes());
        }
        let u = ok(&p.op(op::LIST).stop());
        let Value::List(items) = &u.objects.nodes[u.objects.root] else {
            panic!()
        };
        assert_eq!(items.len(), 100_001);
    }

    // ----- real torch.save vectors -----

    const STATE_DICT: &[u8] = include_bytes!("../../tests/data/pickle/state_dict.pkl");
    const PARAMETER: &[u8] = include_bytes!("../../tests/data/pickle/parameter.pkl");
    const TIED: &[u8] = include_bytes!("../../tests/data/pickle/tied.pkl");
    const V3: &[u8] = include_bytes!("../../tests/data/pickle/v3.pkl");
    const CHECKPOINT: &[u8] = include_bytes!("../../tests/data/pickle/checkpoint.pkl");
    const PROTOCOL4: &[u8] = include_bytes!("../../tests/data/pickle/protocol4.pkl");
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
