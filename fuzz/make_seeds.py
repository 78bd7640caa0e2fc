"""Regenerates the committed seed corpora under fuzz/seeds/ (run from the repo root).

Each seed is a tiny real file: torch.save zips, legacy (pre-zip) torch.save files,
safetensors files, and the data.pkl pickles inside the zips (plus a few plain protocol-4
pickles). Keep them small: the fuzzers mutate faster on short inputs.
"""

import collections
import io
import json
import os
import pickle
import zipfile

import torch
from safetensors.torch import save as st_save

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def torch_bytes(obj, **kw):
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def main():
    torch.manual_seed(0)
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    lin = torch.nn.Linear(2, 2)
    objs = {
        "state_dict": lin.state_dict(),
        "tied": {"a": w, "b": w, "t": w.t(), "row": w[1], "empty": torch.zeros(0)},
        "dtypes": {
            "bf16": torch.ones(2, dtype=torch.bfloat16),
            "f8": torch.zeros(2, dtype=torch.float8_e4m3fn),
            "u16": torch.zeros(2, dtype=torch.uint16),
            "i8": torch.zeros(3, dtype=torch.int8),
            "c64": torch.zeros(1, dtype=torch.complex64),
            "b": torch.zeros(2, dtype=torch.bool),
        },
        "parameter": {"p": torch.nn.Parameter(torch.ones(2))},
        # The dtypes of safe_open parity: packed fp4, fnuz float8s, e8m0, bit containers.
        "new_dtypes": {
            "f4": torch.zeros(2, 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
            "fnuz": torch.zeros(2, dtype=torch.float8_e4m3fnuz),
            "e5fnuz": torch.zeros(2, dtype=torch.float8_e5m2fnuz),
            "e8m0": torch.zeros(2, dtype=torch.uint8).view(torch.float8_e8m0fnu),
            "bits": torch.zeros(2, dtype=torch.uint8).view(torch.bits8),
            "c32": torch.zeros(1, dtype=torch.complex32),
        },
        "checkpoint": {
            "epoch": 3,
            "lr": 1e-3,
            "name": "run",
            "blob": b"\x00\xff",
            "size": torch.Size([2, 3]),
            "tup": (1, "a", None),
            "nested": {"a": [1, 2.5], 7: "k"},
            "big": 2**100,
            "od": collections.OrderedDict(x=torch.ones(1, dtype=torch.float64)),
            "dev": torch.device("cpu"),
            "dt": torch.float16,
            "expand": torch.ones(1).expand(3),
        },
    }
    for name, obj in objs.items():
        data = torch_bytes(obj)
        write("torchzip", f"{name}.pth", data)
        write("open_and_plan", f"{name}.pth", data)
        z = zipfile.ZipFile(io.BytesIO(data))
        (pkl,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        write("pickle", f"{name}.pkl", z.read(pkl))
        if name != "new_dtypes":  # no legacy storage class for these dtypes
            legacy = torch_bytes(obj, _use_new_zipfile_serialization=False)
            write("legacy", f"{name}.pt", legacy)
            write("open_and_plan", f"{name}_legacy.pt", legacy)
    # Protocol 4 (FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL) and plain containers.
    write("pickle", "p4_tensors.pkl", _pkl(torch_bytes(objs["tied"], pickle_protocol=4)))
    plain = {"a": [1, 2, (3, 4.5)], "b": {"c": None, "d": True}, "e": "s" * 3, "f": b"x"}
    for proto in (0, 2, 4):
        write("pickle", f"plain_p{proto}.pkl", pickle.dumps(plain, protocol=proto))
    # Forbidden globals, so the VM's refusal paths are in the corpus.
    write("pickle", "os_system.pkl", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")

    st = {
        "small": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)},
        "dtypes": {
            "bf16": torch.ones(2, dtype=torch.bfloat16),
            "f8": torch.zeros(2, dtype=torch.float8_e5m2),
            "i64": torch.zeros(1, dtype=torch.int64),
            "bool": torch.zeros(3, dtype=torch.bool),
            "empty": torch.zeros(0, 4),
            "scalar": torch.tensor(1.5),
        },
    }
    for name, tensors in st.items():
        data = st_save(tensors, metadata={"format": "pt"} if name == "small" else None)
        write("safetensors_header", f"{name}.safetensors", data)
        write("open_and_plan", f"{name}.safetensors", data)
        # The header alone, the other input shape of the safetensors_header target.
        n = int.from_bytes(data[:8], "little")
        write("safetensors_header", f"{name}.header", data[8 : 8 + n] + b"\x00" + data[8 + n :])
    # Written by hand: dtypes torch's safetensors writer does not cover (F4 with its
    # doubled last dimension, both fnuz float8s, F8_E8M0) and one torch cannot hold (F6),
    # which parses but is listed as not loadable.
    spec = [
        ("f4", "F4", [2, 4], 4),
        ("fnuz", "F8_E4M3FNUZ", [2], 2),
        ("e5fnuz", "F8_E5M2FNUZ", [2], 2),
        ("e8m0", "F8_E8M0", [2], 2),
        ("f6", "F6_E2M3", [4], 3),
    ]
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, nbytes in spec:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + nbytes]}
        at += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    data = bytes(range(at))
    write("safetensors_header", "parity.header", text + b"\x00" + data)
    write("open_and_plan", "parity.safetensors", len(text).to_bytes(8, "little") + text + data)


def _pkl(zip_bytes):
    z = zipfile.ZipFile(io.BytesIO(zip_bytes))
    (pkl,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
    return z.read(pkl)


if __name__ == "__main__":
    main()
