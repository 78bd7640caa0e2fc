"""Side-by-side comparison of loading methods, each in a fresh Python process.

This backs ``zeroload demo``, ``zeroload bench`` and ``benchmarks/gpu_load.py``. Every
method runs in its own ``python -c``-style subprocess (a fresh interpreter,
so one method's caches, allocator pools and page-table state cannot flatter the next). In
the child, after imports (and CUDA initialisation when the device is a GPU), the timed and
memory-tracked block is exactly what a user would write to get a usable model (or state
dict): building the model (``GPTModel(cfg)`` or on the meta device) plus loading the
weights, as the seed notebook's ``memory_usage_in_gb`` measured it. The correctness check
(the model's output on a fixed input compared with the original model's, or a digest of
every tensor in state-dict mode) runs after the measurement, so touching mmap-backed pages
for the check is not counted as loading.

Loaders that map the file (``torch.load(mmap=True)``, safetensors, zeroload on the CPU)
return before reading the weights; the first forward pass then pays for the reads. So each
child also times reading every byte of every tensor right after loading (a sum per tensor,
as a first forward pass would touch them): ``touched_s`` is load plus that, the time until
every weight has been read, which is what a user waits for, and ``cpu_peak_read`` is the
peak RSS increase from the start of the load until then: the fair memory figure, since a
lazy loader's peak at return is before it has read anything.

With ``repeat=N`` every method runs N times, round-robin (each time in a fresh process);
a row holds the median of each figure and every run's figures (``runs``), and the table
prints medians with their ranges and a ratio only where two ranges do not overlap.

Model mode methods (the seed notebook's, plus zeroload):
    baseline     ``GPTModel(cfg).to(dev); load_state_dict(torch.load(p, map_location=dev))``
    sequential   model on ``dev``; ``torch.load`` on CPU; copy tensor by tensor
    meta         meta-device model; ``load_state_dict(torch.load(p, map_location=dev,
                 weights_only=True), assign=True)``
    mmap_assign  as ``meta`` with ``torch.load(..., mmap=True)``
    per_tensor   model on ``dev``; one ``torch.load`` per tensor file (the seed's
                 "save and load each weight tensor separately")
    zeroload     meta-device model; ``load_state_dict(zeroload.load(p, device=dev),
                 assign=True)``

State-dict mode methods (a checkpoint without a model class):
    torch_load, torch_load_mmap, safetensors (``.safetensors`` files), zeroload
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Sequence, Union

from zeroload._units import format_bytes
from zeroload.bench import MODEL_METHODS, STATE_DICT_METHODS

__all__ = [
    "MODEL_METHODS",
    "STATE_DICT_METHODS",
    "Row",
    "compare_model",
    "compare_state_dict",
    "format_table",
    "plot",
    "save_per_tensor_files",
]

PathLike = Union[str, "os.PathLike[str]"]

_RESULT_TAG = "ZEROLOAD_COMPARE_RESULT "


@dataclass
class Row:
    """One method's result. Memory in bytes (increases over the child's baseline)."""

    method: str
    description: str = ""
    ok: bool = False
    cpu_peak: int | None = None
    cpu_sampled_peak: int | None = None
    cpu_hwm_peak: int | None = None
    gpu_peak_allocated: int | None = None
    gpu_peak_used: int | None = None
    wall_s: float | None = None
    touched_s: float | None = None  # wall_s plus reading every byte of every tensor
    cpu_peak_read: int | None = None  # peak RSS increase until every weight has been read
    check: str = ""  # "equal", "differs (...)", "reference", "" when not checked
    error: str | None = None
    extra: Dict[str, Any] = field(default_factory=dict)
    runs: List[Dict[str, Any]] = field(default_factory=list)  # every run's figures

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def span(self, name: str) -> tuple | None:
        """(min, max) of figure ``name`` over the runs (the median is the attribute)."""
        values = [r[name] for r in self.runs if r.get(name) is not None]
        if not values:
            value = getattr(self, name)
            return None if value is None else (value, value)
        return (min(values), max(values))


# --------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------


def _init_device(device: str) -> Any:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available in this process")
        torch.cuda.set_device(dev)
        torch.zeros(1, device=dev)  # create the context before the baseline
        torch.cuda.synchronize()
    return dev


def _load_model(method: str, spec: Dict[str, Any], dev: Any) -> Any:
    import torch

    from zeroload.bench.gptmodel import GPTModel

    cfg = spec["config"]
    path = spec["checkpoint"]
    if method == "baseline":
        model = GPTModel(cfg)
        model.to(dev)
        model.load_state_dict(torch.load(path, map_location=dev, weights_only=True))
    elif method == "sequential":
        model = GPTModel(cfg).to(dev)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                t.copy_(state_dict[name].to(dev))
        del state_dict
    elif method == "meta":
        with torch.device("meta"):
            model = GPTModel(cfg)
        model.load_state_dict(torch.load(path, map_location=dev, weights_only=True), assign=True)
    elif method == "mmap_assign":
        with torch.device("meta"):
            model = GPTModel(cfg)
        model.load_state_dict(
            torch.load(path, map_location=dev, weights_only=True, mmap=True), assign=True
        )
    elif method == "per_tensor":
        model = GPTModel(cfg).to(dev)
        folder = Path(spec["per_tensor_dir"])
        with torch.no_grad():
            for name, t in model.state_dict().items():
                t.copy_(torch.load(folder / f"{name}.pt", map_location=dev, weights_only=True))
    elif method == "zeroload":
        import zeroload

        with torch.device("meta"):
            model = GPTModel(cfg)
        model.load_state_dict(zeroload.load(path, device=dev), assign=True)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(MODEL_METHODS)}")
    return model.eval()


def _load_state_dict(method: str, spec: Dict[str, Any], dev: Any) -> Any:
    import torch

    files: List[str] = spec["files"]
    if method == "zeroload":
        import zeroload

        return zeroload.load(spec["checkpoint"], device=dev)
    out: Dict[str, Any] = {}
    for f in files:
        if method == "torch_load":
            part = torch.load(f, map_location=dev, weights_only=True)
        elif method == "torch_load_mmap":
            part = torch.load(f, map_location=dev, weights_only=True, mmap=True)
        elif method == "safetensors":
            from safetensors.torch import load_file

            part = load_file(f, device=str(dev))
        else:
            raise ValueError(
                f"unknown method {method!r}; choose from {', '.join(STATE_DICT_METHODS)}"
            )
        if len(files) == 1:
            return part
        out.update(part)
    return out


def named_tensors(obj: Any, prefix: str = "") -> Iterable[tuple]:
    """Every tensor in a nested structure of dicts, lists and tuples, as (dotted path, tensor)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def digest(obj: Any) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in sorted name order)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(named_tensors(obj), key=lambda kv: kv[0]):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            flat = t.cpu().contiguous().reshape(-1).view(torch.uint8)
            h.update(memoryview(flat.numpy()))
    return h.hexdigest()


