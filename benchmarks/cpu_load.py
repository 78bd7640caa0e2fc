"""CPU load benchmark: zeroload.load vs torch.load (plain and mmap=True) and safetensors.

Workloads (generated here, written under --dir, never committed):
  (a) a GPT-2 XL-sized fp32 state dict (the seed notebook's GPTModel shapes, 1558M
      parameters + causal masks, ~6.4 GB) saved as .pth and as .safetensors; --size picks a
      smaller model for quick runs. Tensors are generated and written one at a time, so the
      generator never holds two copies (it holds none: the .pth is written from a
      memory map of the .safetensors file).
  (b) a .pth holding --many (default 20,000) small tensors.

Each method runs in a fresh process (zeroload._compare); measured: time until the dict of
tensors is returned ("time-to-dict") and the peak RSS increase over that block (sampling
thread + VmHWM). Afterwards each child hashes every tensor: "equal" = bit-identical to the
first method's result. The page cache is warm (files read once before the runs) unless
--cold is given and we are root (then caches are dropped before every method).

    python benchmarks/cpu_load.py --size small     # quick (~0.6 GB)
    python benchmarks/cpu_load.py                  # GPT-2 XL, needs ~14 GB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from zeroload import _compare, _gptmodel

MiB = 1 << 20


def model_shapes(size: str) -> Dict[str, tuple]:
    """Names and shapes of the seed GPTModel's state dict, without allocating it."""
    with torch.device("meta"):
        model = _gptmodel.GPTModel(_gptmodel.config(size))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_safetensors_streaming(path: Path, shapes: Dict[str, tuple], seed: int = 0) -> None:
    """Write random fp32 weights (std 0.02; causal masks as in the model) tensor by tensor."""
    header, offset = {}, 0
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


def pth_from_safetensors(src: Path, dst: Path) -> None:
    """torch.save the tensors of ``src`` from per-tensor copy-on-write memory maps."""
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    sd = {}
    for name, h in header.items():
        start, _end = h["data_offsets"]
        arr = np.memmap(
            src, dtype=np.float32, mode="c", offset=8 + n + start, shape=tuple(h["shape"])
        )
        sd[name] = torch.from_numpy(arr)
    torch.save(sd, dst)


def write_many(path: Path, count: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(16, 512, (count,), generator=gen).tolist()
    sd = {
        f"layer{i // 10}.param{i % 10}": torch.randn(s, generator=gen) for i, s in enumerate(sizes)
    }
    torch.save(sd, path)


def read_through(path: Path) -> None:
    """Pull a file into the page cache (warm runs)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MiB):
            pass


def dropper(cold: bool):
    if not cold:
        return None
    if os.geteuid() != 0 or not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("--cold needs root (/proc/sys/vm/drop_caches): measuring with a warm cache")
        return None

    def drop(_method: str) -> None:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")

    return drop


def run(path: Path, methods: List[str], cold: bool, title: str) -> List[_compare.Row]:
    drop = dropper(cold)
    if drop is None:
        read_through(path)
    rows = _compare.compare_state_dict(path, methods=methods, before_each=drop)
    cache = "cold" if drop else "warm"
    print()
    print(_compare.format_table(rows, title=f"{title} [{cache} page cache]"))
    return rows


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="xl", choices=list(_gptmodel.SIZES), help="model size for (a)")
    p.add_argument("--many", type=int, default=20_000, help="tensor count for (b)")
    p.add_argument("--dir", default=str(Path(__file__).parent / "out"), help="where files go")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each method")
    p.add_argument("--skip", nargs="*", default=[], choices=["pth", "safetensors", "many"])
    args = p.parse_args(argv)

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}"
    )
    shapes = model_shapes(args.size)
    st = out / f"gpt2-{args.size}.safetensors"
    pth = out / f"gpt2-{args.size}.pth"
    many = out / f"many-{args.many}.pth"
    t0 = time.perf_counter()
    if not st.exists():
        print(f"writing {st} ...")
        write_safetensors_streaming(st, shapes)
    if "pth" not in args.skip and not pth.exists():
        print(f"writing {pth} ...")
        pth_from_safetensors(st, pth)
    if "many" not in args.skip and not many.exists():
        print(f"writing {many} ...")
        write_many(many, args.many)
    print(f"files ready in {time.perf_counter() - t0:.0f} s")

    results = {}
    if "pth" not in args.skip:
        results["pth"] = run(
            pth,
            ["torch_load", "torch_load_mmap", "zeroload"],
            args.cold,
            f"(a) {pth.name}: {pth.stat().st_size / 2**30:.2f} GiB, {len(shapes)} tensors",
        )
    if "safetensors" not in args.skip:
        results["safetensors"] = run(
            st,
            ["safetensors", "zeroload"],
            args.cold,
            f"(a) {st.name}: {st.stat().st_size / 2**30:.2f} GiB",
        )
    if "many" not in args.skip:
        results["many"] = run(
            many,
            ["torch_load", "torch_load_mmap", "zeroload"],
            args.cold,
            f"(b) {many.name}: {args.many} tensors",
        )

    def get(rows, m):
        return next((r for r in rows if r.method == m and r.ok), None)

    print("\ntargets (issue 2):")
    if "many" in results:
        a, b = get(results["many"], "torch_load_mmap"), get(results["many"], "zeroload")
        if a and b:
            print(
                f"  {args.many}-tensor .pth: zeroload is {a.wall_s / b.wall_s:.1f}x faster than "
                f"torch.load(mmap=True) (target >= 5x)"
            )
    for kind, peer in (("pth", "torch_load_mmap"), ("safetensors", "safetensors")):
        if kind in results:
            z, q = get(results[kind], "zeroload"), get(results[kind], peer)
            if z:
                print(
                    f"  {kind}: zeroload RSS increase {z.cpu_peak / MiB:.1f} MiB (target < 16 MiB)"
                    + (f", time-to-dict {z.wall_s:.3f} s vs {peer} {q.wall_s:.3f} s" if q else "")
                )
    dump = {k: [r.as_dict() for r in v] for k, v in results.items()}
    (out / f"cpu_load-{args.size}.json").write_text(json.dumps(dump, indent=1))
    failed = [r for rows in results.values() for r in rows if not r.ok or r.check == "differs"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
