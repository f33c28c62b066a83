#!/usr/bin/env bash
# Install cul into a virtual environment: what a newcomer runs, what CI runs, what the worker image
# runs. Every version comes from pyproject.toml.
#
#   scripts/install.sh              # .venv with cul
#   scripts/install.sh test         # .venv with cul and the test tools (the README's test command)
#   VENV=/opt/venv TORCH_INDEX=https://download.pytorch.org/whl/cu128 scripts/install.sh
#                                   # a GPU node: the CUDA build of the pinned torch first
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${1:-}"
python3.11 -m venv "$VENV"
if [ -n "${TORCH_INDEX:-}" ]; then  # same torch version as the pin, from PyTorch's index for a CUDA build
  torch_pin="$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')"
  "$VENV/bin/pip" install -q "$torch_pin" --index-url "$TORCH_INDEX"
fi
"$VENV/bin/pip" install -q -e ".${EXTRAS:+[$EXTRAS]}"
