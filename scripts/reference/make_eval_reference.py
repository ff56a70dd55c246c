"""Golden vectors for the eval scorers (issue 17), made with transformers on tiny random models.

Run by hand in a separate venv (transformers is never a minihiggs dependency):

    python3 -m venv /work/venvs/ref17 && /work/venvs/ref17/bin/pip install torch==2.13.0
    /work/venvs/ref17/bin/pip install transformers safetensors numpy
    /work/venvs/ref17/bin/python scripts/reference/make_eval_reference.py --out tests/data/eval_reference

Writes one directory per set:
  whisper_*/  a WhisperForConditionalGeneration (save_pretrained: config.json, generation_config.json,
              model.safetensors) with a tiny byte-level BPE tokenizer (saved by transformers' WhisperTokenizer),
              `inputs.safetensors` (16 kHz waves, the HF log-mel's first 120 columns, decoder tokens) and
              `reference.safetensors` (every 5th encoder output row, decoder logits, greedy `generate` ids),
              `reference.json` (text encodings and decodings by the HF tokenizer, the greedy prompt).
  wavlm_sv*/  a WavLMForXVector and its Wav2Vec2FeatureExtractor (save_pretrained; do_normalize on in one set)
              with `inputs.safetensors` (raw waves) and `reference.safetensors` (per clip, run alone through the
              feature extractor and the model: every hidden state and the x-vector embedding).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

MAX_NEW = 24  # greedy generation's token limit
CORPUS = ("the quick brown fox jumps over the lazy dog. hello there, how are you today? "
          "this is a test of the whisper tokenizer and the speech recognition decoder. "
          "we're testing, aren't we? numbers like 20 and 1999 appear too.") * 3
TEXTS = ["Hello there, how are you today?", " the lazy dog's test", "Numbers: 20, 1999!", "über café ünïcode",
         "we're testing", "  two  spaces "]
SPECIALS = (["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|translate|>",
             "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
            + [f"<|{i * 0.02:.2f}|>" for i in range(4)])


def bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_bpe(n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny byte-level BPE: ids 0..255 the bytes in GPT-2 order, then one id per merge, in merge order."""
    import regex

    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    b2u = bytes_to_unicode()
    words = Counter(tuple(b2u[b] for b in w.encode()) for w in regex.findall(pat, CORPUS))
    vocab = {b2u[b]: i for i, b in enumerate(sorted(b2u, key=lambda b: list(b2u).index(b)))}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        vocab[a + b] = len(vocab)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return vocab, merges


def write_tokenizer(out: Path):
    from transformers import WhisperTokenizer

    vocab, merges = train_bpe(120)
    # A vocab entry no merge builds (as some released vocabularies hold): HF's BPE splits " spaces" anyway,
    # so the tiktoken side must leave it out of its ranks to agree.
    assert "Ġspaces" not in vocab
    vocab["Ġspaces"] = len(vocab)
    raw = out / "raw_tok"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = WhisperTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), unk_token="<|endoftext|>",
                           bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_tokens(SPECIALS[1:], special_tokens=True)
    tok.save_pretrained(out)
    shutil.rmtree(raw)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


def waves(seed: int, seconds: list[float]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in seconds:
        t = torch.arange(int(16000 * s)) / 16000
        f0 = 120 + 80 * torch.rand((), generator=g)
        w = 0.3 * torch.sin(2 * torch.pi * f0 * t) * (1 + torch.sin(2 * torch.pi * 3 * t))
        out.append((w + 0.02 * torch.randn(t.shape, generator=g)).float())
    return out


def generation_config(sid: dict, space: int, suppress: list[int], begin_extra: list[int]):
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=sid["<|startoftranscript|>"], eos_token_id=sid["<|endoftext|>"],
        pad_token_id=sid["<|endoftext|>"], bos_token_id=sid["<|endoftext|>"], max_length=40,
        suppress_tokens=suppress, begin_suppress_tokens=[space, sid["<|endoftext|>"]] + begin_extra,
        lang_to_id={k: sid[k] for k in ("<|en|>", "<|de|>", "<|fr|>")},
        task_to_id={"transcribe": sid["<|transcribe|>"], "translate": sid["<|translate|>"]},
        no_timestamps_token_id=sid["<|notimestamps|>"], is_multilingual=True, forced_decoder_ids=None)


def greedy(model, feats) -> torch.Tensor:
    """generate's ids after the prompt (it strips the prompt; finished rows are padded with <|endoftext|>)."""
    with torch.no_grad():
        gen = model.generate(feats, language="en", task="transcribe", max_new_tokens=MAX_NEW, do_sample=False,
                             num_beams=1, return_timestamps=False)
    return gen.sequences if hasattr(gen, "sequences") else gen


