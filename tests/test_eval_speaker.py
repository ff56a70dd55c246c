"""The WavLM x-vector speaker scorer against transformers' WavLMForXVector on tiny random models: every hidden
state and the embedding of each clip, for every set under tests/data/eval_reference whose model is WavLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minihiggs.errors import CheckpointError, ConfigError
from minihiggs.eval.speaker import SpeakerScorer, cosine, relative_buckets

REF = Path(__file__).resolve().parent / "data" / "eval_reference"
SETS = sorted(p.parent for p in REF.glob("*/config.json") if json.loads(p.read_text()).get("model_type") == "wavlm")


def close(got: torch.Tensor, want: torch.Tensor):
    # fp32 on both sides, other reduction orders (SDPA vs multi_head_attention_forward, conv vs unfold): a few
    # ulps that the layers grow to ~1e-6 of the tensor's scale; a wrong op moves values by >1e-2 of it.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.fixture(scope="module", params=SETS, ids=lambda p: p.name)
def ref(request):
    d = request.param
    return d, load_file(d / "inputs.safetensors"), load_file(d / "reference.safetensors"), SpeakerScorer(d)


def test_reference_sets_exist():
    assert SETS, f"no WavLM reference set under {REF}"


def test_hidden_states_and_embeddings_match(ref):
    """From the raw wave: the feature extractor's normalisation (where the set's preprocessor_config asks for
    it), every hidden state, the embedding."""
    _, inputs, out, sv = ref
    for i in range(len(inputs)):
        wave = inputs[f"wave_{i}"]
        with torch.no_grad():
            states = sv.model.wavlm(sv.prepare(wave)[None])
        n = len([k for k in out if k.startswith(f"hidden_{i}_")])
        assert len(states) == n
        for j, h in enumerate(states):
            close(h[0], out[f"hidden_{i}_{j}"])
        close(sv.embed(wave), out[f"embedding_{i}"])


def test_similarity_is_the_cosine_of_the_reference_embeddings(ref):
    _, inputs, out, sv = ref
    want = float(torch.nn.functional.cosine_similarity(out["embedding_0"], out["embedding_1"], dim=0))
    assert sv.similarity(inputs["wave_0"], inputs["wave_1"]) == pytest.approx(want, abs=1e-5)
    assert sv.similarity(inputs["wave_0"], inputs["wave_0"]) == pytest.approx(1.0, abs=1e-6)


def test_a_clip_shorter_than_the_receptive_field_still_embeds(ref):
    *_, sv = ref
    e = sv.embed(torch.randn(400) * 0.1)
    assert torch.isfinite(e).all() and e.shape == (sv.model.config.xvector_output_dim,)


def test_relative_buckets_by_hand():
    # 320 buckets, max distance 800: |d| < 80 is exact, keys after the query use the upper half (+160);
    # far buckets are log-spaced and capped at 159 (+160).
    b = relative_buckets(1000, 320, 800, "cpu")
    assert b[0, 0] == 0 and b[5, 3] == 2 and b[3, 5] == 162 and b[0, 79] == 239
    assert b[999, 0] == 159 and b[0, 999] == 319
    # distance 160 = 2 * 80: bucket 80 + log(2) / log(800 / 80) * (160 - 80) = 80 + 24.08 -> 104, +160 after the query
    assert b[0, 80] == 160 + 80 and b[0, 160] == 160 + 104


def test_cosine():
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine(torch.tensor([1.0, 1.0]), torch.tensor([-3.0, -3.0])) == pytest.approx(-1.0)


def test_unsupported_config_and_wrong_weights_are_refused(tmp_path):
    d = SETS[0]
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((d / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, do_stable_layer_norm=True)))
    with pytest.raises(ConfigError, match="do_stable_layer_norm"):
        SpeakerScorer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = load_file(d / "model.safetensors")
    sd.pop("projector.bias")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="projector.bias"):
        SpeakerScorer(tmp_path)
