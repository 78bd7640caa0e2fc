//! The allow-list: which `module.name` globals a checkpoint may name, and what each one
//! is to the VM. Mirrors torch's `weights_only` unpickler; anything else is refused.

use crate::dtype::DType;

/// A tensor rebuild function of `torch._utils`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rebuild {
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
pub(super) enum Global {
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
    pub(super) fn name(self) -> String {
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
pub(super) enum Resolved {
    Global(Global),
    /// `torch.float32` and friends are plain values.
    DType(DType),
}

/// Why a GLOBAL is refused.
#[derive(Debug, PartialEq)]
pub(super) enum Refusal {
    /// Not on the allow-list.
    Forbidden,
    /// A torch object we recognize but do not load; the message says what it is.
    Unsupported(&'static str),
}

/// Dtype names torch allow-lists that zeroload has no `DType` for.
pub(super) const UNSUPPORTED_DTYPES: &[&str] = &[
    "qint8", "qint32", "quint8", "quint4x2", "quint2x4", "uint1", "uint2", "uint3", "uint4",
    "uint5", "uint6", "uint7", "int1", "int2", "int3", "int4", "int5", "int6", "int7",
];

/// Resolves `module.name` against the allow-list. Never imports or calls anything.
pub(super) fn resolve(module: &str, name: &str) -> Result<Resolved, Refusal> {
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
                return Err(U("this dtype (quantized or sub-byte) is not supported"));
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

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;

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
}
