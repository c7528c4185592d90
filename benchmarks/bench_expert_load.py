"""Cost of counting MoE expert load: a real Mixtral training step with `expert_load` on vs off.

Two identical tiny-but-not-trivial Mixtral models (transformers, from a config: hidden 256, 8
experts, top-2, 4 layers, intermediate 512; batch 4 x 256 tokens), each with its own AdamW and its
own Monitor, one with ``expert_load=True`` and one with ``expert_load=False``, train in turns (the
order alternating each round, so drift and the machine's load fall on both alike). Printed:

1. the median step time of each and their ratio, and the mean of the paired per-round
   differences with its standard error (how sure the ratio is). On the CPU the step runs on one
   thread and is timed by that thread's CPU time (``time.thread_time``), so other processes on a
   shared machine add no time to it (they still share caches and memory bandwidth);
2. the counting itself, timed apart: the hooks' work for one step (all MoE layers) on the step's
   real index tensors, as a share of the median step time: the overhead without the noise.

On CUDA the step runs in bf16 autocast, and (2) runs under ``torch.cuda.set_sync_debug_mode("error")``:
a host sync in the counting would raise (the whole step cannot: Mixtral's expert loop syncs itself).

    python benchmarks/bench_expert_load.py [--rounds 40] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import mfumon
from mfumon.expert_load import expert_load_source

SEQ, BATCH, VOCAB = 256, 4, 1024


def mixtral(device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


class Run:
    """One model, its optimizer and its monitor."""

    def __init__(self, device: torch.device, expert_load: bool) -> None:
        self.device = device
        self.model = mixtral(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.mon = mfumon.Monitor(
            self.model,
            seq_len=SEQ,
            log_every=10,
            warmup=2,
            loggers=(),
            peak_tflops=1.0,
            expert_load=expert_load,
        )
        self.mon.start()
        self.times: list[float] = []

    def step(self, x: torch.Tensor) -> float:
        cuda = self.device.type == "cuda"
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        if cuda:
            torch.cuda.synchronize()
        clock = time.perf_counter if cuda else time.thread_time  # CPU: this thread's CPU time (below)
        t0 = clock()
        with ctx:
            logits = self.model(x[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.mon.step(tokens=BATCH * SEQ)
        if cuda:
            torch.cuda.synchronize()  # the benchmark's own clock
        return clock() - t0


def counting_cost(device: torch.device, reps: int) -> tuple[float, int]:
    """Seconds of counting work per training step (all MoE layers), timed on the real index tensors."""
    model = mixtral(device)
    seen: list[tuple[torch.nn.Module, tuple, dict]] = []
    experts = [m.experts for m in model.modules() if type(m).__name__ == "MixtralSparseMoeBlock"]
    grab = [
        e.register_forward_pre_hook(lambda m, a, k: seen.append((m, a, k)), with_kwargs=True) for e in experts
    ]
    x = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), torch.no_grad():
        model(x)
    for h in grab:
        h.remove()
    source = expert_load_source(model, mfumon.errors.FaultLog())
    assert source is not None and len(seen) == len(experts)
    hooks = [next(iter(m._forward_pre_hooks.values())) for m, _, _ in seen]

    def one_step() -> None:
        for hook, (m, a, k) in zip(hooks, seen, strict=True):
            hook(m, a, k)

    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    for _ in range(5):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the counting must never sync the host
    t0 = clock()
    for _ in range(reps):
        one_step()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    per_step = (clock() - t0) / reps
    counted = sum(source.collect())  # also checks the hooks counted: reps + 5 steps x tokens x k x layers
    source.close()
    return per_step, int(counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread, timed by its own CPU time: other processes' load stays out
    on, off = Run(device, True), Run(device, False)
    x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device=device)
    for run in (on, off):  # warm-up: allocator, first-step probes
        for _ in range(3):
            run.step(x)
    diffs = []
    for r in range(args.rounds):
        pair = (on, off) if r % 2 == 0 else (off, on)
        t = {id(run): run.step(x) for run in pair}
        on.times.append(t[id(on)])
        off.times.append(t[id(off)])
        diffs.append(t[id(on)] - t[id(off)])
    for run in (on, off):
        run.mon.close()
    med_on, med_off = statistics.median(on.times), statistics.median(off.times)
    mean_diff = statistics.fmean(diffs)
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs))
    keys = on.mon.metrics
    timed = "wall clock, synchronized" if device.type == "cuda" else "the thread's CPU time"
    print(f"device: {device_label(device)}; torch {torch.__version__}; timed by {timed}")
    print(
        f"Mixtral hidden 256, 8 experts top-2, 4 layers, batch {BATCH} x {SEQ} tokens, {args.rounds} rounds"
    )
    print(
        f"median step: expert_load off {med_off * 1e3:.2f} ms, on {med_on * 1e3:.2f} ms, "
        f"ratio {med_on / med_off:.4f}"
    )
    print(
        f"paired difference on - off: {mean_diff * 1e3:+.3f} ms +- {stderr * 1e3:.3f} ms (1 s.e.), "
        f"{mean_diff / med_off * 100:+.2f}% +- {stderr / med_off * 100:.2f}%"
    )
    cost, counted = counting_cost(device, reps=200)
    print(
        f"counting alone: {cost * 1e6:.1f} us per step (4 MoE layers) = {cost / med_off * 100:.3f}% of "
        f"the step ({counted} token-expert choices counted)"
    )
    print(
        f"last window: expert_load_max {keys.get('mfumon/expert_load_max')}, "
        f"experts_idle {keys.get('mfumon/experts_idle')}"
    )


if __name__ == "__main__":
    main()
