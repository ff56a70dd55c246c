"""--quantize nf4|int8 (model/quant.py): the formats' error bounds, logits of the golden sets within a derived bound,
LoRA on a quantized base (gradients, merge), a quantized training run that learns and resumes bitwise, export into
the dequantized weights, generation with a quantized base and an unmerged adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from golden import MODEL_ROOT, golden_samples, model_dir, variants
from helpers import REPO, adapter, max_diff, train_args
from minihiggs import collate, load_model
from minihiggs.generate.__main__ import main as generate_main
from minihiggs.generate.loading import load_generation_model
from minihiggs.lora.apply import LoRALinear, apply_lora, merge_lora
from minihiggs.lora.export import export_merged
from minihiggs.metrics.jsonl import read_metrics
from minihiggs.model.quant import (FORMATS, NF4_BLOCK, NF4_HALF_GAP, NF4_LEVELS, SCALE_BLOCK, QuantizedWeight,
                                   QuantLinear, quant_linear, quantized_bytes)
from minihiggs.tiny import main as tiny_main
from synth import synth_samples

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = variants(MODEL_ROOT)


def awkward_weight(out: int = 96, inp: int = 200, seed: int = 0) -> torch.Tensor:
    """Gaussian rows of very different scales, a few outliers and an all-zero row; in * out not a multiple of
    the block sizes (padding), more than one double-quantization block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-3, 0, out)[:, None]
    w[3, 7], w[50, 199] = 9.0, -4.0
    w[10] = 0.0
    return w


