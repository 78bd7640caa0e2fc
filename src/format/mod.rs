//! Checkpoint formats: detection, and the one model every format parses into.
//!
//! A parsed checkpoint is a table of storages (byte ranges of the file), a table of tensors
//! (views on those storages) and an object graph (the containers and plain values that
//! hold the tensors, as `torch.load` would return them). Parsers work on borrowed bytes (or
//! a `Read + Seek` the caller hands them) and never touch the file system or Python, so
//! they can be fuzzed directly; opening, mapping and reading a file is `crate::checkpoint`'s
//! (`tests/layers.rs` checks that nothing here reaches for the file system).
#![forbid(unsafe_code)]

pub mod legacy;
pub mod pickle;
pub mod safetensors;
pub mod torchzip;

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The on-disk format of a checkpoint file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// `torch.save` zip archive (`.pt`, `.pth`, `.bin`), torch >= 1.6.
    TorchZip,
    /// Legacy (pre-zip) `torch.save` file: torch < 1.6, or
    /// `_use_new_zipfile_serialization=False`.
    TorchLegacy,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::TorchZip => "torch zip",
            Format::TorchLegacy => "torch legacy",
        }
    }
}

/// One stored byte range: a torch storage (a zip record) or the data of one safetensors
/// tensor. Always inside the file (checked by the parser).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Storage {
    /// The record key (`data/<key>` in a torch zip; the tensor name in safetensors).
    pub key: String,
    /// Where torch saved it from ("cpu", "cuda:0"); informational.
    pub location: String,
    /// Absolute offset of the first byte in the file.
    pub offset: u64,
    /// Length in bytes.
    pub nbytes: u64,
}

/// A tensor: a strided view on a storage. Shape, strides and offset are in elements of
/// `dtype`, as torch counts them; every element it can reach lies inside its storage
/// (checked by `validate`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    /// Index into `Parsed::storages`.
    pub storage: usize,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub strides: Vec<i64>,
    pub storage_offset: u64,
    pub requires_grad: bool,
}

impl Tensor {
    pub fn numel(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// The byte range `[start, end)` of its storage that the tensor can reach; `None` when
    /// the arithmetic overflows or a stride is negative. Empty tensors reach nothing.
    pub fn byte_span(&self) -> Option<(u64, u64)> {
        let size = self.dtype.size() as u64;
        let start = self.storage_offset.checked_mul(size)?;
        if self.shape.contains(&0) {
            return Some((start, start));
        }
        let mut last = self.storage_offset;
        for (&dim, &stride) in self.shape.iter().zip(&self.strides) {
            let stride = u64::try_from(stride).ok()?;
            last = last.checked_add((dim - 1).checked_mul(stride)?)?;
        }
        let end = last.checked_add(1)?.checked_mul(size)?;
        Some((start, end))
    }

    /// Whether the tensor is C-contiguous (row-major, no gaps).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1i64;
        for (&dim, &stride) in self.shape.iter().zip(&self.strides).rev() {
            if dim != 1 && stride != expected {
                return false;
            }
            expected = expected.saturating_mul(dim as i64);
        }
        true
    }
}

/// A tensor the file describes but torch cannot hold (a dtype without a torch equivalent,
/// or one zeroload does not know). Its entry in `Parsed::tensors` stands in for it as the
/// `uint8` bytes of its storage, so names, order and byte ranges stay right; loading it
/// must fail, naming the tensor and this dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unrepresentable {
    /// Index into `Parsed::tensors`.
    pub tensor: usize,
    /// The dtype as the file names it (`"F6_E2M3"`).
    pub dtype: String,
    /// The shape as the file gives it.
    pub shape: Vec<u64>,
    /// Why it cannot be loaded.
    pub why: String,
}

/// Index of an object in `ObjectGraph::nodes`.
pub type ObjId = usize;

