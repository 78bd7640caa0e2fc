"""Distributed load benchmark: a sharded model on N gloo ranks (CPU), four ways.

Workload (generated here, in a temporary directory removed afterwards unless --keep): a
Llama-style fp32 model (SwiGLU MLP, untied head) as a Hugging Face safetensors shard set
with its index, ~2.2 GB by default (--size small: ~85 MB). Written tensor by tensor.

Plans:
  tp     parallelize_module: q/k/v/gate/up ColwiseParallel (Shard(0)), o/down
         RowwiseParallel (Shard(1): one run per row), embedding Shard(0), head Shard(0).
  fsdp2  fully_shard per block and on the root: every parameter Shard(0).

Methods (each in freshly spawned ranks; one-time costs are paid on a tiny file first):
  zeroload           zeroload.load_into(meta model, dir): Shard(0)/Replicate shards are
                     views of the file (read when touched), the others allocated and read.
  dcp+zeroload       model.to_empty(cpu); dcp.load(state_dict, zeroload.distributed
                     .StorageReader(dir)).
  dcp+hf             model.to_empty(cpu); dcp.load(state_dict, HuggingFaceStorageReader(dir)).
  load_file+narrow   every rank: safetensors.torch.load_file of each shard file, then
                     distribute_tensor(src_data_rank=None) (a local narrow + copy), assigned.

Per rank: wall time of the load (after a barrier) and until every local weight has been
read once (a sum per tensor, as a first forward pass reads them: CPU loads that map the
file return before reading anything; ratios compare this time), bytes read with read syscalls
(/proc/self/io rchar), bytes read from disk (read_bytes: with --cold, what each method
really pulls in, mmap page faults included; safetensors reads through mmap, which rchar
does not see), and the peak RssAnon increase (5 ms sampling thread). Afterwards every rank
checksums its local shards; all methods must agree. The page cache is warm (the files are
read just before each method, and kept resident with mlock) unless --cold evicts them
before each method.

    python benchmarks/distributed_load.py --size small --worlds 2   # a minute
    python benchmarks/distributed_load.py                           # 2.2 GB, worlds 2 and 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

MiB = 1 << 20
GB = 1e9

SIZES = {
    # name: (vocab, d, ff, layers)
    "tiny": (64, 32, 64, 1),  # one-time costs are paid on this first
    "small": (8000, 512, 1408, 4),
    "2g": (32000, 2048, 5632, 8),
}
METHODS = ["zeroload", "dcp+zeroload", "dcp+hf", "load_file+narrow"]
SHARD_BYTES = 1 << 30


# ------------------------------------------------------------------------- the model


class Block(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.gate = nn.Linear(d, ff, bias=False)
        self.up = nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)


class LM(nn.Module):
    def __init__(self, vocab: int, d: int, ff: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, ff) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


def shapes(size: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LM(*SIZES[size])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_model(directory: Path, size: str) -> int:
    """An HF safetensors shard set of random fp32 weights, written tensor by tensor."""
    import safetensors.torch

    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    part: dict[str, torch.Tensor] = {}
    files: list[tuple[str, list[str]]] = []
    total = 0

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        safetensors.torch.save_file(part, directory / name)
        files.append((name, list(part)))
        part.clear()

    for name, shape in shapes(size).items():
        t = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
        total += t.numel() * 4
        if part and sum(v.numel() * 4 for v in part.values()) + t.numel() * 4 > SHARD_BYTES:
            flush()
        part[name] = t
    flush()
    n = len(files)
    for i, (old, names) in enumerate(files):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(directory / old, directory / new)
        weight_map.update(dict.fromkeys(names, new))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def apply_plan(model: LM, plan: str, mesh: Any) -> None:
    if plan == "tp":
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        spec: dict[str, Any] = {
            "embed": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Replicate()),
        }
        for i in range(len(model.blocks)):
            for n in ("q", "k", "v", "gate", "up"):
                spec[f"blocks.{i}.{n}"] = ColwiseParallel()
            for n in ("o", "down"):
                spec[f"blocks.{i}.{n}"] = RowwiseParallel()
        parallelize_module(model, mesh, spec)
    else:
        from torch.distributed.fsdp import fully_shard

        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)


# ---------------------------------------------------------------------- measurement


def proc_io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def rss() -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes."""
    anon = file = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith("RssFile:"):
            file = int(line.split()[1]) * 1024
    return anon, file


class Sampler:
    """Peak RssAnon/RssFile over a block, sampled every 5 ms."""

    def __init__(self) -> None:
        self.base = rss()
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._note()

    def _note(self) -> None:
        a, f = rss()
        self.peak = [max(self.peak[0], a), max(self.peak[1], f)]

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._note()


# ------------------------------------------------------------------------ the methods


