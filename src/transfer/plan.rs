//! Planning: copy requests `(file range -> destination)` become a list of file reads in
//! file order, each knowing which destination pieces it scatters to.
//!
//! A plan is pure arithmetic: it never touches the file or the destinations, so it can be
//! checked exhaustively. [`Plan::new`] reads through any gap up to `max_gap` (fewer, larger
//! reads for the CUDA staging ring); [`Plan::bounded`] also never reads more than twice the
//! bytes it delivers (sliced reads: DTensor shards, slices). Every range is overflow-checked and must lie inside the file;
//! destinations must not overlap one another (two writers into the same bytes would race),
//! except for exact duplicates, which are copied once.

use crate::error::{Error, Result};

/// One copy: `nbytes` bytes of the file at `file_offset` go to the destination address
/// `dest` (a host pointer or a CUDA device pointer, as an integer; the plan never
/// dereferences it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CopyRequest {
    pub file_offset: u64,
    pub nbytes: u64,
    pub dest: u64,
}

/// A destination buffer: `nbytes` bytes at address `addr` (host or device; never
/// dereferenced here). Requests write into destinations; checks that concern the memory
/// itself (is it device memory of the right device?) run once per destination, not once
/// per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub addr: u64,
    pub nbytes: u64,
}

impl Extent {
    fn end(&self) -> u64 {
        self.addr + self.nbytes
    }
}

/// The memory `requests` write: `destinations` merged where they overlap or touch, only
/// those some request writes into, in address order. A request that does not lie wholly
/// inside one destination is refused (`Error::InvalidArgument` naming it and `what`).
/// Costs O((requests + destinations) log destinations).
pub fn written_extents(
    requests: &[CopyRequest],
    destinations: &[Extent],
    what: &str,
) -> Result<Vec<Extent>> {
    let mut dests: Vec<Extent> = Vec::with_capacity(destinations.len());
    for d in destinations.iter().filter(|d| d.nbytes > 0) {
        if d.addr.checked_add(d.nbytes).is_none() {
            return Err(Error::InvalidArgument(format!(
                "{what}: destination {:#x}..+{} overflows the address space",
                d.addr, d.nbytes
            )));
        }
        dests.push(*d);
    }
    dests.sort_unstable();
    let mut merged: Vec<Extent> = Vec::with_capacity(dests.len());
    for d in dests {
        match merged.last_mut() {
            Some(m) if d.addr <= m.end() => m.nbytes = m.nbytes.max(d.end() - m.addr),
            _ => merged.push(d),
        }
    }
    let mut used = vec![false; merged.len()];
    for r in requests.iter().filter(|r| r.nbytes > 0) {
        let i = merged.partition_point(|m| m.addr <= r.dest);
        let inside = i > 0
            && r.dest
                .checked_add(r.nbytes)
                .is_some_and(|end| end <= merged[i - 1].end());
        if !inside {
            return Err(Error::InvalidArgument(format!(
                "{what}: copy of file bytes {}..+{} to {:#x}..+{} lies outside every \
                 destination buffer",
                r.file_offset, r.nbytes, r.dest, r.nbytes
            )));
        }
        used[i - 1] = true;
    }
    Ok(merged
        .into_iter()
        .zip(used)
        .filter_map(|(m, u)| u.then_some(m))
        .collect())
}

/// A part of a chunk that goes to one destination: bytes `[offset, offset + len)` of the
/// chunk go to `dest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Offset of the first byte inside the chunk.
    pub offset: u64,
    pub len: u64,
    /// Destination address of the first byte.
    pub dest: u64,
}

/// One read of the file: `[file_offset, file_offset + len)`, scattered to `pieces`.
/// Pieces may overlap inside the chunk (the same file bytes going to two destinations)
/// and need not cover it (gaps between coalesced ranges are read and dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub file_offset: u64,
    pub len: u64,
    pub pieces: Vec<Piece>,
}

impl Chunk {
    /// Bytes this chunk delivers to destinations (what progress counts).
    pub fn delivered(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }
}

/// How to cut and join reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Longest read; larger requests are split. At least 1.
    pub max_chunk: u64,
    /// Largest hole between two ranges that is still read through (and thrown away) to
    /// save a separate read. 0 joins only touching or overlapping ranges.
    pub max_gap: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_chunk: 32 << 20,
            max_gap: 64 << 10,
        }
    }
}

