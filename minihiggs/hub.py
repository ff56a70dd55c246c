"""The one place that turns "a local directory or a Hugging Face Hub repo id" into a local directory.

Used for the base checkpoint, the audio tokenizer, LoRA adapters and prep's tokenizer files. Rules:
* an existing directory is returned as is (no network);
* an existing file is an error (callers that accept a file handle it before calling);
* anything else must look like a repo id, `owner/name` or `owner/name@revision` (a branch, tag or commit; e.g.
  the pre-migration legacy files at `bosonai/higgs-audio-v2-generation-3B-base@10840182...`), and is fetched with
  `snapshot_download` restricted to `allow_patterns`, or found in the local cache. With `HF_HUB_OFFLINE=1` only
  the cache is looked at.
A miss is a `HubMissError` (a `CheckpointError` and a `FileNotFoundError`) that says how to get the files.

`resolved_revision(dir)` is the commit a resolved directory holds (the Hub cache's snapshot name), None for a local
directory: runs record it (train_args.json, prep's index.json, adapter_config.json `revision`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from .errors import CheckpointError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_REVISION = re.compile(r"[\w./-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubMissError(CheckpointError, FileNotFoundError):
    """A directory that does not exist, or a repo id that is neither cached nor downloadable."""


def is_repo_id(s: str) -> bool:
    return bool(_REPO_ID.fullmatch(s)) and ".." not in s and not s.endswith(".")


def split_revision(s: str) -> tuple[str, str | None]:
    """'owner/name@rev' -> ('owner/name', 'rev'); anything else -> (s, None)."""
    repo, at, rev = s.partition("@")
    if at and is_repo_id(repo) and _REVISION.fullmatch(rev) and ".." not in rev:
        return repo, rev
    return s, None


def resolved_revision(directory: str | os.PathLike) -> str | None:
    """The commit hash of a Hub-cache snapshot directory (`.../snapshots/<commit>`), None for any other directory."""
    p = Path(directory)
    return p.name if p.parent.name == "snapshots" and _COMMIT.fullmatch(p.name) else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_dir(path_or_repo: str | os.PathLike, *, what: str, allow_patterns: Sequence[str],
                revision: str | None = None, repo_type: str = "model") -> Path:
    """A local directory for `path_or_repo` (see the module docstring). `what` names it in errors ("checkpoint",
    "audio tokenizer", "adapter"). `revision` pins a Hub repo id given without `@revision`; `repo_type` "dataset"
    for a Hub dataset repo."""
    s = os.fspath(path_or_repo)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a {what} directory, got a file")
    repo, rev = split_revision(s)
    if rev is not None and revision is not None and rev != revision:
        raise HubMissError(f"{what} {s}: two revisions given ({rev!r} in the id, {revision!r} by flag)")
    rev = rev or revision
    if not is_repo_id(repo) or repo.startswith((".", "/", "~")):
        raise HubMissError(f"{what} {s}: does not exist (no such directory), and is not a Hub repo id "
                           "of the form 'owner/name' or 'owner/name@revision'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = hub_offline()
    at = f" --revision {rev}" if rev else ""
    try:
        return Path(snapshot_download(repo, revision=rev, allow_patterns=list(allow_patterns),
                                      local_files_only=offline, repo_type=repo_type))
    except LocalEntryNotFoundError as e:
        why = "downloads are off (HF_HUB_OFFLINE is set)" if offline else \
            "the Hub cannot be reached (HF_HUB_OFFLINE=0)"
        kind = f" --repo-type {repo_type}" if repo_type != "model" else ""
        raise HubMissError(
            f"{what} {s!r} is not in the local Hugging Face cache and {why}. Download it on a connected machine "
            f"with `huggingface-cli download {repo}{at}{kind} --include {' '.join(allow_patterns)}` (cache: "
            "$HF_HOME), "
            f"or pass a local directory.") from e
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, HTTP errors: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HubMissError(f"{what} {s!r}: the Hub refused it ({_plain(type(e).__name__)}: {first})") from e


def _plain(class_name: str) -> str:
    """'RevisionNotFoundError' -> 'revision not found' (what the user reads, not a class name)."""
    stem = class_name.removesuffix("Error").removesuffix("Exception")
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z][a-z]*|[a-z]+", stem)
    return " ".join(w if w.isupper() and len(w) > 1 else w.lower() for w in words) or "error"