def touch_all(obj: Any) -> None:
    """Read every byte of every tensor of ``obj`` (a module's state dict, or tensors in
    nested containers): a sum per tensor, synchronised on CUDA. Pages of mmap-backed
    tensors are faulted in here, as a first forward pass would."""
    import torch

    if isinstance(obj, torch.nn.Module):
        tensors: Iterable[Any] = obj.state_dict().values()
    else:
        tensors = (t for _, t in named_tensors(obj))
    cuda = False
    for t in tensors:
        if not t.numel():
            continue
        cuda = cuda or t.is_cuda
        t = t.detach()
        try:
            t.sum()
        except (RuntimeError, TypeError):  # dtypes without a sum kernel (float8, ...)
            t.clone()
    if cuda:
        torch.cuda.synchronize()


def _warm_up(method: str, spec: Dict[str, Any]) -> None:
    """Pay one-time costs (lazy imports, first use of the meta device and of each loader)
    on a tiny file before the baseline, so the measurement is of loading, not of them."""
    import io

    import torch

    small = {"w": torch.zeros(2, 2)}
    small["w"].sum()  # start the intra-op thread pool that touch_all's sums use
    buf = io.BytesIO()
    torch.save(small, buf)
    if spec.get("mode") == "model":
        from zeroload.bench.gptmodel import GPTModel, config

        tiny = config("tiny")
        with torch.device("meta"):
            meta_model = GPTModel(tiny)
        meta_model.load_state_dict(GPTModel(tiny).state_dict(), assign=True)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    warm = spec.get("warmup_file")
    if warm and method in ("zeroload", "torch_load_mmap", "mmap_assign", "safetensors"):
        if method == "zeroload":
            import zeroload

            zeroload.load(warm)
        elif method == "safetensors":
            from safetensors.torch import load_file

            load_file(warm)
        else:
            torch.load(warm, weights_only=True, mmap=True)
    if method == "zeroload":
        import zeroload


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    import gc
    import time

    import torch

    from zeroload._track import track

    torch.set_grad_enabled(False)
    method = spec["method"]
    dev = _init_device(spec["device"])
    ref: Any = None
    if spec.get("reference"):
        ref = torch.load(spec["reference"], map_location="cpu", weights_only=True)
    _warm_up(method, spec)
    gc.collect()
    with track(method, gpu=dev.type == "cuda") as t:
        if spec["mode"] == "model":
            obj = _load_model(method, spec, dev)
        else:
            obj = _load_state_dict(method, spec, dev)
    result: Dict[str, Any] = {k: v for k, v in t.as_dict().items() if k != "label"}
    start = time.perf_counter()
    with track("read", gpu=False) as reading:
        touch_all(obj)
    result["touched_s"] = result["wall_s"] + (time.perf_counter() - start)
    # The peak from the start of the load until every weight has been read: reading began
    # at the load's end level (cpu_end over the load's baseline).
    result["cpu_peak_read"] = max(t.cpu_peak, t.cpu_end + reading.cpu_peak)
    if spec["mode"] == "model":
        out = obj(ref["input"].to(dev)).cpu()
        if ref.get("output_device") == dev.type or dev.type == "cpu":
            expected = ref["output"]
        else:
            expected = None
        if expected is not None:
            if torch.equal(out, expected):
                result["check"] = "equal"
            else:
                diff = (out.double() - expected.double()).abs().max().item()
                result["check"] = f"differs (max |diff| {diff:.3g})"
        if spec.get("save_output"):
            torch.save(out, spec["save_output"])
    else:
        result["digest"] = digest(obj)
    return result


