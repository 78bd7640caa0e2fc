"""`zeroload.from_pretrained`: a Hugging Face model directory as the working transformers
model `AutoModel*.from_pretrained` builds, with zeroload reading every byte.

transformers does the modelling work (config, class, building on the meta device, key
renames, weight conversions such as Mixtral's expert merge, dtype policy, tied weights,
`_init_weights` of what the checkpoint lacks, `eval()`). zeroload supplies the tensors:
for the duration of the call, and only on the calling thread, transformers' two readers
are replaced:

- `modeling_utils.safe_open` (safetensors files) by a zeroload handle whose lazy slices
  give, when transformers materialises them, a copy-on-write view of the file on the CPU
  (no copy) or, on a GPU, the tensor copied file -> pinned staging ring -> device memory;
- `modeling_utils.load_state_dict` (`.bin` files) by the same handle over zeroload's
  pickle VM: never `torch.load`, never pickled code.

transformers is an optional dependency, imported only here.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from zeroload import _cuda, _torch
from zeroload._core import CheckpointError
from zeroload._cuda import DeviceLike, parse_device
from zeroload._open import SafeOpen

# transformers versions whose loading goes through the seams this module replaces
# (checked at each call): 5.x.
SUPPORTED = ((5, 0), (6, 0))
SUPPORTED_TEXT = "transformers >= 5.0, < 6"

# from_pretrained arguments that would make transformers read, place or transform the
# weights in a way zeroload does not provide, and what to do instead.
_REFUSED = {
    "device_map": "pass device= (one device for the whole model)",
    "max_memory": "zeroload places the whole model on device=",
    "offload_folder": "disk offloading is not supported; pass device=",
    "offload_buffers": "offloading is not supported; pass device=",
    "tp_plan": "for tensor parallelism, build the model and use zeroload.load_into",
    "tp_size": "for tensor parallelism, build the model and use zeroload.load_into",
    "device_mesh": "for tensor parallelism, build the model and use zeroload.load_into",
    "distributed_config": "for distributed loading, use zeroload.load_into",
    "quantization_config": "quantized loading is not supported",
    "gguf_file": "GGUF files are not read by zeroload",
    "state_dict": "pass the directory of the checkpoint instead of a state dict",
    "torch_dtype": "use dtype= (torch_dtype is transformers' old name for it)",
    "disable_mmap": "zeroload reads the files itself",
    "weights_only": "zeroload never executes pickled code: weights_only is always True",
    "from_tf": "only PyTorch and safetensors checkpoints are read",
    "from_flax": "only PyTorch and safetensors checkpoints are read",
}

_INDEXES = {
    "model.safetensors.index.json": True,
    "pytorch_model.bin.index.json": False,
}


def from_pretrained(
    path: str | os.PathLike,
    *,
    model_class: Any = None,
    device: DeviceLike | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Load a Hugging Face model directory into the model transformers would build.

    The result is what `transformers.AutoModel*.from_pretrained(path)` returns (the class
    named by `config.json`'s `architectures`, in eval mode, tied weights tied, the same
    outputs), built by transformers' own loading logic (key renames, weight conversions
    such as Mixtral's per-expert merge, dtype policy, initialisation of anything the
    checkpoint lacks), with every byte of the weights read by zeroload: safetensors
    shards through zeroload's reader and `.bin` shards through its pickle VM (never
    `torch.load`). On the CPU the parameters are copy-on-write views of the files (no
    copy; the kernel reads them ahead in the background); on a GPU each tensor goes file
    -> pinned staging ring -> device memory, never through a full CPU copy. Calls in
    several threads run one at a time (transformers' own loading is not thread-safe).

    Args:
        path: a local model directory (`config.json` and `model.safetensors`,
            `pytorch_model.bin` or their shard sets), a shard index in one, or one
            weights file in one. Nothing is downloaded.
        model_class: the class to build: a transformers model class, an auto class
            (`transformers.AutoModelForCausalLM`) or the name of one. Default: the
            first of `config.json`'s `architectures` (`AutoModel` when there is none).
        device: "cpu" (default), "cuda", "cuda:N", an int or a `torch.device`.
        dtype: as transformers' `dtype` (a `torch.dtype` or "auto"); default: what
            transformers would choose.
        progress: show transformers' loading progress bar: True, False, or None
            (automatic: for checkpoints over 1 GB in interactive sessions).
        **kwargs: passed to transformers' `from_pretrained` (`config`,
            `attn_implementation`, `trust_remote_code`, `output_loading_info`,
            `use_safetensors`, `key_mapping`, ...). Arguments zeroload cannot honour
            (`device_map`, offloading, quantization, tensor parallelism, `state_dict`,
            `gguf_file`, `torch_dtype`, `weights_only`, `disable_mmap`) raise a
            `TypeError` saying what to do instead.

    Returns:
        The transformers model (or `(model, loading_info)` with
        `output_loading_info=True`).

    Raises:
        ImportError: transformers is not installed, or its version is not supported.
        FileNotFoundError: `path` does not exist.
        CheckpointError: a weights file is malformed, or `config.json` is missing or
            unreadable.
        CudaError: `device` is a GPU and CUDA is unavailable.
    """
    transformers = _transformers()
    for name, instead in _REFUSED.items():
        if name in kwargs:
            raise TypeError(f"zeroload.from_pretrained does not accept {name}=: {instead}")
    folder, use_safetensors = _locate(path)
    if use_safetensors is not None:
        kwargs.setdefault("use_safetensors", use_safetensors)
    cls = _model_class(transformers, folder, model_class, kwargs.get("config"))
    target = parse_device(device)
    if target.type == "cuda":
        target = _cuda.cuda_device(target)
        if isinstance(_cuda.backend, _cuda.TorchCuda):
            kwargs["device_map"] = {"": target}
        # else: a substituted backend (tests) hands back CPU tensors; transformers keeps
        # the rest of the model there too.
    elif target.type != "cpu":
        kwargs["device_map"] = {"": target}
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs.setdefault("local_files_only", True)
    show = _torch.wants_progress(progress, _weights_bytes(folder))
    with _progress_bars(transformers, show), _serving(target, _torch.Readahead(None)):
        result = cls.from_pretrained(os.fspath(folder), **kwargs)
    model = result[0] if isinstance(result, tuple) else result
    model.eval()
    return result


