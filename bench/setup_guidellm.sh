#!/usr/bin/env bash
# guidellm in its own virtualenv, the external load generator of `python -m bench.http_load`.
# It is a peer tool, like vLLM: never installed into specd's own environment.
# Idempotent: a virtualenv whose guidellm already runs is left as it is. When it cannot be installed
# (no registry reachable, no wheel for this Python), it says so and exits 0: bench.http_load then
# leaves its guidellm rows out.
# Location: $SPECD_GUIDELLM_VENV, default ${SPECD_BENCH_TOOLS:-~/.cache/specd/bench-tools}/guidellm.
set -uo pipefail

TOOLS="${SPECD_BENCH_TOOLS:-$HOME/.cache/specd/bench-tools}"
VENV="${SPECD_GUIDELLM_VENV:-$TOOLS/guidellm}"
PYTHON="${PYTHON:-python3}"
GUIDELLM_VERSION=0.8.1

works() { "$VENV/bin/guidellm" --version >/dev/null 2>&1; }

if [ -x "$VENV/bin/guidellm" ] && works; then
  echo "guidellm already installed in $VENV"
  exit 0
fi

skip() {
  echo "guidellm not installed ($1): bench.http_load leaves its guidellm rows out" >&2
  exit 0
}

mkdir -p "$(dirname "$VENV")"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV" || skip "cannot create a virtualenv in $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip || true
"$VENV/bin/python" -m pip install -q "guidellm==${GUIDELLM_VERSION}" || skip "pip install guidellm==${GUIDELLM_VERSION} failed"
works || skip "$VENV/bin/guidellm does not run"
echo "guidellm $("$VENV/bin/python" -c "from importlib.metadata import version; print(version('guidellm'))") in $VENV"
