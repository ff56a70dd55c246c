"""Hearing progress while training: audio samples generated from the current weights at chosen steps.

    train.py ... --sample_steps N          # every N optimizer steps, step 0 and the last step (0: off);
                                           # default: with every validation
    train.py ... --sample_prompts p.jsonl  # what to say (the generate command's JSONL format); default: a few
                                           # validation samples (one per speaker first), each with its own
                                           # speaker's reference when it has none

Rank 0 writes `output_dir/samples/step-N/<name>.wav` + `<name>.npy` (the directory appears complete, by one
rename) and a metrics.jsonl record `{"event": "samples", "step": N, "dir": ..., "files": [...]}`, then the clips'
scores (`scoring.py`: the cheap signals always, WER/CER/SIM at `--eval_steps`; samples are also generated at those
steps). The other ranks do not wait for it at any barrier: they go on to the next step and meet rank 0 at its
first collective.

Cost: decoding runs one forward per audio frame. A default sample (a validation sample) decodes at most twice its
own recorded length (plus the codebook delay), never more than `--sample_max_frames`; on CPU one sample is
written instead of DEFAULT_COUNT. A stop request (SIGTERM, Ctrl-C) skips samples or abandons the ones being
written: the checkpoint comes first.

The training streams are untouched: decoding uses its own seeded `torch.Generator`, the model runs in eval
mode (no dropout draws) and every RNG state (python, numpy, torch, CUDA) is saved before and restored after,
so a run with samples and a resumed run stay bitwise identical to one without.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from ..constants import CODE_FRAMES_PER_SECOND, DEFAULT_CODEC_REPO
from ..text.chatml import DEFAULT_SCENE
from ..data.dataset import ShardDataset
from ..errors import UserError
from ..fsio import atomic_dir, atomic_write_bytes
from ..generate.engine import Engine, Request
from ..generate.loading import STOP_TOKEN_NAMES
from ..generate.output import npy_bytes, wav_bytes
from ..generate.prompt import Prompt, prompt_from_sample, reference_from_sample, tts_prompt
from ..generate.sampling import SamplingConfig
from ..generate.speak import Item, References, read_prompts
from ..model.checkpoint import resolve_checkpoint
from ..text.tokenizer import TextTokenizer
from ..wrappers import unwrap
from .checkpointing import rng_state, set_rng_state
from .distributed import DistEnv, is_fsdp
from .scoring import SampleScorer
from .signals import StopRequest

DEFAULT_COUNT = 4  # validation samples used when no --sample_prompts is given (on CUDA)
DEFAULT_COUNT_CPU = 1  # ... on CPU, where each costs seconds to minutes
LENGTH_FACTOR = 2  # a default sample decodes at most this many times its recorded audio length


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "sample"


class TrainingSamples:
    """Decides when samples are due and writes them (rank 0). Build on every rank; call `maybe_write` on every
    rank at the same points (the decision is the same everywhere; only rank 0 works)."""

    def __init__(self, cfg, ds: ShardDataset, train_idx: list[int], val_idx: list[int], env: DistEnv, log, say,
                 stop: StopRequest):
        self.cfg, self.ds, self.train_idx, self.val_idx, self.env = cfg, ds, train_idx, val_idx, env
        self.log, self.say, self.stop = log, say, stop
        self.every = cfg.sample_steps  # None: with every validation; 0: off
        self.out = Path(cfg.output_dir) / "samples"
        self.last_step: int | None = None
        self.scorer = SampleScorer(cfg, env.device)
        self.enabled = (self.every != 0 or bool(self.scorer.every)) and \
            (cfg.sample_prompts is not None or len(val_idx) > 0)
        # Decided once, the same on every rank (not changed when rank 0 turns samples off): the ranks' calls to
        # the scores' collective (recipe.write_samples) must match.
        self.scoring_on = self.enabled and bool(self.scorer.every)
        self.record: dict | None = None  # the eval record (scoring.py) of the last samples written, if any
        # The prompts file is parsed on every rank at setup: a bad file stops the run before training starts.
        self.items: list[Item] | None = \
            read_prompts(cfg.sample_prompts, self.out, DEFAULT_SCENE) if cfg.sample_prompts else None
        self._ready = False
        self._prompts: list[Prompt] = []
        self._frames: list[int] = []  # each prompt's decoding budget
        self._texts: list[str] = []  # what each prompt should say (WER/CER reference)
        self._refs: list[torch.Tensor | None] = []  # each prompt's voice-reference codes (SIM), if it has one
        self._truth_s: list[float | None] = []  # each prompt's ground-truth duration (duration ratio), if known
        self._codec = None
        self.tok = None
        self.stop_tokens: tuple[int, ...] = ()

    def load_scorers(self) -> None:
        """Rank 0 loads the --eval_steps scorers at setup, so that a wrong --eval_asr / --eval_sim stops the run
        before training. (Building a model draws from the global RNG; that is harmless here: the recipe's
        `restore` sets every stream after setup, from the seed or from the checkpoint.)"""
        if self.env.is_main and self.scoring_on:
            self.scorer.load()

    # ---- when ---------------------------------------------------------------------------------------------------
    def due(self, step: int, validated: bool = False, final: bool = False) -> bool:
        if not self.enabled or step == self.last_step:
            return False
        if self.scoring_due(step, final):
            return True
        if self.every is None:
            return validated
        return self.every != 0 and (step % self.every == 0 or final)

    def scoring_due(self, step: int, final: bool = False) -> bool:
        """Whether the samples of `step` are to be scored with WER/CER/SIM (the same answer on every rank)."""
        return self.scoring_on and step != self.last_step and self.scorer.due(step, final)

    def maybe_write(self, train_model: torch.nn.Module, step: int, validated: bool = False,
                    final: bool = False) -> None:
        if not self.due(step, validated, final):
            return
        self.last_step = step
        self.record = None
        if not self.env.is_main or self.stop.signal is not None:  # (a stop request: the checkpoint comes first)
            return
        if is_fsdp(train_model):
            self._disable("samples need the whole model on rank 0; not available with --fsdp")
            return
        states = rng_state(self.env.device)
        model = unwrap(train_model)
        was_training = model.training
        written = False
        try:
            with self.stop.abandonable():
                self._write(model, step, scored=self.scorer.due(step, final))
                written = True
        except Exception as e:  # a bad reference, a missing tokenizer, OOM: say so, never fail the run for samples
            self._disable(f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e))
        finally:
            model.train(was_training)
            set_rng_state(states, self.env.device)
        if not written and self.stop.signal is not None:
            self.log.log({"event": "samples_abandoned", "step": step, "signal": self.stop.signal})
            self.say(f"step {step}: samples abandoned ({self.stop.signal}: the checkpoint comes first)")

    def _disable(self, why: str) -> None:
        self.enabled = False
        self.log.log({"event": "samples_off", "reason": why})
        self.say(f"samples: off ({why})")

    # ---- what ---------------------------------------------------------------------------------------------------
    def _setup(self, model) -> None:
        cfg = model.config
        ckpt = resolve_checkpoint(self.cfg.base_ckpt)
        if not (ckpt / "tokenizer.json").is_file():
            raise UserError(f"{ckpt}: no tokenizer.json (samples need the text tokenizer)")
        self.tok = TextTokenizer.from_dir(ckpt)
        self.stop_tokens = tuple(self.tok.token_id(n) for n in STOP_TOKEN_NAMES)
        codec = self.cfg.sample_codec or self.ds.index.get("codec") or DEFAULT_CODEC_REPO
        refs = References(self.tok, cfg, str(codec), self.env.device, str(self.ds.path))
        if self.items is not None:
            voices = [refs.resolve(it) for it in self.items]
            self._prompts = [tts_prompt(self.tok, it.text, scene=it.scene, reference=v, name=it.name)
                             for it, v in zip(self.items, voices)]
            self._frames = [self.cfg.sample_max_frames] * len(self._prompts)
            self._texts = [it.text for it in self.items]
            self._refs = [None if v is None else v[1] for v in voices]
            self._truth_s = [None] * len(self._prompts)
        else:
            self._default_prompts(cfg)
        try:
            self._codec = refs.decoder()
        except UserError as e:
            self._codec = None
            self.say(f"samples: no audio tokenizer ({e}); writing codes (.npy) only, not scored")
        self._ready = True

    def _default_prompts(self, cfg) -> None:
        """Up to DEFAULT_COUNT validation samples (DEFAULT_COUNT_CPU on CPU), one per speaker first, their
        decoding budgets (LENGTH_FACTOR x the sample's own audio, + the codebook delay, at most
        --sample_max_frames), texts, references and recorded durations; a sample without a reference of its own
        gets another utterance of its speaker (from the training split when there is one) as the reference."""
        ds = self.ds
        count = DEFAULT_COUNT if self.env.device.type == "cuda" else DEFAULT_COUNT_CPU
        by_speaker: dict = {}
        for i in self.val_idx:
            by_speaker.setdefault(ds.speakers[i], []).append(i)
        order = [lst[0] for _, lst in sorted(by_speaker.items(), key=lambda kv: str(kv[0]))]
        rest = [i for i in self.val_idx if i not in order]
        prompts, frames = self._prompts, self._frames
        for i in (order + rest):
            if len(prompts) == count:
                break
            s = ds[i]
            if cfg.audio_in_token_id in s.input_ids.tolist():
                continue  # (generation prompts carry no audio-in)
            own_ref = s.input_ids.tolist().count(cfg.audio_out_token_id) > 1
            ref = None
            spk = ds.speakers[i]
            if not own_ref and spk is not None:
                pool = [j for j in self.train_idx if ds.speakers[j] == spk] or \
                    [j for j in range(len(ds)) if ds.speakers[j] == spk and j != i]
                if pool:
                    ref = reference_from_sample(ds[pool[0]], self.tok, cfg)
            prompts.append(prompt_from_sample(s, self.tok, cfg, reference=ref, name=_safe(ds.sample_ids[i])))
            own = int(s.audio_codes[-1].shape[-1]) if s.audio_codes else self.cfg.sample_max_frames
            frames.append(min(self.cfg.sample_max_frames, LENGTH_FACTOR * own + cfg.audio_num_codebooks))
            self._texts.append(self.tok.decode(reference_from_sample(s, self.tok, cfg)[0]))
            # (own reference: the sample's first audio-out segment; no audio-in here, so audio_codes[0])
            self._refs.append(ref[1] if ref is not None else
                              s.audio_codes[0][:cfg.audio_num_codebooks].long() if own_ref else None)
            self._truth_s.append(own / CODE_FRAMES_PER_SECOND if s.audio_codes else None)

    @torch.no_grad()
    def _write(self, model, step: int, scored: bool) -> None:
        t0 = time.perf_counter()
        if not self._ready:
            self._setup(model)
        seed = self.cfg.seed
        sampling = SamplingConfig(temperature=0.7, top_p=0.95, ras_win_len=7, ras_win_max_num_repeat=2, seed=seed)
        reqs = [Request(p, sampling, n) for p, n in zip(self._prompts, self._frames)]
        gens = Engine(model, stop_tokens=self.stop_tokens, cuda_graphs=False).generate(reqs)
        final = self.out / f"step-{step:08d}"
        k = model.config.audio_num_codebooks
        codes = [c if c.numel() else torch.zeros(k, 0, dtype=torch.long) for c in (g.codes() for g in gens)]
        files, waves = [], []
        with atomic_dir(final, replace=True) as tmp:
            for p, gen, c in zip(self._prompts, gens, codes):
                atomic_write_bytes(tmp / f"{p.name}.npy", npy_bytes(c.numpy()))
                if self._codec is not None:
                    waves.append(self._codec.decode(c) if c.shape[1] else torch.zeros(0))
                    atomic_write_bytes(tmp / f"{p.name}.wav", wav_bytes(waves[-1], self._codec.sample_rate))
                files.append({"name": p.name, "frames": int(c.shape[1]), "stop": gen.stop_reason})
        seconds = round(time.perf_counter() - t0, 2)
        self.log.log({"event": "samples", "step": step, "dir": str(final), "files": files, "seconds": seconds,
                      "audio": self._codec is not None})
        if self._codec is not None:  # (the signals need the waveform)
            self.record = self.scorer.record(step, [p.name for p in self._prompts], self._texts, waves, codes,
                                             [g.stop_reason for g in gens], self._truth_s, self._refs, self._codec,
                                             seconds, scored)
            self.log.log(self.record)
        scores = "" if self.record is None else "; " + ", ".join(
            f"{k} {self.record[k]:.2f}" for k in ("wer", "sim", "silence", "flagged") if k in self.record)
        self.say(f"step {step}: {len(files)} samples -> {final} ({seconds:.1f} s{scores})")