/// The reads that carry out a set of copy requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In increasing file order (by start).
    pub chunks: Vec<Chunk>,
    /// Bytes delivered to destinations, summed over unique requests.
    pub total_bytes: u64,
    /// Bytes read from the file (including coalesced gaps).
    pub read_bytes: u64,
}

impl Plan {
    /// Builds a plan. `file_len` bounds every request; `what` names the file in errors.
    ///
    /// Zero-length requests are dropped, exact duplicates kept once; a request that runs
    /// past the end of the file, overflows, or writes into bytes another request writes is
    /// refused with `Error::InvalidArgument` naming the request.
    pub fn new(
        requests: &[CopyRequest],
        file_len: u64,
        opts: PlanOptions,
        what: &str,
    ) -> Result<Plan> {
        Plan::build(requests, file_len, opts, false, what)
    }

    /// Like [`Plan::new`], but a gap is read through only if the range after it is at
    /// least as long, so every chunk reads at most twice the bytes it delivers and
    /// `read_bytes <= 2 * total_bytes` whatever the requests (the bound sliced reads
    /// promise: a `Shard(1)` of a row-major tensor over two ranks reads whole rows, over
    /// three or more it reads each run on its own).
    pub fn bounded(
        requests: &[CopyRequest],
        file_len: u64,
        opts: PlanOptions,
        what: &str,
    ) -> Result<Plan> {
        Plan::build(requests, file_len, opts, true, what)
    }

    fn build(
        requests: &[CopyRequest],
        file_len: u64,
        opts: PlanOptions,
        bounded: bool,
        what: &str,
    ) -> Result<Plan> {
        let max_chunk = opts.max_chunk.max(1);
        let mut reqs: Vec<CopyRequest> =
            requests.iter().copied().filter(|r| r.nbytes > 0).collect();
        for r in &reqs {
            let end = r.file_offset.checked_add(r.nbytes);
            if end.is_none_or(|e| e > file_len) {
                return Err(Error::InvalidArgument(format!(
                    "{what}: copy of bytes {}..+{} lies outside the file ({file_len} bytes)",
                    r.file_offset, r.nbytes
                )));
            }
            if r.dest == 0 || r.dest.checked_add(r.nbytes).is_none() {
                return Err(Error::InvalidArgument(format!(
                    "{what}: copy of {} bytes to destination {:#x} has an invalid destination \
                     range",
                    r.nbytes, r.dest
                )));
            }
        }
        reqs.sort_unstable();
        reqs.dedup();
        check_destinations_disjoint(&reqs, what)?;

        // `reqs` is sorted by file offset first.
        let mut plan = Plan::default();
        let mut cur: Option<Chunk> = None;
        for r in &reqs {
            plan.total_bytes += r.nbytes;
            let end = r.file_offset + r.nbytes;
            let mut pos = r.file_offset;
            while pos < end {
                // Can `pos` join the open chunk? (`pos` may lie before the chunk's start
                // when overlapping requests were split: then it opens a new chunk.)
                let joins = cur.as_ref().is_some_and(|c| {
                    let c_end = c.file_offset + c.len;
                    let fits = pos >= c.file_offset
                        && pos <= c_end.saturating_add(opts.max_gap)
                        && pos < c.file_offset + max_chunk;
                    // A gap is read only if the bytes after it pay for it: then no chunk
                    // reads more than twice what it delivers.
                    fits && (!bounded || pos <= c_end || {
                        let take = end.min(c.file_offset + max_chunk) - pos;
                        pos - c_end <= take
                    })
                });
                if !joins {
                    if let Some(c) = cur.take() {
                        plan.read_bytes += c.len;
                        plan.chunks.push(c);
                    }
                    cur = Some(Chunk {
                        file_offset: pos,
                        len: 0,
                        pieces: Vec::new(),
                    });
                }
                let c = cur.as_mut().expect("a chunk is open");
                let take_end = end.min(c.file_offset + max_chunk);
                c.pieces.push(Piece {
                    offset: pos - c.file_offset,
                    len: take_end - pos,
                    dest: r.dest + (pos - r.file_offset),
                });
                c.len = c.len.max(take_end - c.file_offset);
                pos = take_end;
            }
        }
        if let Some(c) = cur.take() {
            plan.read_bytes += c.len;
            plan.chunks.push(c);
        }
        // Only split overlapping requests can leave chunks out of order.
        plan.chunks.sort_by_key(|c| c.file_offset);
        Ok(plan)
    }

