"""Parity with transformers' own Higgs Audio v2 classes, on the reference sets saved by them in their layout
(tests/data/hf_reference, written by scripts/reference/make_hf_reference.py; README there says what each holds).

Sets are found through $MINIHIGGS_HF_REFERENCE (default tests/data/hf_reference; tests/hf_inputs.py): a model
set is a directory with `checkpoint/` (what HiggsAudioV2ForConditionalGeneration.save_pretrained wrote, its weights
as a recipe + their sha256), `adapter/` (PEFT's save_pretrained on it), `inputs.safetensors` and
`outputs.safetensors`; a tokenizer set has `checkpoint/` (HiggsAudioV2TokenizerModel's, alike) and
`io.safetensors`. No name or count of sets is assumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_inputs import (ROOT, batch_from_hf_inputs, checkpoint_dir, hf_token_ids, minihiggs_logits, model_sets,
                       tokenizer_sets)
from minihiggs import load_adapter, load_model

MODEL_SETS = model_sets()
TOKENIZER_SETS = tokenizer_sets()
CLIPS = [(s, name.split(".")[0]) for s in TOKENIZER_SETS
         for name in sorted(load_file(str(s / "io.safetensors"))) if name.endswith(".waveform")]
# fp32 on both sides, but other kernels and summation orders (index_copy routing vs masked_scatter, SDPA vs eager
# attention, oneDNN linears, fused LoRA). Rounding errors scale with the size of the sums, i.e. with the tensor's
# overall magnitude rather than each element's, so the absolute tolerance is a fraction of the largest |value|
# (measured: <= 4e-7 of it, base and adapted), plus a relative one. A real fault (wrong routing, LoRA scaling,
# rope, delay pattern) moves the logits by O(1) of that magnitude.
ATOL_OF_PEAK, RTOL = 1e-5, 1e-4
# The decoded waveform goes through ~30 convolutions of up to 1024 channels, alike: a fraction of its peak
# (measured: 4e-5 of it on both clips; float rounding only, as the codes agree exactly).
AUDIO_ATOL_OF_PEAK, AUDIO_RTOL = 1e-4, 1e-4


def test_reference_sets_present():
    assert MODEL_SETS, f"no model reference sets under {ROOT} (set $MINIHIGGS_HF_REFERENCE)"
    assert TOKENIZER_SETS, f"no audio tokenizer reference sets under {ROOT} (set $MINIHIGGS_HF_REFERENCE)"


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str, atol_of_peak=ATOL_OF_PEAK, rtol=RTOL) -> float:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    atol = atol_of_peak * theirs.abs().max().item()
    diff = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
    assert torch.allclose(ours.double(), theirs.double(), atol=atol, rtol=rtol), f"{what}: max |diff| {diff:.3g}"
    return diff


@pytest.fixture(scope="module", params=MODEL_SETS, ids=lambda p: p.name)
def model_set(request, tmp_path_factory):
    """(set directory, the checkpoint directory transformers saved, inputs, outputs)."""
    d = request.param
    ckpt = checkpoint_dir(d / "checkpoint", tmp_path_factory.mktemp("hf_ckpt"))
    return d, ckpt, load_file(str(d / "inputs.safetensors")), load_file(str(d / "outputs.safetensors"))


def test_inputs_mean_the_same(model_set):
    """minihiggs' collate of the converted samples lays out exactly transformers' sequence: the same token at
    every text position, audio columns at the same positions holding the same codes (delay pattern included)."""
    _, ckpt, inp, _ = model_set
    model = load_model(ckpt)
    audio_id, delay_id = hf_token_ids(ckpt)
    batch = batch_from_hf_inputs(ckpt, inp, model)
    theirs = inp["attention_mask"].bool()
    assert torch.equal(batch.attention_mask.sum(1), theirs.sum(1))
    hf_ids = inp["input_ids"].masked_fill(inp["input_ids"] == delay_id, audio_id)[theirs]
    assert torch.equal(batch.input_ids[batch.attention_mask], hf_ids)
    hf_audio = (inp["input_ids"] == audio_id) | (inp["input_ids"] == delay_id)
    assert torch.equal(batch.audio_out_mask[batch.attention_mask], hf_audio[theirs])
    assert torch.equal(batch.audio_out_codes, inp["audio_input_ids"][inp["audio_input_ids_mask"]].T)


def _compare(model, ckpt: Path, inp: dict, ref: dict, prefix: str) -> dict[str, float]:
    """minihiggs' logits on the set's inputs against transformers' (`prefix`: "" base, "adapted_" with adapter)."""
    ours = minihiggs_logits(model, batch_from_hf_inputs(ckpt, inp, model), ref["text_logits_cols_ids"])
    mask = inp["attention_mask"].bool()
    assert torch.equal(ours["text_logits_argmax"], ref[prefix + "text_logits_argmax"][mask])
    return {k: _close(ours[k], ref[prefix + k][mask], f"{ckpt.name} {prefix}{k}")
            for k in ("text_logits_cols", "text_logits_lse", "audio_logits")}


