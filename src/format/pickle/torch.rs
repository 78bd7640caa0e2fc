//! torch objects: storages from persistent ids, and the tensor and parameter rebuild
//! functions of `torch._utils` / `torch._tensor`.

use super::allowlist::{Global, Rebuild};
use super::limits::clip;
use super::vm::{type_name, StorageUse, Vm};
use super::{Res, StorageRef};
use crate::dtype::DType;
use crate::format::{ObjId, Tensor, Value};

/// Whether torch lets a tensor of this dtype require gradients.
pub(super) fn can_require_grad(d: DType) -> bool {
    d.is_floating_point() || d.is_complex()
}

impl Vm<'_> {
    /// `backward_hooks`: must be empty (torch never saves hooks).
    pub(super) fn check_hooks(&self, id: ObjId) -> Res<()> {
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

    // ----- persistent ids -----

    pub(super) fn persistent_load(&mut self, pid: ObjId) -> Res<ObjId> {
        let shape = if self.legacy {
            "a legacy persistent id must be ('storage', storage class, key, location, numel, \
             view_metadata)"
        } else {
            "a persistent id must be ('storage', storage class, key, location, numel)"
        };
        let Value::Tuple(items) = self.val(pid) else {
            return Err(self.malformed(format!("{shape}, not a {}", type_name(self.val(pid)))));
        };
        let (tag, cls, key, location, numel, view) = match (self.legacy, items.as_slice()) {
            (false, &[tag, cls, key, location, numel]) => (tag, cls, key, location, numel, None),
            (true, &[tag, cls, key, location, numel, view]) => {
                (tag, cls, key, location, numel, Some(view))
            }
            _ => {
                return Err(self.malformed(format!("{shape}; this one has {} fields", items.len())))
            }
        };
        if self.str_or_ascii(tag, "persistent id type")? != "storage" {
            return Err(self.malformed(format!("{shape}; its first field is not 'storage'")));
        }
        let Some(&Global::StorageClass(dtype)) = self.globals.get(&cls) else {
            return Err(self.malformed(format!("{shape}; its second field is not a storage class")));
        };
        let numel = self.nonneg(numel, "storage numel")?;
        let root = self.storage_ref(key, location, dtype, numel, None)?;
        let index = match view {
            None => root,
            Some(v) if matches!(self.val(v), Value::None) => root,
            Some(v) => self.storage_view(v, root, location, dtype)?,
        };
        let id = self.node(Value::Storage(index))?;
        self.storage_uses.insert(id, StorageUse { index, dtype });
        Ok(id)
    }

    /// The index of the storage `key` names, registered on first use. `view_of`: see
    /// `StorageRef::view_of`; a key is either always a view or never one.
    fn storage_ref(
        &mut self,
        key: ObjId,
        location: ObjId,
        dtype: Option<DType>,
        numel: u64,
        view_of: Option<(usize, u64)>,
    ) -> Res<usize> {
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
        match known {
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
                if self.storages[i].view_of.is_some() != view_of.is_some() {
                    return Err(self.malformed(format!(
                        "storage {:?} is used both as a storage and as a view of one",
                        clip(&self.storages[i].key)
                    )));
                }
                Ok(i)
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
                    view_of,
                });
                Ok(i)
            }
        }
    }

    /// A legacy `view_metadata = (view key, offset, size)` (in elements of the storage
    /// class) on storage `root`: the storage it names, a byte range of `root`.
    fn storage_view(
        &mut self,
        meta: ObjId,
        root: usize,
        location: ObjId,
        dtype: Option<DType>,
    ) -> Res<usize> {
        let &[key, offset, size] = self.tuple(meta, "view_metadata")? else {
            return Err(self.malformed("view_metadata must be (key, offset, size)"));
        };
        let offset = self.nonneg(offset, "storage view offset")?;
        let size = self.nonneg(size, "storage view size")?;
        let elem = dtype.map_or(1, |d| d.size() as u64);
        let root_bytes = self.storages[root].nbytes().unwrap_or(0);
        let span = offset
            .checked_add(size)
            .and_then(|end| end.checked_mul(elem))
            .filter(|&end| end <= root_bytes);
        if span.is_none() {
            return Err(self.malformed(format!(
                "storage view of {size} elements at element {offset} runs past its storage \
                 {:?} ({root_bytes} bytes)",
                clip(&self.storages[root].key)
            )));
        }
        // Within root_bytes, so no overflow.
        let offset_bytes = offset * elem;
        let i = self.storage_ref(key, location, dtype, size, Some((root, offset_bytes)))?;
        if self.storages[i].view_of != Some((root, offset_bytes)) {
            return Err(self.malformed(format!(
                "storage view {:?} is described twice, differently",
                clip(&self.storages[i].key)
            )));
        }
        Ok(i)
    }

    pub(super) fn check_grad(&self, tensor: usize, requires_grad: bool) -> Res<()> {
        let dtype = self.tensors[tensor].dtype;
        if requires_grad && !can_require_grad(dtype) {
            return Err(self.malformed(format!(
                "a {dtype} tensor cannot require gradients (only floating point and complex)"
            )));
        }
        Ok(())
    }

    /// `_rebuild_tensor`, `_rebuild_tensor_v2`, `_rebuild_tensor_v3`.
    pub(super) fn rebuild_tensor(&mut self, r: Rebuild, args: &[ObjId]) -> Res<ObjId> {
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
    pub(super) fn check_metadata(&self, id: ObjId) -> Res<()> {
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
    pub(super) fn rebuild_parameter(
        &mut self,
        g: Global,
        args: &[ObjId],
        with_state: bool,
    ) -> Res<ObjId> {
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
    pub(super) fn rebuild_from_type_v2(&mut self, args: &[ObjId]) -> Res<ObjId> {
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
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;

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

    /// `_rebuild_tensor_v2` of `size` elements at `off` on the legacy persistent id
    /// `('storage', torch.FloatStorage, key, 'cpu', numel, view_metadata)`; `view` writes
    /// the view_metadata.
    fn legacy_tensor(key: &str, numel: i64, view: impl Fn(P) -> P, off: i64, size: i64) -> Vec<u8> {
        let p = P::new()
            .global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .mark()
            .str("storage")
            .global("torch", "FloatStorage")
            .str(key)
            .str("cpu")
            .int(numel);
        view(p)
            .tuple()
            .op(op::BINPERSID)
            .int(off)
            .ints(&[size])
            .ints(&[1])
            .op(op::NEWFALSE)
            .ordered_dict()
            .tuple()
            .reduce()
            .stop()
    }

    fn legacy(p: &[u8]) -> Result<Unpickled, PickleError> {
        unpickle_prefix(p, true)
            .map(|(u, used)| {
                assert_eq!(used, p.len());
                u
            })
            .map_err(|e| e.error)
    }

    #[test]
    fn legacy_persistent_ids_have_six_fields() {
        let p = legacy_tensor("k", 6, |p| p.none(), 1, 4);
        let u = legacy(&p).unwrap();
        assert_eq!(u.tensors, vec![t(DType::F32, 0, &[4], &[1], 1, false)]);
        assert_eq!(u.storages, vec![sref("k", Some(DType::F32), 6)]);
        // The zip format's five fields are not a legacy id, and the other way round.
        let five = P::new()
            .tensor_v2("torch.FloatStorage", "0", 6, 0, &[2], &[1])
            .stop();
        let e = legacy(&five).unwrap_err().to_string();
        assert!(e.contains("this one has 5 fields"), "{e}");
        let e = unpickle(&p).unwrap_err().to_string();
        assert!(e.contains("this one has 6 fields"), "{e}");
    }

    #[test]
    fn legacy_storage_views() {
        let view = |p: P| p.mark().str("v").int(2).int(3).tuple();
        let u = legacy(&legacy_tensor("root", 6, view, 1, 2)).unwrap();
        assert_eq!(
            u.storages,
            vec![
                sref("root", Some(DType::F32), 6),
                StorageRef {
                    view_of: Some((0, 8)),
                    ..sref("v", Some(DType::F32), 3)
                }
            ]
        );
        // The tensor is on the view.
        assert_eq!(u.tensors, vec![t(DType::F32, 1, &[2], &[1], 1, false)]);
        // A view past the end of its storage, or not (key, offset, size), is refused.
        let past = |p: P| p.mark().str("v").int(4).int(3).tuple();
        let e = legacy(&legacy_tensor("root", 6, past, 0, 1)).unwrap_err();
        assert!(e.to_string().contains("runs past its storage"), "{e}");
        let short = |p: P| p.mark().str("v").int(4).tuple();
        let e = legacy(&legacy_tensor("root", 6, short, 0, 1)).unwrap_err();
        assert!(e.to_string().contains("(key, offset, size)"), "{e}");
        // A view's key naming its own root is both a storage and a view.
        let itself = |p: P| p.mark().str("root").int(0).int(6).tuple();
        let e = legacy(&legacy_tensor("root", 6, itself, 0, 1)).unwrap_err();
        assert!(
            e.to_string().contains("both as a storage and as a view"),
            "{e}"
        );
    }
}
