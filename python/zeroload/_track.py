"""``zeroload.track()``: peak CPU and GPU memory of a block of code.

The seed notebook measured CPU memory with a thread that samples the resident set size every
100 ms; short spikes between samples go unseen. ``track`` samples faster and also reads the
kernel's own high-water mark (``VmHWM`` in ``/proc/self/status``, reset at the start of the
block through ``/proc/self/clear_refs`` where the kernel allows it), so the peak it reports
is exact on Linux. On the GPU it uses PyTorch's allocator statistics
(``torch.cuda.max_memory_allocated``) and samples the device-level used memory
(``torch.cuda.mem_get_info``), which also sees memory allocated outside PyTorch's allocator.

All figures are *increases* over the moment the block starts.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, TypeVar, Union, overload

from zeroload._procfs import proc_kib_field
from zeroload._units import format_bytes

__all__ = ["Track", "TrackResult", "track"]

F = TypeVar("F", bound=Callable[..., Any])

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_active: List[_Tracker] = []
_active_lock = threading.Lock()


def _rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - macOS without psutil (a dependency on Windows)
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _hwm_bytes() -> int | None:
    """The kernel's peak RSS of this process (``VmHWM``), or None where there is none."""
    return proc_kib_field("/proc/self/status", b"VmHWM")


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cuda() -> Any:
    """``torch.cuda`` if torch is imported and a CUDA device is usable, else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover - broken driver
        return None


def _fmt_bytes(n: int | None) -> str:
    return format_bytes(n, 2, none="n/a")


@dataclass
class TrackResult:
    """Memory and time used by a tracked block; filled in when the block ends.

    Attributes (bytes unless stated; increases over the start of the block):
        label: the name given to ``track``.
        cpu_peak: peak RSS increase, the larger of the sampled peak and ``VmHWM``.
        cpu_sampled_peak: peak RSS increase seen by the sampling thread.
        cpu_hwm_peak: peak RSS increase from the kernel's ``VmHWM`` (None if unavailable).
        cpu_end: RSS increase when the block ended (what it kept).
        gpu_peak_allocated: peak of ``torch.cuda.memory_allocated`` over the block (None
            without CUDA).
        gpu_peak_used: peak device-level used memory (``mem_get_info``), sampled (None without
            CUDA or when CUDA was not initialised when the block started).
        wall_s: seconds the block took (CUDA work synchronised at the end).
        samples: number of RSS samples taken.
    """

    label: str | None = None
    cpu_peak: int = 0
    cpu_sampled_peak: int = 0
    cpu_hwm_peak: int | None = None
    cpu_end: int = 0
    gpu_peak_allocated: int | None = None
    gpu_peak_used: int | None = None
    wall_s: float = 0.0
    samples: int = 0
    done: bool = field(default=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The figures as a plain dict (bytes and seconds)."""
        return {
            "label": self.label,
            "cpu_peak": self.cpu_peak,
            "cpu_sampled_peak": self.cpu_sampled_peak,
            "cpu_hwm_peak": self.cpu_hwm_peak,
            "cpu_end": self.cpu_end,
            "gpu_peak_allocated": self.gpu_peak_allocated,
            "gpu_peak_used": self.gpu_peak_used,
            "wall_s": self.wall_s,
            "samples": self.samples,
        }

    def _items(self) -> List[tuple[str, str]]:
        items = [("peak CPU RSS", "+" + _fmt_bytes(self.cpu_peak))]
        if self.gpu_peak_allocated is not None:
            items.append(("peak GPU allocated", "+" + _fmt_bytes(self.gpu_peak_allocated)))
        if self.gpu_peak_used is not None:
            items.append(("peak GPU used (device)", "+" + _fmt_bytes(self.gpu_peak_used)))
        items.append(("time", f"{self.wall_s:.3f} s"))
        return items

    def __repr__(self) -> str:
        name = f" {self.label!r}" if self.label else ""
        if not self.done:
            return f"<track{name}: running>"
        body = ", ".join(f"{k} {v}" for k, v in self._items())
        return f"<track{name}: {body}>"

    __str__ = __repr__

    def _repr_html_(self) -> str:
        import html

        title = html.escape(self.label or "zeroload.track")
        if not self.done:
            return f"<b>{title}</b>: running"
        rows = "".join(
            f"<tr><td style='text-align:left'>{html.escape(k)}</td>"
            f"<td style='text-align:right'>{html.escape(v)}</td></tr>"
            for k, v in self._items()
        )
        return f"<table><caption><b>{title}</b></caption>{rows}</table>"


