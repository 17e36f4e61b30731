#!/usr/bin/env bash
# The `make demo` walk-through: expects a local cluster and MURAKKAB_CONTROLLER to point at it.
# rag-qa runs on real vLLM engines (the CPU build) on this machine; GPU numbers of sim nodes are simulated.
set -euo pipefail
ctl=${MURAKKABCTL:-.venv/bin/murakkabctl}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Nodes: cpu-node runs real engines; sim-node-* have simulated H100s (labeled so)"
$ctl nodes

step "Apply the executor catalogs (CPU engines and tools, simulated GPU executors) and the workflows"
$ctl catalog apply examples/catalog/cpu.yaml
$ctl catalog apply examples/catalog/sim.yaml
$ctl workflow apply examples/workflows/rag-qa.yaml
$ctl workflow apply examples/workflows/video-qa.yaml
$ctl catalog list
$ctl workflow list

step "Ask rag-qa a question about a small corpus (the first job waits for the vLLM engines to start)"
$ctl run rag-qa --input question="Why does the clock speed drop when a GPU power cap is set?" \
  --input corpus=@examples/data/rag-corpus.jsonl --wait --timeout-s 900

step "A second question: the engines are warm now"
$ctl run rag-qa --input question="What makes sourdough bread rise?" \
  --input corpus=@examples/data/rag-corpus.jsonl --wait --timeout-s 600

step "How the planner chose (plan show)"
$ctl plan show

step "Components the controller placed (real engines on cpu-node, simulated ones on the GPU nodes)"
$ctl components

step "Recent jobs"
$ctl jobs
