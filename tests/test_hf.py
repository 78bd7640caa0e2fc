"""Hugging Face layouts: models saved by transformers' save_pretrained with small shards,
loaded with zeroload into a meta-device transformers model; logits must equal the original's.
Tiny configs built locally: no downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip("transformers")

import zeroload  # noqa: E402


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel, cfg


def _llama():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM, cfg


MODELS = {"gpt2": _gpt2, "llama": _llama}
INPUT = torch.tensor([[1, 5, 7, 2, 9, 3]])


def _write_bin_shards(model: torch.nn.Module, folder: Path, per_shard: int = 4) -> Path:
    """A pytorch_model.bin shard set with its index, as transformers 4 wrote it
    (transformers 5 always writes safetensors). Tied weights saved once, as HF does."""
    sd = model.state_dict()
    seen: dict = {}
    names = []
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen[key] = k
        names.append(k)
    chunks = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, chunk in enumerate(chunks, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(chunks):05d}.bin"
        torch.save({k: sd[k].clone() for k in chunk}, folder / fname)
        weight_map.update(dict.fromkeys(chunk, fname))
    index = folder / "pytorch_model.bin.index.json"
    total = sum(sd[k].numel() * sd[k].element_size() for k in names)
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    model.config.save_pretrained(folder)
    return index


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cls, cfg = MODELS[request.param]()
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        logits = model(INPUT).logits
    root = tmp_path_factory.mktemp(request.param)
    st_dir = root / "safetensors"
    model.save_pretrained(st_dir, max_shard_size="20KB")
    assert len(list(st_dir.glob("*.safetensors"))) > 1, "expected several shards"
    bin_dir = root / "bin"
    bin_dir.mkdir()
    _write_bin_shards(model, bin_dir)
    return {"cls": cls, "cfg": cfg, "model": model, "logits": logits, "st": st_dir, "bin": bin_dir}


def _meta_model(saved: dict) -> torch.nn.Module:
    with torch.device("meta"):
        return saved["cls"](saved["cfg"])


def _finish(model: torch.nn.Module, saved: dict) -> torch.nn.Module:
    """Tie weights again and give non-persistent buffers (rotary inv_freq) real values;
    they are not in any checkpoint, so a meta-device model has none."""
    model.tie_weights()
    fresh = dict(saved["model"].named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            mod_name, _, attr = name.rpartition(".")
            model.get_submodule(mod_name).register_buffer(
                attr, fresh[name].clone(), persistent=False
            )
    return model.eval()


def _check(model: torch.nn.Module, saved: dict) -> None:
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        logits = model(INPUT).logits
    assert torch.equal(logits, saved["logits"])


def _paths(saved: dict) -> dict:
    return {
        "safetensors dir": saved["st"],
        "safetensors index": saved["st"] / "model.safetensors.index.json",
        "bin dir": saved["bin"],
        "bin index": saved["bin"] / "pytorch_model.bin.index.json",
    }


@pytest.mark.parametrize("which", ["safetensors dir", "safetensors index", "bin dir", "bin index"])
def test_load_into_meta_model_with_assign(saved: dict, which: str) -> None:
    path = _paths(saved)[which]
    sd = zeroload.load(path)
    ref = saved["model"].state_dict()
    for k, v in sd.items():
        assert torch.equal(v, ref[k]), k
    model = _meta_model(saved)
    result = model.load_state_dict(sd, strict=False, assign=True)
    assert not result.unexpected_keys
    tied = {"lm_head.weight"} if saved["cfg"].tie_word_embeddings else set()
    assert set(result.missing_keys) <= tied
    _check(_finish(model, saved), saved)


@pytest.mark.parametrize("which", ["safetensors dir", "bin index"])
def test_load_into(saved: dict, which: str) -> None:
    model = _meta_model(saved)
    zeroload.load_into(model, _paths(saved)[which], strict=False)
    _check(_finish(model, saved), saved)


def test_load_into_materialised_model(saved: dict) -> None:
    torch.manual_seed(1)  # different weights, overwritten in place
    model = saved["cls"](saved["cfg"]).eval()
    zeroload.load_into(model, saved["st"], strict=False)
    _check(_finish(model, saved), saved)


def test_keys_cover_every_shard(saved: dict) -> None:
    index = json.loads((saved["st"] / "model.safetensors.index.json").read_text())
    sd = zeroload.load(saved["st"])
    assert set(sd) == set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1
