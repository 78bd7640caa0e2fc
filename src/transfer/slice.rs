//! Rectangles of a tensor as byte runs: the reads behind a DTensor shard or a slice.
//!
//! A [`Rect`] says where a tensor lies in the file (byte offset, shape, element strides),
//! which part of it is wanted (per dimension, a list of index ranges taken in order: a
//! `Shard(d)` is one range, a `_StridedShard` several) and where that part goes (a byte
//! offset and element strides in a destination buffer; dense row-major by default).
//! [`Rect::runs`] turns it into the fewest `(file bytes -> destination bytes)` runs:
//! dimensions that are contiguous on both sides and wholly selected merge into one run,
//! so a `Shard(0)` of a row-major tensor is a single run and a `Shard(1)` one run per row.
//! Coalescing runs into reads (reading through small gaps) is the plan's job
//! ([`super::Plan::bounded`]).
//!
//! Pure arithmetic, checked against overflow; it never touches a file or a destination.

use crate::error::{Error, Result};

/// One contiguous copy: `len` bytes at file offset `src` go to byte `dst` of the
/// destination buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Run {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// A rectangle of a strided tensor and where it goes.
#[derive(Clone, Copy, Debug)]
pub struct Rect<'a> {
    /// Bytes per element.
    pub itemsize: u64,
    /// File offset of element `[0, 0, ...]`.
    pub src_offset: u64,
    /// The tensor's shape and element strides in the file.
    pub src_shape: &'a [u64],
    pub src_strides: &'a [u64],
    /// Per dimension, the index ranges `[start, stop)` wanted, in order. The rectangle's
    /// extent in dimension `d` is the total length of `ranges[d]`.
    pub ranges: &'a [Vec<(u64, u64)>],
    /// Byte offset of the rectangle's first element in the destination.
    pub dst_offset: u64,
    /// Element strides of the destination; `None` for dense row-major.
    pub dst_strides: Option<&'a [u64]>,
}

/// Refuses rectangles that would produce more runs than this (the caller should read a
/// covering span instead, e.g. for a tensor that is not contiguous in its last dimension).
/// Legitimate shards stay far below: a `Shard(2)` of a `[128, 4096, 14336]` expert stack is
/// 524,288 runs.
pub const MAX_RUNS: u64 = 1 << 24;

