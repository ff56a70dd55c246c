"""The LoRA fine-tuning recipe: setup steps, then one training loop (what `train.py` runs).

    recipe = LoRARecipe(cfg, env, argv)
    recipe.setup()      # output dir + resume point, data, model + LoRA + wrapper, optimizer, restored state
    recipe.train()      # the loop; returns the exit code

One optimizer step = `--grad_accum` micro-batches of `--batch_size` samples (or, with `--max_tokens_per_batch`, of one
packed row of samples filling that token budget) on every rank. The step's loss is
normalised by the step's *global* target counts (all micro-batches, all ranks), so the update equals that of one
batch holding all of them, whatever the split across micro-batches and devices
(`step.forward_backward`).

Everything a resume needs is in `self.state` (a `TrainState`: the step, the data position as epoch + micro-batches
consumed, the best-validation bookkeeping) plus the optimizer, the scheduler's step count and every rank's RNG
streams, all written by `checkpointing.save_checkpoint` and read back in `restore`. The sampler keeps no state of
its own: it is positioned from `state` at every epoch start (`set_epoch`, `skip`).
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import ShardDataset
from ..errors import ResumeError, TrainConfigError
from ..lora.apply import apply_lora
from ..metrics.logger import make_logger
from ..model.checkpoint import load_model
from ..model.loss import LossSums
from . import checkpointing as ckpt_io
from .config import TrainConfig
from .data import LoaderBatches, check_dataset, train_loader, train_sampler, validation_set
from .distributed import DistEnv, all_reduce_max, all_reduce_sum, is_fsdp, wrap_model
from .guard import UpdateGuard
from ..hub import resolved_revision
from .preflight import check_output_dir, check_shards_dir, read_model_config
from .schedule import build_scheduler, load_scheduler_state, warmup_steps
from .signals import StopRequest
from .samples import TrainingSamples
from .scoring import HIGHER_IS_BETTER
from .state import TrainState
from .step import evaluate, forward_backward, loss_fields

MAX_NONFINITE_IN_A_ROW = 5
BROKEN_UPDATE = "update (finite loss and gradients, but the new LoRA weights were non-finite or too large: lower --lr)"
TORCH_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


@dataclass
class StepOutcome:
    """One optimizer step as every rank sees it (all-reduced)."""

    sums: torch.Tensor  # LossSums.as_vector() of the step's micro-batches, all ranks
    tokens: int  # non-padding positions, all ranks
    stop_requested: bool  # a rank was signalled
    loss: float
    grad_norm: float
    lr: float  # the LR this update used
    accepted: bool  # finite loss, gradient norm and new weights (else the update was undone)


class LogWindow:
    """The loss sums and throughput of the current `--log_steps` window (accepted steps' sums only)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: torch.Tensor | None = None
        self.tokens_seen, self.t0 = 0, time.perf_counter()

    def add(self, sums: torch.Tensor) -> None:
        self.sums = sums if self.sums is None else self.sums + sums

    def tokens_per_s(self) -> float:
        return self.tokens_seen / max(time.perf_counter() - self.t0, 1e-9)


class LoRARecipe:
    def __init__(self, cfg: TrainConfig, env: DistEnv, argv: list[str], stop: StopRequest | None = None):
        self.cfg, self.env = cfg, env
        # The stop-signal handler; `minihiggs.train.train` installs it before setup (see signals.py for the rule).
        self.stop = stop if stop is not None else StopRequest()
        self.device = env.device
        self.out = Path(cfg.output_dir)
        self.base = str(Path(cfg.base_ckpt).resolve()) if Path(cfg.base_ckpt).is_dir() else cfg.base_ckpt
        self.record = {"argv": argv, "command": shlex.join(["train.py", *argv]), "args": vars(cfg),
                       "world_size": env.world_size, "torch": torch.__version__}
        self.state = TrainState(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed)
        self.pbar = None  # the progress bar while the loop runs; messages go through it so they do not tear it
        self.plot_note_shown = False
        self.nonfinite_run = 0  # rejected updates in a row
        # Filled by the setup steps, in this order (declared here: every attribute of a recipe in one place).
        # setup_output
        self.resume_from: Path | None = None  # the checkpoint resumed from
        self.saved: dict | None = None  # its trainer state
        self.resume_changes: list[str] = []  # the settings changed since it ("--lr 0.001 -> 0.0005")
        self.log = None  # the metric logger (metrics.jsonl and the --report_to sinks)
        # setup_data
        self.ds: ShardDataset | None = None
        self.train_idx: list[int] = []
        self.val_idx: list[int] = []
        self.sampler = None  # this rank's resumable batch sampler (positioned from `state` at every epoch start)
        self.n_batches = 0  # this rank's micro-batches per epoch
        self.steps_per_epoch = 0
        self.warmup = 0  # warmup steps
        self.samples: TrainingSamples | None = None
        # setup_model
        self.dtype = torch.float32  # the base model's
        self.use_compile = False
        self.lora_report = None
        self.model = None  # the unwrapped model
        self.train_model = None  # what the forward goes through: the model, DDP(model) or the FSDP2-sharded model
        self.loader = None  # the training DataLoader
        self.val_set: list = []  # this rank's collated validation batches
        # setup_optimizer
        self.params: list[torch.nn.Parameter] = []  # the trainable (LoRA) parameters
        self.optimizer: torch.optim.Optimizer | None = None
        self.guard: UpdateGuard | None = None
        self.scheduler = None
        # restore
        self.last_saved = -1  # the step of the newest checkpoint of this run (-1: none)
        self.last_val = -1  # the step of the last validation (-1: none)
        self.judged_at = -1  # the step of the last value of --best_metric (-1: none)

    # ---- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.setup_output()
        self.setup_data()
        self.setup_model()
        self.setup_optimizer()
        self.restore()

    def setup_output(self) -> None:
        """The resume point (--resume), stale temporaries of a killed run, and the metric logger."""
        cfg, env = self.cfg, self.env
        check_shards_dir(Path(cfg.shards), self.out)
        check_output_dir(self.out)
        self.resume_from = ckpt_io.resolve_resume(cfg.resume, self.out)
        if self.resume_from is None and ckpt_io.list_checkpoints(self.out):
            raise ResumeError(f"{self.out} already holds checkpoints; pass --resume latest to continue, or another "
                              f"--output_dir")
        self.saved = ckpt_io.load_trainer_state(self.resume_from) if self.resume_from is not None else None
        if self.saved is not None:
            self.resume_changes = ckpt_io.check_resume_compatible(
                self.saved, ckpt_io.read_args_record(self.resume_from), cfg, env.world_size, self.resume_from)
        if env.is_main:
            ckpt_io.remove_stale_temporaries(self.out)
        self.log = make_logger(self.out, enabled=env.is_main, report_to=cfg.report_to, config=self.record["args"],
                               resume=self.saved is not None)

    def setup_data(self) -> None:
        """Shards, the stable train/val split, this rank's length-bucketed sampler and the validation batches."""
        cfg, env = self.cfg, self.env
        self.ds = ShardDataset(cfg.shards)
        self.train_idx, self.val_idx = self.ds.split(cfg.val_fraction)
        self.sampler = train_sampler(self.ds, self.train_idx, cfg.batch_size, cfg.max_tokens_per_batch, cfg.seed,
                                     env.rank, env.world_size)
        self.n_batches = len(self.sampler)  # this rank's micro-batches per epoch (equal on every rank)
        if self.n_batches == 0:
            unit = f"packed row of {cfg.max_tokens_per_batch} tokens" if cfg.max_tokens_per_batch else \
                f"batch of {cfg.batch_size}"
            raise TrainConfigError(f"{len(self.train_idx)} training samples give no {unit} for "
                                   f"{env.world_size} device(s)")
        self.steps_per_epoch = math.ceil(self.n_batches / cfg.grad_accum)
        self.state.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.warmup = warmup_steps(cfg.warmup, self.state.total_steps)
        self.samples = TrainingSamples(cfg, self.ds, self.train_idx, self.val_idx, env, self.log, self.say,
                                       self.stop)
        self.samples.load_scorers()  # (before the model: a wrong --eval_asr / --eval_sim is an error within seconds)

    def setup_model(self) -> None:
        """The base model (frozen), LoRA (fp32, identical on every rank), compile, and the DDP/FSDP2 wrapper."""
        cfg, env = self.cfg, self.env
        dtype = TORCH_DTYPES[cfg.dtype] if cfg.dtype else \
            (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.dtype = dtype
        self.use_compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        ckpt_dir, model_cfg = read_model_config(cfg.base_ckpt)
        # Which weights exactly: the resolved folder and, for a Hub checkpoint, the commit (train_args.json).
        self.record["base_dir"] = str(Path(ckpt_dir).resolve())
        self.record["base_revision"] = resolved_revision(ckpt_dir)
        check_dataset(self.ds, model_cfg)  # before the weights load: a mismatch is an error within seconds
        model = load_model(ckpt_dir, dtype=dtype, device=self.device, quantize=cfg.quantize)
        self.lora_report = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                      targets=cfg.lora_targets, seed=cfg.seed)
        if self.resume_from is not None:
            ckpt_io.load_adapter_weights(model, self.resume_from)
        model.train()
        model.set_activation_checkpointing(cfg.activation_checkpointing)
        if self.use_compile:
            model.compile_layers()  # the trunk; the fused loss head runs eagerly by design (see model/loss.py)
        self.model = model
        self.train_model = wrap_model(model, env, fsdp=cfg.fsdp)  # the forward goes through this wrapper
        num_workers = cfg.num_workers if cfg.num_workers is not None else (2 if self.device.type == "cuda" else 0)
        # Packed rows are padded to the budget under compile: one shape, one graph per layer kind.
        packed_length = cfg.max_tokens_per_batch if self.use_compile else None
        self.loader = train_loader(self.ds, self.sampler, model.config, num_workers,
                                   pin_memory=self.device.type == "cuda", packed_length=packed_length)
        self.val_set = validation_set(self.ds, self.val_idx, cfg.batch_size, env.rank, env.world_size, model.config,
                                      max_tokens=cfg.max_tokens_per_batch, packed_length=packed_length)

    def setup_optimizer(self) -> None:
        cfg = self.cfg
        self.params = [p for p in self.train_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.wd, betas=(0.9, 0.999), eps=1e-8)
        self.guard = UpdateGuard(self.optimizer, sharded=is_fsdp(self.train_model))
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_schedule, self.warmup, self.state.total_steps)

    def restore(self) -> None:
        """A resumed run: the optimizer, the scheduler's step count (LR and shape from now), the TrainState and
        the RNG streams; a fresh run: per-rank seeds (dropout differs per rank)."""
        cfg, env, saved = self.cfg, self.env, self.saved
        if saved is not None:
            ckpt_io.load_optimizer_state(self.optimizer, self.train_model, saved["optimizer"], env)
            load_scheduler_state(self.scheduler, saved["scheduler"], cfg.lr)
            total = self.state.total_steps
            self.state = TrainState.from_dict(saved)
            self.state.total_steps, self.state.grad_accum = total, cfg.grad_accum  # these may change on resume
        self.last_saved = self.state.step if saved is not None else -1
        # (older checkpoints do not record it: they were written after any validation of their step)
        self.last_val = int(saved.get("last_val", self.state.step)) if saved is not None else -1
        if saved is not None and saved.get("world_size") == env.world_size:
            ckpt_io.set_rng_state(saved["rng"][env.rank], self.device)
        else:
            ckpt_io.seed_everything(cfg.seed + env.rank, self.device)

    # ---- helpers of the loop ----------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.env.is_main:
            (self.pbar.write if self.pbar is not None else print)(msg)

    def checkpoint_state(self) -> dict:
        return {**self.state.to_dict(), "scheduler": self.scheduler.state_dict(), "last_val": self.last_val}

    def save(self, reason: str) -> Path:
        s = self.state
        path = ckpt_io.save_checkpoint(self.out, s.step, self.train_model, self.optimizer, self.checkpoint_state(),
                                       self.record, self.env, self.base, self.cfg.keep_checkpoints)
        self.last_saved = s.step
        self.log.log({"event": "checkpoint", "step": s.step, "path": str(path), "reason": reason})
        self.say(f"step {s.step}: checkpoint {path}")
        return path

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective under torchrun: every rank calls it at the same point)."""
        if not (self.env.initialized and self.env.world_size > 1):
            return self.stop.signal is not None
        flag = torch.tensor([1.0 if self.stop.signal else 0.0], device=self.device)
        return bool(all_reduce_max(flag).item())

    def validate(self) -> dict | None:
        """A validation pass (best/ written on a new best); None when a stop request interrupted it (nothing
        logged: the checkpoint must not wait for the rest of a long validation)."""
        s = self.state
        rep = evaluate(self.train_model, self.val_set, self.device, should_stop=self.stop_agreed)
        if rep is None:
            self.say(f"step {s.step}: validation interrupted by {self.stop.signal}")
            return None
        self.last_val = s.step
        improved = self.cfg.best_metric == "loss" and self.judge(rep["total"], {"val": loss_fields(rep)})
        self.log.log({"split": "val", "step": s.step, **loss_fields(rep), "text_targets": rep["text_targets"],
                      "audio_targets": rep["audio_targets"], "best": improved})
        self.say(f"step {s.step}: val loss {rep['total']:.4f} (text {rep['text_loss']:.4f}, audio "
                 f"{rep['audio_loss']:.4f}){' *best*' if improved else ''}")
        if self.stop.signal is None:  # (after a stop request the plot comes after the checkpoint)
            self.render_plot()  # redrawn at every validation: a running job can be looked at
        self.write_samples(validated=True)  # (skipped after a stop request)
        return rep

    def judge(self, value: float, info: dict) -> bool:
        """One value of --best_metric (every rank, the same value): a new best writes best/ (with best.json:
        the step, the metric and `info`), anything else counts towards early stopping. Returns whether it was a
        new best."""
        s, metric = self.state, self.cfg.best_metric
        self.judged_at = s.step
        sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
        if not math.isfinite(value) or (s.best_step is not None and not sign * value < sign * s.best_val):
            s.bad_evals += 1
            return False
        s.best_val, s.best_step, s.bad_evals = value, s.step, 0
        ckpt_io.save_adapter_all_ranks(self.train_model, self.out / "best" if self.env.is_main else None, self.env,
                                       self.base, info=("best.json", {"step": s.step, "metric": metric,
                                                                      "value": value, **info}))
        return True

    def write_samples(self, validated: bool = False, final: bool = False) -> None:
        """The samples of this step when due (rank 0 writes them, scored at --eval_steps); with --best_metric
        wer|sim, the score is then shared with every rank (a collective: each rank calls this at the same points)
        and judged. A scoring abandoned by a stop request judges nothing."""
        s, metric = self.state, self.cfg.best_metric
        scored = self.samples.scoring_due(s.step, final)
        self.samples.maybe_write(self.train_model, s.step, validated=validated, final=final)
        if not scored or metric == "loss":
            return
        rec = self.samples.record or {}
        got = torch.tensor([float(rec[metric]) if metric in rec else 0.0, 1.0 if metric in rec else 0.0],
                           dtype=torch.float64, device=self.device)
        value, have = all_reduce_sum(got).tolist()  # (only rank 0 contributes)
        if have:
            improved = self.judge(value, {"eval": {k: v for k, v in rec.items() if isinstance(v, float)}})
            self.say(f"step {s.step}: samples {metric} {value:.4f}{' *best*' if improved else ''}")
        elif self.samples.record is not None:  # scored, but without that metric (SIM: no prompt has a reference)
            self.say(f"step {s.step}: the samples have no {metric}: --best_metric {metric} has nothing to judge")

    def next_micro_batches(self, batches) -> tuple[list, bool]:
        """The step's micro-batches (fewer at the end of an epoch) and whether the epoch ends with them."""
        s = self.state
        k = min(self.cfg.grad_accum, self.n_batches - s.batches_in_epoch)
        micro = [next(batches) for _ in range(k)]
        s.batches_in_epoch += k
        if s.batches_in_epoch == self.n_batches:
            s.epoch, s.batches_in_epoch = s.epoch + 1, 0
            return micro, True
        return micro, False

    # ---- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> int:
        cfg, s, stop = self.cfg, self.state, self.stop
        own_handler = not stop.installed
        if own_handler:  # (a caller other than `minihiggs.train.train`)
            stop.install()
        stop.defer()  # from here on a stop request is honoured at the next step or validation batch, with a checkpoint
        self.announce()
        stop_reason = None
        if self.saved is None and self.val_set and cfg.val_steps and self.validate() is None:  # the untrained baseline
            stop_reason = "signal"
        if self.saved is None and stop_reason is None:
            self.write_samples()
        from tqdm import tqdm

        self.pbar = tqdm(total=s.total_steps, initial=s.step, disable=not self.env.is_main, unit="step",
                         dynamic_ncols=True, mininterval=1.0)
        window = LogWindow()  # the current --log_steps window
        batches: LoaderBatches | None = None
        try:
            while s.step < s.total_steps and stop_reason is None:
                self.sampler.set_epoch(s.epoch)
                self.sampler.skip(s.batches_in_epoch)
                if batches is not None:
                    batches.close()
                batches = LoaderBatches(self.loader)
                epoch_done = False
                while s.step < s.total_steps and stop_reason is None and not epoch_done:
                    micro, epoch_done = self.next_micro_batches(batches)
                    step = self.optimizer_step(micro)
                    if step.accepted:
                        window.add(step.sums)
                    s.step += 1
                    s.tokens += step.tokens
                    window.tokens_seen += step.tokens
                    self.pbar.update(1)
                    self.pbar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{step.lr:.2e}",
                                          tok_s=f"{window.tokens_per_s():.0f}", refresh=False)
                    stop_reason = self.after_step(step, window)
        finally:
            if batches is not None:
                batches.close()  # the workers stop now, also on an exception or an abort
            self.pbar.close()
            self.pbar = None
        try:
            return self.finish(stop_reason, stop.signal)
        finally:
            if own_handler:
                stop.restore()
            self.log.close()

    def optimizer_step(self, micro: list) -> "StepOutcome":
        """Forward + backward over the step's micro-batches, one all-reduce (loss sums and counts, tokens, whether
        any rank was signalled), then the guarded update. A rejected (non-finite) update is logged here."""
        K = self.model.config.audio_num_codebooks
        res = forward_backward(self.train_model, micro, self.device, self.env.world_size, K)
        vec = all_reduce_sum(torch.cat([res.sums.as_vector(), torch.tensor(
            [res.tokens, 1.0 if self.stop.signal else 0.0], dtype=torch.float64, device=self.device)]))
        lr = self.optimizer.param_groups[0]["lr"]
        loss, grad_norm, weights_ok = self.update(vec[:2 + 2 * K])  # (the step's one host sync)
        accepted = math.isfinite(loss) and math.isfinite(grad_norm) and weights_ok
        self.nonfinite_run = 0 if accepted else self.nonfinite_run + 1
        if not accepted:
            n = self.state.step + 1
            self.log.log({"event": "nonfinite", "step": n, "loss": loss, "grad_norm": grad_norm,
                          "weights_finite": weights_ok, "in_a_row": self.nonfinite_run})
            what = f"loss {loss} / grad norm {grad_norm}" if weights_ok else BROKEN_UPDATE
            self.say(f"step {n}: non-finite {what}: update rejected, weights and optimizer state kept "
                     f"({self.nonfinite_run} in a row)")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the data, skipped updates included
        return StepOutcome(vec[:2 + 2 * K], int(vec[-2]), bool(vec[-1] > 0), loss, grad_norm, lr, accepted)

    def after_step(self, step: "StepOutcome", window: "LogWindow") -> str | None:
        """What follows an optimizer step, in order: the non-finite stop, the train log, a stop request (the
        checkpoint comes first: no validation or samples), validation (early stop), audio samples, a stop request
        that arrived during them, the checkpoint. Returns why the loop must stop, or None."""
        cfg, s = self.cfg, self.state
        if self.nonfinite_run >= MAX_NONFINITE_IN_A_ROW:
            return "nonfinite"
        self.log_train(step, window)
        if step.stop_requested:
            return "signal"
        stop_reason = None
        val_due = bool(self.val_set and cfg.val_steps and s.step % cfg.val_steps == 0)
        # Validation and samples take long: a stop request during them must not wait for another step. (Every
        # rank knows whether they were due, so every rank takes part in the check, a collective.)
        long_work = val_due or self.samples.due(s.step, validated=val_due)
        if val_due and self.validate() is None:
            stop_reason = "signal"
        if stop_reason is None:
            self.write_samples()
        if stop_reason is None and self.judged_at == s.step and cfg.early_stopping_patience and \
                s.bad_evals >= cfg.early_stopping_patience:
            stop_reason = "early_stop"
            what = "validation loss" if cfg.best_metric == "loss" else f"samples {cfg.best_metric}"
            self.log.log({"event": "early_stop", "step": s.step, "best_step": s.best_step, "best_val": s.best_val,
                          "best_metric": cfg.best_metric})
            self.say(f"early stopping: no better {what} for {s.bad_evals} evaluations "
                     f"(best {s.best_val:.4f} at step {s.best_step})")
        if long_work and stop_reason is None and self.stop_agreed():
            return "signal"
        if cfg.save_steps and s.step % cfg.save_steps == 0:
            if self.nonfinite_run == 0:
                self.save("save_steps")
            else:  # never let a checkpoint of a non-finite streak replace the good ones
                self.say(f"step {s.step}: checkpoint skipped (this update was non-finite)")
        return stop_reason

    def log_train(self, step: "StepOutcome", window: "LogWindow") -> None:
        """The train metrics of the --log_steps window, at its end."""
        cfg, s = self.cfg, self.state
        if s.step % cfg.log_steps == 0 or s.step == s.total_steps:
            if window.sums is not None:
                rep = LossSums.from_vector(window.sums).report()
                self.log.log({"split": "train", "step": s.step,
                              "epoch": round(s.epoch + s.batches_in_epoch / self.n_batches, 4), **loss_fields(rep),
                              "lr": step.lr, "grad_norm": step.grad_norm,
                              "tokens_per_s": round(window.tokens_per_s(), 1), "tokens": s.tokens})
            window.reset()

    def clip_gradients(self) -> torch.Tensor:
        from ..wrappers import full_tensor

        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        return full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def update(self, loss_vec: torch.Tensor) -> tuple[float, float, bool]:
        """Clip, step the optimizer, check the new weights (`guard.py`), then read the loss, the gradient norm and
        that verdict in one host sync. An update with any of them non-finite is undone: weights and optimizer state
        as before it. Returns (loss, grad norm, whether the new weights were finite)."""
        norm = self.clip_gradients()
        self.guard.snapshot()
        self.optimizer.step()
        weights_ok = self.guard.weights_finite()
        loss = LossSums.from_vector(loss_vec).report()["total"]
        grad_norm, ok = float(norm), bool(weights_ok)
        if not (math.isfinite(loss) and math.isfinite(grad_norm) and ok):
            self.guard.restore()
        return loss, grad_norm, ok

    def announce(self) -> None:
        cfg, env, s = self.cfg, self.env, self.state
        if env.is_main:
            mode = "FSDP2" if cfg.fsdp else "DDP" if env.world_size > 1 else "single device"
            print(f"minihiggs train: {env.world_size} x {self.device.type} ({mode}), base {self.dtype} from "
                  f"{cfg.base_ckpt}, compile={self.use_compile}")
            print(self.lora_report.summary())
            print(f"data: {len(self.train_idx)} train / {len(self.val_idx)} val samples; {self.n_batches} "
                  f"micro-batches per rank per epoch, {self.steps_per_epoch} steps per epoch; {s.total_steps} steps, "
                  f"warmup {self.warmup}, {cfg.lr_schedule} LR {cfg.lr:g}")
            if self.resume_from is not None:
                print(f"resuming from {self.resume_from} at step {s.step} (epoch {s.epoch}, batch "
                      f"{s.batches_in_epoch})")
                if self.resume_changes:
                    print(f"settings changed since the checkpoint: {', '.join(self.resume_changes)}")
        if self.saved is not None:
            self.log.truncate_after(s.step)
            self.log.log({"event": "resume", "step": s.step, "from": str(self.resume_from),
                          "changed": self.resume_changes})
        else:
            self.log.log({"event": "start", "step": 0, "world_size": env.world_size,
                          "train_samples": len(self.train_idx), "val_samples": len(self.val_idx),
                          "total_steps": s.total_steps, "lora_modules": len(self.lora_report.modules),
                          "trainable_params": self.lora_report.trainable_params, "command": self.record["command"]})

    def finish(self, stop_reason: str | None, signal_name: str | None) -> int:
        """After the loop: the non-finite stop (exit 1), the signal stop (checkpoint, exit 0) or the normal end
        (final validation, checkpoint, `final/`)."""
        s, env = self.state, self.env
        if stop_reason == "nonfinite":
            last = ckpt_io.latest_checkpoint(self.out) if env.is_main else None
            msg = (f"stopping: {MAX_NONFINITE_IN_A_ROW} non-finite losses/gradients in a row (steps "
                   f"{s.step - MAX_NONFINITE_IN_A_ROW + 1}..{s.step}); nothing was saved after them. Last good "
                   f"checkpoint: {last or 'none'}. Lower --lr, check the data, or resume from it.")
            self.log.log({"event": "stopped_nonfinite", "step": s.step, "last_checkpoint": str(last) if last else None})
            if env.is_main:
                print(f"error: {msg}", file=sys.stderr)
            return 1
        if stop_reason is None and self.val_set and self.last_val != s.step and self.validate() is None:
            stop_reason = "signal"  # interrupted final validation: the resumed run redoes it, then writes final/
        if stop_reason is None and self.stop_agreed():  # (a request during the final samples, or after the loop)
            stop_reason = "signal"
        if stop_reason == "signal":
            return self.finish_stopped(signal_name or self.stop.signal)
        if self.last_saved != s.step:
            self.save("end")
        ckpt_io.save_adapter_all_ranks(
            self.train_model, self.out / "final" if env.is_main else None, env, self.base,
            info=("final.json", {"step": s.step, "best_step": s.best_step,
                                 "best_val": None if math.isinf(s.best_val) else s.best_val,
                                 "best_metric": self.cfg.best_metric, "stop_reason": stop_reason or "done"}))
        self.write_samples(final=True)  # (after the checkpoint: it may be abandoned)
        self.log.log({"event": "end", "step": s.step, "reason": stop_reason or "done", "best_step": s.best_step})
        png = self.render_plot()
        self.say(f"done: {s.step} steps. adapter {self.out / 'final'}; best "
                 f"{self.out / 'best' if s.best_step is not None else '-'}; metrics {self.out / 'metrics.jsonl'}"
                 + (f"; plot {png}" if png else ""))
        return 0

    def finish_stopped(self, signal_name: str | None) -> int:
        """A stop request: a checkpoint of this step (none at step 0: a fresh start is the same run), exit 0."""
        s, signal_name = self.state, signal_name or self.stop.signal
        if s.step == 0:
            self.log.log({"event": "interrupted", "step": 0, "signal": signal_name})
            self.say(f"stopped by {signal_name} before the first step: nothing to save; run the same command again")
            return 0
        path = self.save("signal") if self.last_saved != s.step else \
            ckpt_io.checkpoint_root(self.out) / f"step-{s.step:08d}"
        self.log.log({"event": "interrupted", "step": s.step, "signal": signal_name})
        self.render_plot()
        self.say(f"stopped by {signal_name} at step {s.step}; continue with --resume latest (checkpoint {path})")
        return 0

    def render_plot(self) -> Path | None:
        """output_dir/loss.png from metrics.jsonl; without matplotlib none, and one note saying how to get it."""
        if not self.env.is_main:
            return None
        from ..metrics.plot import MATPLOTLIB_NOTE, have_matplotlib, render_metrics_png

        if not have_matplotlib():
            if not self.plot_note_shown:
                self.plot_note_shown = True
                self.say(f"note: {MATPLOTLIB_NOTE}")
            return None
        try:
            return render_metrics_png(self.out / "metrics.jsonl", self.out / "loss.png")
        except Exception as e:  # a plot must never fail a run
            print(f"warning: could not render {self.out / 'loss.png'}: {e}", file=sys.stderr)
            return None
