"""Offline data preparation: manifests -> tokenized, audio-coded, memory-mapped shards (`prep.py`).

`manifest` reads the manifest formats, `worker` turns one shard's entries into a shard, `pipeline` runs the
workers and writes the index (`prepare(PrepConfig(...))`).
"""

from .pipeline import PrepConfig, prepare, run_prep

__all__ = ["PrepConfig", "prepare", "run_prep"]
