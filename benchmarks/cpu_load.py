"""CPU load benchmark: time until the weights are usable, cold and warm, against peers.

A CPU load is done when the weights have been read, not when the dict comes back: mmap
loaders return in milliseconds and read the file while the first forward pass faults it
in. So every method is timed twice in the same run, in a fresh process each:

  time-to-dict     the loader returns its dict of tensors;
  time-to-touched  ... and every byte of every tensor has been read once (a sum over each
                   tensor, standing in for the first forward pass).

next to the raw sequential read of the same file (one thread, `read()` 16 MiB at a time
into a reused buffer), measured in the same run and page-cache state: the ceiling a
loader reading the file from disk can reach. Peak RSS increase until the dict is back is
measured too (what a load costs before anything is touched).

Workloads (generated here; removed at the end unless --keep):
  (a) the seed notebook's GPT-2 XL state dict (GPTModel shapes, 1558M fp32 parameters +
      causal masks, ~6.3 GiB) as .pth and as .safetensors (--size picks a smaller model);
      written tensor by tensor, never two copies in memory;
  (b) a .pth of --many (20,000) small tensors: load speed and RSS vs torch.load(mmap=True);
  (c) `open()` looping over every key vs `safetensors.safe_open`, on safetensors files of
      --open-counts (20,000 and 100,000) tensors, and zeroload.open on the .pth of (b).

Page cache: "warm" runs read the files once first. "cold" runs empty the page cache
before every process: `echo 3 > /proc/sys/vm/drop_caches` as root (after `sync`),
otherwise `posix_fadvise(POSIX_FADV_DONTNEED)` on the benchmark's own files (which drops
their clean pages; the tables say which was used).

    python benchmarks/cpu_load.py --size small             # quick (~0.6 GB per file)
    python benchmarks/cpu_load.py                          # GPT-2 XL: ~13 GB of disk
    python benchmarks/cpu_load.py --only a --cache cold --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

MiB = 1 << 20
GiB = 1 << 30

# method -> what the child runs (`p` is the checkpoint).
METHODS: Dict[str, str] = {
    "raw_read": "read() the file, 16 MiB at a time (the ceiling)",
    "zeroload": "zeroload.load(p)",
    "zeroload_no_readahead": "zeroload.load(p, readahead=False)",
    "torch_load_mmap": "torch.load(p, mmap=True, weights_only=True)",
    "torch_load": "torch.load(p, weights_only=True)",
    "safetensors": "safetensors.torch.load_file(p)",
    "zeroload_open": "with zeroload.open(p): f.get_tensor(k) for every key",
    "safe_open": "with safetensors.safe_open(p, 'pt'): f.get_tensor(k) for every key",
}

_RESULT = "CPU_LOAD_RESULT "


# --------------------------------------------------------------------------------------
# Child: one method, one fresh interpreter
# --------------------------------------------------------------------------------------


def _loader(method: str) -> Callable[[str], Any]:
    import torch

    if method in ("zeroload", "zeroload_no_readahead"):
        import zeroload

        readahead = None if method == "zeroload" else False
        return lambda p: zeroload.load(p, readahead=readahead)
    if method == "torch_load_mmap":
        return lambda p: torch.load(p, mmap=True, weights_only=True)
    if method == "torch_load":
        return lambda p: torch.load(p, weights_only=True)
    if method == "safetensors":
        from safetensors.torch import load_file

        return load_file
    if method == "zeroload_open":
        import zeroload

        def open_loop(p: str) -> Dict[str, Any]:
            with zeroload.open(p) as f:
                return {k: f.get_tensor(k) for k in f.keys()}

        return open_loop
    if method == "safe_open":
        from safetensors import safe_open

        def safe_open_loop(p: str) -> Dict[str, Any]:
            with safe_open(p, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}

        return safe_open_loop
    raise ValueError(f"unknown method {method!r}")


def _touch(obj: Any) -> float:
    """Reads every byte of every tensor once, in the dict's order (a sum in the tensor's
    own dtype: as fast as memory allows); returns a checksum, the exact sum of the
    per-tensor sums, the same whatever the order."""
    import math

    import torch

    return math.fsum(float(t.sum()) for t in obj.values() if isinstance(t, torch.Tensor))


def _raw_read(path: str) -> None:
    buf = bytearray(16 * MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    method, path = spec["method"], spec["path"]
    if method == "raw_read":
        t0 = time.perf_counter()
        _raw_read(path)
        return {"touched_s": time.perf_counter() - t0}
    import gc

    import torch

    from zeroload._track import track

    torch.set_grad_enabled(False)
    load = _loader(method)
    _touch(load(spec["warmup"]))  # imports and first-use costs, on a tiny file
    gc.collect()
    t0 = time.perf_counter()
    with track(method) as tr:
        obj = load(path)
    t1 = time.perf_counter()
    checksum = _touch(obj) if spec["touch"] else None
    t2 = time.perf_counter()
    return {
        "dict_s": t1 - t0,
        "touched_s": t2 - t0 if spec["touch"] else None,
        "rss_dict": tr.cpu_peak,
        "checksum": checksum,
        "tensors": len(obj),
    }


# --------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------


def run_child(spec: Dict[str, Any], timeout: float = 1800) -> Dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent / "python")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT) :])
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}


def resident(path: Path) -> float | None:
    """The share of the file's pages in the page cache (mincore on a mapping; reads
    nothing), or None where that cannot be asked."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        size = path.stat().st_size
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError, AttributeError):
        return None
    try:
        buf = (ctypes.c_char * size).from_buffer(m)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
        del buf
        return sum(bytes(vec)) / pages if rc == 0 else None
    finally:
        m.close()


