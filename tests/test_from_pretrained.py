"""`zeroload.from_pretrained`: every model is built from a tiny random config, saved
locally (no downloads), loaded by zeroload and by `transformers.AutoModel*.from_pretrained`,
and compared: class, eval mode, tied weights, every parameter and buffer, and the outputs,
bit for bit. While zeroload loads, transformers' own readers (safe_open, torch.load,
safetensors' in-memory load) raise, so the bytes can only have come from zeroload."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip("transformers")

import zeroload  # noqa: E402
from zeroload import _hf  # noqa: E402

INPUT = torch.tensor([[1, 5, 7, 2, 9, 3, 4, 8]])
COMMON = dict(vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _llama(tied: bool) -> Any:
    return transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, **COMMON,
    )  # fmt: skip


def _gpt2() -> Any:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, **COMMON)


def _qwen2() -> Any:
    return transformers.Qwen2Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **COMMON,
    )  # fmt: skip


def _bert() -> Any:
    return transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        max_position_embeddings=64, vocab_size=100, pad_token_id=0,
    )  # fmt: skip


def _t5() -> Any:
    return transformers.T5Config(
        num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, d_ff=64, num_heads=4,
        vocab_size=100, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip


def _mixtral() -> Any:
    return transformers.MixtralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, **COMMON,
    )  # fmt: skip


# name -> (config factory, model class, auto class)
MODELS: dict[str, tuple[Callable[[], Any], str, str]] = {
    "llama-tied": (lambda: _llama(True), "LlamaForCausalLM", "AutoModelForCausalLM"),
    "llama-untied": (lambda: _llama(False), "LlamaForCausalLM", "AutoModelForCausalLM"),
    "gpt2": (_gpt2, "GPT2LMHeadModel", "AutoModelForCausalLM"),
    "qwen2": (_qwen2, "Qwen2ForCausalLM", "AutoModelForCausalLM"),
    "bert": (_bert, "BertForMaskedLM", "AutoModelForMaskedLM"),
    "t5": (_t5, "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    "mixtral": (_mixtral, "MixtralForCausalLM", "AutoModelForCausalLM"),
}


def _build(name: str) -> Any:
    make_config, cls_name, _auto = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(make_config()).eval()
    with torch.no_grad():  # random weights everywhere, biases and norms included
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _write_bin(model: Any, folder: Path, shards: int = 1, rename: Callable | None = None) -> None:
    """`pytorch_model.bin` (or shards with an index) and config.json, as transformers 4
    wrote them: torch zip files, tied weights stored once."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = _hub_state_dict(model, folder)
    model.config.save_pretrained(folder)  # with `architectures`, set by save_pretrained
    if rename is not None:
        sd = {rename(k): v for k, v in sd.items()}
    names = list(sd)
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        chunk = names[i * per : (i + 1) * per]
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: sd[k] for k in chunk}, folder / fname)
        weight_map.update(dict.fromkeys(chunk, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _hub_state_dict(model: Any, scratch: Path) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained writes (hub key names, ties stored once), read back."""
    tmp = scratch / "_st"
    model.save_pretrained(tmp)
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(tmp.glob("*.safetensors")):
        sd.update({k: v.clone() for k, v in safetensors.torch.load_file(f).items()})
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return sd


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Every layout, saved once: name -> model directory."""
    root = tmp_path_factory.mktemp("hf")
    out: dict[str, Path] = {}
    for name in MODELS:
        model = _build(name)
        out[name] = root / name
        model.save_pretrained(out[name], max_shard_size="20KB")  # several shards
    # BERT as old checkpoints on the Hub hold it: pytorch_model.bin, LayerNorm gamma/beta.
    bert = _build("bert")
    out["bert-bin"] = root / "bert-bin"
    _write_bin(bert, out["bert-bin"], rename=_old_layernorm_names)
    out["llama-bin-shards"] = root / "llama-bin-shards"
    _write_bin(_build("llama-tied"), out["llama-bin-shards"], shards=3)
    # Mixtral: save_pretrained writes the hub's per-expert layout
    # (block_sparse_moe.experts.N.w1/w2/w3); also as .bin shards, and in transformers'
    # fused in-memory layout (mlp.experts.gate_up_proj / down_proj).
    mixtral = _build("mixtral")
    out["mixtral-bin"] = root / "mixtral-bin"
    _write_bin(mixtral, out["mixtral-bin"], shards=2)
    out["mixtral-fused"] = root / "mixtral-fused"
    out["mixtral-fused"].mkdir()
    mixtral.config.save_pretrained(out["mixtral-fused"])
    fused = {k: v.contiguous() for k, v in mixtral.state_dict().items()}
    safetensors.torch.save_file(
        fused, out["mixtral-fused"] / "model.safetensors", metadata={"format": "pt"}
    )
    yield out


def _old_layernorm_names(key: str) -> str:
    if "LayerNorm." in key:
        return key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )
    return key


# Extra layouts -> the model they hold.
FAMILY = {"bert-bin": "bert", "llama-bin-shards": "llama-tied", "mixtral-bin": "mixtral"}
FAMILY["mixtral-fused"] = "mixtral"


def _auto(name: str) -> Any:
    return getattr(transformers, MODELS[FAMILY.get(name, name)][2])


def _outputs(model: Any) -> Any:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=INPUT, decoder_input_ids=INPUT[:, :5]).logits
        return model(INPUT).logits