def test_logits_match_transformers(model_set):
    _, ckpt, inp, ref = model_set
    _compare(load_model(ckpt), ckpt, inp, ref, "")


def test_peft_adapter_logits_match(model_set):
    """The adapter PEFT saved on the transformers model (module paths `base_model.model.model.layers...`) loads
    onto every module it names and gives PEFT's adapted logits, which differ from the base ones."""
    d, ckpt, inp, ref = model_set
    model = load_model(ckpt)
    report = load_adapter(model, d / "adapter")
    n_b = sum(1 for k in load_file(str(d / "adapter" / "adapter_model.safetensors")) if ".lora_B." in k)
    assert len(report.modules) == n_b
    _compare(model, ckpt, inp, ref, "adapted_")
    assert not torch.allclose(ref["adapted_audio_logits"], ref["audio_logits"], atol=1e-3)


# Written by the saving library, not part of what the checkpoint means.
CONFIG_BOOKKEEPING = {"transformers_version"}


def equivalent_config(cfg: dict, want: dict, defaults: dict) -> dict:
    """Fields whose value differs once a missing field takes transformers' default (`config_defaults.json`)."""
    missing = object()
    keys = (set(cfg) | set(want)) - CONFIG_BOOKKEEPING
    return {k: (cfg.get(k, defaults.get(k, missing)), want.get(k, defaults.get(k, missing))) for k in sorted(keys)
            if cfg.get(k, defaults.get(k, missing)) != want.get(k, defaults.get(k, missing))}


def test_export_round_trips_bitwise(model_set, tmp_path):
    """transformers layout -> minihiggs -> `python -m minihiggs.export --layout transformers`: the same keys,
    shapes and bytes as transformers saved, and an equivalent config. The adapter merged in is freshly initialised
    (lora_B = 0), so every merged weight is W + 0 = W exactly."""
    from minihiggs import apply_lora, save_adapter
    from minihiggs.export import main as export_main

    d, ckpt, _, _ = model_set
    model = load_model(ckpt)
    apply_lora(model, r=2, alpha=4, targets=["q_proj", "audio_mlp.up_proj"], seed=0)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(ckpt))
    out = tmp_path / "export"
    assert export_main(["--adapter", str(tmp_path / "adapter"), "--out", str(out), "--layout", "transformers"]) == 0
    theirs = load_file(str(ckpt / "model.safetensors"))
    ours = {}
    for f in sorted(out.glob("*.safetensors")):
        ours.update(load_file(str(f)))
    assert sorted(ours) == sorted(theirs), (sorted(set(ours) ^ set(theirs)))[:10]
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert torch.equal(ours[k].view(torch.uint8), v.view(torch.uint8)), f"{k}: bytes differ"
    defaults = json.loads((d / "checkpoint" / "config_defaults.json").read_text())
    diff = equivalent_config(json.loads((out / "config.json").read_text()),
                             json.loads((ckpt / "config.json").read_text()), defaults)
    assert not diff, f"exported config.json differs (ours, transformers'): {diff}"


