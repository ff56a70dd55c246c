#!/usr/bin/env python
"""train.py — LoRA fine-tuning of Higgs Audio v2 on shards made by prep.py: one device, DDP or FSDP2.

    python train.py --train_manifest data/prepared --output_dir runs/me --base_ckpt DIR_OR_HUB_ID
    torchrun --nproc_per_node=8 train.py --train_manifest ... --output_dir ... [--fsdp]
    python train.py ... --resume latest          # continue exactly where the newest checkpoint left off

One optimizer step = `--grad_accum` micro-batches of `--batch_size` samples on every rank. The loss of the step
is normalised by the step's *global* target counts (all micro-batches, all ranks), so the update equals the one
of a single batch holding all of them, whatever the split across micro-batches and devices.

Output (`--output_dir`): metrics.jsonl (every logged value), loss.png, checkpoints/step-N (resumable, PEFT
adapter inside; the newest --keep_checkpoints kept), best/ (lowest validation loss), final/ (end of training).
See minihiggs/trainer/checkpointing.py for the exact layout.

SIGTERM / SIGINT finish the current optimizer step, save a checkpoint and exit 0 (a second signal aborts).
A non-finite loss or gradient skips that update; MAX_NONFINITE_IN_A_ROW in a row stop the run (exit 1) with the
last good checkpoint untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minihiggs import DEFAULT_REPO, LossSums, load_model  # noqa: E402
from minihiggs.batch import Batch  # noqa: E402
from minihiggs.checkpoint import CheckpointError  # noqa: E402
from minihiggs.config import ConfigError  # noqa: E402
from minihiggs.dataset import BucketBatchSampler, ShardDataset  # noqa: E402
from minihiggs.lora import DEFAULT_TARGETS, apply_lora  # noqa: E402
from minihiggs.shards import ShardError  # noqa: E402
from minihiggs.trainer import checkpointing as ckpt_io  # noqa: E402
from minihiggs.trainer.data import (check_dataset, collate_ids, train_loader, val_batch_count,  # noqa: E402
                                    val_batches)
from minihiggs.trainer.distributed import (DistEnv, all_reduce_sum, cleanup,  # noqa: E402
                                           drop_globally_unused_grads, full_value, gradient_sync, init_distributed,
                                           is_fsdp, unwrap, wrap_model)
from minihiggs.trainer.metrics import MetricsLog  # noqa: E402
from minihiggs.trainer.schedule import (SCHEDULES, build_scheduler, load_scheduler_state,  # noqa: E402
                                        warmup_steps)

MAX_NONFINITE_IN_A_ROW = 5
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = ap.add_argument_group("data and output")
    io.add_argument("--train_manifest", required=True, help="prepared shard directory (prep.py --out)")
    io.add_argument("--output_dir", required=True)
    io.add_argument("--base_ckpt", default=DEFAULT_REPO, help="base checkpoint directory or Hub repo id")
    io.add_argument("--val_fraction", type=float, default=0.05,
                    help="validation share, chosen by a stable hash of each sample id (same for every run and "
                         "world size); 0 disables validation")
    io.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: 2 on CUDA, 0 on CPU)")
    opt = ap.add_argument_group("optimisation")
    opt.add_argument("--batch_size", type=int, default=4, help="samples per micro-batch per device")
    opt.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--epochs", type=int, default=3)
    opt.add_argument("--max_steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    opt.add_argument("--lr", type=float, default=2e-4)
    opt.add_argument("--lr_schedule", choices=SCHEDULES, default="cosine")
    opt.add_argument("--warmup", type=float, default=0.05,
                     help="warmup: optimizer steps if >= 1, else a fraction of the run")
    opt.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay")
    opt.add_argument("--grad_clip", type=float, default=1.0, help="max gradient L2 norm (0: no clipping)")
    opt.add_argument("--seed", type=int, default=0)
    lora = ap.add_argument_group("LoRA")
    lora.add_argument("--lora_r", type=int, default=16)
    lora.add_argument("--lora_alpha", type=float, default=32.0)
    lora.add_argument("--lora_dropout", type=float, default=0.05)
    lora.add_argument("--lora_targets", nargs="+", default=None,
                      help=f"module patterns (names, globs or regexes; comma- or space-separated); default "
                           f"{','.join(DEFAULT_TARGETS)}")
    run = ap.add_argument_group("logging, checkpoints, runtime")
    run.add_argument("--log_steps", type=int, default=10)
    run.add_argument("--val_steps", type=int, default=100, help="validate every N steps (0: only at the end)")
    run.add_argument("--save_steps", type=int, default=1000, help="checkpoint every N steps (0: only at the end)")
    run.add_argument("--keep_checkpoints", type=int, default=3, help="newest checkpoints kept (0: keep all)")
    run.add_argument("--resume", default=None, metavar="DIR|latest",
                     help="a checkpoint dir, or 'latest' (newest in --output_dir; a fresh start if none)")
    run.add_argument("--early_stopping_patience", type=int, default=None,
                     help="stop after this many validations without a new best loss")
    run.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="base model dtype (default bf16 on GPU, fp32 on CPU); LoRA weights are always fp32")
    run.add_argument("--fsdp", action="store_true", help="shard the frozen base with FSDP2 (torchrun)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile each decoder layer (default: on for CUDA, off on CPU)")
    run.add_argument("--activation_checkpointing", action="store_true",
                     help="recompute decoder layers in backward (long sequences on small GPUs)")
    args = ap.parse_args(argv)
    if args.lora_targets is not None:
        args.lora_targets = [t for item in args.lora_targets for t in item.split(",") if t]
    for name in ("batch_size", "grad_accum", "epochs", "lora_r"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        ap.error("--max_steps must be >= 1")
    if args.log_steps < 1 or args.val_steps < 0 or args.save_steps < 0 or args.keep_checkpoints < 0:
        ap.error("--log_steps must be >= 1; --val_steps, --save_steps and --keep_checkpoints >= 0")
    if not 0.0 <= args.val_fraction < 1.0:
        ap.error("--val_fraction must be in [0, 1)")
    return args


class StopRequest:
    """SIGTERM / SIGINT set a flag the loop reads after each optimizer step; a second signal aborts."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: finishing this optimizer step, then saving a checkpoint", file=sys.stderr,
              flush=True)


