"""GPU check of generation (run where a CUDA device is present; the CPU test suite cannot reach these paths).

    python scripts/check_generate_cuda.py            # golden cases on CUDA (fp32, CUDA graphs), then bf16 smoke runs

1. Every golden case under $MINIHIGGS_GOLDEN_GENERATE decoded on CUDA in float32 (TF32 off) with the CUDA-graph
   decode step, alone and all together as one batch: generated tokens and audio columns must equal upstream's
   (the cases' margins make fp32 GPU rounding harmless). Prints one JSON line per case.
2. The same model in bf16 with graphs on vs off: both must run and agree on the first audio steps' argmax
   (bf16 rounding may diverge later). Exit status 1 on any mismatch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from safetensors.torch import load_file  # noqa: E402

from generate_helpers import Recorder, case_request, generate_variants, read_cases  # noqa: E402
from golden import GENERATE_ROOT, model_dir  # noqa: E402
from helpers import LLAMA_DIR  # noqa: E402
from minihiggs import load_model  # noqa: E402
from minihiggs.generate.engine import AUDIO, Engine  # noqa: E402
from minihiggs.text.tokenizer import TextTokenizer, write_higgs_tokenizer  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tmp = REPO / ".cache" / "check_generate_cuda"
    tok = TextTokenizer.from_dir(write_higgs_tokenizer(LLAMA_DIR, tmp / "tok"))
    ok = True
    for variant in generate_variants(GENERATE_ROOT):
        model = load_model(model_dir(variant, tmp), device="cuda")
        cases = read_cases(variant)
        tensors = [load_file(str(variant / f"{c['name']}.safetensors")) for c in cases]
        reqs = [case_request(c, t, tok) for c, t in zip(cases, tensors)]
        engine = Engine(model, cuda_graphs=True)
        alone = [engine.generate([r])[0] for r in reqs]
        batch = engine.generate(reqs)
        for c, t, a, b in zip(cases, tensors, alone, batch):
            ref_audio = [t[f"audio_out.{i}"] for i in range(sum(k.startswith("audio_out.") for k in t))]
            good = {
                "text": a.text_tokens == t["generated_text_tokens"].tolist(),
                "audio": len(a.audio) == len(ref_audio) and all(torch.equal(x, y) for x, y in zip(a.audio, ref_audio)),
                "batch_eq_alone": b.text_tokens == a.text_tokens
                and all(torch.equal(x, y) for x, y in zip(a.audio, b.audio)),
            }
            ok &= all(good.values())
            print(json.dumps({"variant": variant.name, "case": c["name"], **good}), flush=True)
        # bf16: graphs on vs off agree on the first audio steps
        m16 = load_model(model_dir(variant, tmp), device="cuda", dtype=torch.bfloat16)
        firsts = []
        for graphs in (True, False):
            rec = Recorder()
            Engine(m16, cuda_graphs=graphs).generate([reqs[0]], trace=rec)
            firsts.append([r["audio_logits"].argmax(-1).tolist() for r in rec.rows[0] if r["kind"] == AUDIO][:4])
        same = firsts[0] == firsts[1]
        ok &= same
        print(json.dumps({"variant": variant.name, "bf16_graphs_vs_eager_first_steps_equal": same}), flush=True)
    print("ALL OK" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