def test_both_layouts_give_bitwise_the_same_outputs(model_set, tmp_path):
    """The same weights exported in the legacy layout (a zero adapter merged: W + 0 = W) load into a model whose
    logits, base and with the PEFT adapter (transformers module paths, loaded onto the legacy naming), are
    bitwise those of the transformers-layout checkpoint."""
    from minihiggs import apply_lora, save_adapter
    from minihiggs.export import main as export_main

    d, ckpt, inp, ref = model_set
    model = load_model(ckpt)
    apply_lora(model, r=2, alpha=4, targets=["q_proj"], seed=0)
    save_adapter(model, tmp_path / "zero", base_model_name_or_path=str(ckpt))
    legacy = tmp_path / "legacy"
    assert export_main(["--adapter", str(tmp_path / "zero"), "--out", str(legacy), "--layout", "legacy"]) == 0
    assert "text_config" in json.loads((legacy / "config.json").read_text())
    cols = ref["text_logits_cols_ids"]
    for with_adapter in (False, True):
        outs = []
        for path in (ckpt, legacy):
            m = load_model(path)
            if with_adapter:
                load_adapter(m, d / "adapter")
            outs.append(minihiggs_logits(m, batch_from_hf_inputs(ckpt, inp, m), cols))
        for k, v in outs[0].items():
            assert torch.equal(v, outs[1][k]), f"{d.name} {k} (adapter: {with_adapter}) differs between layouts"


def test_equivalent_config_sees_meaningful_differences():
    """A field left out equals transformers' default; a different value, or a field without default, differs."""
    defaults = {"use_cache": True, "num_codebooks": 8}
    assert equivalent_config({"num_codebooks": 8, "transformers_version": "x"}, {"use_cache": True}, defaults) == {}
    assert equivalent_config({"num_codebooks": 4}, {}, defaults) == {"num_codebooks": (4, 8)}
    assert list(equivalent_config({"head_dim": 8}, {}, defaults)) == ["head_dim"]


# ---- audio tokenizer ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    """Per tokenizer set: the directory transformers saved (weights checked bitwise, see checkpoint_dir), loaded
    by minihiggs."""
    from minihiggs.codec import AudioTokenizer

    cache: dict[Path, AudioTokenizer] = {}

    def get(set_dir: Path) -> AudioTokenizer:
        if set_dir not in cache:
            ckpt = checkpoint_dir(set_dir / "checkpoint", tmp_path_factory.mktemp("hf_codec"))
            cache[set_dir] = AudioTokenizer.from_pretrained(ckpt)
        return cache[set_dir]

    return get


@pytest.mark.parametrize("set_dir,clip", CLIPS, ids=[f"{s.name}-{c}" for s, c in CLIPS])
def test_codec_matches_transformers(codec, set_dir, clip):
    """Codes are compared exactly: both sides compute the same fp32 ops and take an argmax over distances, and
    the clips were chosen with acoustic and semantic frame counts equal (transformers pads otherwise)."""
    io = load_file(str(set_dir / "io.safetensors"))
    tok = codec(set_dir)
    codes = tok.encode(io[f"{clip}.waveform"])
    want = io[f"{clip}.codes"]
    assert codes.shape == want.shape
    agree = (codes == want).float().mean().item()
    assert torch.equal(codes, want), f"{set_dir.name}/{clip}: {agree:.4f} of the codes agree"
    audio = tok.decode(want)
    _close(audio, io[f"{clip}.audio"], f"{set_dir.name}/{clip} decoded audio", AUDIO_ATOL_OF_PEAK, AUDIO_RTOL)