def run_method(method: str, model: LM, directory: Path, mesh: Any) -> None:
    import torch.distributed.checkpoint as dcp

    import zeroload
    import zeroload.distributed

    if method == "zeroload":
        zeroload.load_into(model, directory)
    elif method in ("dcp+zeroload", "dcp+hf"):
        model.to_empty(device="cpu")
        if method == "dcp+hf":
            from torch.distributed.checkpoint import HuggingFaceStorageReader

            reader: Any = HuggingFaceStorageReader(str(directory))
        else:
            reader = zeroload.distributed.StorageReader(directory)
        dcp.load(model.state_dict(), storage_reader=reader)
    elif method == "load_file+narrow":
        import safetensors.torch
        from torch.distributed.tensor import DTensor, distribute_tensor

        targets = model.state_dict(keep_vars=True)
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        for file in sorted(set(index["weight_map"].values())):
            full = safetensors.torch.load_file(directory / file)
            local = {}
            for k, t in full.items():
                want = targets[k]
                if isinstance(want, DTensor):
                    d = distribute_tensor(t, want.device_mesh, want.placements, src_data_rank=None)
                    local[k] = nn.Parameter(d, requires_grad=want.requires_grad)
                else:
                    local[k] = t
            model.load_state_dict(local, strict=False, assign=True)
            del full, local
    else:
        raise ValueError(method)


def touch(model: LM) -> None:
    """Reads every byte of every local weight once, as a first forward pass would: what
    a load that maps the file (zeroload's CPU views) leaves to be read when used."""
    for t in model.state_dict().values():
        local = t.to_local() if hasattr(t, "to_local") else t
        local.sum()


def checksum(model: LM) -> float:
    total = 0.0
    for t in model.state_dict().values():
        local = t.to_local() if hasattr(t, "to_local") else t
        total += float(local.double().sum())
    return total


def local_bytes(model: LM) -> int:
    n = 0
    for t in model.state_dict().values():
        local = t.to_local() if hasattr(t, "to_local") else t
        n += local.numel() * local.element_size()
    return n


def rank_main(rank: int, world: int, args: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    # What torchrun sets: zeroload gives each rank its share of the cores.
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    store = Path(args["work"]) / f"store-{args['tag']}"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    size, plan, method = args["size"], args["plan"], args["method"]

    # One-time costs (imports, first DTensor/DCP use) on the tiny model first.
    with torch.device("meta"):
        warm = LM(*SIZES["tiny"])
    apply_plan(warm, plan, mesh)
    run_method(method, warm, Path(args["tiny"]), mesh)

    reports = []
    for _ in range(args["repeat"]):
        with torch.device("meta"):
            model = LM(*SIZES[size])
        apply_plan(model, plan, mesh)
        # Set the page cache right before the timed block (see `Pinned`).
        if rank == 0:
            set_cache(Path(args["dir"]), args["cold"])
        dist.barrier()
        io0 = proc_io()
        with Sampler() as s:
            t0 = time.perf_counter()
            run_method(method, model, Path(args["dir"]), mesh)
            elapsed = time.perf_counter() - t0
            touch(model)
            touched = time.perf_counter() - t0
        io1 = proc_io()
        reports.append(
            {
                "time": elapsed,
                "touched": touched,
                "rchar": io1["rchar"] - io0["rchar"],
                "read_bytes": io1["read_bytes"] - io0["read_bytes"],
                "anon": s.peak[0] - s.base[0],
                "local": local_bytes(model),
                "checksum": checksum(model),
            }
        )
        del model
        gc.collect()
    report = {k: [r[k] for r in reports] for k in reports[0]}
    out = Path(args["work"]) / f"{args['tag']}-rank{rank}.json"
    out.write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


class Pinned:
    """Keeps files resident in the page cache (mmap + mlock) while the block runs.

    Some machines drop clean page-cache pages within seconds (another job writing
    /proc/sys/vm/drop_caches, proactive reclaim); pages mapped and locked by a live
    process survive that, so "warm" stays warm for every method.
    """

    def __init__(self, files: list[Path]) -> None:
        import ctypes
        import mmap

        import numpy as np

        self._libc = ctypes.CDLL(None, use_errno=True)
        self._maps = []
        self.locked = True
        for f in files:
            with open(f, "rb") as fh:
                m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
            addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
            if self._libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(m))) != 0:
                self.locked = False  # RLIMIT_MEMLOCK: fall back to reading before each run
            self._maps.append(m)

    def close(self) -> None:
        for m in self._maps:
            m.close()
        self._maps = []


