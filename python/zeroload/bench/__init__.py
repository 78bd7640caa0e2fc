"""The harness behind ``zeroload demo`` and ``zeroload bench``: the seed notebook's
``GPTModel`` (:mod:`zeroload.bench.gptmodel`), loading methods run side by side, each in a
fresh process (:mod:`zeroload.bench.compare`), and the two commands
(:mod:`zeroload.bench.commands`).

Only those commands (and ``benchmarks/``) import the submodules; this file holds just the
names the command line offers, so that building its parser imports neither torch nor the
harness (``zeroload --help`` and ``zeroload inspect`` stay fast and torch-free).
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = [
    "BASE_CONFIG",
    "CONFIGS",
    "MODEL_METHODS",
    "SIZES",
    "STATE_DICT_METHODS",
    "checkpoint_bytes",
    "parameter_count",
]

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

#: Model sizes by their short names (``--size``) -> ``CONFIGS`` keys.
SIZES: Dict[str, str] = {
    "tiny": "tiny",
    "small": "gpt2-small (124M)",
    "medium": "gpt2-medium (355M)",
    "large": "gpt2-large (774M)",
    "xl": "gpt2-xl (1558M)",
}

#: Settings shared by every size (GPT-2's vocabulary and context length).
BASE_CONFIG: Dict[str, Any] = {
    "vocab_size": 50257,
    "context_length": 1024,
    "drop_rate": 0.0,
    "qkv_bias": True,
}

#: The seed notebook's model configurations, plus a tiny one for tests (the configurations
#: of ``gptmodel.GPTModel``; here so that the command line can describe them without torch).
CONFIGS: Dict[str, Dict[str, Any]] = {
    "tiny": {
        "vocab_size": 512,
        "context_length": 64,
        "drop_rate": 0.0,
        "qkv_bias": True,
        "emb_dim": 64,
        "n_layers": 2,
        "n_heads": 4,
    },
    "gpt2-small (124M)": {**BASE_CONFIG, "emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {**BASE_CONFIG, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {**BASE_CONFIG, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {**BASE_CONFIG, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}


def parameter_count(cfg: Dict[str, Any]) -> int:
    """The parameters of ``gptmodel.GPTModel(cfg)``, by arithmetic (no torch; the tests
    compare it with the model's own count for every size)."""
    d, v, c = cfg["emb_dim"], cfg["vocab_size"], cfg["context_length"]
    attention = 3 * (d * d + (d if cfg["qkv_bias"] else 0)) + d * d + d
    feed_forward = d * 4 * d + 4 * d + 4 * d * d + d
    block = attention + feed_forward + 2 * 2 * d  # two LayerNorms (scale, shift)
    return v * d + c * d + cfg["n_layers"] * block + 2 * d + d * v


def checkpoint_bytes(cfg: Dict[str, Any]) -> int:
    """The tensor bytes of that model's state dict in float32: its parameters and each
    block's causal mask (a persistent buffer)."""
    return 4 * (parameter_count(cfg) + cfg["n_layers"] * cfg["context_length"] ** 2)
