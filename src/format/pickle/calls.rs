//! The allowed callables (REDUCE, NEWOBJ) interpreted on plain data, and BUILD.

use std::collections::HashMap;

use super::allowlist::{Global, Rebuild};
use super::limits::clip;
use super::vm::{type_name, Vm};
use super::Res;
use crate::format::{ObjId, Value};

/// Whether `s` looks like a torch device string ("cpu", "cuda", "cuda:0").
pub(super) fn valid_device(s: &str) -> bool {
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

impl Vm<'_> {
    // ----- calls -----

    pub(super) fn arity(&self, g: Global, args: &[ObjId], min: usize, max: usize) -> Res<()> {
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
    pub(super) fn call(&mut self, g: Global, args: &[ObjId]) -> Res<ObjId> {
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
    pub(super) fn newobj(&mut self, cls: ObjId, args: ObjId, kwargs: Option<ObjId>) -> Res<ObjId> {
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

    pub(super) fn real(&self, id: ObjId) -> Res<f64> {
        match self.val(id) {
            Value::Float(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            Value::Bool(b) => Ok(f64::from(u8::from(*b))),
            v => Err(self.unsupported(format!("complex() of a {} is not supported", type_name(v)))),
        }
    }

    /// Items of `OrderedDict(x)`: a dict, or a sequence of (key, value) pairs.
    pub(super) fn pairs_of(&mut self, id: ObjId, what: &str) -> Res<Vec<(ObjId, ObjId)>> {
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

    pub(super) fn size_items(&mut self, id: ObjId) -> Res<Vec<i64>> {
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

    pub(super) fn bytes_of(&mut self, g: Global, id: ObjId) -> Res<Vec<u8>> {
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
    pub(super) fn device(&mut self, args: &[ObjId]) -> Res<Value> {
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
    pub(super) fn encode(&mut self, args: &[ObjId]) -> Res<Value> {
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

    // ----- BUILD -----

    pub(super) fn build(&mut self, inst: ObjId, state: ObjId) -> Res<()> {
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
    pub(super) fn build_ordered_dict(&mut self, inst: ObjId, state: ObjId) -> Res<()> {
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
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;

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
}
