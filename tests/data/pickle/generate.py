"""Regenerates the data.pkl test vectors of src/format/pickle.rs (run from the repo root).

Each vector is the `*/data.pkl` entry of a torch.save zip, pulled out of the archive.
torch.load(weights_only=True) must accept every protocol-2 vector (checked here).
"""

import collections
import io
import os
import zipfile

import torch

OUT = os.path.dirname(os.path.abspath(__file__))


def data_pkl(obj, **kw):
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    if kw.get("pickle_protocol", 2) == 2:
        buf.seek(0)
        torch.load(buf, weights_only=True)
    z = zipfile.ZipFile(buf)
    (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
    return z.read(name)


def main():
    torch.manual_seed(0)
    vectors = {}

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    vectors["state_dict"] = model.state_dict()

    vectors["parameter"] = {
        "p": torch.nn.Parameter(torch.ones(2, 2)),
        "frozen": torch.nn.Parameter(torch.zeros(3), requires_grad=False),
    }

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    vectors["tied"] = {"a": w, "b": w, "t": w.t(), "row": w[1], "x": torch.zeros(0)}

    f8 = torch.zeros(2, 3, dtype=torch.float8_e4m3fn)
    vectors["v3"] = {
        "f8": f8,
        "f8_tail": f8[1],
        "u16": torch.zeros(3, dtype=torch.uint16),
        "bf16": torch.zeros(2, dtype=torch.bfloat16),
    }

    vectors["checkpoint"] = {
        "epoch": 3,
        "lr": 1e-3,
        "neg": -70000,
        "name": "run-\u00e9",
        "blob": b"\x00\xffab",
        "size": torch.Size([2, 3]),
        "tup": (1, "a", None),
        "nested": {"a": {"b": [1, 2.5]}, 7: "int key"},
        "big": 2**100,
        "neg_big": -(2**70),
        "set": {1, 2},
        "flags": [None, True, False],
        "device": torch.device("cuda", 0),
        "cpu": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "complex": 1 + 2j,
        "bytearray": bytearray(b"xy"),
        "counter": collections.Counter({"a": 2}),
        "step": torch.tensor(5, dtype=torch.int64),
    }

    for name, obj in vectors.items():
        with open(os.path.join(OUT, f"{name}.pkl"), "wb") as f:
            f.write(data_pkl(obj))

    # Protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE, SHORT_BINBYTES, EMPTY_SET,
    # ADDITEMS, FROZENSET): torch itself writes protocol 2, other writers do not.
    p4 = {
        "w": torch.ones(2, dtype=torch.float16),
        "blob": b"\x01\x02",
        "s": {3},
        "fs": frozenset([4]),
        "big": 2**100,
    }
    with open(os.path.join(OUT, "protocol4.pkl"), "wb") as f:
        f.write(data_pkl(p4, pickle_protocol=4))


if __name__ == "__main__":
    main()
