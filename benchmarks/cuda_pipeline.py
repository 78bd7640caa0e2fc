"""The CUDA copy engine's host side, and a simulated GPU link, on the fake CUDA driver.

    python benchmarks/cuda_pipeline.py [--size-gb 2] [--repeat 3] [--dir /path/on/disk]

No GPU needed: the engine runs against tests/fakecuda (built with cargo if needed). Each
figure is a median of runs made alternately with plain parallel `pread` of the same file,
so both see the same machine state. GB/s = 1e9 bytes/s.

1. Host pipeline (page cache warm): GB/s of `_core.copy_to_cuda` (pread -> pinned ring ->
   async copy -> event -> slab recycled) over GB/s of N threads `pread`ing the file in
   16 MiB chunks into a buffer each, for N = 1, 2, 4, 8 readers and staging budgets of
   64 MiB, 256 MiB and 1 GiB. Target: >= 0.8. Twice: (a) the fake's host-to-device copy a
   memcpy on its stream thread (CPU work and memory traffic a GPU's DMA engine does not
   take from the host's cores), (b) the copy reading one byte per page (the engine's own
   cost only).
2. Simulated link: the fake paces each stream's copies at `link` GB/s. "feed" is what the
   engine delivers unpaced. With the link at half of what reads feed (warm file; cold file,
   its pages dropped with posix_fadvise(DONTNEED) before each run), the engine must keep the
   link busy: delivered bytes/s over the link rate >= 0.95. With the link at three times
   cold reads, it must run at the read rate: delivered over cold `pread` >= 0.9.

Figures are host-side and simulated; they say nothing about a real PCIe link.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "fakecuda"), str(ROOT / "benchmarks")]

import fakecuda  # noqa: E402  (loads nothing until fakecuda.load())
from cpu_load import drop_page_cache, warm_page_cache  # noqa: E402

MIB = 1 << 20
CHUNK = 16 * MIB
TENSOR = 256 * MIB


def write_file(path: Path, nbytes: int) -> None:
    """A safetensors file of `nbytes` // 256 MiB uint8 tensors of random bytes, written
    block by block."""
    import json
    import struct

    n = max(1, nbytes // TENSOR)
    header = {
        f"w{i}": {"dtype": "U8", "shape": [TENSOR], "data_offsets": [i * TENSOR, (i + 1) * TENSOR]}
        for i in range(n)
    }
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _ in range(n * TENSOR // CHUNK):
            f.write(block)


def pread_gbps(path: Path, threads: int) -> float:
    """Plain parallel pread: `threads` threads read the file in 16 MiB chunks, each into
    a buffer of its own."""
    size = path.stat().st_size
    offsets = list(range(0, size, CHUNK))
    fd = os.open(path, os.O_RDONLY)
    local = threading.local()

    def read(off: int) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(CHUNK)
        return os.preadv(fd, [buf], off)

    try:
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            got = sum(pool.map(read, offsets))
            dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    assert got == size
    return size / dt / 1e9


class Engine:
    """`_core.copy_to_cuda` of every tensor of the file into fake device memory."""

    def __init__(self, fake: fakecuda.FakeCuda, path: Path) -> None:
        from zeroload import _core

        self.fake, self.core = fake, _core
        self.ckpt = _core.Checkpoint.open(str(path))
        self.dests: list[fakecuda.DeviceBuffer] = []
        self.requests = []
        self.total = 0
        for i in range(self.ckpt.num_storages):
            _, off, n, _ = self.ckpt.storage(i)
            ptr = fake.alloc(n, 0)  # no backing: address space only
            self.dests.append(fakecuda.DeviceBuffer(ptr, n, 0, lambda b: fake.free(b.ptr)))
            self.requests.append((off, n, i, 0))
            self.total += n

    def gbps(self, readers: int, budget: int) -> float:
        before = self.fake.stat("bytes_copied")
        with self.fake.bound(0):
            t0 = time.perf_counter()
            self.core.copy_to_cuda(
                self.ckpt, self.dests, self.requests, 0, budget, None, readers=readers
            )
            dt = time.perf_counter() - t0
        assert self.fake.stat("bytes_copied") - before == self.total
        return self.total / dt / 1e9

    def close(self) -> None:
        for d in self.dests:
            d.free()
        self.core.release_staging()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def side_by_side(
    a: Callable[[], float], b: Callable[[], float], repeat: int, before: Callable[[], object]
) -> tuple[float, float]:
    """Medians of `a` and `b` (GB/s), measured alternately `repeat` times each, `before`
    each measurement: both see the same machine state, whatever else runs on it."""
    xs, ys = [], []
    for _ in range(repeat):
        before()
        xs.append(a())
        before()
        ys.append(b())
    return median(xs), median(ys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--readers", default="1,2,4,8")
    ap.add_argument("--budgets-mib", default="64,256,1024")
    args = ap.parse_args()
    readers = [int(x) for x in args.readers.split(",")]
    budgets = [int(x) * MIB for x in args.budgets_mib.split(",")]

    fake = fakecuda.load()
    fake.reset()
    # A quiet fake: no random delays, no source snapshots, no device bytes kept; each
    # copy is one memcpy (into a scratch buffer) on the stream's thread.
    for k, v in {"max_delay_us": 0, "check_sources": 0, "backing": 0, "link_gbps": 0}.items():
        fake.config(k, v)

    import torch

    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}; fake CUDA driver "
        f"{fake.path.name}"
    )
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "big.safetensors"
        write_file(path, int(args.size_gb * (1 << 30)))
        size = path.stat().st_size
        print(f"file: {size / 2**30:.2f} GiB in {args.dir}, medians of {args.repeat} runs\n")
        engine = Engine(fake, path)
        try:
            run(fake, engine, path, readers, budgets, args.repeat)
        finally:
            engine.close()
            findings = fake.take_findings()
            if findings:
                print("fake driver findings:", *findings, sep="\n  ")
    print(f"load average at end: {os.getloadavg()}")


def run(
    fake: fakecuda.FakeCuda,
    engine: Engine,
    path: Path,
    readers: list[int],
    budgets: list[int],
    repeat: int,
) -> None:
    warm_page_cache(path)

    def nothing() -> None:
        pass

    def evict() -> None:
        drop_page_cache(path)

    for memcpy in (1, 0):
        fake.config("htod_memcpy", memcpy)
        what = (
            "the fake's HtoD = memcpy into a scratch buffer on the stream thread"
            if memcpy
            else "the fake's HtoD reads one byte per page (a DMA engine costs the host no CPU)"
        )
        print(f"1{'ab'[1 - memcpy]}. host pipeline, page cache warm; {what}")
        print("    engine GB/s (1e9 bytes/s) / pread GB/s with as many threads, medians")
        print(f"{'readers':>7} " + " ".join(f"{f'{b // MIB} MiB':>19}" for b in budgets))
        ratios = []
        for n in readers:
            row = []
            for b in budgets:
                engine.gbps(n, b)  # the ring for this budget, pinned once
                p, g = side_by_side(
                    lambda n=n: pread_gbps(path, n),
                    lambda n=n, b=b: engine.gbps(n, b),
                    repeat,
                    nothing,
                )
                ratios.append(g / p)
                row.append(f"{g:5.2f}/{p:5.2f} = {g / p:4.2f}")
            print(f"{n:>7} " + " ".join(f"{c:>19}" for c in row))
        print(f"    ratio: worst {min(ratios):.2f}, median {median(ratios):.2f} (target >= 0.8)\n")
    fake.config("htod_memcpy", 1)

    n_readers = max(readers)
    budget = 256 * MIB
    print(
        f"2. simulated link: the fake paces each stream at `link` GB/s "
        f"({n_readers} readers, {budget // MIB} MiB staging, HtoD memcpy), medians"
    )
    print(
        f"{'cache':>5} {'read':>6} {'feed':>6} {'link':>6} {'engine':>6} {'util':>5} {'/read':>6}"
    )
    cold_ok = drop_page_cache(path)
    cases: list[tuple[str, float]] = [("warm", 0.5)]
    if cold_ok:
        cases += [("cold", 0.5), ("cold", 3.0)]
    for cache, factor in cases:
        before = evict if cache == "cold" else nothing
        if cache == "warm":
            warm_page_cache(path)
        # What reads can feed: plain pread, and the engine with an unpaced link.
        fake.config("link_gbps", 0)
        read0, feed = side_by_side(
            lambda: pread_gbps(path, n_readers),
            lambda: engine.gbps(n_readers, budget),
            repeat,
            before,
        )
        link = factor * min(read0, feed)
        fake.config("link_gbps", link)
        read, g = side_by_side(
            lambda: pread_gbps(path, n_readers),
            lambda: engine.gbps(n_readers, budget),
            repeat,
            before,
        )
        target = "util >= 0.95" if factor < 1 else "/read >= 0.9"
        print(
            f"{cache:>5} {read:6.2f} {feed:6.2f} {link:6.2f} {g:6.2f} {g / link:5.2f} "
            f"{g / read:6.2f}  (link = {factor} x what reads feed; target {target})"
        )
    fake.config("link_gbps", 0)
    if not cold_ok:
        print("(cold file not measured: posix_fadvise DONTNEED unavailable)")
    print(
        "    read: plain pread GB/s; feed: the engine with an unpaced link; util: delivered "
        "bytes/s over the link rate; /read: over pread of the same file in the same cache "
        "state (measured alternately with the engine)"
    )


if __name__ == "__main__":
    main()
