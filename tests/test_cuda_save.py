"""The reverse CUDA path (`_core.write_from_cuda`: GPU -> pinned staging ring -> file, what
`zeroload.save` uses for CUDA tensors), run on the fake CUDA driver (tests/fakecuda) in
the same worker process as tests/test_cuda_engine.py: 0 contract violations, the file's
bytes and CRCs equal the device's, faults (a failing or asynchronously failing
`cuMemcpyDtoHAsync_v2`) end in a clean `CudaError` with the staging given back, and host
memory stays within the staging budget + 64 MiB whatever the size written.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_cuda_engine import TIMEOUT, Worker, _fake

import zeroload
from zeroload import _core


@pytest.fixture(scope="module")
def worker() -> Iterator[list[Worker]]:
    box = [Worker()]
    yield box
    box[0].close()


def run(worker: list[Worker], case: Callable[..., Any], *args: Any) -> Any:
    """Runs `case(*args)` of this module in the fake-driver worker (as test_cuda_engine's
    `run` does for its own cases); fails on its exception, a hang, or any finding of the
    fake driver during it or the cleanup after it."""
    if worker[0].proc.poll() is not None:
        worker[0] = Worker()
    w, name = worker[0], case.__name__
    w.tx.send((__name__, name, args))
    if not w.rx.poll(TIMEOUT):
        w.proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack
        time.sleep(2)
        w.close()
        pytest.fail(f"{name} hung for {TIMEOUT} s (stacks above)", pytrace=False)
    try:
        status, result, after = w.rx.recv()
    except EOFError:
        w.close()
        pytest.fail(f"the worker died in {name} (exit code {w.proc.returncode})")
    if status != "ok":
        pytest.fail(f"{name} (in the fake-driver process):\n{result}", pytrace=False)
    assert after == [], "the fake CUDA driver recorded contract violations:\n" + "\n".join(after)
    return result


def _device_buffers(sizes: list[int], device: int = 0) -> tuple[list[tuple[int, int]], list[bytes]]:
    """Device buffers of `sizes` bytes on `device`, filled with random bytes."""
    fake = _fake()
    rng = random.Random(sum(sizes))
    sources, data = [], []
    for n in sizes:
        ptr = fake.alloc(max(n, 1), device)
        b = rng.randbytes(n)
        if n:
            fake.write(ptr, b, device)
        sources.append((ptr, n))
        data.append(b)
    return sources, data


def _free(sources: list[tuple[int, int]], device: int = 0) -> None:
    for ptr, _ in sources:
        _fake().free(ptr, device)


def _layout(sizes: list[int]) -> list[tuple[int, int, int, int]]:
    """Requests writing each source whole, one after the other with a 17-byte gap (a zip
    record header's place), plus a slice of the 4096-byte source written again at the end."""
    reqs, at = [], 17
    for i, n in enumerate(sizes):
        reqs.append((i, 0, n, at))
        at += n + 17
    reqs.append((sizes.index(4096), 3, 1000, at))
    return reqs


def _write(path: Path, *args: object, **kw: object) -> list[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return _core.write_from_cuda(fd, *args, **kw)
    finally:
        os.close(fd)


def _check(
    path: Path, data: list[bytes], reqs: list[tuple[int, int, int, int]], crcs: list[int]
) -> None:
    got = path.read_bytes()
    assert len(crcs) == len(reqs)
    for (src, off, n, at), crc in zip(reqs, crcs):
        want = data[src][off : off + n]
        assert got[at : at + n] == want, f"request {src}+{off}+{n} at {at}"
        assert crc == zlib.crc32(want), f"crc of request {src}+{off}+{n}"


SIZES = [1, 0, 4096, 3 << 20, 100_003, 5, (9 << 20) + 7] + [37 * i for i in range(1, 60)]


def _case_writes_device_bytes_with_crcs(tmp: str) -> None:
    fake = _fake()
    for device in [0, 1]:
        sources, data = _device_buffers(SIZES, device)
        reqs = _layout(SIZES)
        for budget in [None, 1, 3 << 20, 64 << 20]:
            calls: list[tuple[int, int]] = []

            def progress(
                done: int, total: int, calls: list = calls, me: int = threading.get_ident()
            ) -> None:
                assert threading.get_ident() == me
                calls.append((done, total))

            path = Path(tmp) / f"out{device}.bin"
            fake.bind(device)
            with fake.watch():
                crcs = _write(path, sources, reqs, device, budget, progress)
            _check(path, data, reqs, crcs)
            total = sum(r[2] for r in reqs)
            assert calls[0] == (0, total) and calls[-1] == (total, total)
        with fake.watch():
            assert _write(Path(tmp) / "empty.bin", sources, [], device) == []
        _free(sources, device)


def test_writes_the_device_bytes_and_their_crcs(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_writes_device_bytes_with_crcs, str(tmp_path))


def _case_bad_requests(tmp: str) -> None:
    sources, _ = _device_buffers([100])
    path = Path(tmp) / "bad.bin"
    with pytest.raises(ValueError, match="source #1; there are 1"):
        _write(path, sources, [(1, 0, 1, 0)], 0)
    with pytest.raises(ValueError, match="past its end"):
        _write(path, sources, [(0, 50, 51, 0)], 0)
    host = (ctypes.c_char * 64)()  # host memory, not device memory
    addr = ctypes.addressof(host)
    with pytest.raises(
        ValueError, match=r"source 0x[0-9a-f]+\.\.\+64 is not memory of CUDA device 0"
    ):
        _write(path, [(addr, 64)], [(0, 0, 64, 0)], 0)
    with pytest.raises(ValueError, match="is not memory of CUDA device 1"):
        _write(path, sources, [(0, 0, 100, 0)], 1)
    with pytest.raises(OSError):
        _core.write_from_cuda(987_654, sources, [(0, 0, 100, 0)], 0)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        with pytest.raises(ValueError, match="O_APPEND"):
            _core.write_from_cuda(fd, sources, [(0, 0, 100, 0)], 0)
    finally:
        os.close(fd)
    _free(sources)


def test_bad_requests_and_sources_are_refused(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_bad_requests, str(tmp_path))


def _case_faults(tmp: str) -> None:
    fake = _fake()
    sources, data = _device_buffers(SIZES)
    reqs = _layout(SIZES)
    path = Path(tmp) / "f.bin"
    for name, nth in [
        ("cuMemcpyDtoHAsync_v2", 1),
        ("cuMemcpyDtoHAsync_v2", 9),
        ("cuEventRecord", 2),
        ("cuEventQuery", 3),
        ("cuStreamCreate", 1),
        ("cuPointerGetAttributes", 2),
    ]:
        zeroload.release_staging()
        fake.fail(name, nth)
        fake.bind(0)
        with fake.watch(), pytest.raises(zeroload.CudaError, match=f"in {name}: "):
            _write(path, sources, reqs, 0, 2 << 20)
        fake.reset()
        # The staging was given back: the next write works, and frees cleanly.
        with fake.watch():
            _check(path, data, reqs, _write(path, sources, reqs, 0, 2 << 20))
        assert zeroload.release_staging()
    # A copy that fails on the stream (reported by the next query or synchronisation).
    fake.fail_async(3, 700)
    with fake.watch(), pytest.raises(zeroload.CudaError, match="ILLEGAL_ADDRESS"):
        _write(path, sources, reqs, 0, 2 << 20)
    with fake.watch():
        _check(path, data, reqs, _write(path, sources, reqs, 0, 2 << 20))

    # An exception in the progress callback cancels the write and propagates.
    def boom(done: int, total: int) -> None:
        if done:
            raise KeyError("stop")

    with fake.watch(), pytest.raises(KeyError, match="stop"):
        _write(path, sources, reqs, 0, 2 << 20, boom)
    with fake.watch():
        _check(path, data, reqs, _write(path, sources, reqs, 0, 2 << 20))
    _free(sources)


def test_a_driver_fault_is_a_clean_cuda_error_and_the_next_write_works(
    worker: list[Worker], tmp_path: Path
) -> None:
    run(worker, _case_faults, str(tmp_path))


def _case_rss(tmp: str) -> int:
    """Writes 768 MiB of (unbacked: its device bytes take no host memory) fake device
    memory with a 16 MiB budget; returns the peak RSS increase in bytes."""
    fake = _fake()
    fake.config("backing", 0)
    try:
        n = 768 << 20
        ptrs = [fake.alloc(n // 4, 0) for _ in range(4)]
        sources = [(p, n // 4) for p in ptrs]
        reqs = [(i, 0, n // 4, i * (n // 4)) for i in range(4)]
        proc = psutil.Process()
        base = proc.memory_info().rss
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                stop.wait(0.002)

        t = threading.Thread(target=sample)
        t.start()
        try:
            with fake.watch():
                crcs = _write(Path(tmp) / "big.bin", sources, reqs, 0, 16 << 20)
        finally:
            stop.set()
            t.join()
        assert crcs == [zlib.crc32(bytes(n // 4))] * 4  # unbacked memory reads as zeros
        assert (Path(tmp) / "big.bin").stat().st_size == n
        for p in ptrs:
            fake.free(p)
        return peak[0] - base
    finally:
        fake.config("backing", 1)


def test_host_memory_stays_within_the_staging_budget(worker: list[Worker], tmp_path: Path) -> None:
    grew = run(worker, _case_rss, str(tmp_path))
    assert grew <= (16 << 20) + (64 << 20), f"RSS grew by {grew / 2**20:.0f} MiB"


def _dtoh_bad_sequence(cls: str) -> None:
    """Misuses `cuMemcpyDtoHAsync_v2` the way `cls` describes (plain ctypes calls)."""
    fake = _fake()
    L = fake.lib
    vp = ctypes.c_void_p
    dtoh = L.cuMemcpyDtoHAsync_v2
    dtoh.argtypes = [vp, ctypes.c_uint64, ctypes.c_size_t, vp]
    dtoh.restype = ctypes.c_uint
    fake.bind(0)
    stream, pinned = vp(), vp()
    fake.call("cuStreamCreate", ctypes.byref(stream), 1)
    fake.call("cuMemHostAlloc", ctypes.byref(pinned), 8192, 1)
    src = fake.alloc(4096, 0)
    fake.write(src, bytes(range(256)) * 16)
    if cls in {"source-changed", "overlapping-destinations", "freed-while-pending"}:
        fake.config("min_delay_us", 50_000)  # the stream starts every op 50 ms late
        fake.config("max_delay_us", 50_000)
        fake.call("cuMemcpyDtoHAsync_v2", pinned, src, 4096, stream)
    if cls == "unpinned-source":  # here: an unpinned host destination
        pageable = ctypes.create_string_buffer(4096)
        fake.call("cuMemcpyDtoHAsync_v2", pageable, src, 4096, stream)
    elif cls == "bad-device-range":
        dtoh(pinned, pinned.value, 4096, stream)  # a host "source"
        dtoh(pinned, src + 4000, 4096, stream)  # past the allocation
    elif cls == "source-changed":  # here: the host buffer written before the copy ran
        ctypes.memset(pinned, 7, 16)
    elif cls == "overlapping-destinations":
        fake.call("cuMemcpyDtoHAsync_v2", pinned.value + 100, src, 8, stream)
    elif cls == "wrong-context":
        fake.bind(1)
        dtoh(pinned, src, 4096, stream)  # a stream of context 0
        fake.bind(0)
    elif cls == "invalid-handle":
        dead = vp()
        fake.call("cuStreamCreate", ctypes.byref(dead), 1)
        fake.call("cuStreamDestroy_v2", dead)
        dtoh(pinned, src, 4096, dead)
    elif cls == "freed-while-pending":
        fake.call("cuMemFreeHost", pinned)
        pinned = None
    elif cls == "unsynchronized-read":  # device bytes read while a copy into them is queued
        fake.config("min_delay_us", 50_000)
        fake.config("max_delay_us", 50_000)
        fake.call("cuMemcpyHtoDAsync_v2", src, pinned.value + 4096, 4096, stream)
        fake.call("cuMemcpyDtoHAsync_v2", pinned, src, 4096, stream)
    else:
        raise AssertionError(cls)
    fake.call("cuStreamSynchronize", stream)
    fake.call("cuStreamDestroy_v2", stream)
    if pinned is not None:
        fake.call("cuMemFreeHost", pinned)
    fake.free(src)


def _case_dtoh_misuse(cls: str) -> None:
    fake = _fake()
    assert fake.findings() == []
    _dtoh_bad_sequence(cls)
    fake.wait_idle()
    found = fake.take_findings()
    assert found, f"the fake recorded nothing for {cls}"
    assert {line.split(":", 1)[0] for line in found} == {cls}, found


DTOH_CLASSES = [
    "unpinned-source",
    "bad-device-range",
    "source-changed",
    "overlapping-destinations",
    "wrong-context",
    "invalid-handle",
    "freed-while-pending",
    "unsynchronized-read",
]


@pytest.mark.parametrize("cls", DTOH_CLASSES)
def test_the_fake_driver_catches_each_misuse_of_async_device_to_host_copies(
    worker: list[Worker], cls: str
) -> None:
    run(worker, _case_dtoh_misuse, cls)


def _case_dtoh_poisons_until_done() -> None:
    """The host buffer of an async device-to-host copy holds poison until the copy ran:
    code that reads it before the copy's event completed reads garbage, as on a GPU."""
    fake = _fake()
    vp = ctypes.c_void_p
    fake.bind(0)
    stream, pinned = vp(), vp()
    fake.call("cuStreamCreate", ctypes.byref(stream), 1)
    fake.call("cuMemHostAlloc", ctypes.byref(pinned), 4096, 1)
    src = fake.alloc(4096, 0)
    fake.write(src, b"\x01" * 4096)
    fake.config("min_delay_us", 50_000)
    fake.config("max_delay_us", 50_000)
    fake.lib.cuMemcpyDtoHAsync_v2.argtypes = [vp, ctypes.c_uint64, ctypes.c_size_t, vp]
    fake.call("cuMemcpyDtoHAsync_v2", pinned, src, 4096, stream)
    early = ctypes.string_at(pinned, 4096)
    fake.call("cuStreamSynchronize", stream)
    late = ctypes.string_at(pinned, 4096)
    fake.call("cuStreamDestroy_v2", stream)
    fake.call("cuMemFreeHost", pinned)
    fake.free(src)
    assert early == b"\xdb" * 4096
    assert late == b"\x01" * 4096


def test_an_async_device_to_host_copy_poisons_its_buffer_until_it_ran(
    worker: list[Worker],
) -> None:
    run(worker, _case_dtoh_poisons_until_done)


class _DeviceBytes:
    """What `zeroload._save` reads of a contiguous CUDA uint8 tensor (its device, address
    and size), over fake-driver memory: torch here has no CUDA to make a real one."""

    def __init__(self, ptr: int, nbytes: int, device: int) -> None:
        import torch

        self.device = torch.device("cuda", device)
        self._ptr, self._n = ptr, nbytes

    def data_ptr(self) -> int:
        return self._ptr

    def numel(self) -> int:
        return self._n

    def element_size(self) -> int:
        return 1


def _case_save_glue_writes_cuda_ranges_among_host_ones(tmp: str) -> None:
    """`zeroload.save`'s plan with host, CUDA (two devices) and empty ranges interleaved:
    each device's ranges go through `_core.write_from_cuda` once, after synchronising that
    device; every byte lands at its offset, and `finish` gets the CRCs in request order
    (empty ranges 0), whatever path each range took. The file is replaced atomically."""
    import torch

    from zeroload import _save

    fake = _fake()
    rng = random.Random(7)
    synced: list[int] = []
    real_sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda device=None: synced.append(device)  # type: ignore[assignment]
    try:
        plan = _save._Plan()
        plan.crc = True
        expected: list[bytes] = []  # each request's bytes, in request order
        buffers = []
        at = 0
        # (bytes, where: "host" or a device)
        layout = [(10, "host"), (3 << 20, 0), (0, 1), (5, "host"), ((2 << 20) + 3, 1), (0, 0),
                  (999, 0), (64, 1), (7, "host")]  # fmt: skip
        for n, kind in layout:
            data = rng.randbytes(n)
            if n == 0:
                plan.requests.append((-1, 0, 0, at))
            elif kind == "host":
                plan.add(data, n, at)
            else:
                assert isinstance(kind, int)
                ptr = fake.alloc(n, kind)
                fake.write(ptr, data, kind)
                buffers.append((ptr, kind))
                plan.requests.append((-2, len(plan.cuda), n, at))
                plan.cuda.append((_DeviceBytes(ptr, n, kind), at))  # type: ignore[arg-type]
            expected.append(data)
            at += n + 3  # a gap, as a zip header leaves
        plan.size = at
        got_crcs: list[list[int]] = []

        def finish(crcs: list[int]) -> tuple[list[Any], list[tuple[int, int, int, int]]]:
            got_crcs.append(crcs)
            return [b"END"], [(0, 0, 3, at)]

        plan.finish = finish
        path = Path(tmp) / "glue.pt"
        path.write_bytes(b"old")
        fake.bind(0)
        with fake.watch():
            plan.write(path, progress=False)
        assert sorted(synced) == [0, 1], synced
        out = path.read_bytes()
        assert out[at:] == b"END"
        for (_, _, n, offset), data in zip(plan.requests, expected):
            assert out[offset : offset + n] == data
        assert got_crcs == [[zlib.crc32(d) if d else 0 for d in expected]]
        assert not [p for p in Path(tmp).iterdir() if p.name.endswith(".zeroload-tmp")]
    finally:
        torch.cuda.synchronize = real_sync  # type: ignore[assignment]
        for ptr, device in buffers:
            fake.free(ptr, device)


def test_save_sends_cuda_tensor_bytes_through_the_reverse_path(
    worker: list[Worker], tmp_path: Path
) -> None:
    run(worker, _case_save_glue_writes_cuda_ranges_among_host_ones, str(tmp_path))
