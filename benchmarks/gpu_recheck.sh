#!/usr/bin/env bash
# The short second GPU pass: expert load on a GPU, mon.step()'s cost, bench_expert_load.py.
set -u
source "$(dirname "$0")/gpu_env.sh"
python -c "import transformers; print('transformers', transformers.__version__)"
timeout 120 python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_expert_load.py -k "gpu or hand_written or two_ranks" 2>&1 | tail -4
timeout 150 python - <<'PY'
import sys, json; sys.path.insert(0, "benchmarks"); sys.argv = ["x"]
import gpu_ledger_check as g
print(json.dumps({"expert_load_overhead": g.expert_load_overhead(40)}))
PY
timeout 80 python benchmarks/bench_overhead.py --steps 5000 --train-steps 100 2>&1 | grep -v Warning | tail -4
timeout 90 python benchmarks/bench_expert_load.py --rounds 30 --device cuda 2>&1 | grep -v Warn | tail -6
