"""Locating the golden reference sets and materialising their weights into a cache outside ../shared.

Sets are found through $MINIHIGGS_GOLDEN (model variants), $MINIHIGGS_GOLDEN_CODEC (tokenizer variants),
$MINIHIGGS_GOLDEN_WHISPER (log-mel features) and $MINIHIGGS_GOLDEN_GENERATE (generation cases); defaults are the
folders under ../shared/golden. The released checkpoints' small files (config.json, the weight index, tokenizer
files; no weights) are found through $MINIHIGGS_REAL (default ../shared/real; `released_models`,
`released_codecs`). Weights are
regenerated with the set's own materialize.py into $MINIHIGGS_CACHE (default: <repo>/.cache/golden), keyed by
the sha256 of init.json so a changed set is never served stale weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_GOLDEN = REPO.parent / "shared" / "golden"


# ---- float32 parity tolerances ------------------------------------------------------------------------------
# Ours and the reference both compute in float32 but sum in other orders (other GEMM kernels and blockings, chunked
# loss heads, another attention backend, B rows instead of one), so a value differs by a few rounding errors of the
# terms it sums: a part that grows with the value's magnitude (one float32 ulp is 2^-23 ~ 1.2e-7 of it) and, for
# values near 0, an absolute part left by cancellation of larger terms. So every check is relative + absolute,
# |ours - ref| <= atol + rtol * |ref| (torch.testing.assert_close), never a bare absolute bound that a set with
# larger values (losses of 19, logits of 55) would break on another machine's summation order.

@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float
    # a further absolute part, as a fraction of the compared tensor's largest |ref|: a value near 0 computed from the
    # same terms as the largest one (a row of logits) carries rounding errors of their size, not of its own
    of_max: float = 0.0


# Hidden states, tower outputs, logits vs the reference forward: the golden README's recommendation (§3.7).
TENSOR_TOL = Tol(rtol=1e-4, atol=1e-5)
# Losses (means of logsumexp - target logit, 7 to 19 here): ~80 fp32 ulps relative. The float64 recomputation of
# the reference's own losses differs by up to 2.3e-6 (README §3.7); a wrong loss definition moves them by >= 1e-2.
LOSS_TOL = Tol(rtol=1e-5, atol=1e-6)
# Generation logits / scores (up to ~55 on the text head): ~80 ulps relative, plus ~8 ulps of the largest logit for
# the small ones. Measured: <= 1.2e-5 between upstream's own cached and full forwards (generate README §6), 1.5e-5
# between a row batched and alone on other sets; a wrong cache slot or position moves them by O(0.1).
LOGITS_TOL = Tol(rtol=1e-5, atol=1e-5, of_max=1e-6)


def assert_close(ours, ref, what: str, tol: Tol) -> float:
    """`ours` within `tol` of `ref` (same shape, compared in float64); returns the max |diff| (for reports)."""
    import torch

    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    finite = ref[ref.isfinite()]
    atol = tol.atol + (tol.of_max * float(finite.abs().max()) if finite.numel() else 0.0)
    torch.testing.assert_close(ours, ref, rtol=tol.rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    return float((ours - ref).abs().max()) if ours.numel() else 0.0


def golden_root(env: str, default: Path) -> Path:
    return Path(os.environ.get(env, str(default)))


MODEL_ROOT = golden_root("MINIHIGGS_GOLDEN", SHARED_GOLDEN / "model")
CODEC_ROOT = golden_root("MINIHIGGS_GOLDEN_CODEC", SHARED_GOLDEN / "tokenizer")
WHISPER_ROOT = golden_root("MINIHIGGS_GOLDEN_WHISPER", SHARED_GOLDEN / "whisper_features")
REAL_ROOT = golden_root("MINIHIGGS_REAL", REPO.parent / "shared" / "real")
# Facts of the transformers-native layout, gathered independently of this code (its README): key maps from the
# legacy names (ours) to the new ones and the new keys' shapes.
REAL_HF_ROOT = golden_root("MINIHIGGS_REAL_HF", REPO.parent / "shared" / "real-hf")
GENERATE_ROOT = golden_root("MINIHIGGS_GOLDEN_GENERATE", SHARED_GOLDEN / "generate")
CACHE = Path(os.environ.get("MINIHIGGS_CACHE", str(REPO / ".cache" / "golden")))


def variants(root: Path) -> list[Path]:
    """Every directory under `root` holding an init.json (a materialisable variant), sorted."""
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob("*/init.json"))


def released_models(root: Path = REAL_ROOT) -> list[Path]:
    """Released model checkpoints under `root`: directories with a config.json and a model.safetensors.index.json."""
    return sorted(p.parent for p in root.glob("*/model.safetensors.index.json") if (p.parent / "config.json").is_file())


def released_codecs(root: Path = REAL_ROOT) -> list[Path]:
    """Released audio tokenizers under `root`: directories whose config.json is a codec config (it has `n_q`)."""
    return sorted(p.parent for p in root.glob("*/config.json") if "n_q" in json.loads(p.read_text()))


def find_materialize(variant_dir: Path) -> Path:
    """materialize.py lives at the top of the golden tree; walk up from the variant to find it."""
    for parent in [variant_dir, *variant_dir.parents]:
        cand = parent / "materialize.py"
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no materialize.py above {variant_dir}")


def materialized(variant_dir: Path) -> Path:
    """Path of the variant's model.safetensors in the cache, generating it once (process-safe)."""
    variant_dir = Path(variant_dir)
    digest = hashlib.sha256((variant_dir / "init.json").read_bytes()).hexdigest()[:16]
    out = CACHE / f"{variant_dir.parent.name}-{variant_dir.name}-{digest}" / "model.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            tmp = out.with_suffix(".tmp.safetensors")
            subprocess.run([sys.executable, str(find_materialize(variant_dir)), str(variant_dir), "--out", str(tmp)],
                           check=True, stdout=subprocess.DEVNULL)
            os.replace(tmp, out)
    return out