class _Tracker:
    """One measurement in progress (one per ``with`` block or decorated call)."""

    def __init__(self, label: str | None, interval: float, gpu: bool | None) -> None:
        self.result = TrackResult(label=label)
        self.interval = interval
        self.gpu = gpu
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._rss_max = 0
        self._hwm_seen = 0  # absolute VmHWM values folded in from resets by nested trackers
        self._gpu_alloc_seen = 0
        self._used_max = 0

    # -- nesting: an inner tracker resets the kernel/allocator peaks; fold them in first --
    def _fold_peaks(self, cuda: Any) -> None:
        hwm = _hwm_bytes()
        if hwm is not None:
            self._hwm_seen = max(self._hwm_seen, hwm)
        if cuda is not None and self._cuda is not None and cuda.is_initialized():
            self._gpu_alloc_seen = max(self._gpu_alloc_seen, cuda.max_memory_allocated())

    def start(self) -> None:
        cuda = _cuda() if self.gpu is not False else None
        self._cuda = cuda
        with _active_lock:
            for outer in _active:
                outer._fold_peaks(cuda)
            _active.append(self)
        self._gpu_used0: int | None = None
        if cuda is not None:
            if cuda.is_initialized():
                cuda.synchronize()
                free, total = cuda.mem_get_info()
                self._gpu_used0 = total - free
                self._used_max = self._gpu_used0
            self._gpu_alloc0 = cuda.memory_allocated() if cuda.is_initialized() else 0
            if cuda.is_initialized():
                cuda.reset_peak_memory_stats()
        self._hwm_ok = _reset_hwm()
        self._rss0 = _rss_bytes()
        self._rss_max = self._rss0
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, name="zeroload-track", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        cuda = self._cuda if self._gpu_used0 is not None else None
        while True:
            rss = _rss_bytes()
            used = None
            if cuda is not None:
                try:
                    free, total = cuda.mem_get_info()
                    used = total - free
                except Exception:  # pragma: no cover - device lost mid-run
                    cuda = None
            with self._lock:
                self._rss_max = max(self._rss_max, rss)
                if used is not None:
                    self._used_max = max(self._used_max, used)
                self.result.samples += 1
            if self._stop.wait(self.interval):
                return

    def stop(self) -> TrackResult:
        cuda = self._cuda
        if cuda is not None and cuda.is_initialized():
            cuda.synchronize()
        wall = time.perf_counter() - self._t0
        rss_end = _rss_bytes()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _active_lock:
            if self in _active:
                _active.remove(self)
        r = self.result
        r.wall_s = wall
        self._rss_max = max(self._rss_max, rss_end)
        r.cpu_sampled_peak = self._rss_max - self._rss0
        r.cpu_end = rss_end - self._rss0
        hwm = _hwm_bytes()
        if self._hwm_ok and hwm is not None:
            r.cpu_hwm_peak = max(hwm, self._hwm_seen) - self._rss0
        r.cpu_peak = max(r.cpu_sampled_peak, r.cpu_hwm_peak or 0)
        if cuda is not None and cuda.is_initialized():
            peak = max(cuda.max_memory_allocated(), self._gpu_alloc_seen)
            r.gpu_peak_allocated = peak - self._gpu_alloc0
            if self._gpu_used0 is not None:
                free, total = cuda.mem_get_info()
                r.gpu_peak_used = max(self._used_max, total - free) - self._gpu_used0
        r.done = True
        return r


class Track:
    """A reusable context manager and decorator made by :func:`track`."""

    def __init__(
        self,
        label: str | None = None,
        *,
        interval: float = 0.005,
        gpu: bool | None = None,
        report: bool = True,
    ) -> None:
        self.label = label
        self.interval = interval
        self.gpu = gpu
        self.report = report
        self._stack: List[_Tracker] = []

    def __enter__(self) -> TrackResult:
        tracker = _Tracker(self.label, self.interval, self.gpu)
        self._stack.append(tracker)
        tracker.start()
        return tracker.result

    def __exit__(self, *exc: Any) -> None:
        self._stack.pop().stop()

    def __call__(self, func: F) -> F:
        label = self.label or getattr(func, "__qualname__", None)

        @functools.wraps(func)
        def wrapper(*a: Any, **kw: Any) -> Any:
            with Track(label, interval=self.interval, gpu=self.gpu) as t:
                out = func(*a, **kw)
            wrapper.last_track = t  # type: ignore[attr-defined]
            if self.report:
                print(t)
            return out

        wrapper.last_track = None  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"zeroload.track({self.label!r})"


@overload
def track(label: F) -> F: ...


@overload
def track(
    label: str | None = None,
    *,
    interval: float = 0.005,
    gpu: bool | None = None,
    report: bool = True,
) -> Track: ...


def track(
    label: Union[str, Callable[..., Any], None] = None,
    *,
    interval: float = 0.005,
    gpu: bool | None = None,
    report: bool = True,
) -> Any:
    """Measure peak memory and time of a block: a context manager and a decorator.

    Usage::

        with zeroload.track("load") as t:
            sd = zeroload.load("model.pth")
        print(t)          # <track 'load': peak CPU RSS +1.20 MiB, time 0.004 s>
        t.cpu_peak        # bytes; see TrackResult for every field

        @zeroload.track   # or @zeroload.track("name"); prints a report after each call
        def load(): ...   # the last result is kept as load.last_track

    Reports, as increases over the start of the block: peak CPU resident memory (a sampling
    thread plus the kernel's ``VmHWM`` high-water mark on Linux, so short spikes are not
    missed), and with CUDA the peak of ``torch.cuda.memory_allocated`` and of the
    device-level used memory. Memory-mapped file pages count as resident once touched (that
    is how ``zeroload.load`` CPU tensors and ``torch.load(mmap=True)`` work): measure the
    load, not the first forward pass, to see what loading costs.

    Args:
        label: a name shown in the report (a decorated function's name by default).
        interval: seconds between RSS samples.
        gpu: track CUDA memory; ``None`` = when torch is imported and CUDA is available.
            Device-level used memory is sampled only if CUDA was initialised before the block.
        report: decorator only: print the result after each call.
    """
    if callable(label):
        return Track(None, interval=interval, gpu=gpu, report=report)(label)
    return Track(label, interval=interval, gpu=gpu, report=report)
