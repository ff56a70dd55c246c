# minihiggs — every target creates the local .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-extras demo prep train plot bench-codec bench clean

venv: $(STAMP)

# torch==2.13.0 first when no torch is importable: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The optional extras (requirements-extras.txt: tensorboard, wandb, matplotlib) and the tests that need them.
EXTRAS := $(VENV)/.extras-installed
$(EXTRAS): $(STAMP) requirements-extras.txt
	$(PY) -m pip install -q -r requirements-extras.txt
	touch $(EXTRAS)

test-extras: $(EXTRAS)
	$(PY) -m pytest -q -m extras tests

demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf .cache demo_out .pytest_cache

# make prep MANIFEST=data/train.jsonl OUT=data/prepared [ARGS="--workers 4 --voice_clone"]
prep: $(STAMP)
	$(PY) prep.py --manifest $(MANIFEST) --out $(OUT) $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_train.py

bench-codec: $(STAMP)
	$(PY) scripts/bench_codec.py

# make plot OUT=runs/myvoice  -> OUT/loss.png from OUT/metrics.jsonl (train.py also draws it at every validation
# when matplotlib is installed; this target installs matplotlib into the venv if it is missing)
plot: $(STAMP)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q "$$(grep '^matplotlib' requirements-extras.txt)"
	$(PY) scripts/plot_metrics.py $(OUT)