def _child_main(argv: Sequence[str]) -> int:
    spec = json.loads(argv[0])
    result = _child(spec)
    sys.stdout.write(_RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])  # the directory holding zeroload/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_child(spec: Dict[str, Any], timeout: float | None = None) -> Dict[str, Any]:
    """Run one method in a fresh interpreter; return its result dict or ``{"error": ...}``."""
    cmd = [sys.executable, "-m", "zeroload.bench.compare", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_child_env(), timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
    return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}


_FIGURES = (
    "cpu_peak",
    "cpu_sampled_peak",
    "cpu_hwm_peak",
    "cpu_peak_read",
    "gpu_peak_allocated",
    "gpu_peak_used",
    "wall_s",
    "touched_s",
)


def _median(values: List[Any]) -> Any:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    if len(values) % 2:
        return values[mid]
    low, high = values[mid - 1], values[mid]
    both_int = isinstance(low, int) and isinstance(high, int)
    return (low + high) // 2 if both_int else (low + high) / 2


def _row(
    method: str, description: str, results: Union[Dict[str, Any], List[Dict[str, Any]]]
) -> Row:
    """One row from a method's runs: the median of each figure; failed if any run failed;
    the check is the worst run's (a run that differs makes the row differ)."""
    runs = [results] if isinstance(results, dict) else list(results)
    row = Row(method=method, description=description)
    failed = next((r for r in runs if "error" in r), None)
    if failed is not None:
        row.error = failed["error"]
        return row
    row.ok = True
    row.runs = [{name: r.get(name) for name in _FIGURES} for r in runs]
    for name in _FIGURES:
        setattr(row, name, _median([r.get(name) for r in runs]))
    checks = [r.get("check", "") for r in runs]
    row.check = next((c for c in checks if c.startswith("differs")), checks[0])
    digests = {r["digest"] for r in runs if "digest" in r}
    if len(digests) == 1:
        row.extra["digest"] = digests.pop()
    elif digests:
        row.extra["digest"] = "runs differ"
    return row