@dataclass
class StepResult:
    sums: LossSums  # this rank's loss sums and target counts over the step's micro-batches (detached)
    tokens: int  # this rank's non-padding positions


def train_step(model: torch.nn.Module, micro_batches: list[Batch], device: torch.device, world_size: int,
               num_codebooks: int) -> StepResult:
    """Forward + backward of one optimizer step's micro-batches (gradients accumulate in .grad).

    The denominators are the step's global target counts (known before any forward, summed over micro-batches
    and ranks), so sum_i normalized_i is exactly the mean loss of the union batch. DDP / FSDP2 *average*
    gradients over ranks, hence the `* world_size`.
    """
    counts = torch.zeros(1 + num_codebooks, dtype=torch.long)
    for b in micro_batches:
        text, audio = b.target_counts()
        counts[0] += text
        counts[1:] += audio
    counts = all_reduce_sum(counts.to(device))
    text_denom, audio_denom = counts[0], counts[1:]
    total: LossSums | None = None
    tokens = 0
    for i, b in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            sums = model(b.to(device, non_blocking=True))
            (sums.normalized(text_denom, audio_denom) * world_size).backward()
        total = sums.detach() if total is None else total + sums.detach()
        tokens += b.num_tokens
    drop_globally_unused_grads(model)  # (FSDP2: None, not zeros, for what no rank used, as one process has)
    assert total is not None
    return StepResult(total, tokens)


@torch.no_grad()
def evaluate(train_model: torch.nn.Module, batches: list[tuple[Batch, bool]], device: torch.device) -> dict:
    """Validation over this rank's batches, sums all-reduced: {total, text_loss, audio_loss, per codebook, ...}.

    Under FSDP2 the forward is a collective, so every rank runs the same number of batches; `pad` batches only
    keep that count equal and are not counted. Otherwise the unwrapped model is used (no DDP hooks)."""
    model = train_model if is_fsdp(train_model) else unwrap(train_model)
    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    for batch, pad in batches:
        v = model(batch.to(device, non_blocking=True)).as_vector()
        v = torch.zeros_like(v) if pad else v  # (0 * NaN would still be NaN)
        total = v if total is None else total + v
    model.train(was_training)
    assert total is not None
    return LossSums.from_vector(all_reduce_sum(total)).report()


