"""ChatML -> ids/labels/audio order with the upstream rules, checked against the golden samples' layouts."""

import json

import pytest
from safetensors.torch import load_file

from golden import MODEL_ROOT, variants
from minihiggs.errors import ManifestError
from minihiggs.prep.plain_list import (NORMALIZED, SPEAKER, ListLayout, parse_plain_line, split_columns,
                                       voice_clone_references)
from minihiggs.text.chatml import (DEFAULT_SCENE, encode_chatml, expand_audio_in, parse_chatml, tts_sample,
                                   tts_system_prompt)

ROLE_IDS = {9125: "system", 882: "user", 78191: "assistant"}
IN_TRIPLE, OUT_TRIPLE = [128011, 128015, 128012], [128013, 128016, 128012]


class TableTokenizer:
    """The real tokenizer, except that the placeholder strings of the golden text runs map to their ids."""

    def __init__(self, tok, table):
        self.tok, self.table = tok, table

    def encode(self, s):
        return list(self.table[s]) if s in self.table else self.tok.encode(s)

    def token_id(self, name):
        return self.tok.token_id(name)


def messages_from_golden(ids, labels):
    """Rebuild the ChatML messages behind a golden sample: turn structure, audio triples, and text runs (as
    placeholder strings T<k> with their ids in a table)."""
    assert ids[0] == 128000
    i, msgs, table, untrained_assistant = 1, [], {}, []
    while i < len(ids):
        assert ids[i] == 128006 and ids[i + 2] == 128007 and ids[i + 3] == 271, ids[i:i + 4]
        role = ROLE_IDS[ids[i + 1]]
        i += 4
        content, run, lab_seen = [], [], []
        while ids[i] not in (128008, 128009):
            if ids[i:i + 3] in (IN_TRIPLE, OUT_TRIPLE):
                if run:
                    table[f"T{len(table)}"] = run
                    content.append({"type": "text", "text": f"T{len(table) - 1}"})
                    run = []
                content.append({"type": "audio", "audio_url": f"clip{i}.wav"})
                lab_seen += labels[i:i + 3]
                i += 3
            else:
                run.append(ids[i])
                lab_seen.append(labels[i])
                i += 1
        if run:
            table[f"T{len(table)}"] = run
            content.append({"type": "text", "text": f"T{len(table) - 1}"})
        lab_seen.append(labels[i])
        i += 1
        if role == "assistant" and all(x == -100 for x in lab_seen):
            untrained_assistant.append(len(msgs))
        msgs.append({"role": role, "content": content})
    start_index = max(untrained_assistant) + 1 if untrained_assistant else None
    return {"messages": msgs, "start_index": start_index}, table


def golden_samples():
    out = []
    for v in variants(MODEL_ROOT):
        if (v / "samples.json").is_file():
            for s in json.loads((v / "samples.json").read_text()):
                out.append((f"{v.name}-{s['index']}", v, s))
    return out


def test_golden_samples_found():
    assert golden_samples()


@pytest.mark.parametrize("name,variant,golden", golden_samples(), ids=[n for n, _, _ in golden_samples()])
def test_layout_matches_golden(tok, name, variant, golden):
    """The raw layout (one audio triple per clip) from the rebuilt messages; then, with each clip's chunk count
    (`code_segments`: >1 for a Whisper clip over 30 s), the layout the reference collator fed the model."""
    obj, table = messages_from_golden(golden["input_ids"], golden["label_ids"])
    enc = encode_chatml(parse_chatml(obj), TableTokenizer(tok, table))
    assert enc.input_ids == golden["input_ids"]
    assert enc.label_ids == golden["label_ids"]
    chunks = [a.get("code_segments", 1) for a in golden["audio"] if a["kind"] == "audio_in"]
    per_clip = iter(chunks)
    kinds = [k for a in enc.audio for k in (["audio_in"] * next(per_clip) if a.is_input else ["audio_out"])]
    assert kinds == golden["code_segment_kinds"]
    trained = [a.get("trained") for a in golden["audio"] if a["kind"] == "audio_out"]
    assert [a.trained for a in enc.audio if not a.is_input] == trained
    ids, labels = expand_audio_in(enc.input_ids, enc.label_ids, IN_TRIPLE[1], chunks)
    batch = load_file(str(variant / "batch.safetensors"))
    row, row_labels = batch["input_ids"][golden["index"]].tolist(), batch["label_ids"][golden["index"]].tolist()
    pad = json.loads((variant / "config.json").read_text())["pad_token_id"]
    assert row == ids + [pad] * (len(row) - len(ids))
    masked = [-100 if t == OUT_TRIPLE[1] else lab for t, lab in zip(ids, labels)]  # mask_audio_out_token_label
    assert row_labels == masked + [-100] * (len(row) - len(ids))


