"""`python/zeroload/_core.pyi` says what the native module returns: every return annotation
of the stub is checked against the value the real call gives (`mypy.stubtest`, run by
scripts/test, checks names and signatures, not what comes back)."""

from __future__ import annotations

import ast
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Union

import pytest
import torch
from safetensors.torch import save_file

import zeroload
from zeroload import _core

STUB = Path(zeroload.__file__).with_name("_core.pyi")

# Needs a CUDA device, or returns what the caller's `make` returns (a TypeVar).
NOT_CALLED = {
    "copy_to_cuda",
    "write_from_cuda",
    "copy_slices_to_cuda",
    "Checkpoint.export_tensor",
    "Checkpoint.export_tensors",
    "Checkpoint.build",
    "DLPackView.__dlpack__",
}


def _stub() -> tuple[dict[str, Any], dict[str, str]]:
    """(namespace the stub's annotations evaluate in, {"[Class.]name": return annotation})."""
    tree = ast.parse(STUB.read_text())
    ns: dict[str, Any] = {
        "Any": Any,
        "Path": Path,
        "PathLike": PathLike,
        "Callable": Callable,
        "Iterable": Iterable,
        "Sequence": Sequence,
        "_T": Any,
        "__all__": _core.__all__,
        **{n: getattr(_core, n) for n in _core.__all__},
    }
    returns: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id not in ns:  # type aliases (`_T` and `__all__` are known)
                ns[node.targets[0].id] = eval(ast.unparse(node.value), ns)
        elif isinstance(node, ast.FunctionDef) and node.returns is not None:
            returns[node.name] = ast.unparse(node.returns)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.returns is not None:
                    returns[f"{node.name}.{item.name}"] = ast.unparse(item.returns)
    return ns, returns


def conforms(value: Any, hint: Any) -> bool:
    """Whether `value` is of type `hint` (the forms the stub uses), all the way down."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is list:
        return type(value) is list and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return type(value) is dict and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
        )
    if origin is tuple:
        if type(value) is not tuple:
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
    if hint is int:
        return type(value) is int
    if hint is Path:
        return isinstance(value, Path)
    return isinstance(value, hint)


def test_the_checker_tells_lists_from_tuples_and_paths_from_strings() -> None:
    assert conforms([1, 2], list[int]) and not conforms((1, 2), list[int])
    assert not conforms([1, 2], tuple[int, ...]) and conforms((1, "a"), tuple[int, str])
    assert conforms(Path("x"), Path) and not conforms("x", Path)
    assert conforms(None, Union[int, None]) and not conforms(True, int)
    assert not conforms({"a": 1}, dict[str, str])


@pytest.fixture(scope="module")
def values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """What each stubbed call returns, on a torch file and a safetensors file."""
    d = tmp_path_factory.mktemp("stub")
    sd = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4, dtype=torch.int64)}
    torch.save(sd, d / "m.pth")
    save_file(sd, d / "m.safetensors", metadata={"format": "pt"})
    out: dict[str, list[Any]] = {}

    def record(name: str, value: Any) -> None:
        out.setdefault(name, []).append(value)

    for file in ("m.pth", "m.safetensors"):
        c = _core.Checkpoint.open(d / file)
        record("Checkpoint.open", c)
        with open(d / file, "rb") as f:
            record("Checkpoint.from_memory", _core.Checkpoint.from_memory([f.read()], "mem"))
        for prop in ("path", "format", "file_size", "metadata", "num_storages", "num_tensors"):
            record(f"Checkpoint.{prop}", getattr(c, prop))
        record("Checkpoint.storage", c.storage(0))
        record("Checkpoint.tensor", c.tensor(0))
        record("Checkpoint.tensors", c.tensors())
        record("Checkpoint.describe", c.describe(0))
        record("Checkpoint.loadable", c.loadable(0))
        record("Checkpoint.flat_tensors", c.flat_tensors())
        record("Checkpoint.flat_index", c.flat_index())
        record("Checkpoint.single_tensor", c.single_tensor())
        record("Checkpoint.unaligned_storages", c.unaligned_storages())
        record("Checkpoint.readahead", c.readahead([0], None))
        record("Checkpoint.readahead_ranges", c.readahead_ranges([(0, 8)], None))
        view = c.tensor_view(0)
        record("Checkpoint.storage_view", c.storage_view(0))
        record("Checkpoint.tensor_view", view)
        record("DLPackView.dtype", view.dtype)
        record("DLPackView.shape", view.shape)
        record("DLPackView.__dlpack_device__", view.__dlpack_device__())
        dest = torch.empty(8, dtype=torch.uint8)
        offset = c.storage(0)[1]
        record("copy_to_host", _core.copy_to_host(c, [dest], [(offset, 8, 0, 0)]))
        i = dict(c.flat_tensors() or [])["w"]
        _s, _dt, shape, stride, soff, _rg = c.tensor(i)
        one = ("w", 0, 0, None, offset + soff * 4, 4, shape, stride, [[(0, 1)], [(0, 2)]])
        record("copy_slices_to_host", _core.copy_slices_to_host(c, [dest], [one]))
    with open(d / "out.bin", "wb") as f:
        record("write_host", _core.write_host(f.fileno(), d / "out.bin", [b"abc"], [(0, 0, 3, 0)]))
    record("safetensors_dtype_name", _core.safetensors_dtype_name("float32"))
    record("dtypes", _core.dtypes())
    record("cuda_available", _core.cuda_available())
    record("cuda_staging_allocated", _core.cuda_staging_allocated())
    record("release_staging", _core.release_staging())
    try:
        record("cuda_device_count", _core.cuda_device_count())
    except _core.CudaError:
        pass  # no driver here: the count raises, as the stub's callers expect
    return out


def test_every_stubbed_return_type_matches_the_real_value(values: dict[str, list[Any]]) -> None:
    ns, returns = _stub()
    unchecked = set(returns) - set(values) - NOT_CALLED - {"cuda_device_count"}
    assert not unchecked, f"stub entries this test does not call: {sorted(unchecked)}"
    wrong = []
    for name, got in values.items():
        hint = eval(returns[name], ns)
        for v in got:
            if not conforms(v, hint):
                wrong.append(f"{name}: stub says {returns[name]}, got {v!r}")
    assert not wrong, "\n".join(wrong)
