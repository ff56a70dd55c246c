"""Every plain-list form through prep, checked sample by sample against the file: the stored transcript (the
token ids decoded back to text), the stored speaker, and with --voice_clone the reference's transcript and clip.

Was (issue 16): a `path|text|speaker` list without a header stored the speaker name as the transcript, speaker
null, and references of other speakers. Was (issue 21): an unquoted comma in a comma-separated transcript
split it into text and "speaker". Files that cannot be read one way only are refused, naming the line.
"""

from __future__ import annotations

import re

import pytest
import soundfile as sf
import torch

from helpers import NO_CODEC, errors_of, run, tone
from minihiggs.data.dataset import ShardDataset
from minihiggs.errors import PrepError

pytestmark = pytest.mark.usefixtures("one_thread")

# (id, speaker, text, normalized text): normalized differs from the text on two lines, so reading the wrong
# column shows; the transcripts are sentences and the speakers one token, as in LJSpeech and VCTK.
UTTERANCES = [
    ("amy_04", "amy", "These days a chicken leg is a rare dish.", "These days a chicken leg is a rare dish."),
    ("bob_01", "bob", "It cost $5 in 1999.", "It cost five dollars in nineteen ninety-nine."),
    ("amy_05", "amy", "Dr. Lee reads aloud.", "Doctor Lee reads aloud."),
    ("bob_02", "bob", "Rice is often served in round bowls.", "Rice is often served in round bowls."),
]
# The reference of each utterance under --voice_clone (index -> index): the next utterance of its speaker, in
# file order and cyclically; a list without speakers is one voice.
NEXT_OF_SPEAKER = {0: 2, 1: 3, 2: 0, 3: 1}
NEXT_IN_LIST = {0: 1, 1: 2, 2: 3, 3: 0}

