"""minihiggs: a lean, pure-PyTorch LoRA fine-tuning toolkit for Boson AI's Higgs Audio v2."""

from .batch import Batch, collate
from .checkpoint import DEFAULT_REPO, load_model
from .config import HiggsConfig
from .loss import LossSums
from .model import HiggsAudioModel
from .sample import Sample

__all__ = ["Batch", "collate", "DEFAULT_REPO", "load_model", "HiggsConfig", "LossSums", "HiggsAudioModel", "Sample"]
