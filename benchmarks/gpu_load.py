"""GPU load benchmark: the seed notebook's table on GPT-2 XL, with zeroload added.

Loads the seed's GPTModel state dict (random fp32 weights in GPT-2 XL shapes, ~6.4 GB;
--size for smaller) onto the GPU with each recipe of "Memory-efficient Model Weight Loading"
(baseline, sequential, meta, mmap+assign, per-tensor files) and with zeroload, each in a
fresh process (zeroload.bench.compare). Reports peak CPU RSS increase, peak GPU memory
(torch.cuda.max_memory_allocated and device-level used memory), time, and whether the
model's output equals a plain torch.load model's on the same GPU. Writes a PNG and JSON.

    python benchmarks/gpu_load.py                 # GPT-2 XL on cuda:0
    python benchmarks/gpu_load.py --size small    # quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_load import (
    model_shapes,
    pth_from_safetensors,
    warm_page_cache,
    write_safetensors_streaming,
)

from zeroload import bench
from zeroload.bench import compare


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="xl", choices=list(bench.SIZES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dir", default=str(Path(__file__).parent / "out"))
    p.add_argument("--methods", nargs="+", choices=list(bench.MODEL_METHODS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_load.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "for the CPU comparison run benchmarks/cpu_load.py or `zeroload demo`."
        )
        return 2
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    st = out / f"gpt2-{args.size}.safetensors"
    pth = out / f"gpt2-{args.size}.pth"
    shapes = model_shapes(args.size)
    if not st.exists():
        print(f"writing {st} ...")
        write_safetensors_streaming(st, shapes)
    if not pth.exists():
        print(f"writing {pth} ...")
        pth_from_safetensors(st, pth, list(shapes))
    warm_page_cache(pth)
    name = torch.cuda.get_device_name(args.device)
    rows = compare.compare_model(pth, args.size, device=args.device, methods=args.methods)
    title = (
        f"{bench.SIZES[args.size]}, {pth.stat().st_size / 2**30:.2f} GiB .pth -> "
        f"{name} [warm page cache]"
    )
    print()
    print(compare.format_table(rows, title=title))
    stem = f"gpu_load-{args.size}"
    (out / f"{stem}.json").write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    print(f"\nchart: {compare.plot(rows, out / f'{stem}.png', title=title)}")
    return 0 if all(r.ok for r in rows if r.method == "zeroload") else 1


if __name__ == "__main__":
    sys.exit(main())
