"""Hostile input: every malformed, truncated or malicious file ends in an exception.

Each category of files is loaded in one child process (a crash there, by a signal or a
Rust panic, fails the category instead of killing pytest). The child prints one JSON line
per file; the parent checks that every failure is a `zeroload.CheckpointError` (or
FileNotFoundError / PermissionError) naming the file, and that no payload ran (a sentinel
file the payloads try to create never appears).
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

# Runs in the child: argv[1] is a JSON list of [label, path, mode]. Modes: "load" (must
# fail), "load_or_ok" (may load; a loaded result is walked and every tensor read), "open"
# (zeroload.open then keys()/get_tensor on each key; must fail).
CHILD = r"""
import json, sys
import torch, zeroload

def walk(obj, seen=None):
    if isinstance(obj, torch.Tensor):
        obj.clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            walk(v)

for label, path, mode in json.loads(open(sys.argv[1]).read()):
    out = {"label": label, "path": path, "mode": mode}
    try:
        if mode == "open":
            with zeroload.open(path) as f:
                for k in f.keys():
                    f.get_tensor(k).clone()
        else:
            walk(zeroload.load(path))
        out["ok"] = True
    except BaseException as e:
        out["ok"] = False
        out["type"] = type(e).__module__ + "." + type(e).__qualname__
        out["checkpoint_error"] = isinstance(e, zeroload.CheckpointError)
        out["allowed"] = isinstance(
            e, (zeroload.CheckpointError, FileNotFoundError, PermissionError)
        )
        out["msg"] = str(e)[:2000]
    print(json.dumps(out), flush=True)
