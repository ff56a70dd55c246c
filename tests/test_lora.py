"""Unit tests of the hand-written LoRA, the PEFT-format adapter files and the merged export (no golden data)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from toy_model import randomize_lora, toy, toy_inputs

from minihiggs.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter_config, save_adapter
from minihiggs.lora.export import export_merged, parse_size
from minihiggs.lora.apply import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    peft_matcher,
    set_lora_enabled,
)

REPO = Path(__file__).resolve().parents[1]


# expected PEFT selection with the default (PEFT-style) names, README quirk 14
TEXT_DEFAULT = [f"layers.{i}.{m}" for i in range(4) for m in
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"] + (["audio_mlp.gate_proj", "audio_mlp.up_proj",
                                                     "audio_mlp.down_proj"] if i % 2 == 0 else [])]
TOWER_DEFAULT = [f"audio_tower.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"]


# ---------------------------------------------------------------------------------------------------------------
# LoRALinear


def test_init_matches_peft():
    base = nn.Linear(300, 200, bias=False)
    m = LoRALinear(base, r=8, alpha=16, generator=torch.Generator().manual_seed(5))
    a, b = m.lora_A.weight, m.lora_B.weight
    assert a.shape == (8, 300) and b.shape == (200, 8) and a.dtype == b.dtype == torch.float32
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=sqrt(5)) on fan_in 300
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    ref = torch.empty(8, 300)
    nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, ref)
    # the base parameters are shared, frozen; a fresh adapter is the identity
    assert m.weight is base.weight and not m.weight.requires_grad
    x = torch.randn(3, 300)
    assert torch.equal(m(x), base(x))


def test_scale_and_formula():
    base = nn.Linear(12, 10)
    m = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(5, 12)
    assert m.scaling == 2.0
    expect = base(x) + 2.0 * ((x @ m.lora_A.weight.T) @ m.lora_B.weight.T)
    torch.testing.assert_close(m(x), expect, rtol=0, atol=1e-6)
    # op for op PEFT's `result + lora_B(lora_A(dropout(x))) * scaling`: bitwise
    assert torch.equal(m(x), base(x) + m.lora_B(m.lora_A(x)) * 2.0)
    rs = LoRALinear(nn.Linear(12, 10), r=4, alpha=8, use_rslora=True)
    assert rs.scaling == 8 / 2


def test_dropout_only_on_lora_path():
    base = nn.Linear(16, 8)
    m = LoRALinear(base, r=4, alpha=4, dropout=0.5)
    x = torch.randn(64, 16)
    m.train()
    assert torch.equal(m(x), base(x))  # B = 0: dropout cannot touch the base path
    with torch.no_grad():
        m.lora_B.weight.normal_()
    torch.manual_seed(0)
    out = m(x)
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.5, training=True)
    assert torch.equal(out, base(x) + m.lora_B(m.lora_A(dropped)) * 1.0)
    assert not torch.equal(out, base(x) + m.lora_B(m.lora_A(x)))
    m.eval()
    assert torch.equal(m(x), base(x) + m.lora_B(m.lora_A(x)) * 1.0)


def test_low_precision_input_fp32_params():
    base = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    m = LoRALinear(base, r=4, alpha=8)
    assert m.lora_A.weight.dtype == torch.float32 and m.weight.dtype == torch.bfloat16
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.lora_A.weight.grad.dtype == torch.float32 and m.lora_B.weight.grad is not None
    assert m.weight.grad is None
    same = LoRALinear(nn.Linear(16, 8, bias=False).to(torch.bfloat16), r=4, alpha=8, lora_dtype=None)
    assert same.lora_A.weight.dtype == torch.bfloat16


def test_compile_fullgraph():
    m = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(3, 16)
    c = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(c(x), m(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# apply_lora: matching, freezing, report


def test_default_targets_leave_the_tower_frozen():
    model = toy()
    rep = apply_lora(model, r=4, alpha=8)
    assert sorted(rep.modules) == sorted(TEXT_DEFAULT)
    assert not any(p.requires_grad for p in model.audio_tower.parameters())
    # naming the suffixes explicitly is PEFT's list semantics: the tower's q/k/v are hit too (quirk 14)
    model = toy()
    rep = apply_lora(model, r=4, alpha=8, targets=DEFAULT_TARGETS)
    assert sorted(rep.modules) == sorted(TEXT_DEFAULT + TOWER_DEFAULT)
    assert not any(p.endswith(("out_proj", "fc1", "fc2", "lm_head")) or "audio_encoder_proj" in p for p in rep.modules)
    # the same set as PEFT's list semantics
    plain = toy()
    peft_set = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and peft_matcher(DEFAULT_TARGETS)(n)]
    assert sorted(peft_set) == sorted(rep.modules)
    n_lora = sum(4 * (m.in_features + m.out_features) for m in lora_modules(model).values())
    assert rep.trainable_params == n_lora == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep.total_params == sum(p.numel() for p in model.parameters())
    assert f"{len(rep.modules)} modules" in rep.summary()


@pytest.mark.parametrize("targets, expect", [
    (["audio_mlp.*"], [p for p in TEXT_DEFAULT if ".audio_mlp." in p]),
    ([r"audio_mlp\..*"], [p for p in TEXT_DEFAULT if ".audio_mlp." in p]),
    (["mlp.gate_proj"], [f"layers.{i}.mlp.gate_proj" for i in range(4)]),
    ([r"^layers\.\d+\.self_attn\.(q|v)_proj"], [f"layers.{i}.self_attn.{p}_proj" for i in range(4) for p in "qv"]),
    (["q_proj"], [f"layers.{i}.self_attn.q_proj" for i in range(4)] + [f"audio_tower.layers.{i}.self_attn.q_proj"
                                                                       for i in range(2)]),
    (["glob:layers.[02].mlp.up_proj", "re:.*tower.*fc1"], ["layers.0.mlp.up_proj", "layers.2.mlp.up_proj",
                                                          "audio_tower.layers.0.fc1", "audio_tower.layers.1.fc1"]),
    (["audio_encoder_proj.linear"], ["audio_encoder_proj.linear"]),
])
def test_target_patterns(targets, expect):
    model = toy()
    rep = apply_lora(model, r=2, alpha=2, targets=targets)
    assert sorted(rep.modules) == sorted(expect)
    assert set(rep.by_pattern) == set(targets)


def test_no_match_and_non_linear_errors():
    with pytest.raises(ValueError, match="nope_proj"):
        apply_lora(toy(), targets=["q_proj", "nope_proj"])
    with pytest.raises(ValueError, match=r"xyz\\\.\*"):
        apply_lora(toy(), targets=[r"xyz\.*"])
    with pytest.raises(ValueError, match="not nn.Linear"):
        apply_lora(toy(), targets=["mlp"])
    m = toy()
    apply_lora(m, targets=["q_proj"])
    with pytest.raises(ValueError, match="already"):
        apply_lora(m, targets=["k_proj"])


def test_freezing_and_grads_only_on_lora():
    model = toy()
    base_keys = list(model.state_dict())
    apply_lora(model, r=4, alpha=8, targets=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    sd_keys = list(model.state_dict())
    assert [k for k in sd_keys if ".lora_" not in k] == base_keys  # base key names unchanged
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    randomize_lora(model)
    ids, audio, feats = toy_inputs()
    model(ids, audio, feats).square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_disabled_equals_base_and_merge_equals_unmerged():
    ref = toy()
    model = toy()
    ids, audio, feats = toy_inputs()
    base_out = ref(ids, audio, feats)
    apply_lora(model, r=4, alpha=8)
    assert torch.equal(model(ids, audio, feats), base_out)  # B = 0
    randomize_lora(model)
    lora_out = model(ids, audio, feats)
    assert (lora_out - base_out).abs().max() > 1e-3
    set_lora_enabled(model, False)
    assert torch.equal(model(ids, audio, feats), base_out)
    set_lora_enabled(model, True)
    assert torch.equal(model(ids, audio, feats), lora_out)
    deltas = {p: m.delta_weight() for p, m in lora_modules(model).items()}
    merged = merge_lora(model)
    assert merged is model and not lora_modules(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in deltas)
    assert not hasattr(model, "_minihiggs_lora")
    assert list(model.state_dict()) == list(ref.state_dict())
    torch.testing.assert_close(model(ids, audio, feats), lora_out, rtol=0, atol=2e-6)
    for p, d in deltas.items():
        w0 = ref.get_submodule(p).weight
        assert torch.equal(model.get_submodule(p).weight, w0 + d)


def test_merge_keeps_bf16_and_computes_in_fp32():
    base = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    m = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        m.lora_B.weight.normal_(std=0.01)
    delta = (m.lora_B.weight @ m.lora_A.weight) * 2.0
    lin = m.merge()
    assert type(lin) is nn.Linear and lin.weight.dtype == torch.bfloat16
    assert torch.equal(lin.weight, (w0.float() + delta).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# state dicts and adapter files


def test_lora_state_dict_keys_and_strict_load():
    model = toy()
    apply_lora(model, r=4, alpha=8)
    randomize_lora(model)
    sd = lora_state_dict(model)
    paths = list(lora_modules(model))
    assert list(sd) == [f"base_model.model.{p}.lora_{x}.weight" for p in paths for x in "AB"]
    for p in paths:
        m = model.get_submodule(p)
        assert sd[f"base_model.model.{p}.lora_A.weight"].shape == (4, m.in_features)
        assert sd[f"base_model.model.{p}.lora_B.weight"].shape == (m.out_features, 4)
    other = toy()
    apply_lora(other, r=4, alpha=8)
    # PEFT in-memory names are accepted too
    load_lora_state_dict(other, {k.replace(".weight", ".default.weight"): v for k, v in sd.items()})
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(other).values(), sd.values()))
    extra = dict(sd, **{"base_model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(KeyError, match="layers.9.mlp.up_proj"):
        load_lora_state_dict(other, extra)
    missing = dict(sd)
    missing.pop("base_model.model.layers.1.self_attn.q_proj.lora_B.weight")
    with pytest.raises(KeyError, match=r"missing keys \['base_model.model.layers.1.self_attn.q_proj.lora_B"):
        load_lora_state_dict(other, missing)
    bad = dict(sd)
    bad["base_model.model.layers.1.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 3)
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(other, bad)


def sd_paths(cfg):
    import re
    return [n for n, m in toy().named_modules() if isinstance(m, nn.Linear) and re.fullmatch(cfg["target_modules"], n)]


def test_adapter_round_trip_and_config(tmp_path):
    model = toy()
    apply_lora(model, r=4, alpha=8, dropout=0.05)
    randomize_lora(model)
    ids, audio, feats = toy_inputs()
    model.eval()
    out = model(ids, audio, feats)
    d = save_adapter(model, tmp_path / "ad", base_model_name_or_path="some/base")
    assert sorted(p.name for p in d.iterdir()) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.05
    assert cfg["bias"] == "none" and cfg["task_type"] is None and cfg["base_model_name_or_path"] == "some/base"
    # the tower is not adapted by default, so the suffix names would over-select: an exact regex is written
    assert isinstance(cfg["target_modules"], str) and sorted(sd_paths(cfg)) == sorted(TEXT_DEFAULT)
    assert list(cfg) == sorted(cfg)
    sd = load_file(str(d / ADAPTER_WEIGHTS))
    assert set(sd) == set(lora_state_dict(model))
    fresh = toy()
    rep = load_adapter(fresh, d)
    fresh.eval()
    assert rep.modules == list(lora_modules(model))
    assert torch.equal(fresh(ids, audio, feats), out)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == \
           [n for n, p in model.named_parameters() if p.requires_grad]


def test_adapter_custom_targets_written_as_exact_regex(tmp_path):
    """Globs/regexes are not PEFT list entries: the config gets a full-match regex PEFT reads exactly."""
    model = toy()
    apply_lora(model, r=2, alpha=4, targets=[r"^layers\.\d+\.audio_mlp\..*", "mlp.down_proj"])
    save_adapter(model, tmp_path / "ad")
    tm = read_adapter_config(tmp_path / "ad")["target_modules"]
    assert isinstance(tm, str)
    plain = toy()
    selected = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and peft_matcher(tm)(n)]
    assert selected == list(lora_modules(model))
    fresh = toy()
    assert load_adapter(fresh, tmp_path / "ad").modules == list(lora_modules(model))
    # a plain suffix list that PEFT would read differently (tower q/k/v excluded here) also becomes a regex
    m2 = toy()
    apply_lora(m2, r=2, alpha=4, targets=[r"^layers\..*_proj"])
    save_adapter(m2, tmp_path / "ad2", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])
    assert isinstance(read_adapter_config(tmp_path / "ad2")["target_modules"], str)


def test_adapter_errors(tmp_path):
    model = toy()
    apply_lora(model, r=4, alpha=8)
    with pytest.raises(ValueError, match="rank"):
        save_adapter(model, tmp_path / "x", r=8)
    d = save_adapter(model, tmp_path / "ad")
    # unknown key in the file -> strict error naming it
    sd = load_file(str(d / ADAPTER_WEIGHTS))
    sd["base_model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(sd, str(d / ADAPTER_WEIGHTS))
    with pytest.raises(KeyError, match="lora_C"):
        load_adapter(toy(), d)
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    (d / ADAPTER_CONFIG).write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(NotImplementedError, match="use_dora"):
        load_adapter(toy(), d)
    (d / ADAPTER_CONFIG).write_text(json.dumps(dict(cfg, target_modules=["nothing_here"])))
    with pytest.raises(ValueError, match="nothing_here"):
        load_adapter(toy(), d)


def test_save_adapter_into_existing_dir_keeps_other_files(tmp_path):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "optimizer.pt").write_text("keep me")
    model = toy()
    apply_lora(model, r=2, alpha=2)
    save_adapter(model, ck)
    save_adapter(model, ck)  # overwrite in place
    assert (ck / "optimizer.pt").read_text() == "keep me" and (ck / ADAPTER_WEIGHTS).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


# ---------------------------------------------------------------------------------------------------------------
# export on a real (tiny, random) Higgs checkpoint: bf16 base, several shards, load_model round trip


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    assert parse_size("0.5 KB") == 500
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    from minihiggs.config import HiggsConfig
    from minihiggs.model.tiny import random_state_dict, save_sharded, tiny_config

    d = tmp_path_factory.mktemp("tiny_bf16")
    raw = tiny_config(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=48, dual_layers=(0,))
    (d / "config.json").write_text(json.dumps(raw))
    (d / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (d / "tokenizer_config.json").write_text("{}")
    sd = {k: v.to(torch.bfloat16) for k, v in random_state_dict(HiggsConfig.from_dict(raw), seed=3).items()}
    save_sharded(sd, d, max_shard_bytes=4_000_000)
    return d


def test_export_bf16_sharded_round_trip(tiny_bf16, tmp_path):
    from minihiggs import load_model
    from minihiggs.model.checkpoint import weight_files

    base_sd = {}
    for f in weight_files(tiny_bf16):
        base_sd.update(load_file(str(f)))
    model = load_model(tiny_bf16, dtype=torch.bfloat16)
    rep = apply_lora(model, r=4, alpha=16, seed=0)
    randomize_lora(model, std=0.05)
    ad = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_bf16))
    merge_lora(model)
    expect = model.state_dict()

    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "minihiggs.export", "--adapter", str(ad), "--out", str(out),
                           "--max_shard_size", "3MB"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= set(names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base_sd) and set(index["weight_map"].values()) == set(shards)
    got = {}
    for s in shards:
        got.update(load_file(str(out / s)))
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in got.values())
    assert (out / "config.json").read_bytes() == (tiny_bf16 / "config.json").read_bytes()
    targeted = {f"{p}.weight" for p in rep.modules}
    for k, v in base_sd.items():
        assert got[k].dtype == torch.bfloat16
        if k in targeted:
            assert torch.equal(got[k], expect[k]), k  # streaming merge == in-memory merge_lora, bitwise
            assert not torch.equal(got[k], v), k
        else:
            assert torch.equal(got[k], v), k
    again = load_model(out, dtype=torch.bfloat16)
    assert all(torch.equal(again.state_dict()[k], got[k]) for k in got)


def test_export_errors(tiny_bf16, tmp_path):
    from minihiggs import load_model

    model = load_model(tiny_bf16)
    apply_lora(model, r=2, alpha=2, targets=["q_proj"])
    ad = save_adapter(model, tmp_path / "ad")  # no base recorded
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        export_merged(ad, tmp_path / "out")
    sd = load_file(str(ad / ADAPTER_WEIGHTS))
    sd["base_model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(2, 32)
    sd["base_model.model.layers.0.mlp.up_proj.lora_B.weight"] = torch.zeros(48, 2)
    save_file(sd, str(ad / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="does not select"):
        export_merged(ad, tmp_path / "out", base=tiny_bf16)
    assert not (tmp_path / "out").exists()
    ok = save_adapter(model, tmp_path / "ok")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_merged(ok, out, base=tiny_bf16)
    export_merged(ok, out, base=tiny_bf16, overwrite=True, log=None)
    assert not (out / "stale.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    proc = subprocess.run([sys.executable, "-m", "minihiggs.export", "--adapter", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o2"), "--base", str(tiny_bf16)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


FSDP_SCRIPT = r"""
import os, sys, socket
sys.path[:0] = [sys.argv[1]]
import torch, torch.distributed as dist
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from toy_model import toy, toy_inputs, randomize_lora
from minihiggs.lora.apply import apply_lora, lora_state_dict, load_lora_state_dict, lora_modules
ref = toy(); apply_lora(ref, r=4, alpha=8); randomize_lora(ref)
want = lora_state_dict(ref)
# DDP: keys without the wrapper's `module.` prefix
assert list(lora_state_dict(DDP(ref))) == list(want)
# FSDP2: bf16 frozen base + fp32 LoRA in one group; state dicts gather / re-distribute DTensors
m = toy(); apply_lora(m, r=4, alpha=8)
for p in m.parameters():
    if not p.requires_grad:
        p.data = p.data.to(torch.bfloat16)
