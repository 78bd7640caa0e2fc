//! The machine: input cursor, stack and MARK frames, memo, the nodes built so far, and
//! typed views of nodes for the opcodes and callables. `finish` checks the result.

use std::collections::HashMap;

use super::allowlist::Global;
use super::limits::{
    MAX_DEPTH, MAX_MEMO, MAX_NDIM, MAX_NODES, MAX_STACK, WORK_BASE, WORK_PER_BYTE,
};
use super::{PickleError, Res, StorageRef, Unpickled};
use crate::dtype::DType;
use crate::format::{ObjId, ObjectGraph, Tensor, Value};

/// The pickle memo: dense for the sequential indices every writer uses, sparse otherwise
/// (a LONG_BINPUT index may be anything up to 2^32; PUT's even more).
#[derive(Default)]
pub(super) struct Memo {
    dense: Vec<Option<ObjId>>,
    sparse: HashMap<u64, ObjId>,
    /// Entries in use (MEMOIZE stores at this index).
    pub(super) count: usize,
}

impl Memo {
    pub(super) fn get(&self, i: u64) -> Option<ObjId> {
        match usize::try_from(i) {
            Ok(u) if u < self.dense.len() => self.dense.get(u).copied().flatten(),
            _ => self.sparse.get(&i).copied(),
        }
    }

    /// Whether `i` holds nothing yet.
    pub(super) fn is_free(&self, i: u64) -> bool {
        self.get(i).is_none()
    }

    pub(super) fn put(&mut self, i: u64, v: ObjId) {
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
pub(super) struct SideTable<T>(Vec<(ObjId, T)>);

impl<T> Default for SideTable<T> {
    fn default() -> Self {
        SideTable(Vec::new())
    }
}

impl<T> SideTable<T> {
    /// Records a fact about `id`, which must be newer than every id recorded so far.
    pub(super) fn insert(&mut self, id: ObjId, v: T) {
        debug_assert!(self.0.last().is_none_or(|&(last, _)| last < id));
        self.0.push((id, v));
    }

    pub(super) fn get(&self, id: &ObjId) -> Option<&T> {
        self.0
            .binary_search_by_key(id, |&(k, _)| k)
            .ok()
            .map(|i| &self.0[i].1)
    }
}

/// The i-th child of a node, in a fixed order, for walking the graph without recursion.
pub(super) fn child(v: &Value, i: usize) -> Option<ObjId> {
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
        | Value::Tensor(_) => None,
    }
}

/// A short name of a node's type for error messages.
pub(super) fn type_name(v: &Value) -> &'static str {
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

/// One BINPERSID reference to a storage: which storage, and with which dtype this
/// reference views it (torch re-wraps a cached storage in the dtype each reference asks
/// for, so a `_rebuild_tensor_v2` uses the dtype of its own persistent id).
#[derive(Clone, Copy, Debug)]
pub(super) struct StorageUse {
    pub(super) index: usize,
    /// `None`: `UntypedStorage` (a v2 tensor on it is uint8).
    pub(super) dtype: Option<DType>,
}

pub(super) struct Vm<'a> {
    pub(super) data: &'a [u8],
    /// Next byte to read.
    pub(super) pos: usize,
    /// Offset of the opcode being run (what errors report).
    pub(super) at: usize,
    pub(super) nodes: Vec<Value>,
    pub(super) stack: Vec<ObjId>,
    /// Stack lengths at each open MARK.
    pub(super) marks: Vec<usize>,
    pub(super) memo: Memo,
    /// Nodes that stand for a global (their `Value` is a `None` placeholder).
    pub(super) globals: SideTable<Global>,
    /// Nodes made by BINPERSID.
    pub(super) storage_uses: SideTable<StorageUse>,
    pub(super) storages: Vec<StorageRef>,
    pub(super) storage_by_key: HashMap<String, usize>,
    pub(super) tensors: Vec<Tensor>,
    /// Work units left for opcodes that copy existing data.
    pub(super) work_left: usize,
    /// Persistent ids are legacy (pre-zip) `torch.save` ones, with a sixth field
    /// (`view_metadata`).
    pub(super) legacy: bool,
    /// Set when the pickle needed bytes past the end of `data` (see `unpickle_prefix`).
    pub(super) ran_out: bool,
}

