"""Hugging Face layouts: a model directory or a shard index resolves to its files; so does
a directory of per-tensor `torch.save` files (`{name}.pt`, one tensor each).

Also the one name index of a shard set (`tensor_index`: name -> file and tensor, every
file opened once) and the one "also appears in" check (`Names`, `duplicate`) that every
reader of several files uses. Torch-free."""

from __future__ import annotations

import difflib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from zeroload import _core
from zeroload._core import CheckpointError

# Names a checkpoint file usually has (the hint for a directory without a known layout).
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# What a directory may hold, best first (safetensors preferred, as transformers does).
_DIRECTORY_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# The suffixes of `torch.save` files in a directory of per-tensor files.
_TENSOR_FILE_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass
class ShardSet:
    """The files of one checkpoint, in load order, and the index's key -> file map."""

    files: list[Path]
    weight_map: dict[str, str] | None = None
    index: Path | None = None
    metadata: dict = field(default_factory=dict)
    # A directory of per-tensor files: each file's tensor name (its name less the suffix).
    tensor_names: dict[Path, str] | None = None

    def names_by_file(self) -> dict[Path, list[str]]:
        """The index's tensor names grouped by file (one pass over the weight map)."""
        if self.index is None or self.weight_map is None:
            return {}
        folder = self.index.parent
        path_of: dict[str, Path] = {}
        out: dict[Path, list[str]] = {f: [] for f in self.files}
        for name, shard in self.weight_map.items():
            file = path_of.get(shard)
            if file is None:
                file = path_of[shard] = folder / shard
            out.setdefault(file, []).append(name)
        return out

    def file_tensors(self, file: Path, ckpt: _core.Checkpoint) -> list[tuple[str, int]] | None:
        """`(name, tensor index)` of every tensor of `file` (opened as `ckpt`): a flat
        dict's items, or, in a directory of per-tensor files, the file's one tensor under
        the file's name; None for a file holding other objects (a training checkpoint).

        Raises:
            CheckpointError: a file of a per-tensor directory does not hold one tensor.
        """
        if self.tensor_names is None:
            return ckpt.flat_tensors()
        i = ckpt.single_tensor()
        if i is None:
            folder = file.parent
            raise CheckpointError(
                f"{file}: no checkpoint in this directory ({folder} has no "
                f"{' or '.join(_DIRECTORY_CANDIDATES)}), so it is read as a directory of "
                "per-tensor files, each holding one tensor saved with torch.save(tensor, "
                "path); this one holds other objects: to load it, pass the file itself"
            )
        return [(self.tensor_names[file], i)]


def duplicate(file: str | os.PathLike, what: str, other: object) -> CheckpointError:
    """``{file}: {what} also appears in {other}``: one value found in two files of a set."""
    return CheckpointError(f"{os.fspath(file)}: {what} also appears in {other}")


class Names:
    """Which file each name of a shard set came from, as the files are read in order: the
    one place a name found in two files is refused."""

    __slots__ = ("_file_of",)

    def __init__(self) -> None:
        self._file_of: dict[str, str | os.PathLike] = {}

    def add(self, name: str, file: str | os.PathLike) -> None:
        """Records `name` as read from `file`.

        Raises:
            CheckpointError: an earlier file holds `name` too (naming both files).
        """
        other = self._file_of.get(name)
        if other is not None:
            raise duplicate(file, f"tensor {name!r}", os.fspath(other))
        self._file_of[name] = file


class TensorIndex(NamedTuple):
    """Every tensor of a shard set: its files, their parses and, per file, name -> tensor
    index in that file (all three in file order; no name is in two files)."""

    files: list[Path]
    ckpts: list[_core.Checkpoint]
    names: list[dict[str, int]]

    def where(self) -> dict[str, tuple[int, int]]:
        """name -> (file number, tensor index in that file), in file order."""
        out: dict[str, tuple[int, int]] = {}
        for n, part in enumerate(self.names):
            out.update(zip(part, zip(itertools.repeat(n), part.values())))
        return out


