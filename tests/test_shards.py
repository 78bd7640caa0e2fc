"""The one name index of a shard set (`_shards.tensor_index`) and its "also appears in"
check, through every reader that uses it: `zeroload.open`, `zeroload.load_into`,
`zeroload convert` and the `torch.distributed.checkpoint` reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import zeroload
import zeroload.distributed
from zeroload import cli


def _shard_set(folder: Path, shards: dict[str, dict[str, torch.Tensor]]) -> dict[str, Path]:
    """Writes `shards` (file name -> tensors) and an index placing each name in the first
    shard that holds it; returns file name -> path."""
    folder.mkdir()
    weight_map: dict[str, str] = {}
    for name, tensors in shards.items():
        safetensors.torch.save_file(tensors, folder / name)
        for key in tensors:
            weight_map.setdefault(key, name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return {name: folder / name for name in shards}


def test_every_reader_indexes_a_shard_set_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    files = _shard_set(
        tmp_path / "m",
        {"a.safetensors": {"weight": sd["weight"]}, "b.safetensors": {"bias": sd["bias"]}},
    )
    ref = {}
    for f in files.values():
        ref.update(safetensors.torch.load_file(f))
    with zeroload.open(tmp_path / "m") as f:
        assert f.keys() == ["weight", "bias"]
        for k in ref:
            assert torch.equal(f.get_tensor(k), ref[k])
    target = torch.nn.Linear(3, 2)
    result = zeroload.load_into(target, tmp_path / "m")
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in target.state_dict().items():
        assert torch.equal(v, ref[k]), k
    out = tmp_path / "one.safetensors"
    assert cli.main(["convert", str(tmp_path / "m"), str(out)]) == 0
    got = safetensors.torch.load_file(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    md = zeroload.distributed.StorageReader(tmp_path / "m").read_metadata()
    assert {k: list(v.size) for k, v in md.state_dict_metadata.items()} == {
        k: list(v.shape) for k, v in ref.items()
    }


def test_a_name_in_two_shards_is_refused_by_every_reader_naming_both(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    files = _shard_set(
        tmp_path / "m",
        {
            "a.safetensors": {"weight": w},
            "b.safetensors": {"bias": torch.zeros(2), "weight": w + 1},
        },
    )
    first, second = files["a.safetensors"], files["b.safetensors"]
    message = f"{second}: tensor 'weight' also appears in {first}"
    with pytest.raises(zeroload.CheckpointError) as e:
        zeroload.open(tmp_path / "m")
    assert str(e.value) == message
    with pytest.raises(zeroload.CheckpointError) as e:
        zeroload.load_into(torch.nn.Linear(3, 2), tmp_path / "m")
    assert str(e.value) == message
    assert cli.main(["convert", str(tmp_path / "m"), str(tmp_path / "one.safetensors")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "one.safetensors").exists()
    with pytest.raises(zeroload.CheckpointError) as e:
        zeroload.distributed.StorageReader(tmp_path / "m").read_metadata()
    assert str(e.value) == f"{second}: tensor 'weight' (at offset [0, 0]) also appears in {first}"
    # zeroload.load reads each name from the shard the index places it in.
    sd = zeroload.load(tmp_path / "m")
    assert torch.equal(sd["weight"], w) and list(sd) == ["weight", "bias"]


def test_a_single_file_that_is_not_a_state_dict_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.pt"
    torch.save({"model": {"w": torch.ones(2)}, "step": 3}, path)
    with pytest.raises(zeroload.CheckpointError, match=r"zeroload\.open needs a flat dict") as e:
        zeroload.open(path)
    assert str(e.value).startswith(f"{path}: ")
    with pytest.raises(zeroload.CheckpointError, match="load_into needs a state dict") as e:
        zeroload.load_into(torch.nn.Linear(2, 1), path)
    assert str(e.value).startswith(f"{path}: ")
