"""`owner/name@revision` for Hub ids, and the resolved commit recorded (huggingface_hub is monkeypatched: no
network)."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
from test_layout_hf import SMALL

from minihiggs import load_model
from minihiggs.hub import HubMissError, resolve_dir, resolved_revision, split_revision
from minihiggs.lora.adapter import ADAPTER_CONFIG, recorded_base, save_adapter
from minihiggs.lora.apply import apply_lora
from minihiggs.model.tiny import write_tiny_checkpoint

COMMIT = "10840182ca4ad5d9d9113b60b9bb3c1ef1ba3f84"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download that records its call and answers with a cache-style snapshot holding a tiny model."""
    calls = []
    src = write_tiny_checkpoint(tmp_path / "src", seed=0, **SMALL)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, revision))
        snap = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        if not snap.exists():
            shutil.copytree(src, snap)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_split_revision():
    repo = "bosonai/higgs-audio-v2-tokenizer"
    assert split_revision(f"{repo}@9d4988fb") == (repo, "9d4988fb")
    assert split_revision("owner/name@refs/pr/3") == ("owner/name", "refs/pr/3")
    assert split_revision("owner/name") == ("owner/name", None)
    assert split_revision("./runs/a@b") == ("./runs/a@b", None)  # a path, not a repo id


def test_revision_reaches_the_hub_and_the_commit_is_recorded(fake_hub, tmp_path):
    d = resolve_dir(f"owner/model@{COMMIT[:8]}", what="checkpoint", allow_patterns=["*"])
    assert fake_hub == [("owner/model", COMMIT[:8])]
    assert resolved_revision(d) == COMMIT
    resolve_dir("owner/model", what="checkpoint", allow_patterns=["*"], revision="main")
    assert fake_hub[-1] == ("owner/model", "main")
    with pytest.raises(HubMissError, match="two revisions given"):
        resolve_dir("owner/model@v1", what="checkpoint", allow_patterns=["*"], revision="v2")


def test_local_directory_records_no_revision(tmp_path):
    d = tmp_path / "ckpt@v1"  # an '@' in a local directory name is not a revision
    d.mkdir()
    assert resolve_dir(str(d), what="checkpoint", allow_patterns=["*"]) == d
    assert resolved_revision(d) is None


def test_adapter_records_the_base_commit(fake_hub, tmp_path):
    model = load_model(f"owner/model@{COMMIT[:8]}")
    assert model.checkpoint_revision == COMMIT
    apply_lora(model, r=2, alpha=4, seed=0)
    ad = save_adapter(model, tmp_path / "ad", base_model_name_or_path=f"owner/model@{COMMIT[:8]}")
    cfg = json.loads((ad / ADAPTER_CONFIG).read_text())
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == ("owner/model", COMMIT)  # PEFT reads a plain id
    assert recorded_base(cfg) == f"owner/model@{COMMIT}"
    local = load_model(tmp_path / "src")
    apply_lora(local, r=2, alpha=4, seed=0)
    cfg = json.loads((save_adapter(local, tmp_path / "ad2", base_model_name_or_path=str(tmp_path / "src"))
                      / ADAPTER_CONFIG).read_text())
    assert cfg["revision"] is None and recorded_base(cfg) == str(tmp_path / "src")


def test_hub_refusal_names_no_internal_class(monkeypatch):
    from huggingface_hub.errors import RevisionNotFoundError

    def refuse(*a, **kw):
        e = RevisionNotFoundError.__new__(RevisionNotFoundError)  # (its constructor wants an HTTP response)
        Exception.__init__(e, "404 Client Error: Revision Not Found for url: https://huggingface.co/x")
        raise e

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(HubMissError) as e:
        resolve_dir("owner/model@nope", what="audio tokenizer", allow_patterns=["*"])
    msg = str(e.value)
    assert "revision not found" in msg and "Error" not in msg.split(":")[0]
    assert "HubMissError" not in msg and "RevisionNotFoundError" not in msg