def _run_rounds(
    methods: Sequence[str],
    spec_of: Callable[[str], Dict[str, Any]],
    repeat: int,
    timeout: float | None,
    verbose: bool,
    before_each: Callable[[str], None] | None,
) -> Dict[str, List[Dict[str, Any]]]:
    """Every method ``repeat`` times, round-robin (so a slow drift of the machine spreads
    over all methods alike), each run in a fresh process; a method that fails is not
    run again."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, not {repeat}")
    results: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
    for round_no in range(repeat):
        for m in methods:
            if any("error" in r for r in results[m]):
                continue
            if verbose:
                of = f" ({round_no + 1}/{repeat})" if repeat > 1 else ""
                print(f"  running {m} in a fresh process{of} ...", file=sys.stderr, flush=True)
            if before_each is not None:
                before_each(m)
            results[m].append(run_child(spec_of(m), timeout))
    return results


def _write_warmup(folder: Path, like: Path | None = None) -> Path:
    """A tiny checkpoint in the same format as ``like`` for the children's warm-up."""
    import torch

    small = {"w": torch.zeros(4, 4)}
    if like is not None and like.suffix == ".safetensors":
        from safetensors.torch import save_file

        path = folder / "warmup.safetensors"
        save_file(small, path)
        return path
    path = folder / "warmup.pth"
    torch.save(small, path)
    return path


def save_per_tensor_files(state_dict: Dict[str, Any], folder: PathLike) -> Path:
    """Save every tensor of ``state_dict`` as ``folder/<name>.pt`` (the seed's layout)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in state_dict.items():
        torch.save(t.detach().clone(), folder / f"{name}.pt")
    return folder


def make_reference(
    model: Any, path: PathLike, *, tokens: int = 16, seed: int = 0, device: str = "cpu"
) -> Path:
    """Save a fixed input and the model's output on it (the parent's reference)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = model.tok_emb.num_embeddings
    ctx = model.pos_emb.num_embeddings
    idx = torch.randint(0, vocab, (1, min(tokens, ctx)), generator=gen)
    with torch.no_grad():
        out = model.eval()(idx.to(device)).cpu()
    torch.save({"input": idx, "output": out, "output_device": torch.device(device).type}, path)
    return Path(path)


