"""zeroload.load_into: live modules filled in place, meta modules assigned, errors worded
like Module.load_state_dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import TiedNet, TinyNet

import zeroload
from zeroload._load_into import load_into

FORMATS = ["pth", "safetensors"]


def save_state(model: torch.nn.Module, tmp_path: Path, fmt: str) -> Path:
    sd = model.state_dict()
    path = tmp_path / f"model.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        # safetensors refuses shared storages: save contiguous copies.
        safetensors.torch.save_file({k: v.contiguous().clone() for k, v in sd.items()}, path)
    return path


def trained_tiny() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.norm.running_mean.uniform_()
        model.norm.running_var.uniform_(0.5, 2.0)
        model.norm.num_batches_tracked.fill_(12)
    return model


def reference_load(path: Path, fmt: str, model: torch.nn.Module) -> torch.nn.Module:
    if fmt == "pth":
        sd = torch.load(path, weights_only=True)
    else:
        sd = safetensors.torch.load_file(path)
    model.load_state_dict(sd)
    return model


def test_exported_from_the_package() -> None:
    assert zeroload.load_into is load_into


@pytest.mark.parametrize("fmt", FORMATS)
def test_live_cpu_module_filled_in_place(tmp_path: Path, fmt: str) -> None:
    src = trained_tiny()
    path = save_state(src, tmp_path, fmt)
    torch.manual_seed(123)
    model = TinyNet().eval()
    before = {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}
    params = {k: p for k, p in model.named_parameters()}

    result = load_into(model, path)

    assert result.missing_keys == [] and result.unexpected_keys == []
    after = model.state_dict(keep_vars=True)
    assert {k: v.data_ptr() for k, v in after.items()} == before
    for k, p in model.named_parameters():
        assert p is params[k], f"{k}: parameter object replaced"
        assert p.requires_grad
    ref = reference_load(path, fmt, TinyNet().eval())
    for k, v in ref.state_dict().items():
        assert torch.equal(after[k], v), k
    idx = torch.randint(0, 50, (4, 7))
    with torch.no_grad():
        assert torch.equal(model(idx.reshape(-1)), ref(idx.reshape(-1)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_meta_module_is_assigned(tmp_path: Path, fmt: str) -> None:
    src = trained_tiny()
    path = save_state(src, tmp_path, fmt)
    with torch.device("meta"):
        model = TinyNet().eval()
    result = load_into(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in model.state_dict().items():
        assert not v.is_meta, k
        assert v.device.type == "cpu"
        assert torch.equal(v, src.state_dict()[k]), k
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    idx = torch.arange(10)
    with torch.no_grad():
        assert torch.equal(model(idx), src(idx))


def test_partly_meta_module(tmp_path: Path) -> None:
    src = trained_tiny()
    path = save_state(src, tmp_path, "pth")
    model = TinyNet().eval()
    model.head.to_empty(device="meta")
    embed_ptr = model.embed.weight.data_ptr()
    load_into(model, path)
    assert model.embed.weight.data_ptr() == embed_ptr
    assert torch.equal(model.head.weight, src.head.weight)
    assert torch.equal(model.embed.weight, src.embed.weight)


@pytest.mark.parametrize("fmt", FORMATS)
def test_strict_reports_missing_and_unexpected_like_torch(tmp_path: Path, fmt: str) -> None:
    src = trained_tiny()
    sd = src.state_dict()
    del sd["head.weight"]
    sd["extra.weight"] = torch.ones(3)
    path = tmp_path / f"partial.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        safetensors.torch.save_file(dict(sd), path)

    model = TinyNet()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as ours:
        load_into(model, path)
    with pytest.raises(RuntimeError) as theirs:
        TinyNet().load_state_dict(sd)
    assert str(ours.value) == str(theirs.value)
    # Nothing was written.
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k

    result = load_into(model, path, strict=False)
    ref = TinyNet().load_state_dict(sd, strict=False)
    assert result.missing_keys == ref.missing_keys == ["head.weight"]
    assert result.unexpected_keys == ref.unexpected_keys == ["extra.weight"]
    assert torch.equal(model.embed.weight, src.embed.weight)
    assert torch.equal(model.head.weight, snapshot["head.weight"])


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    src = torch.nn.Linear(4, 3)
    path = tmp_path / "lin.pth"
    torch.save(src.state_dict(), path)
    model = torch.nn.Linear(5, 3)
    for strict in (True, False):
        with pytest.raises(RuntimeError) as e:
            load_into(model, path, strict=strict)
        msg = str(e.value)
        assert "size mismatch for weight" in msg
        assert "torch.Size([3, 4])" in msg and "torch.Size([3, 5])" in msg
        with pytest.raises(RuntimeError) as theirs:
            torch.nn.Linear(5, 3).load_state_dict(torch.load(path), strict=strict)
        assert msg == str(theirs.value)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_cast_matches_torch(tmp_path: Path, fmt: str, dtype: torch.dtype) -> None:
    src = trained_tiny()
    path = save_state(src, tmp_path, fmt)
    sd = src.state_dict()

    # Live fp32 module: values cast to `dtype` first, then copied back into fp32 storage.
    model = TinyNet()
    ptr = model.head.weight.data_ptr()
    load_into(model, path, dtype=dtype)
    assert model.head.weight.data_ptr() == ptr
    for k, v in model.state_dict().items():
        want = sd[k].to(dtype) if sd[k].is_floating_point() else sd[k]
        ref = torch.empty_like(v).copy_(want)
        assert torch.equal(v, ref), k

    # Module already in `dtype`: the file's fp32 values go through `.to(dtype)`.
    model = TinyNet().to(dtype)
    load_into(model, path, dtype=dtype)
    for k, v in model.state_dict().items():
        want = sd[k].to(dtype) if sd[k].is_floating_point() else sd[k]
        assert v.dtype == want.dtype and torch.equal(v, want), k

    # Meta module: assigned tensors take the requested dtype.
    with torch.device("meta"):
        model = TinyNet()
    load_into(model, path, dtype=dtype)
    for k, v in model.state_dict().items():
        want = sd[k].to(dtype) if sd[k].is_floating_point() else sd[k]
        assert v.dtype == want.dtype and torch.equal(v, want), k


def test_module_dtype_differs_from_file_without_dtype_argument(tmp_path: Path) -> None:
    src = trained_tiny()
    path = save_state(src, tmp_path, "pth")
    model = TinyNet().to(torch.bfloat16)
    ref = TinyNet().to(torch.bfloat16)
    ref.load_state_dict(torch.load(path))
    load_into(model, path)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_tied_module_stays_tied(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = TiedNet()
    path = tmp_path / "tied.pth"
    torch.save(src.state_dict(), path)
    model = TiedNet()
    load_into(model, path)
    assert model.lm_head.weight is model.wte.weight
    assert torch.equal(model.wte.weight, src.wte.weight)
    assert torch.equal(model.proj.weight, src.proj.weight)


def test_non_contiguous_targets_and_sources(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"a": base.t(), "b": base[:, ::2], "c": torch.arange(5.0)}
    path = tmp_path / "views.pth"
    torch.save(sd, path)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(6, 4))  # contiguous; file side is not
            self.register_buffer("b", torch.zeros(4, 3))
            self.register_buffer("c", torch.zeros(10)[::2])  # non-contiguous target

    model = Holder()
    c_ptr = model.c.data_ptr()
    load_into(model, path)
    assert torch.equal(model.a, sd["a"])
    assert torch.equal(model.b, sd["b"])
    assert torch.equal(model.c, sd["c"])
    assert model.c.data_ptr() == c_ptr


def test_every_dtype_bitwise(tmp_path: Path) -> None:
    from conftest import ALL_DTYPES, random_tensor

    dtypes = ALL_DTYPES
    sd = {f"t{i}": random_tensor((3, 5), dt, seed=i) for i, dt in enumerate(dtypes)}
    path = tmp_path / "dtypes.pth"
    torch.save(sd, path)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i, dt in enumerate(dtypes):
                self.register_buffer(f"t{i}", torch.zeros((3, 5), dtype=dt))

    model = Holder()
    load_into(model, path)
    for k, v in sd.items():
        got = getattr(model, k)
        assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)), k


def test_sharded_checkpoint(tmp_path: Path) -> None:
    import json

    src = trained_tiny()
    sd = src.state_dict()
    names = list(sd)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    weight_map = {}
    for file, keys in shards.items():
        safetensors.torch.save_file({k: sd[k].contiguous() for k in keys}, tmp_path / file)
        weight_map.update({k: file for k in keys})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = TinyNet()
    load_into(model, tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_non_state_dict_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nested.pth"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, path)
    with pytest.raises(zeroload.CheckpointError, match="state dict"):
        load_into(torch.nn.Linear(2, 2), path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_into(torch.nn.Linear(2, 2), tmp_path / "nope.pth")


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        load_into({"weight": torch.zeros(1)}, "x.pth")  # type: ignore[arg-type]


def test_progress_shows_a_bar_for_bytes_copied_in_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(TinyNet().state_dict(), path)
    live = TinyNet()
    load_into(live, path, progress=True)  # filled in place: bytes are copied
    err = capsys.readouterr().err
    assert "zeroload cpu" in err and "100%" in err
    load_into(TinyNet(), path, progress=False)
    assert capsys.readouterr().err == ""
    with torch.device("meta"):
        meta = TinyNet()
    load_into(meta, path, progress=True)  # views of the file: nothing is copied
    assert capsys.readouterr().err == ""
    for name, t in TinyNet().state_dict().items():
        assert torch.equal(live.state_dict()[name], safetensors.torch.load_file(path)[name])
        assert meta.state_dict()[name].shape == t.shape
