"""Scale-out loading: DTensor placements, `load_into` on tensor-parallel and FSDP2 models
across 2 gloo processes, and `zeroload.distributed.StorageReader` for
`torch.distributed.checkpoint`.

The multi-process scenarios live in `dist_worker.py`; they run once per session in a
subprocess under a timeout (a hang fails the tests instead of blocking CI), and each test
below reads what every rank reported for one scenario.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

torch_dist = pytest.importorskip("torch.distributed")
if not torch_dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.tensor import Replicate, Shard  # noqa: E402
from torch.distributed.tensor._utils import (  # noqa: E402
    _compute_local_shape_and_global_offset,
)
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402

import zeroload  # noqa: E402
import zeroload.distributed  # noqa: E402
from zeroload._dtensor import local_ranges  # noqa: E402

WORLD = 2
TIMEOUT_S = 300
HERE = Path(__file__).parent


# ----------------------------------------------------------------- placement semantics


def split_like_distribute_tensor(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], coord: tuple[int, ...], placements
) -> torch.Tensor:
    """The global flat indices a rank holds, as distribute_tensor computes them: each mesh
    dimension's placement splits the current local tensor (left to right)."""
    t = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, (Shard, _StridedShard)):
            pieces, _ = p._split_tensor(t, mesh_shape[mesh_dim], with_padding=False)
            t = pieces[coord[mesh_dim]]
    return t


def select(shape: tuple[int, ...], ranges: list[list[tuple[int, int]]]) -> torch.Tensor:
    t = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    for d, rs in enumerate(ranges):
        idx = [i for a, b in rs for i in range(a, b)]
        t = t.index_select(d, torch.tensor(idx, dtype=torch.long))
    return t


