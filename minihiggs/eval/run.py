"""What `python -m minihiggs.eval` does: generate the prompt set with every model, then score each clip.

Per model the requests are the same (same prompts, same seeds: prompt k uses seed `seed + k` unless its line
gives one), generated in batches like `minihiggs.generate`, decoded with the codec and written as WAVs. Then
the scorers run once over everything: Whisper -> WER/CER against the text, the speaker model -> SIM to the
reference (and the ground truth's SIM to the same reference: the ceiling), the cheap signals, and the real-time
factor (generation + codec decode seconds per second of audio, per batch). Outputs in `out_dir`:
`utterances.jsonl` (one line per model and utterance), `summary.json`, `summary.md` (the table) and `eval.png`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..audio.io import resample
from ..constants import CODE_FRAMES_PER_SECOND, DEFAULT_CODEC_REPO
from ..errors import EvalError
from ..fsio import atomic_write_bytes
from ..generate.engine import Engine, Request
from ..generate.loading import adapter_dir, load_codec, load_generation_model, load_tokenizer, stop_token_ids
from ..generate.output import wav_bytes
from ..generate.sampling import SamplingConfig
from ..generate.speak import default_device, default_dtype
from .asr import DEFAULT_ASR, Transcriber
from .prompts import EvalItem, jsonl_items, shard_items
from .report import summarize, write_reports
from .signals import cheap_signals, flags
from .speaker import DEFAULT_SV, SpeakerScorer
from .wer import char_errors, word_errors

SR = 16000  # what both scorers take


@dataclass
class EvalConfig:
    models: list[str]                 # adapter dirs or checkpoints, each optionally "label=path"
    out_dir: str
    base_ckpt: str | None = None
    shards: str | None = None
    prompts: str | None = None
    val_fraction: float = 0.05
    max_utterances: int | None = None
    codec: str = DEFAULT_CODEC_REPO
    asr_model: str = DEFAULT_ASR
    sv_model: str = DEFAULT_SV
    language: str = "en"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(seed=0))
    max_new_frames: int = 1024
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    progress: bool = True


@dataclass
class Clip:
    wave_16k: np.ndarray
    codes: torch.Tensor
    stop_reason: str
    rtf: float


def model_specs(cfg: EvalConfig) -> list[tuple[str, str | None, str | None]]:
    """(label, base_ckpt, adapter) per --model; a directory with adapter_config.json is an adapter."""
    out, labels = [], set()
    for spec in cfg.models:
        label, _, path = spec.rpartition("=")
        label = label or Path(path.rstrip("/")).name or path
        if "/" in label or "\\" in label or label.startswith("."):
            raise EvalError(f"--model {spec}: the label {label!r} must be a plain name (it names a folder)")
        if label in labels:
            raise EvalError(f"--model {spec}: the label {label!r} is used twice (name them: --model LABEL=PATH)")
        labels.add(label)
        is_adapter = (Path(path) / "adapter_config.json").is_file()
        out.append((label, cfg.base_ckpt if is_adapter else path, str(adapter_dir(path)) if is_adapter else None))
    if not out:
        raise EvalError("no model to evaluate: pass --model (a checkpoint or an adapter dir), once per model")
    return out


def to_16k(wave: torch.Tensor, sample_rate: int) -> np.ndarray:
    w = np.asarray(wave.float().cpu(), dtype=np.float32).reshape(-1)
    return resample(w, sample_rate, SR) if w.size else w


def generate_clips(engine: Engine, codec, items: list[EvalItem], cfg: EvalConfig, label: str) -> list[Clip]:
    """The clips of one model, in item order; each is also written to out_dir/<label>/<name>.wav (codec rate)."""
    from tqdm import tqdm

    base_seed = cfg.sampling.seed or 0
    requests = [Request(it.prompt, replace(cfg.sampling, seed=it.seed if it.seed is not None else base_seed + k),
                        cfg.max_new_frames) for k, it in enumerate(items)]
    clips: list[Clip] = []
    (Path(cfg.out_dir) / label).mkdir(parents=True, exist_ok=True)
    for s in tqdm(range(0, len(requests), cfg.batch_size), desc=f"generate {label}", unit="batch",
                  disable=not cfg.progress, leave=False, dynamic_ncols=True):
        t0 = time.perf_counter()
        gens = engine.generate(requests[s:s + cfg.batch_size])
        codes = [g.codes() for g in gens]
        waves = [codec.decode(c) if c.numel() else torch.zeros(0) for c in codes]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = sum(c.shape[1] if c.numel() else 0 for c in codes) / CODE_FRAMES_PER_SECOND
        rtf = (time.perf_counter() - t0) / seconds if seconds else float("inf")
        for it, w, c, g in zip(items[s:s + cfg.batch_size], waves, codes, gens):
            atomic_write_bytes(Path(cfg.out_dir) / label / f"{it.name}.wav", wav_bytes(w, codec.sample_rate))
            clips.append(Clip(to_16k(w, codec.sample_rate), c, g.stop_reason, rtf))
    return clips


def score_model(label: str, items: list[EvalItem], clips: list[Clip], texts: list[str], sv: SpeakerScorer,
                refs: list[torch.Tensor], truths: list) -> list[dict]:
    """One row per clip: `texts` are its transcripts, `refs` the reference embeddings, `truths` per item
    {seconds, sim} of the ground truth (or None)."""
    rows = []
    for it, clip, hyp, ref_emb, truth in zip(items, clips, texts, refs, truths):
        w, c = word_errors(it.text, hyp), char_errors(it.text, hyp)
        truth_s = truth["seconds"] if truth else None
        sig = cheap_signals(clip.wave_16k, SR, truth_seconds=truth_s, stop_reason=clip.stop_reason, codes=clip.codes)
        sim = float(torch.nn.functional.cosine_similarity(sv.embed(clip.wave_16k), ref_emb, dim=0)) \
            if clip.wave_16k.size else None
        rows.append({"model": label, "name": it.name, "reference": it.reference, "text": it.text, "transcript": hyp,
                     "wer": w.rate, "word_edits": w.edits, "ref_words": w.ref_len,
                     "cer": c.rate, "char_edits": c.edits, "ref_chars": c.ref_len,
                     "sim": sim, "sim_truth": truth["sim"] if truth else None, "rtf": clip.rtf,
                     **sig.as_dict(), "flags": flags(sig)})
    return rows


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Run the command; returns the summary (per model). Raises UserError for bad input."""
    if not cfg.shards and not cfg.prompts:
        raise EvalError("give the prompt set: --shards DIR (its validation split) or --prompts FILE.jsonl")
    if cfg.max_new_frames < 1 or cfg.batch_size < 1:
        raise EvalError("--max_new_frames and --batch_size must be >= 1")
    try:
        cfg.sampling.validate()
    except ValueError as e:
        raise EvalError(str(e)) from None
    specs = model_specs(cfg)
    out = Path(cfg.out_dir)
    device = default_device(cfg.device)
    dtype = default_dtype(cfg.dtype, device)
    codec = load_codec(cfg.codec, device, encode=False)
    items, clips = None, {}
    for label, base, adapter in specs:
        model = load_generation_model(base, adapter, device=device, dtype=dtype)
        tok = load_tokenizer(model)
        if items is None:  # the prompts are built once, with the first model's tokenizer
            items = (jsonl_items(cfg.prompts, tok, model.config, cfg.codec, device, cfg.shards) if cfg.prompts
                     else shard_items(cfg.shards, tok, model.config, cfg.val_fraction, log))
            items = items[:cfg.max_utterances] if cfg.max_utterances else items
        clips[label] = generate_clips(Engine(model, stop_tokens=stop_token_ids(tok)), codec, items, cfg, label)
        del model
    asr = Transcriber(cfg.asr_model, device=device, dtype=dtype, language=cfg.language)
    sv = SpeakerScorer(cfg.sv_model, device=device, dtype=torch.float32)
    refs = [sv.embed(to_16k(codec.decode(it.ref_codes.to(device)), codec.sample_rate)) for it in items]
    truths = []
    for it, ref in zip(items, refs):
        wave = it.truth_wave_16k if it.truth_wave_16k is not None else (
            to_16k(codec.decode(it.truth_codes.to(device)), codec.sample_rate) if it.truth_codes is not None else None)
        truths.append(None if wave is None else {"seconds": len(wave) / SR, "sim": float(
            torch.nn.functional.cosine_similarity(sv.embed(wave), ref, dim=0))})
    rows = []
    for label in clips:
        texts = asr.transcribe([c.wave_16k for c in clips[label]], batch_size=cfg.batch_size)
        rows += score_model(label, items, clips[label], texts, sv, refs, truths)
    summary = summarize(rows, [s[0] for s in specs])
    write_reports(out, rows, summary, log)
    return summary
