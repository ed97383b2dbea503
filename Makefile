# darkmatter: `make demo` pretrains on the committed sample; `make test` runs lint and tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch and torchvision pinned to the builds this project is tested with.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

# Pretrain on the committed sample with 2 CPU workers, an embedded Ray and a local MLflow store.
demo: $(STAMP)
	$(VENV)/bin/darkmatter pretrain --config configs/demo.yaml
