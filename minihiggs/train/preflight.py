"""Up-front checks of what a run will write and read, before anything expensive (loading the model) happens:
every problem a user can fix is then one `train.py: error:` line within seconds, not a traceback minutes in.

The resume checkpoint (trainer state and adapter file) is checked by `checkpointing.load_trainer_state`, the
shards' contents by `ShardDataset` and `data.check_dataset`; this module holds the output directory, what
`--shards` names (prep's output, not a manifest) and the base checkpoint's configuration.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from ..config import HiggsConfig
from ..errors import ConfigError, OutputError, ShardError
from ..model.checkpoint import resolve_checkpoint


def check_shards_dir(shards: Path, out: Path) -> None:
    """`--shards` is a directory prep.py wrote (an index.json in it), and `--output_dir` is not it or inside it
    (run files would mix with the shards, and prep.py --overwrite would delete them)."""
    if shards.is_file():
        raise ShardError(f"--shards {shards}: a file, not the directory of shards prep.py writes; for a manifest, "
                         f"run prep.py first: python prep.py --manifest {shards} --out {shards.parent / 'shards'} "
                         f"--base_ckpt BASE, then train with --shards {shards.parent / 'shards'}")
    if not shards.is_dir():
        raise ShardError(f"--shards {shards}: no such directory (give the --out directory of prep.py; run "
                         f"prep.py first)")
    if not (shards / "index.json").is_file() and not any(shards.glob("shard-*.json")):
        raise ShardError(f"--shards {shards}: no index.json, not a directory prep.py wrote (give its --out "
                         f"directory; run prep.py first)")
    s, o = shards.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise OutputError(f"--output_dir {out}: is {'the' if o == s else 'inside the'} --shards directory {shards} "
                          f"(run files would mix with the shards; choose another --output_dir)")


def check_output_dir(out: Path) -> None:
    """`--output_dir` exists as a directory (created here) and accepts a file. Safe on every rank at once."""
    what = f"--output_dir {out}"
    if out.exists() and not out.is_dir():
        raise OutputError(f"{what}: exists and is not a directory (choose another --output_dir)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{what}: a part of the path is a file, not a directory (choose another "
                          f"--output_dir)") from None
    except OSError as e:
        raise OutputError(f"{what}: cannot create it ({e.strerror or e}) (choose a writable --output_dir)") from None
    probe = out / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"minihiggs")
    except OSError as e:
        hint = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable --output_dir"
        raise OutputError(f"{what}: not writable ({e.strerror or e}) ({hint})") from None
    finally:
        probe.unlink(missing_ok=True)


def read_model_config(base_ckpt: str) -> tuple[Path, HiggsConfig]:
    """The base checkpoint directory (a Hub id is fetched) and its parsed config.json, every field checked
    (`ConfigError` naming the field), the Whisper tower's settings included."""
    ckpt = resolve_checkpoint(base_ckpt)
    cfg = HiggsConfig.from_file(ckpt / "config.json")
    if cfg.has_audio_tower:
        from ..model.whisper import WhisperConfig

        try:
            WhisperConfig.from_dict(cfg.audio_encoder_config)
        except ConfigError as e:
            raise ConfigError(f"{ckpt / 'config.json'}: {e}") from None
    return ckpt, cfg