impl Rect<'_> {
    /// The rectangle's shape (elements per dimension).
    pub fn shape(&self) -> Vec<u64> {
        self.ranges
            .iter()
            .map(|r| r.iter().map(|&(a, b)| b.saturating_sub(a)).sum())
            .collect()
    }

    /// Elements in the rectangle.
    pub fn numel(&self) -> Result<u64> {
        self.shape()
            .iter()
            .try_fold(1u64, |acc, &n| acc.checked_mul(n))
            .ok_or_else(|| Error::InvalidArgument("slice: too many elements".into()))
    }

    /// The destination strides: the given ones, or dense row-major for the rectangle.
    fn dst_strides_vec(&self) -> Vec<u64> {
        match self.dst_strides {
            Some(s) => s.to_vec(),
            None => {
                let shape = self.shape();
                let mut strides = vec![1u64; shape.len()];
                for d in (0..shape.len().saturating_sub(1)).rev() {
                    strides[d] = strides[d + 1].saturating_mul(shape[d + 1].max(1));
                }
                strides
            }
        }
    }

    /// Bytes of the destination the rectangle touches, counted from byte 0: one past the
    /// last byte written (`dst_offset` for an empty rectangle).
    pub fn dst_end(&self) -> Result<u64> {
        self.check()?;
        let shape = self.shape();
        if shape.contains(&0) {
            return Ok(self.dst_offset);
        }
        extent_end(
            self.dst_offset,
            &shape,
            &self.dst_strides_vec(),
            self.itemsize,
        )
        .ok_or_else(|| Error::InvalidArgument("slice: destination range overflows".into()))
    }

    /// Validates the description: matching ranks, ranges inside the tensor, a source
    /// whose bytes can be addressed, and a destination whose elements do not overlap.
    pub fn check(&self) -> Result<()> {
        let nd = self.src_shape.len();
        let bad = |msg: String| Err(Error::InvalidArgument(format!("slice: {msg}")));
        if self.src_strides.len() != nd || self.ranges.len() != nd {
            return bad(format!(
                "a tensor of {nd} dimensions needs {nd} strides and {nd} range lists, not {} \
                 and {}",
                self.src_strides.len(),
                self.ranges.len()
            ));
        }
        if let Some(s) = self.dst_strides {
            if s.len() != nd {
                return bad(format!(
                    "{} destination strides for {nd} dimensions",
                    s.len()
                ));
            }
        }
        if self.itemsize == 0 {
            return bad("element size 0".into());
        }
        for (d, (rs, &n)) in self.ranges.iter().zip(self.src_shape).enumerate() {
            for &(a, b) in rs {
                if a > b || b > n {
                    return bad(format!(
                        "range {a}..{b} of dimension {d} is outside 0..{n} (or reversed)"
                    ));
                }
            }
        }
        if self.src_shape.contains(&0) {
            return Ok(());
        }
        if extent_end(
            self.src_offset,
            self.src_shape,
            self.src_strides,
            self.itemsize,
        )
        .is_none()
        {
            return bad("the tensor's byte range overflows".into());
        }
        let shape = self.shape();
        if shape.contains(&0) {
            return Ok(());
        }
        let dst = self.dst_strides_vec();
        if extent_end(self.dst_offset, &shape, &dst, self.itemsize).is_none() {
            return bad("destination range overflows".into());
        }
        // Non-overlapping destination: with the dimensions of extent > 1 sorted by stride,
        // each stride must step past everything the smaller ones reach.
        let mut dims: Vec<(u64, u64)> = dst
            .iter()
            .zip(&shape)
            .filter(|(_, &n)| n > 1)
            .map(|(&s, &n)| (s, n))
            .collect();
        dims.sort_unstable();
        let mut reach = 1u64; // elements spanned by the dimensions seen so far
        for (s, n) in dims {
            if s < reach {
                return bad(format!(
                    "destination strides {dst:?} make elements overlap (shape {shape:?})"
                ));
            }
            reach = s.saturating_mul(n - 1).saturating_add(reach);
        }
        Ok(())
    }

    /// The runs that copy the rectangle, in destination order, adjacent runs merged.
    ///
    /// Refuses (`InvalidArgument`) a description [`Rect::check`] refuses, and rectangles
    /// that would need more than `max_runs` runs.
    pub fn runs(&self, max_runs: u64) -> Result<Vec<Run>> {
        self.check()?;
        let shape = self.shape();
        if shape.contains(&0) {
            return Ok(Vec::new());
        }
        let nd = shape.len();
        let dst_strides = self.dst_strides_vec();
        let sz = self.itemsize;

        // Grow a block from the innermost dimension outwards while it stays contiguous on
        // both sides: a dimension of size 1 never breaks it; one whose strides equal the
        // block joins it whole if wholly selected, or becomes the run dimension (its ranges
        // are the runs) if not.
        let mut block = 1u64; // elements
        let mut k = nd; // dimensions 0..k are iterated outside the runs
        let mut run_dim = None;
        while k > 0 {
            let d = k - 1;
            if self.src_shape[d] == 1 && shape[d] == 1 {
                k -= 1;
                continue;
            }
            if self.src_strides[d] != block || dst_strides[d] != block {
                break;
            }
            let whole = matches!(self.ranges[d].as_slice(), [(0, b)] if *b == self.src_shape[d]);
            if whole {
                block *= self.src_shape[d];
                k -= 1;
                continue;
            }
            run_dim = Some(d);
            k = d;
            break;
        }

        // Selected indices of each outer dimension, in order.
        let outer: Vec<Vec<u64>> = (0..k)
            .map(|d| self.ranges[d].iter().flat_map(|&(a, b)| a..b).collect())
            .collect();
        let per_outer = match run_dim {
            Some(d) => self.ranges[d].iter().filter(|(a, b)| b > a).count() as u64,
            None => 1,
        };
        let count = outer
            .iter()
            .try_fold(per_outer, |acc, v| acc.checked_mul(v.len() as u64))
            .filter(|&n| n <= max_runs)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "slice: reading this selection would take more than {max_runs} separate \
                     reads (the tensor is not contiguous along the selected dimensions)"
                ))
            })?;

        // `check` proved every byte address of source and destination fits in u64, so the
        // sums below cannot overflow.
        let mut runs: Vec<Run> = Vec::with_capacity(count.min(1 << 20) as usize);
        let mut push = |r: Run| match runs.last_mut() {
            Some(last) if last.src + last.len == r.src && last.dst + last.len == r.dst => {
                last.len += r.len;
            }
            _ => runs.push(r),
        };
        let mut pos = vec![0usize; k]; // odometer over the outer dimensions
        loop {
            let mut src = self.src_offset;
            let mut dst = self.dst_offset;
            for d in 0..k {
                src += outer[d][pos[d]] * self.src_strides[d] * sz;
                dst += pos[d] as u64 * dst_strides[d] * sz;
            }
            match run_dim {
                Some(d) => {
                    let mut at = 0u64; // position along dimension d of the rectangle
                    for &(a, b) in &self.ranges[d] {
                        if b > a {
                            push(Run {
                                src: src + a * self.src_strides[d] * sz,
                                dst: dst + at * dst_strides[d] * sz,
                                len: (b - a) * block * sz,
                            });
                            at += b - a;
                        }
                    }
                }
                None => push(Run {
                    src,
                    dst,
                    len: block * sz,
                }),
            }
            // Next outer index, last dimension fastest.
            let mut d = k;
            loop {
                if d == 0 {
                    return Ok(runs);
                }
                d -= 1;
                pos[d] += 1;
                if pos[d] < outer[d].len() {
                    break;
                }
                pos[d] = 0;
            }
        }
    }
}