def loss_fields(report: dict) -> dict:
    return {"loss": report["total"], "text_loss": report["text_loss"], "audio_loss": report["audio_loss"],
            "audio_loss_per_codebook": report["audio_loss_per_codebook"]}


def check_resume_compatible(state: dict, args: argparse.Namespace, env: DistEnv, ckpt: Path) -> None:
    """Settings that define the data order or the adapter must match, or the run would not continue exactly
    (the LR, schedule, --max_steps, logging and checkpoint cadence may change)."""
    problems = [f"{k}: checkpoint {state.get(k)!r}, now {v!r}"
                for k, v in (("world_size", env.world_size), ("batch_size", args.batch_size), ("seed", args.seed))
                if state.get(k) != v]
    saved = ckpt_io.read_args_record(ckpt).get("args", {})
    for k in ("val_fraction", "lora_r", "lora_alpha", "lora_targets"):
        if k in saved and saved[k] != getattr(args, k):
            problems.append(f"--{k}: checkpoint {saved[k]!r}, now {getattr(args, k)!r}")
    if "train_manifest" in saved and Path(saved["train_manifest"]).resolve() != Path(args.train_manifest).resolve():
        problems.append(f"--train_manifest: checkpoint {saved['train_manifest']}, now {args.train_manifest}")
    if problems:
        raise SystemExit(f"--resume {ckpt}: the run cannot continue exactly with different settings:\n  "
                         + "\n  ".join(problems))


