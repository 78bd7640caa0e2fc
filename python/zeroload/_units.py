"""Byte counts as zeroload prints them (``zeroload inspect``, ``track``, the bench tables)."""

from __future__ import annotations

__all__ = ["format_bytes", "plural"]

_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(n: float | None, digits: int = 1, *, none: str = "-") -> str:
    """``n`` bytes in the largest binary unit it reaches, with ``digits`` decimals:
    ``format_bytes(3 << 20) == "3.0 MiB"``, ``format_bytes(-1536, 2) == "-1.50 KiB"``,
    ``format_bytes(12) == "12 B"``; ``None`` (not measured) gives ``none``."""
    if n is None:
        return none
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in _UNITS:
        if n >= scale:
            return f"{sign}{n / scale:.{digits}f} {unit}"
    return f"{sign}{n:.0f} B"


def plural(n: int, word: str, sep: str = "") -> str:
    """``n`` and ``word``, with an ``s`` unless ``n`` is 1: ``plural(1, "tensor") ==
    "1 tensor"``, ``plural(1200, "element", ",") == "1,200 elements"`` (``sep``: the
    thousands separator, none by default)."""
    count = f"{n:,}" if sep == "," else str(n)
    return f"{count} {word}{'' if n == 1 else 's'}"
