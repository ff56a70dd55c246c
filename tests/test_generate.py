"""Generation beyond the golden cases: the prompt builder, references, the other layer type, the command
(`python -m minihiggs.generate`: files, batching, adapters, one-line errors) and the decode-only codec."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from generate_helpers import Recorder, teacher_forced
from helpers import LLAMA_DIR, REPO, TINY, make_shards
from minihiggs import load_model
from minihiggs.data.batch import delay_pattern, revert_delay_pattern
from minihiggs.data.sample import Sample
from minihiggs.generate import Engine, Request, SamplingConfig, tts_prompt
from minihiggs.generate.__main__ import main as generate_main
from minihiggs.generate.engine import AUDIO, TEXT, Generation
from minihiggs.generate.prompt import Prompt, merge_prompt, reference_from_sample
from minihiggs.lora.adapter import save_adapter
from minihiggs.lora.apply import apply_lora
from minihiggs.model.tiny import write_tiny_checkpoint
from minihiggs.text.chatml import encode_chatml, parse_chatml, tts_sample
from minihiggs.text.tokenizer import TextTokenizer, write_higgs_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint with the Higgs tokenizer files next to it (what --base_ckpt points at)."""
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("gen") / "base", seed=0, **TINY)
    write_higgs_tokenizer(LLAMA_DIR, d)
    return d


