"""Promise: every read outside the zero-copy CPU views (casts, `load_into`'s fallback
copies, slices of tensors laid out non-contiguously, other devices, `zeroload convert`) is
a `pread` of the file in bounded pieces, never a read through the mapping, so a file
truncated under a load raises `CheckpointError` (a read through the mapping would die of
SIGBUS: each case runs in a subprocess, so that such a death fails the test instead of the
run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zeroload
from zeroload import _pread, _torch

# Tensors of 1 MiB and more: the truncation (to 4 KiB) takes their pages away.
ROWS, COLS = 512, 1024


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g)
    return {"w": w, "wt": w.t(), "b": torch.randn(COLS, generator=g)}


def _write(tmp_path: Path, fmt: str) -> Path:
    sd = _state()
    if fmt == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        path = tmp_path / "m.pth"
        torch.save(sd, path)  # "wt" shares "w"'s storage, laid out transposed
    return path


# -- the pieces --------------------------------------------------------------------------


def test_pieces_cover_the_range_in_bounded_whole_units() -> None:
    for nbytes, unit, chunk in [(0, 4, 16), (10, 1, 4), (96, 12, 40), (100, 30, 16), (7, 7, 64)]:
        got = list(_pread.pieces(nbytes, unit, chunk))
        assert [s for s, _ in got] == [sum(n for _, n in got[:j]) for j in range(len(got))]
        assert sum(n for _, n in got) == nbytes
        assert all(n <= max(chunk, unit) for _, n in got)
        assert all(n % unit == 0 for _, n in got[:-1])
        assert all(n <= _pread.bounce_size(nbytes, unit, chunk) for _, n in got)
    assert list(_pread.pieces(96, 12, 40)) == [(0, 36), (36, 36), (72, 24)]
    assert _pread.CHUNK == 64 << 20
    with pytest.raises(ValueError):
        list(_pread.pieces(10, 0))


def test_fill_from_file_reads_in_pieces_no_larger_than_the_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "pth")
    ckpt = zeroload._core.Checkpoint.open(os.fspath(path))
    sizes: list[int] = []
    real = _pread.read_into

    def spy(ckpt, offset, nbytes, dest, dest_offset=0):  # type: ignore[no-untyped-def]
        sizes.append(nbytes)
        return real(ckpt, offset, nbytes, dest, dest_offset)

    monkeypatch.setattr(_pread, "read_into", spy)
    monkeypatch.setattr(_pread, "CHUNK", 10_000)
    monkeypatch.setattr(_pread.pieces, "__defaults__", (10_000,))
    monkeypatch.setattr(_pread.bounce_size, "__defaults__", (10_000,))
    monkeypatch.setattr(_pread.read_pieces, "__defaults__", (10_000,))
    names = dict(ckpt.flat_tensors())
    out = torch.empty(ROWS, COLS, dtype=torch.float16)
    _torch.fill_from_file(ckpt, names["w"], out, torch.float16)
    assert torch.equal(out, _state()["w"].half())
    row = COLS * 4
    assert sizes and max(sizes) <= 10_000 and sum(sizes) == ROWS * row
    assert all(n % row == 0 for n in sizes)  # whole rows


# -- results equal torch's ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_casts_and_fallbacks_equal_torch(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path, fmt)
    ref = _state()
    got = zeroload.load(path, dtype=torch.bfloat16)
    for k, v in ref.items():
        assert torch.equal(got[k], v.to(torch.bfloat16)), k
    # load_into a materialised module: a cast, and a non-contiguous target.
    m = torch.nn.Module()
    m.register_buffer("w", torch.zeros(COLS, ROWS).t())  # non-contiguous target
    m.register_buffer("wt", torch.zeros(COLS, ROWS))
    m.register_buffer("b", torch.zeros(COLS, dtype=torch.float64))
    zeroload.load_into(m, path, dtype=torch.float16)
    assert torch.equal(m.w, ref["w"].half().float())
    assert torch.equal(m.wt, ref["wt"].half().float())
    assert torch.equal(m.b, ref["b"].half().double())
    with zeroload.open(path) as f:
        assert torch.equal(f.get_slice("wt")[3:9, 100:300], ref["wt"][3:9, 100:300])


def test_storages_for_other_devices_are_read_in_pieces(tmp_path: Path) -> None:
    path = _write(tmp_path, "pth")
    ckpt = zeroload._core.Checkpoint.open(os.fspath(path))
    for s in range(ckpt.num_storages):
        got = _torch.read_storage_to(ckpt, s, torch.device("cpu"))
        ref = torch.from_dlpack(ckpt.storage_view(s))
        assert torch.equal(got, ref)


# -- truncated between open and read: CheckpointError, not SIGBUS --------------------------

# Each case truncates the file to 4 KiB right after zeroload has opened (and mapped) it,
# then reads; it prints the exception's class.
_CASES = {
    "load_dtype": """
        real = _torch.cpu_tensors
        def hook(*a, **k):
            out = real(*a, **k)
            truncate()
            return out
        _torch.cpu_tensors = hook
        zeroload.load(path, dtype=torch.float16)
    """,
    "load_into_dtype": """
        real = _load_into._entries
        def hook(p):
            out = real(p)
            truncate()
            return out
        _load_into._entries = hook
        m = torch.nn.Module()
        for k, shape in shapes.items():
            m.register_buffer(k, torch.zeros(shape))
        zeroload.load_into(m, path, dtype=torch.float16)
    """,
    "load_into_non_contiguous": """
        real = _load_into._entries
        def hook(p):
            out = real(p)
            truncate()
            return out
        _load_into._entries = hook
        m = torch.nn.Module()
        for k, shape in shapes.items():
            m.register_buffer(k, torch.zeros(tuple(reversed(shape))).t())
        zeroload.load_into(m, path)
    """,
    "slice_of_transposed": """
        from zeroload import _slices
        ckpt = zeroload._core.Checkpoint.open(path)
        i = dict(ckpt.flat_tensors())["wt"]
        truncate()
        out = torch.empty(2, 300)
        _slices.read([_slices.SliceRead("wt", ckpt, i, [[(0, 2)], [(0, 300)]], out)])
    """,
    "convert": """
        from zeroload import _convert
        real = _convert._source_tensors
        def hook(*a):
            out = real(*a)
            truncate()
            return out
        _convert._source_tensors = hook
        dst = path[: -len(".pth")] + ".safetensors"
        try:
            _convert.convert(path, dst)
        finally:
            assert not os.path.exists(dst), "a failed convert left its output"
    """,
    "other_device_storage": """
        ckpt = zeroload._core.Checkpoint.open(path)
        truncate()
        _torch.read_storage_to(ckpt, 0, torch.device("cpu"))
    """,
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_a_file_truncated_under_a_read_is_a_checkpoint_error(tmp_path: Path, case: str) -> None:
    # safetensors where a torch file would fail earlier, rebuilding its objects
    fmt = "safetensors" if case == "load_into_non_contiguous" else "pth"
    path = _write(tmp_path, fmt)
    shapes = {"w": (ROWS, COLS), "wt": (COLS, ROWS), "b": (COLS,)}
    body = textwrap.indent(textwrap.dedent(_CASES[case]), "    ")
    code = (
        "import os, sys, torch, zeroload\n"
        "from zeroload import _load_into, _torch\n"
        f"path = {os.fspath(path)!r}\n"
        f"shapes = {shapes!r}\n"
        "def truncate():\n"
        "    os.truncate(path, 4096)\n"
        "try:\n"
        f"{body}\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, '|', e)\n"
        "else:\n"
        "    print('no error')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"died (SIGBUS is -7): rc={r.returncode}\n{r.stderr[-2000:]}"
    out = r.stdout.strip()
    assert out.startswith("CheckpointError |"), out + r.stderr[-2000:]
    assert path.name in out and "truncated" in out, out
