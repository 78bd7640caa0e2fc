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
from typing import Any, Dict, List, Sequence, Tuple

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


def _torch_dtype(name: str) -> Any:
    import torch

    name = name.rsplit(".", 1)[-1]
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dt


def _itemsize(name: str) -> int:
    try:
        return _torch_dtype(name).itemsize
    except ValueError:
        return 0


def _files(path: Path) -> Tuple[List[Path], Dict[str, Any] | None]:
    """The checkpoint files behind ``path`` and the shard index's metadata, if any."""
    from zeroload import _shards

    shard_set = _shards.resolve(path)
    return shard_set.files, (shard_set.metadata if shard_set.index is not None else None)


# --------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------


def inspect_checkpoint(path: os.PathLike | str) -> Dict[str, Any]:
    """Describe a checkpoint (file, shard index or directory) without reading tensor data.

    Returns a dict with ``files`` (format, size, metadata, counts per file), ``metadata``
    (the shard index's), ``tensors`` (name, dtype, shape, bytes, file) and ``totals``.
    Flat state dicts are described from the parsed header/pickle alone; nested checkpoints
    (e.g. a training checkpoint) are mapped with ``zeroload.load`` (copy-on-write mmap;
    tensor bytes are not read) to name their tensors by path (``optimizer.state.0.exp_avg``).
    """
    from zeroload import _core

    files, index_meta = _files(Path(path))
    out_files = []
    tensors: List[Dict[str, Any]] = []
    for f in files:
        ck = _core.Checkpoint.open(str(f))
        flat = ck.flat_tensors()
        storage_bytes = sum(ck.storage(i)[2] for i in range(ck.num_storages))
        out_files.append(
            {
                "path": str(f),
                "format": ck.format,
                "file_size": ck.file_size,
                "metadata": ck.metadata,
                # Names, as listed below (a tied tensor saved under two names counts twice).
                "num_tensors": len(flat) if flat is not None else ck.num_tensors,
                "num_storages": ck.num_storages,
                "storage_bytes": storage_bytes,
                "flat": flat is not None,
            }
        )
        if flat is not None:
            for name, ti in flat:
                _storage, dtype, shape, _stride, _off, _rg = ck.tensor(ti)
                numel = 1
                for d in shape:
                    numel *= int(d)
                tensors.append(
                    {
                        "name": name,
                        "dtype": dtype,
                        "shape": [int(d) for d in shape],
                        "bytes": numel * _itemsize(dtype),
                        "file": f.name,
                    }
                )
        else:
            import zeroload
            from zeroload._compare import named_tensors

            obj = zeroload.load(f)
            for name, t in named_tensors(obj):
                tensors.append(
                    {
                        "name": name,
                        "dtype": str(t.dtype).rsplit(".", 1)[-1],
                        "shape": list(t.shape),
                        "bytes": t.numel() * t.element_size(),
                        "file": f.name,
                    }
                )
    by_dtype: Dict[str, Dict[str, int]] = {}
    for t in tensors:
        d = by_dtype.setdefault(t["dtype"], {"tensors": 0, "elements": 0, "bytes": 0})
        d["tensors"] += 1
        size = _itemsize(t["dtype"])
        d["elements"] += t["bytes"] // size if size else 0
        d["bytes"] += t["bytes"]
    return {
        "path": str(path),
        "files": out_files,
        "metadata": index_meta,
        "tensors": tensors,
        "totals": {
            "tensors": len(tensors),
            "elements": sum(d["elements"] for d in by_dtype.values()),
            "bytes": sum(t["bytes"] for t in tensors),
            "file_bytes": sum(f["file_size"] for f in out_files),
            "by_dtype": by_dtype,
        },
    }


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
    print()
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
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

_SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
    "complex64": "C64",
}