def _same_model(ours: Any, ref: Any) -> None:
    assert type(ours) is type(ref)
    assert not ours.training
    assert all(not m.training for m in ours.modules())
    for kind in ("parameters", "buffers"):
        a = dict(getattr(ours, f"named_{kind}")(remove_duplicate=False))
        b = dict(getattr(ref, f"named_{kind}")(remove_duplicate=False))
        assert a.keys() == b.keys(), kind
        for k in a:
            assert not a[k].is_meta, k
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
    # Tied weights are one object under every name, as in transformers' model.
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    our_params = dict(ours.named_parameters(remove_duplicate=False))
    for k1, p1 in ref_params.items():
        for k2, p2 in ref_params.items():
            if k1 < k2:
                assert (our_params[k1] is our_params[k2]) == (p1 is p2), (k1, k2)
    out = _outputs(ours)
    assert not out.isnan().any()
    assert torch.equal(out, _outputs(ref))


def _reference(name: str, path: Path, **kwargs: Any) -> Any:
    return _auto(name).from_pretrained(path, **kwargs)


LAYOUTS = [*MODELS, "bert-bin", "llama-bin-shards", "mixtral-bin", "mixtral-fused"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_matches_transformers(store: dict[str, Path], name: str) -> None:
    ref = _reference(name, store[name])
    ours = _load_checked(store[name])
    _same_model(ours, ref)
    # ... and both hold the saved weights (none left to _init_weights, which would agree
    # between the two for norms), old names and per-expert layouts converted.
    saved = _build(FAMILY.get(name, name)).state_dict()
    loaded = ours.state_dict()
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    if name == "llama-tied":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    if name == "llama-untied":
        assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    if name == "t5":
        shared = ours.shared.weight
        assert ours.encoder.embed_tokens.weight is shared
        assert ours.decoder.embed_tokens.weight is shared
    if name.startswith("mixtral"):
        assert ours.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 96, 32)


def _load_checked(path: Path, **kwargs: Any) -> Any:
    """zeroload.from_pretrained with every other reader refusing."""
    mp = pytest.MonkeyPatch()
    try:
        import transformers.modeling_utils as mu

        def refuse(*args: Any, **kw: Any) -> Any:
            raise AssertionError("a reader other than zeroload's was called")

        mp.setattr(mu, "safe_open", refuse)
        mp.setattr(mu, "_safe_load_bytes", refuse, raising=False)
        mp.setattr(torch, "load", refuse)
        mp.setattr(safetensors.torch, "load_file", refuse)
        mp.setattr(safetensors.torch, "load", refuse)
        model = zeroload.from_pretrained(path, **kwargs)
        # The readers are transformers' own again once the call returns.
        assert mu.safe_open is refuse
    finally:
        mp.undo()
    return model