    /// Largest chunk, in bytes (0 for an empty plan).
    pub fn max_chunk_len(&self) -> u64 {
        self.chunks.iter().map(|c| c.len).max().unwrap_or(0)
    }
}

/// Refuses two different requests whose destination ranges overlap.
fn check_destinations_disjoint(reqs: &[CopyRequest], what: &str) -> Result<()> {
    let mut by_dest: Vec<&CopyRequest> = reqs.iter().collect();
    by_dest.sort_unstable_by_key(|r| (r.dest, r.nbytes));
    for w in by_dest.windows(2) {
        let (a, b) = (w[0], w[1]);
        if b.dest < a.dest + a.nbytes {
            return Err(Error::InvalidArgument(format!(
                "{what}: destinations overlap: bytes {}..+{} of the file go to {:#x}..+{} and \
                 bytes {}..+{} to {:#x}..+{}",
                a.file_offset,
                a.nbytes,
                a.dest,
                a.nbytes,
                b.file_offset,
                b.nbytes,
                b.dest,
                b.nbytes
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(file_offset: u64, nbytes: u64, dest: u64) -> CopyRequest {
        CopyRequest {
            file_offset,
            nbytes,
            dest,
        }
    }

    fn opts(max_chunk: u64, max_gap: u64) -> PlanOptions {
        PlanOptions { max_chunk, max_gap }
    }

    /// Simulates the plan on a byte file and checks every destination gets its bytes.
    fn simulate(reqs: &[CopyRequest], file_len: u64, o: PlanOptions) -> Plan {
        check_deliveries(
            Plan::new(reqs, file_len, o, "test").unwrap(),
            reqs,
            file_len,
            o,
        )
    }

    fn check_deliveries(plan: Plan, reqs: &[CopyRequest], file_len: u64, o: PlanOptions) -> Plan {
        let file: Vec<u8> = (0..file_len).map(|i| (i * 7 + 3) as u8).collect();
        let mut mem = std::collections::HashMap::<u64, u8>::new();
        let mut last_start = 0;
        for c in &plan.chunks {
            assert!(c.len <= o.max_chunk.max(1), "chunk longer than max");
            assert!(c.file_offset >= last_start, "chunks out of file order");
            last_start = c.file_offset;
            assert!(c.file_offset + c.len <= file_len);
            let data = &file[c.file_offset as usize..(c.file_offset + c.len) as usize];
            for p in &c.pieces {
                assert!(p.offset + p.len <= c.len);
                for i in 0..p.len {
                    let prev = mem.insert(p.dest + i, data[(p.offset + i) as usize]);
                    assert!(prev.is_none(), "byte written twice");
                }
            }
        }
        let mut want = 0;
        for r in reqs {
            for i in 0..r.nbytes {
                assert_eq!(mem[&(r.dest + i)], file[(r.file_offset + i) as usize]);
            }
        }
        let mut uniq = reqs.to_vec();
        uniq.sort();
        uniq.dedup();
        for r in &uniq {
            want += r.nbytes;
        }
        assert_eq!(plan.total_bytes, want);
        assert_eq!(mem.len() as u64, want);
        assert_eq!(
            plan.read_bytes,
            plan.chunks.iter().map(|c| c.len).sum::<u64>()
        );
        plan
    }

    #[test]
    fn written_extents_merge_destinations_and_refuse_requests_outside_them() {
        let d = |addr, nbytes| Extent { addr, nbytes };
        // Two touching buffers and an overlapping one merge; an unused one is dropped.
        let dests = [
            d(0x1000, 0x100),
            d(0x1100, 0x100),
            d(0x1180, 0x200),
            d(0x9000, 8),
        ];
        let reqs = [req(0, 0x10, 0x1000), req(5, 0x200, 0x10f0), req(9, 0, 0x5)];
        assert_eq!(
            written_extents(&reqs, &dests, "t").unwrap(),
            vec![d(0x1000, 0x380)]
        );
        // 50,000 runs into one buffer: one extent.
        let rows: Vec<CopyRequest> = (0..50_000)
            .map(|i| req(i * 64, 32, 0x10_000 + i * 32))
            .collect();
        assert_eq!(
            written_extents(&rows, &[d(0x10_000, 50_000 * 32)], "t").unwrap(),
            vec![d(0x10_000, 50_000 * 32)]
        );
        for bad in [
            req(0, 0x10, 0xfff),
            req(0, 0x381, 0x1000),
            req(0, 9, 0x9000),
            req(0, 1, 0x20),
        ] {
            let e = written_extents(&[bad], &dests, "f.pth").unwrap_err();
            assert!(
                e.to_string().contains("lies outside every destination"),
                "{e}"
            );
        }
        let e = written_extents(&reqs, &[d(u64::MAX, 2)], "t").unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
    }

    #[test]
    fn empty_plan() {
        let p = Plan::new(&[], 100, PlanOptions::default(), "t").unwrap();
        assert!(p.chunks.is_empty());
        assert_eq!(p.total_bytes, 0);
        assert_eq!(p.max_chunk_len(), 0);
    }

    #[test]
    fn adjacent_ranges_coalesce_in_file_order() {
        let reqs = [
            req(100, 50, 0x2000),
            req(0, 100, 0x1000),
            req(150, 10, 0x3000),
        ];
        let p = simulate(&reqs, 200, opts(1 << 20, 0));
        assert_eq!(p.chunks.len(), 1);
        assert_eq!(p.chunks[0].file_offset, 0);
        assert_eq!(p.chunks[0].len, 160);
        assert_eq!(p.chunks[0].pieces.len(), 3);
        assert_eq!(p.read_bytes, 160);
    }

    #[test]
    fn gaps_join_only_up_to_max_gap() {
        let reqs = [
            req(0, 10, 0x1000),
            req(74, 10, 0x2000),
            req(200, 10, 0x3000),
        ];
        let p = simulate(&reqs, 300, opts(1 << 20, 64));
        assert_eq!(p.chunks.len(), 2);
        assert_eq!((p.chunks[0].file_offset, p.chunks[0].len), (0, 84));
        assert_eq!((p.chunks[1].file_offset, p.chunks[1].len), (200, 10));
        assert_eq!(p.read_bytes, 94);
        assert_eq!(p.total_bytes, 30);
        let p = simulate(&reqs, 300, opts(1 << 20, 0));
        assert_eq!(p.chunks.len(), 3);
    }

    fn simulate_bounded(reqs: &[CopyRequest], file_len: u64, o: PlanOptions) -> Plan {
        let p = Plan::bounded(reqs, file_len, o, "test").unwrap();
        let p = check_deliveries(p, reqs, file_len, o);
        for c in &p.chunks {
            assert!(c.len <= 2 * c.delivered(), "{c:?}");
        }
        assert!(p.read_bytes <= 2 * p.total_bytes);
        p
    }

    #[test]
    fn bounded_plans_read_gaps_only_within_twice_the_bytes_delivered() {
        // Every other run of 10 bytes (a Shard(1) over two ranks): whole rows are read.
        let reqs: Vec<_> = (0..8).map(|i| req(i * 20, 10, 0x1000 + i * 10)).collect();
        let p = simulate_bounded(&reqs, 200, opts(1 << 20, 64));
        assert_eq!(p.chunks.len(), 1);
        assert_eq!(p.read_bytes, 150);
        // One run in four (four ranks): each run is its own read.
        let reqs: Vec<_> = (0..8).map(|i| req(i * 40, 10, 0x1000 + i * 10)).collect();
        let p = simulate_bounded(&reqs, 400, opts(1 << 20, 64));
        assert_eq!(p.chunks.len(), 8);
        assert_eq!(p.read_bytes, 80);
        // max_gap still applies.
        let reqs = [req(0, 100, 0x1000), req(150, 100, 0x2000)];
        assert_eq!(
            simulate_bounded(&reqs, 300, opts(1 << 20, 49)).chunks.len(),
            2
        );
        assert_eq!(
            simulate_bounded(&reqs, 300, opts(1 << 20, 50)).chunks.len(),
            1
        );
    }

    #[test]
    fn bounded_plans_pseudo_random() {
        let mut s = 0x853c49e6748fea9bu64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..100 {
            let file_len = 4096;
            let mut reqs = Vec::new();
            let mut dest = 0x100000u64;
            for _ in 0..(next() % 60) {
                let off = next() % file_len;
                let n = next() % (file_len - off).min(100);
                reqs.push(req(off, n, dest));
                dest += n;
            }
            let o = opts(1 + next() % 900, next() % 300);
            simulate_bounded(&reqs, file_len, o);
        }
    }

    #[test]
    fn large_requests_split_into_bounded_chunks() {
        let reqs = [req(3, 1000, 0x10000), req(1003, 5, 0x20000)];
        let p = simulate(&reqs, 2000, opts(256, 0));
        assert!(p.chunks.iter().all(|c| c.len <= 256));
        assert_eq!(p.chunks.len(), 4);
        assert_eq!(p.max_chunk_len(), 256);
    }

    #[test]
    fn duplicates_copied_once_and_zero_length_dropped() {
        let reqs = [
            req(0, 10, 0x1000),
            req(0, 10, 0x1000),
            req(5, 0, 0x5000),
            req(5, 0, 0),
        ];
        let p = simulate(&reqs, 10, opts(100, 0));
        assert_eq!(p.total_bytes, 10);
        assert_eq!(p.chunks.len(), 1);
        assert_eq!(p.chunks[0].pieces.len(), 1);
    }

    #[test]
    fn same_file_range_to_two_destinations_is_read_once() {
        let reqs = [req(0, 10, 0x1000), req(0, 10, 0x2000), req(4, 4, 0x3000)];
        let p = simulate(&reqs, 10, opts(100, 0));
        assert_eq!(p.chunks.len(), 1);
        assert_eq!(p.read_bytes, 10);
        assert_eq!(p.total_bytes, 24);
    }

    #[test]
    fn overlapping_file_ranges_with_splits() {
        let reqs = [
            req(0, 300, 0x10000),
            req(100, 300, 0x20000),
            req(390, 20, 0x30000),
        ];
        let p = simulate(&reqs, 500, opts(128, 0));
        assert!(p.chunks.iter().all(|c| c.len <= 128));
    }

    #[test]
    fn ranges_outside_the_file_are_refused() {
        let e = Plan::new(&[req(90, 11, 0x1000)], 100, PlanOptions::default(), "f.pth");
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("f.pth") && msg.contains("outside the file"),
            "{msg}"
        );
        assert!(Plan::new(&[req(90, 10, 0x1000)], 100, PlanOptions::default(), "f").is_ok());
        assert!(Plan::new(&[req(100, 1, 0x1000)], 100, PlanOptions::default(), "f").is_err());
    }

    #[test]
    fn overflowing_ranges_are_refused() {
        let o = PlanOptions::default();
        assert!(Plan::new(&[req(u64::MAX, 2, 0x1000)], u64::MAX, o, "f").is_err());
        assert!(Plan::new(&[req(0, 2, u64::MAX)], 10, o, "f").is_err());
        assert!(
            Plan::new(&[req(0, 2, 0)], 10, o, "f").is_err(),
            "null destination"
        );
    }

    #[test]
    fn overlapping_destinations_are_refused() {
        let o = PlanOptions::default();
        let e = Plan::new(&[req(0, 10, 0x1000), req(20, 10, 0x1005)], 100, o, "f");
        assert!(e.unwrap_err().to_string().contains("overlap"));
        // Touching destinations are fine.
        assert!(Plan::new(&[req(0, 10, 0x1000), req(20, 10, 0x100a)], 100, o, "f").is_ok());
    }

    #[test]
    fn many_small_ranges_pseudo_random() {
        // A deterministic xorshift so the test needs no dependency.
        let mut s = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..50 {
            let file_len = 4096;
            let mut reqs = Vec::new();
            let mut dest = 0x100000u64;
            for _ in 0..(next() % 40) {
                let off = next() % file_len;
                let n = next() % (file_len - off).min(300);
                reqs.push(req(off, n, dest));
                dest += n + next() % 3;
            }
            let o = opts(1 + next() % 700, next() % 100);
            let p = simulate(&reqs, file_len, o);
            assert!(
                p.chunks.len() <= reqs.len() * (1 + 300 / o.max_chunk as usize) + 1,
                "{round}"
            );
        }
    }
}
