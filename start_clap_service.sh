#!/usr/bin/env bash
# Start the clap-ws WebSocket server.
#
#   ./start_clap_service.sh                      # checkpoint from $CLAP_CHECKPOINT_PATH or the cache
#   ./start_clap_service.sh --untrained          # random weights: tests and latency work only
#   PORT=8080 ./start_clap_service.sh --max-batch 16
#
# Environment: PORT (default 32051), HOST (default 127.0.0.1), CLAP_DEVICE,
# CLAP_CHECKPOINT_PATH, CLAP_TOKENIZER_DIR, CLAP_WS_CACHE_DIR, PYTHON.
# Every argument is passed to `clap-ws serve` (see `clap-ws serve --help`);
# flags given here win over PORT and HOST.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python="python3"; fi
fi
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"  # bounded glibc arenas keep resident memory flat
exec "$python" -m clap_ws serve --host "${HOST:-127.0.0.1}" --port "${PORT:-32051}" "$@"
