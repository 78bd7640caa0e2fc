"""zeroload (skeleton)."""
from zeroload import _core  # noqa: F401
