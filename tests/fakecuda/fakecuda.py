"""Python side of the fake CUDA driver (tests/fakecuda): build and load it, drive it with
ctypes, and plug it into zeroload's GPU path.

- `build()` compiles the fake with cargo (a no-op when it is up to date) and `load()`
  loads it by absolute path, so that the `dlopen("libcuda.so")` of the copy engine finds
  it by its SONAME. Load it before anything in the process touches CUDA.
- `FakeCuda` wraps the `fakecuda_*` control functions (faults, findings, counters) and
  the driver calls tests use themselves (allocate, read back, VMM, pools).
- `FakeBackend` is a `zeroload._cuda.CudaBackend`: destinations are fake device memory
  exported through DLPack (kDLCUDA), as PyTorch's would be, allocated the way one of
  PyTorch's allocators does it; after the copy their bytes come back (cuMemcpyDtoH_v2) as
  CPU tensors, so that the rest of zeroload's GPU path runs unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "target" / "fakecuda" / "release" / "libfakecuda.so"

# CUresult values tests use.
SUCCESS = 0
INVALID_VALUE = 1
OUT_OF_MEMORY = 2
STUB_LIBRARY = 34
NO_DEVICE = 100
ILLEGAL_ADDRESS = 700
UNKNOWN = 999

# The configuration every test starts from (see Config in src/lib.rs).
DEFAULTS = {
    "devices": 2,
    "min_delay_us": 0,
    "max_delay_us": 200,
    "link_gbps": 0,
    "check_sources": 1,
    "backing": 1,
    "pinned_limit": 0,
    "range_attributes": 1,
    "htod_memcpy": 1,
}

# Every class of finding the fake records (Class in src/lib.rs).
CLASSES = [
    "unpinned-source",
    "bad-device-range",
    "source-changed",
    "overlapping-destinations",
    "no-context",
    "wrong-context",
    "invalid-handle",
    "freed-while-pending",
    "not-initialized",
    "pending-at-return",
    "context-not-restored",
    "leak",
    "unsynchronized-read",
    "unsupported",
]

FAKE: FakeCuda | None = None


def build() -> Path:
    """The fake's path, built with cargo first (`FAKECUDA_LIB` overrides)."""
    if os.environ.get("FAKECUDA_LIB"):
        return Path(os.environ["FAKECUDA_LIB"])
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if Path(cargo).exists():
        subprocess.run(
            [
                cargo,
                "build",
                "--quiet",
                "--release",
                "-p",
                "fakecuda",
                "--target-dir",
                str(ROOT / "target" / "fakecuda"),
                "--manifest-path",
                str(ROOT / "Cargo.toml"),
            ],
            check=True,
        )
    if not LIB.exists():
        raise RuntimeError(f"the fake CUDA driver is not built ({LIB}) and cargo is missing")
    return LIB


def load(path: Path | str | None = None) -> FakeCuda:
    """Loads the fake into this process (once) and returns its wrapper."""
    global FAKE
    if FAKE is None:
        FAKE = FakeCuda(path or build())
    return FAKE


class CudaCallError(RuntimeError):
    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} returned {code}")
        self.code = code


class _Prop(ctypes.Structure):
    """CUmemAllocationProp: pinned memory on a device."""

    _fields_ = [
        ("type", ctypes.c_uint),
        ("handle_types", ctypes.c_uint),
        ("location_type", ctypes.c_uint),
        ("location_id", ctypes.c_int),
        ("win32", ctypes.c_void_p),
        ("flags", ctypes.c_uint8 * 8),
    ]


class _Access(ctypes.Structure):
    """CUmemAccessDesc."""

    _fields_ = [
        ("location_type", ctypes.c_uint),
        ("location_id", ctypes.c_int),
        ("flags", ctypes.c_uint),
    ]


