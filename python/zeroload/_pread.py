"""Reads of checkpoint bytes outside the planned copies, in bounded pieces, never through
the mapping (no torch here: the callers bring the buffers and do the casts).

Casts (`dtype=`), `load_into`'s fallback copies, slices of tensors laid out
non-contiguously in the file and devices other than CPU and CUDA all need the file's
bytes somewhere other than where the copy engine puts them. Reading them through the
copy-on-write mapping would turn a file truncated under the load into a `SIGBUS`; these
reads are positional reads (`pread`) of the checkpoint's own descriptor (the file that
was opened, even if its name now leads elsewhere), so a short file is a
`CheckpointError` naming it. Large reads go `CHUNK` bytes at a time through one bounce
buffer, so a cast of a 10 GB tensor needs its result and 64 MiB, not a second copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from zeroload import _core

#: The most bytes one piece reads (and the most a bounce buffer holds).
CHUNK = 64 << 20


def read_into(
    ckpt: _core.Checkpoint, offset: int, nbytes: int, dest: Any, dest_offset: int = 0
) -> None:
    """Reads `nbytes` of the file at `offset` into `dest` (a dense CPU buffer exporting
    DLPack, such as a torch or numpy array) from byte `dest_offset` on, with `pread`.

    Raises:
        CheckpointError: the file ended before `offset + nbytes` (truncated meanwhile).
    """
    if nbytes:
        _core.copy_to_host(ckpt, [dest], [(offset, nbytes, 0, dest_offset)], None, None)


def pieces(nbytes: int, unit: int, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    """`(start, length)` of the pieces `[0, nbytes)` is read in: each a whole number of
    `unit`s (an element, a row: never split), at most `chunk` bytes unless one unit is
    larger, and together exactly `[0, nbytes)`."""
    if unit <= 0:
        raise ValueError(f"unit must be positive, not {unit}")
    step = max(unit, chunk - chunk % unit)
    for start in range(0, nbytes, step):
        yield start, min(step, nbytes - start)


def bounce_size(nbytes: int, unit: int, chunk: int = CHUNK) -> int:
    """The bytes a bounce buffer needs for `read_pieces(..., nbytes, unit)`."""
    return min(nbytes, max(unit, chunk - chunk % unit))


def read_pieces(
    ckpt: _core.Checkpoint,
    offset: int,
    nbytes: int,
    unit: int,
    bounce: Any,
    consume: Callable[[int, int], None],
    chunk: int = CHUNK,
) -> None:
    """Reads `[offset, offset + nbytes)` of the file piece by piece (see `pieces`) into
    `bounce` (a DLPack CPU buffer of at least `bounce_size(nbytes, unit, chunk)` bytes),
    calling `consume(start, length)` after each piece: bytes `[0, length)` of `bounce`
    then hold file bytes `[offset + start, offset + start + length)`."""
    for start, length in pieces(nbytes, unit, chunk):
        read_into(ckpt, offset + start, length, bounce)
        consume(start, length)
