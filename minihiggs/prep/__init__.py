"""Offline data preparation: manifests -> tokenized, audio-coded, memory-mapped shards (`prep.py`).

`settings` holds the run's settings (`PrepConfig`), `manifest` and `plain_list` read the manifest formats into
entries, `worker` turns one shard's entries into a shard, `pool` runs shards in worker processes, `pipeline` runs
the steps (`prepare(PrepConfig(...))`).
"""

from .pipeline import prepare
from .settings import PrepConfig

__all__ = ["PrepConfig", "prepare"]
