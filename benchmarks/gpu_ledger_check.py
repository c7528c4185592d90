"""GPU checks of the time ledger and the setup paths owed a GPU; prints one JSON object.

1. goodput and input wait on the CUDA timeline against the host's own clock: a small GPT in bf16
   autocast whose loader sleeps a known time per step and whose evaluation pauses a known time
   per window, the whole loop under `torch.cuda.set_sync_debug_mode("error")`;
2. the first-forward GEMM ceiling under CUDA autocast (`measure_ceiling=True`, dtype from autocast);
3. the self-check's fake-tensor trace at setup leaves the device allocator where it was;
4. where a MoE model is available, expert load on vs off on a real MoE step.

    python benchmarks/gpu_ledger_check.py [--steps 120]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from train_tiny_gpt import TinyGPT  # noqa: E402

import mfumon  # noqa: E402
from mfumon import metrics as K  # noqa: E402

VOCAB, SEQ, BATCH = 256, 256, 8
DEVICE_KEYS = (
    K.SM_CLOCK_MHZ,
    K.POWER_W,
    K.JOULES_PER_TOKEN,
    K.MEM_PEAK_GIB,
    K.MEM_RESERVED_GIB,
    K.MEM_ALLOC_RETRIES,
)


class Keep(mfumon.Logger):
    def __init__(self) -> None:
        self.windows: dict[int, dict[str, float]] = {}

    def log(self, metrics, step):  # type: ignore[no-untyped-def]
        self.windows[step] = dict(metrics)


def ledger(steps: int, loader_s: float, pause_s: float, every: int = 10) -> dict:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = TinyGPT(VOCAB, SEQ, d_model=512, n_layers=8, n_heads=8).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    keep = Keep()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device=dev)
    host: dict[int, dict[str, float]] = {}
    with mfumon.monitor(
        model, seq_len=SEQ, log_every=every, warmup=every, loggers=(keep,), peak_tflops=989.5
    ) as mon:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in a step or a log raises
        start = time.perf_counter()
        paused = slept = 0.0
        for step in range(1, steps + 1):
            time.sleep(loader_s)  # the data loader, before the first forward
            slept += loader_s
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(tokens=BATCH * SEQ)
            if step % every == 0:
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()  # the test's clock: host time with the device drained
                now = time.perf_counter()
                host[step] = {"wall": now - start, "paused": paused, "slept": slept}
                torch.cuda.set_sync_debug_mode("error")
                if pause_s:
                    with mon.paused():  # evaluation
                        time.sleep(pause_s)
                paused, slept, start = pause_s, 0.0, now
        torch.cuda.set_sync_debug_mode(0)
    rows = []
    for step, window in sorted(keep.windows.items()):
        h = host[step]
        rows.append(
            {
                "step": step,
                "goodput": round(window.get(K.GOODPUT, float("nan")), 4),
                "goodput_host": round((h["wall"] - h["paused"]) / h["wall"], 4),
                "input_wait": round(window.get(K.INPUT_WAIT_FRAC, float("nan")), 4),
                "loader_share_host": round(h["slept"] / (h["wall"] - h["paused"]), 4),
                "step_ms": round(window[K.STEP_TIME_MS], 3),
                "mfu": round(window[K.MFU], 5),
                "mfu_wall": round(window.get(K.MFU_WALL, float("nan")), 5),
                **{k.removeprefix("mfumon/"): window[k] for k in DEVICE_KEYS if k in window},
            }
        )
    return {
        "loader_s": loader_s,
        "pause_s": pause_s,
        "windows": rows,
        "summary_split": {k: round(v, 4) for k, v in mon.summary().items() if k.endswith("_s")},
    }


def autocast_ceiling() -> dict:
    dev = torch.device("cuda")
    model = TinyGPT(VOCAB, SEQ, d_model=512, n_layers=8, n_heads=8).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device=dev)
    with mfumon.monitor(model, seq_len=SEQ, log_every=5, warmup=2, loggers=(), measure_ceiling=True) as mon:
        before = mon.peak.dtype
        for _ in range(10):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
            nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(tokens=BATCH * SEQ)
    return {
        "dtype_at_setup": before,
        "dtype_after_first_forward": mon.peak.dtype,
        "measured_ceiling_tflops": None
        if mon.measured_peak_flops is None
        else round(mon.measured_peak_flops / 1e12, 1),
        "mfu_measured": mon.metrics.get(K.MFU_MEASURED),
    }


def self_check_memory() -> dict:
    dev = torch.device("cuda")
    model = TinyGPT(VOCAB, SEQ, d_model=512, n_layers=8, n_heads=8).to(dev)
    torch.cuda.synchronize()
    before = (torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated())
    t0 = time.perf_counter()
    mon = mfumon.Monitor(model, seq_len=SEQ, loggers=(), self_check=True, peak_tflops=989.5)
    setup_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    after = (torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated())
    mon.close()
    return {
        "allocated_before_after": [before[0], after[0]],
        "peak_before_after": [before[1], after[1]],
        "setup_s": round(setup_s, 3),
    }


def expert_load_overhead(steps: int) -> dict:
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError as exc:
        return {"skipped": str(exc)}
    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
    )
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).to(dev, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, cfg.vocab_size, (8, 1024), device=dev)
    out = {}
    for _ in range(2):
        for on in (False, True):
            keep = Keep()
            with mfumon.monitor(
                model, seq_len=1024, log_every=10, warmup=5, loggers=(keep,), expert_load=on
            ) as mon:
                torch.cuda.set_sync_debug_mode("error")
                for _ in range(steps):
                    model(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    mon.step(tokens=ids.numel())
                torch.cuda.set_sync_debug_mode(0)
            ms = statistics.median(w[K.STEP_TIME_MS] for w in keep.windows.values())
            out.setdefault("on" if on else "off", []).append(round(ms, 3))
            if on:
                last = keep.windows[max(keep.windows)]
                out["expert_load_max"] = last.get(K.EXPERT_LOAD_MAX)
                out["experts_idle"] = last.get(K.EXPERTS_IDLE)
    out["ratio_on_off"] = round(statistics.median(out["on"]) / statistics.median(out["off"]), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    result: dict = {"device": torch.cuda.get_device_name()}
    for name, fn in (
        ("ledger_loader_5ms_pause_50ms", lambda: ledger(args.steps, 0.005, 0.05)),
        ("ledger_no_loader_no_pause", lambda: ledger(args.steps, 0.0, 0.0)),
        ("autocast_ceiling", autocast_ceiling),
        ("self_check_memory", self_check_memory),
        ("expert_load_overhead", lambda: expert_load_overhead(40)),
    ):
        try:
            result[name] = fn()
        except Exception as exc:  # one failing check must not hide the others
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({name: result[name]}), flush=True)


if __name__ == "__main__":
    main()
