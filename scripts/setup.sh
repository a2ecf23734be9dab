#!/usr/bin/env bash
# One-time set-up on a fresh Linux machine with Python 3.11: a virtualenv with the pinned stack, this package,
# and the embedded base model (SmolLM2-135M-Instruct) converted once into the per-user cache.
# Safe to run again: every step is skipped or quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
.venv/bin/python -m fl_crew_reddit.main prepare-model
