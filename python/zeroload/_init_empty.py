"""`zeroload.init_empty()`: build a module with its parameters on the meta device (no
memory) and its buffers real, ready for `zeroload.load_into`.

Inside the context, every parameter a module registers (`self.weight = nn.Parameter(...)`,
`register_parameter`) is replaced by a meta-device parameter of the same class, shape,
dtype, `requires_grad` and attributes; initialisers that run on it afterwards
(`reset_parameters`, `_init_weights`) cost nothing. Buffers are left as `__init__`
computes them (rotary `inv_freq`, causal masks, position ids): they are real and
correct, and most of them (non-persistent buffers) are not in any checkpoint, so a
meta-device buffer would leave the model unable to run. `include_buffers=True` puts
buffers on meta too.

This is accelerate's `init_empty_weights` without the dependency, with two differences:
a parameter registered under several names (tied weights: `lm_head.weight =
embed.weight`) stays one object, and the context may be nested.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

_META = torch.device("meta")
_lock = threading.Lock()


def _to_meta_parameter(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """`param` as a meta-device parameter: same class, `requires_grad` and attributes."""
    data = param.detach().to(_META)
    cls = type(param)
    attrs = dict(param.__dict__)
    if cls is torch.nn.Parameter:
        new = torch.nn.Parameter(data, requires_grad=param.requires_grad)
        new.__dict__.update(attrs)
        return new
    # A Parameter subclass (a quantised weight): its constructor takes its attributes, as
    # accelerate assumes.
    attrs["requires_grad"] = param.requires_grad
    return cls(data, **attrs)


@contextlib.contextmanager
def init_empty(include_buffers: bool = False) -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real.

        with zeroload.init_empty():
            model = MyModel(cfg)       # or AutoModelForCausalLM.from_config(cfg)
        zeroload.load_into(model, "model.safetensors", device="cuda")

    Parameters take no memory until `load_into` (or `load_state_dict(assign=True)`)
    replaces them; buffers are computed by the modules' `__init__` as usual, so the
    model runs once its parameters are loaded. A parameter registered under two names
    (tied weights) stays one parameter.

    Args:
        include_buffers: put buffers on the meta device too (then they must all come
            from the checkpoint, or be recomputed, before the model can run).

    While the context is active, `nn.Module.register_parameter` (and, with
    `include_buffers`, `register_buffer`) is patched for every thread, as accelerate's
    `init_empty_weights` does.
    """
    if not isinstance(include_buffers, bool):
        raise TypeError(f"include_buffers must be True or False, not {include_buffers!r}")
    module_cls = torch.nn.Module
    # Each parameter (buffer) registered here, as the meta tensor that replaced it: one
    # registered under a second name gets the same meta tensor (ties stay ties).
    replaced: WeakIdKeyDictionary = WeakIdKeyDictionary()
    with _lock:
        old_register_parameter = module_cls.register_parameter
        old_register_buffer = module_cls.register_buffer

    def register_parameter(
        self: torch.nn.Module, name: str, param: torch.nn.Parameter | None
    ) -> None:
        if isinstance(param, torch.nn.Parameter) and not param.is_meta:
            meta = replaced.get(param)
            if meta is None:
                meta = replaced[param] = _to_meta_parameter(param)
            param = meta
        old_register_parameter(self, name, param)

    def register_buffer(
        self: torch.nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
            meta = replaced.get(tensor)
            if meta is None:
                meta = replaced[tensor] = tensor.to(_META)
            tensor = meta
        old_register_buffer(self, name, tensor, persistent=persistent)

    # An outer `init_empty(include_buffers=True)`'s patch, undone inside this one when
    # this one keeps buffers real: the innermost context decides.
    unpatched_register_buffer = getattr(old_register_buffer, "_zeroload_unpatched", None)
    register_buffer._zeroload_unpatched = (  # type: ignore[attr-defined]
        unpatched_register_buffer or old_register_buffer
    )
    with _lock:
        module_cls.register_parameter = register_parameter  # type: ignore[method-assign]
        if include_buffers:
            module_cls.register_buffer = register_buffer  # type: ignore[method-assign]
        elif unpatched_register_buffer is not None:
            module_cls.register_buffer = unpatched_register_buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        with _lock:
            module_cls.register_parameter = old_register_parameter  # type: ignore[method-assign]
            module_cls.register_buffer = old_register_buffer  # type: ignore[method-assign]