PLACEMENT_CASES = [
    ((2,), [Shard(0)]),
    ((3,), [Shard(1)]),
    ((4,), [Replicate()]),
    ((2, 2), [Shard(0), Shard(1)]),
    ((2, 3), [Shard(0), Shard(0)]),
    ((3, 2), [Shard(1), Shard(1)]),
    ((2, 2), [Replicate(), Shard(0)]),
    ((2, 2), [Shard(1), Replicate()]),
    ((2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    ((3, 2), [_StridedShard(1, split_factor=2), Shard(1)]),
    ((2, 4), [_StridedShard(0, split_factor=4), Shard(0)]),
]


@pytest.mark.parametrize("mesh_shape,placements", PLACEMENT_CASES)
@pytest.mark.parametrize("shape", [(8, 6), (9, 7), (1, 5), (5, 1), (3, 10)])
def test_local_rectangles_match_distribute_tensor(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: list
) -> None:
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        ranges = local_ranges(shape, mesh_shape, coord, placements)
        want = split_like_distribute_tensor(shape, mesh_shape, coord, placements)
        assert torch.equal(select(shape, ranges), want), (coord, ranges)
        # The same local shape (and first offset) as DTensor's own bookkeeping.
        local_shape, offset = _compute_local_shape_and_global_offset(
            shape, mesh_shape, list(coord), placements
        )
        assert [sum(b - a for a, b in rs) for rs in ranges] == list(local_shape)
        for d, rs in enumerate(ranges):
            if rs:
                assert rs[0][0] == offset[d], (coord, d)


def test_uneven_shards_follow_torch_chunk() -> None:
    # 5 rows over 4 ranks: torch.chunk gives 2, 2, 1 and an empty fourth chunk.
    rows = [local_ranges((5, 3), (4,), (r,), [Shard(0)])[0] for r in range(4)]
    assert rows == [[(0, 2)], [(2, 4)], [(4, 5)], []]


def test_partial_placements_are_refused() -> None:
    from torch.distributed.tensor import Partial

    with pytest.raises(ValueError, match=r"w\.pth: tensor 'x': placement Partial"):
        local_ranges((4,), (2,), (0,), [Partial()], what="w.pth: tensor 'x'")


# ---------------------------------------------------------------- multi-process runs


def run_worker(out: Path, *scenarios: str, world: int = WORLD) -> list[dict[str, Any]]:
    """Runs scenarios of dist_worker.py (default: all CPU ones) on `world` gloo ranks
    under a timeout; one report per rank."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "dist_worker.py"), str(out), str(world)]
        + ([",".join(scenarios)] if scenarios else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(
            f"the distributed scenarios did not finish in {TIMEOUT_S} s (a rank hung?):\n"
            + log.decode(errors="replace")[-4000:]
        )
    reports = []
    for r in range(world):
        f = out / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no report:\n{log.decode(errors='replace')[-4000:]}"
        reports.append(json.loads(f.read_text()))
    if proc.returncode != 0:
        pytest.fail(f"the worker exited with {proc.returncode}:\n{log.decode()[-4000:]}")
    return reports


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_worker(tmp_path_factory.mktemp("distributed"))


def scenario(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Each rank's report for `name`, after checking that it loaded and checked clean."""
    out = []
    for r, reports in enumerate(ranks):
        rep = reports[name]
        assert rep["load_error"] is None, f"rank {r}: {rep.get('load_traceback')}"
        assert rep["problems"] == [], f"rank {r}: {rep['problems']}"
        out.append(rep)
    return out


def data_read(rep: dict[str, Any]) -> int:
    """Bytes a rank read while loading, less what opening the files reads (headers, zip
    directories, pickles) and the tensors that are not DTensors (read whole)."""
    return rep["rchar"] - rep["open_rchar"] - rep["plain_bytes"]


def assert_reads_only_its_shard(reps: list[dict[str, Any]], ratio: float) -> None:
    """Each rank reads the part of its local shard that is not a view of the file, and
    at most `ratio` times that."""
    for r, rep in enumerate(reps):
        read, local = data_read(rep), rep["local_bytes"] - rep["view_bytes"]
        assert rep["local_bytes"] < 0.6 * rep["file_bytes"], "the scenario should shard"
        assert local <= read <= ratio * local + (16 << 10), (
            f"rank {r} read {read} bytes of tensor data for {local} bytes of its local shard "
            f"that are not views of the file ({rep['file_bytes']}-byte checkpoint)"
        )


def test_tensor_parallel_meta_model_from_safetensors(ranks: list) -> None:
    # On the CPU, ColwiseParallel weights (Shard(0): a block of whole rows) become views
    # of the file, as zeroload.load's tensors are; RowwiseParallel ones (Shard(1): one run
    # per row, read through the other rank's half: at most 2x) are read into memory of
    # their own. LayerNorms stay plain.
    reps = scenario(ranks, "tp_meta_safetensors")
    assert_reads_only_its_shard(reps, 2.0)
    for rep in reps:
        assert 0 < rep["view_bytes"] < rep["local_bytes"]


def test_tensor_parallel_materialised_model_is_never_a_view(ranks: list) -> None:
    for rep in scenario(ranks, "tp_materialised_pth"):
        assert rep["view_bytes"] == 0


def test_tensor_parallel_materialised_model_from_pth_filled_in_place(ranks: list) -> None:
    reps = scenario(ranks, "tp_materialised_pth")
    assert_reads_only_its_shard(reps, 2.0)


def test_fsdp2_meta_model_from_bin_shard_set(ranks: list) -> None:
    # FSDP2 shards dim 0: on the CPU every local shard is a view of the file and nothing is
    # read, except where FSDP2 pads an uneven shard (the 251-row embedding on the rank
    # with 125 rows) into a buffer of its own, copying the view.
    reps = scenario(ranks, "fsdp2_meta_bin_shards")
    assert reps[0]["local_bytes"] != reps[1]["local_bytes"], "shards should be uneven"
    assert_mapped_where_even(reps)


def assert_mapped_where_even(reps: list[dict[str, Any]]) -> None:
    """FSDP2 over two ranks of a model with a 251-row embedding: rank 0's shards are all
    views of the file, rank 1's too but for the embedding, which FSDP2 copied into its
    padded buffer; neither rank read any tensor data."""
    for rep in reps:
        assert data_read(rep) <= 16 << 10
        assert rep["view_bytes"] > 0.5 * rep["local_bytes"]
    assert reps[0]["view_bytes"] == reps[0]["local_bytes"]
    assert reps[1]["view_bytes"] < reps[1]["local_bytes"]


def test_fsdp2_materialised_model_from_hf_directory(ranks: list) -> None:
    reps = scenario(ranks, "fsdp2_materialised_hf_dir")
    assert_reads_only_its_shard(reps, 1.1)


def test_fsdp2_tied_weights_stay_tied_and_are_read_once(ranks: list) -> None:
    reps = scenario(ranks, "fsdp2_tied_meta")
    assert_mapped_where_even(reps)


def test_fsdp2_tied_weights_stored_once_load_strictly_and_stay_tied(ranks: list) -> None:
    scenario(ranks, "fsdp2_tied_stored_once")


@pytest.mark.parametrize("kind", ["meta", "materialised"])
def test_shard_and_replicate_placements_on_1d_and_2d_meshes(ranks: list, kind: str) -> None:
    # Meshes (2,), (2, 1), (1, 2); Shard(0/1/2), Replicate, Shard(0) twice, _StridedShard,
    # uneven sizes, a rank holding nothing, a DTensor buffer, bf16 and int64.
    reps = scenario(ranks, f"placements_{kind}")
    for rep in reps:
        # (slack: each load also reads a few hundred bytes of cgroup files to count cores)
        assert data_read(rep) <= 2 * (rep["local_bytes"] - rep["view_bytes"]) + (4 << 10)
        assert (rep["view_bytes"] > 0) == (kind == "meta")


def test_shards_that_are_views_are_read_ahead_and_only_those(ranks: list) -> None:
    # As zeroload.load reads its tensors into the page cache in the background, a rank's
    # shards that are views of the file are; the other rank's rows are left alone.
    for rep in scenario(ranks, "shard_readahead"):
        if "skipped" in rep:
            pytest.skip(rep["skipped"])
        assert rep["values"], "the shard holds the wrong values"
        assert rep["own"] >= 0.99
        assert max(rep["others"]) < 0.5


def test_a_failing_rank_names_itself_the_file_and_the_tensor(ranks: list) -> None:
    # Rank 1's copy of the checkpoint is cut short while it loads; rank 0's is intact.
    # Loading needs no collective, so rank 0 finishes and both reach the next step.
    ok, failed = ranks[0]["broken_rank"], ranks[1]["broken_rank"]
    assert ok["load_error"] is None
    err = failed["load_error"]
    assert err is not None and err.startswith("CheckpointError: rank 1 of 2: "), err
    assert failed["path"] in err
    assert "tensor " in err and "truncated" in err


def test_dcp_load_with_storage_reader_matches_huggingface_reader(ranks: list) -> None:
    # A TP model's state dict (DTensors and plain tensors) from an HF safetensors shard
    # directory: same values as HuggingFaceStorageReader gives, only the shard read.
    reps = scenario(ranks, "dcp_tp_hf_dir")
    assert_reads_only_its_shard(reps, 2.0)


def test_dcp_load_with_storage_reader_from_pth(ranks: list) -> None:
    reps = scenario(ranks, "dcp_fsdp2_pth")
    assert_reads_only_its_shard(reps, 1.1)


def test_dcp_load_with_storage_reader_from_bin_shard_set(ranks: list) -> None:
    reps = scenario(ranks, "dcp_fsdp2_bin_shards")
    assert_reads_only_its_shard(reps, 1.1)


@pytest.mark.slow
def test_fsdp2_on_top_of_tensor_parallel_on_a_2x2_mesh(tmp_path: Path) -> None:
    # Four ranks: FSDP2's _StridedShard placements, meta and materialised models, and the
    # 2-D-sharded model's output equals the unsharded one's.
    reps = scenario(run_worker(tmp_path, "fsdp2_on_tp_2x2", world=4), "fsdp2_on_tp_2x2")
    assert "(_StridedShard(dim=0, sf=2), Shard(dim=0))" in reps[0]["placements"]
    assert "(Shard(dim=0), Shard(dim=1))" in reps[0]["placements"]


@pytest.mark.gpu
def test_tensor_parallel_meta_model_on_a_cuda_mesh(tmp_path: Path) -> None:
    reps = scenario(run_worker(tmp_path, "tp_meta_cuda"), "tp_meta_cuda")
    for rep in reps:
        assert rep["local_bytes"] < 0.6 * rep["file_bytes"]


# --------------------------------------------------- StorageReader in a single process


def dcp_load(state_dict: dict, reader: Any) -> None:
    with warnings.catch_warnings():
        # dcp.load says it assumes a single process, which is the point here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state_dict, storage_reader=reader, no_dist=True)


def zeros_like_all(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in sd.items()}


@pytest.fixture()
def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layer.0.w": torch.randn(16, 32, generator=g).to(torch.bfloat16),
        "layer.0.b": torch.randn(32, generator=g),
        "steps": torch.arange(7),
    }


def test_storage_reader_on_a_huggingface_directory(tmp_path: Path, state: dict) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    sys.path.insert(0, str(HERE))
    from dist_worker import save_shards

    save_shards(state, tmp_path, "safetensors", 2)
    ours, theirs = zeros_like_all(state), zeros_like_all(state)
    dcp_load(ours, zeroload.distributed.StorageReader(tmp_path))
    dcp_load(theirs, HuggingFaceStorageReader(str(tmp_path)))
    for k in state:
        assert torch.equal(ours[k], state[k]) and torch.equal(theirs[k], state[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "bin_shards"])
def test_storage_reader_formats(tmp_path: Path, state: dict, fmt: str) -> None:
    sys.path.insert(0, str(HERE))
    from dist_worker import save_shards

    if fmt == "safetensors":
        path = tmp_path / "m.safetensors"
        safetensors.torch.save_file(state, path)
    elif fmt == "pth":
        path = tmp_path / "m.pth"
        torch.save(state, path)
    else:
        path = tmp_path / "pytorch_model.bin.index.json"
        save_shards(state, tmp_path, "bin", 3)
    assert zeroload.distributed.StorageReader.validate_checkpoint_id(path)
    ours = zeros_like_all(state)
    # A float32 destination for a bf16 tensor: cast as copy_ would.
    ours["layer.0.w"] = torch.zeros(16, 32)
    dcp_load(ours, zeroload.distributed.StorageReader(path))
    for k in state:
        assert torch.equal(ours[k], state[k].to(ours[k].dtype)), k


def test_storage_reader_flattens_nested_pth_like_dcp(tmp_path: Path, state: dict) -> None:
    path = tmp_path / "train.pth"
    torch.save({"model": state, "step": 1234, "sched": {"lr": 0.5}, "ema": [state["steps"]]}, path)
    target = {
        "model": zeros_like_all(state),
        "step": 0,
        "sched": {"lr": 0.0},
        "ema": [torch.zeros(7, dtype=torch.int64)],
    }
    dcp_load(target, zeroload.distributed.StorageReader(path))
    assert target["step"] == 1234 and target["sched"] == {"lr": 0.5}
    assert torch.equal(target["ema"][0], state["steps"])
    for k in state:
        assert torch.equal(target["model"][k], state[k]), k


def test_storage_reader_reads_slices_into_strided_targets(tmp_path: Path, state: dict) -> None:
    # A destination that is a non-contiguous view (column block of a bigger tensor).
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, path)
    big = torch.zeros(50, 40)
    target = {"embed.weight": big[:, 10:26]}
    dcp_load(target, zeroload.distributed.StorageReader(path))
    assert torch.equal(big[:, 10:26], state["embed.weight"])
    assert big[:, :10].count_nonzero() == 0 and big[:, 26:].count_nonzero() == 0


