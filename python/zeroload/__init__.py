"""zeroload: load PyTorch checkpoints straight into CPU or GPU tensors.

`zeroload.load` replaces `torch.load` for `.safetensors` files, `torch.save` zip files
(`.pt`, `.pth`, `.bin`) and Hugging Face shard sets. On the CPU, tensors are zero-copy,
copy-on-write views of the file (nothing is read until touched; writing never changes
the file). On a GPU, each storage is copied once, file -> pinned staging -> device, into
memory from PyTorch's caching allocator, with host memory bounded by a small budget.

    sd = zeroload.load("model.pth", device="cuda")
    model.load_state_dict(sd, assign=True)
"""

# STAND-IN for the issue-10 restructuring (drop at merge): torch-dependent names are
# resolved on first use, so `import zeroload` (and the CLI) imports no torch.

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zeroload._core import CheckpointError, CudaError

if TYPE_CHECKING:
    from zeroload._load_into import load_into
    from zeroload._standin_api import SafeOpen, load, open
    from zeroload._track import track

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "CudaError",
    "SafeOpen",
    "load",
    "load_into",
    "open",
    "track",
]


def __getattr__(name: str) -> Any:
    if name in ("load", "open", "SafeOpen"):
        from zeroload import _standin_api

        return getattr(_standin_api, name)
    # load_into and track pull in more of torch.nn / psutil; import them on first use.
    if name == "load_into":
        from zeroload._load_into import load_into

        return load_into
    if name == "track":
        from zeroload._track import track

        return track
    raise AttributeError(f"module 'zeroload' has no attribute {name!r}")
