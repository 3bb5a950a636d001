#!/usr/bin/env bash
# Set up venv/ (if needed) with runtime and test requirements, then run the whole test suite.
# Usage: ./test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x venv/bin/python ]; then
    "$PY" -m venv venv
fi
venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
exec venv/bin/python -m pytest "$@"
