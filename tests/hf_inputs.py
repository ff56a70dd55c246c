"""The transformers-layout reference sets (tests/data/hf_reference, README there) as minihiggs inputs and outputs.

Shared by tests/test_hf_parity.py and scripts/reference/check_transformers_load.py (which runs in a venv with
transformers; this module needs only minihiggs). $MINIHIGGS_HF_REFERENCE points at another folder of sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from golden import materialized

from minihiggs import Sample, collate
from minihiggs.constants import IGNORE_INDEX
from minihiggs.data.batch import Batch, revert_delay_pattern

REPO = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("MINIHIGGS_HF_REFERENCE", str(REPO / "tests" / "data" / "hf_reference")))


def model_sets(root: Path = ROOT) -> list[Path]:
    """Directories with `checkpoint/` (transformers' save_pretrained) and `outputs.safetensors`."""
    return sorted(p.parent for p in root.glob("*/outputs.safetensors") if (p.parent / "checkpoint").is_dir())


def tokenizer_sets(root: Path = ROOT) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/io.safetensors"))


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def checkpoint_dir(saved: Path, tmp_root: Path) -> Path:
    """The directory transformers saved, rebuilt in `tmp_root`: `saved` (a set's `checkpoint/`) holds its small
    files plus init.json, from which the weights are regenerated once into the cache ($MINIHIGGS_CACHE, as the
    golden sets), and weights_sha256.json, against which every regenerated tensor is checked (so the weights are
    bitwise those transformers saved)."""
    saved = Path(saved)
    weights = materialized(saved)
    want = json.loads((saved / "weights_sha256.json").read_text())
    got = load_file(str(weights))
    if sorted(got) != sorted(want) or any(sha256_tensor(v) != want[k] for k, v in got.items()):
        raise AssertionError(f"{weights}: the regenerated weights are not those of {saved}/weights_sha256.json")
    d = Path(tmp_root) / f"{saved.parent.name}-{saved.name}"
    d.mkdir(parents=True, exist_ok=True)
    for f in saved.iterdir():
        if f.name not in ("init.json", "weights_sha256.json", "config_defaults.json"):
            shutil.copy(f, d / f.name)
    if not (d / "model.safetensors").exists():
        (d / "model.safetensors").symlink_to(weights)
    return d


def hf_token_ids(checkpoint: Path) -> tuple[int, int]:
    """(<|AUDIO_OUT|>, delay token) ids of a transformers-layout config."""
    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    return cfg["audio_token_id"], cfg["audio_delay_token_id"]


def samples_from_hf_inputs(inp: dict[str, torch.Tensor], audio_id: int, delay_id: int,
                           num_codebooks: int) -> list[Sample]:
    """The same utterances as minihiggs samples. transformers has one `<|AUDIO_OUT|>` per audio column with the
    delay token on the last K-1, and the columns' codes (BOS, codes, EOS, delay pattern applied) in
    audio_input_ids; minihiggs has one `<|AUDIO_OUT|>` per segment and that segment's plain codes [K, frames]."""
    k = num_codebooks
    samples = []
    for b in range(inp["input_ids"].shape[0]):
        ids = inp["input_ids"][b][inp["attention_mask"][b].bool()].tolist()
        columns = inp["audio_input_ids"][b][inp["audio_input_ids_mask"][b]].T  # [K, columns]
        out, segments, col, i = [], [], 0, 0
        while i < len(ids):
            if ids[i] not in (audio_id, delay_id):
                out.append(ids[i])
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] in (audio_id, delay_id):
                j += 1
            run = ids[i:j]
            if run[len(run) - (k - 1):] != [delay_id] * (k - 1) or delay_id in run[:len(run) - (k - 1)]:
                raise ValueError(f"row {b}: an audio segment at {i} does not end in exactly {k - 1} delay tokens")
            framed = revert_delay_pattern(columns[:, col:col + len(run)])  # [K, BOS + frames + EOS]
            segments.append(framed[:, 1:-1].clone())
            col, i = col + len(run), j
            out.append(audio_id)
        if col != columns.shape[1]:
            raise ValueError(f"row {b}: {columns.shape[1]} audio columns but {col} audio positions")
        ids_t = torch.tensor(out)
        samples.append(Sample(input_ids=ids_t, label_ids=torch.full_like(ids_t, IGNORE_INDEX), audio_codes=segments,
                              sample_id=f"row{b}"))
    return samples


def batch_from_hf_inputs(checkpoint: Path, inp: dict[str, torch.Tensor], model) -> Batch:
    audio_id, delay_id = hf_token_ids(checkpoint)
    return collate(samples_from_hf_inputs(inp, audio_id, delay_id, model.config.audio_num_codebooks), model.config)


@torch.no_grad()
def minihiggs_logits(model, batch: Batch, text_cols: torch.Tensor) -> dict[str, torch.Tensor]:
    """At every real position, row-major: the text logits of the columns `text_cols` [N, C], their log-sum-exp
    and argmax over the whole vocabulary [N], and the audio logits [N, K * (codebook_size + 2)] (the names of a
    model set's outputs.safetensors)."""
    hidden = model.forward_hidden(batch).hidden[batch.attention_mask]
    text = hidden @ model.audio_decoder_proj.text_lm_head.weight.T
    return dict(text_logits_cols=text[:, text_cols], text_logits_lse=torch.logsumexp(text, -1),
                text_logits_argmax=text.argmax(-1),
                audio_logits=model.audio_logits(hidden).reshape(hidden.shape[0], -1))
