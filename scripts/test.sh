#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (pytest arguments pass through).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
python -m pytest tests "$@"