def set_cache(directory: Path, cold: bool) -> None:
    """Warm: read every file once, so that all of it is in the page cache. Cold: evict
    the files' pages (posix_fadvise DONTNEED: no root needed, other files untouched)."""
    for f in sorted(directory.iterdir()):
        with open(f, "rb") as fh:
            if cold:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while fh.read(16 * MiB):
                    pass


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / MiB:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["small", "2g"], default="2g")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--plans", default="tp,fsdp2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dir", type=Path, help="where to write the model (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument(
        "--model", type=Path, help="reuse a model a --keep run generated (its model/ folder)"
    )
    ap.add_argument("--json", type=Path, help="also write the raw per-rank figures here")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="loads per method, each into fresh memory, in the same ranks (median shown)",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="evict the model's files from the page cache before each method (default: warm)",
    )
    ap.add_argument(
        "--report",
        type=Path,
        help="print the tables of a --json file written earlier (with --model for its size)",
    )
    args = ap.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        meta = saved.pop("_meta", {})
        total = meta.get("total")
        if total is None:
            index = json.loads((args.model / "model.safetensors.index.json").read_text())
            total = index["metadata"]["total_size"]
        for key, rows in saved.items():
            plan, world = key.split(" world=")
            print_table(plan, int(world), rows, total)
        return

    base = Path(tempfile.mkdtemp(prefix="zeroload-dist-", dir=args.dir))
    try:
        model_dir, tiny_dir, work = base / "model", base / "tiny", base / "work"
        for d in (model_dir, tiny_dir, work):
            d.mkdir()
        t = time.perf_counter()
        if args.model:
            model_dir = args.model
            index = json.loads((model_dir / "model.safetensors.index.json").read_text())
            total = index["metadata"]["total_size"]
        else:
            total = write_model(model_dir, args.size)
        write_model(tiny_dir, "tiny")
        print(
            f"model: {fmt_bytes(total)} in {len(list(model_dir.glob('*.safetensors')))} files "
            f"({time.perf_counter() - t:.0f} s to write)",
            flush=True,
        )
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"python {platform.python_version()}; page cache {'cold' if args.cold else 'warm'} "
            f"before each method; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        pinned = None if args.cold else Pinned(sorted(model_dir.glob("*.safetensors")))
        if pinned is not None and not pinned.locked:
            print("could not mlock the files: warming them before each method instead")
        # Every allocation of 64 KiB or more gets its own mapping, returned to the OS when
        # freed: each repeat writes into fresh pages, as a first load does (glibc would
        # otherwise recycle the previous repeat's heap and skip the page faults).
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 << 10)
        results: dict[str, Any] = {}
        for world in [int(w) for w in args.worlds.split(",")]:
            for plan in args.plans.split(","):
                rows = {}
                for method in args.methods.split(","):
                    tag = f"{plan}-w{world}-{method.replace('+', '_')}"
                    spec = dict(
                        size=args.size,
                        plan=plan,
                        method=method,
                        tag=tag,
                        dir=str(model_dir),
                        tiny=str(tiny_dir),
                        work=str(work),
                        cold=args.cold,
                        repeat=args.repeat,
                    )
                    mp.spawn(rank_main, args=(world, spec), nprocs=world, join=True)
                    rows[method] = [
                        json.loads((work / f"{tag}-rank{r}.json").read_text()) for r in range(world)
                    ]
                results[f"{plan} world={world}"] = rows
                print_table(plan, world, rows, total)
        if args.json:
            results["_meta"] = {"total": total, "cold": args.cold, "repeat": args.repeat}
            args.json.write_text(json.dumps(results, indent=1))
        if pinned is not None:
            pinned.close()
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def print_table(plan: str, world: int, rows: dict[str, list[dict]], total: int) -> None:
    """One row per method: the median over repeats of the slowest rank's time (what a job
    waits for), the median over all ranks and repeats (what one rank typically takes: on
    a busy machine one rank of a collective-free load can be descheduled while the others
    finish; DCP's final collectives make every rank wait for the slowest), and bytes and
    memory of each rank's first load (every repeat reads the same)."""
    print(f"\n### {plan}, world size {world} (file {fmt_bytes(total)})\n")
    print(
        "| method | load (slowest rank, median) | all weights read (slowest rank, median) | "
        "vs zeroload (all read) | all read (any rank, median) | "
        "read syscalls/rank (rchar) | disk reads/rank (read_bytes) | all ranks' reads / file "
        "| peak RssAnon incr. (max rank) | local shard | check |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def slowest(reps: list[dict], key: str) -> float:
        return median([max(r[key][i] for r in reps) for i in range(len(reps[0][key]))])

    ref = rows.get("zeroload") or next(iter(rows.values()))
    ref_time = slowest(ref, "touched")
    ref_sum = [r["checksum"][0] for r in ref]
    for method, reps in rows.items():
        loaded, t = slowest(reps, "time"), slowest(reps, "touched")
        typical = median([x for r in reps for x in r["touched"]])
        rchar = sum(r["rchar"][0] for r in reps) / len(reps)
        disk = sum(r["read_bytes"][0] for r in reps) / len(reps)
        # Read syscalls, or for mmap readers (no read syscalls) what came from disk.
        reads = sum(max(r["rchar"][0], r["read_bytes"][0]) for r in reps) / total
        anon = max(max(r["anon"]) for r in reps)
        local = max(r["local"][0] for r in reps)
        same = all(
            abs(a - b) <= 1e-6 * max(1.0, abs(b))
            for r, b in zip(reps, ref_sum)
            for a in r["checksum"]
        )
        print(
            f"| {method} | {loaded:.2f} s | {t:.2f} s | {t / ref_time:.2f}x | {typical:.2f} s | "
            f"{fmt_bytes(rchar)} | {fmt_bytes(disk)} | {reads:.2f}x | {fmt_bytes(anon)} | "
            f"{fmt_bytes(local)} | "
            f"{'equal' if same else 'DIFFERS'} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