# ------------------------------------------------------------------------------------------------ the formats
def test_nf4_levels_are_the_normal_quantiles_of_qlora():
    """QLoRA's NF4: 8 positive and 7 negative quantiles of N(0, 1) at evenly spaced probabilities from
    p = 1 - (1/32 + 1/30) / 2 to 1/2, plus an exact 0, scaled to [-1, 1]."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    levels = levels / levels.abs().max()
    assert torch.allclose(levels, torch.tensor(NF4_LEVELS, dtype=torch.float64), atol=1e-6)


def elementwise_bound(qw: QuantizedWeight) -> torch.Tensor:
    """The per-weight error bound of the module docstring, from the stored scales."""
    n = qw.shape[0] * qw.shape[1]
    if qw.fmt == "int8":
        return (qw.scale / 2)[:, None].expand(qw.shape)
    # The exact absmax m_b is not stored: m_b <= |m^_b| + d_b, with m^_b the stored one and d_b its rounding error.
    d = (qw.scale / 2).repeat_interleave(SCALE_BLOCK)[:qw.absmax_q.numel()]
    m = qw.absmax_q.float() * qw.scale.repeat_interleave(SCALE_BLOCK)[:qw.absmax_q.numel()] + qw.mean
    per_block = NF4_HALF_GAP * (m.abs() + 2 * d) + d
    return per_block.repeat_interleave(NF4_BLOCK)[:n].view(qw.shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_weight_within_the_format_bound(fmt):
    w = awkward_weight()
    qw = QuantizedWeight.of(w, fmt)
    err = (qw.dequantize() - w).abs()
    bound = elementwise_bound(qw)
    # + 1e-6 of the weight: the fp32 rounding of dequantization (one multiply and one add per weight)
    assert (err <= bound * (1 + 1e-6) + 1e-6 * w.abs()).all(), float((err - bound).max())
    assert err[10].max() == 0  # an all-zero row is stored exactly
    bits = qw.nbytes() * 8 / w.numel()
    assert bits < (4.6 if fmt == "nf4" else 8.2), bits  # 4 + padding + scales; 8 + one fp32 scale per row of 200
    # bf16 out of the same codes: the fp32 result rounded once
    assert torch.equal(qw.dequantize(torch.bfloat16), qw.dequantize().to(torch.bfloat16))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_output_bound_gradients_and_no_saved_weight(fmt):
    """y_o - y^_o = x . (W_o - W^_o), so |y_o - y^_o| <= ||x|| ||W_o - W^_o|| (Cauchy-Schwarz) with the stored
    codes; backward gives exactly grad @ W^; and autograd keeps no dequantized weight between forward and
    backward (only x: the point of the custom Function)."""
    w = awkward_weight()
    qw = QuantizedWeight.of(w, fmt)
    x = torch.randn(3, 5, w.shape[1], generator=torch.Generator().manual_seed(1), requires_grad=True)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = quant_linear(x, qw)
    exact = x.detach() @ w.t()
    bound = x.detach().norm(dim=-1, keepdim=True) * (qw.dequantize() - w).norm(dim=1)
    assert ((y.detach() - exact).abs() <= bound * (1 + 1e-5) + 1e-5).all()
    assert max(saved, default=0) < w.numel()
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ qw.dequantize(), rtol=1e-5, atol=1e-6)  # (oneDNN vs MKL summation order)


# ------------------------------------------------------------------------------------------------ golden logits
@pytest.fixture(scope="module", params=VARIANTS, ids=lambda p: p.name)
def golden_case(request, tmp_path_factory):
    v = request.param
    d = model_dir(v, tmp_path_factory.mktemp("ckpt"))
    model = load_model(d)
    batch = collate(golden_samples(v), model.config)
    return d, model, batch


def head_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        flat = model.forward_hidden(batch).hidden.flatten(0, 1)
        text = flat @ model.audio_decoder_proj.text_lm_head.weight.t()
        return text, model.audio_logits(flat[batch.audio_out_pos])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", FORMATS)
def test_golden_logits_within_the_derived_bound(golden_case, fmt):
    """Bound: ||logits^ - logits|| / ||logits|| <= sqrt(sum_l eps_l^2), eps_l = ||W^_l - W_l||_F / ||W_l||_F of
    each quantized linear. Why: to first order the logits move by the sum of each weight error's effect; a layer's
    output moves by about eps_l of itself, and in a pre-norm residual stream each layer adds only a part of the
    stream that reaches the heads, so each term is at most ~eps_l of the logits; the weight errors of different
    layers are independent rounding errors, so the terms add in quadrature, not in magnitude. Measured on the golden
    sets: 0.16-0.24 of the bound for both formats (README: Small GPUs), so the test has a 4x margin and still fails
    on any real mistake (a wrong scale, a swapped nibble or level moves the logits by O(1) of themselves)."""
    ckpt, ref, batch = golden_case
    model = load_model(ckpt, quantize=fmt)
    ref_sd = ref.state_dict()
    eps = []
    for path, qw in ((p, m) for p, m in model.named_modules() if isinstance(m, QuantizedWeight)):
        w = ref_sd[path.rpartition(".")[0] + ".weight"]
        eps.append(float((qw.dequantize() - w).norm() / w.norm()))
        assert eps[-1] <= float(elementwise_bound(qw).norm() / w.norm())  # the format's own bound, from its scales
    n_linears = sum(1 for k in ref_sd if k.startswith("layers.") and k.endswith("_proj.weight"))
    assert len(eps) == n_linears > 0  # every decoder projection, attention and both MLPs (DualFFN included)
    assert not any(isinstance(m, QuantLinear) for m in ref.modules())  # the unquantized path is untouched
    bound = sum(e * e for e in eps) ** 0.5
    for ours, exact in zip(head_logits(model, batch), head_logits(ref, batch)):
        rel = relative_error(ours, exact)
        assert 0 < rel <= bound, (rel, bound)
    assert quantized_bytes(model) < sum(ref_sd[k].numel() for k in ref_sd if k.startswith("layers.") and
                                        k.endswith("_proj.weight")) * (0.6 if fmt == "nf4" else 1.1)


# ------------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_on_a_quantized_base_trains_and_merges(golden_case, fmt):
    ckpt, _, batch = golden_case
    model = load_model(ckpt, quantize=fmt)
    apply_lora(model, r=4, alpha=8, seed=0)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(m.qweight is not None and m.weight is None for m in wrapped if m.r)
    model.train()
    for _ in range(2):  # B starts at 0, so A gets its first gradient in the second step
        model.zero_grad()
        out = model.forward_hidden(batch)
        model.loss_sums(out.hidden, batch).normalized().sum().backward()
        grads = [p.grad for m in wrapped for p in (m.lora_A.weight, m.lora_B.weight)]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert all(m.lora_B.weight.grad.abs().max() > 0 for m in wrapped)
        with torch.no_grad():
            for m in wrapped:
                m.lora_B.weight -= 0.1 * m.lora_B.weight.grad.sign()
    assert all(m.lora_A.weight.grad.abs().max() > 0 for m in wrapped)
    model.eval()
    before = head_logits(model, batch)
    merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, QuantizedWeight)) for m in model.modules())
    for a, b in zip(head_logits(model, batch), before):  # W^ + s B A in one GEMM vs W^ x + s B (A x): fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)



# ------------------------------------------------------------------------------------------------ train, export, speak
@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> Path:
    """`python -m minihiggs.tiny` files (the demo's learnable motif voices) and their prepared shards."""
    out = tmp_path_factory.mktemp("quant") / "tiny"
    assert tiny_main(["--out", str(out)]) == 0
    r = subprocess.run([sys.executable, "prep.py", "--manifest", str(out / "data" / "train.jsonl"), "--out",
                        str(out / "shards"), "--base_ckpt", str(out / "base"), "--codec", str(out / "codec"),
                        "--no_progress"], cwd=REPO, capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": ""})
    assert r.returncode == 0, r.stderr
    return out


def run_args(voices: Path, out: Path, fmt: str, **over) -> list[str]:
    opts = dict(batch_size=4, grad_accum=1, max_steps=16, val_steps=8, save_steps=8, log_steps=4, lr=3e-3,
                lora_r=8, lora_alpha=16, lora_dropout=0.1, val_fraction=0.15, warmup=2, quantize=fmt, sample_steps=0)
    return train_args(voices / "shards", voices / "base", out, **{**opts, **over})


@pytest.fixture(scope="module", params=FORMATS)
def quantized_run(request, voices, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("runs") / request.param
    assert train.main(run_args(voices, out, request.param)) == 0
    return request.param, out


def val_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "val"]


def test_a_quantized_run_learns_as_much_as_the_unquantized_one(quantized_run, voices, tmp_path):
    """Same data (the demo's motif voices), seed and steps: the validation loss falls, by at least 80% of what the
    unquantized run's falls (measured: nf4 and int8 both within a few % of it)."""
    fmt, run = quantized_run
    ref = tmp_path / "ref"
    assert train.main(run_args(voices, ref, None)) == 0
    q, r = val_losses(run), val_losses(ref)
    assert len(q) == len(r) >= 2
    assert q[0] - q[-1] >= 0.8 * (r[0] - r[-1]) > 0, (q, r)
    assert q[0] != r[0]  # (the two runs did not share a base: the quantized one computed with other weights)


def test_a_quantized_run_resumes_bitwise(quantized_run, voices, tmp_path):
    fmt, run = quantized_run
    mid = run / "checkpoints" / "step-00000008"
    resumed = tmp_path / "resumed"
    assert train.main(run_args(voices, resumed, fmt) + ["--resume", str(mid)]) == 0
    a, b = adapter(run / "final"), adapter(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_diff(a, b)}"
    assert max_diff(adapter(mid), a) > 0  # (and the second half trained)


def test_export_merges_into_the_dequantized_weights(quantized_run, voices, tmp_path):
    """The merged checkpoint computes what the quantized run's base + adapter computed (up to fp32 rounding of
    the merge and bf16-free storage: the base is fp32 here); merging into the original weights instead would
    differ by the quantization error (the cost of the export, README: Small GPUs)."""
    fmt, run = quantized_run
    batch = collate(synth_samples(3, seed=5), load_model(voices / "base").config)
    trained = load_generation_model(str(voices / "base"), str(run / "final"), quantize=fmt, log=lambda m: None)
    assert any(isinstance(m, LoRALinear) for m in trained.modules())  # kept unmerged beside the 4/8-bit base
    export_merged(run / "final", tmp_path / "merged", base=voices / "base", quantize=fmt, log=None)
    export_merged(run / "final", tmp_path / "plain", base=voices / "base", log=None)
    want = head_logits(trained, batch)
    for a, b in zip(head_logits(load_model(tmp_path / "merged"), batch), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # (W^ + sBA in one GEMM vs W^x + sB(Ax))
    plain = head_logits(load_model(tmp_path / "plain"), batch)
    assert relative_error(plain[1], want[1]) > 1e-3  # (the flag matters: without it the error is the quantization's)


def test_generate_speaks_with_a_quantized_base_and_its_adapter(quantized_run, voices, tmp_path, capsys):
    fmt, run = quantized_run
    sample = json.loads((voices / "data" / "train.jsonl").read_text().splitlines()[0])["id"]
    wav = tmp_path / "q.wav"
    code = generate_main(["--adapter", str(run / "final"), "--base_ckpt", str(voices / "base"), "--quantize", fmt,
                          "--shards", str(voices / "shards"), "--ref_sample", sample, "--text", "Hello there.",
                          "--out", str(wav), "--max_new_frames", "12", "--temperature", "0", "--no_progress"])
    assert code == 0, capsys.readouterr().err
    assert wav.stat().st_size > 44


def test_resume_refuses_another_quantization(tmp_path):
    """The frozen weights of a --quantize nf4 run are not those of a bf16 one: a resume may not switch."""
    from types import SimpleNamespace

    from minihiggs.errors import ResumeError
    from minihiggs.train.checkpointing import check_resume_compatible

    with pytest.raises(ResumeError, match=r"--quantize: checkpoint 'nf4', now None"):
        check_resume_compatible({"world_size": 1}, {"args": {"quantize": "nf4"}}, SimpleNamespace(quantize=None), 1,
                                tmp_path)
    assert check_resume_compatible({"world_size": 1}, {"args": {"quantize": "nf4"}}, SimpleNamespace(quantize="nf4"),
                                   1, tmp_path) == []