class FakeCuda:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        L = self.lib
        c_char_p, u64, uint = ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint
        vp = ctypes.c_void_p
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "fakecuda_reset": (None, []),
            "fakecuda_config": (ctypes.c_int, [c_char_p, ctypes.c_double]),
            "fakecuda_fail": (ctypes.c_int, [c_char_p, u64, uint, u64]),
            "fakecuda_fail_async": (None, [u64, uint]),
            "fakecuda_stub": (None, [uint]),
            "fakecuda_calls": (u64, [c_char_p]),
            "fakecuda_stat": (u64, [c_char_p]),
            "fakecuda_findings": (ctypes.c_size_t, [ctypes.c_char_p, ctypes.c_size_t]),
            "fakecuda_count_findings": (u64, [c_char_p]),
            "fakecuda_clear_findings": (None, []),
            "fakecuda_enter": (None, []),
            "fakecuda_leave": (u64, []),
            "fakecuda_check_leaks": (u64, []),
            "fakecuda_wait_idle": (None, []),
            "cuInit": (uint, [uint]),
            "cuDevicePrimaryCtxRetain": (uint, [ctypes.POINTER(vp), ctypes.c_int]),
            "cuCtxSetCurrent": (uint, [vp]),
            "cuCtxGetCurrent": (uint, [ctypes.POINTER(vp)]),
            "cuCtxGetDevice": (uint, [ctypes.POINTER(ctypes.c_int)]),
            "cuCtxSynchronize": (uint, []),
            "cuMemAlloc_v2": (uint, [ctypes.POINTER(u64), ctypes.c_size_t]),
            "cuMemFree_v2": (uint, [u64]),
            "cuMemAllocAsync": (uint, [ctypes.POINTER(u64), ctypes.c_size_t, vp]),
            "cuMemFreeAsync": (uint, [u64, vp]),
            "cuMemcpyHtoD_v2": (uint, [u64, vp, ctypes.c_size_t]),
            "cuMemcpyDtoH_v2": (uint, [vp, u64, ctypes.c_size_t]),
            "cuMemcpyHtoDAsync_v2": (uint, [u64, vp, ctypes.c_size_t, vp]),
            "cuMemHostAlloc": (uint, [ctypes.POINTER(vp), ctypes.c_size_t, uint]),
            "cuMemFreeHost": (uint, [vp]),
            "cuStreamCreate": (uint, [ctypes.POINTER(vp), uint]),
            "cuStreamSynchronize": (uint, [vp]),
            "cuStreamDestroy_v2": (uint, [vp]),
            "cuEventCreate": (uint, [ctypes.POINTER(vp), uint]),
            "cuEventRecord": (uint, [vp, vp]),
            "cuEventDestroy_v2": (uint, [vp]),
            "cuPointerGetAttributes": (
                uint,
                [uint, ctypes.POINTER(uint), ctypes.POINTER(vp), u64],
            ),
            "cuMemAddressReserve": (
                uint,
                [ctypes.POINTER(u64), ctypes.c_size_t, ctypes.c_size_t, u64, u64],
            ),
            "cuMemAddressFree": (uint, [u64, ctypes.c_size_t]),
            "cuMemCreate": (
                uint,
                [ctypes.POINTER(u64), ctypes.c_size_t, ctypes.POINTER(_Prop), u64],
            ),
            "cuMemRelease": (uint, [u64]),
            "cuMemMap": (uint, [u64, ctypes.c_size_t, ctypes.c_size_t, u64, u64]),
            "cuMemUnmap": (uint, [u64, ctypes.c_size_t]),
            "cuMemSetAccess": (
                uint,
                [u64, ctypes.c_size_t, ctypes.POINTER(_Access), ctypes.c_size_t],
            ),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(L, name)
            fn.restype = res
            fn.argtypes = args
        self._contexts: dict[int, int] = {}

    # -- control -----------------------------------------------------------------------

    def reset(self) -> None:
        """No faults, no stub, no findings, no call counts; the default configuration."""
        self.lib.fakecuda_reset()
        for k, v in DEFAULTS.items():
            self.config(k, v)

    def config(self, key: str, value: float) -> None:
        if self.lib.fakecuda_config(key.encode(), float(value)) != 0:
            raise KeyError(key)

    def fail(self, name: str, nth: int = 1, code: int = UNKNOWN, count: int = 1) -> None:
        """Calls nth .. nth+count-1 of `name` (from now) fail with `code` (count 0: all)."""
        self.lib.fakecuda_fail(name.encode(), nth, code, count)

    def fail_async(self, nth: int, code: int) -> None:
        """The nth copy executed from now fails on its stream."""
        self.lib.fakecuda_fail_async(nth, code)

    def stub(self, code: int) -> None:
        """Every entry point returns `code` (0: off)."""
        self.lib.fakecuda_stub(code)

    def calls(self, name: str) -> int:
        return int(self.lib.fakecuda_calls(name.encode()))

    def stat(self, name: str) -> int:
        v = int(self.lib.fakecuda_stat(name.encode()))
        if v == 2**64 - 1:
            raise KeyError(name)
        return v

    def findings(self) -> list[str]:
        n = self.lib.fakecuda_findings(None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        self.lib.fakecuda_findings(buf, n + 1)
        return buf.value.decode().splitlines()

    def count(self, cls: str | None = None) -> int:
        return int(self.lib.fakecuda_count_findings(cls.encode() if cls else None))

    def clear_findings(self) -> None:
        self.lib.fakecuda_clear_findings()

    def take_findings(self) -> list[str]:
        f = self.findings()
        self.clear_findings()
        return f

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Around a call into zeroload on this thread: afterwards, the thread's current
        context must be what it was and no work may be pending on any stream."""
        self.lib.fakecuda_enter()
        try:
            yield
        finally:
            self.lib.fakecuda_leave()

    def check_leaks(self) -> int:
        return int(self.lib.fakecuda_check_leaks())

    def wait_idle(self) -> None:
        self.lib.fakecuda_wait_idle()

    # -- driver calls --------------------------------------------------------------------

    def call(self, name: str, *args: Any) -> None:
        r = getattr(self.lib, name)(*args)
        if r != SUCCESS:
            raise CudaCallError(name, r)

    def context(self, device: int) -> int:
        """Device `device`'s primary context (retained once)."""
        if device not in self._contexts:
            self.call("cuInit", 0)
            ctx = ctypes.c_void_p()
            self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), device)
            self._contexts[device] = ctx.value or 0
        return self._contexts[device]

    def bind(self, device: int | None) -> None:
        """Makes `device`'s primary context current on this thread (None: none), as
        PyTorch does whenever it uses a device."""
        self.call("cuCtxSetCurrent", self.context(device) if device is not None else None)

    @contextlib.contextmanager
    def bound(self, device: int | None) -> Iterator[None]:
        """`device`'s context current inside the block, the previous one restored after
        (as `torch.cuda.device(d)` does)."""
        before = self.current()
        self.bind(device)
        try:
            yield
        finally:
            self.call("cuCtxSetCurrent", before or None)

    def current(self) -> int:
        ctx = ctypes.c_void_p()
        self.call("cuInit", 0)
        self.call("cuCtxGetCurrent", ctypes.byref(ctx))
        return ctx.value or 0

    def current_device(self) -> int | None:
        if not self.current():
            return None
        d = ctypes.c_int()
        self.call("cuCtxGetDevice", ctypes.byref(d))
        return d.value

    def alloc(self, nbytes: int, device: int) -> int:
        p = ctypes.c_uint64()
        with self.bound(device):
            self.call("cuMemAlloc_v2", ctypes.byref(p), nbytes)
        return p.value

    def free(self, ptr: int, device: int = 0) -> None:
        with self.bound(device):
            self.call("cuMemFree_v2", ptr)

    def alloc_async(self, nbytes: int, device: int) -> int:
        p = ctypes.c_uint64()
        with self.bound(device):
            self.call("cuMemAllocAsync", ctypes.byref(p), nbytes, None)
        return p.value

    def free_async(self, ptr: int, device: int = 0) -> None:
        with self.bound(device):
            self.call("cuMemFreeAsync", ptr, None)

    def read_into(self, out: torch.Tensor, ptr: int, device: int = 0) -> None:
        """Copies device bytes at `ptr` into the CPU uint8 tensor `out`."""
        assert out.dtype == torch.uint8 and out.is_contiguous() and out.device.type == "cpu"
        if out.numel():
            with self.bound(device):
                self.call("cuMemcpyDtoH_v2", out.data_ptr(), ptr, out.numel())

    def read(self, ptr: int, nbytes: int, device: int = 0) -> bytes:
        out = torch.empty(nbytes, dtype=torch.uint8)
        self.read_into(out, ptr, device)
        return bytes(out.numpy())

    def write(self, ptr: int, data: bytes, device: int = 0) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        with self.bound(device):
            self.call("cuMemcpyHtoD_v2", ptr, buf, len(data))

    def reserve(self, nbytes: int) -> int:
        p = ctypes.c_uint64()
        self.call("cuMemAddressReserve", ctypes.byref(p), nbytes, 0, 0, 0)
        return p.value

    def create(self, nbytes: int, device: int) -> int:
        prop = _Prop(type=1, location_type=1, location_id=device)
        h = ctypes.c_uint64()
        self.call("cuMemCreate", ctypes.byref(h), nbytes, ctypes.byref(prop), 0)
        return h.value

    def map(self, ptr: int, nbytes: int, handle: int, device: int) -> None:
        self.call("cuMemMap", ptr, nbytes, 0, handle, 0)
        access = _Access(location_type=1, location_id=device, flags=3)
        self.call("cuMemSetAccess", ptr, nbytes, ctypes.byref(access), 1)