"""


def run_category(tmp_path: Path, category: str, cases: list[tuple[str, Path, str]]) -> list[dict]:
    """Loads every case in one child process; fails naming the category if it dies."""
    spec = tmp_path / f"{category}.json"
    spec.write_text(json.dumps([[label, str(p), mode] for label, p, mode in cases]))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(spec)],
        capture_output=True,
        text=True,
        timeout=600,  # hang guard only, far above the few seconds a category takes
        cwd=tmp_path,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        last = lines[-1]["label"] if lines else "(none)"
        nxt = cases[len(lines)][0] if len(lines) < len(cases) else "(after the last case)"
        how = (
            f"killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited {proc.returncode}"
        )
        pytest.fail(
            f"category {category!r}: child {how} after {len(lines)}/{len(cases)} cases "
            f"(last done {last!r}, next {nxt!r})\nstderr:\n{proc.stderr[-4000:]}"
        )
    assert len(lines) == len(cases), proc.stderr[-4000:]
    return lines


def check_failures(results: list[dict], *, may_load: bool = False) -> None:
    bad = []
    for r in results:
        if r["ok"]:
            if not may_load and r["mode"] != "load_or_ok":
                bad.append(f"{r['label']}: loaded without an error")
            continue
        if not r["allowed"]:
            bad.append(f"{r['label']}: {r['type']}: {r['msg'][:300]}")
        elif r["checkpoint_error"] and r["path"] not in r["msg"]:
            bad.append(f"{r['label']}: message does not name the file: {r['msg'][:300]}")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- real files


def real_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lin = torch.randn(8, 4, generator=g)
    return {
        "embed.weight": torch.randn(16, 4, generator=g),
        "lin.weight": lin,
        "lin.bias": torch.arange(8, dtype=torch.int64),
        "head.weight": lin,  # tied
        "norm.weight": torch.ones(4, dtype=torch.bfloat16),
        "view": torch.randn(6, 6, generator=g)[1:, ::2],
    }


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("real")
    pth = d / "model.pth"
    torch.save(real_state_dict(), pth)
    st = d / "model.safetensors"
    sd = {k: v.contiguous().clone() for k, v in real_state_dict().items() if k != "head.weight"}
    save_file(sd, st, metadata={"format": "pt"})
    return {"pth": pth, "safetensors": st}


def test_real_files_load(real_files: dict[str, Path], tmp_path: Path) -> None:
    # The control: the undamaged files load, so failures below come from the damage.
    res = run_category(tmp_path, "control", [(k, p, "load_or_ok") for k, p in real_files.items()])
    assert all(r["ok"] for r in res), res


# ----------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_truncation(real_files: dict[str, Path], tmp_path: Path, kind: str) -> None:
    data = real_files[kind].read_bytes()
    points = sorted({round(i * (len(data) - 1) / 63) for i in range(64)})
    cases = []
    for n in points:
        p = tmp_path / f"trunc_{n}.{kind}"
        p.write_bytes(data[:n])
        cases.append((f"{kind} truncated to {n}/{len(data)} bytes", p, "load"))
    check_failures(run_category(tmp_path, f"truncation-{kind}", cases))


# ----------------------------------------------------------------------------- byte flips


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_random_flips(real_files: dict[str, Path], tmp_path: Path, kind: str) -> None:
    data = real_files[kind].read_bytes()
    rng = random.Random(f"flips-{kind}")
    cases = []
    for i in range(200):
        buf = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            pos = rng.randrange(len(buf))
            buf[pos] = (
                rng.randrange(256) if rng.random() < 0.5 else buf[pos] ^ (1 << rng.randrange(8))
            )
        p = tmp_path / f"flip_{i}.{kind}"
        p.write_bytes(bytes(buf))
        cases.append((f"{kind} flips #{i}", p, "load_or_ok"))
    results = run_category(tmp_path, f"flips-{kind}", cases)
    check_failures(results, may_load=True)
    # Most flips land in tensor data and load; the damage must have been caught sometimes,
    # or this test checks nothing.
    assert any(not r["ok"] for r in results)


# ----------------------------------------------------------------------------- safetensors


def st_file(header: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


SAFETENSORS_LIES: dict[str, bytes] = {
    "huge header length": st_file(b'{"a":1}', length=1 << 62),
    "header length u64 max": st_file(b'{"a":1}', length=(1 << 64) - 1),
    "header length past the end": st_file(b'{"a":1}', length=4096),
    "header length 100 MB": st_file(b'{"a":1}', length=100_000_000),
    "bad JSON": st_file(b'{"w": {"dtype": "F32", "shape": [1], '),
    "JSON not an object": st_file(b"{}" + b"]" * 6),
    "non-UTF-8 name": st_file(
        b'{"\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4
    ),
    "non-UTF-8 dtype": st_file(
        b'{"w": {"dtype": "F\xc332", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4
    ),
    "offsets past data": st_file(
        {"w": {"dtype": "F32", "shape": [256], "data_offsets": [0, 1024]}}, b"\0" * 16
    ),
    "offsets reversed": st_file(
        {"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, b"\0" * 16
    ),
    "offsets negative": st_file(
        {"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 16
    ),
    "offsets u64 max": st_file(
        {"w": {"dtype": "U8", "shape": [1], "data_offsets": [2**64 - 1, 2**64]}}, b"\0"
    ),
    "overlapping tensors": st_file(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "gap between tensors": st_file(
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
        b"\0" * 12,
    ),
    "shape disagrees with offsets": st_file(
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "overflowing shape": st_file(
        {"w": {"dtype": "F32", "shape": [2**62, 2**62, 16], "data_offsets": [0, 0]}}
    ),
    "overflowing shape times dtype": st_file(
        {"w": {"dtype": "F64", "shape": [2**61 + 1], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "negative shape": st_file(
        {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "unknown dtype": st_file(
        {"w": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "dtype not a string": st_file(
        {"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "metadata not strings": st_file(
        {"__metadata__": {"a": [1, 2]}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
        b"\0",
    ),
    "trailing bytes after data": st_file(
        {"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0" * 9
    ),
    "deeply nested JSON": st_file(b"{" + b'"a":[' * 100_000 + b"]" * 100_000 + b"}"),
    # Empty, so no byte is out of bounds, but torch cannot hold the sizes (was a TypeError).
    "empty tensor, size past int64": st_file(
        {"w": {"dtype": "F32", "shape": [0, 2**63 + 5], "data_offsets": [0, 0]}}
    ),
    "empty tensor, sizes overflow int64 together": st_file(
        {"w": {"dtype": "F32", "shape": [2**62, 0, 4], "data_offsets": [0, 0]}}
    ),
}


def test_safetensors_header_lies(tmp_path: Path) -> None:
    cases = []
    for i, (label, blob) in enumerate(SAFETENSORS_LIES.items()):
        p = tmp_path / f"lie_{i}.safetensors"
        p.write_bytes(blob)
        cases.append((label, p, "load"))
        cases.append((label + " (open)", p, "open"))
    check_failures(run_category(tmp_path, "safetensors-lies", cases))


# ----------------------------------------------------------------------------- zip tricks


def zip_entries(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def write_zip(
    path: Path,
    entries: list[tuple[str, bytes]],
    compress: dict[str, int] | None = None,
) -> Path:
    import warnings

    compress = compress or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for name, data in entries:
                z.writestr(zipfile.ZipInfo(name), data, compress_type=compress.get(name))
    return path


def set_encrypted_flag(blob: bytes, name: str) -> bytes:
    """Sets general-purpose bit 0 (encrypted) of `name` in local and central headers."""
    buf = bytearray(blob)
    enc = name.encode()
    hits = 0
    for sig, name_len_at, flags_at, header in (
        (b"PK\x03\x04", 26, 6, 30),
        (b"PK\x01\x02", 28, 8, 46),
    ):
        pos = buf.find(sig)
        while pos != -1:
            (n,) = struct.unpack_from("<H", buf, pos + name_len_at)
            if bytes(buf[pos + header : pos + header + n]) == enc:
                buf[pos + flags_at] |= 1
                hits += 1
            pos = buf.find(sig, pos + 4)
    assert hits == 2, hits
    return bytes(buf)


@pytest.fixture(scope="module")
def torch_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("zip") / "model.pth"
    torch.save({"w": torch.arange(16, dtype=torch.float32), "b": torch.ones(3)}, p)
    return p


def test_zip_tricks(torch_zip: Path, tmp_path: Path) -> None:
    entries = zip_entries(torch_zip)
    names = [n for n, _ in entries]
    pkl = next(n for n in names if n.endswith("/data.pkl"))
    prefix = pkl[: -len("data.pkl")]
    data0 = prefix + "data/0"
    assert data0 in names

    def replace(name: str, data: bytes | None) -> list[tuple[str, bytes]]:
        out = [(n, d) for n, d in entries if n != name]
        return out if data is None else [*out, (name, data)]

    cases: dict[str, Path] = {}

    def add(label: str, ents: list[tuple[str, bytes]], **kw: object) -> None:
        cases[label] = write_zip(tmp_path / f"zip_{len(cases)}.pth", ents, **kw)

    # The rewrite itself is faithful: the control (rewritten, unchanged) loads.
    control = write_zip(tmp_path / "zip_control.pth", entries)
    add("deflated storage record", entries, compress={data0: zipfile.ZIP_DEFLATED})
    add("deflated data.pkl", entries, compress={pkl: zipfile.ZIP_DEFLATED})
    add("bzip2 storage record", entries, compress={data0: zipfile.ZIP_BZIP2})
    add("duplicate data.pkl", [*entries, (pkl, entries[names.index(pkl)][1])])
    add("duplicate storage record", [*entries, (data0, b"\0" * 4)])
    add("two archives", [*entries, ("other/data.pkl", entries[names.index(pkl)][1])])
    add("missing storage record", replace(data0, None))
    add("byteorder big", replace(prefix + "byteorder", b"big"))
    add("byteorder garbage", replace(prefix + "byteorder", b"\xff" * 200))
    add("data.pkl missing", replace(pkl, None))
    add("data.pkl empty", replace(pkl, b""))
    add("record shorter than its storage", replace(data0, b"\0" * 7))
    add("record empty", replace(data0, b""))
    add("no entries", [])
    enc = tmp_path / "zip_encrypted_record.pth"
    enc.write_bytes(set_encrypted_flag(control.read_bytes(), data0))
    cases["encrypted flag on a storage record"] = enc
    enc2 = tmp_path / "zip_encrypted_pkl.pth"
    enc2.write_bytes(set_encrypted_flag(control.read_bytes(), pkl))
    cases["encrypted flag on data.pkl"] = enc2

    run = [("control", control, "load_or_ok")]
    for label, p in cases.items():
        run.append((label, p, "load"))
        run.append((label + " (open)", p, "open"))
    results = run_category(tmp_path, "zip-tricks", run)
    assert results[0]["ok"], results[0]
    check_failures(results[1:])


# ----------------------------------------------------------------------------- pickles

SENTINEL_NAME = "ZEROLOAD_PWNED"


def uni(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def call(module: str, name: str, *args: bytes) -> bytes:
    """GLOBAL module.name, then REDUCE with a tuple of already-encoded args."""
    return b"c" + f"{module}\n{name}\n".encode() + b"(" + b"".join(args) + b"tR"


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple:
        return (os.system, (self.cmd,))


class _Plain:
    def __init__(self) -> None:
        self.x = 1


def hostile_pickles(sentinel: Path) -> dict[str, bytes]:
    cmd = f"touch {sentinel}"
    py = f"open({str(sentinel)!r}, 'w').write('x')"
    p2 = b"\x80\x02"
    wrap = lambda body: p2 + body + b"."  # noqa: E731
    big_nest = b"]" * 100_000 + b"a" * 99_999
    laughs = b"]q\x00" + b"".join(
        b"(" + (b"h" + bytes([i])) * 10 + b"lq" + bytes([i + 1]) for i in range(40)
    )
    return {
        "os.system": wrap(call("os", "system", uni(cmd))),
        "posix.system": wrap(call("posix", "system", uni(cmd))),
        "subprocess.call": wrap(call("subprocess", "call", uni(cmd), b"\x88")),
        "builtins.eval": wrap(call("builtins", "eval", uni(py))),
        "__builtin__.eval (protocol 2 name)": wrap(call("__builtin__", "eval", uni(py))),
        "builtins.exec": wrap(call("builtins", "exec", uni(py))),
        "getattr chain": wrap(
            b"cbuiltins\ngetattr\n("
            + call("builtins", "__import__", uni("os"))
            + uni("system")
            + b"tR("
            + uni(cmd)
            + b"tR"
        ),
        "getattr on an allowed global": wrap(
            call("builtins", "getattr", b"ccollections\nOrderedDict\n", uni("__init__"))
        ),
        "STACK_GLOBAL os.system": b"\x80\x04"
        + b"\x8c\x02os\x8c\x06system\x93"
        + b"\x8c"
        + bytes([len(cmd)])
        + cmd.encode()
        + b"\x85R.",
        "__reduce__ of an arbitrary class": pickle.dumps(_Evil(cmd), protocol=2),
        "__reduce__ of an arbitrary class (protocol 4)": pickle.dumps(_Evil(cmd), protocol=4),
        "arbitrary class instance": pickle.dumps(_Plain(), protocol=2),
        "copyreg._reconstructor": pickle.dumps(_Plain(), protocol=1),
        "copyreg._reconstructor by hand": wrap(
            b"ccopyreg\n_reconstructor\n(cos\n_wrap_close\ncbuiltins\nobject\nNtR"
        ),
        "INST opcode": b"(" + uni(cmd) + b"ios\nsystem\n.",
        "OBJ opcode": b"(cos\nsystem\n" + uni(cmd) + b"o.",
        "EXT1 copyreg extension": wrap(b"\x82\x01"),
        "PERSID text": wrap(b"Pfoo\n"),
        "BINGET unset index": wrap(b"h\x05"),
        "LONG_BINGET 2^31": wrap(b"j" + struct.pack("<I", 1 << 31)),
        "GET unset index (text)": wrap(b"g7\n"),
        "billion laughs, then a forbidden global": wrap(laughs + b"cos\nsystem\n"),
        "deep nested lists (100k)": wrap(big_nest),
        "deep nested lists by MARK (100k)": wrap(b"(" * 100_000 + b"l" * 100_000),
        "deep nested tuples (100k)": wrap(b")" + b"\x85" * 100_000),
        "BINUNICODE8 claiming 2^62": wrap(b"\x8d" + struct.pack("<Q", 1 << 62) + b"abc"),
        "BINBYTES8 claiming 2^62": wrap(b"\x8e" + struct.pack("<Q", 1 << 62) + b"abc"),
        "BYTEARRAY8 claiming 2^62": wrap(b"\x96" + struct.pack("<Q", 1 << 62) + b"abc"),
        "BINUNICODE claiming 4 GB": wrap(b"X" + struct.pack("<I", 0xFFFFFFFF) + b"abc"),
        "LONG4 claiming 2 GB": wrap(b"\x8b" + struct.pack("<i", 0x7FFFFFFF) + b"\x01"),
        "LONG4 negative length": wrap(b"\x8b" + struct.pack("<i", -5) + b"\x01"),
        "FRAME claiming 2^62": b"\x80\x04\x95" + struct.pack("<Q", 1 << 62) + b"N.",
        "huge text LONG": wrap(b"L" + b"9" * 100_000 + b"L\n"),
        "no STOP": p2 + b"N",
        "empty pickle": b"",
        "STOP on empty stack": wrap(b""),
        "unknown opcode": wrap(b"\xff"),
        "storage with huge numel": wrap(
            b"ctorch._utils\n_rebuild_tensor_v2\n(("
            + uni("storage")
            + b"ctorch\nFloatStorage\n"
            + uni("0")
            + uni("cpu")
            + b"\x8a\x08"
            + struct.pack("<q", 1 << 62)
            + b"tQK\x00(K\x01tK\x01\x85\x89ccollections\nOrderedDict\n)RtR"
        ),
    }


def rewrite_pickle(src: Path, dst: Path, data_pkl: bytes) -> Path:
    entries = zip_entries(src)
    out = [(n, data_pkl if n.endswith("/data.pkl") else d) for n, d in entries]
    return write_zip(dst, out)


def test_hostile_pickles(torch_zip: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / SENTINEL_NAME
    payloads = hostile_pickles(sentinel)
    # Sanity: the payload really does what it claims under pickle.loads (in a child, so
    # the test process stays clean), so "nothing ran" below means something.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pickle,sys; pickle.loads(open(sys.argv[1],'rb').read())",
            str(write_bytes(tmp_path / "probe.pkl", payloads["os.system"])),
        ],
        capture_output=True,
    )
    assert probe.returncode == 0 and sentinel.exists(), probe.stderr
    sentinel.unlink()

    control_pkl = next(d for n, d in zip_entries(torch_zip) if n.endswith("/data.pkl"))
    control = rewrite_pickle(torch_zip, tmp_path / "pkl_control.pth", control_pkl)
    run = [("control", control, "load_or_ok")]
    for i, (label, body) in enumerate(payloads.items()):
        p = rewrite_pickle(torch_zip, tmp_path / f"pkl_{i}.pth", body)
        run.append((label, p, "load"))
        run.append((label + " (open)", p, "open"))
    results = run_category(tmp_path, "pickles", run)
    assert results[0]["ok"], results[0]
    check_failures(results[1:])
    assert not sentinel.exists(), "a pickle payload executed"
    by_label = {r["label"]: r for r in results}
    for label in ["os.system", "builtins.eval", "__reduce__ of an arbitrary class"]:
        assert "allow-list" in by_label[label]["msg"], by_label[label]


BUILD_CHILD = r"""
import collections, json, sys
import zeroload