/// A node of the object graph that a checkpoint unpickles to. Containers refer to their
/// children by id, so an object referenced twice (pickle's memo) stays one object, and no
/// input can make the graph larger than the number of opcodes that built it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An int too large for i64: little-endian two's complement bytes (pickle's LONG1).
    BigInt(Vec<u8>),
    Float(f64),
    Complex(f64, f64),
    Str(String),
    Bytes(Vec<u8>),
    ByteArray(Vec<u8>),
    Tuple(Vec<ObjId>),
    List(Vec<ObjId>),
    Set(Vec<ObjId>),
    FrozenSet(Vec<ObjId>),
    Dict(Vec<(ObjId, ObjId)>),
    /// `collections.OrderedDict`; `attrs` holds instance attributes set by BUILD
    /// (a module state dict's `_metadata`).
    OrderedDict {
        items: Vec<(ObjId, ObjId)>,
        attrs: Vec<(String, ObjId)>,
    },
    /// `collections.Counter`.
    Counter(Vec<(ObjId, ObjId)>),
    /// `torch.Size`.
    Size(Vec<i64>),
    /// `torch.device`, as torch prints it ("cpu", "cuda:0").
    Device(String),
    /// `torch.float32` and friends.
    DType(DType),
    /// A storage object by itself (rare: saved `UntypedStorage`s); index into storages.
    Storage(usize),
    /// A tensor; index into `Parsed::tensors`.
    Tensor(usize),
    /// `torch.nn.Parameter` wrapping a tensor node.
    Parameter {
        tensor: ObjId,
        requires_grad: bool,
    },
}

/// The containers and values of a checkpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectGraph {
    pub nodes: Vec<Value>,
    pub root: ObjId,
}

impl ObjectGraph {
    pub fn push(&mut self, v: Value) -> ObjId {
        self.nodes.push(v);
        self.nodes.len() - 1
    }

    /// Keeps only the nodes reachable from the root, renumbered densely (the root
    /// first), and returns the old node vector (the nodes kept replaced by `None`). A pickle leaves many nodes behind that no load
    /// returns (each tensor's persistent id, rebuild arguments, sizes and strides: about
    /// 20 nodes per tensor of a state dict), which would otherwise stay in memory as long
    /// as the checkpoint.
    pub fn compact(&mut self) -> Vec<Value> {
        const UNSEEN: usize = usize::MAX;
        let n = self.nodes.len();
        let mut new_id = vec![UNSEEN; n];
        let mut order: Vec<ObjId> = Vec::new();
        let mut stack = vec![self.root];
        while let Some(id) = stack.pop() {
            if id >= n || new_id[id] != UNSEEN {
                continue;
            }
            new_id[id] = order.len();
            order.push(id);
            for_each_child(&self.nodes[id], |c| stack.push(c));
        }
        if order.len() == n && order.iter().enumerate().all(|(i, &id)| i == id) {
            return Vec::new();
        }
        let mut old = std::mem::take(&mut self.nodes);
        self.nodes = order
            .iter()
            .map(|&id| {
                let mut v = std::mem::replace(&mut old[id], Value::None);
                // Ids the walk never reached are out of range (`finish` rules them out).
                for_each_child_mut(&mut v, |c| *c = new_id.get(*c).copied().unwrap_or(UNSEEN));
                v
            })
            .collect();
        self.root = new_id.get(self.root).copied().unwrap_or(UNSEEN);
        old
    }
}

fn for_each_child(v: &Value, mut f: impl FnMut(ObjId)) {
    match v {
        Value::Tuple(items) | Value::List(items) | Value::Set(items) | Value::FrozenSet(items) => {
            items.iter().for_each(|&c| f(c))
        }
        Value::Dict(items) | Value::Counter(items) => items.iter().for_each(|&(k, v)| {
            f(k);
            f(v)
        }),
        Value::OrderedDict { items, attrs } => {
            items.iter().for_each(|&(k, v)| {
                f(k);
                f(v)
            });
            attrs.iter().for_each(|&(_, v)| f(v));
        }
        Value::Parameter { tensor, .. } => f(*tensor),
        // Leaves, listed so that a new variant is a compile error here until its children
        // (if any) are walked.
        Value::None
        | Value::Bool(_)
        | Value::Int(_)
        | Value::BigInt(_)
        | Value::Float(_)
        | Value::Complex(..)
        | Value::Str(_)
        | Value::Bytes(_)
        | Value::ByteArray(_)
        | Value::Size(_)
        | Value::Device(_)
        | Value::DType(_)
        | Value::Storage(_)
        | Value::Tensor(_) => {}
    }
}