/// One past the last byte of a strided block of `shape` (no zero sizes) starting at
/// `offset`, or None on overflow.
fn extent_end(offset: u64, shape: &[u64], strides: &[u64], itemsize: u64) -> Option<u64> {
    let mut last = 0u64; // element offset of the last element
    for (&n, &s) in shape.iter().zip(strides) {
        last = last.checked_add((n - 1).checked_mul(s)?)?;
    }
    last.checked_add(1)?
        .checked_mul(itemsize)?
        .checked_add(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense_strides(shape: &[u64]) -> Vec<u64> {
        let mut s = vec![1u64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            s[d] = s[d + 1] * shape[d + 1];
        }
        s
    }

    /// Copies with the runs from a fake file (byte i = f(i)) into a buffer and compares
    /// with element-by-element indexing.
    fn check_against_indexing(rect: &Rect<'_>) -> Vec<Run> {
        let runs = rect.runs(MAX_RUNS).unwrap();
        let src_end = extent_end(
            rect.src_offset,
            rect.src_shape,
            rect.src_strides,
            rect.itemsize,
        )
        .unwrap();
        let file: Vec<u8> = (0..src_end).map(|i| (i * 31 + 7) as u8).collect();
        let dst_len = rect.dst_end().unwrap() as usize;
        let mut got = vec![0u8; dst_len];
        let mut written = vec![false; dst_len];
        for r in &runs {
            for i in 0..r.len {
                let at = (r.dst + i) as usize;
                assert!(!written[at], "destination byte {at} written twice");
                written[at] = true;
                got[at] = file[(r.src + i) as usize];
            }
        }
        // The expected copy, element by element.
        let shape = rect.shape();
        let dst_strides = rect.dst_strides_vec();
        let idx: Vec<Vec<u64>> = rect
            .ranges
            .iter()
            .map(|rs| rs.iter().flat_map(|&(a, b)| a..b).collect())
            .collect();
        let total: u64 = shape.iter().product();
        let mut n_written = 0;
        for flat in 0..total {
            let mut rem = flat;
            let mut src = rect.src_offset;
            let mut dst = rect.dst_offset;
            for d in (0..shape.len()).rev() {
                let p = rem % shape[d];
                rem /= shape[d];
                src += idx[d][p as usize] * rect.src_strides[d] * rect.itemsize;
                dst += p * dst_strides[d] * rect.itemsize;
            }
            for b in 0..rect.itemsize {
                assert_eq!(
                    got[(dst + b) as usize],
                    file[(src + b) as usize],
                    "element {flat} byte {b}"
                );
                n_written += 1;
            }
        }
        assert_eq!(written.iter().filter(|w| **w).count(), n_written);
        assert_eq!(
            runs.iter().map(|r| r.len).sum::<u64>(),
            total * rect.itemsize
        );
        runs
    }

    fn rect<'a>(
        shape: &'a [u64],
        strides: &'a [u64],
        ranges: &'a [Vec<(u64, u64)>],
        itemsize: u64,
    ) -> Rect<'a> {
        Rect {
            itemsize,
            src_offset: 100,
            src_shape: shape,
            src_strides: strides,
            ranges,
            dst_offset: 0,
            dst_strides: None,
        }
    }

    #[test]
    fn shard_0_of_a_row_major_tensor_is_one_run() {
        let shape = [6, 5];
        let strides = dense_strides(&shape);
        let ranges = [vec![(3, 6)], vec![(0, 5)]];
        let runs = check_against_indexing(&rect(&shape, &strides, &ranges, 4));
        assert_eq!(
            runs,
            vec![Run {
                src: 100 + 3 * 5 * 4,
                dst: 0,
                len: 3 * 5 * 4
            }]
        );
    }

    #[test]
    fn shard_1_is_one_run_per_row() {
        let shape = [4, 10];
        let strides = dense_strides(&shape);
        let ranges = [vec![(0, 4)], vec![(5, 10)]];
        let runs = check_against_indexing(&rect(&shape, &strides, &ranges, 2));
        assert_eq!(runs.len(), 4);
        assert!(runs.iter().all(|r| r.len == 10));
        assert_eq!(runs[1].src - runs[0].src, 20);
        assert_eq!(runs[1].dst - runs[0].dst, 10);
    }

    #[test]
    fn strided_shard_ranges_become_several_runs_per_row() {
        // _StridedShard(1) style: columns 0..2 and 4..6 of 8.
        let shape = [3, 8];
        let strides = dense_strides(&shape);
        let ranges = [vec![(0, 3)], vec![(0, 2), (4, 6)]];
        let runs = check_against_indexing(&rect(&shape, &strides, &ranges, 1));
        assert_eq!(runs.len(), 6);
    }

    #[test]
    fn adjacent_ranges_and_size_one_dims_merge() {
        let shape = [1, 4, 1, 6];
        let strides = dense_strides(&shape);
        let ranges = [
            vec![(0, 1)],
            vec![(1, 2), (2, 4)],
            vec![(0, 1)],
            vec![(0, 6)],
        ];
        let runs = check_against_indexing(&rect(&shape, &strides, &ranges, 8));
        assert_eq!(runs.len(), 1);
        // Size-1 dimensions may carry any stride (torch gives them arbitrary ones).
        let odd = [999, 6, 12345, 1];
        let runs = check_against_indexing(&rect(&shape, &odd, &ranges, 8));
        assert_eq!(runs.len(), 1);
    }

    #[test]
    fn three_dims_sharded_in_the_middle() {
        let shape = [3, 6, 4];
        let strides = dense_strides(&shape);
        let ranges = [vec![(1, 3)], vec![(2, 5)], vec![(0, 4)]];
        let runs = check_against_indexing(&rect(&shape, &strides, &ranges, 4));
        assert_eq!(runs.len(), 2, "one run of 3 rows of 4 per outer index");
    }

    #[test]
    fn non_contiguous_source_is_read_element_by_element() {
        // A transposed [4, 3] tensor (strides 1, 4) saved as is by torch.save.
        let shape = [4, 3];
        let strides = [1, 4];
        let ranges = [vec![(0, 4)], vec![(1, 3)]];
        let runs = check_against_indexing(&rect(&shape, &strides, &ranges, 4));
        assert_eq!(runs.len(), 8);
        let e = rect(&shape, &strides, &ranges, 4).runs(7).unwrap_err();
        assert!(e.to_string().contains("more than 7"), "{e}");
    }

    #[test]
    fn strided_destination() {
        // Into columns 2..5 of a [4, 8] destination buffer.
        let shape = [4, 6];
        let strides = dense_strides(&shape);
        let ranges = [vec![(0, 4)], vec![(3, 6)]];
        let dst = [8, 1];
        let r = Rect {
            dst_offset: 2 * 4,
            dst_strides: Some(&dst),
            ..rect(&shape, &strides, &ranges, 4)
        };
        let runs = check_against_indexing(&r);
        assert_eq!(runs.len(), 4);
        assert_eq!(r.dst_end().unwrap(), (3 * 8 + 5) * 4);
        // A destination that is itself a whole dense block merges.
        let full = [vec![(0, 4)], vec![(0, 6)]];
        let dst = [6, 1];
        let r = Rect {
            dst_strides: Some(&dst),
            ..rect(&shape, &strides, &full, 4)
        };
        assert_eq!(check_against_indexing(&r).len(), 1);
    }

    #[test]
    fn empty_selections_have_no_runs() {
        let shape = [4, 6];
        let strides = dense_strides(&shape);
        let ranges = [vec![(2, 2)], vec![(0, 6)]];
        assert!(rect(&shape, &strides, &ranges, 4)
            .runs(10)
            .unwrap()
            .is_empty());
        let ranges = [vec![], vec![(0, 6)]];
        assert!(rect(&shape, &strides, &ranges, 4)
            .runs(10)
            .unwrap()
            .is_empty());
        let shape0 = [0, 6];
        let ranges = [vec![(0, 0)], vec![(0, 6)]];
        assert!(rect(&shape0, &strides, &ranges, 4)
            .runs(10)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn scalars_are_one_element() {
        let r = rect(&[], &[], &[], 8);
        assert_eq!(
            check_against_indexing(&r),
            vec![Run {
                src: 100,
                dst: 0,
                len: 8
            }]
        );
    }

    #[test]
    fn bad_descriptions_are_refused() {
        let shape = [4, 6];
        let strides = dense_strides(&shape);
        let msg = |r: Rect<'_>| r.runs(MAX_RUNS).unwrap_err().to_string();
        let out = [vec![(0, 5)], vec![(0, 6)]];
        assert!(msg(rect(&shape, &strides, &out, 4)).contains("outside 0..4"));
        let rev = [vec![(3, 2)], vec![(0, 6)]];
        assert!(msg(rect(&shape, &strides, &rev, 4)).contains("reversed"));
        let short = [vec![(0, 4)]];
        assert!(msg(rect(&shape, &strides, &short, 4)).contains("range lists"));
        let ok = [vec![(0, 4)], vec![(0, 6)]];
        assert!(msg(rect(&shape, &strides, &ok, 0)).contains("element size"));
        let huge = [u64::MAX / 2, 4];
        let ranges = [vec![(0, 1)], vec![(0, 6)]];
        assert!(msg(rect(&shape, &huge, &ranges, 4)).contains("overflows"));
        let overlapping = [1, 1];
        let r = Rect {
            dst_strides: Some(&overlapping),
            ..rect(&shape, &strides, &ok, 4)
        };
        assert!(msg(r).contains("overlap"));
        let zero = [0, 1];
        let r = Rect {
            dst_strides: Some(&zero),
            ..rect(&shape, &strides, &ok, 4)
        };
        assert!(msg(r).contains("overlap"));
    }

    #[test]
    fn pseudo_random_rectangles_match_indexing() {
        let mut s = 0x2545f4914f6cdd1du64;
        let mut next = move |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n.max(1)
        };
        for _ in 0..300 {
            let nd = 1 + next(4) as usize;
            let shape: Vec<u64> = (0..nd).map(|_| 1 + next(6)).collect();
            // Mostly row-major, sometimes a permuted (non-contiguous) layout.
            let mut strides = dense_strides(&shape);
            if next(4) == 0 {
                let p = next(nd as u64) as usize;
                let q = next(nd as u64) as usize;
                let mut perm_shape = shape.clone();
                perm_shape.swap(p, q);
                let st = dense_strides(&perm_shape);
                strides = st.clone();
                strides.swap(p, q);
            }
            let ranges: Vec<Vec<(u64, u64)>> = shape
                .iter()
                .map(|&n| {
                    let mut out = Vec::new();
                    for _ in 0..1 + next(3) {
                        let a = next(n + 1);
                        let b = a + next(n - a + 1);
                        out.push((a, b));
                    }
                    out
                })
                .collect();
            let itemsize = [1, 2, 4, 8][next(4) as usize];
            check_against_indexing(&rect(&shape, &strides, &ranges, itemsize));
        }
    }
}