out = []
for path in sys.argv[1:]:
    try:
        sd = zeroload.load(path)
        out.append({"ok": True, "type": type(sd).__name__,
                    "is_od": type(sd) is collections.OrderedDict,
                    "attrs": sorted(k for k in vars(sd) if k.startswith("__"))})
    except BaseException as e:
        out.append({"ok": False, "type": type(e).__name__,
                    "ckpt": isinstance(e, zeroload.CheckpointError), "msg": str(e)})
print(json.dumps(out))
"""


def test_build_cannot_change_the_type(torch_zip: Path, tmp_path: Path) -> None:
    # BUILD on an OrderedDict sets instance attributes the way torch's weights_only
    # unpickler does (`__dict__.update`): naming `__class__` must not retype the object
    # (setattr would), and nothing may escape as a TypeError.
    od = b"ccollections\nOrderedDict\n)R}"
    bodies = [
        b"\x80\x02" + od + uni("__class__") + b"cbuiltins\nset\nsb.",
        b"\x80\x02" + od + uni("__class__") + uni("x") + b"sb.",
        b"\x80\x02" + od + uni("__dict__") + b"K\x01sb.",
    ]
    paths = [
        str(rewrite_pickle(torch_zip, tmp_path / f"build_{i}.pth", b)) for i, b in enumerate(bodies)
    ]
    proc = subprocess.run(
        [sys.executable, "-c", BUILD_CHILD, *paths], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path, r in zip(paths, json.loads(proc.stdout.strip().splitlines()[-1])):
        if r["ok"]:
            assert r["is_od"], (path, r)
        else:
            assert r["ckpt"] and path in r["msg"], (path, r)


def write_bytes(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


# ----------------------------------------------------------------------------- truncated
# under an open checkpoint

TRUNCATE_CHILD = r"""
import json, os, sys
import torch, zeroload
from zeroload import _core

