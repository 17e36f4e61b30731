#!/usr/bin/env bash
# A facility system cuts a rack's power budget over MQTT, as a BMS or DCIM would, and the caps follow.
#
#   examples/facility_budget_cut.sh [RACK] [WATTS]      (defaults: rack-a 1500)
#
# Needs a local cluster started by `murakkabctl cluster up` with its broker: STATE_DIR/env points murakkabctl at
# the controller, STATE_DIR/mqtt/facility.env holds the facility publisher's MQTT_HOST, MQTT_PORT, MQTT_USER and
# MQTT_PASSWORD. STATE_DIR defaults to .state/demo (what `make demo` uses). WATTS "clear" deletes the retained
# budget (a zero-length retained message), which clears the rack's budget.
#
# The budget is published retained on murakkab/v1/facility/racks/RACK/power_budget_w as {"power_budget_w": W}, so a
# controller that starts later still applies it. The script then polls `murakkabctl power budget show` until the
# rack's budget is in force and the rack's measured GPU power is at or under it (the autopilot's caps follow
# within 15 s), and gives up after TIMEOUT_S (default 30).
set -euo pipefail

rack=${1:-rack-a}
watts=${2:-1500}
state_dir=${STATE_DIR:-.state/demo}
timeout_s=${TIMEOUT_S:-30}
ctl=${MURAKKABCTL:-.venv/bin/murakkabctl}
python=${PYTHON:-.venv/bin/python}
prefix=${MQTT_TOPIC_PREFIX:-murakkab/v1}

for file in "$state_dir/env" "$state_dir/mqtt/facility.env"; do
  if [[ ! -r $file ]]; then
    echo "facility_budget_cut: $file is missing; start a cluster with its broker first (murakkabctl cluster up)" >&2
    exit 2
  fi
done
# shellcheck disable=SC1091
source "$state_dir/env"
# shellcheck disable=SC1091
source "$state_dir/mqtt/facility.env"
command -v mosquitto_pub >/dev/null || { echo "facility_budget_cut: mosquitto_pub not found (apt-get install mosquitto-clients)" >&2; exit 2; }

topic="$prefix/facility/racks/$rack/power_budget_w"
# The credentials go in mosquitto_pub's options file (read from $XDG_CONFIG_HOME/mosquitto_pub), mode 0600, so the
# password is not on a command line for ps to show.
conf_dir=$(mktemp -d)
trap 'rm -rf "$conf_dir"' EXIT
(umask 077; printf -- '-h %s\n-p %s\n-u %s\n-P %s\n' "$MQTT_HOST" "$MQTT_PORT" "$MQTT_USER" "$MQTT_PASSWORD" \
  >"$conf_dir/mosquitto_pub")
pub() { XDG_CONFIG_HOME=$conf_dir mosquitto_pub -q 1 -r -t "$topic" "$@"; }

if [[ $watts == clear ]]; then
  echo "facility: clearing rack $rack's power budget (deleting the retained $topic)"
  pub -n
else
  echo "facility: rack $rack's power budget is now $watts W (retained on $topic)"
  pub -m "{\"power_budget_w\": $watts}"
fi

started=$(date +%s)
while true; do
  view=$("$ctl" power budget show -o json 2>/dev/null || true)
  verdict=$(printf '%s' "$view" | "$python" -c '
import json, sys
rack, watts = sys.argv[1], sys.argv[2]
try:
    view = json.load(sys.stdin)
except ValueError:
    print("waiting: no answer from the controller yet"); sys.exit()
mine = [b for b in view.get("budgets") or [] if b.get("rack") == rack]
if watts == "clear":
    print("done: rack %s has no budget" % rack if not mine else "waiting: the budget is still in force")
elif not mine or abs(float(mine[0]["power_budget_w"]) - float(watts)) > 0.5:
    print("waiting: the controller has not taken the budget yet")
elif mine[0]["measured_power_w"] <= 0:  # a controller that just started has no telemetry for the rack yet
    print("waiting: no power measured in rack %s yet (does a node carry the label rack=%s?)" % (rack, rack))
elif mine[0]["measured_power_w"] > float(watts):
    print("waiting: rack %s measures %.0f W against %s W, caps %s" % (rack, mine[0]["measured_power_w"], watts,
                                                                    mine[0].get("caps_w") or "none yet"))
else:
    caps = mine[0].get("caps_w") or {}
    print("done: rack %s measures %.0f W under its %s W budget (source %s), caps %s" % (
        rack, mine[0]["measured_power_w"], watts, mine[0].get("source"),
        ", ".join("%s %.0f W" % kv for kv in caps.items()) or "none needed"))
' "$rack" "$watts")
  elapsed=$(( $(date +%s) - started ))
  echo "  after ${elapsed}s: ${verdict#*: }"
  if [[ $verdict == done:* ]]; then
    break
  fi
  if (( elapsed >= timeout_s )); then
    echo "facility_budget_cut: the caps did not follow within ${timeout_s}s" >&2
    "$ctl" power budget show || true
    exit 1
  fi
  sleep 1
done
"$ctl" power budget show
