"""Generation parity with the upstream reference on every golden set under $MINIHIGGS_GOLDEN_GENERATE.

For every variant directory with a cases.json and every case in it: the prompt is rebuilt from the case's
messages with our prompt builder (must equal `prompt_input_ids`), the model generates with the case's
serve-engine arguments, and everything upstream recorded is compared: generated text tokens, raw audio columns
`audio_out.<i>`, reverted and decoded-ready codes `audio_codes.<i>`, per-iteration kinds / tokens / cache
lengths, per-audio-step selections, RAS rows and delay counters — all **exactly**; per-step raw logits and
processed scores within `golden.LOGITS_TOL` (relative + absolute). Also: our cached decoding equals a plain
full forward over the fed sequence; the whole case set decoded as one batch gives each row what it got alone;
the sampler probes (`sampler_probes.*`) and the fast-forward-layer-0 probe (`probes.json`, upstream's quirk 1).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from generate_helpers import Recorder, case_request, generate_variants, read_cases, teacher_forced
from golden import GENERATE_ROOT, LOGITS_TOL, Tol, assert_close, model_dir
from helpers import LLAMA_DIR
from minihiggs import load_model
from minihiggs.generate.engine import AUDIO, AUDIO_INIT, TEXT, Engine, Request
from minihiggs.generate.prompt import merge_prompt
from minihiggs.generate.sampling import AudioIds, DelayState, SamplingConfig, process, select_audio
from minihiggs.text.tokenizer import TextTokenizer, write_higgs_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = [v for v in generate_variants(GENERATE_ROOT) if (v / "init.json").is_file()]
CASES = [(v, c["name"]) for v in VARIANTS for c in read_cases(v)]
FIGURES: dict[str, float] = {}  # max |diff| per compared quantity over all cases (printed at the end)


def _note(what: str, diff: float) -> None:
    FIGURES[what] = max(FIGURES.get(what, 0.0), diff)


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: Tol = LOGITS_TOL) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    _note(what, float((ours.double() - ref.double()).abs().max()) if ours.numel() else 0.0)
    assert_close(ours, ref, what, tol)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if FIGURES:
        print("\ngeneration parity, max |diff| over all golden cases:")
        for k, v in sorted(FIGURES.items()):
            print(f"  {k:40s} {v:.3g}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return TextTokenizer.from_dir(write_higgs_tokenizer(LLAMA_DIR, tmp_path_factory.mktemp("tok")))


_MODELS: dict = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    def get(variant):
        if variant not in _MODELS:
            _MODELS[variant] = load_model(model_dir(variant, tmp_path_factory.mktemp("gen_ckpt")))
        return _MODELS[variant]

    yield get
    _MODELS.clear()


_ALONE: dict = {}  # (variant, case) -> (Generation, records): reused by the batch test


def _run_alone(variant, name, models, tok):
    key = (variant, name)
    if key not in _ALONE:
        case = next(c for c in read_cases(variant) if c["name"] == name)
        t = load_file(str(variant / f"{name}.safetensors"))
        req = case_request(case, t, tok)
        rec = Recorder()
        [gen] = Engine(models(variant)).generate([req], trace=rec)
        _ALONE[key] = (case, t, req, gen, rec.rows[0])
    return _ALONE[key]


def test_golden_sets_present():
    assert VARIANTS, f"no generation golden variants under {GENERATE_ROOT} (set $MINIHIGGS_GOLDEN_GENERATE)"
    assert CASES


@pytest.mark.parametrize("variant,name", CASES, ids=[f"{v.name}-{n}" for v, n in CASES])
def test_case(variant, name, models, tok):
    case, t, req, gen, records = _run_alone(variant, name, models, tok)
    model = models(variant)
    cfg = model.config

    # prompt and collation
    assert req.prompt.ids == case["prompt_input_ids"] == t["prompt_input_ids"].tolist()
    merged = merge_prompt(req.prompt, cfg)
    assert torch.equal(merged.columns, t["collated.audio_out_ids"].reshape(cfg.audio_num_codebooks, -1))

    # outputs
    assert gen.text_tokens == t["generated_text_tokens"].tolist()
    assert req.prompt.ids + gen.text_tokens == t["sequences"].tolist()
    n_seg = sum(1 for k in t if k.startswith("audio_out."))
    assert len(gen.audio) == n_seg
    for i, (a, codes) in enumerate(zip(gen.audio, gen.segment_codes())):
        assert torch.equal(a, t[f"audio_out.{i}"]), f"audio_out.{i}"
        assert torch.equal(codes, t[f"audio_codes.{i}"]), f"audio_codes.{i}"
    if n_seg:
        assert torch.equal(gen.codes(), t["audio_codes_concat"])
    assert gen.iterations == case["result"]["n_steps"]

    # per iteration
    kinds = [r["kind"] for r in records]
    assert kinds == t["step_kind"].tolist()
    assert [r["token"] for r in records] == t["step_next_text_token"].tolist()
    assert [r["past_seen"] for r in records] == t["step_past_seen"].tolist()
    assert [len(req.prompt.ids)] + [1] * (len(records) - 1) == t["step_n_input_ids"].tolist()

    # audio steps: selections, RAS, counters exact; raw logits and processed scores within tolerance
    audio_steps = [s for s, k in enumerate(kinds) if k == AUDIO]
    assert audio_steps == (t["audio_step_index"].tolist() if "audio_step_index" in t else [])
    if audio_steps:
        sel = [records[s]["selection"] for s in audio_steps]
        raw = torch.stack([records[s]["audio_logits"] for s in audio_steps])  # [Sa, K, C]
        assert torch.equal(torch.stack([x.tokens for x in sel]), t["audio_tokens"])
        assert torch.equal(torch.stack([x.pre_ras_tokens for x in sel]), t["audio_pre_ras_tokens"])
        assert torch.equal(torch.stack([x.ras_resampled for x in sel]), t["audio_ras_resampled"])
        none = -1
        d_in = [records[s]["delay_in"] for s in audio_steps]
        assert [d.num_delay for d in d_in] == t["audio_num_delay_in"].tolist()
        assert [none if d.num_remaining is None else d.num_remaining for d in d_in] == \
            t["audio_num_remaining_in"].tolist()
        assert [x.state.num_delay for x in sel] == t["audio_num_delay_out"].tolist()
        assert [none if x.state.num_remaining is None else x.state.num_remaining for x in sel] == \
            t["audio_num_remaining_out"].tolist()
        assert torch.equal(torch.isfinite(torch.stack([x.scores for x in sel])).sum(-1), t["audio_scores_kept"])
        assert torch.equal(raw.argmax(-1), t["audio_raw_argmax"])
        top2 = raw.topk(2, dim=-1).values
        _close(top2[..., 0], t["audio_raw_top1"], "audio_raw_top1")
        _close(top2[..., 1], t["audio_raw_top2"], "audio_raw_top2")
        _close(torch.logsumexp(raw, -1), t["audio_raw_logsumexp"], "audio_raw_logsumexp")
        idx = t["audio_logits_full_index"]
        _close(raw[idx], t["audio_logits_full"], "audio_logits_full")
        if "audio_scores_full" in t:
            ours = torch.stack([sel[i].scores for i in idx.tolist()])
            ref = t["audio_scores_full"]
            assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "processed scores: -inf at other places"
            fin = torch.isfinite(ref)
            _close(ours[fin], ref[fin], "audio_scores_full (finite)")

    # text and AUDIO_INIT steps: the text logits (AUDIO_INIT: computed upstream but ignored; we do not need
    # them, so they are recomputed here from the cached hidden state of that iteration)
    text_steps = [s for s, k in enumerate(kinds) if k in (TEXT, AUDIO_INIT)]
    assert text_steps == t["text_step_index"].tolist()
    head = model.audio_decoder_proj.text_lm_head
    with torch.no_grad():
        logits = torch.stack([records[s]["text_logits"][0] if records[s]["kind"] == TEXT
                              else head(records[s]["hidden"]).float() for s in text_steps])
    assert [records[s]["token"] for s in text_steps] == t["text_token"].tolist()
    _close(logits.gather(1, t["text_raw_top_ids"]), t["text_raw_top_values"], "text_raw_top_values")
    _close(logits.topk(t["text_raw_top_ids"].shape[1], dim=-1).values, t["text_raw_top_values"], "text_raw_top64")
    _close(torch.logsumexp(logits, -1), t["text_raw_logsumexp"], "text_raw_logsumexp")
    kept = torch.isfinite(process(logits, req.sampling)).sum(-1)
    assert torch.equal(kept, t["text_scores_kept"])

    # our cache == a plain forward over the fed sequence
    full, _ = teacher_forced(model, merged, records)
    with torch.no_grad():
        for s, r in enumerate(records):
            if r["kind"] == AUDIO:
                _close(r["audio_logits"], model.audio_logits(full[s:s + 1])[0], "cached vs full forward: audio")
            elif r["kind"] == TEXT:
                _close(r["text_logits"][0], head(full[s]).float(), "cached vs full forward: text")


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_batch_of_all_cases_equals_each_alone(variant, models, tok):
    """Every case of the set as one batch (different lengths, modes, sampling settings, generators and stop
    points): each row gets exactly its tokens alone, and its logits to float rounding."""
    names = [c["name"] for c in read_cases(variant)]
    alone = [_run_alone(variant, n, models, tok) for n in names]
    rec = Recorder()
    # fresh requests: a SamplingConfig's generator is created per generate call
    gens = Engine(models(variant)).generate([a[2] for a in alone], trace=rec)
    for b, ((case, _, _, ref, ref_rec), gen) in enumerate(zip(alone, gens)):
        assert gen.text_tokens == ref.text_tokens, case["name"]
        assert len(gen.audio) == len(ref.audio) and all(torch.equal(x, y) for x, y in zip(gen.audio, ref.audio))
        assert [r["past_seen"] for r in rec.rows[b]] == [r["past_seen"] for r in ref_rec]
        for r, q in zip(rec.rows[b], ref_rec):
            for key in ("audio_logits", "text_logits"):
                if q[key] is not None:
                    _close(r[key], q[key], f"batch vs alone: {key}")


@pytest.mark.parametrize("variant", VARIANTS[:1], ids=[v.name for v in VARIANTS[:1]])
def test_cpu_float32_bitwise_repeatable(variant, models, tok):
    """Sampled and greedy: a second run in the same process gives identical logits bit for bit."""
    cases = [c for c in read_cases(variant) if c["serve_engine_generate_args"]["temperature"] > 0][:1] + \
        [c for c in read_cases(variant) if c["serve_engine_generate_args"]["temperature"] == 0][:1]
    for case in cases:
        _, t, req, ref, ref_rec = _run_alone(variant, case["name"], models, tok)
        rec = Recorder()
        [gen] = Engine(models(variant)).generate([req], trace=rec)
        assert gen.text_tokens == ref.text_tokens and all(torch.equal(x, y) for x, y in zip(gen.audio, ref.audio))
        for r, q in zip(rec.rows[0], ref_rec):
            for key in ("audio_logits", "text_logits", "hidden"):
                if q[key] is not None:
                    assert torch.equal(r[key], q[key]), (case["name"], key)


# ---- direct probes of the audio-token selection ------------------------------------------------------------------
PROBE_FILE = GENERATE_ROOT / "sampler_probes.json"
PROBES = json.loads(PROBE_FILE.read_text())["probes"] if PROBE_FILE.is_file() else []


def test_sampler_probes_present():
    assert PROBES, f"no {PROBE_FILE}"


@pytest.mark.parametrize("probe", PROBES, ids=[p["name"] for p in PROBES])
def test_sampler_probe(probe):
    t = load_file(str(GENERATE_ROOT / "sampler_probes.safetensors"))
    n = probe["name"]
    proc = {p["kind"]: p["value"] for p in probe["processors"]}
    cfg = SamplingConfig(temperature=proc.get("temperature", 1.0) if probe["do_sample"] else 0.0,
                         top_k=proc.get("top_k"), top_p=proc.get("top_p", 1.0), ras_win_len=probe["ras_win_len"],
                         ras_win_max_num_repeat=probe["ras_win_max_num_repeat"], seed=probe["generator_seed"])
    assert [k for k, _ in cfg.processors()] == [p["kind"] for p in probe["processors"]]
    raw = t[f"{n}.raw_logits"]
    ids = AudioIds(raw.shape[0], 1024, 1025, 128016, 128012)
    sel = select_audio(raw, t[f"{n}.window"], DelayState(probe["num_delay_in"], probe["num_remaining_delays_in"]),
                       cfg, cfg.generator(), ids)
    assert torch.equal(sel.tokens, t[f"{n}.tokens"])
    assert torch.equal(sel.pre_ras_tokens, t[f"{n}.pre_ras_tokens"])
    assert torch.equal(sel.ras_resampled, t[f"{n}.ras_resampled"])
    assert torch.nonzero(sel.ras_resampled).reshape(-1).tolist() == probe["ras_resampled_rows"]
    assert sel.text_token == probe["next_text_token"]
    assert (sel.state.num_delay, sel.state.num_remaining) == (probe["num_delay_out"], probe["num_remaining_delays_out"])
    ref = t[f"{n}.scores"]
    assert torch.equal(torch.isinf(sel.scores), torch.isinf(ref))
    fin = torch.isfinite(ref)
    _close(sel.scores[fin], ref[fin], "sampler probes: scores")


# ---- upstream quirk 1: static cache with a fast-forward layer 0 ----------------------------------------------------
QUIRK_FILE = GENERATE_ROOT / "probes.json"
QUIRK_PROBES = list(json.loads(QUIRK_FILE.read_text()).items()) if QUIRK_FILE.is_file() else []


def test_cache_probes_present():
    assert QUIRK_PROBES, f"no {QUIRK_FILE}"


@pytest.mark.parametrize("name,probe", QUIRK_PROBES, ids=[n for n, _ in QUIRK_PROBES])
def test_fast_forward_layer0_positions_advance(name, probe, tmp_path, tok):
    """A model with the probe's layer types (fast-forward layer 0): positions advance with every fed column, as
    upstream's DynamicCache path does (its static cache repeats the prompt length), and every cached step
    equals a full forward over the fed sequence."""
    from minihiggs.generate.prompt import Prompt
    from minihiggs.model.tiny import write_tiny_checkpoint

    kinds = probe["layer_types"]
    dual = tuple(i for i, k in enumerate(kinds) if k == "dual-ffn")
    assert kinds[0] == "fast-forward" and len(dual) < len(kinds)
    model = load_model(write_tiny_checkpoint(tmp_path / "ck", seed=3, layers=len(kinds), dual_layers=dual))
    with torch.no_grad():  # logits O(10), as in the golden variants, so the greedy path moves around
        model.audio_decoder_proj.audio_lm_head.weight.mul_(20)
    p_len = probe["prompt_merged_length"]
    head = tok.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    tail = tok.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>")
    g = torch.Generator().manual_seed(0)
    prompt = head + torch.randint(0, 128000, (p_len - len(head) - len(tail),), generator=g).tolist() + tail
    steps = probe["dynamic"]["audio_columns"]
    rec = Recorder()
    [gen] = Engine(model).generate([Request(Prompt(prompt), SamplingConfig(temperature=0), steps)], trace=rec)
    expected = [0] + list(range(len(prompt), len(prompt) + steps - 1))
    assert [r["past_seen"] for r in rec.rows[0]] == expected
    assert expected == probe["dynamic"]["past_seen_per_step"]
    merged = merge_prompt(Prompt(prompt), model.config)
    full, _ = teacher_forced(model, merged, rec.rows[0])
    with torch.no_grad():
        for s, r in enumerate(rec.rows[0]):
            if r["kind"] == AUDIO:
                ref = model.audio_logits(full[s:s + 1])[0]
                _close(r["audio_logits"], ref, "fast-forward layer 0: cached vs full")
                assert torch.equal(r["audio_logits"].argmax(-1), ref.argmax(-1))
    assert len(set(map(tuple, gen.audio[0].T.tolist()))) > 2  # the columns do move (the check is not vacuous)