path = sys.argv[1]
ckpt = _core.Checkpoint.open(path)
storages = [ckpt.storage(i) for i in range(ckpt.num_storages)]
key, offset, nbytes, _ = max(storages, key=lambda s: s[1])
os.truncate(path, offset + nbytes // 2)
dest = torch.empty(nbytes, dtype=torch.uint8)
try:
    _core.copy_to_host(ckpt, [dest], [(offset, nbytes, 0, 0)])
    print(json.dumps({"ok": True}))
except BaseException as e:
    print(json.dumps({"ok": False, "checkpoint_error": isinstance(e, zeroload.CheckpointError),
                      "type": type(e).__name__, "msg": str(e)}))
"""


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_truncated_while_open_copy_to_host(
    real_files: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    p = tmp_path / f"victim.{kind}"
    p.write_bytes(real_files[kind].read_bytes())
    proc = subprocess.run(
        [sys.executable, "-c", TRUNCATE_CHILD, str(p)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-3000:]}"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not r["ok"] and r["checkpoint_error"], r
    assert str(p) in r["msg"], r


def test_io_errors(tmp_path: Path) -> None:
    d = tmp_path / "dir.pth"
    d.mkdir()
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    cases = [
        ("missing file", tmp_path / "nope.pth", "load"),
        ("missing file (open)", tmp_path / "nope.safetensors", "open"),
        ("empty file", write_bytes(tmp_path / "empty.pth", b""), "load"),
        ("one byte", write_bytes(tmp_path / "one.pth", b"P"), "load"),
        ("zip magic only", write_bytes(tmp_path / "pk.pth", b"PK\x03\x04" + b"\0" * 40), "load"),
        ("eocd only", write_bytes(tmp_path / "eocd.pth", b"PK\x05\x06" + b"\0" * 18), "load"),
        ("a FIFO (used to block forever)", fifo, "load"),
        ("a FIFO (open)", fifo, "open"),
        ("a character device", Path("/dev/zero"), "load"),
    ]
    results = run_category(tmp_path, "io", cases)
    check_failures(results)
    assert results[0]["type"] == "builtins.FileNotFoundError", results[0]


def test_sentinel_payload_encoding_is_exact() -> None:
    # Guards the hand-written opcodes: the GLOBAL+REDUCE helper is what pickle itself
    # would produce for a call (the control that call() means what it says).
    body = b"\x80\x02" + call("builtins", "len", uni("abc")) + b"."
    assert pickle.loads(body) == 3


# ----------------------------------------------------------------------------- tensor and
# storage metadata that lies (shape / stride / offset arithmetic, storage sizes, keys)


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Tensor:
    """Pickles as torch does: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple:
        return (torch._utils._rebuild_tensor_v2, self.args)


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def test_tensor_metadata_lies(tmp_path: Path) -> None:
    base = tmp_path / "base.pth"
    torch.save({"w": torch.zeros(6)}, base)  # data/0 holds 24 bytes
    six, big = _Storage("0", 6), 2**40
    lies = {
        "storage numel 2^62": _Tensor(_Storage("0", 2**62), 0, (2,), (1,)),
        "storage bytes overflow u64": _Tensor(_Storage("0", 2**63 - 1), 0, (1,), (1,)),
        "storage longer than its record": _Tensor(_Storage("0", 7), 0, (1,), (1,)),
        "size past the storage": _Tensor(six, 0, (7,), (1,)),
        "offset past the storage": _Tensor(six, 6, (1,), (1,)),
        "shape product overflows": _Tensor(six, 0, (big, big), (big, 1)),
        "offset overflows": _Tensor(six, 2**62, (1,), (1,)),
        "stride overflows": _Tensor(six, 0, (2, 2), (2**62, 1)),
        "negative stride": _Tensor(six, 5, (6,), (-1,)),
        "negative size": _Tensor(six, 0, (-1,), (1,)),
        "negative offset": _Tensor(six, -1, (1,), (1,)),
        "100 dimensions": _Tensor(six, 0, (1,) * 100, (1,) * 100),
        "sizes and strides differ in length": _Tensor(six, 0, (2, 3), (1,)),
        "size 2^100": _Tensor(six, 0, (2**100,), (1,)),
        "empty, negative stride": _Tensor(six, 0, (0,), (-1,)),
        "key escapes data/": _Tensor(_Storage("../../../etc/passwd", 1), 0, (1,), (1,)),
        "key names data.pkl": _Tensor(_Storage("../data.pkl", 1), 0, (1,), (1,)),
    }
    cases = []
    for i, (label, t) in enumerate(lies.items()):
        p = rewrite_pickle(base, tmp_path / f"meta_{i}.pth", torch_pickle({"w": t}))
        cases += [(label, p, "load"), (label + " (open)", p, "open")]
    # One key, two sizes: the larger claim must still fit the record.
    p = rewrite_pickle(
        base,
        tmp_path / "meta_two_sizes.pth",
        torch_pickle(
            {"a": _Tensor(six, 0, (6,), (1,)), "b": _Tensor(_Storage("0", 600), 0, (600,), (1,))}
        ),
    )
    cases.append(("one key, two sizes", p, "load"))
    check_failures(run_category(tmp_path, "tensor-metadata", cases))


# ----------------------------------------------------------------------------- memo abuse
# by copying, nesting through the memo, and values torch itself rejects


def _memo_pickles() -> dict[str, bytes]:
    p2 = b"\x80\x02"
    # _codecs.encode of one memoized 64 KiB string, 20k times: 1.3 GB of copies from 100 KB.
    encode = p2 + b"c_codecs\nencode\nq\x00" + uni("x" * 65536) + b"q\x01"
    encode += uni("latin1") + b"q\x020]("
    encode += b"h\x00h\x01h\x02\x86R" * 20_000 + b"e."
    # OrderedDict(d) of one memoized 10k-item dict, 10k times.
    od = p2 + b"ccollections\nOrderedDict\nq\x00}q\x01("
    od += b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(10_000)) + b"u0]("
    od += b"h\x00h\x01\x85R" * 10_000 + b"e."
    # 100k nested dicts built through the memo (no MARK): {1: {1: {...}}}.
    n = 100_000
    nested = bytearray(p2 + b"}r\x00\x00\x00\x000")
    for i in range(n):
        nested += b"}K\x01j" + struct.pack("<I", i) + b"sr" + struct.pack("<I", i + 1) + b"0"
    nested += b"j" + struct.pack("<I", n) + b"."
    return {
        "_codecs.encode of a memoized string 20k times": encode,
        "OrderedDict copies of a memoized dict 10k times": od,
        "100k nested dicts through the memo": bytes(nested),
        "LONG_BINPUT 2^32-1 then GET of another index": p2
        + b"Nr\xff\xff\xff\xff0j\xfe\xff\xff\xff.",
        "GET with a 23-digit index": b"g99999999999999999999999\n.",
        "decimal INT of 100k digits": b"I" + b"9" * 100_000 + b"\n.",
        "cycle through a list": p2 + b"]q\x00h\x00a.",
        # Valid pickle values that torch rejects when the objects are built: the builder's
        # exception must come out as a CheckpointError naming the file.
        "torch.device of an unknown type": p2 + call("torch", "device", uni("foo:0")) + b".",
    }


