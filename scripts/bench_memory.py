"""Peak process memory of the released 3B shape on CPU: one LoRA optimizer step and generation, bf16 / int8 / nf4.

    python scripts/bench_memory.py                                   # the default plan below, JSON lines
    python scripts/bench_memory.py --formats nf4 --ac off --tokens 256 512 --generate   # a part of it
    python scripts/bench_memory.py --shape small --cap_gb 4          # a small shape (development, tests)

The model is built on the meta device from the released config.json (`--config`, default
../shared/real/higgs-audio-v2-generation-3B-base/config.json; no weights needed) and every tensor is then
materialised once, straight in its final form: random N(0, 0.02) in bf16, and for `--quantize`-d formats each
decoder linear drawn in bf16 and quantized on the spot (model/quant.py), one tensor at a time, as `load_model`
does, so the bf16 model never exists whole. LoRA r=16 alpha=32 on q,k,v,o,gate,up,down (the trainer's defaults),
AdamW, one packed row of `--tokens` positions (~60% audio-out, bench_train.py's `fixed_row`).

Every configuration runs in its own child process under a watchdog that kills it once its RSS passes `--cap_gb`
(default 14: this machine's 24 GB are shared); such a line says "fit": false. Memory is read from
/proc/self/status: VmRSS, and VmHWM (the peak) reset between phases through /proc/self/clear_refs.

Fields (GiB; "*_gib" over the child's baseline after `import torch`):
  weights_gib        RSS after materialising the model (weights_bytes_gib: the exact tensor bytes)
  lora_gib           LoRA parameters (fp32), exact
  activations_gib    bytes autograd saved for backward in the forward (unique storages, exact)
  fwd_bwd_peak_gib   peak RSS over the pre-step RSS during forward + loss + backward
  temporaries_gib    fwd_bwd_peak - activations: transient buffers (dequantized weights, logits chunks, grads
                     of activations in flight)
  optimizer_gib      RSS growth of the first optimizer step: AdamW's two fp32 states (+ the grads, exact: lora)
  peak_gib           VmHWM over the baseline for the whole step
Generation lines: weights, kv_cache_gib (exact, from the config), peak_gib of prefill + `--frames` decode steps.

To a GPU (the README's table): peak_gpu ~= weights_bytes + 4 lora (param, grad, 2 AdamW states) + slope * tokens +
temporaries + CUDA context (0.5-1 GB) + allocator slack (~10%), with slope the activation bytes per token from two
row lengths (activations scale linearly with the row; the quadratic part is attention's [L, L] mask/probabilities,
which the flash/SDPA kernels on CUDA do not keep). The activations are the same tensors in bf16 on CPU and GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

DEFAULT_CONFIG = REPO.parent / "shared" / "real" / "higgs-audio-v2-generation-3B-base" / "config.json"
GIB = 2**30
FORMATS = ("bf16", "int8", "nf4")


# ------------------------------------------------------------------------------------------------ /proc
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ------------------------------------------------------------------------------------------------ the child
def random_quantized(shape: tuple[int, int], fmt: str, g) -> dict:
    """Codes and scales of `fmt` drawn directly (quant.py's layout), never a bf16 weight: the memory is the same."""
    import torch

    from minihiggs.model.quant import NF4_BLOCK, SCALE_BLOCK

    n = shape[0] * shape[1]
    if fmt == "int8":
        return {"codes": torch.randint(-127, 128, shape, dtype=torch.int8, generator=g),
                "scale": torch.full((shape[0],), 0.02 / 127)}
    blocks = -(-n // NF4_BLOCK)
    return {"absmax_q": torch.randint(-127, 128, (blocks,), dtype=torch.int8, generator=g),
            "scale": torch.full((-(-blocks // SCALE_BLOCK),), 0.01 / 127), "mean": torch.full((1,), 0.05),
            "codes": torch.randint(0, 256, (blocks * NF4_BLOCK // 2,), dtype=torch.uint8, generator=g)}


def build(cfg_path: Path, shape: str, fmt: str, layers: int | None = None):
    """The model with random weights, each materialised once in its final form (bf16, or quantized codes)."""
    import torch

    from minihiggs import HiggsConfig
    from minihiggs.model.higgs import HiggsAudioModel
    from minihiggs.model.quant import QuantizedWeight, install, is_quantized_key
    from minihiggs.model.tiny import tiny_config

    if shape == "3b":
        raw = json.loads(cfg_path.read_text())
        if layers is not None:  # the first `layers` decoder layers of the released shape (per-layer slopes)
            raw["text_config"]["num_hidden_layers"] = layers
            raw["audio_dual_ffn_layers"] = [i for i in raw["audio_dual_ffn_layers"] if i < layers]
        cfg = HiggsConfig.from_dict(raw)
    else:
        cfg = HiggsConfig.from_dict(tiny_config(hidden=256, layers=layers or 4, heads=4, kv_heads=2,
                                                intermediate=512, dual_layers=tuple(range(layers or 4))))
    with torch.device("meta"):
        model = HiggsAudioModel(cfg)
    g = torch.Generator().manual_seed(0)
    for key, meta in model.state_dict().items():
        if fmt != "bf16" and is_quantized_key(key):
            install(model, key, QuantizedWeight(fmt, tuple(meta.shape), random_quantized(tuple(meta.shape), fmt, g),
                                                torch.bfloat16))
            continue
        if meta.is_floating_point():
            t = torch.ones(meta.shape, dtype=torch.bfloat16) if key.endswith("norm.weight") else \
                torch.empty(meta.shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
        else:
            t = torch.zeros(meta.shape, dtype=meta.dtype)
        path, _, name = key.rpartition(".")
        mod = model.get_submodule(path)
        if isinstance(getattr(mod, name), torch.nn.Parameter):
            setattr(mod, name, torch.nn.Parameter(t, requires_grad=False))
        else:
            mod.register_buffer(name, t)
    model.reset_buffers()
    return model


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def child_train(job: dict) -> dict:
    import torch

    from bench_train import fixed_row
    from minihiggs import collate
    from minihiggs.lora.apply import apply_lora, lora_parameters

    base = proc_status()["VmRSS"]
    model = build(Path(job["config"]), job["shape"], job["format"], job.get("layers"))
    weights = proc_status()["VmRSS"] - base
    exact = tensor_bytes(model)
    apply_lora(model, r=16, alpha=32, dropout=0.0, seed=0)
    model.train()
    model.set_activation_checkpointing(job["ac"])
    params = lora_parameters(model)
    lora = sum(p.numel() * p.element_size() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = collate([fixed_row(model.config, job["tokens"], torch.Generator().manual_seed(0))], model.config)
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    t0 = time.time()
    before = proc_status()["VmRSS"]
    reset_peak()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.forward_hidden(batch)
        loss = model.loss_sums(out.hidden, batch).normalized()
    # (weights and LoRA parameters saved for backward are not activations)
    own = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    activations = sum(n for ptr, n in saved.items() if ptr not in own)
    loss.backward()
    del out, loss
    fwd_bwd_peak = proc_status()["VmHWM"] - before
    pre_opt = proc_status()["VmRSS"]
    opt.step()
    optimizer = proc_status()["VmRSS"] - pre_opt
    return {"weights_gib": weights / GIB, "weights_bytes_gib": exact / GIB, "lora_gib": lora / GIB,
            "activations_gib": activations / GIB, "fwd_bwd_peak_gib": fwd_bwd_peak / GIB,
            "temporaries_gib": (fwd_bwd_peak - activations) / GIB, "optimizer_gib": optimizer / GIB,
            "peak_gib": (proc_status()["VmHWM"] - base) / GIB, "step_s": round(time.time() - t0, 1)}


def child_weights(job: dict) -> dict:
    base = proc_status()["VmRSS"]
    model = build(Path(job["config"]), job["shape"], job["format"], job.get("layers"))
    return {"weights_gib": (proc_status()["VmRSS"] - base) / GIB, "weights_bytes_gib": tensor_bytes(model) / GIB,
            "peak_gib": (proc_status()["VmHWM"] - base) / GIB}


def child_generate(job: dict) -> dict:
    import torch

    from bench_generate import run
    from minihiggs.generate import Engine

    base = proc_status()["VmRSS"]
    model = build(Path(job["config"]), job["shape"], job["format"], job.get("layers")).eval().requires_grad_(False)
    weights = proc_status()["VmRSS"] - base
    t = model.config.text
    length = job["prompt"] + job["frames"] + 16
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * length * job["batch"] * 2
    t0 = time.time()
    with torch.no_grad():
        run(Engine(model), job["batch"], job["prompt"], job["frames"], seed=0)
    return {"weights_gib": weights / GIB, "weights_bytes_gib": tensor_bytes(model) / GIB, "kv_cache_gib": kv / GIB,
            "peak_gib": (proc_status()["VmHWM"] - base) / GIB, "run_s": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------ the parent
def run_child(job: dict, cap: float, timeout: float) -> dict:
    """One configuration in a child process, killed when its RSS passes `cap` bytes or it runs past `timeout`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job.get("threads", 2))}
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak, t0, why = 0, time.time(), None
    while proc.poll() is None:
        try:
            peak = max(peak, proc_status(proc.pid)["VmRSS"])
        except (FileNotFoundError, ProcessLookupError, KeyError):
            pass
        if peak > cap:
            why = f"did not fit under the cap ({cap / GIB:.1f} GiB RSS)"
        elif time.time() - t0 > timeout:
            why = f"ran past {timeout:.0f} s"
        if why:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    rec = {**{k: v for k, v in job.items() if k != "config"}, "watchdog_peak_rss_gib": round(peak / GIB, 3)}
    if why:
        return {**rec, "fit": False, "why": why}
    if proc.returncode != 0:
        return {**rec, "fit": False, "why": "error: " + (err.strip().splitlines() or ["?"])[-1]}
    res = json.loads(out.strip().splitlines()[-1])
    return {**rec, "fit": True, **{k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="the released config.json (3b shape)")
    ap.add_argument("--shape", choices=["3b", "small"], default="3b")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=["nf4", "int8", "bf16"])
    ap.add_argument("--ac", nargs="+", choices=["off", "on"], default=["off", "on"],
                    help="activation checkpointing")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512],
                    help="packed row lengths (two give the per-token slope; longer rows cost minutes each on CPU)")
    ap.add_argument("--layers", type=int, help="decoder layers of the steps and generation runs (default: all; "
                                                "fewer give per-layer slopes in minutes instead of hours on CPU)")
    ap.add_argument("--weights", action="store_true", help="also the whole model's weights alone, every format")
    ap.add_argument("--generate", action="store_true", help="also generation at --batch")
    ap.add_argument("--no_train", action="store_true", help="generation only")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--cap_gb", type=float, default=14.0, help="kill a configuration whose RSS passes this (GiB)")
    ap.add_argument("--timeout_s", type=float, default=900.0, help="kill a configuration running longer")
    ap.add_argument("--deadline", help="HH:MM (local time): start no configuration after it")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args()
    if args.child:
        job = json.loads(args.child)
        work = {"train": child_train, "generate": child_generate, "weights": child_weights}[job["kind"]]
        print(json.dumps(work(job)))
        return
    jobs = [] if args.no_train else [
        {"kind": "train", "format": f, "ac": ac == "on", "tokens": n}
        for f in args.formats for ac in args.ac for n in args.tokens]
    if args.weights:
        jobs += [{"kind": "weights", "format": f} for f in args.formats]
    if args.generate:
        jobs += [{"kind": "generate", "format": f, "batch": b, "prompt": args.prompt, "frames": args.frames}
                 for f in args.formats for b in args.batch]
    for job in jobs:
        job.update(config=args.config, shape=args.shape)
        if job["kind"] != "weights" and args.layers:
            job["layers"] = args.layers
        if args.deadline and time.strftime("%H:%M") >= args.deadline:
            line = {**{k: v for k, v in job.items() if k != "config"}, "fit": None, "why": "not measured: deadline"}
        else:
            line = run_child(job, args.cap_gb * GIB, args.timeout_s)
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
