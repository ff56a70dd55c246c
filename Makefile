# minihiggs — every target creates the local .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-heavy test-extras test-reference lint demo speak serve bench-serve smoke prep train plot bench-codec bench bench-generate bench-eval clean

venv: $(STAMP)

# torch==2.13.0 first when no torch is importable: a bare `torch` requirement would pull a multi-GB CUDA build.
# Then minihiggs itself, editable (pyproject.toml), so `import minihiggs` works from any directory in the venv.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The whole suite except the tests of the optional extras (`make test-extras`) and a few slow end-to-end checks
# (`make test-heavy`: the transformers-layout command chain, FSDP2 resume with dropout, DDP with scoring).
test: $(STAMP)
	$(PY) -m pytest -q -m "not extras and not heavy" tests

test-heavy: $(STAMP)
	$(PY) -m pytest -q -m "heavy and not extras" tests

# The optional extras (requirements-extras.txt: tensorboard, wandb, matplotlib) and the tests that need them.
EXTRAS := $(VENV)/.extras-installed
$(EXTRAS): $(STAMP) requirements-extras.txt
	$(PY) -m pip install -q -r requirements-extras.txt
	touch $(EXTRAS)

test-extras: $(EXTRAS)
	$(PY) -m pytest -q -m extras tests

# ruff with the rules in pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check .

# minihiggs' transformers-layout export and adapters loaded by transformers/PEFT themselves (issue 15): a separate
# .venv-ref with them, never a dependency of minihiggs or of `make test` (scripts/reference/check_transformers_load.py).
REF_VENV  := .venv-ref
REF_STAMP := $(REF_VENV)/.installed
$(REF_STAMP): requirements.txt
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -c "import torch" 2>/dev/null || $(REF_VENV)/bin/python -m pip install -q torch==2.13.0
	$(REF_VENV)/bin/python -m pip install -q -r requirements.txt transformers==5.25.0 peft==0.22.0
	touch $(REF_STAMP)

test-reference: $(REF_STAMP)
	$(REF_VENV)/bin/python scripts/reference/check_transformers_load.py

# The demo draws its loss curves, so it installs matplotlib (the one plotting extra) when it is missing.
MATPLOTLIB := $(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q "$$(grep '^matplotlib' requirements-extras.txt)"
demo: $(STAMP)
	$(MATPLOTLIB)
	$(PY) scripts/demo.py

# make speak [TEXT="..."] [SPEAKER=ava] [ADAPTER=runs/me/best] [CODEC=bosonai/higgs-audio-v2-tokenizer]
#            [REF="--ref_audio ref.wav --ref_text ..."] [GEN_ARGS="--temperature 0.7 --seed 1"] [WAV=out.wav]
# The defaults speak with `make demo`'s adapter, its random decode-only codec and a reference utterance of SPEAKER
# from its shards (greedy: the demo's motifs repeat every 6 frames and RAS would break them up).
TEXT    ?= The quick brown fox jumps over the lazy dog.
SPEAKER ?= ava
ADAPTER ?= demo_out/run/final
CODEC   ?= demo_out/codec
REF     ?= --ref_sample $(SPEAKER)_000 --shards demo_out/shards
GEN_ARGS ?= --temperature 0 --ras_win 0 --max_new_frames 150
WAV     ?= demo_out/speak_$(SPEAKER).wav
speak: $(STAMP)
	$(PY) -m minihiggs.generate --adapter $(ADAPTER) --codec $(CODEC) --text "$(TEXT)" \
	    --scene "Audio is recorded from a quiet room. Speaker: $(SPEAKER)." $(REF) --out $(WAV) $(GEN_ARGS)

# make serve [PORT=8000]: the demo's four voices (after `make demo`) behind the OpenAI-compatible speech server
# (README "Serve"); installs the web extra (fastapi, uvicorn) into the venv when it is missing.
PORT ?= 8000
serve: $(STAMP)
	$(PY) -c "import fastapi, uvicorn" 2>/dev/null || $(PY) -m pip install -q $$(grep -E '^(fastapi|uvicorn)' requirements-extras.txt)
	$(PY) scripts/demo_voices.py demo_out
	$(PY) -m minihiggs.serve --voices demo_out/voices --codec demo_out/codec --port $(PORT) --max_tokens 400

# time to first audio and audio seconds per second at 1, 4 and 16 concurrent streams (CPU `small` shape; one thread:
# on a shared machine OpenMP threads waiting for cores make every small op slow)
bench-serve: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) scripts/bench_serve.py $(ARGS)

clean:
	rm -rf .cache demo_out .pytest_cache

# make smoke [TINY=tiny]: README "First hour": the offline smoke test on small random files (CPU, about a minute).
# `python -m minihiggs.tiny --out $(TINY)` writes base/, codec/ and data/ (here when they are missing); then prep,
# 20 training steps (no audio samples) and generate with the run's adapter, whose codec comes from the run's shards.
TINY ?= tiny
smoke: $(STAMP)
	test -d $(TINY)/base || $(PY) -m minihiggs.tiny --out $(TINY)
	rm -rf $(TINY)/shards $(TINY)/run
	$(PY) prep.py --manifest $(TINY)/data/train.jsonl --out $(TINY)/shards --base_ckpt $(TINY)/base \
	    --codec $(TINY)/codec --no_progress
	$(PY) train.py --shards $(TINY)/shards --output_dir $(TINY)/run --base_ckpt $(TINY)/base \
	    --max_steps 20 --batch_size 4 --lr 3e-3 --log_steps 5 --val_steps 10 --save_steps 10 --sample_steps 0
	$(PY) -m minihiggs.generate --adapter $(TINY)/run/final --text "Hello from a tiny model." \
	    --ref_sample ava_000 --shards $(TINY)/shards --out $(TINY)/hello.wav --max_new_frames 100 --no_progress

# make prep MANIFEST=data/train.jsonl OUT=data/prepared [ARGS="--workers 4 --voice_clone"]
prep: $(STAMP)
	$(PY) prep.py --manifest $(MANIFEST) --out $(OUT) $(ARGS)

# One JSON line each: tiny and small (CPU, fp32), small with varied lengths (padded vs bucketed vs packed);
# on a CUDA machine also the released 3B shape (bf16, compiled, packed 4096-token rows).
bench: $(STAMP)
	$(PY) scripts/bench_train.py --preset tiny
	$(PY) scripts/bench_train.py --preset small
	$(PY) scripts/bench_train.py --preset small --varlen
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && \
	  $(PY) scripts/bench_train.py --preset 3b --varlen --compile --modes packed || true

bench-codec: $(STAMP)
	$(PY) scripts/bench_codec.py

# frames/s and real-time factor at batch 1 and 8 (`small` shape on CPU; add ARGS="--shape 3b --device cuda" on a GPU)
bench-generate: $(STAMP)
	$(PY) scripts/bench_generate.py $(ARGS)

# seconds of scoring per second of audio (Whisper ASR, WavLM SV) on random weights; ARGS="--shape large-v3 --device cuda"
bench-eval: $(STAMP)
	$(PY) scripts/bench_eval.py $(ARGS)

# make plot OUT=runs/myvoice  -> OUT/loss.png from OUT/metrics.jsonl (train.py also draws it at every validation
# when matplotlib is installed; this target installs matplotlib into the venv if it is missing)
plot: $(STAMP)
	$(MATPLOTLIB)
	$(PY) scripts/plot_metrics.py $(OUT)