def test_memo_abuse_and_rejected_values(torch_zip: Path, tmp_path: Path) -> None:
    cases = []
    for i, (label, body) in enumerate(_memo_pickles().items()):
        p = rewrite_pickle(torch_zip, tmp_path / f"memo_{i}.pth", body)
        cases += [(label, p, "load"), (label + " (open)", p, "open")]
    results = run_category(tmp_path, "memo", cases)
    check_failures(results)
    by_label = {r["label"]: r for r in results}
    for label in [
        "_codecs.encode of a memoized string 20k times",
        "OrderedDict copies of a memoized dict 10k times",
    ]:
        assert "memo abuse" in by_label[label]["msg"], by_label[label]
    device = by_label["torch.device of an unknown type"]
    assert device["checkpoint_error"] and "torch.device" in device["msg"], device


# ----------------------------------------------------------------------------- zip
# directories that lie about their size and offsets


def test_zip_directory_lies(torch_zip: Path, tmp_path: Path) -> None:
    blob = write_zip(tmp_path / "zip_plain.pth", zip_entries(torch_zip)).read_bytes()
    # Entry counts of 65535 (EOCD) and 2^62 (zip64 EOCD, when present).
    counts = bytearray(blob)
    e = counts.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", counts, e + 8, 0xFFFF, 0xFFFF)
    z64 = counts.rfind(b"PK\x06\x06")
    if z64 >= 0:
        struct.pack_into("<QQ", counts, z64 + 24, 2**62, 2**62)
    # A central directory offset and size past the end of the file.
    cd = bytearray(blob)
    struct.pack_into("<II", cd, e + 12, 0x7FFFFFFF, 0x7FFFFFFF)
    # data/0's local header offset past the end of the file.
    local = bytearray(blob)
    pos = 0
    while (pos := local.find(b"PK\x01\x02", pos)) >= 0:
        (n,) = struct.unpack_from("<H", local, pos + 28)
        if local[pos + 46 : pos + 46 + n].endswith(b"/data/0"):
            struct.pack_into("<I", local, pos + 42, 0x7FFFFFF0)
        pos += 4
    cases = []
    for label, data in [
        ("entry counts 65535 and 2^62", counts),
        ("central directory past the end", cd),
        ("local header past the end", local),
    ]:
        p = write_bytes(tmp_path / f"ziplie_{len(cases)}.pth", bytes(data))
        cases += [(label, p, "load"), (label + " (open)", p, "open")]
    check_failures(run_category(tmp_path, "zip-directory-lies", cases))