@pytest.fixture(scope="module")
def tok(base):
    return TextTokenizer.from_dir(base)


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    from minihiggs.codec.tiny import write_random_decoder

    return write_random_decoder(tmp_path_factory.mktemp("codec") / "codec")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A LoRA adapter for `base` with non-zero weights (B is zero after init: the adapter would be a no-op)."""
    model = load_model(base)
    apply_lora(model, r=4, alpha=8, seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "final", base_model_name_or_path=str(base))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = generate_main(argv + ["--no_progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


NOTES = ("base: ", "adapter: ", "codec: ", "note: ")  # what generate says it loaded, before any error


def error_line(err: str) -> str:
    """The one `generate: error:` line, checked to be the last line of stderr after the loading notes only."""
    *notes, last = err.strip().splitlines()
    assert last.startswith("generate: error: ") and all(n.startswith(NOTES) for n in notes), err
    return last


# ---- prompts ------------------------------------------------------------------------------------------------------
def test_tts_prompt_is_the_training_layout_plus_the_serve_postfix(tok):
    """The voice-clone prompt = what prep writes for the same ChatML sample, minus the target audio turn, plus
    `<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>`."""
    ref = torch.randint(0, 1024, (8, 9))
    p = tts_prompt(tok, "Say this.", scene="A hall.", reference=("The reference text.", ref))
    obj = tts_sample("Say this.", "target.wav", scene="A hall.", reference=("The reference text.", "ref.wav"))
    enc = encode_chatml(parse_chatml(obj), tok)
    target = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n")
    cut = len(enc.input_ids) - 1 - enc.input_ids[::-1].index(target[0])  # the last assistant header
    assert p.ids == enc.input_ids[:cut] + target + [tok.token_id("<|audio_out_bos|>")]
    assert len(p.context_codes) == 1 and torch.equal(p.context_codes[0], ref)
    m = merge_prompt(p, load_model_cfg(tok))
    assert m.columns.shape == (8, 9 + 9) and int(m.discrete.sum()) == 18


def load_model_cfg(tok):
    from minihiggs.config import HiggsConfig
    from minihiggs.model.tiny import tiny_config

    return HiggsConfig.from_dict(tiny_config(**TINY))


def test_reference_from_a_prepared_sample(tok):
    codes = torch.randint(0, 1024, (8, 11))
    obj = tts_sample("The words of the sample.", "a.wav", scene="S.")
    enc = encode_chatml(parse_chatml(obj), tok)
    s = Sample(torch.tensor(enc.input_ids), torch.tensor(enc.label_ids), [codes], sample_id="x")
    text, got = reference_from_sample(s, tok, load_model_cfg(tok))
    assert text == tok.encode("The words of the sample.") and torch.equal(got, codes)


def test_revert_delay_pattern_inverts_the_delay_pattern():
    codes = torch.randint(0, 1024, (8, 13))
    assert torch.equal(revert_delay_pattern(delay_pattern(codes, 1024, 1025)), codes)
    gen = Generation("x", 1, [], [delay_pattern(torch.cat([torch.full((8, 1), 1024), codes,
                                                           torch.full((8, 1), 1025)], 1), 1024, 1025)], "", 0)
    assert torch.equal(gen.codes(), codes)  # BOS and EOS frames dropped, nothing else


# ---- the other layer type and batching on a random model --------------------------------------------------------
def test_dual_ffn_text_layers_cached_equals_full_forward(tmp_path, tok):
    """`dual_ffn` adapter type (non-dual layers are plain causal Llama layers that also see audio): the cached
    steps equal a full forward, in text and audio mode, with a reference segment in the prompt."""
    model = load_model(write_tiny_checkpoint(tmp_path / "ck", seed=5, adapter="dual_ffn", dual_layers=(1,), **{
        k: v for k, v in TINY.items() if k not in ("dual_layers",)}))
    with torch.no_grad():
        model.audio_decoder_proj.audio_lm_head.weight.mul_(20)
        model.audio_decoder_proj.text_lm_head.weight.mul_(20)
    prompt = tts_prompt(tok, "Hello.", reference=("Ref.", torch.randint(0, 1024, (8, 6))), force_audio=False)
    rec = Recorder()
    Engine(model).generate([Request(prompt, SamplingConfig(temperature=0.9, seed=3, top_k=5), 12)], trace=rec)
    prompt2 = tts_prompt(tok, "Hello.", force_audio=True)
    rec2 = Recorder()
    Engine(model).generate([Request(prompt2, SamplingConfig(temperature=0.9, seed=3), 12)], trace=rec2)
    for p, records in ((prompt, rec.rows[0]), (prompt2, rec2.rows[0])):
        full, _ = teacher_forced(model, merge_prompt(p, model.config), records)
        with torch.no_grad():
            for s, r in enumerate(records):
                if r["kind"] == AUDIO:
                    assert torch.allclose(r["audio_logits"], model.audio_logits(full[s:s + 1])[0], atol=1e-4)
                elif r["kind"] == TEXT:
                    assert torch.allclose(r["text_logits"][0], model.audio_decoder_proj.text_lm_head(full[s]),
                                          atol=1e-4)
    assert any(r["kind"] == TEXT for r in rec.rows[0]) and any(r["kind"] == AUDIO for r in rec2.rows[0])


def test_unsupported_prompts_are_user_errors(tok):
    from minihiggs.errors import GenerateError

    cfg = load_model_cfg(tok)
    with pytest.raises(GenerateError, match="empty"):
        tts_prompt(tok, "")
    with pytest.raises(GenerateError, match="audio-in"):
        merge_prompt(Prompt(tok.encode("<|audio_bos|><|AUDIO|><|audio_eos|>"), [torch.zeros(8, 2)]), cfg)
    with pytest.raises(GenerateError, match="placeholders"):
        merge_prompt(Prompt(tok.encode("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>")), cfg)


# ---- the command -----------------------------------------------------------------------------------------------
def test_speak_writes_wav_and_codes_like_the_engine(base, codec, tok, tmp_path, capsys):
    out = tmp_path / "hello.wav"
    code, stdout, err = run_cli(["--base_ckpt", str(base), "--codec", str(codec), "--text", "Hello there.",
                                 "--out", str(out), "--temperature", "0", "--max_new_frames", "40"], capsys)
    assert code == 0, err
    codes = np.load(tmp_path / "hello.npy")
    wave, sr = sf.read(out)
    assert sr == 24000 and codes.shape[0] == 8 and codes.shape[1] > 0 and len(wave) == codes.shape[1] * 960
    assert float(np.abs(wave).max()) > 0.01
    [gen] = Engine(load_model(base)).generate([Request(tts_prompt(tok, "Hello there."),
                                                       SamplingConfig(temperature=0), 40)])
    assert np.array_equal(codes, gen.codes().numpy())
    assert "wrote" in stdout and str(out) in stdout


def test_prompts_file_batched_equals_one_by_one(base, codec, tok, tmp_path, capsys):
    ref = tmp_path / "ref.npy"
    np.save(ref, np.random.default_rng(0).integers(0, 1024, (8, 12)))
    shard_obj = tts_sample("A sentence from the data.", "x.wav", scene="S.")
    enc = encode_chatml(parse_chatml(shard_obj), tok)
    shards = make_shards(tmp_path / "shards", [Sample(torch.tensor(enc.input_ids), torch.tensor(enc.label_ids),
                                                      [torch.randint(0, 1024, (8, 10))], sample_id="utt7")])
    lines = [{"text": "First one.", "name": "a"},
             {"text": "Second, with a reference.", "name": "b", "ref_codes": "ref.npy", "ref_text": "Ref words."},
             {"text": "Third, like a sample.", "name": "c", "ref_sample": "utt7", "seed": 5}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    outs = {}
    for bs in ("3", "1"):
        d = tmp_path / f"out{bs}"
        code, _, err = run_cli(["--base_ckpt", str(base), "--codec", str(codec), "--prompts", str(tmp_path / "p.jsonl"),
                                "--out_dir", str(d), "--shards", str(shards), "--batch_size", bs, "--seed", "1",
                                "--max_new_frames", "30"], capsys)
        assert code == 0, err
        outs[bs] = {n: np.load(d / f"{n}.npy") for n in "abc"}
        assert all((d / f"{n}.wav").is_file() for n in "abc")
    for n in "abc":
        assert np.array_equal(outs["3"][n], outs["1"][n]), n


def test_adapter_unmerged_equals_its_merged_export(base, codec, adapter, tmp_path, capsys):
    from minihiggs.lora.export import export_merged

    merged = tmp_path / "merged"
    export_merged(adapter, merged, log=None)
    args = ["--codec", str(codec), "--text", "Adapted.", "--temperature", "0", "--max_new_frames", "30"]
    c1, _, e1 = run_cli(["--adapter", str(adapter), "--out", str(tmp_path / "a.wav"), *args], capsys)  # recorded base
    c2, _, e2 = run_cli(["--base_ckpt", str(merged), "--out", str(tmp_path / "m.wav"), *args], capsys)
    c3, _, e3 = run_cli(["--base_ckpt", str(base), "--out", str(tmp_path / "b.wav"), *args], capsys)
    assert c1 == c2 == c3 == 0, (e1, e2, e3)
    a, m, b = (np.load(tmp_path / f"{n}.npy") for n in "amb")
    assert np.array_equal(a, m)
    assert not np.array_equal(a, b)  # the adapter changes the output (the comparison above is not vacuous)


@pytest.mark.parametrize("extra,message", [
    (["--text", "Hi.", "--ref_codes", "missing.npy", "--ref_text", "r"], "missing.npy: reference codes file not found"),
    (["--text", "Hi.", "--ref_codes", "bad.npy", "--ref_text", "r"], "bad.npy: not a readable .npy file"),
    (["--text", "Hi.", "--ref_audio", "missing.wav", "--ref_text", "r"], "missing.wav: audio file not found"),
    (["--text", "Hi.", "--ref_audio", "bad.wav", "--ref_text", "r"], "bad.wav: cannot decode audio"),
    (["--text", "Hi.", "--ref_codes", "good.npy"], "error: --ref_text: missing: the reference audio (ref_codes) needs"),
    (["--text", "Hi.", "--ref_audio", "bad.wav"], "error: --ref_text: missing: the reference audio (ref_audio) needs"),
    (["--text", "Hi.", "--ref_text", "r"], "error: --ref_text: a transcript without a reference audio"),
    (["--text", "Hi.", "--ref_codes", "good.npy", "--ref_sample", "x", "--ref_text", "r"],
     "error: --ref_sample: give one"),
    (["--text", "Hi.", "--ref_sample", "nope", "--shards", "SHARDS"], "unknown sample id 'nope'"),
    (["--text", ""], "tokenizes to nothing"),
    (["--text", "   "], None),  # whitespace is text to the tokenizer: no error
    (["--prompts", "p.jsonl", "--out_dir", "o"], "p.jsonl:2: unknown field(s) 'txt'"),
])
def test_one_line_errors(extra, message, base, codec, tok, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    np.save(tmp_path / "good.npy", np.zeros((8, 4), dtype=np.int64))
    (tmp_path / "p.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    if "SHARDS" in extra:
        enc = encode_chatml(parse_chatml(tts_sample("Words.", "x.wav")), tok)
        make_shards(tmp_path / "shards", [Sample(torch.tensor(enc.input_ids), torch.tensor(enc.label_ids),
                                                 [torch.zeros(8, 3, dtype=torch.long)], sample_id="only")])
        extra = [x.replace("SHARDS", str(tmp_path / "shards")) for x in extra]
    argv = ["--base_ckpt", str(base), "--codec", str(codec), "--out", "o.wav", "--max_new_frames", "12", *extra]
    code, _, err = run_cli(argv, capsys)
    if message is None:
        assert code == 0, err
        return
    assert code == 2 and message in error_line(err), err


def test_adapter_for_another_base_is_named(base, codec, adapter, tmp_path, capsys):
    other = write_tiny_checkpoint(tmp_path / "other", seed=1, **{**TINY, "hidden": 64, "intermediate": 96})
    write_higgs_tokenizer(LLAMA_DIR, other)
    code, _, err = run_cli(["--base_ckpt", str(other), "--adapter", str(adapter), "--codec", str(codec),
                            "--text", "Hi.", "--out", str(tmp_path / "x.wav")], capsys)
    line = error_line(err)
    assert code == 2 and "made for another base checkpoint" in line and str(base) in line and str(other) in line
    code, _, err = run_cli(["--adapter", str(tmp_path), "--codec", str(codec), "--text", "Hi.", "--out",
                            str(tmp_path / "x.wav")], capsys)
    assert code == 2 and "not a LoRA adapter directory" in error_line(err)


def test_an_adapter_refused_by_its_loader_keeps_its_own_message(base, codec, adapter, tmp_path, capsys, monkeypatch):
    """A UserError of the adapter loader (e.g. an adapter already merged into this checkpoint, or an unsupported
    PEFT feature) is shown as it is, not reworded as "made for another base checkpoint"."""
    import minihiggs.generate.loading as loading
    from minihiggs.errors import AdapterError

    def refuse(model, adir, **kw):
        raise AdapterError(f"{adir}: already merged into this checkpoint; stacking it twice would apply it twice")

    monkeypatch.setattr(loading, "load_adapter", refuse)
    code, _, err = run_cli(["--base_ckpt", str(base), "--adapter", str(adapter), "--codec", str(codec), "--text",
                            "Hi.", "--out", str(tmp_path / "x.wav")], capsys)
    assert code == 2 and error_line(err) == (f"generate: error: {adapter}: already merged into this checkpoint; "
                                             f"stacking it twice would apply it twice")


def test_command_runs_as_a_module(base, codec, tmp_path):
    """The real entry point (`python -m minihiggs.generate`), with a progress bar on stderr and a user error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env_cmd = [sys.executable, "-m", "minihiggs.generate", "--base_ckpt", str(base), "--codec", str(codec)]
    r = subprocess.run(env_cmd + ["--text", "Hi.", "--out", str(tmp_path / "x.wav"), "--max_new_frames", "12"],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x.wav").is_file() and "12/12" in r.stderr and "step/s" in r.stderr  # tqdm: steps counted
    assert "12 decoding steps, stop: max_new_tokens" in r.stdout
    r = subprocess.run(env_cmd + ["--text", "Hi.", "--out", str(tmp_path / "y.wav"), "--ref_codes", "nope.npy",
                                  "--ref_text", "x"], cwd=REPO, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 2 and error_line(r.stderr) == "generate: error: nope.npy: reference codes file not found"


def test_decode_only_codec_refuses_to_encode_and_is_strict(codec, tmp_path):
    from minihiggs.codec import AudioTokenizer, CheckpointError
    from safetensors.torch import load_file, save_file

    c = AudioTokenizer.from_pretrained(codec, decode_only=True)
    w = c.decode(torch.randint(0, 1024, (8, 5)))
    assert w.shape == (5 * 960,) and 0.01 < float(w.pow(2).mean().sqrt()) < 1.0
    with pytest.raises(RuntimeError, match="decode_only"):
        c.encode(np.zeros(24000, dtype=np.float32))
    with pytest.raises(CheckpointError, match="missing"):
        AudioTokenizer.from_pretrained(codec)  # a full load needs the encoder side
    sd = load_file(str(codec / "model.safetensors"))
    sd.pop("fc_post2.bias")
    (tmp_path / "c").mkdir()
    save_file(sd, str(tmp_path / "c" / "model.safetensors"))
    (tmp_path / "c" / "config.json").write_text((codec / "config.json").read_text())
    with pytest.raises(CheckpointError, match="fc_post2.bias"):
        AudioTokenizer.from_pretrained(tmp_path / "c", decode_only=True)


def test_reference_wav_is_encoded_with_the_full_codec(base, tok, tmp_path, capsys):
    """--ref_audio: the WAV is read, resampled to 24 kHz and encoded with --codec (the golden real-architecture
    tokenizer here); the result equals giving its codes with --ref_codes."""
    from golden import CODEC_ROOT, materialized, variants

    from minihiggs.audio.io import load_audio
    from minihiggs.codec import AudioTokenizer

    variant = variants(CODEC_ROOT)[0]
    d = tmp_path / "codec"
    d.mkdir()
    os.symlink(variant / "config.json", d / "config.json")
    os.symlink(materialized(variant), d / "model.safetensors")
    t = np.arange(16000) / 16000.0  # 1 s at 16 kHz (resampled like prep does)
    sf.write(tmp_path / "ref.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    codes = AudioTokenizer.from_pretrained(d).encode(load_audio(tmp_path / "ref.wav", 24000))
    np.save(tmp_path / "ref.npy", codes.numpy())
    common = ["--base_ckpt", str(base), "--codec", str(d), "--text", "Cloned.", "--ref_text", "A tone.",
              "--temperature", "0", "--max_new_frames", "16"]
    c1, _, e1 = run_cli([*common, "--ref_audio", str(tmp_path / "ref.wav"), "--out", str(tmp_path / "a.wav")], capsys)
    c2, _, e2 = run_cli([*common, "--ref_codes", str(tmp_path / "ref.npy"), "--out", str(tmp_path / "b.wav")], capsys)
    assert c1 == c2 == 0, (e1, e2)
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert codes.shape == (8, 25)


# ---- what generate says it loaded, and the codec a run was made with ------------------------------------------
def recorded_shards(tmp_path, tok, codec):
    """Prepared shards whose index.json records `codec`, as prep records the one it was run with."""
    enc = encode_chatml(parse_chatml(tts_sample("Words.", "x.wav")), tok)
    shards = make_shards(tmp_path / "shards", [Sample(torch.tensor(enc.input_ids), torch.tensor(enc.label_ids),
                                                      [torch.zeros(8, 3, dtype=torch.long)], sample_id="only")])
    index = json.loads((shards / "index.json").read_text())
    (shards / "index.json").write_text(json.dumps({**index, "codec": str(codec)}))
    return shards


def test_codec_defaults_to_the_one_recorded_with_the_shards(base, codec, tok, tmp_path, capsys):
    shards = recorded_shards(tmp_path, tok, codec)
    code, out, err = run_cli(["--base_ckpt", str(base), "--shards", str(shards), "--ref_sample", "only", "--text",
                              "Hi.", "--out", str(tmp_path / "x.wav"), "--max_new_frames", "12"], capsys)
    assert code == 0, err
    assert err.splitlines() == [f"base: {base.resolve()}",
                                f"codec: {codec.resolve()} (recorded in {(shards / 'index.json').resolve()})"]
    assert (tmp_path / "x.wav").is_file()


def test_codec_defaults_to_the_one_of_the_adapters_run(base, codec, adapter, tok, tmp_path, capsys, monkeypatch):
    """An adapter in a run directory (final/, best/ or checkpoints/step-N): the run's --sample_codec, else the codec
    recorded in its --train_manifest shards. The loaded base, adapter and codec are named, resolved."""
    import shutil

    shards = recorded_shards(tmp_path, tok, codec)
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "final")
    step = run / "checkpoints" / "step-00000004"
    shutil.copytree(adapter, step)
    (step / "train_args.json").write_text(json.dumps({"argv": [], "args": {"train_manifest": str(shards)}}))
    argv = ["--text", "Hi.", "--out", str(tmp_path / "x.wav"), "--max_new_frames", "12"]
    for adapter_dir in (run / "final", step):
        code, _, err = run_cli(["--adapter", str(adapter_dir), *argv], capsys)
        assert code == 0, err
        assert err.splitlines() == [
            f"base: {base.resolve()} (recorded in {adapter_dir.resolve() / 'adapter_config.json'})",
            f"adapter: {adapter_dir.resolve()}",
            f"codec: {codec.resolve()} (recorded in {(shards / 'index.json').resolve()})"]
    # the run's own --sample_codec comes first; one that is gone is named with where it was recorded
    gone = tmp_path / "gone_codec"
    (step / "train_args.json").write_text(json.dumps({"args": {"train_manifest": str(shards),
                                                               "sample_codec": str(gone)}}))
    code, _, err = run_cli(["--adapter", str(run / "final"), *argv], capsys)
    line = error_line(err)
    assert code == 2 and str(gone) in line and f"recorded in {(step / 'train_args.json').resolve()}" in line
    assert "--codec" in line
    # nothing records one (an adapter outside a run): the released tokenizer, named as the default in its error
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    code, _, err = run_cli(["--adapter", str(adapter), *argv], capsys)
    line = error_line(err)
    assert code == 2 and "bosonai/higgs-audio-v2-tokenizer" in line, line
    assert "(the audio tokenizer: the default, as neither --shards nor the adapter's run records one; " in line
    # an explicit --codec wins over every record
    code, _, err = run_cli(["--adapter", str(run / "final"), "--codec", str(codec), *argv], capsys)
    assert code == 0 and f"codec: {codec.resolve()} (--codec)" in err.splitlines()


def test_the_progress_bar_counts_decoding_steps_and_ends_where_generation_stops(base, codec, tmp_path, capsys,
                                                                                monkeypatch):
    """A generation that stops before --max_new_frames: the bar ends at its last step, not at 1 of 40."""
    import minihiggs.generate.speak as speak_mod

    audio_out = 128016  # <|AUDIO_OUT|>: the token of the first (AUDIO_INIT) step, made a stop token here
    monkeypatch.setattr(speak_mod, "stop_token_ids", lambda tok: (audio_out,))
    code, out, err = generate_main(["--base_ckpt", str(base), "--codec", str(codec), "--text", "Hi.", "--out",
                                    str(tmp_path / "x.wav"), "--max_new_frames", "40"]), *capsys.readouterr()
    assert code == 0, err
    states = [seg for seg in err.replace("\r", "\n").splitlines() if "speak:" in seg]  # each redraw of the bar
    assert "0/40 " in states[0] and "1/1 " in states[-1] and "step" in states[-1], err
    assert "1 decoding steps, stop: stop_token" in out
