"""A random, decode-only Higgs audio tokenizer written to disk (the codec counterpart of `model/tiny.py`).

`make demo`, `make speak` and the tests turn generated codes into WAVs without downloading the real 800 MB
tokenizer: this writes `config.json` + `model.safetensors` in the real checkpoint layout (real architecture and
config; weight-normed convs as `weight_g`/`weight_v`, the quantizer's EMA statistics), but only the tensors
decoding reads: the RVQ codebooks and projections, `fc_post2` and the DAC decoder (~24M parameters, ~95 MB).
The acoustic encoder and the HuBERT semantic branch are left out, so it loads with
`AudioTokenizer.from_pretrained(dir, decode_only=True)` and cannot encode.

The weights are random, so the audio is a noise-like texture that changes with the codes, not speech; the
output is scaled to an RMS of about 0.1 so the WAVs are listenable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .loading import POS_CONV, WEIGHT_NORM_PREFIXES, CodecConfig
from .tokenizer import AudioTokenizer

# The released tokenizer's config.json fields that shape the model.
REAL_CONFIG = {"sample_rate": 24000, "ratios": [8, 5, 4, 2, 3], "D": 256, "n_q": 8, "bins": 1024,
               "codebook_dim": 64, "semantic_sample_rate": 16000}
TARGET_RMS = 0.1


@torch.no_grad()
def write_random_decoder(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random decode-only tokenizer to `out_dir`; returns the directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = CodecConfig.from_dict(REAL_CONFIG)
    state = torch.random.get_rng_state()  # module init draws from the global generator; restored below
    try:
        torch.manual_seed(seed)
        model = AudioTokenizer(cfg, decode_only=True)
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)) and m.bias is not None:
                nn.init.normal_(m.bias, std=0.01)
            if hasattr(m, "alpha"):
                nn.init.normal_(m.alpha, mean=1.0, std=0.1)  # Snake frequencies
        for layer in model.quantizer.vq.layers:
            nn.init.normal_(layer._codebook.embed)
        # Calibrate the output level on random codes: the DAC decoder has no final tanh.
        probe = torch.randint(0, cfg.bins, (cfg.n_q, 50))
        rms = model.decode(probe).pow(2).mean().sqrt().item()
        last = model.decoder_2.model[-1]
        last.weight.mul_(TARGET_RMS / max(rms, 1e-8))
        last.bias.mul_(TARGET_RMS / max(rms, 1e-8))
    finally:
        torch.random.set_rng_state(state)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith(WEIGHT_NORM_PREFIXES) and name.endswith(".weight") and t.dim() == 3:
            # the checkpoint stores weight-normed convs as g (the norm over every dim but 0) and v
            base = name[: -len("weight")]
            tensors[base + "weight_v"] = t.clone()
            tensors[base + "weight_g"] = t.norm(dim=(1, 2), keepdim=True)
        elif not name.startswith(POS_CONV):
            tensors[name] = t.clone()
    for i in range(cfg.n_q):  # the codebooks' EMA statistics (training state; the loader checks `inited`)
        p = f"quantizer.vq.layers.{i}._codebook."
        tensors[p + "inited"] = torch.ones(1)
        tensors[p + "cluster_size"] = torch.ones(cfg.bins)
        tensors[p + "embed_avg"] = tensors[p + "embed"].clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(REAL_CONFIG, indent=2))
    (out / "README.md").write_text("Random decode-only Higgs audio tokenizer written by minihiggs.codec.tiny "
                                   "(demo/tests: the audio is noise-like, not speech). Load with "
                                   "AudioTokenizer.from_pretrained(dir, decode_only=True).\n")
    return out