# -- what transformers is, and what to build ---------------------------------------------


def _transformers() -> Any:
    try:
        import transformers
        import transformers.modeling_utils as modeling_utils
    except ImportError as e:
        raise ImportError(
            f"zeroload.from_pretrained needs transformers ({SUPPORTED_TEXT}): "
            f"pip install 'transformers>=5,<6' ({e})"
        ) from e
    version = transformers.__version__
    if not _supported(version):
        raise ImportError(
            f"zeroload.from_pretrained supports {SUPPORTED_TEXT}; transformers {version} is "
            "installed. Load the weights with zeroload.load_into instead, or install a "
            "supported version."
        )
    for seam in ("safe_open", "load_state_dict"):
        if not callable(getattr(modeling_utils, seam, None)):
            raise ImportError(
                f"transformers {version} has no modeling_utils.{seam}, through which "
                f"zeroload supplies the weights; zeroload.from_pretrained supports "
                f"{SUPPORTED_TEXT}"
            )
    return transformers


def _supported(version: str) -> bool:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            return False
        parts.append(int(digits))
    low, high = SUPPORTED
    return low <= tuple(parts) < high


def _locate(path: str | os.PathLike) -> tuple[Path, bool | None]:
    """The model directory, and whether to read safetensors (None: transformers' choice)
    when `path` names a shard index or a weights file."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model directory")
    if p.is_dir():
        return p, None
    name = p.name
    if name in _INDEXES:
        return p.parent, _INDEXES[name]
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        return p.parent, True
    if name.endswith((".bin", ".bin.index.json")):
        return p.parent, False
    raise CheckpointError(
        f"{p}: not a model directory, shard index or weights file "
        "(expected a directory holding config.json)"
    )


def _model_class(transformers: Any, folder: Path, model_class: Any, config: Any) -> Any:
    if model_class is not None:
        if isinstance(model_class, str):
            cls = getattr(transformers, model_class, None)
            if cls is None:
                raise ValueError(f"transformers has no model class named {model_class!r}")
            return cls
        if not hasattr(model_class, "from_pretrained"):
            raise TypeError(
                f"model_class must be a transformers model or auto class, not {model_class!r}"
            )
        return model_class
    if config is not None and not isinstance(config, (str, os.PathLike)):
        architectures = getattr(config, "architectures", None)
    else:
        config_file = folder / "config.json" if config is None else Path(os.fspath(config))
        if config_file.is_dir():
            config_file = config_file / "config.json"
        try:
            with config_file.open(encoding="utf-8") as fh:
                architectures = json.load(fh).get("architectures")
        except FileNotFoundError:
            raise CheckpointError(
                f"{config_file}: no config.json: a transformers model directory holds one "
                "(save_pretrained writes it)"
            ) from None
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{config_file}: not a readable config.json ({e})") from None
    if not architectures:
        return transformers.AutoModel
    name = architectures[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise CheckpointError(
            f"{folder / 'config.json'}: transformers has no class {name!r} (named by "
            "architectures); pass model_class= (an auto class loads remote code with "
            "trust_remote_code=True)"
        )
    return cls


def _weights_bytes(folder: Path) -> int:
    total = 0
    for entry in folder.iterdir():
        if entry.name.endswith((".safetensors", ".bin")) and entry.is_file():
            total += entry.stat().st_size
    return total


@contextlib.contextmanager
def _progress_bars(transformers: Any, show: bool) -> Iterator[None]:
    """transformers' progress bars on or off for the call (a process-wide setting)."""
    logging = transformers.utils.logging
    was = logging.is_progress_bar_enabled()
    if show:
        logging.enable_progress_bar()
    else:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()
        else:
            logging.disable_progress_bar()


