"""What the command line's commands share with it and with each other, in a leaf module
that imports nothing of zeroload's (so :mod:`zeroload.cli` and :mod:`zeroload.bench.commands`
both import it without importing each other).

Exit statuses of ``zeroload`` (and of :func:`zeroload.cli.main`), one convention for every
command:

* ``0`` (:data:`EXIT_OK`): done;
* ``1`` (:data:`EXIT_CHECKPOINT`): the checkpoint could not be read or written: missing,
  malformed, refused, the destination already exists, or loading failed;
* ``2`` (:data:`EXIT_USAGE`): what was asked for makes no sense (a bad option or value);
* ``130`` (:data:`EXIT_INTERRUPTED`): interrupted with Ctrl-C.
"""

from __future__ import annotations

__all__ = ["EXIT_CHECKPOINT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "UsageError"]

EXIT_OK = 0
EXIT_CHECKPOINT = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""
