//! Bounds on what a pickle may make the VM do: sizes (nodes, stack, memo, nesting,
//! dimensions, digits) and a work budget linear in the input for opcodes that copy data
//! already built. A leaf: the VM and the handlers read these bounds, nothing here
//! reads the VM (the VM enforces them: `Vm::limit`, `Vm::charge`).

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
pub(super) const WORK_PER_BYTE: usize = 16;
/// ...plus this many.
pub(super) const WORK_BASE: usize = 1 << 20;
/// Longest module or name quoted in an error message.
pub(super) const MAX_QUOTED: usize = 200;

/// Cuts a string quoted in an error message to a sane length.
pub(super) fn clip(s: &str) -> String {
    if s.len() <= MAX_QUOTED {
        return s.to_string();
    }
    let mut end = MAX_QUOTED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use crate::format::Value;

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
}