# -- the seams: transformers' readers, replaced on the calling thread ----------------------


class _Serving(threading.local):
    target: torch.device | None = None
    readahead: _torch.Readahead | None = None


_serving_here = _Serving()
# One from_pretrained at a time in a process: transformers 5's own from_pretrained is not
# safe to run in two threads at once (tied weights can come out on the meta device).
_call_lock = threading.Lock()
_patch_lock = threading.Lock()
_patch_users = 0
_originals: dict[tuple[Any, str], Any] = {}


@contextlib.contextmanager
def _serving(target: torch.device, readahead: _torch.Readahead) -> Iterator[None]:
    """Inside the block, transformers' weight readers called on this thread are
    zeroload's; other threads keep transformers' own (the replacements hand them on).
    Calls of zeroload.from_pretrained in several threads run one after the other."""
    global _patch_users
    if _serving_here.target is not None:
        raise RuntimeError("zeroload.from_pretrained cannot be called from inside itself")
    with _call_lock:
        with _patch_lock:
            if _patch_users == 0:
                _install()
            _patch_users += 1
        _serving_here.target = target
        _serving_here.readahead = readahead if target.type == "cpu" else None
        try:
            yield
        finally:
            _serving_here.target = None
            _serving_here.readahead = None
            with _patch_lock:
                _patch_users -= 1
                if _patch_users == 0:
                    _uninstall()


def _seams() -> list[tuple[Any, str, Any]]:
    import transformers.modeling_utils as modeling_utils

    seams = [
        (modeling_utils, "safe_open", _safe_open),
        (modeling_utils, "load_state_dict", _load_state_dict),
        (modeling_utils, "_is_on_hf_mount", _is_on_hf_mount),
    ]
    try:
        import transformers.modeling_layers as modeling_layers
    except ImportError:
        pass
    else:
        seams.append((modeling_layers, "safe_open", _safe_open))
    return [s for s in seams if hasattr(s[0], s[1])]


