"""The file writer shared by :func:`zeroload.save` and ``zeroload convert``. Torch-free.

A caller lays out the whole file first (every byte's offset is known before anything is
written), then :func:`write_file` creates the temporary file beside ``path``
(:mod:`zeroload._atomic`), sizes it, and hands the byte ranges to the Rust core
(``_core.write_host``: positional writes in file order, the GIL released, CRC-32s
computed meanwhile on other threads), calls
``finish`` with those CRCs for the bytes that depend on them (a zip's data descriptors and
central directory), writes those, fsyncs and renames over ``path``. Any failure leaves
``path`` untouched and removes the temporary file.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Sequence, Tuple

from zeroload import _core
from zeroload._atomic import atomic_write

__all__ = ["Request", "Tail", "write_file"]

#: ``(source index, byte offset in the source, nbytes, file offset)``.
Request = Tuple[int, int, int, int]
#: What ``finish`` returns: more ``(sources, requests)`` to write (no CRCs).
Tail = Tuple[List[Any], List[Request]]


def write_file(
    path: os.PathLike[str] | str,
    size: int,
    sources: Sequence[Any],
    requests: Sequence[Request],
    *,
    crc: bool = False,
    progress: Callable[[int, int], Any] | None = None,
    extra: Callable[[int], List[int]] | None = None,
    finish: Callable[[List[int]], Tail] | None = None,
) -> None:
    """Writes a file of ``size`` bytes atomically over ``path``.

    ``sources``/``requests``: as ``_core.write_host`` takes them (``bytes``, CPU tensors
    or DLPack capsules). ``extra(fd)``, if given, writes more ranges itself (the CUDA
    path) and returns their CRCs, appended to the host ones. ``finish(crcs)`` returns the
    ranges written last (with ``crc``: the CRC-32 of each request, in order).
    """
    path = os.fspath(path)
    with atomic_write(path) as f:
        fd = f.fileno()
        os.ftruncate(fd, size)
        crcs = _core.write_host(fd, path, list(sources), list(requests), progress, crc)
        if extra is not None:
            crcs = list(crcs) + extra(fd)
        if finish is not None:
            tail_sources, tail_requests = finish(list(crcs))
            _core.write_host(fd, path, tail_sources, tail_requests, None, False)