def _select(obj: Any, key: str | None, src: Path) -> Dict[str, Any]:
    import torch

    if key:
        parts = [key] if isinstance(obj, dict) and key in obj else key.split(".")
        for part in parts:
            if not isinstance(obj, dict) or part not in obj:
                have = ", ".join(map(repr, list(obj)[:10])) if isinstance(obj, dict) else "-"
                raise UsageError(f"{src}: no key {key!r} (top-level keys: {have})")
            obj = obj[part]
    if not isinstance(obj, dict):
        raise UsageError(f"{src}: holds a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not all(isinstance(k, str) for k in obj):
        dicts = [k for k, v in obj.items() if isinstance(v, dict)]
        hint = f"; pick a state dict with --key (e.g. --key {dicts[0]})" if dicts else ""
        raise UsageError(
            f"{src}: not a flat dict of tensors (entries that are not tensors: "
            f"{', '.join(map(repr, bad[:5]))}){hint}"
        )
    return obj


def convert(
    src: os.PathLike | str,
    dst: os.PathLike | str,
    *,
    key: str | None = None,
    force: bool = False,
    dedupe: bool = False,
    metadata: Dict[str, str] | None = None,
) -> Dict[str, Any]:
    """Write a ``.safetensors`` file from a torch checkpoint, one tensor at a time.

    The source is mapped with ``zeroload.load`` (copy-on-write mmap, nothing is copied into
    anonymous memory), so the model is never held in RAM: each tensor's bytes go from the
    page cache to the output file; only a non-contiguous tensor is made contiguous (one
    tensor at a time). safetensors stores no aliasing, so tensors that share storage (tied
    weights) are written as separate copies, or, with ``dedupe=True``, exact aliases are
    written once and the later names dropped (as ``safetensors.torch.save_model`` does).
    Tensors are ordered by element size, largest first, so every tensor is aligned.

    Returns a summary dict (``tensors``, ``bytes``, ``shared`` groups, ``dropped`` names).
    Raises FileExistsError if ``dst`` exists and ``force`` is false.
    """
    import torch

    import zeroload

    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise UsageError("SRC and DST are the same file")
    tensors = _select(zeroload.load(src), key, src)

    # group tensors by the memory they view
    groups: Dict[Tuple[int, int, Any, Tuple[int, ...], Tuple[int, ...]], List[str]] = {}
    by_storage: Dict[int, List[str]] = {}
    for name, t in tensors.items():
        if t.is_sparse or t.layout != torch.strided:
            raise UsageError(f"{src}: tensor {name!r} has layout {t.layout}; not supported")
        if t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        by_storage.setdefault(ptr, []).append(name)
        sig = (ptr, t.storage_offset(), t.dtype, tuple(t.shape), tuple(t.stride()))
        groups.setdefault(sig, []).append(name)
    shared = [names for names in by_storage.values() if len(names) > 1]
    dropped: List[str] = []
    if dedupe:
        for names in groups.values():
            dropped.extend(names[1:])
    keep = [n for n in tensors if n not in set(dropped)]

    order = sorted(keep, key=lambda n: -tensors[n].element_size())  # stable
    header: Dict[str, Any] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        dtype = str(t.dtype).rsplit(".", 1)[-1]
        if dtype not in _SAFETENSORS_DTYPES:
            raise UsageError(f"{src}: tensor {name!r} has dtype {dtype}, which safetensors lacks")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    meta = {"format": "pt"}
    meta.update(metadata or {})
    header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    tmp = dst.with_name(dst.name + ".zeroload-tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name in order:
                t = tensors[name].detach()
                if t.numel() == 0:
                    continue
                flat = t.contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(flat.numpy()))
                del flat
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {
        "src": str(src),
        "dst": str(dst),
        "tensors": len(order),
        "bytes": offset,
        "shared": shared,
        "dropped": dropped,
    }


def _cmd_convert(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    info = convert(args.src, args.dst, key=args.key, force=args.force, dedupe=args.dedupe)
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


def _report(rows: List[Any], title: str, out: Path | None, stem: str) -> int:
    from zeroload import _compare

    print()
    print(_compare.format_table(rows, title=title))
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
    full = _gptmodel.SIZES[args.size]
    n = _gptmodel.num_parameters(cfg)
    with tempfile.TemporaryDirectory(prefix="zeroload-demo-", dir=args.tmpdir) as tmp:
        ckpt = Path(tmp) / "model.pth"
        print(f"building {full} ({n / 1e6:.0f}M parameters) and saving it ...", file=sys.stderr)
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
    title = f"{full}, {_fmt_bytes(size)} state dict, device {device}"
    return _report(
        rows, title, Path(args.out), f"zeroload-demo-{args.size}-{device.replace(':', '')}"
    )


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
    return _report(rows, title, out, f"zeroload-bench-{path.stem}-{device.replace(':', '')}")


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from zeroload import _compare, _gptmodel

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
        "time and whether the output equals the original model's; writes a PNG chart.",
    )
    d.add_argument(
        "--size",
        choices=list(_gptmodel.SIZES),
        default="small",
        help="model size (default: small, GPT-2 124M, ~0.6 GB)",
    )
    d.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    d.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="where the PNG chart and JSON results go (default: .)",
    )
    d.add_argument(
        "--methods", nargs="+", choices=list(_compare.MODEL_METHODS), help="run only these methods"
    )
    d.add_argument(
        "--tmpdir",
        default=None,
        metavar="DIR",
        help="where to write the temporary checkpoint (default: system temp)",
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
        choices=list(_gptmodel.SIZES),
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
        "chosen with --key) to safetensors, streaming from a memory map so the model is never "
        "held in RAM. Tensors sharing storage are written as separate copies (or once, with "
        "--dedupe); non-contiguous tensors are written contiguous.",
    )
    c.add_argument("src", help="the torch checkpoint (.pt, .pth, .bin)")
    c.add_argument("dst", help="the .safetensors file to write")
    c.add_argument("--force", action="store_true", help="overwrite DST if it exists")
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