def test_storage_reader_reads_dcp_sharded_safetensors(tmp_path: Path, state: dict) -> None:
    # HuggingFaceStorageWriter(save_distributed=True) files: each holds a piece of each
    # tensor with its offset in DCP_SHARDING_INFO; a directory without an index.
    w = state["embed.weight"]
    for i, (lo, hi) in enumerate([(0, 20), (20, 50)]):
        info = {"embed.weight": {"saved_offsets": [lo, 0]}}
        safetensors.torch.save_file(
            {"embed.weight": w[lo:hi].contiguous()},
            tmp_path / f"shard-{i + 1:05d}-model-00001-of-00001.safetensors",
            metadata={"DCP_SHARDING_INFO": json.dumps(info)},
        )
    reader = zeroload.distributed.StorageReader(tmp_path)
    md = reader.read_metadata()
    assert md.state_dict_metadata["embed.weight"].size == torch.Size([50, 16])
    target = {"embed.weight": torch.zeros(50, 16)}
    dcp_load(target, zeroload.distributed.StorageReader(tmp_path))
    assert torch.equal(target["embed.weight"], w)


def test_storage_reader_refusals(tmp_path: Path) -> None:
    assert not zeroload.distributed.StorageReader.validate_checkpoint_id(tmp_path / "nope")
    path = tmp_path / "list.pth"
    torch.save([torch.ones(2)], path)
    with pytest.raises(zeroload.CheckpointError, match=r"list.pth: holds a list, not a dict"):
        zeroload.distributed.StorageReader(path).read_metadata()
