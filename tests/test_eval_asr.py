"""The Whisper ASR scorer against transformers' WhisperForConditionalGeneration on tiny random models.

Every set under tests/data/eval_reference whose config.json is a Whisper one (scripts/reference/
make_eval_reference.py writes them in a separate venv): tokenizer ids, log-mel, encoder output, decoder logits
(in one pass and token by token through the KV cache), greedy `generate` ids and the decoded transcript.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minihiggs.audio.mel import log_mel_batch
from minihiggs.errors import ConfigError, EvalError
from minihiggs.eval.asr import Transcriber
from minihiggs.eval.whisper_text import load_whisper_tokenizer, prompt_ids, transcript

REF = Path(__file__).resolve().parent / "data" / "eval_reference"
SETS = sorted(p for p in REF.glob("*/config.json") if json.loads(p.read_text()).get("model_type") == "whisper")


def close(got: torch.Tensor, want: torch.Tensor):
    # Both sides are fp32 but reduce in other orders (SDPA vs eager matmul + softmax, fused GELU): differences of
    # a few ulps grow through the layers to ~1e-6 of the tensor's scale. 1e-4 relative plus 1e-5 of the largest
    # magnitude leaves room for that and still fails on any wrong op (those move values by >1e-2).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.fixture(scope="module", params=[p.parent for p in SETS], ids=lambda p: p.name)
def ref(request):
    d = request.param
    meta = json.loads((d / "reference.json").read_text())
    asr = Transcriber(d, max_new_tokens=meta["max_new_tokens"])
    return d, meta, load_file(d / "inputs.safetensors"), load_file(d / "reference.safetensors"), asr


def test_reference_sets_exist():
    assert SETS, f"no Whisper reference set under {REF}"


def waves(inputs):
    return [inputs[k] for k in sorted(k for k in inputs if k.startswith("wave_"))]


def test_tokenizer_ids_match_hf(ref, tmp_path):
    d, meta, *_ = ref
    tok = load_whisper_tokenizer(d)
    for text, ids in meta["encodings"].items():
        assert tok.encode(text, allow_special=False) == ids, text
        assert tok.decode(ids) == text
    assert prompt_ids(tok, "en") == meta["prompt"]
    with pytest.raises(EvalError, match="xx"):
        prompt_ids(tok, "xx")
    # The same vocabulary given as vocab.json + added_tokens.json (what older Whisper repos ship) gives the same ids.
    data = json.loads((d / "tokenizer.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    (tmp_path / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in data["added_tokens"]}))
    tok2 = load_whisper_tokenizer(tmp_path)
    for text, ids in meta["encodings"].items():
        assert tok2.encode(text, allow_special=False) == ids, text


def test_log_mel_matches_hf_feature_extractor(ref):
    _, _, inputs, _, _ = ref
    feats, _ = log_mel_batch(waves(inputs))
    head = inputs["features_head"]
    close(feats[:, :, :head.shape[2]], head)


def test_encoder_output(ref):
    _, _, inputs, out, asr = ref
    feats, _ = log_mel_batch(waves(inputs))
    with torch.no_grad():
        enc = asr.model.encode(feats)
    assert enc.shape[1] == 1500
    close(enc[:, ::5], out["encoder_output_every_5th_row"])


def test_decoder_logits_in_one_pass_and_through_the_cache(ref):
    _, _, inputs, out, asr = ref
    feats, _ = log_mel_batch(waves(inputs))
    tokens, want = inputs["decoder_tokens"], out["decoder_logits"]
    dec = asr.model.decoder
    with torch.no_grad():
        enc = asr.model.encode(feats)
        close(dec(tokens, dec.new_cache(enc, tokens.shape[1]), 0), want)
        caches = dec.new_cache(enc, tokens.shape[1])
        steps = [dec(tokens[:, :3], caches, 0)]  # a 3-token prefill, then one token at a time
        steps += [dec(tokens[:, i:i + 1], caches, i) for i in range(3, tokens.shape[1])]
    close(torch.cat(steps, 1), want)


def test_greedy_decoding_matches_generate(ref):
    _, meta, inputs, out, asr = ref
    feats, _ = log_mel_batch(waves(inputs))
    got = asr.decode_features(feats)
    for row, toks, eos in zip(out["generated"].tolist(), got.tokens, got.hit_eos):
        want = [t for t in row if t != meta["eos"]]  # generate pads finished rows with <|endoftext|>
        assert toks == want
        assert eos == (len(want) < meta["max_new_tokens"])


def test_transcribe_gives_the_hf_transcripts(ref):
    _, meta, inputs, _, asr = ref
    assert asr.transcribe(waves(inputs), batch_size=1) == [t.strip() for t in meta["transcripts"]]


def test_transcript_drops_special_tokens(ref):
    d, meta, *_ = ref
    tok = load_whisper_tokenizer(d)
    ids = meta["prompt"] + list(meta["encodings"].values())[0] + [meta["eos"]]
    assert transcript(tok, ids) == list(meta["encodings"])[0].strip()


def test_an_untied_output_head_is_refused(ref, tmp_path):
    d, *_ = ref
    from minihiggs.errors import CheckpointError
    from safetensors.torch import save_file

    for f in d.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    sd = load_file(d / "model.safetensors")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"] + 1
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="proj_out"):
        Transcriber(tmp_path)


def test_a_clip_over_30_s_is_transcribed_per_chunk(ref):
    _, _, inputs, _, asr = ref
    w = waves(inputs)[0].numpy()
    long = np.concatenate([np.tile(w, 31)[:480000], w[:8000]])  # 30 s + 0.5 s
    first, second = asr.transcribe([long[:480000]])[0], asr.transcribe([long[480000:]])[0]
    assert asr.transcribe([long]) == [" ".join(t for t in (first, second) if t)]


def test_an_80_mel_whisper_is_refused(ref, tmp_path):
    d, *_ = ref
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((d / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_mel_bins=80)))
    with pytest.raises(ConfigError, match="num_mel_bins=80"):
        Transcriber(tmp_path)
