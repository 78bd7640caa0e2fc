"""zeroload's GPU path, run in CI on a fake CUDA driver (tests/fakecuda).

No machine this project builds or tests on has a GPU, so the real copy engine runs
against `libfakecuda.so`, a fake `libcuda.so` that executes each stream on its own thread
after random delays, keeps device bytes where the host cannot reach them through device
addresses, and records every misuse of the driver (see tests/fakecuda/README.md). Only
the allocation of destination storage is substituted (`zeroload._cuda.backend`): the
destinations are fake device memory exported through DLPack, as PyTorch's CUDA tensors
would be, and come back as CPU tensors afterwards, so that view building, tied storages,
dtype casts, progress and cancellation all run for real and are compared with `torch.load`.

The bodies (`_case_*`) run in one worker process that loaded the fake first: cudarc's
choice of driver library is process-wide, and this process must keep seeing "no CUDA".
After every body the worker frees the staging resources, checks that every driver object
was released, and reports the fake's findings; each test asserts there are none.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import (
    ALL_DTYPES,
    ProgressRecorder,
    TiedNet,
    TinyNet,
    o_direct_supported,
    open_with_flags,
    random_tensor,
    strided_views,
    training_checkpoint,
)
from reference import assert_same, assert_sharing_same

import zeroload
from zeroload import _core, _cuda

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "fakecuda"))
import fakecuda  # noqa: E402  (the helper module; loading the driver happens in the worker)

TIMEOUT = int(os.environ.get("FAKECUDA_TEST_TIMEOUT", "300"))  # seconds per body before it is hung


class Worker:
    """The process that runs the `_case_*` bodies with the fake driver loaded."""

    def __init__(self) -> None:
        lib = fakecuda.build()
        to_child = os.pipe()
        from_child = os.pipe()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "fakecuda" / "worker.py"),
                str(lib),
                str(TESTS),
                str(to_child[0]),
                str(from_child[1]),
            ],
            pass_fds=(to_child[0], from_child[1]),
        )
        os.close(to_child[0])
        os.close(from_child[1])
        self.tx = Connection(to_child[1], readable=False)
        self.rx = Connection(from_child[0], writable=False)

    def run(
        self, name: str, args: tuple[Any, ...], module: str = __name__
    ) -> tuple[str, Any, list[str]]:
        self.tx.send((module, name, args))
        if not self.rx.poll(TIMEOUT):
            # Dump every thread's stack (faulthandler, to stderr), then give up on it.
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            self.close()
            pytest.fail(f"{name} hung for {TIMEOUT} s (stacks above)", pytrace=False)
        try:
            return self.rx.recv()
        except EOFError:
            self.close()
            pytest.fail(f"the worker died in {name} (exit code {self.proc.returncode})")

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def worker() -> Iterator[list[Worker]]:
    box = [Worker()]
    yield box
    box[0].close()


def run(worker: list[Worker], case: Callable[..., Any], *args: Any) -> Any:
    """Runs `case(*args)` in the worker; fails on its exception or on any finding of the
    fake driver during it or the cleanup after it."""
    if worker[0].proc.poll() is not None:
        worker[0] = Worker()
    status, result, after = worker[0].run(case.__name__, args, case.__module__)
    if status != "ok":
        pytest.fail(f"{case.__name__} (in the fake-driver process):\n{result}", pytrace=False)
    assert after == [], "the fake CUDA driver recorded contract violations:\n" + "\n".join(after)
    return result


# -- helpers used inside the worker ----------------------------------------------------


def _fake() -> fakecuda.FakeCuda:
    assert fakecuda.FAKE is not None, "runs in the fake-driver worker only"
    return fakecuda.FAKE


@contextlib.contextmanager
def _gpu(allocator: str = "segments", device: int | None = 0) -> Iterator[fakecuda.FakeBackend]:
    """zeroload's GPU path on the fake, destinations allocated like `allocator`; `device`'s
    context current on this thread, as PyTorch leaves it once it has used the device."""
    fake = _fake()
    fake.bind(device)
    backend = fakecuda.FakeBackend(fake, allocator)
    with _cuda.using_backend(backend):
        yield backend


def _save(tmp: str, obj: object, name: str = "ckpt.pth") -> Path:
    path = Path(tmp) / name
    torch.save(obj, path)
    return path


def _dtypes() -> dict[str, torch.Tensor]:
    sd = {}
    for i, dt in enumerate(ALL_DTYPES):
        sd[f"{dt}"] = random_tensor((7, 13), dt, seed=i)
        sd[f"{dt}.scalar"] = random_tensor((), dt, seed=100 + i)
        sd[f"{dt}.empty"] = random_tensor((0, 4), dt)
    return sd


def _big() -> dict[str, torch.Tensor]:
    """Several MiB in tensors of many sizes: many chunks and slabs."""
    g = torch.Generator().manual_seed(3)
    sd = {f"w{i}": torch.randn(1 + 37_000 * i, generator=g) for i in range(12)}
    sd.update({f"small{i}": torch.arange(i + 1, dtype=torch.int16) for i in range(100)})
    return sd


# -- the whole Python flow, compared with torch ----------------------------------------


def _case_load_matches_torch(tmp: str, allocator: str) -> None:
    fake = _fake()
    files = {
        "training": _save(tmp, training_checkpoint(), "training.pth"),
        "views": _save(tmp, strided_views(), "views.pth"),
        "dtypes": _save(tmp, _dtypes(), "dtypes.pth"),
        "big": _save(tmp, _big(), "big.pth"),
    }
    for device in ["cuda", "cuda:1"]:
        for what, path in files.items():
            with _gpu(allocator) as backend, fake.watch():
                ours = zeroload.load(path, device=device, staging_bytes=4 << 20)
            ref = torch.load(path, map_location="cpu", weights_only=True)
            assert_same(ours, ref, f"{what} on {device}")
            assert_sharing_same(ours, ref)
            assert backend.allocations > 0
    ours = zeroload.load(files["training"], device="cpu")
    model = ours["model"]
    assert model["wte.weight"].data_ptr() == model["lm_head.weight"].data_ptr()

    dtypes = ALL_DTYPES[:12]  # what safetensors can hold
    sd = {f"w{i}": random_tensor((17, i + 1), dt, seed=i) for i, dt in enumerate(dtypes)}
    st = Path(tmp) / "m.safetensors"
    safetensors.torch.save_file(sd, st)
    with _gpu(allocator), fake.watch():
        ours = zeroload.load(st, device="cuda")
    ref = safetensors.torch.load_file(st)
    with safetensors.safe_open(st, "pt") as f:
        assert list(ours) == list(f.keys())
    for k in ref:
        assert_same(ours[k], ref[k], k)


@pytest.mark.parametrize("allocator", ["segments", "plain", "expandable", "async"])
def test_load_matches_torch_whatever_the_allocator(
    worker: list[Worker], tmp_path: Path, allocator: str
) -> None:
    run(worker, _case_load_matches_torch, str(tmp_path), allocator)


def _case_dtype_cast_keys_and_map_location(tmp: str) -> None:
    torch.manual_seed(0)
    path = _save(tmp, TinyNet().state_dict())
    ref = torch.load(path, map_location="cpu", weights_only=True)
    with _gpu(), _fake().watch():
        ours = zeroload.load(path, device="cuda", dtype=torch.bfloat16)
        some = zeroload.load(path, device="cuda:1", keys=["head.weight", "embed.weight"])
        mapped = zeroload.load(path, map_location={"cpu": "cuda:1"})
    for k, v in ref.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert ours[k].dtype == want.dtype and torch.equal(ours[k], want), k
    assert list(some) == ["embed.weight", "head.weight"]
    assert_same(some["head.weight"], ref["head.weight"])
    assert_same(mapped, ref)


def test_dtype_cast_keys_and_map_location(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_dtype_cast_keys_and_map_location, str(tmp_path))


def _case_progress(tmp: str) -> None:
    sd = {f"w{i}": torch.randn(1 << 19) for i in range(20)}  # 40 MiB
    path = _save(tmp, sd)
    ckpt = _core.Checkpoint.open(str(path))
    progress = ProgressRecorder()
    ids = list(range(ckpt.num_storages))
    with _gpu(), _fake().watch():
        tensors = _cuda.storage_tensors(
            ckpt, ids, torch.device("cuda"), progress=progress, budget=8 << 20
        )
    progress.check(sum(ckpt.storage(i)[2] for i in ids))
    assert len(progress.calls) > 2
    raw = path.read_bytes()
    for i, t in zip(ids, tensors):
        _, off, n, _ = ckpt.storage(i)
        assert bytes(t.numpy()) == raw[off : off + n]
    # The progress bar (tqdm, to stderr).
    with _gpu(), _fake().watch():
        ours = zeroload.load(path, device="cuda", progress=True)
    assert_same(ours, torch.load(path, weights_only=True))


def test_progress_is_reported_on_the_calling_thread(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_progress, str(tmp_path))


def _case_cancel(tmp: str) -> None:
    sd = {f"w{i}": torch.randn(1 << 19) for i in range(20)}
    path = _save(tmp, sd)
    ckpt = _core.Checkpoint.open(str(path))
    ids = list(range(ckpt.num_storages))

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done:
            raise Stop

    def interrupt(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    for progress, exc in [(stop, Stop), (interrupt, KeyboardInterrupt)]:
        with _gpu(), _fake().watch(), pytest.raises(exc):
            _cuda.storage_tensors(
                ckpt, ids, torch.device("cuda"), progress=progress, budget=4 << 20
            )
        gc.collect()  # the abandoned destinations give their device memory back
        assert _fake().stat("device_allocs") == 0
    with _gpu(), _fake().watch():
        ours = zeroload.load(path, device="cuda", staging_bytes=4 << 20)
    assert_same(ours, torch.load(path, weights_only=True))


def test_an_exception_in_progress_cancels_and_the_next_load_works(
    worker: list[Worker], tmp_path: Path
) -> None:
    run(worker, _case_cancel, str(tmp_path))


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _case_get_tensor_loop(tmp: str) -> None:
    fake = _fake()
    sd = {f"t{i}": random_tensor((i % 7 + 1, 33), ALL_DTYPES[i % 13], seed=i) for i in range(64)}
    path = Path(tmp) / "many.safetensors"
    safetensors.torch.save_file(sd, path)
    ref = safetensors.torch.load_file(path)
    with _gpu(), zeroload.open(path, device="cuda") as f:
        keys = f.keys()
        with fake.watch():
            assert_same(f.get_tensor(keys[0]), ref[keys[0]])
        created = {n: fake.calls(n) for n in ("cuStreamCreate", "cuEventCreate", "cuMemHostAlloc")}
        tasks = _tasks()
        for k in keys:
            with fake.watch():
                t = f.get_tensor(k)
            assert_same(t, ref[k], k)
        # No stream, event, pinned slab or reader thread per tensor: all reused.
        assert {n: fake.calls(n) for n in created} == created
        assert _tasks() == tasks
        assert fake.stat("streams") == 1 and fake.stat("stream_threads") == 1


def test_get_tensor_in_a_loop_reuses_stream_events_and_threads(
    worker: list[Worker], tmp_path: Path
) -> None:
    run(worker, _case_get_tensor_loop, str(tmp_path))


def _case_load_into(tmp: str) -> None:
    torch.manual_seed(0)
    src = TinyNet().eval()
    path = _save(tmp, src.state_dict())
    with torch.device("meta"):
        model = TinyNet().eval()
    with _gpu(), _fake().watch():
        result = zeroload.load_into(model, path, device="cuda")
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    # Materialised parameters on the GPU are filled in place through `_cuda.copy_into`
    # (PyTorch cannot hold a CUDA tensor here, so the destinations are fake device buffers).
    tied = _save(tmp, TiedNet().state_dict(), "tied.pth")
    ckpt = _core.Checkpoint.open(str(tied))
    raw = tied.read_bytes()
    with _gpu() as backend:
        dests, reqs = [], []
        for i in range(ckpt.num_storages):
            _, off, n, _ = ckpt.storage(i)
            reqs.append((off, n, len(dests), 0))
            dests.append(backend.empty(n, torch.device("cuda", 1)))
        with _fake().watch():
            _cuda.copy_into(ckpt, dests, reqs, torch.device("cuda", 1))
        for (off, n, _, _), d in zip(reqs, dests):
            assert bytes(backend.finish(d).numpy()) == raw[off : off + n]


def test_load_into_on_cuda(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_load_into, str(tmp_path))


# -- the boundary: locks, staging, faults, pointers ------------------------------------


def _case_concurrent(tmp: str) -> None:
    fake = _fake()
    paths = [_save(tmp, _big(), f"big{i}.pth") for i in range(2)]
    refs = [torch.load(p, weights_only=True) for p in paths]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    polls = [0]
    stop = threading.Event()
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the threads fight for the GIL

    def load(i: int) -> None:
        try:
            fake.bind(0)
            ckpt = _core.Checkpoint.open(str(paths[i]))
            ids = list(range(ckpt.num_storages))

            def progress(done: int, total: int) -> None:
                time.sleep(0.001)  # Python work with the GIL held, during the copy

            # The smallest budget: many progress calls, the ring contended.
            out = _cuda.storage_tensors(
                ckpt, ids, torch.device("cuda"), progress=progress, budget=2 << 20
            )
            with _cuda.using_backend(backend):
                results[i] = zeroload.load(paths[i], device="cuda", staging_bytes=2 << 20)
            assert len(out) == len(ids)
        except BaseException as e:
            errors.append(e)

    def poll() -> None:
        while not stop.is_set():
            _core.cuda_staging_allocated()  # asked while holding the GIL
            polls[0] += 1

    backend = fakecuda.FakeBackend(fake)
    with _cuda.using_backend(backend):
        threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
        poller = threading.Thread(target=poll)
        try:
            poller.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads), "a load hung"
        finally:
            stop.set()
            poller.join(30)
            sys.setswitchinterval(old_interval)
    assert not poller.is_alive()
    assert not errors, errors
    assert polls[0] > 0
    for i in range(2):
        assert_same(results[i], refs[i])


def test_concurrent_loads_and_staging_queries_all_finish(
    worker: list[Worker], tmp_path: Path
) -> None:
    run(worker, _case_concurrent, str(tmp_path))


def _case_pinning_fallback(tmp: str) -> None:
    fake = _fake()
    path = _save(tmp, _big())
    ref = torch.load(path, weights_only=True)
    # 64 MiB asks for 16 pinned slabs of 4 MiB; the driver gives two, then runs out.
    fake.fail("cuMemHostAlloc", nth=3, code=fakecuda.OUT_OF_MEMORY, count=0)
    with _gpu(), fake.watch(), pytest.warns(UserWarning, match="could pin only 8 MiB of"):
        ours = zeroload.load(path, device="cuda", staging_bytes=64 << 20)
    assert_same(ours, ref)
    assert _core.cuda_staging_allocated() == (4 << 20, 2)
    with _gpu(), fake.watch(), warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: no warning the second time
        assert_same(zeroload.load(path, device="cuda", staging_bytes=64 << 20), ref)
    assert zeroload.release_staging() is True


def test_a_ring_that_cannot_be_pinned_falls_back_with_one_warning(
    worker: list[Worker], tmp_path: Path
) -> None:
    run(worker, _case_pinning_fallback, str(tmp_path))


def _case_slice_pinning_fallback(tmp: str) -> None:
    fake = _fake()
    zeroload.release_staging()  # the slice below allocates the ring afresh
    path = _save(tmp, _big())
    ref = torch.load(path, weights_only=True)
    fake.fail("cuMemHostAlloc", nth=3, code=fakecuda.OUT_OF_MEMORY, count=0)
    # The warning belongs to the slice copy that fell back, raised by it...
    with _gpu(), zeroload.open(path, device="cuda") as f:
        with fake.watch(), pytest.warns(UserWarning, match="could pin only"):
            part = f.get_slice("w11")[1000:300_000]
        assert_same(part, ref["w11"][1000:300_000].clone())
    # ...and not left for a later, unrelated load.
    with _gpu(), fake.watch(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(zeroload.load(path, device="cuda"), ref)
    assert zeroload.release_staging() is True


def test_a_slice_copy_that_falls_back_warns_itself(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_slice_pinning_fallback, str(tmp_path))


def _case_large_offsets(tmp: str) -> None:
    from test_large_offsets import sparse_safetensors, sparse_torch_zip

    fake = _fake()
    for name, write in (
        ("sparse.safetensors", sparse_safetensors),
        ("sparse.pth", sparse_torch_zip),
    ):
        path = Path(tmp) / name
        small = write(path)
        with _gpu(), fake.watch():
            got = zeroload.load(path, device="cuda", keys=["a", "b"])
            assert_same(got, small)
            with zeroload.open(path, device="cuda") as f:
                assert_same(f.get_tensor("b"), small["b"])
                assert_same(f.get_slice("a")[5:9, 10:30], small["a"][5:9, 10:30].clone())
                assert_same(f.get_slice("pad2")[-5:], torch.zeros(5, dtype=torch.uint8))
        path.unlink()
    zeroload.release_staging()


@pytest.mark.slow
def test_offsets_past_4_and_8_gib_on_the_gpu_path(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_large_offsets, str(tmp_path))


def _case_soak(tmp: str, n: int) -> dict[str, int]:
    """`n` GPU-path loads of every kind; returns how RSS, descriptors and mappings moved
    between the end of a warm-up and the end."""
    fake = _fake()
    sd = {k: v for k, v in _big().items() if k in ("w1", "w3", "w5") or k.startswith("small")}
    pth = _save(tmp, sd)
    st = Path(tmp) / "big.safetensors"
    safetensors.torch.save_file(sd, st)
    data = pth.read_bytes()

    def state() -> tuple[int, int, int]:
        gc.collect()
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/maps") as f:
            maps = sum(1 for _ in f)
        return rss, len(os.listdir("/proc/self/fd")), maps

    loads = [
        lambda: zeroload.load(pth, device="cuda"),
        lambda: zeroload.load(st, device="cuda", staging_bytes=2 << 20),
        lambda: zeroload.load_bytes(data, device="cuda"),
        lambda: zeroload.load(pth, device="cuda", dtype=torch.float16, keys=["w3", "small9"]),
    ]
    warm = n // 10
    with _gpu(), fake.watch():
        with zeroload.open(st, device="cuda") as f:
            loads.append(lambda: {"w5": f.get_slice("w5")[10:20_000]})
            for i in range(n):
                if i == warm:
                    rss0, fds0, maps0 = state()
                j = i % len(loads)
                got = loads[j]()
                if i % 53 == 0:
                    for k, v in got.items():
                        want = sd[k][10:20_000].clone() if j == 4 else sd[k]
                        assert_same(v, want.half() if j == 3 and k == "w3" else want)
                del got
    rss, fds, maps = state()
    zeroload.release_staging()
    return {"rss": rss - rss0, "fds": fds - fds0, "maps": maps - maps0}


def test_soak_of_gpu_path_loads_keeps_rss_fds_and_maps_flat(
    worker: list[Worker], tmp_path: Path
) -> None:
    # 500 here (the fake driver delays every call at random) and 2,000 on the CPU
    # (tests/test_resources.py). Fewer is fine (a transient one at the warm-up's end).
    grown = run(worker, _case_soak, str(tmp_path), 500)
    assert grown["fds"] <= 0 and grown["maps"] <= 0, grown
    assert grown["rss"] < 32 << 20, grown


def _case_release_staging(tmp: str) -> None:
    fake = _fake()
    path = _save(tmp, _big())
    ref = torch.load(path, weights_only=True)
    with _gpu(), fake.watch():
        assert_same(zeroload.load(path, device="cuda", staging_bytes=8 << 20), ref)
    assert _core.cuda_staging_allocated() == (1 << 20, 8)
    assert fake.stat("pinned_bytes") == 8 << 20 and fake.stat("streams") == 1
    assert zeroload.release_staging() is True
    assert _core.cuda_staging_allocated() is None
    for what in ("pinned", "streams", "events"):
        assert fake.stat(what) == 0, what
    assert zeroload.release_staging() is False
    with _gpu(), fake.watch():
        assert_same(zeroload.load(path, device="cuda"), ref)


def test_release_staging_frees_the_pinned_ring(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_release_staging, str(tmp_path))


def _case_unavailable(tmp: str) -> None:
    fake = _fake()
    path = _save(tmp, {"x": torch.arange(10)})
    ckpt = _core.Checkpoint.open(str(path))
    for setup in (lambda: fake.stub(fakecuda.STUB_LIBRARY), lambda: fake.config("devices", 0)):
        setup()
        assert _core.cuda_available() is False
        assert _core.cuda_device_count() == 0
        backend = fakecuda.FakeBackend(fake)
        with _cuda.using_backend(backend), pytest.raises(zeroload.CudaError) as e:
            zeroload.load(path, device="cuda")
        assert "CUDA error in" not in str(e.value)
        with pytest.raises(zeroload.CudaError, match="not available"):
            _core.copy_to_cuda(ckpt, [], [], 0)
        fake.stub(0)
        fake.config("devices", 2)
        assert _core.cuda_available() is True
    with _gpu(), fake.watch():
        assert torch.equal(zeroload.load(path, device="cuda")["x"], torch.arange(10))


def test_a_stub_driver_or_no_device_means_cuda_is_unavailable(
    worker: list[Worker], tmp_path: Path
) -> None:
    run(worker, _case_unavailable, str(tmp_path))


def _case_driver_faults(tmp: str) -> None:
    fake = _fake()
    path = _save(tmp, _big())
    ref = torch.load(path, weights_only=True)
    for name, nth, code in [
        ("cuMemcpyHtoDAsync_v2", 2, fakecuda.UNKNOWN),
        ("cuEventQuery", 2, fakecuda.UNKNOWN),
        ("cuEventRecord", 1, fakecuda.UNKNOWN),
        ("cuMemHostAlloc", 1, fakecuda.INVALID_VALUE),
        ("cuStreamCreate", 1, fakecuda.UNKNOWN),
        ("cuPointerGetAttributes", 3, fakecuda.UNKNOWN),
    ]:
        zeroload.release_staging()
        fake.fail(name, nth, code)
        with _gpu(), fake.watch(), pytest.raises(zeroload.CudaError, match=f"in {name}: "):
            zeroload.load(path, device="cuda", staging_bytes=2 << 20)
        fake.reset()
        with _gpu(), fake.watch():
            assert_same(zeroload.load(path, device="cuda", staging_bytes=2 << 20), ref)
    fake.fail_async(2, fakecuda.ILLEGAL_ADDRESS)
    with _gpu(), fake.watch(), pytest.raises(zeroload.CudaError, match="ILLEGAL_ADDRESS"):
        zeroload.load(path, device="cuda", staging_bytes=2 << 20)
    with _gpu(), fake.watch():
        assert_same(zeroload.load(path, device="cuda", staging_bytes=2 << 20), ref)


def test_a_driver_fault_is_a_clean_cuda_error_and_the_next_load_works(
    worker: list[Worker], tmp_path: Path
) -> None:
    run(worker, _case_driver_faults, str(tmp_path))


def _case_destination_check(tmp: str) -> None:
    fake = _fake()
    path = _save(tmp, {"x": torch.arange(64, dtype=torch.uint8)})
    ckpt = _core.Checkpoint.open(str(path))
    _, off, _, _ = ckpt.storage(0)
    host = ctypes.create_string_buffer(64)
    other = fake.alloc(64, 1)
    freed = fake.alloc(64, 0)
    fake.free(freed)
    # Each claims (through DLPack) to be 64 bytes on cuda:0; none is.
    for dest in [
        fakecuda.DeviceBuffer(ctypes.addressof(host), 64, 0),
        fakecuda.DeviceBuffer(other, 64, 0),
        fakecuda.DeviceBuffer(freed, 64, 0),
    ]:
        with _gpu(), fake.watch(), pytest.raises(ValueError, match="not memory of CUDA device 0"):
            _core.copy_to_cuda(ckpt, [dest], [(off, 64, 0, 0)], 0)
    assert host.raw == bytes(64)
    assert fake.read(other, 64, 1) == bytes(64)
    fake.free(other, 1)
    # DLPack's own device must match too.
    with _gpu() as backend:
        on_one = backend.empty(64, torch.device("cuda", 1))
        with pytest.raises(ValueError, match="DLPack device"):
            _core.copy_to_cuda(ckpt, [on_one], [(off, 64, 0, 0)], 0)
        on_one.free()


def test_destinations_that_are_not_memory_of_the_device_are_refused(
    worker: list[Worker], tmp_path: Path
) -> None:
    run(worker, _case_destination_check, str(tmp_path))


def _case_context_restored(tmp: str) -> None:
    fake = _fake()
    path = _save(tmp, strided_views())
    ref = torch.load(path, weights_only=True)
    for current in [None, 0, 1]:
        for device in ["cuda:0", "cuda:1"]:
            with _gpu(device=current):
                before = fake.current()
                with fake.watch():  # records a finding if it changed
                    assert_same(zeroload.load(path, device=device), ref)
                assert fake.current() == before


def test_the_callers_current_context_is_left_alone(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_context_restored, str(tmp_path))


def _case_o_direct(tmp: str) -> None:
    path = _save(tmp, {f"w{i}": torch.randn(1000 + 777 * i) for i in range(10)})
    ckpt = _core.Checkpoint.open(str(path))
    raw = path.read_bytes()
    dev = torch.device("cuda", 0)
    for direct in [True, False]:
        seen: list[bool] = []

        def progress(done: int, total: int, seen: list[bool] = seen) -> None:
            seen.append(any(f & os.O_DIRECT for f in open_with_flags(path)))

        with _gpu() as backend:
            dests, reqs = [], []
            for i in range(ckpt.num_storages):
                _, off, n, _ = ckpt.storage(i)
                reqs.append((off, n, len(dests), 0))
                dests.append(backend.empty(n, dev))
            with _fake().watch(), backend.exporting(dev):
                _core.copy_to_cuda(ckpt, dests, reqs, 0, 2 << 20, progress, direct=direct)
            for (off, n, _, _), d in zip(reqs, dests):
                assert bytes(backend.finish(d).numpy()) == raw[off : off + n]
        want = direct and o_direct_supported(path)
        assert seen and all(s == want for s in seen), (direct, want, seen)


def test_o_direct_reads_bypass_the_page_cache_where_the_filesystem_allows(
    worker: list[Worker], tmp_path: Path
) -> None:
    """`direct=True` reads through an `O_DIRECT` descriptor (seen in /proc/self/fdinfo
    while the copy runs) where the filesystem allows it, buffered otherwise; without it,
    never. Every byte arrives either way."""
    run(worker, _case_o_direct, str(tmp_path))


# -- the fake catches what it claims to catch ------------------------------------------


def _bad_sequence(cls: str) -> None:
    """Misuses the driver the way `cls` describes (plain ctypes calls)."""
    fake = _fake()
    L = fake.lib
    vp = ctypes.c_void_p
    fake.bind(0)
    stream, event, pinned = vp(), vp(), vp()
    fake.call("cuStreamCreate", ctypes.byref(stream), 1)
    fake.call("cuMemHostAlloc", ctypes.byref(pinned), 4096, 1)
    dst = fake.alloc(4096, 0)
    slow = {"source-changed", "overlapping-destinations", "freed-while-pending"}
    slow |= {"pending-at-return", "unsynchronized-read"}
    if cls in slow:
        fake.config("min_delay_us", 50_000)  # the stream starts every op 50 ms late
        fake.config("max_delay_us", 50_000)
        fake.call("cuMemcpyHtoDAsync_v2", dst, pinned, 4096, stream)
    if cls == "unpinned-source":
        pageable = ctypes.create_string_buffer(4096)
        fake.call("cuMemcpyHtoDAsync_v2", dst, pageable, 4096, stream)
    elif cls == "bad-device-range":
        L.cuMemcpyHtoDAsync_v2(pinned.value, pinned, 4096, stream)  # a host "destination"
        L.cuMemcpyHtoDAsync_v2(dst + 4000, pinned, 4096, stream)  # past the allocation
    elif cls == "source-changed":
        ctypes.memset(pinned, 7, 4096)  # reused before the copy ran
    elif cls == "overlapping-destinations":
        fake.call("cuMemcpyHtoDAsync_v2", dst + 100, pinned, 8, stream)
    elif cls == "no-context":
        fake.bind(None)
        L.cuEventCreate(ctypes.byref(event), 0)
        fake.bind(0)
    elif cls == "wrong-context":
        fake.bind(1)
        other = fake.alloc(4096, 1)
        L.cuMemcpyHtoDAsync_v2(other, pinned, 4096, stream)  # a stream of context 0
        fake.free(other, 1)
        fake.bind(0)
    elif cls == "invalid-handle":
        dead = vp()
        fake.call("cuStreamCreate", ctypes.byref(dead), 1)
        fake.call("cuStreamDestroy_v2", dead)
        L.cuStreamSynchronize(dead)
    elif cls == "freed-while-pending":
        fake.call("cuMemFreeHost", pinned)
        pinned = None
    elif cls == "not-initialized":
        fake.config("initialized", 0)  # as in a fresh process
        L.cuCtxGetCurrent(ctypes.byref(vp()))
        fake.call("cuInit", 0)
    elif cls == "pending-at-return":
        with fake.watch():
            pass  # "returns" with the copy still queued
    elif cls == "context-not-restored":
        with fake.watch():
            fake.bind(1)
        fake.bind(0)
    elif cls == "leak":
        assert fake.check_leaks() > 0  # the stream, the slab, the allocation
    elif cls == "unsynchronized-read":
        fake.read(dst, 16)  # the copy into it has not run yet
    elif cls == "unsupported":
        attrs = (ctypes.c_uint * 1)(13)  # CU_POINTER_ATTRIBUTE_MAPPED
        data = (vp * 1)(ctypes.addressof(ctypes.c_int()))
        L.cuPointerGetAttributes(1, attrs, data, dst)
    else:
        raise AssertionError(cls)
    fake.call("cuStreamSynchronize", stream)
    fake.call("cuStreamDestroy_v2", stream)
    if pinned is not None:
        fake.call("cuMemFreeHost", pinned)
    fake.free(dst)


def _case_fake_catches(cls: str) -> None:
    fake = _fake()
    assert fake.findings() == []
    _bad_sequence(cls)
    fake.wait_idle()
    found = fake.take_findings()
    assert found, f"the fake recorded nothing for {cls}"
    assert {line.split(":", 1)[0] for line in found} == {cls}, found


@pytest.mark.parametrize("cls", fakecuda.CLASSES)
def test_the_fake_driver_catches_each_class_of_misuse(worker: list[Worker], cls: str) -> None:
    run(worker, _case_fake_catches, cls)


def test_device_memory_is_not_readable_by_the_host(tmp_path: Path) -> None:
    """A host read through a device address crashes, as on a GPU (in a child process of
    its own, with nothing but the fake loaded)."""
    lib = fakecuda.build()
    code = f"""