def test_full_rules_with_real_text(tok):
    obj = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say hi"}, {"type": "audio", "audio_url": "a.wav"}]},
        {"role": "assistant", "content": [{"type": "audio", "audio_url": "b.wav"}]},
        {"role": "assistant", "recipient": "tool", "content": "done"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": ["ok", {"type": "audio", "audio_url": "c.wav"}]},
    ], "start_index": 3, "speaker": "spk1"}
    enc = encode_chatml(parse_chatml(obj, "/data"), tok)
    E = tok.encode
    H = lambda r: E(f"<|start_header_id|>{r}<|end_header_id|>\n\n")  # noqa: E731
    M = -100
    ids = [128000] + H("system") + E("Be brief.") + [128009]
    lab = [M] * len(ids)
    part = H("user") + E("Say hi") + IN_TRIPLE + [128009]
    ids += part
    lab += [M] * len(part)
    part = H("assistant") + OUT_TRIPLE + [128008]  # next turn is the assistant's: eom; before start_index
    ids += part
    lab += [M] * len(part)
    rec = E("tool<|recipient|>")
    part = H("assistant") + rec + E("done") + [128009]
    ids += part
    lab += [M] * len(H("assistant")) + rec + E("done") + [128009]
    part = H("user") + E("again") + [128009]
    ids += part
    lab += [M] * len(part)
    part = H("assistant") + E("ok") + OUT_TRIPLE + [128009]
    ids += part
    lab += [M] * len(H("assistant")) + E("ok") + OUT_TRIPLE + [128009]
    assert enc.input_ids == ids
    assert enc.label_ids == lab
    assert [(a.role, a.trained, a.audio_url) for a in enc.audio] == [
        ("user", False, "/data/a.wav"), ("assistant", False, "/data/b.wav"), ("assistant", True, "/data/c.wav")]
    assert enc.speaker == "spk1"


def test_recipient_labelled_even_before_start_index(tok):
    # upstream labels the recipient tokens unconditionally
    obj = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "recipient": "r", "content": "a"},
                        {"role": "assistant", "content": "b"}], "start_index": 2}
    enc = encode_chatml(parse_chatml(obj), tok)
    rec = tok.encode("r<|recipient|>")
    i = enc.input_ids.index(128017) - len(rec) + 1
    assert enc.label_ids[i:i + len(rec)] == rec
    assert tok.encode("a")[0] in enc.input_ids and enc.label_ids[i + len(rec)] == -100


def test_system_audio_is_audio_in_and_speaker_from_misc(tok):
    obj = {"messages": [{"role": "system", "content": [{"type": "audio", "audio_url": "/x/v.wav"}]},
                        {"role": "user", "content": "t"},
                        {"role": "assistant", "content": {"type": "audio", "audio_codes": "c.npy"}}],
           "misc": {"speaker": "bob"}}
    enc = encode_chatml(parse_chatml(obj, "/base"), tok)
    assert enc.input_ids[5:8] == IN_TRIPLE
    assert enc.audio[0].is_input and enc.audio[0].audio_url == "/x/v.wav"
    assert enc.audio[1].audio_codes == "/base/c.npy" and enc.audio[1].trained
    assert enc.speaker == "bob"


@pytest.mark.parametrize("obj,kind,match", [
    ({"messages": [], "x": 1}, "unknown_field", "unknown field"),
    ({"messages": [{"role": "user", "content": "a", "name": "n"}]}, "unknown_field", "'name'"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio_url": "a", "gain": 2}]}]},
     "unknown_field", "'gain'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "a"}]}]}, "unknown_field", "image"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "invalid", "unknown role"),
    ({"messages": [{"role": "user", "content": "bad \ud800 text"}]}, "bad_text_encoding", "UTF-8"),
    ({"messages": [{"role": "user", "recipient": "x", "content": "a"}]}, "invalid", "recipient"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "missing_audio", "no 'audio_url'"),
    ({"messages": "hi"}, "invalid", "non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}], "start_index": "1"}, "invalid", "start_index"),
    ([1, 2], "invalid", "JSON object"),
    # an empty transcript (ingest --asr none, not reviewed) would train speech for no text
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": [
        {"type": "audio", "audio_url": "a.wav"}]}]}, "empty_text", "empty text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, "empty_text", "empty text"),
])
def test_invalid_samples(obj, kind, match):
    with pytest.raises(ManifestError, match=match) as e:
        parse_chatml(obj)
    assert e.value.kind == kind


def test_placeholder_in_text_is_rejected(tok):
    obj = {"messages": [{"role": "user", "content": "look <|AUDIO|> here"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(ManifestError, match="placeholder"):
        encode_chatml(parse_chatml(obj), tok)


def test_placeholder_in_recipient_is_rejected(tok):
    # every placeholder must have its audio item: one hidden in the recipient would shift all later clips
    obj = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "recipient": "x<|AUDIO_OUT|>", "content": [
                            {"type": "audio", "audio_url": "a.wav"}]}]}
    with pytest.raises(ManifestError, match="placeholder"):
        encode_chatml(parse_chatml(obj), tok)


