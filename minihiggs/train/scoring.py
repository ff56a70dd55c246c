"""Scoring the audio samples written while training: is the voice silent, endless, intelligible, still the speaker's?

    train.py ...                              # cheap signals on every sample (no extra model)
    train.py ... --eval_steps N               # + WER/CER (Whisper, --eval_asr) and SIM (WavLM, --eval_sim) every
                                              #   N steps, at step 0 and the last step
    train.py ... --eval_steps N --best_metric wer|sim   # best/ and early stopping by that score

The clips are the ones `samples.py` generates (same prompts, same seeds at every step: the curves compare the
weights, not the draws). Whenever samples are decoded to audio, each clip gets the cheap signals of
`minihiggs.eval.signals` (silence ratios, duration ratio to its ground truth, stop reason, repeated-frame ratio)
and their flags; at an `--eval_steps` step the clips are also transcribed and embedded. Rank 0 logs one record
`{"split": "eval", "step": N, "silence": ..., "eos": ..., "flagged": ..., "wer": ..., "sim": ...}` (every sink:
metrics.jsonl, TensorBoard `eval/...`, W&B), aggregated as `python -m minihiggs.eval` aggregates a model's row
(`minihiggs.eval.report.summarize`), with each clip's flags under `"flags"`.

The scorers load once, on rank 0, when the run starts (a wrong path is an error before training, not an hour
into it) and stay resident (Whisper large-v3 in bf16: about 3 GB of GPU memory). Scoring runs inside the samples'
section: the RNG streams are saved before and restored after it, the models run in eval mode, and a stop request
abandons it like the samples (the checkpoint comes first).
"""

from __future__ import annotations

import numpy as np
import torch

from ..constants import CODE_FRAMES_PER_SECOND
from ..eval.report import summarize
from ..eval.run import SR, to_16k
from ..eval.signals import cheap_signals, flags
from ..eval.speaker import cosine
from ..eval.wer import char_errors, word_errors

LOGGED = ("wer", "cer", "sim", "duration_ratio", "silence", "eos", "repeated", "flagged")  # summarize()'s keys
HIGHER_IS_BETTER = {"loss": False, "wer": False, "sim": True}  # the --best_metric choices


class SampleScorer:
    """Build on every rank; `load` on rank 0. `record` turns one step's clips into the logged record."""

    def __init__(self, cfg, device: torch.device):
        self.every = cfg.eval_steps or 0
        self.cfg, self.device = cfg, device
        self.asr = self.sv = None
        self._ref_embeddings: list[torch.Tensor | None] | None = None  # per prompt, computed at the first scoring

    def due(self, step: int, final: bool = False) -> bool:
        return bool(self.every) and (step % self.every == 0 or final)

    def load(self) -> None:
        from ..eval.asr import Transcriber
        from ..eval.speaker import SpeakerScorer

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.asr = Transcriber(self.cfg.eval_asr, device=self.device, dtype=dtype)
        self.sv = SpeakerScorer(self.cfg.eval_sim, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def record(self, step: int, names: list[str], texts: list[str], waves: list[torch.Tensor],
               codes: list[torch.Tensor], stops: list[str | None], truth_seconds: list[float | None],
               refs: list[torch.Tensor | None], codec, seconds: float, scored: bool) -> dict:
        """The step's eval record. `waves` at the codec's rate, `refs` each prompt's voice-reference codes (None:
        no SIM for it), `truth_seconds` the ground truth's duration (None: no duration ratio), `seconds` the time
        generation and decoding took (for the real-time factor)."""
        waves_16k = [to_16k(w, codec.sample_rate) for w in waves]
        hyps = self.asr.transcribe(waves_16k) if scored else [None] * len(waves)
        sims = self._sims(waves_16k, refs, codec) if scored else [None] * len(waves)
        audio_s = sum(c.shape[-1] for c in codes) / CODE_FRAMES_PER_SECOND
        rows = []
        for name, text, w, c, stop, truth_s, hyp, sim in zip(names, texts, waves_16k, codes, stops, truth_seconds,
                                                             hyps, sims):
            sig = cheap_signals(w, SR, truth_seconds=truth_s, stop_reason=stop, codes=c)
            we, ce = (word_errors(text, hyp), char_errors(text, hyp)) if hyp is not None else (None, None)
            rows.append({"model": "samples", "name": name, "transcript": hyp, "sim": sim, "sim_truth": None,
                         "word_edits": we.edits if we else 0, "ref_words": we.ref_len if we else 0,
                         "char_edits": ce.edits if ce else 0, "ref_chars": ce.ref_len if ce else 0,
                         "rtf": seconds / audio_s if audio_s else None, **sig.as_dict(), "flags": flags(sig)})
        agg = summarize(rows, ["samples"])["samples"]
        rec = {"split": "eval", "step": step, **{k: agg[k] for k in LOGGED if agg[k] is not None},
               "flags": {r["name"]: r["flags"] for r in rows}}
        if scored:
            rec["transcripts"] = {r["name"]: r["transcript"] for r in rows}
        return rec

    def _sims(self, waves_16k: list[np.ndarray], refs: list[torch.Tensor | None], codec) -> list[float | None]:
        if self._ref_embeddings is None:  # the references are the same at every step: embedded once
            self._ref_embeddings = [None if r is None else self.sv.embed(to_16k(codec.decode(r.to(self.device)),
                                                                                codec.sample_rate))
                                    for r in refs]
        return [None if e is None or not w.size else cosine(self.sv.embed(w), e)
                for w, e in zip(waves_16k, self._ref_embeddings)]
