"""``zeroload demo`` and ``zeroload bench``: what they run and print (the parser and the
dispatch are :mod:`zeroload.cli`'s)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Iterator, List

from zeroload import _shards
from zeroload._units import format_bytes
from zeroload._usage import UsageError
from zeroload.bench import MODEL_METHODS, compare, gptmodel

__all__ = ["bench", "demo"]


@contextlib.contextmanager
def _torch_cache_removed_after() -> Iterator[None]:
    """Points torch's compile cache into a temp dir removed at the end, for this process
    and the loaders it starts (unless the user chose the cache's place). torch creates the
    cache (``$TMPDIR/torchinductor_<user>``) whenever a model is built on the meta device,
    and it would outlive the run."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="zeroload-torch-cache-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"not a device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    return str(dev)


#: What to compare zeroload with, and where its gain is, printed above each table.
_FAIR_CPU = (
    "Fair CPU comparison: {peer} maps the file too, so both return before reading a weight, "
    "and their 'peak RSS at load' is before any read; compare 'peak RSS, all read' and "
    "'all read' (until every weight has been read). On the CPU zeroload gains only by "
    "parsing in Rust (files of many tensors). What only a GPU shows: one copy on the "
    "device (GPU peak = 1x the weights, where torch.load holds 2x) streamed through a small "
    "pinned buffer, never a CPU copy of the weights (host RSS within the staging budget). "
    "GPU figures: run `zeroload demo --device cuda` on a GPU machine; benchmarks/RESULTS.md "
    "records them where measured (none yet: no GPU was available when it was written)."
)
_FAIR_GPU = (
    "On a GPU, zeroload copies each storage once, file -> small pinned buffer -> GPU: "
    "compare its peak GPU memory (1x the weights) and peak CPU RSS with the others'."
)


def _fair_comparison(rows: List[Any], device: str) -> str:
    if device != "cpu":
        return _FAIR_GPU
    methods = [r.method for r in rows]
    peers = {
        "mmap_assign": "mmap_assign (torch.load(mmap=True) + assign=True)",
        "torch_load_mmap": "torch_load_mmap (torch.load(mmap=True))",
        "safetensors": "safetensors (safetensors.torch.load_file)",
    }
    peer = next((text for m, text in peers.items() if m in methods), None)
    if peer is None:
        peer = "torch.load(mmap=True) + assign=True"
    return _FAIR_CPU.format(peer=peer)


def _report(rows: List[Any], title: str, out: Path | None, stem: str, device: str) -> int:
    print()
    print(textwrap.fill(_fair_comparison(rows, device), width=100))
    print()
    print(compare.format_table(rows, title=title))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps([r.as_dict() for r in rows], indent=1))
        if any(r.ok for r in rows):
            png = compare.plot(rows, out / f"{stem}.png", title=title)
            print(f"\nchart: {png}")
    zl = [r for r in rows if r.method == "zeroload"]
    if any(not r.ok or r.check.startswith("differs") for r in zl):
        print("zeroload failed or gave a different result (see the table)", file=sys.stderr)
        return 1
    return 0


@_torch_cache_removed_after()
def demo(args: argparse.Namespace) -> int:
    """``zeroload demo``: build and save the seed's GPTModel, then load it every way."""
    import torch

    device = _check_device(args.device)
    cfg = gptmodel.config(args.size)
    label = gptmodel.describe(args.size)
    with tempfile.TemporaryDirectory(prefix="zeroload-demo-", dir=args.tmpdir) as tmp:
        ckpt = Path(tmp) / "model.pth"
        print(f"building a GPTModel, {label}, and saving it ...", file=sys.stderr)
        torch.manual_seed(123)
        model = gptmodel.GPTModel(cfg).eval()
        torch.save(model.state_dict(), ckpt)
        ref = compare.make_reference(model, Path(tmp) / "reference.pt")
        del model
        size = ckpt.stat().st_size
        count = len(args.methods or MODEL_METHODS)
        times = f", {args.repeat} times each" if args.repeat > 1 else ""
        print(
            f"saved {ckpt.name}: {format_bytes(size)}; loading it {count} ways{times} ...",
            file=sys.stderr,
        )
        rows = compare.compare_model(
            ckpt,
            cfg,
            device=device,
            methods=args.methods,
            reference=ref,
            workdir=tmp,
            repeat=args.repeat,
        )
    title = f"GPTModel, {label}: {format_bytes(size)} state dict, device {device}"
    out = Path(args.out) if args.out else None
    stem = f"zeroload-demo-{args.size}-{device.replace(':', '')}"
    return _report(rows, title, out, stem, device)


@_torch_cache_removed_after()
def bench(args: argparse.Namespace) -> int:
    """``zeroload bench PATH``: load the user's checkpoint every way."""
    device = _check_device(args.device)
    path = Path(args.path)
    if not path.exists():
        raise _shards.not_found(path)
    if args.model:
        rows = compare.compare_model(
            path, args.model, device=device, methods=args.methods, repeat=args.repeat
        )
        title = f"{path.name} as {args.model}, device {device}"
    else:
        rows = compare.compare_state_dict(
            path, device=device, methods=args.methods, repeat=args.repeat
        )
        title = f"{path.name} (state dict), device {device}"
    out = Path(args.out) if args.out else None
    stem = f"zeroload-bench-{path.stem}-{device.replace(':', '')}"
    return _report(rows, title, out, stem, device)
