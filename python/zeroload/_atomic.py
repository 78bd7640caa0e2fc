"""Atomic file replacement: the durability half of :func:`zeroload.save`. Torch-free.

``with atomic_write(path) as f:`` gives a new file opened for writing in the same
directory as ``path`` (same file system, so the rename is atomic), created exclusively
under a unique name. When the block ends normally the file is flushed, ``fsync``ed,
renamed over ``path`` with ``os.replace`` and the directory is ``fsync``ed, so after a
crash either the old or the new file is at ``path``, whole. If the block raises anything
(``KeyboardInterrupt`` included), the temporary file is removed and ``path`` is left
exactly as it was.

Replacing rather than truncating is also what makes saving over a file that live tensors
map safe: the mapping keeps the old inode (and its bytes) until it is dropped.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Iterator, Union

__all__ = ["atomic_write", "TEMP_SUFFIX"]

#: Every temporary file ends with this (``.<name>.<random>.zeroload-tmp``).
TEMP_SUFFIX = ".zeroload-tmp"


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike[str]]) -> Iterator[IO[bytes]]:
    """A new binary file beside ``path`` that replaces it when the block succeeds."""
    path = Path(path)
    directory = path.parent
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = directory / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for open(path, "wb")
            break
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
    done = False
    try:
        with os.fdopen(fd, "w+b") as f:
            with contextlib.suppress(FileNotFoundError):
                # The replaced file keeps its permissions, as when torch.save rewrites it.
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
        _fsync_dir(directory)
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
