"""Higgs Audio v2 audio tokenizer (codec) in plain PyTorch: `AudioTokenizer.from_pretrained(...).encode/decode`."""

from .loading import DEFAULT_REPO, CheckpointError, CodecConfig
from .tokenizer import AudioTokenizer

__all__ = ["AudioTokenizer", "CheckpointError", "CodecConfig", "DEFAULT_REPO"]