# ----------------------------------------------------------------------------- the mmap
# hazard, as the README documents it

MMAP_CHILD = r"""
import json, os, sys
import torch, zeroload

path, how = sys.argv[1], sys.argv[2]
handle = zeroload.open(path)
t = handle.get_tensor("w")  # a copy-on-write view of the mapping
os.truncate(path, 0)
try:
    if how == "reload":
        zeroload.load(path)
    else:
        print(json.dumps({"touching": True}), flush=True)
        t.sum()
    print(json.dumps({"ok": True}))
except BaseException as e:
    print(json.dumps({"ok": False, "checkpoint_error": isinstance(e, zeroload.CheckpointError),
                      "msg": str(e)}))
"""


def _mmap_child(tmp_path: Path, how: str) -> subprocess.CompletedProcess:
    from safetensors.torch import save_file

    p = tmp_path / "shrinking.safetensors"
    save_file({"w": torch.ones(64 * 1024)}, p)  # 256 KiB: many pages past any new end
    return subprocess.run(
        [sys.executable, "-c", MMAP_CHILD, str(p), how], capture_output=True, text=True, timeout=600
    )


def test_load_after_truncation_under_an_open_handle(tmp_path: Path) -> None:
    # A new load maps the file afresh and sees it is short: an error, whatever other
    # handles still have mapped.
    proc = _mmap_child(tmp_path, "reload")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not r["ok"] and r["checkpoint_error"] and "shrinking" in r["msg"], r


