"""Export in either layout, adapters in either naming, and what a merged checkpoint records (merged_adapters.json)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_layout_hf import SMALL, to_transformers_dir

from minihiggs import load_model
from minihiggs.errors import AdapterError
from minihiggs.export import main as export_main
from minihiggs.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from minihiggs.lora.apply import apply_lora, merge_lora
from minihiggs.model.tiny import write_tiny_checkpoint


def _adapter(base, out, seed):
    """A LoRA adapter on `base` with non-zero B (so a merge changes the weights)."""
    model = load_model(base)
    apply_lora(model, r=2, alpha=4, seed=seed, targets=["q_proj", "v_proj", "audio_mlp.down_proj"])
    g = torch.Generator().manual_seed(seed + 100)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=g))
    return save_adapter(model, out, base_model_name_or_path=str(base))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    legacy = write_tiny_checkpoint(root / "legacy", seed=7, **SMALL)
    return legacy, to_transformers_dir(legacy, root / "new")


def _merged_reference(base, adapter):
    model = load_model(base)
    load_adapter(model, adapter)
    return merge_lora(model).state_dict()


def test_adapter_on_a_transformers_base_uses_its_module_paths(bases, tmp_path):
    legacy, new = bases
    ad = _adapter(new, tmp_path / "ad", seed=1)
    keys = sorted(load_file(str(ad / ADAPTER_WEIGHTS)))
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    cfg = json.loads((ad / ADAPTER_CONFIG).read_text())
    assert cfg["auto_mapping"]["base_model_class"] == "HiggsAudioV2ForConditionalGeneration"
    # the same adapter loads onto the legacy layout of the same weights, giving the same merged model
    a, b = _merged_reference(new, ad), _merged_reference(legacy, ad)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_legacy_adapter_loads_onto_a_transformers_base(bases, tmp_path):
    legacy, new = bases
    ad = _adapter(legacy, tmp_path / "ad", seed=2)
    assert all(k.startswith("base_model.model.layers.") for k in load_file(str(ad / ADAPTER_WEIGHTS)))
    a, b = _merged_reference(new, ad), _merged_reference(legacy, ad)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], load_model(legacy).state_dict()[
        "layers.0.self_attn.q_proj.weight"])  # the adapter did something


def test_adapter_matching_no_module_is_refused(bases, tmp_path):
    legacy, _ = bases
    ad = _adapter(legacy, tmp_path / "ad", seed=3)
    sd = load_file(str(ad / ADAPTER_WEIGHTS))
    save_file({k.replace("base_model.model.layers.", "base_model.model.decoder.blocks."): v for k, v in sd.items()},
              str(ad / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterError, match="none of its 6 modules .* exists in this model") as e:
        load_adapter(load_model(legacy), ad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("src,layout", [("legacy", "transformers"), ("new", "legacy"), ("new", None)])
def test_export_layouts_load_back_as_the_merged_model(bases, tmp_path, src, layout):
    base = dict(zip(("legacy", "new"), bases))[src]
    ad = _adapter(base, tmp_path / "ad", seed=4)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        argv = ["--adapter", str(ad), "--out", str(out), "--base_ckpt", str(base)]
        argv += ["--layout", layout] if layout else []
        assert export_main(argv) == 0
    finally:
        os.umask(old)
    want = layout or ("transformers" if src == "new" else "legacy")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"transformers": "higgs_audio_v2", "legacy": "higgs_audio"}[want]
    keys = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    if want == "transformers":
        assert keys == set(load_file(str(bases[1] / "model.safetensors")))
        assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "HiggsAudioV2Processor"
    else:
        assert keys == set(load_file(str(bases[0] / "model.safetensors")))
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f  # world-readable like any file (safetensors writes 0600)
    merged = load_model(out).state_dict()
    ref = _merged_reference(base, ad)
    assert all(torch.equal(merged[k], ref[k]) for k in ref)
    record = json.loads((out / "merged_adapters.json").read_text())["merged"]
    assert [(m["adapter"], m["scaling"], m["layout"]) for m in record] == [(str(ad), 2.0, want)]


def test_export_round_trips_the_transformers_layout_bitwise(bases, tmp_path):
    _, new = bases
    model = load_model(new)
    apply_lora(model, r=2, alpha=4, seed=0)  # B = 0: merging changes nothing
    ad = save_adapter(model, tmp_path / "zero", base_model_name_or_path=str(new))
    assert export_main(["--adapter", str(ad), "--out", str(tmp_path / "out"), "--base", str(new)]) == 0
    a = load_file(str(new / "model.safetensors"))
    b = {}
    for f in (tmp_path / "out").glob("model-*.safetensors"):
        b.update(load_file(str(f)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_checkpoint_refuses_the_same_adapter_and_notes_another(bases, tmp_path, capsys):
    legacy, _ = bases
    ad = _adapter(legacy, tmp_path / "ad", seed=5)
    other = _adapter(legacy, tmp_path / "other", seed=6)
    out = tmp_path / "merged"
    assert export_main(["--adapter", str(ad), "--out", str(out), "--base_ckpt", str(legacy)]) == 0
    with pytest.raises(AdapterError, match="this adapter is already merged into") as e:
        load_adapter(load_model(out), ad)
    assert "\n" not in str(e.value)
    assert export_main(["--adapter", str(ad), "--out", str(tmp_path / "twice"), "--base_ckpt", str(out)]) == 2
    assert "already merged" in capsys.readouterr().err
    notes = []
    load_adapter(load_model(out), other, log=notes.append)
    assert len(notes) == 1 and "already holds 1 merged adapter" in notes[0] and str(other) in notes[0]


def test_transformers_export_refuses_what_it_cannot_express(tmp_path, capsys):
    base = write_tiny_checkpoint(tmp_path / "ff", seed=0, **{**SMALL, "dual_layers": (0,)})
    ad = _adapter(base, tmp_path / "ad", seed=0)
    assert export_main(["--adapter", str(ad), "--out", str(tmp_path / "o"), "--layout", "transformers"]) == 2
    err = capsys.readouterr().err.strip()
    assert "audio_dual_ffn_layers covers 1 of 2 layers" in err and "\n" not in err
