"""Save benchmark: zeroload.save vs torch.save and safetensors.torch.save_file, to a
durable file, against the raw write ceiling of the same disk in the same run.

Each method runs in a fresh process on the same tensors (loaded into anonymous memory
first, so every method starts from the same state) and is timed until its file is
durable: torch.save and save_file are followed by an `fsync` of the file (zeroload.save
fsyncs itself), so the page cache is not the finish line. The ceiling is the faster of
two raw writes of the same byte count from one reused 64 MiB buffer (the checkpoint's
first bytes, made before the clock starts), each followed by `fsync`: a parallel
`pwrite` (one thread per CPU, 64 MiB blocks), and one thread's `pwrite` of 8 MiB blocks
in file order (buffered writes into one file take turns on its inode lock, so the one
thread may well be the faster). Both rows are shown; "x ceiling" divides by the faster.
Figures are medians of --repeat fresh processes (rounds of every method in turn), with
their range. Peak RSS increase during the save is `VmHWM` after resetting it
(`/proc/self/clear_refs`) once the tensors are loaded. (When the tensors are views of a
zeroload mapping, reading them maps file pages, which count in RSS: that part is page
cache, not allocation.)

Workloads (generated here, removed at the end unless --keep):
  (a) the seed notebook's GPT-2 XL state dict (1558M fp32 parameters, ~6.4 GB; --size
      picks a smaller model), as .pth (torch.save, zeroload.save) and .safetensors
      (save_file, zeroload.save);
  (b) 20,000 small tensors (--many) as .pth;
  (c) on a GPU (skipped without one): (a) from CUDA tensors; the RSS increase then shows
      whether host memory stays within the staging budget.
  (d) zeroload.save of (a) when the tensors are zeroload.load views of a file (zero-copy
      source; the resume pattern's save).

    python benchmarks/save.py --size small       # quick
    python benchmarks/save.py                    # GPT-2 XL: ~20 GB of disk at the peak
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 1 << 20

METHODS: Dict[str, str] = {
    "ceiling": "parallel pwrite of the same bytes + fsync (a ceiling)",
    "ceiling_one": "one thread's pwrite of the same bytes in file order + fsync (a ceiling)",
    "zeroload": "zeroload.save(sd, p)",
    "torch_save": "torch.save(sd, p) + fsync",
    "save_file": "safetensors.torch.save_file(sd, p) + fsync",
}

CHILD = r"""
import json, os, sys, threading, time
import torch
src, dst, method, device, source = sys.argv[1:6]

