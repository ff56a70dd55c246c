"""minihiggs' outputs in transformers and PEFT: `make test-reference` (a venv with transformers + peft; not part of
`make test`, which never needs them).

For every model reference set (tests/data/hf_reference: a tiny checkpoint saved by transformers), with minihiggs:
load it, put a random nonzero LoRA adapter on every attention projection and both MLPs, save the adapter, and
export the merged model with `python -m minihiggs.export --layout transformers`. Then with transformers/PEFT:
  * `HiggsAudioV2ForConditionalGeneration.from_pretrained(export)` loads with no missing, unexpected or mismatched
    key, and gives minihiggs' logits (base + adapter) on the set's inputs;
  * `PeftModel.from_pretrained(<the base checkpoint>, adapter)` loads every tensor of the adapter (none missing,
    none unused: each LoRA parameter of the PEFT model equals the file's tensor) and gives the same logits.
Prints one JSON line of max |diff| per set; exits 1 on any failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from safetensors.torch import load_file  # noqa: E402

from hf_inputs import batch_from_hf_inputs, checkpoint_dir, minihiggs_logits, model_sets  # noqa: E402
from minihiggs import apply_lora, load_model, save_adapter  # noqa: E402
from minihiggs.lora.apply import lora_modules  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Same fp32 tolerance and reason as tests/test_hf_parity.py: a fraction of the largest |logit| plus a relative one.
ATOL_OF_PEAK, RTOL = 1e-5, 1e-4


@torch.no_grad()
def minihiggs_like(model, inp: dict[str, torch.Tensor], text_cols: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' logits at the real positions, row-major, in minihiggs_logits' form (text columns, lse,
    argmax; audio logits)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    real = inp["attention_mask"].bool()
    text = inner.text_lm_head(inner.model(**inp, use_cache=False).last_hidden_state)[real]
    return dict(text_logits_cols=text[:, text_cols], text_logits_lse=torch.logsumexp(text, -1),
                text_logits_argmax=text.argmax(-1), audio_logits=model(**inp, use_cache=False).logits[real])


def max_diffs(ours: dict, theirs: dict, what: str, failures: list[str]) -> dict[str, float]:
    out = {}
    for k, t in theirs.items():
        o = ours[k]
        if o.shape != t.shape:
            failures.append(f"{what} {k}: shape {tuple(o.shape)} vs {tuple(t.shape)}")
            continue
        if k.endswith("argmax"):  # reported as the number of positions whose argmax differs
            out[k] = int((o != t).sum())
            if out[k]:
                failures.append(f"{what} {k}: {out[k]} positions differ")
            continue
        out[k] = (o.double() - t.double()).abs().max().item()
        if not torch.allclose(o.double(), t.double(), atol=ATOL_OF_PEAK * t.abs().max().item(), rtol=RTOL):
            failures.append(f"{what} {k}: max |diff| {out[k]:.3g}")
    return out


def randomize_lora(model, seed: int) -> int:
    """Nonzero A and B everywhere (a fresh adapter has B = 0 and changes nothing); the update is about a tenth of
    the base weights' size, as in the reference sets."""
    g = torch.Generator().manual_seed(seed)
    mods = lora_modules(model)
    with torch.no_grad():
        for m in mods.values():
            for lin in (m.lora_A, m.lora_B):
                scale = 1.0 if lin is m.lora_A else 0.1
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * scale / lin.weight.shape[1] ** 0.5)
    return len(mods)


def check_adapter_loaded(peft_model, adapter_dir: Path, failures: list[str]) -> int:
    """Every tensor of the file is a LoRA parameter of the PEFT model with the same value, and every LoRA
    parameter of the model is in the file."""
    file = load_file(str(adapter_dir / "adapter_model.safetensors"))
    params = {n.replace(".default.", "."): p for n, p in peft_model.named_parameters() if ".lora_" in n}
    unused = sorted(set(file) - set(params))
    missing = sorted(set(params) - set(file))
    differ = sorted(k for k in set(file) & set(params) if not torch.equal(file[k], params[k].detach()))
    for what, keys in (("unused by PEFT", unused), ("missing from the file", missing), ("loaded wrong", differ)):
        if keys:
            failures.append(f"{adapter_dir}: {len(keys)} adapter tensors {what}, e.g. {keys[:3]}")
    return len(file)


def check_set(set_dir: Path, work: Path, failures: list[str]) -> dict:
    from peft import PeftModel
    from transformers import HiggsAudioV2ForConditionalGeneration

    base = checkpoint_dir(set_dir / "checkpoint", work)  # the directory transformers saved
    inp = load_file(str(set_dir / "inputs.safetensors"))
    text_cols = load_file(str(set_dir / "outputs.safetensors"))["text_logits_cols_ids"]
    model = load_model(base)
    apply_lora(model, r=4, alpha=8, targets=TARGETS)
    n_modules = randomize_lora(model, seed=7)
    adapter, merged = work / "adapter", work / "merged"
    save_adapter(model, adapter, base_model_name_or_path=str(base))
    ours = minihiggs_logits(model, batch_from_hf_inputs(base, inp, model), text_cols)
    diffs = {}

    def theirs(hf_model) -> dict[str, torch.Tensor]:
        return minihiggs_like(hf_model, inp, text_cols)

    cmd = [sys.executable, "-m", "minihiggs.export", "--adapter", str(adapter), "--base", str(base),
           "--out", str(merged), "--layout", "transformers"]
    export = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if export.returncode != 0:
        failures.append(f"{set_dir.name}: minihiggs.export --layout transformers: {export.stderr.strip()[-300:]}")
    else:
        exported, info = HiggsAudioV2ForConditionalGeneration.from_pretrained(merged, use_text_head=True,
                                                                               output_loading_info=True)
        bad = {k: v for k, v in info.items() if v}
        if bad:
            failures.append(f"{set_dir.name}: from_pretrained(export) reports {bad}")
        diffs["export"] = max_diffs(ours, theirs(exported.eval()), f"{set_dir.name} export", failures)

    hf_base = HiggsAudioV2ForConditionalGeneration.from_pretrained(base, use_text_head=True)
    peft_model = PeftModel.from_pretrained(hf_base, adapter).eval()
    n_tensors = check_adapter_loaded(peft_model, adapter, failures)
    if n_tensors != 2 * n_modules:
        failures.append(f"{set_dir.name}: {n_tensors} adapter tensors for {n_modules} LoRA modules")
    diffs["peft"] = max_diffs(ours, theirs(peft_model), f"{set_dir.name} peft", failures)
    return dict(lora_modules=n_modules, adapter_tensors=n_tensors, max_abs_diff=diffs)


def main() -> int:
    import warnings

    import peft
    import transformers

    # PEFT warns about missing adapter keys at length; check_adapter_loaded reports them (and unused ones) itself.
    warnings.filterwarnings("ignore", message="Found missing adapter keys")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    sets = model_sets()
    failures: list[str] = []
    report = dict(transformers=transformers.__version__, peft=peft.__version__, torch=torch.__version__, sets={})
    if not sets:
        failures.append("no model reference sets found (tests/data/hf_reference or $MINIHIGGS_HF_REFERENCE)")
    for set_dir in sets:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                report["sets"][set_dir.name] = check_set(set_dir, Path(tmp), failures)
            except Exception as e:  # report every set, then fail
                failures.append(f"{set_dir.name}: {type(e).__name__}: {e}")
    report["failures"] = failures
    print(json.dumps(report))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
