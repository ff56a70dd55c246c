"""Shared by the generation tests: golden-case requests, a trace recorder, and the teacher-forced full forward."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from minihiggs.constants import IGNORE_INDEX
from minihiggs.data.batch import Batch
from minihiggs.generate.engine import Request
from minihiggs.generate.prompt import AudioPart, MergedPrompt, Turn, prompt_ids
from minihiggs.generate.sampling import SamplingConfig


def generate_variants(root: Path) -> list[Path]:
    """Every directory under `root` with a cases.json (a generation variant), sorted."""
    return sorted(p.parent for p in Path(root).glob("*/cases.json")) if Path(root).is_dir() else []


def read_cases(variant: Path) -> list[dict]:
    return json.loads((variant / "cases.json").read_text())


def sampling_of(args: dict) -> SamplingConfig:
    """The serve engine's arguments of a golden case as a SamplingConfig."""
    return SamplingConfig(temperature=args["temperature"], top_k=args["top_k"], top_p=args["top_p"],
                          ras_win_len=args["ras_win_len"], ras_win_max_num_repeat=args["ras_win_max_num_repeat"],
                          seed=args["seed"])


def case_request(case: dict, tensors: dict, tok) -> Request:
    """Rebuild the case's prompt from its messages (text given as token ids, audio by index into
    `context_codes.<i>`) with our prompt builder."""
    turns = []
    for m in case["messages"]:
        parts = []
        for item in m["content"]:
            if item["type"] == "text":
                parts.append(list(item["token_ids"]))
            else:
                parts.append(AudioPart(tensors[f"context_codes.{item['audio_index']}"]))
        turns.append(Turn(m["role"], parts))
    args = case["serve_engine_generate_args"]
    prompt = prompt_ids(turns, tok, force_audio=args["force_audio_gen"])
    prompt.name = case["name"]
    return Request(prompt, sampling_of(args), args["max_new_tokens"])


class Recorder:
    """A trace callback keeping every iteration's record, per row."""

    def __init__(self):
        self.rows: dict[int, list[dict]] = defaultdict(list)

    def __call__(self, row: int, record: dict) -> None:
        self.rows[row].append(record)


def fed_batch(merged: MergedPrompt, records: list[dict], cfg) -> Batch:
    """One unpadded row: the merged prompt followed by every element fed after it (one per iteration >= 1),
    laid out as the training forward expects (audio columns as audio-out positions, no targets)."""
    ids = merged.input_ids.tolist()
    disc = merged.discrete.tolist()
    cols = [merged.columns]
    for rec in records[1:]:
        kind, value = rec["fed"]
        if kind == "audio":
            ids.append(cfg.audio_out_token_id)
            disc.append(True)
            cols.append(value[:, None])
        else:
            ids.append(value)
            disc.append(False)
    n, k = len(ids), cfg.audio_num_codebooks
    discrete = torch.tensor([disc])
    audio_pos = torch.nonzero(discrete.reshape(-1)).reshape(-1)
    codes = torch.cat(cols, dim=1)
    empty = torch.zeros(0, dtype=torch.long)
    return Batch(
        input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, n, dtype=torch.bool),
        position_ids=torch.arange(n)[None], labels=torch.full((1, n), IGNORE_INDEX),
        discrete_mask=discrete, audio_out_mask=discrete, audio_in_mask=torch.zeros(1, n, dtype=torch.bool),
        discrete_idx=audio_pos, other_idx=torch.nonzero(~discrete.reshape(-1)).reshape(-1),
        audio_in_pos=empty, audio_in_codes=torch.zeros(k, 0, dtype=torch.long),
        audio_out_pos=audio_pos, audio_out_codes=codes, audio_out_labels=torch.full_like(codes, IGNORE_INDEX),
        text_loss_pos=empty, text_loss_targets=empty, audio_loss_rows=empty,
        audio_loss_targets=torch.zeros(0, k, dtype=torch.long),
    )


@torch.no_grad()
def teacher_forced(model, merged: MergedPrompt, records: list[dict]) -> tuple[torch.Tensor, list[int]]:
    """Final-normed hidden states of a plain (uncached) forward over everything the generation fed, at the
    position whose output each iteration used. Returns ([iterations, H], positions)."""
    batch = fed_batch(merged, records, model.config)
    hidden = model.forward_hidden(batch).hidden[0]
    p = len(merged.input_ids)
    positions = [p - 1 + s for s in range(len(records))]
    return hidden[positions], positions
