#!/usr/bin/env bash
# Create (idempotently) the side venv `.aw` in the repo root with the AppWorld package installed and decrypted.
#
# Why a side venv: appworld pins pydantic<2, SQLAlchemy 1.4 and friends, and freezes the process clock while a task is
# open, so the trainer never imports it; env_appworld.py starts `.aw/bin/appworld serve environment` and talks HTTP.
# Both steps work offline from the package registry (`appworld install` only decrypts the bundled apps and tests).
# The task data is NOT installed here (it needs the internet): `.aw/bin/appworld download data --root <dir>`.
#
# Usage (from anywhere):   bash tests/appworld_setup.sh        then   export APPWORLD_PYTHON=<repo>/.aw/bin/python
# The last line printed is the export line, so CI can do:   eval "$(bash tests/appworld_setup.sh | tail -n 1)"
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AW="$REPO/.aw"
PY="${APPWORLD_BASE_PYTHON:-}"
if [ -z "$PY" ]; then  # appworld needs python >= 3.11
    for cand in python3.11 python3.12 python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            PY="$cand"; break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "appworld_setup.sh: no python >= 3.11 found (set APPWORLD_BASE_PYTHON)" >&2; exit 1
fi

ready() { "$AW/bin/python" -c 'import appworld.apps.spotify' >/dev/null 2>&1; }
if ! ready; then  # the fast path (already set up) costs one import, ~2 s
    # 1. The venv itself (kept when it already works).
    if ! "$AW/bin/python" -c 'import sys' >/dev/null 2>&1; then
        echo "appworld_setup.sh: creating $AW with $PY" >&2
        "$PY" -m venv "$AW"
    fi
    # 2. The package (kept when importable).
    if ! "$AW/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("appworld") is None)'; then
        echo "appworld_setup.sh: pip install appworld" >&2
        "$AW/bin/pip" install --quiet appworld >&2
    fi
    # 3. Decrypt the apps and tests into the package (offline, ~2 s).
    echo "appworld_setup.sh: appworld install" >&2
    "$AW/bin/appworld" install >&2
    ready || { echo "appworld_setup.sh: $AW/bin/python cannot import appworld.apps.spotify" >&2; exit 1; }
fi
echo "export APPWORLD_PYTHON=$AW/bin/python"
