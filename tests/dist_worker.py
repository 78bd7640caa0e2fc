"""Multi-process scenarios behind tests/test_distributed.py (gloo on CPU).

    python tests/dist_worker.py OUT_DIR WORLD [SCENARIO,...]

writes the checkpoints the scenarios load into OUT_DIR/ckpt, spawns WORLD ranks that each
run every scenario in order, and writes OUT_DIR/rank{r}.json: per scenario, the error
`load_into` / `dcp.load` raised (if any), the problems the checks found, and the bytes the
rank read while loading (`/proc/self/io` rchar) next to its share of the tensors and how
much of that share is a zero-copy view of the file (its address in a mapping of it).

Every rank runs the same collectives in the same order whatever happens to it (a load that
fails is recorded, then the ranks agree on whether to go on), so a failing rank cannot
leave the others waiting; loading itself must not communicate at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- models


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        # Under tensor parallelism q/k/v hold this rank's heads only: -1 heads.
        q, k, v = (
            lin(h).view(b, t, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    """A small GPT-style transformer."""

    def __init__(self, vocab: int, d: int = 128, heads: int = 4, ff: int = 384, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class TiedLM(TinyLM):
    """Input and output embeddings share one weight."""

    def __init__(self, vocab: int) -> None:
        super().__init__(vocab, layers=1)
        self.head.weight = self.tok.weight


# TP needs even splits of heads and widths; FSDP2 takes any size (uneven shards).
TP_VOCAB = 256
FSDP_VOCAB = 251


def trained(cls: type, vocab: int) -> nn.Module:
    torch.manual_seed(0)
    model = cls(vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # LayerNorms away from 1/0 too
    return model.eval()


def tp_plan(model: TinyLM) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {
        "tok": RowwiseParallel(input_layouts=Replicate()),
        "head": ColwiseParallel(output_layouts=Replicate()),
    }
    for i in range(len(model.blocks)):
        for name in ("q", "k", "v", "up"):
            plan[f"blocks.{i}.{name}"] = ColwiseParallel()
        for name in ("o", "down"):
            plan[f"blocks.{i}.{name}"] = RowwiseParallel()
    return plan


def fully_shard_model(model: TinyLM, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)


# Placements on 1-D and 2-D meshes: name -> (shape, dtype, placements, is_buffer).
def placement_specs(mesh_shape: tuple[int, ...]) -> dict[str, tuple]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if len(mesh_shape) == 1:
        return {
            "s0": ((9, 7), torch.float32, [Shard(0)], False),
            "s1": ((9, 7), torch.bfloat16, [Shard(1)], False),
            "rep": ((4, 6), torch.float32, [Replicate()], False),
            "s2_3d": ((3, 4, 5), torch.float32, [Shard(2)], False),
            "s0_one_row": ((1, 5), torch.float32, [Shard(0)], False),  # rank 1 holds nothing
            "s0_int": ((11,), torch.int64, [Shard(0)], True),  # a buffer
        }
    return {
        "s0_s1": ((9, 7), torch.float32, [Shard(0), Shard(1)], False),
        "s1_s0": ((9, 7), torch.bfloat16, [Shard(1), Shard(0)], False),
        "s0_s0": ((9, 7), torch.float32, [Shard(0), Shard(0)], False),
        "s1_s1": ((5, 9), torch.float32, [Shard(1), Shard(1)], False),
        "rep_s1": ((6, 5), torch.float32, [Replicate(), Shard(1)], False),
        "s0_rep": ((6, 5), torch.float32, [Shard(0), Replicate()], True),
        "strided": ((10, 3), torch.float32, [_StridedShard(0, split_factor=2), Shard(0)], False),
    }


class Params(nn.Module):
    """A module holding one DTensor per spec, on the meta device or zero-filled."""

    def __init__(self, specs: dict[str, tuple], mesh: Any, device: str) -> None:
        from torch.distributed.tensor import distribute_tensor

        super().__init__()
        for name, (shape, dtype, placements, is_buffer) in specs.items():
            t = torch.zeros(shape, dtype=dtype, device=device)
            d = distribute_tensor(t, mesh, placements, src_data_rank=None)
            if is_buffer:
                self.register_buffer(name, d)
            else:
                self.register_parameter(name, nn.Parameter(d, requires_grad=False))


def placement_tensors(mesh_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(mesh_shape) * 10 + mesh_shape[0])
    out = {}
    for name, (shape, dtype, _p, _b) in placement_specs(mesh_shape).items():
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g).to(dtype)
        else:
            out[name] = torch.randint(-(2**40), 2**40, shape, generator=g, dtype=dtype)
    return out


MESHES = [(2,), (2, 1), (1, 2)]

# ------------------------------------------------------------------------ checkpoints


def save_shards(sd: dict[str, torch.Tensor], directory: Path, fmt: str, n: int) -> None:
    """A Hugging Face shard set of `n` files with its index."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    weight_map = {}
    for i in range(n):
        part = {k: sd[k].contiguous().clone() for k in names[i::n]}
        if fmt == "safetensors":
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            safetensors.torch.save_file(part, directory / fname)
        else:
            fname = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            torch.save(part, directory / fname)
        weight_map.update(dict.fromkeys(part, fname))
    index = (
        "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    )
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_checkpoints(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    tp = {k: v.contiguous() for k, v in trained(TinyLM, TP_VOCAB).state_dict().items()}
    safetensors.torch.save_file(tp, d / "tp.safetensors")
    torch.save(tp, d / "tp.pth")
    save_shards(tp, d / "tp_hf", "safetensors", 2)
    fsdp = trained(TinyLM, FSDP_VOCAB).state_dict()
    save_shards(fsdp, d / "fsdp_bin", "bin", 2)
    save_shards(fsdp, d / "fsdp_hf", "safetensors", 3)
    torch.save(fsdp, d / "fsdp.pth")
    torch.save(trained(TiedLM, FSDP_VOCAB).state_dict(), d / "tied.pth")
    # As save_pretrained stores tied weights: once, under the input embedding's name.
    tied_once = {k: v for k, v in trained(TiedLM, FSDP_VOCAB).state_dict().items()}
    del tied_once["head.weight"]
    safetensors.torch.save_file(tied_once, d / "tied_once.safetensors")
    for mesh_shape in MESHES:
        tag = "x".join(map(str, mesh_shape))
        safetensors.torch.save_file(
            placement_tensors(mesh_shape), d / f"placements_{tag}.safetensors"
        )


def full_state(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        import zeroload

        return {k: v.clone() for k, v in zeroload.load(path).items()}
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------ harness


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def file_mappings(directory: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps from files under `directory`."""
    root = str(directory.resolve()) + os.sep
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(root):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi))
    return out


class Ctx:
    """What a scenario sees: its rank, files, and helpers that record instead of raise."""

    def __init__(self, rank: int, world: int, ckpt: Path, work: Path) -> None:
        self.rank = rank
        self.world = world
        self.ckpt = ckpt
        self.work = work
        self.report: dict[str, Any] = {"load_error": None, "problems": []}

    def problem(self, msg: str) -> None:
        self.report["problems"].append(msg)

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Runs the load, recording its error (not raising) and the bytes read."""
        before = rchar()
        try:
            yield
        except Exception as e:
            self.report["load_error"] = f"{type(e).__name__}: {e}"
            self.report["load_traceback"] = traceback.format_exc()
        self.report["rchar"] = rchar() - before

    def all_loaded(self) -> bool:
        """Whether every rank's load succeeded (the same collective on every rank)."""
        flag = torch.tensor([0 if self.report["load_error"] else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def check_locals(self, sd: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
        """Every DTensor's local tensor equals distribute_tensor(full)'s; plain tensors
        equal the full ones. Records the local bytes a rank should read."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        local_bytes = plain_bytes = view_bytes = 0
        seen: set[int] = set()  # tied tensors are read once
        mapped = file_mappings(self.ckpt)
        for name, t in sd.items():
            ref = full[name]
            if isinstance(t, DTensor):
                want = distribute_tensor(ref, t.device_mesh, t.placements, src_data_rank=None)
                got, want_local = t.to_local(), want.to_local()
                if got.data_ptr() not in seen:
                    nbytes = want_local.numel() * ref.element_size()
                    local_bytes += nbytes
                    if got.numel() and any(a <= got.data_ptr() < b for a, b in mapped):
                        view_bytes += nbytes  # a view of the file: nothing was read
            else:
                got, want_local = t, ref
                if got.data_ptr() not in seen:
                    plain_bytes += ref.numel() * ref.element_size()
            if got.numel():
                seen.add(got.data_ptr())
            if got.dtype != want_local.dtype or not torch.equal(got, want_local.to(got.device)):
                self.problem(f"{name}: local tensor differs from distribute_tensor's")
        self.report["local_bytes"] = local_bytes
        self.report["plain_bytes"] = plain_bytes
        self.report["view_bytes"] = view_bytes

    def check_output(self, model: nn.Module, ref: nn.Module, vocab: int) -> None:
        idx = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            out, want = model(idx), ref(idx)
        if hasattr(out, "full_tensor"):
            out = out.full_tensor()
        if not torch.allclose(out, want, rtol=1e-4, atol=1e-5):
            self.problem(f"output differs from the unsharded model's by {(out - want).abs().max()}")

    def file_bytes(self, path: Path) -> None:
        """Records the checkpoint's size and what opening it reads (headers, zip
        directories, pickles, the index): the fixed cost before any tensor data."""
        import zeroload

        files = [path] if path.is_file() else list(path.iterdir())
        self.report["file_bytes"] = sum(f.stat().st_size for f in files)
        before = rchar()
        with zeroload.open(path):
            pass
        self.report["open_rchar"] = rchar() - before


def warm_up(work: Path, world: int) -> None:
    """Run every kind of load once on a tiny model, so that Python's first-use imports
    (reading .py/.pyc files counts in rchar) are not counted in the scenarios."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import zeroload
    import zeroload.distributed

    path = work / "warm_up.safetensors"
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    if dist.get_rank() == 0:
        safetensors.torch.save_file(src.state_dict(), path)
    dist.barrier()
    mesh = init_device_mesh("cpu", (world,))
    for device in ("meta", "cpu"):
        with torch.device(device):
            m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
        parallelize_module(m, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
        zeroload.load_into(m, path)
    dcp.load(m.state_dict(), storage_reader=zeroload.distributed.StorageReader(path))
    with zeroload.open(path):
        pass


# ---------------------------------------------------------------------- scenarios


def _tp_model(ctx: Ctx, device: str, mesh_device: str = "cpu") -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh(mesh_device, (ctx.world,))
    if device == "meta":
        with torch.device("meta"):
            model = TinyLM(TP_VOCAB)
    else:
        torch.manual_seed(100 + ctx.rank)
        model = TinyLM(TP_VOCAB)
    parallelize_module(model, mesh, tp_plan(model))
    return model.eval()


def _load_into_scenario(
    ctx: Ctx, model: nn.Module, path: Path, ref: nn.Module | None, vocab: int
) -> None:
    import zeroload

    ctx.file_bytes(path)
    ptrs = {
        k: getattr(v, "_local_tensor", v).data_ptr()
        for k, v in model.state_dict(keep_vars=True).items()
        if not v.is_meta
    }
    with ctx.loading():
        result = zeroload.load_into(model, path)
        if result.missing_keys or result.unexpected_keys:
            raise AssertionError(f"keys: {result}")
    if not ctx.all_loaded():
        return
    sd = model.state_dict(keep_vars=True)
    for k, p in ptrs.items():
        if getattr(sd[k], "_local_tensor", sd[k]).data_ptr() != p:
            ctx.problem(f"{k}: a materialised tensor was replaced instead of filled in place")
    ctx.check_locals(model.state_dict(), full_state(path))
    if ref is not None:
        ctx.check_output(model, ref, vocab)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def tp_meta_safetensors(ctx: Ctx) -> None:
    model = _tp_model(ctx, "meta")
    _load_into_scenario(
        ctx, model, ctx.ckpt / "tp.safetensors", trained(TinyLM, TP_VOCAB), TP_VOCAB
    )


def tp_materialised_pth(ctx: Ctx) -> None:
    model = _tp_model(ctx, "cpu")
    _load_into_scenario(ctx, model, ctx.ckpt / "tp.pth", trained(TinyLM, TP_VOCAB), TP_VOCAB)


def tp_meta_cuda(ctx: Ctx) -> None:
    """Meta model on a CUDA mesh: local shards land on the GPU through the staging ring
    (every rank on the current device; gloo is enough, loading does not communicate)."""
    torch.cuda.set_device(ctx.rank % torch.cuda.device_count())
    model = _tp_model(ctx, "meta", mesh_device="cuda")
    _load_into_scenario(ctx, model, ctx.ckpt / "tp.safetensors", None, TP_VOCAB)
    for k, v in model.state_dict().items():
        if _local(v).device.type != "cuda":
            ctx.problem(f"{k} is not on the GPU")


def _fsdp_model(ctx: Ctx, cls: type, materialise: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (ctx.world,))
    with torch.device("meta"):
        model = cls(FSDP_VOCAB)
    fully_shard_model(model, mesh)
    if materialise:
        model.to_empty(device="cpu")
    return model.eval()


def fsdp2_meta_bin_shards(ctx: Ctx) -> None:
    model = _fsdp_model(ctx, TinyLM, materialise=False)
    _load_into_scenario(ctx, model, ctx.ckpt / "fsdp_bin", trained(TinyLM, FSDP_VOCAB), FSDP_VOCAB)


def fsdp2_materialised_hf_dir(ctx: Ctx) -> None:
    model = _fsdp_model(ctx, TinyLM, materialise=True)
    _load_into_scenario(ctx, model, ctx.ckpt / "fsdp_hf", trained(TinyLM, FSDP_VOCAB), FSDP_VOCAB)


def fsdp2_tied_meta(ctx: Ctx) -> None:
    model = _fsdp_model(ctx, TiedLM, materialise=False)
    _load_into_scenario(ctx, model, ctx.ckpt / "tied.pth", trained(TiedLM, FSDP_VOCAB), FSDP_VOCAB)
    if model.head.weight is not model.tok.weight:
        ctx.problem("tied weights are no longer one parameter")


def fsdp2_tied_stored_once(ctx: Ctx) -> None:
    """A tied model built with zeroload.init_empty (and one materialised), FSDP2-sharded,
    from a checkpoint holding the tied weight under one of its names only."""
    from torch.distributed.device_mesh import init_device_mesh

    import zeroload

    path = ctx.ckpt / "tied_once.safetensors"
    full = full_state(path)
    full["head.weight"] = full["tok.weight"]
    ref = trained(TiedLM, FSDP_VOCAB)
    for materialise in (False, True):
        mesh = init_device_mesh("cpu", (ctx.world,))
        with zeroload.init_empty():
            model = TiedLM(FSDP_VOCAB)
        fully_shard_model(model, mesh)
        if materialise:
            model.to_empty(device="cpu")
        model.eval()
        with ctx.loading():
            result = zeroload.load_into(model, path)  # strict: no tied name is missing
        if not ctx.all_loaded():
            return
        if result.missing_keys or result.unexpected_keys:
            ctx.problem(f"keys: {result}")
        if model.head.weight is not model.tok.weight:
            ctx.problem(f"materialise={materialise}: tied weights are no longer one parameter")
        ctx.check_locals(model.state_dict(), full)
        ctx.check_output(model, ref, FSDP_VOCAB)


def _placements(ctx: Ctx, device: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    for mesh_shape in MESHES:
        tag = "x".join(map(str, mesh_shape))
        mesh = init_device_mesh("cpu", mesh_shape)
        model = Params(placement_specs(mesh_shape), mesh, device)
        sub = Ctx(ctx.rank, ctx.world, ctx.ckpt, ctx.work)
        _load_into_scenario(sub, model, ctx.ckpt / f"placements_{tag}.safetensors", None, 0)
        for k, v in sub.report.items():
            if k == "problems":
                ctx.report["problems"] += [f"mesh {tag}: {p}" for p in v]
            elif k in ("load_error", "load_traceback"):
                if v and not ctx.report.get(k):
                    ctx.report[k] = f"mesh {tag}: {v}"
            elif isinstance(v, int):
                ctx.report[k] = ctx.report.get(k, 0) + v


def placements_meta(ctx: Ctx) -> None:
    _placements(ctx, "meta")


def placements_materialised(ctx: Ctx) -> None:
    _placements(ctx, "cpu")


def broken_rank(ctx: Ctx) -> None:
    """Rank 1's copy of the file is cut short after it was opened; rank 0's is fine."""
    import zeroload
    from zeroload import _slices

    path = ctx.work / f"rank{ctx.rank}.safetensors"
    shutil.copy(ctx.ckpt / "tp.safetensors", path)
    model = _tp_model(ctx, "meta")
    real_copy = _slices._copy

    def copy_after_truncating(*args: Any, **kwargs: Any) -> Any:
        os.truncate(path, path.stat().st_size // 2)
        return real_copy(*args, **kwargs)

    if ctx.rank == 1:
        _slices._copy = copy_after_truncating
    try:
        with ctx.loading():
            zeroload.load_into(model, path)
    finally:
        _slices._copy = real_copy
    ctx.report["path"] = str(path)
    ctx.all_loaded()  # both ranks get here: the failure did not block rank 0


def resident(path: Path) -> list[bool]:
    """Per page of `path`, whether it is in the page cache (mincore; reads nothing)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        buf = (ctypes.c_char * size).from_buffer(m)
        vec = (ctypes.c_ubyte * pages)()
        rc = ctypes.CDLL(None).mincore(ctypes.c_void_p(ctypes.addressof(buf)), size, vec)
        del buf
        assert rc == 0
        return [bool(v & 1) for v in vec]
    finally:
        m.close()


def evict(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def shard_readahead(ctx: Ctx) -> None:
    """A meta model with one 8 MiB Shard(0) parameter, its file evicted from the page
    cache: each rank in turn loads it (views of the file) and records which share of its
    own rows' pages and of the other rank's the background readahead brought in."""
    import time

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    import zeroload

    path = ctx.work / "readahead.safetensors"
    rows, cols = 2048, 1024
    if ctx.rank == 0:
        safetensors.torch.save_file({"w": torch.ones(rows, cols)}, path)
    dist.barrier()
    mesh = init_device_mesh("cpu", (ctx.world,))
    header = path.stat().st_size - rows * cols * 4
    per_rank = rows * cols * 4 // ctx.world
    page = 4096
    for turn in range(ctx.world):
        if ctx.rank == turn:
            evict(path)
            if sum(resident(path)) > 0.1 * len(resident(path)):
                ctx.report["skipped"] = "this file system keeps the file cached (tmpfs?)"
            else:
                model = Params(
                    {"w": ((rows, cols), torch.float32, [Shard(0)], False)}, mesh, "meta"
                )
                with ctx.loading():
                    zeroload.load_into(model, path)

                def share(r: int) -> float:
                    lo, hi = header + r * per_rank, header + (r + 1) * per_rank
                    pages = resident(path)[-(-lo // page) : hi // page]
                    return sum(pages) / len(pages)

                deadline = time.monotonic() + 20
                while share(ctx.rank) < 0.99 and time.monotonic() < deadline:
                    time.sleep(0.05)
                ctx.report["own"] = share(ctx.rank)
                ctx.report["others"] = [share(r) for r in range(ctx.world) if r != ctx.rank]
                ctx.report["values"] = model.w.to_local().sum().item() == per_rank // 4
                del model  # unmapped, so that the next rank can evict the file
        dist.barrier()


def _dcp_scenario(ctx: Ctx, model: nn.Module, path: Path, compare_hf: bool) -> None:
    import torch.distributed.checkpoint as dcp

    import zeroload.distributed

    ctx.file_bytes(path)
    sd = model.state_dict()
    with ctx.loading():
        dcp.load(sd, storage_reader=zeroload.distributed.StorageReader(path))
    if not ctx.all_loaded():
        return
    ctx.check_locals(sd, full_state(path))
    if compare_hf:
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        theirs = {k: torch.zeros_like(v) for k, v in sd.items()}
        before = rchar()
        dcp.load(theirs, storage_reader=HuggingFaceStorageReader(str(path)))
        ctx.report["hf_rchar"] = rchar() - before
        for k in sd:
            if not torch.equal(_local(sd[k]), _local(theirs[k])):
                ctx.problem(f"{k}: differs from HuggingFaceStorageReader's result")


def dcp_tp_hf_dir(ctx: Ctx) -> None:
    model = _tp_model(ctx, "cpu")
    _dcp_scenario(ctx, model, ctx.ckpt / "tp_hf", compare_hf=True)


def dcp_fsdp2_pth(ctx: Ctx) -> None:
    model = _fsdp_model(ctx, TinyLM, materialise=True)
    _dcp_scenario(ctx, model, ctx.ckpt / "fsdp.pth", compare_hf=False)


def dcp_fsdp2_bin_shards(ctx: Ctx) -> None:
    model = _fsdp_model(ctx, TinyLM, materialise=True)
    _dcp_scenario(ctx, model, ctx.ckpt / "fsdp_bin", compare_hf=False)


SCENARIOS: dict[str, Callable[[Ctx], None]] = {
    f.__name__: f
    for f in [
        tp_meta_safetensors,
        tp_materialised_pth,
        fsdp2_meta_bin_shards,
        fsdp2_materialised_hf_dir,
        fsdp2_tied_meta,
        fsdp2_tied_stored_once,
        placements_meta,
        placements_materialised,
        broken_rank,
        shard_readahead,
        dcp_tp_hf_dir,
        dcp_fsdp2_pth,
        dcp_fsdp2_bin_shards,
    ]
}


def fsdp2_on_tp_2x2(ctx: Ctx) -> None:
    """FSDP2 over tensor parallelism on a (dp=2, tp=2) mesh: colwise weights end up
    `(_StridedShard(0, sf=2), Shard(0))`, rowwise ones `(Shard(0), Shard(1))`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    placements: set[str] = set()
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = TinyLM(TP_VOCAB)
        parallelize_module(model, mesh["tp"], tp_plan(model))
        fully_shard_model(model, mesh["dp"])
        sub = Ctx(ctx.rank, ctx.world, ctx.ckpt, ctx.work)
        path = ctx.ckpt / "tp.safetensors"
        _load_into_scenario(sub, model.eval(), path, trained(TinyLM, TP_VOCAB), TP_VOCAB)
        ctx.report["problems"] += [f"{device}: {p}" for p in sub.report["problems"]]
        if sub.report["load_error"]:
            ctx.report["load_error"] = f"{device}: {sub.report['load_error']}"
            ctx.report["load_traceback"] = sub.report.get("load_traceback")
        placements |= {str(v.placements) for v in model.state_dict().values()}
    ctx.report["placements"] = sorted(placements)


# Run only when named: they need a GPU, or 4 ranks.
CUDA_SCENARIOS: dict[str, Callable[[Ctx], None]] = {
    "tp_meta_cuda": tp_meta_cuda,
    "fsdp2_on_tp_2x2": fsdp2_on_tp_2x2,
}


def rank_main(rank: int, world: int, out: str, names: list[str]) -> None:
    out_dir = Path(out)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=world
    )
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    warm_up(work, world)
    reports: dict[str, Any] = {}
    try:
        for name in names:
            ctx = Ctx(rank, world, out_dir / "ckpt", work)
            try:
                {**SCENARIOS, **CUDA_SCENARIOS}[name](ctx)
            except Exception:
                ctx.problem("scenario raised:\n" + traceback.format_exc())
            reports[name] = ctx.report
            # Written after every scenario: a later hang still leaves these behind.
            (out_dir / f"rank{rank}.json").write_text(json.dumps(reports, indent=1))
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    import torch.multiprocessing as mp

    out = Path(argv[1])
    world = int(argv[2])
    names = argv[3].split(",") if len(argv) > 3 else list(SCENARIOS)
    write_checkpoints(out / "ckpt")
    mp.spawn(rank_main, args=(world, str(out), names), nprocs=world, join=True)


if __name__ == "__main__":
    main(sys.argv)
