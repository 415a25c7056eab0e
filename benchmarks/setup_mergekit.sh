#!/usr/bin/env bash
# Create a separate virtualenv with mergekit for side-by-side benchmarks.
#
#   bash benchmarks/setup_mergekit.sh [VENV_DIR]        (default: benchmarks/.venv-mergekit)
#
# Idempotent: an existing venv that already has mergekit==$MERGEKIT_VERSION and
# torch==$TORCH_VERSION importable is left alone (pass FORCE=1 to reinstall).
#
# Install notes
# - torch is installed FIRST and on its own, then mergekit under a constraint
#   file pinning torch. Without the pin pip resolves torch from the registry and
#   pulls several GB of CUDA wheels. The CPU wheel (2.13.0+cpu) satisfies
#   `torch==2.13.0` (PEP 440 ignores the local "+cpu" label).
# - mergekit is installed with its declared dependencies; any extra pins needed
#   to make the resolver succeed go into the constraint file below (EXTRA_PINS)
#   and are explained next to them.
# - Checked with Python 3.11: mergekit 0.1.5 resolves cleanly against torch
#   2.13.0 (`pip check`: no broken requirements), so EXTRA_PINS is empty. It
#   pulls transformers 5.x, peft, accelerate, datasets, pandas, pyarrow, scipy
#   (~1.6 GB venv, a few minutes on 2 cores). If a later resolver run breaks,
#   pin the offender here (e.g. "transformers<5.24") rather than editing the venv.
# - mergekit is a separate tool, only ever *called* (mergekit-yaml); nothing of
#   it is vendored into this repository.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-${MERGEKIT_VENV:-$HERE/.venv-mergekit}}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MERGEKIT_VERSION="${MERGEKIT_VERSION:-0.1.5}"

# Extra constraints (one requirement per line) for mergekit's dependencies.
EXTRA_PINS=(
)

check() {
  "$VENV/bin/python" - "$TORCH_VERSION" "$MERGEKIT_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
tv, mv = sys.argv[1], sys.argv[2]
assert version("torch").split("+")[0] == tv, version("torch")
assert version("mergekit") == mv, version("mergekit")
import torch, mergekit  # noqa: F401  (import must work, not just metadata)
PYEOF
  [ -x "$VENV/bin/mergekit-yaml" ]
}

if [ -z "${FORCE:-}" ] && [ -x "$VENV/bin/python" ] && check; then
  echo "mergekit $MERGEKIT_VERSION already installed in $VENV"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi

CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/mergekit-constraints.XXXXXX")"
trap 'rm -f "$CONSTRAINTS"' EXIT
{
  echo "torch==$TORCH_VERSION"
  for p in "${EXTRA_PINS[@]+"${EXTRA_PINS[@]}"}"; do echo "$p"; done
} >"$CONSTRAINTS"

PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
echo "installing torch==$TORCH_VERSION"
"${PIP[@]}" -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
echo "installing mergekit==$MERGEKIT_VERSION (torch pinned)"
"${PIP[@]}" -c "$CONSTRAINTS" "mergekit==$MERGEKIT_VERSION"

if check; then
  echo "ok: $("$VENV/bin/mergekit-yaml" --help >/dev/null && echo mergekit-yaml works) in $VENV"
else
  echo "mergekit install in $VENV failed its import check" >&2
  "$VENV/bin/python" -c "import torch, mergekit" || true
  exit 1
fi
