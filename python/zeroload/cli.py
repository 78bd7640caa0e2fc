"""The ``zeroload`` command line: ``demo``, ``bench``, ``inspect`` and ``convert``.

Run ``zeroload --help`` or ``python -m zeroload --help``. :func:`main` takes an argument list
and returns the exit status, so it can be called from Python too.

This module is the parser and the dispatch only; each command's work lives in a library
module imported when the command runs: ``inspect`` in :mod:`zeroload._inspect`
(:func:`~zeroload._inspect.inspect_checkpoint`), ``convert`` in :mod:`zeroload._convert`
(:func:`~zeroload._convert.convert`), ``demo`` and ``bench`` in :mod:`zeroload.bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from zeroload._usage import (
    EXIT_CHECKPOINT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
)

__all__ = ["main"]


# --------------------------------------------------------------------------------------
# commands: each runs in the module that does the work, imported only when it runs
# --------------------------------------------------------------------------------------


def _cmd_inspect(args: argparse.Namespace) -> int:
    from zeroload._inspect import format_inspect, inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_inspect(info))  # one write: 100k rows print in a blink
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from zeroload._convert import ConvertError, convert
    from zeroload._units import format_bytes, plural

    t0 = time.perf_counter()
    try:
        info = convert(args.src, args.dst, key=args.key, force=args.force, dedupe=args.dedupe)
    except (ConvertError, FileExistsError) as e:  # fixed by other arguments: usage
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
        f"wrote {info['dst']}: {plural(info['tensors'], 'tensor')}, {format_bytes(info['bytes'])} "
        f"in {time.perf_counter() - t0:.2f} s"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from zeroload.bench import commands

    return commands.demo(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from zeroload.bench import commands

    return commands.bench(args)


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    # Nothing here may import torch: `zeroload --help` and `zeroload inspect` start in a
    # fraction of its import time. `zeroload.bench` itself holds only names.
    from zeroload import bench

    p = argparse.ArgumentParser(
        prog="zeroload",
        description="Load PyTorch checkpoints into CPU/GPU tensors without holding them in RAM.",
        epilog="Exit status: 0 done, 1 checkpoint error (missing, malformed or refused file, "
        "or loading failed), 2 usage error (bad option or value), 130 interrupted.",
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
        choices=list(bench.SIZES),
        default="small",
        help="model size: GPT-2's configs (default: small, {:.0f}M parameters with the "
        "untied output head, a {:.2f} GB file)".format(
            bench.parameter_count(bench.CONFIGS[bench.SIZES["small"]]) / 1e6,
            bench.checkpoint_bytes(bench.CONFIGS[bench.SIZES["small"]]) / 1e9,
        ),
    )
    d.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    d.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="also write a PNG chart and JSON results here (default: write no files)",
    )
    d.add_argument(
        "--methods", nargs="+", choices=list(bench.MODEL_METHODS), help="run only these methods"
    )
    d.add_argument(
        "--tmpdir",
        default=None,
        metavar="DIR",
        help="where to write the temporary checkpoint, removed at the end "
        "(default: the system temp directory)",
    )
    d.add_argument(
        "--repeat",
        type=_positive_int,
        default=3,
        metavar="N",
        help="run every method N times, each in a fresh process, and print medians with "
        "their range; a ratio only where ranges do not overlap (default: 3)",
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
        choices=list(bench.SIZES),
        help="PATH holds the state dict of the demo's GPTModel of this size",
    )
    b.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(set(bench.MODEL_METHODS) | set(bench.STATE_DICT_METHODS)),
        help="run only these methods",
    )
    b.add_argument("--out", metavar="DIR", help="also write a PNG chart and JSON results here")
    b.add_argument(
        "--repeat",
        type=_positive_int,
        default=3,
        metavar="N",
        help="run every method N times, each in a fresh process, and print medians with "
        "their range; a ratio only where ranges do not overlap (default: 3)",
    )
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

    Returns the exit status, one convention for every command (:mod:`zeroload._usage`):
    0 on success; 1 for a checkpoint error (a file missing, unreadable, malformed or
    refused, or loading failed); 2 for a usage error (a bad option or value, or a request
    that other arguments would fix, such as ``convert`` onto an existing file without
    ``--force``); 130 when interrupted.
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
        return EXIT_OK
    except UsageError as e:
        print(f"zeroload {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, KeyError) as e:  # CheckpointError is a ValueError
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
            msg = f"{e.filename}: {e.strerror or e}"
        print(f"zeroload {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
