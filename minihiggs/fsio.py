"""Durable, atomic file-system writes: the one implementation every writer uses.

A file is written to a temporary sibling, flushed and fsync'ed, then renamed over the target (`os.replace` is
atomic on POSIX), and the directory is fsync'ed so the rename itself survives a power loss. A directory is
built in a temporary sibling and renamed into place the same way (`atomic_dir`). Readers therefore see either
the old or the new version, never a torn one. Temporaries carry a `.tmp-` marker so start-up code can remove
the leftovers of a killed process (`remove_stale`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError

TMP_MARK = ".tmp-"


def fsync_dir(d: str | os.PathLike) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms / file systems where a directory cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # (some file systems refuse fsync on a directory; the files' fsync still holds)
        pass
    finally:
        os.close(fd)


def fsync_tree(d: str | os.PathLike) -> None:
    """fsync every file under `d`, then the directories (deepest first), so the tree is durable."""
    d = Path(d)
    dirs = [d]
    for p in sorted(d.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for x in reversed(dirs):
        fsync_dir(x)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    seps = (",", ":") if indent is None else (",", ": ")
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent, separators=seps, default=str))


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `out_dir` by one rename.

    If `out_dir` already exists: with replace=False the files written are moved into it one by one (each by an
    atomic `os.replace`) and nothing else in it is touched, so e.g. a checkpoint directory keeps its other
    files; with replace=True the old directory is renamed away, the new one renamed in, the old one deleted.
    The files are fsync'ed before any rename. On an exception the temporary directory is removed and `out_dir`
    is left as it was.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result the usual permissions
    try:
        yield tmp
        fsync_tree(tmp)
        if not out.exists():
            os.replace(tmp, out)
        elif replace:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old{TMP_MARK}", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
            tmp.rmdir()
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_dir_atomically(d: str | os.PathLike) -> None:
    """Rename out of its namespace first (a crash mid-delete never leaves a half-deleted directory under its name),
    then delete."""
    d = Path(d)
    trash = d.with_name(f".{d.name}.del{TMP_MARK}{uuid.uuid4().hex[:8]}")
    d.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries (files or directories with the `.tmp-` marker) a killed writer left in `directory`.
    Returns what was removed. Only call this where no other process is writing."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if TMP_MARK in p.name:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def writing(path: str | os.PathLike, hint: str = "") -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a read-only file system, a parent that is a file) becomes an
    `OutputError` naming it: the user's to fix, and with atomic writes nothing written before is damaged."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})" + (f" ({hint})" if hint else "")) from e


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def make_readable(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain `open(..., "w")` would (0666 minus the umask): safetensors' writer
    creates files 0600, which others on a shared machine cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
