"""`TrainConfig`: every setting of a training run, with its command-line flag, default and help in one place.

`train.py` builds its flags from these fields (`minihiggs.cli`), so a flag is declared once; the
validation of combinations lives in `TrainConfig.validate` (a `TrainConfigError`, never `SystemExit`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..cli import flag as _flag, parse_flags
from ..constants import DEFAULT_BASE_REPO
from ..errors import TrainConfigError
from ..eval.asr import DEFAULT_ASR
from ..eval.speaker import DEFAULT_SV
from ..lora.apply import DEFAULT_TARGETS
from ..metrics.logger import parse_report_to
from .schedule import SCHEDULES

DTYPES = ("bf16", "bfloat16", "fp32", "float32")


@dataclass
class TrainConfig:
    # -- data and output
    shards: str = _flag(None, "the directory of shards prep.py wrote (its --out), not a manifest file",
                        "data and output", required=True, aliases=("--train_manifest",), metavar="DIR")
    output_dir: str = _flag(None, "run directory (metrics, checkpoints, adapters)", "data and output", required=True)
    base_ckpt: str = _flag(DEFAULT_BASE_REPO, "base checkpoint directory or Hub repo id", "data and output")
    val_fraction: float = _flag(0.05, "validation share, chosen by a stable hash of each sample id (same for every "
                                      "run and world size); 0 disables validation", "data and output")
    num_workers: int | None = _flag(None, "DataLoader workers (default: 2 on CUDA, 0 on CPU)", "data and output")
    # -- optimisation
    batch_size: int = _flag(4, "samples per micro-batch per device", "optimisation")
    max_tokens_per_batch: int | None = _flag(None, "pack samples into one row of at most N merged tokens per "
                                                   "micro-batch instead of --batch_size padded samples",
                                             "optimisation")
    grad_accum: int = _flag(1, "micro-batches per optimizer step", "optimisation")
    epochs: int = _flag(3, "passes over the training split", "optimisation")
    max_steps: int | None = _flag(None, "optimizer steps; overrides --epochs", "optimisation")
    lr: float = _flag(2e-4, "peak learning rate", "optimisation")
    lr_schedule: str = _flag("cosine", "shape after the warmup", "optimisation", choices=SCHEDULES)
    warmup: float = _flag(0.05, "warmup: optimizer steps if >= 1, else a fraction of the run", "optimisation")
    wd: float = _flag(0.0, "AdamW weight decay", "optimisation")
    grad_clip: float = _flag(1.0, "max gradient L2 norm (0: no clipping)", "optimisation")
    seed: int = _flag(0, "seed of LoRA init, dropout and data order", "optimisation")
    # -- LoRA
    lora_r: int = _flag(16, "LoRA rank", "LoRA")
    lora_alpha: float = _flag(32.0, "LoRA alpha (scaling alpha / r)", "LoRA")
    lora_dropout: float = _flag(0.05, "dropout on the LoRA input", "LoRA")
    lora_targets: list[str] | None = _flag(None, "module patterns (names, globs or regexes; comma- or space-separated);"
                                                 f" default {','.join(DEFAULT_TARGETS)}", "LoRA", nargs="+")
    # -- logging, checkpoints, runtime
    log_steps: int = _flag(10, "log train metrics every N steps", "logging, checkpoints, runtime")
    val_steps: int = _flag(100, "validate every N steps (0: only at the end)", "logging, checkpoints, runtime")
    save_steps: int = _flag(1000, "checkpoint every N steps (0: only at the end)", "logging, checkpoints, runtime")
    keep_checkpoints: int = _flag(3, "newest checkpoints kept (0: keep all)", "logging, checkpoints, runtime")
    resume: str | None = _flag(None, "a checkpoint dir, or 'latest' (newest in --output_dir; a fresh start if none)",
                               "logging, checkpoints, runtime", metavar="DIR|latest")
    early_stopping_patience: int | None = _flag(None, "stop after this many validations (with --best_metric wer|sim:"
                                                      " scorings) without a new best",
                                                "logging, checkpoints, runtime")
    dtype: str | None = _flag(None, "base model dtype (default bf16 on GPU, fp32 on CPU); LoRA weights are always "
                                    "fp32", "logging, checkpoints, runtime", choices=sorted(DTYPES))
    quantize: str | None = _flag(None, "store the frozen decoder linears in 4-bit NormalFloat (nf4, QLoRA) or 8-bit "
                                       "(int8), dequantized per matmul in --dtype (README: Small GPUs)",
                                 "logging, checkpoints, runtime", choices=["nf4", "int8"])
    fsdp: bool = _flag(False, "shard the frozen base with FSDP2 (torchrun)", "logging, checkpoints, runtime")
    compile: bool | None = _flag(None, "torch.compile each decoder layer (default: on for CUDA, off on CPU)",
                                 "logging, checkpoints, runtime", action=argparse.BooleanOptionalAction)
    report_to: str = _flag("jsonl", "metric sinks, comma-separated: jsonl (metrics.jsonl, always on), tensorboard "
                                    "(OUTPUT_DIR/tensorboard), wandb (needs the wandb package)",
                           "logging, checkpoints, runtime", metavar="jsonl,tensorboard,wandb")
    activation_checkpointing: bool = _flag(False, "recompute decoder layers (and Whisper tower layers) in backward "
                                                  "(long sequences on small GPUs)", "logging, checkpoints, runtime")
    # -- audio samples while training (minihiggs/train/samples.py)
    sample_steps: int | None = _flag(None, "write audio samples every N steps, at step 0 and at the end (0: off; "
                                           "default: with every validation)", "samples")
    sample_prompts: str | None = _flag(None, "what the samples say: a JSONL in the generate command's format "
                                             "(default: 4 validation samples on CUDA, 1 on CPU, each with its "
                                             "speaker's reference)",
                                       "samples")
    sample_codec: str | None = _flag(None, "audio tokenizer that decodes the samples (default: the one prep used, "
                                           "from the shards' index)", "samples")
    sample_max_frames: int = _flag(500, "decoding iterations per sample at most (25 per second of audio); a default "
                                        "sample also stops at twice its own recorded length", "samples")
    # -- scoring those samples (minihiggs/train/scoring.py; the cheap signals need no flag)
    eval_steps: int = _flag(0, "score the samples with WER/CER and SIM every N steps, at step 0 and the last step "
                               "(samples are generated then too; 0: off)", "scoring the samples")
    eval_asr: str = _flag(DEFAULT_ASR, "Whisper ASR for WER/CER: directory or Hub id (128-mel: large-v3 or -turbo)",
                          "scoring the samples")
    eval_sim: str = _flag(DEFAULT_SV, "speaker-verification model for SIM (WavLMForXVector): directory or Hub id",
                          "scoring the samples")
    best_metric: str = _flag("loss", "what chooses best/ and drives early stopping: validation loss, or the "
                                     "samples' WER or SIM (needs --eval_steps)", "scoring the samples",
                             choices=("loss", "wer", "sim"))

    def validate(self) -> "TrainConfig":
        if self.lora_targets is not None:
            self.lora_targets = [t for item in self.lora_targets for t in item.split(",") if t]
        for name in ("batch_size", "grad_accum", "epochs", "lora_r"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"--{name} must be >= 1")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 8:
            raise TrainConfigError("--max_tokens_per_batch must be >= 8")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainConfigError("--max_steps must be >= 1")
        if self.sample_steps is not None and self.sample_steps < 0 or self.sample_max_frames < 1:
            raise TrainConfigError("--sample_steps must be >= 0 and --sample_max_frames >= 1")
        if self.eval_steps < 0:
            raise TrainConfigError("--eval_steps must be >= 0")
        if self.best_metric != "loss" and not self.eval_steps:
            raise TrainConfigError(f"--best_metric {self.best_metric} needs --eval_steps N (the samples are scored "
                                   f"then)")
        if self.best_metric != "loss" and self.fsdp:
            raise TrainConfigError(f"--best_metric {self.best_metric}: samples (and so their scores) are not "
                                   f"available with --fsdp; use --best_metric loss")
        if self.log_steps < 1 or self.val_steps < 0 or self.save_steps < 0 or self.keep_checkpoints < 0:
            raise TrainConfigError("--log_steps must be >= 1; --val_steps, --save_steps and --keep_checkpoints >= 0")
        if not 0.0 <= self.lr < 1e30:  # (beyond float32's range, AdamW's step size raises mid-run)
            raise TrainConfigError(f"--lr {self.lr:g}: must be >= 0 and below 1e30")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainConfigError("--val_fraction must be in [0, 1)")
        self.report_to = ",".join(parse_report_to(self.report_to))
        return self


def parse_train_args(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    """Flags -> a validated TrainConfig. Malformed flags exit through argparse (code 2, usage line)."""
    return parse_flags(TrainConfig, argv, prog="train.py", description=description).validate()
