"""zeroload: load PyTorch checkpoints straight into CPU or GPU tensors.

`zeroload.load` replaces `torch.load` for `.safetensors` files, `torch.save` files (zip
or legacy; `.pt`, `.pth`, `.bin`) and Hugging Face shard sets. On the CPU, tensors are zero-copy,
copy-on-write views of the file (nothing is read until touched; writing never changes
the file). On a GPU, each storage is copied once, file -> pinned staging -> device, into
memory from PyTorch's caching allocator, with host memory bounded by a small budget.

    sd = zeroload.load("model.pth", device="cuda")
    model.load_state_dict(sd, assign=True)

    sd = zeroload.load_bytes(data)                    # from memory, like safetensors.torch.load

    with zeroload.open("model.safetensors") as f:     # lazily, like safe_open
        w = f.get_tensor("lm_head.weight")

    with zeroload.init_empty():                       # parameters on meta, buffers real
        model = Model(cfg)
    zeroload.load_into(model, "model.safetensors")    # into an nn.Module

    zeroload.save(model.state_dict(), "model.pth")    # atomic; safe over a mapped file

Importing the package does not import torch (so `zeroload --help` is quick); the
functions that need it import it on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from zeroload._core import CheckpointError, CudaError, ForbiddenGlobalError

if TYPE_CHECKING:
    from zeroload._cuda import release_staging
    from zeroload._hf import from_pretrained
    from zeroload._init_empty import init_empty
    from zeroload._load import load, load_bytes
    from zeroload._load_into import load_into
    from zeroload._open import SafeOpen, open
    from zeroload._save import save
    from zeroload._track import track

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "CudaError",
    "ForbiddenGlobalError",
    "SafeOpen",
    "from_pretrained",
    "init_empty",
    "load",
    "load_bytes",
    "load_into",
    "open",
    "release_staging",
    "save",
    "track",
]

# Public names defined in modules that import torch (or psutil): resolved on first use.
_LAZY = {
    "load": "zeroload._load",
    "load_bytes": "zeroload._load",
    "open": "zeroload._open",
    "SafeOpen": "zeroload._open",
    "load_into": "zeroload._load_into",
    "from_pretrained": "zeroload._hf",
    "init_empty": "zeroload._init_empty",
    "release_staging": "zeroload._cuda",
    "track": "zeroload._track",
    "save": "zeroload._save",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zeroload' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})
