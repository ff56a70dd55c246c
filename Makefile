# minihiggs — every target creates the local .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo prep train plot bench-codec bench clean

venv: $(STAMP)

# torch==2.13.0 first when no torch is importable: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf .cache demo_out .pytest_cache

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

# make plot OUT=runs/myvoice  -> OUT/loss.png from OUT/metrics.jsonl (train.py also renders it at the end)
plot: $(STAMP)
	$(PY) scripts/plot_metrics.py $(OUT)