def drop_page_cache(path: Path) -> bool:
    """Evicts the file's clean pages from the page cache (no root needed); whether the
    kernel took the advice."""
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # dirty pages cannot be dropped
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (AttributeError, OSError):
        return False


def warm_page_cache(path: Path) -> None:
    """Reads the whole file once, so its pages are in the page cache."""
    _raw_read(str(path))


class Cache:
    """Puts the page cache in the state a run asks for."""

    def __init__(self) -> None:
        self.can_drop = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)
        self.how = (
            "drop_caches (echo 3 > /proc/sys/vm/drop_caches, as root)"
            if self.can_drop
            else "posix_fadvise(DONTNEED) on the benchmark files (not root)"
        )

    def cold(self, files: Sequence[Path]) -> None:
        os.sync()
        if self.can_drop:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
            return
        for p in files:
            drop_page_cache(p)

    @staticmethod
    def warm(files: Sequence[Path]) -> None:
        for p in files:
            warm_page_cache(p)


def measure(
    path: Path,
    methods: Sequence[str],
    cache: str,
    repeat: int,
    warmup: Path,
    cache_ctl: Cache,
    touch: bool = True,
) -> Dict[str, List[Dict[str, Any]]]:
    """Runs every method `repeat` times, interleaved, each in a fresh process."""
    out: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
    for r in range(repeat):
        for m in methods:
            if cache == "cold":
                cache_ctl.cold([path])
            else:
                cache_ctl.warm([path])
            spec = {"method": m, "path": str(path), "warmup": str(warmup), "touch": touch}
            before = resident(path)
            res = run_child(spec)
            # Other processes (memory pressure, another benchmark dropping caches) can
            # empty the cache under a "warm" run: record how cached the file was.
            res["cached"] = before
            if cache == "warm" and before is not None and before < 0.99:
                res["not_warm"] = True
            out[m].append(res)
            shown = res.get("error") or (
                f"dict {res.get('dict_s') or 0:.3f} s, touched {res.get('touched_s') or 0:.3f} s"
                f", {100 * (before or 0):.0f}% cached at start"
            )
            print(f"  [{cache} {r + 1}/{repeat}] {m}: {shown}", file=sys.stderr, flush=True)
    return out


