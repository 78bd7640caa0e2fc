//! Opcode decoding: what each pickle opcode does to the stack, the memo and the nodes.
//! `run` is the loop; `step` sends each opcode to the handler of its family.

use super::allowlist::{resolve, Refusal, Resolved};
use super::limits::{clip, MAX_DEPTH, MAX_INT_DIGITS};
use super::vm::{type_name, Vm};
use super::{PickleError, Res, Unpickled};
use crate::format::{ObjId, Value};

/// Opcode bytes (CPython `Lib/pickle.py`).
pub(super) mod op {
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
pub(super) fn refused_opcode_name(code: u8) -> Option<&'static str> {
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

/// Minimal little-endian two's complement form (at least one byte unless empty).
pub(super) fn minimal_le(b: &[u8]) -> &[u8] {
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
pub(super) fn int_from_le(bytes: &[u8]) -> Value {
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
pub(super) fn parse_decimal(text: &[u8]) -> Option<Value> {
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
pub(super) fn decode_raw_unicode_escape(b: &[u8]) -> Result<String, String> {
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

impl<'a> Vm<'a> {
    /// Runs opcodes until STOP and returns what the pickle built.
    pub(super) fn run(mut self) -> Res<Unpickled> {
        let root = self.run_to_stop()?;
        self.finish(root)
    }

    /// Runs opcodes until STOP and returns the root object's id; `self.pos` is then just
    /// past the STOP.
    pub(super) fn run_to_stop(&mut self) -> Res<ObjId> {
        loop {
            self.at = self.pos;
            let Some(&code) = self.data.get(self.pos) else {
                self.ran_out = true;
                return Err(self.malformed("truncated pickle: it ends without STOP"));
            };
            self.pos += 1;
            if code == op::STOP {
                return self.pop("STOP");
            }
            self.step(code)?;
        }
    }

    /// Runs one opcode (not STOP), through the handler of its family.
    fn step(&mut self, code: u8) -> Res<()> {
        use op::*;
        match code {
            PROTO | FRAME | MARK | POP | POP_MARK | DUP => self.control(code),
            PUT | BINPUT | LONG_BINPUT | MEMOIZE | GET | BINGET | LONG_BINGET => self.memo_op(code),
            EMPTY_TUPLE | TUPLE | TUPLE1 | TUPLE2 | TUPLE3 | EMPTY_LIST | LIST | APPEND
            | APPENDS | EMPTY_DICT | DICT | SETITEM | SETITEMS | EMPTY_SET | ADDITEMS
            | FROZENSET => self.container(code),
            NONE | NEWTRUE | NEWFALSE | INT | LONG | BININT | BININT1 | BININT2 | LONG1 | LONG4
            | FLOAT | BINFLOAT => self.scalar(code),
            SHORT_BINUNICODE | BINUNICODE | BINUNICODE8 | UNICODE | SHORT_BINSTRING | BINSTRING
            | SHORT_BINBYTES | BINBYTES | BINBYTES8 | BYTEARRAY8 => self.text(code),
            GLOBAL | STACK_GLOBAL | REDUCE | NEWOBJ | NEWOBJ_EX | BUILD | BINPERSID => {
                self.object(code)
            }
            _ => Err(match refused_opcode_name(code) {
                Some(name) => self.unsupported(format!(
                    "pickle opcode {name} (0x{code:02x}) is not supported"
                )),
                None => self.malformed(format!("unknown pickle opcode 0x{code:02x}")),
            }),
        }
    }

    /// The error for an opcode sent to the wrong family (a bug in `step`, not the input).
    fn misrouted(&self, code: u8) -> PickleError {
        self.malformed(format!(
            "internal error: opcode 0x{code:02x} sent to the wrong handler"
        ))
    }

    /// Framing, protocol and stack shuffling: PROTO, FRAME, MARK, POP, POP_MARK, DUP.
    fn control(&mut self, code: u8) -> Res<()> {
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
                    self.ran_out = true;
                    return Err(self.malformed(format!(
                        "FRAME claims {n} bytes but only {} are left",
                        self.remaining()
                    )));
                }
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
            _ => return Err(self.misrouted(code)),
        }
        Ok(())
    }

    /// Memo stores and loads.
    fn memo_op(&mut self, code: u8) -> Res<()> {
        match code {
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
            _ => return Err(self.misrouted(code)),
        }
        Ok(())
    }

    /// Tuples, lists, dicts and sets: building and filling them.
    fn container(&mut self, code: u8) -> Res<()> {
        match code {
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
                let Vm { stack, nodes, .. } = self;
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
                    Value::Dict(p) | Value::OrderedDict { items: p, .. } | Value::Counter(p) => {
                        p.push((k, v))
                    }
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
                let Vm { stack, nodes, .. } = self;
                match &mut nodes[target] {
                    Value::Dict(p) | Value::OrderedDict { items: p, .. } | Value::Counter(p) => {
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
                let Vm { stack, nodes, .. } = self;
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
            _ => return Err(self.misrouted(code)),
        }
        Ok(())
    }

    /// None, bools, ints and floats.
    fn scalar(&mut self, code: u8) -> Res<()> {
        match code {
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
            _ => return Err(self.misrouted(code)),
        }
        Ok(())
    }

    /// Strings and bytes.
    fn text(&mut self, code: u8) -> Res<()> {
        match code {
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
            op::SHORT_BINSTRING => {
                let n = self.u8("SHORT_BINSTRING")?;
                let b = self.take(usize::from(n), "SHORT_BINSTRING")?;
                self.push_str(b, "SHORT_BINSTRING")?;
            }
            op::BINSTRING => {
                let n = i32::from_le_bytes(self.array("BINSTRING")?);
                let n = u64::try_from(n)
                    .map_err(|_| self.malformed(format!("BINSTRING with negative length {n}")))?;
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
            _ => return Err(self.misrouted(code)),
        }
        Ok(())
    }

    /// Globals, calls, BUILD and persistent ids: where torch objects are made.
    fn object(&mut self, code: u8) -> Res<()> {
        match code {
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
            _ => return Err(self.misrouted(code)),
        }
        Ok(())
    }

    pub(super) fn push_str(&mut self, b: &'a [u8], what: &str) -> Res<()> {
        let s = self.utf8(b, what)?;
        self.push_new(Value::Str(s.to_string()))
    }

    /// The decimal memo index of PUT / GET.
    pub(super) fn text_index(&self, l: &[u8], what: &str) -> Res<u64> {
        let t = l.trim_ascii();
        if t.first() == Some(&b'-') {
            return Err(self.malformed(format!("negative {what} argument")));
        }
        std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| self.malformed(format!("{what} argument is not a memo index")))
    }
}

pub(super) fn append_error(at: usize, what: &str, target: &Value) -> PickleError {
    PickleError::Malformed {
        offset: at as u64,
        message: format!("{what} can only add to a list, not a {}", type_name(target)),
    }
}

pub(super) fn setitem_error(at: usize, what: &str, target: &Value) -> PickleError {
    PickleError::Malformed {
        offset: at as u64,
        message: format!(
            "{what} can only set items of a dict, OrderedDict or Counter, not a {}",
            type_name(target)
        ),
    }
}

/// GLOBAL and STACK_GLOBAL: the allow-list's answer for `module.name` becomes a node.
impl Vm<'_> {
    pub(super) fn global(&mut self, module: &str, name: &str) -> Res<()> {
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
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use crate::format::Value;

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
}
