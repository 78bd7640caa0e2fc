"""The GPU path: file -> pinned staging ring -> device. Skipped without CUDA.

Every case is compared with `torch.load(map_location="cuda")`: same objects, dtypes,
shapes, strides, offsets, values and storage sharing. Memory claims are checked with
PyTorch's allocator statistics and the process RSS; no test asserts a timing.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

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
from zeroload._load_into import load_into

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def save(tmp_path: Path, obj: object, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def check_against_torch(path: Path, device: str = "cuda") -> object:
    ours = zeroload.load(path, device=device)
    ref = torch.load(path, map_location=device, weights_only=True)
    torch.cuda.synchronize()
    assert_same(ours, ref)
    assert_sharing_same(ours, ref)
    for t in _tensors(ours):
        assert t.device == torch.device(device if ":" in device else "cuda:0")
    return ours


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_cuda_is_seen_by_the_core() -> None:
    assert _core.cuda_available()
    assert _core.cuda_device_count() == torch.cuda.device_count()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {
        "t": random_tensor((7, 13), dtype),
        "scalar": random_tensor((), dtype, seed=1),
        "empty": random_tensor((0, 4), dtype, seed=2),
    }
    check_against_torch(save(tmp_path, sd))


def test_views_keep_stride_offset_and_sharing(tmp_path: Path) -> None:
    sd = strided_views()
    ours = check_against_torch(save(tmp_path, sd))
    assert isinstance(ours, dict)
    assert ours["t"].untyped_storage().data_ptr() == ours["base"].untyped_storage().data_ptr()


def test_training_checkpoint_and_tied_weights(tmp_path: Path) -> None:
    ours = check_against_torch(save(tmp_path, training_checkpoint()))
    assert isinstance(ours, dict)
    model = ours["model"]
    assert model["wte.weight"].data_ptr() == model["lm_head.weight"].data_ptr()


def test_tied_model_state_dict_shares_memory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save(tmp_path, TiedNet().state_dict())
    sd = zeroload.load(path, device="cuda")
    assert sd["wte.weight"].untyped_storage().data_ptr() == (
        sd["lm_head.weight"].untyped_storage().data_ptr()
    )


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 0), 0])
def test_device_spellings(tmp_path: Path, device: object) -> None:
    path = save(tmp_path, {"x": torch.arange(10)})
    out = zeroload.load(path, device=device)  # type: ignore[arg-type]
    assert out["x"].device == torch.device("cuda", 0)
    assert torch.equal(out["x"].cpu(), torch.arange(10))


def test_safetensors_file(tmp_path: Path) -> None:
    sd = {f"w{i}": random_tensor((17, i + 1), dt, seed=i) for i, dt in enumerate(ALL_DTYPES[:12])}
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(sd, path)
    ours = zeroload.load(path, device="cuda")
    ref = safetensors.torch.load_file(path, device="cuda")
    with safetensors.safe_open(path, "pt") as f:  # load_file's dict has another order
        assert list(ours) == list(f.keys())
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape
        assert torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8)), k


def test_dtype_cast_on_gpu_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save(tmp_path, TinyNet().state_dict())
    ours = zeroload.load(path, device="cuda", dtype=torch.bfloat16)
    ref = torch.load(path, map_location="cuda", weights_only=True)
    for k, v in ref.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert ours[k].dtype == want.dtype and torch.equal(ours[k], want), k


def test_gpu_peak_is_the_sum_of_storages(tmp_path: Path) -> None:
    # Sizes are multiples of 512 bytes, the caching allocator's rounding, so "allocated"
    # is exactly the sum of the storages.
    sd = {f"w{i}": torch.randn(256, 512 + 128 * i) for i in range(8)}
    sd["tied"] = sd["w0"][:10]  # shares w0's storage: must not be allocated again
    path = save(tmp_path, sd)
    want = sum(v.untyped_storage().nbytes() for k, v in sd.items() if k != "tied")
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = zeroload.load(path, device="cuda")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base == want
    assert torch.cuda.memory_allocated() - base == want
    del out
    gc.collect()
    assert torch.cuda.memory_allocated() == base  # every storage owns its memory


def test_progress_callback_totals(tmp_path: Path, progress_recorder: ProgressRecorder) -> None:
    sd = {f"w{i}": torch.randn(1 << 20) for i in range(20)}  # 80 MiB
    path = save(tmp_path, sd)
    ckpt = _core.Checkpoint.open(str(path))
    ids = list(range(ckpt.num_storages))
    tensors = _cuda.storage_tensors(
        ckpt, ids, torch.device("cuda"), progress=progress_recorder, budget=8 << 20
    )
    progress_recorder.check(sum(ckpt.storage(i)[2] for i in ids))
    raw = path.read_bytes()
    for i, t in zip(ids, tensors):
        _, off, n, _ = ckpt.storage(i)
        assert t.dtype == torch.uint8 and t.numel() == n
        assert bytes(t.cpu().numpy()) == raw[off : off + n]


def test_exception_in_progress_aborts_and_the_ring_is_reusable(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.randn(1 << 20) for i in range(20)}
    path = save(tmp_path, sd)
    ckpt = _core.Checkpoint.open(str(path))

    class Stop(Exception):
        pass

    def progress(done: int, total: int) -> None:
        if done:
            raise Stop

    with pytest.raises(Stop):
        _cuda.storage_tensors(
            ckpt,
            list(range(ckpt.num_storages)),
            torch.device("cuda"),
            progress=progress,
            budget=4 << 20,
        )
    check_against_torch(path)


@pytest.mark.parametrize("budget", [1, 2 << 20, 5 << 20, 64 << 20])
def test_small_budgets_and_many_chunks(tmp_path: Path, budget: int) -> None:
    sd = {f"w{i}": torch.randn(3 << 18) for i in range(6)}  # 3 MiB each
    sd.update({f"small{i}": torch.arange(i + 1) for i in range(200)})
    path = save(tmp_path, sd)
    ours = zeroload.load(path, device="cuda", staging_bytes=budget)
    ref = torch.load(path, map_location="cuda", weights_only=True)
    assert_same(ours, ref)
    slab, n = _core.cuda_staging_allocated()
    assert n >= 2 and slab * n <= max(budget, 2 << 20)


def test_release_staging_frees_the_ring_and_the_next_load_works(tmp_path: Path) -> None:
    path = save(tmp_path, {"x": torch.randn(1 << 20)})
    zeroload.load(path, device="cuda")
    assert _core.cuda_staging_allocated() is not None
    assert zeroload.release_staging() is True
    assert _core.cuda_staging_allocated() is None
    assert zeroload.release_staging() is False
    check_against_torch(path)


def test_get_tensor_in_a_loop_starts_no_thread_per_tensor(tmp_path: Path) -> None:
    sd = {f"t{i}": torch.randn(100 + i) for i in range(50)}
    path = tmp_path / "many.safetensors"
    safetensors.torch.save_file(sd, path)
    with zeroload.open(path, device="cuda") as f:
        keys = f.keys()
        f.get_tensor(keys[0])
        tasks = len(os.listdir("/proc/self/task"))
        for k in keys:
            assert torch.equal(f.get_tensor(k).cpu(), sd[k]), k
        assert len(os.listdir("/proc/self/task")) == tasks


def test_concurrent_loads_and_staging_queries_all_finish(tmp_path: Path) -> None:
    paths = [
        save(tmp_path, {f"w{j}": torch.randn(1 << 18) for j in range(16)}, f"{i}.pth")
        for i in range(2)
    ]
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(p: Path) -> None:
        try:
            check_against_torch(p)
        except BaseException as e:
            errors.append(e)

    def poll() -> None:
        while not stop.is_set():
            _core.cuda_staging_allocated()

    threads = [threading.Thread(target=load, args=(p,)) for p in paths]
    poller = threading.Thread(target=poll)
    poller.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    poller.join(30)
    assert not any(t.is_alive() for t in [*threads, poller]), "hung"
    assert not errors, errors


def test_staging_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(tmp_path, {"x": torch.randn(1 << 20)})
    monkeypatch.setenv("ZEROLOAD_STAGING_BYTES", "8M")
    zeroload.load(path, device="cuda")
    slab, n = _core.cuda_staging_allocated()
    assert slab * n <= 8 << 20


@pytest.mark.parametrize("direct", [True, False])
def test_o_direct_reads(tmp_path: Path, direct: bool) -> None:
    """`direct=True` reads through an `O_DIRECT` descriptor (seen in /proc/self/fdinfo
    while the copy runs) where the filesystem allows it, and through the page cache
    otherwise; `direct=False` never uses one. Either way every byte arrives."""
    sd = {f"w{i}": torch.randn(1000 + 777 * i) for i in range(10)}
    path = save(tmp_path, sd)
    ckpt = _core.Checkpoint.open(str(path))
    raw = path.read_bytes()
    outs = []
    reqs = []
    for i in range(ckpt.num_storages):
        _, off, n, _ = ckpt.storage(i)
        t = torch.empty(n, dtype=torch.uint8, device="cuda:0")
        reqs.append((off, n, len(outs), 0))
        outs.append((off, n, t))
    seen: list[bool] = []

    def progress(done: int, total: int) -> None:
        seen.append(any(f & os.O_DIRECT for f in open_with_flags(path)))

    with torch.cuda.device(0):
        dests = [t for _, _, t in outs]
        _core.copy_to_cuda(ckpt, dests, reqs, 0, 2 << 20, progress, direct=direct)
    assert seen and all(s == (direct and o_direct_supported(path)) for s in seen), seen
    for off, n, t in outs:
        assert bytes(t.cpu().numpy()) == raw[off : off + n]


def test_bad_device_index(tmp_path: Path) -> None:
    path = save(tmp_path, {"x": torch.ones(2)})
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"cuda:{n}"):
        zeroload.load(path, device=f"cuda:{n}")
    ckpt = _core.Checkpoint.open(str(path))
    t = torch.empty(8, dtype=torch.uint8, device="cuda:0")
    with pytest.raises(ValueError, match="not"):
        _core.copy_to_cuda(ckpt, [t], [(0, 8, 0, 0)], n, None, None)


def test_destination_pointers_are_checked(tmp_path: Path) -> None:
    path = save(tmp_path, {"x": torch.ones(64)})
    ckpt = _core.Checkpoint.open(str(path))
    host = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="DLPack device"):
        _core.copy_to_cuda(ckpt, [host], [(0, 64, 0, 0)], 0, None, None)
    assert torch.count_nonzero(host) == 0


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs two GPUs: with one, the load's device is the current one (the fake "
    "driver checks this with eight: test_the_callers_current_context_is_left_alone)",
)
def test_current_device_is_left_alone(tmp_path: Path) -> None:
    path = save(tmp_path, {"x": torch.ones(4)})
    before = torch.cuda.current_device()
    try:
        for current, other in [(0, 1), (1, 0)]:
            torch.cuda.set_device(current)
            out = zeroload.load(path, device=f"cuda:{other}")
            assert out["x"].device == torch.device("cuda", other)
            assert torch.cuda.current_device() == current
            # "cuda" means the current device, and loading there changes nothing either.
            assert zeroload.load(path, device="cuda")["x"].device.index == current
            assert torch.cuda.current_device() == current
            # torch still works normally on its own stream afterwards.
            assert torch.ones(3, device="cuda").sum().item() == 3
    finally:
        torch.cuda.set_device(before)


def test_load_into_live_cuda_module_in_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = TinyNet().eval()
    path = save(tmp_path, src.state_dict())
    model = TinyNet().cuda().eval()
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    load_into(model, path)
    assert torch.cuda.max_memory_allocated() == base  # no intermediate tensor on the GPU
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
    ref = TinyNet().cuda().eval()
    ref.load_state_dict(torch.load(path, map_location="cuda"))
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    idx = torch.arange(10, device="cuda")
    with torch.no_grad():
        assert torch.equal(model(idx), ref(idx))


def test_load_into_meta_module_on_cuda(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = TinyNet().eval()
    path = save(tmp_path, src.state_dict())
    with torch.device("meta"):
        model = TinyNet().eval()
    load_into(model, path, device="cuda")
    for k, v in src.state_dict().items():
        got = model.state_dict()[k]
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), v), k


def _write_big_safetensors(path: Path, nbytes: int, tensor_bytes: int = 256 << 20) -> None:
    """A multi-GB safetensors file written block by block (never held in memory)."""
    n = nbytes // tensor_bytes
    header = {
        f"w{i}": {
            "dtype": "U8",
            "shape": [tensor_bytes],
            "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes],
        }
        for i in range(n)
    }
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    block = torch.randint(0, 256, (16 << 20,), dtype=torch.uint8).numpy().tobytes()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _ in range(n * tensor_bytes // len(block)):
            f.write(block)


@pytest.mark.slow
def test_host_memory_stays_within_the_staging_budget(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "big.safetensors"
    size = 3 << 30
    free, _total = torch.cuda.mem_get_info()
    if free < size + (1 << 30):
        pytest.skip("not enough free GPU memory for a 3 GiB load")
    _write_big_safetensors(path, size)
    budget = 256 << 20
    torch.zeros(1, device="cuda")  # CUDA context up before the baseline
    proc = psutil.Process()
    gc.collect()
    baseline = proc.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = zeroload.load(path, device="cuda", staging_bytes=budget)
        torch.cuda.synchronize()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, proc.memory_info().rss)
    assert peak - baseline <= budget + (64 << 20), (peak - baseline) / 2**20
    assert len(out) == size // (256 << 20)
    # Spot-check contents against the file.
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + hlen + (1 << 30) + 12345)
        want = f.read(4096)
    t = out[f"w{(1 << 30) // (256 << 20)}"]
    assert bytes(t[12345 : 12345 + 4096].cpu().numpy()) == want
