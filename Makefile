# Two commands on a fresh machine (Python 3.11 + pip):
#   make run    set up .venv, `dvc pull` what the DVC remote has, then `dvc repro` the pipeline on real MNIST
#   make test   set up .venv, then run every test (unit, end-to-end, real-data)
# Both are idempotent: a second call reuses .venv and DVC skips unchanged stages.

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Stage commands say `python`; make sure that is the project's interpreter.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test test-fast lint check-params serve flow experiments bench clean-venv

# The dependencies go in through uv (installed by pip): 24 s instead of pip's 2 min on the 2-core
# machine (docs/benchmarks.md). --compile-bytecode, as pip does: without .pyc files every import of
# TensorFlow would compile it again where PYTHONDONTWRITEBYTECODE is set. uv reads no pip.conf; if it
# cannot install (say, an index only pip is configured for), pip does it.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PYTHON) -e ".[dev]" \
	  || $(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# params.yaml is checked before DVC reads it: a hostile file (a YAML alias bomb) fails at once.
# A fresh clone first fetches what the DVC remote already holds (quiet when it holds nothing),
# so `dvc repro` recomputes only what nobody computed and pushed before. Never commits or pushes.
run: $(STAMP)
	$(PYTHON) -m tasks.commands.check_params params.yaml
	$(PYTHON) -m tasks.commands.pull
	dvc repro

# Three test processes on two cores: end-to-end tests spend much of their time waiting on child
# processes (DVC, Prefect servers and workers), so a third process fills the gaps.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(PYTHON) -m pytest -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(PYTHON) -m pytest -n 2 -m "not slow and not server and not real"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

check-params: $(STAMP)
	$(PYTHON) -m tasks.commands.check_params params.yaml

# The pipeline as one Prefect flow run (a temporary local Prefect server unless PREFECT_API_URL is set).
flow: $(STAMP)
	$(PYTHON) -m flows.pipeline

# Start a local Prefect server (SQLite in .prefect/, UI at http://127.0.0.1:4200) and serve the
# scheduled deployment from params.yaml `schedule`. Ctrl-C stops both; the schedule stays.
serve: $(STAMP)
	$(PYTHON) -m flows.deploy --start-server --port 4200 --home .prefect

# The seed's comparison table: each optimisation dropped in turn, every variant over SEEDS seeds
# (train.seed 0..SEEDS-1), as queued DVC experiments; STEPS overrides train.steps for a quick look,
# VARIANTS="a b" runs only those. POOL=mnist-pool runs the cells on the team's Prefect workers
# (flows/grid.py; PREFECT_API_URL names the team's server) instead of this machine's DVC queue.
# Calling it again resumes the grid. Table and picture: reports/experiments/{table.md,accuracy.png}.
SEEDS ?= 2
STEPS ?=
VARIANTS ?=
POOL ?=
experiments: $(STAMP)
	$(PYTHON) -m tasks.commands.check_params params.yaml
	$(PYTHON) -m tasks.commands.experiments --seeds $(SEEDS) $(if $(STEPS),--steps $(STEPS)) \
		$(if $(VARIANTS),--only $(VARIANTS)) $(if $(POOL),--pool $(POOL))

bench: $(STAMP)
	$(PYTHON) bench/train_speed.py
	$(PYTHON) bench/flow_overhead.py

clean-venv:
	rm -rf $(VENV)