def compare_model(
    checkpoint: PathLike,
    config: Union[str, Dict[str, Any]],
    *,
    device: str = "cpu",
    methods: Sequence[str] | None = None,
    reference: PathLike | None = None,
    workdir: PathLike | None = None,
    timeout: float | None = None,
    verbose: bool = True,
    before_each: Callable[[str], None] | None = None,
    repeat: int = 1,
) -> List[Row]:
    """Load a ``GPTModel`` checkpoint with each method in a fresh process; return the rows.

    Args:
        checkpoint: a ``torch.save(model.state_dict())`` file of the seed's GPTModel.
        config: the model configuration (a name from ``zeroload.bench.gptmodel.CONFIGS`` or dict).
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        methods: names from :data:`MODEL_METHODS` (all by default).
        reference: a file from :func:`make_reference`; the original model's output on CPU.
            On a GPU, the output of a plain ``torch.load`` run on the device becomes the
            reference for the others, after checking it against the CPU's within rounding.
        workdir: where per-tensor files go (a temporary directory by default).
        timeout: seconds allowed per method.
        verbose: print progress lines to stderr.
        before_each: called with the method name before each child starts (e.g. to drop
            the page cache for a cold-cache run).
        repeat: runs per method (round-robin, each in a fresh process); each row holds
            the medians, and every run's figures in ``runs``.
    """
    import torch

    from zeroload.bench import gptmodel

    cfg = gptmodel.config(config) if isinstance(config, str) else dict(config)
    methods = list(methods or MODEL_METHODS)
    for m in methods:
        if m not in MODEL_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(MODEL_METHODS)}")
    checkpoint = Path(checkpoint)
    dev_type = torch.device(device).type
    with tempfile.TemporaryDirectory(prefix="zeroload-compare-", dir=workdir) as tmp:
        tmpdir = Path(tmp)
        if reference is None:
            if verbose:
                print("  building the reference output (torch.load, CPU)", file=sys.stderr)
            with torch.device("meta"):
                ref_model = gptmodel.GPTModel(cfg)
            sd = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
            ref_model.load_state_dict(sd, assign=True)
            reference = make_reference(ref_model, tmpdir / "reference.pt")
            del ref_model, sd
        ref_path = Path(reference)
        warm = _write_warmup(tmpdir)
        per_tensor_dir = tmpdir / "per_tensor"
        if "per_tensor" in methods:
            sd = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
            save_per_tensor_files(sd, per_tensor_dir)
            del sd
        if dev_type != "cpu":
            # The GPU's output can differ from the CPU's in the last bits: take the output
            # of a plain torch.load on the device as the reference, after checking it.
            if verbose:
                print(f"  building the reference output on {device}", file=sys.stderr)
            dev_out = tmpdir / "device_output.pt"
            spec = _spec("model", "sequential", checkpoint, device, cfg, ref_path, per_tensor_dir)
            spec["save_output"] = str(dev_out)
            res = run_child(spec, timeout)
            if "error" in res:
                raise RuntimeError(f"reference run on {device} failed: {res['error']}")
            ref = torch.load(ref_path, weights_only=True)
            out = torch.load(dev_out, weights_only=True)
            if not torch.allclose(out, ref["output"], rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"the model's output on {device} does not match the CPU's")
            ref["output"], ref["output_device"] = out, dev_type
            ref_path = tmpdir / "reference_device.pt"
            torch.save(ref, ref_path)

        def spec_of(m: str) -> Dict[str, Any]:
            spec = _spec("model", m, checkpoint, device, cfg, ref_path, per_tensor_dir)
            spec["warmup_file"] = str(warm)
            return spec

        results = _run_rounds(methods, spec_of, repeat, timeout, verbose, before_each)
    return [_row(m, MODEL_METHODS[m], results[m]) for m in methods]


def _spec(
    mode: str,
    method: str,
    checkpoint: Path,
    device: str,
    cfg: Dict[str, Any] | None = None,
    reference: Path | None = None,
    per_tensor_dir: Path | None = None,
    files: List[str] | None = None,
    warmup_file: Path | None = None,
) -> Dict[str, Any]:
    return {
        "warmup_file": str(warmup_file) if warmup_file else None,
        "mode": mode,
        "method": method,
        "checkpoint": str(checkpoint),
        "device": device,
        "config": cfg,
        "reference": str(reference) if reference else None,
        "per_tensor_dir": str(per_tensor_dir) if per_tensor_dir else None,
        "files": files or [str(checkpoint)],
    }


def _checkpoint_files(path: Path) -> List[str]:
    if path.is_dir() or path.name.endswith(".index.json"):
        from zeroload import _shards

        resolved = _shards.resolve(path)
        return [str(p) for p in resolved.files]
    return [str(path)]


def default_state_dict_methods(path: PathLike) -> List[str]:
    """The methods that apply to ``path`` (safetensors or torch files)."""
    files = _checkpoint_files(Path(path))
    if all(f.endswith(".safetensors") for f in files):
        return ["safetensors", "zeroload"]
    if any(f.endswith(".safetensors") for f in files):
        return ["zeroload"]
    return ["torch_load", "torch_load_mmap", "zeroload"]


