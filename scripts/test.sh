#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (pytest arguments pass through).
#   bash scripts/test.sh           every test, the model tier included (the embedded 135M model, the offline judge)
#   bash scripts/test.sh --fast    the fast tier (under 3 min on 2 cores): tiny random models only, no model
#                                  conversion, no offline judge
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
args=()
marker=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    marker=(-m "not embedded and not judge")
  else
    args+=("$arg")
  fi
done
python -m pytest tests ${marker[@]+"${marker[@]}"} ${args[@]+"${args[@]}"}