def test_special_tokens_in_text_follow_upstream(tok):
    # the upstream HF tokenizer recognises special-token strings inside text; so do we (documented choice)
    obj = {"messages": [{"role": "user", "content": "a<|eot_id|>b"}, {"role": "assistant", "content": "c"}]}
    enc = encode_chatml(parse_chatml(obj), tok)
    assert enc.input_ids[5:8] == tok.encode("a") + [128009] + tok.encode("b")


def test_expand_audio_in_duplicates_triples():
    ids = [1, 128011, 128015, 128012, 2, 128013, 128016, 128012, 128011, 128015, 128012, 3]
    lab = [-100, -100, -100, -100, 2, 128013, 128016, 128012, -100, -100, -100, 3]
    out_ids, out_lab = expand_audio_in(ids, lab, 128015, [3, 1])
    assert out_ids == [1] + IN_TRIPLE * 3 + [2] + OUT_TRIPLE + IN_TRIPLE + [3]
    assert out_lab == [-100] * 10 + [2, 128013, 128016, 128012] + [-100] * 3 + [3]
    with pytest.raises(ValueError):
        expand_audio_in(ids, lab, 128015, [1])


def test_tts_prompt_is_upstream_text(tok):
    assert tts_system_prompt() == ("Generate audio following instruction.\n\n<|scene_desc_start|>\n"
                                   "Audio is recorded from a quiet room.\n<|scene_desc_end|>")
    assert tts_system_prompt(None) == "Generate audio following instruction."
    enc = encode_chatml(parse_chatml(tts_sample("Hello there.", "/a.wav")), tok)
    sys_ids = tok.encode("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + tts_system_prompt()
                         + "<|eot_id|>")
    assert enc.input_ids[:len(sys_ids)] == sys_ids
    assert 128018 in sys_ids and 128019 in sys_ids
    assert [a.trained for a in enc.audio] == [True]
    trained = [t for t in enc.label_ids if t != -100]
    assert trained == OUT_TRIPLE + [128009]


def test_voice_clone_layout(tok):
    obj = tts_sample("Target text.", "/t.wav", reference=("Reference text.", "/r.wav"), speaker="s")
    assert [m["role"] for m in obj["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert obj["start_index"] == 3
    enc = encode_chatml(parse_chatml(obj), tok)
    assert [(a.audio_url, a.trained, a.is_input) for a in enc.audio] == [("/r.wav", False, False),
                                                                         ("/t.wav", True, False)]
    assert [t for t in enc.label_ids if t != -100] == OUT_TRIPLE + [128009]
    assert enc.input_ids.count(128016) == 2
    assert DEFAULT_SCENE in tok.decode(enc.input_ids)


def test_plain_lines(tmp_path):
    """One line's columns read as its file's layout says (the layout itself: test_manifest_forms.py)."""
    (tmp_path / "wavs").mkdir()
    (tmp_path / "wavs" / "LJ001.wav").write_bytes(b"")
    lst = tmp_path / "metadata.csv"
    lj = ListLayout(lst, "|", NORMALIZED, 3)
    r = parse_plain_line(split_columns("LJ001|Raw text 1.|Normalized text one.", "|"), 3, lj)
    assert (r.line, r.sample_id, r.text, r.speaker) == (3, "LJ001", "Normalized text one.", None)
    assert r.audio == str(tmp_path / "wavs" / "LJ001.wav")
    r = parse_plain_line(["LJ002", "Only text"], 4, lj)
    assert r.text == "Only text" and r.audio == str(tmp_path / "wavs" / "LJ002.wav")
    r = parse_plain_line(split_columns("clips/a.flac|Hi there|alice", "|"), 5, ListLayout(lst, "|", SPEAKER, 3))
    assert (r.audio, r.text, r.speaker) == (str(tmp_path / "clips" / "a.flac"), "Hi there", "alice")
    cols = split_columns('b.wav, "Hello, world",bob', ",")
    assert cols == ["b.wav", "Hello, world", "bob"]
    r = parse_plain_line(cols, 6, ListLayout(lst, ",", SPEAKER, 3))
    assert (r.text, r.speaker) == ("Hello, world", "bob")
    with pytest.raises(ManifestError, match="2"):
        parse_plain_line(["lonely"], 7, lj)
    with pytest.raises(ManifestError) as e:
        parse_plain_line(["a.wav", ""], 8, lj)
    assert e.value.kind == "no_target"


def test_voice_clone_pairs_same_speaker_other_utterance(tmp_path):
    layout = ListLayout(tmp_path / "list.txt", "|", SPEAKER, 3)
    rows = [parse_plain_line([f"{s}{i}.wav", f"text {s}{i}", s], n, layout)
            for n, (s, i) in enumerate([("a", 0), ("b", 0), ("a", 1), ("a", 2), ("c", 0), ("b", 1)], 1)]
    ref = voice_clone_references(rows)
    for r in rows:
        p = ref[r.line]
        if r.speaker == "c":
            assert p is None
        else:
            assert p.speaker == r.speaker and p.line != r.line
    assert ref[1].line == 3 and ref[3].line == 4 and ref[4].line == 1 and ref[2].line == 6
