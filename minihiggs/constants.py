"""Constants shared across the package (each written once).

Model-specific ids (special tokens, codebook sizes) are *not* here: they come from the checkpoint's config.json
(`minihiggs.config.HiggsConfig`).
"""

IGNORE_INDEX = -100  # label of a position that is not trained (PyTorch's cross_entropy default)

DEFAULT_BASE_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
DEFAULT_CODEC_REPO = "bosonai/higgs-audio-v2-tokenizer"

CODEC_SAMPLE_RATE = 24000  # the Higgs audio tokenizer's waveform rate
CODE_FRAMES_PER_SECOND = 25  # its frame rate (hop 960 at 24 kHz)
