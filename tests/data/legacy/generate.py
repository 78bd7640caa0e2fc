"""Regenerates the legacy torch.save test vectors of src/format/legacy.rs (run from the
repo root): whole files as `torch.save(..., _use_new_zipfile_serialization=False)` writes
them, named `.legacy` (`*.pt` is git-ignored). torch.load(weights_only=True) must accept
each (checked here)."""

import os

import torch

OUT = os.path.dirname(os.path.abspath(__file__))


def main():
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    vectors = {
        # Views sharing one storage, a Parameter, a 1-byte storage that puts the next
        # ones at odd offsets, an empty tensor.
        "tied": {
            "odd": torch.arange(3, dtype=torch.uint8),
            "a": w,
            "b": w,
            "t": w.t(),
            "row": w[1],
            "p": torch.nn.Parameter(torch.ones(2, dtype=torch.float64)),
            "x": torch.zeros(0),
        },
    }
    for name, obj in vectors.items():
        path = os.path.join(OUT, f"{name}.legacy")
        torch.save(obj, path, _use_new_zipfile_serialization=False)
        torch.load(path, weights_only=True)


if __name__ == "__main__":
    main()