for layer in m.layers:
    fully_shard(layer)
fully_shard(m)
assert type(m.layers[0].self_attn.q_proj.lora_A.weight).__name__ == "DTensor"
load_lora_state_dict(m, want)
got = lora_state_dict(m)
assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
ids, audio, _ = toy_inputs()
m(ids, audio).float().square().mean().backward()
assert all(mod.lora_A.weight.grad is not None for n, mod in lora_modules(m).items() if "tower" not in n)
dist.destroy_process_group()
print("OK")
"""


def test_fsdp2_and_ddp_state_dicts(tmp_path):
    """Single-process gloo group: LoRA under FSDP2 (DTensor params) and DDP round-trips its state dict."""
    import os

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(REPO / "tests")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_lora_on_fused_text_head_is_refused(tmp_path):
    from minihiggs import collate, load_model
    from minihiggs.model.tiny import write_tiny_checkpoint
    from synth import synth_samples

    m = load_model(write_tiny_checkpoint(tmp_path / "c", hidden=32, heads=4, kv_heads=2, intermediate=48, layers=2,
                                         dual_layers=(0,)))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="text_lm_head .* is not supported"):  # up front, not at the forward
        apply_lora(m, r=2, alpha=4, targets=["audio_decoder_proj.text_lm_head"])
    assert not lora_modules(m) and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="text_lm_head .* is not supported"):  # PEFT semantics (load_adapter)
        apply_lora(m, r=2, alpha=4, targets=["text_lm_head"], peft=True)
    apply_lora(m, r=2, alpha=4, targets=["audio_decoder_proj.audio_lm_head"])  # the audio head is fine
    m(collate(synth_samples(1), m.config)).normalized().backward()
