#!/usr/bin/env bash
# Every GPU check in one pass, for a lent GPU machine with a short budget (about 6 minutes).
# Prints one section per check; JSON results also go to $OUT (default /tmp/mfumon-gpu).
#   bash benchmarks/gpu_checks.sh
# Wheels the machine lacks (torchao, pytest) can be put in .gpuwheels/ (pip download --no-deps).
set -u
source "$(dirname "$0")/gpu_env.sh"
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
section "device health and memory (NVML readings, ledger keys, collect() cost)"
timeout 120 python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_health.py 2>&1 | tail -4
timeout 120 python - <<'PY' 2>&1 | tail -40 | tee "$OUT/health.txt"
import json, tempfile, time, pynvml, torch
import mfumon
from mfumon import metrics as K
from mfumon.errors import FaultLog
from mfumon.health import device_sources
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)  # raw NVML, to compare with what mfumon logs
raw = {"sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
       "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
       "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
       "energy_j": pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3,
       "reasons": hex(pynvml.nvmlDeviceGetCurrentClocksEventReasons(h)),
       "power_capped_ns": pynvml.nvmlDeviceGetViolationStatus(h, pynvml.NVML_PERF_POLICY_POWER).violationTime}
print("raw NVML:", raw)
steps, t0 = [], time.perf_counter()  # how often the energy counter advances (mfumon spans >= 1 s)
e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
while time.perf_counter() - t0 < 0.5:
    e = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    if e != e0:
        steps.append(time.perf_counter())
        e0 = e
print("energy counter advanced", len(steps), "times in 0.5 s; gaps ms:",
      [round((b - a) * 1e3, 1) for a, b in zip(steps, steps[1:])][:10])
dev = torch.device("cuda", 0)
torch.ones(1, device=dev)  # the allocator is live
for src in device_sources(dev, FaultLog(), lambda: None):
    src.collect()
    t = time.perf_counter()
    for _ in range(100):
        src.collect()
    print(f"{src.name}: collect() {(time.perf_counter() - t) / 100 * 1e6:.1f} us per log")
    src.close()
d = 4096  # 8 bf16 Linear layers, 8192 tokens a step: a few ms of GEMMs per step
model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(8)]).to(dev, torch.bfloat16)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
out = tempfile.mkdtemp()
with mfumon.monitor(model, seq_len=1, log_every=50, warmup=5, loggers=("jsonl",), run_name="h", log_dir=out) as mon:
    torch.cuda.set_sync_debug_mode("error")  # no step and no log may sync
    for step in range(300):  # about 10 ms a step: power appears at the first log a second in
        x = torch.randn(8192, d, device=dev, dtype=torch.bfloat16)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.step(tokens=8192)
    torch.cuda.set_sync_debug_mode(0)
keys = [K.MFU, K.SM_CLOCK_MHZ, K.POWER_W, K.JOULES_PER_TOKEN, K.MEM_PEAK_GIB, K.MEM_RESERVED_GIB,
        K.MEM_ALLOC_RETRIES, K.MEM_OOMS, "throttle_reasons", "capped_frac", "mfu_at_clock", "sm_clock_max_mhz", "power_w_at_log"]
for line in open(f"{out}/h.jsonl"):
    r = json.loads(line)
    print(r["step"], {k.removeprefix("mfumon/"): r[k] for k in keys if k in r})
print("torch max_memory_allocated now (GiB):", torch.cuda.max_memory_allocated() / 2**30)
PY
section "bench_profile.py (step profile: GPT-2 small bf16, then a small MoE; compare % ceil with peak --measure above)"
timeout 150 python benchmarks/bench_profile.py --model gpt2 --steps 30 --every 10 --repeats 2 2>&1 | tail -25 | tee "$OUT/profile_gpt2.txt"
timeout 150 python benchmarks/bench_profile.py --model moe --steps 30 --every 10 --repeats 2 2>&1 | tail -25 | tee "$OUT/profile_moe.txt"
section done