# -- DLPack ----------------------------------------------------------------------------

KDL_CUDA = 2
_DLTENSOR = b"dltensor"


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class DeviceBuffer:
    """`nbytes` bytes of fake device memory, a 1-D uint8 tensor on `cuda:device` as far as
    DLPack is concerned. `release` runs (once) when it is freed or garbage collected."""

    def __init__(
        self,
        ptr: int,
        nbytes: int,
        device: int,
        release: Any = None,
        device_type: int = KDL_CUDA,
    ) -> None:
        self.ptr, self.nbytes, self.device = ptr, nbytes, device
        self._release = release
        self._shape = (ctypes.c_int64 * 1)(nbytes)
        self._managed = _DLManagedTensor()
        t = self._managed.dl_tensor
        t.data = ptr or None
        t.device = _DLDevice(device_type, device)
        t.ndim = 1
        t.dtype = _DLDataType(1, 8, 1)  # uint8
        t.shape = self._shape
        t.strides = None
        t.byte_offset = 0

    def __dlpack__(self, stream: Any = None, **kw: Any) -> Any:
        # The capsule has no destructor and does not own the buffer: this object outlives
        # every copy it is a destination of (the caller holds it).
        return _capsule_new(ctypes.addressof(self._managed), _DLTENSOR, None)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self._managed.dl_tensor.device.device_type, self.device)

    def free(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.free()


class FakeBackend:
    """`zeroload._cuda.CudaBackend` on the fake driver.

    `allocator` picks how destination memory is obtained, as PyTorch's allocators do:
    - "segments": the caching allocator's default: blocks (rounded to 512 bytes) carved
      out of 20 MiB `cuMemAlloc_v2` segments, so destinations are interior pointers and
      neighbours;
    - "plain": one `cuMemAlloc_v2` per storage;
    - "expandable": `expandable_segments:True`: one reserved address range mapped in
      2 MiB pieces (`cuMemCreate`/`cuMemMap`/`cuMemSetAccess`) as it grows, blocks
      packed back to back, so destinations span pieces;
    - "async": `cudaMallocAsync`: one `cuMemAllocAsync` per storage.
    """

    SEGMENT = 20 << 20
    GRANULE = 2 << 20

    def __init__(self, fake: FakeCuda, allocator: str = "segments") -> None:
        assert allocator in ("segments", "plain", "expandable", "async"), allocator
        self.fake = fake
        self.allocator = allocator
        self.allocations = 0
        self._segments: dict[int, list[int]] = {}  # base -> [size, top, live blocks]
        self._vmm: dict[int, dict[str, Any]] = {}  # device -> reservation state

    # CudaBackend ------------------------------------------------------------------------

    def unavailable(self) -> str | None:
        from zeroload import _core

        return None if _core.cuda_available() else "the (fake) CUDA driver sees no device"

    def device_count(self) -> int:
        from zeroload import _core

        return _core.cuda_device_count()

    def current_device(self) -> int:
        d = self.fake.current_device()
        return 0 if d is None else d

    def empty(self, nbytes: int, device: torch.device) -> DeviceBuffer:
        dev = device.index or 0
        self.allocations += 1
        if nbytes == 0:
            return DeviceBuffer(0, 0, dev)
        if self.allocator == "plain":
            return DeviceBuffer(self.fake.alloc(nbytes, dev), nbytes, dev, self._free_plain)
        if self.allocator == "async":
            ptr = self.fake.alloc_async(nbytes, dev)
            return DeviceBuffer(ptr, nbytes, dev, self._free_async)
        if self.allocator == "segments":
            return self._carve(nbytes, dev)
        return self._expand(nbytes, dev)

    def synchronize(self, device: torch.device, *, all_streams: bool) -> None:
        with self.fake.bound(device.index or 0):
            self.fake.call("cuCtxSynchronize")

    def exporting(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        # As torch.cuda.device(d): d's context current inside, the previous one after.
        return self.fake.bound(device.index or 0)

    def finish(self, destination: DeviceBuffer) -> torch.Tensor:
        out = torch.empty(destination.nbytes, dtype=torch.uint8)
        self.fake.read_into(out, destination.ptr, destination.device)
        destination.free()
        return out

    # allocators -------------------------------------------------------------------------

    def _free_plain(self, b: DeviceBuffer) -> None:
        self.fake.free(b.ptr, b.device)

    def _free_async(self, b: DeviceBuffer) -> None:
        self.fake.free_async(b.ptr, b.device)

    def _carve(self, nbytes: int, dev: int) -> DeviceBuffer:
        size = -(-nbytes // 512) * 512
        fits = [b for b, s in self._segments.items() if s[3] == dev and s[1] + size <= s[0]]
        if fits:
            base = fits[0]
        else:
            seg_size = max(self.SEGMENT, -(-size // self.GRANULE) * self.GRANULE)
            base = self.fake.alloc(seg_size, dev)
            self._segments[base] = [seg_size, 0, 0, dev]  # size, top, live blocks, device
        seg = self._segments[base]
        ptr = base + seg[1]
        seg[1] += size
        seg[2] += 1
        return DeviceBuffer(ptr, nbytes, dev, lambda b, base=base: self._uncarve(base))

    def _uncarve(self, base: int) -> None:
        seg = self._segments[base]
        seg[2] -= 1
        if seg[2] == 0:
            del self._segments[base]
            self.fake.free(base, seg[3])

    def _expand(self, nbytes: int, dev: int) -> DeviceBuffer:
        size = -(-nbytes // 512) * 512
        st = self._vmm.get(dev)
        if st is None:
            st = self._vmm[dev] = {
                "base": self.fake.reserve(1 << 30),
                "mapped": 0,
                "top": 0,
                "handles": [],
                "live": 0,
            }
        while st["top"] + size > st["mapped"]:
            h = self.fake.create(self.GRANULE, dev)
            self.fake.map(st["base"] + st["mapped"], self.GRANULE, h, dev)
            st["handles"].append(h)
            st["mapped"] += self.GRANULE
        ptr = st["base"] + st["top"]
        st["top"] += size
        st["live"] += 1
        return DeviceBuffer(ptr, nbytes, dev, lambda b, dev=dev: self._unexpand(dev))

    def _unexpand(self, dev: int) -> None:
        st = self._vmm[dev]
        st["live"] -= 1
        if st["live"] == 0:
            # All blocks gone: give the pieces back, as the allocator's empty_cache would.
            del self._vmm[dev]
            base, mapped = st["base"], st["mapped"]
            self.fake.call("cuMemUnmap", base, mapped)
            for h in st["handles"]:
                self.fake.call("cuMemRelease", h)
            self.fake.call("cuMemAddressFree", base, 1 << 30)