def build_whisper(tok, seed: int, eos_boost: float, feats: torch.Tensor):
    """A random tiny Whisper with its generation config, and its greedy ids on `feats`."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    sid = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    space = tok.convert_tokens_to_ids("Ġ")
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=128, d_model=32, encoder_layers=2,
                        encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=2, decoder_attention_heads=4,
                        decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=40,
                        pad_token_id=sid["<|endoftext|>"], bos_token_id=sid["<|endoftext|>"],
                        eos_token_id=sid["<|endoftext|>"], decoder_start_token_id=sid["<|startoftranscript|>"])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so outputs are far from the tolerance floor
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
        model.model.decoder.embed_tokens.weight[sid["<|endoftext|>"]] *= eos_boost
    model.generation_config = generation_config(sid, space, [sid["<|startofprev|>"]], [])
    # Suppress what this model would otherwise say (its most frequent token at every step, row 0's first token at
    # the first), so both suppression rules change the reference ids.
    first = greedy(model, feats)
    common = Counter(t for r in first.tolist() for t in r if t != sid["<|endoftext|>"]).most_common(1)[0][0]
    model.generation_config = generation_config(sid, space, [common, sid["<|startofprev|>"]], [int(first[0, 0])])
    return model, greedy(model, feats)


def make_whisper(out: Path, seed: int, eos_boost: float, eos_rows: int):
    """The first seed from `seed` on whose greedy decoding stops at <|endoftext|> in exactly `eos_rows` rows
    (0: every row runs to the token limit; 1 of 2: a batch with a finished and an unfinished row)."""
    from transformers import WhisperFeatureExtractor

    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ws = waves(seed, [1.0, 1.7])
    fe = WhisperFeatureExtractor(feature_size=128)
    feats = torch.from_numpy(fe([w.numpy() for w in ws], sampling_rate=16000, return_tensors="np").input_features)
    for s in range(seed, seed + 200):
        model, gen = build_whisper(tok, s, eos_boost, feats)
        if sum(eos in r or len(r) < MAX_NEW for r in gen.tolist()) == eos_rows:
            break
    else:
        raise RuntimeError(f"no seed in {seed}..{seed + 199} stops in {eos_rows} rows")
    model.save_pretrained(out)
    sid = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}

    g = torch.Generator().manual_seed(seed + 1)
    dec_tokens = torch.randint(0, len(tok), (2, 7), generator=g)
    with torch.no_grad():
        enc = model.model.encoder(feats).last_hidden_state
        logits = model(input_features=feats, decoder_input_ids=dec_tokens).logits
    prompt = [sid[s] for s in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")]
    save_file({"wave_0": ws[0], "wave_1": ws[1], "features_head": feats[:, :, :120].contiguous(),
               "decoder_tokens": dec_tokens}, out / "inputs.safetensors")
    save_file({"encoder_output_every_5th_row": enc[:, ::5].contiguous(), "decoder_logits": logits.contiguous(),
               "generated": gen.contiguous()}, out / "reference.safetensors")
    meta = {"prompt": prompt, "eos": sid["<|endoftext|>"], "max_new_tokens": MAX_NEW,
            "encodings": {t: tok.encode(t, add_special_tokens=False) for t in TEXTS},
            "transcripts": [tok.decode(r, skip_special_tokens=True) for r in gen.tolist()],
            "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    (out / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    print(out, "generated", gen.tolist())


def make_wavlm(out: Path, seed: int, weighted: bool, normalize: bool):
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    out.mkdir(parents=True, exist_ok=True)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                      use_weighted_layer_sum=weighted, tdnn_dim=(32, 32, 32, 32, 48), xvector_output_dim=16,
                      num_labels=3, feat_extract_norm="group", do_stable_layer_norm=False)
    torch.manual_seed(seed)
    model = WavLMForXVector(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "pos_conv" not in name:
                p.normal_(0, 0.2)
        if weighted:
            model.layer_weights.normal_(0, 1)
    model.save_pretrained(out)
    fe = Wav2Vec2FeatureExtractor(do_normalize=normalize, return_attention_mask=True)
    fe.save_pretrained(out)
    ws = waves(seed, [0.8, 2.5])  # 2.5 s = 124 frames: relative distances past the exact buckets (80)
    ref = {}
    with torch.no_grad():
        for i, w in enumerate(ws):
            x = torch.from_numpy(fe(w.numpy(), sampling_rate=16000, return_tensors="np").input_values)
            o = model(x, output_hidden_states=True)
            ref[f"embedding_{i}"] = o.embeddings[0].contiguous()
            for j, h in enumerate(o.hidden_states):
                ref[f"hidden_{i}_{j}"] = h[0].contiguous()
    save_file({f"wave_{i}": w for i, w in enumerate(ws)}, out / "inputs.safetensors")
    save_file(ref, out / "reference.safetensors")
    (out / "reference.json").write_text(json.dumps({"hidden_states": len(o.hidden_states),
                                                    "transformers": __import__("transformers").__version__}))
    print(out, "embedding norms", [float(ref[f"embedding_{i}"].norm()) for i in range(len(ws))])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/eval_reference")
    out = Path(ap.parse_args().out)
    make_whisper(out / "whisper_tiny", seed=0, eos_boost=1.0, eos_rows=0)
    make_whisper(out / "whisper_tiny_eos", seed=1, eos_boost=3.0, eos_rows=1)
    make_wavlm(out / "wavlm_sv_weighted", seed=0, weighted=True, normalize=True)
    make_wavlm(out / "wavlm_sv_last", seed=1, weighted=False, normalize=False)


if __name__ == "__main__":
    main()
