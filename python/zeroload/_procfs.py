"""Reading Linux `/proc` files: the memory figures the loaders and the memory tracker use
(torch-free leaf)."""

from __future__ import annotations


def proc_kib_field(path: str, name: bytes) -> int | None:
    """A ``Name:  N kB`` line of a /proc file (``/proc/self/status``, ``/proc/meminfo``),
    in bytes; None where the file or the line is missing (not Linux)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(name + b":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
