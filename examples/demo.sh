#!/usr/bin/env bash
# The `make demo` walk-through: expects a local cluster and MURAKKAB_CONTROLLER to point at it.
set -euo pipefail
ctl=${MURAKKABCTL:-.venv/bin/murakkabctl}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Nodes and their live telemetry (GPU numbers are simulated and labeled so)"
$ctl nodes

step "Cap GPU 0 of sim-node-1 at 200 W while it runs at full load"
gpu0() {  # one line about GPU 0 of sim-node-1, from the JSON the CLI prints
  $ctl node show sim-node-1 -o json | python3 -c '
import json, sys
d = json.load(sys.stdin)["devices"][0]
print("%s: %.0f W, %.1f C, limit %.0f W, SM %s MHz, throttle %s" % (sys.argv[1], d["power_w"], d["temperature_c"],
      d["power_limit_w"], d["sm_clock_mhz"], ",".join(d["throttle_reasons"]) or "none"))' "$1"
}
gpu0 before
$ctl node set-power-limit sim-node-1 0 200
sleep 4
gpu0 "after 4 s"
sleep 4
gpu0 "after 8 s"

step "A limit outside the GPU's range is refused with the range"
$ctl node set-power-limit sim-node-1 0 5000 || true

step "Drain sim-node-2 for maintenance"
$ctl node drain sim-node-2 --reason "replace fan"
$ctl node show sim-node-1

step "Cluster status"
$ctl status
$ctl nodes
