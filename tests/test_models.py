"""Real models come out working: `zeroload.init_empty`, tied parameters and buffers in
`load_into`, and directories of per-tensor `torch.save` files.

Tiny transformers models are built from configs (no downloads), saved with
`save_pretrained`, and loaded with `init_empty` + `load_into`; their outputs must equal
those of `transformers.AutoModel*.from_pretrained` on the same directory.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import TiedNet, TinyNet
from test_cuda_engine import Worker, _fake, _gpu, run, worker  # noqa: F401  (fixture)

import zeroload
from zeroload import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# -- init_empty --------------------------------------------------------------------------


class Buffered(torch.nn.Module):
    """Buffers computed in __init__ (persistent and not), a shared parameter registered
    under two names before either was moved, and a parameter with an attribute."""

    def __init__(self, tag: bool = True) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        inv = 1.0 / (10000 ** (torch.arange(0, 6, 2).float() / 6))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.register_buffer("mask", torch.tril(torch.ones(3, 3, dtype=torch.bool)))
        shared = torch.nn.Parameter(torch.ones(6))
        if tag:  # accelerate's init_empty_weights fails on this
            shared.tag = "keep me"  # type: ignore[attr-defined]
        self.a = shared
        self.b = shared
        self.frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.lin(x)) * self.a + self.b
        return y + self.inv_freq.repeat(2) + self.mask.sum()


def test_init_empty_puts_parameters_on_meta_and_computes_buffers() -> None:
    ref = Buffered()
    with zeroload.init_empty():
        m = Buffered()
    params = dict(m.named_parameters(remove_duplicate=False))
    assert set(params) == set(dict(ref.named_parameters(remove_duplicate=False)))
    for k, p in params.items():
        r = ref.get_parameter(k)
        assert p.is_meta, k
        assert type(p) is torch.nn.Parameter
        assert (p.shape, p.dtype, p.requires_grad) == (r.shape, r.dtype, r.requires_grad), k
    assert m.a is m.b  # registered twice: still one parameter
    assert m.a.tag == "keep me"
    buffers = dict(m.named_buffers())
    assert set(buffers) == {"inv_freq", "mask", "norm.running_mean", "norm.running_var",
                            "norm.num_batches_tracked"}  # fmt: skip
    for k, b in buffers.items():
        assert not b.is_meta, k
        assert torch.equal(b, ref.get_buffer(k)), k
    assert "inv_freq" not in m.state_dict()  # non-persistent stays non-persistent
    # Patches are gone afterwards, also after an exception inside.
    assert not torch.nn.Linear(2, 2).weight.is_meta
    with pytest.raises(RuntimeError, match="inside"), zeroload.init_empty():
        raise RuntimeError("inside")
    assert not torch.nn.Linear(2, 2).weight.is_meta


def test_init_empty_keeps_ties_made_after_construction() -> None:
    with zeroload.init_empty():
        m = TiedNet()
        m.lm_head.weight = m.wte.weight  # what transformers' tie_weights does again
    assert m.lm_head.weight is m.wte.weight and m.wte.weight.is_meta


def test_init_empty_include_buffers_and_nesting() -> None:
    with zeroload.init_empty(include_buffers=True):
        m = Buffered()
        with zeroload.init_empty():
            inner = torch.nn.BatchNorm1d(3)
        assert inner.weight.is_meta and not inner.running_mean.is_meta
    assert all(b.is_meta for b in m.buffers())
    assert all(p.is_meta for p in m.parameters())
    assert not torch.nn.BatchNorm1d(3).running_mean.is_meta
    with pytest.raises(TypeError, match="include_buffers"):
        with zeroload.init_empty("yes"):  # type: ignore[arg-type]
            pass


def _llama_cfg(tied: bool) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


@pytest.mark.parametrize("which", ["Buffered", "llama"])
def test_init_empty_matches_accelerates_init_empty_weights(which: str) -> None:
    accelerate = pytest.importorskip("accelerate")

    def build() -> torch.nn.Module:
        if which == "Buffered":
            return Buffered(tag=False)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(_llama_cfg(tied=False))

    with accelerate.init_empty_weights(include_buffers=False):
        theirs = build()
    with zeroload.init_empty():
        ours = build()

    def describe(m: torch.nn.Module) -> dict:
        out = {}
        named = [*m.named_parameters(remove_duplicate=False), *m.named_buffers()]
        for k, t in named:
            out[k] = (type(t), t.device, t.dtype, t.shape, t.requires_grad)
        return out

    assert describe(ours) == describe(theirs)
    for k, b in ours.named_buffers():
        assert torch.equal(b, theirs.get_buffer(k)), k


# -- transformers models: init_empty + load_into == from_pretrained ----------------------


def _gpt2_cfg() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def _t5_cfg() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip


MODELS = {
    "llama-tied": lambda: _llama_cfg(tied=True),
    "llama": lambda: _llama_cfg(tied=False),
    "gpt2": _gpt2_cfg,
    "t5": _t5_cfg,
}
INPUT = torch.tensor([[1, 5, 7, 2, 9, 3]])


def _auto(cfg: Any) -> Any:
    import transformers

    if cfg.is_encoder_decoder:
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=INPUT, decoder_input_ids=INPUT[:, :4]).logits
        return model(INPUT).logits


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = MODELS[request.param]()
    torch.manual_seed(0)
    model = _auto(cfg).from_config(cfg).eval()
    with torch.no_grad():  # move every weight off its initial value (norms included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _auto(cfg).from_pretrained(folder).eval()
    return {"name": request.param, "cfg": cfg, "dir": folder, "ref": reference}


def _ties(model: torch.nn.Module) -> list[set[str]]:
    """Groups of parameter names that are one object."""
    groups: dict[int, set[str]] = {}
    for k, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(k)
    return sorted((g for g in groups.values() if len(g) > 1), key=sorted)


def _check_model(model: torch.nn.Module, saved: dict) -> None:
    ref = saved["ref"]
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert _ties(model) == _ties(ref)
    if saved["name"] in ("llama-tied", "gpt2", "t5"):
        assert _ties(model), "expected tied embeddings"
    assert torch.equal(_logits(model.eval()), _logits(ref))


def test_init_empty_then_load_into_equals_from_pretrained(saved: dict) -> None:
    with zeroload.init_empty():
        model = _auto(saved["cfg"]).from_config(saved["cfg"])
    assert all(p.is_meta for p in model.parameters())
    stored = set(safetensors.torch.load_file(saved["dir"] / "model.safetensors"))
    assert stored <= set(model.state_dict())
    if _ties(model):
        assert stored < set(model.state_dict())  # tied names are stored once
    result = zeroload.load_into(model, saved["dir"])  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []
    _check_model(model, saved)


def test_load_into_a_materialised_model_fills_in_place_and_keeps_ties(saved: dict) -> None:
    torch.manual_seed(1)
    model = _auto(saved["cfg"]).from_config(saved["cfg"]).eval()
    ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}
    assert not torch.equal(_logits(model), _logits(saved["ref"]))
    result = zeroload.load_into(model, saved["dir"], True)  # strict, positionally
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == ptrs
    _check_model(model, saved)


def test_a_meta_device_model_names_its_meta_buffers(saved: dict) -> None:
    with torch.device("meta"):
        model = _auto(saved["cfg"]).from_config(saved["cfg"])
    on_meta = [k for k, b in model.named_buffers() if b.is_meta]
    if not on_meta:
        pytest.skip(f"{saved['name']} has no buffers")
    with pytest.raises(RuntimeError, match="init_empty") as e:
        zeroload.load_into(model, saved["dir"])
    for k in on_meta:
        assert f'"{k}"' in str(e.value)
    assert all(p.is_meta for p in model.parameters())  # nothing was written
    result = zeroload.load_into(model, saved["dir"], strict=False)
    assert result.missing_keys == on_meta and result.unexpected_keys == []
    assert not any(p.is_meta for p in model.parameters())


# -- tied parameters and meta leftovers on a plain module --------------------------------


def _tied_file(tmp_path: Path, keep: str, fmt: str) -> tuple[Path, dict]:
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in TiedNet().state_dict().items()}
    drop = "lm_head.weight" if keep == "wte.weight" else "wte.weight"
    del sd[drop]
    path = tmp_path / f"tied.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(sd, path)
    else:
        torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("keep", ["wte.weight", "lm_head.weight"])
@pytest.mark.parametrize("kind", ["meta", "init_empty", "materialised"])
def test_a_tied_parameter_is_satisfied_by_any_of_its_names(
    tmp_path: Path, keep: str, fmt: str, kind: str
) -> None:
    path, sd = _tied_file(tmp_path, keep, fmt)
    if kind == "meta":
        with torch.device("meta"):
            model = TiedNet()
    elif kind == "init_empty":
        with zeroload.init_empty():
            model = TiedNet()
    else:
        model = TiedNet()
    before = model.wte.weight.data_ptr()
    result = zeroload.load_into(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert model.lm_head.weight is model.wte.weight
    assert isinstance(model.wte.weight, torch.nn.Parameter) and model.wte.weight.requires_grad
    assert torch.equal(model.wte.weight, sd[keep])
    if kind == "materialised":
        assert model.wte.weight.data_ptr() == before
    ref = TiedNet()
    ref.load_state_dict({**sd, "wte.weight": sd[keep], "lm_head.weight": sd[keep]})
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(idx), ref(idx))


def test_a_tied_parameter_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zeroload import _core, _load_into

    sd = {k: v.clone() for k, v in TiedNet().state_dict().items()}  # both names stored
    path = tmp_path / "both.pth"
    torch.save(sd, path)
    loaded: list[list[str]] = []
    load_entries = _load_into._load_entries
    monkeypatch.setattr(
        _load_into,
        "_load_entries",
        lambda entries, names, *a, **k: (
            loaded.append(list(names)) or load_entries(entries, names, *a, **k)
        ),
    )
    with torch.device("meta"):
        meta = TiedNet()
    zeroload.load_into(meta, path)
    read = sorted(n for names in loaded for n in names)
    assert read == ["lm_head.weight", "proj.bias", "proj.weight"]
    copies: list[int] = []
    copy_to_host = _core.copy_to_host
    monkeypatch.setattr(
        _core,
        "copy_to_host",
        lambda ckpt, dests, requests, *a: (
            copies.append(len(requests)) or copy_to_host(ckpt, dests, requests, *a)
        ),
    )
    live = TiedNet()
    zeroload.load_into(live, path)
    assert copies == [3]  # wte.weight/lm_head.weight once, proj.weight, proj.bias
    assert live.lm_head.weight is live.wte.weight and meta.lm_head.weight is meta.wte.weight
    assert torch.equal(live.wte.weight, sd["wte.weight"])


@pytest.mark.parametrize("kind", ["meta", "materialised"])
def test_when_every_tied_name_is_stored_the_last_wins_as_in_load_state_dict(
    tmp_path: Path, kind: str
) -> None:
    sd = {k: v.clone() for k, v in TiedNet().state_dict().items()}
    sd["lm_head.weight"] = torch.randn_like(sd["wte.weight"])  # differs from wte.weight
    path = tmp_path / "both.safetensors"
    safetensors.torch.save_file(sd, path)
    ref = TiedNet()
    ref.load_state_dict(sd)
    if kind == "meta":
        with torch.device("meta"):
            model = TiedNet()
    else:
        model = TiedNet()
    zeroload.load_into(model, path)
    assert model.lm_head.weight is model.wte.weight
    assert torch.equal(model.wte.weight, ref.wte.weight)
    assert torch.equal(model.wte.weight, sd["lm_head.weight"])


def test_a_missing_parameter_left_on_meta_is_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sd = TinyNet().state_dict()
    del sd["head.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with zeroload.init_empty():
        model = TinyNet()
    with pytest.raises(RuntimeError, match=r'(?s)Missing key.*"head\.weight".*Left on the meta'):
        zeroload.load_into(model, path)
    result = zeroload.load_into(model, path, False)
    assert result.missing_keys == ["head.weight"]
    assert model.head.weight.is_meta and not model.embed.weight.is_meta
    # A materialised model has nothing on meta: missing keys as load_state_dict has them.
    assert zeroload.load_into(TinyNet(), path, strict=False).missing_keys == ["head.weight"]
    with pytest.raises(TypeError, match="strict"):
        zeroload.load_into(TinyNet(), path, "cpu")  # type: ignore[arg-type]


# -- directories of per-tensor torch.save files (the seed notebook's section 7) ----------


def _per_tensor_dir(folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    folder.mkdir()
    for name, param in model.named_parameters():
        torch.save(param.cpu(), folder / f"{name}.pt")  # as the notebook does
    for name, buf in model.named_buffers():
        torch.save(buf, folder / f"{name}.pt")
    torch.save(torch.arange(3), folder / "w.pt")  # short names: a 1-character stem...
    torch.save(torch.ones(2, 2), folder / f"{'a' * 21}.pt")  # ...and a 21-character one
    # A legacy (pre-zip) torch.save file among them.
    torch.save(torch.full((2,), 7.0), folder / "legacy.pt", _use_new_zipfile_serialization=False)
    return {p.stem: torch.load(p, weights_only=True) for p in sorted(folder.glob("*.pt"))}


@pytest.fixture(scope="module")
def per_tensor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, torch.nn.Module]:
    torch.manual_seed(0)
    model = TinyNet().eval()
    model.norm.running_mean.uniform_()
    folder = tmp_path_factory.mktemp("per_tensor") / "model_parameters"
    return folder, _per_tensor_dir(folder, model), model


def test_a_per_tensor_directory_loads_as_a_state_dict(per_tensor: tuple) -> None:
    folder, ref, _ = per_tensor
    assert "head.weight" in ref and isinstance(ref["head.weight"], torch.nn.Parameter)
    sd = zeroload.load(folder)
    assert list(sd) == list(ref)
    for k, v in ref.items():
        assert type(sd[k]) is type(v) and torch.equal(sd[k], v), k
        assert sd[k].dtype == v.dtype and sd[k].stride() == v.stride()
    assert list(zeroload.load(folder, keys=["w", "head.weight"])) == ["head.weight", "w"]
    assert list(zeroload.load(folder, keys=lambda k: k.startswith("block."))) == [
        k for k in ref if k.startswith("block.")
    ]
    with pytest.raises(KeyError, match=r"head\.weigh"):
        zeroload.load(folder, keys=["head.weigh"])
    with zeroload.open(folder) as f:
        assert f.keys() == list(ref)
        for k, v in ref.items():
            assert torch.equal(f.get_tensor(k), v), k
        assert torch.equal(f.get_slice("head.weight")[1:3], ref["head.weight"][1:3])


def test_load_into_from_a_per_tensor_directory(per_tensor: tuple) -> None:
    folder, _ref, src = per_tensor
    with zeroload.init_empty():
        model = TinyNet().eval()
    result = zeroload.load_into(model, folder, strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["a" * 21, "legacy", "w"]
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    idx = torch.tensor([1, 4, 9])
    with torch.no_grad():
        assert torch.equal(model(idx), src(idx))


def test_inspect_convert_and_dcp_read_a_per_tensor_directory(
    per_tensor: tuple, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder, ref, _ = per_tensor
    assert cli.main(["inspect", "--json", str(folder)]) == 0
    listed = json.loads(capsys.readouterr().out)["tensors"]
    assert [(t["name"], t["shape"]) for t in listed] == [(k, list(v.shape)) for k, v in ref.items()]
    out = tmp_path / "converted.safetensors"
    assert cli.main(["convert", str(folder), str(out)]) == 0
    converted = safetensors.torch.load_file(out)
    assert sorted(converted) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(converted[k], v), k

    import torch.distributed.checkpoint as dcp

    from zeroload.distributed import StorageReader

    target = {k: torch.zeros_like(v) for k, v in ref.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=StorageReader(folder), no_dist=True)
    for k, v in ref.items():
        assert torch.equal(target[k], v), k


def test_a_directory_with_an_index_prefers_the_index(per_tensor: tuple, tmp_path: Path) -> None:
    folder = tmp_path / "both"
    _per_tensor_dir(folder, TinyNet())
    other = {"only.weight": torch.randn(3)}
    safetensors.torch.save_file(other, folder / "model.safetensors")
    index = {"metadata": {}, "weight_map": {"only.weight": "model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert list(zeroload.load(folder)) == ["only.weight"]
    with zeroload.open(folder) as f:
        assert f.keys() == ["only.weight"]


def test_per_tensor_directory_refusals(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    torch.save(torch.ones(2), folder / "a.pt")
    torch.save({"x": torch.ones(2)}, folder / "b.pt")
    for call in (
        lambda: zeroload.load(folder),
        lambda: zeroload.open(folder),
        lambda: zeroload.load_into(torch.nn.Linear(2, 2), folder),
    ):
        with pytest.raises(zeroload.CheckpointError, match=r"b\.pt.*one tensor"):
            call()
    assert zeroload.load(folder, keys=["a"])["a"].tolist() == [1.0, 1.0]
    (folder / "b.pt").unlink()
    torch.save(torch.zeros(2), folder / "a.pth")
    with pytest.raises(zeroload.CheckpointError, match=r"'a' is also saved as a\.p"):
        zeroload.load(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in this directory"):
        zeroload.load(empty)


# -- on the fake CUDA driver -------------------------------------------------------------


def _case_tied_llama_on_cuda(folder: str) -> None:
    from transformers import AutoModelForCausalLM

    cfg = _llama_cfg(tied=True)
    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(cfg).eval()
    src.save_pretrained(folder)
    with zeroload.init_empty():
        model = AutoModelForCausalLM.from_config(cfg).eval()
    with _gpu() as backend, _fake().watch():
        result = zeroload.load_into(model, folder, device="cuda")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert backend.allocations > 0
    # The fake's device buffers come back as CPU tensors; everything else is real.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = src.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert torch.equal(_logits(model), _logits(src))

    # A per-tensor directory, to the device.
    tensors = Path(folder) / "tensors"
    tensors.mkdir()
    for k, v in ref.items():
        torch.save(v.clone(), tensors / f"{k}.pt")
    with _gpu(), _fake().watch():
        sd = zeroload.load(tensors, device="cuda")
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k


def test_init_empty_and_load_into_a_tied_llama_on_cuda(
    worker: list[Worker],  # noqa: F811
    tmp_path: Path,
) -> None:
    pytest.importorskip("transformers")
    run(worker, _case_tied_llama_on_cuda, str(tmp_path))