def compare_state_dict(
    checkpoint: PathLike,
    *,
    device: str = "cpu",
    methods: Sequence[str] | None = None,
    timeout: float | None = None,
    verbose: bool = True,
    before_each: Callable[[str], None] | None = None,
    repeat: int = 1,
) -> List[Row]:
    """Load a checkpoint as a state dict with each method in a fresh process (``repeat``
    times each, as :func:`compare_model` does).

    The check column compares a SHA-256 digest of every tensor (name, dtype, shape, bytes)
    with the first method's (``torch.load`` or ``safetensors``; its row says ``reference``):
    ``equal`` means bit-identical.
    """
    checkpoint = Path(checkpoint)
    files = _checkpoint_files(checkpoint)
    methods = list(methods or default_state_dict_methods(checkpoint))
    for m in methods:
        if m not in STATE_DICT_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(STATE_DICT_METHODS)}")
    with tempfile.TemporaryDirectory(prefix="zeroload-compare-") as tmp:
        warm = _write_warmup(Path(tmp), Path(files[0]))

        def spec_of(m: str) -> Dict[str, Any]:
            return _spec("state_dict", m, checkpoint, device, files=files, warmup_file=warm)

        results = _run_rounds(methods, spec_of, repeat, timeout, verbose, before_each)
    rows = [_row(m, STATE_DICT_METHODS[m], results[m]) for m in methods]
    # The reference row is not compared with itself: its check says what it is.
    base = next((r for r in rows if r.ok and r.method != "zeroload"), None)
    for r in rows:
        if r.ok and base is not None:
            same = r.extra.get("digest") == base.extra.get("digest")
            r.check = "reference" if r is base else "equal" if same else "differs"
    return rows


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


_SCALES = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10, "B": 1}


def _mem(value: int | None, span: tuple | None) -> str:
    """A memory figure, and its range (in the median's unit) when the runs differ."""
    text = format_bytes(value, 2)
    if value is None or span is None or span[0] == span[1]:
        return text
    scale = _SCALES[text.split()[-1]]
    digits = 0 if scale == 1 else 2
    return f"{text} ({span[0] / scale:.{digits}f}-{span[1] / scale:.{digits}f})"


def _secs(value: float | None, span: tuple | None) -> str:
    """A time in seconds, and its range when the runs differ."""
    if value is None:
        return "-"
    if span is None or span[0] == span[1]:
        return f"{value:.2f} s"
    return f"{value:.2f} s ({span[0]:.2f}-{span[1]:.2f})"


def _ratio(row: Row, base: Row, name: str, floor: float) -> str:
    """``row``'s median over ``base``'s for figure ``name``, or "same" where the two rows'
    ranges over their runs overlap (the difference is within the noise)."""
    value, ref = getattr(row, name), getattr(base, name)
    if value is None or ref is None:
        return "-"
    (lo, hi), (ref_lo, ref_hi) = row.span(name), base.span(name)
    lo, hi, ref_lo, ref_hi = (max(x, floor) for x in (lo, hi, ref_lo, ref_hi))
    if lo <= ref_hi and ref_lo <= hi:
        return "same"
    return f"{max(value, floor) / max(ref, floor):.1f}x"


