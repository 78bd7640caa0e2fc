"""The ``zeroload`` command line: ``demo``, ``bench``, ``inspect`` and ``convert``.

Run ``zeroload --help`` or ``python -m zeroload --help``. :func:`main` takes an argument list
and returns the exit status, so it can be called from Python too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

__all__ = ["main"]


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def inspect_checkpoint(path: os.PathLike | str) -> Dict[str, Any]:
    """See :func:`zeroload._inspect.inspect_checkpoint` (kept here for existing callers)."""
    from zeroload._inspect import inspect_checkpoint as inspect

    return inspect(path)


def _print_inspect(info: Dict[str, Any]) -> None:
    for f in info["files"]:
        print(
            f"{f['path']}: {f['format']}, {_fmt_bytes(f['file_size'])}, "
            f"{f['num_tensors']} tensors in {f['num_storages']} storages"
        )
        if f["metadata"]:
            print(f"  metadata: {json.dumps(f['metadata'], sort_keys=True)}")
    if info["metadata"]:
        print(f"index metadata: {json.dumps(info['metadata'], sort_keys=True)}")
    rows = [
        (t["name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]", _fmt_bytes(t["bytes"]))
        for t in info["tensors"]
    ]
    multi = len(info["files"]) > 1
    if multi:
        rows = [(*r, t["file"]) for r, t in zip(rows, info["tensors"])]
    headers = ("name", "dtype", "shape", "bytes") + (("file",) if multi else ())
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["", "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")  # one write: 100k rows print in a blink
    tot = info["totals"]
    print()
    print("totals by dtype:")
    for dtype, d in sorted(tot["by_dtype"].items(), key=lambda kv: -kv[1]["bytes"]):
        print(
            f"  {dtype:<14} {d['tensors']:>7} tensors  {d['elements']:>15,} elements  "
            f"{_fmt_bytes(d['bytes']):>10}"
        )
    print(
        f"total: {tot['tensors']} tensors, {tot['elements']:,} elements, "
        f"{_fmt_bytes(tot['bytes'])} of tensor data ({_fmt_bytes(tot['file_bytes'])} on disk)"
    )


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.path)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_inspect(info)
    return 0


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------


def convert(src: os.PathLike | str, dst: os.PathLike | str, **options: Any) -> Dict[str, Any]:
    """See :func:`zeroload._convert.convert` (kept here for existing callers)."""
    from zeroload._convert import convert as _convert

    return _convert(src, dst, **options)


def _cmd_convert(args: argparse.Namespace) -> int:
    from zeroload._convert import ConvertError

    t0 = time.perf_counter()
    try:
        info = convert(args.src, args.dst, key=args.key, force=args.force, dedupe=args.dedupe)
    except ConvertError as e:
        raise UsageError(str(e)) from None
    for names in info["shared"]:
        what = "kept once, later names dropped" if args.dedupe else "written as separate copies"
        print(
            f"note: {len(names)} tensors share storage ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}): {what}",
            file=sys.stderr,
        )
    if info["dropped"]:
        print(f"note: dropped aliases: {', '.join(info['dropped'])}", file=sys.stderr)
    print(
        f"wrote {info['dst']}: {info['tensors']} tensors, {_fmt_bytes(info['bytes'])} "
        f"in {time.perf_counter() - t0:.2f} s"
    )
    return 0


# --------------------------------------------------------------------------------------
# demo and bench
# --------------------------------------------------------------------------------------


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


#: What to compare zeroload with, and where its gain is, printed under each table.
_FAIR_CPU = (
    "Fair CPU comparison: {peer} maps the file too, so both return before reading a weight "
    "(their peak RSS is before any read); compare 'all read', the time until every weight "
    "has been read. On the CPU zeroload gains only by parsing in Rust (files of many tensors); "
    "its real gain is on a GPU: one copy on the device, streamed through a small pinned "
    "buffer, never a CPU copy of the weights."
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
    import textwrap

    from zeroload import _compare

    print()
    print(_compare.format_table(rows, title=title))
    print()
    print(textwrap.fill(_fair_comparison(rows, device), width=100))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps([r.as_dict() for r in rows], indent=1))
        if any(r.ok for r in rows):
            png = _compare.plot(rows, out / f"{stem}.png", title=title)
            print(f"\nchart: {png}")
    zl = [r for r in rows if r.method == "zeroload"]
    if any(not r.ok or r.check.startswith("differs") for r in zl):
        print("zeroload failed or gave a different result (see the table)", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from zeroload import _compare, _gptmodel

    device = _check_device(args.device)
    cfg = _gptmodel.config(args.size)
    label = _gptmodel.describe(args.size)
    with tempfile.TemporaryDirectory(prefix="zeroload-demo-", dir=args.tmpdir) as tmp:
        ckpt = Path(tmp) / "model.pth"
        print(f"building a GPTModel, {label}, and saving it ...", file=sys.stderr)
        torch.manual_seed(123)
        model = _gptmodel.GPTModel(cfg).eval()
        torch.save(model.state_dict(), ckpt)
        ref = _compare.make_reference(model, Path(tmp) / "reference.pt")
        del model
        size = ckpt.stat().st_size
        count = len(args.methods or _compare.MODEL_METHODS)
        print(
            f"saved {ckpt.name}: {_fmt_bytes(size)}; loading it {count} ways ...",
            file=sys.stderr,
        )
        rows = _compare.compare_model(
            ckpt, cfg, device=device, methods=args.methods, reference=ref, workdir=tmp
        )
    title = f"GPTModel, {label}: {_fmt_bytes(size)} state dict, device {device}"
    out = Path(args.out) if args.out else None
    stem = f"zeroload-demo-{args.size}-{device.replace(':', '')}"
    return _report(rows, title, out, stem, device)


def _cmd_bench(args: argparse.Namespace) -> int:
    from zeroload import _compare

    device = _check_device(args.device)
    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if args.model:
        rows = _compare.compare_model(path, args.model, device=device, methods=args.methods)
        title = f"{path.name} as {args.model}, device {device}"
    else:
        rows = _compare.compare_state_dict(path, device=device, methods=args.methods)
        title = f"{path.name} (state dict), device {device}"
    out = Path(args.out) if args.out else None
    stem = f"zeroload-bench-{path.stem}-{device.replace(':', '')}"
    return _report(rows, title, out, stem, device)


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


#: ``zeroload._gptmodel.SIZES``, spelled out so that building the parser imports no torch
#: (tests/test_cli.py checks they agree).
_SIZES = ("tiny", "small", "medium", "large", "xl")


def _parser() -> argparse.ArgumentParser:
    # Nothing here may import torch: `zeroload --help` and `zeroload inspect` start in a
    # fraction of its import time. _compare imports torch only inside its functions.
    from zeroload import _compare

    p = argparse.ArgumentParser(
        prog="zeroload",
        description="Load PyTorch checkpoints into CPU/GPU tensors without holding them in RAM.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser(
        "demo",
        help="save a GPT-2-style model and compare loading recipes (fresh process each)",
        description="Build the seed notebook's GPTModel, save it with torch.save, then load it "
        "with each recipe (baseline, sequential, meta, mmap+assign, per-tensor files) and with "
        "zeroload, each in a fresh process. Prints peak CPU RSS, peak GPU memory (with CUDA), "
        "the time to load and the time until every weight has been read, and whether the "
        "output equals the original model's. The checkpoint lives in a temporary directory "
        "that is removed at the end; --out DIR also writes a PNG chart and the JSON results.",
    )
    d.add_argument(
        "--size",
        choices=_SIZES,
        default="small",
        help="model size: GPT-2's configs (default: small, 163M parameters with the "
        "untied output head, a 0.65 GB file)",
    )
    d.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    d.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="also write a PNG chart and JSON results here (default: write no files)",
    )
    d.add_argument(
        "--methods", nargs="+", choices=list(_compare.MODEL_METHODS), help="run only these methods"
    )
    d.add_argument(
        "--tmpdir",
        default=None,
        metavar="DIR",
        help="where to write the temporary checkpoint, removed at the end "
        "(default: the system temp directory)",
    )
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser(
        "bench",
        help="compare loading methods on your checkpoint (fresh process each)",
        description="Compare loaders on PATH, each in a fresh process. Without --model, loads "
        "the state dict itself: torch.load, torch.load(mmap=True), safetensors.load_file "
        "(.safetensors) and zeroload.load; 'check' compares a digest of every tensor. With "
        "--model SIZE, PATH is a GPTModel state dict and the seed notebook's recipes run.",
    )
    b.add_argument("path", help="a checkpoint file, shard index or model directory")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    b.add_argument(
        "--model",
        choices=_SIZES,
        help="PATH holds the state dict of the demo's GPTModel of this size",
    )
    b.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(set(_compare.MODEL_METHODS) | set(_compare.STATE_DICT_METHODS)),
        help="run only these methods",
    )
    b.add_argument("--out", metavar="DIR", help="also write a PNG chart and JSON results here")
    b.set_defaults(func=_cmd_bench)

    i = sub.add_parser(
        "inspect",
        help="list tensors, dtypes, shapes and sizes (reads no tensor data)",
        description="Describe a checkpoint file, shard index or model directory: tensor "
        "names, dtypes, shapes, bytes, totals per dtype, format and metadata.",
    )
    i.add_argument("path", help="a checkpoint file, shard index or model directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_cmd_inspect)

    c = sub.add_parser(
        "convert",
        help="write a .safetensors file from a torch checkpoint, tensor by tensor",
        description="Convert a torch checkpoint (a flat dict of tensors, or one inside it "
        "chosen with --key), a shard set or a safetensors file to one safetensors file, "
        "copying tensor by tensor through a small buffer so the model is never held in RAM "
        "(and without importing torch). Tensors sharing storage are written as separate "
        "copies (or once, with --dedupe); non-contiguous tensors are written contiguous.",
    )
    c.add_argument("src", help="the checkpoint (.pt, .pth, .bin, shard index or directory)")
    c.add_argument("dst", help="the .safetensors file to write")
    c.add_argument(
        "--force",
        action="store_true",
        help="overwrite DST if it exists, and allow a DST not named *.safetensors",
    )
    c.add_argument("--key", help="convert SRC[KEY] (e.g. state_dict, or model.state_dict)")
    c.add_argument(
        "--dedupe",
        action="store_true",
        help="write tensors that are exact aliases (tied weights) once",
    )
    c.set_defaults(func=_cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``zeroload`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 1 when loading failed or a file is missing,
    malformed or already exists, 2 for usage errors.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `zeroload inspect big.pth | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except UsageError as e:
        print(f"zeroload {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as e:  # CheckpointError is a ValueError
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
            msg = f"{e.filename}: {e.strerror or e}"
        print(f"zeroload {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