def test_seams_are_restored_and_other_threads_untouched(store: dict[str, Path]) -> None:
    import transformers.modeling_utils as mu

    before = (mu.safe_open, mu.load_state_dict)
    seen = []

    def plain_load() -> None:
        seen.append(type(mu.safe_open(str(next(store["gpt2"].glob("*.safetensors"))), "pt")))

    import threading

    original_from_pretrained = transformers.GPT2LMHeadModel.from_pretrained.__func__

    def spying(cls: Any, *args: Any, **kwargs: Any) -> Any:
        t = threading.Thread(target=plain_load)  # while zeroload's seams are installed
        t.start()
        t.join()
        return original_from_pretrained(cls, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(transformers.GPT2LMHeadModel, "from_pretrained", classmethod(spying))
    try:
        zeroload.from_pretrained(store["gpt2"])
    finally:
        mp.undo()
    assert (mu.safe_open, mu.load_state_dict) == before
    assert seen and seen[0] is not _hf._Source  # the other thread got safetensors' handle


@pytest.mark.parametrize("name", ["llama-untied", "mixtral", "bert-bin"])
def test_dtype_bfloat16(store: dict[str, Path], name: str) -> None:
    ref = _reference(name, store[name], dtype=torch.bfloat16)
    ours = _load_checked(store[name], dtype=torch.bfloat16)
    assert next(ours.parameters()).dtype == torch.bfloat16
    _same_model(ours, ref)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_cpu_parameters_are_views_of_the_file(store: dict[str, Path]) -> None:
    path = store["llama-untied"]
    model = zeroload.from_pretrained(path)
    files = {str(p.resolve()) for p in path.glob("*.safetensors")}
    ranges = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and parts[5] in files:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    assert ranges
    w = model.model.layers[0].self_attn.q_proj.weight
    assert any(lo <= w.data_ptr() < hi for lo, hi in ranges)


def test_model_class_and_index_and_file_paths(store: dict[str, Path]) -> None:
    path = store["llama-untied"]
    base = zeroload.from_pretrained(path, model_class="LlamaModel")
    assert type(base) is transformers.LlamaModel
    ref = transformers.LlamaModel.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(base(INPUT).last_hidden_state, ref(INPUT).last_hidden_state)
    auto = zeroload.from_pretrained(path, model_class=transformers.AutoModelForCausalLM)
    assert type(auto) is transformers.LlamaForCausalLM
    index = _load_checked(store["llama-bin-shards"] / "pytorch_model.bin.index.json")
    _same_model(index, _reference("llama-bin-shards", store["llama-bin-shards"]))
    single = _load_checked(store["mixtral-fused"] / "model.safetensors")
    _same_model(single, _reference("mixtral-fused", store["mixtral-fused"]))
    _, info = zeroload.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_bin_index_is_honoured_over_safetensors(store: dict[str, Path], tmp_path: Path) -> None:
    """A directory with both: the directory gives safetensors (as transformers), the
    .bin index gives the .bin shards."""
    d = tmp_path / "both"
    _write_bin(_build("llama-untied"), d, shards=2)
    other = transformers.LlamaForCausalLM(_llama(False))  # different random weights
    other.save_pretrained(d)
    from_dir = zeroload.from_pretrained(d)
    from_index = zeroload.from_pretrained(d / "pytorch_model.bin.index.json")
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(from_dir.state_dict()[w], other.state_dict()[w])
    assert torch.equal(from_index.state_dict()[w], _build("llama-untied").state_dict()[w])


@pytest.mark.parametrize(
    "kwarg", ["device_map", "torch_dtype", "quantization_config", "state_dict", "tp_plan"]
)
def test_refused_kwargs_say_what_to_do(store: dict[str, Path], kwarg: str) -> None:
    with pytest.raises(TypeError, match=f"does not accept {kwarg}="):
        zeroload.from_pretrained(store["gpt2"], **{kwarg: "auto"})


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        zeroload.from_pretrained(tmp_path / "nope")
    with pytest.raises(zeroload.CheckpointError, match=r"no config\.json"):
        zeroload.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    with pytest.raises(zeroload.CheckpointError, match=r"NoSuchModel.*model_class="):
        zeroload.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(zeroload.CheckpointError, match=r"config\.json: not a readable"):
        zeroload.from_pretrained(tmp_path)


def test_a_malformed_weights_file_names_the_file(store: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    for f in store["gpt2"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    victim = sorted(d.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(zeroload.CheckpointError, match=victim.name):
        zeroload.from_pretrained(d)


@pytest.mark.parametrize("version", ["4.57.1", "6.0.0", "dev"])
def test_unsupported_transformers_versions_are_refused(
    store: dict[str, Path], monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    # (saving a model replaces the lazy `transformers` module in sys.modules)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(ImportError, match=r"supports transformers >= 5.0, < 6"):
        zeroload.from_pretrained(store["gpt2"])


def test_supported_versions() -> None:
    assert _hf._supported("5.0.0") and _hf._supported("5.24.0.dev0")
    assert not _hf._supported("4.99.0") and not _hf._supported("6.1")


# -- the GPU path, on the fake CUDA driver (tests/fakecuda; see test_cuda_engine.py) -------


@pytest.fixture(scope="module")
def worker() -> Iterator[list[Any]]:
    from test_cuda_engine import Worker

    box = [Worker()]
    yield box
    box[0].close()


def _case_cuda(tmp: str) -> None:
    """In the fake-driver process: every tensor goes file -> pinned staging -> (fake)
    device memory, through transformers' loading threads, and comes back equal."""
    from test_cuda_engine import _fake, _gpu

    root = Path(tmp)
    cases = []
    llama = root / "llama"
    _build("llama-tied").save_pretrained(llama, max_shard_size="20KB")
    cases.append((llama, {}))
    mixtral = root / "mixtral-bin"
    _write_bin(_build("mixtral"), mixtral, shards=2)
    cases.append((mixtral, {"dtype": torch.bfloat16}))
    for path, kwargs in cases:
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        with _gpu("plain") as backend, _fake().watch():
            ours = _load_checked(path, device="cuda", **kwargs)
        stored = len(zeroload.open(path).keys())
        assert backend.allocations >= stored, (backend.allocations, stored)
        _same_model(ours, ref)
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16


def test_cuda_path_on_the_fake_driver(worker: list[Any], tmp_path: Path) -> None:
    from test_cuda_engine import TIMEOUT

    w = worker[0]
    w.tx.send((__name__, _case_cuda.__name__, (str(tmp_path),)))  # as test_cuda_engine.run
    if not w.rx.poll(TIMEOUT):
        w.close()
        pytest.fail(f"_case_cuda hung for {TIMEOUT} s")
    status, result, after = w.rx.recv()
    if status != "ok":
        pytest.fail(f"_case_cuda (in the fake-driver process):\n{result}", pytrace=False)
    assert after == [], "the fake CUDA driver recorded contract violations:\n" + "\n".join(after)


def test_cuda_without_a_device_is_a_clear_error(store: dict[str, Path]) -> None:
    with pytest.raises(zeroload.CudaError, match="cannot load to cuda"):
        zeroload.from_pretrained(store["gpt2"], device="cuda")


def test_progress_switches_transformers_bar_for_the_call_only(
    store: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    logging = transformers.utils.logging
    before = logging.is_progress_bar_enabled()
    try:
        logging.disable_progress_bar()
        zeroload.from_pretrained(store["gpt2"], progress=True)
        assert "Loading weights" in capsys.readouterr().err
        assert not logging.is_progress_bar_enabled()
        logging.enable_progress_bar()
        zeroload.from_pretrained(store["gpt2"], progress=False)
        assert "Loading weights" not in capsys.readouterr().err
        assert logging.is_progress_bar_enabled()
    finally:
        (logging.enable_progress_bar if before else logging.disable_progress_bar)()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["llama-tied", "mixtral-bin"])
def test_on_a_real_gpu(store: dict[str, Path], name: str) -> None:
    ref = _reference(name, store[name], device_map="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    ours = _load_checked(store[name], device="cuda", dtype=torch.bfloat16)
    assert all(p.is_cuda for p in ours.parameters())
    assert all(b.is_cuda for b in ours.buffers())
    with torch.no_grad():
        a = ours(INPUT.cuda()).logits
        b = ref(INPUT.cuda()).logits
    assert torch.equal(a, b)
