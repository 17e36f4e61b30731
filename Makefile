# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= .state/demo

.PHONY: install demo test test-fast bench clean demo-down

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	@$(VENV)/bin/murakkabctl cluster down --state-dir $(DEMO_DIR) >/dev/null 2>&1 || true
	$(VENV)/bin/murakkabctl cluster up --state-dir $(DEMO_DIR) --sim-nodes 3 --gpus-per-node 4 --gpu-model h100 --cpu-node --sim-utilization 1.0
	@export MURAKKAB_CONTROLLER=$$(cat $(DEMO_DIR)/controller.addr); \
	  set -e; trap '$(VENV)/bin/murakkabctl cluster down --state-dir $(DEMO_DIR)' EXIT; \
	  ./examples/demo.sh

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not multiprocess"

bench: install
	$(PY) bench/control_plane_scale.py --agents 1000 --seconds 60 --workers 2 --agent-impl lean --coalesce-s 0
	$(PY) bench/control_plane_scale.py --agents 1000 --seconds 60 --workers 2 --agent-impl lean --coalesce-s 0.005
	$(PY) bench/control_plane_scale.py --agents 1000 --seconds 60 --workers 2 --agent-impl daemon --coalesce-s 0.005
	$(PY) bench/agent_footprint.py --seconds 60

demo-down:
	$(VENV)/bin/murakkabctl cluster down --state-dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) .state .pytest_cache .hypothesis *.egg-info