def test_mmap_hazard_is_as_documented(tmp_path: Path) -> None:
    # README, "The mmap hazard": touching CPU tensors whose file was truncated under them
    # raises SIGBUS, as with every mmap-based loader (GPU loads and load_into use pread and
    # raise CheckpointError instead: test_truncated_while_open_copy_to_host). If the child
    # starts surviving, the README section is out of date.
    proc = _mmap_child(tmp_path, "touch")
    assert '"touching"' in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_deeply_nested_shard_index(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    check_failures(run_category(tmp_path, "index", [("nested index", index, "load")]))


def test_shard_index_lies(tmp_path: Path) -> None:
    # An index may only name shards beside it, and must be a JSON object with a weight_map
    # of names to file names; anything else is refused before any shard is opened.
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not read")
    bodies = {
        "absolute shard path": {"weight_map": {"w": str(outside)}},
        "shard path with ..": {"weight_map": {"w": "../outside.safetensors"}},
        "weight_map not a dict": {"weight_map": ["w", "model.safetensors"]},
        "weight_map values not str": {"weight_map": {"w": 3}},
    }
    cases = []
    for i, (label, body) in enumerate(bodies.items()):
        d = tmp_path / f"m{i}"
        d.mkdir()
        index = d / "model.safetensors.index.json"
        index.write_text(json.dumps(body))
        cases += [(label, index, "load"), (label + " (directory)", d, "load")]
    bad_json = tmp_path / "bad" / "model.safetensors.index.json"
    bad_json.parent.mkdir()
    bad_json.write_text('{"weight_map": {"w": ')
    cases.append(("bad JSON", bad_json, "load"))
    check_failures(run_category(tmp_path, "index_lies", cases))