def audio_in_chunks(raw: dict, config: dict) -> list[int] | None:
    """Chunks of each audio-in clip of one raw sample as the reference collator counts them: with
    `encode_whisper_embed`, ceil(16 kHz samples / 480000) (librosa resamples to ceil(n * 16000 / rate) samples);
    without, the collator never chunks (None)."""
    from minihiggs.audio.mel import CHUNK_SAMPLES

    if not config.get("encode_whisper_embed"):
        return None
    starts = raw["audio_waveforms_start"].tolist()
    ends = starts[1:] + [raw["audio_waveforms_concat"].numel()]
    rates = raw["audio_sample_rate"].tolist()
    n16 = [e - s if int(r) == 16000 else math.ceil((e - s) * 16000 / r) for s, e, r in zip(starts, ends, rates)]
    return [max(1, math.ceil(n / CHUNK_SAMPLES)) for n in n16]


def golden_samples(variant_dir: Path) -> list:
    """The variant's raw samples (samples.safetensors) as minihiggs `Sample`s in the upstream layout: code
    segments in placeholder order, and for a Whisper clip over 30 s one `<|AUDIO|>` with one segment per chunk
    (`audio_in_chunks`, README quirk 17), which `collate` expands as the reference collator does.

    Whisper features (tower variants) are taken from the collated batch.safetensors rows, in the order the
    reference fed them, so model parity is tested independently of the log-mel implementation.
    """
    from safetensors.torch import load_file

    from minihiggs.data.sample import Sample

    variant_dir = Path(variant_dir)
    config = json.loads((variant_dir / "config.json").read_text())
    raw = load_file(str(variant_dir / "samples.safetensors"))
    batch = load_file(str(variant_dir / "batch.safetensors"))
    n = len({k.split(".")[0] for k in raw})
    feats = batch.get("audio_features")
    fmask = batch.get("audio_feature_attention_mask")
    chunk = 0
    out = []
    for i in range(n):
        g = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(f"sample{i}.")}
        starts = g["audio_ids_start"].tolist()
        concat = g["audio_ids_concat"]
        ends = starts[1:] + [concat.shape[1]]
        codes = [concat[:, s:e].clone() for s, e in zip(starts, ends)]
        s = Sample(input_ids=g["input_ids"].long(), label_ids=g["label_ids"].long(), audio_codes=codes,
                   sample_id=f"{variant_dir.name}-{i}", audio_in_chunks=audio_in_chunks(g, config))
        if feats is not None:
            n_in = sum(s.audio_in_chunks) if s.audio_in_chunks is not None else \
                int((s.input_ids == config["audio_in_token_idx"]).sum())
            s.whisper_features = [feats[chunk + j] for j in range(n_in)]
            s.whisper_lengths = [int(fmask[chunk + j].sum()) for j in range(n_in)]
            chunk += n_in
        out.append(s)
    assert feats is None or chunk == feats.shape[0], f"{variant_dir}: {chunk} audio-in chunks, {feats.shape[0]} rows"
    return out


def model_dir(variant_dir: Path, tmp_root: Path) -> Path:
    """A loadable checkpoint directory: the variant's config.json + its materialised weights (symlinked)."""
    import shutil

    d = Path(tmp_root) / Path(variant_dir).name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(variant_dir) / "config.json", d / "config.json")
    link = d / "model.safetensors"
    if not link.exists():
        link.symlink_to(materialized(variant_dir))
    return d