fn for_each_child_mut(v: &mut Value, mut f: impl FnMut(&mut ObjId)) {
    match v {
        Value::Tuple(items) | Value::List(items) | Value::Set(items) | Value::FrozenSet(items) => {
            items.iter_mut().for_each(f)
        }
        Value::Dict(items) | Value::Counter(items) => items.iter_mut().for_each(|(k, v)| {
            f(k);
            f(v)
        }),
        Value::OrderedDict { items, attrs } => {
            items.iter_mut().for_each(|(k, v)| {
                f(k);
                f(v)
            });
            attrs.iter_mut().for_each(|(_, v)| f(v));
        }
        Value::Parameter { tensor, .. } => f(tensor),
        // Leaves, listed so that a new variant is a compile error here until its children
        // (if any) are walked.
        Value::None
        | Value::Bool(_)
        | Value::Int(_)
        | Value::BigInt(_)
        | Value::Float(_)
        | Value::Complex(..)
        | Value::Str(_)
        | Value::Bytes(_)
        | Value::ByteArray(_)
        | Value::Size(_)
        | Value::Device(_)
        | Value::DType(_)
        | Value::Storage(_)
        | Value::Tensor(_) => {}
    }
}

/// What a parser returns: everything about the checkpoint except the open file.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    pub format: Format,
    pub storages: Vec<Storage>,
    pub tensors: Vec<Tensor>,
    pub objects: ObjectGraph,
    /// safetensors `__metadata__` (string to string), sorted by key.
    pub metadata: Option<Vec<(String, String)>>,
    /// The tensors torch cannot hold, by increasing tensor index.
    pub unrepresentable: Vec<Unrepresentable>,
}

impl Parsed {
    /// Why tensor `i` cannot be loaded, if it cannot.
    pub fn unrepresentable(&self, i: usize) -> Option<&Unrepresentable> {
        if self.unrepresentable.is_empty() {
            return None;
        }
        self.unrepresentable
            .binary_search_by_key(&i, |u| u.tensor)
            .ok()
            .map(|k| &self.unrepresentable[k])
    }
}

/// Detects the format of `bytes` and parses it. `path` only names the file in errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let parsed = match detect(path, bytes)? {
        Format::Safetensors => safetensors::parse(path, bytes)?,
        Format::TorchZip => torchzip::parse(path, std::io::Cursor::new(bytes), bytes.len() as u64)?,
        Format::TorchLegacy => {
            legacy::parse(path, std::io::Cursor::new(bytes), bytes.len() as u64)?
        }
    };
    validate(path, bytes.len() as u64, &parsed)?;
    Ok(parsed)
}

/// How many leading bytes `detect` looks at, at most.
pub const DETECT_BYTES: u64 = 512;

/// Tells the format from the first bytes (never from the file name). `bytes` may be the
/// whole file or its first `DETECT_BYTES`.
pub fn detect(path: &Path, bytes: &[u8]) -> Result<Format> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return Ok(Format::TorchZip);
    }
    // Legacy torch.save: a bare pickle stream whose first pickle is the magic number.
    if legacy::is_legacy(&bytes[..bytes.len().min(DETECT_BYTES as usize)]) {
        return Ok(Format::TorchLegacy);
    }
    if bytes.len() >= 262 && &bytes[257..262] == b"ustar" {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            entry: "file".into(),
            what: "this is a legacy tar-format torch.save file, which zeroload does not read; \
                   re-save it with a current torch"
                .into(),
        });
    }
    if bytes.len() >= 9 {
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        if bytes[8] == b'{' && n >= 2 {
            return Ok(Format::Safetensors);
        }
    }
    let what = if bytes.is_empty() {
        "the file is empty".to_string()
    } else if bytes.len() < 9 {
        format!("the file is only {} bytes long", bytes.len())
    } else {
        "not a checkpoint: expected a safetensors header (8-byte length then '{'), a torch \
         zip archive ('PK') or a legacy torch.save file (a pickle of torch's magic number)"
            .to_string()
    };
    Err(Error::Malformed {
        path: path.to_path_buf(),
        entry: "file".into(),
        offset: Some(0),
        message: what,
    })
}

