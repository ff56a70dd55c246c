"""minihiggs: a lean, pure-PyTorch LoRA fine-tuning toolkit for Boson AI's Higgs Audio v2.

Names are imported lazily (PEP 562): `import minihiggs.shards` in a prep worker does not pay for the model stack.
"""

from importlib import import_module

_EXPORTS = {
    "Batch": "batch", "collate": "batch", "DEFAULT_REPO": "checkpoint", "load_model": "checkpoint",
    "HiggsConfig": "config", "LossSums": "loss", "HiggsAudioModel": "model", "Sample": "sample",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minihiggs' has no attribute {name!r}")
