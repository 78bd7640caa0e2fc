"""Checkpoints written by torch.save and safetensors, shared across the suite."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Every dtype torch.save writes. Values are made from random bytes so that every bit
# pattern class shows up (NaNs included), and comparisons are bitwise.
ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex32,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


# Dtypes torch.save also writes that have no arithmetic (bit containers), pack two values
# per element, or (bcomplex32) warn that they are experimental: compared as bytes only.
TORCH_ONLY_DTYPES = [
    torch.float4_e2m1fn_x2,
    torch.bits8,
    torch.bits16,
    torch.bits1x8,
    torch.bits2x4,
    torch.bits4x2,
    torch.bcomplex32,
]

# Every safetensors dtype torch can hold, as safetensors' header names it (what
# `safe_open` maps each to). F6_E2M3 and F6_E3M2 have no torch dtype.
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F4": torch.float4_e2m1fn_x2,
}


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.block = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32)
        )
        self.norm = torch.nn.BatchNorm1d(32)
        self.head = torch.nn.Linear(32, 50, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(idx))))


class TiedNet(torch.nn.Module):
    """Input and output embeddings share one weight (GPT-2 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(40, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 40, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.proj(self.wte(idx))))


@pytest.fixture(scope="session")
def model_file(ckpt_dir: Path) -> Path:
    torch.manual_seed(0)
    model = TinyNet().eval()
    model.norm.running_mean.uniform_()
    path = ckpt_dir / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def training_checkpoint() -> dict:
    torch.manual_seed(1)
    model = TiedNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loss = model(torch.randint(0, 40, (4, 5))).sum()
    loss.backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 7,
        "step": 2**70,
        "lr": 3e-4,
        "best": float("inf"),
        "name": "run-ü",
        "blob": b"\x00\x01binary\xff",
        "shape": torch.Size([3, 4]),
        "device": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "nested": {"a": (1, 2.5, None, True, False), "b": [{"c": "d"}, ()], 3: "int key"},
        "seen": {1, 2, 3},
        "z": complex(1.5, -2),
        "counts": collections.Counter({"a": 2}),
        "ba": bytearray(b"abc"),
    }


class ProgressRecorder:
    """A progress callback that records its calls and the threads it was called on, and
    checks the contract every copy's progress keeps (`check`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.threads: set[int] = set()

    def __call__(self, done: int, total: int) -> None:
        import threading

        self.calls.append((done, total))
        self.threads.add(threading.get_ident())

    def check(self, total: int) -> None:
        """First `(0, total)`, last `(total, total)`, never backwards, and only ever on the
        thread that started the copy (this one)."""
        import threading

        assert self.calls[0] == (0, total), self.calls[:3]
        assert self.calls[-1] == (total, total), self.calls[-3:]
        assert all(a[0] <= b[0] for a, b in zip(self.calls, self.calls[1:])), self.calls
        assert self.threads == {threading.get_ident()}


@pytest.fixture
def progress_recorder() -> ProgressRecorder:
    """A fresh `ProgressRecorder` to pass as `progress=`."""
    return ProgressRecorder()


def open_with_flags(path: Path) -> list[int]:
    """The `open` flags of every file descriptor of this process open on `path` (from
    `/proc/self/fdinfo`), e.g. to tell whether a reader uses `O_DIRECT`."""
    import os

    want = os.path.realpath(path)
    flags = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != want:
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("flags:"):
                        flags.append(int(line.split()[1], 8))
        except OSError:  # closed meanwhile
            continue
    return flags


def o_direct_supported(path: Path) -> bool:
    """Whether `path`'s filesystem lets it be opened with `O_DIRECT` (tmpfs may not)."""
    import os

    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def strided_views() -> dict[str, torch.Tensor]:
    """A state dict of views of one storage (transposed, sliced, stepped, a row, an
    expanded tensor, the storage's tail) and one tensor of its own: strides, offsets and
    sharing a loader must keep."""
    base = torch.arange(600, dtype=torch.float32).reshape(20, 30)
    return {
        "base": base,
        "t": base.t(),
        "slice": base[3:9, 5:],
        "step": base[::3, ::2],
        "row": base[7],
        "expanded": torch.arange(4.0).reshape(4, 1).expand(4, 5),
        "tail": base.reshape(-1)[590:],
        "other": torch.ones(3, dtype=torch.int64),
    }
