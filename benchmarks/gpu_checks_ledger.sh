#!/usr/bin/env bash
# GPU checks of the time ledger and the step profile (issues 11 and 12), one pass of about 6 minutes,
# most important first; everything also goes to $OUT/all.txt (default /tmp/mfumon-gpu).
#   bash benchmarks/gpu_checks_ledger.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
exec > >(tee -a "$OUT/all.txt") 2>&1
section machine
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
python -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
section "tests that need a GPU"
timeout 150 python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_health.py \
  tests/test_cli_peak.py tests/test_step_shapes.py tests/test_hardware.py 2>&1 | tail -8
section "gpu_ledger_check.py (goodput, input wait, NVML and memory keys under sync debug 'error')"
timeout 150 python benchmarks/gpu_ledger_check.py --steps 120 2>&1 | tail -c 8000
section "bench_overhead.py (mon.step() host cost; a real step under sync debug 'error')"
timeout 80 python benchmarks/bench_overhead.py --steps 5000 --train-steps 100 2>&1 | tail -6
section "mfumon peak --measure (GEMMs per dtype and the copy bandwidth)"
timeout 60 python -m mfumon peak --measure 2>&1 | tail -22
section "bench_profile.py: GPT-2 small bf16, then a small MoE"
timeout 100 python benchmarks/bench_profile.py --model gpt2 --steps 30 --every 10 --repeats 2 2>&1 | tail -25
timeout 100 python benchmarks/bench_profile.py --model moe --steps 30 --every 10 --repeats 2 2>&1 | tail -25
section "bench_expert_load.py"
timeout 80 python benchmarks/bench_expert_load.py --rounds 20 --device cuda 2>&1 | tail -14
section done