USER_INPUT_ERRORS = (ShardError, CheckpointError, ConfigError, ckpt_io.ResumeError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = init_distributed()
    ok = False
    try:
        code = run(args, env, argv if argv is not None else sys.argv[1:])
        ok = True
        return code
    except USER_INPUT_ERRORS as e:
        # Bad shards, checkpoint, config or --resume target: the message names the file and field, and a
        # traceback would only bury it.
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        # After an exception on one rank the others may be stuck in a collective: no barrier then.
        if ok:
            cleanup(env)
        elif env.initialized:
            torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, env: DistEnv, argv: list[str]) -> int:
    device, main_rank = env.device, env.is_main
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    num_workers = args.num_workers if args.num_workers is not None else (2 if device.type == "cuda" else 0)
    out = Path(args.output_dir)
    base = str(Path(args.base_ckpt).resolve()) if Path(args.base_ckpt).is_dir() else args.base_ckpt

    pbar = None  # the progress bar, once the loop starts; messages go through it so they do not tear it

    def say(msg: str) -> None:
        if main_rank:
            (pbar.write if pbar is not None else print)(msg)

    # ---- resume point ------------------------------------------------------------------------------------------
    resume_from = ckpt_io.resolve_resume(args.resume, out)
    if resume_from is None and ckpt_io.list_checkpoints(out):
        raise SystemExit(f"{out} already holds checkpoints; pass --resume latest to continue, or another "
                         f"--output_dir")
    state = ckpt_io.load_trainer_state(resume_from) if resume_from is not None else None
    if state is not None:
        check_resume_compatible(state, args, env, resume_from)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_temporaries(out)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=main_rank)
    if main_rank and state is None and metrics.path.exists():
        metrics.path.unlink()  # a run that never checkpointed: start its history afresh

    # ---- data --------------------------------------------------------------------------------------------------
    ds = ShardDataset(args.train_manifest)
    train_idx, val_idx = ds.split(args.val_fraction)
    sampler = BucketBatchSampler(ds.lengths, train_idx, batch_size=args.batch_size, seed=args.seed, epoch=0,
                                 rank=env.rank, world_size=env.world_size)
    n_batches = len(sampler)  # this rank's micro-batches per epoch (equal on every rank)
    if n_batches == 0:
        raise SystemExit(f"{len(train_idx)} training samples give no batch of {args.batch_size} for "
                         f"{env.world_size} device(s)")
    steps_per_epoch = math.ceil(n_batches / args.grad_accum)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup = warmup_steps(args.warmup, total_steps)

    # ---- model -------------------------------------------------------------------------------------------------
    model = load_model(args.base_ckpt, dtype=dtype, device=device)
    check_dataset(ds, model.config)
    cfg = model.config
    report = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        targets=args.lora_targets, seed=args.seed)  # fp32 A/B, identical on every rank
    if resume_from is not None:
        ckpt_io.load_adapter_weights(model, resume_from)
    model.train()
    model.activation_checkpointing = args.activation_checkpointing
    if use_compile:
        for layer in model.layers:
            layer.compile()  # the trunk; the fused loss head runs eagerly by design (see minihiggs/loss.py)
    train_model = wrap_model(model, env, fsdp=args.fsdp)  # the forward goes through this wrapper

    params = [p for p in train_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.999), eps=1e-8)
    scheduler = build_scheduler(optimizer, args.lr_schedule, warmup, total_steps)

    step, epoch, batches_done, tokens_seen = 0, 0, 0, 0
    best_val, best_step, bad_evals = math.inf, None, 0
    if state is not None:
        ckpt_io.load_optimizer_state(optimizer, train_model, state["optimizer"], env)
        load_scheduler_state(scheduler, state["scheduler"], args.lr)  # the step count; --lr and shape from now
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        tokens_seen = state.get("tokens", 0)
        best_val = state["best_val"] if state.get("best_val") is not None else math.inf
        best_step, bad_evals = state.get("best_step"), state.get("bad_evals", 0)

    loader = train_loader(ds, sampler, cfg, num_workers, pin_memory=device.type == "cuda")
    n_val_batches = val_batch_count(len(val_idx), args.batch_size, env.world_size) if val_idx else 0
    val_set: list[tuple[Batch, bool]] = []
    if n_val_batches:
        mine = val_batches(ds, val_idx, args.batch_size, env.rank, env.world_size)
        pads = [(mine[-1] if mine else val_idx[:1], True)] * (n_val_batches - len(mine))
        val_set = [(collate_ids(ds, ids, cfg), pad) for ids, pad in [(b, False) for b in mine] + pads]

    record = {"argv": argv, "command": shlex.join(["train.py", *argv]), "args": vars(args),
              "world_size": env.world_size, "torch": torch.__version__}
    if main_rank:
        print(f"minihiggs train: {env.world_size} x {device.type} ({'FSDP2' if args.fsdp else 'DDP' if env.world_size > 1 else 'single device'}), "
              f"base {dtype} from {args.base_ckpt}, compile={use_compile}")
        print(report.summary())
        print(f"data: {len(train_idx)} train / {len(val_idx)} val samples; {n_batches} micro-batches per rank per "
              f"epoch, {steps_per_epoch} steps per epoch; {total_steps} steps, warmup {warmup}, {args.lr_schedule} "
              f"LR {args.lr:g}")
        if resume_from is not None:
            print(f"resuming from {resume_from} at step {step} (epoch {epoch}, batch {batches_done})")
    if state is not None:
        metrics.truncate_after(step)
        metrics.write({"event": "resume", "step": step, "from": str(resume_from)})
    else:
        metrics.write({"event": "start", "step": 0, "world_size": env.world_size, "train_samples": len(train_idx),
                       "val_samples": len(val_idx), "total_steps": total_steps, "lora_modules": len(report.modules),
                       "trainable_params": report.trainable_params, "command": record["command"]})

    def trainer_state() -> dict:
        return {"epoch": epoch, "batches_in_epoch": batches_done, "scheduler": scheduler.state_dict(),
                "best_val": None if math.isinf(best_val) else best_val, "best_step": best_step,
                "bad_evals": bad_evals, "tokens": tokens_seen, "batch_size": args.batch_size,
                "grad_accum": args.grad_accum, "seed": args.seed, "total_steps": total_steps,
                "sampler": sampler.state_dict(batches_done=batches_done)}

    last_saved = step if state is not None else -1

    def save(reason: str) -> Path:
        nonlocal last_saved
        path = ckpt_io.save_checkpoint(out, step, train_model, optimizer, trainer_state(), record, env, base,
                                       args.keep_checkpoints)
        last_saved = step
        metrics.write({"event": "checkpoint", "step": step, "path": str(path), "reason": reason})
        say(f"step {step}: checkpoint {path}")
        return path

    last_val = step if state is not None else -1

    def validate() -> dict:
        nonlocal best_val, best_step, bad_evals, last_val
        rep = evaluate(train_model, val_set, device)
        last_val = step
        improved = rep["total"] < best_val
        if improved:
            best_val, best_step, bad_evals = rep["total"], step, 0
            ckpt_io.save_adapter_all_ranks(train_model, out / "best" if main_rank else None, env, base)
            if main_rank:
                (out / "best" / "best.json").write_text(json.dumps({"step": step, "val": loss_fields(rep)}, indent=2))
        else:
            bad_evals += 1
        metrics.write({"split": "val", "step": step, **loss_fields(rep), "text_targets": rep["text_targets"],
                       "audio_targets": rep["audio_targets"], "best": improved})
        say(f"step {step}: val loss {rep['total']:.4f} (text {rep['text_loss']:.4f}, audio {rep['audio_loss']:.4f})"
            f"{' *best*' if improved else ''}")
        return rep

    # ---- the loop ----------------------------------------------------------------------------------------------
    if state is not None and state.get("world_size") == env.world_size:
        ckpt_io.set_rng_state(state["rng"][env.rank], device)
    else:
        ckpt_io.seed_everything(args.seed + env.rank, device)  # per-rank dropout streams
    if state is None and val_set and args.val_steps:
        validate()  # the untrained baseline (LoRA B = 0: exactly the base model), the first point of the val curve
    stop = StopRequest()
    stop.install()
    from tqdm import tqdm

    pbar = tqdm(total=total_steps, initial=step, disable=not main_rank, unit="step", dynamic_ncols=True,
                mininterval=1.0)
    K = cfg.audio_num_codebooks
    window: torch.Tensor | None = None  # all-reduced loss-sum vectors of the current --log_steps window
    window_tokens, window_t0 = 0, time.perf_counter()
    nonfinite_run, stop_reason = 0, None
    try:
        while step < total_steps and stop_reason is None:
            sampler.set_epoch(epoch)
            sampler.skip(batches_done)
            batches = iter(loader)
            while step < total_steps and stop_reason is None:
                k = min(args.grad_accum, n_batches - batches_done)
                micro = [next(batches) for _ in range(k)]
                batches_done += k
                epoch_done = batches_done == n_batches
                if epoch_done:
                    epoch, batches_done = epoch + 1, 0

                res = train_step(train_model, micro, device, env.world_size, K)
                # One collective per step: loss sums and counts, tokens, and whether any rank was signalled.
                vec = torch.cat([res.sums.as_vector(),
                                 torch.tensor([res.tokens, 1.0 if stop.signal else 0.0], dtype=torch.float64,
                                              device=device)])
                vec = all_reduce_sum(vec)
                sums = LossSums.from_vector(vec[:2 + 2 * K])
                step_tokens, stop_requested = int(vec[-2]), bool(vec[-1] > 0)
                loss = sums.report()["total"]
                lr = optimizer.param_groups[0]["lr"]
                grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(
                    params, args.grad_clip if args.grad_clip > 0 else math.inf)))
                if math.isfinite(loss) and math.isfinite(grad_norm):
                    optimizer.step()
                    nonfinite_run = 0
                    window = vec[:2 + 2 * K] if window is None else window + vec[:2 + 2 * K]
                else:
                    nonfinite_run += 1
                    metrics.write({"event": "nonfinite", "step": step + 1, "loss": loss, "grad_norm": grad_norm,
                                   "in_a_row": nonfinite_run})
                    say(f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}: update skipped "
                        f"({nonfinite_run} in a row)")
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()  # the schedule follows the data, skipped updates included
                step += 1
                tokens_seen += step_tokens
                window_tokens += step_tokens
                pbar.update(1)
                elapsed = max(time.perf_counter() - window_t0, 1e-9)
                pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{window_tokens / elapsed:.0f}",
                                 refresh=False)

                if nonfinite_run >= MAX_NONFINITE_IN_A_ROW:
                    stop_reason = "nonfinite"
                    break
                if step % args.log_steps == 0 or step == total_steps:
                    if window is not None:
                        rep = LossSums.from_vector(window).report()
                        metrics.write({"split": "train", "step": step, "epoch": round(epoch + batches_done / n_batches, 4),
                                       **loss_fields(rep), "lr": lr, "grad_norm": grad_norm,
                                       "tokens_per_s": round(window_tokens / elapsed, 1), "tokens": tokens_seen})
                    window, window_tokens, window_t0 = None, 0, time.perf_counter()
                if val_set and args.val_steps and step % args.val_steps == 0:
                    validate()
                    if args.early_stopping_patience and bad_evals >= args.early_stopping_patience:
                        stop_reason = "early_stop"
                        metrics.write({"event": "early_stop", "step": step, "best_step": best_step,
                                       "best_val": best_val})
                        say(f"early stopping: no better validation loss for {bad_evals} validations "
                            f"(best {best_val:.4f} at step {best_step})")
                if args.save_steps and step % args.save_steps == 0:
                    if nonfinite_run == 0:
                        save("save_steps")
                    else:  # never let a checkpoint of a non-finite streak replace the good ones
                        say(f"step {step}: checkpoint skipped (this update was non-finite)")
                if stop_requested and stop_reason is None:
                    stop_reason = "signal"
                if epoch_done:
                    break
    finally:
        pbar.close()
        stop.restore()

    # ---- the end -----------------------------------------------------------------------------------------------
    if stop_reason == "nonfinite":
        last = ckpt_io.latest_checkpoint(out) if main_rank else None
        msg = (f"stopping: {MAX_NONFINITE_IN_A_ROW} non-finite losses/gradients in a row (steps "
               f"{step - MAX_NONFINITE_IN_A_ROW + 1}..{step}); nothing was saved after them. Last good checkpoint: "
               f"{last or 'none'}. Lower --lr, check the data, or resume from it.")
        metrics.write({"event": "stopped_nonfinite", "step": step, "last_checkpoint": str(last) if last else None})
        if main_rank:
            print(f"error: {msg}", file=sys.stderr)
        return 1
    if stop_reason == "signal":
        path = save("signal") if last_saved != step else ckpt_io.checkpoint_root(out) / f"step-{step:08d}"
        metrics.write({"event": "interrupted", "step": step, "signal": stop.signal})
        render_plot(out, main_rank)
        say(f"stopped by a signal at step {step}; continue with --resume latest (checkpoint {path})")
        return 0
    if val_set and last_val != step:
        validate()
    if last_saved != step:
        save("end")
    ckpt_io.save_adapter_all_ranks(train_model, out / "final" if main_rank else None, env, base)
    if main_rank:
        (out / "final" / "final.json").write_text(json.dumps(
            {"step": step, "best_step": best_step, "best_val": None if math.isinf(best_val) else best_val,
             "stop_reason": stop_reason or "done"}, indent=2))
    metrics.write({"event": "end", "step": step, "reason": stop_reason or "done", "best_step": best_step})
    png = render_plot(out, main_rank)
    say(f"done: {step} steps. adapter {out / 'final'}; best {out / 'best' if best_step is not None else '-'}; "
        f"metrics {out / 'metrics.jsonl'}; plot {png}")
    return 0


def render_plot(out: Path, main_rank: bool) -> Path | None:
    if not main_rank:
        return None
    from minihiggs.trainer.plot import render_metrics_png

    try:
        return render_metrics_png(out / "metrics.jsonl", out / "loss.png")
    except Exception as e:  # a plot must never fail a finished run
        print(f"warning: could not render {out / 'loss.png'}: {e}", file=sys.stderr)
        return None


if __name__ == "__main__":
    code = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # Everything is saved and the process group is destroyed. Skip interpreter teardown: with FSDP2 on gloo
        # it aborts now and then ("terminate called without an active exception", torch 2.13), which would
        # turn a finished run into a failed exit code under torchrun.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)
