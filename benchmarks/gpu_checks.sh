#!/usr/bin/env bash
# Every GPU check in one pass, for a lent GPU machine with a short budget (about 6 minutes).
# Prints one section per check; JSON results also go to $OUT (default /tmp/mfumon-gpu).
#   bash benchmarks/gpu_checks.sh
# Wheels the machine lacks (torchao, pytest) can be put in .gpuwheels/ (pip download --no-deps).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mfumon-gpu}
mkdir -p "$OUT"
[ -e mfumon/integrations ] || ln -s ../integrations mfumon/integrations  # source tree without install
export PYTHONPATH=$PWD
if [ -d .gpuwheels ]; then
  python -m pip install -q --no-index --no-deps --find-links .gpuwheels .gpuwheels/*.whl 2>&1 | tail -2
fi
section() { echo; echo "=== $1 ($(date +%T))"; }
section machine
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
python -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
section "tests that need a GPU"
timeout 120 python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_hardware.py \
  tests/test_cli_peak.py $(ls tests/test_step_shapes.py 2>/dev/null) 2>&1 | tail -12
section "mfumon peak --measure (GEMMs per dtype and the copy bandwidth)"
timeout 90 python -m mfumon peak --measure 2>&1 | tail -25
section "gpu_peak_check.py"
timeout 60 python benchmarks/gpu_peak_check.py --iters 20 > "$OUT/peak.json" 2>"$OUT/peak.err"; tail -c 3000 "$OUT/peak.json"; tail -3 "$OUT/peak.err"
section "bench_overhead.py (GPU step under set_sync_debug_mode('error'))"
timeout 100 python benchmarks/bench_overhead.py --steps 5000 --train-steps 100 2>&1 | tail -6
section "bench_mfu_gpu.py (GPT-2 small, bf16)"
timeout 100 python benchmarks/bench_mfu_gpu.py --steps 40 2>&1 | tail -40 | tee "$OUT/mfu.txt"
section "fp8_gpu_check.py"
timeout 100 python benchmarks/fp8_gpu_check.py --steps 20 > "$OUT/fp8.json" 2>"$OUT/fp8.err"; cat "$OUT/fp8.json"; tail -5 "$OUT/fp8.err"
section "bench_profile.py (step profile: GPT-2 small bf16, then a small MoE; compare % ceil with peak --measure above)"
timeout 150 python benchmarks/bench_profile.py --model gpt2 --steps 30 --every 10 --repeats 2 2>&1 | tail -25 | tee "$OUT/profile_gpt2.txt"
timeout 150 python benchmarks/bench_profile.py --model moe --steps 30 --every 10 --repeats 2 2>&1 | tail -25 | tee "$OUT/profile_moe.txt"
section done
