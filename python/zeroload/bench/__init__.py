"""The harness behind ``zeroload demo`` and ``zeroload bench``: the seed notebook's
``GPTModel`` (:mod:`zeroload.bench.gptmodel`), loading methods run side by side, each in a
fresh process (:mod:`zeroload.bench.compare`), and the two commands
(:mod:`zeroload.bench.commands`).

Only those commands (and ``benchmarks/``) import the submodules; this file holds just the
names the command line offers, so that building its parser imports neither torch nor the
harness (``zeroload --help`` and ``zeroload inspect`` stay fast and torch-free).
"""

from __future__ import annotations

from typing import Dict

__all__ = ["MODEL_METHODS", "SIZES", "STATE_DICT_METHODS"]

#: Model-mode methods: the seed notebook's recipes and zeroload (see ``compare``).
MODEL_METHODS: Dict[str, str] = {
    "baseline": "model.to(dev) + load_state_dict(torch.load(map_location=dev))",
    "sequential": "model.to(dev) + torch.load(cpu) + copy tensor by tensor",
    "meta": "meta model + torch.load(map_location=dev) + assign",
    "mmap_assign": "meta model + torch.load(mmap=True) + assign",
    "per_tensor": "model.to(dev) + one torch.load per tensor file",
    "zeroload": "meta model + zeroload.load(dev) + assign",
}

#: State-dict-mode methods (a checkpoint without a model class).
STATE_DICT_METHODS: Dict[str, str] = {
    "torch_load": "torch.load(weights_only=True)",
    "torch_load_mmap": "torch.load(mmap=True, weights_only=True)",
    "safetensors": "safetensors.torch.load_file",
    "zeroload": "zeroload.load",
}

#: Model sizes by their short names (``--size``) -> ``gptmodel.CONFIGS`` keys.
SIZES: Dict[str, str] = {
    "tiny": "tiny",
    "small": "gpt2-small (124M)",
    "medium": "gpt2-medium (355M)",
    "large": "gpt2-large (774M)",
    "xl": "gpt2-xl (1558M)",
}