/// Checks what every format must guarantee: storages inside the file, tensors inside their
/// storages, object ids in range.
pub fn validate(path: &Path, file_len: u64, p: &Parsed) -> Result<()> {
    let bad = |entry: String, message: String| Error::Malformed {
        path: path.to_path_buf(),
        entry,
        offset: None,
        message,
    };
    for s in &p.storages {
        let end = s.offset.checked_add(s.nbytes);
        if end.is_none_or(|e| e > file_len) {
            return Err(bad(
                format!("storage {:?}", s.key),
                format!(
                    "bytes {}..+{} lie outside the file ({} bytes)",
                    s.offset, s.nbytes, file_len
                ),
            ));
        }
    }
    for (i, t) in p.tensors.iter().enumerate() {
        let Some(storage) = p.storages.get(t.storage) else {
            return Err(bad(
                format!("tensor #{i}"),
                "refers to a missing storage".into(),
            ));
        };
        if t.shape.len() != t.strides.len() {
            return Err(bad(
                format!("tensor #{i}"),
                format!("{} sizes but {} strides", t.shape.len(), t.strides.len()),
            ));
        }
        // torch sizes and strides are int64, and torch refuses shapes whose product (zero
        // sizes aside) overflows it, or negative strides, even for tensors with no
        // elements, whose span below is empty whatever their sizes and strides.
        let fits_torch = t.strides.iter().all(|&s| s >= 0)
            && t.shape
                .iter()
                .try_fold(1i64, |acc, &d| {
                    acc.checked_mul(i64::try_from(d).ok()?.max(1))
                })
                .is_some();
        if !fits_torch {
            return Err(bad(
                format!("tensor #{i} (storage {:?})", storage.key),
                format!(
                    "shape {:?}, stride {:?}: sizes must fit in int64 together and strides \
                     must not be negative",
                    t.shape, t.strides
                ),
            ));
        }
        match t.byte_span() {
            Some((_, end)) if end <= storage.nbytes => {}
            Some((_, end)) => {
                return Err(bad(
                    format!("tensor #{i} (storage {:?})", storage.key),
                    format!(
                        "reaches byte {end} of a storage of {} bytes (shape {:?}, stride {:?}, \
                         offset {})",
                        storage.nbytes, t.shape, t.strides, t.storage_offset
                    ),
                ))
            }
            None => {
                return Err(bad(
                    format!("tensor #{i} (storage {:?})", storage.key),
                    format!(
                        "shape {:?}, stride {:?}, offset {} overflow or use negative strides",
                        t.shape, t.strides, t.storage_offset
                    ),
                ))
            }
        }
    }
    let mut previous = None;
    for u in &p.unrepresentable {
        if u.tensor >= p.tensors.len() || previous.is_some_and(|prev| prev >= u.tensor) {
            return Err(bad(
                format!("tensor #{}", u.tensor),
                "listed out of order or out of range".into(),
            ));
        }
        previous = Some(u.tensor);
    }
    let n = p.objects.nodes.len();
    if p.objects.root >= n && n > 0 || n == 0 {
        return Err(bad("object graph".into(), "has no root object".into()));
    }
    Ok(())
}

/// See `Checkpoint::flat_tensors`. A `Parameter` counts as its tensor.
pub fn flat_tensors(g: &ObjectGraph) -> Option<Vec<(String, usize)>> {
    let items = match g.nodes.get(g.root)? {
        Value::Dict(items) | Value::OrderedDict { items, .. } => items,
        _ => return None,
    };
    let mut out = Vec::with_capacity(items.len());
    for &(k, v) in items {
        let Value::Str(name) = g.nodes.get(k)? else {
            return None;
        };
        let tensor = match g.nodes.get(v)? {
            Value::Tensor(t) => *t,
            Value::Parameter { tensor, .. } => match g.nodes.get(*tensor)? {
                Value::Tensor(t) => *t,
                _ => return None,
            },
            _ => return None,
        };
        out.push((name.clone(), tensor));
    }
    Some(out)
}