impl<'a> Vm<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
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
            legacy: false,
            ran_out: false,
        }
    }

    // ----- errors -----

    pub(super) fn malformed(&self, message: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            offset: self.at as u64,
            message: message.into(),
        }
    }

    pub(super) fn unsupported(&self, what: impl Into<String>) -> PickleError {
        PickleError::Unsupported {
            offset: self.at as u64,
            what: what.into(),
        }
    }

    // ----- bounds (limits.rs holds the numbers) -----

    pub(super) fn limit(&self, what: &str, limit: usize) -> PickleError {
        self.malformed(format!(
            "the pickle exceeds zeroload's limit of {limit} {what}"
        ))
    }

    pub(super) fn charge(&mut self, units: usize) -> Res<()> {
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

    pub(super) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The next `n` bytes; checks the length against what is left before anything else.
    pub(super) fn take(&mut self, n: usize, what: &str) -> Res<&'a [u8]> {
        let data = self.data;
        match self.pos.checked_add(n) {
            Some(end) if end <= data.len() => {
                let s = &data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => {
                self.ran_out = true;
                Err(self.malformed(format!(
                    "truncated pickle: {what} needs {n} bytes but only {} are left",
                    self.remaining()
                )))
            }
        }
    }

    /// `take` with a length read from the file (may claim anything up to 2^64).
    pub(super) fn take_len(&mut self, n: u64, what: &str) -> Res<&'a [u8]> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => self.take(n, what),
            _ => {
                self.ran_out = true;
                Err(self.malformed(format!(
                    "{what} claims {n} bytes but only {} are left in the pickle",
                    self.remaining()
                )))
            }
        }
    }

    pub(super) fn array<const N: usize>(&mut self, what: &str) -> Res<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(super) fn u8(&mut self, what: &str) -> Res<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(super) fn u32(&mut self, what: &str) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &str) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A newline-terminated argument (without the newline).
    pub(super) fn line(&mut self, what: &str) -> Res<&'a [u8]> {
        let data = self.data;
        let rest = &data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            None => {
                self.ran_out = true;
                Err(self.malformed(format!(
                    "truncated pickle: {what} argument has no terminating newline"
                )))
            }
        }
    }

    pub(super) fn utf8(&self, b: &'a [u8], what: &str) -> Res<&'a str> {
        std::str::from_utf8(b).map_err(|e| {
            self.malformed(format!(
                "{what} is not valid UTF-8 ({e}; lone surrogates are not supported)"
            ))
        })
    }

    // ----- nodes and stack -----

    pub(super) fn node(&mut self, v: Value) -> Res<ObjId> {
        if self.nodes.len() >= MAX_NODES {
            return Err(self.limit("objects", MAX_NODES));
        }
        self.nodes.push(v);
        Ok(self.nodes.len() - 1)
    }

    pub(super) fn push(&mut self, id: ObjId) -> Res<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.limit("stack entries", MAX_STACK));
        }
        self.stack.push(id);
        Ok(())
    }

    pub(super) fn push_new(&mut self, v: Value) -> Res<()> {
        let id = self.node(v)?;
        self.push(id)
    }

    /// Where the current MARK frame starts.
    pub(super) fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    pub(super) fn pop(&mut self, what: &str) -> Res<ObjId> {
        if self.stack.len() <= self.base() {
            return Err(self.malformed(format!("stack underflow in {what}")));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed(format!("stack underflow in {what}")))
    }

    pub(super) fn top(&self, what: &str) -> Res<ObjId> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.base() => Ok(id),
            _ => Err(self.malformed(format!("stack underflow in {what}"))),
        }
    }

    /// Closes the innermost MARK; its items are `stack[start..]`.
    pub(super) fn pop_mark(&mut self, what: &str) -> Res<usize> {
        self.marks
            .pop()
            .ok_or_else(|| self.malformed(format!("{what} without a MARK")))
    }

    /// After `pop_mark`: the object just below the marked items (the container that
    /// APPENDS / SETITEMS / ADDITEMS extend).
    pub(super) fn target_below(&self, start: usize, what: &str) -> Res<ObjId> {
        if start <= self.base() || start > self.stack.len() {
            return Err(self.malformed(format!("stack underflow in {what}")));
        }
        Ok(self.stack[start - 1])
    }

    pub(super) fn val(&self, id: ObjId) -> &Value {
        // Every id on the stack, in the memo or in a container was returned by `node`.
        &self.nodes[id]
    }

    pub(super) fn memo_put(&mut self, i: u64, what: &str) -> Res<()> {
        let top = self.top(what)?;
        if self.memo.is_free(i) && self.memo.count >= MAX_MEMO {
            return Err(self.limit("memo entries", MAX_MEMO));
        }
        self.memo.put(i, top);
        Ok(())
    }

    pub(super) fn memo_get(&mut self, i: u64, what: &str) -> Res<()> {
        let id = self
            .memo
            .get(i)
            .ok_or_else(|| self.malformed(format!("{what} of memo entry {i}, which is empty")))?;
        self.push(id)
    }

    // ----- typed views of nodes -----

    pub(super) fn int(&self, id: ObjId, what: &str) -> Res<i64> {
        match self.val(id) {
            Value::Int(i) => Ok(*i),
            Value::BigInt(_) => Err(self.malformed(format!("{what} is out of range"))),
            v => Err(self.malformed(format!("{what} must be an int, not {}", type_name(v)))),
        }
    }

    pub(super) fn nonneg(&self, id: ObjId, what: &str) -> Res<u64> {
        let i = self.int(id, what)?;
        u64::try_from(i).map_err(|_| self.malformed(format!("{what} is negative ({i})")))
    }

    pub(super) fn bool(&self, id: ObjId, what: &str) -> Res<bool> {
        match self.val(id) {
            Value::Bool(b) => Ok(*b),
            v => Err(self.malformed(format!("{what} must be a bool, not {}", type_name(v)))),
        }
    }

    pub(super) fn str(&self, id: ObjId, what: &str) -> Res<&str> {
        match self.val(id) {
            Value::Str(s) => Ok(s),
            v => Err(self.malformed(format!("{what} must be a str, not {}", type_name(v)))),
        }
    }

    /// A str, or ASCII bytes (torch's `_maybe_decode_ascii`).
    pub(super) fn str_or_ascii(&self, id: ObjId, what: &str) -> Res<&str> {
        match self.val(id) {
            Value::Str(s) => Ok(s),
            Value::Bytes(b) if b.is_ascii() => Ok(std::str::from_utf8(b).unwrap_or_default()),
            v => Err(self.malformed(format!("{what} must be a str, not {}", type_name(v)))),
        }
    }

    pub(super) fn tuple(&self, id: ObjId, what: &str) -> Res<&[ObjId]> {
        match self.val(id) {
            Value::Tuple(items) => Ok(items),
            v => Err(self.malformed(format!("{what} must be a tuple, not {}", type_name(v)))),
        }
    }

    /// Items of a tuple, list, set or frozenset.
    pub(super) fn seq(&self, id: ObjId) -> Option<&[ObjId]> {
        match self.val(id) {
            Value::Tuple(x) | Value::List(x) | Value::Set(x) | Value::FrozenSet(x) => Some(x),
            _ => None,
        }
    }

    /// Shape / stride: a tuple, list or torch.Size of ints.
    pub(super) fn int_seq(&mut self, id: ObjId, what: &str) -> Res<Vec<i64>> {
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

    /// Python object state that is "nothing": None, `{}`, or a `(dict, slots)` pair of those.
    pub(super) fn is_empty_state(&self, id: ObjId) -> bool {
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

    // ----- the end -----

    /// Checks what consumers rely on: the result is acyclic, at most `MAX_DEPTH` deep, and
    /// holds no global (class or function) as a value. Walks without recursion.
    pub(super) fn finish(self, root: ObjId) -> Res<Unpickled> {
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

    pub(super) fn enter(
        &self,
        id: ObjId,
        height: &mut [u32],
        path: &mut Vec<(ObjId, usize, u32)>,
    ) -> Res<()> {
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
