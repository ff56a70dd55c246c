import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# CI machines have 2 cores; keep runs deterministic and comparable.
torch.set_num_threads(min(2, os.cpu_count() or 1))

N_TRAIN_SAMPLES = 40


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models gain nothing from a second thread, and when the cores are shared (CI neighbours, other
    jobs) spinning OpenMP threads make every step 10-50x slower. Restored afterwards for the other modules.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def higgs_dir(tmp_path_factory) -> Path:
    """The Higgs text tokenizer files: the test Llama-3 tokenizer.json with the Higgs special-token names."""
    from helpers import LLAMA_DIR

    from minihiggs.text.tokenizer import write_higgs_tokenizer

    return write_higgs_tokenizer(LLAMA_DIR, tmp_path_factory.mktemp("higgs_tok"))


@pytest.fixture(scope="session")
def tok(higgs_dir):
    """The Higgs text tokenizer (TextTokenizer) built from `higgs_dir`."""
    from minihiggs.text.tokenizer import TextTokenizer

    return TextTokenizer.from_dir(higgs_dir)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The training tests' random checkpoint (helpers.TINY) on disk."""
    from helpers import TINY

    from minihiggs.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, **TINY)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """A prepared directory of 40 synthetic samples (text, audio-in and audio-out of varied lengths)."""
    from helpers import make_shards
    from synth import synth_samples

    return make_shards(tmp_path_factory.mktemp("data") / "prepared", synth_samples(N_TRAIN_SAMPLES, seed=1))


def pytest_configure(config):
    config.addinivalue_line("markers", "extras: needs an optional extra (tensorboard, wandb, matplotlib); "
                                       "skipped without it, run by `make test-extras`")
    config.addinivalue_line("markers", "heavy: a slow end-to-end check kept out of `make test` (2-core CI time); "
                                       "run by `make test-heavy`")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, higgs_dir, tok):
    """Checkpoint directories as prep reads them (config.json + the Higgs tokenizer files; prep needs no weights):
    "ff" without a Whisper tower, "whisper" with one."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    from helpers import TOWER

    from minihiggs.model.tiny import tiny_config

    for name, config in (("ff", tiny_config()), ("whisper", tiny_config(audio_tower=TOWER))):
        d = root / name
        shutil.copytree(higgs_dir, d)
        (d / "config.json").write_text(json.dumps(config))
        out[name] = d
    out["tok"] = tok
    return out


@pytest.fixture(scope="module")
def codec_variant() -> Path:
    """Whichever real-architecture tokenizer golden variant exists (the first), with two of its clips."""
    from golden import CODEC_ROOT, variants

    found = variants(CODEC_ROOT)
    assert found, f"no tokenizer golden variant under {CODEC_ROOT}"
    v = found[0]
    assert len(sorted((v / "clips").glob("*.wav"))) >= 2, f"{v}: the voice-clone test needs two clips"
    return v


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory, codec_variant):
    from golden import materialized

    d = tmp_path_factory.mktemp("codec")
    shutil.copy(codec_variant / "config.json", d / "config.json")
    os.symlink(materialized(codec_variant), d / "model.safetensors")
    return d
