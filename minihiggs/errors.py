"""User errors: bad input that a person can fix, as opposed to bugs.

Every error caused by what a user handed us (a config, a checkpoint, shards, a manifest entry, a resume target,
an audio file, an adapter, generation prompts) is a `UserError`. Its message names the file, line or field and,
where there is one, what to do. The commands (`prep.py`, `train.py`, `python -m minihiggs.generate`,
`python -m minihiggs.export`) print such an error as one `<command>: error: <message>` line and exit with code 2;
anything else is a bug and keeps its traceback. Library code raises these, never `SystemExit`.

Each class also derives from the builtin exception that callers would have caught before (ValueError,
RuntimeError), so `except ValueError` around a config parse keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input; the message is meant to be shown as is, on one line."""


class ConfigError(UserError, ValueError):
    """A model/codec config.json field that is missing, malformed or unsupported."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory, weight file or Hub id that cannot be used."""


class AdapterError(UserError, ValueError):
    """A LoRA adapter directory that cannot be used (missing files, wrong base, bad weights)."""


class UnsupportedAdapterError(AdapterError, NotImplementedError):
    """An adapter feature this LoRA cannot reproduce exactly (DoRA, trained biases, PiSSA-style inits, ...)."""


class ShardError(UserError, RuntimeError):
    """A prepared directory or shard that does not match its index (the message names the file)."""


class ResumeError(UserError, RuntimeError):
    """A `--resume` target that does not exist or cannot continue this run exactly."""


class AudioError(UserError, ValueError):
    """An audio clip that cannot be used (missing, unreadable, empty, silent). The message names the file."""


class ManifestError(UserError, ValueError):
    """A manifest entry that cannot be used. `kind` is a short machine-readable category (prep_errors.jsonl)."""

    def __init__(self, reason: str, kind: str = "invalid"):
        super().__init__(reason)
        self.kind = kind


class PrepError(UserError, RuntimeError):
    """A fatal problem of a prep run (nothing usable, --strict with skipped entries, settings changed, ...)."""


class TrainConfigError(UserError, ValueError):
    """Training settings that cannot work together (e.g. no batch fits the data, --fsdp without torchrun)."""


class GenerateError(UserError, ValueError):
    """A generation request that cannot be served (missing reference, unknown sample id, empty text, ...)."""


class OutputError(UserError, OSError):
    """An output directory or file that cannot be written: not a directory, read-only, a full disk. The message
    names the path; what was written before (checkpoints, adapters) is intact, every write being atomic."""


class EvalError(UserError, ValueError):
    """An evaluation request that cannot be scored (unknown ASR language, no reference clip, bad prompt set, ...)."""


class IngestError(UserError, ValueError):
    """A folder of recordings that cannot be ingested (no recordings, a bad speaker map, changed settings, ...)."""