def rss_field(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0

if source == "mapped":
    import zeroload
    sd = zeroload.load(src)
elif src.endswith(".safetensors"):
    from safetensors.torch import load_file
    sd = load_file(src, device=device)
else:
    sd = torch.load(src, weights_only=True, map_location=device)
if source == "anon" and device == "cpu":
    # load_file's tensors may be views of its mapping: own anonymous copies, touched
    # (one at a time, so a 6.4 GB model is never held twice)
    for k in list(sd):
        sd[k] = sd[k].clone()
    import gc; gc.collect()
storages = {t.untyped_storage()._cdata: t.untyped_storage() for t in sd.values()}
nbytes = sum(s.nbytes() for s in storages.values())
if device == "cuda":
    torch.cuda.synchronize()
if method.startswith("ceiling"):
    # 64 MiB of the checkpoint's own bytes (a virtual disk's speed can depend on what is
    # written), made before the clock starts
    parts, have = [], 0
    for t in sd.values():
        if have >= 64 << 20:
            break
        flat = t.detach().cpu().contiguous().view(-1).view(torch.uint8)
        parts.append(flat[: (64 << 20) - have].numpy().tobytes())
        have += len(parts[-1])
    block = b"".join(parts)
    block += block * ((64 << 20) // max(len(block), 1))  # a model under 64 MiB: repeated
    block = block[: 64 << 20]
    del parts

base = rss_field("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
except OSError:
    pass

def fsync(p):
    fd = os.open(p, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)

if method == "zeroload":
    import zeroload, zeroload._save  # imports are not part of the time
elif method == "save_file":
    from safetensors.torch import save_file

t0 = time.perf_counter()
if method == "ceiling_one":
    step = 8 << 20
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for at in range(0, nbytes, step):
        os.pwrite(fd, memoryview(block)[:min(step, nbytes - at)], at)
    os.fsync(fd); os.close(fd)
elif method == "ceiling":
    nthreads = os.cpu_count() or 1
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    blocks = list(range(0, nbytes, len(block)))
    def work(k):
        for b in blocks[k::nthreads]:
            n = min(len(block), nbytes - b)
            os.pwrite(fd, memoryview(block)[:n], b)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(nthreads)]
    [t.start() for t in ts]; [t.join() for t in ts]
    os.fsync(fd); os.close(fd)
elif method == "zeroload":
    zeroload.save(sd, dst)
elif method == "torch_save":
    torch.save(sd, dst); fsync(dst)
elif method == "save_file":
    save_file(sd, dst); fsync(dst)
seconds = time.perf_counter() - t0
peak = rss_field("VmHWM") - base
print(json.dumps({"seconds": seconds, "bytes": nbytes, "file": os.path.getsize(dst),
                  "rss_increase": peak}))
"""


def run_child(src: Path, dst: Path, method: str, device: str, source: str) -> Dict[str, Any]:
    if dst.exists():
        dst.unlink()
    subprocess.run(["sync"], check=False)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), method, device, source],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if r.returncode != 0:
        raise SystemExit(f"{method} on {src.name} failed:\n{r.stderr}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    dst.unlink()
    return out


def write_many(path: Path, count: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(16, 512, (count,), generator=gen).tolist()
    torch.save({f"layer{i // 10}.p{i % 10}": torch.randn(s, generator=gen) for i, s in
                enumerate(sizes)}, path)  # fmt: skip


def median(xs: List[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def table(title: str, rows: List[Dict[str, Any]]) -> str:
    """Medians (min-max); "x ceiling" against the faster ceiling's median."""
    ceiling = min(median(r["seconds"]) for r in rows if r["method"].startswith("ceiling"))
    lines = [
        f"### {title}",
        "",
        "| method | seconds | GB/s | x ceiling | peak RSS increase (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        secs = median(r["seconds"])
        gbs = r["bytes"] / secs / 1e9
        lines.append(
            f"| {r['label']} | {secs:.2f} ({min(r['seconds']):.2f}-{max(r['seconds']):.2f}) "
            f"| {gbs:.2f} | {ceiling / secs:.2f} | {median(r['rss_increase']) / MiB:.0f} |"
        )
    by = {r["method"]: median(r["seconds"]) for r in rows}
    for peer in ("torch_save", "save_file"):
        if peer in by and "zeroload" in by:
            ratio = by["zeroload"] / by[peer]
            lines.append(f"\nzeroload.save takes {ratio:.2f}x the time of {peer} (medians)")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="xl", help="GPT model size (small, medium, large, xl)")
    p.add_argument("--many", type=int, default=20_000, help="small tensors (0: skip (b))")
    p.add_argument("--only-many", action="store_true", help="run (b) alone")
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per method")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch
    from cpu_load import model_shapes, write_safetensors_streaming

    folder = Path(tempfile.mkdtemp(prefix="zeroload-save-", dir=args.dir))
    results: Dict[str, List[Dict[str, Any]]] = {}
    try:
        st = folder / f"gpt2-{args.size}.safetensors"
        if not args.only_many:
            write_safetensors_streaming(st, model_shapes(args.size))
        many = folder / "many.pth"
        if args.many:
            write_many(many, args.many)
        ceilings = ["ceiling", "ceiling_one"]
        runs = [
            (f"GPT-2 {args.size} -> .pth", st, "out.pth", "cpu", "anon",
             [*ceilings, "zeroload", "torch_save"]),
            (f"GPT-2 {args.size} -> .safetensors", st, "out.safetensors", "cpu", "anon",
             [*ceilings, "zeroload", "save_file"]),
            (f"GPT-2 {args.size} from a zeroload mapping -> .pth", st, "out.pth", "cpu",
             "mapped", [*ceilings, "zeroload", "torch_save"]),
            (f"{args.many} small tensors -> .pth", many, "out.pth", "cpu", "anon",
             [*ceilings, "zeroload", "torch_save"]),
        ]  # fmt: skip
        if not args.many:
            runs = [r for r in runs if r[1] != many]
        if args.only_many:
            runs = [r for r in runs if r[1] == many]
        if torch.cuda.is_available() and not args.only_many:
            runs.append(
                (f"GPT-2 {args.size} on CUDA -> .pth", st, "out.pth", "cuda", "anon",
                 [*ceilings, "zeroload", "torch_save", "save_file"])
            )  # fmt: skip
        for title, src, out, device, source, methods in runs:
            # Rounds of every method in turn, so a slow spell of the machine hits all.
            got: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
            for _ in range(args.repeat):
                for m in methods:
                    dst = folder / (out if m != "save_file" else "out.safetensors")
                    got[m].append(run_child(src, dst, m, device, source))
            rows = [
                {"method": m, "label": METHODS[m], "bytes": got[m][0]["bytes"],
                 "seconds": [r["seconds"] for r in got[m]],
                 "rss_increase": [r["rss_increase"] for r in got[m]]}
                for m in methods
            ]  # fmt: skip
            results[title] = rows
            print(table(title, rows), flush=True)
            print(flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    machine = (
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"machine: {machine}; written under {args.dir or tempfile.gettempdir()}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    t = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - t:.0f} s)")
    sys.exit(code)
