#!/usr/bin/env bash
# Run the transformers-dependent tests against transformers 4.57 (the main venv has 5.x).
#
# transformers 4.57 stores several MoE models differently (ModuleList experts for mixtral,
# qwen2/3-moe, deepseek; see the MoE layout notes), so the same tests must pass on both majors.
# Installs transformers==4.57.6 with a huggingface-hub<1 and tokenizers it accepts into a
# --target folder (default .tf4/, git-ignored) and puts it first on PYTHONPATH; everything else
# (torch, pytest, regex, safetensors, ...) comes from the main venv.
#
#   scripts/tf4/run.sh [pytest args...]      default: -m transformers tests/
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TARGET="${TF4_TARGET:-$ROOT/.tf4}"

if ! PYTHONPATH="$TARGET" "$PY" -c "import transformers, sys; sys.exit(transformers.__version__ != '4.57.6')" 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$TARGET" \
        "transformers==4.57.6" "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0"
fi
PYTHONPATH="$TARGET" "$PY" -c "import transformers; print('transformers', transformers.__version__, 'from', transformers.__file__)"

cd "$ROOT"
if [ "$#" -eq 0 ]; then
    set -- -m transformers tests/
fi
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m pytest -p no:cacheprovider "$@"
