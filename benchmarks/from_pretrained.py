"""`zeroload.from_pretrained` against `transformers.AutoModelForCausalLM.from_pretrained`.

A Llama-style model (default: 24 layers, hidden 1024, 1.39 GB of float32 in 219 tensors),
saved once as safetensors shards (`save_pretrained`) and once as `.bin` shards with an
index (torch zip files, as transformers 4 wrote them). Each method loads each directory
in a fresh process, and the child measures, from just before the call (torch,
transformers and zeroload already imported):

  load          until from_pretrained returns the model;
  first logits  ... and the first forward pass (8 tokens) has produced its logits: what
                a user waits for (mmap loaders read the weights during this forward);
  peak RSS      the peak increase of the process's resident set over its value before the
                call (sampled every 2 ms, and VmHWM), and the part of it that is
                anonymous memory (RssAnon: private copies; file pages of a mapping are
                the page cache's and can be dropped under pressure);
  GPU peak      with --device cuda: torch.cuda.max_memory_allocated().

Page cache: "warm" runs read the files once first; "cold" runs drop each file of the
directory from the page cache with posix_fadvise(POSIX_FADV_DONTNEED) (after a sync)
before every process. Medians over --repeat runs, with the range; the two methods'
logits must agree bit for bit (checked). The header names the machine and versions.

    python benchmarks/from_pretrained.py                    # CPU, both formats, cold and warm
    python benchmarks/from_pretrained.py --device cuda      # on a GPU
    python benchmarks/from_pretrained.py --layers 4 --repeat 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 1_000_000
GB = 1_000_000_000
_RESULT = "FROM_PRETRAINED_RESULT "
METHODS = {
    "transformers": "transformers.AutoModelForCausalLM.from_pretrained(d)",
    "zeroload": "zeroload.from_pretrained(d)",
}


# -- child: one load in a fresh interpreter ----------------------------------------------


def _status_kib(field: bytes) -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(field + b":"):
                return int(line.split()[1])
    return 0


def child(method: str, path: str, device: str) -> None:
    import threading

    import psutil
    import torch
    import transformers

    import zeroload

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # transformers imports a model's code lazily, on first use: done here, for both, so
    # that the timings are of the loading (and the class resolution is the same).
    with open(os.path.join(path, "config.json")) as f:
        getattr(transformers, json.load(f)["architectures"][0])
    import transformers.modeling_utils
    from transformers.models.auto import modeling_auto  # noqa: F401

    proc = psutil.Process()
    base_rss = proc.memory_info().rss
    base_anon = _status_kib(b"RssAnon") * 1024
    peak = [base_rss, base_anon]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            peak[1] = max(peak[1], _status_kib(b"RssAnon") * 1024)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    inputs = torch.tensor([[1, 5, 7, 2, 9, 3, 4, 8]])
    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    if method == "zeroload":
        model = zeroload.from_pretrained(path, device=device if cuda else None)
    else:
        kwargs: dict[str, Any] = {"device_map": device} if cuda else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    t_load = time.perf_counter() - t0
    with torch.no_grad():
        logits = model(inputs.to(device)).logits
        checksum = float(logits.double().sum())
    t_logits = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    hwm = _status_kib(b"VmHWM") * 1024
    out = {
        "load_s": t_load,
        "logits_s": t_logits,
        "rss": max(peak[0], hwm) - base_rss,
        "anon": peak[1] - base_anon,
        "gpu": torch.cuda.max_memory_allocated() if cuda else None,
        "checksum": checksum,
        "eval": not model.training,
    }
    print(_RESULT + json.dumps(out), flush=True)


# -- parent: the model, the page cache, the table --------------------------------------


def make_model(root: Path, layers: int, hidden: int) -> tuple[Path, Path, int, int]:
    """Writes the model as safetensors shards and as .bin shards; returns both
    directories, the bytes and the number of tensors."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype=torch.float32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)  # transformers' random init
    st = root / "safetensors"
    model.save_pretrained(st, max_shard_size="300MB")
    bins = root / "bin"
    bins.mkdir()
    model.config.save_pretrained(bins)
    sd = model.state_dict()
    names = list(sd)
    weight_map: dict[str, str] = {}
    shard: dict[str, Any] = {}
    size = 0
    shards: list[dict[str, Any]] = []
    for k in names:
        shard[k] = sd[k]
        size += sd[k].numel() * sd[k].element_size()
        if size >= 300 * MB:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    for i, part in enumerate(shards, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(part, bins / fname)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return st, bins, total, len(sd)


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin"))


def cold(d: Path) -> None:
    os.sync()
    for p in _files(d):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(d: Path) -> None:
    for p in _files(d):
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def run_child(method: str, d: Path, device: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", method, str(d), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT) :])
    raise RuntimeError(f"{method} on {d} failed:\n{proc.stdout}\n{proc.stderr}")


def _med(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _mb(values: list[float]) -> str:
    lo, mid, hi = min(values) / MB, statistics.median(values) / MB, max(values) / MB
    return f"{mid:,.0f} ({lo:,.0f}-{hi:,.0f})"


def machine() -> str:
    """The machine and versions, for RESULTS.md."""
    import platform

    import torch
    import transformers

    import zeroload

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} CPUs (load average {load}), {mem:.0f} GB RAM, GPU {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, zeroload {zeroload.__version__}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", choices=["cold", "warm", "both"], default="both")
    ap.add_argument("--dir", type=Path, help="where to write the model (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the model files")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.device)
        return

    root = Path(tempfile.mkdtemp(prefix="zeroload-from-pretrained-", dir=args.dir))
    try:
        t = time.perf_counter()
        st, bins, total, count = make_model(root, args.layers, args.hidden)
        print(
            f"Llama-style model: {args.layers} layers, hidden {args.hidden}, {count} tensors, "
            f"{total / GB:.2f} GB float32 (written in {time.perf_counter() - t:.0f} s); "
            f"safetensors: {len(_files(st))} shards, .bin: {len(_files(bins))} shards; "
            f"device {args.device}; {args.repeat} runs each, fresh process per run",
            flush=True,
        )
        print(machine(), flush=True)
        caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
        rows = []
        for fmt, d in (("safetensors", st), (".bin", bins)):
            for cache in caches:
                results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
                for _ in range(args.repeat):
                    for method in METHODS:  # interleaved, so drift hits both alike
                        (cold if cache == "cold" else warm)(d)
                        results[method].append(run_child(method, d, args.device))
                sums = {r["checksum"] for rs in results.values() for r in rs}
                assert len(sums) == 1, f"the methods' logits differ: {sums}"
                assert all(r["eval"] for rs in results.values() for r in rs)
                rows.append((fmt, cache, results))
                _print_rows([rows[-1]], args.device)
        print("\n## All results\n")
        _print_rows(rows, args.device)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _print_rows(rows: list[tuple[str, str, dict[str, list[dict[str, Any]]]]], device: str) -> None:
    gpu = device.startswith("cuda")
    head = "| format | cache | method | load s | first logits s | peak RSS +MB | of it anon MB |"
    head += " GPU peak MB |" if gpu else ""
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for fmt, cache, results in rows:
        for method, rs in results.items():
            line = (
                f"| {fmt} | {cache} | {method} | {_med([r['load_s'] for r in rs])} | "
                f"{_med([r['logits_s'] for r in rs])} | {_mb([r['rss'] for r in rs])} | "
                f"{_mb([r['anon'] for r in rs])} |"
            )
            if gpu:
                line += f" {_mb([r['gpu'] for r in rs])} |"
            print(line)
        z = statistics.median(r["logits_s"] for r in results["zeroload"])
        h = statistics.median(r["logits_s"] for r in results["transformers"])
        ratio = f"| {fmt} | {cache} | transformers / zeroload | | {h / z:.2f}x | | |"
        print(ratio + (" |" if gpu else ""))
    print(flush=True)


if __name__ == "__main__":
    main()