def tensor_index(shard_set: ShardSet, not_flat: str) -> TensorIndex:
    """Opens every file of `shard_set` once and indexes its tensors by name: a flat dict's
    names, or, in a directory of per-tensor files, each file's name.

    `not_flat`: what the caller says (after ``{file}: ``) of a file that holds other
    objects than a flat dict of tensors (a training checkpoint).

    Raises:
        CheckpointError: a file is not a flat dict of tensors (`not_flat`), a file of a
            per-tensor directory holds more than one tensor, or a name is in two files
            (``{file}: tensor 'x' also appears in {earlier file}``).
    """
    files = shard_set.files
    ckpts = [_core.Checkpoint.open(os.fspath(f)) for f in files]
    if len(ckpts) == 1 and shard_set.tensor_names is None:  # one file: no name can repeat
        flat = ckpts[0].flat_index()
        if flat is None:
            raise CheckpointError(f"{files[0]}: {not_flat}")
        return TensorIndex(files, ckpts, [flat])
    names: list[dict[str, int]] = []
    file_of: dict[str, int] = {}  # name -> file number
    for n, (file, ckpt) in enumerate(zip(files, ckpts)):
        if shard_set.tensor_names is None:
            part = ckpt.flat_index()  # built by the core: no list of pairs in between
        else:
            named = shard_set.file_tensors(file, ckpt)
            part = None if named is None else dict(named)
        if part is None:
            raise CheckpointError(f"{file}: {not_flat}")
        clash = part.keys() & file_of.keys()
        if clash:
            name = next(k for k in part if k in clash)  # the first in the file's order
            raise duplicate(file, f"tensor {name!r}", files[file_of[name]])
        file_of.update(dict.fromkeys(part, n))
        names.append(part)
    return TensorIndex(files, ckpts, names)


def resolve(path: str | os.PathLike) -> ShardSet:
    """Finds the checkpoint files behind `path` (a file, a shard index or a directory)."""
    p = Path(os.fspath(path))
    if p.is_dir():
        for name in _DIRECTORY_CANDIDATES:
            if (p / name).is_file():
                return resolve(p / name)
        per_tensor = _tensor_files(p)
        if per_tensor is not None:
            return per_tensor
        found = sorted(x.name for x in p.iterdir() if x.suffix in _CHECKPOINT_SUFFIXES)
        hint = f" (it holds {', '.join(found[:5])}: pass one of them)" if found else ""
        raise FileNotFoundError(
            f"{p}: no checkpoint in this directory: expected one of "
            f"{', '.join(_DIRECTORY_CANDIDATES)}{hint}"
        )
    if p.name.endswith(".index.json"):
        return _read_index(p)
    if not p.exists():
        raise not_found(p)
    return ShardSet(files=[p])


def _tensor_files(folder: Path) -> ShardSet | None:
    """A directory of per-tensor `torch.save` files (`torch.save(param, f"{name}.pt")` for
    each parameter, the seed notebook's layout): every `.pt`/`.pth`/`.bin` file in it, in
    name order, each named by its file name less the suffix; None when it holds none."""
    names: dict[Path, str] = {}
    seen: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.suffix not in _TENSOR_FILE_SUFFIXES or not entry.is_file():
            continue
        name = entry.name[: -len(entry.suffix)]
        if name in seen:
            raise CheckpointError(
                f"{entry}: tensor {name!r} is also saved as {seen[name].name} in this "
                "directory of per-tensor files; keep one"
            )
        seen[name] = entry
        names[entry] = name
    if not names:
        return None
    return ShardSet(files=list(names), tensor_names=names)


def not_found(path: str | os.PathLike) -> FileNotFoundError:
    """``path: no such file or directory``, with "did you mean" and the closest name in
    its directory when one is close (a typo in the name), or the closest existing parent
    when the directory itself is missing."""
    p = Path(os.fspath(path))
    parent = p.parent
    if not parent.is_dir():
        up = parent
        while not up.is_dir() and up != up.parent:
            up = up.parent
        where = f" ({parent} does not exist" + (f"; {up} does)" if up.is_dir() else ")")
        return FileNotFoundError(f"{p}: no such file or directory{where}")
    try:
        names = [x.name for x in parent.iterdir()]
    except OSError:
        names = []
    close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.75)
    hint = f"; did you mean {parent / close[0]}?" if close else ""
    return FileNotFoundError(f"{p}: no such file or directory{hint}")


def _read_index(index: Path) -> ShardSet:
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise not_found(index) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index (bad JSON: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{index}: not a valid shard index (JSON nests too deeply)") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index}: not a valid shard index: no 'weight_map' of names to files"
        )
    files: list[Path] = []
    seen: set[str] = set()
    for shard in weight_map.values():
        if shard in seen:
            continue
        seen.add(shard)
        shard_path = Path(shard)
        if shard_path.is_absolute() or ".." in shard_path.parts:
            raise CheckpointError(
                f"{index}: shard {shard!r} is outside the index's directory; refusing to read it"
            )
        full = index.parent / shard_path
        if not full.is_file():
            raise FileNotFoundError(f"{index}: shard {shard!r} is missing ({full})")
        files.append(full)
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return ShardSet(files=files, weight_map=weight_map, index=index, metadata=metadata)