def _install() -> None:
    for module, name, replacement in _seams():
        _originals[(module, name)] = getattr(module, name)
        setattr(module, name, replacement)


def _uninstall() -> None:
    for (module, name), original in list(_originals.items()):
        if getattr(module, name, None) is _replacement(name):
            setattr(module, name, original)
    _originals.clear()


def _replacement(name: str) -> Any:
    return {
        "safe_open": _safe_open,
        "load_state_dict": _load_state_dict,
        "_is_on_hf_mount": _is_on_hf_mount,
    }[name]


def _original(name: str) -> Any:
    import transformers.modeling_utils as modeling_utils

    return _originals.get((modeling_utils, name)) or getattr(modeling_utils, name)


def _safe_open(filename: Any, framework: str = "pt", device: Any = "cpu", **kw: Any) -> Any:
    target = _serving_here.target
    if target is None:
        return _original("safe_open")(filename, framework=framework, device=device, **kw)
    return _Source(filename, target, _serving_here.readahead)


def _load_state_dict(
    checkpoint_file: Any,
    map_location: Any = "cpu",
    weights_only: bool = True,
    disable_mmap: bool | None = None,
) -> dict[str, Any]:
    target = _serving_here.target
    if target is None:
        return _original("load_state_dict")(
            checkpoint_file,
            map_location=map_location,
            weights_only=weights_only,
            disable_mmap=disable_mmap,
        )
    if map_location == "meta":
        # Shapes and dtypes only (transformers' dtype detection): CPU views, never read.
        views = SafeOpen(checkpoint_file, device="cpu")
        out = {}
        for k in views.keys():
            t = views.get_tensor(k)
            out[k] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        return out
    source = _Source(checkpoint_file, target, _serving_here.readahead)
    return {k: source.get_slice(k) for k in source.keys()}


def _is_on_hf_mount(path: Any) -> bool:
    if _serving_here.target is None:
        return bool(_original("_is_on_hf_mount")(path))
    return False  # zeroload reads the file itself, whatever the file system


class _Source:
    """What transformers gets instead of a `safe_open` handle: the same calls, zeroload
    underneath. Closing it is a no-op: the slices it gave out keep the file open until
    transformers has materialised them (they hold references, not the handle)."""

    def __init__(self, path: Any, target: torch.device, readahead: _torch.Readahead | None) -> None:
        self._handle = SafeOpen(path, device=target)
        if readahead is not None:
            for ckpt in self._handle._ckpts:
                readahead.start(ckpt, None)

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def keys(self) -> list[str]:
        return self._handle.keys()

    def offset_keys(self) -> list[str]:
        return self._handle.offset_keys()

    def metadata(self) -> dict[str, str] | None:
        return self._handle.metadata()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def get_slice(self, name: str) -> _LazyTensor:
        self._handle._lookup(name)  # a KeyError naming the file now, not later
        return _LazyTensor(self._handle, name)


class _LazyTensor:
    """A tensor not read yet, as safetensors' `get_slice` gives it: `[...]` reads it
    (zero-copy on the CPU; through the staging ring on a GPU), other indices read only
    the part selected."""

    __slots__ = ("_handle", "_name")

    def __init__(self, handle: SafeOpen, name: str) -> None:
        self._handle = handle
        self._name = name

    def __getitem__(self, item: Any) -> torch.Tensor:
        if item is Ellipsis:
            return self._handle.get_tensor(self._name)
        return self._handle.get_slice(self._name)[item]

    def get_shape(self) -> list[int]:
        return self._handle.get_slice(self._name).get_shape()

    def get_dtype(self) -> str:
        return self._handle.get_slice(self._name).get_dtype()

    def __repr__(self) -> str:
        return f"<zeroload lazy tensor {self._name!r}>"
