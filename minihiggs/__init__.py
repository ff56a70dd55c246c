"""minihiggs: a lean, pure-PyTorch LoRA fine-tuning toolkit for Boson AI's Higgs Audio v2.

Sub-packages, imported only downward (each uses the ones above it, never below):

    errors, constants, hub, fsio, wrappers, config     shared foundations
    text, audio                                        text tokenizer + ChatML rules; audio I/O + log-mel
    codec                                              the Higgs audio tokenizer
    data                                               Sample, collate/Batch (delay pattern), shard format, dataset
    model                                              the Higgs model, Whisper tower, fused loss, checkpoint loading
    lora                                               hand-written LoRA, PEFT adapter files, merge/export
    metrics                                            the metric logger and its sinks, loss plots
    prep, train                                        what prep.py and train.py run

Names below are imported lazily (PEP 562): `import minihiggs.data.shards` in a prep worker does not pay for the
model stack.
"""

from importlib import import_module

_EXPORTS = {
    "Batch": "data.batch", "collate": "data.batch", "Sample": "data.sample",
    "DEFAULT_REPO": "model.checkpoint", "load_model": "model.checkpoint",
    "HiggsConfig": "config", "LossSums": "model.loss", "HiggsAudioModel": "model.higgs",
    "apply_lora": "lora.apply", "load_adapter": "lora.adapter", "save_adapter": "lora.adapter",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minihiggs' has no attribute {name!r}")
