"""`make serve`: the voices directory of `make demo`'s four speakers -> demo_out/voices/config.json.

Each speaker is a fine-tuned voice with its own reference: the demo's adapter (`demo_out/run/final`; cleo and dan use
the resumed run's final adapter, bitwise the same weights, so the server batches two adapter slots) + the speaker's
first utterance as the reference (its transcript and precomputed codes, demo_out/data) + the scene it was trained
with. Usage: python scripts/demo_voices.py [DEMO_OUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minihiggs.tiny import voice_scene  # noqa: E402


def main(out: Path) -> Path:
    manifest = out / "data" / "train.jsonl"
    if not manifest.is_file() or not (out / "run" / "final").is_dir():
        sys.exit(f"{out}: no demo outputs (run `make demo` first)")
    voices: dict[str, dict] = {}
    for line in manifest.read_text().splitlines():
        obj = json.loads(line)
        name = obj["speaker"]
        if name in voices:
            continue
        text = obj["messages"][-2]["content"]
        codes = obj["messages"][-1]["content"][0]["audio_codes"]
        run = "run" if len(voices) < 2 else "run_resumed"
        voices[name] = {"adapter": f"../{run}/final", "transcript": text, "codes_file": f"../data/{codes}",
                        "scene": voice_scene(name)}
    d = out / "voices"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(voices, indent=2) + "\n")
    print(f"{d / 'config.json'}: {', '.join(voices)}")
    return d


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "demo_out")
