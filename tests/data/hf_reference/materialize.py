"""Regenerate a reference tokenizer set's weights from its init.json (needs torch + safetensors only).

    python materialize.py SET_DIR --out model.safetensors

The 800 MB random tokenizer is not committed: make_hf_reference.py drew every tensor from this recipe, saved it
with transformers and recorded each saved tensor's sha256 (SET_DIR/weights_sha256.json), so the tests can check
that what this writes is bitwise what transformers saved. Each entry [name, shape, mean, std, seed] is
`mean + std * randn(shape)` drawn from `torch.Generator().manual_seed(seed)` (std 0: the constant `mean`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def recipe_tensors(recipe: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape, mean, std, seed in recipe["tensors"]:
        if std == 0:
            out[name] = torch.full(shape, float(mean), dtype=torch.float32)
            continue
        g = torch.Generator().manual_seed(int(seed))
        out[name] = torch.randn(shape, generator=g, dtype=torch.float32).mul_(std).add_(mean)
    return out


def main() -> None:
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("set_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    recipe = json.loads((args.set_dir / "init.json").read_text())
    save_file(recipe_tensors(recipe), str(args.out), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
