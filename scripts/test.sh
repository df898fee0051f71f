#!/usr/bin/env bash
# The project's test command (README.md): install what the tests need, then run them.
#
#   ./scripts/test.sh                   # everything CI runs: ruff, mypy, pytest (all tiers), node --test
#   ./scripts/test.sh -m "not slow"     # the quick tier; extra arguments go to pytest (and skip the JS tests)
#
# Creates .venv if there is none. torch is installed first, pinned by TORCH_SPEC
# (default torch==2.13.0, the CPU wheel on the project's machines), so that the
# project's own install does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
venv="$(cd "$venv" && pwd)"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$py" -m pip install --quiet -e ".[test,lint,engines,eval,ray]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # the suite proves no network is needed

# The search page's tests drive Debian's Chromium (Playwright, from the test extra, needs no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
export CLAP_WS_REQUIRE_BROWSER="${CLAP_WS_REQUIRE_BROWSER:-1}"  # here a missing browser fails, not skips

"$py" -m ruff check .
"$py" -m mypy
"$py" -m mypy clients/python/clap_ws_client  # the Python client, typed (py.typed)
"$py" -m pytest "$@"  # not -q: the header names the CPU class (conftest.py)

# The JavaScript client (clients/js): its tests start real servers with this venv's Python.
if [ "$#" -eq 0 ]; then
  (cd clients/js && npm ci --no-audit --no-fund --loglevel=error \
     && CLAP_WS_PYTHON="$py" npm test \
     && npm run --silent typecheck)
fi