/// See `Checkpoint::single_tensor`.
pub fn single_tensor(g: &ObjectGraph) -> Option<usize> {
    match g.nodes.get(g.root)? {
        Value::Tensor(t) => Some(*t),
        Value::Parameter { tensor, .. } => match g.nodes.get(*tensor)? {
            Value::Tensor(t) => Some(*t),
            _ => None,
        },
        _ => None,
    }
}

/// A pickle's error as the checkpoint error of `entry` in `path`, its offset made absolute
/// (`start`: where the pickle begins in the file). Shared by the torch zip and legacy parsers.
pub(crate) fn pickle_error(path: &Path, entry: &str, start: u64, e: pickle::PickleError) -> Error {
    let path = path.to_path_buf();
    let entry = entry.to_string();
    match e {
        pickle::PickleError::Malformed { offset, message } => Error::Malformed {
            path,
            entry,
            offset: Some(start + offset),
            message,
        },
        pickle::PickleError::Forbidden { module, name, .. } => Error::ForbiddenGlobal {
            path,
            entry,
            module,
            name,
        },
        pickle::PickleError::Unsupported { what, .. } => Error::Unsupported { path, entry, what },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_tensor_is_a_root_tensor_or_parameter_only() {
        let mut g = ObjectGraph::default();
        let t = g.push(Value::Tensor(3));
        g.root = t;
        assert_eq!(single_tensor(&g), Some(3));
        let p = g.push(Value::Parameter {
            tensor: t,
            requires_grad: true,
        });
        g.root = p;
        assert_eq!(single_tensor(&g), Some(3));
        let key = g.push(Value::Str("w".into()));
        g.root = g.push(Value::Dict(vec![(key, t)]));
        assert_eq!(single_tensor(&g), None);
        assert_eq!(flat_tensors(&g), Some(vec![("w".to_string(), 3)]));
        g.root = g.push(Value::List(vec![t]));
        assert_eq!(single_tensor(&g), None);
        let odd = g.push(Value::Int(1));
        g.root = g.push(Value::Parameter {
            tensor: odd,
            requires_grad: false,
        });
        assert_eq!(single_tensor(&g), None);
    }

    #[test]
    fn compaction_keeps_the_tree_and_drops_what_it_does_not_reach() {
        let mut g = ObjectGraph::default();
        let dangling = g.push(Value::Storage(0)); // a rebuild argument, left behind
        let held = g.push(Value::Storage(1));
        let t = g.push(Value::Tensor(0));
        let p = g.push(Value::Parameter {
            tensor: t,
            requires_grad: true,
        });
        let list = g.push(Value::List(vec![held, p, held]));
        let key = g.push(Value::Str("k".into()));
        g.root = g.push(Value::OrderedDict {
            items: vec![(key, list)],
            attrs: vec![("_metadata".into(), held)],
        });
        let before = g.clone();
        let dropped = g.compact();
        // The old nodes, emptied where they moved to the new numbering.
        assert_eq!(dropped[dangling], Value::Storage(0));
        assert_eq!(dropped.iter().filter(|v| **v != Value::None).count(), 1);
        assert_eq!(g.root, 0);
        assert_eq!(g.nodes.len(), 6);
        // The same tree, renumbered.
        let Value::OrderedDict { items, attrs } = &g.nodes[g.root] else {
            panic!("{:?}", g.nodes[g.root]);
        };
        assert_eq!(g.nodes[items[0].0], Value::Str("k".into()));
        let Value::List(list) = &g.nodes[items[0].1] else {
            panic!()
        };
        assert_eq!(list[0], list[2]);
        assert_eq!(list[0], attrs[0].1);
        assert_eq!(g.nodes[list[0]], Value::Storage(1));
        let Value::Parameter { tensor, .. } = &g.nodes[list[1]] else {
            panic!()
        };
        assert_eq!(g.nodes[*tensor], Value::Tensor(0));
        assert_eq!(flat_tensors(&g), flat_tensors(&before));
        assert!(g.compact().is_empty());
    }
}