def _valid(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Runs without errors, and for warm runs those that started with the file cached
    (all runs if none did)."""
    ok = [r for r in runs if "error" not in r]
    warm = [r for r in ok if not r.get("not_warm")]
    return warm or ok


def _median(runs: List[Dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in _valid(runs) if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _spread(runs: List[Dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in _valid(runs) if r.get(key) is not None]
    if len(vals) < 2:
        return ""
    return f" ({min(vals):.2f}-{max(vals):.2f})"


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def _fmt_bytes(x: float | None) -> str:
    from zeroload._units import format_bytes

    return format_bytes(x, 2)


def table(
    title: str, results: Dict[str, List[Dict[str, Any]]], size: int, touch: bool = True
) -> str:
    """A markdown table: medians over the repeats (min-max when repeated)."""
    raw = _median(results.get("raw_read", []), "touched_s")
    sums = {
        m: {r.get("checksum") for r in runs if r.get("checksum") is not None}
        for m, runs in results.items()
    }
    ref = next((next(iter(s)) for s in sums.values() if s), None)
    lines = [f"**{title}**", ""]
    dropped = sum(bool(r.get("not_warm")) for runs in results.values() for r in runs)
    if dropped:
        lines[0] += f" ({dropped} run(s) found the file partly evicted and are left out)"
    head = "| method | time-to-dict |"
    if touch:
        head += " time-to-touched | raw read time / touched |"
    head += " RSS increase until dict | check |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for m, runs in results.items():
        errors = [r["error"] for r in runs if "error" in r]
        if m == "raw_read":
            t = _median(runs, "touched_s")
            bw = f" ({size / t / 1e9:.2f} GB/s)" if t else ""
            cells = ["-", f"{_fmt_s(t)}{_spread(runs, 'touched_s')}{bw}", "1.00", "-", "-"]
            lines.append(f"| {METHODS[m]} | " + " | ".join(cells) + " |")
            continue
        if errors and len(errors) == len(runs):
            lines.append(f"| `{METHODS[m]}` | failed: {errors[0]} |")
            continue
        d = _median(runs, "dict_s")
        row = [f"{_fmt_s(d)}{_spread(runs, 'dict_s')}"]
        if touch:
            t = _median(runs, "touched_s")
            row.append(f"{_fmt_s(t)}{_spread(runs, 'touched_s')}")
            row.append(f"{raw / t:.2f}" if raw and t else "-")
        row.append(_fmt_bytes(_median(runs, "rss_dict")))
        check = "-"
        if sums[m]:
            check = "equal" if sums[m] == {ref} else f"differs ({sums[m]} vs {ref})"
        row.append(check)
        lines.append(f"| `{METHODS[m]}` | " + " | ".join(row) + " |")
    return "\n".join(lines)


def ratio_lines(results: Dict[str, List[Dict[str, Any]]], key: str, us: str) -> List[str]:
    mine = _median(results.get(us, []), key)
    out = []
    for m, runs in results.items():
        theirs = _median(runs, key)
        if m != us and mine and theirs:
            out.append(f"{METHODS[m]}: {theirs / mine:.2f}x zeroload's {key}")
    return out


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


def model_shapes(size: str) -> Dict[str, tuple]:
    """Names and shapes of the seed GPTModel's state dict, without allocating it."""
    import torch

    from zeroload.bench import gptmodel

    with torch.device("meta"):
        model = gptmodel.GPTModel(gptmodel.config(size))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_safetensors_streaming(path: Path, shapes: Dict[str, tuple], seed: int = 0) -> None:
    """Random fp32 weights (std 0.02; causal masks as in the model), tensor by tensor, laid
    out as `safetensors.save_file` lays them out (by dtype, then by name)."""
    import numpy as np
    import torch

    header, offset = {}, 0
    shapes = dict(sorted(shapes.items()))
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes.items():
            if name.endswith(".mask"):
                t = torch.triu(torch.ones(shape), diagonal=1)
            else:
                t = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
            f.write(memoryview(t.reshape(-1).numpy()))
            del t
    os.replace(tmp, path)


def pth_from_safetensors(src: Path, dst: Path, order: Sequence[str]) -> None:
    """torch.save the tensors of `src`, in `order` (the model's), from per-tensor
    copy-on-write memory maps."""
    import numpy as np
    import torch

    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    sd = {}
    for name in order:
        h = header[name]
        start, _end = h["data_offsets"]
        arr = np.memmap(
            src, dtype=np.float32, mode="c", offset=8 + n + start, shape=tuple(h["shape"])
        )
        sd[name] = torch.from_numpy(arr)
    torch.save(sd, dst)


def write_many_pth(path: Path, count: int, seed: int = 0) -> None:
    """`count` float32 tensors of 16-511 elements, each its own storage."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(16, 512, (count,), generator=gen).tolist()
    sd = {
        f"layer{i // 10}.param{i % 10}": torch.randn(s, generator=gen) for i, s in enumerate(sizes)
    }
    torch.save(sd, path)


def write_many_safetensors(path: Path, count: int, seed: int = 0) -> None:
    """`count` float32 tensors of 16-511 elements (header written directly: `save_file`
    of 100k tensors takes longer than the benchmark)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(16, 512, (count,), generator=gen).tolist()
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i, s in enumerate(sizes):
        header[f"layer{i // 10}.param{i % 10}"] = {
            "dtype": "F32",
            "shape": [s],
            "data_offsets": [offset, offset + 4 * s],
        }
        offset += 4 * s
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = torch.randn(offset // 4, generator=gen).numpy().tobytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def write_warmup(folder: Path) -> Dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    small = {"w": torch.zeros(4, 4)}
    out = {"pth": folder / "warmup.pth", "safetensors": folder / "warmup.safetensors"}
    torch.save(small, out["pth"])
    save_file(small, out["safetensors"])
    return out


def machine() -> str:
    import torch

    try:
        import safetensors

        st = safetensors.__version__
    except ImportError:
        st = "-"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, {platform.platform()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, safetensors {st}; "
        f"load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="xl", help="GPT model size for (a): small, medium, large, xl")
    p.add_argument("--many", type=int, default=20_000, help="tensor count for (b)")
    p.add_argument("--open-counts", type=int, nargs="*", default=[20_000, 100_000])
    p.add_argument("--only", nargs="*", choices=["a", "b", "c"], default=["a", "b", "c"])
    p.add_argument("--cache", nargs="*", choices=["warm", "cold"], default=["warm", "cold"])
    p.add_argument("--repeat", type=int, default=1, help="runs per method (medians reported)")
    p.add_argument("--dir", help="where to write the files (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the generated files in --dir")
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = _child(json.loads(args.child))
        print(_RESULT + json.dumps(result), flush=True)
        return 0
    if args.keep and not args.dir:
        p.error("--keep needs --dir")

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="zeroload-cpu-"))
    folder.mkdir(parents=True, exist_ok=True)
    made: List[Path] = []
    try:
        return _run(args, folder, made)
    finally:
        if not args.keep:
            for f in made:
                f.unlink(missing_ok=True)
            if not args.dir:
                shutil.rmtree(folder, ignore_errors=True)


def _ensure(path: Path, make: Callable[[Path], None], made: List[Path]) -> Path:
    if not path.exists():
        t0 = time.perf_counter()
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        made.append(path)
        make(path)
        print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def _run(args: argparse.Namespace, folder: Path, made: List[Path]) -> int:
    print(machine())
    cache_ctl = Cache()
    if "cold" in args.cache:
        print(f"cold page cache by: {cache_ctl.how}")
    warm = write_warmup(folder)
    made += list(warm.values())
    results: Dict[str, Any] = {}
    tables: List[str] = []
    failed = False

    def record(key: str, title: str, res: Dict[str, List[Dict[str, Any]]], size: int, **kw: Any):
        nonlocal failed
        results[key] = res
        tables.append(table(title, res, size, **kw))
        print("\n" + tables[-1] + "\n", flush=True)
        failed |= any("error" in r for runs in res.values() for r in runs)

    if "a" in args.only:
        shapes = model_shapes(args.size)
        st = _ensure(
            folder / f"gpt2-{args.size}.safetensors",
            lambda q: write_safetensors_streaming(q, shapes),
            made,
        )
        pth = _ensure(
            folder / f"gpt2-{args.size}.pth",
            lambda q: pth_from_safetensors(st, q, list(shapes)),
            made,
        )
        for cache in args.cache:
            for path, methods in (
                (
                    pth,
                    [
                        "raw_read",
                        "zeroload",
                        "zeroload_no_readahead",
                        "torch_load_mmap",
                        "torch_load",
                    ],
                ),
                (st, ["raw_read", "zeroload", "zeroload_no_readahead", "safetensors"]),
            ):
                size = path.stat().st_size
                res = measure(path, methods, cache, args.repeat, warm[_kind(path)], cache_ctl)
                title = (
                    f"(a) {path.name}: {size / GiB:.2f} GiB, {len(shapes)} tensors, "
                    f"{cache} page cache, median of {args.repeat}"
                )
                record(f"a-{path.suffix[1:]}-{cache}", title, res, size)
    if "b" in args.only:
        many = _ensure(
            folder / f"many-{args.many}.pth", lambda q: write_many_pth(q, args.many), made
        )
        size = many.stat().st_size
        res = measure(
            many,
            ["zeroload", "torch_load_mmap", "torch_load"],
            "warm",
            args.repeat,
            warm["pth"],
            cache_ctl,
        )
        title = f"(b) {many.name}: {args.many} small tensors, {size / MiB:.1f} MiB, warm page cache"
        record("b", title, res, size)
        z, t = _median(res["zeroload"], "dict_s"), _median(res["torch_load_mmap"], "dict_s")
        if z and t:
            print(f"  (b) zeroload.load is {t / z:.1f}x faster than torch.load(mmap=True)\n")
    if "c" in args.only:
        for count in args.open_counts:
            st_many = _ensure(
                folder / f"many-{count}.safetensors",
                lambda q, n=count: write_many_safetensors(q, n),
                made,
            )
            res = measure(
                st_many,
                ["zeroload_open", "safe_open"],
                "warm",
                args.repeat,
                warm["safetensors"],
                cache_ctl,
            )
            title = f"(c) {st_many.name}: open() over all {count} keys, warm page cache"
            record(f"c-{count}", title, res, st_many.stat().st_size)
            z, s = _median(res["zeroload_open"], "dict_s"), _median(res["safe_open"], "dict_s")
            if z and s:
                print(
                    f"  (c) {count} keys: zeroload.open loop {s / z:.1f}x faster than safe_open\n"
                )
        if "b" in args.only:
            res = measure(many, ["zeroload_open"], "warm", args.repeat, warm["pth"], cache_ctl)
            record(
                "c-pth",
                f"(c) {many.name}: zeroload.open() over all {args.many} keys, warm page cache",
                res,
                many.stat().st_size,
            )

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


def _kind(path: Path) -> str:
    return "safetensors" if path.suffix == ".safetensors" else "pth"


if __name__ == "__main__":
    sys.exit(main())