def format_table(rows: Sequence[Row], *, title: str = "", against: str = "zeroload") -> str:
    """One aligned text table of the rows, then ratios against ``against``.

    Each figure is the median over the runs, with its range (lowest-highest) when the runs
    differ. ``peak RSS, all read`` is the peak CPU RSS increase until every weight has
    been read (the fair figure: a lazy loader's ``peak RSS at load`` is taken before it has
    read anything); ``load`` is the time until the model (or dict) is returned; ``all
    read`` adds reading every byte of every tensor, which mmap-based loaders defer to
    first use. A ratio is printed only where the two ranges do not overlap ("same"
    otherwise).
    """
    show_gpu = any(r.gpu_peak_allocated is not None for r in rows)
    show_touched = any(r.touched_s is not None for r in rows)
    show_read_peak = any(r.cpu_peak_read is not None for r in rows)
    headers = ["method"]
    headers += ["peak RSS, all read"] if show_read_peak else []
    headers += ["peak RSS at load"]
    headers += ["peak GPU alloc", "peak GPU used"] if show_gpu else []
    headers += ["load"] + (["all read"] if show_touched else [])
    headers += ["check", "what it does"]
    table = []
    for r in rows:
        if not r.ok:
            cells = [r.method] + ["-"] * (len(headers) - 3) + ["FAILED", (r.error or "")[:90]]
        else:
            cells = [r.method]
            if show_read_peak:
                cells.append(_mem(r.cpu_peak_read, r.span("cpu_peak_read")))
            cells.append(_mem(r.cpu_peak, r.span("cpu_peak")))
            if show_gpu:
                cells.append(_mem(r.gpu_peak_allocated, r.span("gpu_peak_allocated")))
                cells.append(_mem(r.gpu_peak_used, r.span("gpu_peak_used")))
            cells.append(_secs(r.wall_s, r.span("wall_s")))
            if show_touched:
                cells.append(_secs(r.touched_s, r.span("touched_s")))
            cells += [r.check or "-", r.description]
        table.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *table)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = []
    if title:
        out.append(title)
    runs = max((len(r.runs) for r in rows if r.ok), default=1)
    if runs > 1:
        out.append(f"medians of {runs} runs per method (range: lowest-highest)")
    out.append(line(headers))
    out.append(line(["-" * w for w in widths]))
    out.extend(line(c) for c in table)
    base = next((r for r in rows if r.method == against and r.ok), None)
    others = [r for r in rows if r.ok and r is not base]
    if base is not None and others:
        out.append("")
        out.append(
            f"ratios (method / {against}, medians; 'same' where the ranges overlap; "
            "peaks floored at 1 MiB, times at 1 ms):"
        )
        mib = float(1 << 20)
        for r in others:
            parts = []
            if show_read_peak:
                parts.append(f"peak RSS all read {_ratio(r, base, 'cpu_peak_read', mib)}")
            if show_touched:
                parts.append(f"all read {_ratio(r, base, 'touched_s', 1e-3)}")
            if show_gpu:
                parts.append(f"GPU {_ratio(r, base, 'gpu_peak_allocated', mib)}")
            parts.append(f"peak RSS at load {_ratio(r, base, 'cpu_peak', mib)}")
            parts.append(f"load {_ratio(r, base, 'wall_s', 1e-3)}")
            out.append(f"  {r.method:<{widths[0]}}  " + ", ".join(parts))
    return "\n".join(out)


def plot(rows: Sequence[Row], path: PathLike, *, title: str = "") -> Path:
    """Write a bar chart (peak CPU RSS, peak GPU memory when measured, times) as a PNG:
    medians, with the range over the runs as error bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.ok]
    names = [r.method for r in ok]
    gib = float(1 << 30)
    figures = []
    if any(r.cpu_peak_read is not None for r in ok):
        figures.append(("peak CPU RSS until all read (GiB)", "cpu_peak_read", gib))
    figures.append(("peak CPU RSS at load (GiB)", "cpu_peak", gib))
    if any(r.gpu_peak_allocated is not None for r in ok):
        figures.append(("peak GPU allocated (GiB)", "gpu_peak_allocated", gib))
    figures.append(("time to load (s)", "wall_s", 1.0))
    if any(r.touched_s is not None for r in ok):
        figures.append(("time until all weights read (s)", "touched_s", 1.0))
    panels = []
    for label, name, scale in figures:
        values = [(getattr(r, name) or 0) / scale for r in ok]
        spans = [r.span(name) or (0, 0) for r in ok]
        errors = [
            [max(v - lo / scale, 0.0) for v, (lo, _) in zip(values, spans)],
            [max(hi / scale - v, 0.0) for v, (_, hi) in zip(values, spans)],
        ]
        panels.append((label, values, errors))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colors = ["#d62728" if n == "zeroload" else "#7f7f7f" for n in names]
    for ax, (label, values, errors) in zip(axes[0], panels):
        bars = ax.bar(range(len(names)), values, yerr=errors, capsize=3, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        for b, v in zip(bars, values):
            ax.annotate(
                f"{v:.2f}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
