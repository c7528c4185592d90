"""How long the setup self-check takes on a Llama-3-8B shape built on the meta device.

    python benchmarks/bench_selfcheck.py                  # seq_len 2048 and 8192
    python benchmarks/bench_selfcheck.py --seq-len 4096

The self-check traces one training step (forward + backward) on fake tensors under FlopCounterMode
and compares it with the structural count; it runs once per Monitor, at construction. Its cost
should not depend on seq_len (fake tensors carry shapes, not data). Printed beside it: the
structural count the monitor makes anyway (`flop_breakdown`), for the ratio. On a machine with a
GPU it first checks that a small Llama on the GPU (bf16, SDPA) is traced with no device memory
allocated and that the trace equals FlopCounterMode on a real step there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from mfumon.flops import flop_breakdown
from mfumon.measure import measure_flops
from mfumon.selfcheck import self_check

LLAMA_3_8B = dict(  # meta-llama/Meta-Llama-3-8B config.json (the parts that shape the FLOPs)
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)


def cuda_check(seq_len: int = 2048) -> None:
    """A small Llama on the GPU: the self-check allocates nothing there and equals a real step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(
        LLAMA_3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4
    )
    config = AutoConfig.for_model("llama", **dict(small, num_key_value_heads=2))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    allocated, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    start = time.perf_counter()
    result = self_check(model, seq_len, warn=False)
    check_s = time.perf_counter() - start
    torch.cuda.synchronize()
    untouched = torch.cuda.memory_allocated() == allocated and torch.cuda.max_memory_allocated() == peak
    ids = torch.zeros((1, seq_len), dtype=torch.long, device="cuda")
    real = measure_flops(model, {"input_ids": ids}) // seq_len
    print(
        f"{torch.cuda.get_device_name()}: small Llama bf16 at {seq_len}: self-check {check_s:.2f} s, "
        f"device memory untouched: {untouched}, traced {result.traced:,} == real step {real:,}: "
        f"{result.traced == real}, agrees: {result.agrees}"
    )


def main(seq_lens: list[int], repeats: int) -> None:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **LLAMA_3_8B)
    start = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    machine = platform.processor() or platform.machine()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"machine: {machine}, {os.cpu_count()} CPUs, {versions}")
    print(f"Llama-3-8B shape on meta: {params:,} parameters, built in {build_s:.2f} s")
    for seq_len in seq_lens:
        counts, checks = [], []
        result = None
        for _ in range(repeats):
            start = time.perf_counter()
            flop_breakdown(model, seq_len)  # what the monitor counts anyway (layout cached after the first)
            counts.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = self_check(model, seq_len, warn=False)
            checks.append(time.perf_counter() - start)
        assert result is not None
        check_s, count_s = statistics.median(checks), statistics.median(counts)
        print(
            f"seq_len {seq_len}: self-check median of {repeats} {check_s:.2f} s (first {checks[0]:.2f} s), "
            f"flop_breakdown {count_s * 1e3:.1f} ms; traced {result.traced:,} vs counted {result.counted:,} "
            f"FLOPs/token, agrees: {result.agrees}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, action="append", help="default: 2048 and 8192")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if torch.cuda.is_available():
        cuda_check()
    main(args.seq_len or [2048, 8192], args.repeats)
