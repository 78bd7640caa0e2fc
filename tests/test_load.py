"""zeroload.load on torch.save files: the same objects torch.load(weights_only=True) gives."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import ALL_DTYPES, TiedNet, TinyNet, random_tensor, training_checkpoint
from reference import assert_same, assert_sharing_same

import zeroload


def save(tmp_path: Path, obj: object, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def check_against_torch(path: Path) -> object:
    ours = zeroload.load(path)
    ref = torch.load(path, weights_only=True)
    assert_same(ours, ref)
    assert_sharing_same(ours, ref)
    return ours


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_torch_saves(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {"x": random_tensor((3, 5), dtype), "scalar": random_tensor((), dtype, seed=1)}
    check_against_torch(save(tmp_path, sd))


def test_views_keep_stride_and_offset(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {
        "transposed": base.t(),
        "sliced": base[2:5, 3:7],
        "row": base[4],
        "stepped": base[::2, ::3],
        "expanded": torch.arange(4.0).reshape(4, 1).expand(4, 6),
        "zero_dim": torch.tensor(3.25),
        "empty": torch.empty(0, 7),
        "empty_3d": torch.empty(2, 0, 3, dtype=torch.int64),
        "base": base,
    }
    ours = check_against_torch(save(tmp_path, sd))
    # Views of one tensor share its memory, as in the file.
    assert ours["sliced"].untyped_storage().data_ptr() == ours["base"].untyped_storage().data_ptr()
    assert ours["expanded"].stride() == (1, 0)


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    model = TiedNet()
    ours = check_against_torch(save(tmp_path, model.state_dict()))
    assert ours["wte.weight"].data_ptr() == ours["lm_head.weight"].data_ptr()


def test_state_dict_is_an_ordered_dict_with_metadata(model_file: Path) -> None:
    ours = check_against_torch(model_file)
    assert isinstance(ours, collections.OrderedDict)
    assert ours._metadata[""] == {"version": 1}
    assert ours._metadata["norm"]["version"] == 2


def test_full_training_checkpoint(tmp_path: Path) -> None:
    ckpt = training_checkpoint()
    ours = check_against_torch(save(tmp_path, ckpt))
    assert ours["step"] == 2**70
    assert ours["optimizer"]["param_groups"][0]["lr"] == 3e-4
    # exp_avg etc. are real tensors and the step counters are 0-dim tensors.
    state = ours["optimizer"]["state"][0]
    assert state["exp_avg"].shape == ckpt["optimizer"]["state"][0]["exp_avg"].shape


def test_parameter_saved_directly(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(3, 4))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    ours = check_against_torch(save(tmp_path, {"p": p, "frozen": frozen, "alone": p}))
    assert isinstance(ours["p"], torch.nn.Parameter) and ours["p"].requires_grad
    assert ours["alone"] is ours["p"]


def test_objects_shared_in_the_pickle_stay_shared(tmp_path: Path) -> None:
    shared = [1, 2]
    t = torch.ones(2)
    ours = zeroload.load(save(tmp_path, {"a": shared, "b": shared, "t1": t, "t2": t}))
    assert ours["a"] is ours["b"]
    assert ours["t1"] is ours["t2"]


def test_non_dict_roots(tmp_path: Path) -> None:
    check_against_torch(save(tmp_path, torch.arange(5), "t.pt"))
    check_against_torch(save(tmp_path, [torch.ones(2), (torch.zeros(1), 3)], "l.pt"))
    check_against_torch(save(tmp_path, 42, "int.pt"))


def test_cpu_tensors_are_copy_on_write_views_of_the_file(model_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "cow.pth"
    path.write_bytes(model_file.read_bytes())
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    sd = zeroload.load(path)
    for t in sd.values():
        t.add_(1) if t.is_floating_point() else t.fill_(7)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    # The changes are visible through the tensors themselves.
    fresh = torch.load(path, weights_only=True)
    assert torch.equal(sd["head.weight"], fresh["head.weight"] + 1)


def test_tensors_outlive_the_loader(model_file: Path) -> None:
    sd = zeroload.load(model_file)
    w = sd["head.weight"]
    del sd
    import gc

    gc.collect()
    assert torch.equal(w, torch.load(model_file, weights_only=True)["head.weight"])


def test_seed_flow_meta_model_assign_gives_identical_outputs(model_file: Path) -> None:
    torch.manual_seed(0)
    reference = TinyNet().eval()
    reference.load_state_dict(torch.load(model_file, weights_only=True))
    with torch.device("meta"):
        model = TinyNet()
    model.load_state_dict(zeroload.load(model_file), assign=True)
    model.eval()
    idx = torch.randint(0, 50, (4, 6))
    with torch.no_grad():
        ours, ref = model(idx.reshape(-1)), reference(idx.reshape(-1))
    assert torch.equal(ours, ref)


def test_keys_selects_tensors_by_name_or_predicate(model_file: Path) -> None:
    ref = torch.load(model_file, weights_only=True)
    some = zeroload.load(model_file, keys=["head.weight", "embed.weight"])
    assert list(some) == [k for k in ref if k in ("head.weight", "embed.weight")]
    assert torch.equal(some["head.weight"], ref["head.weight"])
    biases = zeroload.load(model_file, keys=lambda k: k.endswith(".bias"))
    assert list(biases) == [k for k in ref if k.endswith(".bias")]


def test_keys_missing_name_suggests_near_matches(model_file: Path) -> None:
    with pytest.raises(KeyError, match=r"head\.weigth.*did you mean 'head\.weight'"):
        zeroload.load(model_file, keys=["head.weigth"])


def test_dtype_casts_floating_tensors_only(model_file: Path) -> None:
    ref = torch.load(model_file, weights_only=True)
    ours = zeroload.load(model_file, dtype=torch.bfloat16)
    for k, t in ref.items():
        expected = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert ours[k].dtype == expected.dtype
        assert torch.equal(ours[k], expected)


def test_drop_in_arguments(model_file: Path) -> None:
    ref = torch.load(model_file, weights_only=True)
    for kwargs in (
        {"map_location": "cpu"},
        {"map_location": torch.device("cpu")},
        {"map_location": {"cpu": "cpu"}},
        {"weights_only": True, "mmap": True},
        {"mmap": False},
    ):
        assert_same(zeroload.load(model_file, **kwargs), ref)


def test_weights_only_false_is_refused(model_file: Path) -> None:
    with pytest.raises(ValueError, match="never executes code"):
        zeroload.load(model_file, weights_only=False)


def test_map_location_callable_is_refused(model_file: Path) -> None:
    with pytest.raises(TypeError, match="callables are not supported"):
        zeroload.load(model_file, map_location=lambda s, loc: s)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        zeroload.load(tmp_path / "nope.pth")


def test_many_tensor_checkpoint(tmp_path: Path) -> None:
    sd = {f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(3000)}
    ours = check_against_torch(save(tmp_path, sd))
    assert len(ours) == 3000


def test_module_saved_whole_is_refused_naming_the_class(tmp_path: Path) -> None:
    path = save(tmp_path, TiedNet())
    with pytest.raises(zeroload.CheckpointError, match=r"TiedNet|allow-list") as e:
        zeroload.load(path)
    assert str(path) in str(e.value)
