"""GPU load throughput: zeroload vs the pinned host-to-device bandwidth measured in the same
run, vs `safetensors.torch.load_file(device="cuda")` and `torch.load(map_location="cuda")`.

    python benchmarks/gpu_throughput.py [--size-gb 4] [--repeat 3] [--dir /path/on/disk]

Writes a safetensors file and a torch.save file of the same tensors (GPT-2-XL-like shapes
by default), then times each loader (best of --repeat) with a warm page cache and, where
the kernel lets us drop the file's pages (posix_fadvise DONTNEED), a cold one. Prints a
table and the ratios the project targets (zeroload / pinned HtoD >= 0.9 warm; zeroload /
safetensors >= 5). Exits 0 with a message when no CUDA device is available.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_load import drop_page_cache, warm_page_cache


def pinned_htod_gbps(nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Best host-to-device bandwidth from pinned memory, in GB/s (1e9 bytes/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / best / 1e9


def make_state_dict(size_bytes: int) -> dict[str, torch.Tensor]:
    """GPT-2-XL-like blocks (d=1600, fp32) until `size_bytes` is reached."""
    d = 1600
    sd: dict[str, torch.Tensor] = {}
    total, layer = 0, 0
    g = torch.Generator().manual_seed(0)
    while total < size_bytes:
        p = f"h.{layer}."
        for name, shape in [
            ("attn.c_attn.weight", (d, 3 * d)),
            ("attn.c_attn.bias", (3 * d,)),
            ("attn.c_proj.weight", (d, d)),
            ("mlp.c_fc.weight", (d, 4 * d)),
            ("mlp.c_proj.weight", (4 * d, d)),
            ("ln_1.weight", (d,)),
            ("ln_2.weight", (d,)),
        ]:
            t = torch.empty(shape).uniform_(-1, 1, generator=g)
            sd[p + name] = t
            total += t.nbytes
        layer += 1
    return sd


def time_load(fn: Callable[[], object], repeat: int, before: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        before()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        del out
    gc.collect()
    torch.cuda.empty_cache()
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="checkpoint size (GiB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files")
    ap.add_argument("--staging-mb", type=int, default=None, help="zeroload staging budget")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device available; nothing to measure (GPU figures open)")
        return 0
    import safetensors.torch

    import zeroload

    budget = None if args.staging_mb is None else args.staging_mb << 20
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="zeroload-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    st_path, pt_path = workdir / "bench.safetensors", workdir / "bench.pth"
    size = int(args.size_gb * (1 << 30))
    if not (st_path.exists() and pt_path.exists()):
        print(f"writing {args.size_gb:g} GiB checkpoints to {workdir} ...", flush=True)
        sd = make_state_dict(size)
        safetensors.torch.save_file(sd, st_path)
        torch.save(sd, pt_path)
        del sd
        gc.collect()
    with open(st_path, "rb") as f:
        nbytes = st_path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")

    torch.zeros(1, device="cuda")  # context up front
    gpu = torch.cuda.get_device_name()
    pinned = pinned_htod_gbps()
    print(f"device: {gpu}; tensor bytes: {nbytes / 2**30:.2f} GiB")
    print(f"pinned host-to-device bandwidth (same run): {pinned:.1f} GB/s\n")

    loaders: list[tuple[str, Path, Callable[[], object]]] = [
        (
            "zeroload .safetensors",
            st_path,
            lambda: zeroload.load(st_path, device="cuda", staging_bytes=budget),
        ),
        (
            "zeroload .pth",
            pt_path,
            lambda: zeroload.load(pt_path, device="cuda", staging_bytes=budget),
        ),
        (
            "safetensors load_file(cuda)",
            st_path,
            lambda: safetensors.torch.load_file(st_path, device="cuda"),
        ),
        (
            "torch.load(map_location=cuda)",
            pt_path,
            lambda: torch.load(pt_path, map_location="cuda", weights_only=True, mmap=True),
        ),
    ]
    results: dict[tuple[str, str], float] = {}
    cold_ok = drop_page_cache(st_path) and drop_page_cache(pt_path)
    for cache in ["warm", "cold"] if cold_ok else ["warm"]:
        for name, path, fn in loaders:
            before = (
                (lambda p=path: warm_page_cache(p))
                if cache == "warm"
                else (lambda p=path: drop_page_cache(p))
            )
            secs = time_load(fn, args.repeat, before)
            results[(cache, name)] = nbytes / secs / 1e9
    if not cold_ok:
        print("(cold page cache not measured: posix_fadvise DONTNEED unavailable)\n")

    print(f"{'loader':34} {'cache':6} {'GB/s':>7} {'/pinned':>8}")
    for (cache, name), gbps in results.items():
        print(f"{name:34} {cache:6} {gbps:7.2f} {gbps / pinned:8.2f}")
    print()
    for cache in ["warm", "cold"]:
        z = results.get((cache, "zeroload .safetensors"))
        s = results.get((cache, "safetensors load_file(cuda)"))
        zp = results.get((cache, "zeroload .pth"))
        t = results.get((cache, "torch.load(map_location=cuda)"))
        if z and s:
            print(
                f"{cache}: zeroload/pinned = {z / pinned:.2f} (target >= 0.9 warm); "
                f"zeroload/safetensors = {z / s:.2f}x (target >= 5x)"
            )
        if zp and t:
            print(f"{cache}: zeroload .pth / torch.load = {zp / t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