import ctypes
L = ctypes.CDLL({str(lib)!r})
ctx, p = ctypes.c_void_p(), ctypes.c_uint64()
assert L.cuInit(0) == 0
assert L.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
assert L.cuCtxSetCurrent(ctx) == 0
assert L.cuMemAlloc_v2(ctypes.byref(p), 4096) == 0
print("allocated", flush=True)
ctypes.string_at(p.value, 1)
print("read", flush=True)
"""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.stdout == "allocated\n", child
    assert child.returncode == -signal.SIGSEGV, child


# -- legacy (pre-zip) torch.save files ---------------------------------------------------


def _case_legacy_files(tmp: str) -> None:
    """Legacy files put storages at unaligned offsets; the GPU path reads them with pread
    like any other and must give what torch.load gives."""
    fake = _fake()
    legacy_dtypes = [
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
        torch.complex128,
    ]  # fmt: skip
    dtypes = {"odd": torch.arange(3, dtype=torch.uint8)}
    dtypes.update({str(d): random_tensor((5, 3), d, seed=i) for i, d in enumerate(legacy_dtypes)})
    for what, obj in {
        "training": training_checkpoint(),
        "views": strided_views(),
        "dtypes": dtypes,
    }.items():
        path = Path(tmp) / f"{what}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=False)
        assert _core.Checkpoint.open(str(path)).format == "torch legacy"
        with _gpu() as backend, fake.watch():
            ours = zeroload.load(path, device="cuda", staging_bytes=4 << 20)
        ref = torch.load(path, map_location="cpu", weights_only=True)
        assert_same(ours, ref, what)
        assert_sharing_same(ours, ref)
        assert backend.allocations > 0
    with _gpu(), fake.watch(), zeroload.open(path, device="cuda") as f:
        for name in ("odd", "torch.float64", "torch.complex128"):
            assert torch.equal(f.get_tensor(name), dtypes[name]), name


def test_legacy_files_on_cuda(worker: list[Worker], tmp_path: Path) -> None:
    run(worker, _case_legacy_files, str(tmp_path))
