"""Cost of the accepted-update check (`minihiggs.train.guard`) next to the AdamW step it guards.

    python scripts/bench_guard.py                       # the 3B model's LoRA (r=16, default targets) on CPU
    python scripts/bench_guard.py --device cuda

Only the trainable state exists (the LoRA A/B shapes of the 3B checkpoint, found on the meta device): the check
copies and measures exactly these tensors, so the base model does not matter. Prints one JSON line: the AdamW
step alone, the step with snapshot + weight check, and a rejected step's restore, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minihiggs import HiggsConfig  # noqa: E402
from minihiggs.lora.apply import apply_lora  # noqa: E402
from minihiggs.model.higgs import HiggsAudioModel  # noqa: E402
from minihiggs.model.tiny import tiny_config  # noqa: E402
from minihiggs.train.guard import UpdateGuard  # noqa: E402

SHAPE_3B = dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, dual_layers=tuple(range(28)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    with torch.device("meta"):
        model = HiggsAudioModel(HiggsConfig.from_dict(tiny_config(**SHAPE_3B)))
    apply_lora(model, r=args.rank, alpha=2 * args.rank)
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=dev).manual_seed(0)
    params = [torch.nn.Parameter(0.01 * torch.randn(s, device=dev, generator=g)) for s in shapes]
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, device=dev, generator=g)
    opt = torch.optim.AdamW(params, lr=1e-4)
    guard = UpdateGuard(opt)

    def timed(fn) -> float:
        fn()  # warm-up (allocates optimizer state and the guard's buffers)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps * 1e3

    def guarded() -> None:
        guard.snapshot()
        opt.step()
        bool(guard.weights_finite())  # (the loop reads it in the step's existing host sync)

    step_ms = timed(opt.step)
    guarded_ms = timed(guarded)
    restore_ms = timed(guard.restore)
    print(json.dumps({"bench": "update_guard", "device": str(dev), "lora_tensors": len(params),
                      "lora_params": sum(p.numel() for p in params), "adamw_step_ms": round(step_ms, 2),
                      "guarded_step_ms": round(guarded_ms, 2),
                      "guard_overhead_ms": round(guarded_ms - step_ms, 2), "restore_ms": round(restore_ms, 2)}))


if __name__ == "__main__":
    main()