# form -> (its line for an utterance, the transcript and speaker prep must store)
FORMS = {
    "id|text": (lambda u: f"{u[0]}|{u[2]}", lambda u: (u[2], None)),
    "id|text|normalized": (lambda u: f"{u[0]}|{u[2]}|{u[3]}", lambda u: (u[3], None)),
    "id|text|speaker": (lambda u: f"{u[0]}|{u[2]}|{u[1]}", lambda u: (u[2], u[1])),
    "path|text": (lambda u: f"wavs/{u[0]}.wav|{u[2]}", lambda u: (u[2], None)),
    "path|text|speaker": (lambda u: f"wavs/{u[0]}.wav|{u[2]}|{u[1]}", lambda u: (u[2], u[1])),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder with one short, distinct clip per utterance in wavs/ (where LJSpeech keeps them)."""
    d = tmp_path_factory.mktemp("lists")
    (d / "wavs").mkdir()
    for k, u in enumerate(UTTERANCES):
        sf.write(d / "wavs" / f"{u[0]}.wav", tone(24000, 0.12, f0=150.0 + 90 * k, seed=k), 24000)
    return d


def user_turns(tok, ids) -> list[str]:
    """The text of each user turn of a stored sample, decoded from its token ids."""
    text = tok.decode(ids.tolist())
    return re.findall(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", text, re.S)


def prepare_list(corpus, tmp_path, name: str, lines: list[str], **kw):
    path = corpus / name
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run(path, out, kw.pop("ckpt"), device="cpu", **kw)
    return out


@pytest.mark.parametrize("voice_clone", [False, True], ids=["plain", "voice_clone"])
@pytest.mark.parametrize("header", [False, True], ids=["no_header", "header"])
@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_stores_the_right_transcript_speaker_and_reference(form, header, voice_clone, corpus, ckpts,
                                                                      codec_dir, tmp_path):
    line_of, expect = FORMS[form]
    lines = ([form] if header else []) + [line_of(u) for u in UTTERANCES]
    out = prepare_list(corpus, tmp_path, f"{form.replace('|', '_')}{'_h' if header else ''}.txt", lines,
                       ckpt=ckpts["ff"], codec=str(codec_dir), voice_clone=voice_clone)
    assert errors_of(out) == []
    ds = ShardDataset(out)
    assert len(ds) == len(UTTERANCES)
    with_speakers = form.endswith("speaker")
    refs = NEXT_OF_SPEAKER if with_speakers else NEXT_IN_LIST
    tok = ckpts["tok"]
    for i, u in enumerate(UTTERANCES):
        text, speaker = expect(u)
        assert ds.record(i)["line"] == i + 1 + header
        assert ds.sample_ids[i] == line_of(u).split("|")[0]
        assert ds.speakers[i] == speaker, (form, i)
        turns = user_turns(tok, ds[i].input_ids)
        if not voice_clone:
            assert turns == [text], (form, i)
            assert len(ds[i].audio_codes) == 1
            continue
        r = refs[i]
        ref_text, ref_speaker = expect(UTTERANCES[r])
        assert ref_speaker == speaker and r != i
        assert turns == [ref_text, text], (form, i)
        # the reference clip is the reference line's own clip: its codes are that sample's target codes
        ref_codes, target_codes = ds[i].audio_codes
        assert torch.equal(ref_codes, ds[r].audio_codes[1]) and not torch.equal(ref_codes, target_codes)


# ------------------------------------------------------------------------------------ comma-separated lists
TEA = "I would like a cup of tea with milk, please."


@pytest.mark.parametrize("header", ["", "id,text"], ids=["no_header", "header"])
def test_quoted_commas_keep_the_transcript_whole(header, corpus, ckpts, codec_dir, tmp_path):
    """RFC 4180 quoting: a transcript with commas in double quotes is one column."""
    lines = ([header] if header else []) + [f"amy_04,{UTTERANCES[0][2]}", f'bob_01,"{TEA}"']
    out = prepare_list(corpus, tmp_path, "metadata.csv", lines, ckpt=ckpts["ff"], codec=str(codec_dir))
    ds = ShardDataset(out)
    assert [user_turns(ckpts["tok"], ds[i].input_ids) for i in range(2)] == [[UTTERANCES[0][2]], [TEA]]
    assert ds.speakers == [None, None]


@pytest.mark.parametrize("header", ["", "id,text", "id,text,speaker"], ids=["no_header", "header", "header3"])
def test_an_unquoted_comma_that_may_split_a_transcript_is_refused(header, corpus, ckpts, tmp_path):
    """Was: stored as text 'I would like a cup of tea with milk' and speaker 'please.'; the next line got speaker
    null. Refused whole, naming the line and showing how it splits."""
    tea = f"bob_01,{TEA}" + (",bob" if header.endswith("speaker") else "")
    lines = ([header] if header else []) + [f"amy_04,{UTTERANCES[0][2]}" + (",amy" if header.endswith("speaker")
                                                                           else ""), tea]
    path = corpus / "metadata.csv"
    with pytest.raises(PrepError) as e:
        prepare_list(corpus, tmp_path, "metadata.csv", lines, ckpt=ckpts["ff"])
    msg = str(e.value)
    n = 1 + bool(header)
    assert msg.startswith(f"{path}:{n + 1}: ") and "\n" not in msg
    assert "'bob_01' | 'I would like a cup of tea with milk' | 'please.'" in msg
    assert "quote" in msg and not (tmp_path / "out").exists()  # refused before --out is made


# ---------------------------------------------------------------------------------------- ambiguous lists
@pytest.mark.parametrize("lines,line,shown", [
    (["wavs/amy_04.wav|Hello|amy", "wavs/bob_01.wav|Goodbye|bob"], 1, "'wavs/amy_04.wav|Hello|amy'"),
    (["wavs/amy_04.wav|These days a chicken leg is a rare dish.|amy",
      "wavs/bob_01.wav|It cost $5.|It cost five dollars."], 1, "'amy'"),
    (["amy_04|These days a chicken leg is a rare dish.|amy", "bob_01|Rice is served.|bob|extra"], 2,
     "'bob_01' | 'Rice is served.' | 'bob' | 'extra'"),
    (["id|text", "amy_04|These days a chicken leg is a rare dish.|amy"], 2,
     "'amy_04' | 'These days a chicken leg is a rare dish.' | 'amy'"),
], ids=["one_word_transcripts", "speaker_and_normalized", "four_columns", "more_columns_than_the_header"])
def test_ambiguous_list_is_refused_naming_the_line(lines, line, shown, corpus, ckpts, tmp_path):
    with pytest.raises(PrepError) as e:
        prepare_list(corpus, tmp_path, "amb.txt", lines, ckpt=ckpts["ff"])
    msg = str(e.value)
    assert msg.startswith(f"{corpus / 'amb.txt'}:{line}: ") and shown in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------ ChatML manifests
def readme_chatml_lines() -> list[str]:
    """The ChatML example lines of the README (what a new user copies)."""
    from helpers import REPO

    return [ln for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith('{"') and '"messages"' in ln]


def test_the_readme_chatml_lines_prepare_as_written(corpus, ckpts, codec_dir, tmp_path, capsys):
    import json

    import prep

    lines = readme_chatml_lines()
    assert len(lines) >= 2, "the README shows a TTS line and a voice-clone line"
    for k, url in enumerate(sorted(set(re.findall(r'"audio_url": "([^"]+)"', "\n".join(lines))))):
        if not (corpus / url).exists():  # (a clip the corpus lacks: the README's lines, given their audio files)
            sf.write(corpus / url, tone(24000, 0.12, f0=400.0 + 30 * k, seed=100 + k), 24000)
    out = prepare_list(corpus, tmp_path, "train.jsonl", lines, ckpt=ckpts["ff"], codec=str(codec_dir))
    assert errors_of(out) == []
    ds = ShardDataset(out)
    assert len(ds) == len(lines)
    for i, obj in enumerate(map(json.loads, lines)):
        users = [m["content"] for m in obj["messages"] if m["role"] == "user"]
        assert user_turns(ckpts["tok"], ds[i].input_ids) == users
        assert ds.speakers[i] == obj.get("speaker") and ds.sample_ids[i] == obj["id"]
        assert len(ds[i].audio_codes) == len(users)
    # --voice_clone pairs the lines of a plain list; on a ChatML manifest it would do nothing: refused (was: ignored)
    argv = ["--manifest", str(corpus / "train.jsonl"), "--out", str(tmp_path / "vc"), "--base_ckpt", str(ckpts["ff"]),
            "--codec", NO_CODEC, "--voice_clone", "--no_progress"]
    assert prep.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"prep: error: {corpus / 'train.jsonl'}: --voice_clone applies to plain lists (.csv / .tsv / .txt / "
                   ".list) only; in a ChatML manifest each sample gives its reference in its messages: drop "
                   "--voice_clone")
    assert not (tmp_path / "vc").exists()
